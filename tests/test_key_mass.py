"""Key-side masses (``return_key_mass=True``): every backend against the float64 reference under the FlashAttention
rule (out, mass, lse, key_mass and every gradient, a loss on key masses included), the invariant that ties them
to the row masses, and decode against a (paged) cache."""
import os
import subprocess
import sys

import pytest
import torch
from helpers import ATOL, check_against_reference, fa_close, padded_inputs, random_reweight, varlen_inputs

import avar_kernels as ak

HERE = os.path.dirname(os.path.abspath(__file__))

# cpu always; triton under the interpreter (tiny shapes) where it can run
BACKENDS = ["cpu", "triton"]

# (batch, sq, sk, hq, hk, d, causal, window, classes, reweight)
CASES = [
    (1, 17, 17, 4, 4, 32, True, None, 3, "none"),
    (2, 17, 63, 4, 2, 64, True, None, 5, "vaf"),
    (1, 63, 17, 4, 1, 32, True, None, 2, "pai"),        # sq > sk: the first rows see nothing
    (1, 33, 40, 2, 2, 80, False, (7, 3), 4, "mixed"),
    (1, 1, 45, 4, 2, 32, True, None, 6, "add"),         # decode-shaped
]


def _id(c):
    return "b{}-q{}-k{}-h{}x{}-d{}-{}-w{}-c{}-{}".format(*c[:6], "causal" if c[6] else "full", c[7], c[8], c[9])


