"""The ``fastattn`` command line: train / generate / eval / quantize / prune, beside info / check / bench / demo.

Every subcommand's options are the fields of a dataclass config (``--help`` lists them); ``--config FILE.toml`` reads
the same fields from a TOML file (its ``[train]`` / ``[generate]`` ... table, or the top level), and options on the
command line override it. Errors a user can cause are one line on stderr and exit code 2; nothing is overwritten.
"""
import argparse
import importlib
import sys

from fastattn.cli.config import CLIError, add_options, build

# subcommand -> (module, config class, positional fields, help)
COMMANDS = {
    "train": ("fastattn.cli.train", "TrainConfig", (), "train or fine-tune a model (default: a small GPT on the "
                                                        "embedded corpus)"),
    "generate": ("fastattn.cli.generate", "GenerateConfig", ("checkpoint",), "continue prompts with a trained model"),
    "eval": ("fastattn.cli.evaluate", "EvalConfig", ("checkpoint",), "held-out loss / perplexity / accuracy as JSON"),
    "quantize": ("fastattn.cli.quantize", "QuantizeConfig", ("checkpoint",), "int8 weights (w8a8 / w8a16, "
                                                                               "SmoothQuant)"),
    "prune": ("fastattn.cli.prune", "PruneConfig", ("checkpoint",), "zero the least important attention heads "
                                                                         "and the smallest weights"),
}

EXAMPLES = """examples:
  fastattn train --steps 300 --out runs/gpt           # a small GPT on the embedded corpus
  fastattn generate runs/gpt -p "It is a truth" -n 60
  fastattn eval runs/gpt
  fastattn train --config my.toml --lr 3e-4           # options from TOML, the command line wins
"""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are raised (one line, the command named) instead of printing usage and exiting."""

    def error(self, message):
        raise CLIError(f"{message} (see: {self.prog} --help)")


def build_parser(legacy=()):
    p = Parser(prog="fastattn", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser, metavar="COMMAND")
    for name, (mod, cls_name, positional, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", metavar="FILE.toml", help=f"read options from a TOML file ([{name}] table or "
                                                                "top level); command-line options override it")
        add_options(sp, getattr(importlib.import_module(mod), cls_name), positional)
        sp.set_defaults(cmd_module=mod, cmd_config=cls_name, cmd_name=name)
    for name, fn, help_, *add_args in legacy:
        sp = sub.add_parser(name, help=help_, description=help_)
        for add in add_args:
            add(sp)
        sp.set_defaults(fn=fn)
    return p


def main(argv=None, legacy=()) -> int:
    from fastattn.data import DataError
    try:
        args = build_parser(legacy).parse_args(argv)
        if getattr(args, "fn", None):
            return args.fn(args)
        module = importlib.import_module(args.cmd_module)
        cfg = build(getattr(module, args.cmd_config), args, section=args.cmd_name)
        return module.main(cfg)
    except (CLIError, DataError) as e:
        print(f"fastattn: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named cannot be read or written (permissions, a full disk ...)
        print(f"fastattn: error: {e.filename}: {e.strerror}" if e.filename and e.strerror else
              f"fastattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastattn: interrupted", file=sys.stderr)
        return 130
