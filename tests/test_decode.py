"""Split-KV decode attention (fastattn.decode_attention) on every backend against the float64 reference, bounded
by torch's own error in the same dtype: cache lengths 1 to 4099, 1 to 16 queries, GQA / MQA, per-sequence lengths
with NaN past each one, key masks, softcap; the route from fastattn.attention; torch.compile; bad arguments; the
CPU code paths (AVX-512, AVX2, portable)."""
import logging

import pytest
import torch

import fastattn
from fastattn.ops.attention import decode as D
from fastattn.reference import attention_ref, decode_attention_ref
from conftest import HAS_GPU, assert_bounded, backend_device

LOW = [torch.float16, torch.bfloat16]
BACKENDS = ["reference", "cpu", "triton"]


def skip_unbuilt(backend_name):
    from fastattn import _ext
    if backend_name == "cpu" and not hasattr(_ext._C, "decode_attention_cpu"):
        pytest.skip("fastattn._C has no decode_attention_cpu in this build")


def rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def check(backend_name, B=2, H=4, Hk=None, L=1, S=97, E=64, Ev=None, dtype=torch.float32, lens=None, pad=False,
          softcap=0.0, causal=True, scale=None, seed=0):
    """fastattn.decode_attention on backend_name against the float64 reference. lens: per-sequence lengths (cache
    memory past each is NaN); pad: a random key_padding_mask (True = padding)."""
    skip_unbuilt(backend_name)
    dev = backend_device(backend_name)
    Hk, Ev = Hk or H, Ev or E
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand((B, H, L, E), dtype, dev, g), rand((B, Hk, S, E), dtype, dev, g), rand((B, Hk, S, Ev), dtype, dev, g)
    seqlens = None
    if lens is not None:
        seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
        for b, n in enumerate(lens):  # never read: NaN would reach the result
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("nan")
    kpm = (torch.rand((B, S), generator=g) < 0.25).to(dev) if pad else None
    keep = None if kpm is None else ~kpm
    with fastattn.backend(backend_name):
        out, lse = fastattn.decode_attention(q, k, v, seqlens, scale=scale, softcap=softcap, causal=causal,
                                             key_padding_mask=kpm, return_lse=True)
    kw = dict(scale=scale, softcap=softcap, causal=causal, return_lse=True)
    base, _ = decode_attention_ref(q, k, v, seqlens, keep, upcast=False, **kw)
    exact, exact_lse = decode_attention_ref(q.double(), k.double(), v.double(), seqlens, keep, **kw)
    assert out.dtype == dtype and out.shape == (B, H, L, Ev)
    assert_bounded("out", out, exact, base, dtype)
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: +inf exactly for the rows with no key"
    if finite.any():
        torch.testing.assert_close(lse[finite].double(), exact_lse[finite].double(), rtol=0, atol=1e-4)


BK = pytest.mark.parametrize("backend_name", BACKENDS, indirect=True)
CPU = pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)


@CPU
@pytest.mark.parametrize("S", [1, 2, 31, 97, 1025, 4099])
@pytest.mark.parametrize("L", [1, 3, 16])
def test_cache_lengths(backend_name, S, L):
    check(backend_name, S=S, L=L)


@CPU
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("E,Ev", [(64, 64), (128, 128), (80, 80), (24, 40), (7, 5), (256, 256)])
def test_dtypes_and_head_dims(backend_name, dtype, E, Ev):
    check(backend_name, S=301, L=2, E=E, Ev=Ev, dtype=dtype)


@CPU
@pytest.mark.parametrize("H,Hk", [(8, 2), (8, 1), (6, 3)], ids=["gqa", "mqa", "gqa-2"])
@pytest.mark.parametrize("L", [1, 5])
def test_gqa(backend_name, H, Hk, L):
    check(backend_name, B=2, H=H, Hk=Hk, L=L, S=1025)


@CPU
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("lens", [[1, 4099], [4099, 97], [1025, 2, 3000], [0, 50, 1]], ids=str)
def test_per_sequence_lengths(backend_name, dtype, lens):
    """Lengths from 0 (no key: 0 and lse +inf) and 1 to the full cache; NaN past each length never reaches out."""
    check(backend_name, B=len(lens), H=4, Hk=2, L=3, S=4099, lens=lens, dtype=dtype)


@CPU
@pytest.mark.parametrize("B,Hk", [(1, 1), (1, 2), (3, 1)])
def test_splits(backend_name, B, Hk):
    """Few (batch, kv head) groups: the keys are split across threads and the splits combined."""
    check(backend_name, B=B, H=2 * Hk, Hk=Hk, L=4, S=4099, lens=[4099, 1500, 700][:B])