def _skip_unavailable(backend):
    from avar_kernels import _backends

    mod = _backends.backend_module(backend)
    if not mod.is_available():
        pytest.skip(f"backend {backend} cannot run here")
    assert getattr(mod, "KEY_MASS", False), f"the {backend} backend no longer declares KEY_MASS"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_key_mass_matches_reference(case, backend):
    _skip_unavailable(backend)
    b, sq, sk, hq, hk, d, causal, window, c, rw = case
    gen = torch.Generator().manual_seed(sq * 7 + sk)
    q, k, v, kc = padded_inputs(b, sq, sk, hq, hk, d, c, gen)
    qc = torch.randint(0, c, (b, sq), generator=gen)
    kwargs = dict(query_class=qc, num_classes=c, causal=causal, window=window,
                  reweight=random_reweight(rw, hq, c, gen), return_key_mass=True)
    dtype = torch.float32 if backend == "cpu" else torch.float16
    check_against_reference(ak.attention, (q, k, v, kc), kwargs, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mass_varlen_with_empty_sequences(backend):
    _skip_unavailable(backend)
    gen = torch.Generator().manual_seed(5)
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([9, 0, 20, 4], [9, 12, 0, 30], 4, 2, 32, 4, gen)
    qc = torch.randint(0, 4, (q.shape[0],), generator=gen)
    kwargs = dict(query_class=qc, num_classes=4, causal=True, return_key_mass=True)
    dtype = torch.float32 if backend == "cpu" else torch.float16
    check_against_reference(ak.attention_varlen, (q, k, v, cu_q, cu_k, mq, mk, kc), kwargs, dtype, backend)


@pytest.mark.parametrize("backend", ["reference", "auto", "cpu"])
def test_key_mass_invariant(backend):
    """Summed over the keys of class b, key_mass[..., c] equals mass[..., b] summed over the rows of class c."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, kc = padded_inputs(2, 40, 40, 4, 2, 32, 5, gen)
    res = ak.attention(q, k, v, kc, num_classes=5, causal=True, window=(9, 0), return_key_mass=True,
                       reweight=random_reweight("mixed", 4, 5, gen), backend=backend)
    onehot = torch.nn.functional.one_hot(kc, 5).float()
    by_keys = torch.einsum("bhjc,bjd->bhcd", res.key_mass, onehot)        # [query class c, key class d]
    by_rows = torch.einsum("bhid,bic->bhcd", res.mass, onehot)
    torch.testing.assert_close(by_keys, by_rows, atol=1e-5, rtol=1e-5)
    # every row's mass sums to 1, so the key masses of a query class sum to that class's row count
    torch.testing.assert_close(res.key_mass.sum(2), onehot.sum(1)[:, None].expand(2, 4, 5), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_key_mass(paged):
    gen = torch.Generator().manual_seed(2)
    b, sq, hq, hk, d, smax = 3, 2, 4, 2, 32, 48
    q = torch.randn(b, sq, hq, d, generator=gen)
    k = torch.randn(b, smax, hk, d, generator=gen)
    v = torch.randn(b, smax, hk, d, generator=gen)
    kc = torch.randint(0, 3, (b, smax), generator=gen)
    lens = torch.tensor([17, 48, 0], dtype=torch.int32)
    kwargs = dict(num_classes=3, return_key_mass=True, return_lse=True)
    if paged:
        bs = 16
        perm = torch.randperm(b * smax // bs, generator=gen)
        table = perm.view(b, smax // bs).to(torch.int32)
        kp = torch.empty(b * smax // bs, bs, hk, d)
        vp = torch.empty_like(kp)
        kp[table.view(-1).long()] = k.view(-1, bs, hk, d)
        vp[table.view(-1).long()] = v.view(-1, bs, hk, d)
        got = ak.attention_with_kvcache(q, kp, vp, lens, kc, block_table=table, **kwargs)
    else:
        got = ak.attention_with_kvcache(q, k, v, lens, kc, **kwargs)
    assert got.key_mass.shape == (b, hq, smax, 3)
    for i, n in enumerate(lens.tolist()):
        if n == 0:
            assert (got.key_mass[i] == 0).all()
            continue
        ref = ak.attention(q[i:i + 1].double(), k[i:i + 1, :n].double(), v[i:i + 1, :n].double(), kc[i:i + 1, :n],
                           num_classes=3, causal=True, return_key_mass=True, backend="reference")
        torch.testing.assert_close(got.key_mass[i, :, :n].double(), ref.key_mass[0], atol=1e-5, rtol=1e-5)
        assert (got.key_mass[i, :, n:] == 0).all()


def test_key_mass_needs_classes():
    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="return_key_mass: needs key_class"):
        ak.attention(q, k, v, return_key_mass=True)
    with pytest.raises(TypeError, match="return_key_mass: expected a bool"):
        ak.attention(q, k, v, torch.zeros(1, 5, dtype=torch.long), return_key_mass=1)


# ----------------------------------------------------------------------------------------- the cpu backend in detail

def _cpu():
    from avar_kernels import cpu

    if not cpu.is_available():
        pytest.skip("C++ extension not built")
    return cpu


# (batch, sq, sk, hq, hk, d, causal, window, classes, reweight, dtype): odd lengths, GQA / MQA, causal or not,
# windows, every kind of table, rows that see nothing, every dtype the backend takes
CPU_CASES = [
    (1, 111, 111, 4, 2, 64, True, None, 4, "mixed", torch.float32),
    (1, 63, 63, 6, 1, 32, False, None, 3, "vaf", torch.float32),
    (2, 1, 17, 4, 4, 32, False, (3, 2), 2, "pai", torch.float32),
    (1, 100, 80, 2, 2, 32, True, (3, 2), 3, "none", torch.float32),   # rows that see nothing: key masses, no NaN
    (1, 40, 40, 2, 1, 48, True, (9, 0), 8, "add", torch.float32),
    (1, 33, 47, 4, 2, 32, True, None, 5, "mixed", torch.float64),
    (1, 45, 45, 4, 2, 64, True, None, 4, "vaf", torch.bfloat16),
]


def _cpu_id(c):
    return _id(c[:10]) + "-" + str(c[10]).replace("torch.", "")


@pytest.mark.parametrize("case", CPU_CASES, ids=_cpu_id)
def test_cpu_key_mass_cases(case):
    _cpu()
    b, sq, sk, hq, hk, d, causal, window, c, rw, dtype = case
    gen = torch.Generator().manual_seed(sq * 3 + sk + c)
    q, k, v, kc = padded_inputs(b, sq, sk, hq, hk, d, c, gen)
    qc = torch.randint(0, c, (b, sq), generator=gen)
    kwargs = dict(query_class=qc, num_classes=c, causal=causal, window=window,
                  reweight=random_reweight(rw, hq, c, gen), return_key_mass=True)
    got = check_against_reference(ak.attention, (q, k, v, kc), kwargs, dtype, "cpu")
    assert got[-1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_cpu_key_mass_varlen_windows_tables():
    """Packed sequences (empty ones on either side), GQA, a window and learned-shape tables."""
    _cpu()
    gen = torch.Generator().manual_seed(11)
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([0, 37, 5, 0, 50], [13, 40, 0, 0, 50], 6, 2, 32, 5, gen)
    qc = torch.randint(0, 5, (q.shape[0],), generator=gen)
    kwargs = dict(query_class=qc, num_classes=5, causal=True, window=(20, 0), return_key_mass=True,
                  reweight=random_reweight("mixed", 6, 5, gen))
    check_against_reference(ak.attention_varlen, (q, k, v, cu_q, cu_k, mq, mk, kc), kwargs, torch.float32, "cpu")


def _table_grads(backend, dtype, q, k, v, kc, qc, tabs, cot, window):
    """Gradients of q, k, v and of learned MUL / ABS / ADD [Hq, C, C] for a loss on out, mass, lse and key_mass."""
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    t = [tab.detach().clone().requires_grad_() for tab in tabs]
    res = ak.attention(*x, kc, query_class=qc, causal=True, window=window, reweight=ak.Reweight(*t),
                       return_lse=True, return_key_mass=True, backend=backend)
    dout, dmass, dlse, dkm = cot
    loss = ((res.out.double() * dout).sum() + (res.mass.double() * dmass).sum()
            + (res.lse.double().nan_to_num(0, 0, 0) * dlse).sum() + (res.key_mass.double() * dkm).sum())
    return torch.autograd.grad(loss, x + t)


@pytest.mark.parametrize("window", [None, (17, 0)])
def test_cpu_key_mass_table_gradients(window):
    """dq, dk, dv and the gradients of learned MUL / ABS / ADD with a loss on out, mass, lse and key_mass together."""
    _cpu()
    gen = torch.Generator().manual_seed(4)
    b, s, hq, hk, d, c = 2, 57, 4, 2, 32, 4
    q, k, v, kc = padded_inputs(b, s, s, hq, hk, d, c, gen)
    qc = torch.randint(0, c, (b, s), generator=gen)
    tabs = [0.3 * torch.randn(hq, c, c, generator=gen) for _ in range(3)]
    cot = (torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64),
           torch.randn(b, hq, s, c, generator=gen, dtype=torch.float64),
           torch.randn(b, hq, s, generator=gen, dtype=torch.float64),
           torch.randn(b, hq, s, c, generator=gen, dtype=torch.float64))
    args = (q, k, v, kc, qc, tabs, cot, window)
    ref64 = _table_grads("reference", torch.float64, *args)
    ref32 = _table_grads("reference", torch.float32, *args)
    got = _table_grads("cpu", torch.float32, *args)
    for name, g, r, rl in zip(("dq", "dk", "dv", "dmul", "dabs", "dadd"), got, ref64, ref32):
        fa_close(name, g, r, rl, 4 * ATOL[torch.float32])


def test_cpu_key_mass_nan_propagates():
    """A NaN in one query row: that row's class column of the key masses is NaN on every key the row sees (a
    diverging run shows NaN, never a plausible heatmap), other heads and sequences stay finite, and the gradients of a
    key-mass loss are NaN only where the float64 reference's are."""
    _cpu()
    gen = torch.Generator().manual_seed(8)
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([30, 20], [30, 20], 2, 2, 16, 3, gen)
    qc = torch.randint(0, 3, (50,), generator=gen)
    q[12, 1, 3] = float("nan")  # sequence 0, row 12, head 1: sees keys 0..12 (causal)
    dkm = torch.randn(2, 50, 3, generator=gen, dtype=torch.float64)

    def run(backend, dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        res = ak.attention_varlen(*x, cu_q, cu_k, mq, mk, kc, query_class=qc, causal=True, return_key_mass=True,
                                  backend=backend)
        (res.key_mass.double().transpose(0, 1) * dkm).sum().backward()  # a NaN loss: its gradient dkm is finite
        return [res.key_mass.detach()] + [t.grad for t in x[:2]]  # key masses do not depend on v

    got, ref = run("cpu", torch.float32), run("reference", torch.float64)
    km = got[0]  # [Tk, Hq, C]
    assert torch.isnan(km[:13, 1, qc[12]]).all()
    assert torch.isfinite(km[:, 0]).all() and torch.isfinite(km[30:]).all() and torch.isfinite(km[13:30]).all()
    for name, x, r in zip(("key_mass", "dq", "dk"), got, ref):
        nan, ref_nan = torch.isnan(x), torch.isnan(r)
        assert not (nan & ~ref_nan).any(), f"{name}: NaN where the reference is finite"
        assert nan.any(), name
    for name, x, r in zip(("dq", "dk"), got[1:3], ref[1:3]):
        assert torch.equal(torch.isnan(x), torch.isnan(r)), f"{name}: NaN pattern differs from the reference"


def _contract_case(seqs, hq, hk, d, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + torch.tensor([a for a, _ in seqs], dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor([b for _, b in seqs], dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = (torch.randn(t, h, d, generator=g) for t, h in ((tq, hq), (tk, hk), (tk, hk)))
    kc = torch.randint(0, c, (tk,), generator=g, dtype=torch.int32)
    qc = torch.randint(0, c, (tq,), generator=g, dtype=torch.int32)
    mul = 0.3 * torch.randn(hq, c, c, generator=g)
    static = (cu_q, cu_k, max([a for a, _ in seqs], default=0), max([b for _, b in seqs], default=0), kc, qc, c, mul,
              None, None, d ** -0.5, -1, 0)
    return q, k, v, static


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cpu_key_mass_contract(dtype):
    """Backend level: key masses leave out / lse / mass bit for bit as they were, come in float32 (float64 for
    float64 inputs); a zero dkey_mass changes no gradient bit, and the caller's delta is left alone."""
    cpu = _cpu()
    q, k, v, static = _contract_case([(70, 70), (0, 9), (20, 45)], 4, 2, 32, 3)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    plain = cpu.forward(q, k, v, *static)
    out, lse, mass, km = cpu.forward(q, k, v, *static, key_mass=True)
    for a, b in zip(plain, (out, lse, mass)):
        assert torch.equal(a, b)
    assert km.shape == (4, k.shape[0], 3) and km.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (km[:, 70:79] == 0).all()  # keys of a sequence without queries
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dmass = torch.randn(mass.shape, generator=g, dtype=mass.dtype)
    delta = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    kept = delta.clone()
    base = cpu.backward(dout, dmass, delta, q, k, v, out, lse, *static, table_grads=(True, False, False))
    zero = cpu.backward(dout, dmass, delta, q, k, v, out, lse, *static, table_grads=(True, False, False),
                        dkey_mass=torch.zeros_like(km))
    for a, b in zip(base, zero):
        assert torch.equal(a, b)
    ones = cpu.backward(dout, dmass, delta, q, k, v, out, lse, *static, dkey_mass=torch.ones_like(km))
    # dkm = 1 everywhere adds 1 to every dP and, rows summing to 1, 1 to every delta: dZ' and the gradients unchanged
    for a, b in zip(base[:3], ones):
        torch.testing.assert_close(a, b, atol=1e-2 if dtype == torch.float16 else 1e-5, rtol=1e-3)
    assert torch.equal(delta, kept)


@pytest.mark.parametrize("seqs", [[(0, 5)], [(3, 0), (0, 0)], [(0, 7), (4, 4)]], ids=["tq0", "tk0", "mixed"])
def test_cpu_key_mass_empty_sequences(seqs):
    """Every key mass is written (the outputs start as NaN under the test's poisoned torch.empty): 0 where no row
    sees the key."""
    cpu = _cpu()
    q, k, v, static = _contract_case(seqs, 4, 2, 8, 3)
    out, lse, mass, km = cpu.forward(q, k, v, *static, key_mass=True)
    assert km.shape == (4, k.shape[0], 3) and not torch.isnan(km).any()
    first = seqs[0][1] if seqs[0][0] == 0 else 0
    assert (km[:, :first] == 0).all()
    dq, dk, dv = cpu.backward(torch.ones_like(out), torch.ones_like(mass), torch.zeros_like(lse), q, k, v, out, lse,
                              *static, dkey_mass=torch.ones_like(km))
    assert not any(torch.isnan(t).any() for t in (dq, dk, dv))


def _contract_large_logits(dtype, seqs=((40, 71), (60, 35), (50, 50)), wl=-1, wr=0, logit=300.0):
    """Backend level, |z| ~ logit: (out, lse, mass, key_mass, dq, dk, dv) for a loss on all four outputs; delta
    formed in float64 as the contract allows, so that only the kernel's own rounding is measured."""
    from avar_kernels import cpu, reference

    gen = torch.Generator().manual_seed(31)
    q, k, v, static = _contract_case(list(seqs), 4, 2, 32, 4, seed=5)
    q, k = q.double() * logit ** 0.5, k.double() * logit ** 0.5
    v = v.double()
    static = static[:10] + (32 ** -0.5, wl, wr)
    cot = [torch.randn(s, generator=gen, dtype=torch.float64)  # for out, lse, mass, key_mass
           for s in (q.shape, (4, q.shape[0]), (4, q.shape[0], 4), (4, k.shape[0], 4))]
    if dtype == "cpu":
        out, lse, mass, km = cpu.forward(q.float(), k.float(), v.float(), *static, key_mass=True)
        dout, dlse, dmass, dkm = cot
        dlse = torch.where(torch.isinf(lse), 0, dlse)  # rows without keys (lse = -inf) carry no lse gradient
        delta = (dout * out.double()).sum(-1).T + (dmass * mass.double()).sum(-1) - dlse
        grads = cpu.backward(dout.float(), dmass.float(), delta.float(), q.float(), k.float(), v.float(), out, lse,
                             *static, dkey_mass=dkm.float())
        return (out, lse, mass, km, *grads)
    x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    outs = reference.forward(*x, *static, key_mass=True)
    loss = sum((torch.where(torch.isinf(o), 0, o).double() * c).sum() for o, c in zip(outs, cot))
    return (*(o.detach() for o in outs), *torch.autograd.grad(loss, x))


def tile_check():
    """Run in a subprocess with small tiles (AVAR_CPU_QBLOCK / AVAR_CPU_KBLOCK, read at load time): the multi-tile
    paths of the key-mass pass and of its backward through the public API, then large logits (|z| ~ 300) where the
    key-mass pass and the backward must recompute the forward's scores bit for bit (a one-ulp difference moves
    P = exp(z' - lse) by |z| * 2^-24)."""
    gen = torch.Generator().manual_seed(21)
    for sq, sk, window, rw in ((45, 45, None, "mixed"), (40, 71, (30, 4), "vaf"), (60, 35, None, "none")):
        q, k, v, kc = padded_inputs(1, sq, sk, 2, 1, 32, 4, gen)
        qc = torch.sort(torch.randint(0, 4, (1, sq), generator=gen)).values  # runs and mixed tiles
        kwargs = dict(query_class=qc, num_classes=4, causal=True, window=window,
                      reweight=random_reweight(rw, 2, 4, gen), return_key_mass=True)
        check_against_reference(ak.attention, (q, k, v, kc), kwargs, torch.float32, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([33, 0, 50], [40, 9, 50], 4, 1, 16, 3, gen)
    qc = torch.randint(0, 3, (q.shape[0],), generator=gen)
    kwargs = dict(query_class=qc, num_classes=3, causal=False, window=(25, 25), return_key_mass=True)
    check_against_reference(ak.attention_varlen, (q, k, v, cu_q, cu_k, mq, mk, kc), kwargs, torch.float32, "cpu")
    for wl, wr in ((-1, 0), (20, 3)):
        got = _contract_large_logits("cpu", wl=wl, wr=wr)
        ref64 = _contract_large_logits(torch.float64, wl=wl, wr=wr)
        ref32 = _contract_large_logits(torch.float32, wl=wl, wr=wr)
        for name, g, r, rl in zip(("out", "lse", "mass", "key_mass", "dq", "dk", "dv"), got, ref64, ref32):
            fa_close(name, g, r, rl, ATOL[torch.float32] * (1 if name in ("out", "lse", "mass", "key_mass") else 4))


def test_cpu_key_mass_small_tiles():
    """7 x 13 tiles: many tiles per row and per key, partial vectors, tiles cut by the causal edge and the window
    (the default tiles run the same checks through the other tests; more sizes: run tile_check by hand)."""
    _cpu()
    env = {**os.environ, "AVAR_CPU_QBLOCK": "7", "AVAR_CPU_KBLOCK": "13"}
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_key_mass as t; t.tile_check()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_cpu_key_mass_portable_build(monkeypatch):
    """The portable build (what a CPU without AVX2 runs): key masses and their gradients, where both builds exist."""
    cpu = _cpu()
    portable = pytest.importorskip("avar_kernels._C")
    if cpu.VARIANT == "_C":
        pytest.skip("the portable build is the one in use: the other tests cover it")
    monkeypatch.setattr(cpu, "_C", portable)
    gen = torch.Generator().manual_seed(6)
    q, k, v, kc = padded_inputs(1, 70, 70, 4, 2, 40, 5, gen)
    qc = torch.randint(0, 5, (1, 70), generator=gen)
    kwargs = dict(query_class=qc, num_classes=5, causal=True, window=(30, 0), return_key_mass=True,
                  reweight=random_reweight("mixed", 4, 5, gen))
    check_against_reference(ak.attention, (q, k, v, kc), kwargs, torch.float32, "cpu")
