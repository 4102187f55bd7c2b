"""Byte-level tokenizers: plain bytes, or a byte-level BPE (trained by ``train_bpe``, stored as JSON).

Ids 0..255 are the raw bytes, then the BPE merges in rank order, then the special tokens. Text is first split into
pre-tokens (words with their leading space, numbers, punctuation runs, whitespace), as GPT-2 does, and merges never
cross a pre-token, so encoding is cached per pre-token.
"""
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<pad>", "<mask>", "<cls>", "<sep>")
_PRETOKEN = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


class Tokenizer:
    """Byte-level BPE; with no merges it is the plain byte tokenizer (vocab 256 + specials)."""

    def __init__(self, merges=()):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self.token_bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        first = len(self.token_bytes)
        self.special_ids = {s: first + i for i, s in enumerate(SPECIALS)}
        self.token_bytes += [s.encode() for s in SPECIALS]
        self._cache = {}

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    eos_id = property(lambda self: self.special_ids["<|endoftext|>"])
    pad_id = property(lambda self: self.special_ids["<pad>"])
    stop_ids = property(lambda self: [self.eos_id])  # the ids that end a generation
    mask_id = property(lambda self: self.special_ids["<mask>"])
    cls_id = property(lambda self: self.special_ids["<cls>"])
    sep_id = property(lambda self: self.special_ids["<sep>"])

    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        ids = list(piece.encode("utf-8"))
        while len(ids) > 1:
            best = min(((self.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(ids, ids[1:]))))
            if best[0] == 1 << 30:
                break
            i = best[1]
            ids[i:i + 2] = [best[0]]
        if len(self._cache) < 200_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text):
        """Token ids of text (special-token strings in text are encoded as plain bytes, never as specials)."""
        out = []
        for piece in _PRETOKEN.findall(text):
            out += self._encode_piece(piece)
        return out

    def encode_prompt(self, text):
        """A generation prompt: EOS first (what the model saw between documents), then the text."""
        return [self.eos_id] + self.encode(text)

    def decode(self, ids, skip_special=True):
        n_special = len(SPECIALS)
        stop = self.vocab_size - n_special if skip_special else self.vocab_size
        return b"".join(self.token_bytes[i] for i in ids if 0 <= i < stop).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"type": "byte_bpe", "merges": [list(m) for m in self.merges], "specials": list(SPECIALS)}

    def save(self, path):
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, d):
        if d.get("type") == "hf":  # a Hugging Face tokenizer.json a run started from (--init-hf)
            from .hf_tokenizer import HFTokenizer
            return HFTokenizer.from_dict(d)
        if d.get("type") not in ("byte_bpe", "bytes") or list(d.get("specials", SPECIALS)) != list(SPECIALS):
            raise ValueError("not a fastattn tokenizer file (type byte_bpe / bytes with the standard specials)")
        merges = d.get("merges", [])
        for i, m in enumerate(merges):
            if len(m) != 2 or not all(isinstance(t, int) and 0 <= t < 256 + i for t in m):
                raise ValueError(f"tokenizer merge {i} is malformed: {m!r}")
        return cls(merges)

    @classmethod
    def load(cls, path):
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"tokenizer {path}: not a tokenizer file (a JSON object)")
        return cls.from_dict(d)


def train_bpe(text, vocab_size):
    """Learn vocab_size - 256 - len(SPECIALS) byte-pair merges on text (pair counts kept incrementally)."""
    n_merges = vocab_size - 256 - len(SPECIALS)
    words = Counter(_PRETOKEN.findall(text))
    seqs = [list(w.encode("utf-8")) for w in words]
    freq = list(words.values())
    pairs, where = Counter(), defaultdict(set)
    for wi, s in enumerate(seqs):
        for p in zip(s, s[1:]):
            pairs[p] += freq[wi]
            where[p].add(wi)
    merges = []
    for _ in range(max(0, n_merges)):
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        if pairs[best] < 2:
            break
        new = 256 + len(merges)
        merges.append(best)
        for wi in list(where[best]):
            s, f = seqs[wi], freq[wi]
            for p in zip(s, s[1:]):
                pairs[p] -= f
                if pairs[p] <= 0:
                    del pairs[p]
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[wi] = out
            for p in zip(out, out[1:]):
                pairs[p] += f
                where[p].add(wi)
        del where[best]
    return Tokenizer(merges)
