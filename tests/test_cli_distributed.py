"""`torchrun --nproc_per_node 2 -m fastattn train` on gloo: DDP, FSDP (fully_shard) and tensor parallelism each
train what one process trains at the same global batch (fp32 tolerance)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tokenizer", "bytes", "--d-model", "32", "--n-layer", "2", "--n-head", "2", "--seq-len", "16",
        "--steps", "3", "--eval-every", "0", "--eval-batches", "1", "--log-every", "1", "--max-data-tokens", "20000",
        "--warmup", "1", "--ckpt-every", "3"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def torchrun_train(*args):
    """`torchrun --nproc_per_node 2 -m fastattn train TINY *args` (gloo, one thread a process): the finished process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastattn", "train", *TINY, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *TINY, "--batch-size", "4", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("mode, local_batch", [([], "2"), (["--fsdp"], "2"), (["--tp", "2"], "4")],
                         ids=["ddp", "fsdp", "tp"])
def test_two_processes_match_one(single, tmp_path, mode, local_batch):
    out = tmp_path / "run"
    p = torchrun_train("--batch-size", local_batch, *mode, "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "global batch 4 x 16" in p.stdout + p.stderr  # TP's ranks share one batch (it said 8)
    a, b = load_file(single / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)
    la = [json.loads(x)["loss"] for x in (single / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert lb == pytest.approx(la, rel=1e-5)
    # held-out: each data-parallel rank scores its rows of the global batch (not all of them the same rows)
    va, vb = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x]
              for r in (single, out))
    assert [r["val_loss"] for r in vb] == pytest.approx([r["val_loss"] for r in va], rel=1e-5)
    assert [r["val_acc"] for r in vb] == pytest.approx([r["val_acc"] for r in va], rel=1e-5)
    ck = out / "ckpt-0000003"
    assert (ck / "manifest.json").is_file()
    if mode:  # sharded state through torch.distributed.checkpoint
        assert (ck / "dcp").is_dir() and (ck / "rng-rank1.pt").is_file()


def test_tp_swiglu_gqa_matches_one(tmp_path):
    """--tp splits a SwiGLU MLP (each rank its part of gate and up) and grouped-query attention (its key/value heads)
    and trains what one process trains."""
    arch = ["--mlp", "swiglu", "--n-head", "4", "--n-kv-head", "2", "--batch-size", "4"]
    one = tmp_path / "one"
    assert main(["train", *TINY, *arch, "--out", str(one)]) == 0
    p = torchrun_train(*arch, "--tp", "2", "--out", str(tmp_path / "tp"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(tmp_path / "tp" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and a["blocks.0.mlp.w_in.weight"].shape == (2 * 128, 32)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)


@pytest.mark.parametrize("mode", [["--fsdp"], ["--tp", "2"]], ids=["fsdp", "tp"])
def test_sharded_resume_is_bit_exact(tmp_path, mode, capsys):
    """A sharded run (torch.distributed.checkpoint) that stops after its step-3 checkpoint and resumes from it ends
    where the uninterrupted run ends, bit for bit."""
    import shutil
    out = tmp_path / "run"

    def torchrun(*extra):
        p = torchrun_train("--steps", "6", "--batch-size", "2", *mode, "--out", str(out), *extra)
        assert p.returncode == 0, p.stderr[-3000:]
        return load_file(out / "model" / "model.safetensors"), p.stderr

    straight, _ = torchrun()
    shutil.rmtree(out / "ckpt-0000006")  # as if killed after the step-3 checkpoint
    shutil.rmtree(out / "model")
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "6", "--batch-size", "2", "--out", str(out), "--resume"]) == 2  # 1 process
    assert "a sharded checkpoint (--fsdp / --tp): resume it under torchrun" in capsys.readouterr().err
    resumed, log = torchrun("--resume")
    assert "ckpt-0000003 at step 3 (sharded" in log, log[-3000:]
    assert (out / "ckpt-0000006" / "dcp").is_dir()
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


def test_lora_fsdp_matches_one_process(tmp_path):
    """LoRA fine-tuning sharded with FSDP trains what one process trains, and exports the merged model; --tp with
    LoRA is refused with one line."""
    base = tmp_path / "base"
    assert main(["train", *TINY, "--batch-size", "4", "--out", str(base)]) == 0
    lora = ["--mode", "lora", "--init", str(base)]
    one = tmp_path / "one"
    assert main(["train", *TINY, "--batch-size", "4", *lora, "--out", str(one)]) == 0

    def torchrun(out, *mode):
        return torchrun_train("--batch-size", "2", *lora, *mode, "--out", str(out))

    p = torchrun(tmp_path / "fsdp", "--fsdp")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in k for k in b)  # merged on export
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)
    p = torchrun(tmp_path / "tp", "--tp", "2")
    assert p.returncode != 0 and "--tp with --mode lora" in p.stderr


