"""A Hugging Face folder's own tokenizer (its ``tokenizer.json``, run by HF's ``tokenizers`` library), with the
interface of fastattn's Tokenizer, for ``fastattn train --init-hf``: a pretrained model keeps the token ids it was
trained on. The special tokens come from the folder's ``tokenizer_config.json`` / ``config.json``; a checkpoint
stores the tokenizer and those ids in one JSON (``{"type": "hf", ...}``), read back by ``Tokenizer.load``. An
instruct model's chat template is kept too, for ``fastattn generate --chat``."""
import json
import logging
from pathlib import Path
from typing import Dict, Optional

ROLES = ("eos", "pad", "mask", "cls", "sep", "bos")
log = logging.getLogger("fastattn")


class HFTokenizer:
    def __init__(self, tokenizer_json: str, special_ids: Dict[str, Optional[int]], chat: Optional[dict] = None,
                 parsed=None):
        self._tok = _parse(tokenizer_json) if parsed is None else parsed  # (from_folder has parsed it already)
        self._json, self.special_ids = tokenizer_json, dict(special_ids)
        self.chat, self._hf = chat, None  # {"template", "bos_token", "eos_token"}; transformers' tokenizer for it
        if self.special_ids.get("eos") is None:  # an encoder's (BERT's): [SEP] ends each text, else [CLS]
            end = next((self.special_ids.get(r) for r in ("sep", "cls") if self.special_ids.get(r) is not None), None)
            if end is None:
                raise ValueError("the tokenizer has no end-of-text token (eos_token, or an encoder's sep_token / "
                                 "cls_token, in tokenizer_config.json, or eos_token_id in config.json)")
            log.debug("the tokenizer has no eos token: its sep (else cls) token ends a text")
            self.special_ids["eos"] = end
        if self.special_ids.get("pad") is None:
            self.special_ids["pad"] = self.special_ids["eos"]
        stop = [self.special_ids["eos"]] + list(self.special_ids.get("stop") or [])
        self.special_ids["stop"] = sorted(set(stop), key=stop.index)
        self._token_bytes = None

    @classmethod
    def from_folder(cls, path) -> "HFTokenizer":
        """The tokenizer of a local HF model folder (tokenizer.json, tokenizer_config.json, config.json)."""
        path = Path(path)
        try:
            text = (path / "tokenizer.json").read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"no readable tokenizer.json ({e.strerror})") from None  # (callers name the folder)
        configs = {}
        for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
            try:
                d = json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                d = {}
            configs[name] = d if isinstance(d, dict) else {}
        probe, ids = _parse(text), {}
        n = probe.get_vocab_size(with_added_tokens=True)
        for role in ROLES:
            token = _token_text(configs["tokenizer_config.json"].get(f"{role}_token"))
            tid = probe.token_to_id(token) if token is not None else None
            if tid is None:
                tid = configs["config.json"].get(f"{role}_token_id")
                tid = tid[0] if isinstance(tid, list) and tid else tid
            ids[role] = tid if isinstance(tid, int) else None
        # every id that ends a generation: config.json's and generation_config.json's eos_token_id (int or list);
        # one past the tokenizer's vocabulary (a config left at its class defaults) is dropped, as transformers warns
        ids["stop"] = [t for name in ("config.json", "generation_config.json")
                       for t in _ints(configs[name].get("eos_token_id")) if 0 <= t < n or _unknown(name, t, n)]
        return cls(text, ids, _chat(path, configs["tokenizer_config.json"]), parsed=probe)

    # fastattn Tokenizer's interface
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    eos_id = property(lambda self: self.special_ids["eos"])
    stop_ids = property(lambda self: list(self.special_ids["stop"]))  # the ids that end a generation
    pad_id = property(lambda self: self.special_ids["pad"])
    mask_id = property(lambda self: self._special("mask"))
    cls_id = property(lambda self: self._special("cls"))
    sep_id = property(lambda self: self._special("sep"))

    def _special(self, role: str) -> int:
        tid = self.special_ids.get(role)
        if tid is None:
            from fastattn.data import DataError  # (a ValueError the CLI reports in one line)
            raise DataError(f"the Hugging Face tokenizer has no {role} token, which this task needs")
        return tid

    def sentinel_ids(self):
        """T5's span sentinels <extra_id_0>, <extra_id_1>, ... as far as the vocabulary has them (often none)."""
        out = []
        while (tid := self._tok.token_to_id(f"<extra_id_{len(out)}>")) is not None:
            out.append(tid)
        return out

    def encode(self, text: str):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str):
        """A generation prompt as transformers encodes it: with the tokenizer's own specials (Llama's BOS; none for
        GPT-2 or Qwen); an empty one (unconditional generation) as transformers' generate starts it: the bos token,
        else eos."""
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if ids:
            return ids
        bos = self.special_ids.get("bos")
        return [self.eos_id if bos is None else bos]

    def encode_chat(self, text: str):
        """text as the user's turn of the model's chat template, ending where the assistant's reply starts, rendered
        by transformers' own apply_chat_template (its sandboxed Jinja)."""
        if not self.chat:
            raise ValueError("the tokenizer has no chat template (chat_template in tokenizer_config.json, or "
                             "chat_template.jinja)")
        if self._hf is None:
            try:
                from transformers import PreTrainedTokenizerFast
            except ImportError as e:
                raise ValueError("a chat template needs HF transformers (pip install transformers)") from e
            self._hf = PreTrainedTokenizerFast(tokenizer_object=self._tok, chat_template=self.chat["template"],
                                               bos_token=self.chat.get("bos_token"),
                                               eos_token=self.chat.get("eos_token"))
        try:
            rendered = self._hf.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True)
        except Exception as e:  # a template error (jinja2's TemplateError, raise_exception in the template)
            raise ValueError(f"the chat template failed: {e}") from None
        return self.encode(rendered)

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def token_bytes(self):
        """Each id's text as UTF-8 bytes (the seq2seq task looks for sentence ends in them)."""
        if self._token_bytes is None:
            self._token_bytes = [self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
                                 for i in range(self.vocab_size)]
        return self._token_bytes

    def to_dict(self) -> dict:
        return {"type": "hf", "tokenizer": json.loads(self._json), "special_ids": self.special_ids,
                "chat": self.chat}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def from_dict(cls, d: dict) -> "HFTokenizer":
        ids = d.get("special_ids")
        if not isinstance(d.get("tokenizer"), dict) or not isinstance(ids, dict) or any(
                ids.get(r) is not None and _ints(ids.get(r)) != [ids.get(r)] for r in ROLES):
            raise ValueError("malformed fastattn tokenizer file of type 'hf' (tokenizer, special_ids)")
        chat = d.get("chat")
        if chat is not None and not (isinstance(chat, dict) and isinstance(chat.get("template"), str)):
            raise ValueError("malformed fastattn tokenizer file of type 'hf' (chat)")
        return cls(json.dumps(d["tokenizer"]), {**{r: ids.get(r) for r in ROLES}, "stop": _ints(ids.get("stop"))},
                   chat)


