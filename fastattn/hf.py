"""HF transformers integration: ``attn_implementation="fastattn"``.

``fastattn.hf.register()`` adds "fastattn" to transformers' ``AttentionInterface`` (the attention function) and to
``masking_utils.AttentionMaskInterface`` (the mask builder); it needs transformers >= 5.4. Then

    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")    # or model.set_attn_implementation(...)

runs every attention layer on ``fastattn.attention``. transformers is optional: this module imports it only inside
``register()``.

How the two halves talk. The mask builder recognises transformers' plain patterns (causal, sliding-window causal,
bidirectional, each with padding) and hands the attention function only what the kernel cannot work out itself:
- causal: the 2-D padding mask (B, S) bool (True = a real key), or None when nothing is padded. The kernel applies
  causality aligned bottom-right (query i of L sits at key i + S - L: prefill, and a decode step of L = 1 that sees
  every key). When the layer's cache is longer than the keys seen so far (a static cache), the mask stops at the
  last key seen and the function drops the keys after it, so the bottom-right alignment holds.
- sliding window W: the same padding mask as a (B, min(W, S), S) stride-0 view (all ones when nothing is padded),
  so the window travels with the mask (HF: key j is seen by query i when i - W < j <= i, i.e. ``window=(W - 1,
  0)``). The mask, not the layer's ``sliding_window`` argument, decides, as in "eager" and "sdpa": Phi-MoE and
  Qwen2-MoE build sliding-window masks and pass no ``sliding_window``. generate() with a compileable cache builds
  the masks first and hands them back to the model (made contiguous): the builder returns its own 3-D mask as is.
- bidirectional: None, or a (B, 1, 1, S) view of the padding mask, read by the kernel through its strides.
- packed sequences (position_ids restarting without an attention mask: transformers' DataCollatorWithFlattening),
  causal or sliding-window causal: the (B, L) int64 sequence ids transformers found (a mask of an integer dtype:
  every padding or window mask the builder hands on is bool), as a (B, W, L) stride-0 view with a window of W. The
  attention function turns them into cumulative lengths and runs ``fastattn.attention_varlen`` over the B * L
  tokens: no (L, L) mask, no work across sequences. flash-attention's kwargs (cu_seq_lens_q / _k, max_length_q /
  _k) on a one-row batch are followed the same way, position_ids or not.
Any other pattern (block / chunked / custom mask functions, or a caller that asks for a full mask) is built by
transformers' own ``sdpa_mask`` as a (B, 1, L, S) bool tensor, logged at debug level. The attention function accepts
every mask transformers may pass (None, 2-D, 4-D bool or additive float), derives ``is_causal`` as transformers'
SDPA integration does (the call's ``is_causal``, else ``module.is_causal``; a materialised mask already holds
causality and windows), reads GQA from the key's head count, and passes ``scaling``, ``dropout``, ``softcap`` and
``position_bias`` (as an additive mask) to the kernel. Under autocast, q, k and v run in autocast's dtype, as
torch's SDPA does (fastattn.attention casts them).

Differences from ``attn_implementation="eager"``: a query row whose keys are all masked (a left-padding position
under a causal mask) gives 0 where eager averages the masked keys; those positions are padding, and no real token
attends to them. ``output_attentions=True`` returns None weights (as "sdpa" does), with a warning. Attention sinks
(``s_aux`` / ``sinks``) run on the kernel through its log-sum-exp (out * sigmoid(lse - sink)) when no gradient is
needed; with gradients the layer runs its model's own eager function instead, with a warning.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .ops.attention import attention, attention_varlen
from .ops.attention.varlen import cu_seqlens_of_starts

log = logging.getLogger("fastattn")

NAME = "fastattn"
MIN_TRANSFORMERS = "5.4"  # setup.py's test extra and requirements-dev.txt say the same
# transformers.masking_utils and its export check, bound by register(): an import inside the mask builder would run
# under torch.compile, and torch 2.11's dynamo cannot trace `from transformers import ...` (a lazy module)
_mu = None
_exporting = None
# Models that read the mask themselves before calling the attention function (Doge's dynamic mask indexes it as
# (B, 1, L, S)); transformers 5.25 asks for a full mask for them, 5.17 did not
_READ_BY_MODEL = frozenset({"doge"})
# ... and Gemma 4 with KV-shared layers (its prefill slices every mask's queries as (B, 1, L, S))
_KV_SHARING = frozenset({"gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text"})
_said = set()


def _once(level: int, key: str, msg: str, *args) -> None:
    """Log msg once per key; silent while dynamo traces (a logging call breaks a fullgraph compile)."""
    if torch.compiler.is_compiling():
        return
    if key not in _said:
        _said.add(key)
        log.log(level, msg, *args)


def register() -> str:
    """Register "fastattn" with transformers' AttentionInterface and AttentionMaskInterface.
    Returns the name to pass as ``attn_implementation``. Raises ImportError without transformers, or with one older
    than ``MIN_TRANSFORMERS``."""
    _installed_kernels_package()
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("fastattn.hf.register() needs HF transformers (pip install transformers, or "
                          "pip install fastattn[test]); it is an optional dependency of fastattn") from e
    from packaging.version import Version
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"fastattn.hf.register() needs transformers >= {MIN_TRANSFORMERS} (its mask interface "
                          f"passes q_length / q_offset from then on); found {transformers.__version__}")
    AttentionInterface.register(NAME, attention_forward)
    global _mu, _exporting
    from transformers import masking_utils
    from transformers.utils.import_utils import is_torchdynamo_exporting  # (masking_utils has it from 5.2x on)
    _mu, _exporting = masking_utils, is_torchdynamo_exporting
    masking_utils.AttentionMaskInterface.register(NAME, mask_forward)
    return NAME


def _installed_kernels_package() -> None:
    """transformers imports the ``kernels`` package (HF's hub kernels) when it is installed. Python started in a
    fastattn checkout (``python -m pytest`` puts the folder first on sys.path) would find fastattn's Triton sources
    folder ``kernels/`` under that name instead, and every model load would fail: import the installed package
    first, once, with the checkout's folder off the path."""
    if "kernels" in sys.modules:
        return
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(ours, "kernels", "attention.py")):
        return  # an installed fastattn: its kernels live in fastattn/kernels
    path = list(sys.path)
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != ours]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = path


