"""fastattn.convert(model): swap torch's attention, normalization and Transformer modules of any model for fastattn's,
in place, carrying the weights.

Each swapped module is rebuilt from the original's configuration (on the meta device: nothing is allocated or
initialised) and then given the original's own Parameter and buffer objects, so weights, device, dtype, requires_grad,
parameter tying and an optimizer's references all survive, and the state_dict keys are unchanged. Only modules of
exactly the torch class are swapped: a subclass may compute something else, so it is left alone and the log says so. HF
transformers' RMSNorm classes are swapped when their forward is LlamaRMSNorm's own bytecode (Mistral's, Qwen's,
DeepSeek's, ... copies; not Gemma's 1 + weight), for ``fastattn.nn.HFRMSNorm``. A whole nn.Transformer /
TransformerEncoder / TransformerDecoder is swapped as one module (its layers come from fastattn's class), unless
something inside it is in ``skip``: then its parts are swapped one by one. A layer's norms, dropouts and feed-forward
linears of other classes (prepare_qat's QATLinear, Int8Linear, a subclass) are kept in fastattn's layer, which calls
them; a layer whose attention is not exactly nn.MultiheadAttention stays torch's, its parts swapped one by one.
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import sys
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as fnn
from .nn.quantized import MODES, Int8Linear, reads_linear_weights
from .quantization import _check_float_weights, _fast_path_linears

log = logging.getLogger("fastattn")

SkipEntry = Union[str, type]

_ATTENTION = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
              "TransformerDecoder", "Transformer")
_NORMS = ("LayerNorm", "RMSNorm")
_CONTAINERS = ("TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
               "Transformer")  # swapped whole: their insides are fastattn's
_HOOKS = {"forward / backward": ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"),
          "state_dict / load_state_dict": ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                                           "_load_state_dict_post_hooks")}  # hooks a new module would not carry


class _CannotSwap(Exception):
    """Why one module stays as it is (logged, never raised to the caller)."""


def _fastattn_class(kind: str) -> Optional[type]:
    return getattr(fnn, kind, None)


def _enabled(attention: bool, layernorm: bool, dropout: bool = False) -> Tuple[str, ...]:
    """The torch class names convert swaps, by its flags."""
    return (_ATTENTION if attention else ()) + (_NORMS if layernorm else ()) + (("Dropout",) if dropout else ())


def _kind(mod: nn.Module, kinds: Tuple[str, ...]) -> Optional[str]:
    """The swap this module gets: its torch class name, when it is exactly that class and that swap is enabled;
    "HFRMSNorm" for HF transformers' Llama-style RMSNorms when norms are swapped."""
    for kind in kinds:
        if type(mod) is getattr(nn, kind):
            return kind
    if "RMSNorm" in kinds and _llama_rms_norm(mod):
        return "HFRMSNorm"
    return None


@functools.lru_cache(maxsize=None)
def _llama_rms_norm_code():
    """transformers' LlamaRMSNorm.forward code object, or None without transformers."""
    from .hf import _installed_kernels_package
    _installed_kernels_package()
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    return getattr(LlamaRMSNorm.forward, "__code__", None)


def _code_key(code) -> tuple:
    """What a function computes: bytecode, names and constants (a docstring aside), locals."""
    return (code.co_code, code.co_names, tuple(c for c in code.co_consts if not isinstance(c, str)),
            code.co_varnames)


def _llama_rms_norm(mod: nn.Module) -> bool:
    """Whether mod is an HF transformers RMSNorm running LlamaRMSNorm's forward (Mistral's, Qwen's, ...: the same
    code, compared as bytecode), with its one 1-D ``weight`` and a float ``variance_epsilon``. Only classes named
    *RMSNorm of a loaded transformers are looked at."""
    cls = type(mod)
    if not cls.__name__.endswith("RMSNorm") or _ours(mod) or "transformers" not in sys.modules:
        return False
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    ref = _llama_rms_norm_code()
    if code is None or ref is None or _code_key(code) != _code_key(ref):
        return False
    params = dict(mod.named_parameters(recurse=False))
    return (params.keys() == {"weight"} and params["weight"].dim() == 1 and not list(mod.buffers())
            and not list(mod.children()) and isinstance(getattr(mod, "variance_epsilon", None), float))


