"""Argument checks shared by every entry point: each error names the argument and what was expected."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import torch

from .types import FLOAT_DTYPES, MAX_CLASSES, MAX_HEAD_DIM, Reweight

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


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
    check_heads(q.shape[-2], k.shape[-2])
    check_head_dim(q.shape[-1], k.shape[-1], "k")


def check_heads(hq, hk):
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of kv heads ({hk})")


def check_head_dim(d, dk, k_name):
    if dk != d:
        raise ValueError(f"{k_name}: head dim {dk} != q's head dim {d}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in [1, {MAX_HEAD_DIM}]; got {d}")


def check_int_tensor(name, t, device, int32_only=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor, got {type(t).__name__}")
    if int32_only and t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (q's), got {t.device}")


def check_classes(name, cls, shape, device):
    check_int_tensor(name, cls, device)
    if tuple(cls.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(cls.shape)}")


_CLASS_IDS_CHECKED = contextvars.ContextVar("avar_class_ids_checked", default=False)


@contextlib.contextmanager
def _set_within(flag: contextvars.ContextVar):
    """flag is True within the context."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def class_ids_checked():
    """Within this context the op trusts that class ids lie in range (the caller checked them once).

    Reading ids back is a host sync on GPUs; the transformers integration checks a forward's classes once in
    its pre-hook instead of in every layer. Outside the context (e.g. a checkpointed layer recomputed in
    backward) the op simply checks again.
    """
    return _set_within(_CLASS_IDS_CHECKED)


def ids_trusted() -> bool:
    """True inside :func:`class_ids_checked` (the caller checked the ids once)."""
    return _CLASS_IDS_CHECKED.get()


_KVCACHE_LENGTHS_KNOWN = contextvars.ContextVar("avar_kvcache_lengths_known", default=False)


def kvcache_lengths_known():
    """Within this context ``attention_with_kvcache`` trusts ``cache_seqlens`` (and ``block_table``): the caller
    built them from lengths it holds on the host. Reading them back for the checks is a host sync on GPUs, once
    per layer and generation step otherwise; the transformers integration's decode steps pass the cache's length
    for every sequence.
    """
    return _set_within(_KVCACHE_LENGTHS_KNOWN)


def lengths_trusted() -> bool:
    """True inside :func:`kvcache_lengths_known`."""
    return _KVCACHE_LENGTHS_KNOWN.get()


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


def resolve_num_classes(num_classes, reweight, key_class, name="key_class"):
    """num_classes as given, else the reweight tables' size, else ``key_class.max() + 1``; checked."""
    if num_classes is None and reweight is not None and reweight.num_classes:
        num_classes = reweight.num_classes
    if num_classes is None:
        if torch.compiler.is_compiling():
            raise ValueError("num_classes: required under torch.compile (inferring it reads the class ids back, "
                             "a host sync): pass num_classes=C")
        if key_class.numel() == 0:
            return 1
        lo, hi = read_class_range(key_class)
        if lo < 0 or hi >= MAX_CLASSES:
            raise ValueError(f"{name}: class ids must lie in [0, {MAX_CLASSES}); found values in [{lo}, {hi}]")
        return hi + 1
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes: expected an int in [1, {MAX_CLASSES}], got {num_classes!r}")
    return num_classes


def check_cu_seqlens(name, cu, total, device, batch=None):
    """Checks ``cu_seqlens_q/k`` and returns its values as a list (one host read)."""
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
    """``(window_left, window_right)`` with -1 for an unbounded side; causal caps the right side at 0."""
    check_flag("causal", causal)
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


def check_no_classes(query_class, reweight):
    """Without key classes there can be neither query classes nor an active re-weighting."""
    if query_class is not None:
        raise ValueError("query_class: given without key_class (pass key_class too)")
    if reweight is not None and not reweight.is_identity:
        raise ValueError("reweight: needs key_class (and query_class) to know each token's class")


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
    if (not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool)
            or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float, got {softmax_scale!r}")
    return float(softmax_scale)


