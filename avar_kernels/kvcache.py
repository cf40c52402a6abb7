"""Decode: a few new query rows (1..16 per sequence) against a long, optionally paged, KV cache.

:func:`attention_with_kvcache` follows FlashAttention's ``flash_attn_with_kvcache`` after the new keys are
appended: ``cache_seqlens[b]`` counts the valid keys of sequence b, the new rows' keys included, and causal
masking is bottom-right aligned (query i of Sq sees key j iff ``j <= i + cache_seqlens[b] - Sq``).

On CUDA tensors it runs the split-KV CUDA kernel of ``csrc/cuda/decode.cu`` (module ``avar_kernels._cuda``,
forward only; with ``return_key_mass`` a second kernel over the cache sums the new rows' attention per key and
query class). Anywhere else (CPU tensors, an unsupported shape, gradients needed, or the extension not built)
it gathers each sequence's valid keys into the packed varlen form and calls
:func:`avar_kernels.attention_varlen` with the requested backend.

The argument checks read the cache lengths, block ids and class ids back to the host once per call (a sync on a
GPU). The transformers integration's generation steps skip that read: their lengths are known on the host
(``_checks.kvcache_lengths_known``) and their class ids were checked once per forward (``_checks.class_ids_checked``).
"""
from __future__ import annotations

import torch

from . import _checks, _ops
from ._backends import warn_once
from .attention import attention_varlen
from .types import MAX_CLASSES, AttentionOutput

CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)
CUDA_MAX_SQ = 16
KV_BACKENDS = ("auto", "cuda", "reference", "cpu", "triton")

# Tests may force the number of key splits of the CUDA kernel (0 = the launcher's choice).
_FORCE_SPLITS = 0

_CUDA_MODULE = None
_CUDA_ERROR = None


def _cuda_module():
    """The compiled ``avar_kernels._cuda`` module, or None (the reason is kept for the error message)."""
    global _CUDA_MODULE, _CUDA_ERROR
    if _CUDA_MODULE is None and _CUDA_ERROR is None:
        try:
            from . import _cuda  # type: ignore[attr-defined]

            _CUDA_MODULE = _cuda
        except ImportError as exc:  # not built: CPU-only torch or no CUDA toolkit at build time
            _CUDA_ERROR = exc
    return _CUDA_MODULE


def cuda_available() -> bool:
    """True when the CUDA decode extension is built and a CUDA device is present."""
    return _cuda_module() is not None and torch.cuda.is_available()


def _cuda_unavailable_reason() -> str:
    if _cuda_module() is None:
        return ("the CUDA extension avar_kernels._cuda is not built: setup.py builds it only when a CUDA "
                "toolkit (nvcc, CUDA_HOME) and a CUDA build of torch are present at install time "
                f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); reinstall with "
                f"`pip install -e .` on a CUDA machine ({_CUDA_ERROR})")
    return "no CUDA device is available"


