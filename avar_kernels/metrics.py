"""Metrics and losses on per-class attention masses (O(S) work; docs/training.md for the AVAR objective).

``masses``: a list over layers of float ``[B, H, S, C]`` tensors (what :func:`avar_kernels.hf.record` gives), a
tensor ``[L, B, H, S, C]``, or one layer ``[B, H, S, C]``. ``[B, S, C]`` pieces (``reduce="mean_heads"``) are
taken as a single head (then VAS is a ratio of head-means, not the paper's mean of ratios).
``token_classes``: int ``[B, S]`` with the ids of :mod:`avar_kernels` (IMAGE 1, SYSTEM 2, USER 3, RESPONSE 4).

Undefined cases are NaN, never a silent division by zero: a sample without system tokens (or without the query
rows) has VAS NaN and a :class:`UndefinedMetricWarning` is raised; rows whose system mass is exactly 0 are left
out of the mean, with the same warning. Means over a batch skip NaN samples (all NaN -> NaN).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .types import IMAGE, RESPONSE, SYSTEM, USER

__all__ = ["vas", "visual_share", "MetricResult", "attention_guided_loss", "avar_sft_loss", "visual_reward",
           "UndefinedMetricWarning", "vas_band"]


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for some samples (no system tokens, no query rows): reported as NaN."""


class MetricResult(NamedTuple):
    """``overall``: scalar, mean of the defined per-sample values; ``per_sample [B]``; ``per_layer [L]`` and
    ``per_head [L, H]``: means over the rows of all defined samples (each sample weighted by its rows)."""

    overall: torch.Tensor
    per_sample: torch.Tensor
    per_layer: torch.Tensor
    per_head: torch.Tensor


def _stack(masses):
    if isinstance(masses, (list, tuple)):
        if not masses:
            raise ValueError("metrics: no masses (did the recorder record any layer?)")
        m = torch.stack([_heads(x) for x in masses])
    else:
        m = masses
        if m.dim() == 3:
            m = m[None, :, None]
        elif m.dim() == 4:
            m = m[None]
        elif m.dim() != 5:
            raise ValueError(f"metrics: masses must be [L,B,H,S,C], [B,H,S,C] or a list of them; got {tuple(m.shape)}")
    return m.float()                                               # [L, B, H, S, C]


def _heads(x):
    if x.dim() == 3:
        return x[:, None]
    if x.dim() != 4:
        raise ValueError(f"metrics: a layer's masses must be [B,H,S,C] or [B,S,C]; got {tuple(x.shape)}")
    return x


def _check(m, classes):
    classes = torch.as_tensor(classes).to(m.device)
    if classes.dim() == 1:
        classes = classes[None]
    if classes.shape != m.shape[1:2] + m.shape[3:4]:
        raise ValueError(f"metrics: token_classes {tuple(classes.shape)} do not match the masses' [B, S] = "
                         f"{(m.shape[1], m.shape[3])}")
    return classes


def _row_metric(m, classes, value, query_class, need_system):
    """Mean of ``value [L,B,H,S]`` over layers, heads and the rows of ``query_class``; NaN-aware."""
    rows = classes == query_class                                 # [B, S]
    defined = rows.any(1)
    if need_system:
        defined = defined & (classes == SYSTEM).any(1)
    if not bool(defined.all()):
        warnings.warn(f"{int((~defined).sum())} of {len(defined)} samples have no "
                      f"{'system tokens or ' if need_system else ''}query rows of class {query_class}: "
                      "their value is NaN", UndefinedMetricWarning, stacklevel=3)
    ok = torch.isfinite(value)                                    # [L,B,H,S]
    sel = rows[None, :, None, :] & defined[None, :, None, None]
    if bool((sel & ~ok).any()):
        warnings.warn(f"{int((sel & ~ok).sum())} (layer, head, row) entries have zero system mass: left out",
                      UndefinedMetricWarning, stacklevel=3)
    sel = sel & ok
    w = sel.to(value.dtype)
    v = torch.where(sel, value, torch.zeros_like(value))
    nan = torch.tensor(float("nan"), device=value.device)

    def mean(dims):
        cnt = w.sum(dims)
        return torch.where(cnt > 0, v.sum(dims) / cnt.clamp_min(1), nan)

    per_sample = mean((0, 2, 3))
    per_sample = torch.where(defined, per_sample, nan)
    per_layer = mean((1, 2, 3))
    per_head = mean((1, 3))
    good = ~torch.isnan(per_sample)
    overall = per_sample[good].mean() if bool(good.any()) else nan
    return MetricResult(overall, per_sample, per_layer, per_head)


def vas(masses, token_classes, *, query_class=USER) -> MetricResult:
    """Visual Attention Score (paper Eq. 1): ``mass[i, IMAGE] / mass[i, SYSTEM]`` averaged uniformly over layers,
    heads and the user-turn query rows i (``query_class``). NaN (with a warning) for samples without system
    tokens. Bands (paper): narrow < 10, wide 10-15, panoramic > 15."""
    m = _stack(masses)
    classes = _check(m, token_classes)
    img, sys_ = m[..., IMAGE], m[..., SYSTEM]
    ratio = torch.where(sys_ > 0, img / torch.where(sys_ > 0, sys_, torch.ones_like(sys_)),
                        torch.full_like(img, float("nan")))
    return _row_metric(m, classes, ratio, query_class, need_system=True)