def _ours(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("fastattn.")


def _torch_base(mod: nn.Module, kinds: Tuple[str, ...]) -> Optional[str]:
    """The swappable torch class a (non-fastattn) subclass derives from, else None."""
    if _ours(mod):
        return None
    for kind in kinds:
        if isinstance(mod, getattr(nn, kind)) and type(mod) is not getattr(nn, kind):
            return kind
    return None


# ---- building fastattn's twin of a torch module (fresh weights; _carry then moves the originals in) -------------
def _activation(fn):
    """torch stores activation="relu" / "gelu" as F.relu / F.gelu; give fastattn the string back."""
    return {F.relu: "relu", F.gelu: "gelu"}.get(fn, fn) if not isinstance(fn, nn.Module) else fn


def _layer_kwargs(layer: nn.Module) -> dict:
    for name in ("self_attn", "multihead_attn"):  # (a subclass's forward may differ; torch's fast path skips it)
        cls = type(getattr(layer, name, None))
        if hasattr(layer, name) and cls not in (nn.MultiheadAttention, fnn.MultiheadAttention):
            raise _CannotSwap(f"its {name} is a {cls.__module__}.{cls.__qualname__}, not nn.MultiheadAttention")
    try:
        return dict(d_model=layer.linear1.in_features, nhead=layer.self_attn.num_heads,
                    dim_feedforward=layer.linear1.out_features, dropout=layer.dropout.p,
                    activation=_activation(layer.activation), layer_norm_eps=layer.norm1.eps,
                    batch_first=layer.self_attn.batch_first, norm_first=layer.norm_first,
                    bias=layer.linear1.bias is not None)
    except AttributeError as e:  # a part replaced by a module without torch's attributes
        raise _CannotSwap(f"a part of it lacks what torch's has ({e})") from None


def _same_layers(layers: nn.ModuleList) -> dict:
    """The constructor arguments shared by every layer of an encoder / decoder (fastattn's copies one layer)."""
    if len(layers) == 0:
        raise _CannotSwap("it has no layers")
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers):
        raise _CannotSwap("its layers are not all of one class")
    def shape(layer):  # what _carry_settings does not set layer by layer
        kw = _layer_kwargs(layer)
        return {k: v for k, v in kw.items() if k not in ("dropout", "layer_norm_eps")}

    if any(shape(layer) != shape(first) for layer in layers[1:]):
        raise _CannotSwap("its layers are not all configured alike")
    return _layer_kwargs(first)


def _build(kind: str, old: nn.Module, device, layernorm: bool) -> nn.Module:
    cls = _fastattn_class(kind)
    if cls is None:
        raise _CannotSwap(f"this fastattn has no fastattn.nn.{kind} yet")
    dd = dict(device=device, dtype=_dtype(old))
    if kind == "LayerNorm":
        return cls(old.normalized_shape, old.eps, old.elementwise_affine, old.bias is not None, **dd)
    if kind == "RMSNorm":
        return cls(old.normalized_shape, old.eps, old.elementwise_affine, **dd)
    if kind == "HFRMSNorm":
        return cls(old.weight.shape[0], old.variance_epsilon, **dd)
    if kind == "Dropout":
        return cls(old.p, old.inplace)
    if kind == "MultiheadAttention":
        return cls(old.embed_dim, old.num_heads, dropout=old.dropout, bias=old.in_proj_bias is not None,
                   add_bias_kv=old.bias_k is not None, add_zero_attn=old.add_zero_attn, kdim=old.kdim,
                   vdim=old.vdim, batch_first=old.batch_first, **dd)
    if kind in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        return cls(**_layer_kwargs(old), **dd)
    if kind in ("TransformerEncoder", "TransformerDecoder"):
        layer_kind = kind + "Layer"
        if type(old.layers[0]) is not getattr(nn, layer_kind):
            raise _CannotSwap(f"its layers are {type(old.layers[0]).__name__}, not nn.{layer_kind}")
        _same_layers(old.layers)
        layer = _build(layer_kind, old.layers[0], device, layernorm)
        norm = _norm_twin(old.norm, device, layernorm)
        if kind == "TransformerEncoder":  # (torch's constructor would warn again about the nested path it turns off)
            new = cls(layer, len(old.layers), norm=norm, enable_nested_tensor=False, mask_check=old.mask_check)
            new.enable_nested_tensor = old.enable_nested_tensor
            new.use_nested_tensor = getattr(old, "use_nested_tensor", old.enable_nested_tensor)
            return new
        return cls(layer, len(old.layers), norm=norm)
    if kind == "Transformer":
        parts = {}
        for part, sub_kind in (("encoder", "TransformerEncoder"), ("decoder", "TransformerDecoder")):
            sub = getattr(old, part)
            if type(sub) is not getattr(nn, sub_kind):  # the constructor would re-initialise a custom one's weights
                raise _CannotSwap(f"its {part} is a custom {type(sub).__name__}")
            parts[part] = _build(sub_kind, sub, device, layernorm)
        # built around the two parts (as torch's custom_encoder / custom_decoder): the rest of the constructor's
        # arguments only shape the default parts
        return cls(d_model=old.d_model, nhead=old.nhead, batch_first=old.batch_first,
                   custom_encoder=parts["encoder"], custom_decoder=parts["decoder"], **dd)
    raise AssertionError(kind)


