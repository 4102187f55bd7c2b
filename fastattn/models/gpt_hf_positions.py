"""Per-layer positions and windows of Hugging Face configs, for GPT.from_hf's importers: the rope dict (and the
sliding layers' own rotary base where rope_parameters holds one per layer type), the rope scaling, each layer's kind
(sliding-window or full attention) and the layers without rotary positions."""
from typing import Optional, Tuple

from .checkpoint import CheckpointError
from .positions import ROPE_SCALING_KEYS, ROPE_SCALING_OPTIONAL, check_rope_scaling


def sliding_window(hf: dict) -> Tuple[Optional[int], Optional[list]]:
    """(the attention window W: a query sees the W latest keys, itself included; the layer_types when only some
    layers have it, else None), or (None, None): Mistral and Phi-3 (every layer), Qwen2 / Qwen3 with
    use_sliding_window (the layers from max_window_layers on, or as layer_types says), Gemma 2 (every other layer,
    the first included), Gemma 3, OLMo 3, Cohere 2 and EXAONE 4 (all but every 6th / 4th layer), StarCoder2 (every
    layer). ``hf``: config.json with its config class's defaults filled in (gpt_hf.HF_DEFAULTS: Mistral's 4096)."""
    kind, window = hf.get("model_type"), hf.get("sliding_window")
    on = {"mistral": True, "mixtral": True, "phi3": True, "qwen2": False, "qwen3": False, "qwen3_moe": False,
          "qwen2_moe": False, "gemma2": True, "vaultgemma": True, "gemma3_text": True, "olmo3": True, "cohere2": True,
          "smollm3": False, "exaone4": True, "starcoder2": True, "ministral": True}.get(kind)
    if on is None or not window or not hf.get("use_sliding_window", on):
        return None, None
    types = layer_types(hf)
    if types is not None and "sliding_attention" not in types:
        return None, None
    return int(window), (None if types is None or set(types) == {"sliding_attention"} else list(types))


def layer_types(hf: dict) -> Optional[list]:
    """Each layer's "sliding_attention" / "full_attention": config.json's layer_types, else the family's default
    pattern; None for families with one kind of layer (Mistral, Phi-3)."""
    kind, n = hf.get("model_type"), hf.get("num_hidden_layers", 0)
    if hf.get("layer_types") or kind not in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "gemma2", "vaultgemma",
                                             "gemma3_text", "olmo3", "cohere2", "smollm3", "exaone4"):
        return hf.get("layer_types")
    pattern = hf.get("sliding_window_pattern")
    if isinstance(pattern, str):  # EXAONE 4: "LLLG", repeated from layer 0
        return ["full_attention" if pattern[i % len(pattern)] == "G" else "sliding_attention" for i in range(n)]
    if kind in ("gemma2", "vaultgemma"):
        return ["full_attention" if i % 2 else "sliding_attention" for i in range(n)]
    if kind in ("gemma3_text", "olmo3", "cohere2", "exaone4"):  # 5 (the others: 3) local layers to 1 global
        every = pattern or (6 if kind == "gemma3_text" else 4)
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    if kind == "smollm3":  # windows on the NoPE layers
        return ["sliding_attention" if i in nope_layers(hf) else "full_attention" for i in range(n)]
    return ["sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention" for i in range(n)]


def nope_layers(hf: dict) -> list:
    """The layers without rotary positions: SmolLM3's no_rope_layers zeros (every 4th by default), Cohere 2's
    global (full-attention) layers, and EXAONE 4's when it has windows."""
    kind, n = hf.get("model_type"), hf.get("num_hidden_layers", 0)
    if kind == "smollm3":
        flags = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                             for i in range(n)]
        return [i for i, rope in enumerate(flags) if not rope]
    if kind == "cohere2" or kind == "exaone4" and hf.get("sliding_window"):
        return [i for i, t in enumerate(layer_types(hf)) if t == "full_attention"]
    return []


def layer_ropes(hf: dict) -> Tuple[dict, Optional[float]]:
    """(the rope dict of the full-attention layers, the rotary base of the sliding-window ones or None): Gemma 3's
    and OLMo 3's rope_parameters hold one dict per layer type; the windowed layers' rope must be unscaled."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "sliding_attention" not in rope and "full_attention" not in rope:
        if hf.get("model_type") != "gemma3_text":
            return rope, None
        return rope, float(hf.get("rope_local_base_freq", 1e4))
    local = rope.get("sliding_attention") or {}
    if rope_scaling(local) is not None:
        raise CheckpointError("config.json: a scaled rope on the sliding-window layers is not supported")
    return rope.get("full_attention") or {}, float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))


def rope_scaling(rope: dict, hf: Optional[dict] = None) -> Optional[dict]:
    """GPTConfig.rope_scaling of an HF rope dict (rope_parameters / rope_scaling): None for the default rope. As
    transformers reads them: original_max_position_embeddings may sit at the top of ``hf`` (config.json; Phi-3's
    comes first there, as its config class always has one), and YaRN's and LongRoPE's missing factor is
    max_position_embeddings / original_max_position_embeddings. LongRoPE's generate re-runs the sequence with the
    long factors when it crosses the original context (``refill_cache``) in the families whose transformers models
    do (Phi-3); Llama's keeps the short factors' cache."""
    hf = hf or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"config.json: rope type {rope_type!r} is not supported by GPT.from_hf (default, "
                              f"{', '.join(ROPE_SCALING_KEYS)})")
    scaling = {"rope_type": rope_type, **{k: rope.get(k) for k in ROPE_SCALING_KEYS[rope_type]},
               **{k: rope[k] for k in ROPE_SCALING_OPTIONAL.get(rope_type, ()) if rope.get(k) is not None}}
    top, phi3 = hf.get("original_max_position_embeddings"), hf.get("model_type") == "phi3"
    if "original_max_position_embeddings" in scaling and (scaling["original_max_position_embeddings"] is None or
                                                           phi3 and top):
        scaling["original_max_position_embeddings"] = top
    if rope_type == "longrope":
        scaling["refill_cache"] = phi3
    if rope_type in ("yarn", "longrope") and scaling["factor"] is None and scaling["original_max_position_embeddings"]:
        scaling["factor"] = hf.get("max_position_embeddings", 0) / scaling["original_max_position_embeddings"]
    try:
        check_rope_scaling(scaling, "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return scaling