# ---- the attention function ----------------------------------------------------------------------------------
def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, L, E), key/value (B, Hk, S, E|Ev) ->
    (out (B, L, H, Ev), None)."""
    if kwargs.get("output_attentions", False):
        _once(logging.WARNING, "output_attentions", "fastattn.hf: output_attentions=True is not supported by "
              "attn_implementation='fastattn' (the kernel never forms the weights); returning None weights. Use "
              "'eager' to get them")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    position_bias = kwargs.get("position_bias")
    if kwargs.get("indices") is not None or kwargs.get("block_indices") is not None:
        attention_mask = _sparse_mask(module, query, key, attention_mask, is_causal, kwargs)
    if kwargs.get("cu_seq_lens_q") is not None:
        if sinks is None and position_bias is None:
            out = _flash_kwargs_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
            if out is not None:
                return out
        elif query.shape[0] == 1 and query.shape[2] == key.shape[2] and \
                (attention_mask is None or attention_mask.dim() == 3):  # (causal or the builder's window view)
            attention_mask = _packed_mask(_ids_of_offsets(kwargs["cu_seq_lens_q"], attention_mask, query.shape[2]))
    if _is_packed(attention_mask):
        if sinks is None and position_bias is None:
            return _packed_forward(query, key, value, attention_mask, dropout, scaling, kwargs.get("softcap"))
        attention_mask = _packed_mask(attention_mask)  # what the varlen path has no slot for: with a full mask
    if sinks is not None and torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value, sinks)):
        return _eager_fallback(module, "attention sinks with gradients (the kernel's log-sum-exp carries none)",
                               query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal, window, attn_mask = None, (-1, -1), attention_mask
    if attention_mask is not None and attention_mask.dim() == 3:  # the mask builder's sliding window: (B, W, S)
        window = (attention_mask.shape[1] - 1, 0)
        attention_mask = attention_mask[:, 0]
    if attention_mask is None or attention_mask.dim() == 2:
        if attention_mask is not None:  # (B, S') padding, True / 1 = a real key; S' < S: keys past S' not seen yet
            n = attention_mask.shape[-1]
            if n > key.shape[2]:
                raise ValueError(f"attention_mask: 2-D padding mask over {n} keys, but the layer has {key.shape[2]}")
            if n < key.shape[2]:
                key, value = key[:, :, :n], value[:, :, :n]
            attn_mask = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, S): a view, never expanded
        if is_causal:
            causal = "bottom_right"
    if position_bias is not None:
        attn_mask = _with_position_bias(attn_mask, position_bias[..., :key.shape[2]])
    softcap = kwargs.get("softcap")
    out = attention(query, key, value, causal=causal, attn_mask=attn_mask, dropout_p=dropout, scale=scaling,
                    window=window, softcap=0.0 if softcap is None else softcap, return_lse=sinks is not None,
                    enable_gqa=True)
    if sinks is not None:  # softmax over the keys plus one sink logit per head: out * Z / (Z + exp(sink))
        out, lse = out
        out = out * torch.sigmoid(lse - sinks.to(torch.float32).view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, Ev)


def _is_packed(mask: Optional[Tensor]) -> bool:
    """The mask builder's packed-sequence ids: (B, L), or (B, W, L) with a sliding window of W, of an integer dtype
    (its padding and window masks are bool)."""
    return mask is not None and mask.dim() in (2, 3) and not mask.is_floating_point() and mask.dtype != torch.bool


def _packed_forward(query: Tensor, key: Tensor, value: Tensor, ids: Tensor, dropout: float, scaling, softcap):
    """Causal attention (within a window of W keys when ids is (B, W, L)) within each packed sequence: ids (B, L)
    numbers the sequences of each row (non-decreasing); the B * L tokens run as one varlen batch. Returns
    (out (B, L, H, Ev), None)."""
    window, mask = (-1, -1), ids
    if ids.dim() == 3:
        window, ids = (ids.shape[1] - 1, 0), ids[:, 0]
    B, H, L, E = query.shape
    if key.shape[2] != L or ids.shape != (B, L):
        raise ValueError(f"attention_mask: packed sequence ids {tuple(ids.shape)} for queries {tuple(query.shape)} "
                         f"and keys {tuple(key.shape)}: packing needs (B, L) ids and as many keys as queries")
    cu, longest = _offsets_of(mask, ids)
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = attention_varlen(q, k, v, cu, cu, longest, longest, causal="top_left", dropout_p=dropout, scale=scaling,
                           window=window, softcap=0.0 if softcap is None else softcap, validate=False)
    return out.view(B, L, H, value.shape[-1]), None


def _flash_kwargs_forward(module, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], dropout: float,
                          scaling, is_causal: Optional[bool], kwargs: dict):
    """Sequences packed into one row as flash-attention's kwargs say (cu_seq_lens_q / _k, max_length_q / _k: what
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds; without position_ids the mask does not say it):
    attention_varlen over them, causal as the module is, within the layer's window. None where they cannot apply
    (a batch of several rows, or a full mask built for the call: it is followed instead)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_k is None or query.shape[0] != 1 or (mask is not None and mask.dim() == 4):
        return None
    window = -1
    if mask is not None and mask.dim() == 3:  # the builder's window view, bool or packed ids
        window = mask.shape[1] - 1
    elif kwargs.get("sliding_window"):
        window = kwargs["sliding_window"] - 1
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, E)
    global _last_checked
    key_ = (weakref.ref(cu_q), cu_q._version, weakref.ref(cu_k), cu_k._version)
    seen = _last_checked[0] is not None and _last_checked[0][0]() is cu_q and _last_checked[0][2]() is cu_k \
        and _last_checked[0][1::2] == key_[1::2]
    if seen:  # checked by the first layer of this forward: not read on the host again
        max_q, max_k = _last_checked[1]
    else:
        max_q, max_k = (int(m) if m is not None else int((c[1:] - c[:-1]).max()) if c.numel() > 1 else 0
                        for c, m in ((cu_q, kwargs.get("max_length_q")), (cu_k, kwargs.get("max_length_k"))))
    out = attention_varlen(q, k, v, cu_q.to(q.device), cu_k.to(q.device), max_q, max_k,
                           causal="bottom_right" if causal else None, dropout_p=dropout,
                           scale=scaling, window=(window, 0 if causal else window),
                           softcap=kwargs.get("softcap") or 0.0, validate=not seen)
    _last_checked = (key_, (max_q, max_k))
    return out[None], None


