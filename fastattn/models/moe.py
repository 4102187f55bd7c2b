"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE): a router scores ``n_experts`` MLPs per token, the
``n_experts_per_tok`` best run, and their outputs are summed weighted by the router's softmax probabilities
(renormalised over the chosen experts when ``moe_norm_topk``, Mixtral's rule; Qwen3-MoE's ``norm_topk_prob``).
Qwen2-MoE adds a shared expert (``moe_shared_d_ff`` units) that every token runs, scaled by a sigmoid gate.

Each expert is the model's own ``MLP`` (its ``mlp`` kind: SwiGLU for both families), so int8 quantization, LoRA,
pruning and FSDP treat the experts' Linears as any other; the router is not an nn.Linear, so quantization leaves it in
float (a rounded router would send tokens elsewhere). Tokens are grouped per expert (a sort of the token-expert
pairs) and each expert runs once on its rows, in expert order as transformers' loop; an expert no token chose is
skipped (in training it runs on no rows, so that its zero gradients exist: DDP and FSDP reduce every parameter's
on every rank). One token without autograd (a decode step) runs its k experts directly, in the same order. The softmax
runs in float32 for 16-bit models (as transformers'), in the model's dtype otherwise.

In training a GPT adds ``router_aux_loss_coef`` x ``load_balancing_loss`` (transformers' Mixtral's) to its loss
when that is > 0 (the CLI's default 0.01; from_hf keeps a folder's where transformers would add it), and tensor
parallelism refuses these models; the bound decode step (models/decode_step.py) calls this module with each
expert's Linears bound for the rows routed to it (fastattn.ops.gemv's kernel for float32 on the CPU).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    """(n_experts, d_model) scores, bias-free; not an nn.Linear (see the module docstring)."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.renormalize = cfg.n_experts_per_tok, cfg.moe_norm_topk
        self.router = Router(cfg.d_model, cfg.n_experts)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        self.collect: Optional[List[Tensor]] = None  # set by the model for a pass that needs the router logits
        if cfg.moe_shared_d_ff:  # Qwen2-MoE: every token also runs this one, scaled by sigmoid(shared_gate(x))
            self.shared = MLP(dataclasses.replace(cfg, d_ff=cfg.moe_shared_d_ff, n_experts=0, moe_shared_d_ff=0,
                                                  router_aux_loss_coef=0.0))
            self.shared_gate = Router(cfg.d_model, 1)

    def route(self, x: Tensor):
        """(weights (N, k) float32 or wider, expert ids (N, k)) for the tokens x (N, d)."""
        logits = self.router(x)
        if self.collect is not None:
            self.collect.append(logits)
        wide = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        weights, ids = torch.topk(wide.softmax(-1), self.k, -1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, ids

    def forward(self, x: Tensor, expert: Optional[Callable[[int, Tensor], Tensor]] = None) -> Tensor:
        """x (..., d) -> (..., d). ``expert(e, rows)``: expert e on its rows (N_e, d), the module itself when None
        (the bound decode step passes its kernels)."""
        shape = x.shape
        out = self.routed(x.reshape(-1, shape[-1]), expert or (lambda e, rows: self.experts[e](rows)))
        if hasattr(self, "shared"):
            x = x.reshape(-1, shape[-1])
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.view(shape)

    def routed(self, x: Tensor, expert: Callable[[int, Tensor], Tensor]) -> Tensor:
        """The routed experts' weighted sum for the tokens x (N, d)."""
        weights, ids = self.route(x)
        if x.shape[0] == 1 and not torch.is_grad_enabled():  # one token (decoding): its k experts, in expert order
            out = None
            for w, e in sorted(zip(weights[0].tolist(), ids[0].tolist()), key=lambda p: p[1]):
                y = (expert(e, x) * w).to(x.dtype)
                out = y if out is None else out + y
            return out
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # the token-expert pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        unused = None
        for e, n in enumerate(counts):
            if n:
                pairs = order[start:start + n]
                rows = pairs // self.k
                y = expert(e, x[rows]) * weights.flatten()[pairs].unsqueeze(-1)
                out.index_add_(0, rows, y.to(out.dtype))
                start += n
            elif torch.is_grad_enabled():  # on no rows: zero gradients, but in the graph (DDP reduces every one)
                zero = expert(e, x[:0]).sum()
                unused = zero if unused is None else unused + zero
        return out if unused is None else out + unused


def load_balancing_loss(router_logits: List[Tensor], k: int, keep: Optional[Tensor] = None) -> Tensor:
    """The Switch Transformer's auxiliary loss as transformers' Mixtral computes it, over every layer's router logits
    (N, E): E * sum_e (the fraction of top-k assignments to e) * (e's mean router probability); ``keep`` (B, L) bool
    with N = B * L: padding counts for neither. Its gradient pushes the router towards even loads."""
    E = router_logits[0].shape[-1]
    w = None if keep is None else keep.reshape(-1).float()
    counts = router_logits[0].new_zeros(E, dtype=torch.float32)
    probs_sum, rows = torch.zeros_like(counts), 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        ids = torch.topk(probs, k, -1).indices
        ones = torch.ones(ids.numel(), device=ids.device) if w is None else w.repeat_interleave(k)
        counts = counts + torch.zeros_like(counts).scatter_add_(0, ids.reshape(-1), ones)
        probs_sum = probs_sum + (probs if w is None else probs * w[:, None]).sum(0)
        rows = rows + (probs.shape[0] if w is None else w.sum())
    return (counts / rows * (probs_sum / rows)).sum() * E
