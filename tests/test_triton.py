"""Triton backend against the float64 reference (SPEC 6, the FlashAttention rule).

Without CUDA the kernels run under TRITON_INTERPRET=1 (set here before triton is imported) at small shapes,
in fp16/fp32 (bf16 tl.dot is wrong in the interpreter). Tests marked gpu run a bigger matrix in bf16/fp16.
Each case calls avar_kernels.triton.forward/backward directly, with delta computed as in docs/backends.md,
and compares out, lse, mass, dq, dk, dv with the reference (autograd) run in float64, allowing twice the
error of the reference run in the kernel's dtype plus a small atol.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# one launch config per kernel specialization: tests check results, not speed, and compiles dominate their time
os.environ.setdefault("AVAR_TRITON_AUTOTUNE", "0")

triton = pytest.importorskip("triton")

from helpers import fa_close  # noqa: E402

import avar_kernels.triton as T  # noqa: E402
from avar_kernels import reference as R  # noqa: E402
from avar_kernels.triton import configs as TC  # noqa: E402
from avar_kernels.triton import fwd as TF  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not TF.INTERPRET:
    pytest.skip("avar_kernels.triton.fwd was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def fa_check(name, got, ref64, ref_lowp, atol):
    """The FlashAttention rule of tests/helpers.py with atol relative to the reference's largest magnitude."""
    got, ref64, ref_lowp = got.cpu(), ref64.cpu(), ref_lowp.cpu()
    fin = torch.isfinite(ref64)
    scale = max(1.0, ref64[fin].abs().max().item()) if fin.any() else 1.0
    fa_close(name, got, ref64, ref_lowp, atol * scale)


def class_ids(n, c, layout, gen):
    """int32 [n] class ids: 'random' per token, or 'runs' of 1..40 tokens (a VLM prompt's spans: most key blocks of
    the interpreter's 16 keys have one class, some two or more)."""
    if layout == "random":
        return torch.randint(0, c, (n,), generator=gen, dtype=torch.int32)
    lengths = torch.randint(4, 49, (n,), generator=gen)
    classes = torch.randint(0, c, (n,), generator=gen, dtype=torch.int32)
    return classes.repeat_interleave(lengths)[:n]


