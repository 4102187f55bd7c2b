"""``fastattn train``: pre-train or fine-tune a model of fastattn.models on the embedded corpus or your files."""
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from fastattn.cli import checkpoint as ckpt
from fastattn.cli import finetune
from fastattn.cli.config import CLIError, check_new_folder, check_seed, opt
from fastattn.cli.generation_args import carried
from fastattn.cli.loading import (DEFAULT_SEQ_LEN, check_importable, checkpoint_tokenizer, hf_model_type, load_model,
                                  load_tokenizer, pick_device)
from fastattn.cli.models import TASK_ARCH, build_config, check_task, model_class
from fastattn.cli.tasks import TASKS, LossTotal, for_model, perplexity, take_rows


@dataclass
class TrainConfig:
    task: str = opt("clm", "what to train: clm (GPT), mlm (BERT), seq2seq (denoising), classify (labelled data)",
                    choices=list(TASKS))
    data: List[str] = opt([], "your .txt / .jsonl files or folders (classify: one .jsonl / .csv with text, label; "
                              "clm, seq2seq: or .jsonl / .csv of source, target pairs); default: the embedded "
                              "corpus")
    out: str = opt("runs/train", "run folder: checkpoints, metrics.jsonl, loss.png, model/ (the final model)")
    tokenizer: str = opt("bpe", "bpe (the embedded 4096-id byte-level BPE), bytes (plain bytes), a tokenizer "
                                ".json, or hf (the --init-hf folder's own tokenizer.json: the default there when "
                                "the folder has one); with --init the checkpoint's own unless another is named")
    arch: Optional[str] = opt(None, "model class (default: GPT for clm, BERT for mlm/classify, Seq2Seq for seq2seq)")
    d_model: int = opt(256, "model width")
    n_layer: int = opt(4, "layers (per stack)")
    n_head: int = opt(4, "attention heads")
    n_kv_head: Optional[int] = opt(None, "key/value heads (GQA; default n_head)")
    d_ff: Optional[int] = opt(None, "MLP width (default 4 x d_model)")
    seq_len: int = opt(DEFAULT_SEQ_LEN, "tokens per training sequence")
    dropout: float = opt(0.0, "dropout")
    norm: str = opt("layernorm", "layernorm or rmsnorm", choices=["layernorm", "rmsnorm"])
    pos: str = opt("learned", "positions", choices=["learned", "sinusoidal", "rotary", "none"])
    mlp: str = opt("gelu", "MLP kind", choices=["gelu", "swiglu"])
    n_experts: int = opt(0, "a mixture of this many experts in place of each MLP (each of --d-ff units); 0: dense")
    experts_per_tok: int = opt(2, "experts each token runs (with --n-experts)")
    router_aux_loss_coef: float = opt(0.01, "a mixture of experts' load-balancing loss, this much of it added to the "
                                            "training loss (0: off)")
    model_backend: str = opt("fastattn", "model layers on fastattn's kernels or on torch's (A/B runs)",
                             choices=["fastattn", "torch"])
    steps: int = opt(1000, "optimizer steps")
    max_time: float = opt(0.0, "stop (with a checkpoint) after this many seconds of training; 0: no limit")
    batch_size: int = opt(16, "sequences per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)")
    warmup: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (2-D weights only)")
    clip: float = opt(1.0, "gradient-norm clipping; 0: off")
    precision: str = opt("fp32", "fp32, bf16 (autocast; CPU too) or fp16 (autocast + GradScaler, GPU)",
                         choices=["fp32", "bf16", "fp16"])
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    eval_every: int = opt(100, "evaluate on held-out data every N steps (and at the end); 0: only at the end")
    eval_batches: int = opt(8, "held-out batches per evaluation, at most (each row once)")
    ckpt_every: int = opt(200, "checkpoint every N steps (and at the end); 0: only at the end")
    keep: int = opt(3, "checkpoints kept")
    resume: bool = opt(False, "continue the run in --out from its newest valid checkpoint")
    init: Optional[str] = opt(None, "start from this fastattn checkpoint (or run folder)")
    init_hf: Optional[str] = opt(None, "start from a local Hugging Face folder (a model_type GPT / BERT / "
                                       "Seq2Seq.from_hf reads: GPT-2, Llama, Qwen, Gemma, OLMo, BERT, RoBERTa, BART, "
                                       "Marian, NLLB, T5, ... ; the README lists them)")
    chat: bool = opt(False, "clm on source / target pairs: each source as a user turn of the tokenizer's chat template "
                            "(an instruct model's), the target as the reply")
    pack: bool = opt(False, "clm / seq2seq on source / target pairs: training rows of --seq-len tokens, several "
                            "examples each, no padding (each example attends only within itself)")
    mode: str = opt("full", "fine-tuning: full, frozen (heads only), lora (adapters), prompt (soft prompt)",
                    choices=["full", "frozen", "lora", "prompt"])
    lora_rank: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA scale numerator (scale = alpha / rank)")
    prompt_len: int = opt(16, "soft-prompt length (--mode prompt)")
    nsp: bool = opt(False, "mlm: add next-sentence prediction")
    mask_prob: float = opt(0.15, "mlm: fraction of tokens masked (seq2seq masks twice as many, in spans)")
    num_labels: Optional[int] = opt(None, "classify: number of labels (default: found in the data)")
    val_fraction: float = opt(0.02, "held-out fraction of the documents")
    max_data_tokens: Optional[int] = opt(None, "read at most this many tokens of the data")
    seed: int = opt(0, "random seed (weights, data order, dropout)")
    log_every: int = opt(10, "progress line every N steps")
    peak_tflops: float = opt(0.0, "peak TFLOP/s for the MFU column (default: a guess for this device)")
    teacher: Optional[str] = opt(None, "distill from this checkpoint (same tokenizer)")
    distill_alpha: float = opt(0.5, "weight of the distillation loss (KL on softened logits)")
    temperature: float = opt(2.0, "distillation temperature")
    qat: bool = opt(False, "quantization-aware training (fastattn.prepare_qat), converted to int8 on export")
    int8_base: Optional[str] = opt(None, "QLoRA-style: the backbone's Linears frozen as int8 (w8a16 or w8a8) under "
                                         "--mode lora, frozen or prompt; exported dequantized (LoRA merged in)",
                                   choices=["w8a16", "w8a8"])
    fsdp: bool = opt(False, "under torchrun: shard parameters with FSDP (fully_shard) instead of DDP")
    tp: int = opt(1, "under torchrun: tensor-parallel degree over the attention / MLP projections")
    grad_checkpointing: bool = opt(False, "activation checkpointing: each block's activations recomputed in the "
                                          "backward instead of kept (less memory, about a third more compute)")
    compile: bool = opt(False, "torch.compile the model (the first steps of training and of evaluation are slower "
                               "while it compiles)")
    compile_backend: str = opt("inductor", "torch.compile backend for --compile (inductor, aot_eager, eager, ...)")
    step_delay: float = opt(0.0, "sleep this long after each step (for tests of interruption)")

    def validate(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "keep", "eval_batches", "log_every", "tp",
                     "lora_rank", "prompt_len"):
            if getattr(self, name) < 1:
                raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "warmup", "ckpt_every", "eval_every", "max_time", "weight_decay", "clip", "peak_tflops",
                     "step_delay"):
            if getattr(self, name) < 0:
                raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "distill_alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise CLIError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.mask_prob <= 1:
            raise CLIError(f"--mask-prob must be in (0, 1], got {self.mask_prob}")
        if self.temperature <= 0:
            raise CLIError(f"--temperature (distillation) must be > 0, got {self.temperature}")
        if self.max_data_tokens is not None and self.max_data_tokens < 1:
            raise CLIError(f"--max-data-tokens must be at least 1 (leave it out for all), got {self.max_data_tokens}")
        check_seed(self.seed)
        if self.num_labels is not None and self.num_labels < 2:
            raise CLIError(f"--num-labels must be at least 2, got {self.num_labels}")
        check_task(self.arch, self.task, f"--arch {self.arch}")
        if self.init and self.init_hf:
            raise CLIError("give --init or --init-hf, not both")
        if self.chat and self.task != "clm":
            raise CLIError(f"--chat formats the clm task's source / target pairs, not --task {self.task}")
        if self.pack and self.task not in ("clm", "seq2seq"):
            raise CLIError(f"--pack packs the clm and seq2seq tasks' source / target pairs, not --task {self.task}")
        if self.int8_base and (self.mode == "full" or self.qat):
            raise CLIError(f"--int8-base freezes the backbone's Linears as int8: train them with --mode lora, frozen "
                           f"or prompt (--mode {self.mode}{' --qat' if self.qat else ''} trains them)")
        if self.int8_base and (self.fsdp or self.tp > 1):
            raise CLIError(f"--int8-base with {'--fsdp' if self.fsdp else '--tp'}: int8 layers are not sharded; "
                           "use data parallelism (torchrun without --fsdp / --tp)")
        if self.pack and self.mode == "prompt":
            raise CLIError("--pack with --mode prompt: a soft prompt would sit in front of a whole row of examples")
        if self.tokenizer == "hf" and not self.init_hf:
            raise CLIError("--tokenizer hf reads the --init-hf folder's tokenizer.json: give --init-hf")
        if not 0 < self.val_fraction < 1:
            raise CLIError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.compile:  # torch itself names an unknown backend only at the first call, deep in a traceback
            from torch._dynamo import list_backends
            if self.compile_backend not in set(list_backends(exclude_tags=())) | {"inductor"}:
                known = ", ".join(sorted(set(list_backends()) | {"inductor", "aot_eager", "eager"}))
                raise CLIError(f"--compile-backend {self.compile_backend!r} is not a torch.compile backend (e.g. "
                               f"{known})")


