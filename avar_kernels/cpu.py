"""The C++ CPU backend (``avar_kernels._C`` / ``_C_avx2``): a thin wrapper that follows docs/backends.md.

The kernel itself computes in float32 or float64; fp16 / bf16 inputs are converted to float32 here and
the outputs cast back (out, dq, dk, dv to the input dtype; lse, mass and key_mass stay float32).

Key masses (``KEY_MASS = True``): ``forward(..., key_mass=True)`` also returns ``key_mass [Hq, Tk, C]`` from a
second pass of the kernel over the key blocks once every row's lse is known; ``backward(..., dkey_mass=...)``
adds that gradient to dP and its row term to delta inside the kernel (docs/backends.md).

Two builds of the same source (see setup.py): ``_C_avx2`` (AVX2 + FMA) is loaded when torch reports an AVX2 or
AVX-512 CPU, the portable ``_C`` otherwise (or with ``ATEN_CPU_CAPABILITY=default``); ``VARIANT`` names the one
in use.
"""
from __future__ import annotations

import importlib

import torch

_BUILD_HINT = ("the avar-kernels C++ CPU extension (avar_kernels._C) is not built: "
               "run `pip install -e .` or `python setup.py build_ext --inplace` in the repository root")


def _load():
    """(module, variant name, import error): the AVX2 build where the CPU runs it, else the portable one."""
    names = ["_C"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        names.insert(0, "_C_avx2")
    error = None
    for name in names:
        try:
            return importlib.import_module(f"avar_kernels.{name}"), name, None
        except ImportError as exc:  # pragma: no cover - depends on the build
            error = error or exc
    return None, None, error


_C, VARIANT, _IMPORT_ERROR = _load()

# The dispatcher asks this backend for key masses (forward keyword key_mass, backward keyword dkey_mass).
KEY_MASS = True


class CpuExtensionNotBuilt(ImportError):
    """Raised when the CPU backend is used but the C++ extension is missing."""


def is_available() -> bool:
    """True when the C++ extension is importable."""
    return _C is not None


def _ext():
    if _C is None:
        raise CpuExtensionNotBuilt(f"{_BUILD_HINT} (import error: {_IMPORT_ERROR})")
    return _C


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
            num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=False, key_mass=False):
    """Packed form -> (out [Tq, Hq, D] in q's dtype, lse [Hq, Tq], mass [Hq, Tq, C]) (fp32; fp64 for fp64), and
    with ``key_mass=True`` a fourth output ``key_mass [Hq, Tk, C]`` (same dtype as mass).

    ``out_fp32=True`` returns out in float32 whatever q's dtype: for fp16 / bf16 inputs the kernel's float32
    result without the rounding to q's dtype, so that the backward's delta = <dO, O> is formed from it.
    """
    ext = _ext()
    cdt = _compute_dtype(q.dtype)
    tq, hq = q.shape[0], q.shape[1]
    out = torch.empty(q.shape, dtype=cdt)
    lse = torch.empty(hq, tq, dtype=cdt)
    mass = torch.empty(hq, tq, num_classes, dtype=cdt)
    km = torch.empty(hq, k.shape[0], num_classes, dtype=cdt) if key_mass else None
    ext.forward(_to(q, cdt), _to(k, cdt), _to(v, cdt), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                int(max_seqlen_q), int(max_seqlen_k), _to(key_class, torch.int32), _to(query_class, torch.int32),
                int(num_classes), _to(mul, torch.float32), _to(abs_, torch.float32), _to(add, torch.float32),
                float(scale), int(window_left), int(window_right), out, lse, mass, km)
    out = out.to(torch.float32 if out_fp32 else q.dtype)
    return (out, lse, mass, km) if key_mass else (out, lse, mass)


def backward(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             key_class, query_class, num_classes, mul, abs_, add, scale, window_left, window_right,
             table_grads=None, dkey_mass=None):
    """Packed form -> (dq [Tq, Hq, D], dk, dv [Tk, Hk, D]) in the inputs' dtype.

    ``dkey_mass [Hq, Tk, C]`` (or None): the gradient of the key masses. ``delta`` is the dispatcher's, without
    the key-mass term ``sum_j P_ij dkey_mass[j, qclass(i)]``: the kernel adds it (it needs P).

    With ``table_grads=(need_mul, need_abs, need_add)`` (any True, each asked table present) it returns
    ``(dq, dk, dv, dtables)`` with ``dtables`` float32 ``[3, Hq, C, C]``: the gradients of MUL, ABS, ADD
    (zeros for those not asked), reduced per class inside the kernel's blocks.
    """
    ext = _ext()
    cdt = _compute_dtype(q.dtype)
    want = tuple(bool(w) for w in table_grads) if table_grads is not None else (False, False, False)
    res = ext.backward(_to(dout, cdt), _to(dmass, cdt), _to(delta, cdt), _to(q, cdt), _to(k, cdt),
                       _to(v, cdt), _to(out, cdt), _to(lse, cdt), cu_seqlens_q.contiguous(),
                       cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k),
                       _to(key_class, torch.int32), _to(query_class, torch.int32), int(num_classes),
                       _to(mul, torch.float32), _to(abs_, torch.float32), _to(add, torch.float32),
                       float(scale), int(window_left), int(window_right), *want, _to(dkey_mass, cdt))
    dq, dk, dv = res[0].to(q.dtype), res[1].to(k.dtype), res[2].to(v.dtype)
    if table_grads is None:
        return dq, dk, dv
    if len(res) > 3:
        dtables = res[3].to(torch.float32)
    else:  # nothing asked (or the asked tables are absent)
        dtables = torch.zeros(3, q.shape[1], num_classes, num_classes, dtype=torch.float32)
    return dq, dk, dv, dtables