_last_checked = (None, None)  # the flash kwargs' offsets checked last (weak references, versions), their max lengths


_last_offsets = []  # the last few masks' (weak reference, version, (cu_seqlens, longest)), newest last


def _offsets_of(mask: Tensor, ids: Tensor) -> Tuple[Tensor, int]:
    """The cumulative lengths (int32) and the longest sequence of packed ids (B, L), found once per mask: every
    layer of a forward gets the same mask object (one per kind of layer: Gemma-2 alternates two), and finding them
    reads the ids on the host."""
    for ref, version, found in _last_offsets:
        if ref() is mask and version == mask._version:
            return found
    starts = torch.ones_like(ids, dtype=torch.bool)  # each row's first token, and where the ids change
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    found = cu_seqlens_of_starts(starts)
    _last_offsets[:] = _last_offsets[-3:] + [(weakref.ref(mask), mask._version, found)]
    return found


def _packed_mask(ids: Tensor) -> Tensor:
    """The (B, 1, L, L) bool mask of packed sequence ids (B, L) or (B, W, L): causal (within W keys) within each
    sequence."""
    W, L = (ids.shape[1] if ids.dim() == 3 else None), ids.shape[-1]
    ids = ids[:, 0] if ids.dim() == 3 else ids
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    if W is not None:
        causal = causal.triu(1 - W)
    return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


