"""GPT.from_hf's importers for the families whose attention and MLP run in parallel (``parallel_block``), often with
rotary positions on part of each head (``rotary_dim``): GPT-NeoX / Pythia, Phi-1 / 1.5 / 2, Falcon (their sequential
variants too; Falcon-RW's ALiBi) and GPT-J. Whatever a checkpoint sets that GPT cannot reproduce exactly is refused
with a CheckpointError naming the setting."""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import CheckpointError, KeyMap, hf_get
from .gpt import GPTConfig
from .positions import alibi_slopes

ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "relu2": "relu2"}


def rotary(hf: dict, head_dim: int) -> Tuple[float, Optional[int]]:
    """(rope_theta, rotary_dim or None for all of head_dim) from transformers 5's rope_parameters or the older
    top-level keys (GPT-NeoX's rotary_pct / rotary_emb_base)."""
    rope = hf.get("rope_parameters") or {}
    theta = hf_get(rope, "rope_theta", default=hf_get(hf, "rope_theta", "rotary_emb_base", default=1e4))
    partial = hf_get(rope, "partial_rotary_factor", default=hf_get(hf, "partial_rotary_factor", "rotary_pct",
                                                                   default=1.0))
    rot = int(head_dim * partial)
    if rot < 2 or rot % 2:
        raise CheckpointError(f"config.json: partial_rotary_factor {partial} gives {rot} rotary channels of "
                              f"{head_dim}; an even number >= 2 is supported")
    return float(theta), None if rot == head_dim else rot


def _layout(hf: dict) -> dict:
    """Per family: heads, fused q / k / v layout, block kind, key names, norms and biases."""
    kind, d, H = hf.get("model_type"), hf["hidden_size"], hf["num_attention_heads"]
    if kind == "gpt_neox":
        return dict(Hk=H, qkv="per_head", parallel="two_norms" if hf.get("use_parallel_residual", True) else None,
                    act=hf.get("hidden_act", "gelu"), d_ff=hf["intermediate_size"], eps=hf.get("layer_norm_eps", 1e-5),
                    bias=True, norm_bias=None, head_bias=False, tie=hf.get("tie_word_embeddings", False),
                    prefix="gpt_neox.", emb="embed_in", final="final_layer_norm", head="embed_out",
                    names={"attn.wqkv": "attention.query_key_value", "attn.wo": "attention.dense",
                           "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h",
                           "norm1": "input_layernorm", "norm2": "post_attention_layernorm"},
                    refuse=(("attention_bias", True),))
    if kind == "phi":
        return dict(Hk=hf.get("num_key_value_heads") or H, qkv="separate", parallel="one_norm",
                    act=hf.get("hidden_act", "gelu_new"), d_ff=hf["intermediate_size"],
                    eps=hf.get("layer_norm_eps", 1e-5), bias=True, norm_bias=None, head_bias=True,
                    tie=hf.get("tie_word_embeddings", False), prefix="model.", emb="embed_tokens",
                    final="final_layernorm", head="lm_head",
                    names={"attn.wo": "self_attn.dense", "mlp.w_in": "mlp.fc1", "mlp.w_out": "mlp.fc2",
                           "norm1": "input_layernorm"},
                    refuse=(("qk_layernorm", False),))
    new = bool(hf.get("new_decoder_architecture"))  # Falcon
    two = new and hf.get("num_ln_in_parallel_attn") in (None, 2)
    parallel = "two_norms" if two else "one_norm" if new or hf.get("parallel_attn", True) else None
    names = {"attn.wqkv": "self_attention.query_key_value", "attn.wo": "self_attention.dense",
             "mlp.w_in": "mlp.dense_h_to_4h", "mlp.w_out": "mlp.dense_4h_to_h",
             "norm1": "ln_attn" if two else "input_layernorm"}
    if parallel != "one_norm":
        names["norm2"] = "ln_mlp" if two else "post_attention_layernorm"
    return dict(Hk=hf.get("num_kv_heads") or H if new else 1 if hf.get("multi_query", True) else H,
                qkv="grouped" if new else "separate" if hf.get("multi_query", True) else "per_head",
                parallel=parallel, act=hf.get("activation", "gelu"), d_ff=hf.get("ffn_hidden_size") or 4 * d,
                eps=hf.get("layer_norm_epsilon", 1e-5), bias=bool(hf.get("bias", False)), norm_bias=True,
                head_bias=False, tie=hf.get("tie_word_embeddings", True), prefix="transformer.",
                emb="word_embeddings", final="ln_f", head="lm_head", names=names, refuse=())


