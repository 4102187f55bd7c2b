"""Errors a user can cause: one line on stderr, exit code 2, no traceback, nothing written."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastattn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys, *args):
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("args, needle", [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--steps", "many"], "invalid int value"),
    (["train", "--task", "nope"], "invalid choice"),
    (["train", "--steps", "0"], "--steps must be at least 1"),
    (["train", "--data", "/no/such/file.txt"], "no such file"),
    (["train", "--task", "classify"], "needs --data"),
    (["train", "--config", "/no/such.toml"], "no such file"),
    (["generate", "/no/such/ckpt"], "no such checkpoint"),
    (["eval", "/no/such/ckpt"], "no such checkpoint"),
    (["quantize", "/no/such/ckpt"], "no such checkpoint"),
    (["prune", "/no/such/ckpt", "--heads", "0.5"], "no such checkpoint"),
    (["prune", "x", "--heads", "1.5"], "--heads must be in [0, 1)"),
    (["nonsense"], "invalid choice"),
    (["train", "--tokenizer", "/no/tok.json"], "cannot read tokenizer"),
    # odd values: refused before anything runs (they were a traceback, NaN losses or a silent wrong run)
    (["train", "--lr", "-1"], "--lr must be >= 0"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),  # (was torch's traceback)
    (["train", "--clip", "inf"], "argument --clip: expected a finite number, got 'inf'"),
    (["generate", "x", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["train", "--ckpt-every", "-1"], "--ckpt-every must be >= 0"),
    (["train", "--eval-every", "-2"], "--eval-every must be >= 0"),
    (["train", "--max-time", "-1"], "--max-time must be >= 0"),
    (["train", "--min-lr-ratio", "-1"], "--min-lr-ratio must be in [0, 1]"),
    (["train", "--mode", "lora", "--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["train", "--mode", "prompt", "--prompt-len", "0"], "--prompt-len must be at least 1"),
    (["train", "--task", "mlm", "--mask-prob", "0"], "--mask-prob must be in (0, 1]"),
    (["train", "--temperature", "0"], "--temperature (distillation) must be > 0"),
    (["train", "--distill-alpha", "2"], "--distill-alpha must be in [0, 1]"),
    (["train", "--arch", "BERT"], "a BERT is a --task mlm model, not a --task clm one"),
    (["generate", "x", "--stop", ""], "--stop: an empty string"),
    (["generate", "x", "--min-new-tokens", "-1"], "--min-new-tokens must be >= 0"),
    (["train", "--compile", "--compile-backend", "nope", "--steps", "1"], "--compile-backend 'nope' is not a"),
    (["eval", "x", "--seq-len", "0"], "--seq-len must be at least 1"),
    (["quantize", "x", "--alpha", "5"], "--alpha must be in [0, 1]"),
    (["quantize", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["quantize", "x", "--smoothquant", "--calib", "0"], "--calib must be at least 1 with --smoothquant"),
    (["quantize", "x", "--eval-batches", "-1"], "--eval-batches must be >= 0"),
    (["quantize", "x", "--mode", "w8a16", "--smoothquant"], "--smoothquant with --mode w8a16"),  # (did nothing)
    (["generate", "x", "--prompt-lookup", "3", "--repetition-penalty", "1.2"],  # (the prompt streamed first)
     "--repetition-penalty / --no-repeat-ngram-size: not with --draft / --prompt-lookup"),
    (["generate", "x", "--draft", "y", "--no-repeat-ngram-size", "2"],
     "--repetition-penalty / --no-repeat-ngram-size: not with --draft / --prompt-lookup"),
    (["prune", "x"], "nothing to prune"),
    (["train", "--max-data-tokens", "0"], "--max-data-tokens must be at least 1"),  # (0 read all, -1 one document)
    (["train", "--step-delay", "-1"], "--step-delay must be >= 0"),  # (a traceback, the run folder made)
    (["train", "--seed", str(2 ** 70)], "--seed must be in [0, 2**63 - 1)"),  # (torch's overflow traceback)
    (["train", "--tp", "2"], "--tp 2: tensor parallelism needs torchrun with 2 processes"),  # (one process ran)
    (["generate", "x", "--seed", "-1"], "--seed must be in [0, 2**63 - 1)"),
])
def test_user_errors_are_one_line(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("fastattn: error:") and needle in err, err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("text, needle", [
    ("steps = \n", "config file"),                       # not TOML
    ("stepz = 3\n", "unknown key 'stepz'"),
    ("steps = \"ten\"\n", "steps must be int"),
    ("task = \"nope\"\n", "task must be one of"),
    ("[train]\nlr = true\n", "lr must be float"),
    ("lr = nan\n", "lr must be a finite number, got nan"),
    ("data = [\"a\", 3]\n", "data must be a list of str"),
    ("[generate]\nseed = 1\n", "no [train] table ([generate] is for another command)"),
    ("[train]\n[train.sub]\nx = 1\n", "unknown key 'sub'"),  # (was: "no [train] table")
    ("seq_len = 16\nseq-len = 20\n", "'seq-len' given twice"),  # (the last spelling won, silently)
])
def test_bad_config_files(capsys, tmp_path, monkeypatch, text, needle):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    rc, err = run_main(capsys, "train", "--config", str(cfg))
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["c.toml"]


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_second_data_file_is_not_a_checkpoint(capsys, tmp_path, monkeypatch, command):
    """`eval --data a.txt b.txt`: options take one value each, so b.txt is the checkpoint: the error says so (it was
    "no valid checkpoint in this folder")."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("Some text.\n")
    rc, err = run_main(capsys, command, "--data" if command != "generate" else "--prompt-file", "a.txt", "b.txt")
    assert rc == 2 and err.count("\n") == 1
    assert "b.txt: a file, not a checkpoint folder (the folder holding config.json; if it was meant as a second " \
        "--data file: --data a.txt --data b.txt)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_bad_data_files(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    rc, err = run_main(capsys, "train", "--data", str(bad), "--out", str(tmp_path / "r"))
    assert rc == 2 and "bad.jsonl:2: not JSON" in err
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    rc, err = run_main(capsys, "train", "--data", str(binary), "--out", str(tmp_path / "r"))
    assert rc == 2 and "not UTF-8" in err
    labels = tmp_path / "l.csv"
    labels.write_text("sentence,y\na,1\n")
    rc, err = run_main(capsys, "train", "--task", "classify", "--data", str(labels), "--out", str(tmp_path / "r"))
    assert rc == 2 and "text and label" in err
    short = tmp_path / "short.csv"  # (a traceback at the first evaluation, the run folder left behind)
    short.write_text("label,text\npos,hello\nneg\n")
    rc, err = run_main(capsys, "train", "--task", "classify", "--data", str(short), "--out", str(tmp_path / "r"))
    assert rc == 2 and err.count("\n") == 1 and "short.csv:3: a row without its text or label" in err, err
    assert not (tmp_path / "r").exists()


