"""``fastattn eval``: held-out loss / perplexity / accuracy of a checkpoint, as JSON."""
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from fastattn.cli.config import CLIError, opt
from fastattn.cli.finetune import soft_prompt_len
from fastattn.cli.models import check_task
from fastattn.cli.tasks import TASKS, LossTotal, perplexity


@dataclass
class EvalConfig:
    checkpoint: str = opt("runs/train", "checkpoint folder, or a run folder")
    data: List[str] = opt([], "data to evaluate, all of it: every document, pair or row once (files / folders; "
                          "classify: .jsonl / .csv); default: the run's held-out split")
    task: Optional[str] = opt(None, "clm, mlm, seq2seq or classify (default: the checkpoint's)", choices=list(TASKS))
    split: str = opt("val", "val: the held-out split of the run's data; train: its training split (with --data: "
                     "all of the files)", choices=["val", "train"])
    batches: int = opt(16, "batches to evaluate at most, each row once (with --data: as many as its windows of "
                       "text, pairs or rows take)")
    batch_size: int = opt(8, "sequences per batch")
    seq_len: Optional[int] = opt(None, "tokens per sequence (default: the run's)")
    device: str = opt("auto", "cpu, cuda or auto")
    model_backend: Optional[str] = opt(None, "fastattn or torch layers (default: as trained)",
                                       choices=["fastattn", "torch"])
    int8: bool = opt(False, "quantize the Linear layers to int8 (w8a16) first")
    output: Optional[str] = opt(None, "write the JSON here as well as to stdout", short="-o")

    def validate(self):
        if self.batches < 1 or self.batch_size < 1:
            raise CLIError("--batches and --batch-size must be at least 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise CLIError(f"--seq-len must be at least 1, got {self.seq_len}")
        if self.output and Path(self.output).is_dir():
            raise CLIError(f"--output {self.output}: a folder, not a file")


def make_task(state, tok, task=None, data=None, seq_len=None, model=None):
    """The task a checkpoint was trained on (its data, sequence length and label names), with overrides; data given:
    all of it is the held-out split (val_fraction 1), none of it cut (max_data_tokens); set to the checkpoint's
    ``model`` (a seq2seq decoder's start token) when given."""
    from fastattn.cli.tasks import ClassifyTask, for_model
    from fastattn.cli.train import TrainConfig
    saved = state.get("train_config", {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    tcfg.task = task or tcfg.task
    if data:
        tcfg.data, tcfg.val_fraction, tcfg.max_data_tokens = list(data), 1.0, None
    if seq_len:
        tcfg.seq_len = seq_len
    if tcfg.task == "classify":
        return ClassifyTask(tcfg, tok, labels=state.get("labels"))
    task = TASKS[tcfg.task](tcfg, tok)
    return for_model(task, model) if model is not None else task


def quantize_on_load(model, state, tok, int8: bool):
    """What eval and generate run: a QAT export (train --qat) quantized by its run's recipe, --int8 or not; else
    with ``int8`` a float checkpoint's Linears to w8a16 (a ``fastattn quantize`` checkpoint is int8 already)."""
    recipe = state.get("int8")
    if recipe and not recipe.get("stored"):
        from fastattn.cli.quantize import apply_recipe
        task = make_task(state, tok, model=model) if recipe["smoothquant"] else None
        return apply_recipe(model, recipe, task)
    if int8 and not recipe:
        import fastattn
        return fastattn.quantize(model, mode="w8a16")
    return model


def _check_fits(model, seq_len):
    """seq_len (and the model's soft prompt) within the model's positions."""
    n_prompt = soft_prompt_len(model)
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is not None and seq_len and seq_len + n_prompt > max_len:
        raise CLIError(f"--seq-len {seq_len}" + (f" + a soft prompt of {n_prompt}" if n_prompt else "") +
                       f" exceeds the model's {max_len} positions")


def main(cfg: EvalConfig) -> int:
    from fastattn.cli.loading import load_model, pick_device
    device = pick_device(cfg.device)
    model, state, tok = load_model(cfg.checkpoint, backend=cfg.model_backend, map_location=device)
    model.eval()
    check_task(type(model).__name__, cfg.task or state.get("task", "clm"), f"{cfg.checkpoint}")
    _check_fits(model, cfg.seq_len or state.get("train_config", {}).get("seq_len"))  # before the data is read
    task = make_task(state, tok, cfg.task, cfg.data, cfg.seq_len, model=model)
    tcfg = task.cfg
    _check_fits(model, tcfg.seq_len)
    model = quantize_on_load(model, state, tok, cfg.int8)
    whole_file = bool(cfg.data)  # the user's files: every window of text, pair or row, once
    # every window of text, pair or row once: all of the user's files, or up to --batches of the run's split
    batches = task.every_row(cfg.batch_size) if whole_file else task.every_row(cfg.batch_size, cfg.split, cfg.batches)
    loss, correct, count, ntok, examples = LossTotal(), 0, 0, 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for inputs, target in batches:
            ntok += task.tokens(inputs)
            rows = inputs["input_ids"].shape[0]
            inputs = {k: v.to(device) for k, v in inputs.items()}
            target = {k: v.to(device) for k, v in target.items()} if isinstance(target, dict) else target.to(device)
            out = model(**inputs)
            loss.add(task.loss_parts(out, target), task.scored(target), rows)  # a mean over every scored token (row)
            c, n = task.correct(out, target)
            correct, count, examples = correct + c, count + n, examples + rows
    secs = time.perf_counter() - start
    loss = loss.value()
    result = {"checkpoint": str(cfg.checkpoint), "task": tcfg.task, "split": "all" if whole_file else cfg.split,
              "loss": loss, "accuracy": correct / max(count, 1), "examples": examples,
              "tokens_per_s": ntok / max(secs, 1e-9)}
    if tcfg.task in ("clm", "seq2seq", "mlm"):
        result["perplexity"] = perplexity(loss)
    text = json.dumps(result, indent=2)
    if cfg.output:  # first: a file that cannot be written is an error, with nothing printed
        try:
            with open(cfg.output, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            raise CLIError(f"--output {cfg.output}: {e.strerror or e}") from None
    print(text)
    print(f"{tcfg.task}: loss {loss:.4f}" + (f", perplexity {result['perplexity']:.2f}" if "perplexity" in result
                                              else "") + f", accuracy {result['accuracy']:.4f}", file=sys.stderr)
    return 0