def _resolve_classes(key_class, query_class, num_classes, reweight, cache_seqlens, block_table, block_size, b, sq,
                     sk_max, num_blocks, device):
    """Checks the cache lengths, block ids and classes with one host read; returns (key_class [B, L] int32 or None,
    query_class [B, Sq] int32 or None, num_classes)."""
    lengths_known = _checks.lengths_trusted()
    if key_class is None:
        _checks.check_no_classes(query_class, reweight)
        if not lengths_known:
            stats = _checks.kvcache_stats(cache_seqlens, block_table, block_size, sq)
            _checks.check_kvcache_values(stats, cache_seqlens, sq, sk_max, num_blocks)
        return None, None, 0
    _checks.check_int_tensor("key_class", key_class, device)
    if key_class.dim() != 2 or key_class.shape[0] != b:
        raise ValueError(f"key_class: expected shape [B={b}, Sk_max={sk_max}], got {list(key_class.shape)}")
    if query_class is not None:
        _checks.check_int_tensor("query_class", query_class, device)
        if tuple(query_class.shape) != (b, sq):
            raise ValueError(f"query_class: expected shape [{b}, {sq}], got {list(query_class.shape)}")
    read_classes = num_classes is None and not (reweight is not None and reweight.num_classes)
    if read_classes and torch.compiler.is_compiling():
        _checks.resolve_num_classes(None, None, key_class)  # raises: num_classes is required under torch.compile
    check_range = not (torch.compiler.is_compiling() or _checks.ids_trusted())
    key_ids = query_ids = None
    if read_classes or check_range:
        valid = torch.arange(key_class.shape[1], device=device)[None, :] < cache_seqlens.long()[:, None]
        # Ids past a cache's length are unused: read them as 0 (a valid id) rather than boolean-index, which syncs.
        key_ids = torch.where(valid, key_class, torch.zeros_like(key_class))
        query_ids = query_class if check_range else None
    stats = {}
    if read_classes or check_range or not lengths_known:  # else nothing to read back: no host sync
        stats = _checks.kvcache_stats(cache_seqlens, block_table, block_size, sq, key_ids, query_ids)
        _checks.check_kvcache_values(stats, cache_seqlens, sq, sk_max, num_blocks)
        if key_class.shape[1] < stats["max_len"]:
            raise ValueError(f"key_class: expected shape [B={b}, Sk_max={sk_max}] (at least the longest cache, "
                             f"{stats['max_len']}), got {list(key_class.shape)}")
    if num_classes is None and reweight is not None and reweight.num_classes:
        num_classes = reweight.num_classes
    if num_classes is None:
        num_classes = min(max(stats["key_hi"] + 1, 1), MAX_CLASSES)
    num_classes = _checks.resolve_num_classes(num_classes, None, None)
    for name, what, lo, hi in (("key_class", "class ids of the valid keys", "key_lo", "key_hi"),
                               ("query_class", "class ids", "query_lo", "query_hi")):
        if lo in stats and check_range and (stats[lo] < 0 or stats[hi] >= num_classes):
            raise ValueError(f"{name}: {what} must lie in [0, num_classes={num_classes}); found values in "
                             f"[{stats[lo]}, {stats[hi]}]")
    if query_class is None:
        # the classes of the last Sq valid positions (the new rows); empty sequences get class 0
        pos = (cache_seqlens.long()[:, None] - sq + torch.arange(sq, device=device)[None, :]).clamp(min=0)
        query_class = key_class.long().gather(1, pos.clamp(max=max(key_class.shape[1] - 1, 0)))
        query_class = torch.where(cache_seqlens[:, None] > 0, query_class, torch.zeros_like(query_class))
    return key_class.to(torch.int32), query_class.to(torch.int32).contiguous(), num_classes


# ------------------------------------------------------------------------------------------------- paths

def _vec_ok(t):
    """The CUDA kernel's 128-bit loads: contiguous head dim, strides multiples of 8 elements, 16-byte aligned."""
    return (t.stride(-1) == 1 and all(s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))
            and t.data_ptr() % 16 == 0)


def _cuda_why_not(q, d, sq, needs_grad):
    """Why the CUDA decode kernel cannot serve this call, or None when it can."""
    if q.device.type != "cuda":
        return f"the tensors are on {q.device}, not a CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it supports float16 and bfloat16, got {q.dtype}"
    if d not in CUDA_HEAD_DIMS:
        return f"head dim {d} is not one of {CUDA_HEAD_DIMS}"
    if sq > CUDA_MAX_SQ:
        return f"Sq={sq} > {CUDA_MAX_SQ} query rows per sequence"
    if needs_grad:
        return "it has no backward and an input requires grad"
    if not cuda_available():
        return _cuda_unavailable_reason()
    return None


def _run_cuda(q, k_cache, v_cache, cache_seqlens, key_class, block_table, query_class, num_classes, tables,
              scale, causal, key_mass):
    """-> (out, lse, mass, key_mass [B, Hq, Sk_max, C] or None)."""
    if not _vec_ok(q):
        q = q.contiguous()
    if not (_vec_ok(k_cache) and _vec_ok(v_cache)):
        warn_once("attention_with_kvcache: k_cache/v_cache are not laid out for 128-bit loads (contiguous head "
                   "dim, strides multiple of 8); copying them each call")
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    if key_class is not None and key_class.stride(-1) != 1:
        key_class = key_class.contiguous()
    mul, abs_, add = tables
    out, lse, mass, km = _ops.decode_fwd(q, k_cache, v_cache, cache_seqlens, key_class,
                                         None if block_table is None else block_table.contiguous(), query_class,
                                         int(num_classes), mul, abs_, add, float(scale), bool(causal),
                                         int(_FORCE_SPLITS), bool(key_mass))
    return out, lse, mass, (km if key_mass else None)


