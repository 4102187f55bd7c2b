"""The training loss weighs every scored token (row) the same, whatever its micro-batch (or process): gradient
accumulation over micro-batches gives the gradients of one batch of them all (transformers' num_items_in_batch),
and evaluation over batches the loss of one batch of them all."""
import json

import pytest
import torch

from fastattn.cli.tasks import LossTotal, take_rows
from fastattn.cli.train import Trainer, TrainConfig

TINY = dict(tokenizer="bytes", d_model=32, n_layer=1, n_head=2, seq_len=24, clip=0.0, warmup=1, max_data_tokens=20000)


@pytest.fixture
def pairs(tmp_path):
    """Source / target pairs whose targets differ in length: micro-batches score different token counts."""
    path = tmp_path / "pairs.jsonl"
    words = ["no", "the old house on the hill", "a dog", "it is raining again today", "ok", "see you"]
    path.write_text("".join(json.dumps({"source": f"Say: {w}\n", "target": w.upper()}) + "\n" for w in words * 3))
    return str(path)


def step_grads(tmp_path, batch, grad_accum, **kw):
    """The gradients of one train_step over `batch` (inputs, target), split into grad_accum micro-batches."""
    trainer = Trainer(TrainConfig(**TINY, **kw, batch_size=len(batch[0]["input_ids"]) // grad_accum,
                                  grad_accum=grad_accum, out=str(tmp_path / f"run{grad_accum}")))
    rows = trainer.cfg.batch_size
    micros = iter([tuple(take_rows(x, i * rows, rows) for x in batch) for i in range(grad_accum)])
    trainer.task.batch = lambda split, n, *a, **k: next(micros)
    grads = {}
    trainer.opt.step = lambda: grads.update({k: p.grad.clone() for k, p in trainer.model.named_parameters()
                                             if p.grad is not None})
    loss = trainer.train_step()[0]
    return loss, grads


@pytest.mark.parametrize("kw", [dict(task="clm", data=["PAIRS"]), dict(task="seq2seq", data=["PAIRS"]),
                                dict(task="mlm", nsp=True), dict(task="mlm", nsp=True, mode="prompt", prompt_len=2)],
                         ids=["clm-pairs", "seq2seq-pairs", "mlm-nsp", "mlm-nsp-prompt"])
def test_grad_accumulation_equals_one_batch(tmp_path, pairs, kw):
    kw = {k: [pairs] if v == ["PAIRS"] else v for k, v in kw.items()}
    probe = Trainer(TrainConfig(**TINY, **kw, batch_size=4, out=str(tmp_path / "probe")))
    batch = probe.task.batch("train", 4, torch.Generator().manual_seed(3))
    counts = [probe.task.scored(take_rows(batch[1], 2 * i, 2)) for i in range(2)]
    assert counts[0] != counts[1]  # (else any weighting passes)
    loss1, one = step_grads(tmp_path, batch, 1, **kw)
    loss2, two = step_grads(tmp_path, batch, 2, **kw)
    assert one.keys() == two.keys() and one
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


def test_loss_total_is_one_batchs_loss():
    """Per-token means of batches with 1 and 3 scored tokens, and per-batch (per-row mean) terms of batches of 2, 1
    and 3 rows: their total is the mean over the 4 tokens plus the terms' mean over the 6 rows (a mean of the batches'
    means weighed the lone token 3 times too much; a mean of the terms weighed a short last batch's rows more)."""
    total = LossTotal()
    total.add((torch.tensor(4.0), torch.tensor(1.0)), 1, 2)
    total.add((torch.tensor(2.0), None), 3, 1)
    total.add((torch.tensor(float("nan")), torch.tensor(0.5)), 0, 3)  # (no scored token: adds its term only)
    assert total.value() == pytest.approx((4.0 + 3 * 2.0) / 4 + (2 * 1.0 + 3 * 0.5) / 6)


def test_loss_total_over_ranks_with_a_short_last_batch():
    """Two data-parallel ranks, global batches of 6 rows, the last one 3 rows (all on rank 0): the per-batch term
    (NSP's per-row mean) over the ranks equals one process's over the 9 rows. A mean of the ranks' means of their
    batches' means weighed rank 1's rows more (training's held-out loss drifted from `fastattn eval`)."""
    nsp = torch.arange(9, dtype=torch.float64) / 4  # each row's next-sentence loss
    tok = torch.tensor(1.0)

    def part(rows):
        return tok, nsp[rows].mean()

    one = LossTotal()
    one.add(part([0, 1, 2, 3, 4, 5]), 6, 6)
    one.add(part([6, 7, 8]), 3, 3)
    ranks = [LossTotal(), LossTotal()]
    ranks[0].add(part([0, 1, 2]), 3, 3)
    ranks[1].add(part([3, 4, 5]), 3, 3)
    ranks[0].add(part([6, 7, 8]), 3, 3)  # rank 1 has no row of the last batch

    class Summed:  # dist.total over the two ranks, as the trainer's all_reduce gives it
        other = list(vars(ranks[1]).values())  # rank 1's fields, in the order value() reduces them

        def total(self, x):
            return x + self.other.pop(0)

    assert ranks[0].value(Summed()) == pytest.approx(1.0 + float(nsp.mean()))
    assert one.value() == pytest.approx(1.0 + float(nsp.mean()))