PATH_KEYS = ("data", "init", "init_hf", "teacher")  # recorded absolute: eval / quantize / prune of the run, from any
# folder, read the files it was trained on


def absolute_paths(key: str, value):
    """A train option's value as a run records it: the paths of PATH_KEYS absolute (resolved against the cwd)."""
    if key not in PATH_KEYS or not value:
        return value
    if isinstance(value, (list, tuple)):
        return [str(Path(p).resolve()) for p in value]
    return str(Path(value).resolve())


# options that define the model, its tokens or its data stream: --resume refuses to change them
RESUME_FIXED = ("task", "arch", "tokenizer", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "norm", "pos",
                "mlp", "n_experts", "experts_per_tok", "mode", "lora_rank", "lora_alpha", "prompt_len", "nsp",
                "num_labels", "qat", "int8_base", "data", "seq_len", "chat", "max_data_tokens", "val_fraction", "init",
                "init_hf")


TASK_SPECIALS = {"mlm": ("mask", "cls", "sep"), "classify": ("cls",)}  # seq2seq: a mask, or T5's sentinels (its task)


def model_fields(cfg, vocab_size, pad_id=None, eos_id=None):
    return {"vocab_size": vocab_size, "d_model": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head, "d_ff": cfg.d_ff, "max_seq_len": cfg.seq_len + cfg.prompt_len + 8,
            "dropout": cfg.dropout, "norm": cfg.norm, "pos": cfg.pos, "mlp": cfg.mlp, "backend": cfg.model_backend,
            "n_experts": cfg.n_experts, "n_experts_per_tok": cfg.experts_per_tok if cfg.n_experts else None,
            "num_labels": cfg.num_labels, "pad_token_id": pad_id, "decoder_start_token_id": eos_id,
            "eos_token_id": eos_id}


