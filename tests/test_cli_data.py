"""The embedded corpus and tokenizer, data streaming and the held-out split, LoRA merging, the TOML reader."""
import dataclasses
import json

import pytest
import torch

from fastattn.cli import finetune
from fastattn.cli.config import CLIError, build, to_toml
from fastattn.cli.train import TrainConfig, lr_at
from fastattn.data import (CORPUS, DataError, TokenSplits, Tokenizer, default_corpus, default_tokenizer, held_out,
                           iter_documents, load_labelled, train_bpe)


def test_corpus_and_licence_note():
    text = default_corpus()
    assert 1_000_000 < len(text.encode()) < 5_000_000 and CORPUS.stat().st_size < 1_500_000
    assert text.startswith("SENSE AND SENSIBILITY") and "It is a truth universally acknowledged" in text
    note = (CORPUS.parent / "CORPUS.md").read_text()
    assert "public domain" in note.lower()


def test_default_tokenizer_round_trip():
    tok = default_tokenizer()
    assert tok.vocab_size == 4096
    sample = default_corpus()[:20000] + " ünïcödé ✓ _italics_ 1817\n\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and len(ids) < len(sample) / 3
    assert tok.decode([tok.eos_id, tok.mask_id]) == ""


def test_bpe_training_and_json(tmp_path):
    tok = train_bpe("the cat sat on the mat. the cat ate. " * 20, 300)
    assert 256 < tok.vocab_size <= 300
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert again.merges == tok.merges and again.encode("the cat") == tok.encode("the cat")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "byte_bpe", "merges": [[1, 999]]}))
    with pytest.raises(ValueError, match="malformed"):
        Tokenizer.load(tmp_path / "bad.json")


def test_held_out_split_is_an_even_spread():
    picks = [i for i in range(1000) if held_out(i, 0.02)]
    assert len(picks) == 20 and max(b - a for a, b in zip(picks, picks[1:])) == 50


def test_documents_streamed_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nstill one\n\npara two\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "json doc"}\n\n"a bare string"\n')
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert list(iter_documents([tmp_path])) == ["para one\nstill one\n", "para two\n", "json doc", "a bare string"]
    with pytest.raises(DataError, match="expected a .txt / .jsonl"):
        list(iter_documents([tmp_path / "ignored.bin"]))
    splits = TokenSplits(Tokenizer(), [tmp_path], val_fraction=0.25)
    assert len(splits.val) > 0 and len(splits.train) > len(splits.val)
    g = torch.Generator().manual_seed(0)
    assert splits.blocks("train", 3, 5, g).shape == (3, 5)


def test_windows_never_cut_short(tmp_path):
    """A split shorter than a window is an error naming it (blocks once cut the windows to the data silently)."""
    (tmp_path / "a.txt").write_text("".join(f"paragraph {i} with a few words\n\n" for i in range(8)))
    splits = TokenSplits(Tokenizer(), [tmp_path], val_fraction=0.25)
    n_train, n_val = len(splits.train), len(splits.val)
    splits.check_window(n_val - 1)
    with pytest.raises(DataError, match=f"held-out data has {n_val} tokens, too few for windows of {n_val}.*"
                                        "--val-fraction"):
        splits.check_window(n_val)
    with pytest.raises(DataError, match=f"training data has {n_train} tokens"):
        splits.check_window(n_train)
    with pytest.raises(DataError, match="too few for windows"):
        splits.blocks("val", 2, n_val)
    assert splits.blocks("val", 2, n_val - 1).shape == (2, n_val - 1)


def test_labels_by_value(tmp_path):
    """1, 1.0 and "1" are one label, true is "true", spaces around a CSV label do not count; null is an error."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in
                                               enumerate([1, 1.0, "1", " 2 ", True, 0.5])))
    train, val, labels = load_labelled(tmp_path / "a.jsonl", val_fraction=0.5)
    assert labels == ["0.5", "1", "2", "true"]
    assert sorted(i for _, i in train + val) == [0, 1, 1, 1, 2, 3]
    (tmp_path / "b.csv").write_text("text,label\nx, pos\ny,pos\n")
    assert load_labelled(tmp_path / "b.csv")[2] == ["pos"]
    (tmp_path / "c.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": null}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: label must be a non-empty string or a number, got None"):
        load_labelled(tmp_path / "c.jsonl")
    (tmp_path / "d.csv").write_text("text,label\nx,1\ny,\n")
    with pytest.raises(DataError, match=r"d\.csv:3: label must be"):
        load_labelled(tmp_path / "d.csv")


def test_lora_merge_equals_unmerged():
    from fastattn.models import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=16))
    finetune.add_lora(model, rank=4, alpha=8.0)
    lora = [m for m in model.modules() if isinstance(m, finetune.LoRALinear)]
    assert len(lora) == 8  # wqkv, wo, w_in, w_out per layer
    for m in lora:
        torch.nn.init.normal_(m.lora_b, std=0.05)  # as after training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randint(0, 50, (2, 12))
    model.eval()
    with torch.no_grad():
        before = model(x).logits
        finetune.merge(model)
        after = model(x).logits
    assert not any(isinstance(m, finetune.LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(GPT(model.config).state_dict())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_toml_round_trip(tmp_path):
    cfg = TrainConfig(steps=7, data=["a", "b"], lr=0.01, init="x")
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))

    class Args:
        config = str(path)

    assert dataclasses.asdict(build(TrainConfig, Args())) == dataclasses.asdict(cfg)
    path.write_text("__import__ = 1\n")
    with pytest.raises(CLIError, match="unknown key"):
        build(TrainConfig, Args())


def test_schedule_warmup_and_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_optimizer_decays_only_2d_weights():
    from fastattn.cli.train import configure_optimizer
    from fastattn.models import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50, d_model=32, n_layer=1, n_head=4, max_seq_len=16))
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.dim() < 2 for p in no_decay["params"])


def test_pairs_files(tmp_path):
    """Source / target pairs: .jsonl records or a .csv with those columns are pairs files, text is not; a malformed
    record or row is a DataError naming its line."""
    from fastattn.data import DataError, is_pairs_file, load_pairs
    good_csv, good_jsonl = tmp_path / "p.csv", tmp_path / "p.jsonl"
    good_csv.write_text("source,target\n" + "".join(f"s{i},t{i}\n" for i in range(20)))
    good_jsonl.write_text("".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(20)))
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "hello"}) + "\n")
    assert is_pairs_file(good_csv) and is_pairs_file(good_jsonl) and not is_pairs_file(text)
    train, val = load_pairs(good_csv, 0.1)
    assert len(train) + len(val) == 20 and val and set(train).isdisjoint(val) and train[0] == ("s0", "t0")
    bad_csv, bad_jsonl = tmp_path / "b.csv", tmp_path / "b.jsonl"
    bad_csv.write_text("source,target\na,b\nc\n")
    bad_jsonl.write_text(json.dumps({"source": "a", "target": "b"}) + "\n" + json.dumps({"source": "a"}) + "\n")
    with pytest.raises(DataError, match="b.csv:3"):
        load_pairs(bad_csv)
    with pytest.raises(DataError, match="b.jsonl:2"):
        load_pairs(bad_jsonl)