def reorder_qkv(w: Tensor, kind: str, H: int, Hk: int, D: int) -> Tensor:
    """A fused q / k / v weight (rows first) or bias in our [q heads | k heads | v heads] order: "per_head" rows
    (H, 3, D) (GPT-NeoX, Falcon-RW); "grouped" (Hk, H / Hk + 2, D): each group's queries, then its key and value
    (Falcon's new decoder architecture); "separate" is ours already (Falcon-7B's multi-query)."""
    rest = w.shape[1:]
    if kind == "per_head":
        return w.reshape(H, 3, D, *rest).transpose(0, 1).reshape(w.shape)
    if kind == "grouped":
        g = w.reshape(Hk, H // Hk + 2, D, *rest)
        return torch.cat([g[:, :-2].reshape(H * D, *rest), g[:, -2].reshape(Hk * D, *rest),
                          g[:, -1].reshape(Hk * D, *rest)])
    return w


def from_parallel(hf: dict, state):
    kind, lay = hf.get("model_type"), _layout(hf)
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise CheckpointError(f"config.json: rope scaling is not supported by GPT.from_hf for {kind} (plain rotary "
                              "positions)")
    for key, want in lay["refuse"]:
        if hf.get(key, want) != want:
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported by GPT.from_hf")
    if lay["act"] not in ACT:
        raise CheckpointError(f"config.json: activation {lay['act']!r} is not supported ({sorted(ACT)})")
    d, H, Hk = hf["hidden_size"], hf["num_attention_heads"], lay["Hk"]
    if kind == "falcon" and hf.get("alibi"):  # (Falcon-RW) its ALiBi: BLOOM's slopes in bfloat16, / sqrt(head dim)
        pos = dict(pos="alibi", alibi_slopes=(alibi_slopes(H).bfloat16().float() * (d // H) ** -0.5).tolist())
    else:
        theta, rot = rotary(hf, d // H)
        pos = dict(pos="rotary", rope_theta=theta, rotary_dim=rot)
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=Hk,
                    d_ff=lay["d_ff"], max_seq_len=hf.get("max_position_embeddings", 2048), norm="layernorm",
                    norm_eps=lay["eps"], norm_first=True, mlp="gelu", activation=ACT[lay["act"]], **pos,
                    tie_embeddings=lay["tie"], bias=lay["bias"], norm_bias=lay["norm_bias"],
                    parallel_block=lay["parallel"], lm_head_bias=lay["head_bias"])
    D, f, m = cfg.head_dim, cfg.d_ff, KeyMap(state, (lay["prefix"], ""))
    shapes = {"attn.wqkv": ((H + 2 * Hk) * D, d), "attn.wo": (d, H * D), "mlp.w_in": (f, d), "mlp.w_out": (d, f),
              "norm1": (d,), "norm2": (d,)}
    sd: Dict[str, Tensor] = {"tok_emb.weight": m.take(f"{lay['emb']}.weight", (cfg.vocab_size, d))}
    for p in ("weight",) + (("bias",) if cfg.bias or lay["norm_bias"] else ()):
        shape = (lambda s: s) if p == "weight" else (lambda s: s[:1])
        sd[f"norm_f.{p}"] = m.take(f"{lay['final']}.{p}", (d,))
        for i in range(cfg.n_layer):
            h, b = f"layers.{i}." if kind == "gpt_neox" or kind == "phi" else f"h.{i}.", f"blocks.{i}."
            for ours, theirs in lay["names"].items():
                if p == "bias" and not ours.startswith("norm") and not cfg.bias:
                    continue
                t = m.take(f"{h}{theirs}.{p}", shape(shapes[ours]))
                sd[f"{b}{ours}.{p}"] = reorder_qkv(t, lay["qkv"], H, Hk, D) if ours == "attn.wqkv" else t
            if lay["qkv"] == "separate" and "attn.wqkv" not in lay["names"]:  # Phi: q, k, v apart
                sd[f"{b}attn.wqkv.{p}"] = torch.cat([m.take(f"{h}self_attn.{x}_proj.{p}", shape((n * D, d)))
                                                      for x, n in (("q", H), ("k", Hk), ("v", Hk))])
    top = KeyMap(state)
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else top.take(f"{lay['head']}.weight",
                                                                                    (cfg.vocab_size, d))
    if cfg.lm_head_bias:
        sd["lm_head.bias"] = top.take(f"{lay['head']}.bias", (cfg.vocab_size,))
    return cfg, sd


def pair_rows(heads: int, D: int, rot: int) -> Tensor:
    """Row order that turns q / k projections rotated in interleaved pairs (x0, x1), (x2, x3), ... on the first
    ``rot`` channels of each head (GPT-J, Cohere) into ours, (x_i, x_{i + rot/2}): each head's even channels first.
    Applied to both q and k, it leaves q . k unchanged."""
    perm = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, D)])
    return (torch.arange(heads)[:, None] * D + perm).flatten()


def from_gptj(hf: dict, state):
    """GPT-J: one norm for attention and MLP, rotary positions on ``rotary_dim`` channels of each head rotated in
    interleaved pairs, permuted into ours (pair_rows). No attention biases
    (out_proj's is zero here), biased MLP and LM head."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ACT:
        raise CheckpointError(f"config.json: activation_function {act!r} is not supported ({sorted(ACT)})")
    d, H, n = hf["n_embd"], hf["n_head"], hf["n_layer"]
    D = d // H
    rot = hf.get("rotary_dim") or D
    if rot % 2 or not 2 <= rot <= D:
        raise CheckpointError(f"config.json: rotary_dim {rot} (head dim {D}): an even number from 2 to {D} is "
                              "supported")
    cfg = GPTConfig(vocab_size=hf["vocab_size"], d_model=d, n_layer=n, n_head=H, d_ff=hf.get("n_inner") or 4 * d,
                    max_seq_len=hf.get("n_positions", 2048), norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", activation=ACT[act], pos="rotary",
                    rope_theta=1e4, rotary_dim=None if rot == D else rot,
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bias=True, qkv_bias=False,
                    parallel_block="one_norm", lm_head_bias=True)
    f, m = cfg.d_ff, KeyMap(state, ("transformer.", ""))
    rows = pair_rows(H, D, rot)
    sd: Dict[str, Tensor] = {"tok_emb.weight": m.take("wte.weight", (cfg.vocab_size, d)),
                             "norm_f.weight": m.take("ln_f.weight", (d,)), "norm_f.bias": m.take("ln_f.bias", (d,))}
    for i in range(n):
        h, b = f"h.{i}.", f"blocks.{i}."
        q, k, v = (m.take(f"{h}attn.{x}_proj.weight", (d, d)) for x in "qkv")
        sd[f"{b}attn.wqkv.weight"] = torch.cat([q[rows], k[rows], v])
        sd[f"{b}attn.wo.weight"] = m.take(f"{h}attn.out_proj.weight", (d, d))
        sd[f"{b}attn.wo.bias"] = torch.zeros(d, dtype=q.dtype)
        for ours, theirs, shape in (("mlp.w_in", "mlp.fc_in", (f, d)), ("mlp.w_out", "mlp.fc_out", (d, f)),
                                    ("norm1", "ln_1", (d,))):
            sd[f"{b}{ours}.weight"] = m.take(f"{h}{theirs}.weight", shape)
            sd[f"{b}{ours}.bias"] = m.take(f"{h}{theirs}.bias", shape[:1])
    top = KeyMap(state)
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else top.take("lm_head.weight",
                                                                                    (cfg.vocab_size, d))
    sd["lm_head.bias"] = top.take("lm_head.bias", (cfg.vocab_size,))
    return cfg, sd