@CPU
@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_and_causal(backend_name, causal):
    check(backend_name, B=3, H=4, Hk=2, L=6, S=700, pad=True, causal=causal, lens=[700, 6, 333])


@CPU
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
def test_softcap_and_scale(backend_name, dtype):
    check(backend_name, B=2, H=4, Hk=2, L=4, S=513, softcap=5.0, scale=0.3, dtype=dtype, lens=[513, 200])


def test_static_cache_padding_never_read():
    """A key_padding_mask over a static cache's unwritten slots (NaN there): masked keys are never read."""
    skip_unbuilt("cpu")
    g = torch.Generator().manual_seed(1)
    B, H, S, E = 2, 4, 1000, 64
    q, k, v = rand((B, H, 1, E), torch.float32, "cpu", g), rand((B, 2, S, E), torch.float32, "cpu", g), \
        rand((B, 2, S, E), torch.float32, "cpu", g)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, :300] = False
    pad[1, 5:700] = False  # left padding, then written slots
    k[pad[:, None, :, None].expand_as(k)] = float("nan")
    v[pad[:, None, :, None].expand_as(v)] = float("nan")
    for name in ["cpu", "reference"]:
        with fastattn.backend(name):
            out = fastattn.decode_attention(q, k, v, causal=False, key_padding_mask=pad)
        assert torch.isfinite(out).all(), name


# ---- Triton (the interpreter without a GPU: tiny shapes) ---------------------------------------------------
TRITON = pytest.mark.parametrize("backend_name", ["triton"], indirect=True)
TDT = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])  # the interpreter's bf16 dot is broken


@TRITON
@pytest.mark.parametrize("dtype", TDT, ids=str)
@pytest.mark.parametrize("S,L", [(1, 1), (97, 1), (97, 5), (130, 16)])
def test_triton(backend_name, dtype, S, L):
    check(backend_name, B=2, H=4, Hk=2, L=L, S=S, E=32, dtype=dtype)


@TRITON
def test_triton_lengths_masks_softcap(backend_name):
    check(backend_name, B=3, H=4, Hk=1, L=3, S=150, E=16, Ev=24, lens=[150, 1, 0], pad=True, softcap=4.0)


@BK
@pytest.mark.parametrize("softcap", [50.0, 200.0])
def test_large_softcap(backend_name, softcap):
    """Gemma-2's softcap and past it: within torch's own float32 error (Triton's tanh was ~1e-7 off everywhere)."""
    check(backend_name, B=1, H=4, L=1, S=256, softcap=softcap)


@TRITON
def test_triton_splits(backend_name, monkeypatch):
    """Several splits (the combine kernel) with lengths that leave some splits empty."""
    from fastattn.kernels import decode as K
    monkeypatch.setattr(K, "_num_splits", lambda *a: 3)
    check(backend_name, B=2, H=2, Hk=1, L=2, S=200, E=16, lens=[200, 40])
    # two blocks of query rows (GQA group 4 x 20 queries = 80 rows) x three splits x batch x kv heads on one axis
    check(backend_name, B=2, H=8, Hk=2, L=20, S=150, E=16, lens=[150, 70])


def test_triton_grid_takes_any_batch_x_heads(monkeypatch):
    """CUDA caps a grid's axes 1 and 2 at 65535 programs: the split kernel takes all its programs on axis 0."""
    pytest.importorskip("triton")
    from fastattn.kernels import decode as K
    grids = []

    class Kernel:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *a, **kw: None
    monkeypatch.setattr(K, "_decode_split_kernel", Kernel())
    monkeypatch.setattr(K, "_decode_combine_kernel", Kernel())
    monkeypatch.setattr(K, "_num_splits", lambda *a: 3)
    q, k = torch.empty(8192, 8, 1, 16), torch.empty(1, 1, 1, 16).expand(8192, 8, 9000, 16)
    K.decode_fwd(q, k, k, None, None, 0.25, 0.0, True)
    assert grids == [(8192 * 8 * 3,), (8192 * 8,)]


# ---- the route from fastattn.attention ---------------------------------------------------------------------
def _qkv(B=2, H=4, Hk=2, L=1, S=None, E=64, dtype=torch.float32, requires_grad=False):
    S = S or D.MIN_KEYS["cpu"] + 3
    g = torch.Generator().manual_seed(3)
    q, k, v = rand((B, H, L, E), dtype, "cpu", g), rand((B, Hk, S, E), dtype, "cpu", g), rand((B, Hk, S, E), dtype,
                                                                                            "cpu", g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _routed(caplog, q, k, v, **kw):
    D._route_backend.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="fastattn"):
        caplog.clear()
        out = fastattn.attention(q, k, v, **kw)
    return out, any("split-KV decode kernel" in r.getMessage() for r in caplog.records)