# the options that shape a model (-> its config field): with --init / --init-hf the checkpoint decides them
INIT_SHAPE = {"d_model": "d_model", "n_layer": "n_layer", "n_head": "n_head", "n_kv_head": "n_kv_head", "d_ff": "d_ff",
              "norm": "norm", "pos": "pos", "mlp": "mlp", "n_experts": "n_experts",
              "experts_per_tok": "n_experts_per_tok"}


def configure_optimizer(model, cfg, device):
    """AdamW; weight decay on 2-D weights only; fused when this torch/device has it."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kinds = {type(p).__name__ == "DTensor" for p in params}
    if len(kinds) > 1:  # tensor parallel: DTensor and plain parameters together, which the multi-tensor kernels refuse
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), foreach=False)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))


def peak_flops(cfg, device):
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = cfg.precision != "fp32"
        for key, (lo, hi) in {"H100": (495e12, 989e12), "H200": (495e12, 989e12), "A100": (156e12, 312e12)}.items():
            if key in name:
                return hi if bf16 else lo
        return 100e12
    # 2 FMA units x (16 AVX-512 | 8 AVX2 | 4 SSE) fp32 lanes x 2 flops per cycle, at a guessed ~2.5 GHz
    per_cycle = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability(), 16)
    return torch.get_num_threads() * 2.5e9 * per_cycle


class Progress:
    """One line per log step: on a terminal redrawn in place (a progress bar), else appended (logs)."""

    def __init__(self, total, enabled=True):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()

    def update(self, step, text):
        if not self.enabled:
            return
        if self.tty:
            frac = step / self.total
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            sys.stderr.write(f"\r[{bar}] {step}/{self.total} {text}   ")
        else:
            sys.stderr.write(f"step {step}/{self.total} {text}\n")
        sys.stderr.flush()

    def line(self, text):
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + text + "\n")
            sys.stderr.flush()


def plot_metrics(run_dir):
    """loss.png from metrics.jsonl: training loss and held-out loss against steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = [], []
    for m in _metric_rows(Path(run_dir) / "metrics.jsonl"):
        if "loss" in m:
            train.append((m["step"], m["loss"]))
        if "val_loss" in m:
            val.append((m["step"], m["val_loss"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(run_dir).name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, dist=None):
        from fastattn.cli import distributed
        self.cfg = cfg
        self.dist = dist or distributed.Single()
        self.rank0 = self.dist.rank == 0
        self.device = self.dist.device if self.dist.world > 1 else pick_device(cfg.device)
        self.run_dir = Path(cfg.out)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise CLIError(f"--out {self.run_dir}: a file, not a folder")
        if not self.run_dir.exists():
            check_new_folder(self.run_dir)
        existing = ckpt.list_checkpoints(self.run_dir)
        if existing and not cfg.resume:
            raise CLIError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                           "or a new --out")
        if cfg.resume and not existing:
            raise CLIError(f"--resume: no checkpoint in {self.run_dir}")
        others = sorted(p.name for p in self.run_dir.iterdir() if not _run_file(p.name)) \
            if not existing and self.run_dir.is_dir() else []
        if others:
            raise CLIError(f"--out {self.run_dir}: the folder holds files but no checkpoint ({', '.join(others[:3])}"
                           f"{' ...' if len(others) > 3 else ''}): choose a new --out (nothing there is overwritten)")
        if existing:
            self._check_resume_options(existing[0])
        self.dist.barrier()  # every rank has looked at --out before rank 0 writes to it
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise CLIError("--precision fp16 needs a CUDA device (use bf16 on CPU)")
        torch.manual_seed(cfg.seed)
        for what, path in (("--init", cfg.init), ("--init-hf", cfg.init_hf)):
            if path:
                check_importable(path, what)
        # --init: the checkpoint's own tokenizer, unless --tokenizer names another (an HF folder is refused below)
        self.tok_from_init = bool(cfg.init) and cfg.tokenizer == "bpe" and not hf_model_type(cfg.init)
        if self.tok_from_init:
            self.tok = checkpoint_tokenizer(cfg.init)
        else:
            self.tok = load_tokenizer(cfg.tokenizer, cfg.init_hf)
        for role in TASK_SPECIALS.get(cfg.task, ()):  # a Hugging Face tokenizer may lack them (GPT-2: no mask)
            try:
                getattr(self.tok, f"{role}_id")
            except ValueError as e:
                raise CLIError(f"--task {cfg.task}: {e}") from None
        self.task = self._make_task()
        self.model = self._build_model().to(self.device)
        for_model(self.task, self.model)  # (a seq2seq decoder starts at the model's start token, as generate does)
        self.arch = type(self.model).__name__
        self._check_fits(self.model, "the model")
        self.teacher = None
        if cfg.teacher:
            self.teacher, _, ttok = load_model(cfg.teacher, map_location=self.device)
            if ttok.vocab_size != self.tok.vocab_size:
                raise CLIError("--teacher: its tokenizer differs from this run's")
            check_task(type(self.teacher).__name__, cfg.task, f"--teacher {cfg.teacher}")
            if getattr(self.teacher.config, "num_labels", None) != getattr(self.model.config, "num_labels", None):
                raise CLIError(f"--teacher: it has {self.teacher.config.num_labels} labels, this run "
                               f"{self.model.config.num_labels}")
            self._check_fits(self.teacher, "--teacher")
            self.teacher.eval().requires_grad_(False)
        if cfg.qat:
            import fastattn
            self.model = fastattn.prepare_qat(self.model)
        if cfg.grad_checkpointing:  # the model (under a soft prompt's wrapper, if any)
            base = next((m for m in self.model.modules() if hasattr(m, "gradient_checkpointing_enable")), None)
            if base is None:
                raise CLIError(f"--grad-checkpointing: a {self.arch} has no block loop to checkpoint")
            base.gradient_checkpointing_enable()
        self.unused = self.task.unused(self.model)
        self.train_model = self.dist.wrap(self.model, cfg, find_unused=bool(self.unused))
        if cfg.compile:  # the wrapper (DDP, FSDP) compiled, as torch recommends; self.model stays the module saved
            self.train_model = torch.compile(self.train_model, backend=cfg.compile_backend)
        self.opt = configure_optimizer(self.model, cfg, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same on every rank: each takes its slice
        self.step = 0
        self.stop_signal = None
        if cfg.resume:
            self._restore()

    def _make_task(self):
        """The run's task; a classifier continued from --init keeps the checkpoint's label names and order (the data's
        labels mapped onto its outputs, one it lacks refused), as eval reads them."""
        cfg = self.cfg
        if cfg.task == "classify" and cfg.init:
            from fastattn.cli import checkpoint as ckpt
            state = ckpt.train_state(ckpt.locate(cfg.init))
            if state.get("labels"):
                return TASKS["classify"](cfg, self.tok, labels=state["labels"])
        return TASKS[cfg.task](cfg, self.tok)

    def _check_resume_options(self, path):
        """--resume with an option that changes the model, its tokens or its data: one clear error."""
        try:
            saved = json.loads((path / "train_state.json").read_text()).get("train_config", {})
        except (OSError, ValueError, AttributeError):
            return  # a corrupt newest checkpoint: latest_valid reports it and takes an older one
        changed = [f"--{k.replace('_', '-')} {getattr(self.cfg, k)!r} (the run's: {saved[k]!r})"
                   for k in RESUME_FIXED if k in saved and
                   absolute_paths(k, saved[k]) != absolute_paths(k, getattr(self.cfg, k))]
        if changed:
            raise CLIError(f"--resume {self.run_dir}: changed {', '.join(changed)}: resume with the options the run "
                           "was started with, or start a new --out")

    def _check_fits(self, model, what):
        """The run's sequences (and labels) fit model: its positions and its classifier."""
        cfg, mcfg = self.cfg, model.config
        need = cfg.seq_len + (cfg.prompt_len if cfg.mode == "prompt" and model is self.model else 0)
        if getattr(mcfg, "max_seq_len", need) < need:
            raise CLIError(f"{what}: {mcfg.max_seq_len} positions, fewer than --seq-len {cfg.seq_len}"
                           + (f" + --prompt-len {cfg.prompt_len}" if need > cfg.seq_len else ""))
        labels = getattr(self.task, "labels", None)
        if labels is not None and getattr(mcfg, "num_labels", len(labels)) < len(labels):
            raise CLIError(f"{what}: {mcfg.num_labels} labels, fewer than the {len(labels)} in the data "
                           f"({', '.join(labels[:6])})")

    # ---- model ----
    def _build_model(self):
        cfg = self.cfg
        # the starting model's generation settings come along into models that generate (as save_pretrained's)
        self.carry = carried(cfg.init or cfg.init_hf) if (cfg.init or cfg.init_hf) and \
            cfg.task in ("clm", "seq2seq") else {}
        if cfg.init or cfg.init_hf:
            if cfg.init:
                if hf_model_type(cfg.init):
                    raise CLIError(f"--init {cfg.init}: a Hugging Face folder: start from it with --init-hf")
                model, _, tok = load_model(cfg.init, backend=cfg.model_backend, purpose="--init")
                if tok.vocab_size != self.tok.vocab_size:
                    raise CLIError("--init: the checkpoint's tokenizer differs from --tokenizer")
                n = finetune.soft_prompt_len(model)
                if n and (cfg.mode, cfg.prompt_len) != ("prompt", n):
                    raise CLIError(f"--init {cfg.init}: a soft-prompt run (its model frozen under a {n}-token prompt):"
                                   f" continue it with --mode prompt --prompt-len {n}, or --init the run it started "
                                   "from")
            else:
                cls = model_class(cfg.arch or TASK_ARCH[cfg.task])
                try:
                    model = cls.from_hf(cfg.init_hf, **self._hf_labels(cls))
                except (OSError, ValueError, KeyError) as e:
                    raise CLIError(f"--init-hf {cfg.init_hf}: {e}") from None
                if model.config.vocab_size < self.tok.vocab_size:
                    raise CLIError(f"--init-hf: the model's vocabulary ({model.config.vocab_size}) is smaller than "
                                   f"the tokenizer's ({self.tok.vocab_size})")
                if getattr(model.config, "padding_idx", None) is not None and type(self.tok).__name__ != "HFTokenizer":
                    # another tokenizer than the folder's: the embedding row without gradient is its pad token's
                    model.config.padding_idx = model.tok_emb.padding_idx = self.tok.pad_id
            self._init_options(model)
            if cfg.task == "classify" and type(model).__name__ != TASK_ARCH["classify"]:
                model = self._with_classifier(model)
            check_task(type(model).__name__, cfg.task, f"--init {cfg.init or cfg.init_hf}")
        else:
            cls = model_class(cfg.arch or TASK_ARCH[cfg.task])
            fields = model_fields(cfg, self.tok.vocab_size, self.tok.pad_id, self.tok.eos_id)
            if cfg.task == "classify":
                fields["num_labels"] = cfg.num_labels or len(self.task.labels)
            model = cls(build_config(cls, fields))
        if getattr(model.config, "n_experts", 0) and model.config.model_type == "gpt":
            if cfg.router_aux_loss_coef < 0:
                raise CLIError(f"--router-aux-loss-coef must be >= 0, got {cfg.router_aux_loss_coef}")
            model.config.router_aux_loss_coef = float(cfg.router_aux_loss_coef)
        if cfg.int8_base:
            finetune.quantize_backbone(model, cfg.int8_base)
        try:
            if not finetune.soft_prompt_len(model):  # (an --init soft-prompt run goes on training its prompt)
                finetune.apply(model, cfg.mode, cfg.lora_rank, cfg.lora_alpha, cfg.prompt_len, seed=cfg.seed)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if not any(p.requires_grad for p in model.parameters()):
            raise CLIError(f"--mode {cfg.mode}: nothing left to train in a {type(model).__name__} (a head tied to "
                           "the embedding is part of the backbone: try --mode lora)")
        return model

    def _init_options(self, model):
        """The model options given beside --init / --init-hf: those that shape the model must be the checkpoint's
        (its weights decide them), --dropout is applied (fine-tuning may want another)."""
        given = getattr(self.cfg, "given", frozenset())
        for opt_name, field in INIT_SHAPE.items():
            have = getattr(model.config, field, None)
            if opt_name in given and getattr(self.cfg, opt_name) != have:
                raise CLIError(f"--{opt_name.replace('_', '-')} {getattr(self.cfg, opt_name)}: the --init model has "
                               f"{field} {have} (its checkpoint decides it: leave the option out)")
        if "dropout" in given:
            finetune.set_dropout(model, self.cfg.dropout)

    def _hf_labels(self, cls):
        """from_hf's label count for a classifier: --num-labels, else the data's, unless the folder is a classifier
        already (a *ForSequenceClassification: its own count, which the data's labels must fit)."""
        if cls.__name__ != TASK_ARCH["classify"]:
            return {}
        if self.cfg.num_labels:
            return {"num_labels": self.cfg.num_labels}
        try:
            archs = json.loads((Path(self.cfg.init_hf) / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            archs = []  # (from_hf reports an unreadable config.json)
        if any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs):
            return {}
        return {"num_labels": len(self.task.labels)}

    def _with_classifier(self, model):
        """A classification model holding the encoder (and pooler) weights of model (e.g. an MLM-trained BERT)."""
        cls = model_class(TASK_ARCH["classify"])
        fields = {**model.config.to_dict(), "num_labels": self.cfg.num_labels or len(self.task.labels)}
        try:
            new = cls(cls.config_class.from_dict(fields))
        except (TypeError, ValueError) as e:
            raise CLIError(f"--init: cannot put a classifier on a {type(model).__name__}: {e}") from None
        own = new.state_dict()
        shared = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("encoder.") for k in shared):
            raise CLIError(f"--init: a {type(model).__name__} has no encoder weights for {cls.__name__}")
        new.load_state_dict(shared, strict=False)
        return new

    # ---- one step ----
    def _forward(self, model, inputs):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return model(**inputs)

    def _loss(self, inputs, target):
        """(the mean over the scored tokens (rows), a per-batch term or None): the task's loss parts."""
        labels = self.task.label_kwargs(target)
        if labels is not None and self.teacher is None and self.cfg.mode != "prompt":
            # the model's own loss: on the fastattn backend it skips the logits (fastattn.linear_cross_entropy)
            out = self._forward(self.train_model, {**inputs, **labels})
            token, extra = out.loss, self.task.extra_loss(out, target)
            if out.aux_loss is not None:  # a mixture of experts' load balancing, included in .loss: per batch
                aux = self.model.config.router_aux_loss_coef * out.aux_loss
                token, extra = token - aux, aux if extra is None else extra + aux
            return token, extra
        out = self._forward(self.train_model, inputs)
        token, extra = self.task.loss_parts(out, target)
        if self.teacher is not None:
            with torch.no_grad():
                tout = self._forward(self.teacher, inputs)
            a = self.cfg.distill_alpha
            token = finetune.distill_loss(token, self.task.logits(out), self.task.logits(tout), a,
                                          self.cfg.temperature, self.task.distill_positions(target))
            extra = None if extra is None else (1 - a) * extra
        return token, extra

    def train_step(self):
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.train_model.train()
        total, ntok, world, micros = 0.0, 0, self.dist.dp_world, []
        for _ in range(cfg.grad_accum):
            inputs, target = self.task.batch("train", cfg.batch_size * world, self.gen)
            if world > 1:
                first = self.dist.dp_rank * cfg.batch_size  # this rank's rows of the global batch
                inputs, target = take_rows(inputs, first, cfg.batch_size), take_rows(target, first, cfg.batch_size)
            ntok += self.task.tokens(inputs)
            micros.append((inputs, target, self.task.scored(target)))
        # each scored token (row) of the step weighs the same, in any micro-batch and process (transformers'
        # num_items_in_batch): a micro-batch's mean weighs its share of them (x world: DDP / FSDP average ranks)
        items = self.dist.total(sum(n for _, _, n in micros))
        for micro, (inputs, target, n) in enumerate(micros):
            inputs, target = _to(inputs, self.device), _to(target, self.device)
            with self.dist.no_sync(self.train_model, micro < cfg.grad_accum - 1):
                token, extra = self._loss(inputs, target)
                loss = token * (n * world / items)  # (every row of every task scores a token)
                if extra is not None:
                    loss = loss + extra / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.dist.any(not math.isfinite(total)):  # an update would spread it to every weight: stop before it
            raise CLIError(f"step {self.step + 1}: the training loss is {total} (not finite); stopped before the "
                           f"update, the last checkpoint kept (a lower --lr, --clip, or --precision fp32 may help)")
        for p in self.unused:  # as eager leaves them: untouched by the optimizer (compiled, they got zeros)
            p.grad = None
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if cfg.clip > 0:
            clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], cfg.clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return self.dist.mean(total), ntok * self.dist.dp_world, lr

    @torch.no_grad()
    def evaluate(self):
        """Held-out loss and accuracy over up to --eval-batches batches, each held-out row once (as ``fastattn eval
        --batches N --batch-size B`` scores them); data-parallel ranks each score their rows of the global batch (as
        in training), so N processes report what one process reports at N times the batch."""
        self.train_model.eval()
        loss, correct, count = LossTotal(), 0, 0
        rows, world = self.cfg.batch_size, self.dist.dp_world
        for inputs, target in self.task.every_row(rows * world, "val", self.cfg.eval_batches):
            first, mine, scored = self.dist.dp_rank * rows, rows, True
            if first >= inputs["input_ids"].shape[0]:  # a last, short batch with no row for this rank: one row run,
                first, mine, scored = 0, 1, False       # not scored (every rank takes part in each forward)
            if world > 1:
                inputs, target = take_rows(inputs, first, mine), take_rows(target, first, mine)
            inputs, target = _to(inputs, self.device), _to(target, self.device)
            out = self._forward(self.train_model, inputs)
            if not scored:
                continue
            loss.add(self.task.loss_parts(out, target), self.task.scored(target), inputs["input_ids"].shape[0])
            c, n = self.task.correct(out, target)
            correct, count = correct + c, count + n
        loss = loss.value(self.dist)
        correct, count = self.dist.mean(correct), self.dist.mean(count)  # (sums / world: their ratio is the sums')
        acc = correct / count if count else 0.0
        return {"val_loss": loss, "val_ppl": perplexity(loss), "val_acc": acc}

    # ---- checkpoints ----
    def meta_config(self):
        return {k: absolute_paths(k, v) for k, v in dataclasses.asdict(self.cfg).items()}

    def label_meta(self):
        """classify: the label names, in the order of the classifier's outputs (eval maps its data by them)."""
        labels = getattr(self.task, "labels", None)
        return {"labels": list(labels)} if labels is not None else {}

    def _state(self):
        return {"step": self.step, "optimizer": self.opt.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "data_rng": self.gen.get_state(), "scaler": self.scaler.state_dict() if self.scaler else {}}

    def save(self, tag=None):
        if self.dist.world > 1 and not self.dist.replicated:
            return self.dist.save_sharded(self, tag)
        if not self.rank0:
            return None
        meta = {"step": self.step, "task": self.cfg.task, "arch": self.arch, "train_config": self.meta_config(),
                **self.label_meta()}
        model, cfg_dict = self.model, self.model.config.to_dict()
        path = ckpt.write_folder(self.run_dir / (tag or f"ckpt-{self.step:07d}"), {
            "model.safetensors": lambda p: ckpt.save_weights(model, p),
            "config.json": lambda p: p.write_text(json.dumps(cfg_dict, indent=2)),
            "tokenizer.json": lambda p: self.tok.save(p),
            "train_state.json": lambda p: p.write_text(json.dumps(meta, indent=2)),
            "state.pt": lambda p: torch.save(self._state(), p), **self.carry, **self._int8_layout(model),
        })
        if tag is None:
            ckpt.prune(self.run_dir, self.cfg.keep)
        return path

    def _int8_layout(self, model):
        """{quantization.json: writer} of an --int8-base run's checkpoints (eval / generate rebuild the int8 base
        from it, under the adapters), else {}."""
        if not self.cfg.int8_base:
            return {}
        from fastattn.models.layers import INT8_FILE
        from fastattn.quantization import int8_layout
        layout = int8_layout(model)
        return {INT8_FILE: lambda p: p.write_text(json.dumps(layout, indent=1))}

    def _restore(self):
        if self.dist.world > 1 and not self.dist.replicated:
            return self.dist.load_sharded(self)
        warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
        path = ckpt.resume_point(self.run_dir, self.dist.rank == 0, self.dist.barrier, warn)
        if path is None:
            raise CLIError(f"--resume: no valid checkpoint in {self.run_dir}")
        if (path / "dcp").is_dir():
            raise CLIError(f"--resume {path}: a sharded checkpoint (--fsdp / --tp): resume it under torchrun with "
                           "the options and number of processes the run was started with")
        if self.dist.rank == 0:
            ckpt.set_aside_newer(self.run_dir, path, warn)
        try:
            ckpt.load_weights(self.model, path / "model.safetensors")
        except ckpt.CheckpointError as e:
            raise CLIError(f"{e}: resume with the options the run was started with") from None
        state = ckpt.load_state(path)
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.gen.set_state(state["data_rng"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        if self.rank0:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def export(self):
        """RUN/model: the final model (LoRA merged, QAT converted) as a plain checkpoint for generate / eval."""
        if self.dist.world > 1 and not self.dist.replicated:
            sd = self.dist.full_state_dict(self.model)  # every rank takes part in the gather
            if not self.rank0:
                return None
            model = model_class(self.arch)(self.model.config)
            cfg = self.cfg  # the fine-tuning structure (LoRA adapters, soft prompt) that the gathered state holds
            finetune.apply(model, cfg.mode, cfg.lora_rank, cfg.lora_alpha, cfg.prompt_len, seed=cfg.seed)
            model.load_state_dict(sd)
        elif not self.rank0:
            return None
        else:
            model = self.model
        finetune.merge(model)
        if self.cfg.int8_base:  # adapters merged above; the frozen int8 base, dequantized, is the model trained
            finetune.dequantize_backbone(model)
        meta = {"step": self.step, "task": self.cfg.task, "arch": self.arch,
                "train_config": {**self.meta_config(), "mode": "prompt" if self.cfg.mode == "prompt"
                                 else "full"}, **self.label_meta()}
        if self.cfg.qat:  # trained through fake quantization: generate / eval load it as int8 w8a8
            meta["int8"] = {"mode": "w8a8", "smoothquant": False, "alpha": 0.5, "calib": 0, "batch_size": 1}
        cfg_dict = model.config.to_dict()
        return ckpt.write_folder(self.run_dir / "model", {
            "model.safetensors": lambda p: ckpt.save_weights(model, p),
            "config.json": lambda p: p.write_text(json.dumps(cfg_dict, indent=2)),
            "tokenizer.json": lambda p: self.tok.save(p),
            "train_state.json": lambda p: p.write_text(json.dumps(meta, indent=2)), **self.carry,
        })

    # ---- the loop ----
    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def _tokenizer_name(self):
        if self.tok_from_init:
            return f"tokenizer of {self.cfg.init} ({self.tok.vocab_size} ids)"
        if type(self.tok).__name__ == "HFTokenizer":
            return f"tokenizer {self.cfg.init_hf}/tokenizer.json ({self.tok.vocab_size} ids)"
        return f"tokenizer {self.cfg.tokenizer} ({self.tok.vocab_size} ids)"

    def run(self):
        cfg = self.cfg
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(self.meta_config(), indent=2))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        n_params = sum(p.numel() for p in self.model.parameters())
        flops_per_token = 6 * n_params + 12 * self.model.config.n_layer * self.model.config.d_model * cfg.seq_len
        peak = peak_flops(cfg, self.device) * self.dist.world
        prog = Progress(cfg.steps, self.rank0)
        batch = cfg.batch_size * cfg.grad_accum * self.dist.dp_world  # (tensor-parallel ranks share theirs)
        prog.line(f"{cfg.task} | {type(self.model).__name__} {n_params / 1e6:.2f}M params | "
                  f"{cfg.model_backend} | {self.device} {cfg.precision} | global batch {batch} x {cfg.seq_len} | "
                  f"{self._tokenizer_name()} | run {self.run_dir}")
        if self.rank0 and cfg.resume:
            _drop_metrics_after(self.run_dir / "metrics.jsonl", self.step)  # rows the interrupted run logged later
        # a fresh run starts the file anew (a run killed before its first checkpoint may have left rows)
        metrics = open(self.run_dir / "metrics.jsonl", "a" if cfg.resume else "w") if self.rank0 else None
        start = time.perf_counter()
        window_t, window_tok, reason = time.perf_counter(), 0, "done"
        try:
            while self.step < cfg.steps:
                loss, ntok, lr = self.train_step()
                window_tok += ntok
                if cfg.step_delay:
                    time.sleep(cfg.step_delay)
                timed_out = cfg.max_time and time.perf_counter() - start >= cfg.max_time
                stop = self.dist.any(self.stop_signal is not None or bool(timed_out))
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or stop:
                    dt = time.perf_counter() - window_t
                    tps = window_tok / max(dt, 1e-9)
                    rec = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tps,
                           "mfu": tps * flops_per_token / peak, "time": time.perf_counter() - start}
                    prog.update(self.step, f"loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                                           f"MFU {100 * rec['mfu']:.1f}%")
                    if metrics:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    window_t, window_tok = time.perf_counter(), 0
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps or stop:
                    ev = self.evaluate()
                    prog.line(f"step {self.step}: held-out loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.2f} | "
                              f"acc {ev['val_acc']:.3f}")
                    if metrics:
                        metrics.write(json.dumps({"step": self.step, **ev}) + "\n")
                        metrics.flush()
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps or stop:
                    self.save()
                if stop:
                    reason = (f"signal {signal.Signals(self.stop_signal).name}" if self.stop_signal
                              else f"--max-time {cfg.max_time:g}s")
                    break
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if metrics:
                metrics.close()
        final = self.export()  # every rank: a sharded model is gathered
        if self.rank0:
            png = plot_metrics(self.run_dir)
            prog.line(f"stopped at step {self.step} ({reason}); model: {final}; metrics: "
                      f"{self.run_dir / 'metrics.jsonl'}{'; plot: ' + str(png) if png else ''}")
        return 0


RUN_FILES = ("train_config.json", "metrics.jsonl", "loss.png")


def _run_file(name):
    """A file a run writes before its first checkpoint (a run killed then leaves only these, and temp folders)."""
    return name in RUN_FILES or (name.startswith(".") and ".tmp-" in name)


def _metric_rows(path):
    """The records of metrics.jsonl (a line cut short by a kill is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if isinstance(m, dict) and isinstance(m.get("step"), int):
            rows.append(m)
    return rows


def _drop_metrics_after(path, step):
    """Keep the metrics.jsonl records up to step: a resumed run logs the later steps again."""
    if path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in _metric_rows(path) if m["step"] <= step))
        tmp.replace(path)


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_, also over a mix of DTensor (sharded / tensor-parallel) and plain gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = ()  # noqa: N806
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.stack([(g.full_tensor() if isinstance(g, DTensor) else g).float().norm() for g in grads]).norm()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def _to(x, device):
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def main(cfg: TrainConfig) -> int:
    from fastattn.cli import distributed
    dist = distributed.setup(cfg)
    try:
        rc = Trainer(cfg, dist).run()
    except BaseException:
        dist.close(finished=False)
        raise
    dist.close()
    return rc