def gather_packed(k_cache, v_cache, cache_seqlens, lens, block_table, key_class):
    """The valid keys of every sequence packed: (k [Tk, Hk, D], v, cu_seqlens_k int32 [B+1], key_class [Tk])."""
    device = k_cache.device
    b = len(lens)
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)
    cu = torch.zeros(b + 1, dtype=torch.long, device=device)
    if b:
        cu[1:] = torch.cumsum(lens_t, 0)
    total = int(sum(lens))
    bidx = torch.repeat_interleave(torch.arange(b, device=device), lens_t)
    pos = torch.arange(total, device=device) - cu[:-1].repeat_interleave(lens_t)
    hk, d = k_cache.shape[2], k_cache.shape[3]
    if block_table is None:
        k = k_cache[bidx, pos]
        v = v_cache[bidx, pos]
    else:
        bs = k_cache.shape[1]
        page = block_table.long()[bidx, pos // bs]
        k = k_cache[page, pos % bs]
        v = v_cache[page, pos % bs]
    k = k.reshape(total, hk, d)
    v = v.reshape(total, hk, d)
    kc = key_class[bidx, pos] if key_class is not None else None
    return k, v, cu.to(torch.int32), kc


def _run_fallback(q, k_cache, v_cache, cache_seqlens, lens, block_table, key_class, query_class, num_classes,
                  causal, scale, reweight, backend, sk_max, key_mass):
    b, sq, hq, d = q.shape
    k, v, cu_k, kc = gather_packed(k_cache, v_cache, cache_seqlens, lens, block_table, key_class)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    res = attention_varlen(q.reshape(b * sq, hq, d), k, v, cu_q, cu_k, sq, max(lens) if lens else 0, kc,
                           query_class=None if query_class is None else query_class.reshape(-1),
                           num_classes=num_classes if num_classes else None, causal=causal, softmax_scale=scale,
                           reweight=reweight, return_mass=True, return_lse=True, return_key_mass=key_mass,
                           backend=backend)
    out = res.out.view(b, sq, hq, d)
    lse = res.lse.view(hq, b, sq).transpose(0, 1)
    mass = res.mass.view(hq, b, sq, num_classes).transpose(0, 1) if res.mass is not None else None
    km = None
    if key_mass:
        # back from the packed valid keys [Tk, Hq, C] to cache positions [B, Hq, Sk_max, C] (0 past a cache's end)
        lens_t = torch.tensor(lens, dtype=torch.long, device=q.device)
        starts = torch.cumsum(lens_t, 0) - lens_t
        bidx = torch.repeat_interleave(torch.arange(b, device=q.device), lens_t)
        pos = torch.arange(int(sum(lens)), device=q.device) - starts.repeat_interleave(lens_t)
        km = res.key_mass.new_zeros(b, sk_max, hq, num_classes).index_put((bidx, pos), res.key_mass)
        km = km.transpose(1, 2)
    return out, lse, mass, km


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, key_class=None, *, block_table=None, query_class=None,
                           num_classes=None, causal=True, softmax_scale=None, reweight=None, return_mass=True,
                           return_lse=False, return_key_mass=False, backend="auto") -> AttentionOutput:
    """Attention of a few new query rows per sequence against a KV cache, with per-class attention mass.

    Args:
        q: ``[B, Sq, Hq, D]`` new query rows (Sq = 1..16 for the CUDA kernel; any Sq >= 1 elsewhere).
        k_cache, v_cache: ``[B, Sk_max, Hk, D]``, or paged ``[num_blocks, block_size, Hk, D]`` with
            ``block_table``; ``Hq % Hk == 0``; q's dtype and device.
        cache_seqlens: int32 ``[B]``: valid keys per sequence, the new rows' keys included; each 0 (an empty
            sequence: its rows get out 0, mass 0, lse -inf) or in ``[Sq, Sk_max]``.
        key_class: integer ``[B, Sk_max]`` class of every cache position (read below ``cache_seqlens`` only).
        block_table: int32 ``[B, max_blocks]`` page ids (block_size a multiple of 16); Sk_max = max_blocks *
            block_size.
        query_class: integer ``[B, Sq]``; default: the key classes of the last Sq valid positions.
        num_classes: C <= 8; default: the reweight tables' size or ``key_class.max() + 1``.
        causal: bottom-right aligned: query i sees key j iff ``j <= i + cache_seqlens[b] - Sq``.
        softmax_scale: default ``D ** -0.5``. reweight: :class:`avar_kernels.Reweight` score tables.
        backend: ``"auto"`` (the CUDA kernel on CUDA tensors when it applies, else the packed varlen path with
            backend ``"auto"``), ``"cuda"`` (the kernel or an error), or ``"reference"``/``"cpu"``/``"triton"``
            (the packed varlen path with that backend).

        return_key_mass: also return ``key_mass [B, Hq, Sk_max, C]``: the new rows' attention on every cache
            position, summed by query class (0 past ``cache_seqlens``); accumulate it over the steps of a generation
            for a heatmap. On the CUDA kernel a second kernel over the cache after the forward (about one more
            read of K); without gradients only, like the rest of the CUDA path.

    Returns:
        ``AttentionOutput(out [B, Sq, Hq, D], mass [B, Hq, Sq, C] float32 or None, lse [B, Hq, Sq] float32 or None,
        key_mass or None)``.
    """
    if backend not in KV_BACKENDS:
        raise ValueError(f"backend: expected one of {KV_BACKENDS}, got {backend!r}")
    b, sq, hq, hk, d, sk_max, block_size = _checks.check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)
    _checks.check_reweight(reweight)
    for name, flag in (("causal", causal), ("return_mass", return_mass), ("return_lse", return_lse),
                       ("return_key_mass", return_key_mass)):
        _checks.check_flag(name, flag)
    if b == 0:  # empty in, empty out
        nc = num_classes or (reweight.num_classes if reweight is not None else 0) or (1 if key_class is not None else 0)
        return AttentionOutput(q * 0, q.new_zeros(0, hq, sq, nc, dtype=torch.float32)
                               if return_mass and key_class is not None else None,
                               q.new_zeros(0, hq, sq, dtype=torch.float32) if return_lse else None,
                               q.new_zeros(0, hq, sk_max, nc) if return_key_mass and key_class is not None else None)
    key_class, query_class, num_classes = _resolve_classes(
        key_class, query_class, num_classes, reweight, cache_seqlens, block_table, block_size, b, sq, sk_max,
        k_cache.shape[0], q.device)
    scale = _checks.default_scale(softmax_scale, d)
    if return_key_mass and num_classes == 0:
        raise ValueError("return_key_mass: needs key_class: key masses are summed by query class")
    tables = (None, None, None)
    if reweight is not None and num_classes > 0:
        tables = reweight.tables(hq, num_classes, q.device)

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_cache, v_cache) + tuple(x for x in tables if x is not None))
    why_not = _cuda_why_not(q, d, sq, needs_grad)

    if backend == "cuda" and why_not is not None:
        raise ValueError(f"backend='cuda': the CUDA decode kernel cannot run: {why_not}")
    if backend == "cuda" or (backend == "auto" and why_not is None):
        out, lse, mass, key_mass = _run_cuda(q, k_cache, v_cache, cache_seqlens, key_class, block_table,
                                             query_class, num_classes, tables, scale, causal, return_key_mass)
    else:
        if backend == "auto" and q.device.type == "cuda" and _cuda_module() is None:
            warn_once("attention_with_kvcache: " + _cuda_unavailable_reason() + "; using the packed varlen path")
        out, lse, mass, key_mass = _run_fallback(q, k_cache, v_cache, cache_seqlens, cache_seqlens.tolist(),
                                                 block_table, key_class,
                                                 query_class, num_classes, causal, scale, reweight, backend, sk_max,
                                                 return_key_mass)
    return AttentionOutput(out, mass.contiguous() if return_mass and num_classes > 0 and mass is not None else None,
                           lse.contiguous() if return_lse else None, key_mass)
