"""``fastattn quantize``: int8 Linear layers (w8a8 / w8a16, optional SmoothQuant calibrated on N batches).

The output folder is a checkpoint of the quantized model: int8 weights with their scales in model.safetensors and
the int8 layout (fastattn.int8_layout) in quantization.json, so ``generate`` / ``eval`` / ``from_pretrained`` load
it as it was measured here, without the float weights or calibration data; a Hugging Face folder's
generation_config.json comes along (generate searches as it did). The recipe is recorded in train_state.json, and
the held-out loss before and after quantization is reported."""
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastattn.cli import checkpoint as ckpt
from fastattn.cli.config import CLIError, check_new_folder, opt
from fastattn.cli.generation_args import carried
from fastattn.cli.tasks import LossTotal
from fastattn.models.layers import INT8_FILE
from fastattn.quantization import int8_layout


@dataclass
class QuantizeConfig:
    checkpoint: str = opt("runs/train", "checkpoint folder, or a run folder")
    out: Optional[str] = opt(None, "output folder (default: CHECKPOINT-int8)")
    mode: str = opt("w8a8", "w8a8: int8 weights and activations; w8a16: int8 weights only", choices=["w8a8", "w8a16"])
    smoothquant: bool = opt(False, "SmoothQuant: move activation outliers into the weights (w8a8; needs calibration)")
    alpha: float = opt(0.5, "SmoothQuant migration strength")
    calib: int = opt(8, "calibration batches (from the run's held-out data)")
    batch_size: int = opt(4, "sequences per calibration / evaluation batch")
    eval_batches: int = opt(4, "held-out batches to compare float and int8 loss; 0: skip")

    def validate(self):
        if self.smoothquant and self.mode == "w8a16":
            raise CLIError("--smoothquant with --mode w8a16: SmoothQuant smooths int8 activations, and w8a16 keeps "
                           "them float (use --mode w8a8, or drop --smoothquant)")
        if not 0 <= self.alpha <= 1:
            raise CLIError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.batch_size < 1:
            raise CLIError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.calib < (1 if self.smoothquant else 0):
            raise CLIError(f"--calib must be at least 1 with --smoothquant, got {self.calib}" if self.smoothquant
                           else f"--calib must be >= 0, got {self.calib}")
        if self.eval_batches < 0:
            raise CLIError(f"--eval-batches must be >= 0, got {self.eval_batches}")


def calib_batches(task, n, batch_size):
    return [task.batch("val", batch_size, index=1000 + i)[0] for i in range(n)]


def apply_recipe(model, recipe, task):
    import fastattn
    calib = calib_batches(task, recipe["calib"], recipe["batch_size"]) if recipe["smoothquant"] else None
    return fastattn.quantize(model, calib_data=calib, mode=recipe["mode"],
                             smoothquant_alpha=recipe["alpha"] if recipe["smoothquant"] else None)


def _loss(model, task, n, batch_size):
    """The held-out loss over up to n batches, each row once (as ``fastattn eval``'s)."""
    total = LossTotal()
    with torch.no_grad():
        for inputs, target in task.every_row(batch_size, "val", n):
            total.add(task.loss_parts(model(**inputs), target), task.scored(target), inputs["input_ids"].shape[0])
    return total.value()


def _weight_bytes(folder: Path) -> int:
    """Bytes of a folder's weight files (a Hugging Face folder's may be sharded)."""
    return sum(f.stat().st_size for pattern in ("model*.safetensors", "pytorch_model*.bin")
               for f in folder.glob(pattern))


def main(cfg: QuantizeConfig) -> int:
    from fastattn.cli.evaluate import make_task
    from fastattn.cli.loading import hf_model_type, load_model
    src = Path(cfg.checkpoint) if hf_model_type(cfg.checkpoint) else ckpt.resolve(cfg.checkpoint)
    out = Path(cfg.out or f"{str(src).rstrip('/')}-int8")
    check_new_folder(out)
    model, state, tok = load_model(src, purpose="quantize")
    model.eval()
    task = make_task(state, tok, model=model)
    recipe = {"mode": cfg.mode, "smoothquant": cfg.smoothquant, "alpha": cfg.alpha, "calib": cfg.calib,
              "batch_size": cfg.batch_size}
    before = _loss(model, task, cfg.eval_batches, cfg.batch_size) if cfg.eval_batches else None
    model = apply_recipe(model, recipe, task)
    after = _loss(model, task, cfg.eval_batches, cfg.batch_size) if cfg.eval_batches else None
    tcfg = dict(state.get("train_config", {}))
    tcfg["mode"] = "prompt" if tcfg.get("mode") == "prompt" else "full"  # LoRA adapters were merged by load_model
    meta = {**state, "train_config": tcfg, "int8": {**recipe, "stored": True}}
    layout = int8_layout(model)
    # config and tokenizer written from the loaded ones: src may be a Hugging Face folder, whose files are not ours
    files = {"config.json": lambda p: model.config.save(p), "tokenizer.json": lambda p: tok.save(p),
             "model.safetensors": lambda p: ckpt.save_weights(model, p),
             INT8_FILE: lambda p: p.write_text(json.dumps(layout, indent=1)),
             "train_state.json": lambda p: p.write_text(json.dumps(meta, indent=2)), **carried(src)}
    ckpt.write_folder(out, files)
    n8 = len(layout)
    size_float, size = (_weight_bytes(f) for f in (src, out))
    print(json.dumps({"out": str(out), "int8_linears": n8, "loss_float": before, "loss_int8": after,
                      "bytes_float": size_float, "bytes_int8": size}, indent=2))
    print(f"{n8} Linear layers -> int8 {cfg.mode}; held-out loss {before} -> {after}; weights "
          f"{size_float / 2**20:.1f} -> {size / 2**20:.1f} MiB", file=sys.stderr)
    return 0
