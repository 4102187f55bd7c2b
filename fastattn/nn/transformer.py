"""The torch.nn.Transformer family on fastattn's kernels: same constructors, forward signatures, parameters and
state_dict keys as torch's classes (they subclass them), with attention in the fused kernel
(:class:`~fastattn.nn.MultiheadAttention`) and every residual add + LayerNorm in one fused call: post-norm layers
compute norm(x + sublayer(x)) in one kernel, pre-norm layers carry the residual stream through ``prenorm=True``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.add_norm import add_layer_norm, add_norm_rows_nograd, plain_rows
from ..ops.batching import autocast_on
from ..ops.dropout import dropout
from ._fx import fx_leaf
from ._torchscript import refuse_script
from .activation import MultiheadAttention, ShapeMismatch, linear_rows, mha_forward
from .packed import Rows, nested_refusal, self_attention_rows
from .normalization import LayerNorm, autocast_fp32

_Activation = Union[str, Callable[[Tensor], Tensor]]


def _activation_fn(activation: _Activation) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    return activation


def _has_forward_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _has_hooks(m: nn.Module) -> bool:
    """Whether calling m runs more than its class's forward: hooks (its own forward or backward ones, or global
    module hooks) or a forward replaced on the instance (accelerate's hooks, adapters). Then the layer calls it
    instead of fusing past it (a backward hook on linear1 or norm1 fired in torch and was skipped)."""
    g = torch.nn.modules.module
    return bool("forward" in vars(m) or _has_forward_hooks(m) or m._backward_hooks or m._backward_pre_hooks
                or g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def _fusable(norm: nn.Module) -> bool:
    """A LayerNorm over the last dim whose forward nobody intercepts: its add + norm can run as one kernel."""
    return type(norm) in (nn.LayerNorm, LayerNorm) and len(norm.normalized_shape) == 1 and not _has_hooks(norm)


def _promoted(x: Tensor, residual: Tensor, promote: bool):
    """x and residual in the dtype of torch's x + residual (under autocast a bfloat16 sublayer output beside a
    float32 residual stream gives float32), or as they are when not ``promote`` (torch's fused inference path,
    whose output has the sublayer's dtype, as add_layer_norm's has x's)."""
    if not promote or x.dtype == residual.dtype:
        return x, residual
    dt = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dt), residual.to(dt)


def _add_norm(norm: nn.Module, x: Tensor, residual: Tensor, promote: bool = True) -> Tensor:
    """norm(x + residual), in one kernel call for a plain LayerNorm."""
    if _fusable(norm):
        if plain_rows(x, residual, norm.weight, norm.bias, norm.eps):  # inference: straight to the kernel
            return add_norm_rows_nograd(x, residual, norm.weight, norm.bias, norm.eps)
        x, residual, weight, bias = autocast_fp32(*_promoted(x, residual, promote), norm.weight, norm.bias)
        return add_layer_norm(x, residual, weight, bias, norm.eps)
    return norm(x + residual)


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    if _fusable(norm):
        if plain_rows(x, None, norm.weight, norm.bias, norm.eps):
            return add_norm_rows_nograd(x, None, norm.weight, norm.bias, norm.eps)
        x, weight, bias = autocast_fp32(x, norm.weight, norm.bias)
        return add_layer_norm(x, None, weight, bias, norm.eps)
    return norm(x)


def _add_norm_prenorm(norm: nn.Module, x: Tensor, residual: Tensor, promote: bool = True):
    """(norm(x + residual), x + residual): the pre-norm layer's next input and its residual stream, in one call."""
    if _fusable(norm):
        if plain_rows(x, residual, norm.weight, norm.bias, norm.eps):
            return add_norm_rows_nograd(x, residual, norm.weight, norm.bias, norm.eps, prenorm=True)
        x, residual, weight, bias = autocast_fp32(*_promoted(x, residual, promote), norm.weight, norm.bias)
        return add_layer_norm(x, residual, weight, bias, norm.eps, prenorm=True)
    s = x + residual
    return norm(s), s


def _plain_dropout(module: nn.Module) -> bool:
    return type(module) is nn.Dropout and not _has_hooks(module)


def _dropout(module: nn.Module, x: Tensor, training: bool) -> Tensor:
    """module(x); for an nn.Dropout fastattn's Philox dropout (its mask not stored), in place (x is a fresh activation
    nobody saved for backward)."""
    if _plain_dropout(module):
        return dropout(x, module.p, training, inplace=True) if training and module.p > 0 else x
    return module(x)


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not _has_hooks(module)