def _ids_of_offsets(cu: Tensor, window_view: Optional[Tensor], L: int) -> Tensor:
    """The packed sequence ids (1, L) of flash-attention's cu_seq_lens (the sequence each token is in), as
    _packed_mask reads them: (1, W, L) within the builder's window view (1, W, S)."""
    ids = torch.searchsorted(cu[1:].to(torch.int64), torch.arange(L, device=cu.device), right=True)[None]
    return ids if window_view is None else ids[:, None].expand(1, window_view.shape[1], L)


def _sparse_mask(module, query: Tensor, key: Tensor, mask: Optional[Tensor], is_causal: Optional[bool],
                 kwargs: dict) -> Tensor:
    """The mask with a sparse-attention model's key selection folded in, as transformers folds it for eager / sdpa
    (other implementations get it as a kwarg): the indexer's top-k ``indices`` (B, L, k) (DeepSeek-V3.2, GLM-5),
    or MiniMax-M3's ``block_indices`` through its indexer's build_block_mask. A float (B | 1, 1 | H, L, S) mask."""
    L, S = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    full = _eager_mask(mask, L, S, causal, query.dtype)
    indices = kwargs.get("indices")
    if indices is not None:
        keep = torch.zeros(query.shape[0], L, S, dtype=torch.bool, device=query.device)
        return full.masked_fill(~keep.scatter(-1, indices.long(), True)[:, None], float("-inf"))
    indexer = getattr(module, "indexer", None)
    if not hasattr(indexer, "build_block_mask"):
        raise NotImplementedError(f"fastattn.hf: {type(module).__name__} passes block_indices, but has no "
                                  "indexer.build_block_mask to fold them into the mask with")
    position_ids = kwargs.get("position_ids")  # (only read without a mask; there is one here)
    return indexer.build_block_mask(kwargs["block_indices"], full, S, query.dtype, query.device, position_ids)


def _with_position_bias(attn_mask: Optional[Tensor], position_bias: Tensor) -> Tensor:
    """An additive bias (T5-style) with the mask folded in: a bool mask becomes -inf where it is False."""
    if attn_mask is None:
        return position_bias
    if attn_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attn_mask, float("-inf"))
    return position_bias + attn_mask


def _eager_fallback(module, why: str, *args, **kwargs):
    """Run the layer on its own model file's eager_attention_forward, saying so once per model class."""
    eager: Optional[Callable] = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"fastattn.hf: {type(module).__name__} needs {why}, which the kernel cannot do, "
                                  f"and its model file has no eager_attention_forward to fall back to")
    _once(logging.WARNING, f"eager:{type(module).__qualname__}:{why}",
          "fastattn.hf: %s runs on its model's eager attention: %s", type(module).__name__, why)
    query, key, value, attention_mask, dropout, scaling, is_causal = args
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if is_causal is not None:
        kwargs["is_causal"] = is_causal
    mask = _eager_mask(attention_mask, query.shape[2], key.shape[2], causal, query.dtype)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _eager_mask(attention_mask: Optional[Tensor], L: int, S: int, causal: bool, dtype: torch.dtype):
    """What a model's eager function adds to its scores, (B | 1, 1, L, S) float with finfo.min where masked, from any
    mask the builder above hands the attention function: None (causal or nothing), a 2-D padding mask over the keys
    seen so far, the 3-D sliding-window view, a (B, 1, 1, S) view or a 4-D bool / float mask."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.is_floating_point():
        return attention_mask
    device = attention_mask.device if attention_mask is not None else None
    i, j = torch.arange(L, device=device)[:, None], torch.arange(S, device=device)
    keep, window = torch.ones(1, 1, L, S, dtype=torch.bool, device=device), 0
    if attention_mask is not None and attention_mask.dim() == 3:  # (B, W, S'): the window, then the padding
        window, attention_mask = attention_mask.shape[1], attention_mask[:, 0]
    if attention_mask is not None and attention_mask.dim() == 4:
        keep = attention_mask.to(torch.bool)
    else:
        seen = S
        if attention_mask is not None:  # (B, S') True / 1 = a real key, S' <= S keys seen so far
            seen = attention_mask.shape[-1]
            pad = torch.zeros(attention_mask.shape[0], S, dtype=torch.bool, device=device)
            pad[:, :seen] = attention_mask.to(torch.bool)
            keep = keep & pad[:, None, None, :]
        if causal:  # bottom-right over the keys seen: query i sits at key i + seen - L
            keep = keep & (j <= i + seen - L)
            if window:
                keep = keep & (j > i + seen - L - window)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


# ---- the mask builder ------------------------------------------------------------------------------------------
def _closure(fn) -> dict:
    """fn's closure variables by name, read from its cells (dynamo traces this; not inspect.getclosurevars)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not cells:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


