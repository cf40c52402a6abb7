"""Public types of avar-kernels: the class ids, the limits, :class:`Reweight` and :class:`AttentionOutput`."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Conventional token-class ids used by the model integration, the metrics and the trainer. The kernels know
# only how many classes there are; these names give the ids a meaning.
OTHER, IMAGE, SYSTEM, USER, RESPONSE, VIDEO = range(6)
NUM_CLASSES = 6
CLASS_NAMES = ("other", "image", "system", "user", "response", "video")

MAX_CLASSES = 8
MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionOutput(NamedTuple):
    """Result of the fused op.

    ``out`` like q; ``mass`` float32 per query row and key class (None when not asked or without classes);
    ``lse`` float32 log-sum-exp of each row's scores (None when not asked); ``key_mass`` float32 per key and query
    class: the attention each key receives from the rows of each class (None unless ``return_key_mass=True``).
    """

    out: torch.Tensor
    mass: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]
    key_mass: Optional[torch.Tensor] = None


def _as_table(name, value):
    if value is None:
        return None
    t = torch.as_tensor(value)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"Reweight.{name}: expected a float tensor, got dtype {t.dtype}")
    t = t.to(torch.float32)
    if t.dim() not in (1, 2, 3):
        raise ValueError(f"Reweight.{name}: expected shape [C] (over key classes), [C, C] or [H, C, C]; "
                         f"got {tuple(t.shape)}")
    if t.dim() >= 2 and t.shape[-1] != t.shape[-2]:
        raise ValueError(f"Reweight.{name}: the last two dims (query class, key class) must be equal; "
                         f"got {tuple(t.shape)}")
    if t.shape[-1] > MAX_CLASSES or t.shape[-1] < 1:
        raise ValueError(f"Reweight.{name}: between 1 and {MAX_CLASSES} classes are supported; got {t.shape[-1]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"Reweight.{name}: table values must be finite")
    return t


class Reweight:
    """Class-wise re-weighting of the pre-softmax scores (docs/op.md).

    ``z' = z * (1 + mul[h, a, b]) + abs[h, a, b] * |z| + add[h, a, b]`` for a query of class ``a`` and a key
    of class ``b`` in query head ``h``. Each table is ``[C]`` (indexed by key class, same for every head and
    query class), ``[C, C]`` (query class, key class) or ``[H, C, C]``. Absent or all-zero tables cost nothing.
    A probability-space factor ``f`` on a class is ``add = log f``. A table with ``requires_grad`` is learned:
    its gradient flows back through :func:`avar_kernels.attention`.
    """

    def __init__(self, mul=None, abs=None, add=None):  # noqa: A002 - the op's formula names the table ABS
        self.mul = _as_table("mul", mul)
        self.abs = _as_table("abs", abs)
        self.add = _as_table("add", add)
        sizes = {t.shape[-1] for t in (self.mul, self.abs, self.add) if t is not None}
        if len(sizes) > 1:
            raise ValueError(f"Reweight: all tables must have the same number of classes; got {sorted(sizes)}")
        heads = {t.shape[0] for t in (self.mul, self.abs, self.add) if t is not None and t.dim() == 3}
        if len(heads) > 1:
            raise ValueError(f"Reweight: per-head tables disagree on the number of heads: {sorted(heads)}")
        self.num_classes = sizes.pop() if sizes else 0
        # Decided once here, not per call, so that the hot path never syncs to ask whether a table is zero.
        # A learned table (requires_grad) is always active, even while it is all zero (its initial value).
        self._active = {n: t is not None and (t.requires_grad or bool((t != 0).any())) for n, t in
                        (("mul", self.mul), ("abs", self.abs), ("add", self.add))}

    @property
    def is_identity(self) -> bool:
        return not any(self._active.values())

    def tables(self, num_heads: int, num_classes: int, device) -> tuple:
        """``(mul, abs, add)`` as float32 ``[num_heads, C, C]`` contiguous tensors on ``device``, None if inactive."""
        if self.num_classes and self.num_classes != num_classes:
            raise ValueError(f"reweight: tables have {self.num_classes} classes but the op has "
                             f"num_classes={num_classes}")
        out = []
        for name in ("mul", "abs", "add"):
            t = getattr(self, name)
            if not self._active[name]:
                out.append(None)
                continue
            if t.dim() == 1:
                t = t[None, None, :].expand(num_heads, num_classes, num_classes)
            elif t.dim() == 2:
                t = t[None].expand(num_heads, num_classes, num_classes)
            elif t.shape[0] != num_heads:
                raise ValueError(f"reweight.{name}: table has {t.shape[0]} heads but q has {num_heads}")
            out.append(t.to(device=device, dtype=torch.float32).contiguous())
        return tuple(out)

    def __repr__(self):
        parts = [f"{n}={list(getattr(self, n).shape)}" for n in ("mul", "abs", "add") if getattr(self, n) is not None]
        return f"Reweight({', '.join(parts)})"
