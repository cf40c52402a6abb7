"""The C++ CPU backend against the plain-PyTorch reference, at the backend-contract level (packed form).

Run also with small tiles to exercise the multi-tile paths on short sequences:
    AVAR_CPU_QBLOCK=16 AVAR_CPU_KBLOCK=32 pytest tests/test_cpu_backend.py
"""

import pytest
import torch

from avar_kernels import reference

cpu = pytest.importorskip("avar_kernels.cpu")
pytestmark = pytest.mark.skipif(not cpu.is_available(), reason="C++ extension not built")


def make_case(seqs, hq, hk, d, C, rw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sq = [a for a, _ in seqs]
    sk = [b for _, b in seqs]
    cu_q = torch.tensor([0] + list(torch.tensor(sq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(sk).cumsum(0)), dtype=torch.int32)
    Tq, Tk = sum(sq), sum(sk)
    q = torch.randn(Tq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(Tk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(Tk, hk, d, generator=g, dtype=torch.float64)
    kc = qc = None
    mul = abs_ = add = None
    if C > 0:
        # runs of classes (like system / image / text) with some noise
        kc = torch.cat([torch.sort(torch.randint(0, C, (n,), generator=g)).values for n in sk]).to(torch.int32)
        flip = torch.rand(Tk, generator=g) < 0.1
        kc = torch.where(flip, torch.randint(0, C, (Tk,), generator=g).to(torch.int32), kc)
        qc = torch.randint(0, C, (Tq,), generator=g).to(torch.int32)
        if rw in ("mul", "mixed"):
            mul = 0.3 * torch.randn(hq, C, C, generator=g)
        if rw in ("abs", "mixed"):
            abs_ = 0.3 * torch.randn(hq, C, C, generator=g)
        if rw in ("add", "mixed"):
            add = torch.randn(hq, C, C, generator=g)
    return q, k, v, cu_q, cu_k, max(sq), max(sk), kc, qc, C, mul, abs_, add, Tq


def ref_grads(args, scale, wl, wr, seed=1):
    q, k, v, cu_q, cu_k, mq, mk, kc, qc, C, mul, abs_, add, Tq = args
    q = q.clone().requires_grad_()
    k = k.clone().requires_grad_()
    v = v.clone().requires_grad_()
    out, lse, mass = reference.forward(q, k, v, cu_q, cu_k, mq, mk, kc, qc, C, mul, abs_, add, scale, wl, wr)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dmass = torch.randn(mass.shape, generator=g, dtype=torch.float64) if C > 0 else None
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    lse_fin = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out * dout).sum() + (lse_fin * dlse).sum()
    if C > 0:
        loss = loss + (mass * dmass).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    delta = (dout * out.detach()).sum(-1).transpose(0, 1)
    if C > 0:
        delta = delta + (dmass * mass.detach()).sum(-1)
    delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse)
    return (out.detach(), lse.detach(), mass.detach()), (dq, dk, dv), (dout, dmass, delta.contiguous())


CASES = [
    # seqs, hq, hk, d, C, rw, wl, wr
    ([(17, 63)], 4, 2, 32, 3, None, -1, 0),
    ([(1, 111)], 6, 1, 64, 3, "mul", -1, 0),
    ([(63, 17)], 4, 4, 80, 3, "abs", -1, 0),  # sq > sk, causal: empty first rows
    ([(40, 40), (17, 63), (63, 17), (1, 5)], 8, 2, 96, 8, "mixed", -1, 0),
    ([(70, 70), (33, 90)], 4, 2, 128, 1, "add", 5, 3),
    ([(50, 50), (20, 70)], 4, 1, 256, 3, "mixed", 16, 0),
    ([(45, 60)], 4, 2, 64, 0, None, -1, -1),
    ([(45, 60)], 4, 2, 64, 8, "mixed", -1, -1),
    ([(200, 300), (130, 130)], 2, 1, 64, 3, "mixed", -1, 0),
    ([(100, 80)], 2, 2, 32, 3, None, 3, 2),  # rows that see nothing
    ([(1000, 1000)], 2, 1, 64, 3, "mixed", -1, 0),  # several q and k blocks at the default block sizes
    ([(600, 1100)], 2, 2, 32, 8, "mixed", 300, 40),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_vs_reference(case, dtype):
    seqs, hq, hk, d, C, rw, wl, wr = case
    args = make_case(seqs, hq, hk, d, C, rw, dtype)
    scale = d ** -0.5
    (o_r, l_r, m_r), (dq_r, dk_r, dv_r), (dout, dmass, delta) = ref_grads(args, scale, wl, wr)
    q, k, v, cu_q, cu_k, mq, mk, kc, qc, C, mul, abs_, add, Tq = args
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    o, l, m = cpu.forward(cast(q), cast(k), cast(v), cu_q, cu_k, mq, mk, kc, qc, C, mul, abs_, add, scale, wl, wr)
    dq, dk, dv = cpu.backward(cast(dout), cast(dmass), cast(delta), cast(q), cast(k), cast(v), o, l, cu_q, cu_k,
                              mq, mk, kc, qc, C, mul, abs_, add, scale, wl, wr)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for name, a, b in [("out", o, o_r), ("mass", m, m_r), ("dq", dq, dq_r), ("dk", dk, dk_r), ("dv", dv, dv_r)]:
        assert a.shape == b.shape, name
        if a.numel() == 0:
            continue
        assert a.dtype == dtype or name == "mass", name
        assert not torch.isnan(a).any(), name
        err = (a.double() - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), f"{name}: {err}"
    assert torch.equal(torch.isinf(l), torch.isinf(l_r))
    fin = ~torch.isinf(l_r)
    assert (l.double()[fin] - l_r[fin]).abs().max().item() <= tol * 10


def test_half_dtypes_roundtrip():
    args = make_case([(30, 40)], 4, 2, 64, 3, "mul", torch.float32)
    q, k, v, cu_q, cu_k, mq, mk, kc, qc, C, mul, abs_, add, Tq = args
    for dt in (torch.float16, torch.bfloat16):
        o, l, m = cpu.forward(q.to(dt), k.to(dt), v.to(dt), cu_q, cu_k, mq, mk, kc, qc, C, mul, abs_, add,
                              0.125, -1, 0)
        assert o.dtype == dt and l.dtype == torch.float32 and m.dtype == torch.float32