def test_route_taken_when_it_fits(caplog):
    skip_unbuilt("cpu")
    B, S = 2, D.MIN_KEYS["cpu"] + 3
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, :7] = True  # left padding
    pad[1, -20:] = True  # a static cache's unwritten slots
    for L, kw in [(1, {}), (1, dict(causal="bottom_right")), (16, dict(causal="bottom_right")),
                  (4, dict(key_padding_mask=pad)), (3, dict(key_padding_mask=pad, causal="bottom_right")),
                  (1, dict(softcap=3.0, scale=0.2))]:
        q, k, v = _qkv(L=L)
        out, routed = _routed(caplog, q, k, v, **kw)
        assert routed, (L, kw)
        with fastattn.backend("cpu"):
            D._route_backend.cache_clear()
            with torch.enable_grad():  # the flash path: gradients needed
                flash = fastattn.attention(q.requires_grad_(), k, v, **kw)
        assert_bounded(f"routed {L} {list(kw)}", out, flash.detach().double(), flash.detach(), torch.float32)


@pytest.mark.parametrize("case", ["long-query", "short-cache", "grad", "dropout", "top-left", "window", "alibi",
                                  "float-mask", "per-query-mask", "float64"])
def test_route_not_taken(caplog, case):
    skip_unbuilt("cpu")
    S = D.MIN_KEYS["cpu"] + 3
    q, k, v = _qkv(L=17 if case == "long-query" else 2, S=16 if case == "short-cache" else S,
                   dtype=torch.float64 if case == "float64" else torch.float32, requires_grad=case == "grad")
    kw = {"dropout": dict(dropout_p=0.1), "top-left": dict(causal="top_left"), "window": dict(window=(8, 0)),
          "alibi": dict(alibi_slopes=torch.rand(4)), "float-mask": dict(key_padding_mask=torch.zeros(2, S)),
          "per-query-mask": dict(attn_mask=torch.rand(2, 1, 2, S) > 0.3)}.get(case, {})
    _, routed = _routed(caplog, q, k, v, **kw)
    assert not routed


def test_route_forced_backends(caplog):
    skip_unbuilt("cpu")
    q, k, v = _qkv()
    with fastattn.backend("reference"):
        _, routed = _routed(caplog, q, k, v)
    assert not routed  # the reference runs the flash path's reference
    with fastattn.backend("cpu"):
        _, routed = _routed(caplog, q, k, v)
    assert routed


def test_route_return_lse_and_batch_dims(caplog):
    skip_unbuilt("cpu")
    q, k, v = _qkv(B=2, L=2)
    out, lse = fastattn.attention(q[None], k[None], v[None], return_lse=True)  # a leading batch dim of 1
    ref, ref_lse = D.decode_attention_ref(q.double(), k.double(), v.double(), causal=False, return_lse=True)
    assert out.shape == (1, 2, 4, 2, 64) and lse.shape == (1, 2, 4, 2)
    assert_bounded("out", out[0], ref, D.decode_attention_ref(q, k, v, causal=False, upcast=False), torch.float32)
    torch.testing.assert_close(lse[0].double(), ref_lse.double(), rtol=0, atol=1e-4)


@BK
@pytest.mark.parametrize("S", [40, 4096])
def test_nan_query_row_gives_nan_row(backend_name, S):
    """A NaN in a query row: that row's output and lse are NaN (not the 0 / +inf of a row with no key), through
    one split and through split-KV's combine; the other rows as without it."""
    skip_unbuilt(backend_name)
    dev = backend_device(backend_name)
    g = torch.Generator().manual_seed(0)
    q, k, v = rand((2, 4, 2, 64), torch.float32, dev, g), rand((2, 2, S, 64), torch.float32, dev, g), \
        rand((2, 2, S, 64), torch.float32, dev, g)
    qn = q.clone()
    qn[0, 1, 0, 5] = float("nan")
    with fastattn.backend(backend_name):
        out, lse = fastattn.decode_attention(q, k, v, return_lse=True)
        out_n, lse_n = fastattn.decode_attention(qn, k, v, return_lse=True)
    row = torch.zeros(2, 4, 2, dtype=torch.bool, device=dev)
    row[0, 1, 0] = True
    assert out_n[row].isnan().all() and lse_n[row].isnan().all()
    torch.testing.assert_close(out_n[~row], out[~row])
    torch.testing.assert_close(lse_n[~row], lse[~row])


