"""Class-wise re-weighting of the pre-softmax scores inside a model (training-free interventions).

``z' = z * (1 + MUL[h, a, b]) + ABS[h, a, b] * |z| + ADD[h, a, b]`` for a query of class ``a`` and a key of class
``b`` (docs/op.md), applied per layer, per head and per query class through :class:`avar_kernels.Reweight` tables.
Interventions active at the same time add their tables.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

import avar_kernels
from avar_kernels import IMAGE, RESPONSE, SYSTEM, USER

from .attention import NUM_CLASSES
from .record import _remove, controller


class _From:
    """``layer in _From(2)``: every layer from 2 up."""

    def __init__(self, start):
        self.start = start

    def __contains__(self, layer):
        return layer is not None and layer >= self.start

    def __repr__(self):
        return f"layers>={self.start}"


@dataclass
class Preset:
    """A named intervention: ``reweight`` tables plus the layers, heads and query classes it applies to."""

    name: str
    reweight: avar_kernels.Reweight
    layers: object = None
    heads: object = None
    query_classes: Optional[frozenset] = None
    source: str = ""
    params: dict = field(default_factory=dict)


def vaf(alpha_img: float = 0.15, alpha_sys: float = 0.0, layers=None) -> Preset:
    """ClearSight's Visual Amplification Fusion, as used by the AVAR paper (arXiv 2603.03825, sec. 5): image keys
    ``MUL = +alpha_img``, system-prompt keys ``MUL = -alpha_sys``, on the query rows after the image (user text and
    response). ClearSight applies it to the middle layers; ``layers=None`` here means every layer (pass e.g.
    ``range(8, 16)``)."""
    mul = torch.zeros(NUM_CLASSES)
    mul[IMAGE] = alpha_img
    mul[SYSTEM] = -alpha_sys
    return Preset("vaf", avar_kernels.Reweight(mul=mul), layers=layers, query_classes=frozenset({USER, RESPONSE}),
                  source="ClearSight VAF (Yin et al., CVPR 2025) / AVAR (arXiv 2603.03825)",
                  params={"alpha_img": alpha_img, "alpha_sys": alpha_sys})


def pai(alpha: float = 0.2, start_layer: int = 2) -> Preset:
    """PAI (Liu et al., "Paying More Attention to Image", ECCV 2024): image keys ``ABS = alpha`` (score
    ``z + alpha |z|``), on the generated-token (response) query rows, in layers ``start_layer`` and up."""
    t = torch.zeros(NUM_CLASSES)
    t[IMAGE] = alpha
    return Preset("pai", avar_kernels.Reweight(abs=t), layers=_From(start_layer),
                  query_classes=frozenset({RESPONSE}), source="PAI (Liu et al., ECCV 2024)",
                  params={"alpha": alpha, "start_layer": start_layer})


def class_bias(bias=None, *, factor=None, query_classes=None, layers=None) -> Preset:
    """A plain additive log-factor per key class: ``ADD[b] = bias[b]`` (``bias`` a dict class -> value or a
    length-C sequence); ``factor={IMAGE: 2.0}`` gives ``ADD = log 2`` (probability-space factor before the
    renormalization)."""
    add = torch.zeros(NUM_CLASSES)
    if bias is not None:
        items = bias.items() if isinstance(bias, dict) else enumerate(bias)
        for c, val in items:
            add[c] += float(val)
    if factor is not None:
        for c, f in factor.items():
            add[c] += math.log(f)
    return Preset("class_bias", avar_kernels.Reweight(add=add), layers=layers,
                  query_classes=None if query_classes is None else frozenset(query_classes),
                  source="additive log-factor per class", params={"add": add.tolist()})


def _full_table(t, num_heads):
    """[C'] / [C', C'] / [H, C', C'] -> [H, 6, 6] (zero-padded classes)."""
    c = t.shape[-1]
    if c > NUM_CLASSES:
        raise ValueError(f"intervene: tables have {c} classes, the model integration uses {NUM_CLASSES}")
    if t.dim() == 1:
        t = t[None, None, :].expand(num_heads, c, c)
    elif t.dim() == 2:
        t = t[None].expand(num_heads, c, c)
    elif t.shape[0] != num_heads:
        raise ValueError(f"intervene: per-head table has {t.shape[0]} heads, the model has {num_heads}")
    out = torch.zeros(num_heads, NUM_CLASSES, NUM_CLASSES)
    out[:, :c, :c] = t
    return out


class Intervention:
    def __init__(self, reweight, layers, heads, query_classes):
        self.reweight, self.layers, self.heads, self.query_classes = reweight, layers, heads, query_classes
        self._cache = {}

    def applies(self, layer_idx):
        return self.layers is None or (layer_idx is not None and layer_idx in self.layers)

    def tables(self, layer_idx, num_heads):
        if not self.applies(layer_idx):
            return {}
        if num_heads not in self._cache:
            res = {}
            for name in ("mul", "abs", "add"):
                t = getattr(self.reweight, name)
                if t is None:
                    continue
                full = _full_table(t, num_heads)
                if self.heads is not None:
                    keep = torch.tensor([h in self.heads for h in range(num_heads)], dtype=full.dtype)
                    full = full * keep[:, None, None]
                if self.query_classes is not None:
                    keep = torch.tensor([a in self.query_classes for a in range(NUM_CLASSES)], dtype=full.dtype)
                    full = full * keep[None, :, None]
                res[name] = full
            self._cache[num_heads] = res
        return self._cache[num_heads]


@contextlib.contextmanager
def intervene(model, reweight_or_preset, *, layers=None, heads=None, query_classes=None, token_classes=None):
    """Apply a class-wise score re-weighting in the model's ``"avar"`` attention while the context is open.

    Args:
        reweight_or_preset: an :class:`avar_kernels.Reweight` (``[C]``, ``[C, C]`` or ``[H, C, C]`` tables over
            the 6 integration classes) or a :class:`Preset` (:func:`vaf`, :func:`pai`, :func:`class_bias`).
        layers: the layer indices (a set, a range, an int); default: the preset's, else all.
        heads: the query heads (a set/range); default all.
        query_classes: the query classes whose rows are re-weighted; default: the preset's, else all.
        token_classes: int ``[B, S]``; not needed inside a :func:`record` context, which provides them.

    Composes with :func:`record` (either order) and with other interventions (tables add).
    """
    if isinstance(reweight_or_preset, Preset):
        p = reweight_or_preset
        rw = p.reweight
        layers = p.layers if layers is None else layers
        heads = p.heads if heads is None else heads
        query_classes = p.query_classes if query_classes is None else query_classes
    elif isinstance(reweight_or_preset, avar_kernels.Reweight):
        rw = reweight_or_preset
    else:
        raise TypeError("intervene: expected an avar_kernels.Reweight or a preset (vaf(), pai(), class_bias())")
    if isinstance(layers, int):
        layers = {layers}
    if isinstance(heads, int):
        heads = {heads}
    iv = Intervention(rw, layers, heads, None if query_classes is None else frozenset(query_classes))
    ctl = controller(model)
    ctl.interventions.append(iv)
    ctl.classes_stack.append(token_classes)
    ctl.changed()
    ctl.enter()
    try:
        yield iv
    finally:
        ctl.exit()
        _remove(ctl.interventions, iv)
        _remove(ctl.classes_stack, token_classes)
        ctl.changed()
