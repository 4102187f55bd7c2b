"""Fine-tuning modes (full, frozen, lora, prompt), LoRA merging, and the distillation loss.

    frozen  the backbone's parameters frozen (model.backbone_parameters()), the task heads trained
    lora    every nn.Linear of the backbone (attention wqkv / wq / wkv / wo, MLP w_in / w_out) gets a low-rank
            update W + (alpha / r) B A, B zero-initialised so training starts from the base model; only A and B train.
            ``merge`` folds B A into W and puts the plain nn.Linear back (what is exported)
    prompt  ``prompt_len`` learned vectors replace the embeddings of as many placeholder tokens put before the input
            (forward hooks on the model and its token embedding); only the soft prompt trains

An int8 base (``quantize_backbone``, train --int8-base: QLoRA-style) makes the backbone's Linears frozen Int8Linears
before any of these: adapters wrap them, and merging folds B A into their dequantized weight (a float nn.Linear).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.nn.quantized import Int8Linear


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float):  # base: an nn.Linear or an Int8Linear
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        base = float_linear(self.base) if isinstance(self.base, Int8Linear) else self.base
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            base.weight.add_(delta.to(base.weight.dtype))
        return base


def float_linear(layer: Int8Linear) -> nn.Linear:
    """The float32 nn.Linear an Int8Linear computes with: its dequantized weight, its bias."""
    w = layer.dequantized_weight()
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.train(layer.training).requires_grad_(False)


def quantize_backbone(model, mode: str):
    """The backbone's nn.Linears (every module but the heads, ``model.head_modules``) as frozen Int8Linears of
    ``mode`` (w8a16 or w8a8), in place: the int8 base of train --int8-base."""
    import fastattn
    heads = getattr(model, "head_modules", ())
    return fastattn.quantize(model, mode=mode, smoothquant_alpha=None, skip=list(heads))  # (each whole)


def dequantize_backbone(model):
    """Every Int8Linear of model back to the float nn.Linear it computes with (float_linear), in place."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int8Linear):
            _replace(model, name, float_linear(mod))
    return model


def _backbone_modules(model):
    heads = set(getattr(model, "head_modules", ()))
    for name, child in model.named_children():
        if name not in heads:
            yield name, child


def _replace(root, dotted, new):
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def add_lora(model, rank, alpha):
    for prefix, child in list(_backbone_modules(model)):
        for name, mod in list(child.named_modules()):
            if type(mod) in (nn.Linear, Int8Linear):
                _replace(model, f"{prefix}.{name}" if name else prefix, LoRALinear(mod, rank, alpha))
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_a.requires_grad_(True)
            m.lora_b.requires_grad_(True)
    return model


def merge(model, keep_int8: bool = False):
    """Fold every LoRA adapter into its Linear (in place; over an int8 base: into its dequantized weight, a float
    nn.Linear, unless ``keep_int8`` keeps those adapters as they trained); a model without adapters is left as it
    is."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear) and not (keep_int8 and isinstance(mod.base, Int8Linear)):
            _replace(model, name, mod.merged())
    return model


def _token_embedding(model):
    getter = getattr(model, "get_input_embeddings", None)
    if getter is not None:
        return getter()
    vocab = model.config.vocab_size
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == vocab:
            return m
    raise ValueError("--mode prompt: no token embedding found in this model")


def soft_prompt_len(model) -> int:
    """The length of the soft prompt add_soft_prompt gave model (0: none)."""
    prompt = getattr(model, "soft_prompt", None)
    return 0 if prompt is None else prompt.shape[0]


def add_soft_prompt(model, length, seed=0):
    emb = _token_embedding(model)
    g = torch.Generator().manual_seed(seed)
    init = emb.weight.detach()[torch.randint(0, emb.num_embeddings, (length,), generator=g)].clone()
    model.soft_prompt = nn.Parameter(init)
    model.requires_grad_(False)
    model.soft_prompt.requires_grad_(True)

    def before(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        B = ids.shape[0]
        kwargs = dict(kwargs)
        kwargs["input_ids"] = torch.cat([torch.zeros(B, length, dtype=ids.dtype, device=ids.device), ids], 1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([torch.ones(B, length, dtype=mask.dtype, device=mask.device),
                                                  mask], 1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:
            kwargs["token_type_ids"] = torch.cat([torch.zeros(B, length, dtype=tt.dtype, device=tt.device), tt], 1)
        return (), kwargs

    def after(mod, args, kwargs, out):
        if out.logits.dim() == 3 and kwargs.get("decoder_input_ids") is None:
            out.logits = out.logits[:, length:]
        return out

    def embed(mod, args, out):
        if out.shape[1] >= length:
            out = torch.cat([model.soft_prompt.to(out.dtype).expand(out.shape[0], -1, -1), out[:, length:]], 1)
        return out

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    emb.register_forward_hook(embed)
    return model


def freeze_backbone(model):
    params = model.backbone_parameters() if hasattr(model, "backbone_parameters") else []
    if not params:
        raise ValueError("--mode frozen: this model does not say which parameters are its backbone")
    for p in params:
        p.requires_grad_(False)
    return model


def set_dropout(model, p: float) -> None:
    """A loaded model's dropout probability (its config's, and each layer's copy of it) set to p."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = p


def apply(model, mode, lora_rank=8, lora_alpha=16.0, prompt_len=16, seed=0):
    if mode == "frozen":
        return freeze_backbone(model)
    if mode == "lora":
        return add_lora(model, lora_rank, lora_alpha)
    if mode == "prompt":
        return add_soft_prompt(model, prompt_len, seed)
    return model


def distill_loss(task_loss, student_logits, teacher_logits, alpha, temperature, positions=None):
    """(1 - alpha) * task loss + alpha * T^2 * KL(teacher || student) on logits softened by T (Hinton et al.),
    averaged over ``positions`` (a bool mask of the logits' leading shape: those the task loss scores; None: all).
    Padding, prompts and unmasked MLM tokens were averaged in, diluting the KL of the positions that count."""
    T = temperature
    s, t = student_logits.flatten(0, -2), teacher_logits.flatten(0, -2)
    if positions is not None:
        keep = positions.reshape(-1).to(s.device)
        s, t = s[keep], t[keep]
    s, t = (F.log_softmax(x.float() / T, -1) for x in (s, t))
    kl = F.kl_div(s, t, log_target=True, reduction="sum") / max(s.shape[0], 1) * T * T
    return (1 - alpha) * task_loss + alpha * kl
