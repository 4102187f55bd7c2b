"""CLI smoke tests of `fastattn train` (tiny models, byte tokenizer, a slice of the embedded corpus): every task and
fine-tuning mode, the run folder's files, generate / eval / quantize / prune / distillation on the results."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastattn.cli import main

TINY = ["--tokenizer", "bytes", "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--seq-len", "16",
        "--batch-size", "4", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--log-every", "2",
        "--max-data-tokens", "20000", "--warmup", "1"]


def train(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["train", *TINY, "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("gpt"), "run", "--steps", "6", "--ckpt-every", "2", "--keep", "2")


@pytest.fixture
def labelled(tmp_path):
    path = tmp_path / "labels.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": ("good fine nice " if i % 2 else "bad awful poor ") * 2, "label":
                                ["neg", "pos"][i % 2]}) + "\n")
    return path


def test_clm_run_folder(gpt_run):
    names = {p.name for p in gpt_run.iterdir()}
    assert {"metrics.jsonl", "loss.png", "model", "train_config.json", "ckpt-0000006", "ckpt-0000004"} <= names
    assert "ckpt-0000002" not in names  # --keep 2
    rows = [json.loads(line) for line in (gpt_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert all("tokens_per_s" in r and "mfu" in r for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6]
    for f in ("model.safetensors", "config.json", "tokenizer.json", "train_state.json", "state.pt", "manifest.json"):
        assert (gpt_run / "ckpt-0000006" / f).is_file()
    final, last = load_file(gpt_run / "model" / "model.safetensors"), load_file(gpt_run / "ckpt-0000006" /
                                                                                 "model.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in last)


def test_held_out_batches_keep_their_size(tmp_path, monkeypatch):
    """Each held-out batch has --batch-size rows (a token count once took the row count's name: every batch then
    had as many rows as the previous one had tokens, 4 -> 64 -> 1024 ..., out of memory at the default 8)."""
    from fastattn.cli.tasks import CLMTask
    sizes, real = [], CLMTask.batch
    monkeypatch.setattr(CLMTask, "batch", lambda self, split, n, *a, **kw: sizes.append((split, n)) or
                        real(self, split, n, *a, **kw))
    train(tmp_path, "run", "--eval-batches", "3", "--steps", "2")
    assert [n for split, n in sizes if split == "val"] == [4, 4, 4]  # one evaluation (step 2: eval-every and end)


def test_mlm_every_row_has_a_masked_token(tmp_path, monkeypatch):
    """A row the masking draw left without a masked token takes one (its lowest draw): a micro-batch of such rows had
    no label, a NaN loss that stopped the run ('a lower --lr may help'). Rows with masks keep them."""
    from fastattn.cli.tasks import IGNORE, MLMTask
    batches, real = [], MLMTask.batch
    monkeypatch.setattr(MLMTask, "batch", lambda self, *a, **kw: batches.append(real(self, *a, **kw)) or batches[-1])
    train(tmp_path, "run", "--task", "mlm", "--batch-size", "1", "--mask-prob", "0.01", "--steps", "6")
    assert batches and all(((target["labels"] != IGNORE).sum(1) >= 1).all() for _, target in batches)


def test_generate_and_eval(gpt_run, capsys, tmp_path):
    assert main(["generate", str(gpt_run), "-p", "It is", "-p", "Emma", "-n", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert "--- [0] ---\nIt is" in out.out and "--- [1] ---\nEmma" in out.out and "tokens/s" in out.err
    prompts = tmp_path / "p.txt"
    prompts.write_text("Mr. Darcy\n")
    assert main(["generate", str(gpt_run), "--prompt-file", str(prompts), "-n", "4", "--stop", "zzz"]) == 0
    assert capsys.readouterr().out.startswith("Mr. Darcy")
    assert main(["eval", str(gpt_run), "--batches", "2", "-o", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["task"] == "clm" and res["perplexity"] == pytest.approx(torch.tensor(res["loss"]).exp().item(),
                                                                       rel=1e-5)


def test_generate_greedy_is_reproducible(gpt_run, capsys):
    outs = []
    for _ in range(2):
        assert main(["generate", str(gpt_run), "-p", "She", "-n", "6", "--temperature", "0"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_init_from_a_lora_checkpoint_trains_every_weight(gpt_run, tmp_path):
    """--init from a LoRA run's checkpoint (its adapters folded in) trains in --mode full as from any checkpoint
    (was refused: 'nothing left to train', the weights loaded frozen as the adapters had left them)."""
    from fastattn.cli.loading import load_model
    lora = train(tmp_path, "lora", "--init", str(gpt_run), "--mode", "lora", "--steps", "2", "--eval-every", "0")
    model = load_model(lora / "ckpt-0000002", purpose="--init")[0]
    assert all(p.requires_grad for p in model.parameters())
    run = train(tmp_path, "full", "--init", str(lora / "ckpt-0000002"), "--steps", "2", "--eval-every", "0")
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("args", [["--task", "mlm"], ["--task", "mlm", "--nsp"], ["--task", "seq2seq"],
                                  ["--mode", "lora"], ["--mode", "prompt", "--prompt-len", "3"],
                                  ["--precision", "bf16"], ["--model-backend", "torch"],
                                  ["--grad-accum", "2", "--clip", "0.5"]])
def test_tasks_and_modes(tmp_path, args, capsys):
    run = train(tmp_path, "run", *args)
    assert (run / "model" / "model.safetensors").is_file()
    assert main(["eval", str(run), "--batches", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] > 0 and "perplexity" in res


@pytest.mark.parametrize("mode", ["full", "frozen"])
def test_classify(tmp_path, labelled, mode, capsys):
    run = train(tmp_path, "run", "--task", "classify", "--data", str(labelled), "--mode", mode, "--steps", "8",
                "--lr", "3e-3")
    assert main(["eval", str(run), "--batches", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "classify" and 0 <= res["accuracy"] <= 1 and "perplexity" not in res


def test_quantize_scores_each_held_out_row_once(tmp_path, capsys):
    """quantize's float / int8 losses read each held-out row once, as eval's (4 held-out rows in batches of 3: before,
    3 batches cycled through them, the first row counted 3 times and the others twice)."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} " * (1 + i % 5), "label": "abc"[i % 3]}) + "\n"
                            for i in range(40)))
    run = train(tmp_path, "run", "--task", "classify", "--data", str(data), "--steps", "8", "--lr", "3e-3")
    assert main(["quantize", str(run), "--eval-batches", "3", "--batch-size", "3", "--out", str(tmp_path / "q")]) == 0
    q = json.loads(capsys.readouterr().out)
    for folder, key in ((run, "loss_float"), (tmp_path / "q", "loss_int8")):
        assert main(["eval", str(folder), "--batches", "3", "--batch-size", "3"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["examples"] == 4 and res["loss"] == pytest.approx(q[key], rel=1e-6)


def test_eval_scores_every_row_of_the_given_file(tmp_path, labelled, capsys):
    """eval --data FILE scores each of its rows once: accuracy over the whole file, its real row count (before, the
    10% held out of it, cycled to --batches x --batch-size)."""
    run = train(tmp_path, "run", "--task", "classify", "--data", str(labelled), "--steps", "8", "--lr", "3e-3")
    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_text("".join(json.dumps({**r, "label": {"neg": "pos", "pos": "neg"}[r["label"]]}) + "\n"
                               for r in rows[:30]))
    accuracy = []
    for path, n in ((labelled, 40), (flipped, 30)):
        assert main(["eval", str(run), "--data", str(path), "--batch-size", "7"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["examples"] == n and res["split"] == "all"
        accuracy.append(res["accuracy"])
    # every row scored once: the flipped file's accuracy is one minus the original's on those rows
    (tmp_path / "first30.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    assert main(["eval", str(run), "--data", str(tmp_path / "first30.jsonl")]) == 0
    first30 = json.loads(capsys.readouterr().out)["accuracy"]
    assert abs(accuracy[1] - (1 - first30)) < 1e-9



def test_eval_of_the_held_out_split_counts_each_row_once(tmp_path, labelled, capsys):
    """eval RUN (no --data) scores the run's held-out rows once each, --batches at most: a 4-row split gave
    "examples": 128, its rows cycled to --batches x --batch-size, and an accuracy no row count gives."""
    run = train(tmp_path, "run", "--task", "classify", "--data", str(labelled), "--steps", "4")
    assert main(["eval", str(run), "--batch-size", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 4 and res["accuracy"] in (0, 0.25, 0.5, 0.75, 1)
    assert main(["eval", str(run), "--split", "train", "--batch-size", "5", "--batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 10

def test_training_evaluation_is_evals(tmp_path, capsys):
    """The held-out loss training records scores each held-out row once, as `fastattn eval` does at the same
    --batches / --batch-size: equal on the final checkpoint (its batches wrapped around the rows, counting some
    twice)."""
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": f"{'good fine' if i < 20 else 'bad'} {i} " * (1 + i % 4),
                                        "label": ["neg", "pos"][i < 20]}) + "\n" for i in range(40)))
    run = train(tmp_path, "run", "--task", "classify", "--data", str(data), "--batch-size", "3", "--eval-batches",
                "2", "--eval-every", "0", "--steps", "2")
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert main(["eval", str(run), "--batches", "2", "--batch-size", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 4  # (the 4 held-out rows: 2 batches of 3 had wrapped around to 2 of them again)
    assert val[-1]["val_loss"] == pytest.approx(res["loss"], rel=1e-6)
    assert val[-1]["val_acc"] == pytest.approx(res["accuracy"], rel=1e-6)


def test_prompts_keep_the_command_line_order(monkeypatch):
    """-p a -p - -p b: stdin's prompts where '-' stands (were put last); --prompt-file's after."""
    import io
    import types

    from fastattn.cli.generate import read_prompts
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n\ny\n"))
    cfg = types.SimpleNamespace(prompt=["a", "-", "b"], prompt_file=None)
    assert read_prompts(cfg) == ["a", "x", "y", "b"]


def test_classify_from_mlm_checkpoint(tmp_path, labelled):
    bert = train(tmp_path, "bert", "--task", "mlm")
    run = train(tmp_path, "clf", "--task", "classify", "--data", str(labelled), "--init", str(bert), "--mode",
                "frozen")
    enc_a = load_file(bert / "model" / "model.safetensors")
    enc_b = load_file(run / "model" / "model.safetensors")
    shared = [k for k in enc_b if k.startswith("encoder.")]
    assert shared and all(torch.equal(enc_a[k], enc_b[k]) for k in shared)  # frozen: the encoder kept as loaded


def test_classify_csv(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"example {i},{i % 3}\n" for i in range(30)))
    run = train(tmp_path, "run", "--task", "classify", "--data", str(path))
    state = json.loads((run / "model" / "config.json").read_text())
    assert state["num_labels"] == 3


def test_frozen_trains_only_the_head(tmp_path, labelled):
    run = train(tmp_path, "run", "--task", "classify", "--data", str(labelled), "--mode", "frozen",
                "--ckpt-every", "2")
    a, b = (load_file(run / f"ckpt-000000{s}" / "model.safetensors") for s in (2, 4))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("classifier", "pooler")) for k in changed), changed


def test_own_data_txt_jsonl_folder(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("One paragraph of text.\n\nAnother paragraph here.\n" * 50)
    (d / "b.jsonl").write_text("".join(json.dumps({"text": f"line {i} of json."}) + "\n" for i in range(100)))
    run = train(tmp_path, "run", "--data", str(d), "--val-fraction", "0.1")
    assert json.loads((run / "train_config.json").read_text())["data"] == [str(d)]


def test_init_distill_prune_quantize(gpt_run, tmp_path, capsys):
    run = train(tmp_path, "student", "--init", str(gpt_run), "--teacher", str(gpt_run), "--distill-alpha", "0.7")
    assert main(["prune", str(run), "--heads", "0.5", "--unstructured", "0.3", "--out", str(tmp_path / "p")]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["heads_removed"] == 1 and pruned["linear_sparsity"] == pytest.approx(0.3, abs=0.01)
    w = load_file(tmp_path / "p" / "model.safetensors")
    assert not any("orig" in k or "mask" in k for k in w)  # pruning made permanent
    train(tmp_path, "finetuned", "--init", str(tmp_path / "p"))
    assert main(["quantize", str(gpt_run), "--mode", "w8a8", "--smoothquant", "--calib", "2",
                 "--out", str(tmp_path / "q")]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["int8_linears"] > 0 and abs(q["loss_int8"] - q["loss_float"]) < 0.5
    stored = load_file(tmp_path / "q" / "model.safetensors")  # the int8 weights themselves, not a recipe
    int8 = [k for k, t in stored.items() if t.dtype == torch.int8]
    assert len(int8) == q["int8_linears"] == len(json.loads((tmp_path / "q" / "quantization.json").read_text()))
    assert q["bytes_int8"] < q["bytes_float"]
    assert main(["eval", str(tmp_path / "q"), "--batches", "4", "--batch-size", "4"]) == 0  # quantize's batches
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(q["loss_int8"], rel=1e-5)
    assert main(["generate", str(tmp_path / "q"), "-p", "Hi", "-n", "3"]) == 0
    assert main(["generate", str(gpt_run), "-p", "Hi", "-n", "3", "--int8"]) == 0
    for args in (["train", *TINY, "--init", str(tmp_path / "q"), "--out", str(tmp_path / "x")],
                 ["prune", str(tmp_path / "q"), "--heads", "0.5", "--out", str(tmp_path / "y")],
                 ["quantize", str(tmp_path / "q"), "--out", str(tmp_path / "z")]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "int8 checkpoint" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("qk_norm_full", [False, True])
def test_prune_heads_removes_exactly_those_heads(qk_norm_full):
    """The pruned model equals the unpruned one with the removed heads' output columns zeroed. With q normalised
    over all heads (OLMo 2) the removed heads' query rows must stay: zeroing them changed every other head's norm."""
    from fastattn.cli.prune import prune_heads
    from fastattn.models import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, d_model=64, n_layer=2, n_head=4, d_ff=128, max_seq_len=32, norm="rmsnorm",
                    pos="rotary", qk_norm=True, qk_norm_full=qk_norm_full)
    model = GPT(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # norm weights away from 1, attention away from uniform
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.3)
    expected = copy.deepcopy(model)
    assert prune_heads(model, 0.25) == (2, 8)
    D = cfg.d_model // cfg.n_head
    for block, ref in zip(model.blocks, expected.blocks):
        for h in range(cfg.n_head):
            if not block.attn.wo.weight[:, h * D:(h + 1) * D].any():
                ref.attn.wo.weight.data[:, h * D:(h + 1) * D] = 0
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=1e-12, atol=1e-12)


def test_prune_a_soft_prompt_run(tmp_path, capsys):
    """A pruned soft-prompt run keeps its prompt and says so (mode "prompt"): eval, generate and --init read it."""
    run = train(tmp_path, "run", "--mode", "prompt", "--prompt-len", "3")
    assert main(["prune", str(run), "--heads", "0.5", "--out", str(tmp_path / "p")]) == 0
    assert "soft_prompt" in load_file(tmp_path / "p" / "model.safetensors")
    assert main(["eval", str(tmp_path / "p"), "--batches", "1"]) == 0
    assert main(["generate", str(tmp_path / "p"), "-p", "Hi", "-n", "2"]) == 0
    again = train(tmp_path, "again", "--init", str(tmp_path / "p"), "--mode", "prompt", "--prompt-len", "3")
    before, after = (load_file(r / "model.safetensors") for r in (tmp_path / "p", again / "model"))
    assert set(before) == set(after) and not torch.equal(before["soft_prompt"], after["soft_prompt"])
    assert all(torch.equal(before[k], after[k]) for k in before if k != "soft_prompt")  # the model stays frozen
    capsys.readouterr()
    for mode in (["--mode", "full"], ["--mode", "prompt", "--prompt-len", "4"]):
        assert main(["train", *TINY, "--init", str(tmp_path / "p"), *mode, "--out", str(tmp_path / "x")]) == 2
        assert "continue it with --mode prompt --prompt-len 3" in capsys.readouterr().err


def test_distill_loss_by_hand():
    """(1 - a) * task + a * T^2 * KL(teacher || student) at the scored positions only (padding and prompt positions
    were averaged in): computed by hand from the softmaxes, and blind to the teacher elsewhere."""
    from fastattn.cli.finetune import distill_loss
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    pos = torch.tensor([[True, True, False, False, False], [False, True, True, True, False]])
    a, T, task = 0.7, 2.0, torch.tensor(1.5)
    ps, pt = torch.softmax(s[pos].double() / T, -1), torch.softmax(t[pos].double() / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    want = (1 - a) * 1.5 + a * T * T * kl
    got = distill_loss(task, s, t, a, T, pos)
    assert abs(got.item() - want.item()) < 1e-5
    t2 = t.clone()
    t2[~pos] = 100.0  # the teacher where nothing is scored
    assert torch.equal(distill_loss(task, s, t2, a, T, pos), got)
    assert abs(distill_loss(task, s, t, a, T, None).item() - got.item()) > 1e-3  # (all positions: another number)
    assert distill_loss(task, s, t, a, T, torch.zeros_like(pos)).item() == pytest.approx((1 - a) * 1.5)


def test_qat(tmp_path, capsys):
    run = train(tmp_path, "run", "--qat")
    assert json.loads((run / "model" / "train_state.json").read_text())["int8"]["mode"] == "w8a8"
    assert main(["eval", str(run), "--batches", "1"]) == 0


def test_toml_config(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 3\nlr = 0.002\nd-model = 32\ntokenizer = "bytes"\nlog_every = 1\n')
    args = [a for a in TINY if a not in ()]
    i = args.index("--steps")
    del args[i:i + 2]
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), *args, "--lr", "0.003", "--out", str(out)]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["lr"] == 0.003  # the command line overrides the file


def test_generate_prompt_before_checkpoint_and_streamed_stop(gpt_run, capsys):
    # -p takes one value: the checkpoint after it is the positional, not a second prompt
    assert main(["generate", "-p", "She", str(gpt_run), "-n", "8", "--temperature", "0", "--no-stream"]) == 0
    full = capsys.readouterr().out.split("--- [0] ---\n")[1].rstrip("\n")
    cont = full[len("She"):]
    stop = cont[1:3]  # two characters of the continuation (stop strings are looked for there, not in the prompt)
    assert main(["generate", str(gpt_run), "-p", "She", "-n", "8", "--temperature", "0", "--stop", stop]) == 0
    streamed = capsys.readouterr().out.rstrip("\n")
    assert main(["generate", str(gpt_run), "-p", "She", "-n", "8", "--temperature", "0", "--stop", stop,
                 "--no-stream"]) == 0
    batch = capsys.readouterr().out.split("--- [0] ---\n")[1].rstrip("\n")
    assert streamed == batch == "She" + cont[:cont.index(stop)]  # nothing of the stop string printed while streaming


def test_generate_speculative(gpt_run, tmp_path, capsys):
    """--prompt-lookup and --draft (another run on the same tokenizer) print plain greedy's text, and say how many
    drafted tokens were accepted (an encoder-decoder's too); a draft on another tokenizer or of another kind is
    refused in one line."""
    args = ["generate", str(gpt_run), "-p", "It is", "-p", "Emma", "-n", "12", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    draft = train(tmp_path, "draft", "--steps", "2")
    for extra in (["--prompt-lookup", "3"], ["--draft", str(draft), "--num-draft-tokens", "2"],
                  ["--draft", str(draft), "--int8"]):
        assert main(args + extra) == 0
        out = capsys.readouterr()
        assert "drafted tokens accepted" in out.err, out.err
        if "--int8" not in extra:
            assert out.out == plain
    s2s = ["generate", str(train(tmp_path, "s2s", "--task", "seq2seq")), "-p", "It is", "-n", "6", "--temperature",
           "0"]
    assert main(s2s) == 0
    plain = capsys.readouterr().out
    assert main(s2s + ["--prompt-lookup", "2"]) == 0 and capsys.readouterr().out == plain
    for other, needle in ((train(tmp_path, "bpe", "--tokenizer", "bpe"), "its tokenizer differs"),
                          (train(tmp_path, "mlm", "--task", "mlm"), "a BERT; the model is a GPT")):
        capsys.readouterr()
        assert main(args + ["--draft", str(other)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, stdin, needle", [
    (["-p", "x" * 200, "-n", "2"], None, "exceed the model's context of"),
    (["-p", "a", "-n", "500"], None, "exceed the model's context of"),
    (["-p", "a", "-p", "b", "--stream"], None, "--stream prints one continuation"),
    (["-p", "-"], "\n  \n", "no prompts on stdin"),
    (["-p", "a", "--chat"], None, "--chat: the model's tokenizer has no chat template"),
    (["-p", "a", "--prompt-lookup", "0"], None, "--prompt-lookup must be >= 1"),
    (["-p", "a", "--prompt-lookup", "2", "--draft", "x"], None, "choose one way of drafting"),
    (["-p", "a", "--num-beams", "2", "--temperature", "0.5"], None, "--num-beams: beam search is deterministic"),
    (["-p", "a", "--num-beams", "2", "--stream"], None, "--stream: beam search knows its text only at the end"),
    (["-p", "a", "--num-beams", "2", "--prompt-lookup", "2"], None, "--num-beams: not with --draft"),
    (["-p", "a", "--num-beams", "0"], None, "--num-beams must be >= 1"),
    (["-p", "a", "--repetition-penalty", "0"], None, "--repetition-penalty must be > 0"),
    (["-p", "a", "--min-p", "2"], None, "--min-p must be in [0, 1]"),
    (["-p", "a", "--typical-p", "0"], None, "--typical-p must be in (0, 1]"),
    (["-p", "a", "--cuda-graph", "--num-beams", "2"], None, "--cuda-graph: greedy search and sampling only"),
    (["-p", "a", "-n", "2", "--cuda-graph", "--device", "cpu"], None, "--cuda-graph: a CUDA device, greedy or "
                                                                       "sampling (here: cpu)"),
])
def test_generate_user_errors(gpt_run, capsys, monkeypatch, args, stdin, needle):
    import io
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["generate", str(gpt_run), *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and needle in out.err, out.err


def test_generate_fills_the_context_as_generate_does(gpt_run, capsys):
    """The prompt's tokens (its leading end token too) plus --max-new-tokens - 1 may fill the context, as
    GPT.generate allows (the last new token is never fed back); one more is refused naming the real prompt length.
    The check refused one token early and said the prompt was a token shorter."""
    from fastattn.cli.loading import load_model
    model, _, tok = load_model(gpt_run)
    T, n = len(tok.encode_prompt("It is")), model.config.max_seq_len
    assert main(["generate", str(gpt_run), "-p", "It is", "-n", str(n - T + 1), "--temperature", "0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(gpt_run), "-p", "It is", "-n", str(n - T + 2)]) == 2
    assert f"the prompt ({T} tokens)" in capsys.readouterr().err


def test_generate_top_k_zero_is_off(gpt_run, capsys, monkeypatch):
    from fastattn.models import GPT
    seen, real = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **kw: seen.append(kw) or real(self, *a, **kw))
    for k in ("0", "7"):
        assert main(["generate", str(gpt_run), "-p", "It", "-n", "3", "--top-k", k]) == 0
    assert [kw["top_k"] for kw in seen] == [None, 7]
    assert main(["generate", str(gpt_run), "-p", "It", "-n", "3", "--min-p", "0.1", "--typical-p", "0.9"]) == 0
    assert (seen[-1]["min_p"], seen[-1]["typical_p"]) == (0.1, 0.9)
    assert main(["generate", str(gpt_run), "-p", "It", "--top-k", "-1"]) == 2
    assert "--top-k must be >= 0 (0: off)" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_compile_trains_the_same_model(tmp_path, task):
    """--compile (aot_eager here: the kernels eager runs, so no tolerance) trains the same weights as eager, and
    the run folder's model loads as usual (state_dict keys without torch.compile's _orig_mod prefix)."""
    plain = train(tmp_path, "plain", "--task", task)
    comp = train(tmp_path, "comp", "--task", task, "--compile", "--compile-backend", "aot_eager")
    a, b = load_file(plain / "model" / "model.safetensors"), load_file(comp / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["clm", "mlm", "seq2seq"])
def test_grad_checkpointing_trains_the_same_model(tmp_path, task, monkeypatch):
    """--grad-checkpointing (blocks recomputed in the backward, dropout masks included) trains the weights of a plain
    run."""
    import torch.utils.checkpoint as tuc
    calls, real = [], tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plain = train(tmp_path, "plain", "--task", task, "--dropout", "0.1")
    assert not calls
    ckpt = train(tmp_path, "ckpt", "--task", task, "--dropout", "0.1", "--grad-checkpointing")
    assert len(calls) >= 4  # (4 steps, a block each at least)
    a, b = load_file(plain / "model" / "model.safetensors"), load_file(ckpt / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_generate_min_new_tokens(gpt_run, monkeypatch):
    """--min-new-tokens reaches generate, and no continuation ends on EOS before it (the demo's sample could be
    2 tokens long: the embedded corpus ends every paragraph with EOS)."""
    from fastattn.models import GPT
    seen, real = [], GPT.generate

    def spy(self, *a, **kw):
        seen.append((kw["min_new_tokens"], real(self, *a, **kw)))
        return seen[-1][1]
    monkeypatch.setattr(GPT, "generate", spy)
    from fastattn.data import default_tokenizer
    tok = default_tokenizer()
    assert main(["generate", str(gpt_run), "-p", "It", "-p", "Emma", "-n", "6", "--min-new-tokens", "6",
                 "--seed", "3"]) == 0
    n, out = seen[0]
    assert n == 6 and out.shape[1] >= 6 and not (out[:, -6:] == tok.eos_id).any()


def test_generate_empty_prompt_file(gpt_run, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("\n\n")
    assert main(["generate", str(gpt_run), "--prompt-file", str(tmp_path / "p.txt")]) == 2
    assert "no prompts in it" in capsys.readouterr().err


def test_task_mismatch_is_one_line(gpt_run, capsys, tmp_path):
    for args in (["eval", str(gpt_run), "--task", "mlm"],
                 ["train", *TINY, "--task", "mlm", "--init", str(gpt_run), "--out", str(tmp_path / "a")],
                 ["train", *TINY, "--task", "mlm", "--teacher", str(gpt_run), "--out", str(tmp_path / "b")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a GPT is a --task clm model, not a --task mlm one" in err, err
    assert not any(tmp_path.iterdir())


def test_eval_checks_seq_len_and_output(gpt_run, capsys, tmp_path):
    assert main(["eval", str(gpt_run), "--seq-len", "1000"]) == 2
    assert "exceeds the model's" in capsys.readouterr().err
    assert main(["eval", str(gpt_run), "--batches", "1", "-o", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "a folder, not a file" in out.err


def test_quantize_prune_out_inside_a_file(gpt_run, capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    for cmd in (["quantize", "--eval-batches", "0"], ["prune", "--heads", "0.5"]):
        assert main([cmd[0], str(gpt_run), *cmd[1:], "--out", str(tmp_path / "f" / "o")]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err


def test_classify_labels_by_name(tmp_path, labelled, capsys):
    run = train(tmp_path, "run", "--task", "classify", "--data", str(labelled), "--steps", "8", "--lr", "3e-3")
    assert json.loads((run / "model" / "train_state.json").read_text())["labels"] == ["neg", "pos"]
    assert main(["eval", str(run), "--batches", "2"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    only_pos = tmp_path / "pos.jsonl"  # one label: its index in this file (0) is not the model's (1)
    only_pos.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] == "pos"))
    assert main(["eval", str(run), "--data", str(only_pos), "--batches", "2"]) == 0
    pos_acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc == 1.0 and pos_acc == 1.0
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text("".join(json.dumps({**r, "label": "meh" if r["label"] == "neg" else "pos"}) + "\n"
                              for r in rows))
    assert main(["eval", str(run), "--data", str(unseen)]) == 2
    assert "label 'meh' is not one the model was trained on" in capsys.readouterr().err


def test_classify_data_errors(tmp_path, labelled, capsys):
    three = tmp_path / "three.csv"
    three.write_text("text,label\n" + "".join(f"example {i},{i % 3}\n" for i in range(30)))
    for args in (["--data", str(labelled), str(labelled)], ["--data", str(three), "--num-labels", "2"]):
        assert main(["train", *TINY, "--task", "classify", *args, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("reads one --data file" in err or "fewer than the 3" in err), err
    assert not (tmp_path / "r").exists()


def test_generate_beam_search(gpt_run, capsys, monkeypatch):
    """--num-beams, --length-penalty, --repetition-penalty and --no-repeat-ngram-size reach generate; the text
    printed is the best beam of each prompt (what GPT.generate returns), not streamed."""
    from fastattn.models import GPT
    seen, real = [], GPT.generate

    def spy(self, *a, **kw):
        seen.append((kw, real(self, *a, **kw)))
        return seen[-1][1]
    monkeypatch.setattr(GPT, "generate", spy)
    from fastattn.data import default_tokenizer
    tok = default_tokenizer()
    assert main(["generate", str(gpt_run), "-p", "It is", "-p", "Emma", "-n", "8", "--num-beams", "3",
                 "--length-penalty", "0.5", "--repetition-penalty", "1.3", "--no-repeat-ngram-size", "2"]) == 0
    kw, out = seen[0]
    assert (kw["num_beams"], kw["length_penalty"], kw["repetition_penalty"], kw["no_repeat_ngram_size"],
            kw["temperature"], kw["streamer"]) == (3, 0.5, 1.3, 2, 0.0, None)
    printed = capsys.readouterr().out
    L = kw["attention_mask"].shape[1]
    for i, p in enumerate(["It is", "Emma"]):
        new = out[i, L:].tolist()
        new = new[:min([new.index(t) for t in tok.stop_ids if t in new], default=len(new))]
        assert f"--- [{i}] ---\n{p}{tok.decode(new)}\n" in printed


def test_mixture_of_experts_run(tmp_path, capsys):
    """--n-experts trains a mixture-of-experts GPT with the load-balancing loss (and its LoRA adapters over every
    expert); the run generates, and --resume refuses another expert count."""
    from fastattn.cli.loading import load_model
    moe = ["--n-experts", "4", "--experts-per-tok", "2", "--mlp", "swiglu", "--d-ff", "24"]
    run = train(tmp_path, "moe", *moe, "--ckpt-every", "2")
    model, _, _ = load_model(run)
    assert (model.config.n_experts, model.config.n_experts_per_tok, len(model.blocks[0].mlp.experts)) == (4, 2, 4)
    assert model.config.router_aux_loss_coef == 0.01  # the load-balancing loss, in training
    assert main(["generate", str(run), "-p", "It is", "-n", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("It is")
    lora = train(tmp_path, "lora", *moe, "--init", str(run), "--mode", "lora")
    assert load_model(lora)[0].config.n_experts == 4
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(run), "--resume", *moe, "--n-experts", "8"]) == 2
    err = capsys.readouterr().err
    assert "changed --n-experts 8 (the run's: 4)" in err and "--d-ff" not in err


@pytest.fixture
def sft_pairs(tmp_path):
    path = tmp_path / "sft.jsonl"
    words = ["good day", "thank you", "the old house", "a small dog", "it is raining", "see you soon", "no"]
    path.write_text("".join(json.dumps({"source": f"Say: {w}\n", "target": w.upper()}) + "\n" for w in words * 4))
    return path


def test_clm_pack_rows_train_each_example_alone(sft_pairs):
    """--pack: rows of --seq-len tokens holding several examples back to back (position_ids restarting, targets as
    the padded batches' and -100 on the filler); the model's loss on a packed batch equals its loss on the same
    examples padded, one per row (each example attends only within itself)."""
    import types
    from fastattn.cli.tasks import IGNORE, CLMTask
    from fastattn.data import Tokenizer
    from fastattn.models import GPT, GPTConfig
    tok = Tokenizer()
    cfg = types.SimpleNamespace(data=[str(sft_pairs)], val_fraction=0.1, seq_len=48, pack=True)
    task = CLMTask(cfg, tok)
    inputs, target = task.batch("train", 3, torch.Generator().manual_seed(0))
    ids, pos = inputs["input_ids"], inputs["position_ids"]
    assert ids.shape == pos.shape == target.shape == (3, 48) and "attention_mask" not in inputs
    examples = []  # each row's examples, read back from where its positions restart
    for r in range(3):
        starts = [t for t in range(48) if pos[r, t] == 0] + [48]
        assert len(starts) >= 3  # at least two examples a row (and the filler, or none)
        for a, b in zip(starts, starts[1:]):
            assert pos[r, a:b].tolist() == list(range(b - a))
            if (target[r, a:b] != IGNORE).any():  # an example, not the row's filler
                examples.append((ids[r, a:b], target[r, a:b]))
            else:
                assert (ids[r, a:b] == tok.pad_id).all()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=2, max_seq_len=48)).double()
    packed = model(ids, position_ids=pos, shift_labels=target).loss
    padded_ids = torch.nn.utils.rnn.pad_sequence([e for e, _ in examples], batch_first=True, padding_value=0)
    padded_tgt = torch.nn.utils.rnn.pad_sequence([t for _, t in examples], batch_first=True, padding_value=IGNORE)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e), dtype=torch.long) for e, _ in examples],
                                           batch_first=True)
    alone = model(padded_ids, attention_mask=mask, shift_labels=padded_tgt).loss
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_clm_pack_cli(tmp_path, sft_pairs, capsys):
    out = tmp_path / "packed"
    args = ["train", *TINY, "--seq-len", "48", "--data", str(sft_pairs), "--pack", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert main(["eval", str(out), "--data", str(sft_pairs), "--batches", "1"]) == 0
    capsys.readouterr()
    for extra, msg in ((["--data", str(tmp_path / "none.txt")], "--pack: packs --data files of source / target"),
                       (["--task", "mlm", "--arch", "bert"], "--pack packs the clm and seq2seq tasks'"),
                       (["--mode", "prompt"], "--pack with --mode prompt")):
        if "none.txt" in extra[1]:
            (tmp_path / "none.txt").write_text("plain text, not pairs.\n" * 50)
        rc = main(["train", *TINY, "--pack", "--out", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, err


def test_seq2seq_pack_rows_train_each_pair_alone(sft_pairs, tmp_path, capsys):
    """--task seq2seq --pack: encoder and decoder rows of --seq-len tokens holding several pairs each and a filler
    pair; the Seq2Seq's loss on them equals its loss on the same pairs padded one a row; the CLI trains on them."""
    import types
    from fastattn.cli.tasks import IGNORE, Seq2SeqTask
    from fastattn.data import Tokenizer
    from fastattn.models import Seq2Seq, Seq2SeqConfig
    tok = Tokenizer()
    task = Seq2SeqTask(types.SimpleNamespace(data=[str(sft_pairs)], val_fraction=0.1, seq_len=40, pack=True), tok)
    inputs, labels = task.batch("train", 2, torch.Generator().manual_seed(0))
    assert set(inputs) == {"input_ids", "position_ids", "decoder_input_ids", "decoder_position_ids"}
    assert labels.shape == inputs["decoder_input_ids"].shape == (2, 40)
    pairs = []  # each row's pairs, read back from where the positions restart
    for r in range(2):
        bounds = [[t for t in range(40) if inputs[k][r, t] == 0] + [40] for k in ("position_ids",
                                                                                  "decoder_position_ids")]
        assert len(bounds[0]) == len(bounds[1]) >= 3  # as many sources as targets, and the filler pair
        for (a, b), (c, d) in zip(zip(bounds[0], bounds[0][1:]), zip(bounds[1], bounds[1][1:])):
            if (labels[r, c:d] != IGNORE).any():
                pairs.append((inputs["input_ids"][r, a:b], inputs["decoder_input_ids"][r, c:d], labels[r, c:d]))
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=1, n_decoder_layer=1, n_head=2,
                                  max_seq_len=40)).double()
    packed = model(**inputs, labels=labels).loss
    pad = torch.nn.utils.rnn.pad_sequence
    src = pad([s for s, _, _ in pairs], batch_first=True, padding_value=tok.pad_id)
    mask = pad([torch.ones(len(s), dtype=torch.long) for s, _, _ in pairs], batch_first=True)
    alone = model(src, attention_mask=mask, decoder_input_ids=pad([d for _, d, _ in pairs], batch_first=True,
                                                                  padding_value=tok.pad_id),
                  labels=pad([t for _, _, t in pairs], batch_first=True, padding_value=IGNORE)).loss
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)
    out = tmp_path / "s2s"
    assert main(["train", *TINY, "--task", "seq2seq", "--seq-len", "40", "--data",
                 str(sft_pairs), "--pack", "--out", str(out)]) == 0
    capsys.readouterr()


def test_pack_refuses_data_with_nothing_to_learn(tmp_path):
    """Pairs whose every example has no target token (or, packed seq2seq, an empty side) are a DataError, never an
    endless draw."""
    import types
    from fastattn.cli.tasks import CLMTask, Seq2SeqTask
    from fastattn.data import DataError, Tokenizer
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps({"source": "", "target": ""}) + "\n" for _ in range(10)))
    cfg = types.SimpleNamespace(data=[str(path)], val_fraction=0.1, seq_len=16, pack=True)
    tok = types.SimpleNamespace(pad_id=0, eos_id=1, encode=lambda s: [], encode_prompt=lambda s: [])
    with pytest.raises(DataError, match="every training example has no target token within --seq-len 16"):
        CLMTask(cfg, tok)  # (found when the task is made: before the run folder is)
    s2s = Seq2SeqTask(cfg, Tokenizer())
    s2s.tok = tok
    s2s._enc.clear()
    with pytest.raises(DataError, match="every training example has an empty source or target"):
        s2s.batch("train", 2, torch.Generator().manual_seed(0))


def test_generate_seq2seq_batch_equals_each_prompt_alone(tmp_path, capsys):
    """An encoder-decoder's sources go in right-padded (its learned positions count from the first column): before,
    the CLI left-padded them and a shorter prompt's continuation changed in a batch. Weights scaled up, so that
    greedy text depends on the source."""
    from fastattn.models import Seq2Seq
    run = train(tmp_path, "s2s", "--task", "seq2seq")
    model = Seq2Seq.from_pretrained(str(run / "model"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    model.save_pretrained(str(run / "model"))
    (run / "model" / "manifest.json").unlink()  # its SHA-256 sums are the trained weights' ones
    prompts = ["Emma", "It is a truth, she said"]
    for extra in (["--temperature", "0"], ["--num-beams", "3"]):
        alone = []
        for p in prompts:
            assert main(["generate", str(run), "-p", p, "-n", "8", "--no-stream", *extra]) == 0
            alone.append(capsys.readouterr().out.split("--- [0] ---\n")[1])
        assert main(["generate", str(run), "-p", prompts[0], "-p", prompts[1], "-n", "8", *extra]) == 0
        out = capsys.readouterr().out
        assert out == f"--- [0] ---\n{alone[0]}--- [1] ---\n{alone[1]}", (out, alone)
        assert alone[0] != alone[1]


def test_clm_pairs_with_long_sources_train(tmp_path, capsys):
    """Pairs whose source fills --seq-len (no target token left) are drawn again, padded or packed (before: a batch of
    them had no label, a NaN loss, and --pack crashed on its targets' length)."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": ("a long source " * (1 if i % 2 else 8)) + str(i),
                                        "target": f"answer {i}"}) + "\n" for i in range(40)))
    for extra in ([], ["--pack"]):
        run = train(tmp_path, f"run{len(extra)}", "--data", str(path), "--seq-len", "40", *extra)
        losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(m.get("loss", m.get("val_loss"))) for m in losses)
    # every source long: nothing to learn for clm, but a seq2seq target has --seq-len ids of its own
    path.write_text("".join(json.dumps({"source": "a long source " * 8 + str(i), "target": f"answer {i}"}) + "\n"
                            for i in range(40)))
    assert main(["train", *TINY, "--data", str(path), "--seq-len", "40", "--out", str(tmp_path / "clm")]) == 2
    assert "every training example has no target token" in capsys.readouterr().err
    train(tmp_path, "s2s", "--data", str(path), "--seq-len", "40", "--task", "seq2seq")


def test_a_loss_that_is_not_finite_stops_before_the_update(tmp_path, capsys, monkeypatch):
    from fastattn.cli.train import Trainer
    real = Trainer._loss

    def loss(self, inputs, target):
        token, extra = real(self, inputs, target)
        return (token * float("nan") if self.step == 2 else token), extra
    monkeypatch.setattr(Trainer, "_loss", loss)
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--ckpt-every", "2", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "step 3: the training loss is nan (not finite); stopped before the update" in err
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-0000002"]
    assert not (tmp_path / "run" / "model").exists()


def test_init_refuses_shape_options_and_applies_dropout(gpt_run, tmp_path, capsys):
    """Beside --init, an option that shapes the model must be the checkpoint's (it was ignored silently, and
    train_config.json recorded it); --dropout is applied to the loaded model."""
    assert main(["train", *TINY, "--init", str(gpt_run), "--out", str(tmp_path / "a"), "--n-layer", "3"]) == 2
    err = capsys.readouterr().err
    assert "--n-layer 3: the --init model has n_layer 1" in err and not (tmp_path / "a").exists()
    assert main(["train", *TINY, "--init", str(gpt_run), "--out", str(tmp_path / "b"), "--n-layer", "1",
                 "--dropout", "0.25"]) == 0
    assert json.loads((tmp_path / "b" / "model" / "config.json").read_text())["dropout"] == 0.25


def test_classify_needs_two_labels(tmp_path, capsys):
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": "pos"}) + "\n" for i in range(10)))
    assert main(["train", *TINY, "--task", "classify", "--data", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "one label ('pos') only: a classifier needs at least 2" in capsys.readouterr().err


def test_classifier_continued_keeps_its_labels(tmp_path, capsys):
    """train --init of a classifier on data lacking one of its labels: the data's labels mapped onto the checkpoint's
    outputs (before: renumbered from the data, so "pos" rows trained and scored the old "neu" output, silently); a
    label the checkpoint lacks is refused."""
    path = tmp_path / "three.jsonl"
    words = {"neg": "bad awful poor ", "neu": "plain usual fair ", "pos": "good fine nice "}
    with open(path, "w") as f:
        for i in range(60):
            lab = ["neg", "neu", "pos"][i % 3]
            f.write(json.dumps({"text": words[lab] * 2, "label": lab}) + "\n")
    first = train(tmp_path, "c1", "--task", "classify", "--data", str(path))
    two = tmp_path / "two.jsonl"
    two.write_text("".join(line for line in path.read_text().splitlines(True) if '"neu"' not in line))
    second = train(tmp_path, "c2", "--task", "classify", "--data", str(two), "--init", str(first), "--lr", "0",
                   "--steps", "1")
    state = json.loads((second / "model" / "train_state.json").read_text())
    assert state["labels"] == ["neg", "neu", "pos"]
    capsys.readouterr()
    losses = []
    for run in (first, second):
        assert main(["eval", str(run), "--data", str(two)]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # (--lr 0: the same weights, the same labels)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": "what now", "label": lab}) + "\n" for lab in ["neg", "meh"] * 10))
    assert main(["train", *TINY, "--task", "classify", "--data", str(other), "--init", str(first), "--out",
                 str(tmp_path / "c3")]) == 2
    assert "label 'meh' is not one the model was trained on" in capsys.readouterr().err


def test_run_records_absolute_data_paths(tmp_path, monkeypatch, capsys):
    """A run records its --data (and --init) absolute: eval / quantize of the run from another folder read the files
    it was trained on (before: the relative path as typed, so a file of that name elsewhere was evaluated silently)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    (elsewhere / "data").mkdir(parents=True)
    (work / "data" / "a.txt").write_text("One paragraph of text.\n\nAnother paragraph here.\n" * 50)
    (elsewhere / "data" / "a.txt").write_text("Something else entirely, and much shorter.\n")
    monkeypatch.chdir(work)
    run = train(tmp_path, "run", "--data", "data/a.txt", "--val-fraction", "0.2")
    want = [str((work / "data" / "a.txt").resolve())]
    assert json.loads((run / "train_config.json").read_text())["data"] == want
    assert json.loads((run / "model" / "train_state.json").read_text())["train_config"]["data"] == want
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    here = json.loads(capsys.readouterr().out)
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(run)]) == 0
    there = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in there.items() if k != "tokens_per_s"} == {k: v for k, v in here.items()
                                                                        if k != "tokens_per_s"}
    monkeypatch.chdir(work)  # and --resume with the relative path as first typed is the same run
    assert main(["train", *TINY, "--data", "data/a.txt", "--val-fraction", "0.2", "--out", str(run), "--resume",
                 "--steps", "6"]) == 0