def test_lora_over_an_int8_base_ddp_matches_one_process(tmp_path):
    """--int8-base w8a16 LoRA under DDP trains what one process trains (the int8 base is a buffer on each rank)."""
    base = tmp_path / "base"
    assert main(["train", *TINY, "--batch-size", "4", "--out", str(base)]) == 0
    args = ["--mode", "lora", "--int8-base", "w8a16", "--init", str(base)]
    assert main(["train", *TINY, "--batch-size", "4", *args, "--out", str(tmp_path / "one")]) == 0
    p = torchrun_train("--batch-size", "2", *args, "--out", str(tmp_path / "ddp"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_file(tmp_path / r / "model" / "model.safetensors") for r in ("one", "ddp"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)


def test_sharded_checkpoints_carry_the_generation_config(tmp_path):
    """--fsdp checkpoints (torch.distributed.checkpoint) keep the --init model's generation_config.json, as one
    process's checkpoints do."""
    base = tmp_path / "base"
    assert main(["train", *TINY, "--batch-size", "4", "--out", str(base)]) == 0
    (base / "model" / "generation_config.json").write_text('{"num_beams": 3}')
    p = torchrun_train("--batch-size", "2", "--fsdp", "--init", str(base), "--out", str(tmp_path / "fsdp"))
    assert p.returncode == 0, p.stderr[-3000:]
    ck = tmp_path / "fsdp" / "ckpt-0000003"
    assert (ck / "dcp").is_dir() and json.loads((ck / "generation_config.json").read_text()) == {"num_beams": 3}


def test_ddp_masked_lm_without_nsp(tmp_path):
    """BERT computes its next-sentence head, which MLM-only training never reaches: DDP is told (it raised 'Expected
    to have finished reduction in the prior iteration' at step 2). The ranks' rows mask different numbers of tokens:
    each masked token weighs the same (a mean of the ranks' means trained another model than one process)."""
    p = torchrun_train("--task", "mlm", "--batch-size", "2", "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert main(["train", *TINY, "--task", "mlm", "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in x] for r in ("run", "one")]
    assert len(losses[0]) == 3 and all(math.isfinite(v) for v in losses[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = (load_file(tmp_path / r / "model" / "model.safetensors") for r in ("one", "run"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)


def test_tp_refuses_what_it_cannot_split():
    """tensor_parallel names what stops it before any process group is touched: heads or d_ff not divisible, and
    Qwen3-style q / k norms (one weight over every head: each rank's gradient would be partial)."""
    from fastattn.cli.config import CLIError
    from fastattn.cli.distributed import tensor_parallel
    from fastattn.models import GPT, GPTConfig
    base = dict(vocab_size=50, d_model=32, n_layer=1, n_head=4, n_kv_head=2, d_ff=48, max_seq_len=16)
    for kw, tp, word in ((dict(), 4, "n_kv_head=2"), (dict(d_ff=49), 2, "d_ff=49"),
                         (dict(qk_norm=True, norm="rmsnorm"), 2, "qk_norm")):
        with pytest.raises(CLIError, match=word):
            tensor_parallel(GPT(GPTConfig(**{**base, **kw})), tp, torch.device("cpu"))


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_mixture_of_experts_matches_one(tmp_path, mode):
    """A mixture-of-experts GPT under DDP and FSDP trains what one process trains, though experts that no token of
    a rank chose take no part in its forward pass (8 experts, 1 per token, 16 tokens a rank). Without the
    load-balancing loss, which each rank computes over its own tokens (as transformers and Megatron do): a product of
    two batch means, it is not the one-process loss at the same global batch."""
    arch = ["--mlp", "swiglu", "--n-experts", "8", "--experts-per-tok", "1", "--d-ff", "16",
            "--router-aux-loss-coef", "0"]
    one = tmp_path / "one"
    assert main(["train", *TINY, *arch, "--batch-size", "2", "--out", str(one)]) == 0
    p = torchrun_train(*arch, "--batch-size", "1", *mode, "--out", str(tmp_path / "two"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)


@pytest.mark.parametrize("kw", [dict(rel_pos_buckets=8), dict(relative_buckets=8)], ids=["deberta", "mpnet"])
def test_tensor_parallel_refuses_relative_position_tables(kw):
    """--tp splits the heads across ranks; a relative-position table spanning every head (DeBERTa's disentangled
    attention, MPNet's T5-style bias) is refused by name before any process group is needed."""
    from fastattn.cli.config import CLIError
    from fastattn.cli.distributed import tensor_parallel
    from fastattn.models import BERT, BERTConfig
    model = BERT(BERTConfig(vocab_size=50, d_model=32, n_layer=1, n_head=4, **kw))
    with pytest.raises(CLIError, match="--tp 2: relative-position attention"):
        tensor_parallel(model, 2, torch.device("cpu"))
