"""Argument checks, backend choice and autograd for the fused attention op.

The public functions in :mod:`avar_kernels` call :func:`attention_packed` here after converting the padded
layout to the packed one. Backends implement the contract in ``docs/backends.md``; the fused backends run
behind two ``torch.library`` custom ops (``avar_kernels::attention_fwd`` / ``attention_bwd``) so the op
compiles under ``torch.compile`` without graph breaks.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import warnings
from typing import NamedTuple, Optional, Sequence

import torch

from . import cpu, reference

MAX_CLASSES = 8
MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "cpu", "triton")


class AttentionOutput(NamedTuple):
    """Result of the fused op: ``out`` like q; ``mass`` per query row and key class (or None); ``lse`` (or None)."""

    out: torch.Tensor
    mass: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]


def _as_table(name, value):
    if value is None:
        return None
    t = torch.as_tensor(value)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"Reweight.{name}: expected a float tensor, got dtype {t.dtype}")
    t = t.to(torch.float32)
    if t.dim() not in (1, 2, 3):
        raise ValueError(f"Reweight.{name}: expected shape [C] (over key classes), [C, C] or [H, C, C]; "
                         f"got {tuple(t.shape)}")
    if t.dim() >= 2 and t.shape[-1] != t.shape[-2]:
        raise ValueError(f"Reweight.{name}: the last two dims (query class, key class) must be equal; "
                         f"got {tuple(t.shape)}")
    if t.shape[-1] > MAX_CLASSES or t.shape[-1] < 1:
        raise ValueError(f"Reweight.{name}: between 1 and {MAX_CLASSES} classes are supported; got {t.shape[-1]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"Reweight.{name}: table values must be finite")
    return t


class Reweight:
    """Class-wise re-weighting of the pre-softmax scores (SPEC 2).

    ``z' = z * (1 + mul[h, a, b]) + abs[h, a, b] * |z| + add[h, a, b]`` for a query of class ``a`` and a key
    of class ``b`` in query head ``h``. Each table is ``[C]`` (indexed by key class, same for every head and
    query class), ``[C, C]`` (query class, key class) or ``[H, C, C]``. Absent or all-zero tables cost nothing.
    A probability-space factor ``f`` on a class is ``add = log f``.
    """

    def __init__(self, mul=None, abs=None, add=None):  # noqa: A002 - the SPEC names the table ABS
        self.mul = _as_table("mul", mul)
        self.abs = _as_table("abs", abs)
        self.add = _as_table("add", add)
        sizes = {t.shape[-1] for t in (self.mul, self.abs, self.add) if t is not None}
        if len(sizes) > 1:
            raise ValueError(f"Reweight: all tables must have the same number of classes; got {sorted(sizes)}")
        heads = {t.shape[0] for t in (self.mul, self.abs, self.add) if t is not None and t.dim() == 3}
        if len(heads) > 1:
            raise ValueError(f"Reweight: per-head tables disagree on the number of heads: {sorted(heads)}")
        self.num_classes = sizes.pop() if sizes else 0
        # Decided once here, not per call, so that the hot path never syncs to ask whether a table is zero.
        # A learned table (requires_grad) is always active, even while it is all zero (its initial value).
        self._active = {n: t is not None and (t.requires_grad or bool((t != 0).any())) for n, t in
                        (("mul", self.mul), ("abs", self.abs), ("add", self.add))}

    @property
    def is_identity(self) -> bool:
        return not any(self._active.values())

    def tables(self, num_heads: int, num_classes: int, device) -> tuple:
        """``(mul, abs, add)`` as float32 ``[num_heads, C, C]`` contiguous tensors on ``device``, None if inactive."""
        if self.num_classes and self.num_classes != num_classes:
            raise ValueError(f"reweight: tables have {self.num_classes} classes but the op has "
                             f"num_classes={num_classes}")
        out = []
        for name in ("mul", "abs", "add"):
            t = getattr(self, name)
            if not self._active[name]:
                out.append(None)
                continue
            if t.dim() == 1:
                t = t[None, None, :].expand(num_heads, num_classes, num_classes)
            elif t.dim() == 2:
                t = t[None].expand(num_heads, num_classes, num_classes)
            elif t.shape[0] != num_heads:
                raise ValueError(f"reweight.{name}: table has {t.shape[0]} heads but q has {num_heads}")
            out.append(t.to(device=device, dtype=torch.float32).contiguous())
        return tuple(out)

    def __repr__(self):
        parts = [f"{n}={list(getattr(self, n).shape)}" for n in ("mul", "abs", "add") if getattr(self, n) is not None]
        return f"Reweight({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------- checks

def check_qkv(q, k, v, packed: bool):
    rank = 3 if packed else 4
    layout = "[T, H, D]" if packed else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size; got {q.shape[0]} and {k.shape[0]}")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hk})")
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head dim; got {d} and {k.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}]; got {d}")


def check_classes(name, cls, shape, device):
    if not isinstance(cls, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor of shape {list(shape)}, got {type(cls).__name__}")
    if cls.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"{name}: expected an integer dtype, got {cls.dtype}")
    if tuple(cls.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(cls.shape)}")
    if cls.device != device:
        raise ValueError(f"{name}: expected device {device}, got {cls.device}")


_CLASS_IDS_CHECKED = contextvars.ContextVar("avar_class_ids_checked", default=False)


@contextlib.contextmanager
def class_ids_checked():
    """Within this context the op trusts that class ids lie in range (the caller checked them once).

    Reading ids back is a host sync on GPUs; the transformers integration checks a forward's classes once in
    its pre-hook instead of in every layer. Outside the context (e.g. a checkpointed layer recomputed in
    backward) the op simply checks again.
    """
    token = _CLASS_IDS_CHECKED.set(True)
    try:
        yield
    finally:
        _CLASS_IDS_CHECKED.reset(token)


def read_class_range(cls):
    """(min, max) of the ids: the host sync that the range checks cost."""
    return int(cls.min()), int(cls.max())


def check_class_range(name, cls, num_classes, what="class ids"):
    # Reading the ids back is a host sync that torch.compile cannot trace: the check runs in eager calls only.
    if cls.numel() == 0 or torch.compiler.is_compiling() or _CLASS_IDS_CHECKED.get():
        return
    lo, hi = read_class_range(cls)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: {what} must lie in [0, num_classes={num_classes}); found values in [{lo}, {hi}]")


def resolve_num_classes(num_classes, reweight, key_classes):
    """num_classes as given, else the reweight tables' size, else ``key_classes.max() + 1``; checked."""
    if num_classes is None and reweight is not None and reweight.num_classes:
        num_classes = reweight.num_classes
    if num_classes is None:
        if torch.compiler.is_compiling():
            raise ValueError("num_classes: required under torch.compile (inferring it reads the class ids back)")
        num_classes = int(key_classes.max()) + 1 if key_classes.numel() else 1
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes: expected an int in [1, {MAX_CLASSES}], got {num_classes!r}")
    return num_classes


