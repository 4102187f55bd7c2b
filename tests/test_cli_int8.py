"""CLI int8 paths: eval and generate quantize a checkpoint the same way (a QAT export by its run's recipe)."""
import json

import pytest
import torch

import fastattn
from fastattn.cli import main

TINY = ["--tokenizer", "bytes", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16",
        "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "2",
        "--max-data-tokens", "20000", "--warmup", "1"]


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "run"
    assert main(["train", *TINY, "--qat", "--out", str(out)]) == 0
    return out


def test_eval_and_generate_int8_apply_the_qat_recipe(qat_run, capsys, monkeypatch):
    """A train --qat export is quantized by its recipe (w8a8) whether or not --int8 is given, by eval as by
    generate: eval --int8 quantized it w8a16 instead, so eval measured another model than generate ran."""
    modes = []
    quantize = fastattn.quantize
    monkeypatch.setattr(fastattn, "quantize", lambda *a, **kw: modes.append(kw.get("mode")) or quantize(*a, **kw))
    losses = []
    for extra in ([], ["--int8"]):
        capsys.readouterr()
        assert main(["eval", str(qat_run), "--batches", "2", *extra]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert main(["generate", str(qat_run), "-p", "Hi", "-n", "2", "--temperature", "0", "--int8"]) == 0
    assert modes == ["w8a8"] * 3
    assert losses[0] == losses[1]


def test_eval_int8_quantizes_a_float_run_w8a16(tmp_path, capsys, monkeypatch):
    """A float checkpoint: --int8 quantizes its Linears w8a16 (eval as generate); without it, nothing."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    modes = []
    quantize = fastattn.quantize
    monkeypatch.setattr(fastattn, "quantize", lambda *a, **kw: modes.append(kw.get("mode")) or quantize(*a, **kw))
    assert main(["eval", str(run), "--batches", "1"]) == 0 and modes == []
    assert main(["eval", str(run), "--batches", "1", "--int8"]) == 0 and modes == ["w8a16"]


@pytest.mark.parametrize("int8_base", ["w8a16", "w8a8"])
def test_lora_over_an_int8_base(tmp_path, capsys, int8_base):
    """train --mode lora --int8-base: the backbone's Linears are frozen int8 (checkpoints store int8 weights and
    quantization.json; they never change), only the adapters train, --resume continues bit-exactly, eval on a
    checkpoint rebuilds the int8 base, and the export is the float model the run trained: each Linear's dequantized
    weight plus its adapter's B A (the head, tied to the embedding, stays float)."""
    from safetensors.torch import load_file
    base = tmp_path / "base"
    assert main(["train", *TINY, "--out", str(base)]) == 0
    args = ["train", *TINY, "--init", str(base), "--mode", "lora", "--int8-base", int8_base, "--ckpt-every", "2",
            "--steps", "4"]
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--steps", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    run = tmp_path / "straight"
    first, last = (load_file(run / f"ckpt-000000{s}" / "model.safetensors") for s in (2, 4))
    assert load_file(tmp_path / "resumed" / "ckpt-0000004" / "model.safetensors").keys() == last.keys()
    assert all(t.equal(last[k]) for k, t in load_file(tmp_path / "resumed" / "ckpt-0000004" /
                                                      "model.safetensors").items())
    int8 = [k for k, t in last.items() if t.dtype == torch.int8]
    layout = json.loads((run / "ckpt-0000004" / "quantization.json").read_text())
    assert int8 and len(int8) == len(layout) and all(k.endswith(".base.weight") for k in int8)
    assert all(first[k].equal(last[k]) for k in last if ".lora_" not in k)  # only the adapters trained
    assert not all(first[k].equal(last[k]) for k in last if ".lora_b" in k)
    exported = load_file(run / "model" / "model.safetensors")
    assert not any(t.dtype == torch.int8 or ".lora_" in k for k, t in exported.items())
    scale = 16.0 / 8  # --lora-alpha / --lora-rank defaults
    for k in int8:
        name = k[:-len(".base.weight")]
        w = last[k].float() * last[f"{name}.base.weight_scale"][:, None]
        w += last[f"{name}.lora_b"] @ last[f"{name}.lora_a"] * scale
        torch.testing.assert_close(exported[f"{name}.weight"], w)
    losses = []
    for folder in (run / "ckpt-0000004", run):
        capsys.readouterr()
        assert main(["eval", str(folder), "--batches", "1", "--batch-size", "4"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    # the checkpoint evaluates as the run did (its adapters over the int8 base); the float export as it within w8a16's
    # float error (its GEMM computes with the dequantized weight), w8a8's activation rounding
    val = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in r][-1]
    assert val["step"] == 4 and losses[0] == pytest.approx(val["val_loss"], rel=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5 if int8_base == "w8a16" else 2e-2)
    assert main(["generate", str(run / "ckpt-0000004"), "-p", "Hi", "-n", "2"]) == 0
    # to train, prune or quantize, a checkpoint of such a run gives the float model the run exports
    capsys.readouterr()
    for args in (["train", *TINY, "--init", str(run / "ckpt-0000004"), "--out", str(tmp_path / "again")],
                 ["train", *TINY, "--init", str(run / "ckpt-0000004"), "--mode", "lora", "--int8-base", int8_base,
                  "--out", str(tmp_path / "again-lora")],
                 ["prune", str(run / "ckpt-0000004"), "--heads", "0.5", "--out", str(tmp_path / "p")],
                 ["quantize", str(run / "ckpt-0000004"), "--out", str(tmp_path / "q")]):
        assert main(args) == 0, capsys.readouterr().err


def test_soft_prompt_over_an_int8_base(tmp_path, capsys):
    """--mode prompt --int8-base w8a16: the export is float (the int8 base dequantized) and evaluates as the run's
    last checkpoint, whose int8 base eval rebuilds."""
    from safetensors.torch import load_file
    run = tmp_path / "run"
    assert main(["train", *TINY, "--mode", "prompt", "--prompt-len", "2", "--int8-base", "w8a16", "--out", str(run)]) \
        == 0
    assert any(t.dtype == torch.int8 for t in load_file(run / "ckpt-0000002" / "model.safetensors").values())
    assert not any(t.dtype == torch.int8 for t in load_file(run / "model" / "model.safetensors").values())
    losses = []
    for folder in (run / "ckpt-0000002", run):
        capsys.readouterr()
        assert main(["eval", str(folder), "--batches", "2"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("extra, needle", [(["--mode", "full"], "--mode lora, frozen or prompt"),
                                           (["--mode", "lora", "--qat"], "--qat"),
                                           (["--mode", "lora", "--fsdp"], "--fsdp")])
def test_int8_base_refusals(tmp_path, capsys, extra, needle):
    assert main(["train", *TINY, "--int8-base", "w8a16", *extra, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