def _gelu_approximate(act) -> Optional[str]:
    """The approximation of a GELU activation (F.gelu or an nn.GELU without hooks), else None."""
    if act is F.gelu:
        return "none"
    if type(act) is nn.GELU and not _has_hooks(act):
        return act.approximate
    return None


def _fresh_ffn(layer: nn.Module) -> bool:
    """Whether the FFN's linears are plain nn.Linear: their outputs are fresh tensors nobody saved, safe to modify
    in place."""
    return _plain_linear(layer.linear1) and _plain_linear(layer.linear2)


# CPU inference: the FFN's hidden activation in row chunks of at most this many bytes (see _chunk_rows)
FFN_CHUNK_BYTES = 8 << 20


def _chunk_rows(layer: nn.Module, x: Tensor, dropout_out: nn.Module) -> int:
    """Rows per chunk for an FFN run without autograd or dropout on the CPU whose (T, dim_feedforward) hidden
    activation would exceed FFN_CHUNK_BYTES, else 0. Whole, a hidden of 32 MiB (L 512 x batch 8 x 2048 float32)
    is a fresh mapping that glibc hands back to the OS and page-faults in again on every call (~5 ms of a ~105 ms
    layer on our hosts); chunks of a few MiB are reused and stay in the cache between the two GEMMs."""
    lin1, lin2 = layer.linear1, layer.linear2
    drops = (layer.dropout, dropout_out)
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or \
            not all(_plain_dropout(d) and not d.training for d in drops):
        return 0
    params = (lin1.weight, lin1.bias, lin2.weight, lin2.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return 0
    rows = FFN_CHUNK_BYTES // (lin1.out_features * x.element_size())
    return rows if 0 < rows < x.shape[0] else 0


def _ffn_chunked(layer: nn.Module, x: Tensor, rows: int, approximate: Optional[str], relu: bool) -> Tensor:
    """linear2(activation(linear1(x))) on (T, E) rows, ``rows`` at a time, into one (T, E) output."""
    lin1, lin2 = layer.linear1, layer.linear2
    out = x.new_empty(x.shape[0], lin2.out_features)
    w2t = lin2.weight.t()
    for s in range(0, x.shape[0], rows):
        h = F.linear(x[s:s + rows], lin1.weight, lin1.bias)
        if relu:
            h = F.relu(h, inplace=True)
        elif approximate is not None:
            h = torch.ops.aten.gelu_(h, approximate=approximate)
        else:
            h = layer.activation(h)
        if lin2.bias is None:
            torch.mm(h, w2t, out=out[s:s + rows])
        else:
            torch.addmm(lin2.bias, h, w2t, out=out[s:s + rows])
    return out


def _feed_forward(layer: nn.Module, x: Tensor, dropout_out: nn.Module) -> Tensor:
    """dropout_out(linear2(dropout(activation(linear1(x))))) on (T, E) rows, with ReLU / GELU and the dropouts in
    place where autograd allows: ReLU saves its output, so its dropout runs first (they commute: the dropout scale
    is >= 0); GELU saves its input, so it runs in place only without autograd. CPU inference runs it in row chunks
    (_chunk_rows)."""
    act, training = layer.activation, layer.training
    if not _fresh_ffn(layer):  # a linear someone intercepts: torch's order, nothing in place
        return dropout_out(layer.linear2(layer.dropout(act(layer.linear1(x)))))
    relu = act is F.relu or (type(act) is nn.ReLU and not _has_hooks(act))
    approximate = _gelu_approximate(act)
    rows = _chunk_rows(layer, x, dropout_out)
    if rows:
        return _ffn_chunked(layer, x, rows, approximate, relu)
    h = linear_rows(x, layer.linear1.weight, layer.linear1.bias)  # (T, dim_feedforward)
    if relu and _plain_dropout(layer.dropout):
        h = F.relu(_dropout(layer.dropout, h, training), inplace=True)
    elif approximate is not None:
        if torch.is_grad_enabled() and h.requires_grad:
            h = F.gelu(h, approximate=approximate)
        else:
            h = torch.ops.aten.gelu_(h, approximate=approximate)
        h = _dropout(layer.dropout, h, training)
    else:
        h = layer.dropout(act(h))
    return _dropout(dropout_out, linear_rows(h, layer.linear2.weight, layer.linear2.bias), training)


def _residual(layer: nn.Module, f: Tensor, dropout_out: nn.Module, x: Tensor, promote: bool = True) -> Tensor:
    """f + x for the FFN's output f, in place when f is a fresh tensor (plain linears and dropout) of the sum's
    dtype (or not ``promote``: torch's fused inference path keeps f's)."""
    in_place = not promote or torch.promote_types(f.dtype, x.dtype) == f.dtype
    return f.add_(x) if in_place and _fresh_ffn(layer) and _plain_dropout(dropout_out) else f + x


def _parts_as_torch(layer: nn.Module) -> bool:
    """Whether a part other than the attention is intercepted (hooks, a forward replaced on the instance) in a layer
    of nn.Linear feed-forwards: the layer then runs torch's own forward, where the parts see torch's shapes ((L, B, E)
    or (B, L, E); fastattn's path hands them (T, E) rows: a hook reading o[:, 0] got another tensor). (Other linears,
    Int8Linear: torch's inference fast path would read their int8 weights; they stay on fastattn's path.)"""
    return type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear and any(
        _has_hooks(m) for name, m in layer.named_children() if name not in ("self_attn", "multihead_attn"))


def _plain(attn: nn.Module) -> bool:
    """A fastattn MultiheadAttention nobody intercepts: called through mha_forward, its output comes as rows."""
    return isinstance(attn, MultiheadAttention) and type(attn).forward is MultiheadAttention.forward \
        and not _has_hooks(attn)


def _check_float_or_bool(name: str, mask: Optional[Tensor]) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def _refuse_nested(layer: nn.Module, src: Tensor, src_mask: Optional[Tensor],
                   src_key_padding_mask: Optional[Tensor]) -> None:
    """torch's AssertionError for a NestedTensor src its encoder layer's fast path would not take."""
    why = nested_refusal(layer.self_attn, src, src, src, (src_mask, src_key_padding_mask),
                         _fast_path_tensors(layer, src)) if layer.activation_relu_or_gelu else \
        "activation is not relu or gelu"
    if why is None and (layer.training or any(_has_hooks(m) for m in layer.modules())):
        why = "training is enabled" if layer.training else "a module has hooks"
    if why is not None:
        raise AssertionError(f"TransformerEncoderLayer does not support a NestedTensor src outside of its fast "
                             f"path: {why}")


def _rows(x: Tensor, name: str) -> Tensor:
    """x (..., E) as (T, E) rows (a view when x is contiguous)."""
    if x.is_nested:  # torch's layers take one on their inference fast path only
        raise AssertionError(f"{name} is a NestedTensor: pass a padded tensor and a key padding mask")
    return x.reshape(-1, x.shape[-1])


def _fast_path_tensors(layer: nn.Module, src: Tensor) -> tuple:
    """The tensors torch's encoder layer fast path checks (the order of torch's tensor_args)."""
    attn = layer.self_attn
    return (src, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, layer.norm1.weight,
            layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
            layer.linear2.weight, layer.linear2.bias)


_FAST_PATH_DEVICES = ("cpu", "cuda", "xpu")


def _torch_fast_path(layer: nn.Module, src: Tensor, src_mask: Optional[Tensor],
                     src_key_padding_mask: Optional[Tensor]) -> bool:
    """Whether torch's TransformerEncoderLayer.forward would run its fused inference kernel here (its checks, in
    its order; CUDA autocast, the one torch.is_autocast_enabled() reports, turns it off)."""
    attn = layer.self_attn
    if (not torch.backends.mha.get_fastpath_enabled() or src.dim() != 3 or layer.training or not attn.batch_first
            or attn.in_proj_bias is None or not attn._qkv_same_embed_dim or not layer.activation_relu_or_gelu
            or layer.norm1.eps != layer.norm2.eps
            or (src.is_nested and (src_key_padding_mask is not None or src_mask is not None))
            or attn.num_heads % 2 == 1 or torch.is_autocast_enabled()
            or any(_has_forward_hooks(m) for m in layer.modules())):  # (torch's checks: forward hooks only)
        return False
    tensor_args = _fast_path_tensors(layer, src)
    devices = _FAST_PATH_DEVICES + (torch.utils.backend_registration._privateuse1_backend_name,)
    if torch.overrides.has_torch_function(tensor_args) or not all(t.device.type in devices for t in tensor_args):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensor_args))


