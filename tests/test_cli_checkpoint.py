"""Checkpoints of `fastattn train`: resume is bit-exact across kill -9, SIGINT / SIGTERM save and exit cleanly,
a truncated or corrupt checkpoint is refused and the previous one used, user errors are one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastattn.cli import main
from fastattn.cli.checkpoint import CheckpointError, verify

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tokenizer", "bytes", "--d-model", "32", "--n-layer", "2", "--n-head", "2", "--seq-len", "16",
        "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", "--log-every", "5",
        "--max-data-tokens", "20000", "--warmup", "3", "--dropout", "0.1", "--lr", "3e-3"]


def cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fastattn", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def weights(path):
    return load_file(Path(path) / "model.safetensors")


def wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_resume_after_kill9_is_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    assert main(["train", *TINY, "--steps", "20", "--ckpt-every", "10", "--out", str(straight)]) == 0
    killed = tmp_path / "killed"
    proc = cli("train", *TINY, "--steps", "20", "--ckpt-every", "10", "--step-delay", "0.3", "--out", str(killed))
    wait_for(killed / "ckpt-0000010", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ckpt-0000020").exists()
    assert main(["train", *TINY, "--steps", "20", "--ckpt-every", "10", "--out", str(killed), "--resume"]) == 0
    a, b = weights(straight / "ckpt-0000020"), weights(killed / "ckpt-0000020")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "ckpt-0000020" / "state.pt", weights_only=True)
    sb = torch.load(killed / "ckpt-0000020" / "state.pt", weights_only=True)
    assert torch.equal(sa["data_rng"], sb["data_rng"]) and torch.equal(sa["rng"], sb["rng"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_exits_cleanly(tmp_path, sig):
    run = tmp_path / "run"
    proc = cli("train", *TINY, "--steps", "1000", "--ckpt-every", "2", "--step-delay", "0.2", "--out", str(run))
    wait_for(run / "ckpt-0000002", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"signal {sig.name}" in err and "Traceback" not in err
    steps = sorted(int(p.name[5:]) for p in run.glob("ckpt-*"))
    assert steps[-1] > 2 and steps[-1] < 1000
    verify(run / f"ckpt-{steps[-1]:07d}")
    assert (run / "model" / "model.safetensors").is_file()


def test_corrupt_checkpoint_refused_previous_used(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(run)]) == 0
    f = run / "ckpt-0000004" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        verify(run / "ckpt-0000004")
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "6", "--ckpt-every", "2", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "ckpt-0000004" in err and "resumed from" in err and "ckpt-0000002" in err
    # a flipped byte of the same size is caught by the hash
    g = run / "ckpt-0000006" / "state.pt"
    raw = bytearray(g.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    g.write_bytes(bytes(raw))
    assert main(["generate", str(run / "ckpt-0000006"), "-p", "a", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt" in err and "Traceback" not in err


def test_keep_never_counts_a_corrupt_checkpoint(tmp_path, capsys):
    """Resumed past a corrupt newest checkpoint (or one without its manifest), the run sets it aside: --keep kept
    it as the newest and deleted every new checkpoint as it was written, leaving nothing to resume from."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "6", "--ckpt-every", "2", "--keep", "5", "--out", str(run)]) == 0
    f = run / "ckpt-0000006" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    (run / "ckpt-0000004" / "manifest.json").unlink()
    shutil.rmtree(run / "model")
    assert main(["train", *TINY, "--steps", "7", "--ckpt-every", "1", "--keep", "1", "--out", str(run),
                 "--resume"]) == 0
    err = capsys.readouterr().err
    assert "ckpt-0000006 does not verify: moved to ckpt-0000006.corrupt" in err and "manifest.json is missing" in err
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))
    assert names == ["ckpt-0000004.corrupt", "ckpt-0000006.corrupt", "ckpt-0000007"], names
    verify(run / "ckpt-0000007")


def test_resume_cleans_what_a_killed_save_left(tmp_path, capsys):
    """A save killed mid-write leaves .NAME.tmp-PID (removed on --resume) or, between its renames, .NAME.old-PID:
    the step's previous checkpoint, put back when NAME is missing. Folders of a live process are left alone."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--keep", "5", "--out", str(run)]) == 0
    dead = next(p for p in range(4_000_000, 4_100_000) if not os.path.exists(f"/proc/{p}"))
    (run / "ckpt-0000004").rename(run / f".ckpt-0000004.old-{dead}")
    (run / f".ckpt-0000006.tmp-{dead}").mkdir()
    (run / f".ckpt-0000006.tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    (run / f".ckpt-0000008.tmp-{os.getpid()}").mkdir()  # a live process's: not touched
    shutil.rmtree(run / "model")
    assert main(["train", *TINY, "--steps", "5", "--ckpt-every", "5", "--keep", "5", "--out", str(run),
                 "--resume"]) == 0
    assert "ckpt-0000004 restored" in capsys.readouterr().err
    names = sorted(p.name for p in run.iterdir() if "ckpt" in p.name)
    assert names == [f".ckpt-0000008.tmp-{os.getpid()}", "ckpt-0000002", "ckpt-0000004", "ckpt-0000005"], names
    state = json.loads((run / "ckpt-0000005" / "train_state.json").read_text())
    assert state["step"] == 5


def test_run_folder_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_state_has_no_code(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    state = torch.load(run / "ckpt-0000002" / "state.pt", weights_only=True)  # raises on any pickled object
    assert set(state) >= {"step", "optimizer", "rng", "data_rng"}


def test_resume_with_changed_options_refused_metrics_not_repeated(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--keep", "5", "--log-every", "1",
                 "--out", str(run)]) == 0
    shutil.rmtree(run / "ckpt-0000004")  # as if killed after logging steps 3 and 4
    for args, needle in ((["--d-model", "64"], "--d-model 64 (the run's: 32)"),
                         (["--task", "mlm"], "--task 'mlm' (the run's: 'clm')"),
                         (["--mode", "lora"], "--mode 'lora' (the run's: 'full')")):
        capsys.readouterr()
        assert main(["train", *TINY, "--steps", "4", "--out", str(run), "--resume", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--log-every", "1", "--out", str(run),
                 "--resume"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_out_folder_of_other_files_not_overwritten(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "metrics.jsonl").write_text("{}\n")
    assert main(["train", *TINY, "--steps", "2", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds files but no checkpoint (notes.txt)" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl", "notes.txt"]
    assert (mine / "metrics.jsonl").read_text() == "{}\n"


def test_out_folder_of_a_run_killed_before_its_first_checkpoint_is_reused(tmp_path):
    """Only what a run writes before its first checkpoint (its config, metrics rows, a temp folder): a new run
    starts there, and metrics.jsonl holds its rows only."""
    run = tmp_path / "run"
    (run / ".ckpt-0000200.tmp-123").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 99.0}) + "\n")
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r.get("loss") != 99.0 for r in rows)


def test_ckpt_every_zero_saves_at_the_end(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--ckpt-every", "0", "--out", str(run)]) == 0
    assert [p.name for p in run.glob("ckpt-*")] == ["ckpt-0000003"]
