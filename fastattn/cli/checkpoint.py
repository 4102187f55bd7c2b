"""Checkpoints: one folder per step, written atomically, verified on load, the last N kept.

    RUN/ckpt-0000100/  model.safetensors  config.json (the model's)  tokenizer.json
                       train_state.json (model type, task, step, train config)  state.pt (optimizer, RNG, data)
                       manifest.json (sha256 + size of every file; written last)

The files go to a temporary folder, each fsync'd, then the folder is renamed into place (and its parent fsync'd),
so a crash leaves either the whole checkpoint or none. config.json + model.safetensors are what the models'
from_pretrained reads. state.pt holds tensors and plain containers only and is read with weights_only=True.
"""
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from fastattn.cli.config import CLIError

CKPT_RE = re.compile(r"^ckpt-(\d{7,})$")


class CheckpointError(CLIError):
    """A checkpoint that is missing, truncated or corrupt."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path):
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(final, writers):
    """Atomically create folder `final` from writers {file name: fn(path)}; adds manifest.json."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {}
    for name, write in writers.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        write(tmp / name)
        _fsync_file(tmp / name)
        manifest[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / "manifest.json")
    _fsync_dir(tmp)
    if final.exists():  # same step written again (e.g. a signal right after a periodic save)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def verify(path):
    """Raise CheckpointError unless every file in path's manifest is there with its size and sha256 (a folder
    without a manifest passes as a plain save_pretrained folder, unless it is named as a run's checkpoint)."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        if CKPT_RE.match(path.name):  # train writes the manifest of each of its checkpoints
            raise CheckpointError(f"{path}: manifest.json is missing")
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            return  # a plain save_pretrained folder: safetensors checks its own header
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json / model.safetensors)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt manifest.json ({e})") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("sha256"), str)
            for w in manifest.values()):
        raise CheckpointError(f"{path}: corrupt manifest.json (expected {{file: {{\"sha256\", \"bytes\"}}}})")
    for name, want in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated ({f.stat().st_size} of {want['bytes']} bytes)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupt (sha256 mismatch)")


def list_checkpoints(run_dir):
    """Checkpoint folders of a run, newest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_valid(run_dir, warn=print):
    """The newest checkpoint of run_dir that verifies (corrupt ones are reported and skipped), or None."""
    for p in list_checkpoints(run_dir):
        try:
            verify(p)
            return p
        except CheckpointError as e:
            warn(f"warning: skipping {e}")
    return None


def resolve(path):
    """A checkpoint folder from a path to one, or to a run folder (its final RUN/model, else its newest valid
    checkpoint), verified."""
    p = locate(path, warn=lambda m: print(m, file=sys.stderr))
    verify(p)
    return p


def locate(path, warn=print):
    """The folder resolve picks, not verified itself (a run folder's newest checkpoint is: latest_valid)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    if p.is_file():  # e.g. `eval --data a.txt b.txt`: these commands' options take one value each
        raise CheckpointError(f"{p}: a file, not a checkpoint folder (the folder holding config.json; if it was "
                              "meant as a second --data file: --data a.txt --data b.txt)")
    if not (p / "config.json").is_file():
        ck = p / "model" if (p / "model" / "config.json").is_file() else latest_valid(p, warn)
        if ck is None:
            raise CheckpointError(f"{p}: no valid checkpoint in this folder")
        p = ck
    return p


_LEFTOVER_RE = re.compile(r"^\.(ckpt-\d{7,})\.(tmp|old)-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def clean_leftovers(run_dir, warn=print):
    """What write_folder leaves when its process is killed (kill -9, OOM) mid-write: a .NAME.tmp-PID folder
    (removed) and, killed between its two renames, a .NAME.old-PID folder, the step's previous checkpoint (put back
    when NAME is missing, else removed). Only those of processes no longer running on this machine."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in sorted(run_dir.iterdir()):
        m = _LEFTOVER_RE.match(p.name)
        if not m or not p.is_dir() or _alive(int(m.group(3))):
            continue
        final = run_dir / m.group(1)
        if m.group(2) == "old" and not final.exists():
            p.rename(final)
            warn(f"warning: {final.name} restored from {p.name} (a save was interrupted)")
        else:
            shutil.rmtree(p, ignore_errors=True)


def resume_point(run_dir, rank0: bool, barrier, warn=print):
    """The newest checkpoint of run_dir that verifies (None: none), after rank 0 has cleaned what killed saves left
    (clean_leftovers; the other ranks wait at ``barrier``)."""
    if rank0:
        clean_leftovers(run_dir, warn)
    barrier()
    return latest_valid(run_dir, warn)


def set_aside_newer(run_dir, path, warn=print):
    """Move the run's checkpoints newer than ``path`` (those latest_valid skipped: they do not verify) to
    NAME.corrupt, out of its list: the resumed run writes those steps again, and --keep counted them (it kept a
    corrupt newest checkpoint and deleted each new one)."""
    for p in list_checkpoints(run_dir):
        if p == path:
            break
        dest, i = p.with_name(p.name + ".corrupt"), 1
        while dest.exists():
            dest, i = p.with_name(f"{p.name}.corrupt{i}"), i + 1
        p.rename(dest)
        warn(f"warning: {p.name} does not verify: moved to {dest.name}")


def prune(run_dir, keep):
    for p in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(p, ignore_errors=True)


def load_state(path):
    """state.pt, tensors and containers only (weights_only=True: never unpickles code)."""
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt file for the user
        raise CheckpointError(f"{path}: cannot read state.pt ({type(e).__name__}: {e})") from None


def train_state(folder):
    """A checkpoint folder's train_state.json (model type, task, labels, train config), {} where it has none (an
    exported or imported model)."""
    path = Path(folder) / "train_state.json"
    return read_json(path) if path.is_file() else {}


def read_json(path):
    """A checkpoint's JSON object (config.json, train_state.json, ...); anything else is a CheckpointError."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupt (a JSON {type(obj).__name__}, not an object)")
    return obj


def save_weights(model, path):
    """model's weights as safetensors (fastattn.models.checkpoint.save_weights: tied weights stored once)."""
    from fastattn.models import checkpoint as weights
    weights.save_weights(model, path)


def load_weights(model, path):
    """Copy what save_weights wrote into model, in place; a bad file is a CheckpointError (one line for the user)."""
    from fastattn.models import checkpoint as weights
    try:
        weights.load_weights(model, path)
    except weights.CheckpointError as e:
        raise CheckpointError(str(e)) from None
