"""Post-training quantization (with SmoothQuant) and quantization-aware training for any torch model.

quantize(model, calib_data): every nn.Linear becomes an Int8Linear. With calibration data, forward hooks collect
each Linear's per-channel activation maxima and which module produced its input; SmoothQuant then divides input
channel k by s_k = max|X_k|^alpha / max|W_k|^(1 - alpha) and multiplies the weight's column k by s_k. The 1/s is
folded into the producing LayerNorm / RMSNorm / Linear when that is exact (checked on a calibration batch),
otherwise it stays in the Int8Linear and is fused into its quantization kernel.

int8_layout / apply_int8_layout: which Linears of a model are int8, and in which mode, as plain JSON-able data, so a
quantized state dict (int8 weights, scales) loads into a freshly built float model: what save_pretrained and
``fastattn quantize`` store next to the weights.
"""
import dataclasses
import fnmatch
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from . import hugepages
from .backends import log
from .nn.quantized import MODES, Int8Linear, QATLinear, reads_linear_weights

_PRODUCERS = (nn.LayerNorm, nn.RMSNorm, nn.Linear)


def _skip_patterns(skip) -> Sequence[str]:
    """``skip`` as a sequence of patterns: one string is one pattern (not its characters)."""
    if isinstance(skip, str):
        return (skip,)
    skip = tuple(skip)
    bad = [s for s in skip if not isinstance(s, str)]
    if bad:
        raise TypeError(f"skip: expected module names or fnmatch patterns (str), got {bad[0]!r}")
    return skip


def _skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether module ``name`` or a module it is inside matches a pattern (a skipped module is left whole, as in
    fastattn.convert)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), s) for s in skip for i in range(1, len(parts) + 1))


def _warn_unmatched(what: str, model: nn.Module, skip: Sequence[str]) -> None:
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]  # ("" too: the model itself)
    for s in skip:
        if not any(fnmatch.fnmatchcase(n, s) for n in names):
            log.warning("fastattn.%s: skip entry %r matched no module", what, s)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _aliases(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every name it has in model (a module registered at several places has several)."""
    names: Dict[int, List[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        names[id(mod)].append(name)
    return names


def _replace(model: nn.Module, new: Dict[int, nn.Module]) -> nn.Module:
    """Put new[id(m)] at every place of model where module m is (shared modules stay shared); returns the model, or
    its replacement when model itself is one of them."""
    if id(model) in new:
        return new[id(model)]
    for mod_id, names in _aliases(model).items():
        if mod_id in new:
            for name in names:
                _set_module(model, name, new[mod_id])
    return model


def _fast_path_linears(model: nn.Module) -> set:
    """ids of the Linears that torch's TransformerEncoderLayer reads directly in its inference fast path (its weight
    passed to a fused kernel): they must stay float, as fastattn.convert keeps them."""
    return {id(m) for layer in model.modules() if reads_linear_weights(layer)
            for m in layer.children() if isinstance(m, nn.Linear)}


def _run(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def _calibrate(model, linears: Dict[str, nn.Linear], calib_data: Iterable):
    """Per-channel |x| maxima of each Linear's input, the module whose output it was (name or None), and the
    batches (kept to check folds)."""
    act_max: Dict[str, torch.Tensor] = {}
    producer: Dict[str, Optional[str]] = {}
    outputs: Dict[int, tuple] = {}  # id(output) -> (module name, output): held for the batch so ids stay unique
    hooks = []

    def out_hook(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)
        return hook

    def in_hook(name):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")  # (nn.Linear's argument, by keyword too)
            if not isinstance(x, torch.Tensor) or x.numel() == 0:  # (an empty batch: nothing to measure)
                return
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            if not bool(torch.isfinite(m).all()):
                which = repr(name) if name else "the model"
                raise ValueError(f"calib_data: batch {len(batches)} gives {which} (an nn.Linear) inf or NaN inputs: "
                                 f"calibration needs finite activations (they would make its scales inf or NaN)")
            act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)
            src = outputs.get(id(x), (None,))[0]
            producer[name] = src if producer.get(name, src) == src else None  # must agree across batches
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, _PRODUCERS):
            hooks.append(mod.register_forward_hook(out_hook(name)))
        if name in linears:
            hooks.append(mod.register_forward_pre_hook(in_hook(name), with_kwargs=True))
    batches = []
    try:
        for batch in calib_data:
            outputs.clear()
            _run(model, batch)
            batches.append(batch)
    finally:
        for h in hooks:
            h.remove()
    if not batches:
        raise ValueError("calib_data: no batches (an empty iterable, or a generator already consumed)")
    return act_max, producer, batches


@torch.no_grad()
def _smooth_factors(act_max: torch.Tensor, weights: List[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def _scaled(p: nn.Parameter, factor: torch.Tensor) -> nn.Parameter:
    """p * factor as a new Parameter: out of place, so that a tensor tied elsewhere (a tied LM head's token
    embedding) keeps its values."""
    return nn.Parameter(p.detach() * factor.to(p.dtype), requires_grad=p.requires_grad)


def _fold_into(producer: nn.Module, s: torch.Tensor) -> None:
    """Divide the producer's output channel k by s[k] (LayerNorm/RMSNorm affine, or Linear rows and bias)."""
    if isinstance(producer, nn.Linear):
        producer.weight = _scaled(producer.weight, 1.0 / s[:, None])
    elif producer.weight is not None:
        producer.weight = _scaled(producer.weight, (1.0 / s).view_as(producer.weight))
    if getattr(producer, "bias", None) is not None:
        producer.bias = _scaled(producer.bias, (1.0 / s).view_as(producer.bias))


