"""The fused backends behind ``torch.library`` custom ops, and their autograd.

``avar_kernels::attention_fwd`` / ``attention_bwd`` (prefill, packed layout) and ``avar_kernels::decode_fwd``
(the CUDA split-KV decode kernel) have fake implementations, so ``torch.compile(fullgraph=True)`` traces
through them. The op is differentiable to first order; a second backward raises a clear error.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backends import backend_module, pick_backend, warn_once

LOW_PRECISION = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ prefill

@torch.library.custom_op("avar_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                  key_class: Optional[torch.Tensor], query_class: Optional[torch.Tensor], num_classes: int,
                  mul: Optional[torch.Tensor], abs_: Optional[torch.Tensor], add: Optional[torch.Tensor],
                  scale: float, window_left: int, window_right: int, backend: str, out_fp32: bool,
                  key_mass: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out [Tq, Hq, D] in q's dtype, or float32 with ``out_fp32``; lse [Hq, Tq]; mass [Hq, Tq, C];
    key_mass [Hq, Tk, C] with ``key_mass``, else an empty [0] tensor)."""
    kw = {}
    if out_fp32:
        kw["out_fp32"] = True
    if key_mass:
        kw["key_mass"] = True
    res = backend_module(backend).forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          key_class, query_class, num_classes, mul, abs_, add, scale,
                                          window_left, window_right, **kw)
    if key_mass:
        return res
    return (*res, q.new_empty(0, dtype=torch.float32))


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
                        num_classes, mul, abs_, add, scale, window_left, window_right, backend, out_fp32, key_mass):
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q, dtype=torch.float32) if out_fp32 else torch.empty_like(q)
    km = q.new_empty(q.shape[1], k.shape[0], num_classes, dtype=stat) if key_mass else q.new_empty(0, dtype=stat)
    return (out, q.new_empty(q.shape[1], q.shape[0], dtype=stat),
            q.new_empty(q.shape[1], q.shape[0], num_classes, dtype=stat), km)