# Evaluated at trace time: torch 2.11's dynamo cannot read the cells of a closure made inside the traced code.
@torch.compiler.assume_constant_result
def _pattern(mask_function, local_size) -> Optional[str]:
    """"causal", "sliding" (causal within local_size), "bidirectional", "packed" or "packed-sliding" (causal, or
    sliding, within packed sequences) when mask_function is exactly one of transformers' plain patterns, else None.
    The sliding and packed patterns are closures: recognised by their code objects.
    Under torch.compile the answer is a constant of the graph: both arguments come from the model's config, which
    dynamo guards."""
    return _plain_pattern(mask_function, local_size)


def _plain_pattern(mask_function, local_size) -> Optional[str]:
    mu = _mu
    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional"
    and_code = mu.and_masks(mu.causal_mask_function).__code__
    if getattr(mask_function, "__code__", None) is not and_code:
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    packed = _packed_ids(parts, local_size)
    if packed is not None:
        return "packed" if packed[1] == "causal" else "packed-sliding"
    if local_size is None or len(parts) != 2 or parts[1] is not mu.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__code__", None) is not mu.sliding_window_overlay(1).__code__:
        return None
    return "sliding" if _closure(overlay).get("sliding_window") == local_size else None


def _packed_ids(parts, local_size) -> Optional[Tuple[Tensor, str]]:
    """(the (B, L) sequence ids, "causal" or "sliding") when the parts of an and_masks are exactly transformers'
    packed pattern: causal (or sliding-window causal) on the positions remapped per sequence, and the same
    sequence."""
    mu = _mu
    if len(parts) != 2:
        return None
    remap, same = parts
    if getattr(remap, "__code__", None) is not mu.remap_positions_for_packed_sequence(mu.causal_mask_function,
                                                                                      None).__code__:
        return None
    inner = _plain_pattern(_closure(remap).get("mask_function"), local_size)
    if inner not in ("causal", "sliding"):
        return None
    if getattr(same, "__code__", None) is not mu.packed_sequence_mask_function(None).__code__:
        return None
    ids = _closure(same).get("packed_sequence_mask")
    return None if ids is None else (ids, inner)


def _attention_in_own_code(config) -> Optional[str]:
    """The name of the modeling module of ``config`` when that module computes attention itself (Bloom, MPT, ...:
    it never imports transformers' ALL_ATTENTION_FUNCTIONS, the test transformers' own ``_can_set_attn_
    implementation`` makes), else None. Such a model still asks the mask interface under its
    ``_attn_implementation`` and adds the result to its scores: it needs eager's (B, 1, L, S) additive mask. A
    config whose modeling module is not loaded (not transformers' file layout) counts as computing its own."""
    name = type(config).__module__ if config is not None else ""
    if ".configuration_" not in name:
        return None if config is None else name
    modeling = name.replace(".configuration_", ".modeling_")
    module = sys.modules.get(modeling)
    return None if module is not None and hasattr(module, "ALL_ATTENTION_FUNCTIONS") else modeling


def _all_true(mask: Tensor) -> bool:
    """mask.all(), as a sum (transformers' fast_all: faster than all() on large masks)."""
    return bool(mask.sum() == mask.numel())