def visual_share(masses, token_classes, *, query_class=USER) -> MetricResult:
    """Mean of ``mass[i, IMAGE]`` over the same rows as :func:`vas` (bounded in [0, 1]); needs no system tokens."""
    m = _stack(masses)
    classes = _check(m, token_classes)
    return _row_metric(m, classes, m[..., IMAGE], query_class, need_system=False)


def vas_band(value: float) -> str:
    """The paper's bands: ``"narrow"`` (< 10), ``"wide"`` (10-15), ``"panoramic"`` (> 15), ``"undefined"``."""
    v = float(value)
    if v != v:
        return "undefined"
    return "narrow" if v < 10 else "wide" if v <= 15 else "panoramic"


def _query_rows(classes, query_class, query_mask):
    """float ``[B, S]``: 1 on the query rows (``query_mask`` if given, else the rows of ``query_class``)."""
    if query_mask is None:
        return (classes == query_class).float()
    qm = torch.as_tensor(query_mask, device=classes.device)
    if qm.dim() == 1:
        qm = qm[None]
    if qm.dtype != torch.bool:
        raise TypeError(f"metrics: query_mask must be a bool tensor, got dtype {qm.dtype}")
    if qm.shape != classes.shape:
        raise ValueError(f"metrics: query_mask {tuple(qm.shape)} does not match token_classes {tuple(classes.shape)}")
    return qm.float()


def attention_guided_loss(masses, token_classes, *, query_class=USER, query_mask=None, eps=1e-6):
    """The AVAR attention-guided SFT terms ``(L_enh, L_sup)``, differentiable:

    ``L_enh = - mean_l mean_h log( sum_{i in Q} mass[i, IMG] / (|Q| |K_img|) + eps )``,
    ``L_sup = + mean_l mean_h log( sum_{i in Q} mass[i, SYS] / (|Q| |K_sys|) + eps )``,
    K_img / K_sys the image / system tokens of the sample. Q is ``query_mask`` (bool ``[B, S]``) when given, else the
    rows of ``query_class`` (default the user text). The published AVAR code takes Q = the whole user turn up to the
    first trained response token (``avar_kernels.train.query_mask`` computes it from the chat template; the two
    definitions are compared in docs/training.md). Averaged over the samples where the term is defined (a term
    with no defined sample is 0, still attached to the graph); the published code averages over every sample."""
    m = _stack(masses)
    classes = _check(m, token_classes)
    q = _query_rows(classes, query_class, query_mask)              # [B, S]
    nq = q.sum(1)

    def term(cls, sign):
        nk = (classes == cls).sum(1).to(m.dtype)
        ok = (nq > 0) & (nk > 0)
        s = (m[..., cls] * q[None, :, None, :]).sum(-1)           # [L, B, H]
        val = torch.log(s / (nq * nk).clamp_min(1)[None, :, None] + eps).mean((0, 2))   # [B]
        if not bool(ok.any()):
            return (m.sum() * 0.0)
        return sign * val[ok].mean()

    return term(IMAGE, -1.0), term(SYSTEM, 1.0)


def avar_sft_loss(lm_loss, masses, token_classes, *, w_enh=0.15, w_sup=0.15, query_class=USER, query_mask=None,
                  eps=1e-6):
    """``L = L_LM + w_enh L_enh + w_sup L_sup`` (AVAR's weights 0.15 / 0.15); the query rows and ``eps`` as in
    :func:`attention_guided_loss`."""
    l_enh, l_sup = attention_guided_loss(masses, token_classes, query_class=query_class, query_mask=query_mask,
                                         eps=eps)
    return lm_loss + w_enh * l_enh + w_sup * l_sup


VISUAL_REWARD_AGGREGATIONS = ("per_token", "ratio_of_sums")


def visual_reward(masses, token_classes, *, correct=None, query_class=RESPONSE, query_mask=None, eps=1e-6,
                  aggregate="per_token") -> torch.Tensor:
    """AVAR's GRPO visual-attention reward per sample ``[B]``, over the generated rows T (``query_mask``, else the
    rows of ``query_class``); 0 where ``correct`` is False and for samples without such rows. Combine as
    ``r_acc + 0.3 * r_visual + 0.1 * r_format``.

    ``aggregate="per_token"`` (the paper's formula, the default): the mean over t in T of
    ``sum_{l,h} mass[t, IMG] / (sum_{l,h} mass[t, SYS] + eps)``.
    ``aggregate="ratio_of_sums"`` (the released EasyR1 code): one ratio
    ``sum_{l,h,t} mass[t, IMG] / (sum_{l,h,t} mass[t, SYS] + eps)``. That code sums over every row of its forward
    (prompt rows included) and takes the first 20% of the prompt as system tokens; pass ``query_mask`` (e.g. the
    attention mask) and classes to match it."""
    if aggregate not in VISUAL_REWARD_AGGREGATIONS:
        raise ValueError(f"visual_reward: aggregate must be one of {VISUAL_REWARD_AGGREGATIONS}, got {aggregate!r}")
    m = _stack(masses)
    classes = _check(m, token_classes)
    img = m[..., IMAGE].sum((0, 2))                               # [B, S]
    sys_ = m[..., SYSTEM].sum((0, 2))
    t = _query_rows(classes, query_class, query_mask).to(m.dtype)
    if aggregate == "per_token":
        r = ((img / (sys_ + eps)) * t).sum(1) / t.sum(1).clamp_min(1)
    else:
        r = (img * t).sum(1) / ((sys_ * t).sum(1) + eps)
    if correct is not None:
        r = r * torch.as_tensor(correct, device=r.device).to(r.dtype)
    return r
