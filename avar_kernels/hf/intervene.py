"""Class-wise re-weighting of the pre-softmax scores inside a model (training-free interventions).

``z' = z * (1 + MUL[h, a, b]) + ABS[h, a, b] * |z| + ADD[h, a, b]`` for a query row ``a`` and a key of class ``b``
(docs/op.md), applied per layer, per head and per set of query rows through :class:`avar_kernels.Reweight` tables.
Interventions active at the same time add their tables.

Which query rows an intervention steers (``rows``):

* :data:`AFTER_IMAGE`: every row after the first image (or video) token that is not itself an image token, the
  template rows included: where ClearSight's VAF acts.
* :data:`GENERATED`: the rows that predict a generated token: the last row of every forward (during ``generate()``
  the last prompt row, then each new token's row) and every row followed by a response token: where PAI acts.
* a set of token classes, e.g. ``{USER}``: the rows of those classes.

The integration turns the row sets into query classes of the op (one id per distinct table row), so the kernels
never see more than the tables they need.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from avar_kernels.types import IMAGE, NUM_CLASSES, SYSTEM, Reweight

from .record import _remove, controller
from .rows import AFTER_IMAGE, GENERATED, ROW_SETS


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
    """A named intervention: ``reweight`` tables plus the layers, heads and query rows it applies to."""

    name: str
    reweight: Reweight
    layers: object = None
    heads: object = None
    rows: object = None
    source: str = ""
    params: dict = field(default_factory=dict)


def vaf(alpha_img: float = 0.15, alpha_sys: float = 0.0, layers=None, rows=AFTER_IMAGE) -> Preset:
    """ClearSight's Visual Amplification Fusion, as used by the AVAR paper (arXiv 2603.03825, sec. 5).

    Image-key scores ``x (1 + alpha_img)``, system-key scores ``x (1 - alpha_sys)`` (``MUL``), on every query row
    after the image, template rows included (``rows=AFTER_IMAGE``, as ClearSight). Layers: ClearSight steers layers
    9-14 of LLaVA-1.5's 32 (pass ``layers=range(9, 15)`` to match it); the default here is every layer.
    """
    mul = torch.zeros(NUM_CLASSES)
    mul[IMAGE] = alpha_img
    mul[SYSTEM] = -alpha_sys
    return Preset("vaf", Reweight(mul=mul), layers=layers, rows=rows,
                  source="ClearSight VAF (Yin et al., CVPR 2025) / AVAR (arXiv 2603.03825)",
                  params={"alpha_img": alpha_img, "alpha_sys": alpha_sys})


def pai(alpha: float = 0.2, start_layer: int = 2, rows=GENERATED) -> Preset:
    """PAI (Liu et al., "Paying More Attention to Image", ECCV 2024): image-key scores ``z + alpha |z|`` (``ABS``)
    on the row that predicts each generated token (``rows=GENERATED``: PAI steers row -1 of every forward, the last
    prompt row included), in layers ``start_layer`` (2 in PAI) to the last, as PAI."""
    t = torch.zeros(NUM_CLASSES)
    t[IMAGE] = alpha
    return Preset("pai", Reweight(abs=t), layers=_From(start_layer), rows=rows, source="PAI (Liu et al., ECCV 2024)",
                  params={"alpha": alpha, "start_layer": start_layer})


def class_bias(bias=None, *, factor=None, rows=None, layers=None) -> Preset:
    """A plain additive log-factor per key class: ``ADD[b] = bias[b]`` (``bias`` a dict class -> value or a
    length-C sequence); ``factor={IMAGE: 2.0}`` gives ``ADD = log 2`` (probability-space factor before the
    renormalization). ``rows``: default every row."""
    add = torch.zeros(NUM_CLASSES)
    if bias is not None:
        items = bias.items() if isinstance(bias, dict) else enumerate(bias)
        for c, val in items:
            add[c] += float(val)
    if factor is not None:
        for c, f in factor.items():
            if not f > 0:
                raise ValueError(f"class_bias: factor for class {c} must be > 0, got {f!r}")
            add[c] += math.log(f)
    return Preset("class_bias", Reweight(add=add), layers=layers, rows=rows,
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
    def __init__(self, reweight, layers, heads, rows):
        self.reweight, self.layers, self.heads, self.rows = reweight, layers, heads, rows
        self._cache = {}

    def applies(self, layer_idx):
        return self.layers is None or (layer_idx is not None and layer_idx in self.layers)

    def tables(self, num_heads):
        """``{"mul"|"abs"|"add": [H, 6, 6]}`` with the head selection applied (rows are selected by the caller)."""
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
                res[name] = full
            self._cache[num_heads] = res
        return self._cache[num_heads]


def _check_rows(rows):
    if rows is None or (isinstance(rows, str) and rows in ROW_SETS):
        return rows
    if isinstance(rows, str):
        raise ValueError(f"intervene: rows: expected {AFTER_IMAGE!r}, {GENERATED!r} or a set of token classes, "
                         f"got {rows!r}")
    try:
        classes = frozenset(int(c) for c in rows)
    except (TypeError, ValueError):
        raise ValueError(f"intervene: rows: expected {AFTER_IMAGE!r}, {GENERATED!r} or a set of token classes, "
                         f"got {rows!r}") from None
    bad = sorted(c for c in classes if not 0 <= c < NUM_CLASSES)
    if bad:
        raise ValueError(f"intervene: rows: token classes must lie in [0, {NUM_CLASSES}), got {bad}")
    return classes


def _check_layers(layers, num_layers):
    if layers is None or isinstance(layers, _From):
        if isinstance(layers, _From) and layers.start >= num_layers:
            raise ValueError(f"intervene: layers: starts at {layers.start} but the model has {num_layers} layers")
        return layers
    if isinstance(layers, int):
        layers = {layers}
    layers = set(layers)
    bad = sorted(x for x in layers if not (isinstance(x, int) and 0 <= x < num_layers))
    if bad:
        raise ValueError(f"intervene: layers: the model has layers 0..{num_layers - 1}, got {bad}")
    return layers


@contextlib.contextmanager
def intervene(model, reweight_or_preset, *, layers=None, heads=None, rows=None, token_classes=None):
    """Apply a class-wise score re-weighting in the model's ``"avar"`` attention while the context is open.

    Args:
        reweight_or_preset: an :class:`avar_kernels.Reweight` (``[C]``, ``[C, C]`` or ``[H, C, C]`` tables over
            the 6 integration classes) or a :class:`Preset` (:func:`vaf`, :func:`pai`, :func:`class_bias`).
        layers: the layer indices (a set, a range, an int); default: the preset's, else all.
        heads: the query heads (a set/range); default all.
        rows: the query rows re-weighted: :data:`AFTER_IMAGE`, :data:`GENERATED` or a set of token classes;
            default: the preset's, else all rows.
        token_classes: int ``[B, S]``; not needed inside a :func:`record` context, which provides them.

    Composes with :func:`record` (either order) and with other interventions (tables add).
    """
    if isinstance(reweight_or_preset, Preset):
        p = reweight_or_preset
        rw = p.reweight
        layers = p.layers if layers is None else layers
        heads = p.heads if heads is None else heads
        rows = p.rows if rows is None else rows
    elif isinstance(reweight_or_preset, Reweight):
        rw = reweight_or_preset
    else:
        raise TypeError("intervene: expected an avar_kernels.Reweight or a preset (vaf(), pai(), class_bias())")
    ctl = controller(model)
    layers = _check_layers(layers, ctl.lm.config.num_hidden_layers)
    if isinstance(heads, int):
        heads = {heads}
    iv = Intervention(rw, layers, heads, _check_rows(rows))
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
