"""``fastattn generate``: continue prompts with a trained model (greedy or sampled, batched, streamed)."""
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from fastattn.cli.config import CLIError, check_seed, opt
from fastattn.cli.finetune import soft_prompt_len
from fastattn.cli.generation_args import generation_args


@dataclass
class GenerateConfig:
    checkpoint: str = opt("runs/train", "checkpoint folder, or a run folder (its final model / newest checkpoint)")
    prompt: List[str] = opt([], "prompt text (repeat for a batch); '-' or none: read prompts from stdin, one a line",
                            short="-p")
    prompt_file: Optional[str] = opt(None, "a file of prompts, one a line")
    max_new_tokens: int = opt(100, "tokens to generate per prompt", short="-n")
    min_new_tokens: int = opt(0, "tokens to generate before an end-of-text token may end a continuation")
    temperature: Optional[float] = opt(None, "sampling temperature (default 0.8, or a Hugging Face folder's "
                                             "generation_config.json: greedy unless it samples); 0: greedy")
    top_k: Optional[int] = opt(None, "sample among the k likeliest tokens (default 50); 0: no top-k cut")
    top_p: Optional[float] = opt(None, "sample among the likeliest tokens holding probability p (nucleus)")
    min_p: Optional[float] = opt(None, "sample among the tokens at least this fraction of the likeliest one's "
                                       "probability")
    typical_p: Optional[float] = opt(None, "locally typical sampling: the tokens nearest the entropy holding this "
                                           "probability")
    stop: List[str] = opt([], "stop a continuation at the first of these strings")
    seed: int = opt(0, "sampling seed")
    device: str = opt("auto", "cpu, cuda or auto")
    model_backend: Optional[str] = opt(None, "run the model on fastattn or torch layers (default: as trained)",
                                       choices=["fastattn", "torch"])
    int8: bool = opt(False, "quantize the Linear layers to int8 (w8a16) before generating")
    stream: Optional[bool] = opt(None, "print tokens as they come (default: on for a single prompt)")
    chat: bool = opt(False, "each prompt as a user turn of the model's chat template (an instruct model's "
                            "Hugging Face tokenizer); the reply alone is printed")
    draft: Optional[str] = opt(None, "speculative decoding: a smaller model on the same tokenizer (checkpoint or "
                                     "Hugging Face folder) drafts tokens that the model checks several at a time")
    num_draft_tokens: int = opt(4, "tokens the --draft model proposes a step")
    prompt_lookup: Optional[int] = opt(None, "speculative decoding without a draft model: propose this many tokens "
                                             "a step from where the text's last words appeared before")
    num_beams: Optional[int] = opt(None, "beam search with this many beams (deterministic; default 1, or a Hugging "
                                         "Face folder's generation_config.json)")
    length_penalty: Optional[float] = opt(None, "beam search: a finished beam scores its log-probability / "
                                                "length ** this (default 1, or the folder's)")
    repetition_penalty: Optional[float] = opt(None, "divide the scores of tokens already in the text by this "
                                                    "(transformers' meaning; default 1 = none, or the folder's)")
    no_repeat_ngram_size: Optional[int] = opt(None, "never repeat an n-gram of this many tokens (default 0 = off, "
                                                    "or the folder's)")
    cuda_graph: bool = opt(False, "replay each decode step from a CUDA graph (a GPU; greedy or sampling: the host's "
                                  "launch time leaves every token)")

    def validate(self):
        check_seed(self.seed)
        if self.max_new_tokens < 0:
            raise CLIError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise CLIError(f"--min-new-tokens must be >= 0, got {self.min_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise CLIError(f"--temperature must be >= 0, got {self.temperature}")
        for name, low in (("num_beams", 1), ("no_repeat_ngram_size", 0)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise CLIError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise CLIError(f"--repetition-penalty must be > 0 (1: none), got {self.repetition_penalty}")
        if (self.num_beams or 1) > 1:
            if self.temperature:
                raise CLIError(f"--num-beams: beam search is deterministic; --temperature {self.temperature} "
                               f"does not apply (leave it out, or 0)")
            if self.draft or self.prompt_lookup:
                raise CLIError("--num-beams: not with --draft / --prompt-lookup")
        if self.top_k is not None and self.top_k < 0:
            raise CLIError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        for name, low_open in (("top_p", True), ("min_p", False), ("typical_p", True)):
            v = getattr(self, name)
            if v is not None and not (0 < v <= 1 if low_open else 0 <= v <= 1):
                raise CLIError(f"--{name.replace('_', '-')} must be in {'(0' if low_open else '[0'}, 1], got {v}")
        if "" in self.stop:
            raise CLIError("--stop: an empty string (it would stop every continuation before its first token)")
        if self.num_draft_tokens < 1:
            raise CLIError(f"--num-draft-tokens must be >= 1, got {self.num_draft_tokens}")
        if self.prompt_lookup is not None and self.prompt_lookup < 1:
            raise CLIError(f"--prompt-lookup must be >= 1, got {self.prompt_lookup}")
        if self.draft and self.prompt_lookup:
            raise CLIError("--draft, --prompt-lookup: choose one way of drafting")
        if (self.draft or self.prompt_lookup) and ((self.repetition_penalty or 1.0) != 1.0
                                                   or self.no_repeat_ngram_size):
            raise CLIError("--repetition-penalty / --no-repeat-ngram-size: not with --draft / --prompt-lookup "
                           "(speculative decoding takes no search settings)")
        if self.cuda_graph and ((self.num_beams or 1) > 1 or self.draft or self.prompt_lookup):
            raise CLIError("--cuda-graph: greedy search and sampling only (not --num-beams, --draft, --prompt-lookup)")


def _stdin_prompts(required: bool):
    """The lines of stdin, blank ones skipped (required: some, for -p -)."""
    try:  # bytes decoded here: a text stdin may decode with surrogateescape (a C locale), letting bad bytes by
        buf = getattr(sys.stdin, "buffer", None)
        text = (buf.read().decode("utf-8") if buf is not None else sys.stdin.read()).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CLIError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts and required:
        raise CLIError("--prompt -: no prompts on stdin (only blank lines)")
    return prompts


def read_prompts(cfg):
    """The prompts of -p in their order (stdin's where the first '-' is), then --prompt-file's, then stdin's when no
    prompt is given and stdin is not a terminal, blank lines skipped; none given at all: one empty prompt
    (unconditional generation)."""
    prompts, stdin_read = [], False
    for p in cfg.prompt:
        if p != "-":
            prompts.append(p)
        elif not stdin_read:
            prompts += _stdin_prompts(required=True)
            stdin_read = True
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, encoding="utf-8-sig") as f:  # (a byte-order mark is not prompt text)
                from_file = [line.rstrip("\r\n") for line in f if line.strip()]
        except OSError as e:
            raise CLIError(f"--prompt-file {cfg.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise CLIError(f"--prompt-file {cfg.prompt_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not from_file:
            raise CLIError(f"--prompt-file {cfg.prompt_file}: no prompts in it (only blank lines)")
        prompts += from_file
    if not prompts and not stdin_read and not sys.stdin.isatty():
        prompts = _stdin_prompts(required=False)
    return prompts or [""]


def _cut(text, stops):
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _safe_to_show(text, stops):
    """How much of text (with no stop string in it) can be shown now: not a tail that may begin a stop string, nor
    a tail that is half a character."""
    n = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                n = min(n, len(text) - k)
                break
    while n and text[n - 1] == "\ufffd":
        n -= 1
    return n


def _check_context(model, prompt_len, n_prompt, max_new):
    """The longest prompt (all its tokens, and any soft prompt) and the new tokens fit the model's positions, by
    generate's rule (the last new token is never fed back): a GPT holds both in one context, an encoder-decoder the
    prompt in its encoder and the start token and new tokens in its decoder."""
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is None:
        return
    soft = f" + a soft prompt of {n_prompt}" if n_prompt else ""
    if hasattr(model, "encode"):
        if prompt_len + n_prompt > max_len:
            raise CLIError(f"the prompt ({prompt_len} tokens{soft}) is longer than the model's {max_len} positions")
        if max_new > max_len:
            raise CLIError(f"--max-new-tokens {max_new} exceeds the model's {max_len} decoder positions")
    elif prompt_len + n_prompt + max(max_new - 1, 0) > max_len:
        raise CLIError(f"the prompt ({prompt_len} tokens{soft}) + --max-new-tokens {max_new} exceed the model's "
                       f"context of {max_len} tokens: shorten the prompt or lower --max-new-tokens")


class _Stop(Exception):
    pass


def _until_end(row, stop_ids):
    """The tokens of row before its first end id (an end id need not be a special token that decode skips)."""
    return next((row[:j] for j, t in enumerate(row) if t in stop_ids), row)


def streams(cfg, n_prompts: int, args: dict) -> bool:
    """Whether the continuation is printed as it comes: --stream / --no-stream, else for one prompt, not beam search
    (whose text is known at its end)."""
    return cfg.stream if cfg.stream is not None else n_prompts == 1 and args.get("num_beams", 1) == 1


def generate(model, tok, prompts, cfg, device, out=None, draft=None, args=None):
    """Generate for every prompt (one batch: a GPT's left-padded, an encoder-decoder's sources right-padded, as HF's
    tokenizers pad them: its learned positions count from the first column), speculatively with the ``draft`` model or
    --prompt-lookup; ``args``: generate's sampling and search arguments (generation_args.py; from cfg when None);
    returns (texts, new tokens, seconds)."""
    out = out or sys.stdout
    if cfg.chat and not hasattr(tok, "encode_chat"):
        raise CLIError("--chat: the model's tokenizer has no chat template (a Hugging Face instruct model's has)")
    try:
        enc = [tok.encode_chat(p) if cfg.chat else tok.encode_prompt(p) for p in prompts]
    except ValueError as e:
        raise CLIError(f"{'--chat' if cfg.chat else 'prompt'}: {e}") from None
    shown = [""] * len(prompts) if cfg.chat else prompts  # what the output repeats before each continuation
    n_prompt = soft_prompt_len(model)
    L = max(len(e) for e in enc)
    ids = torch.full((len(enc), L + n_prompt), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    mask[:, :n_prompt] = 1  # a soft prompt's placeholders (its embedding hook fills the first n_prompt positions)
    right = hasattr(model, "encode")
    for i, e in enumerate(enc):
        at = n_prompt if right else L + n_prompt - len(e)
        ids[i, at:at + len(e)] = torch.tensor(e)
        mask[i, at:at + len(e)] = 1
    ids, mask = ids.to(device), mask.to(device)
    args = generation_args(cfg) if args is None else args
    beams = args.get("num_beams", 1) > 1
    if beams and cfg.stream:
        raise CLIError("--stream: beam search knows its text only at the end (--no-stream)")
    stream = streams(cfg, len(prompts), args)
    if stream and len(prompts) > 1:
        raise CLIError(f"--stream prints one continuation as it comes: give one prompt, not {len(prompts)}")
    _check_context(model, L, n_prompt, cfg.max_new_tokens)
    if cfg.cuda_graph and (device.type != "cuda" or beams):
        raise CLIError(f"--cuda-graph: a CUDA device, greedy or sampling (here: {device.type}"
                       f"{', beam search' if beams else ''})")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    new, streamed = [], []
    stop_ids = torch.tensor(tok.stop_ids)  # end-of-text, and an HF model's other end ids (Llama 3's <|eot_id|>)
    done = torch.zeros(len(prompts), dtype=torch.bool)

    def streamer(t):
        t = t.detach().cpu()
        new.append(t)
        done.logical_or_(torch.isin(t, stop_ids))
        if cfg.stop:  # every continuation has ended (EOS or a stop string): no need to generate more
            toks = torch.stack(new, 1)
            for i in (~done).nonzero().flatten().tolist():
                text = tok.decode(toks[i].tolist())  # (a row that is not done holds no end id)
                done[i] = _cut(text, cfg.stop) != text
        if stream:
            text = _cut(tok.decode(_until_end(torch.stack(new, 1)[0].tolist(), tok.stop_ids)), cfg.stop)
            shown = text[:_safe_to_show(text, cfg.stop)]
            if len(shown) > len("".join(streamed)):
                streamed.append(shown[len("".join(streamed)):])
                out.write(streamed[-1])
                out.flush()
        if bool(done.all()):
            raise _Stop

    if stream and len(prompts) == 1:
        out.write(shown[0])
        out.flush()
    spec = {}
    if draft is not None:
        spec = dict(assistant_model=draft, num_assistant_tokens=cfg.num_draft_tokens)
    elif cfg.prompt_lookup:
        spec = dict(prompt_lookup_num_tokens=cfg.prompt_lookup)
    if spec and n_prompt:
        raise CLIError("--draft / --prompt-lookup: not with a soft-prompt model (its prompt is an embedding hook)")
    if cfg.cuda_graph:
        spec["cuda_graph"] = True
    start = time.perf_counter()
    try:
        with torch.no_grad():
            res = model.generate(ids, cfg.max_new_tokens, eos_token_id=tok.stop_ids, attention_mask=mask,
                                 generator=gen, streamer=None if beams else streamer,
                                 min_new_tokens=cfg.min_new_tokens, **spec, **args)
        if beams:  # the best beam of each prompt, after the prompt (a GPT's) or the start token (a Seq2Seq's)
            new.extend(res[:, 1 if hasattr(model, "encode") else ids.shape[1]:].cpu().unbind(1))
    except _Stop:
        pass
    except ValueError as e:
        raise CLIError(f"generate: {e}") from None
    secs = time.perf_counter() - start
    toks = torch.stack(new, 1) if new else torch.zeros(len(prompts), 0, dtype=torch.long)
    texts = []
    for i, p in enumerate(shown):
        texts.append(p + _cut(tok.decode(_until_end(toks[i].tolist(), tok.stop_ids)), cfg.stop))
    if stream:  # what was held back (a possible start of a stop string, half a character) is final now
        rest = texts[0][len(shown[0]) + len("".join(streamed)):]
        out.write(rest)
        out.flush()
    return texts, toks.numel(), secs


def main(cfg: GenerateConfig) -> int:
    from fastattn.cli.loading import load_model, pick_device
    device = pick_device(cfg.device)
    model, state, tok = load_model(cfg.checkpoint, backend=cfg.model_backend, map_location=device)
    model.eval()
    if not hasattr(model, "generate"):
        raise CLIError(f"{cfg.checkpoint}: a {type(model).__name__} does not generate text")
    from fastattn.cli.evaluate import quantize_on_load
    model = quantize_on_load(model, state, tok, cfg.int8)
    draft = load_draft(cfg, model, tok, device) if cfg.draft else None
    if (draft is not None or cfg.prompt_lookup) and not hasattr(model, "decode_many"):
        raise CLIError(f"--draft / --prompt-lookup: speculative decoding runs on a GPT or Seq2Seq, not a "
                       f"{type(model).__name__}")
    prompts = read_prompts(cfg)
    args = generation_args(cfg)
    stream = streams(cfg, len(prompts), args)
    texts, n, secs = generate(model, tok, prompts, cfg, device, draft=draft, args=args)
    if stream and len(prompts) == 1:
        print()
    else:
        for i, t in enumerate(texts):
            print(f"--- [{i}] ---\n{t}")
    spec = ""
    st = getattr(model, "speculation_stats", None)
    if st is not None and (draft is not None or cfg.prompt_lookup):
        spec = f"; {st.accepted} of {st.drafted} drafted tokens accepted ({st.acceptance:.0%}), {st.steps} steps"
    print(f"[{n} tokens in {secs:.2f} s: {n / max(secs, 1e-9):,.1f} tokens/s{spec}]", file=sys.stderr)
    return 0


def load_draft(cfg, model, tok, device):
    """The --draft model: one of the model's class (a checkpoint or HF folder) on the model's tokenizer, in eval
    mode, int8 (w8a16) too when --int8."""
    from fastattn.cli.loading import load_model
    draft, _, dtok = load_model(cfg.draft, backend=cfg.model_backend, map_location=device)
    if type(draft) is not type(model):
        raise CLIError(f"--draft {cfg.draft}: a {type(draft).__name__}; the model is a {type(model).__name__}")
    if dtok.token_bytes != tok.token_bytes:
        raise CLIError(f"--draft {cfg.draft}: its tokenizer differs from the model's (a draft must share it)")
    draft.eval()
    if cfg.int8:
        import fastattn
        draft = fastattn.quantize(draft, mode="w8a16")
    return draft
