"""The prefill op: :func:`attention` (padded ``[B, S, H, D]``) and :func:`attention_varlen` (packed ``[T, H, D]``).

Both check their arguments, bring the padded layout to the packed one (a free reshape), fill the defaults and
call :func:`avar_kernels._ops.attention_packed`, which picks the backend and owns autograd. The formula, the
masks and the outputs are specified in ``docs/op.md``.
"""
from __future__ import annotations

import torch

from . import _checks
from ._ops import attention_packed
from .types import AttentionOutput

__all__ = ["attention", "attention_varlen"]


def attention(q, k, v, key_class=None, *, query_class=None, num_classes=None, causal=False, softmax_scale=None,
              window=None, reweight=None, return_mass=True, return_lse=False, return_key_mass=False,
              backend="auto") -> AttentionOutput:
    """Exact attention plus, per query row, the softmax mass landing on each class of keys.

    Args:
        q: ``[B, Sq, Hq, D]``; k, v: ``[B, Sk, Hk, D]`` with ``Hq % Hk == 0`` (GQA/MQA), one float dtype.
        key_class: integer ``[B, Sk]`` with ids in ``[0, num_classes)``; None for plain attention.
        query_class: integer ``[B, Sq]``; default: the key classes of the same positions (``Sq == Sk``), or of
            the last ``Sq`` positions (decode, ``Sq < Sk``).
        num_classes: C (at most 8); default ``key_class.max() + 1`` or the reweight tables' size. Required
            under ``torch.compile`` (inferring it reads the ids back).
        causal: bottom-right aligned when ``Sq != Sk`` (query i sees keys ``j <= i + Sk - Sq``, as in
            FlashAttention >= 2.1); with ``Sq > Sk`` the first ``Sq - Sk`` rows see no key and get out 0,
            mass 0, lse -inf.
        softmax_scale: default ``D ** -0.5``.
        window: ``(left, right)`` sliding window as in FlashAttention, -1 for an unbounded side.
        reweight: :class:`Reweight` tables applied to the scores before the softmax (needs classes).
        return_mass / return_lse: what to return beside ``out``.
        return_key_mass: also return ``key_mass [B, Hq, Sk, C]``: for every key, the attention it receives from
            the rows of each query class (summed over the rows, per query head); differentiable. Summed over the
            image tokens laid on the patch grid it is the image heatmap (docs/op.md, Key masses).
        backend: ``"auto"`` (C++ on CPU tensors, Triton on CUDA tensors), ``"cpu"``, ``"triton"`` or
            ``"reference"`` (plain PyTorch, materializes the attention matrix; the test oracle).

    Returns:
        ``AttentionOutput(out [B, Sq, Hq, D], mass [B, Hq, Sq, C] float32 or None, lse [B, Hq, Sq] float32 or
        None)``. All three are differentiable to first order, to q, k, v and learned reweight tables. A row that
        sees no key gets out 0, mass 0, lse -inf. NaN or inf in the inputs propagate to the rows that see them.
    """
    _checks.check_qkv(q, k, v, packed=False)
    _checks.check_reweight(reweight)
    _checks.check_flag("return_mass", return_mass)
    _checks.check_flag("return_lse", return_lse)
    _checks.check_flag("return_key_mass", return_key_mass)
    b, sq, hq, d = q.shape
    sk = k.shape[1]

    def default_query_class():
        if sq == sk:
            return key_class
        if sq > sk:
            raise ValueError(f"query_class: required when Sq ({sq}) > Sk ({sk}): the query positions have no "
                             "key classes to default to")
        return key_class[:, sk - sq:]

    key_class, query_class, num_classes = _checks.resolve_classes(
        key_class, query_class, num_classes, reweight, (b, sk), (b, sq), q.device, default_query_class)
    window_left, window_right = _checks.normalize_window(window, causal)
    scale = _checks.default_scale(softmax_scale, d)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device) if sq else \
        torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device) if sk else \
        torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    _check_key_mass(return_key_mass, num_classes)
    res = attention_packed(
        q.reshape(b * sq, hq, d), k.reshape(b * sk, k.shape[2], d), v.reshape(b * sk, k.shape[2], d),
        cu_q, cu_k, sq, sk,
        None if key_class is None else key_class.reshape(-1),
        None if query_class is None else query_class.reshape(-1),
        num_classes, reweight, scale, window_left, window_right, backend, key_mass=return_key_mass)
    out, lse, mass = res[:3]
    key_mass = res[3].view(hq, b, sk, num_classes).transpose(0, 1).contiguous() if return_key_mass else None
    out = out.view(b, sq, hq, d)
    mass_out = None
    if return_mass and num_classes > 0:
        mass_out = mass.view(hq, b, sq, num_classes).transpose(0, 1).contiguous()
    lse_out = lse.view(hq, b, sq).transpose(0, 1).contiguous() if return_lse else None
    return AttentionOutput(out, mass_out, lse_out, key_mass)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class=None, *,
                     query_class=None, num_classes=None, causal=False, softmax_scale=None, window=None,
                     reweight=None, return_mass=True, return_lse=False, return_key_mass=False,
                     backend="auto") -> AttentionOutput:
    """:func:`attention` for packed sequences: q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, D]``.

    ``cu_seqlens_q/k`` are int32 ``[N + 1]`` offsets of the N sequences; ``key_class`` is ``[Tk]`` and
    ``query_class`` ``[Tq]`` (default: per sequence, the classes of the last ``sq`` key positions). Returns
    ``AttentionOutput(out [Tq, Hq, D], mass [Hq, Tq, C] or None, lse [Hq, Tq] or None, key_mass [Tk, Hq, C] or
    None)``.
    """
    _checks.check_qkv(q, k, v, packed=True)
    _checks.check_reweight(reweight)
    _checks.check_flag("return_mass", return_mass)
    _checks.check_flag("return_lse", return_lse)
    _checks.check_flag("return_key_mass", return_key_mass)
    cq = _checks.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _checks.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, batch=len(cq))
    lens_q = [b - a for a, b in zip(cq, cq[1:])]
    lens_k = [b - a for a, b in zip(ck, ck[1:])]
    for name, given, lens in (("max_seqlen_q", max_seqlen_q, lens_q), ("max_seqlen_k", max_seqlen_k, lens_k)):
        if not isinstance(given, int) or isinstance(given, bool) or given < max(lens):
            raise ValueError(f"{name}: expected an int >= the longest sequence ({max(lens)}), got {given!r}")

    def default_query_class():
        if any(lq > lk for lq, lk in zip(lens_q, lens_k)):
            raise ValueError("query_class: required when a sequence has more queries than keys")
        idx = [torch.arange(ck[n + 1] - lens_q[n], ck[n + 1]) for n in range(len(lens_q))]
        return key_class[torch.cat(idx).to(key_class.device)]

    d = q.shape[2]
    key_class, query_class, num_classes = _checks.resolve_classes(
        key_class, query_class, num_classes, reweight, (k.shape[0],), (q.shape[0],), q.device,
        default_query_class)
    window_left, window_right = _checks.normalize_window(window, causal)
    scale = _checks.default_scale(softmax_scale, d)
    _check_key_mass(return_key_mass, num_classes)
    res = attention_packed(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k, key_class,
        query_class, num_classes, reweight, scale, window_left, window_right, backend, key_mass=return_key_mass)
    out, lse, mass = res[:3]
    key_mass = res[3].transpose(0, 1).contiguous() if return_key_mass else None
    return AttentionOutput(out, mass if return_mass and num_classes > 0 else None, lse if return_lse else None,
                           key_mass)


def _check_key_mass(return_key_mass, num_classes):
    if return_key_mass and num_classes == 0:
        raise ValueError("return_key_mass: needs key_class (and query_class): key masses are summed by query class")
