"""The fused op through the public API, on the CPU backend, against the float64 reference (docs/op.md, "How results are judged")."""
import pytest
import torch
from helpers import check_against_reference, padded_inputs, random_reweight, varlen_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import avar_kernels as ak

BACKEND = "cpu"

# (batch, sq, sk, hq, hk, d, causal, window, classes, reweight)
PADDED_CASES = [
    (1, 1, 1, 4, 4, 32, False, None, 1, "none"),
    (2, 17, 17, 4, 4, 64, True, None, 3, "vaf"),
    (1, 17, 63, 8, 2, 80, True, None, 6, "pai"),
    (2, 63, 17, 6, 1, 96, True, None, 2, "add"),  # sq > sk: the first rows see nothing
    (1, 111, 111, 8, 2, 128, False, None, 8, "mixed"),
    (1, 1, 1000, 8, 2, 128, True, None, 6, "vaf"),  # decode-shaped
    (2, 63, 111, 4, 4, 256, False, (16, 3), 3, "mixed"),
    (1, 1000, 1000, 4, 2, 64, True, None, 6, "vaf"),
    (1, 111, 1000, 6, 1, 32, False, (40, 40), 8, "pai"),
    (2, 111, 63, 4, 4, 128, False, None, 0, "none"),  # plain attention, no classes
]


def _case_id(c):
    return "b{}-q{}-k{}-h{}x{}-d{}-{}-w{}-c{}-{}".format(*c[:6], "causal" if c[6] else "full", c[7], c[8], c[9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PADDED_CASES, ids=_case_id)
def test_padded_matches_reference(case, dtype):
    b, sq, sk, hq, hk, d, causal, window, c, rw = case
    gen = torch.Generator().manual_seed(sq * 31 + sk)
    q, k, v, kc = padded_inputs(b, sq, sk, hq, hk, d, c, gen)
    kwargs = dict(causal=causal, window=window, reweight=random_reweight(rw, hq, c, gen),
                  num_classes=c or None)
    if sq > sk and kc is not None:
        kwargs["query_class"] = torch.randint(0, c, (b, sq), generator=gen)
    check_against_reference(ak.attention, (q, k, v, kc), kwargs, dtype, BACKEND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (7, 2))])
def test_varlen_unequal_lengths(causal, window, dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([17, 1, 63, 40], [17, 111, 63, 90], 8, 2, 64, 4, gen)
    kwargs = dict(causal=causal, window=window, reweight=random_reweight("mixed", 8, 4, gen))
    check_against_reference(ak.attention_varlen, (q, k, v, cu_q, cu_k, mq, mk, kc), kwargs, dtype, BACKEND)


def test_varlen_empty_sequence_and_more_queries_than_keys():
    gen = torch.Generator().manual_seed(4)
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([5, 3, 20], [0, 9, 7], 4, 4, 32, 3, gen)
    qc = torch.randint(0, 3, (q.shape[0],), generator=gen)
    got = check_against_reference(ak.attention_varlen, (q, k, v, cu_q, cu_k, mq, mk, kc),
                                  dict(causal=True, query_class=qc), torch.float32, BACKEND)
    out, mass, lse = got[:3]
    assert (out[:5] == 0).all() and (mass[:, :5] == 0).all() and torch.isinf(lse[:, :5]).all()


def test_fully_masked_rows_are_zero_without_nan():
    gen = torch.Generator().manual_seed(5)
    q, k, v, kc = padded_inputs(1, 20, 8, 4, 2, 32, 3, gen)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    res = ak.attention(q, k, v, kc, query_class=torch.zeros(1, 20, dtype=torch.long), causal=True,
                       return_lse=True, backend=BACKEND)
    empty = slice(0, 12)  # rows i < sq - sk see no key under bottom-right causality
    assert (res.out[:, empty] == 0).all() and (res.mass[:, :, empty] == 0).all()
    assert torch.isneginf(res.lse[:, :, empty]).all()
    torch.testing.assert_close(res.mass[:, :, 12:].sum(-1), torch.ones(1, 4, 8))
    (res.out.sum() + res.mass.sum() + res.lse[:, :, 12:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, empty] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_masses_sum_to_one(causal):
    gen = torch.Generator().manual_seed(6)
    q, k, v, kc = padded_inputs(2, 111, 111, 4, 2, 64, 5, gen)
    mass = ak.attention(q, k, v, kc, causal=causal, backend=BACKEND).mass
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 4, 111), atol=1e-5, rtol=0)
    assert (mass >= 0).all()


