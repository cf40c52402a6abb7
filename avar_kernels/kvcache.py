"""Decode: a few new query rows (1..16 per sequence) against a long, optionally paged, KV cache.

:func:`attention_with_kvcache` follows FlashAttention's ``flash_attn_with_kvcache`` after the new keys are
appended: ``cache_seqlens[b]`` counts the valid keys of sequence b, the new rows' keys included, and causal
masking is bottom-right aligned (query i of Sq sees key j iff ``j <= i + cache_seqlens[b] - Sq``).

On CUDA tensors it runs the split-KV CUDA kernel of ``csrc/cuda/decode.cu`` (module ``avar_kernels._cuda``,
forward only). Anywhere else (CPU tensors, an unsupported shape, gradients needed, or the extension not built)
it gathers each sequence's valid keys into the packed varlen form and calls
:func:`avar_kernels.attention_varlen` with the requested backend.
"""
from __future__ import annotations

import torch

from . import _dispatch
from ._dispatch import AttentionOutput

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


# ----------------------------------------------------------------------------------------------- checks

def _check_int_tensor(name, t, device, int32_only=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if int32_only and t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (q's), got {t.device}")


def _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table):
    """Checks shapes/dtypes/devices; returns (B, Sq, Hq, Hk, D, Sk_max, block_size or 0, seqlens list)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _dispatch.FLOAT_DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share one dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"q, k_cache, v_cache must be on one device; got {q.device}, {k_cache.device}, "
                         f"{v_cache.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape; got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    b, sq, hq, d = q.shape
    hk = k_cache.shape[2]
    if sq < 1:
        raise ValueError(f"q: expected at least one query row per sequence (Sq >= 1), got shape {tuple(q.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: head dim {k_cache.shape[3]} != q's head dim {d}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hk})")
    if not 1 <= d <= _dispatch.MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {_dispatch.MAX_HEAD_DIM}]; got {d}")

    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache: batch size {k_cache.shape[0]} != q's {b} (pass block_table for a paged "
                             "cache [num_blocks, block_size, Hk, D])")
        sk_max, block_size = k_cache.shape[1], 0
    else:
        _check_int_tensor("block_table", block_table, q.device, int32_only=True)
        if block_table.dim() != 2 or block_table.shape[0] != b:
            raise ValueError(f"block_table: expected shape [B={b}, max_blocks], got {list(block_table.shape)}")
        block_size = k_cache.shape[1]
        if block_size % 16 != 0 or block_size == 0:
            raise ValueError(f"k_cache: paged block size (dim 1) must be a positive multiple of 16, got {block_size}")
        sk_max = block_table.shape[1] * block_size

    _check_int_tensor("cache_seqlens", cache_seqlens, q.device, int32_only=True)
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens: expected shape [B={b}], got {list(cache_seqlens.shape)}")
    lens = cache_seqlens.tolist()
    for i, n in enumerate(lens):
        if n < 0 or n > sk_max:
            raise ValueError(f"cache_seqlens: entry {i} is {n}, outside [0, Sk_max={sk_max}]")
        if 0 < n < sq:
            raise ValueError(f"cache_seqlens: entry {i} is {n} < Sq={sq}: the cache must hold the new rows' keys "
                             "(or be empty, 0)")
    if block_table is not None and b > 0:
        need = (cache_seqlens.long() + block_size - 1) // block_size
        used = torch.arange(block_table.shape[1], device=q.device)[None, :] < need[:, None]
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_table: block ids of the valid keys must lie in [0, num_blocks={k_cache.shape[0]}); "
                             f"found values in [{int(ids.min())}, {int(ids.max())}]")
    return b, sq, hq, hk, d, sk_max, block_size, lens


def _resolve_classes(key_class, query_class, num_classes, reweight, cache_seqlens, lens, b, sq, sk_max, device):
    """Returns (key_class [B, L] int32 or None, query_class [B, Sq] int32 or None, num_classes)."""
    if key_class is None:
        _dispatch.check_no_classes(query_class, reweight)
        return None, None, 0
    _check_int_tensor("key_class", key_class, device)
    longest = max(lens) if lens else 0
    if key_class.dim() != 2 or key_class.shape[0] != b or key_class.shape[1] < longest:
        raise ValueError(f"key_class: expected shape [B={b}, Sk_max={sk_max}] (at least the longest cache, "
                         f"{longest}), got {list(key_class.shape)}")
    valid = torch.arange(key_class.shape[1], device=device)[None, :] < cache_seqlens.long()[:, None]
    # Ids past a cache's length are unused: read them as 0 (a valid id) rather than boolean-index, which syncs.
    vals = torch.where(valid, key_class, torch.zeros_like(key_class))
    num_classes = _dispatch.resolve_num_classes(num_classes, reweight, vals)
    _dispatch.check_class_range("key_class", vals, num_classes, what="class ids of the valid keys")
    if query_class is None:
        # the classes of the last Sq valid positions (the new rows); empty sequences get class 0
        pos = (cache_seqlens.long()[:, None] - sq + torch.arange(sq, device=device)[None, :]).clamp(min=0)
        query_class = key_class.long().gather(1, pos.clamp(max=max(key_class.shape[1] - 1, 0)))
        query_class = torch.where(cache_seqlens[:, None] > 0, query_class, torch.zeros_like(query_class))
    else:
        _check_int_tensor("query_class", query_class, device)
        if tuple(query_class.shape) != (b, sq):
            raise ValueError(f"query_class: expected shape [{b}, {sq}], got {list(query_class.shape)}")
        _dispatch.check_class_range("query_class", query_class, num_classes)
    return key_class.to(torch.int32), query_class.to(torch.int32).contiguous(), num_classes


# ------------------------------------------------------------------------------------------------- paths

def _vec_ok(t):
    """The CUDA kernel's 128-bit loads: contiguous head dim, strides multiples of 8 elements, 16-byte aligned."""
    return (t.stride(-1) == 1 and all(s % 8 == 0 or n == 1 for s, n in zip(t.stride()[:-1], t.shape[:-1]))
            and t.data_ptr() % 16 == 0)


def _run_cuda(q, k_cache, v_cache, cache_seqlens, key_class, block_table, query_class, num_classes, tables,
              scale, causal):
    mod = _cuda_module()
    if not _vec_ok(q):
        q = q.contiguous()
    if not (_vec_ok(k_cache) and _vec_ok(v_cache)):
        _dispatch.warn_once("attention_with_kvcache: k_cache/v_cache are not laid out for 128-bit loads (contiguous head "
                   "dim, strides multiple of 8); copying them each call")
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    if key_class is not None and key_class.stride(-1) != 1:
        key_class = key_class.contiguous()
    mul, abs_, add = tables
    out, lse, mass = mod.decode_fwd(q, k_cache, v_cache, cache_seqlens, key_class,
                                    None if block_table is None else block_table.contiguous(), query_class,
                                    int(num_classes), mul, abs_, add, float(scale), bool(causal), int(_FORCE_SPLITS))
    return out, lse, mass


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
                  causal, scale, reweight, backend):
    from . import attention_varlen

    b, sq, hq, d = q.shape
    k, v, cu_k, kc = gather_packed(k_cache, v_cache, cache_seqlens, lens, block_table, key_class)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    res = attention_varlen(q.reshape(b * sq, hq, d), k, v, cu_q, cu_k, sq, max(lens) if lens else 0, kc,
                           query_class=None if query_class is None else query_class.reshape(-1),
                           num_classes=num_classes if num_classes else None, causal=causal, softmax_scale=scale,
                           reweight=reweight, return_mass=True, return_lse=True, backend=backend)
    out = res.out.view(b, sq, hq, d)
    lse = res.lse.view(hq, b, sq).transpose(0, 1)
    mass = res.mass.view(hq, b, sq, num_classes).transpose(0, 1) if res.mass is not None else None
    return out, lse, mass


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, key_class=None, *, block_table=None, query_class=None,
                           num_classes=None, causal=True, softmax_scale=None, reweight=None, return_mass=True,
                           return_lse=False, backend="auto") -> AttentionOutput:
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

    Returns:
        ``AttentionOutput(out [B, Sq, Hq, D], mass [B, Hq, Sq, C] float32 or None, lse [B, Hq, Sq] float32 or None)``.
    """
    if backend not in KV_BACKENDS:
        raise ValueError(f"backend: expected one of {KV_BACKENDS}, got {backend!r}")
    b, sq, hq, hk, d, sk_max, block_size, lens = _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table)
    _dispatch.check_reweight(reweight)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    key_class, query_class, num_classes = _resolve_classes(key_class, query_class, num_classes, reweight,
                                                           cache_seqlens, lens, b, sq, sk_max, q.device)
    scale = _dispatch.default_scale(softmax_scale, d)
    tables = (None, None, None)
    if reweight is not None and num_classes > 0:
        tables = reweight.tables(hq, num_classes, q.device)

    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_cache, v_cache) + tuple(x for x in tables if x is not None))
    why_not = None
    if q.device.type != "cuda":
        why_not = f"the tensors are on {q.device}, not a CUDA device"
    elif q.dtype not in (torch.float16, torch.bfloat16):
        why_not = f"it supports float16 and bfloat16, got {q.dtype}"
    elif d not in CUDA_HEAD_DIMS:
        why_not = f"head dim {d} is not one of {CUDA_HEAD_DIMS}"
    elif sq > CUDA_MAX_SQ:
        why_not = f"Sq={sq} > {CUDA_MAX_SQ} query rows per sequence"
    elif needs_grad:
        why_not = "it has no backward and an input requires grad"
    elif not cuda_available():
        why_not = _cuda_unavailable_reason()

    if backend == "cuda" and why_not is not None:
        raise RuntimeError(f"backend='cuda': the CUDA decode kernel cannot run: {why_not}")
    if backend == "cuda" or (backend == "auto" and why_not is None):
        out, lse, mass = _run_cuda(q, k_cache, v_cache, cache_seqlens, key_class, block_table, query_class,
                                   num_classes, tables, scale, causal)
    else:
        if backend == "auto" and q.device.type == "cuda" and _cuda_module() is None:
            _dispatch.warn_once("attention_with_kvcache: " + _cuda_unavailable_reason() + "; using the packed varlen path")
        out, lse, mass = _run_fallback(q, k_cache, v_cache, cache_seqlens, lens, block_table, key_class,
                                       query_class, num_classes, causal, scale, reweight, backend)
    return AttentionOutput(out, mass.contiguous() if return_mass and num_classes > 0 and mass is not None else None,
                           lse.contiguous() if return_lse else None)