def _token_text(v) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    v = v.get("content") if isinstance(v, dict) else v
    return v if isinstance(v, str) else None


def _chat(path: Path, tokenizer_config: dict) -> Optional[dict]:
    """The folder's chat template (chat_template.jinja, else tokenizer_config.json's chat_template: a string, or
    named templates of which "default" is used) and the bos / eos token texts it may refer to; None without one."""
    try:
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        return None
    return {"template": template, "bos_token": _token_text(tokenizer_config.get("bos_token")),
            "eos_token": _token_text(tokenizer_config.get("eos_token"))}


def _ints(v) -> list:
    """An int or a list of ints from a config, as a list (anything else: empty)."""
    v = v if isinstance(v, list) else [v]
    return [t for t in v if isinstance(t, int) and not isinstance(t, bool)]


def _unknown(config: str, token: int, n: int) -> bool:
    """Log an end id that is no token of the tokenizer (and keep it out: False)."""
    log.warning("%s: eos_token_id %d is not a token of tokenizer.json (%d tokens): ignored", config, token, n)
    return False


def _parse(text: str):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # transformers depends on it; fastattn itself does not
        raise ValueError("a Hugging Face tokenizer.json needs the `tokenizers` package (pip install "
                         "tokenizers)") from e
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises its own exception types
        raise ValueError(f"unreadable Hugging Face tokenizer.json: {e}") from None
