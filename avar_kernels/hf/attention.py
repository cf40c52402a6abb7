"""The ``"avar"`` attention function for Hugging Face transformers (5.x).

transformers calls ``avar_attention(module, query [B,H,Sq,D], key/value [B,Hkv,Sk,D], attention_mask, scaling=,
dropout=, **kwargs)`` and expects ``(out [B,Sq,H,D], None)``. The function hands the tensors to
:func:`avar_kernels.attention` / :func:`avar_kernels.attention_varlen` as transposed views (no copy of K/V per
query head: GQA is native in the op).

How the mask is used (decided here, documented in ``docs``-style below):

* ``attention_mask is None``: the layer is plain causal (``module.is_causal``, bottom-right aligned when
  ``Sq < Sk``, i.e. decode with a cache) or bidirectional, with the sliding window of the layer if any. One dense
  call of :func:`avar_kernels.attention`.
* packed sequences given as kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``, as transformers passes them for
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``; batch must be 1): one varlen call with them.
* a bool ``[B, 1, Sq, Sk]`` sdpa mask (padding, packing detected from ``position_ids``, decode with padding):
  the mask is *compiled* into varlen segments. Along each row, the tokens no query can see (padding) and the
  runs of visible tokens that do not see each other (packed sequences) become separate segments; the queries
  of a segment are the suffix of it that lies in the query window, so causality stays bottom-right within a
  segment. The compiled layout is then *verified*: the mask it implies (segment, causal, window) must equal the
  given mask on every query row that is a real token. Rows of padding queries get ``out = 0`` and mass 0
  (sdpa gives them arbitrary values; they never influence a real token). The analysis runs once per mask tensor
  (cached on its identity), so the layers of one forward share it.
* a mask that cannot be expressed that way (arbitrary custom 4D masks): a materializing PyTorch fallback
  (``O(S^2)`` memory, correct output, masses and re-weighting, autograd), with a one-time warning.

Token classes, the re-weighting and the mass recorder come in through kwargs injected by the forward pre-hook
of :mod:`avar_kernels.hf.record` on the language model: ``avar_classes`` (int ``[B, S_total]``) and
``avar_context`` (an object with ``reweight(layer_idx, num_heads, device)``, ``wants_mass(layer_idx)`` and
``store(layer_idx, mass)``). Without them the function is plain exact attention.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

import avar_kernels
from avar_kernels import _checks, kvcache
from avar_kernels._backends import warn_once
from avar_kernels.types import NUM_CLASSES

# ----------------------------------------------------------------------------------------- mask compiling

class _Plan:
    __slots__ = ("kind", "cu_q", "cu_k", "max_q", "max_k", "q_valid")

    def __init__(self, kind, cu_q=None, cu_k=None, max_q=0, max_k=0, q_valid=None):
        self.kind, self.cu_q, self.cu_k, self.max_q, self.max_k, self.q_valid = kind, cu_q, cu_k, max_q, max_k, q_valid


_PLAN_CACHE: dict = {}


def _window_left(sliding_window):
    # transformers: key j visible from query i iff j > i - sliding_window  ->  left window of sliding_window - 1
    return None if not sliding_window else int(sliding_window) - 1


def compile_mask(mask: torch.Tensor, sq: int, sk: int, causal: bool, window_left) -> _Plan:
    """Turns a bool ``[B, 1, Sq, Sk]`` mask into varlen segments, or ``_Plan("fallback")`` (see the module doc)."""
    key = (id(mask), mask._version, sq, sk, causal, window_left)
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    plan = _compile_mask(mask, sq, sk, causal, window_left)
    if len(_PLAN_CACHE) > 16:
        _PLAN_CACHE.clear()
    try:
        _PLAN_CACHE[key] = (weakref.ref(mask), plan)
    except TypeError:
        pass
    return plan


def _compile_mask(mask, sq, sk, causal, window_left):
    m = mask[:, 0]                                            # [B, Sq, Sk]
    b = m.shape[0]
    dev = m.device
    off = sk - sq
    real = m.any(dim=1)                                       # [B, Sk] keys that some query sees
    # segment boundaries along the key axis: a change real <-> padding, or (where the position has a query) a
    # real query that does not see the real key just before it
    boundary = torch.zeros(b, sk, dtype=torch.bool, device=dev)
    if sk > 1:
        boundary[:, 1:] = real[:, 1:] != real[:, :-1]
        if sq > 0:
            pos = torch.arange(max(off, 1), sk, device=dev)    # key positions that also hold a query
            if len(pos):
                sees_prev = m[:, pos - off, pos - 1]
                both = real[:, pos] & real[:, pos - 1]
                boundary[:, pos] |= both & ~sees_prev
    seg = boundary.long().cumsum(1)                           # [B, Sk] segment id within the row
    # the mask this layout implies, checked on the rows of real queries
    seg_q = seg[:, off:]
    same = (seg_q[:, :, None] == seg[:, None, :]) & real[:, None, :]
    qi = torch.arange(sq, device=dev)[:, None] + off
    kj = torch.arange(sk, device=dev)[None, :]
    if causal:
        same = same & (kj <= qi)
    if window_left is not None:
        same = same & (kj >= qi - window_left)
    q_valid = real[:, off:]
    if not bool(((same == m) | ~q_valid[:, :, None]).all()):
        return _Plan("fallback")
    # cu_seqlens over the rows laid end to end
    nseg = seg[:, -1] + 1                                     # [B]
    lens_k, lens_q = [], []
    seg_l, nseg_l = seg.tolist(), nseg.tolist()
    for r in range(b):
        counts_k = [0] * nseg_l[r]
        for s in seg_l[r]:
            counts_k[s] += 1
        counts_q = [0] * nseg_l[r]
        for s in seg_l[r][off:]:
            counts_q[s] += 1
        lens_k += counts_k
        lens_q += counts_q
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    return _Plan("varlen", cu_q, cu_k, max(lens_q), max(lens_k), None if bool(q_valid.all()) else q_valid)


# ------------------------------------------------------------------------------------------- classes

def fit_classes(classes: torch.Tensor, batch: int, sk: int) -> torch.Tensor:
    """Key classes ``[B, Sk]`` from the per-token classes of the whole sequence ``[B, S_total]``: the keys are the
    last ``Sk`` positions (a full or sliding cache); a longer key axis (static cache) is padded with class 0."""
    if classes.shape[0] != batch:
        if batch % classes.shape[0]:
            raise ValueError(f"avar: token classes have batch {classes.shape[0]} but the attention has {batch}")
        classes = classes.repeat_interleave(batch // classes.shape[0], dim=0)
    s = classes.shape[1]
    if s >= sk:
        return classes[:, s - sk:]
    return torch.nn.functional.pad(classes, (0, sk - s), value=0)


# ------------------------------------------------------------------------------------------ fallback

def masked_attention(q, k, v, mask, key_class, query_class, reweight, scale, num_classes, key_mass=False):
    """Materializing attention with a bool mask ``[B, Sq, Sk]`` (True = visible); q ``[B,Sq,H,D]``, k/v
    ``[B,Sk,Hk,D]``. Returns ``(out [B,Sq,H,D], mass [B,H,Sq,C] or None, key_mass [B,H,Sk,C] or None)``; rows
    without keys give 0."""
    h, hk = q.shape[2], k.shape[2]
    rep = h // hk
    qf, kf, vf = q.float(), k.float().repeat_interleave(rep, 2), v.float().repeat_interleave(rep, 2)
    z = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if reweight is not None and key_class is not None:
        mul, abs_, add = reweight.tables(h, num_classes, q.device)
        qc, kc = query_class.long(), key_class.long()
        z0 = z
        for t, kind in ((mul, "mul"), (abs_, "abs"), (add, "add")):
            if t is None:
                continue
            tab = t[:, qc[:, :, None], kc[:, None, :]].permute(1, 0, 2, 3)   # [B, H, Sq, Sk]
            z = z + (z0 * tab if kind == "mul" else z0.abs() * tab if kind == "abs" else tab)
    vis = mask[:, None]
    z = z.masked_fill(~vis, float("-inf"))
    p = torch.softmax(z, dim=-1)
    p = torch.where(vis.any(-1, keepdim=True), p, torch.zeros_like(p))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)
    mass = km = None
    if key_class is not None:
        onehot = torch.nn.functional.one_hot(key_class.long(), num_classes).float()    # [B, Sk, C]
        mass = torch.einsum("bhqk,bkc->bhqc", p, onehot)
        if key_mass:
            onehot_q = torch.nn.functional.one_hot(query_class.long(), num_classes).float()    # [B, Sq, C]
            km = torch.einsum("bhqk,bqc->bhkc", p, onehot_q)
    return out, mass, km


# ----------------------------------------------------------------------------------------- the function

def _use_decode_kernel(q, sq, sk, causal, window):
    """Decode-shaped, unmasked, causal, no gradient, on a GPU with the CUDA decode extension built."""
    return (q.is_cuda and causal and window is None and sq <= kvcache.CUDA_MAX_SQ and sq < sk
            and q.shape[-1] in kvcache.CUDA_HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16)
            and not torch.is_grad_enabled() and kvcache.cuda_available())


def avar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ``"avar"`` (see the module docstring)."""
    ctx = kwargs.get("avar_context")
    checked = _checks.class_ids_checked() if getattr(ctx, "classes_checked", False) else contextlib.nullcontext()
    with checked:
        return _avar_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _avar_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    if dropout and module.training:
        raise NotImplementedError("avar attention has no attention dropout; set attention_dropout=0")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("avar attention does not support softcap")
    b, h, sq, d = query.shape
    sk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)    # [B, S, H, D] views
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    sliding = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    wl = _window_left(sliding)
    window = None if wl is None else (wl, -1)
    scale = scaling if scaling is not None else d ** -0.5
    backend = kwargs.get("avar_backend", "auto")

    ctx = kwargs.get("avar_context")
    classes = kwargs.get("avar_classes")
    layer_idx = getattr(module, "layer_idx", None)
    reweight = ctx.reweight(layer_idx, h, query.device) if ctx is not None else None
    want_mass = ctx is not None and ctx.wants_mass(layer_idx)
    want_key_mass = ctx is not None and ctx.wants_key_mass(layer_idx)
    need_classes = want_mass or reweight is not None
    if need_classes and classes is None:
        raise ValueError("avar: a recorder or an intervention is active but no token classes were given")

    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask is not None and mask.shape[0] != b:
        mask = mask.expand(b, *mask.shape[1:])

    # The empty-static-cache prefill case of transformers' sdpa path: no mask, Sq > 1 and a longer key axis of
    # which only the first Sq entries are filled (sdpa crops the keys the same way).
    if mask is None and causal and 1 < sq < sk:
        k, v = k[:, :sq], v[:, :sq]
        sk = sq

    kcls = qcls = None
    num_classes = ctx.num_classes if ctx is not None else NUM_CLASSES
    if need_classes:
        kcls = fit_classes(classes.to(query.device), b, sk)
        qcls = kcls[:, sk - sq:]
        row_classes = kwargs.get("avar_query_classes")
        if (reweight is not None or want_key_mass) and row_classes is not None:
            qcls = fit_classes(row_classes.to(query.device), b, sk)[:, sk - sq:]

    cu_q = kwargs.get("cu_seq_lens_q")
    plan = None
    if cu_q is not None:
        if b != 1:
            raise ValueError("avar: cu_seq_lens_q/k (packed sequences) need batch size 1")
        cu_k = kwargs.get("cu_seq_lens_k", cu_q)
        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
        plan = _Plan("varlen", cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k))
    elif mask is not None:
        plan = compile_mask(mask, sq, sk, causal, wl)

    mass = key_mass = None
    if plan is None and _use_decode_kernel(q, sq, sk, causal, window):
        # Generation step on a GPU: the split-KV CUDA kernel reads the cache once for all heads of a group (and,
        # for key masses, once more after the final logsumexp). Every sequence's length is the cache's (sk, known
        # here), so the lengths need no check: no host sync in the step.
        with _checks.kvcache_lengths_known():
            res = avar_kernels.attention_with_kvcache(
                q, k, v, torch.full((b,), sk, dtype=torch.int32, device=q.device), kcls, query_class=qcls,
                num_classes=num_classes if need_classes else None, causal=True, softmax_scale=scale,
                reweight=reweight, return_mass=want_mass, return_key_mass=want_key_mass)
        out, mass, key_mass = res.out, res.mass, res.key_mass
    elif plan is None:
        res = avar_kernels.attention(q, k, v, kcls, query_class=qcls,
                                     num_classes=num_classes if need_classes else None, causal=causal,
                                     softmax_scale=scale, window=window, reweight=reweight,
                                     return_mass=want_mass, return_key_mass=want_key_mass, backend=backend)
        out, mass, key_mass = res.out, res.mass, res.key_mass
    elif plan.kind == "varlen":
        res = avar_kernels.attention_varlen(
            q.reshape(b * sq, h, d), k.reshape(b * sk, k.shape[2], d), v.reshape(b * sk, v.shape[2], d),
            plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
            None if kcls is None else kcls.reshape(-1), query_class=None if qcls is None else qcls.reshape(-1),
            num_classes=num_classes if need_classes else None, causal=causal, softmax_scale=scale, window=window,
            reweight=reweight, return_mass=want_mass, return_key_mass=want_key_mass, backend=backend)
        out = res.out.view(b, sq, h, d)
        if res.mass is not None:
            mass = res.mass.view(h, b, sq, num_classes).transpose(0, 1)
        if res.key_mass is not None:
            key_mass = res.key_mass.view(b, sk, h, num_classes).transpose(1, 2)
        if plan.q_valid is not None:
            keep = plan.q_valid.to(out.dtype)
            out = out * keep[:, :, None, None]
            if mass is not None:
                mass = mass * keep[:, None, :, None]
            if key_mass is not None and sq == sk:  # padding queries see only padding keys: clear those keys
                key_mass = key_mass * plan.q_valid.to(key_mass.dtype)[:, None, :, None]
    else:
        warn_once("avar: the attention mask is not a padding/packing/causal/sliding-window mask; using the "
                   "materializing PyTorch fallback (O(S^2) memory)")
        out, mass, key_mass = masked_attention(q, k, v, mask[:, 0], kcls, qcls, reweight, scale, num_classes,
                                               want_key_mass)
    if want_mass and mass is not None:
        ctx.store(layer_idx, mass[..., :NUM_CLASSES], key_mass)
    return out, None
