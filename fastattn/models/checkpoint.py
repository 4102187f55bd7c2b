"""Reading HF checkpoint folders (config.json + model.safetensors or pytorch_model.bin) for the ``from_hf`` importers,
and our own weights files (save_weights / load_weights: save_pretrained, the CLI's checkpoints), with errors that
name the missing key or the wrong shape."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import hugepages


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported: a missing key, a wrong shape, or an unsupported setting."""


# transformers' activation names -> ours (ModelConfig.activation)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}


def hf_activation(key: str, name: str) -> str:
    """Our activation for an HF config's ``key`` set to ``name``; a CheckpointError naming both when we have none."""
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"config.json: {key} {name!r} is not supported ({sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


class HFConfig(dict):
    """An HF config.json's dict: reading a key it lacks raises a CheckpointError naming the key."""

    def __missing__(self, key):
        raise CheckpointError(f"config.json: no {key!r}, which this model type needs")


def read_json_object(path: str) -> dict:
    """The JSON object in file ``path``; a CheckpointError naming the file when it is unreadable or not one."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_generation_config(path: str) -> dict:
    """The generation_config.json of the HF folder at path ({} without one): transformers' generate reads its
    defaults there first (end tokens, forced tokens), config.json after."""
    p = os.path.join(path, "generation_config.json")
    return read_json_object(p) if os.path.isfile(p) else {}


def read_hf_folder(path: str) -> Tuple[dict, Dict[str, Tensor]]:
    """(config dict, state dict) of a local HF model folder. Weights: model.safetensors, else pytorch_model.bin
    (loaded with ``weights_only=True``). Sharded checkpoints (an index JSON) are read shard by shard."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    config = HFConfig(read_json_object(cfg_path))
    state: Dict[str, Tensor] = {}
    for index, single, loader in (("model.safetensors.index.json", "model.safetensors", _load_safetensors),
                                  ("pytorch_model.bin.index.json", "pytorch_model.bin", _load_bin)):
        if os.path.isfile(os.path.join(path, index)):
            try:
                with open(os.path.join(path, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{os.path.join(path, index)}: not a shard index ({e!r})") from None
            for shard in shards:
                state.update(_load(loader, os.path.join(path, shard)))
            return config, state
        if os.path.isfile(os.path.join(path, single)):
            return config, _load(loader, os.path.join(path, single))
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")


def _load(loader, file: str) -> Dict[str, Tensor]:
    """loader(file), any failure to read it (missing shard, truncated or corrupt file) as a CheckpointError."""
    try:
        state = loader(file)
    except Exception as e:  # safetensors' and pickle's errors have no common base
        raise CheckpointError(f"{file}: not readable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a state dict ({type(state).__name__})")
    return state


def _load_safetensors(file: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file
    return load_file(file)


def _load_bin(file: str) -> Dict[str, Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


class KeyMap:
    """Takes tensors out of an HF state dict by name (trying each of ``prefixes``), checking shapes."""

    def __init__(self, state: Dict[str, Tensor], prefixes: Sequence[str] = ("",)):
        self.state = state
        self.prefixes = [p for p in prefixes if any(k.startswith(p) for k in state)] or [""]

    def has(self, key: str) -> bool:
        return any(p + key in self.state for p in self.prefixes)

    def take(self, key: str, shape: Optional[Sequence[int]] = None, transpose: bool = False) -> Tensor:
        for p in self.prefixes:
            if p + key in self.state:
                t = self.state[p + key]
                if transpose:
                    t = t.t()
                if shape is not None and tuple(t.shape) != tuple(shape):
                    stored = tuple(t.shape[::-1]) if transpose else tuple(t.shape)
                    raise CheckpointError(f"checkpoint key {p + key!r}: shape {stored}, expected "
                                          f"{tuple(shape[::-1]) if transpose else tuple(shape)}")
                return t
        raise CheckpointError(f"checkpoint key {self.prefixes[0] + key!r} is missing")


def place(model: nn.Module, dtype=None, device=None) -> nn.Module:
    """model cast to a floating ``dtype`` and moved to ``device`` before its weights are copied in (from_hf and
    from_pretrained's dtype= / device=, as transformers' from_pretrained(dtype=...)): the device only ever holds
    the model in ``dtype``, and the checkpoint's tensors are converted as they are copied. (The model is built in
    float32 on the CPU first: host memory holds that and the checkpoint for a moment.) Weights that stay on the CPU
    go to huge pages (fastattn/hugepages.py)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype (torch.bfloat16, ...), got {dtype!r}")
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from None
    model = model if dtype is None and device is None else model.to(device=device, dtype=dtype)
    return hugepages.place(model)


def load_mapped(model: nn.Module, state: Dict[str, Tensor]) -> None:
    """Copy a state dict built by an importer into the model: every model key must be there with its shape."""
    own = model.state_dict()
    for key, t in own.items():
        if key not in state:
            raise CheckpointError(f"importer built no tensor for the model's {key!r}")
        if tuple(state[key].shape) != tuple(t.shape):
            raise CheckpointError(f"{key!r}: checkpoint gives {tuple(state[key].shape)}, the model has "
                                  f"{tuple(t.shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own}, strict=True)


def save_weights(model: nn.Module, file: str) -> None:
    """model's state dict as safetensors: a tensor shared by several names (tied weights) stored once, under its
    first name; any layout stored contiguous."""
    from safetensors.torch import save_file
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.stride())  # the same tensor, not just the same start
        if t.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = t.detach().contiguous()
    save_file(state, str(file), metadata={"format": "pt"})


_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_dtype(file: str, skip: Sequence[str] = ()) -> Optional[torch.dtype]:
    """The float dtype that most of the weights in save_weights' ``file`` are stored in (by element count; read
    from its header), leaving out the modules named in ``skip`` (int8 layers: their scales are float32 whatever the
    model's dtype); None when it holds no such weight."""
    from safetensors import SafetensorError, safe_open
    counts: Dict[torch.dtype, int] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if any(key.startswith(m + ".") for m in skip):
                    continue
                t = f.get_slice(key)
                dtype = _SAFETENSORS_FLOATS.get(t.get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + math.prod(t.get_shape())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    return max(counts, key=counts.get) if counts else None


def load_weights(model: nn.Module, file: str) -> None:
    """Copy what save_weights wrote into model, in place (parameters keep their identity and layout). Every key
    must be the model's, with its shape and kind (an int8 weight for an int8 buffer); a key not in the file must
    share its tensor with one that is (tied); two keys of one tied tensor must hold the same values (an untied
    checkpoint loaded with tie_embeddings=True is refused, where copying both would keep one silently)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"{file}: weights the model does not have: {', '.join(unknown[:4])}")
    loaded, first = set(), {}  # first: the file key each (tied) tensor was copied from
    with torch.no_grad():
        for name, t in own.items():
            if name in state:
                if tuple(state[name].shape) != tuple(t.shape):
                    raise CheckpointError(f"{file}: {name} has shape {tuple(state[name].shape)}, the model "
                                          f"{tuple(t.shape)}")
                if state[name].is_floating_point() != t.is_floating_point():  # int8 weights, float model or back
                    raise CheckpointError(f"{file}: {name} is {state[name].dtype}, the model's {t.dtype}")
                tensor = (t.data_ptr(), tuple(t.shape), t.stride())
                other = first.setdefault(tensor, name) if t.numel() else name
                if other != name and not torch.equal(state[other], state[name]):
                    raise CheckpointError(f"{file}: {other} and {name} hold different values, but the model ties "
                                          f"them (one tensor): load it untied (e.g. tie_embeddings=False)")
                t.copy_(state[name])
                loaded.add(t.data_ptr())
    missing = [n for n, t in own.items() if n not in state and t.data_ptr() not in loaded]
    if missing:
        raise CheckpointError(f"{file}: missing weights: {', '.join(missing[:4])}")


def hf_get(config: dict, *names, default=None):
    """The first of ``names`` present in an HF config dict."""
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default