@pytest.mark.parametrize("backend_name", ["reference", "cpu"], indirect=True)
def test_torch_compile_decode_step(backend_name):
    """A compiled decode step (static shapes, fullgraph) through fastattn.attention's route and decode_attention."""
    skip_unbuilt(backend_name)
    q, k, v = _qkv(L=1)
    pad = torch.zeros(2, k.shape[2], dtype=torch.bool)
    pad[:, -30:] = True
    lens = torch.tensor([k.shape[2], k.shape[2] // 2], dtype=torch.int32)

    def step(q, k, v, pad, lens):
        a = fastattn.attention(q, k, v, key_padding_mask=pad, causal="bottom_right")
        return a + fastattn.decode_attention(q, k, v, lens)

    with fastattn.backend(backend_name):
        expected = step(q, k, v, pad, lens)
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, pad, lens)
    torch.testing.assert_close(got, expected)


def test_bad_arguments():
    q, k, v = _qkv(S=40)
    with pytest.raises(fastattn.ArgumentError, match="k_cache"):
        fastattn.decode_attention(q, k[:, :, :, :32], v)
    with pytest.raises(fastattn.ArgumentError, match="v_cache"):
        fastattn.decode_attention(q, k, v[:, :, :30])
    with pytest.raises(fastattn.ArgumentError, match="kv heads"):
        fastattn.decode_attention(q, k[:, :1].expand(2, 3, 40, 64), v[:, :1].expand(2, 3, 40, 64))
    with pytest.raises(fastattn.ArgumentError, match="dtypes"):
        fastattn.decode_attention(q, k.half(), v)
    with pytest.raises(fastattn.ArgumentError, match="cache_seqlens"):
        fastattn.decode_attention(q, k, v, torch.tensor([1.0, 2.0]))
    with pytest.raises(fastattn.ArgumentError, match="cache_seqlens"):
        fastattn.decode_attention(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(fastattn.ArgumentError, match="cache_seqlens"):
        fastattn.decode_attention(q, k, v, torch.tensor([1, 41]))
    with pytest.raises(fastattn.ArgumentError, match="key_padding_mask"):
        fastattn.decode_attention(q, k, v, key_padding_mask=torch.zeros(2, 39, dtype=torch.bool))
    with pytest.raises(fastattn.ArgumentError, match="softcap"):
        fastattn.decode_attention(q, k, v, softcap=-1.0)
    with pytest.raises(fastattn.ArgumentError, match="scale"):
        fastattn.decode_attention(q, k, v, scale=float("nan"))
    with pytest.raises(fastattn.ArgumentError, match="forward-only"):
        fastattn.decode_attention(q.requires_grad_(), k, v)
    with pytest.raises(fastattn.ArgumentError, match="4 dims"):
        fastattn.decode_attention(q[0], k, v)


@pytest.mark.parametrize("env", [{"FASTATTN_CPU_NO_AVX512": "1"}, {"FASTATTN_CPU_NO_AVX2": "1"}],
                         ids=["avx2", "portable"])
def test_cpu_code_paths(env):
    """The CPU decode kernel chooses AVX-512, AVX2 or portable code at run time (once per process): run this file's
    CPU cases in fresh processes with the faster paths turned off."""
    import os
    import subprocess
    import sys
    skip_unbuilt("cpu")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "cpu and (gqa or dtypes or per_sequence or splits or padding or softcap or 1025) "
                        "and not code_paths"],
                       env=dict(os.environ, **env), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@TRITON
def test_route_to_triton(backend_name, caplog):
    """fastattn.attention with a forced Triton backend routes to the Triton decode kernel: the key mask (a (B, S)
    view with stride-0 head and query dims in the kernel's layout) read through its strides."""
    dev = backend_device(backend_name)
    B, S = 2, D.MIN_KEYS[dev] + 9
    q, k, v = (t.to(dev) for t in _qkv(B=B, H=4, Hk=2, L=2, S=S, E=16))
    pad = torch.zeros(B, S, dtype=torch.bool, device=dev)
    pad[0, :5] = True
    pad[1, -7:] = True
    with fastattn.backend("triton"):
        out, routed = _routed(caplog, q, k, v, key_padding_mask=pad, causal="bottom_right")
    assert routed
    mask = ~pad[:, None, None, :]
    kw = dict(causal="bottom_right")
    exact = attention_ref(q.double(), k.double(), v.double(), mask, **kw)
    assert_bounded("out", out, exact, attention_ref(q, k, v, mask, upcast=False, **kw), torch.float32)
