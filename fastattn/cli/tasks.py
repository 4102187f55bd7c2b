"""The training tasks: batches (dicts of tensors for the model's forward), loss and metrics from its outputs.

    clm       next-token prediction on token blocks (GPT); --data files of source / target pairs: supervised
              fine-tuning, the loss on each target (and its end token) after its source (--chat: the source as a
              user turn of the tokenizer's chat template, the target as the reply; --pack: training rows of
              --seq-len tokens, each several examples back to back, no padding: position_ids restart at each
              example and each attends only within itself)
    mlm       BERT masking (15%: 80% <mask>, 10% random, 10% kept), --nsp adds next-sentence pairs
    seq2seq   BART-style denoising: the sentences of a block shuffled, then spans (Poisson(3) lengths, 30% of the
              tokens) each replaced by one <mask>; the decoder reconstructs the original block. With a tokenizer
              that has T5's <extra_id_N> sentinels and no mask token, T5's span corruption instead: spans (15% of
              the tokens, mean length 3) each replaced by the next sentinel; the decoder writes the sentinels each
              followed by its span, then a last sentinel and the end token. --data files of source / target pairs
              (.jsonl {"source", "target"} or .csv source,target): supervised fine-tuning, the decoder writes
              each target (--pack: encoder and decoder rows of --seq-len tokens, several pairs each, target n
              reading source n only)
    classify  labelled JSONL / CSV texts, one label per text (accuracy)

Losses: ``loss_parts(out, target)`` is (the mean over the ``scored(target)`` tokens (rows) the loss scores, a
per-batch term or None: next-sentence prediction's); ``loss`` their sum. ``label_kwargs(target)`` gives the model's
own label arguments, whose loss is the first part (the trainer uses them so that the fastattn backend computes the
loss without the logits; ``extra_loss(out, target)`` the second); distillation, soft prompts and evaluation compute
both here from the model's logits. :class:`LossTotal` adds batches up as one batch: each token (row) weighs the same
whatever its batch, as in transformers' Trainer (num_items_in_batch).
"""
import math

import torch
import torch.nn.functional as F

from fastattn.data import DataError, TokenSplits, is_pairs_file, load_labelled, load_pairs

IGNORE = -100