def _close(a, b) -> bool:
    """Whether two model outputs agree: tensors within a quantization-free tolerance, containers (tuple, list, dict,
    dataclass such as fastattn.models.ModelOutput) element by element, plain values by equality; anything else
    counts as different (a fold is then not kept)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
            a.float(), b.float(), rtol=1e-3, atol=1e-3 * (b.float().abs().max().item() + 1e-6))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_close(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if a is None or isinstance(a, (bool, int, float, str)):
        return a == b
    return False


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _check_float_weights(named) -> None:
    """Int8Linear takes float32, float16 and bfloat16 activations: a float64 Linear would be quantized and then
    refuse the model's first input. Refused here, naming the layer."""
    for name, m in named:
        if m.weight.dtype == torch.float64:
            which = f"its Linear {name!r}" if name else "the Linear"
            raise TypeError(f"model: {which} holds float64 weights, and Int8Linear runs float32, float16 and "
                            "bfloat16 activations: cast the model first (model.float())")


@torch.no_grad()
def quantize(model: nn.Module, calib_data: Optional[Iterable] = None, smoothquant_alpha: float = 0.5,
             mode: str = "w8a8", skip: Sequence[str] = ()) -> nn.Module:
    """Replace every nn.Linear of model (in place; a module whose name matches a ``skip`` pattern, one string or a
    sequence of fnmatch patterns, stays float with everything inside it; a pattern that matches nothing is logged)
    by an Int8Linear. A Linear registered at several places is replaced at each by
    one Int8Linear; the Linears torch's TransformerEncoderLayer reads directly (its fast path) stay float.

    calib_data: an iterable of model inputs (a tensor, a tuple of args or a dict of kwargs), run once in eval mode.
    With it, SmoothQuant (``smoothquant_alpha``; None disables) smooths activation outliers, and w8a8_static gets its
    input scales. Returns the model (the new Int8Linear when model itself is an nn.Linear).
    """
    _check_model(model)
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {MODES}")
    if smoothquant_alpha is not None and not 0.0 <= smoothquant_alpha <= 1.0:
        raise ValueError(f"smoothquant_alpha: expected a float in [0, 1] (or None), got {smoothquant_alpha!r}")
    skip = _skip_patterns(skip)
    _warn_unmatched("quantize", model, skip)
    aliases, keep = _aliases(model), _fast_path_linears(model)
    linears = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, QATLinear) and id(m) not in keep
               and not any(_skipped(a, skip) for a in aliases[id(m)])}
    done = {m.mode for m in model.modules() if isinstance(m, Int8Linear)}
    if not linears and done:
        log.warning("fastattn.quantize: nothing to quantize: the model's Linears are Int8Linear already (%s); "
                    "quantize the float model for another mode or new calibration", ", ".join(sorted(done)))
    _check_float_weights(linears.items())
    smooth: Dict[str, torch.Tensor] = {}
    input_scale: Dict[str, float] = {}
    if calib_data is not None and linears:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # inference statistics (no dropout), and a deterministic model for the fold checks
        try:
            act_max, producer, batches = _calibrate(model, linears, calib_data)
            missing = [n for n in linears if n not in act_max]
            if mode == "w8a8_static" and missing:
                raise ValueError(f"calib_data: {missing[0]!r} (an nn.Linear) never ran on the calibration data, so "
                                 "w8a8_static has no input scale for it: calibrate with inputs that reach it, or "
                                 "skip it")
            if smoothquant_alpha is not None and mode != "w8a16":
                _smoothquant(model, linears, act_max, producer, batches[0], smoothquant_alpha, smooth)
        finally:
            for m, training in modes:
                m.train(training)
        input_scale = {n: (act_max[n].max().item() / 127.0) or 1.0 for n in act_max}
    elif mode == "w8a8_static" and linears:
        raise ValueError("calib_data: mode='w8a8_static' needs calibration data for its input scales")
    new = {}
    for name, lin in linears.items():
        s = smooth.get(name)
        new[id(lin)] = hugepages.place(Int8Linear.from_float(lin if s is None else _smoothed(lin, s), mode, s,
                                                             input_scale.get(name)))
    return _replace(model, new)


