"""tanh for the attention kernels' softcap (score -> softcap * tanh(score / softcap)), accurate in float32.

2 / (1 + exp(-2x)) - 1 is off by ~1e-7 absolute at every x: a relative error up to ~1e-3 near 0, which the softcap
then multiplies (Gemma-2's 50: ~5x torch's error on the output, 200: ~20x). Here: an odd Taylor polynomial below
|x| = 0.55 (terms through x^17; the first one left out is < 3e-9 there) and (1 - e) / (1 + e), e = exp(-2|x|),
beyond; and the derivative 1 - tanh^2 as 4e / (1 + e)^2 where 1 - t * t would cancel (|t| near 1)."""
import triton
import triton.language as tl

NEAR = tl.constexpr(0.55)


@triton.jit
def tanh_sech2(x):
    """(tanh(x), 1 - tanh(x)^2), each to a few float32 ulps."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    d = 1.0 + e
    far = (1.0 - e) / d
    x2 = tl.minimum(x * x, NEAR * NEAR)  # (the same where the polynomial is used; no overflow where it is not)
    p = 0.0005900274409  # 6404582 / 10854718875, then down to -1/3: tanh(x) = x + x^3 p(x^2)
    p = p * x2 - 0.001455834387
    p = p * x2 + 0.003592128037
    p = p * x2 - 0.008863235530
    p = p * x2 + 0.02186948854
    p = p * x2 - 0.05396825397
    p = p * x2 + 0.1333333333
    p = p * x2 - 0.3333333333
    near = a < NEAR
    t = tl.where(near, x + x * x2 * p, tl.where(x < 0, -far, far))
    return t, tl.where(near, 1.0 - t * t, 4.0 * e / (d * d))


@triton.jit
def tanh(x):
    t, _ = tanh_sech2(x)
    return t