def check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table):
    """Checks shapes/dtypes/devices (no values: see kvcache_stats); returns (B, Sq, Hq, Hk, D, Sk_max, block_size
    or 0)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
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
    check_head_dim(d, k_cache.shape[3], "k_cache")
    check_heads(hq, hk)

    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache: batch size {k_cache.shape[0]} != q's {b} (pass block_table for a paged "
                             "cache [num_blocks, block_size, Hk, D])")
        sk_max, block_size = k_cache.shape[1], 0
    else:
        check_int_tensor("block_table", block_table, q.device, int32_only=True)
        if block_table.dim() != 2 or block_table.shape[0] != b:
            raise ValueError(f"block_table: expected shape [B={b}, max_blocks], got {list(block_table.shape)}")
        block_size = k_cache.shape[1]
        if block_size % 16 != 0 or block_size == 0:
            raise ValueError(f"k_cache: paged block size (dim 1) must be a positive multiple of 16, got {block_size}")
        sk_max = block_table.shape[1] * block_size

    check_int_tensor("cache_seqlens", cache_seqlens, q.device, int32_only=True)
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens: expected shape [B={b}], got {list(cache_seqlens.shape)}")
    return b, sq, hq, hk, d, sk_max, block_size


def kvcache_stats(cache_seqlens, block_table, block_size, sq, key_ids=None, query_ids=None):
    """The values the decode checks need, read back in one host sync: min / max of ``cache_seqlens``, how many
    entries lie in ``(0, Sq)``, the range of the block ids of the valid keys (paged), of ``key_ids`` and of
    ``query_ids``."""
    lens = cache_seqlens.long()
    vals = [lens.min(), lens.max(), ((lens > 0) & (lens < sq)).sum()]
    if block_table is not None:
        need = (lens + block_size - 1) // block_size
        used = torch.arange(block_table.shape[1], device=lens.device)[None, :] < need[:, None]
        big, small = torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min
        vals += [torch.where(used, block_table, big).min(), torch.where(used, block_table, small).max()]
    for ids in (key_ids, query_ids):
        if ids is not None:
            vals += [ids.min(), ids.max()] if ids.numel() else [torch.zeros((), device=lens.device)] * 2
    out = torch.stack([v.long() for v in vals]).tolist()
    stats = {"min_len": out[0], "max_len": out[1], "short": out[2]}
    rest = out[3:]
    if block_table is not None:
        stats["block_lo"], stats["block_hi"], rest = rest[0], rest[1], rest[2:]
    if key_ids is not None:
        stats["key_lo"], stats["key_hi"], rest = rest[0], rest[1], rest[2:]
    if query_ids is not None:
        stats["query_lo"], stats["query_hi"] = rest
    return stats


def check_kvcache_values(stats, cache_seqlens, sq, sk_max, num_blocks):
    """Raises, naming the entry, when a cache length or a block id is out of range (``stats``: kvcache_stats)."""
    if stats["min_len"] < 0 or stats["max_len"] > sk_max or stats["short"]:
        for i, n in enumerate(cache_seqlens.tolist()):
            if n < 0 or n > sk_max:
                raise ValueError(f"cache_seqlens: entry {i} is {n}, outside [0, Sk_max={sk_max}]")
            if 0 < n < sq:
                raise ValueError(f"cache_seqlens: entry {i} is {n} < Sq={sq}: the cache must hold the new rows' "
                                 "keys (or be empty, 0)")
    if "block_lo" in stats and stats["max_len"] > 0:
        lo, hi = stats["block_lo"], stats["block_hi"]
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table: block ids of the valid keys must lie in [0, num_blocks={num_blocks}); "
                             f"found values in [{lo}, {hi}]")


def check_reweight(reweight):
    if reweight is not None and not isinstance(reweight, Reweight):
        raise TypeError(f"reweight: expected avar_kernels.Reweight or None, got {type(reweight).__name__}")