def test_zero_reweight_equals_none():
    gen = torch.Generator().manual_seed(7)
    q, k, v, kc = padded_inputs(1, 63, 63, 4, 4, 64, 3, gen)
    plain = ak.attention(q, k, v, kc, causal=True, backend=BACKEND)
    zero = ak.attention(q, k, v, kc, causal=True, backend=BACKEND,
                        reweight=ak.Reweight(mul=torch.zeros(3), abs=torch.zeros(3, 3), add=torch.zeros(4, 3, 3)))
    assert torch.equal(plain.out, zero.out) and torch.equal(plain.mass, zero.mass)


def test_without_classes_matches_sdpa():
    gen = torch.Generator().manual_seed(8)
    q, k, v, _ = padded_inputs(2, 111, 111, 8, 2, 64, 0, gen)
    res = ak.attention(q, k, v, causal=True, backend=BACKEND)
    assert res.mass is None and res.lse is None
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(res.out, ref, atol=2e-5, rtol=1e-4)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(9)
    q, k, v, kc = padded_inputs(2, 33, 33, 4, 2, 64, 3, gen, layout_noncontig=True)
    assert not q.is_contiguous()
    check_against_reference(ak.attention, (q, k, v, kc), dict(causal=True), torch.float32, BACKEND)


def test_return_flags():
    gen = torch.Generator().manual_seed(10)
    q, k, v, kc = padded_inputs(1, 9, 9, 2, 2, 32, 2, gen)
    res = ak.attention(q, k, v, kc, return_mass=False, return_lse=True, backend=BACKEND)
    assert res.mass is None and res.lse.shape == (1, 2, 9) and res.lse.dtype == torch.float32


@pytest.mark.parametrize("what", ["mass", "reweight"])
def test_gradcheck_float64(what):
    gen = torch.Generator().manual_seed(11)
    q, k, v, kc = padded_inputs(1, 5, 7, 2, 1, 8, 3, gen)
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    rw = random_reweight("mixed", 2, 3, gen) if what == "reweight" else None

    def fn(q, k, v):
        res = ak.attention(q, k, v, kc, num_classes=3, causal=True, reweight=rw, return_lse=True, backend=BACKEND)
        return res.out, res.mass, res.lse

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_torch_compile_has_no_graph_break():
    gen = torch.Generator().manual_seed(12)
    q, k, v, kc = padded_inputs(1, 16, 16, 4, 2, 32, 3, gen)
    rw = random_reweight("vaf", 4, 3, gen)

    def fn(q, k, v):
        res = ak.attention(q, k, v, kc, num_classes=3, causal=True, reweight=rw, return_lse=True, backend=BACKEND)
        return res.out.sum() + res.mass[..., 1].sum() + res.lse.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        loss = f(qq, kk, vv)
        loss.backward()
        grads.append((loss.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), sq=st.integers(1, 40), sk=st.integers(1, 40), groups=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
       d=st.sampled_from([8, 32, 80]), causal=st.booleans(), c=st.integers(0, 8),
       rw=st.sampled_from(["none", "vaf", "pai", "add", "mixed"]), seed=st.integers(0, 2 ** 16))
