"""Plain-PyTorch reference of the fused op: materializes P per sequence.

This is the ground truth of every test (run it in float64) and never a fast path. It implements the
backend contract of ``docs/backends.md`` in the packed (varlen) form, with ordinary autograd.
"""
from __future__ import annotations

import math

import torch


def key_mask(sq: int, sk: int, window_left: int, window_right: int, device) -> torch.Tensor:
    """Bool [sq, sk]: True where query i may see key j (bottom-right aligned, -1 = unbounded side)."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        keep &= j >= i - window_left
    if window_right >= 0:
        keep &= j <= i + window_right
    return keep


def reweight_scores(z, mul, abs_, add, qcls, kcls):
    """z [H, sq, sk] -> z' of docs/op.md with tables [H, C, C] gathered by (query class, key class)."""
    def table(t):
        return t[:, qcls][:, :, kcls].to(z.dtype)  # [H, sq, sk]

    out = z
    if mul is not None:
        out = out + z * table(mul)
    if abs_ is not None:
        out = out + z.abs() * table(abs_)
    if add is not None:
        out = out + table(add)
    return out


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_class, query_class,
            num_classes, mul, abs_, add, scale, window_left, window_right, out_fp32=False, key_mass=False):
    """Packed form: q [Tq, Hq, D], k/v [Tk, Hk, D] -> out [Tq, Hq, D], lse [Hq, Tq] fp32, mass [Hq, Tq, C] fp32,
    and with ``key_mass=True`` a fourth output ``key_mass [Hq, Tk, C]`` fp32: per key, the attention it receives
    from the rows of each query class. ``out_fp32`` is accepted for the backend contract (out stays in q's dtype).

    Computed in q's dtype (lse and mass too, then cast to float32) so that the FlashAttention rule can
    compare a kernel with this reference run in the kernel's own dtype.
    """
    hq, hk = q.shape[1], k.shape[1]
    group = hq // hk
    outs, lses, masses, key_masses = [], [], [], []
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for n in range(len(cq) - 1):
        qs = q[cq[n]:cq[n + 1]].transpose(0, 1)  # [H, sq, D]
        ks = k[ck[n]:ck[n + 1]].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[ck[n]:ck[n + 1]].transpose(0, 1).repeat_interleave(group, 0)
        sq, sk = qs.shape[1], ks.shape[1]
        z = torch.matmul(qs, ks.transpose(1, 2)) * scale
        if mul is not None or abs_ is not None or add is not None:
            z = reweight_scores(z, mul, abs_, add, query_class[cq[n]:cq[n + 1]].long(),
                                key_class[ck[n]:ck[n + 1]].long())
        keep = key_mask(sq, sk, window_left, window_right, q.device)
        z = z.masked_fill(~keep, -math.inf)
        # Normalise by the row sum after subtracting the row max (not exp(z - lse)): with huge scores
        # (|z| ~ 1e30) lse = max + log(n) rounds to max and exp(z - lse) would not sum to 1.
        # Empty rows (max -inf) subtract 0 so that P is exactly 0 there, with finite gradients; NaN propagates.
        zmax = z.amax(dim=-1, keepdim=True) if sk else z.new_full((*z.shape[:-1], 1), -math.inf)
        empty = zmax == -math.inf
        e = torch.exp(z - torch.where(empty, torch.zeros_like(zmax), zmax))
        total = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(empty, torch.ones_like(total), total)
        lse = (zmax + torch.log(total)).squeeze(-1)  # [H, sq], -inf on empty rows
        outs.append(torch.matmul(p, vs).transpose(0, 1))
        lses.append(lse)
        if num_classes > 0:
            onehot = torch.nn.functional.one_hot(key_class[ck[n]:ck[n + 1]].long(), num_classes).to(p.dtype)
            masses.append(torch.matmul(p, onehot))  # [H, sq, C]
            if key_mass:
                onehot_q = torch.nn.functional.one_hot(query_class[cq[n]:cq[n + 1]].long(), num_classes).to(p.dtype)
                key_masses.append(torch.matmul(p.transpose(1, 2), onehot_q))  # [H, sk, C]
    out = torch.cat(outs, 0).to(q.dtype)
    lse = torch.cat(lses, 1).float() if q.dtype != torch.float64 else torch.cat(lses, 1)
    if num_classes > 0:
        mass = torch.cat(masses, 1)
        mass = mass if q.dtype == torch.float64 else mass.float()
    else:
        mass = q.new_zeros(hq, q.shape[0], 0, dtype=torch.float32)
    if not key_mass:
        return out, lse, mass
    if num_classes > 0:
        km = torch.cat(key_masses, 1)
        km = km if q.dtype == torch.float64 else km.float()
    else:
        km = q.new_zeros(hq, k.shape[0], 0, dtype=torch.float32)
    return out, lse, mass, km
