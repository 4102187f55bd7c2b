"""The user's data files: what a folder reads, byte-order marks, lone surrogates, the held-out split of small data,
eval --data on all of a file, the TOML reader's top level, and the masking rates of the mlm and seq2seq tasks."""
import json
import re
import types

import pytest
import torch

import fastattn.data as data
from fastattn.cli import main
from fastattn.cli.config import CLIError, build
from fastattn.cli.evaluate import make_task
from fastattn.cli.tasks import IGNORE, MLMTask, Seq2SeqTask
from fastattn.cli.train import TrainConfig
from fastattn.data import (DataError, TokenSplits, Tokenizer, default_tokenizer, is_pairs_file, iter_documents,
                           load_labelled, load_pairs)


def _pairs(path, n):
    path.write_text("".join(json.dumps({"source": f"question {i}", "target": f"answer {i}"}) + "\n" for i in range(n)))
    return path


def test_folders_skip_hidden_files_and_read_any_case(tmp_path):
    """A folder's hidden files and folders (.git/, Jupyter's .ipynb_checkpoints/ copies) are not data; .TXT is .txt."""
    for name, text in (("a.txt", "visible"), (".hidden.txt", "hidden"), (".git/x.txt", "git"),
                       (".ipynb_checkpoints/a-checkpoint.txt", "copy"), ("B.TXT", "upper"), ("sub/c.JSONL", '"j"')):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert list(iter_documents([tmp_path])) == ["upper\n", "visible\n", "j"]
    assert list(iter_documents([tmp_path / "B.TXT"])) == ["upper\n"]


def test_byte_order_marks_are_not_text(tmp_path):
    """UTF-8 files with a BOM (Excel's "CSV UTF-8"): the CSV header is read, the BOM is not in the first document."""
    bom = "\ufeff"
    (tmp_path / "l.csv").write_text(bom + "text,label\r\ngood,pos\r\nbad,neg\r\n", encoding="utf-8")
    assert load_labelled(tmp_path / "l.csv")[2] == ["neg", "pos"]
    (tmp_path / "p.csv").write_text(bom + "source,target\r\na,b\r\nc,d\r\n", encoding="utf-8")
    assert is_pairs_file(tmp_path / "p.csv") and sorted(sum(load_pairs(tmp_path / "p.csv"), [])) == [("a", "b"),
                                                                                                    ("c", "d")]
    (tmp_path / "t.txt").write_text(bom + "first\n", encoding="utf-8")
    (tmp_path / "t.jsonl").write_text(bom + '{"text": "second"}\n', encoding="utf-8")
    assert list(iter_documents([tmp_path / "t.txt", tmp_path / "t.jsonl"])) == ["first\n", "second"]


@pytest.mark.parametrize("kind", ["text", "pairs", "labelled"])
def test_lone_surrogate_is_a_data_error(tmp_path, kind):
    """'"\\ud800"' is valid JSON but not text: a DataError naming the line (the tokenizer's encode raised)."""
    good = {"text": {"text": "fine"}, "pairs": {"source": "a", "target": "b"}, "labelled": {"text": "a", "label": 1}}
    bad = dict(good[kind])
    bad[next(iter(bad))] = "bad \ud800 here"
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(good[kind]) + "\n" + json.dumps(bad) + "\n")  # (json.dumps escapes it: \ud800)
    load = {"text": lambda p: list(iter_documents([p])), "pairs": load_pairs, "labelled": load_labelled}[kind]
    with pytest.raises(DataError, match=r"s\.jsonl:2: a string with a lone surrogate"):
        load(path)


