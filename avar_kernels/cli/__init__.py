"""``avar-kernels`` / ``python -m avar_kernels``: the command line.

Each subcommand is a module with ``register(subparsers)`` (adds its parser, sets ``run``) and ``run(args) -> int``.
``avar-kernels`` alone, or with ``op`` options only, runs ``op``. Errors are one line on stderr, never a traceback
(``AVAR_DEBUG=1`` shows it).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import eval as eval_cmd
from . import op, run, synth, train, vas

SUBCOMMANDS = [op, vas, eval_cmd, train, synth, run]


def build_parser():
    names = [m.__name__.rsplit(".", 1)[-1] for m in SUBCOMMANDS]
    p = argparse.ArgumentParser(
        prog="avar-kernels",
        description="Fused attention with per-class attention masses, its model integration, trainer and evaluator.",
        epilog="'avar-kernels' alone, or with op options only, runs 'op'. "
               "'avar-kernels SUBCOMMAND --help' for the options of each.")
    sub = p.add_subparsers(title="subcommands", dest="command", metavar="{" + ",".join(names) + "}")
    for module in SUBCOMMANDS:
        module.register(sub)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # 'op' is the default subcommand: no arguments, or op options without a subcommand.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["op", *argv]
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("avar-kernels: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, ImportError) as e:
        if os.environ.get("AVAR_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"avar-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 1