def _norm_twin(norm: Optional[nn.Module], device, layernorm: bool) -> Optional[nn.Module]:
    """An encoder / decoder's final norm: fastattn's when it is a plain LayerNorm / RMSNorm and norms are swapped,
    else the same module object."""
    kind = _kind(norm, _enabled(False, layernorm)) if norm is not None else None
    return _build(kind, norm, device, layernorm) if kind is not None else norm


def _dtype(mod: nn.Module) -> Optional[torch.dtype]:
    for t in mod.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def _device(mod: nn.Module) -> torch.device:
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


def _set(root: nn.Module, name: str, value) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)


def _carry(old: nn.Module, new: nn.Module) -> None:
    """Give new the original's Parameter and buffer objects (by state_dict name) and training flags."""
    old_sd, new_sd = old.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    if old_sd.keys() != new_sd.keys():
        diff = sorted(set(old_sd) ^ set(new_sd))
        more = ", ..." if len(diff) > 4 else ""
        raise _CannotSwap(f"fastattn's state_dict keys differ ({', '.join(diff[:4])}{more})")
    for key, t in old_sd.items():
        if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(new_sd[key].shape):
            raise _CannotSwap(f"{key}: shape {tuple(t.shape)} here, {tuple(new_sd[key].shape)} in fastattn's")
    old_params = {n for n, _ in old.named_parameters(remove_duplicate=False)}
    if old_params != {n for n, _ in new.named_parameters(remove_duplicate=False)}:
        raise _CannotSwap("fastattn's parameters and buffers are split differently")
    for name, p in old.named_parameters(remove_duplicate=False):
        _set(new, name, p)
    new_buffers = {n for n, _ in new.named_buffers(remove_duplicate=False)}
    for name, b in old.named_buffers(remove_duplicate=False):
        if name in new_buffers:
            _set(new, name, b)
    old_modules = dict(old.named_modules(remove_duplicate=False))
    for name, sub in new.named_modules(remove_duplicate=False):
        sub.training = old_modules[name].training if name in old_modules else old.training


def _hook_kinds(mod: nn.Module) -> str:
    """The kinds of hooks registered on mod or inside it, "" when none."""
    return " and ".join(kind for kind, attrs in _HOOKS.items()
                        if any(getattr(m, a, None) for m in mod.modules() for a in attrs))


def _swap(kind: str, old: nn.Module, layernorm: bool) -> nn.Module:
    if "forward" in vars(old):
        raise _CannotSwap("its forward is replaced on the instance (accelerate's hooks do that), which a new module "
                          "would not carry")
    for name, m in old.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(m):
            raise _CannotSwap(f"{name or 'it'} is parametrized (torch.nn.utils.parametrize), which fastattn's "
                              f"modules would not carry")
    hooks = _hook_kinds(old)
    if hooks:  # checked before _carry, whose state_dict() call would run a state_dict hook
        raise _CannotSwap(f"it has {hooks} hooks, which a new module would not carry")
    new = _build(kind, old, "meta", layernorm)
    _carry_settings(kind, old, new)
    _carry(old, new)
    if any(t.is_meta for t in list(new.parameters()) + list(new.buffers())):  # fastattn's own extra buffers
        new = _build(kind, old, _device(old), layernorm)
        _carry_settings(kind, old, new)
        _carry(old, new)
    return new


