"""Which backend serves a call: ``reference``, ``cpu`` (C++), ``triton``, or ``cuda`` (the decode kernel).

The contract every backend follows is in ``docs/backends.md``.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from . import cpu, reference

BACKENDS = ("auto", "reference", "cpu", "triton")

_WARNED = set()  # messages already warned about (tests clear it)


def warn_once(msg):
    """One RuntimeWarning per distinct message per process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# The CPU backends are imported up front (cheap) so that torch.compile never traces an import; triton is
# imported on first use, which is always an eager CUDA call or an earlier trace.
_BACKEND_MODULES = {"reference": reference, "cpu": cpu}


def backend_module(name):
    mod = _BACKEND_MODULES.get(name)
    if mod is None:
        mod = _BACKEND_MODULES[name] = importlib.import_module("avar_kernels." + name)
    return mod


def _unavailable(backend):
    if backend == "cpu":
        return "the C++ extension avar_kernels._C is not built (run `pip install --no-build-isolation -e .`)"
    return "triton is not installed or cannot run here (pip install triton; on a CPU it needs TRITON_INTERPRET=1)"


def pick_backend(backend, device, dtype):
    """The backend module name for a prefill call; ValueError/TypeError naming ``backend`` when none fits."""
    if not isinstance(backend, str) or backend not in BACKENDS + ("cuda",):
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        raise ValueError("backend='cuda' serves only decode shapes: call avar_kernels.attention_with_kvcache")
    if backend == "auto":
        if device.type == "cpu":
            if backend_module("cpu").is_available():
                return "cpu"
            warn_once("avar_kernels: the C++ CPU kernels are not built (pip install -e .); "
                      "falling back to the slow reference backend")
            return "reference"
        if device.type == "cuda":
            if dtype == torch.float64:
                return "reference"
            if backend_module("triton").is_available():
                return "triton"
            raise ValueError(f"backend='auto': no fused backend for CUDA tensors: {_unavailable('triton')}; "
                             "backend='reference' works everywhere (slowly)")
        raise ValueError(f"backend='auto': no backend for device {device}: use backend='reference'")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu': needs CPU tensors, got {device}")
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("backend='triton': supports float16, bfloat16 and float32; use backend='reference' for "
                        "float64")
    if backend in ("cpu", "triton") and not backend_module(backend).is_available():
        raise ValueError(f"backend={backend!r} is not available: {_unavailable(backend)}")
    return backend