def _smoothquant(model, linears, act_max, producer, batch, alpha, smooth) -> None:
    """SmoothQuant on the calibrated linears: fold each group's factors into their common producer when exact, else
    into each Linear's weight with 1/s recorded in ``smooth``; act_max becomes the smoothed inputs' maxima."""
    groups = defaultdict(list)
    for name in linears:
        if name in act_max:
            groups[producer.get(name)].append(name)
    for src, names in groups.items():
        if src is not None:
            s = _smooth_factors(torch.stack([act_max[n] for n in names]).amax(0),
                                [linears[n].weight for n in names], alpha)
            if _try_fold(model, batch, model.get_submodule(src), [linears[n] for n in names], s):
                for n in names:
                    act_max[n] = act_max[n] / s
                continue
        for n in names:  # no exact fold: keep 1/s in the Int8Linear (the weight scaled as it is built)
            s = _smooth_factors(act_max[n], [linears[n].weight], alpha)
            smooth[n] = s
            act_max[n] = act_max[n] / s


def _smoothed(lin: nn.Linear, s: torch.Tensor) -> nn.Linear:
    """A Linear with lin's bias and lin's weight times s (per input column), lin itself left as it is (a Linear the
    caller still holds, as a bare Linear quantized, keeps its weights)."""
    tmp = nn.Linear(lin.in_features, lin.out_features, bias=False, device="meta")
    tmp.weight, tmp.bias = _scaled(lin.weight, s), lin.bias
    tmp.train(lin.training)
    return tmp


@torch.no_grad()
def _try_fold(model, batch, producer, consumers, s) -> bool:
    """Fold 1/s into producer and s into the consumers' weights; keep it only if the model's output is unchanged."""
    before = _run(model, batch)
    saved = [(m, name, getattr(m, name)) for m in (producer, *consumers) for name in ("weight", "bias")
             if getattr(m, name, None) is not None]
    _fold_into(producer, s)
    for lin in consumers:
        lin.weight = _scaled(lin.weight, s)
    if _close(_run(model, batch), before):
        return True
    for m, name, p in saved:  # undo (the producer's output has other consumers): the original parameters
        setattr(m, name, p)
    return False