def make_case(lq, lk, hq, hk, d, c, rw, dtype, gen, device=DEV, layout="random"):
    cq = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=device)
    ck = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=device)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(tk, hk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(tk, hk, d, generator=gen, dtype=torch.float64)
    kc = class_ids(tk, c, layout, gen).to(device) if c else None
    qc = class_ids(tq, c, layout, gen).to(device) if c else None
    tabs = {}
    for name in ("mul", "abs", "add"):
        on = rw == name or rw == "mixed"
        amp = {"mul": 0.3, "abs": 0.2, "add": 1.0}[name]
        tabs[name] = (amp * torch.randn(hq, c, c, generator=gen)).to(device) if on and c else None
    return (q, k, v), (cq, ck, max(lq), max(lk), kc, qc, c, tabs["mul"], tabs["abs"], tabs["add"])


def run_case(lq, lk, hq, hk, d, c, causal=False, window=None, rw="none", dtype=torch.float32, seed=0,
             backward=True, device=DEV, out_fp32=False, poison=None, layout="random", key_mass=False):
    """Forward (and backward) against the float64 reference; returns [out, lse, mass(, dq, dk, dv)] (with
    ``key_mass``: key_mass after mass, and a loss on it in the backward).
    poison(q, k, v) edits the float64 inputs in place (non-finite values): then out, lse and mass must be NaN exactly
    where the reference's are, and a gradient has NaN when the reference's has (the exact entries differ: the
    reference's dense products also reach masked scores through 0 * NaN, the kernel's visit key blocks); entries
    finite in both obey the rule."""
    gen = torch.Generator().manual_seed(seed)
    (q64, k64, v64), meta = make_case(lq, lk, hq, hk, d, c, rw, dtype, gen, device, layout)
    if poison is not None:
        poison(q64, k64, v64)
    wl, wr = window if window is not None else (-1, 0 if causal else -1)
    args = meta + (d ** -0.5, wl, wr)
    tq = q64.shape[0]
    dout = torch.randn(q64.shape, generator=gen, dtype=torch.float64).to(device)
    dmass = torch.randn(hq, tq, c, generator=gen, dtype=torch.float64).to(device) if c else None
    dlse = torch.randn(hq, tq, generator=gen, dtype=torch.float64).to(device)
    dkm = torch.randn(hq, k64.shape[0], c, generator=gen, dtype=torch.float64).to(device) if key_mass else None

    def reference(dt):
        q, k, v = (t.to(device=device, dtype=dt).requires_grad_(True) for t in (q64, k64, v64))
        res = R.forward(q, k, v, *args, key_mass=key_mass)
        out, lse, mass = res[:3]
        loss = (out.double() * dout).sum()
        fin = torch.isfinite(lse)
        if fin.all():  # the reference's logsumexp has NaN gradients on empty rows: no dlse there
            loss = loss + (lse.double() * dlse).sum()
        if c:
            loss = loss + (mass.double() * dmass).sum()
        if key_mass:
            loss = loss + (res[3].double() * dkm).sum()
        kms = [res[3]] if key_mass else []
        if not backward:
            return [out, lse, mass] + kms + [None, None, None]
        dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
        return [out, lse, mass] + kms + [dq, dk, dv]

    ref64 = reference(torch.float64)
    ref_lp = reference(dtype)
    has_empty = not torch.isfinite(ref64[1]).all()

    q, k, v = (t.to(device=device, dtype=dtype) for t in (q64, k64, v64))
    res = T.forward(q, k, v, *args, out_fp32=out_fp32, **({"key_mass": True} if key_mass else {}))
    out, lse, mass = res[:3]
    assert out.dtype == (torch.float32 if out_fp32 else dtype)
    assert lse.dtype == torch.float32 and mass.dtype == torch.float32
    assert lse.shape == (hq, tq) and mass.shape == (hq, tq, c)
    got = [out, lse, mass]
    if key_mass:
        assert len(res) == 4 and res[3].dtype == torch.float32 and res[3].shape == (hq, k.shape[0], c)
        got.append(res[3])
    if backward:
        do = dout.to(dtype)
        dl = torch.zeros_like(dlse) if has_empty else dlse
        delta = (do.float() * out.float()).sum(-1).transpose(0, 1) - dl.float()
        if c:
            delta = delta + (dmass.float() * mass).sum(-1)
        kw = {"dkey_mass": dkm.float()} if key_mass else {}
        dq, dk, dv = T.backward(do, dmass.float() if c else None, delta.contiguous(), q, k, v, out, lse, *args, **kw)
        assert dq.dtype == dtype and dk.shape == k.shape and dv.shape == v.shape
        got += [dq, dk, dv]
    names = ("out", "lse", "mass") + (("key_mass",) if key_mass else ()) + ("dq", "dk", "dv")
    for name, g, r64, rlp in zip(names, got, ref64, ref_lp):
        atol = ATOL[dtype] * (1 if name in ("out", "lse", "mass", "key_mass") else 4)
        if poison is not None:
            nan, got_nan = torch.isnan(r64).cpu(), torch.isnan(g).cpu()
            if name in ("out", "lse", "mass"):
                assert torch.equal(got_nan, nan), f"{name}: NaN differs from the reference's"
            else:
                assert got_nan.any() == nan.any(), f"{name}: NaN differs from the reference's"
            g, r64, rlp = (t.cpu().masked_fill(nan | got_nan, 0) for t in (g, r64, rlp))
        fa_check(name, g, r64, rlp, atol)
    return got


# ------------------------------------------------------------------------------------------------------
# Interpreter / any-device tests (small shapes)
# ------------------------------------------------------------------------------------------------------

CASES = [
    # lq, lk, hq, hk, d, c, causal, window, rw, dtype
    ([17, 1, 40], [63, 17, 40], 4, 4, 64, 3, True, None, "none", torch.float32),
    ([1, 17], [63, 63], 8, 2, 32, 8, False, None, "mul", torch.float16),
    ([17, 63], [63, 17], 6, 1, 80, 1, False, (5, 0), "abs", torch.float32),
    ([33], [33], 4, 4, 96, 3, False, None, "add", torch.float16),
    ([24, 9], [31, 9], 8, 2, 128, 8, True, None, "mixed", torch.float32),
    ([20, 5], [20, 40], 4, 2, 64, 0, True, None, "none", torch.float16),
    ([30], [45], 4, 2, 32, 3, False, (4, 6), "mixed", torch.float16),
    ([40], [40], 2, 1, 64, 4, False, (-1, 3), "none", torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}-{c[3]}d{c[4]}c{c[5]}"
                         f"{'causal' if c[6] else ''}w{c[7]}{c[8]}-{str(c[9])[6:]}")
def test_fwd_bwd(case):
    lq, lk, hq, hk, d, c, causal, window, rw, dtype = case
    run_case(lq, lk, hq, hk, d, c, causal, window, rw, dtype)


RUN_CASES = [
    # lq, lk, hq, hk, d, c, causal, window, rw, dtype: classes in runs (one-class key blocks and mixed ones)
    ([70, 9], [90, 40], 4, 2, 32, 3, True, None, "mixed", torch.float32),
    ([64], [64], 2, 1, 64, 5, False, None, "mul", torch.float16),
    ([50, 33], [50, 60], 4, 2, 32, 4, False, (20, 5), "abs", torch.float16),
    ([40], [75], 2, 2, 32, 2, True, None, "add", torch.float32),
    ([48], [48], 2, 1, 32, 3, True, None, "none", torch.float16),
]


@pytest.mark.parametrize("mass_dot", [True, False], ids=["dot", "loop"])
@pytest.mark.parametrize("case", RUN_CASES, ids=lambda c: f"q{c[0]}k{c[1]}c{c[5]}w{c[7]}{c[8]}-{str(c[9])[6:]}")
def test_class_runs(case, mass_dot, monkeypatch):
    """Class runs longer than a block: the one-class fast paths (row sums for masses, per-row table factors, dmass
    folded into delta) next to the mixed blocks' one-hot products and table lookups."""
    monkeypatch.setattr(TF, "MASS_DOT", mass_dot)
    lq, lk, hq, hk, d, c, causal, window, rw, dtype = case
    run_case(lq, lk, hq, hk, d, c, causal, window, rw, dtype, seed=5, layout="runs")


def test_class_runs_packing():
    """class_runs: distance to the end of the class run within the sequence, times CLASS_TILE, plus the class."""
    kc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0, 1], dtype=torch.int32)
    cu = torch.tensor([0, 10, 13, 13], dtype=torch.int32)
    runs = TF.class_runs(kc, cu)
    assert (runs // TF.CLASS_TILE.value).tolist() == [3, 2, 1, 2, 1, 4, 3, 2, 1, 1, 2, 1, 1]
    assert torch.equal(runs % TF.CLASS_TILE.value, kc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_rows(dtype):
    """sq > sk with causal: the first sq - sk rows see nothing: out 0, mass 0, lse -inf, no NaN."""
    got = run_case([40, 3], [17, 3], 4, 2, 64, 3, causal=True, rw="mixed", dtype=dtype)
    out, lse, mass = got[:3]
    assert torch.isneginf(lse[:, :23]).all() and torch.isfinite(lse[:, 23:]).all()
    assert (out[:23] == 0).all() and (mass[:, :23] == 0).all()
    for g in got[3:]:
        assert torch.isfinite(g).all()


def test_empty_sequence_and_left_window():
    # a sequence with no keys, a sequence with no queries, and a left-only window
    run_case([5, 0, 20], [0, 7, 20], 2, 1, 32, 2, window=(3, -1), rw="mul")


def test_out_fp32():
    """out_fp32: the unrounded output in float32 (its rounding is the fp16 output, bit for bit); delta formed from it
    gives gradients within the rule."""
    got = run_case([24, 9], [31, 9], 4, 2, 32, 3, causal=True, rw="mixed", dtype=torch.float16, out_fp32=True)
    gen = torch.Generator().manual_seed(0)
    (q, k, v), meta = make_case([24, 9], [31, 9], 4, 2, 32, 3, "mixed", torch.float16, gen)
    out16 = T.forward(q.half().to(DEV), k.half().to(DEV), v.half().to(DEV), *meta, 32 ** -0.5, -1, 0)[0]
    assert torch.equal(got[0].half(), out16)
    assert not torch.equal(got[0], out16.float())


def _set(tensor, index, value):
    def poison(q, k, v):
        {"q": q, "k": k, "v": v}[tensor][index] = value
    return poison


@pytest.mark.parametrize("poison", [_set("q", (3, 1, 5), float("nan")), _set("k", (7, 0, 2), float("nan")),
                                    _set("k", (30, 1, 0), float("inf")), _set("q", (25, 2, 0), float("-inf"))],
                         ids=["q-nan", "k-nan", "k-inf", "q-neginf"])
def test_nonfinite_inputs_propagate(poison):
    """NaN / inf in q or k gives NaN exactly where the float64 reference has it (out, lse, mass, dq, dk, dv), never
    the zeros of an empty row; everything else stays within the rule."""
    run_case([20, 9], [31, 9], 4, 2, 32, 3, causal=True, rw="mul", poison=poison)


@pytest.mark.parametrize("c", [1, 3, 8])
def test_masses_loop_variant(c, monkeypatch):
    """The reduction (non-product) formulation of the masses and of the dmass term."""
    monkeypatch.setattr(TF, "MASS_DOT", False)
    run_case([17, 8], [25, 30], 4, 2, 32, c, causal=True, rw="mixed", dtype=torch.float32)


def test_masses_sum_to_one():
    got = run_case([33], [33], 2, 2, 64, 5, backward=False)
    torch.testing.assert_close(got[2].sum(-1), torch.ones_like(got[2][..., 0]), atol=1e-5, rtol=0)


def test_head_dim_256():
    run_case([17], [20], 2, 1, 256, 3, causal=True, rw="mul", dtype=torch.float16)


def test_block_boundaries_causal_long():
    # several key blocks on both sides of the diagonal (interpreter blocks are 16)
    run_case([70], [70], 2, 2, 32, 3, causal=True, dtype=torch.float32)


def test_zero_reweight_equals_plain():
    gen = torch.Generator().manual_seed(3)
    (q, k, v), meta = make_case([30], [30], 2, 2, 32, 3, "none", torch.float32, gen)
    q, k, v = (t.float().to(DEV) for t in (q, k, v))
    z = torch.zeros(2, 3, 3, device=DEV)
    a = T.forward(q, k, v, *meta, 32 ** -0.5, -1, 0)
    b = T.forward(q, k, v, *meta[:7], z, z, z, 32 ** -0.5, -1, 0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Key masses (issue 11): forward and every gradient, a loss on key masses included
# ------------------------------------------------------------------------------------------------------

KEY_MASS_CASES = [
    # lq, lk, hq, hk, d, c, causal, window, rw, dtype, layout
    ([17, 1, 21], [30, 17, 21], 4, 2, 32, 3, True, None, "mixed", torch.float32, "random"),  # GQA, Sq != Sk
    ([19], [23], 2, 1, 48, 4, False, None, "none", torch.float16, "random"),  # D not a power of two
    ([33], [37], 4, 2, 32, 3, False, (6, 4), "abs", torch.float16, "runs"),  # window, one-class blocks
    ([5, 0, 20], [0, 7, 20], 2, 1, 32, 2, False, (3, -1), "mul", torch.float32, "random"),  # empty sequences
    ([40, 3], [17, 3], 4, 2, 32, 3, True, None, "add", torch.float32, "runs"),  # sq > sk: rows without keys
]


@pytest.mark.parametrize("case", KEY_MASS_CASES, ids=lambda c: f"q{c[0]}k{c[1]}h{c[2]}-{c[3]}d{c[4]}c{c[5]}"
                         f"{'causal' if c[6] else ''}w{c[7]}{c[8]}-{str(c[9])[6:]}-{c[10]}")
def test_key_mass(case):
    """key_mass [Hq, Tk, C] and dq, dk, dv of a loss on out, lse, mass and key_mass against the float64 reference;
    keys no row sees (an empty query sequence, outside the window) get 0."""
    lq, lk, hq, hk, d, c, causal, window, rw, dtype, layout = case
    got = run_case(lq, lk, hq, hk, d, c, causal, window, rw, dtype, seed=11, layout=layout, key_mass=True)
    assert all(torch.isfinite(g).all() for g in got[3:])


@pytest.mark.parametrize("c", [1, 5])
def test_key_mass_loop_variant(c, monkeypatch):
    """The reduction (non-product) formulation of the key masses and of the dKM term (CP < 16 there)."""
    monkeypatch.setattr(TF, "MASS_DOT", False)
    run_case([17, 8], [25, 30], 4, 2, 32, c, causal=True, rw="mixed", key_mass=True)


def test_key_mass_invariant_and_plain_outputs():
    """Summed over the keys of class b, key_mass[..., a] equals mass[..., b] summed over the rows of class a; out,
    lse and mass are those of the forward without key masses, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    (q, k, v), meta = make_case([21, 30], [21, 35], 4, 2, 32, 4, "mixed", torch.float32, gen)
    q, k, v = (t.float().to(DEV) for t in (q, k, v))
    args = meta + (32 ** -0.5, 9, 0)
    out, lse, mass, km = T.forward(q, k, v, *args, key_mass=True)
    for x, y in zip(T.forward(q, k, v, *args), (out, lse, mass)):
        assert torch.equal(x, y)
    kc, qc, c = meta[4].long(), meta[5].long(), meta[6]
    by_keys = torch.einsum("hja,jb->hab", km.double(), torch.nn.functional.one_hot(kc, c).double())
    by_rows = torch.einsum("hib,ia->hab", mass.double(), torch.nn.functional.one_hot(qc, c).double())
    torch.testing.assert_close(by_keys, by_rows, atol=1e-5, rtol=1e-5)


def test_key_mass_table_grads():
    """Learned tables under a loss on key masses (through the public API and its dispatcher): d MUL / ABS / ADD and
    dq, dk, dv against the float64 reference."""
    form, lq, lk, hq, hk, d, c, zero, names, layout = TABLE_CASES[1]
    qkv, meta, tabs, up = _table_case(form, lq, lk, hq, hk, d, c, zero, seed=9, layout=layout)
    dkm = torch.randn(hq, qkv[1].shape[0], c, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _table_grads_api(qkv, meta, tabs, up, torch.float64, "reference", names, dkm)
    got = _table_grads_api(qkv, meta, tabs, up, torch.float32, "triton", names, dkm)
    for n in names + ("q", "k", "v"):
        scale = max(ref[n].abs().max().item(), 1.0)
        torch.testing.assert_close(got[n].double().cpu(), ref[n].double().cpu(), atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("arch", sorted(TC.SMEM_LIMIT))
def test_configs_fit_shared_memory(arch):
    """Every kept launch config fits the architecture's shared memory by the estimate; the D=128 forward with masses
    starts with the config measured fastest (128 x 64, 8 warps, 3 stages), and on sm_90 drops 128 x 128 (234,496 B
    compiled, over the limit)."""
    limit = TC.SMEM_LIMIT[arch]
    for kernel in ("fwd", "dq", "dkdv", "km", "kmd"):
        for block_d in (64, 128, 256):
            for has_classes, tables, has_km in ((False, 0, False), (True, 0, False), (True, 1, False),
                                                (True, 3, False), (True, 0, True), (True, 1, True), (True, 3, True)):
                for row in TC.kept_rows(kernel, block_d, "tf32", has_classes, tables, 2, arch, limit, has_km):
                    need = TC.smem_estimate(kernel, row, block_d, 2, has_classes, tables, arch, has_km)
                    assert need <= limit, (kernel, block_d, has_classes, tables, has_km, row, need)
    kept = TC.kept_rows("fwd", 128, "tf32", True, 0, 2, arch, limit)
    assert kept[0] == (128, 64, 8, 3)
    # D=256 forward and dQ: 128 x 32 on 8 warps on sm_90 (wgmma), 64 x 32 on 8 warps before (mma.sync; no spills)
    for kernel in ("fwd", "dq"):
        assert TC.kept_rows(kernel, 256, "tf32", True, 0, 2, arch, limit)[0] == ((128, 32, 8, 2) if arch >= 90
                                                                                 else (64, 32, 8, 2))
    assert (128, 128, 8, 3) not in kept


def test_mass_forms_double_the_tuned_configs(monkeypatch):
    """With classes the autotuner times each config in both formulations of the class terms (MASS_DOT); without
    tuning it takes the first formulation (the row sums) only; the interpreter passes MASS_DOT itself."""
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
               triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)]
    monkeypatch.setenv("AVAR_TRITON_AUTOTUNE", "2")
    forms = TC.with_mass_forms(configs, (False, True))
    assert [(c.kwargs["BLOCK_M"], c.kwargs["MASS_DOT"]) for c in forms] == [(128, False), (128, True), (64, False),
                                                                           (64, True)]
    assert all(f.num_warps == c.num_warps and f.num_stages == c.num_stages
               for f, c in zip(forms, [configs[0], configs[0], configs[1], configs[1]]))
    monkeypatch.setenv("AVAR_TRITON_AUTOTUNE", "0")
    assert [c.kwargs["MASS_DOT"] for c in TC.with_mass_forms(configs[:1], (False, True))] == [False]
    assert TC.with_mass_forms(configs, ()) == configs
    assert TF.mass_dot_choices(True) == (() if TF.INTERPRET else (False, True))
    assert TF.mass_dot_choices(False) == ()
    monkeypatch.setattr(TF, "MASS_DOT", False)
    assert TF.mass_dot_choices(True) == () and TF.mass_dot_value() is False


def test_query_blocks_limit_is_a_clear_error():
    """Query and key blocks lie on grid axis 2 (65,535 programs): a longer sequence is refused by name, not
    launched."""
    q = torch.zeros(4, 2, 32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        T.forward(q, q, q, cu, cu, TF.MAX_SEQLEN + 1, 4, None, None, 0, None, None, None, 0.1, -1, 0)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        T.backward(q, None, torch.zeros(2, 4), q, q, q, q, torch.zeros(2, 4), cu, cu, 4, TF.MAX_SEQLEN + 1, None, None,
                   0, None, None, None, 0.1, -1, 0)


# ------------------------------------------------------------------------------------------------------
# GPU matrix (bf16 / fp16, SPEC 6 shapes)
# ------------------------------------------------------------------------------------------------------

GPU_LENS = [([1], [1000]), ([17], [63]), ([111], [111]), ([1000], [1000]), ([63, 1, 111, 1000], [63, 17, 111, 1000])]
GPU_HEADS = [(4, 4), (8, 2), (6, 1)]
# (causal, C, reweight, window): cycled with the lengths and head layouts so that each (dtype, D) compiles only
# a handful of kernel specializations
GPU_MODES = [(True, 4, "none", None), (False, 0, "none", None), (True, 8, "mixed", None), (False, 3, "mul", (64, 16)),
             (True, 1, "abs", None)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 256])
def test_gpu_matrix(dtype, d):
    for i, (lq, lk) in enumerate(GPU_LENS):
        for j in range(2):
            causal, c, rw, window = GPU_MODES[(i + j) % len(GPU_MODES)]
            hq, hk = GPU_HEADS[(i + 2 * j) % len(GPU_HEADS)]
            run_case(lq, lk, hq, hk, d, c, causal, window, rw, dtype, seed=i, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mass_dot", [True, False])
def test_gpu_fp32_and_variants(mass_dot, monkeypatch):
    monkeypatch.setattr(TF, "MASS_DOT", mass_dot)
    run_case([300, 77], [300, 500], 8, 2, 128, 6, True, None, "mixed", torch.float32, device="cuda")
    run_case([1000, 1], [1000, 1000], 8, 2, 64, 4, True, None, "none", torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_key_mass(dtype, d):
    """Key masses and their gradients on a GPU (the compiled kernels, autotuning off): GQA, causal and windowed,
    re-weighting, class runs and random classes, varlen with an empty sequence."""
    run_case([1000, 63, 1], [1000, 111, 0], 8, 2, d, 5, True, None, "mixed", dtype, device="cuda", layout="runs",
             key_mass=True)
    run_case([111, 300], [300, 300], 6, 1, d, 3, False, (64, 16), "mul", dtype, seed=1, device="cuda",
             key_mass=True)


@pytest.mark.gpu
def test_gpu_key_mass_autotuned():
    """The autotuned key-mass kernels (the delta kernel writes a new buffer, so autotune trials leave delta alone)."""
    os.environ["AVAR_TRITON_AUTOTUNE"] = "2"
    try:
        run_case([2048, 700], [2048, 900], 8, 2, 128, 4, True, None, "mul", torch.bfloat16, device="cuda",
                 layout="runs", key_mass=True)
    finally:
        os.environ["AVAR_TRITON_AUTOTUNE"] = "0"


@pytest.mark.gpu
def test_gpu_autotuned_long():
    """The autotuned path (as used in production) at a longer causal bf16 shape with masses, GQA."""
    os.environ["AVAR_TRITON_AUTOTUNE"] = "2"
    try:
        run_case([2048, 700], [2048, 900], 8, 2, 128, 4, True, None, "none", torch.bfloat16, device="cuda")
    finally:
        os.environ["AVAR_TRITON_AUTOTUNE"] = "0"


# ------------------------------------------------------------------------------------------------------
# Gradients of learned re-weighting tables (interpreter / any device)
# ------------------------------------------------------------------------------------------------------

def _table_case(form, lq, lk, hq, hk, d, c, zero, seed, layout="random"):
    gen = torch.Generator().manual_seed(seed)
    (q, k, v), meta = make_case(lq, lk, hq, hk, d, c, "none", torch.float64, gen, "cpu", layout)
    shape = {"c": (c,), "cc": (c, c), "hcc": (hq, c, c)}[form]
    amp = {"mul": 0.3, "abs": 0.2, "add": 1.0}
    tabs = {n: torch.zeros(shape, dtype=torch.float64) if n in zero
            else amp[n] * torch.randn(shape, generator=gen, dtype=torch.float64) for n in ("mul", "abs", "add")}
    tq = q.shape[0]
    up = (torch.randn(tq, hq, d, generator=gen, dtype=torch.float64), torch.randn(hq, tq, c, generator=gen,
          dtype=torch.float64), torch.randn(hq, tq, generator=gen, dtype=torch.float64))
    return (q, k, v), meta, tabs, up


def _table_grads_api(qkv, meta, tabs, up, dtype, backend, names, dkey_mass=None):
    import avar_kernels as ak
    cq, ck, mq, mk, kc, qc, c = meta[:7]
    leaves = {n: tabs[n].float().to(DEV).requires_grad_(True) for n in names}
    q, k, v = (t.to(device=DEV, dtype=dtype).requires_grad_(True) for t in qkv)
    res = ak.attention_varlen(q, k, v, cq, ck, mq, mk, kc, query_class=qc, num_classes=c, causal=True,
                              reweight=ak.Reweight(**leaves), return_lse=True, backend=backend,
                              return_key_mass=dkey_mass is not None)
    dout, dmass, dlse = (t.to(DEV) for t in up)
    loss = ((res.out.double() * dout).sum() + (res.mass.double() * dmass).sum()
            + (res.lse.double().nan_to_num(0, 0, 0) * dlse).sum())
    if dkey_mass is not None:  # packed key masses: [Tk, Hq, C]
        loss = loss + (res.key_mass.double() * dkey_mass.to(DEV).transpose(0, 1)).sum()
    grads = torch.autograd.grad(loss, [q, k, v] + [leaves[n] for n in names])
    return dict(zip(["q", "k", "v"] + list(names), grads))


TABLE_CASES = [
    # form, lq, lk, hq, hk, d, c, zero-initialised tables, learned tables, class layout
    ("c", [17, 1, 40], [30, 17, 40], 4, 2, 32, 3, ("abs",), ("mul", "abs", "add"), "random"),
    ("cc", [24, 9], [31, 9], 6, 2, 64, 4, ("mul",), ("mul", "abs", "add"), "random"),
    ("hcc", [5, 33, 20], [0, 33, 41], 4, 1, 32, 5, ("add",), ("mul", "abs", "add"), "random"),
    ("hcc", [20, 13], [35, 13], 4, 2, 32, 2, (), ("abs",), "random"),  # one table asked; others absent
    ("hcc", [60, 20], [70, 20], 4, 2, 32, 3, (), ("mul", "abs", "add"), "runs"),  # one-class key blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TABLE_CASES, ids=lambda c: f"{c[0]}-c{c[6]}-{'+'.join(c[8])}-{c[9]}")
def test_table_grads(case, dtype):
    """dMUL / dABS / dADD ([C], [C, C], [H, C, C] tables, one zero-initialised) against the float64 reference's
    autograd: causal, GQA, Sq != Sk, varlen with unequal lengths (one sequence without keys)."""
    form, lq, lk, hq, hk, d, c, zero, names, layout = case
    qkv, meta, tabs, up = _table_case(form, lq, lk, hq, hk, d, c, zero, seed=len(lq) * 7 + c, layout=layout)
    ref = _table_grads_api(qkv, meta, tabs, up, torch.float64, "reference", names)
    got = _table_grads_api(qkv, meta, tabs, up, dtype, "triton", names)
    tol = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2)}[dtype]  # (atol relative to max, rtol)
    for n in names:
        assert got[n].shape == tabs[n].shape and got[n].dtype == torch.float32, n
        scale = max(ref[n].abs().max().item(), 1.0)
        torch.testing.assert_close(got[n].double().cpu(), ref[n].double().cpu(), atol=tol[0] * scale, rtol=tol[1],
                                   msg=lambda m, n=n: f"{n}: {m}")
    for n in ("q", "k", "v"):  # the input gradients stay right alongside
        scale = max(ref[n].abs().max().item(), 1.0)
        torch.testing.assert_close(got[n].double().cpu(), ref[n].double().cpu(), atol=tol[0] * 10 * scale,
                                   rtol=tol[1] * 10, msg=lambda m, n=n: f"d{n}: {m}")


def test_table_grads_masses_loop_variant(monkeypatch):
    """Table gradients with the reduction (non-product) formulation of the masses (CP < 16 there)."""
    monkeypatch.setattr(TF, "MASS_DOT", False)
    form, lq, lk, hq, hk, d, c, zero, names, _ = TABLE_CASES[1]
    qkv, meta, tabs, up = _table_case(form, lq, lk, hq, hk, d, c, zero, seed=3)
    ref = _table_grads_api(qkv, meta, tabs, up, torch.float64, "reference", names)
    got = _table_grads_api(qkv, meta, tabs, up, torch.float32, "triton", names)
    for n in names:
        scale = max(ref[n].abs().max().item(), 1.0)
        torch.testing.assert_close(got[n].double().cpu(), ref[n].double().cpu(), atol=1e-5 * scale, rtol=1e-4)