def test_small_data_holds_one_document_out(tmp_path, monkeypatch, capsys):
    """Fewer documents (rows) than 1 / --val-fraction: the last one is held out, not the training data evaluated as
    held-out, where it and the rest each fill a window (check_window decides); else (one document, or one too
    short for --seq-len, data that trained before) none is, with a warning naming --val-fraction, once."""
    monkeypatch.setattr(data, "_WARNED", set(), raising=False)
    (tmp_path / "d.txt").write_text("".join(f"document {i} of a few\n\n" for i in range(3)))
    tok = Tokenizer()
    splits = TokenSplits(tok, [tmp_path / "d.txt"], 0.02)
    splits.check_window(8)
    assert tok.decode(splits.val.tolist()) == "document 2 of a few\n" and (splits.train == tok.eos_id).sum() == 2
    assert splits.split("val") is splits.val and capsys.readouterr().err == ""
    (tmp_path / "one.txt").write_text("a single document\n")
    (tmp_path / "short_last.txt").write_text("a first document, long enough for a window or two\n\nshort\n")
    for name in ("one.txt", "one.txt", "short_last.txt"):
        splits = TokenSplits(Tokenizer(), [tmp_path / name], 0.02)
        splits.check_window(8)
        assert splits.split("val") is splits.train
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "--val-fraction" in err
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(9)))
    train, val, _ = load_labelled(tmp_path / "c.jsonl", 0.1)
    assert [t for t, _ in train] == [f"t{i}" for i in range(8)] and val == [("t8", 0)]
    train, val = load_pairs(_pairs(tmp_path / "p.jsonl", 2), 0.1)
    assert train == [("question 0", "answer 0")] and val == [("question 1", "answer 1")]


def _state(task, **cfg):
    return {"train_config": {"task": task, "seq_len": 16, "val_fraction": 0.02, "max_data_tokens": 64, **cfg}}