def check_cu_seqlens(name, cu, total, device, batch=None):
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D tensor [N + 1] with N >= 1, got shape {list(cu.shape)}")
    if batch is not None and cu.numel() != batch:
        raise ValueError(f"{name}: expected {batch} entries (the same number of sequences as cu_seqlens_q), "
                         f"got {cu.numel()}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device}, got {cu.device}")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name}: must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}: the last entry ({vals[-1]}) must equal the number of packed tokens ({total})"
                         + (" (it points past the tensor)" if vals[-1] > total else ""))
    return vals


def normalize_window(window, causal):
    if window is None:
        left, right = -1, -1
    else:
        if (not isinstance(window, Sequence) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
            raise ValueError(f"window: expected a pair of ints (left, right), -1 for unbounded; got {window!r}")
        left, right = window
        if left < -1 or right < -1:
            raise ValueError(f"window: sizes must be >= 0 or -1 (unbounded); got {window!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def pick_backend(backend, device, dtype):
    if backend not in BACKENDS + ("cuda",):
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        raise ValueError("backend='cuda' serves only decode shapes: call avar_kernels.attention_with_kvcache")
    if backend == "auto":
        if device.type == "cpu":
            if _backend_module("cpu").is_available():
                return "cpu"
            warn_once("avar_kernels: the C++ CPU kernels are not built (pip install -e .); "
                       "falling back to the slow reference backend")
            return "reference"
        if device.type == "cuda":
            if _backend_module("triton").is_available():
                if dtype == torch.float64:
                    return "reference"
                return "triton"
            raise RuntimeError("avar_kernels: no backend for CUDA tensors: install triton (pip install triton)")
        raise RuntimeError(f"avar_kernels: no backend for device {device}: use backend='reference'")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {device}")
    if backend == "triton" and dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32; use backend='reference' for float64")
    if backend in ("cpu", "triton") and not _backend_module(backend).is_available():
        raise RuntimeError(f"backend={backend!r} is not available: "
                           + ("the C++ extension is not built (run `pip install -e .`)" if backend == "cpu"
                              else "triton is not installed or cannot run here"))
    return backend


_WARNED = set()  # messages already warned about (tests clear it)


def warn_once(msg):
    """One RuntimeWarning per distinct message per process."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# The CPU backends are imported up front (cheap) so that torch.compile never traces an import; triton is
# imported on first use, which is always an eager CUDA call or an earlier trace.
_BACKEND_MODULES = {"reference": reference, "cpu": cpu}


def _backend_module(name):
    mod = _BACKEND_MODULES.get(name)
    if mod is None:
        mod = _BACKEND_MODULES[name] = importlib.import_module("avar_kernels." + name)
    return mod


# ------------------------------------------------------------------------- custom ops (fused backends)

@torch.library.custom_op("avar_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   key_class: Optional[torch.Tensor], query_class: Optional[torch.Tensor], num_classes: int,
                   mul: Optional[torch.Tensor], abs_: Optional[torch.Tensor], add: Optional[torch.Tensor],
                   scale: float, window_left: int, window_right: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backend_module(backend).forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            key_class, query_class, num_classes, mul, abs_, add, scale,
                                            window_left, window_right)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
                        num_classes, mul, abs_, add, scale, window_left, window_right, backend):
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=stat),
            q.new_empty(q.shape[1], q.shape[0], num_classes, dtype=stat))


@torch.library.custom_op("avar_kernels::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, dmass: Optional[torch.Tensor], delta: torch.Tensor, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   key_class: Optional[torch.Tensor], query_class: Optional[torch.Tensor], num_classes: int,
                   mul: Optional[torch.Tensor], abs_: Optional[torch.Tensor], add: Optional[torch.Tensor],
                   scale: float, window_left: int, window_right: int, backend: str, need_dmul: bool,
                   need_dabs: bool, need_dadd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dtables): dtables float32 [3, Hq, C, C] (d MUL, d ABS, d ADD) when a table gradient is
    asked, else an empty [0] tensor (custom op outputs cannot be None)."""
    args = (dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            key_class, query_class, num_classes, mul, abs_, add, scale, window_left, window_right)
    if need_dmul or need_dabs or need_dadd:
        return _backend_module(backend).backward(*args, table_grads=(need_dmul, need_dabs, need_dadd))
    dq, dk, dv = _backend_module(backend).backward(*args)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, key_class, query_class, num_classes, mul, abs_, add, scale, window_left,
                        window_right, backend, need_dmul, need_dabs, need_dadd):
    shape = (3, q.shape[1], num_classes, num_classes) if (need_dmul or need_dabs or need_dadd) else (0,)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(shape, dtype=torch.float32)


_FWD_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "key_class", "query_class",
             "num_classes", "mul", "abs_", "add", "scale", "window_left", "window_right", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse, mass = output
    ctx.save_for_backward(q, k, v, out, lse, mass, inputs[3], inputs[4], inputs[7], inputs[8],
                          inputs[10], inputs[11], inputs[12])
    ctx.meta = dict(zip(_FWD_ARGS, inputs[3:]))


def _backward(ctx, dout, dlse, dmass):
    q, k, v, out, lse, mass, cu_q, cu_k, key_class, query_class, mul, abs_, add = ctx.saved_tensors
    m = ctx.meta
    if dout is None:
        dout = torch.zeros_like(out)
    # delta_i = <dO_i, O_i> + sum_b dM[i,b] M[i,b] - dLSE_i  (SPEC 3): O(T*H*(D+C)) work, done once here.
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(0, 1)
    if dmass is not None and m["num_classes"] > 0:
        dmass = dmass.to(lse.dtype).contiguous()
        delta = delta + (dmass * mass).sum(-1)
    else:
        dmass = None
    if dlse is not None:
        # lse = -inf rows have P = 0 everywhere: their dlse must not turn into inf - inf.
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse)
    # Table gradients only where a table is present and needs one (inputs 10, 11, 12: mul, abs_, add).
    need = tuple(t is not None and bool(ctx.needs_input_grad[i]) for i, t in zip((10, 11, 12), (mul, abs_, add)))
    dq, dk, dv, dtab = _attention_bwd(dout.contiguous(), dmass, delta.contiguous(), q, k, v, out, lse, cu_q, cu_k,
                                      m["max_seqlen_q"], m["max_seqlen_k"], key_class, query_class,
                                      m["num_classes"], mul, abs_, add, m["scale"], m["window_left"],
                                      m["window_right"], m["backend"], *need)
    dtables = tuple(dtab[w] if need[w] else None for w in range(3))
    rest = [None] * len(_FWD_ARGS)
    rest[_FWD_ARGS.index("mul"):_FWD_ARGS.index("add") + 1] = dtables
    return (dq, dk, dv) + tuple(rest)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------- the op