def test_fuzz_against_reference(b, sq, sk, groups, d, causal, c, rw, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, hk = groups
    q, k, v, kc = padded_inputs(b, sq, sk, hq, hk, d, c, gen)
    kwargs = dict(causal=causal, num_classes=c or None, reweight=random_reweight(rw, hq, c, gen) if c else None,
                  query_class=torch.randint(0, c, (b, sq), generator=gen) if c else None)
    check_against_reference(ak.attention, (q, k, v, kc), kwargs, torch.float32, BACKEND, seed=seed)


# ------------------------------------------------------------------------------------------- bad input

def _qkv(b=1, s=8, hq=4, hk=2, d=16, dtype=torch.float32):
    return torch.randn(b, s, hq, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.randn(8, 4, 16), *_qkv()[1:]), ValueError, "q: expected a 4-D"),
    (lambda: (*_qkv(hq=3)[:1], *_qkv()[1:]), ValueError, "multiple of the number of kv heads"),
    (lambda: (_qkv()[0].half(), *_qkv()[1:]), TypeError, "share one dtype"),
    (lambda: (_qkv()[0].int(), *_qkv()[1:]), TypeError, "q: expected float16"),
    (lambda: (_qkv()[0], _qkv()[1], _qkv(s=9)[2]), ValueError, "k and v must have the same shape"),
    (lambda: _qkv(d=320), ValueError, "head dim"),
    (lambda: (_qkv()[0][..., :8], *_qkv()[1:]), ValueError, "k: head dim 16 != q's head dim 8"),
    (lambda: (_qkv(b=2)[0], *_qkv()[1:]), ValueError, "same batch size"),
])
def test_bad_tensors(make, exc, match):
    with pytest.raises(exc, match=match):
        ak.attention(*make(), backend=BACKEND)


def test_bad_classes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key_class: class ids must lie in \[0, num_classes=3\)"):
        ak.attention(q, k, v, torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0]]), num_classes=3, backend=BACKEND)
    with pytest.raises(ValueError, match="key_class: class ids"):
        ak.attention(q, k, v, torch.full((1, 8), -1), num_classes=3, backend=BACKEND)
    with pytest.raises(ValueError, match="num_classes"):
        ak.attention(q, k, v, torch.zeros(1, 8, dtype=torch.long), num_classes=9, backend=BACKEND)
    with pytest.raises(ValueError, match=r"key_class: class ids must lie in \[0, 8\); found values in \[9, 9\]"):
        ak.attention(q, k, v, torch.full((1, 8), 9), backend=BACKEND)
    # a negative id with num_classes inferred blames key_class, not the num_classes the user did not pass
    with pytest.raises(ValueError, match=r"key_class: class ids must lie in \[0, 8\); found values in \[-1, -1\]"):
        ak.attention(q, k, v, torch.full((1, 8), -1), backend=BACKEND)
    with pytest.raises(ValueError, match=r"key_class: expected shape \[1, 8\]"):
        ak.attention(q, k, v, torch.zeros(1, 7, dtype=torch.long), backend=BACKEND)
    with pytest.raises(TypeError, match="key_class: expected an integer dtype"):
        ak.attention(q, k, v, torch.zeros(1, 8), backend=BACKEND)
    with pytest.raises(ValueError, match="query_class: expected shape"):
        ak.attention(q, k, v, torch.zeros(1, 8, dtype=torch.long), query_class=torch.zeros(1, 3, dtype=torch.long),
                     backend=BACKEND)
    with pytest.raises(ValueError, match="query_class: required"):
        ak.attention(q, k[:, :4], v[:, :4], torch.zeros(1, 4, dtype=torch.long), backend=BACKEND)
    with pytest.raises(ValueError, match="reweight: needs key_class"):
        ak.attention(q, k, v, reweight=ak.Reweight(mul=[0.0, 0.1]), backend=BACKEND)


def test_bad_reweight():
    with pytest.raises(ValueError, match=r"Reweight.mul: the last two dims"):
        ak.Reweight(mul=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="Reweight.add: between 1 and 8"):
        ak.Reweight(add=torch.zeros(9))
    with pytest.raises(ValueError, match="same number of classes"):
        ak.Reweight(mul=torch.zeros(3), abs=torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        ak.Reweight(add=torch.tensor([0.0, float("-inf")]))
    q, k, v = _qkv()
    kc = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="table has 3 heads but q has 4"):
        ak.attention(q, k, v, kc, reweight=ak.Reweight(mul=torch.ones(3, 2, 2)), backend=BACKEND)
    with pytest.raises(ValueError, match="tables have 2 classes but the op has num_classes=3"):
        ak.attention(q, k, v, kc, num_classes=3, reweight=ak.Reweight(mul=torch.ones(2)), backend=BACKEND)
    with pytest.raises(TypeError, match="reweight: expected avar_kernels.Reweight"):
        ak.attention(q, k, v, kc, reweight={"mul": 1}, backend=BACKEND)


