"""``fastattn check``: each op on every backend that runs here against the float64 reference, forward and backward,
bounded as the tests bound it: the error within twice the error of the reference computed in the same dtype, plus
about one rounding step at the result's scale. A backend that declares an input unsupported is listed as such."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import fastattn
from .backends import BackendNotSupported
from .reference import add_norm_ref, attention_ref, decode_attention_ref, int8_matmul_ref

ULP = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _worst(got: Sequence[Tensor], base: Sequence[Tensor], exact: Sequence[Tensor], dtype) -> Tuple[float, float]:
    """The (error, bound) pair of the output or gradient that comes closest to its bound."""
    worst_err, worst_bound = 0.0, 1.0
    for a, t, e in zip(got, base, exact):
        if not e.numel():
            continue
        err = (a.double() - e).abs().max().item() if torch.isfinite(a).all() else float("inf")
        bound = 2 * (t.double() - e).abs().max().item() + ULP[dtype] * max(1.0, e.abs().max().item())
        if err / bound > worst_err / worst_bound:
            worst_err, worst_bound = err, bound
    return worst_err, worst_bound


def _grads(fn: Callable, inputs: Sequence[Optional[Tensor]], dout: Tensor, dtype) -> List[Tensor]:
    """[fn(*inputs in dtype), then the gradient of every input] for the output gradient dout."""
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out] + [t.grad for t in leaves if t is not None]


def _compare(ours: Callable, ref: Callable, inputs, dout, dtype) -> Tuple[float, float]:
    """ours against the reference run in float64, bounded by the reference run in dtype (forward and backward)."""
    return _worst(_grads(ours, inputs, dout, dtype), _grads(lambda *t: ref(*t, False), inputs, dout, dtype),
                  _grads(lambda *t: ref(*t, True), inputs, dout, torch.float64), dtype)


def _randn(g, *shape, device):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)


def check_add_norm(backend: str, device: str, dtype, is_rms: bool) -> Tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    M, N = 64, 1000
    x, r, w, b, dy = (_randn(g, *s, device=device) for s in ((M, N), (M, N), (N,), (N,), (M, N)))
    eps = 1e-6 if is_rms else 1e-5

    def ours(x, r, w, b):
        with fastattn.backend(backend):
            return fastattn.add_rms_norm(x, r, w) if is_rms else fastattn.add_layer_norm(x, r, w, b)

    return _compare(ours, lambda x, r, w, b, up: add_norm_ref(x, r, w, b, eps, is_rms=is_rms, upcast=up),
                    (x, r, w, None if is_rms else b), dy, dtype)


def check_attention(backend: str, device: str, dtype) -> Tuple[float, float]:
    """Causal (bottom-right) grouped-query attention, 8 query heads on 2 KV heads, lengths across kernel blocks."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (_randn(g, 2, h, n, 64, device=device) for h, n in ((8, 67), (2, 83), (2, 83)))
    dout = _randn(g, 2, 8, 67, 64, device=device)

    def ours(q, k, v):
        with fastattn.backend(backend):
            return fastattn.attention(q, k, v, causal="bottom_right")

    return _compare(ours, lambda q, k, v, up: attention_ref(q, k, v, causal="bottom_right", upcast=up),
                    (q, k, v), dout, dtype)


def check_attention_varlen(backend: str, device: str, dtype) -> Tuple[float, float]:
    """Packed sequences of 5, 37, 1 and 60 queries on 9, 37, 2 and 60 keys, causal, GQA."""
    g = torch.Generator().manual_seed(2)
    lens_q, lens_k = [5, 37, 1, 60], [9, 37, 2, 60]
    q, k, v = (_randn(g, sum(n), h, 64, device=device) for n, h in ((lens_q, 8), (lens_k, 2), (lens_k, 2)))
    dout = _randn(g, sum(lens_q), 8, 64, device=device)
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device=device)
                  for n in (lens_q, lens_k))

    def ours(q, k, v):
        with fastattn.backend(backend):
            return fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True)

    def ref(q, k, v, up):
        outs = []
        for b in range(len(lens_q)):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            out = attention_ref(*(t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks))),
                                causal="bottom_right", upcast=up)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    return _compare(ours, ref, (q, k, v), dout, dtype)


def check_decode(backend: str, device: str, dtype) -> Tuple[float, float]:
    """Split-KV decode attention (forward only): 2 query rows against a 300-key cache, per-sequence lengths."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (_randn(g, 2, h, n, 64, device=device) for h, n in ((8, 2), (2, 300), (2, 300)))
    lens = torch.tensor([300, 171], dtype=torch.int32, device=device)
    args = (q, k, v, lens)
    base = decode_attention_ref(*(t.to(dtype) for t in args[:3]), lens, causal=True, upcast=False)
    exact = decode_attention_ref(*args, causal=True)
    with torch.no_grad(), fastattn.backend(backend):
        got = fastattn.decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), lens, causal=True)
    return _worst([got], [base], [exact], dtype)


def check_int8(backend: str, device: str, dtype) -> Tuple[float, float]:
    """W8A8 GEMM with per-token and per-channel scales and a bias (exact int32 accumulation), fp16 out."""
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (67, 512), generator=g, dtype=torch.int8).to(device)
    b = torch.randint(-127, 128, (256, 512), generator=g, dtype=torch.int8).to(device)
    sa, sb, bias = (torch.rand(n, generator=g).to(device) * 0.01 for n in (67, 256, 256))
    with fastattn.backend(backend):
        got = fastattn.int8_matmul(a, b, sa, sb, bias, out_dtype=dtype)
    exact = int8_matmul_ref(a, b, sa.double(), sb.double(), bias.double(), out_dtype=torch.float64)
    return _worst([got], [exact.to(dtype)], [exact], dtype)  # the bound: the correctly rounded result's error


# name -> (check(backend, device, dtype), dtypes)
CHECKS: Dict[str, Tuple[Callable, Tuple[torch.dtype, ...]]] = {
    "add+layernorm": (lambda b, d, t: check_add_norm(b, d, t, False), FLOATS),
    "add+rmsnorm": (lambda b, d, t: check_add_norm(b, d, t, True), FLOATS),
    "attention": (check_attention, FLOATS),
    "attention_varlen": (check_attention_varlen, FLOATS),
    "decode_attention": (check_decode, FLOATS),
    "int8_matmul": (check_int8, (torch.float16,)),
}


def run(backends: Sequence[str], device_of: Callable[[str], str]) -> Tuple[List[List[str]], int]:
    """Table rows [op, backend, dtype, max err, bound, result] and the number of failures."""
    rows, failed = [], 0
    for op, (check, dtypes) in CHECKS.items():
        for name in backends:
            for dtype in dtypes:
                try:
                    err, bound = check(name, device_of(name), dtype)
                except BackendNotSupported:
                    rows.append([op, name, str(dtype)[6:], "-", "-", "not supported"])
                    continue
                ok = err <= bound
                failed += not ok
                rows.append([op, name, str(dtype)[6:], f"{err:.2e}", f"{bound:.2e}", "ok" if ok else "FAIL"])
    return rows, failed
