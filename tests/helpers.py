"""Shared test helpers: inputs, the FlashAttention tolerance rule (docs/op.md) and a reference comparison."""
from __future__ import annotations

import torch

import avar_kernels as ak


def fa_close(name, got, ref64, ref_lowp, atol):
    """FlashAttention rule: |got - ref64| <= 2 * |ref_lowp - ref64| + atol (max norms), infs matching."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got, ref64, ref_lowp = got.double(), ref64.double(), ref_lowp.double()
    assert not torch.isnan(got).any(), f"{name}: NaN in output"
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(got), inf), f"{name}: infinities differ from the reference"
    assert torch.equal(got[inf], ref64[inf]), f"{name}: infinities differ from the reference"
    fin = ~inf
    err = (got[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0
    base = (ref_lowp[fin] - ref64[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 * {base:.3g} + {atol:g}"


ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_reweight(kind, hq, c, gen):
    """Reweight tables of a named kind: absent, VAF-like mul, PAI-like abs, additive, mixed per head."""
    if kind == "none":
        return None
    if kind == "vaf":
        mul = torch.zeros(c)
        mul[min(1, c - 1)] = 0.15
        if c > 2:
            mul[2] = -0.4
        return ak.Reweight(mul=mul)
    if kind == "pai":
        t = torch.zeros(c, c)
        t[:, min(1, c - 1)] = 0.2
        return ak.Reweight(abs=t)
    if kind == "add":
        return ak.Reweight(add=torch.randn(c, generator=gen).log_softmax(0))
    if kind == "mixed":
        return ak.Reweight(mul=0.3 * torch.randn(hq, c, c, generator=gen), abs=0.2 * torch.randn(hq, c, c, generator=gen),
                           add=torch.randn(hq, c, c, generator=gen))
    raise ValueError(kind)


def run_op(fn, args, kwargs, dtype, backend, dout, dmass, dlse, dkey_mass=None):
    """Runs fn on args cast to dtype; returns (out, mass, lse, dq, dk, dv, key_mass) as float64 clones (key_mass
    only with ``return_key_mass=True`` in kwargs, else an empty tensor)."""
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in args[:3])
    res = fn(q, k, v, *args[3:], **kwargs, return_lse=True, backend=backend)
    loss = (res.out.double() * dout).sum() + (res.lse.double().nan_to_num(0, 0, 0) * dlse).sum()
    if res.mass is not None:
        loss = loss + (res.mass.double() * dmass).sum()
    if res.key_mass is not None:
        loss = loss + (res.key_mass.double() * dkey_mass).sum()
    loss.backward()
    empty = torch.zeros(0)
    return [t.detach() for t in (res.out, res.mass if res.mass is not None else empty, res.lse,
                                 q.grad, k.grad, v.grad, res.key_mass if res.key_mass is not None else empty)]


NAMES = ("out", "mass", "lse", "dq", "dk", "dv", "key_mass")


def check_against_reference(fn, args, kwargs, dtype, backend, seed=0):
    """Runs fn with backend in dtype, and the reference in float64 and in dtype; applies the FA rule to all."""
    gen = torch.Generator().manual_seed(seed)
    probe = fn(*(t.double() for t in args[:3]), *args[3:], **kwargs, return_lse=True, backend="reference")
    dout = torch.randn(probe.out.shape, generator=gen, dtype=torch.float64)
    dmass = torch.randn(probe.mass.shape, generator=gen, dtype=torch.float64) if probe.mass is not None else None
    dlse = torch.randn(probe.lse.shape, generator=gen, dtype=torch.float64)
    dkm = torch.randn(probe.key_mass.shape, generator=gen, dtype=torch.float64) if probe.key_mass is not None else None
    ref64 = run_op(fn, args, kwargs, torch.float64, "reference", dout, dmass, dlse, dkm)
    lowp = torch.float32 if dtype in (torch.float32, torch.float64) else dtype
    ref_lowp = run_op(fn, args, kwargs, lowp if dtype != torch.float64 else torch.float64, "reference",
                      dout, dmass, dlse, dkm)
    got = run_op(fn, args, kwargs, dtype, backend, dout, dmass, dlse, dkm)
    for name, g, r, rl in zip(NAMES, got, ref64, ref_lowp):
        fa_close(name, g, r, rl, ATOL[dtype] * (1 if name in ("out", "mass", "lse", "key_mass") else 4))
    return got


def padded_inputs(b, sq, sk, hq, hk, d, c, gen, layout_noncontig=False):
    q = torch.randn(b, sq, hq, d, generator=gen)
    k = torch.randn(b, sk, hk, d, generator=gen)
    v = torch.randn(b, sk, hk, d, generator=gen)
    if layout_noncontig:  # a [B, H, S, D] tensor viewed as [B, S, H, D], as transformers hands it over
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    kc = torch.randint(0, max(c, 1), (b, sk), generator=gen) if c else None
    return q, k, v, kc


def varlen_inputs(lens_q, lens_k, hq, hk, d, c, gen):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=gen)
    k = torch.randn(int(cu_k[-1]), hk, d, generator=gen)
    v = torch.randn(int(cu_k[-1]), hk, d, generator=gen)
    # classes in runs, as in a VLM prompt: system, image, user text, then response
    kc = torch.cat([_runs(n, c, gen) for n in lens_k]) if c else None
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), kc


def _runs(n, c, gen):
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    cuts = sorted(torch.randint(0, n + 1, (c - 1,), generator=gen).tolist()) if c > 1 else []
    bounds = [0] + cuts + [n]
    return torch.cat([torch.full((bounds[i + 1] - bounds[i],), i, dtype=torch.long) for i in range(len(bounds) - 1)])

