"""Cross-entropy rows in Triton, the inner op of fastattn.linear_cross_entropy: one program per row, an online
max / sum pass over the row in BLOCK columns, then (write_grad) a second pass writing softmax - onehot in place.
Contract: fastattn/ops/cross_entropy.py."""
import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _cross_entropy_kernel(
    X,  # pointer to logits, (n, V), rows stride_x apart; overwritten by the gradient when WRITE_GRAD
    T,  # pointer to targets, (n,) int64
    Loss,  # pointer to per-row losses, (n,) float32
    V, stride_x, ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    t = tl.load(T + row)
    ignored = t == ignore_index
    cols = tl.arange(0, BLOCK)
    # pass 1: running max m and sum s of 2^((x - m) log2 e), in base 2
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) * LOG2E
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
        m = m_new
    lse2 = m + tl.log2(s)  # logsumexp in base 2
    xt = tl.load(x_row + tl.where(ignored, 0, t)).to(tl.float32)
    tl.store(Loss + row, tl.where(ignored, 0.0, lse2 / LOG2E - xt))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < V, other=0.0).to(tl.float32)
            g = tl.exp2(x * LOG2E - lse2) - tl.where(c == t, 1.0, 0.0)
            tl.store(x_row + c, tl.where(ignored, 0.0, g).to(X.dtype.element_ty), mask=c < V)


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, ignore_index: int,
                      write_grad: bool) -> None:
    n, V = logits.shape
    if n == 0:
        return
    block = min(triton.next_power_of_2(V), 4096 if logits.is_cuda else 1024)
    _cross_entropy_kernel[(n,)](logits, target, loss, V, logits.stride(0), ignore_index,
                                WRITE_GRAD=write_grad, BLOCK=block, num_warps=8 if block >= 2048 else 4)
