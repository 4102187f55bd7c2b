"""``fastattn prune``: zero the least important attention heads and the smallest weights, permanently.

Head importance (per layer, per query head h): ||W_o[:, h]||_F * ||W_q[h]||_F, ranked over the whole model, the lowest
``--heads`` fraction removed (at least one head kept per layer); the head's output columns are zeroed (which removes it
exactly), and its query rows unless q is normalised over all heads (OLMo 2: zero rows would change every other head's
norm), through torch.nn.utils.prune masks, then made permanent (prune.remove). ``--unstructured``: global L1
magnitude pruning of every Linear weight (torch.nn.utils.prune.global_unstructured), made permanent. A Hugging Face
folder's generation_config.json comes along. Fine-tune afterwards with ``fastattn train --init OUT``."""
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune

from fastattn.cli import checkpoint as ckpt
from fastattn.cli.config import CLIError, check_new_folder, opt
from fastattn.cli.generation_args import carried


@dataclass
class PruneConfig:
    checkpoint: str = opt("runs/train", "checkpoint folder, or a run folder")
    out: Optional[str] = opt(None, "output folder (default: CHECKPOINT-pruned)")
    heads: float = opt(0.0, "fraction of attention heads to zero, least important first (their weights: "
                            "fine-tuning can train them again)")
    unstructured: float = opt(0.0, "fraction of Linear weights to zero (global magnitude)")

    def validate(self):
        for name in ("heads", "unstructured"):
            if not 0 <= getattr(self, name) < 1:
                raise CLIError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.heads and not self.unstructured:
            raise CLIError("nothing to prune: give --heads and/or --unstructured (fractions to remove)")


def head_importance(model):
    """[(score, attention module, head)] for every self-attention query head."""
    rows = []
    for m in model.modules():
        if hasattr(m, "wqkv") and hasattr(m, "wo") and hasattr(m, "n_head"):
            D = m.head_dim
            for h in range(m.n_head):
                q = m.wqkv.weight[h * D:(h + 1) * D]
                o = m.wo.weight[:, h * D:(h + 1) * D]
                rows.append((float(q.detach().norm() * o.detach().norm()), m, h))
    return rows


def prune_heads(model, frac):
    rows = head_importance(model)
    n = int(len(rows) * frac)
    per_layer = {}
    for _, m, _ in rows:
        per_layer[id(m)] = per_layer.get(id(m), 0) + 1
    removed = []
    for _score, m, h in sorted(rows, key=lambda r: r[0]):
        if len(removed) >= n:
            break
        if per_layer[id(m)] <= 1:
            continue
        per_layer[id(m)] -= 1
        removed.append((m, h))
    masks = {}
    for m, h in removed:
        D = m.head_dim
        om = masks.setdefault((id(m), "o"), (m.wo, torch.ones_like(m.wo.weight)))[1]
        om[:, h * D:(h + 1) * D] = 0
        if getattr(m, "qk_full", False):  # q normalised over all heads: its rows stay
            continue
        qm = masks.setdefault((id(m), "q"), (m.wqkv, torch.ones_like(m.wqkv.weight)))[1]
        qm[h * D:(h + 1) * D] = 0
        if m.wqkv.bias is not None:
            with torch.no_grad():
                m.wqkv.bias[h * D:(h + 1) * D] = 0
    for lin, mask in masks.values():
        prune.custom_from_mask(lin, "weight", mask)
        prune.remove(lin, "weight")
    return len(removed), len(rows)


def prune_unstructured(model, frac):
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    for m, _ in params:  # prune flattens with .view(-1): a weight that is a strided view is made contiguous
        m.weight.data = m.weight.data.contiguous()
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=frac)
    for m, name in params:
        prune.remove(m, name)
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return zeros / max(total, 1)


def main(cfg: PruneConfig) -> int:
    from fastattn.cli.loading import hf_model_type, load_model
    src = Path(cfg.checkpoint) if hf_model_type(cfg.checkpoint) else ckpt.resolve(cfg.checkpoint)
    out = Path(cfg.out or f"{str(src).rstrip('/')}-pruned")
    check_new_folder(out)
    model, state, tok = load_model(src, purpose="prune")
    removed = total = 0
    if cfg.heads:
        removed, total = prune_heads(model, cfg.heads)
    sparsity = prune_unstructured(model, cfg.unstructured) if cfg.unstructured else None
    cfg_dict = model.config.to_dict()
    meta = {**state, "pruned": {"heads_removed": removed, "heads": total, "linear_sparsity": sparsity}}
    tcfg = meta["train_config"] = dict(state.get("train_config", {}))
    tcfg["mode"] = "prompt" if tcfg.get("mode") == "prompt" else "full"  # the soft prompt is saved; LoRA was merged
    files = {"model.safetensors": lambda p: ckpt.save_weights(model, p),
             "config.json": lambda p: p.write_text(json.dumps(cfg_dict, indent=2)),
             "train_state.json": lambda p: p.write_text(json.dumps(meta, indent=2)),
             "tokenizer.json": lambda p: tok.save(p),  # src may be a Hugging Face folder: fastattn's format
             **carried(src)}  # and its generation settings
    ckpt.write_folder(out, files)
    print(json.dumps({"out": str(out), **meta["pruned"]}, indent=2))
    print(f"removed {removed} of {total} heads; Linear sparsity {sparsity}", file=sys.stderr)
    return 0
