"""The arguments ``fastattn generate`` passes to a model's ``generate``: the options given, else, for a Hugging Face
folder, its ``generation_config.json`` as transformers' generate reads it, else the CLI's defaults.

From a folder (or a checkpoint ``fastattn quantize`` / ``prune`` / ``train --init-hf`` made of one, which carries
the file): the search
(``num_beams``, ``length_penalty``, ``early_stopping``, ``repetition_penalty``, ``no_repeat_ngram_size``: BART-large-CNN
decodes with 4 beams) and the sampling (``do_sample`` with ``temperature``, ``top_k``, ``top_p``, ``min_p``,
``typical_p``: an instruct model's recommended settings; without ``do_sample``, transformers decodes greedily, and so
does the CLI; asked to sample with --temperature, it samples with the folder's top_k / top_p / min_p / typical_p, as
transformers' generate(do_sample=True) does). Without a folder: sampling at temperature 0.8 with top-k 50, or greedy
beam search with --num-beams. A folder's beams give way to sampling asked for with --temperature (beam sampling is not
supported), and its search settings to --draft / --prompt-lookup (speculative decoding takes none of them).
"""
import json
from pathlib import Path
from typing import Optional

from fastattn.cli.config import CLIError


def _number(low, high=float("inf"), low_open=False):
    def ok(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and \
            v <= high
    return ok


# what a folder's generation_config.json may set, and the values accepted
_SEARCH = {"num_beams": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
           "length_penalty": _number(-float("inf")),
           "early_stopping": lambda v: any(v is x for x in (True, False)) or v == "never",
           "repetition_penalty": _number(0, low_open=True),
           "no_repeat_ngram_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0}
_SAMPLING = {"do_sample": lambda v: isinstance(v, bool), "temperature": _number(0),
             "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
             "top_p": _number(0, 1, low_open=True), "min_p": _number(0, 1), "typical_p": _number(0, 1, low_open=True)}


GENERATION_FILE = "generation_config.json"


def _generation_file(checkpoint) -> Optional[Path]:
    """The generation_config.json of a Hugging Face folder, or of a fastattn checkpoint that carries one (a run
    folder: the checkpoint its weights are loaded from, as checkpoint.resolve picks it); None where there is none."""
    from fastattn.cli import checkpoint as ckpt
    try:
        folder = ckpt.locate(checkpoint, warn=lambda m: None)  # (load_model reports skipped checkpoints)
    except ckpt.CheckpointError:
        return None
    path = folder / GENERATION_FILE
    return path if path.is_file() else None


def carried(src) -> dict:
    """{file name: writer} of the generation settings a checkpoint made from src (quantize, prune, train) keeps: src's
    generation_config.json; for a Hugging Face folder without one, transformers' defaults ({})."""
    from fastattn.cli.loading import hf_model_type
    path = _generation_file(src)
    if path is not None:
        data = path.read_bytes()
        return {GENERATION_FILE: lambda p: p.write_bytes(data)}
    return {GENERATION_FILE: lambda p: p.write_text("{}\n")} if hf_model_type(src) else {}


def folder_config(checkpoint) -> Optional[dict]:
    """The search and sampling fields of a Hugging Face folder's generation_config.json, or of the one a checkpoint
    made from such a folder carries (checked; {} for a Hugging Face folder without the file: transformers'
    defaults), None for a checkpoint without one."""
    from fastattn.cli.loading import hf_model_type
    path = _generation_file(checkpoint)
    if path is None:
        return {} if hf_model_type(checkpoint) else None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CLIError(f"{path}: not readable JSON ({e})") from None
    checks = {**_SEARCH, **_SAMPLING}
    d = {k: v for k, v in d.items() if k in checks and v is not None} if isinstance(d, dict) else {}
    for k, v in d.items():
        if not checks[k](v):
            raise CLIError(f"{path}: {k} {v!r} is not a valid value")
    return d


def generation_args(cfg) -> dict:
    """generate's temperature, top_k, top_p, min_p, typical_p and search arguments for the GenerateConfig ``cfg``."""
    folder = folder_config(cfg.checkpoint)
    hf, folder = folder is not None, folder or {}
    sample = folder.get("do_sample", False)
    given = {k: getattr(cfg, k) for k in _SEARCH if getattr(cfg, k, None) is not None}
    if cfg.temperature is not None:
        temperature = cfg.temperature
    elif given.get("num_beams", 1) > 1:  # beam search asked for: greedy
        temperature = 0.0
    elif hf:  # transformers decodes greedily unless the folder samples
        temperature = float(folder.get("temperature", 1.0)) if sample else 0.0
    else:
        temperature = 0.8
    search = {} if cfg.draft or cfg.prompt_lookup else {k: folder[k] for k in _SEARCH if k in folder}
    if temperature:  # sampling: the folder's beams give way
        search.pop("num_beams", None)
    search.update(given)
    top_k = cfg.top_k if cfg.top_k is not None else folder.get("top_k", 50)  # (a folder's: sampling, when asked)
    warpers = {k: getattr(cfg, k) if getattr(cfg, k) is not None else folder.get(k)
               for k in ("top_p", "min_p", "typical_p")}
    return dict(temperature=temperature, top_k=top_k or None, **warpers, **search)