def _build_layer(layer: nn.Module, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 layer_norm_eps: float, batch_first: bool, norm_first: bool, bias: bool, factory_kwargs: dict,
                 decoder: bool) -> None:
    """torch's TransformerEncoderLayer / TransformerDecoderLayer __init__ with fastattn's attention and norms,
    module for module in torch's order (the same seed draws the same initial parameters)."""
    nn.Module.__init__(layer)
    layer.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                         **factory_kwargs)
    if decoder:
        layer.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                                  bias=bias, **factory_kwargs)
    layer.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
    layer.dropout = nn.Dropout(dropout)
    layer.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
    layer.norm_first = norm_first
    for i in range(1, 4 if decoder else 3):
        setattr(layer, f"norm{i}", LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs))
    for i in range(1, 4 if decoder else 3):
        setattr(layer, f"dropout{i}", nn.Dropout(dropout))


def _attn_rows(layer: nn.Module, attn: nn.Module, x: Tensor, mem: Optional[Tensor], attn_mask: Optional[Tensor],
               key_padding_mask: Optional[Tensor], is_causal: bool, dropout: nn.Module) -> Tensor:
    """dropout(attn(x, mem, mem)) (self-attention when mem is None) as (T, E) rows of their own."""
    kv = x if mem is None else mem
    if not _plain(attn):  # someone intercepts the attention: its output may be theirs, nothing in place
        a = attn(x, kv, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                 need_weights=False)[0]
        return dropout(a.reshape(-1, x.shape[-1]))
    a = mha_forward(attn, x, kv, kv, key_padding_mask, False, attn_mask, True, is_causal)[0]
    return _dropout(dropout, a, layer.training)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer on fastattn's fused attention and add + LayerNorm kernels (same constructor,
    forward, parameters, state_dict keys and outputs; in eval mode too, where torch takes its fused fast path)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: _Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        _build_layer(self, d_model, nhead, dim_feedforward, dropout, layer_norm_eps, batch_first, norm_first, bias,
                     {"device": device, "dtype": dtype}, decoder=False)
        activation = _activation_fn(activation)
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation

    @fx_leaf
    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        _check_float_or_bool("src_key_padding_mask", src_key_padding_mask)
        _check_float_or_bool("src_mask", src_mask)
        if isinstance(src, Tensor) and src.is_nested:  # torch's inference fast path takes one
            _refuse_nested(self, src, src_mask, src_key_padding_mask)
            packed = Rows.of_nested(src)
            return packed.nested(self._forward_rows(packed.rows, lambda x: self_attention_rows(self.self_attn, x,
                                                                                               packed)))
        if _parts_as_torch(self):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        # the dtypes of a sublayer's output and the residual stream differ under autocast only: torch's general
        # path adds them in the promoted dtype, its fused inference path in the sublayer's
        promote = not (autocast_on(src.device.type)
                       and _torch_fast_path(self, src, src_mask, src_key_padding_mask))
        return self._forward_rows(src, lambda inp: _attn_rows(self, self.self_attn, inp, None, src_mask,
                                                              src_key_padding_mask, is_causal, self.dropout1), promote)

    def _forward_rows(self, src: Tensor, attend: Callable[[Tensor], Tensor], promote: bool = True) -> Tensor:
        """The layer on src with its self-attention sublayer attend (its input in src's shape -> (T, E) rows)."""
        x = _rows(src, "src")  # (T, E): every step below works on rows, each result a tensor of its own
        shape = src.shape
        if self.norm_first:
            a = attend(_norm(self.norm1, x).view(shape))
            h, x = _add_norm_prenorm(self.norm2, a, x, promote)  # h = norm2(x + a), x = x + a
            out = _residual(self, _feed_forward(self, h, self.dropout2), self.dropout2, x, promote)
        else:
            a = attend(src)
            x = _add_norm(self.norm1, a, x, promote)
            out = _add_norm(self.norm2, _feed_forward(self, x, self.dropout2), x, promote)
        return out.view(shape)

    __prepare_scriptable__ = refuse_script


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer on fastattn's fused attention and add + LayerNorm kernels (same constructor,
    forward, parameters, state_dict keys and outputs). Cross-attention projects K and V of memory in one matmul."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: _Activation = F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        _build_layer(self, d_model, nhead, dim_feedforward, dropout, layer_norm_eps, batch_first, norm_first, bias,
                     {"device": device, "dtype": dtype}, decoder=True)
        self.activation = _activation_fn(activation)

    @fx_leaf
    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        if _parts_as_torch(self):
            return super().forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                                   tgt_is_causal, memory_is_causal)
        x = _rows(tgt, "tgt")  # (T, E) rows
        shape = tgt.shape
        if self.norm_first:
            a = _attn_rows(self, self.self_attn, _norm(self.norm1, x).view(shape), None, tgt_mask,
                           tgt_key_padding_mask, tgt_is_causal, self.dropout1)
            h, x = _add_norm_prenorm(self.norm2, a, x)
            a = _attn_rows(self, self.multihead_attn, h.view(shape), memory, memory_mask, memory_key_padding_mask,
                           memory_is_causal, self.dropout2)
            h, x = _add_norm_prenorm(self.norm3, a, x)
            out = _residual(self, _feed_forward(self, h, self.dropout3), self.dropout3, x)
        else:
            a = _attn_rows(self, self.self_attn, tgt, None, tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                           self.dropout1)
            x = _add_norm(self.norm1, a, x)
            a = _attn_rows(self, self.multihead_attn, x.view(shape), memory, memory_mask, memory_key_padding_mask,
                           memory_is_causal, self.dropout2)
            x = _add_norm(self.norm2, a, x)
            out = _add_norm(self.norm3, _feed_forward(self, x, self.dropout3), x)
        return out.view(shape)

    __prepare_scriptable__ = refuse_script