def int8_layout(model: nn.Module) -> Dict[str, dict]:
    """{module name: {"mode", "in_features", "out_features", "bias", "smooth"}} of every Int8Linear of model (empty
    for a float model): what apply_int8_layout needs to rebuild them."""
    _check_model(model)
    return {name: {"mode": m.mode, "in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None, "smooth": m.smooth is not None}
            for name, m in model.named_modules() if isinstance(m, Int8Linear)}


_LAYOUT_TYPES = {"mode": str, "in_features": int, "out_features": int, "bias": bool, "smooth": bool}


def apply_int8_layout(model: nn.Module, layout: Dict[str, dict]) -> nn.Module:
    """Replace the nn.Linear layers named in ``layout`` (int8_layout's dict) by empty Int8Linear layers of the
    recorded mode, in place (at every place a shared Linear is registered), so that the quantized model's state dict
    loads into model. Returns model."""
    _check_model(model)
    if not isinstance(layout, dict):
        raise TypeError(f"layout: expected a dict of module name -> spec, got {type(layout).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    new: Dict[int, nn.Module] = {}
    for name, spec in layout.items():
        lin = modules.get(name)
        if type(lin) not in (nn.Linear, QATLinear):
            found = "no such module" if lin is None else f"a {type(lin).__name__}"
            raise ValueError(f"layout: {name!r} is not an nn.Linear of this model ({found})")
        if not isinstance(spec, dict) or any(not isinstance(spec.get(k), t) or (t is int and isinstance(spec[k], bool))
                                             for k, t in _LAYOUT_TYPES.items()):
            raise ValueError(f"layout[{name!r}]: expected {{{', '.join(_LAYOUT_TYPES)}}}, got {spec!r}")
        if spec["mode"] not in MODES:
            raise ValueError(f"layout[{name!r}]: mode {spec['mode']!r} is not one of {MODES}")
        if (spec["in_features"], spec["out_features"]) != (lin.in_features, lin.out_features):
            raise ValueError(f"layout[{name!r}]: {spec['in_features']} -> {spec['out_features']} features, the "
                             f"model's Linear {lin.in_features} -> {lin.out_features}")
        if id(lin) not in new:
            new[id(lin)] = Int8Linear(lin.in_features, lin.out_features, spec["bias"], spec["mode"], spec["smooth"],
                                      device=lin.weight.device)
    _replace(model, new)
    return model


def prepare_qat(model: nn.Module, skip: Sequence[str] = ()) -> nn.Module:
    """Swap every nn.Linear (not in a module matching ``skip``, as quantize's) for a QATLinear sharing its
    parameters, in place (at every place a shared Linear is registered). Returns the model (the QATLinear when model
    itself is an nn.Linear)."""
    _check_model(model)
    skip, aliases = _skip_patterns(skip), _aliases(model)
    _warn_unmatched("prepare_qat", model, skip)
    new = {id(m): QATLinear.from_linear(m) for _, m in model.named_modules()
           if type(m) is nn.Linear and not any(_skipped(a, skip) for a in aliases[id(m)])}
    return _replace(model, new)


def convert_qat(model: nn.Module, mode: str = "w8a8") -> nn.Module:
    """Turn every QATLinear into an Int8Linear (mode "w8a8" or "w8a16"), in place. Returns the model (the
    Int8Linear when model itself is a QATLinear)."""
    _check_model(model)
    if mode not in MODES or mode == "w8a8_static":
        raise ValueError(f"mode: {mode!r} is not 'w8a8' or 'w8a16' (w8a8_static needs calibrated input scales: "
                         "fastattn.quantize(model, calib_data, mode='w8a8_static') quantizes a QAT model so)")
    qat = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]
    _check_float_weights(qat)
    new = {id(m): Int8Linear.from_float(m, mode) for _, m in qat}
    return _replace(model, new)
