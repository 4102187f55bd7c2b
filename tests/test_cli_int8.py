"""CLI int8 paths: eval and generate quantize a checkpoint the same way (a QAT export by its run's recipe)."""
import json

import pytest

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