def test_bad_options():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window: expected a pair"):
        ak.attention(q, k, v, window=5, backend=BACKEND)
    with pytest.raises(ValueError, match="window: sizes must be"):
        ak.attention(q, k, v, window=(-3, 0), backend=BACKEND)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ak.attention(q, k, v, backend="fast")
    with pytest.raises(ValueError, match="softmax_scale"):
        ak.attention(q, k, v, softmax_scale=float("nan"), backend=BACKEND)
    with pytest.raises(TypeError, match="triton.*float64"):
        ak.attention(*_qkv(dtype=torch.float64), backend="triton")
    for flag in ("causal", "return_mass", "return_lse"):
        with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
            ak.attention(q, k, v, backend=BACKEND, **{flag: "yes"})


def test_unavailable_backend_is_a_value_error(monkeypatch):
    from avar_kernels import _backends

    monkeypatch.setattr(_backends.backend_module("cpu"), "is_available", lambda: False)
    with pytest.raises(ValueError, match="backend='cpu' is not available: the C\\+\\+ extension"):
        ak.attention(*_qkv(), backend="cpu")


@pytest.mark.parametrize("backend", ["reference", BACKEND])
@pytest.mark.parametrize("shape", [(1, 0, 5), (1, 5, 0), (0, 5, 5), (2, 0, 0)], ids=lambda s: "b{}-q{}-k{}".format(*s))
def test_empty_in_empty_out(shape, backend):
    b, sq, sk = shape
    q = torch.randn(b, sq, 4, 16, requires_grad=True)
    k = torch.randn(b, sk, 2, 16, requires_grad=True)
    v = torch.randn(b, sk, 2, 16, requires_grad=True)
    kc = torch.zeros(b, sk, dtype=torch.long)
    qc = torch.zeros(b, sq, dtype=torch.long)
    res = ak.attention(q, k, v, kc, query_class=qc, num_classes=3, causal=True, return_lse=True,
                       reweight=ak.Reweight(mul=[0.0, 0.5, 0.0]), backend=backend)
    assert res.out.shape == (b, sq, 4, 16) and res.mass.shape == (b, 4, sq, 3) and res.lse.shape == (b, 4, sq)
    assert (res.out == 0).all() and (res.mass == 0).all() and torch.isinf(res.lse).all()
    res.out.sum().backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in (q, k, v))


def test_empty_varlen_with_reweight():
    q, k, v = torch.randn(0, 4, 16), torch.randn(0, 2, 16), torch.randn(0, 2, 16)
    cu = torch.zeros(3, dtype=torch.int32)
    res = ak.attention_varlen(q, k, v, cu, cu, 0, 0, torch.zeros(0, dtype=torch.long), num_classes=2,
                              reweight=ak.Reweight(add=[0.3, 0.0]), backend=BACKEND)
    assert res.out.shape == (0, 4, 16) and res.mass.shape == (4, 0, 2)


def test_reference_stays_normalised_at_huge_scores():
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(3))
    kc = torch.tensor([[0, 0, 1, 1, 0, 1]])
    for dtype in (torch.float64, torch.float32):
        res = ak.attention(q.to(dtype), k.to(dtype), v.to(dtype), kc, reweight=ak.Reweight(add=[1e30, 0.0]),
                           backend="reference")
        torch.testing.assert_close(res.mass.sum(-1), torch.ones(1, 2, 6, dtype=res.mass.dtype))


def test_double_backward_is_a_clear_error():
    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    out = ak.attention(q, k, v, causal=True, backend=BACKEND).out
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="first order only"):
        g.sum().backward()


