"""Dataclass configs for the CLI: argparse options generated from the fields, TOML files read into the same fields.

Precedence: field default < the TOML file (``--config``) < options given on the command line. A TOML file is data
only (tomllib / tomli; nothing is executed); an unknown key or a value of the wrong type is one clear error.
"""
import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - older Pythons
    import tomli as tomllib


class CLIError(Exception):
    """An error the user can cause and fix (bad option, bad config, missing or corrupt file): one line, exit 2."""


def opt(default, help, choices=None, short=None):  # noqa: A002 - mirrors argparse's keyword
    """A config field with its --help text (and choices / a short flag)."""
    meta = {"help": help, "choices": choices, "short": short}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """(python type, optional) of a field annotation: int, float, str, bool, list[str] (Optional allowed)."""
    optional = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    return tp, optional


def add_options(parser, cls, positional=()):
    """One --kebab-case option per field of dataclass cls (positional: field names taken as positionals)."""
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(f.type)
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = meta.get("help", "")
        if default not in (None, "", [], False) and tp is not bool:
            help_ += f" (default: {default})"
        if f.name in positional:
            parser.add_argument(f.name, nargs="*" if typing.get_origin(tp) is list else "?",
                                default=argparse.SUPPRESS, help=help_)
            continue
        names = ["--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if tp is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list and positional:
            # one value per option (repeat it for more): `-p a -p b CHECKPOINT` must not take CHECKPOINT as a prompt
            parser.add_argument(*names, action="append", type=typing.get_args(tp)[0], **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(*names, nargs="+", action="extend", type=typing.get_args(tp)[0], **kw)
        else:
            parser.add_argument(*names, type=_finite_float if tp is float else tp, choices=meta.get("choices"),
                                metavar=f.name.upper(), **kw)


def _finite_float(text: str) -> float:
    """argparse's float for the options, refusing nan and inf (every float option is a finite quantity)."""
    value = float(text)  # ValueError: argparse's "invalid float value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_finite_float.__name__ = "float"


def _check_value(cls_name, f, value, where):
    tp, optional = _base_type(f.type)
    if value is None and optional:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) and f.metadata.get("choices"):
        value = str(value)
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, typing.get_args(tp)[0]) for v in value)
    else:
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        want = f"a list of {typing.get_args(tp)[0].__name__}" if origin is list else tp.__name__
        raise CLIError(f"{where}: {f.name} must be {want}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise CLIError(f"{where}: {f.name} must be a finite number, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise CLIError(f"{where}: {f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def read_toml(path, section=None):
    """(key/values, whether they are the [section] table) of a TOML file: its [section] table if it has one (a key
    beside it, at the top level, is an error; other commands' tables are not), else the top level."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise CLIError(f"config file {p}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"config file {p}: {e}") from None
    if section and isinstance(data.get(section), dict):
        from fastattn.cli import COMMANDS
        for key, value in data.items():
            if not isinstance(value, dict):
                raise CLIError(f"config file {p}: {key!r} is at the top level, beside the [{section}] table, which "
                               f"is all that is read: move it into [{section}]")
            if key not in COMMANDS:
                raise CLIError(f"config file {p}: unknown table [{key}] (tables: {', '.join(COMMANDS)})")
        return data[section], True
    return data, False


def build(cls, args, section=None):
    """cls's instance from its defaults, the --config TOML (if given) and the options set in args."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    path = getattr(args, "config", None)
    if path:
        data, in_table = read_toml(path, section)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name in values:
                raise CLIError(f"config file {path}: {key!r} given twice (as {name!r} and with dashes)")
            if name not in fields and isinstance(value, dict) and section and not in_table:
                raise CLIError(f"config file {path}: no [{section}] table ([{key}] is for another command)")
            if name not in fields:
                close = [n for n in fields if n.startswith(name[:4])][:3]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise CLIError(f"config file {path}: unknown key {key!r}{hint}")
            values[name] = _check_value(cls.__name__, fields[name], value, f"config file {path}")
    for name in fields:
        if name in vars(args):
            v = getattr(args, name)
            if isinstance(v, list) and v == [] and name not in values:
                continue
            values[name] = v
    cfg = cls(**values)
    cfg.given = frozenset(values)  # the options the user set (file or command line), not defaults
    check = getattr(cfg, "validate", None)
    if check:
        check()
    return cfg


def check_new_folder(path, flag="--out"):
    """Raise CLIError unless path can be created as a new folder: it does not exist, nor is any parent a file."""
    path = Path(path)
    if path.exists():
        raise CLIError(f"{path} exists: choose another {flag}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {path}: {parent} is a file, not a folder")
            break


def to_toml(cfg) -> str:
    """cfg as TOML text (fields with None left out): what `--config` reads back."""
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        lines.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def check_seed(seed: int) -> None:
    """A seed torch's generators take (theirs is a 64-bit integer; training also seeds with seed + 1)."""
    if not 0 <= seed < 2 ** 63 - 1:
        raise CLIError(f"--seed must be in [0, 2**63 - 1), got {seed}")