def test_console_entry_point_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastattn", "train", "--nope"], cwd=tmp_path, capture_output=True,
                       text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "generate", "eval", "quantize", "prune", "info", "check", "bench", "demo"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--model-backend" in out and "--config" in out and "default: 1000" in out


def test_out_inside_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        rc, err = run_main(capsys, "train", "--out", str(out))
        assert rc == 2 and err.count("\n") == 1 and "a file, not a folder" in err, err
    assert (tmp_path / "f").read_text() == "x"


def test_pairs_for_a_task_that_reads_text(tmp_path, capsys):
    """Source / target pairs are the clm and seq2seq tasks' supervised data; mlm reads text: one line, exit 2."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": f"a {i}", "target": f"b {i}"}) + "\n" for i in range(10)))
    rc, err = run_main(capsys, "train", "--task", "mlm", "--data", str(pairs), "--out", str(tmp_path / "r"))
    assert rc == 2 and "--task mlm reads text, not source / target pairs" in err and "Traceback" not in err


def _one_line(capsys, *args):
    rc = main(list(args))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("fastattn: error:") and "Traceback" not in err, err
    return err


def test_bad_checkpoint_side_files(tmp_path, capsys):
    """A manifest, config or train state that is valid JSON of the wrong shape, a bad tokenizer.json, a folder
    without tokenizer.json whose model the embedded BPE does not fit: one line each (were tracebacks, or for the
    last a wrong tokenizer used silently)."""
    run = tmp_path / "run"
    assert main(["train", "--tokenizer", "bytes", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len",
                 "16", "--batch-size", "2", "--steps", "1", "--eval-batches", "1", "--max-data-tokens", "5000",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    cases = [("manifest.json", "[]", "corrupt manifest.json"), ("manifest.json", '{"model.safetensors": 3}',
                                                                  "corrupt manifest.json"),
             ("config.json", "[]", "config.json: corrupt (a JSON list, not an object)"),
             ("train_state.json", "[1]", "train_state.json: corrupt (a JSON list, not an object)"),
             ("tokenizer.json", "{bad", "tokenizer.json"), ("tokenizer.json", '{"type": "x"}', "tokenizer.json"),
             ("tokenizer.json", None, "no tokenizer.json, and the embedded BPE (4096 ids) is not the model's")]
    for i, (name, text, needle) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        shutil.copytree(run / "model", folder)
        if name != "manifest.json":
            (folder / "manifest.json").unlink()  # a save_pretrained folder: accepted without one
        if text is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(text)
        for cmd in (["generate", str(folder), "-p", "a", "-n", "1"], ["eval", str(folder)]):
            assert needle in _one_line(capsys, *cmd)


def test_stdin_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    """Bytes that are not UTF-8 on stdin are named as such (were decoded with surrogates, then blamed on --chat)."""
    import io
    import types
    run = tmp_path / "run"
    assert main(["train", "--tokenizer", "bytes", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len",
                 "16", "--batch-size", "2", "--steps", "1", "--eval-batches", "1", "--max-data-tokens", "5000",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(b"Emma \xff\n"), isatty=lambda: False))
    assert "stdin: not UTF-8 text (invalid start byte at byte 5)" in _one_line(capsys, "generate", str(run), "-p", "-")
    # a byte-order mark (a Windows editor's) is not prompt text: the same output as without it, from a file and stdin
    outs = []
    for prompt in (b"Emma\n", b"\xef\xbb\xbfEmma\n"):
        (tmp_path / "p.txt").write_bytes(prompt)
        for source in (["--prompt-file", str(tmp_path / "p.txt")], ["-p", "-"]):
            monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(prompt), isatty=lambda: False))
            assert main(["generate", str(run), *source, "-n", "4", "--temperature", "0"]) == 0
            outs.append(capsys.readouterr().out)
    assert outs[0].startswith("Emma") and len(set(outs)) == 1, outs
