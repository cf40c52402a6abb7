"""CPU benchmark cases, timed by bench/run_cpu.py through avar_kernels.benchmark: inputs, class layouts, variants.

B=1, H=16, D=128, causal, float32. Class layouts of the keys (C classes):
  vlm     4 contiguous spans, as in a VLM prompt: system 10%, image 60%, user text 20%, response 10% (ids 2, 1,
          3, 0: the response takes id 0 so that C = 4 holds the four spans; with C = 8 the other ids stay empty)
  random  one class drawn uniformly per token (several images, video frames with timestamps between them,
          multi-turn chats, packed batches, per-token classes for analysis)
Cases (those in CLASSED take the layout and C; FORWARD_ONLY ones have no backward):
  sdpa          torch SDPA, no masses (the baseline of every ratio)
  avar_plain    the avar cpu backend without classes (no masses): what the masses must not add to
  eager         softmax(QK^T) materialized, masses from P (the published AVAR code's way)
  sdpa_onehot   SDPA with C one-hot class columns appended to V (q, k zero-padded): columns D..D+C = masses
  avar          the avar cpu backend with masses
  avar_vaf      avar with masses and a VAF-like table (user-text queries: image keys MUL +0.15, system -0.4)
  flex_mass_rw  FlexAttention (torch.compile), class-wise score_mod + one-hot columns in V
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import avar_kernels

H, D = 16, 128
SYSTEM, IMAGE, USER, RESPONSE = 2, 1, 3, 0
LAYOUTS = ("vlm", "random")
CASES = ("sdpa", "avar_plain", "eager", "sdpa_onehot", "avar", "avar_vaf", "flex_mass_rw")
CLASSED = {"sdpa_onehot", "avar", "avar_vaf", "flex_mass_rw"}
FORWARD_ONLY = {"flex_mass_rw"}


def key_classes(layout: str, s: int, c: int, seed: int = 0) -> torch.Tensor:
    """int32 [1, s] class ids in [0, c) laid out as ``layout`` (see the module docstring)."""
    if layout == "vlm":
        bounds = [0, s // 10, s // 10 + (6 * s) // 10, s - s // 10, s]
        ids = torch.empty(s, dtype=torch.int32)
        for cls, lo, hi in zip((SYSTEM, IMAGE, USER, RESPONSE), bounds[:-1], bounds[1:]):
            ids[lo:hi] = cls
        return ids[None]
    if layout == "random":
        return torch.randint(0, c, (1, s), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def vaf_table(c: int) -> torch.Tensor:
    mul = torch.zeros(c, c)
    mul[USER, IMAGE] = 0.15
    mul[USER, SYSTEM] = -0.40
    return mul


def make_inputs(s: int, requires_grad: bool, layout: str = "vlm", c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s, H, D, generator=g).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, key_classes(layout, s, c, seed)


def flex_case(s: int, kc: torch.Tensor, c: int):
    """FlexAttention compiled for this shape: returns run(q, k, v) -> (out, mass)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cls = kc[0].long()
    mul = vaf_table(c)

    def score_mod(score, b, h, qi, kj):
        return score * (1 + mul[cls[qi], cls[kj]])

    def causal(b, h, qi, kj):
        return qi >= kj

    block_mask = create_block_mask(causal, None, None, s, s, device="cpu")
    flex = torch.compile(flex_attention)
    onehot = F.one_hot(cls, c).float()[None, None].expand(1, H, -1, -1)

    def run(q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = flex(F.pad(qt, (0, c)), F.pad(kt, (0, c)), torch.cat([vt, onehot], -1), score_mod=score_mod,
                 block_mask=block_mask, scale=D ** -0.5)
        return o[..., :D], o[..., D:]

    return run


def run_case(case: str, q, k, v, kc, c: int):
    """The tensors whose sum is backpropagated: (out,) or (out, mass) in the case's own layout."""
    if case == "sdpa":
        return (F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True),)
    if case == "avar_plain":
        return (avar_kernels.attention(q, k, v, causal=True, backend="cpu").out,)
    if case == "sdpa_onehot":
        onehot = F.one_hot(kc.long(), c).to(q.dtype)[:, None].expand(-1, H, -1, -1)  # [B, H, S, C]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(F.pad(qt, (0, c)), F.pad(kt, (0, c)), torch.cat([vt, onehot], -1),
                                           is_causal=True, scale=D ** -0.5)
        return o[..., :D], o[..., D:]
    if case == "eager":
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = q.shape[1]
        z = (qt @ kt.transpose(-1, -2)) * D ** -0.5
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        p = torch.softmax(z.masked_fill(~mask, -math.inf), -1)
        onehot = F.one_hot(kc.long(), c).to(q.dtype)[:, None]
        return p @ vt, p @ onehot
    if case in ("avar", "avar_vaf"):
        rw = avar_kernels.Reweight(mul=vaf_table(c)) if case == "avar_vaf" else None
        res = avar_kernels.attention(q, k, v, kc, num_classes=c, causal=True, reweight=rw, backend="cpu")
        return res.out, res.mass
    raise ValueError(f"case: expected one of {CASES} (flex_mass_rw through flex_case), got {case!r}")


def backward_step(outs, q, k, v):
    """Backpropagates the sum of the outputs and drops the gradients (the next call allocates them again)."""
    sum(o.float().sum() for o in outs).backward()
    q.grad = k.grad = v.grad = None