def test_bad_cu_seqlens():
    q, k, v = torch.randn(10, 2, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    good_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    good_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    ak.attention_varlen(q, k, v, good_q, good_k, 6, 7, backend=BACKEND)
    cases = [
        (good_q.long(), good_k, 6, 7, TypeError, "cu_seqlens_q: expected dtype torch.int32"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), good_k, 6, 7, ValueError, "non-decreasing"),
        (good_q, torch.tensor([0, 12], dtype=torch.int32), 6, 12, ValueError, "cu_seqlens_k: expected 3 entries"),
        (torch.tensor([0, 4, 11], dtype=torch.int32), good_k, 7, 7, ValueError, "points past the tensor"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), good_k, 6, 7, ValueError, "must start at 0"),
        (good_q, good_k, 5, 7, ValueError, "max_seqlen_q: expected an int >= the longest sequence"),
        (good_q.view(1, 3), good_k, 6, 7, ValueError, "cu_seqlens_q: expected a 1-D"),
    ]
    for cu_q, cu_k, mq, mk, exc, match in cases:
        with pytest.raises(exc, match=match):
            ak.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, backend=BACKEND)


# ------------------------------------------------------------------------------- learned re-weighting tables

def _learned_tables(form, hq, c, gen, zero=()):
    """mul, abs, add leaves (float64 for gradcheck; the op casts them to float32) of one broadcast form."""
    shape = {"c": (c,), "cc": (c, c), "hcc": (hq, c, c)}[form]
    scales = {"mul": 0.3, "abs": 0.2, "add": 1.0}
    return {n: (torch.zeros(shape, dtype=torch.float64) if n in zero
                else scales[n] * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
            for n in ("mul", "abs", "add")}


@pytest.mark.parametrize("form", ["c", "cc", "hcc"])
def test_gradcheck_float64_tables(form):
    gen = torch.Generator().manual_seed(13)
    q, k, v, kc = padded_inputs(1, 5, 7, 4, 2, 8, 3, gen)  # causal, GQA, Sq != Sk
    q, k, v = (t.double() for t in (q, k, v))
    tabs = _learned_tables(form, 4, 3, gen)

    def fn(mul, abs_, add):
        res = ak.attention(q, k, v, kc, num_classes=3, causal=True, reweight=ak.Reweight(mul=mul, abs=abs_, add=add),
                           return_lse=True, backend=BACKEND)
        return res.out, res.mass, res.lse

    # The tables are float32 inside the op (docs/op.md): a float32-sized step and tolerance.
    assert torch.autograd.gradcheck(fn, (tabs["mul"], tabs["abs"], tabs["add"]), eps=1e-3, atol=2e-4, rtol=1e-3)


def _table_grads(fn, args, kwargs, tabs, dtype, backend, seed=0):
    """Gradients of fresh float32 copies of the tables under a fixed random loss on out, mass and lse."""
    gen = torch.Generator().manual_seed(seed)
    leaves = {n: t.detach().float().requires_grad_(True) for n, t in tabs.items()}
    rw = ak.Reweight(mul=leaves.get("mul"), abs=leaves.get("abs"), add=leaves.get("add"))
    q, k, v = (t.to(dtype) for t in args[:3])
    res = fn(q, k, v, *args[3:], **kwargs, reweight=rw, return_lse=True, backend=backend)
    loss = ((res.out.double() * torch.randn(res.out.shape, generator=gen, dtype=torch.float64)).sum()
            + (res.mass.double() * torch.randn(res.mass.shape, generator=gen, dtype=torch.float64)).sum()
            + (res.lse.double().nan_to_num(0, 0, 0) * torch.randn(res.lse.shape, generator=gen,
                                                                    dtype=torch.float64)).sum())
    loss.backward()
    return {n: t.grad for n, t in leaves.items()}


def _check_table_grads(fn, args, kwargs, tabs):
    ref = _table_grads(fn, args, kwargs, tabs, torch.float64, "reference")
    got = _table_grads(fn, args, kwargs, tabs, torch.float32, BACKEND)
    for n in tabs:
        assert got[n] is not None and got[n].shape == tabs[n].shape, n
        scale = ref[n].abs().max().item()
        torch.testing.assert_close(got[n], ref[n], atol=1e-4 * max(scale, 1.0), rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
    # out / mass / lse / dq / dk / dv with learned tables, under the FA rule
    rw = ak.Reweight(**{n: t.detach().float().requires_grad_(True) for n, t in tabs.items()})
    check_against_reference(fn, args, dict(kwargs, reweight=rw), torch.float32, BACKEND)


@pytest.mark.parametrize("form", ["c", "cc", "hcc"])
def test_table_grads_match_reference_float32(form):
    gen = torch.Generator().manual_seed(14)
    q, k, v, kc = padded_inputs(2, 150, 170, 4, 2, 32, 4, gen)  # several 128-blocks, causal, GQA, Sq != Sk
    tabs = _learned_tables(form, 4, 4, gen, zero=("abs",))  # a zero-initialised learned table too
    kwargs = dict(causal=True, num_classes=4, query_class=torch.randint(0, 4, (2, 150), generator=gen))
    _check_table_grads(ak.attention, (q, k, v, kc), kwargs, tabs)


def test_table_grads_varlen_unequal_lengths():
    gen = torch.Generator().manual_seed(15)
    q, k, v, cu_q, cu_k, mq, mk, kc = varlen_inputs([17, 1, 63, 40, 5], [17, 111, 63, 90, 0], 4, 2, 32, 4, gen)
    tabs = {"mul": torch.zeros(4, dtype=torch.float64), "add": 0.5 * torch.randn(4, 4, 4, generator=gen,
                                                                                  dtype=torch.float64)}
    qc = torch.randint(0, 4, (q.shape[0],), generator=gen)  # the last sequence has queries but no keys
    _check_table_grads(ak.attention_varlen, (q, k, v, cu_q, cu_k, mq, mk, kc), dict(causal=True, query_class=qc),
                       tabs)


def test_table_grads_only_what_is_needed():
    gen = torch.Generator().manual_seed(16)
    q, k, v, kc = padded_inputs(1, 20, 20, 2, 2, 16, 3, gen)
    q.requires_grad_(True)
    mul = torch.full((3,), 0.1, requires_grad=True)
    res = ak.attention(q, k, v, kc, causal=True, reweight=ak.Reweight(mul=mul, add=torch.ones(3)), backend=BACKEND)
    res.out.sum().backward()
    assert mul.grad is not None and mul.grad.shape == (3,) and q.grad is not None
    # a learned zero table is still passed on (and differentiated) rather than dropped as inactive
    assert not ak.Reweight(add=torch.zeros(3, requires_grad=True)).is_identity
    assert ak.Reweight(add=torch.zeros(3)).is_identity


def test_learned_tables_on_triton():
    """backend='triton' differentiates learned tables too (on CPU through the interpreter): the same table
    gradients as the float64 reference, for a [C] and a zero-initialised [H, C, C] table."""
    pytest.importorskip("triton")
    from avar_kernels import _backends
    if not _backends.backend_module("triton").is_available():
        pytest.skip("triton cannot run here")
    gen = torch.Generator().manual_seed(17)
    q, k, v, kc = padded_inputs(2, 20, 24, 4, 2, 16, 3, gen)  # causal, GQA, Sq != Sk
    tabs = {"mul": 0.3 * torch.randn(3, generator=gen, dtype=torch.float64),
            "add": torch.zeros(4, 3, 3, dtype=torch.float64)}
    kwargs = dict(causal=True, num_classes=3)
    ref = _table_grads(ak.attention, (q, k, v, kc), kwargs, tabs, torch.float64, "reference")
    got = _table_grads(ak.attention, (q, k, v, kc), kwargs, tabs, torch.float32, "triton")
    for n in tabs:
        assert got[n] is not None and got[n].shape == tabs[n].shape, n
        scale = ref[n].abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(got[n].double(), ref[n].double(), atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                                   msg=lambda m, n=n: f"{n}: {m}")