def _ce(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


class LossTotal:
    """A loss over batches as one batch of them all would have it: the scored tokens' (rows') mean, plus the
    per-batch terms' (NSP's) mean over the batches' rows. ``value(dist)`` over every data-parallel process (dist: the
    trainer's Distributed): N processes give what one gives at N times the batch, short last batches included."""

    def __init__(self):
        self.sum, self.items, self.extra, self.rows = 0.0, 0, 0.0, 0

    def add(self, parts, items, rows):
        token, extra = parts
        self.sum += float(token) * items if items else 0.0  # (a mean over no token is nan)
        self.items += items
        self.extra += 0.0 if extra is None else float(extra) * rows
        self.rows += rows

    def value(self, dist=None):
        total, items, extra, rows = self.sum, self.items, self.extra, self.rows
        if dist is not None:
            total, items, extra, rows = dist.total(total), dist.total(items), dist.total(extra), dist.total(rows)
        return (total / items if items else float("nan")) + extra / max(rows, 1)


def pad_right(seqs, pad_id):
    """(ids, attention_mask) (B, longest) of lists of ids, padded on the right."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[j, :len(s)] = 1
    return ids, mask


def take_rows(batch, start: int, n: int):
    """Rows start .. start + n - 1 of a tensor, or of each tensor of a dict (a batch's inputs or targets)."""
    if isinstance(batch, dict):
        return {k: v[start:start + n] for k, v in batch.items()}
    return batch[start:start + n]


def pick(rows, batch_size, generator, index):
    """batch_size row indices: random (training) or the index-th consecutive run (evaluation), wrapping."""
    if index is None:
        return torch.randint(0, len(rows), (batch_size,), generator=generator).tolist()
    return [(index * batch_size + j) % len(rows) for j in range(batch_size)]


class _Usable:
    """A training draw's guard against drawing forever: ``usable(ok)`` passes ok through, and after many draws in a
    row that were not ok, checks every row once (``test``) and raises a DataError when none is."""

    def __init__(self, rows, test, what: str):
        self.rows, self.test, self.what, self.misses = rows, test, what, 0

    def __call__(self, ok: bool) -> bool:
        self.misses = 0 if ok else self.misses + 1
        if self.misses > 4 * len(self.rows) + 16 and not any(self.test(r) for r in self.rows):
            raise DataError(f"every training example {self.what}")
        return ok


def pair_splits(cfg):
    """(train, val) (source, target) pairs when every --data file holds pairs, else None (text to model)."""
    if not cfg.data or not all(is_pairs_file(p) for p in cfg.data):
        return None
    train, val = [], []
    for p in cfg.data:
        t, v = load_pairs(p, max(cfg.val_fraction, 0.1))
        train += t
        val += v
    return train, val


class CLMTask:
    """Next-token prediction on blocks of text, or (--data of source / target pairs) supervised fine-tuning: each
    example is the source (with the tokenizer's own specials, e.g. Llama's BOS), the target and the end token, the
    loss on the target and end token only."""
    name = "clm"

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.pairs = pair_splits(cfg)
        if self.pairs is not None and self.name not in ("clm", "seq2seq"):
            raise DataError(f"--task {self.name} reads text, not source / target pairs ({cfg.data[0]})")
        self.chat = getattr(cfg, "chat", False) and self.name == "clm"
        self.pack = getattr(cfg, "pack", False) and self.name in ("clm", "seq2seq")
        if self.pack and self.pairs is None:
            raise DataError("--pack: packs --data files of source / target pairs (text blocks are full rows already)")
        if self.chat and (self.pairs is None or not hasattr(tokenizer, "encode_chat")):
            raise DataError("--chat: needs --data files of source / target pairs and a Hugging Face tokenizer "
                            "(--init-hf) with a chat template")
        if self.pairs is not None:
            self._enc, self._with_targets = {}, {}
            if self.chat:
                self._example(*self.pairs[0][0])  # a tokenizer without a chat template fails here, not mid-run
            # clm: source and target share the seq_len + 1 ids (a seq2seq target has its own)
            if self.name == "clm" and not any(self._has_target(r) for r in self.pairs[0]):
                raise DataError(f"every training example has no target token within --seq-len {cfg.seq_len}: "
                                "nothing to learn")
            return
        self.data = TokenSplits(tokenizer, cfg.data or None, cfg.val_fraction, cfg.max_data_tokens)
        self.data.check_window(cfg.seq_len + 1)  # the longest window a task reads (clm: seq_len inputs + 1 target)

    def _example(self, source, target):
        """(ids, number of source ids) of one pair, cut to seq_len + 1 ids."""
        key = (source, target)
        if key not in self._enc:
            enc = self.tok.encode_chat if self.chat else getattr(self.tok, "encode_prompt", self.tok.encode)
            try:
                src = enc(source)
            except ValueError as e:  # a tokenizer without a chat template
                raise DataError(f"--chat: {e}") from None
            self._enc[key] = ((src + self.tok.encode(target) + [self.tok.eos_id])[:self.cfg.seq_len + 1], len(src))
        return self._enc[key]

    def _targets(self, e, n):
        """Position p of example e (ids, n source ids) predicts e[p + 1]: the target's ids (from index max(n, 1))
        count, the source's do not. len(e) - 1 of them (a source cut at seq_len + 1 ids leaves no target)."""
        return [IGNORE] * (min(max(n, 1), len(e)) - 1) + e[max(n, 1):]

    def _has_target(self, row) -> bool:
        """Whether the pair's target keeps a token within seq_len + 1 ids (a long source may fill them)."""
        e, n = self._example(*row)
        return len(e) > max(n, 1)

    def _no_target_guard(self, rows):
        return _Usable(rows, self._has_target, f"has no target token within --seq-len {self.cfg.seq_len}: nothing "
                                               "to learn")

    def split_pairs(self, split):
        """The (source, target) pairs of a split: "train", else the held-out ones."""
        return self.pairs[0] if split == "train" else self.pairs[1]

    def _rows_with_targets(self, split):
        """The held-out (or training) pairs whose target survives the cut, found once: evaluation batches of
        pairs with no target token would have no loss (NaN)."""
        cache = self._with_targets
        if split not in cache:
            rows = self.split_pairs(split)
            cache[split] = [r for r in rows if self._has_target(r)]
            if not cache[split]:
                raise DataError(f"every {'training' if split == 'train' else 'held-out'} example has no target token "
                                f"within --seq-len {self.cfg.seq_len}: nothing to predict")
        return cache[split]

    def _packed_batch(self, rows, batch_size, generator):
        """batch_size rows of seq_len tokens, random examples back to back (one that does not fit starts the next
        row; a row's unused end is padding, a sequence of its own with no target), position_ids restarting at
        each example: the model runs each example alone (fastattn.attention_varlen)."""
        L, pad = self.cfg.seq_len, self.tok.pad_id
        ids, pos, tgt = [], [], []
        row = ([], [], [])
        usable = self._no_target_guard(rows)
        while len(ids) < batch_size:
            pair = rows[int(torch.randint(0, len(rows), (1,), generator=generator))]
            if not usable(self._has_target(pair)):
                continue
            e, n = self._example(*pair)
            if len(row[0]) + len(e) - 1 > L:
                filler = L - len(row[0])
                for part, fill in zip(row, ([pad] * filler, list(range(filler)), [IGNORE] * filler)):
                    part.extend(fill)
                for out, part in zip((ids, pos, tgt), row):
                    out.append(part)
                row = ([], [], [])
                if len(ids) == batch_size:
                    break
            row[0].extend(e[:-1])
            row[1].extend(range(len(e) - 1))
            row[2].extend(self._targets(e, n))
        ids, pos, tgt = (torch.tensor(t, dtype=torch.long) for t in (ids, pos, tgt))
        return {"input_ids": ids, "position_ids": pos}, tgt

    def batch(self, split, batch_size, generator=None, index=None):
        if self.pack and split == "train":  # held-out batches stay padded: the same loss, a fixed order
            return self._packed_batch(self.pairs[0], batch_size, generator)
        if self.pairs is not None:
            if index is None:  # a training draw: a pair with no target token is drawn again
                rows = self.split_pairs(split)
                chosen, usable = pick(rows, batch_size, generator, index), self._no_target_guard(rows)
                for i, j in enumerate(chosen):
                    while not usable(self._has_target(rows[j])):
                        j = int(torch.randint(0, len(rows), (1,), generator=generator))
                    chosen[i] = j
            else:
                rows = self._rows_with_targets(split)
                chosen = pick(rows, batch_size, generator, index)
            examples = [self._example(*rows[j]) for j in chosen]
            ids, mask = pad_right([e[:-1] for e, _ in examples], self.tok.pad_id)
            target, _ = pad_right([self._targets(e, n) for e, n in examples], IGNORE)
            return {"input_ids": ids, "attention_mask": mask}, target[:, :ids.shape[1]]
        x = self.data.blocks(split, batch_size, self.cfg.seq_len + 1, generator, index)
        return {"input_ids": x[:, :-1]}, x[:, 1:]

    def window(self) -> int:
        """The tokens of text one row of a batch reads (clm: seq_len inputs + 1 target)."""
        return self.cfg.seq_len + 1

    def every_row(self, batch_size, split="val", max_batches=None):
        """Batches of a split once, in order, up to max_batches (``fastattn eval``; with --data: all of the files):
        each pair (clm's with a target token within --seq-len), or each window of the text (a last part shorter
        than one left out); never a row twice."""
        if self.pairs is None:
            n = len(self.data.split(split)) // self.window()
        else:
            n = len(self._rows_with_targets(split) if self.name == "clm" else self.split_pairs(split))
        for i in range(min(-(-n // batch_size), max_batches or n)):
            inputs, target = self.batch(split, batch_size, index=i)
            rows = min(batch_size, n - i * batch_size)  # the last batch: the rows left, not wrapped around
            yield take_rows(inputs, 0, rows), take_rows(target, 0, rows)

    def loss_parts(self, out, target):
        return _ce(out.logits, target), None

    def loss(self, out, target):
        token, extra = self.loss_parts(out, target)
        return token if extra is None else token + extra

    def extra_loss(self, out, target):
        return None

    def scored(self, target) -> int:
        """The tokens the loss averages over."""
        return int((target != IGNORE).sum())

    def distill_positions(self, target):
        """The positions distillation compares teacher and student at: those the task loss scores."""
        return target != IGNORE

    def label_kwargs(self, target):
        return {"shift_labels": target}  # GPT: position t predicts target[t]

    def logits(self, out):
        return out.logits

    def correct(self, out, target):
        m = target != IGNORE
        return (out.logits.argmax(-1)[m] == target[m]).sum().item(), m.sum().item()

    def tokens(self, inputs):
        mask = inputs.get("attention_mask")
        return inputs["input_ids"].numel() if mask is None else mask.sum().item()

    def unused(self, model):
        """Parameters the model computes with but the loss never reaches: eager autograd leaves their .grad None,
        torch.compile gives them zeros (and AdamW would then decay them); the trainer resets them to None."""
        return []


class MLMTask(CLMTask):
    name = "mlm"

    def __init__(self, cfg, tokenizer):
        if getattr(cfg, "nsp", False) and cfg.seq_len < 5:
            from fastattn.cli.config import CLIError
            raise CLIError(f"--nsp: --seq-len {cfg.seq_len} leaves no token for the sentences ([CLS] A [SEP] B [SEP] "
                           "needs at least 5)")
        super().__init__(cfg, tokenizer)

    def window(self):
        return 2 * ((self.cfg.seq_len - 3) // 2) if self.cfg.nsp else self.cfg.seq_len

    def unused(self, model):  # BERT always computes its NSP logits
        if self.cfg.nsp or not hasattr(model, "nsp_head"):
            return []
        return [*model.pooler.parameters(), *model.nsp_head.parameters()]

    def batch(self, split, batch_size, generator=None, index=None):
        L, tok = self.cfg.seq_len, self.tok
        g = generator if generator is not None else torch.Generator().manual_seed(1000 + (index or 0))
        if self.cfg.nsp:
            half = (L - 3) // 2
            a = self.data.blocks(split, batch_size, 2 * half, g, index)
            other = self.data.blocks(split, batch_size, half, g, None if index is None else index + 7919)
            is_next = torch.rand(batch_size, generator=g) < 0.5
            b = torch.where(is_next[:, None], a[:, half:], other)
            cls_ = torch.full((batch_size, 1), tok.cls_id)
            sep = torch.full((batch_size, 1), tok.sep_id)
            x = torch.cat([cls_, a[:, :half], sep, b, sep], 1)
            types = torch.cat([torch.zeros(batch_size, half + 2, dtype=torch.long),
                               torch.ones(batch_size, half + 1, dtype=torch.long)], 1)
            special = (x == tok.cls_id) | (x == tok.sep_id)
        else:
            x = self.data.blocks(split, batch_size, L, g, index)
            special = torch.zeros_like(x, dtype=torch.bool)
        special |= x == tok.eos_id  # the end tokens between documents: never masked (as HF's collator, specials)
        u = torch.rand(x.shape, generator=g)
        chosen = (u < self.cfg.mask_prob) & ~special
        # a row with no masked token would leave a small batch (or a rank's rows) no label: a NaN loss. Such a
        # row masks its lowest-drawn position (no extra draw: other rows are as before)
        none = ~chosen.any(1)
        if none.any():
            rows = none.nonzero()[:, 0]
            chosen[rows, u[rows].masked_fill(special[rows], 2.0).argmin(1)] = True
        labels = torch.where(chosen, x, torch.full_like(x, IGNORE))
        r = torch.rand(x.shape, generator=g)
        rand_ids = torch.randint(0, tok.vocab_size - 5, x.shape, generator=g)
        inp = torch.where(chosen & (r < 0.8), torch.full_like(x, tok.mask_id), x)
        inp = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, inp)
        inputs = {"input_ids": inp, "attention_mask": torch.ones_like(x)}
        if self.cfg.nsp:  # (without NSP every token is of type 0, the model's default: a model without token types,
            inputs["token_type_ids"] = types  # DistilBERT, ModernBERT, DeBERTa-v3, refuses them)
        target = {"labels": labels}
        if self.cfg.nsp:
            target["nsp"] = (~is_next).long()  # BERT's convention: 0 = B follows A
        return inputs, target

    def label_kwargs(self, target):
        return {"labels": target["labels"]}  # (the next-sentence loss: extra_loss, a mean over rows)

    def loss_parts(self, out, target):
        return _ce(out.logits, target["labels"]), self.extra_loss(out, target)

    def extra_loss(self, out, target):
        if "nsp" in target and getattr(out, "nsp_logits", None) is not None:
            return F.cross_entropy(out.nsp_logits.float(), target["nsp"])
        return None

    def scored(self, target) -> int:
        return super().scored(target["labels"])

    def correct(self, out, target):
        return super().correct(out, target["labels"])

    def distill_positions(self, target):
        return target["labels"] != IGNORE  # the masked tokens, as DistilBERT distils


class Seq2SeqTask(CLMTask):
    name = "seq2seq"

    decoder_start = None  # the model's first decoder token (for_model), as its generate starts

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)  # (with pairs, the supervised source -> target pairs)
        self.sentinels = None
        if self.pairs is not None:
            self.sentinels = getattr(tokenizer, "sentinel_ids", lambda: [])() or None
            return
        if getattr(tokenizer, "special_ids", {}).get("mask") is None and hasattr(tokenizer, "sentinel_ids"):
            self.sentinels = tokenizer.sentinel_ids() or None  # T5: span corruption (None: BART's, needs <mask>)
            if self.sentinels is None:
                raise DataError("the Hugging Face tokenizer has neither a mask token (BART-style denoising) nor "
                                "<extra_id_N> sentinels (T5's span corruption): the seq2seq task needs one")
            return  # span corruption shuffles no sentences: no need to decode the vocabulary for their ends
        ends = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        for i, b in enumerate(tokenizer.token_bytes[:tokenizer.vocab_size - 5]):
            ends[i] = b.rstrip().endswith((b".", b"!", b"?"))
        self.sentence_end = ends

    def window(self):
        return self.cfg.seq_len

    def _corrupt(self, row, g):
        """Sentence shuffle then span masking of one block (1-D). As fairseq's BART: Poisson(3) span lengths drawn
        until they add up to the budget, 2 x mask_prob of the tokens (the last span cut to fit), each span one
        <mask> (a span of 0: a <mask> inserted), the spans at random places among the tokens kept."""
        cuts = (torch.nonzero(self.sentence_end[row]).flatten() + 1).tolist()
        bounds = [0] + [c for c in cuts if c < len(row)] + [len(row)]
        sents = [row[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        order = torch.randperm(len(sents), generator=g).tolist()
        row = torch.cat([sents[i] for i in order]).tolist()
        n = len(row)
        budget = min(n, int(round(self.cfg.mask_prob * 2 * n)))  # 30% of the tokens at mask_prob 0.15
        spans, lam = [], torch.tensor(3.0)
        while sum(spans) < budget:
            spans.append(int(torch.poisson(lam, generator=g).item()))
        if spans:
            spans[-1] -= sum(spans) - budget
        # span k replaces the tokens after the first at[k] tokens kept (n - budget of them)
        at = torch.randint(0, n - budget + 1, (len(spans),), generator=g).tolist()
        out, i, kept = [], 0, 0
        for gap, span in sorted(zip(at, spans)):
            out += row[i:i + gap - kept] + [self.tok.mask_id]
            i += gap - kept + span
            kept = gap
        return out + row[i:]

    def _span_corrupt(self, row, g):
        """T5's span corruption of one block (1-D): (inputs, targets) as lists of ids. As T5's random_spans_noise_mask:
        round(n * mask_prob) noise tokens in round(noise / 3) spans (mean length 3; at least one, at most one per
        sentinel but the last), noise and kept lengths random compositions, alternating from a kept run."""
        row, n = row.tolist(), len(row)
        noise = min(max(1, round(n * self.cfg.mask_prob)), n - 1)
        spans = max(1, min(round(noise / 3), len(self.sentinels) - 1, n - noise))

        def parts(total):  # total split into `spans` random lengths >= 1
            cuts = sorted((torch.randperm(total - 1, generator=g)[:spans - 1] + 1).tolist())
            return [b - a for a, b in zip([0] + cuts, cuts + [total])]
        inputs, targets, i = [], [], 0
        for k, (keep, drop) in enumerate(zip(parts(n - noise), parts(noise))):
            inputs += row[i:i + keep] + [self.sentinels[k]]
            targets += [self.sentinels[k]] + row[i + keep:i + keep + drop]
            i += keep + drop
        return inputs + [self.tok.eos_id], targets + [self.sentinels[spans], self.tok.eos_id]

    def _encode_text(self, text):
        """Token ids with the tokenizer's own specials, as transformers encodes a seq2seq source or target (T5:
        text </s>; BART: <s> text </s>); a tokenizer without (ours): text, then the end token."""
        ids = self._enc.get(text)
        if ids is None:
            enc = getattr(self.tok, "encode_prompt", None)
            ids = enc(text) if enc is not None else self.tok.encode(text) + [self.tok.eos_id]
            self._enc[text] = ids = ids[:self.cfg.seq_len]
        return ids

    def _pairs_batch(self, split, batch_size, generator, index):
        rows = self.split_pairs(split)
        chosen = pick(rows, batch_size, generator, index)
        ids, mask = pad_right([self._encode_text(rows[j][0]) for j in chosen], self.tok.pad_id)
        labels, _ = pad_right([self._encode_text(rows[j][1]) for j in chosen], IGNORE)
        return ids, mask, labels

    @property
    def start(self) -> int:
        """The decoder's first input: the model's decoder start, else pad for a T5 tokenizer (sentinels) and eos
        otherwise (BART), each family's."""
        if self.decoder_start is not None:
            return self.decoder_start
        return self.tok.pad_id if self.sentinels else self.tok.eos_id

    def _inputs(self, ids, mask, labels):
        """The batch's inputs for labels (B, T): the decoder's are the labels shifted right (-100 -> pad) after the
        start token."""
        dec = torch.cat([torch.full((labels.shape[0], 1), self.start), labels[:, :-1]], 1)
        return {"input_ids": ids, "attention_mask": mask,
                "decoder_input_ids": dec.masked_fill(dec == IGNORE, self.tok.pad_id)}

    def _packed_pairs_batch(self, rows, batch_size, generator):
        """batch_size rows of --seq-len encoder tokens and as many decoder tokens, random pairs back to back (one that
        does not fit starts the next rows), each row ending in a filler pair of padding (at least one token on each
        side, no target: the counts of sources and targets a row stay equal); positions restart at each."""
        L, pad, start = self.cfg.seq_len, self.tok.pad_id, self.start
        out = {k: [] for k in ("input_ids", "position_ids", "decoder_input_ids", "decoder_position_ids", "labels")}
        row = {k: [] for k in out}

        def close():
            fe, fd = L - len(row["input_ids"]), L - len(row["labels"])
            for k, fill in (("input_ids", [pad] * fe), ("position_ids", list(range(fe))),
                            ("decoder_input_ids", [pad] * fd), ("decoder_position_ids", list(range(fd))),
                            ("labels", [IGNORE] * fd)):
                out[k].append(row[k] + fill)
                row[k] = []

        usable = _Usable(rows, lambda r: bool(self._encode_text(r[0]) and self._encode_text(r[1])),
                         "has an empty source or target")
        while len(out["labels"]) < batch_size:
            j = int(torch.randint(0, len(rows), (1,), generator=generator))
            src, tgt = self._encode_text(rows[j][0])[:L - 1], self._encode_text(rows[j][1])[:L - 1]
            if not usable(bool(src and tgt)):
                continue
            if len(row["input_ids"]) + len(src) > L - 1 or len(row["labels"]) + len(tgt) > L - 1:
                close()
                if len(out["labels"]) == batch_size:
                    break
            row["input_ids"] += src
            row["position_ids"] += range(len(src))
            row["decoder_input_ids"] += [start] + tgt[:-1]
            row["decoder_position_ids"] += range(len(tgt))
            row["labels"] += tgt
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return batch, batch.pop("labels")

    def batch(self, split, batch_size, generator=None, index=None):
        g = generator if generator is not None else torch.Generator().manual_seed(2000 + (index or 0))
        if self.pack and split == "train":  # held-out batches stay padded: the same loss, a fixed order
            return self._packed_pairs_batch(self.pairs[0], batch_size, generator)
        if self.pairs is not None:
            ids, mask, labels = self._pairs_batch(split, batch_size, generator, index)
            return self._inputs(ids, mask, labels), labels
        x = self.data.blocks(split, batch_size, self.cfg.seq_len, g, index)
        if self.sentinels is not None:  # T5: variable-length targets, -100 past each
            pairs = [self._span_corrupt(r, g) for r in x]
            ids, mask = pad_right([p[:self.cfg.seq_len] for p, _ in pairs], self.tok.pad_id)
            labels, _ = pad_right([t[:self.cfg.seq_len] for _, t in pairs], IGNORE)
            return self._inputs(ids, mask, labels), labels
        ids, mask = pad_right([self._corrupt(r, g)[:self.cfg.seq_len] for r in x], self.tok.pad_id)
        return self._inputs(ids, mask, x), x

    def tokens(self, inputs):
        mask = inputs.get("attention_mask")  # none in packed rows
        return (inputs["input_ids"].numel() if mask is None else mask.sum().item()) + \
            inputs["decoder_input_ids"].numel()

    def label_kwargs(self, target):
        return {"labels": target}  # Seq2Seq: the decoder's position t predicts labels[t]


class ClassifyTask:
    name = "classify"

    def __init__(self, cfg, tokenizer, labels=None):
        """labels: the names of the model's outputs, in order (a trained model's); default: the data's, sorted."""
        from fastattn.cli.config import CLIError
        self.cfg, self.tok = cfg, tokenizer
        if not cfg.data:
            raise CLIError("--task classify needs --data FILE.jsonl|FILE.csv (text, label per example)")
        if len(cfg.data) > 1:
            raise CLIError(f"--task classify reads one --data file (text, label per example), got {len(cfg.data)}")
        self.train, self.val, self.labels = load_labelled(cfg.data[0], max(cfg.val_fraction, 0.1))
        if labels is None and len(self.labels) < 2:  # (a trained classifier may be evaluated on one label's rows)
            raise DataError(f"{cfg.data[0]}: one label ({self.labels[0]!r}) only: a classifier needs at least 2")
        if labels is not None:  # the data's label indices -> the model's
            unseen = [lab for lab in self.labels if lab not in labels]
            if unseen:
                raise CLIError(f"{cfg.data[0]}: label {unseen[0]!r} is not one the model was trained on "
                               f"({', '.join(map(repr, labels))})")
            to_model = [labels.index(lab) for lab in self.labels]
            self.train = [(text, to_model[i]) for text, i in self.train]
            self.val = [(text, to_model[i]) for text, i in self.val]
            self.labels = list(labels)
        self._enc = {}

    def _encode(self, text):
        ids = self._enc.get(text)
        if ids is None:
            ids = [self.tok.cls_id] + self.tok.encode(text)[: self.cfg.seq_len - 1]
            self._enc[text] = ids
        return ids

    def batch(self, split, batch_size, generator=None, index=None):
        rows = self.train if split == "train" else self.val
        return self._rows([rows[j] for j in pick(rows, batch_size, generator, index)])

    def every_row(self, batch_size, split="val", max_batches=None):
        """Batches of a split's rows once, in order, up to max_batches (``fastattn eval``; with --data: every row
        of the file)."""
        rows = self.train if split == "train" else self.val
        for start in range(0, min(len(rows), (max_batches or len(rows)) * batch_size), batch_size):
            yield self._rows(rows[start:start + batch_size])

    def _rows(self, rows):
        ids, mask = pad_right([self._encode(text) for text, _ in rows], self.tok.pad_id)
        return {"input_ids": ids, "attention_mask": mask}, torch.tensor([label for _, label in rows])

    def label_kwargs(self, target):
        return None  # the loss is computed here (single-label cross-entropy over the classes)

    def loss_parts(self, out, target):
        return F.cross_entropy(out.logits.float(), target), None

    loss, extra_loss = CLMTask.loss, CLMTask.extra_loss

    def scored(self, target) -> int:
        return target.numel()

    def distill_positions(self, target):
        return None  # one prediction a row: every row

    def logits(self, out):
        return out.logits

    def correct(self, out, target):
        return (out.logits.argmax(-1) == target).sum().item(), target.numel()

    def tokens(self, inputs):
        return inputs["attention_mask"].sum().item()

    def unused(self, model):
        return []


TASKS = {"clm": CLMTask, "mlm": MLMTask, "seq2seq": Seq2SeqTask, "classify": ClassifyTask}


def for_model(task, model):
    """task (returned) set to what it takes from the model it trains or measures: a seq2seq model's decoder start
    (config.decoder_start_token_id: Pegasus' and T5's pad, BART's eos)."""
    if isinstance(task, Seq2SeqTask):
        task.decoder_start = getattr(model.config, "decoder_start_token_id", None)
    return task


def perplexity(loss):
    return math.exp(min(loss, 50.0))
