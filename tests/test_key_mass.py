"""Key-side masses (``return_key_mass=True``): every backend against the float64 reference under the FlashAttention
rule (out, mass, lse, key_mass and every gradient, a loss on key masses included), the invariant that ties them
to the row masses, and decode against a (paged) cache."""
import pytest
import torch
from helpers import check_against_reference, padded_inputs, random_reweight, varlen_inputs

import avar_kernels as ak

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
    if not getattr(mod, "KEY_MASS", False):
        pytest.skip(f"the {backend} backend does not compute key masses yet (issue 11: fused kernels pending); "
                    "backend='auto' uses the reference backend meanwhile")


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


@pytest.mark.parametrize("backend", ["reference", "auto"])
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