@torch.library.custom_op("avar_kernels::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, dmass: Optional[torch.Tensor], dkey_mass: Optional[torch.Tensor],
                  delta: torch.Tensor, q: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                  key_class: Optional[torch.Tensor], query_class: Optional[torch.Tensor], num_classes: int,
                  mul: Optional[torch.Tensor], abs_: Optional[torch.Tensor], add: Optional[torch.Tensor],
                  scale: float, window_left: int, window_right: int, backend: str, need_dmul: bool,
                  need_dabs: bool, need_dadd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dtables): dtables float32 [3, Hq, C, C] (d MUL, d ABS, d ADD) when a table gradient is
    asked, else an empty [0] tensor (custom op outputs cannot be None). With ``dkey_mass`` the backend adds the
    key-mass term to dP and to the row constant delta itself (that needs a pass over the keys)."""
    args = (dout, dmass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            key_class, query_class, num_classes, mul, abs_, add, scale, window_left, window_right)
    kw = {} if dkey_mass is None else {"dkey_mass": dkey_mass}
    if need_dmul or need_dabs or need_dadd:
        return backend_module(backend).backward(*args, table_grads=(need_dmul, need_dabs, need_dadd), **kw)
    dq, dk, dv = backend_module(backend).backward(*args, **kw)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, dmass, dkey_mass, delta, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, key_class, query_class, num_classes, mul, abs_, add, scale, window_left,
                        window_right, backend, need_dmul, need_dabs, need_dadd):
    shape = (3, q.shape[1], num_classes, num_classes) if (need_dmul or need_dabs or need_dadd) else (0,)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(shape, dtype=torch.float32)


# attention_fwd's inputs after q, k, v, in order; the autograd keeps them by these names.
_FWD_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "key_class", "query_class",
             "num_classes", "mul", "abs_", "add", "scale", "window_left", "window_right", "backend", "out_fp32",
             "key_mass")
_SAVED = ("q", "k", "v", "out", "lse", "mass", "cu_seqlens_q", "cu_seqlens_k", "key_class", "query_class",
          "mul", "abs_", "add")


def _setup_context(ctx, inputs, output):
    named = dict(zip(("q", "k", "v") + _FWD_ARGS, inputs))
    named["out"], named["lse"], named["mass"], _ = output
    ctx.save_for_backward(*(named[n] for n in _SAVED))
    ctx.meta = {n: named[n] for n in _FWD_ARGS if n not in _SAVED}
    ctx.table_input_index = {n: 3 + _FWD_ARGS.index(n) for n in ("mul", "abs_", "add")}


def _backward(ctx, dout, dlse, dmass, dkey_mass):
    s = dict(zip(_SAVED, ctx.saved_tensors))
    m = ctx.meta
    out, lse, mass = s["out"], s["lse"], s["mass"]
    if dout is None:
        dout = torch.zeros_like(out)
    # delta_i = <dO_i, O_i> + sum_b dM[i,b] M[i,b] - dLSE_i (docs/backends.md): O(T*H*(D+C)) work, done once here,
    # from the float32 output when the inputs are fp16/bf16 (out_fp32), so that delta is not formed from a rounded O.
    delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(0, 1)
    if dmass is not None and m["num_classes"] > 0:
        dmass = dmass.to(lse.dtype).contiguous()
        delta = delta + (dmass * mass).sum(-1)
    else:
        dmass = None
    if dlse is not None:
        # lse = -inf rows have P = 0 everywhere: their dlse must not turn into inf - inf.
        delta = delta - torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(dlse), dlse)
    if dkey_mass is not None and m["key_mass"] and m["num_classes"] > 0:
        dkey_mass = dkey_mass.to(lse.dtype).contiguous()
    else:
        dkey_mass = None
    q = s["q"]
    need = tuple(s[n] is not None and bool(ctx.needs_input_grad[ctx.table_input_index[n]])
                 for n in ("mul", "abs_", "add"))
    dq, dk, dv, dtab = attention_bwd(
        dout.to(q.dtype).contiguous(), dmass, dkey_mass, delta.contiguous(), q, s["k"], s["v"], out.to(q.dtype), lse,
        s["cu_seqlens_q"], s["cu_seqlens_k"], m["max_seqlen_q"], m["max_seqlen_k"], s["key_class"],
        s["query_class"], m["num_classes"], s["mul"], s["abs_"], s["add"], m["scale"], m["window_left"],
        m["window_right"], m["backend"], *need)
    grads = {n: dtab[w] if need[w] else None for w, n in enumerate(("mul", "abs_", "add"))}
    return (dq, dk, dv) + tuple(grads.get(n) for n in _FWD_ARGS)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("avar_kernels: the fused attention is differentiable to first order only; a second "
                       "backward (create_graph=True through its gradients, e.g. a gradient penalty or "
                       "torch.autograd.functional.hessian) is not supported: use backend='reference' for that")


def _bwd_setup_context(ctx, inputs, output):
    pass


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
attention_bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup_context)


def _empty_result(q, k, v, num_classes, hq, key_mass):
    """Empty in, empty out: outputs for Tq = 0 or Tk = 0, rows without keys (out 0, mass 0, lse -inf)."""
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Built from q, k, v (times 0, NaN cleared) so that the result stays connected to the inputs' autograd graph.
    out = (q * 0).nan_to_num(0.0, 0.0, 0.0) + (k.sum() + v.sum()) * 0
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=stat, device=q.device)
    mass = torch.zeros(hq, q.shape[0], num_classes, dtype=stat, device=q.device)
    if key_mass:
        return out, lse, mass, torch.zeros(hq, k.shape[0], num_classes, dtype=stat, device=q.device)
    return out, lse, mass


def attention_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
                     num_classes, reweight, scale, window_left, window_right, backend, key_mass=False):
    """Checked packed-layout call: returns (out [Tq,Hq,D], lse [Hq,Tq], mass [Hq,Tq,C] or [Hq,Tq,0]) and, with
    ``key_mass``, key_mass [Hq, Tk, C]."""
    hq = q.shape[1]
    mul = abs_ = add = None
    if reweight is not None:
        mul, abs_, add = reweight.tables(hq, num_classes, q.device)
    requested = backend
    backend = pick_backend(backend, q.device, q.dtype)
    if key_mass and backend != "reference" and not getattr(backend_module(backend), "KEY_MASS", False):
        if requested != "auto":
            raise ValueError(f"return_key_mass: the {backend!r} backend does not compute key masses yet; "
                             "use backend='reference' (materializes the attention matrix)")
        warn_once(f"avar_kernels: return_key_mass: the {backend!r} backend does not compute key masses yet; using "
                  "the reference backend (materializes the attention matrix per sequence)")
        backend = "reference"
    if q.shape[0] == 0 or k.shape[0] == 0:
        return _empty_result(q, k, v, num_classes, hq, key_mass)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if key_class is not None:
        key_class = key_class.to(torch.int32).contiguous()
        query_class = query_class.to(torch.int32).contiguous()
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), key_class, query_class,
            int(num_classes), mul, abs_, add, float(scale), int(window_left), int(window_right))
    if backend == "reference":
        return backend_module("reference").forward(*args, key_mass=key_mass)
    tables = [t for t in (mul, abs_, add) if t is not None]
    out_fp32 = (q.dtype in LOW_PRECISION and torch.is_grad_enabled()
                and any(t.requires_grad for t in [q, k, v] + tables))
    out, lse, mass, km = attention_fwd(*args, backend, out_fp32, key_mass)
    out = out.to(q.dtype) if out_fp32 else out
    return (out, lse, mass, km) if key_mass else (out, lse, mass)


# ------------------------------------------------------------------------------------------------- decode

@torch.library.custom_op("avar_kernels::decode_fwd", mutates_args=())
def decode_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               key_class: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
               query_class: Optional[torch.Tensor], num_classes: int, mul: Optional[torch.Tensor],
               abs_: Optional[torch.Tensor], add: Optional[torch.Tensor], scale: float, causal: bool,
               num_splits: int, key_mass: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA split-KV decode kernel (forward only): (out [B, Sq, Hq, D], lse [B, Hq, Sq], mass [B, Hq, Sq, C],
    key_mass [B, Hq, Sk_max, C] float32 with ``key_mass`` (a second kernel over the cache after the final lse), else
    an empty [0] tensor: custom op outputs cannot be None)."""
    from . import _cuda  # type: ignore[attr-defined]  # built only with a CUDA toolkit and a CUDA torch

    return tuple(_cuda.decode_fwd(q, k_cache, v_cache, cache_seqlens, key_class, block_table, query_class,
                                  num_classes, mul, abs_, add, scale, causal, num_splits, key_mass))


def decode_sk_max(k_cache, block_table):
    """The cache's logical length Sk_max: k_cache's dim 1, or max_blocks * block_size when paged."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


@decode_fwd.register_fake
def _decode_fwd_fake(q, k_cache, v_cache, cache_seqlens, key_class, block_table, query_class, num_classes, mul,
                     abs_, add, scale, causal, num_splits, key_mass=False):
    b, sq, hq, _ = q.shape
    km_shape = (b, hq, decode_sk_max(k_cache, block_table), num_classes) if key_mass else (0,)
    return (torch.empty_like(q), q.new_empty(b, hq, sq, dtype=torch.float32),
            q.new_empty(b, hq, sq, num_classes, dtype=torch.float32), q.new_empty(km_shape, dtype=torch.float32))
