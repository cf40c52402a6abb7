"""Triton backend of the fused op (forward and backward for GPUs; CPU only under TRITON_INTERPRET=1).

Implements the backend contract of docs/backends.md in the packed (varlen) layout.
"""
from __future__ import annotations

import os

# Fused key masses (issue 11): forward(..., key_mass=True) and backward(..., dkey_mass=...).
KEY_MASS = True


def is_available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
            num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=False, key_mass=False):
    """(out, lse, mass); ``out_fp32=True`` returns out in float32 (the unrounded output) whatever q's dtype;
    ``key_mass=True`` adds key_mass [Hq, Tk, C] float32: (out, lse, mass, key_mass)."""
    from .fwd import forward as _forward
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
                    num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=out_fp32,
                    key_mass=key_mass)


def backward(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             key_class, query_class, num_classes, mul, abs_, add, scale, window_left, window_right,
             table_grads=None, dkey_mass=None):
    """(dq, dk, dv), or with ``table_grads=(need_mul, need_abs, need_add)`` (dq, dk, dv, dtables [3, Hq, C, C]).
    ``dkey_mass`` [Hq, Tk, C]: the gradient on key masses (its share of delta is added by the backend)."""
    from .bwd import backward as _backward
    return _backward(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, key_class, query_class, num_classes, mul, abs_, add, scale, window_left,
                     window_right, table_grads=table_grads, dkey_mass=dkey_mass)


def tuned_configs() -> list[str]:
    """The launch configs the autotuners chose in this process, one line per (kernel, tuning key): what a GPU
    benchmark reports beside its timings (which tile and which formulation of the class terms won)."""
    from .bwd import _tuned
    from .fwd import _fwd_tuned, _km_tuned
    lines = []
    for table in (_fwd_tuned, _km_tuned, _tuned):
        for tuner in table.values():
            name = getattr(getattr(tuner, "base_fn", None), "__name__", "kernel")
            for key, config in getattr(tuner, "cache", {}).items():
                lines.append(f"{name} {key}: {config}")
    return lines


__all__ = ["KEY_MASS", "is_available", "forward", "backward", "tuned_configs"]
