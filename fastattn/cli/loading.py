"""Loading what the commands run on: a checkpoint folder (ours, or a run folder's newest valid one) or a local
Hugging Face folder as (model, train state, tokenizer), the tokenizers, the device."""
import json
from pathlib import Path

import torch

from fastattn import hugepages
from fastattn.cli import checkpoint as ckpt
from fastattn.cli import finetune
from fastattn.cli.config import CLIError
from fastattn.cli.models import class_for_type, known_type, model_class
from fastattn.models.bert_hf import FAMILIES as BERT_FAMILIES
from fastattn.models.gpt_hf import GPT_HF_TYPES
from fastattn.models.seq2seq_hf import FAMILIES as SEQ2SEQ_FAMILIES
from fastattn.models.seq2seq_t5 import FAMILIES as T5_FAMILIES

DEFAULT_SEQ_LEN = 128  # TrainConfig.seq_len's default: eval / quantize / prune read an HF model's data in it


def load_tokenizer(spec, init_hf=None):
    from fastattn.data import Tokenizer, default_tokenizer
    if init_hf and (spec == "hf" or (spec == "bpe" and (Path(init_hf) / "tokenizer.json").is_file())):
        from fastattn.data.hf_tokenizer import HFTokenizer
        try:
            tok = HFTokenizer.from_folder(init_hf)
        except ValueError as e:
            raise CLIError(f"--init-hf {init_hf}: {e}") from None
        return tok
    if spec == "bpe":
        return default_tokenizer()
    if spec == "bytes":
        return Tokenizer()
    try:
        return Tokenizer.load(spec)
    except ValueError as e:
        raise CLIError(str(e)) from None


def pick_device(spec):
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise CLIError(f"--device {spec!r}: not a device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {spec}: no CUDA device here")
    return dev


HF_MODEL_TYPES = {**dict.fromkeys(GPT_HF_TYPES, "GPT"), **dict.fromkeys(BERT_FAMILIES, "BERT"),
                  **dict.fromkeys(SEQ2SEQ_FAMILIES + T5_FAMILIES, "Seq2Seq")}


def hf_config_type(path):
    """The model_type of a Hugging Face model folder (its config.json, not one of fastattn's, whose fields include
    d_model, n_layer and backend; "bert" names both), whether from_hf imports it or not; else None."""
    try:
        d = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(d, dict) and {"d_model", "n_layer", "backend"} <= d.keys()
    kind = d.get("model_type") if isinstance(d, dict) and not ours else None
    return kind if isinstance(kind, str) else None


def hf_model_type(path):
    """The model_type of a Hugging Face model folder that from_hf imports, else None."""
    kind = hf_config_type(path)
    return kind if kind in HF_MODEL_TYPES else None


def check_importable(path, what=None):
    """Raise CLIError for a Hugging Face folder whose model_type from_hf does not import (what: the option that
    named it)."""
    kind = hf_config_type(path)
    if kind and kind not in HF_MODEL_TYPES and not known_type(kind):  # (a registered class's own checkpoint)
        raise CLIError(f"{what + ' ' if what else ''}{path}: a Hugging Face {kind!r} folder, which from_hf cannot "
                       f"import (it imports {len(HF_MODEL_TYPES)} model types, e.g. gpt2, llama, qwen2, gemma, "
                       "mistral, bert, roberta, bart, t5; the README lists them)")


def _load_hf(path, kind, backend, map_location):
    """(model, train state, tokenizer) from a Hugging Face folder: from_hf, the folder's tokenizer.json, and a
    train state naming the task and sequence length eval / quantize / prune use by default."""
    from fastattn.data.hf_tokenizer import HFTokenizer
    from fastattn.models import CheckpointError
    cls = model_class(HF_MODEL_TYPES[kind])
    try:
        model = cls.from_hf(path, **({"backend": backend} if backend else {}))
        tok = HFTokenizer.from_folder(path)
    except (CheckpointError, ValueError) as e:
        raise CLIError(f"{path}: {e}") from None
    task = {"BERT": "mlm", "Seq2Seq": "seq2seq"}.get(cls.__name__, "clm")  # what eval / quantize / prune measure
    state = {"task": task, "train_config": {"task": task, "seq_len": min(DEFAULT_SEQ_LEN,
                                                                          model.config.max_seq_len)}}
    return hugepages.place(model.to(map_location)), state, tok


