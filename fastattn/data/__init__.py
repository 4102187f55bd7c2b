"""Training data: the embedded corpus (Jane Austen's six novels, public domain; see CORPUS.md), its tokenizer,
the user's own .txt / .jsonl / .csv files (streamed, with a held-out split) and the batch builders of each task."""
import csv
import io
import json
import lzma
import os
import sys
from array import array
from pathlib import Path

import torch

from fastattn.data.tokenizer import SPECIALS, Tokenizer, train_bpe

__all__ = ["Tokenizer", "train_bpe", "SPECIALS", "default_corpus", "default_tokenizer", "iter_documents",
           "TokenSplits", "load_labelled", "DataError"]

HERE = Path(__file__).parent
CORPUS = HERE / "austen.txt.xz"
TOKENIZER = HERE / "austen-bpe-4096.json"
TEXT_SUFFIXES = (".txt", ".jsonl")


class DataError(ValueError):
    """A data file that is missing, unreadable or malformed (a user error: reported in one line)."""


def default_corpus() -> str:
    """The embedded corpus as one string (about 4 MB)."""
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        return f.read()


def default_tokenizer() -> Tokenizer:
    """The byte-level BPE (4096 ids) trained on the embedded corpus."""
    return Tokenizer.load(TOKENIZER)


def _files(paths, suffixes):
    """The files named and those in the folders named (suffixes in any case; hidden files and folders, .git/ or
    .ipynb_checkpoints/, left out)."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in suffixes and
                           not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                raise DataError(f"{p}: no {' / '.join(suffixes)} files in this folder")
            yield from found
        elif p.is_file():
            if p.suffix.lower() not in suffixes:
                raise DataError(f"{p}: expected a {' / '.join(suffixes)} file or a folder of them")
            yield p
        else:
            raise DataError(f"{p}: no such file or folder")


def _paragraphs(lines):
    buf = []
    for line in lines:
        if line.strip():
            buf.append(line)
        elif buf:
            yield "".join(buf)
            buf = []
    if buf:
        yield "".join(buf)


def _jsonl(f, path):
    """(line number, object) of every non-blank line of a JSONL file; a string with a lone surrogate ("\\ud800":
    valid JSON, not text) is a DataError."""
    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if "\\u" in line:  # (only an escape can make one)
                for value in obj.values() if isinstance(obj, dict) else [obj]:
                    if isinstance(value, str) and not _is_text(value):
                        raise DataError(f"{path}:{n}: a string with a lone surrogate (an escape such as \\ud800), "
                                        "not text")
            yield n, obj


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_WARNED = set()


def _warn_once(message):
    """message on stderr, once a process (and from rank 0 only in a torchrun launch)."""
    if message not in _WARNED and os.environ.get("RANK", "0") in ("", "0"):
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def iter_documents(paths=None):
    """Documents, streamed: paragraphs of the .txt files, the "text" field (or the string) of each .jsonl line.
    paths=None: the embedded corpus."""
    if not paths:
        yield from _paragraphs(io.StringIO(default_corpus()))
        return
    for path in _files(paths, TEXT_SUFFIXES):
        try:
            with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte-order mark, Excel's or Notepad's, is no text)
                if path.suffix.lower() == ".txt":
                    yield from _paragraphs(f)
                    continue
                for n, obj in _jsonl(f, path):
                    text = obj.get("text") if isinstance(obj, dict) else obj
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{n}: expected a string or an object with a \"text\" string")
                    yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def held_out(i, fraction):
    """Document i belongs to the held-out split (an even spread of `fraction` of the documents)."""
    return int((i + 1) * fraction) > int(i * fraction)


def split_rows(rows, fraction):
    """(train, val) lists of rows (at least 2): held_out's spread, at least one row held out (the last, where
    there are fewer than 1 / fraction); fraction 1: every row in both (``fastattn eval --data``: a test file)."""
    if fraction >= 1:
        return list(rows), list(rows)
    train, val = [], []
    for i, row in enumerate(rows):
        (val if held_out(i, fraction) else train).append(row)
    if not val:
        val.append(train.pop())
    return train, val


class TokenSplits:
    """Every document tokenized into one train and one held-out stream of ids, documents separated by EOS: at
    least one document held out where there are two; val_fraction 1: every document in both streams (``fastattn
    eval --data``: the whole file is evaluated)."""

    def __init__(self, tokenizer, paths=None, val_fraction=0.02, max_tokens=None):
        self.tokenizer, self.whole = tokenizer, val_fraction >= 1
        train, val, last, docs = array("i"), array("i"), 0, 0
        for docs, doc in enumerate(iter_documents(paths), 1):
            ids = tokenizer.encode(doc)
            ids.append(tokenizer.eos_id)
            if self.whole or held_out(docs - 1, val_fraction):
                val.extend(ids)
            else:
                last = len(train)
                train.extend(ids)
            if max_tokens and len(train) + len(val) >= max_tokens:
                break
        if self.whole:
            train = val
        self.train = torch.frombuffer(train, dtype=torch.int32).long() if train else torch.zeros(0, dtype=torch.long)
        self.val = torch.frombuffer(val, dtype=torch.int32).long() if val else torch.zeros(0, dtype=torch.long)
        if len(self.train) < 2:
            raise DataError("the data is empty" if self.whole else "the training data is empty")
        # fewer than 1 / val_fraction documents: the last one is held out, where both parts fill a window
        self._last = last if not self.whole and not val and docs >= 2 else None

    def _hold_out_last(self, length: int) -> None:
        """check_window's part: hold out the last document when held_out's spread kept none (small data), if the
        training part and it each hold more than length tokens; else none is, said once (held-out losses are then
        the training data's)."""
        last, self._last = self._last, None
        if last is not None and last > length and len(self.train) - last > length:
            self.train, self.val = self.train[:last], self.train[last:]
        elif len(self.val) < 2:
            _warn_once("no document is held out (too few, or too short, for --val-fraction and --seq-len): held-out "
                       "losses are the training data's")

    def split(self, name):
        return self.train if name == "train" or len(self.val) < 2 else self.val

    def check_window(self, length):
        """Raise DataError unless each split holds more than length tokens (windows are never cut short); a
        held-out split of fewer than 2 tokens is none: evaluation reads the training split then."""
        self._hold_out_last(length)
        splits = [("the data", self.val)] if self.whole else \
            [("the training data", self.train), ("the held-out data", self.val)]
        for what, data in splits:
            held = what == "the held-out data"
            if len(data) <= length and not (held and len(data) < 2):
                more = " or a larger held-out share (--val-fraction)" if held else ""
                raise DataError(f"{what} has {len(data)} tokens, too few for windows of {length}: give more text, a "
                                f"shorter --seq-len{more}")

    def blocks(self, split, batch, length, generator=None, index=None):
        """(batch, length) windows: at random offsets (from generator), or the index-th run of consecutive ones."""
        data = self.split(split)
        if len(data) <= length:
            raise DataError(f"the {split} split has {len(data)} tokens, too few for windows of {length}")
        hi = len(data) - length
        if index is None:
            starts = torch.randint(0, hi, (batch,), generator=generator)
        else:
            starts = (torch.arange(batch) + index * batch) * length % (hi + 1)  # (hi: the last full window)
        return torch.stack([data[s:s + length] for s in starts.tolist()])


def _label(value, where):
    """A label's name: a string stripped, a number as an integer where it is one (1, 1.0 and "1" are one label),
    a bool as "true" / "false"; anything else (null, a list, an empty string) is a DataError."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"{where}: label must be a non-empty string or a number, got {value!r}")


def load_labelled(path, val_fraction=0.1):
    """(train, val, labels) from a JSONL ({"text": ..., "label": ...} per line) or CSV (text,label columns) file;
    train/val are lists of (text, label index); labels are the sorted distinct labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                    raise DataError(f"{path}: the CSV header must name the columns text and label")
                for r in reader:
                    if not isinstance(r["text"], str) or r["label"] is None:  # (a short row: DictReader fills None)
                        raise DataError(f"{path}:{reader.line_num}: a row without its text or label")
                    rows.append((r["text"], _label(r["label"], f"{path}:{reader.line_num}")))
            elif path.suffix.lower() == ".jsonl":
                for n, obj in _jsonl(f, path):
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "label" not in obj:
                        raise DataError(f"{path}:{n}: expected {{\"text\": string, \"label\": ...}}")
                    rows.append((obj["text"], _label(obj["label"], f"{path}:{n}")))
            else:
                raise DataError(f"{path}: labelled data must be .jsonl or .csv")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs at least two labelled examples")
    labels = sorted({lab for _, lab in rows})
    index = {lab: i for i, lab in enumerate(labels)}
    return (*split_rows([(text, index[lab]) for text, lab in rows], val_fraction), labels)


def is_pairs_file(path) -> bool:
    """Whether path is a .jsonl whose first record has "source" and "target", or a .csv with those columns: the
    clm and seq2seq tasks' supervised pairs (else their files are text)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                return {"source", "target"} <= set(csv.DictReader(f).fieldnames or ())
            if path.suffix.lower() == ".jsonl":
                first = next((line for line in f if line.strip()), "")
                obj = json.loads(first) if first else None
                return isinstance(obj, dict) and "source" in obj and "target" in obj
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


def load_pairs(path, val_fraction=0.1):
    """(train, val) lists of (source, target) texts from a JSONL ({"source": ..., "target": ...} per line) or CSV
    (source,target columns) file."""
    path = Path(path)
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                for r in reader:
                    if not isinstance(r.get("source"), str) or not isinstance(r.get("target"), str):
                        raise DataError(f"{path}:{reader.line_num}: a row without a source and a target")
                    rows.append((r["source"], r["target"]))
            else:
                for n, obj in _jsonl(f, path):
                    if not isinstance(obj, dict) or not isinstance(obj.get("source"), str) or \
                            not isinstance(obj.get("target"), str):
                        raise DataError(f"{path}:{n}: expected {{\"source\": string, \"target\": string}}")
                    rows.append((obj["source"], obj["target"]))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs at least two source / target pairs")
    return split_rows(rows, val_fraction)
