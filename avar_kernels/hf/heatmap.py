"""Image heatmaps from key masses: where the rows of a token class look inside each image."""
from __future__ import annotations

import math

import torch

from avar_kernels.types import IMAGE, RESPONSE


def _stack_layers(key_mass, layers):
    if isinstance(key_mass, torch.Tensor):
        key_mass = list(key_mass) if key_mass.dim() == 5 else [key_mass]
    if not key_mass:
        raise ValueError("image_heatmaps: key_mass: no layers recorded")
    idx = range(len(key_mass)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    bad = [i for i in idx if not -len(key_mass) <= i < len(key_mass)]
    if bad:
        raise ValueError(f"image_heatmaps: layers: {len(key_mass)} layers recorded, got {bad}")
    return torch.stack([key_mass[i].float() for i in idx])            # [L, B, H, S, C]


def _runs(positions):
    """Contiguous runs of a sorted 1-D index tensor, as a list of index tensors."""
    if positions.numel() == 0:
        return []
    cuts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(positions, cuts.tolist()))


def image_heatmaps(key_mass, token_classes, *, image_grid_thw=None, merge_size=2, query_class=RESPONSE, layers=None,
                   heads=None, normalize=True):
    """Per sample, a list of ``[rows, cols]`` heatmaps, one per image: the attention the image's tokens receive from
    the rows of ``query_class``, averaged over the chosen layers and heads, laid on the image's token grid.

    Args:
        key_mass: :attr:`Recorder.key_mass` (a list over layers of ``[B, H, S, C]``) or a ``[L, B, H, S, C]`` tensor.
        token_classes: int ``[B, S]`` (the recorder's ``classes``): image tokens are those of class IMAGE.
        image_grid_thw: ``[N_images, 3]`` (Qwen2/2.5/3-VL inputs): image i is a ``t x h x w`` patch grid merged by
            ``merge_size`` into ``(h / merge) x (w / merge)`` tokens per frame (frames averaged). Without it
            (LLaVA), each run of image tokens is a square grid.
        query_class: a token class or a set of them (their key masses add); default RESPONSE.
        layers / heads: indices to average over (default all).
        normalize: divide each heatmap by its sum (a distribution over the image's tokens); all-zero maps stay 0.
    """
    km = _stack_layers(key_mass, layers)
    if heads is not None:
        km = km[:, :, list([heads] if isinstance(heads, int) else heads)]
    qc = [query_class] if isinstance(query_class, int) else sorted(query_class)
    per_token = km[..., qc].sum(-1).mean((0, 2))                         # [B, S]
    classes = token_classes.to(per_token.device)
    if classes.shape != per_token.shape:
        raise ValueError(f"image_heatmaps: token_classes: expected shape {list(per_token.shape)}, "
                         f"got {list(classes.shape)}")
    grids = None if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    image_no = 0
    out = []
    for b in range(classes.shape[0]):
        pos = torch.nonzero(classes[b] == IMAGE).flatten()
        maps = []
        if grids is None:
            for run in _runs(pos):
                side = math.isqrt(run.numel())
                if side * side != run.numel():
                    raise ValueError(f"image_heatmaps: sample {b}: a run of {run.numel()} image tokens is not a "
                                     "square grid; pass image_grid_thw")
                maps.append(per_token[b, run].view(side, side))
        else:
            start = 0
            while start < pos.numel():
                if image_no >= len(grids):
                    raise ValueError(f"image_heatmaps: image_grid_thw: {len(grids)} images, but sample {b} has "
                                     "more image tokens")
                t, h, w = grids[image_no]
                rows, cols = h // merge_size, w // merge_size
                n = t * rows * cols
                maps.append(per_token[b, pos[start:start + n]].view(t, rows, cols).mean(0))
                start += n
                image_no += 1
        if normalize:
            maps = [m / m.sum() if m.sum() > 0 else m for m in maps]
        out.append(maps)
    return out
