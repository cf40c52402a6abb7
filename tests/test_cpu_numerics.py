"""The C++ CPU backend on hard inputs, at the backend-contract level (packed form), against the float64 reference:
NaN / inf inputs, empty inputs, large logits with any tile size, the float32 output for low-precision training,
any class layout, and the portable build against the AVX2 one.
"""
import os
import subprocess
import sys

import pytest
import torch
from helpers import ATOL, fa_close

from avar_kernels import reference

cpu = pytest.importorskip("avar_kernels.cpu")
pytestmark = pytest.mark.skipif(not cpu.is_available(), reason="C++ extension not built")

HERE = os.path.dirname(os.path.abspath(__file__))


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def case(seqs, hq, hk, d, c, *, classes="random", tables=(), logit=1.0, seed=0):
    """Packed inputs in float64: sequences [(sq, sk)], classes 'random' (one drawn per token) or 'spans' (4 runs)."""
    g = torch.Generator().manual_seed(seed)
    sq, sk = [a for a, _ in seqs], [b for _, b in seqs]
    tq, tk = sum(sq), sum(sk)
    # |z| ~ logit: q . k / sqrt(d) has the variance of one product of unit normals times logit
    amp = logit ** 0.5
    q = amp * torch.randn(tq, hq, d, generator=g, dtype=torch.float64)
    k = amp * torch.randn(tk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(tk, hk, d, generator=g, dtype=torch.float64)
    kc = qc = None
    if c:
        if classes == "random":
            kc = torch.randint(0, c, (tk,), generator=g)
        else:
            kc = torch.cat([(torch.arange(n) * 4 // max(n, 1)) % c for n in sk])
        kc = kc.to(torch.int32)
        qc = torch.randint(0, c, (tq,), generator=g).to(torch.int32)
    tabs = {name: 0.3 * torch.randn(hq, c, c, generator=g) if name in tables else None for name in ("mul", "abs", "add")}
    return dict(q=q, k=k, v=v, cu_q=_cu(sq), cu_k=_cu(sk), mq=max(sq, default=0), mk=max(sk, default=0), kc=kc, qc=qc,
                c=c, mul=tabs["mul"], abs_=tabs["abs"], add=tabs["add"], scale=d ** -0.5)


def _static(a, wl, wr):
    return (a["cu_q"], a["cu_k"], a["mq"], a["mk"], a["kc"], a["qc"], a["c"], a["mul"], a["abs_"], a["add"],
            a["scale"], wl, wr)


def reference_run(a, wl=-1, wr=0, dtype=torch.float64, seed=1):
    """(out, lse, mass), (dq, dk, dv) and the backward's (dout, dmass, delta), from the reference in dtype."""
    q, k, v = (a[n].to(dtype).requires_grad_() for n in ("q", "k", "v"))
    out, lse, mass = reference.forward(q, k, v, *_static(a, wl, wr))
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dmass = torch.randn(mass.shape, generator=g, dtype=torch.float64) if a["c"] else None
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    dlse = torch.where(torch.isinf(lse), torch.zeros_like(dlse), dlse)
    loss = (out.double() * dout).sum() + (torch.where(torch.isinf(lse), 0, lse).double() * dlse).sum()
    if a["c"]:
        loss = loss + (mass.double() * dmass).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out.detach(), lse.detach(), mass.detach()), grads, (dout, dmass, dlse)


def cpu_run(a, cotangents, wl=-1, wr=0, dtype=torch.float64):
    """The backend's forward and backward, delta formed as the dispatcher forms it."""
    dout, dmass, dlse = cotangents
    q, k, v = (a[n].to(dtype) for n in ("q", "k", "v"))
    out, lse, mass = cpu.forward(q, k, v, *_static(a, wl, wr))
    delta = (dout * out.double()).sum(-1).transpose(0, 1) - dlse
    if a["c"]:
        delta = delta + (dmass * mass.double()).sum(-1)
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    grads = cpu.backward(cast(dout), cast(dmass), cast(delta), q, k, v, out, lse, *_static(a, wl, wr))
    return (out, lse, mass), grads


# ------------------------------------------------------------------------------------------- NaN and inf

def _poison(a, kind):
    if kind == "nan_q":
        a["q"][10, 0, 3] = float("nan")
    elif kind == "nan_k":
        a["k"][10, 1, 3] = float("nan")
    elif kind == "inf_k":
        a["k"][10, 0, 3] = float("inf")
    elif kind == "ninf_q":
        a["q"][30, 1, 3] = -float("inf")
        a["q"][45, 0, 5] = -float("inf")


def _seen_by_nan_rows(a, lse, wl, wr):
    """[Tk, Hk] bool: keys that some row with a NaN lse (of a query head of the kv group) sees."""
    hq, hk = lse.shape[0], a["k"].shape[1]
    seen = torch.zeros(a["k"].shape[0], hk, dtype=torch.bool)
    cq, ck = a["cu_q"].tolist(), a["cu_k"].tolist()
    for n in range(len(cq) - 1):
        keep = reference.key_mask(cq[n + 1] - cq[n], ck[n + 1] - ck[n], wl, wr, "cpu")  # [sq, sk]
        for h in range(hq):
            rows = torch.isnan(lse[h, cq[n]:cq[n + 1]])
            seen[ck[n]:ck[n + 1], h // (hq // hk)] |= keep[rows].any(0)
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["nan_q", "nan_k", "inf_k", "ninf_q"])
def test_nonfinite_inputs_propagate_like_the_reference(kind, dtype):
    """A diverging run shows NaN, not zeros: out / mass / lse are NaN exactly where the float64 reference's are,
    and the gradients are NaN (never 0) where the reference's are, and nowhere else. ninf_q: a -inf in q gives its
    row +inf and -inf scores; the row is NaN on every key it sees, the -inf-score keys included."""
    a = case([(40, 40), (20, 30)], 2, 2, 16, 3, tables=("mul",))
    _poison(a, kind)
    ref, ref_grads, cot = reference_run(a)
    got, grads = cpu_run(a, cot, dtype=dtype)
    for name, x, r in zip(("out", "lse", "mass"), got, ref):
        assert torch.equal(torch.isnan(x), torch.isnan(r)), f"{name}: NaN pattern differs from the reference"
        assert torch.equal(torch.isinf(x), torch.isinf(r)), f"{name}: inf pattern differs from the reference"
    assert torch.isnan(got[0]).any()
    for name, x, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        nan, ref_nan = torch.isnan(x), torch.isnan(r)
        if name == "dv":  # the reference's dv is also NaN on keys no NaN row sees (0 * NaN through masked P)
            ref_nan = ref_nan & _seen_by_nan_rows(a, ref[1], -1, 0)[..., None]
        assert not (nan & ~torch.isnan(r)).any(), f"{name}: NaN where the reference is finite"
        assert not ((x == 0) & ref_nan).any(), f"{name}: zeros where the reference is NaN"
        assert torch.equal(nan, ref_nan), f"{name}: NaN pattern differs from the reference"
        assert nan.any(), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inf_in_v_makes_the_rows_gradients_nan(dtype):
    """inf in v makes out inf on the rows that see it and their row constant delta = <dO, O> infinite: dZ' of
    such a row is undefined (inf - inf at that key), and the reference's autograd makes it NaN on the whole row
    (through its row max). dq and dk are NaN exactly where the reference's are, never +-inf or finite there."""
    a = case([(40, 40), (20, 30)], 2, 2, 16, 3, tables=("mul",))
    a["v"][10, 0, 3] = float("inf")
    ref, ref_grads, cot = reference_run(a)
    got, grads = cpu_run(a, cot, dtype=dtype)
    for name, x, r in zip(("dq", "dk"), grads[:2], ref_grads[:2]):
        assert torch.isnan(r).any(), name
        assert torch.equal(torch.isnan(x), torch.isnan(r)), f"{name}: NaN pattern differs from the reference"
    assert torch.equal(torch.isnan(grads[2]), torch.isnan(ref_grads[2]))  # dv = P^T dO stays finite


# ------------------------------------------------------------------------------------------- empty inputs

@pytest.mark.parametrize("seqs", [[(0, 5)], [(3, 0), (0, 0)], [(0, 0), (0, 0), (0, 0)], []],
                         ids=["tq0", "tk0", "all-empty", "no-sequence"])
def test_empty_inputs(seqs):
    """Empty in, empty out: no crash and no misleading message, with classes, tables and table gradients."""
    a = case(seqs, 4, 2, 8, 3, tables=("mul", "add"))
    tq = a["q"].shape[0]
    for dtype in (torch.float32, torch.float64):
        q, k, v = (a[n].to(dtype) for n in ("q", "k", "v"))
        out, lse, mass = cpu.forward(q, k, v, *_static(a, -1, 0))
        assert out.shape == (tq, 4, 8) and lse.shape == (4, tq) and mass.shape == (4, tq, 3)
        assert (out == 0).all() and (mass == 0).all() and (lse == -float("inf")).all()  # rows see no key
        dq, dk, dv, dtab = cpu.backward(torch.ones_like(out), torch.ones_like(mass), torch.zeros_like(lse), q, k, v,
                                        out, lse, *_static(a, -1, 0), table_grads=(True, False, True))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dtab.shape == (3, 4, 3, 3)
        for t in (dq, dk, dv, dtab):
            assert (t == 0).all()


# ------------------------------------------------------------------------------------------- large logits, tiles

TILES = [None, (16, 32), (7, 13), (64, 16), (256, 512)]


def large_logit_check():
    """fp32 with |z| ~ 300: every output and gradient within the FlashAttention rule of the float64 reference.
    At such logits a row's P is decided by its top score, so the backward must recompute the forward's scores bit
    for bit: a one-ulp difference moves P by |z| * 2^-24, far beyond the fp32 reference's own error."""
    for wl, wr, tables in ((-1, 0, ()), (20, 3, ("mul", "abs")), (-1, -1, ("add",))):
        a = case([(70, 70), (33, 90), (130, 57)], 4, 2, 64, 3, tables=tables, logit=300.0, seed=wl + 7)
        ref64, g64, cot = reference_run(a, wl, wr)
        ref32, g32, _ = reference_run(a, wl, wr, dtype=torch.float32)
        got, grads = cpu_run(a, cot, wl, wr, dtype=torch.float32)
        for name, x, r, rl in zip(("out", "lse", "mass", "dq", "dk", "dv"), (*got, *grads), (*ref64, *g64),
                                  (*ref32, *g32)):
            fa_close(name, x, r, rl, ATOL[torch.float32] * (1 if name in ("out", "lse", "mass") else 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("huge", [1e4, 1e8, 1e30])
def test_huge_additive_scores_keep_rows_normalised(huge, dtype):
    """ADD = huge on some (query class, key class) pairs: lse ~ huge is exact only to ulp(lse), so exp(z' - lse)
    is off by up to ulp(lse) / 2 for the whole row (at 1e30, P = 1 on each top key instead of 1 / count). The
    backward and the key masses renormalise those rows (kBigLse); outputs, key masses and gradients keep to the
    FlashAttention rule of the float64 reference."""
    a = case([(70, 70), (33, 90)], 4, 2, 32, 3, tables=("add",), seed=3)
    a["add"][:, :, 1] = huge
    ref64, g64, cot = reference_run(a)
    ref_lp, g_lp, _ = reference_run(a, dtype=dtype)
    got, grads = cpu_run(a, cot, dtype=dtype)
    for name, x, r, rl in zip(("out", "lse", "mass", "dq", "dk", "dv"), (*got, *grads), (*ref64, *g64),
                              (*ref_lp, *g_lp)):
        fa_close(name, x, r, rl, ATOL[dtype] * (1 if name in ("out", "lse", "mass") else 4))
    q, k, v = (a[n].to(dtype) for n in ("q", "k", "v"))
    km = cpu.forward(q, k, v, *_static(a, -1, 0), key_mass=True)[3]
    km64 = reference.forward(a["q"], a["k"], a["v"], *_static(a, -1, 0), key_mass=True)[3]
    km_lp = reference.forward(q, k, v, *_static(a, -1, 0), key_mass=True)[3]
    fa_close("key_mass", km, km64, km_lp, ATOL[dtype])


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: "default" if t is None else f"{t[0]}x{t[1]}")
def test_large_logits_any_tile_size(tiles):
    env = dict(os.environ)
    if tiles is not None:
        env["AVAR_CPU_QBLOCK"], env["AVAR_CPU_KBLOCK"] = map(str, tiles)
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_cpu_numerics as t; t.large_logit_check()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("setting", [("AVAR_CPU_FWD_QBLOCK", "64", "AVAR_CPU_FWD_QBLOCK is no longer read"),
                                     ("AVAR_CPU_KBLOCK", "abc", "AVAR_CPU_KBLOCK must be an integer"),
                                     ("AVAR_CPU_QBLOCK", "0", "AVAR_CPU_QBLOCK must be an integer")])
def test_bad_tile_settings_are_refused(setting):
    name, value, message = setting
    code = ("import torch; from avar_kernels import cpu; q = torch.randn(4, 1, 8); cu = torch.tensor([0, 4], "
            "dtype=torch.int32); cpu.forward(q, q, q, cu, cu, 4, 4, None, None, 0, None, None, None, 1.0, -1, 0)")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, name: value}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- out_fp32

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_out_fp32_returns_the_unrounded_output(dtype):
    a = case([(30, 40), (9, 9)], 4, 2, 32, 3, tables=("mul",))
    q, k, v = (a[n].to(dtype) for n in ("q", "k", "v"))
    out32, lse32, mass32 = cpu.forward(q, k, v, *_static(a, -1, 0), out_fp32=True)
    out, lse, mass = cpu.forward(q, k, v, *_static(a, -1, 0))
    assert out32.dtype == torch.float32 and out.dtype == dtype
    assert torch.equal(lse32, lse) and torch.equal(mass32, mass)
    if dtype == torch.float64:
        assert torch.equal(out32, out.float())
    else:  # the float32 kernel result itself, of which out is the rounding
        direct, _, _ = cpu.forward(q.float(), k.float(), v.float(), *_static(a, -1, 0))
        assert torch.equal(out32, direct) and torch.equal(out, direct.to(dtype))


# ------------------------------------------------------------------------------------------- layouts, builds

@pytest.mark.parametrize("classes", ["random", "spans"])
@pytest.mark.parametrize("c", [1, 4, 8])
def test_any_class_layout(classes, c):
    """Masses, re-weighting and their gradients with one class drawn per token or a few spans, GQA, windows."""
    for wl, wr in ((-1, 0), (25, 5)):
        a = case([(100, 100), (37, 80)], 4, 2, 32, c, classes=classes, tables=("mul", "abs", "add"), seed=c)
        ref64, g64, cot = reference_run(a, wl, wr)
        ref32, g32, _ = reference_run(a, wl, wr, dtype=torch.float32)
        got, grads = cpu_run(a, cot, wl, wr, dtype=torch.float32)
        for name, x, r, rl in zip(("out", "lse", "mass", "dq", "dk", "dv"), (*got, *grads), (*ref64, *g64),
                                  (*ref32, *g32)):
            fa_close(name, x, r, rl, ATOL[torch.float32] * (1 if name in ("out", "lse", "mass") else 4))


def test_deterministic():
    a = case([(300, 300), (50, 120)], 4, 2, 64, 5, tables=("mul", "add"))
    _, _, cot = reference_run(a)
    runs = [cpu_run(a, cot, dtype=torch.float32) for _ in range(2)]
    for x, y in zip((*runs[0][0], *runs[0][1]), (*runs[1][0], *runs[1][1])):
        assert torch.equal(x, y)


def test_portable_build_matches_the_reference(monkeypatch):
    """The portable build (what a CPU without AVX2 runs) against the float64 reference, where both builds exist."""
    portable = pytest.importorskip("avar_kernels._C")
    if cpu.VARIANT == "_C":
        pytest.skip("the portable build is the one in use: the other tests cover it")
    monkeypatch.setattr(cpu, "_C", portable)
    a = case([(120, 120), (37, 80)], 4, 2, 40, 5, tables=("mul", "abs"))
    ref64, g64, cot = reference_run(a, 30, 0)
    ref32, g32, _ = reference_run(a, 30, 0, dtype=torch.float32)
    got, grads = cpu_run(a, cot, 30, 0, dtype=torch.float32)
    for name, x, r, rl in zip(("out", "lse", "mass", "dq", "dk", "dv"), (*got, *grads), (*ref64, *g64),
                              (*ref32, *g32)):
        fa_close(name, x, r, rl, ATOL[torch.float32] * (1 if name in ("out", "lse", "mass") else 4))