def _layer_pairs(kind: str, old: nn.Module, new: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    """(torch's layer, its twin) for every Transformer layer in a swapped module of ``kind``."""
    if kind in ("TransformerEncoderLayer", "TransformerDecoderLayer"):
        return [(old, new)]
    if kind in ("TransformerEncoder", "TransformerDecoder"):
        return list(zip(old.layers, new.layers))
    if kind == "Transformer":
        return _layer_pairs("TransformerEncoder", old.encoder, new.encoder) + \
            _layer_pairs("TransformerDecoder", old.decoder, new.decoder)
    return []


def _carry_settings(kind: str, old: nn.Module, new: nn.Module) -> None:
    """What a layer's constructor does not set alike and its forward reads, as each original layer has it: every
    norm's eps, every dropout's p and each attention's dropout (a layer may have been changed after construction,
    and an encoder's layers one by one). A norm, dropout or feed-forward linear that is not torch's plain class
    (prepare_qat's QATLinear, an Int8Linear, a subclass) is kept as it is (the layer's forward calls it)."""
    for o, n in _layer_pairs(kind, old, new):
        for name in ("linear1", "linear2"):
            if type(getattr(o, name)) is not nn.Linear:
                setattr(n, name, getattr(o, name))
        for name in ("norm1", "norm2", "norm3"):
            if hasattr(o, name):
                if type(getattr(o, name)) is nn.LayerNorm:
                    getattr(n, name).eps = getattr(o, name).eps
                else:
                    setattr(n, name, getattr(o, name))
        for name in ("dropout", "dropout1", "dropout2", "dropout3"):
            if hasattr(o, name):
                if type(getattr(o, name)) is nn.Dropout:
                    getattr(n, name).p = getattr(o, name).p
                else:
                    setattr(n, name, getattr(o, name))
        for name in ("self_attn", "multihead_attn"):
            if hasattr(o, name):
                getattr(n, name).dropout = getattr(o, name).dropout


# ---- skip ------------------------------------------------------------------------------------------------------
class _Skip:
    def __init__(self, skip: Iterable[SkipEntry]):
        if isinstance(skip, (str, type)):
            skip = (skip,)
        if not isinstance(skip, Iterable):
            raise TypeError(f"skip: expected module names or classes (an iterable of them), got "
                            f"{type(skip).__name__} {skip!r}")
        self.entries = tuple(skip)
        for e in self.entries:
            if not isinstance(e, (str, type)):
                raise TypeError(f"skip: expected module names or classes, got {type(e).__name__} {e!r}")
        self.used = set()

    def match(self, name: str, mod: nn.Module) -> Optional[SkipEntry]:
        for e in self.entries:
            if (isinstance(e, type) and isinstance(mod, e)) or (
                    isinstance(e, str) and (e == name or fnmatch.fnmatchcase(name, e))):
                self.used.add(e)
                return e
        return None

    def kept(self, model: nn.Module) -> Dict[int, str]:
        """id -> the skipped place, of every module skipped at some place of model and everything inside it: a module
        registered at two places is one module, so it is kept at the other place too."""
        out: Dict[int, str] = {}
        for name, mod in model.named_modules(remove_duplicate=False):
            if name and id(mod) not in out and self.match(name, mod) is not None:
                out.update((id(m), name) for m in mod.modules())
        return out

    def first_inside(self, name: str, mod: nn.Module) -> Optional[Tuple[str, SkipEntry]]:
        for sub_name, sub in mod.named_modules(prefix=name):
            if sub_name != name:
                e = self.match(sub_name, sub)
                if e is not None:
                    return sub_name, e
        return None


def _children(mod: nn.Module):
    """Every (name, child), a child registered twice included (named_children() yields it once)."""
    return [(n, c) for n, c in mod._modules.items() if c is not None]


def _entry(e: SkipEntry) -> str:
    return e.__name__ if isinstance(e, type) else repr(e)


# ---- the walk ----------------------------------------------------------------------------------------------------
class _Converter:
    def __init__(self, kinds: Tuple[str, ...], layernorm: bool, int8: Optional[str], skip: _Skip,
                 kept: Dict[int, str]):
        self.kinds, self.layernorm, self.int8, self.skip, self.kept = kinds, layernorm, int8, skip, kept
        self.counts: Counter = Counter()
        self.done: Dict[int, nn.Module] = {}  # id(old) -> new: a module shared by two parents stays shared

    def would_swap(self, mod: nn.Module) -> bool:
        return any(_kind(m, self.kinds) is not None for m in mod.modules())

    def swapped(self, name: str, mod: nn.Module) -> Optional[nn.Module]:
        """The replacement for mod (None: keep it, walk inside)."""
        kind = _kind(mod, self.kinds)
        if kind is None:
            base = _torch_base(mod, self.kinds)
            if base is not None:
                log.info("fastattn.convert: left %s (%s) as it is: a subclass of nn.%s, whose forward may differ",
                         name or "the model", type(mod).__name__, base)
            return None
        if id(mod) in self.done:
            return self.done[id(mod)]
        if kind in _CONTAINERS:
            inner = self.skip.first_inside(name, mod)
            shared = next((self.kept[id(m)] for m in mod.modules() if id(m) in self.kept), None)
            if inner is None and shared is not None:
                log.info("fastattn.convert: %s (%s) swapped part by part: a module inside it is also registered at "
                         "%s, which skip keeps", name or "the model", kind, shared)
                return None
            if inner is not None:
                log.info("fastattn.convert: %s (%s) swapped part by part: %s is in skip (%s)", name or "the model",
                         kind, inner[0], _entry(inner[1]))
                return None
        try:
            new = _swap(kind, mod, self.layernorm)
        except _CannotSwap as e:
            log.info("fastattn.convert: skipped %s (%s): %s", name or "the model", kind, e)
            return None
        self.counts[kind] += 1
        self.done[id(mod)] = new
        return new

    def skipped(self, name: str, child: nn.Module) -> Optional[str]:
        """Why child (at name) stays as it is: its skip entry, or the skipped place it is also registered at."""
        entry = self.skip.match(name, child)
        if entry is not None:
            return _entry(entry)
        if id(child) in self.kept:
            return f"the same module is {self.kept[id(child)]}, which is in skip or inside it"
        return None

    def walk(self, mod: nn.Module, prefix: str) -> None:
        for child_name, child in _children(mod):
            name = f"{prefix}.{child_name}" if prefix else child_name
            entry = self.skipped(name, child)
            if entry is not None:
                if self.would_swap(child):
                    log.info("fastattn.convert: skipped %s (%s): in skip (%s)", name, type(child).__name__, entry)
                continue
            new = self.swapped(name, child)
            if new is not None:
                setattr(mod, child_name, new)
            elif not _ours(child):  # what is inside fastattn's modules is fastattn's already
                self.walk(child, name)

    def walk_int8(self, mod: nn.Module, prefix: str) -> None:
        for child_name, child in _children(mod):
            name = f"{prefix}.{child_name}" if prefix else child_name
            entry = self.skipped(name, child)
            if entry is not None:
                if any(type(m) is nn.Linear for m in child.modules()):
                    log.info("fastattn.convert: skipped %s (%s): in skip (%s)", name, type(child).__name__, entry)
                continue
            if type(child) is nn.Linear:
                if reads_linear_weights(mod):
                    log.info("fastattn.convert: kept %s (Linear) float: torch's TransformerEncoderLayer reads its "
                             "weight directly (its inference fast path)", name)
                    continue
                new = self.done.get(id(child))
                if new is None:
                    new = Int8Linear.from_float(child, self.int8)  # in child's training mode
                    self.done[id(child)] = new
                    self.counts["Linear"] += 1
                setattr(mod, child_name, new)
            else:
                self.walk_int8(child, name)


def _hf_attention(model: nn.Module, skip: _Skip) -> None:
    """Route the attention of each top-level HF transformers model inside ``model`` through fastattn."""
    tops = []
    for name, mod in model.named_modules():
        if hasattr(mod, "set_attn_implementation") and hasattr(mod, "config") and not any(
                name.startswith(t + ".") or t == "" for t in tops):
            tops.append(name)
    for name in tops:
        mod = model.get_submodule(name)
        label = name or "the model"
        if skip.match(name, mod) is not None:
            log.info("fastattn.convert: %s (%s) keeps its attention: in skip", label, type(mod).__name__)
            continue
        before = getattr(mod.config, "_attn_implementation", None)
        from . import hf
        if before == hf.NAME:
            continue
        can_set = getattr(mod, "_can_set_attn_implementation", lambda: True)
        if not can_set():
            log.info("fastattn.convert: %s (%s) keeps attention %r: it does not take an attention implementation "
                     "by name", label, type(mod).__name__, before)
            continue
        try:
            hf.register()
            mod.set_attn_implementation(hf.NAME)
        except (ImportError, ValueError, KeyError) as e:
            log.info("fastattn.convert: %s (%s) keeps attention %r: %s", label, type(mod).__name__, before, e)
            continue
        log.info("fastattn.convert: %s (%s): attention %r -> 'fastattn' (HF attn_implementation)", label,
                 type(mod).__name__, before)


def convert(model: nn.Module, *, attention: bool = True, layernorm: bool = True, dropout: bool = True,
            int8: Union[bool, str] = False, skip: Sequence[SkipEntry] = ()) -> nn.Module:
    """Swap, in place, torch's nn.MultiheadAttention and nn.Transformer{,Encoder,Decoder}{,Layer} (attention=True),
    nn.LayerNorm, nn.RMSNorm and HF transformers' Llama-style RMSNorms (layernorm=True), nn.Dropout (dropout=True:
    fastattn's Philox dropout, which draws other masks than torch's generator) and nn.Linear (int8=True or a mode:
    "w8a8" (= True) or "w8a16"; "w8a8_static" needs calibration: fastattn.quantize) for fastattn's, carrying the
    weights; HF transformers models (attention=True) switch to attn_implementation="fastattn". ``skip``: module
    names as in ``named_modules()`` (fnmatch patterns allowed) or classes; a skipped module is left whole, with
    everything inside it.

    Returns the model (a new module only when ``model`` itself is one of the swapped classes). Idempotent. The
    state_dict keys stay the same, except that Int8Linear adds its scales. Logs (logger "fastattn", level INFO) one
    line per kind of swap and one per module left alone, with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if int8 is True:
        int8 = "w8a8"
    elif int8 is False or int8 is None:
        int8 = None
    elif int8 not in MODES:
        raise ValueError(f"int8: expected True, False, 'w8a8' or 'w8a16', got {int8!r}")
    if int8 == "w8a8_static":
        raise ValueError("int8: 'w8a8_static' needs calibrated input scales: use fastattn.quantize(model, calib_data, "
                         "mode='w8a8_static')")
    skip = _Skip(skip)
    conv = _Converter(_enabled(bool(attention), bool(layernorm), bool(dropout)), bool(layernorm), int8, skip,
                      skip.kept(model))
    if skip.match("", model) is not None:
        log.info("fastattn.convert: the model (%s) is in skip: nothing swapped", type(model).__name__)
        return model
    if int8:  # refused up front, as fastattn.quantize does, before anything is swapped
        fast_path = set() if attention else _fast_path_linears(model)  # these stay float
        _check_float_weights([(n, m) for n, m in model.named_modules() if type(m) is nn.Linear
                              and id(m) not in conv.kept and id(m) not in fast_path])
    root = conv.swapped("", model)
    if root is not None:
        model = root
    else:
        conv.walk(model, "")
    if int8:
        if type(model) is nn.Linear:
            model = Int8Linear.from_float(model, int8)
            conv.counts["Linear"] += 1
        else:
            conv.walk_int8(model, "")
    if attention:
        _hf_attention(model, skip)
    for kind, n in conv.counts.items():
        target = f"fastattn.nn.Int8Linear ({int8})" if kind == "Linear" else f"fastattn.nn.{kind}"
        source = "HF Llama-style RMSNorm" if kind == "HFRMSNorm" else f"nn.{kind}"
        log.info("fastattn.convert: %d x %s -> %s", n, source, target)
    if not conv.counts:
        log.info("fastattn.convert: no module swapped")
    for e in skip.entries:
        if e not in skip.used:
            log.warning("fastattn.convert: skip entry %s matched no module", _entry(e))
    return model
