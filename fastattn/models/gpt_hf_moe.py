"""GPT.from_hf for mixture-of-experts families on Llama-style attention: Mixtral, Qwen3-MoE, Qwen2-MoE (its
shared expert; models/moe.py), GraniteMoE (Granite's multipliers: gpt_hf._granite) and OLMoE (q / k norms over all
heads).

Their attention, norms and rotary positions are Llama's (Mistral's window, Qwen3's q / k norms), imported by
gpt_hf._from_llama; this file adds the config fields and each layer's router and experts. Checkpoints store one
tensor per expert and projection (Mixtral: ``block_sparse_moe.experts.E.w1 / w3 / w2``, Qwen3-MoE:
``mlp.experts.E.gate_proj / up_proj / down_proj``); a state dict saved from transformers 5's modules holds them
fused (``mlp.experts.gate_up_proj`` (E, 2F, d), ``mlp.experts.down_proj`` (E, d, F)): both are read. GraniteMoE's
files store them fused too (``block_sparse_moe.input_linear`` / ``output_linear``, the router in ``router.layer``).
Refused by name: Qwen-MoE's dense layers among the sparse ones (``mlp_only_layers``, ``decoder_sparse_step``) and
biased projections (Qwen2-MoE's q / k / v biases are read, as Qwen2's).
Mixtral's router jitter (training-time noise) is not applied (logged).
"""
import logging
from typing import Dict

import torch
from torch import Tensor

from .checkpoint import CheckpointError, KeyMap

log = logging.getLogger("fastattn")

MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "granitemoe", "olmoe")


def moe_config(hf: dict) -> dict:
    """GPTConfig fields of a Mixtral / Qwen3-MoE / Qwen2-MoE config.json (d_ff: an expert's width). The
    load-balancing loss is part of the loss where transformers adds it (output_router_logits true)."""
    fields = _moe_fields(hf)
    if hf.get("output_router_logits"):
        fields["router_aux_loss_coef"] = float(hf.get("router_aux_loss_coef", 0.001))
    return fields


def _moe_fields(hf: dict) -> dict:
    kind = hf.get("model_type")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"config.json: attention_bias / mlp_bias true is not supported for {kind}")
    if kind in ("qwen3_moe", "qwen2_moe", "olmoe"):
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise CheckpointError(f"config.json: mlp_only_layers={hf.get('mlp_only_layers')!r} / decoder_sparse_step="
                                  f"{hf.get('decoder_sparse_step')!r}: dense layers among the expert layers are not "
                                  "supported by GPT.from_hf (every layer a mixture of experts)")
        shared = hf.get("shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0
        return dict(n_experts=hf.get("num_experts") or hf["num_local_experts"],
                    n_experts_per_tok=hf["num_experts_per_tok"], moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
                    d_ff=hf.get("moe_intermediate_size") or hf["intermediate_size"], moe_shared_d_ff=shared or 0)
    if hf.get("router_jitter_noise"):
        log.warning("config.json: Mixtral's router_jitter_noise %s (training-time noise on the router's input) is "
                    "not applied by fastattn's MoE", hf["router_jitter_noise"])
    return dict(n_experts=hf["num_local_experts"], n_experts_per_tok=hf["num_experts_per_tok"], moe_norm_topk=True,
                d_ff=hf["intermediate_size"])


def moe_projections(m: KeyMap, h: str, b: str, cfg) -> Dict[str, Tensor]:
    """Layer h's router and experts as GPT's block b's (mlp.router.weight, mlp.experts.E.w_in / w_out)."""
    d, f, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    moe = f"{h}block_sparse_moe." if any(m.has(f"{h}block_sparse_moe.{k}.weight") for k in
                                         ("gate", "router", "router.layer")) else f"{h}mlp."
    if m.has(f"{moe}router.layer.weight"):  # GraniteMoE's files: router.layer, input_linear [gate | up], output_linear
        return {f"{b}mlp.router.weight": m.take(f"{moe}router.layer.weight", (E, d)),
                **_experts(m.take(f"{moe}input_linear.weight", (E, 2 * f, d)),
                           m.take(f"{moe}output_linear.weight", (E, d, f)), b)}
    sd = {f"{b}mlp.router.weight": m.take(f"{moe}router.weight" if m.has(f"{moe}router.weight") else
                                          f"{moe}gate.weight", (E, d))}
    fused = m.has(f"{moe}experts.gate_up_proj")
    if fused:
        sd.update(_experts(m.take(f"{moe}experts.gate_up_proj", (E, 2 * f, d)),
                           m.take(f"{moe}experts.down_proj", (E, d, f)), b))
    names = ("w1", "w3", "w2") if moe.endswith("block_sparse_moe.") else ("gate_proj", "up_proj", "down_proj")
    for e in range(0 if fused else E):
        x, ours = f"{moe}experts.{e}.", f"{b}mlp.experts.{e}."
        sd[f"{ours}w_in.weight"] = torch.cat([m.take(f"{x}{names[0]}.weight", (f, d)),
                                              m.take(f"{x}{names[1]}.weight", (f, d))])
        sd[f"{ours}w_out.weight"] = m.take(f"{x}{names[2]}.weight", (d, f))
    if cfg.moe_shared_d_ff:  # Qwen2-MoE's shared expert and its gate
        s, x = cfg.moe_shared_d_ff, f"{moe}shared_expert."
        sd[f"{b}mlp.shared.w_in.weight"] = torch.cat([m.take(f"{x}gate_proj.weight", (s, d)),
                                                      m.take(f"{x}up_proj.weight", (s, d))])
        sd[f"{b}mlp.shared.w_out.weight"] = m.take(f"{x}down_proj.weight", (d, s))
        sd[f"{b}mlp.shared_gate.weight"] = m.take(f"{moe}shared_expert_gate.weight", (1, d))
    return sd


def _experts(gate_up: Tensor, down: Tensor, b: str) -> Dict[str, Tensor]:
    """Fused expert tensors (E, 2F, d) [gate | up] and (E, d, F) as block b's experts' w_in / w_out."""
    return {k: v for e in range(len(gate_up)) for k, v in ((f"{b}mlp.experts.{e}.w_in.weight", gate_up[e]),
                                                           (f"{b}mlp.experts.{e}.w_out.weight", down[e]))}
