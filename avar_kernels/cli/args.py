"""Argument validators shared by the subcommands: each error says which argument and what was expected."""
from __future__ import annotations

import argparse
import math
import os

import torch


def device(s):
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {s!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: CUDA is not available on this machine")
    return str(dev)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def integer(s):
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None


def positive_int(s):
    v = integer(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(s):
    v = integer(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def finite_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def existing_file(s):
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"no such file: {s!r}")
    return s


def dtype(name):
    """``torch.dtype`` from ``float32`` / ``bfloat16`` / ``float16``."""
    return getattr(torch, name)