def mask_forward(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                 mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None,
                 local_size: Optional[int] = None, allow_is_causal_skip: bool = True,
                 allow_is_bidirectional_skip: bool = False, use_vmap: bool = False, device="cpu", **kwargs):
    """transformers' mask-interface contract (see ``masking_utils.sdpa_mask``), answered as the module docstring
    says: None, a 2-D padding mask, a (B, 1, 1, S) view, or a materialised (B, 1, L, S) bool mask."""
    mu = _mu
    if mask_function is None:
        mask_function = mu.causal_mask_function
    owner = _attention_in_own_code(kwargs.get("config"))
    if owner is not None:  # no attention_forward will read what we return: the mask its eager code reads
        _once(logging.WARNING, f"own:{owner}", "fastattn.hf: %s computes attention in its own code, not through "
              "transformers' AttentionInterface: attn_implementation='fastattn' runs it on its eager attention",
              owner)
        return mu.eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             local_size=local_size, allow_is_bidirectional_skip=allow_is_bidirectional_skip,
                             use_vmap=use_vmap, device=device, **kwargs)
    composite = False
    if mask_function is mu.causal_mask_function or mask_function is mu.bidirectional_mask_function:
        pattern = _plain_pattern(mask_function, local_size)  # (by identity: no closure to read)
    elif torch.compiler.is_compiling() and not allow_is_causal_skip:
        # transformers' packing detection (and its overlays) under torch.compile: the mask function's closures hold
        # traced tensors, which no trace-time constant can read (dynamo raised); sdpa's full mask, as sdpa builds it
        pattern, composite = None, True
    else:
        pattern = _pattern(mask_function, local_size)
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 3:
        # our own sliding-window mask, back: generate() builds a compileable cache's masks before the forward
        if pattern == "sliding" and attention_mask.dtype == torch.bool and attention_mask.shape[0] == batch_size:
            return attention_mask
        raise ValueError(f"attention_mask: a 3-D mask {tuple(attention_mask.shape)} is not one fastattn's mask "
                         f"builder made for this layer; pass the 2-D padding mask (batch, keys)")
    model_type = getattr(kwargs.get("config"), "model_type", None)
    why = None
    if composite:
        why = "a composite mask function under torch.compile (packed sequences, an overlay)"
    elif pattern is None:
        why = "a mask function other than causal, sliding-window causal or bidirectional"
    elif model_type in _READ_BY_MODEL or (model_type in _KV_SHARING and
                                          getattr(kwargs.get("config"), "num_kv_shared_layers", 0)):
        why = f"{model_type} reads the (B, 1, L, S) mask itself"
    elif pattern in ("causal", "sliding") and not allow_is_causal_skip:  # (packing always asks)
        why = "the caller asked for a full causal mask"
    elif pattern == "bidirectional" and not allow_is_bidirectional_skip:
        why = "the caller asked for a full bidirectional mask"
    elif _exporting() or any(isinstance(t, Tensor) and mu.is_tracing(t) for t in (attention_mask, q_offset)):
        why = "tracing (the mask's values and offsets cannot be read)"
    if why is None and pattern.startswith("packed"):
        ids, _ = _packed_ids(_closure(mask_function)["mask_functions"], local_size)
        if attention_mask is None and q_length == kv_length and int(q_offset) == kv_offset == 0 \
                and tuple(ids.shape) == (batch_size, q_length):
            ids = ids.to(torch.int64)  # a window travels as the sliding mask's does: (B, W, L), stride 0
            return ids if pattern == "packed" else ids[:, None, :].expand(batch_size, min(local_size, q_length),
                                                                          q_length)
        why = "packed sequences with a padding mask or offsets"
    if why is None:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, >= kv_offset + kv_length)
        if pattern == "bidirectional":
            if padding is None:
                return None
            padding = padding[:, kv_offset:kv_offset + kv_length]
            return None if _all_true(padding) else padding[:, None, None, :]
        seen = int(q_offset) - kv_offset + q_length  # keys up to the last query; the rest of a static cache is future
        if q_length <= seen <= kv_length:
            if pattern == "sliding":  # a window of >= seen keys cuts none: the middle dim stays <= seen
                padding = torch.ones(batch_size, seen, dtype=torch.bool, device=device) if padding is None \
                    else padding[:, kv_offset:kv_offset + seen]
                return padding[:, None, :].expand(batch_size, min(local_size, seen), seen)
            if padding is None:
                return None if seen == kv_length else torch.ones(batch_size, seen, dtype=torch.bool, device=device)
            padding = padding[:, kv_offset:kv_offset + seen]
            return None if seen == kv_length and _all_true(padding) else padding
        why = "the query and key offsets do not place the queries within the keys"
    _once(logging.DEBUG, f"mask:{why}", "fastattn.hf: building a full (B, 1, L, S) mask: %s", why)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        local_size=local_size, allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, device=device,
                        **kwargs)