def _causal_mask(sz: int, device=None, dtype=None) -> Tensor:
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def _detect_is_causal(mask: Optional[Tensor], is_causal: Optional[bool], size: Optional[int]) -> bool:
    """torch's rule: an explicit is_causal wins; None means "is mask exactly the square causal mask?" (a bool
    mask compared as torch compares it, after turning True into -inf)."""
    if is_causal is not None or mask is None:
        return is_causal is True
    sz = size if size is not None else mask.size(-2)
    if mask.dtype == torch.bool:
        want = torch.ones(sz, sz, dtype=torch.bool, device=mask.device).triu(1)
    else:
        want = _causal_mask(sz, device=mask.device, dtype=mask.dtype)
    return mask.size() == want.size() and bool((mask == want).all())


def _seq_len(src: Tensor, batch_first: bool) -> Optional[int]:
    if src.is_nested:
        return None
    return src.size(0) if src.dim() == 2 else src.size(1 if batch_first else 0)


def _left_aligned(padding: Tensor) -> bool:
    """Every row is tokens then padding (what torch's nested-tensor conversion checks)."""
    keep = padding.logical_not()
    return not bool((keep[:, 1:] & ~keep[:, :-1]).any())


class TransformerEncoder(nn.TransformerEncoder):
    """torch.nn.TransformerEncoder, running fastattn layers when given one (the layer is deep-copied num_layers
    times, as in torch). Same constructor and forward; enable_nested_tensor is accepted and keeps its one visible
    effect: in inference with a left-aligned src_key_padding_mask and no mask, torch's nested-tensor path returns
    zeros at padded positions (before the final norm), and so does this class. Like torch's path it computes the
    real tokens only: they run through the layers as packed sequences (attention_varlen, one sequence a row), and
    the padding is filled with zeros at the end (without a NestedTensor; when a layer is not this module's own, the
    padded keys are masked out in every layer instead)."""

    @fx_leaf
    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        _check_float_or_bool("src_key_padding_mask", src_key_padding_mask)
        _check_float_or_bool("mask", mask)
        if isinstance(src, Tensor) and src.is_nested and self._packable():  # torch's layers' fast path takes one
            for mod in self.layers:
                _refuse_nested(mod, src, mask, src_key_padding_mask)
            return self._rows_forward(Rows.of_nested(src), nested=True)
        first = self.layers[0]
        batch_first = first.self_attn.batch_first
        padded_rows = None
        if self._nested_path(src, mask, src_key_padding_mask):
            # torch drops padded tokens (kpm != 0 after its float conversion) and pads the result with zeros
            padded_rows = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool \
                else src_key_padding_mask != 0
            if self._packable():
                return self._packed_forward(src, padded_rows, batch_first)
            src_key_padding_mask = padded_rows
        is_causal = _detect_is_causal(mask, is_causal, _seq_len(src, batch_first))
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if padded_rows is not None:
            output = output.masked_fill(padded_rows[..., None], 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _packable(self) -> bool:
        """Every layer is this module's own encoder layer with a plain packed self-attention (no extra keys)."""
        return not torch.compiler.is_compiling() and all(
            type(m) is TransformerEncoderLayer and not _has_hooks(m) and not _parts_as_torch(m) and _plain(m.self_attn)
            and m.self_attn._qkv_same_embed_dim and m.self_attn.bias_k is None and not m.self_attn.add_zero_attn
            for m in self.layers)

    def _packed_forward(self, src: Tensor, padded_rows: Tensor, batch_first: bool) -> Tensor:
        """The nested path on the real tokens only: each row's (left-aligned) tokens a packed sequence through every
        layer, then zeros at the padding and the final norm, as torch's nested tensors give."""
        x = src if batch_first else src.transpose(0, 1)  # (B, L, E)
        keep = padded_rows.logical_not()
        out = x.new_zeros(x.shape)
        out[keep] = self._rows_forward(Rows(x[keep], keep.sum(1).tolist()))  # (T, E), row by row
        out = out if batch_first else out.transpose(0, 1)
        return self.norm(out) if self.norm is not None else out

    def _rows_forward(self, packed: Rows, nested: bool = False) -> Tensor:
        """Packed sequences through every layer: (T, E) rows, or (nested) a NestedTensor after the final norm."""
        rows = packed.rows
        for mod in self.layers:
            rows = mod._forward_rows(rows, lambda inp, mod=mod: self_attention_rows(mod.self_attn, inp, packed))
        if not nested:
            return rows
        return packed.nested(self.norm(rows) if self.norm is not None else rows)

    def _nested_path(self, src: Tensor, mask: Optional[Tensor], src_key_padding_mask: Optional[Tensor]) -> bool:
        """Whether torch's TransformerEncoder.forward would take its nested-tensor (sparsity) fast path."""
        first = self.layers[0]
        if (not torch.backends.mha.get_fastpath_enabled() or not getattr(self, "use_nested_tensor", False)
                or first.training or src.dim() != 3 or src_key_padding_mask is None or mask is not None
                or src.is_nested or torch.is_autocast_enabled()):
            return False
        want = tuple(src.shape[:2]) if first.self_attn.batch_first else (src.shape[1], src.shape[0])
        if tuple(src_key_padding_mask.shape) != want:  # (torch: "Mask size should match input size")
            raise ShapeMismatch(f"TransformerEncoder: src_key_padding_mask has shape "
                                f"{tuple(src_key_padding_mask.shape)}, expected {want} (batch, sequence)")
        if getattr(self, "mask_check", True):
            if torch.compiler.is_compiling():
                return False
            pad = src_key_padding_mask if src_key_padding_mask.dtype == torch.bool else src_key_padding_mask != 0
            if not _left_aligned(pad):
                return False
        tensor_args = _fast_path_tensors(first, src)
        if torch.overrides.has_torch_function(tensor_args):
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensor_args))

    __prepare_scriptable__ = refuse_script


