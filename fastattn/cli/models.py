"""Which model class a task trains, built from the CLI's size options, saved and loaded through checkpoints.

Model classes are found by name: the ones of fastattn.models (GPT, BERT, Seq2Seq) and any registered with
``register`` (an extension point, e.g. for a model of your own with the same interface)."""
import dataclasses

from fastattn.cli.config import CLIError

TASK_ARCH = {"clm": "GPT", "mlm": "BERT", "classify": "BERTForSequenceClassification", "seq2seq": "Seq2Seq"}
_EXTRA = {}


def register(model_cls):
    """Make model_cls (with a ``config_class`` dataclass having ``model_type``) available to the CLI by name."""
    _EXTRA[model_cls.__name__] = model_cls


def _classes():
    out = {}
    try:
        from fastattn import models
        for name in ("GPT", "BERT", "BERTForSequenceClassification", "Seq2Seq"):
            if hasattr(models, name):
                out[name] = getattr(models, name)
    except ImportError:
        pass
    out.update(_EXTRA)
    return out


def model_class(name):
    classes = _classes()
    if name not in classes:
        raise CLIError(f"unknown model architecture {name!r} (known: {', '.join(sorted(classes)) or 'none'})")
    return classes[name]


def known_type(model_type) -> bool:
    """Whether model_type is a config's of the classes above (a checkpoint of theirs, not a Hugging Face folder)."""
    return any(getattr(cls.config_class, "model_type", None) == model_type for cls in _classes().values())


def class_for_type(model_type, arch=None):
    """The class a checkpoint names (train_state.json's arch), else the first whose config's model_type is
    model_type (what config.json names)."""
    if arch:
        return model_class(arch)
    for cls in _classes().values():
        if getattr(cls.config_class, "model_type", None) == model_type:
            return cls
    raise CLIError(f"checkpoint: unknown model_type {model_type!r}")


def build_config(cls, fields):
    """cls.config_class(**fields), keeping only the fields that config has (others belong to other models)."""
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    try:
        return cls.config_class(**{k: v for k, v in fields.items() if k in names and v is not None})
    except (TypeError, ValueError) as e:
        raise CLIError(f"model config: {e}") from None


def check_task(arch, task, what):
    """Raise CLIError when arch is one of fastattn's models and not the one that task trains (a BERT reads both
    directions, so it cannot be trained or measured on next-token prediction; a GPT has no masked-LM inputs)."""
    if arch in TASK_ARCH.values() and arch != TASK_ARCH[task]:
        trains = next(t for t, a in TASK_ARCH.items() if a == arch)
        raise CLIError(f"{what}: a {arch} is a --task {trains} model, not a --task {task} one")
