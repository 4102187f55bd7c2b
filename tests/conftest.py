import os

import pytest
import torch

# Triton's interpreter must be on before any @triton.jit function is defined: without a GPU, the Triton kernels
# run on the CPU through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check kernels with their first tile config (tests/test_int8.py checks every config once); autotuning each
# test's shape would cost minutes of tuning runs.
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")

from fastattn.backends import unavailable_reason  # noqa: E402
from fastattn.hf import _installed_kernels_package  # noqa: E402

# transformers imports HF's `kernels` package when it is installed (transformers 5.x requires it); pytest started in
# this checkout would find our Triton folder kernels/ under that name instead: import HF's first, for every test
# file that loads a transformers model (not only those that call fastattn.hf.register(), which does the same).
_installed_kernels_package()

HAS_GPU = torch.cuda.is_available()
BACKENDS = ["reference", "cpu", "triton", "cuda"]


def backend_device(name: str) -> str:
    """The device a backend is tested on: the GPU where there is one (cpu is CPU-only)."""
    return "cuda" if HAS_GPU and name != "cpu" else "cpu"


def backend_params():
    """pytest params for every backend; the CUDA one is marked gpu and skipped without a GPU."""
    return [pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b for b in BACKENDS]


@pytest.fixture
def backend_name(request):
    name = request.param
    why = unavailable_reason(name)
    if why is None:
        return name
    if name == "cuda" and not HAS_GPU:
        pytest.skip(f"needs a GPU: {why}")
    if os.environ.get("FASTATTN_EXPECT_CPP") == "1":  # CI builds the extension: a missing backend is a failure
        pytest.fail(f"backend {name!r} is unavailable: {why}")
    pytest.skip(why)


class TorchFunctionSubclass(torch.Tensor):
    """A tensor subclass that gives torch functions a meaning of its own (as DTensor does): kernels must not read it."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Floor of the error bound, relative to the reference's magnitude: about one rounding step of the dtype.
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_bounded(name: str, out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, dtype,
                   scale: float = None) -> None:
    """err(out) <= 2 * err(torch in the same dtype) + eps, both measured against a float64 reference; eps is about
    one rounding step of dtype at ``scale`` (default: the reference's magnitude, at least 1)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, base = max_err(out, ref), max_err(torch_out, ref)
    if scale is None:
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    bound = 2 * base + EPS[dtype] * scale
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x torch's {base:.3g} + {EPS[dtype] * scale:.3g}"



def cuda_kernels(*ops: str):
    """fastattn._C for a test that calls its CUDA kernels ``ops`` directly. Skipped without a GPU; without the
    kernels, skipped too, or failed where the build must have them (FASTATTN_EXPECT_CUDA_OPS=1, as in the GPU suite)."""
    from fastattn import _ext
    if not HAS_GPU:
        pytest.skip("needs a GPU")
    missing = [op for op in ops if not hasattr(_ext._C, op)]
    if missing:
        why = _ext.cpp_missing_reason() if _ext._C is None else f"fastattn._C has no {', '.join(missing)}"
        if os.environ.get("FASTATTN_EXPECT_CUDA_OPS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return _ext._C


def skip_if_not_built(backend_name: str, op: str) -> None:
    """Skip when this build of fastattn._C has no ``{op}_{backend}`` kernel (cpu/cuda backends only)."""
    from fastattn import _ext
    if backend_name in ("cpu", "cuda") and not hasattr(_ext._C, f"{op}_{backend_name}"):
        pytest.skip(f"fastattn._C has no {op}_{backend_name} kernel in this build")


def grads_equal(a, b, rtol=1e-6, atol=1e-6):
    """The parameters of modules a and b have equal gradients; a parameter the loss does not reach has None in
    eager and may have zeros under torch.compile (torch's own behaviour): both count as zeros."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        want = torch.zeros_like(p) if p.grad is None else p.grad
        got = torch.zeros_like(q) if q.grad is None else q.grad
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)


def backends_train_alike(make_model, batch: dict, steps: int = 3):
    """make_model(backend) for "fastattn" and "torch", each trained ``steps`` AdamW steps on ``batch`` (the model's
    keyword arguments, labels included): the same losses each step, falling; returns the fastattn model."""
    losses, models = {}, {}
    for backend in ("fastattn", "torch"):
        model = models[backend] = make_model(backend).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[backend] = []
        for _ in range(steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    torch.testing.assert_close(losses["fastattn"], losses["torch"], rtol=1e-4, atol=1e-5)
    assert losses["fastattn"][-1] < losses["fastattn"][0]
    return models["fastattn"]


def padded_batch(vocab: int, length: int, n_pad: int, left: bool, pad_id: int, low: int, seed: int = 0):
    """(ids, attention_mask) (2, length): random ids in [low, vocab) (none of them padding when low > pad_id), the
    second row padded with pad_id by n_pad on the left or the right."""
    ids = torch.randint(low, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    cut = slice(0, n_pad) if left else slice(length - n_pad, length)
    ids[1, cut], mask[1, cut] = pad_id, 0
    return ids, mask


def matches_hf_causal_lm(path, hf, vocab: int, caplog, *, per_row_reference: bool = False):
    """GPT.from_hf(path) (hf saved there) against transformers' model on a left-padded batch: logits bounded by hf's
    own fp32 error against its float64 run (``per_row_reference``: that run row by row without padding, for models
    whose float64 masking gives NaN), 10 greedy tokens through the bound decode step equal to hf.generate's.
    Returns our model."""
    import inspect
    import logging
    from fastattn.models import GPT
    ours = GPT.from_hf(path)
    hf64 = type(hf).from_pretrained(path, dtype=torch.float64).eval()
    ids, mask = padded_batch(vocab, 12, 4, left=True, pad_id=0, low=1)
    keep = mask.bool()
    # positions counted from each row's first real token, as generate() and our models count them (a forward
    # without position_ids counts from the padding in some families: GPT-BigCode)
    pos = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if \
        "position_ids" in inspect.signature(hf.forward).parameters else {}
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask, **pos).logits
        if per_row_reference:
            ref = torch.cat([hf64(ids[i:i + 1, keep[i]]).logits[0] for i in range(len(ids))])
        else:
            ref = hf64(ids, attention_mask=mask, **pos).logits[keep]
        assert_bounded(type(hf).__name__, a[keep], ref.double(), b[keep], torch.float32)
        with caplog.at_level(logging.DEBUG, logger="fastattn"):
            mine = ours.generate(ids, 10, temperature=0, attention_mask=mask, eos_token_id=None)
        assert "not bound" not in caplog.text  # the bound decode step ran these blocks
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert torch.equal(mine, theirs)
    return ours
