"""The autograd.Functions of attention. Both support torch.func: vmap folds the vmapped dim into the batch (one
kernel launch), and grad / jacrev / vjp run the backward through the custom op when its inputs are transformed."""
from __future__ import annotations

import torch

from ..batching import eager_twin, fold, front, graph_capture, is_legacy_batched, is_transformed, unfold
from .dispatch import attention_bwd_op, attention_fwd_op, bwd, bwd_into, bwd_with_graph, fwd, last_dim_unit
from .params import AttnParams


class AttentionFunction(torch.autograd.Function):
    """(out, lse) = attention(q, k, v, mask, alibi) on ``backend`` ("" = auto). The AttnParams come as their flat
    fields: torch.compile traces plain scalars through an autograd.Function."""

    @staticmethod
    def forward(q, k, v, mask, alibi, backend: str, *flat):
        if graph_capture():
            if torch.compiler.is_exporting() and torch.compiler.is_dynamo_compiling():
                # strict torch.export runs a Function's forward without grad and keeps no backward: the op, run with
                # grad, records its own autograd formula (non-strict export records the op as called here)
                with torch.enable_grad():
                    return attention_fwd_op(q, k, v, mask, alibi, *flat, backend)
            return attention_fwd_op(q, k, v, mask, alibi, *flat, backend)
        # backend: read by the API in eager mode ("" = auto: not read again); the C++ ops return lists
        return tuple(fwd(q, k, v, mask, alibi, AttnParams(*flat), backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, alibi, backend, *flat = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask, alibi)
        ctx.flat, ctx.backend = tuple(flat), backend
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, alibi = ctx.saved_tensors
        args = (q, k, v, out, lse, mask, alibi, ctx.backend, *ctx.flat)
        if torch.compiler.is_compiling() or is_legacy_batched(dout):  # torch.compile; gradcheck's batched grads
            dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, mask, alibi, *ctx.flat, ctx.backend)
        elif is_transformed(dout, q, k, v, out, lse, mask, alibi):  # torch.func
            dq, dk, dv = AttentionBackward.apply(dout, *args)
        elif torch.is_grad_enabled():  # create_graph=True: a double backward follows
            dq, dk, dv = bwd_with_graph(dout, (q, k, v), _three, mask, alibi, AttnParams(*ctx.flat), ctx.backend)
        else:
            dq, dk, dv = AttentionBackward.forward(dout, *args)
        return (dq, dk, dv, None, None, None) + (None,) * len(ctx.flat)

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, alibi, backend, *flat):
        n = info.batch_size
        if info.randomness == "same" and AttnParams(*flat).dropout_p > 0:  # one mask for every sample, as torch's
            return _sample_by_sample(AttentionFunction, (q, k, v, mask, alibi), in_dims, n, 3, (backend, *flat)), (0, 0)
        # samples folded into the batch: a dropout mask per sample (randomness="different")
        q, k, v, mask, alibi = (fold(t, d, n) for t, d in zip((q, k, v, mask, alibi), in_dims))
        q, k, v, mask = last_dim_unit(q), last_dim_unit(k), last_dim_unit(v), last_dim_unit(mask, True)
        out, lse = AttentionFunction.apply(q, k, v, mask, alibi, backend, *flat)
        return (unfold(out, n), unfold(lse, n)), (0, 0)


AttentionFunctionEager = eager_twin(AttentionFunction)


def _op_setup_context(ctx, inputs, output):
    q, k, v, mask, alibi, *flat, backend = inputs  # the custom op's order: backend last
    AttentionFunction.setup_context(ctx, (q, k, v, mask, alibi, backend, *flat), output)


# The custom op differentiable by itself, with AttentionFunction's backward (its gradients line up with the op's
# inputs): what a graph that records the op without the Function around it (torch.export's programs) trains with.
attention_fwd_op.register_autograd(AttentionFunction.backward, setup_context=_op_setup_context)