def attention_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
                     num_classes, reweight, scale, window_left, window_right, backend):
    """Checked packed-layout call: returns (out [Tq,Hq,D], lse [Hq,Tq], mass [Hq,Tq,C] or [Hq,Tq,0])."""
    hq = q.shape[1]
    mul = abs_ = add = None
    if reweight is not None:
        mul, abs_, add = reweight.tables(hq, num_classes, q.device)
    backend = pick_backend(backend, q.device, q.dtype)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if key_class is not None:
        key_class = key_class.to(torch.int32).contiguous()
        query_class = query_class.to(torch.int32).contiguous()
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), key_class, query_class,
            int(num_classes), mul, abs_, add, float(scale), int(window_left), int(window_right))
    if backend == "reference":
        return _backend_module("reference").forward(*args)
    return _attention_fwd(*args, backend)


def check_no_classes(query_class, reweight):
    """Without key classes there can be neither query classes nor an active re-weighting."""
    if query_class is not None:
        raise ValueError("query_class was given without key_class")
    if reweight is not None and not reweight.is_identity:
        raise ValueError("reweight needs key_class (and query_class) to know each token's class")


def resolve_classes(key_class, query_class, num_classes, reweight, kv_len_shape, q_len_shape, device,
                    default_query_class):
    """Checks the class tensors and returns (key_class, query_class, num_classes); classes may be None."""
    if key_class is None:
        check_no_classes(query_class, reweight)
        return None, None, 0
    check_classes("key_class", key_class, kv_len_shape, device)
    num_classes = resolve_num_classes(num_classes, reweight, key_class)
    check_class_range("key_class", key_class, num_classes)
    if query_class is None:
        query_class = default_query_class()
    else:
        check_classes("query_class", query_class, q_len_shape, device)
        check_class_range("query_class", query_class, num_classes)
    return key_class, query_class, num_classes


def default_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return head_dim ** -0.5
    if not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale: expected a finite float, got {softmax_scale!r}")
    return float(softmax_scale)


def check_reweight(reweight):
    if reweight is not None and not isinstance(reweight, Reweight):
        raise TypeError(f"reweight: expected avar_kernels.Reweight or None, got {type(reweight).__name__}")
