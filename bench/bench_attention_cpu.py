"""CPU benchmarks of the fused op against the stock baselines (SPEC 6), with pytest-benchmark.

    pytest bench/bench_attention_cpu.py --benchmark-only                      # all sizes
    pytest bench/bench_attention_cpu.py --benchmark-only -m "not slow"       # without S=4096

B=1, H=16, D=128, causal, float32. One benchmark group per (S, pass) so that the ratios to SDPA are visible
in one run. Cases:
  sdpa          torch SDPA, no mass (the baseline)
  sdpa_onehot   SDPA with C one-hot class columns appended to V (q, k zero-padded): columns D..D+C = masses
  eager         softmax(QK^T) materialized, masses from P
  avar          avar cpu backend with masses (C=4)
  avar_vaf      avar with a VAF-like reweight (image keys MUL +0.15, system keys MUL -0.4 for text queries)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import avar_kernels

H, D, C = 16, 128, 4
SYSTEM, IMAGE, TEXT = 2, 1, 3
SIZES = [512, 1024, 2048, pytest.param(4096, marks=pytest.mark.slow)]
CASES = ["sdpa", "sdpa_onehot", "eager", "avar", "avar_vaf"]


def key_classes(s: int) -> torch.Tensor:
    """10% system, 60% image, 30% text (contiguous runs, like a VLM prompt)."""
    kc = torch.full((1, s), TEXT, dtype=torch.int32)
    kc[:, : s // 10] = SYSTEM
    kc[:, s // 10: s // 10 + (6 * s) // 10] = IMAGE
    return kc


def vaf_reweight() -> avar_kernels.Reweight:
    mul = torch.zeros(C, C)
    mul[TEXT, IMAGE] = 0.15
    mul[TEXT, SYSTEM] = -0.40
    return avar_kernels.Reweight(mul=mul)


def make_inputs(s: int, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s, H, D, generator=g).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, key_classes(s)


def run_case(case: str, q, k, v, kc):
    """Returns the tensors whose sum is backpropagated: (out, mass) in the case's own layout."""
    if case == "sdpa":
        return (F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True),)
    if case == "sdpa_onehot":
        onehot = F.one_hot(kc.long(), C).to(q.dtype)[:, None].expand(-1, H, -1, -1)  # [B, H, S, C]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        pad = (0, C)
        o = F.scaled_dot_product_attention(F.pad(qt, pad), F.pad(kt, pad), torch.cat([vt, onehot], -1),
                                           is_causal=True, scale=D ** -0.5)
        return o[..., :D], o[..., D:]
    if case == "eager":
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = q.shape[1]
        z = (qt @ kt.transpose(-1, -2)) * D ** -0.5
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        p = torch.softmax(z.masked_fill(~mask, -math.inf), -1)
        onehot = F.one_hot(kc.long(), C).to(q.dtype)[:, None]
        return p @ vt, p @ onehot
    if case in ("avar", "avar_vaf"):
        rw = vaf_reweight() if case == "avar_vaf" else None
        res = avar_kernels.attention(q, k, v, kc, num_classes=C, causal=True, reweight=rw, backend="cpu")
        return res.out, res.mass
    raise ValueError(case)


def step(case, q, k, v, kc, backward: bool):
    outs = run_case(case, q, k, v, kc)
    if backward:
        loss = sum(o.float().sum() for o in outs)
        loss.backward()
        q.grad = k.grad = v.grad = None
    return outs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("s", SIZES)
def test_forward(benchmark, s, case):
    benchmark.group = f"S={s} forward"
    q, k, v, kc = make_inputs(s, False)
    with torch.no_grad():
        benchmark.pedantic(step, args=(case, q, k, v, kc, False), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("s", SIZES)
def test_forward_backward(benchmark, s, case):
    benchmark.group = f"S={s} forward+backward"
    q, k, v, kc = make_inputs(s, True)
    benchmark.pedantic(step, args=(case, q, k, v, kc, True), rounds=3, iterations=1, warmup_rounds=1)
