"""Query-row signatures: which rows an intervention steers, turned into query classes of the op.

A row's signature is its token class, whether it lies after the first image (or video) token, and whether it
predicts a generated token (the last row of a forward, or a row followed by a response token). Interventions choose
rows by signature; :class:`RowPlan` gives every group of signatures that ends up with the same tables (over all
layers and heads) one query class, so the op gets at most a handful of query classes whatever the interventions.
"""
from __future__ import annotations

import torch

from avar_kernels.types import IMAGE, MAX_CLASSES, NUM_CLASSES, RESPONSE, VIDEO, Reweight

AFTER_IMAGE = "after_image"
GENERATED = "generated"
ROW_SETS = (AFTER_IMAGE, GENERATED)
NUM_SIGNATURES = 4 * NUM_CLASSES
_TABLES = ("mul", "abs", "add")


def signature_parts(sig: int):
    """(token class, after the image, predicts a generated token) of a signature id."""
    return sig % NUM_CLASSES, bool((sig // NUM_CLASSES) % 2), bool(sig // (2 * NUM_CLASSES))


def row_signatures(classes: torch.Tensor) -> torch.Tensor:
    """int64 ``[B, S]`` signature of every position of ``classes [B, S]``; the last position predicts the next
    (generated) token."""
    b, s = classes.shape
    pos = torch.arange(s, device=classes.device)
    is_img = (classes == IMAGE) | (classes == VIDEO)
    no_image = torch.full((b,), s, device=classes.device)
    first = torch.where(is_img.any(1), is_img.to(torch.int8).argmax(1), no_image)
    after = (pos[None] > first[:, None]) & ~is_img
    pred = torch.ones_like(after)
    pred[:, :-1] = classes[:, 1:] == RESPONSE
    return classes + NUM_CLASSES * after.long() + 2 * NUM_CLASSES * pred.long()


def steers(rows, sig: int) -> bool:
    """Whether a row selection (None = all, AFTER_IMAGE, GENERATED, or a set of token classes) takes ``sig``."""
    cls, after, pred = signature_parts(sig)
    if rows is None:
        return True
    if rows == AFTER_IMAGE:
        return after
    if rows == GENERATED:
        return pred
    return cls in rows


class RowPlan:
    """The query classes and the per-layer :class:`Reweight` tables of a set of active interventions.

    With ``by_class`` every query class id belongs to one token class (``id_class``), so that key masses summed
    by these ids can be summed back by token class.
    """

    def __init__(self, interventions, num_layers: int, num_heads: int, by_class: bool = False):
        self.num_heads = num_heads
        effective = []
        for sig in range(NUM_SIGNATURES):
            cls = sig % NUM_CLASSES
            acc = torch.zeros(num_layers, len(_TABLES), num_heads, NUM_CLASSES)
            for iv in interventions:
                if not steers(iv.rows, sig):
                    continue
                tabs = iv.tables(num_heads)
                for layer in range(num_layers):
                    if iv.applies(layer):
                        for w, name in enumerate(_TABLES):
                            if name in tabs:
                                acc[layer, w] += tabs[name][:, cls, :]
            effective.append(acc)
        groups, lut, id_class = {}, [], []
        for sig, acc in enumerate(effective):
            cls = sig % NUM_CLASSES
            key = (cls if by_class else None, acc.numpy().tobytes())
            if key not in groups:
                groups[key] = len(groups)
                id_class.append(cls)
            lut.append(groups[key])
        if len(groups) > MAX_CLASSES:
            raise ValueError(f"intervene: the active interventions need {len(groups)} distinct query-row tables, "
                             f"the op takes at most {MAX_CLASSES}: use fewer or coarser row selections")
        self.num_classes = max(NUM_CLASSES, len(groups))
        self.lut = torch.tensor(lut)
        self.id_class = torch.tensor(id_class) if by_class else None
        rep = {g: effective[sig] for sig, g in reversed(list(enumerate(lut)))}
        c = self.num_classes
        self._layers = []
        for layer in range(num_layers):
            tabs = {}
            for w, name in enumerate(_TABLES):
                t = torch.zeros(num_heads, c, c)
                for g, acc in rep.items():
                    t[:, g, :NUM_CLASSES] = acc[layer, w]
                tabs[name] = t if bool((t != 0).any()) else None
            self._layers.append(None if all(t is None for t in tabs.values()) else tabs)
        self._on_device: dict = {}

    def query_classes(self, classes: torch.Tensor) -> torch.Tensor:
        return self.lut.to(classes.device)[row_signatures(classes)]

    def key_mass_by_class(self, key_mass: torch.Tensor) -> torch.Tensor:
        """``[..., num_classes]`` key masses summed by query class id -> ``[..., NUM_CLASSES]`` by token class."""
        onehot = torch.nn.functional.one_hot(self.id_class.to(key_mass.device), NUM_CLASSES).to(key_mass.dtype)
        return key_mass[..., :len(self.id_class)] @ onehot

    def reweight(self, layer_idx, num_heads, device):
        if num_heads != self.num_heads:
            raise ValueError(f"intervene: the attention has {num_heads} query heads, the model config "
                             f"{self.num_heads}")
        if layer_idx is None or layer_idx >= len(self._layers) or self._layers[layer_idx] is None:
            return None
        key = (layer_idx, str(device))
        if key not in self._on_device:
            tabs = self._layers[layer_idx]
            self._on_device[key] = Reweight(**{n: None if t is None else t.to(device) for n, t in tabs.items()})
        return self._on_device[key]