def load_model(path, backend=None, map_location="cpu", purpose=None):
    """(model, train_state dict, tokenizer) from a checkpoint folder (or a run folder: its newest valid one),
    with the fine-tuning adapters of its run merged (LoRA) or kept (soft prompt); an int8 checkpoint (`fastattn
    quantize`) comes back int8, unless ``purpose`` (e.g. "--init") names a use that needs float weights (refused;
    a checkpoint of a train --int8-base run: its adapters kept over the int8 base, or with ``purpose`` the float model
    its run exports). A Hugging Face folder (a model_type of HF_MODEL_TYPES) is imported with from_hf and its own
    tokenizer.json."""
    from fastattn.models.layers import INT8_FILE
    from fastattn.quantization import apply_int8_layout
    kind = hf_model_type(path)
    if kind:
        return _load_hf(path, kind, backend, map_location)
    check_importable(path)
    path = ckpt.resolve(path)
    mcfg = ckpt.read_json(path / "config.json")
    state = ckpt.train_state(path)
    cls = class_for_type(mcfg.get("model_type"), state.get("arch"))
    if backend:
        mcfg["backend"] = backend
    try:
        model = cls(cls.config_class.from_dict(mcfg))
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}/config.json: {e}") from None
    tcfg = state.get("train_config", {})
    finetune.apply(model, tcfg.get("mode", "full"), tcfg.get("lora_rank", 8), tcfg.get("lora_alpha", 16.0),
                   tcfg.get("prompt_len", 16), seed=0)
    int8_base = bool(tcfg.get("int8_base"))  # a checkpoint of a train --int8-base run: adapters over an int8 base
    if (path / INT8_FILE).is_file():
        if purpose and not int8_base:
            raise CLIError(f"{purpose} {path}: an int8 checkpoint (fastattn quantize) cannot be trained, pruned or "
                           "quantized again: use the float checkpoint it was made from")
        try:
            apply_int8_layout(model, ckpt.read_json(path / INT8_FILE))
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}/{INT8_FILE}: {e}") from None
    ckpt.load_weights(model, path / "model.safetensors")
    if int8_base and not purpose:
        finetune.merge(model, keep_int8=True)  # eval / generate: the model as it trained, over its int8 base
    else:
        finetune.merge(model)
        if int8_base:  # to train, prune or quantize: the float model the run exports
            finetune.dequantize_backbone(model)
    if not finetune.soft_prompt_len(model):  # (a soft-prompt run's model stays frozen under its prompt)
        model.requires_grad_(True)  # a LoRA / frozen run's checkpoint trains on as a full run's (--init)
    tok = checkpoint_tokenizer(path)
    vocab = getattr(model.config, "vocab_size", None)
    if not (path / "tokenizer.json").is_file() and vocab != tok.vocab_size:
        raise CLIError(f"{path}: no tokenizer.json, and the embedded BPE ({tok.vocab_size} ids) is not the model's "
                       f"(vocab_size {vocab}): copy the tokenizer.json of the run that trained it there")
    return hugepages.place(model.to(map_location)), state, tok


def checkpoint_tokenizer(path):
    """The tokenizer a checkpoint (or a run folder's newest) was trained with: its tokenizer.json (ours or a
    Hugging Face one it carried from --init-hf), else the embedded BPE."""
    from fastattn.data import Tokenizer
    path = ckpt.resolve(path)
    if not (path / "tokenizer.json").is_file():
        return load_tokenizer("bpe")
    try:
        return Tokenizer.load(path / "tokenizer.json")
    except ValueError as e:
        where = str(path / "tokenizer.json")
        raise ckpt.CheckpointError(str(e) if where in str(e) else f"{where}: {e}") from None