def _sample_by_sample(fn, tensors, in_dims, n: int, mask_at: int, rest) -> tuple:
    """fn.apply on each of n vmapped samples in turn (the same dropout seed: one mask for all, as vmap's
    randomness="same" asks), its outputs stacked; tensors[mask_at] is the mask (its last dim may broadcast)."""
    ts = [front(t, d, n) for t, d in zip(tensors, in_dims)]
    res = [fn.apply(*(None if t is None else last_dim_unit(t[i], j == mask_at) for j, t in enumerate(ts)), *rest)
           for i in range(n)]
    return tuple(torch.stack(r) for r in zip(*res))


def _three(q, k, v):
    return q, k, v


class AttentionBackward(torch.autograd.Function):
    """(dq, dk, dv) of AttentionFunction as a function of its own, so that torch.func can batch it (jacrev, per-sample
    gradients) and run it on the unwrapped tensors; it has no derivative itself (a double backward
    outside torch.func runs on AttentionFunction.backward's create_graph path)."""

    @staticmethod
    def forward(dout, q, k, v, out, lse, mask, alibi, backend: str, *flat):
        dout = last_dim_unit(dout)
        return tuple(bwd(dout, q, k, v, out, lse, mask, alibi, AttnParams(*flat), backend or None))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fastattn attention: double backward (the gradient of the gradient) is not "
                                  "implemented")

    @staticmethod
    def vmap(info, in_dims, *args):
        n = info.batch_size
        if info.randomness == "same" and AttnParams(*args[9:]).dropout_p > 0:  # the forward's mask, sample by sample
            return _sample_by_sample(AttentionBackward, args[:8], in_dims, n, 6, args[8:]), (0, 0, 0)
        tensors = [last_dim_unit(fold(t, d, n), i == 6) for i, (t, d) in enumerate(zip(args[:8], in_dims))]
        return tuple(unfold(g, n) for g in AttentionBackward.apply(*tensors, *args[8:])), (0, 0, 0)


class PackedQKVAttention(torch.autograd.Function):
    """AttentionFunction (eager) for q, k, v = split(packed): three views of one tensor, such as the heads of a
    self-attention's (B, L, 3 * H * D) projection. Its gradient is packed's, one tensor that the backward writes dq,
    dk, dv into (the CPU and Triton backends in place), where q, k, v as inputs of their own get three gradients
    that autograd stacks back into the projection's: a copy of it every step."""

    @staticmethod
    def forward(ctx, packed, split, mask, alibi, backend: str, *flat):
        q, k, v = split(packed)
        out, lse = fwd(q, k, v, mask, alibi, AttnParams(*flat), backend)
        ctx.save_for_backward(packed, out, lse, mask, alibi)
        ctx.split, ctx.backend, ctx.flat = split, backend, flat
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        packed, out, lse, mask, alibi = ctx.saved_tensors
        # create_graph=True (a double backward follows), or batched gradients (is_grads_batched, gradcheck's
        # check_batched_grad): the reference's forward, differentiated by autograd (the kernels read no batched dout)
        if torch.is_grad_enabled() or is_legacy_batched(dout) or is_transformed(dout):
            grad, = bwd_with_graph(dout, (packed,), ctx.split, mask, alibi, AttnParams(*ctx.flat), ctx.backend)
            return (grad, None, None, None, None) + (None,) * len(ctx.flat)
        grad = torch.empty_like(packed)
        bwd_into(ctx.split(grad), last_dim_unit(dout), *ctx.split(packed), out, lse, mask, alibi,
                 AttnParams(*ctx.flat), ctx.backend or None)
        return (grad, None, None, None, None) + (None,) * len(ctx.flat)


class DroppedAttention(torch.autograd.Function):
    """dropout_p = 1 drops every probability: out = 0 and every gradient 0, as in torch."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.like = [(t.shape, t.dtype, t.device) for t in inputs]

    @staticmethod
    def backward(ctx, dout):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like)