class TransformerDecoder(nn.TransformerDecoder):
    """torch.nn.TransformerDecoder, running fastattn layers when given one (deep-copied num_layers times, as in
    torch). Same constructor, forward (tgt_is_causal=None detects a causal tgt_mask as torch does) and outputs."""

    @fx_leaf
    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        output = tgt
        tgt_is_causal = _detect_is_causal(tgt_mask, tgt_is_causal,
                                          _seq_len(tgt, self.layers[0].self_attn.batch_first))
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
        if self.norm is not None:
            output = self.norm(output)
        return output

    __prepare_scriptable__ = refuse_script


class Transformer(nn.Transformer):
    """torch.nn.Transformer built from fastattn's encoder / decoder layers and LayerNorms (or the custom_encoder /
    custom_decoder given). Same constructor, forward, generate_square_subsequent_mask, parameters, state_dict keys
    and initialization (the same seed draws the same parameters)."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: _Activation = F.relu,
                 custom_encoder: Optional[Any] = None, custom_decoder: Optional[Any] = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        nn.Module.__init__(self)
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias, **factory_kwargs)
            encoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                    layer_norm_eps, batch_first, norm_first, bias, **factory_kwargs)
            decoder_norm = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
            self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, decoder_norm)
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    forward = fx_leaf(nn.Transformer.forward)
    __prepare_scriptable__ = refuse_script