@pytest.mark.parametrize("task", ["clm", "mlm", "seq2seq"])
def test_eval_data_reads_all_of_the_file(tmp_path, task):
    """eval --data FILE: every window of the file's text once, in order (the run's --max-data-tokens not applied);
    before, its 2% held-out slice, wrapped around to --batches x --batch-size."""
    path = tmp_path / "test.txt"
    path.write_text("".join(f"test document {i:03d}, its own words.\n\n" for i in range(60)))
    stream = TokenSplits(Tokenizer(), [path], 1.0).val  # every document, in order
    assert len(stream) > 20 * 64
    t = make_task(_state(task), Tokenizer(), data=[str(path)])
    window = t.window()
    batches = list(t.every_row(batch_size=7))
    assert len(batches) == -(-(len(stream) // window) // 7) and batches[-1][0]["input_ids"].shape[0] <= 7
    if task == "clm":
        rows = torch.cat([torch.cat([i["input_ids"], tg[:, -1:]], 1) for i, tg in batches])
    else:
        rows = torch.cat([tg["labels"] if task == "mlm" else tg for _, tg in batches])
        if task == "mlm":  # the masked tokens' labels, the others' inputs
            inputs = torch.cat([i["input_ids"] for i, _ in batches])
            rows = torch.where(rows == IGNORE, inputs, rows)
    n = len(stream) // window
    assert torch.equal(rows.flatten(), stream[:n * window])


@pytest.mark.parametrize("task", ["clm", "seq2seq"])
def test_eval_data_scores_every_pair_once(tmp_path, task):
    path = _pairs(tmp_path / "p.jsonl", 23)
    t = make_task(_state(task), Tokenizer(), data=[str(path)])
    batches = list(t.every_row(batch_size=5))
    assert sum(b[0]["input_ids"].shape[0] for b in batches) == 23
    sources = [Tokenizer().decode(row.tolist()) for i, _ in batches for row in i["input_ids"]]
    assert [re.match(r"question (\d+)", s)[1] for s in sources] == [str(i) for i in range(23)]


def test_eval_data_cli(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("".join(f"training text number {i}.\n\n" for i in range(100)))
    (tmp_path / "test.txt").write_text("".join(f"test text {i}.\n\n" for i in range(30)))
    run = tmp_path / "run"
    assert main(["train", "--tokenizer", "bytes", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len",
                 "16", "--batch-size", "4", "--steps", "1", "--eval-every", "0", "--data", str(tmp_path / "train.txt"),
                 "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "test.txt"), "--batch-size", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    n_tokens = len((tmp_path / "test.txt").read_text().replace("\n\n", "\n\0"))  # bytes + an end token each
    assert res["split"] == "all" and res["examples"] == n_tokens // 17


@pytest.mark.parametrize("text, needle", [
    ("steps = 1\n[train]\nbatch_size = 2\n", "'steps' is at the top level, beside the [train] table"),
    ("stepz = 1\n[train]\nbatch_size = 2\n", "'stepz' is at the top level"),
    ("[train]\nbatch_size = 2\n[trian]\nsteps = 1\n", "unknown table [trian]"),
])
def test_toml_keys_beside_the_table_are_errors(tmp_path, text, needle):
    """A [train] table is all that is read: a key beside it (once silently ignored) is an error naming it."""
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(CLIError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build(TrainConfig, types.SimpleNamespace(config=str(tmp_path / "c.toml")), "train")
    (tmp_path / "ok.toml").write_text("[train]\nbatch_size = 2\n[generate]\nseed = 3\n")
    assert build(TrainConfig, types.SimpleNamespace(config=str(tmp_path / "ok.toml")), "train").batch_size == 2


def _seq2seq(mask_prob):
    cfg = types.SimpleNamespace(data=None, val_fraction=0.05, max_data_tokens=20000, seq_len=128, mask_prob=mask_prob)
    task = Seq2SeqTask(cfg, default_tokenizer())
    task.sentence_end[:] = False  # no sentence shuffle: the kept tokens stay in order
    return task


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_seq2seq_masks_the_documented_share(mask_prob):
    """BART denoising replaces 2 x --mask-prob of the tokens by <mask> spans (once ~24% at 0.15: span starts drawn
    at each position, the budget only a cap); the tokens kept stay in order."""
    task, g = _seq2seq(mask_prob), torch.Generator().manual_seed(0)
    mask, removed, spans = task.tok.mask_id, 0, 0
    for _ in range(100):
        x = task.data.blocks("train", 1, 128, g)[0]
        out = task._corrupt(x, g)
        kept = [t for t in out if t != mask]
        it = iter(x.tolist())
        assert all(t in it for t in kept)  # a subsequence
        removed, spans = removed + 128 - len(kept), spans + len(out) - len(kept)
    assert abs(removed / 12800 - 2 * mask_prob) < 0.01
    assert 2.5 < removed / spans < 3.5  # Poisson(3) lengths


def test_mlm_never_masks_end_tokens_and_nsp_needs_room(tmp_path):
    """The end token between documents is never masked (HF's collator masks no special token); --nsp with a
    --seq-len that leaves no text (once: rows [CLS] [SEP] [SEP], the [CLS] masked) is an error naming --seq-len."""
    (tmp_path / "d.txt").write_text("".join(f"doc {i}\n\n" for i in range(400)))
    cfg = types.SimpleNamespace(data=[str(tmp_path)], val_fraction=0.1, max_data_tokens=None, seq_len=16,
                                mask_prob=0.5, nsp=False)
    tok = Tokenizer()
    task = MLMTask(cfg, tok)
    inputs, target = task.batch("train", 64, torch.Generator().manual_seed(0))
    original = torch.where(target["labels"] == IGNORE, inputs["input_ids"], target["labels"])
    assert (original == tok.eos_id).sum() > 100 and not (target["labels"] == tok.eos_id).any()
    for seq_len in (3, 4):
        with pytest.raises(CLIError, match=f"--nsp: --seq-len {seq_len} leaves no token"):
            MLMTask(types.SimpleNamespace(**{**vars(cfg), "nsp": True, "seq_len": seq_len}), tok)
    inputs, target = MLMTask(types.SimpleNamespace(**{**vars(cfg), "nsp": True, "seq_len": 5}), tok).batch("train", 8)
    assert not ((inputs["input_ids"] == tok.cls_id) & (target["labels"] != IGNORE)).any()
