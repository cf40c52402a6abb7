"""Triton backend of the fused op (forward and backward for GPUs; CPU only under TRITON_INTERPRET=1).

Implements the backend contract of docs/backends.md in the packed (varlen) layout.
"""
from __future__ import annotations

import os


def is_available() -> bool:
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
            num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=False):
    """(out, lse, mass); ``out_fp32=True`` returns out in float32 (the unrounded output) whatever q's dtype."""
    from .fwd import forward as _forward
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
                    num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=out_fp32)


def backward(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             key_class, query_class, num_classes, mul, abs_, add, scale, window_left, window_right,
             table_grads=None):
    """(dq, dk, dv), or with ``table_grads=(need_mul, need_abs, need_add)`` (dq, dk, dv, dtables [3, Hq, C, C])."""
    from .bwd import backward as _backward
    return _backward(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, key_class, query_class, num_classes, mul, abs_, add, scale, window_left,
                     window_right, table_grads=table_grads)


__all__ = ["is_available", "forward", "backward"]
