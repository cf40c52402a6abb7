"""Decode with a KV cache (attention_with_kvcache): the packed fallback on the CPU, the CUDA split-KV kernel on a
GPU, argument errors, and the nvcc compile check of csrc/cuda. The oracle is the float64 reference run per
sequence on that sequence's valid keys, gathered here independently of avar_kernels.kvcache."""
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from helpers import ATOL, fa_close, random_reweight

import avar_kernels as ak
from avar_kernels import _ops, kvcache, reference
from avar_kernels.kvcache import attention_with_kvcache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ inputs

def make_cache(lens, sq, hq, hk, d, c, gen, paged_block=0, sk_max=None, extra_blocks=3):
    """q [B,Sq,Hq,D], k/v caches (paged: [num_blocks, bs, Hk, D] + a shuffled block table), key classes [B, Sk_max]."""
    b = len(lens)
    sk_max = sk_max or max(max(lens), 1)
    q = torch.randn(b, sq, hq, d, generator=gen)
    kc = torch.randint(0, max(c, 1), (b, sk_max), generator=gen) if c else None
    if not paged_block:
        k = torch.randn(b, sk_max, hk, d, generator=gen)
        v = torch.randn(b, sk_max, hk, d, generator=gen)
        return q, k, v, None, kc
    bs = paged_block
    max_blocks = (sk_max + bs - 1) // bs
    nblocks = b * max_blocks + extra_blocks
    k = torch.randn(nblocks, bs, hk, d, generator=gen)
    v = torch.randn(nblocks, bs, hk, d, generator=gen)
    table = torch.randperm(nblocks, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    if kc is not None and kc.shape[1] != max_blocks * bs:
        kc = torch.cat([kc, torch.zeros(b, max_blocks * bs - kc.shape[1], dtype=kc.dtype)], 1)
    return q, k, v, table, kc


def oracle(q, k, v, lens, table, kc, qc, c, causal, scale, tables, dtype, key_mass=False):
    """Per sequence: reference.forward on its valid keys -> out [B,Sq,Hq,D], lse [B,Hq,Sq], mass [B,Hq,Sq,C], and
    with ``key_mass`` key_mass [B, Hq, Sk_max, C] (0 past each cache's length)."""
    b, sq, hq, d = q.shape
    mul, abs_, add = (None if t is None else t.to(q.device) for t in tables)
    outs, lses, masses = [], [], []
    sk_max = k.shape[1] if table is None else table.shape[1] * k.shape[1]
    kms = torch.zeros(b, hq, sk_max, max(c, 1), dtype=torch.float32 if dtype != torch.float64 else dtype,
                      device=q.device)
    for n in range(b):
        ln = int(lens[n])
        if table is None:
            kb, vb = k[n, :ln], v[n, :ln]
        else:
            bs = k.shape[1]
            rows = [int(table[n, j // bs]) * bs + j % bs for j in range(ln)]
            idx = torch.tensor(rows, dtype=torch.long, device=k.device)
            kb, vb = k.reshape(-1, k.shape[2], d)[idx], v.reshape(-1, k.shape[2], d)[idx]
        cu_q = torch.tensor([0, sq], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, ln], dtype=torch.int32, device=q.device)
        res = reference.forward(
            q[n].to(dtype), kb.to(dtype), vb.to(dtype), cu_q, cu_k, sq, ln,
            None if kc is None else kc[n, :ln].to(torch.int32), None if qc is None else qc[n].to(torch.int32),
            c, mul, abs_, add, scale, -1, 0 if causal else -1, key_mass=key_mass)
        out, lse, mass = res[:3]
        if key_mass:
            kms[n, :, :ln] = res[3].to(kms.dtype)
        outs.append(out)
        lses.append(lse)
        masses.append(mass)
    if key_mass:
        return torch.stack(outs), torch.stack(lses), torch.stack(masses), kms
    return torch.stack(outs), torch.stack(lses), torch.stack(masses)


def default_query_class(kc, lens, sq):
    if kc is None:
        return None
    rows = []
    for n, ln in enumerate(lens):
        rows.append(kc[n, ln - sq: ln] if ln > 0 else torch.zeros(sq, dtype=kc.dtype))
    return torch.stack(rows)


def check_case(lens, sq, hq, hk, d, c, rw, causal, paged_block, dtype, backend, device="cpu", seed=0,
               sk_max=None, explicit_qc=False, key_mass=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, table, kc = make_cache(lens, sq, hq, hk, d, c, gen, paged_block, sk_max)
    reweight = random_reweight(rw, hq, c, gen) if c else None
    qc = torch.randint(0, c, (len(lens), sq), generator=gen) if (c and explicit_qc) else default_query_class(kc, lens, sq)
    scale = d ** -0.5
    tables = reweight.tables(hq, c, "cpu") if reweight is not None else (None, None, None)
    seqlens = torch.tensor(lens, dtype=torch.int32)

    ref64 = oracle(q.double(), k.double(), v.double(), lens, table, kc, qc, c, causal, scale, tables, torch.float64,
                   key_mass)
    lowp = oracle(q.to(device), k.to(device), v.to(device), lens, None if table is None else table.to(device),
                  None if kc is None else kc.to(device), None if qc is None else qc.to(device), c, causal, scale,
                  tables, dtype, key_mass)
    to = (lambda t: None if t is None else t.to(device))
    res = attention_with_kvcache(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), to(seqlens),
                                 to(kc), block_table=to(table), query_class=to(qc) if explicit_qc else None,
                                 num_classes=c or None, causal=causal, reweight=reweight, return_lse=True,
                                 return_key_mass=key_mass, backend=backend)
    assert res.out.dtype == dtype and res.out.shape == (len(lens), sq, hq, d)
    assert res.lse.dtype == torch.float32 if dtype != torch.float64 else True
    fa_close("out", res.out.cpu(), ref64[0], lowp[0].cpu(), ATOL[dtype])
    fa_close("lse", res.lse.cpu(), ref64[1], lowp[1].cpu(), ATOL[dtype])
    if c:
        assert res.mass.shape == (len(lens), hq, sq, c)
        fa_close("mass", res.mass.cpu(), ref64[2], lowp[2].cpu(), ATOL[dtype])
    else:
        assert res.mass is None
    if key_mass:
        assert res.key_mass.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        fa_close("key_mass", res.key_mass.cpu(), ref64[3], lowp[3].cpu(), ATOL[dtype])
        # the new rows' masses: each row's softmax sums to 1, so a class's key masses sum to its row count
        qcs = qc if qc is not None else torch.zeros(len(lens), sq, dtype=torch.long)
        rows = torch.nn.functional.one_hot(qcs.long(), c).sum(1).to(torch.float64)  # [B, C]
        seen = torch.tensor([ln > 0 for ln in lens], dtype=torch.float64)[:, None, None]
        torch.testing.assert_close(res.key_mass.cpu().double().sum(2), (rows[:, None, :] * seen).expand(-1, hq, -1),
                                   atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5, rtol=1e-3)
    else:
        assert res.key_mass is None
    return res


# ------------------------------------------------------------------------------------ CPU fallback path

# (lens, sq, hq, hk, d, classes, reweight, causal, paged block size)
CPU_CASES = [
    ([17], 1, 4, 4, 32, 3, "none", True, 0),
    ([1, 63, 111], 1, 8, 2, 64, 6, "vaf", True, 0),           # GQA, odd lengths, a cache of exactly Sq
    ([5, 4, 40], 4, 6, 2, 80, 4, "pai", True, 16),            # paged, a cache of exactly Sq (4)
    ([100, 16, 33], 16, 4, 1, 64, 8, "mixed", True, 32),     # MQA, Sq = 16 = one cache
    ([0, 37, 0], 3, 4, 2, 96, 3, "add", True, 16),            # empty sequences
    ([63, 1000], 2, 8, 2, 128, 5, "mixed", False, 0),        # not causal
    ([129, 7], 7, 4, 4, 128, 0, "none", True, 48),           # no classes, paged
]


def _cid(c):
    return "lens{}-q{}-h{}x{}-d{}-c{}-{}-{}-pg{}".format(
        "_".join(map(str, c[0])), *c[1:7], "causal" if c[7] else "full", c[8])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", CPU_CASES, ids=_cid)
def test_fallback_matches_reference(case, backend):
    lens, sq, hq, hk, d, c, rw, causal, pb = case
    dtype = torch.float64 if backend == "reference" else torch.float32
    check_case(lens, sq, hq, hk, d, c, rw, causal, pb, dtype, backend, seed=sum(lens) + sq)


def test_fallback_explicit_query_class_and_longer_key_class():
    check_case([30, 50], 3, 4, 2, 32, 4, "mixed", True, 0, torch.float32, "cpu", explicit_qc=True, sk_max=64)


# (lens, sq, hq, hk, d, classes, reweight, causal, paged block size)
KEY_MASS_CPU_CASES = [
    ([1, 63, 111], 1, 8, 2, 64, 6, "vaf", True, 0),         # GQA, odd lengths, a cache of exactly Sq
    ([5, 4, 40], 4, 6, 2, 80, 4, "pai", True, 16),          # paged
    ([100, 16, 33], 16, 4, 1, 64, 8, "mixed", True, 32),   # MQA, Sq = 16, paged
    ([0, 37, 0], 3, 4, 2, 96, 3, "add", False, 16),         # empty sequences, not causal
]


@pytest.mark.parametrize("case", KEY_MASS_CPU_CASES, ids=_cid)
def test_fallback_key_mass_matches_reference(case):
    lens, sq, hq, hk, d, c, rw, causal, pb = case
    check_case(lens, sq, hq, hk, d, c, rw, causal, pb, torch.float32, "auto", seed=sum(lens) + 7, key_mass=True)


def test_empty_rows_have_no_nan():
    gen = torch.Generator().manual_seed(3)
    q, k, v, table, kc = make_cache([0, 0], 2, 4, 2, 32, 3, gen)
    res = attention_with_kvcache(q, k, v, torch.zeros(2, dtype=torch.int32), kc, num_classes=3, return_lse=True)
    assert torch.equal(res.out, torch.zeros_like(res.out))
    assert torch.equal(res.mass, torch.zeros_like(res.mass))
    assert torch.isinf(res.lse).all() and (res.lse < 0).all()


def test_masses_sum_to_one_and_return_flags():
    gen = torch.Generator().manual_seed(4)
    q, k, v, table, kc = make_cache([20, 9], 2, 4, 2, 32, 3, gen, paged_block=16)
    sl = torch.tensor([20, 9], dtype=torch.int32)
    res = attention_with_kvcache(q, k, v, sl, kc, block_table=table)
    assert res.lse is None and res.mass is not None
    torch.testing.assert_close(res.mass.sum(-1), torch.ones(2, 4, 2), atol=1e-5, rtol=0)
    res = attention_with_kvcache(q, k, v, sl, kc, block_table=table, return_mass=False, return_lse=True)
    assert res.mass is None and res.lse.shape == (2, 4, 2)


def test_paged_equals_contiguous():
    gen = torch.Generator().manual_seed(5)
    lens = [45, 17, 64]
    q, kp, vp, table, kc = make_cache(lens, 2, 4, 2, 64, 3, gen, paged_block=16)
    bs = kp.shape[1]
    idx = (table.long()[:, :, None] * bs + torch.arange(bs)[None, None]).reshape(len(lens), -1)
    k = kp.reshape(-1, 2, 64)[idx]
    v = vp.reshape(-1, 2, 64)[idx]
    sl = torch.tensor(lens, dtype=torch.int32)
    a = attention_with_kvcache(q, kp, vp, sl, kc, block_table=table, return_lse=True)
    b = attention_with_kvcache(q, k, v, sl, kc, return_lse=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_gradients_flow_through_fallback():
    gen = torch.Generator().manual_seed(6)
    q, k, v, table, kc = make_cache([10, 12], 1, 2, 1, 16, 2, gen)
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    res = attention_with_kvcache(q, k, v, torch.tensor([10, 12], dtype=torch.int32), kc, backend="reference")
    (res.out.sum() + res.mass[..., 0].sum()).backward()
    assert q.grad is not None and k.grad is not None and torch.isfinite(k.grad).all()
    assert k.grad[0, 10:].abs().sum() == 0  # keys past the cache length get no gradient


# ---------------------------------------------------------------------------------------- argument errors

def _base():
    gen = torch.Generator().manual_seed(7)
    q, k, v, _, kc = make_cache([10, 12], 2, 4, 2, 32, 3, gen, sk_max=16)
    return q, k, v, torch.tensor([10, 12], dtype=torch.int32), kc


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q: expected a 4-D"),
    (lambda a: a.update(q=a["q"].long()), TypeError, "q: expected float16"),
    (lambda a: a.update(k_cache=a["k_cache"].double()), TypeError, "share one dtype"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :8]), ValueError, "same shape"),
    (lambda a: a.update(q=torch.randn(2, 2, 3, 32)), ValueError, "multiple of the number of kv heads"),
    (lambda a: a.update(q=torch.randn(2, 2, 4, 16)), ValueError, "head dim"),
    (lambda a: a.update(q=torch.randn(3, 2, 4, 32)), ValueError, "k_cache: batch size"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens: expected dtype torch.int32"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10], dtype=torch.int32)), ValueError, r"cache_seqlens: expected shape"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10, 17], dtype=torch.int32)), ValueError, "outside"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10, -1], dtype=torch.int32)), ValueError, "outside"),
    (lambda a: a.update(cache_seqlens=torch.tensor([10, 1], dtype=torch.int32)), ValueError, "< Sq"),
    (lambda a: a.update(cache_seqlens=[10, 12]), TypeError, "cache_seqlens: expected an integer torch.Tensor"),
    (lambda a: a.update(key_class=a["key_class"][:, :5]), ValueError, "key_class: expected shape"),
    (lambda a: a.update(key_class=a["key_class"].float()), TypeError, "key_class: expected an integer"),
    (lambda a: a.update(num_classes=2), ValueError, r"key_class: class ids"),
    (lambda a: a.update(num_classes=9), ValueError, "num_classes"),
    (lambda a: a.update(query_class=torch.zeros(2, 3, dtype=torch.long)), ValueError, "query_class: expected shape"),
    (lambda a: a.update(query_class=torch.full((2, 2), 5)), ValueError, "query_class: class ids"),
    (lambda a: a.update(key_class=None, query_class=torch.zeros(2, 2, dtype=torch.long)), ValueError, "without key_class"),
    (lambda a: a.update(key_class=None, reweight=ak.Reweight(mul=torch.ones(3))), ValueError, "reweight: needs key_class"),
    (lambda a: a.update(reweight="vaf"), TypeError, "reweight"),
    (lambda a: a.update(backend="flash"), ValueError, "backend"),
    (lambda a: a.update(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda a: a.update(causal=1), TypeError, "causal"),
])
def test_bad_arguments(mutate, exc, match):
    q, k, v, sl, kc = _base()
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=sl, key_class=kc)
    mutate(args)
    with pytest.raises(exc, match=match):
        attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
                               **args)


def test_bad_paged_arguments():
    gen = torch.Generator().manual_seed(8)
    q, k, v, table, kc = make_cache([20, 30], 2, 4, 2, 32, 3, gen, paged_block=16)
    sl = torch.tensor([20, 30], dtype=torch.int32)
    with pytest.raises(TypeError, match="block_table: expected dtype torch.int32"):
        attention_with_kvcache(q, k, v, sl, kc, block_table=table.long())
    with pytest.raises(ValueError, match="block_table: expected shape"):
        attention_with_kvcache(q, k, v, sl, kc, block_table=table[:1])
    with pytest.raises(ValueError, match="multiple of 16"):
        attention_with_kvcache(q, k[:, :8], v[:, :8], torch.tensor([5, 6], dtype=torch.int32), kc,
                               block_table=table)
    bad = table.clone()
    bad[1, 0] = k.shape[0]
    with pytest.raises(ValueError, match="block_table: block ids"):
        attention_with_kvcache(q, k, v, sl, kc, block_table=bad)
    with pytest.raises(ValueError, match="outside"):
        attention_with_kvcache(q, k, v, torch.tensor([20, 33], dtype=torch.int32), kc, block_table=table)
    # unused table entries (past the cache length) may hold anything
    ok = table.clone()
    ok[0, 1] = -1
    attention_with_kvcache(q, k, v, torch.tensor([16, 30], dtype=torch.int32), kc, block_table=ok)


def test_backend_cuda_without_kernel_is_a_clear_error():
    q, k, v, sl, kc = _base()
    with pytest.raises(ValueError, match="backend='cuda'"):
        attention_with_kvcache(q, k, v, sl, kc, backend="cuda")


# ------------------------------------------- the CUDA path's threading, on the CPU with an emulated binding

def emulated_binding(calls):
    """A float64 model of ``avar_kernels._cuda.decode_fwd`` (the binding's signature and outputs: out, lse, mass,
    key_mass or an empty [0]), recording each call. Installed as avar_kernels._cuda, it lets the real custom op and
    kvcache.py's CUDA path run on the CPU; the kernels themselves are checked by the gpu-marked tests."""
    def decode_fwd(q, k_cache, v_cache, cache_seqlens, key_class, block_table, query_class, num_classes, mul, abs_,
                   add, scale, causal, num_splits, key_mass=False):
        calls.append({"key_mass": key_mass, "num_classes": num_classes, "paged": block_table is not None})
        b, sq, hq, d = q.shape
        hk, c = k_cache.shape[2], num_classes
        sk_max = _ops.decode_sk_max(k_cache, block_table)
        pos = torch.arange(sk_max)
        if block_table is None:
            k, v = k_cache, v_cache
        else:  # unused table entries may hold anything: clamp them, their keys are masked
            bs = k_cache.shape[1]
            pages = block_table.long().clamp(0, k_cache.shape[0] - 1)[:, pos // bs]
            k, v = k_cache[pages, pos % bs], v_cache[pages, pos % bs]
        k = k.double().repeat_interleave(hq // hk, dim=2)
        v = v.double().repeat_interleave(hq // hk, dim=2)
        z = torch.einsum("bihd,bjhd->bhij", q.double(), k) * scale  # [B, Hq, Sq, Sk_max]
        if c:
            kc = torch.zeros(b, sk_max, dtype=torch.long)
            n = min(key_class.shape[1], sk_max)
            kc[:, :n] = key_class[:, :n].long()
            qc = query_class.long()
            h = torch.arange(hq)

            def tab(t):
                return 0 if t is None else t.double()[h[None, :, None, None], qc[:, None, :, None],
                                                      kc[:, None, None, :]]

            z = z * (1 + tab(mul)) + tab(abs_) * z.abs() + tab(add)
        lens = cache_seqlens.long()
        vis = pos[None, None, :] < lens[:, None, None]
        if causal:
            vis = vis & (pos[None, None, :] <= torch.arange(sq)[None, :, None] + (lens - sq)[:, None, None])
        z = z.masked_fill(~vis[:, None], float("-inf"))
        lse = torch.logsumexp(z, -1)
        p = torch.exp(z - lse[..., None]).nan_to_num(0.0)  # rows that see no key: P = 0
        out = torch.einsum("bhij,bjhd->bihd", p, v).to(q.dtype)
        if c:
            mass = torch.einsum("bhij,bjc->bhic", p, torch.nn.functional.one_hot(kc, c).double())
        else:
            mass = torch.zeros(b, hq, sq, 0, dtype=torch.float64)
        km = (torch.einsum("bhij,bic->bhjc", p, torch.nn.functional.one_hot(qc, c).double()).float()
              if key_mass else q.new_empty(0, dtype=torch.float32))
        return out, lse.float(), mass.float(), km

    return decode_fwd


def install_cuda_binding(monkeypatch, binding, dtype=None):
    """Installs `binding` as avar_kernels._cuda, and kvcache.py sees CPU tensors as a CUDA call (of `dtype`, default
    q's) with the extension built; every other reason not to use the kernel still applies."""
    import sys

    import avar_kernels

    monkeypatch.setitem(sys.modules, "avar_kernels._cuda", binding)
    monkeypatch.setattr(avar_kernels, "_cuda", binding, raising=False)
    monkeypatch.setattr(kvcache, "cuda_available", lambda: True)
    real = kvcache._cuda_why_not
    monkeypatch.setattr(kvcache, "_cuda_why_not", lambda q, d, sq, needs_grad: real(
        SimpleNamespace(device=torch.device("cuda"), dtype=dtype or q.dtype), d, sq, needs_grad))


@pytest.fixture
def emulated_cuda(monkeypatch):
    """kvcache.py sees an fp16 CUDA call with the extension built, and avar_kernels._cuda is the float64 model of the
    binding. Returns the list of recorded binding calls."""
    calls = []
    install_cuda_binding(monkeypatch, SimpleNamespace(decode_fwd=emulated_binding(calls)), dtype=torch.float16)
    return calls


@pytest.mark.parametrize("paged", [0, 16])
@pytest.mark.parametrize("sq", [1, 16])
def test_cuda_path_threads_key_mass(emulated_cuda, paged, sq):
    gen = torch.Generator().manual_seed(11 + sq + paged)
    lens = [40, sq, 0, 57]
    q, k, v, table, kc = make_cache(lens, sq, 8, 2, 64, 5, gen, paged_block=paged, sk_max=64)
    rw = random_reweight("mixed", 8, 5, gen)
    sl = torch.tensor(lens, dtype=torch.int32)
    kw = dict(block_table=table, num_classes=5, reweight=rw, return_lse=True)
    ref = attention_with_kvcache(q, k, v, sl, kc, return_key_mass=True, backend="reference", **kw)
    assert emulated_cuda == []  # an explicit fallback backend never takes the CUDA path
    for backend in ("auto", "cuda"):
        got = attention_with_kvcache(q, k, v, sl, kc, return_key_mass=True, backend=backend, **kw)
        assert emulated_cuda[-1] == {"key_mass": True, "num_classes": 5, "paged": bool(paged)}
        assert got.key_mass.shape == (4, 8, 64, 5) and got.key_mass.dtype == torch.float32
        for name in ("out", "mass", "lse", "key_mass"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    got = attention_with_kvcache(q, k, v, sl, kc, **kw)
    assert emulated_cuda[-1]["key_mass"] is False and got.key_mass is None
    torch.testing.assert_close(got.mass, ref.mass, atol=1e-5, rtol=1e-5)


def test_cuda_path_not_taken_when_gradients_are_needed(emulated_cuda):
    """The CUDA decode path is forward only: with an input that requires grad, key masses come from the packed
    fallback (differentiable), and backend='cuda' is an error, as for the other outputs."""
    gen = torch.Generator().manual_seed(12)
    q, k, v, _, kc = make_cache([30, 17], 2, 4, 2, 64, 3, gen)
    sl = torch.tensor([30, 17], dtype=torch.int32)
    q.requires_grad_(True)
    res = attention_with_kvcache(q, k, v, sl, kc, return_key_mass=True)
    assert emulated_cuda == []
    res.key_mass[..., 1].sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="no backward"):
        attention_with_kvcache(q, k, v, sl, kc, return_key_mass=True, backend="cuda")
    with torch.no_grad():
        attention_with_kvcache(q, k, v, sl, kc, return_key_mass=True)
    assert emulated_cuda[-1]["key_mass"] is True


def _op_args(paged, key_mass, fake_mode=None):
    gen = torch.Generator().manual_seed(13)
    q, k, v, table, kc = make_cache([20, 33], 3, 8, 2, 64, 4, gen, paged_block=paged, sk_max=48)
    qc = default_query_class(kc, [20, 33], 3).to(torch.int32)
    args = (q.half(), k.half(), v.half(), torch.tensor([20, 33], dtype=torch.int32), kc.to(torch.int32), table, qc,
            4, None, None, None, 0.125, True, 0, key_mass)
    if fake_mode is not None:
        args = tuple(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    return args


@pytest.mark.parametrize("paged", [0, 16])
@pytest.mark.parametrize("key_mass", [False, True])
def test_decode_fwd_fake_shapes(paged, key_mass):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    args = _op_args(paged, key_mass, mode)
    with mode:
        out, lse, mass, km = _ops.decode_fwd(*args)
    assert out.shape == (2, 3, 8, 64) and out.dtype == torch.float16
    assert lse.shape == (2, 8, 3) and mass.shape == (2, 8, 3, 4) and lse.dtype == mass.dtype == torch.float32
    sk_max = 48  # paged: 3 blocks of 16
    assert km.dtype == torch.float32 and km.shape == ((2, 8, sk_max, 4) if key_mass else (0,))


@pytest.mark.parametrize("paged", [0, 16])
def test_decode_fwd_under_torch_compile(emulated_cuda, paged):
    """fullgraph tracing through the custom op (its fake gives the key-mass output's shape), then the real op."""
    torch._dynamo.reset()
    args = _op_args(paged, True)
    fn = torch.compile(lambda *a: _ops.decode_fwd(*a), fullgraph=True, backend="aot_eager")
    got = fn(*args)
    want = _ops.decode_fwd(*args)
    assert got[3].shape == (2, 8, 48, 4)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert len(emulated_cuda) == 2 and all(c["key_mass"] for c in emulated_cuda)


# ------------------------------------------------------------------------------------------ CUDA kernel

gpu = pytest.mark.gpu

# (lens, sq, hq, hk, d, classes, reweight, causal, paged block size)
GPU_CASES = [
    ([1], 1, 8, 8, 64, 0, "none", True, 0),
    ([1000, 17, 1], 1, 28, 4, 128, 6, "vaf", True, 0),          # Qwen-like GQA 7, odd lengths
    ([333, 63, 111, 2048], 4, 8, 2, 64, 3, "pai", True, 16),    # paged
    ([0, 500, 0, 77], 2, 4, 2, 80, 4, "mixed", True, 32),       # empty sequences
    ([4097, 16], 16, 28, 4, 128, 8, "mixed", True, 64),         # 112 rows per kv head: row chunks
    ([300, 999], 3, 6, 3, 96, 5, "add", False, 0),              # not causal
    ([257, 100], 5, 8, 1, 256, 2, "mixed", True, 16),           # MQA, D=256
    ([5000], 1, 32, 32, 128, 0, "none", True, 256),             # MHA, no classes, paged
]


@gpu
@pytest.mark.parametrize("splits", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=_cid)
def test_cuda_kernel_matches_reference(case, dtype, splits, monkeypatch):
    if not kvcache.cuda_available():
        pytest.skip("avar_kernels._cuda is not built")
    monkeypatch.setattr(kvcache, "_FORCE_SPLITS", splits)
    lens, sq, hq, hk, d, c, rw, causal, pb = case
    check_case(lens, sq, hq, hk, d, c, rw, causal, pb, dtype, "cuda", device="cuda", seed=sum(lens) + d)


# (lens, sq, hq, hk, d, classes, reweight, causal, paged block size)
GPU_KEY_MASS_CASES = [
    ([1000, 17, 1], 1, 28, 4, 128, 6, "vaf", True, 0),          # Qwen-like GQA 7, Sq = 1, a cache of exactly Sq
    ([333, 63, 111, 2048], 16, 8, 2, 64, 3, "pai", True, 16),   # paged, Sq = 16
    ([0, 500, 0, 77], 2, 4, 2, 80, 4, "mixed", True, 32),       # empty sequences (key blocks of zeros), paged
    ([4097, 16], 16, 28, 4, 128, 8, "mixed", True, 64),         # 7 heads x 16 rows: two head chunks per CTA
    ([300, 999], 3, 6, 3, 96, 5, "add", False, 0),              # not causal
    ([257, 100], 5, 8, 1, 256, 2, "mixed", True, 16),           # MQA (8 heads x 5 rows: two chunks), D=256
    ([5000, 1], 1, 32, 32, 128, 6, "none", True, 256),          # MHA, no re-weighting, paged
]


@gpu
@pytest.mark.parametrize("splits", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_KEY_MASS_CASES, ids=_cid)
def test_cuda_key_mass_matches_reference(case, dtype, splits, monkeypatch):
    """The key-mass kernel reads the final lse of the split (splits=1) or combine kernel (splits > 1)."""
    if not kvcache.cuda_available():
        pytest.skip("avar_kernels._cuda is not built")
    monkeypatch.setattr(kvcache, "_FORCE_SPLITS", splits)
    lens, sq, hq, hk, d, c, rw, causal, pb = case
    check_case(lens, sq, hq, hk, d, c, rw, causal, pb, dtype, "cuda", device="cuda", seed=sum(lens) + d + 1,
               key_mass=True)


@gpu
@pytest.mark.parametrize("paged", [0, 16])
def test_cuda_key_mass_explicit_query_classes_and_zeros_past_the_cache(paged):
    """Several query classes among the new rows, a cache buffer longer than every cache (key blocks of zeros)."""
    if not kvcache.cuda_available():
        pytest.skip("avar_kernels._cuda is not built")
    res = check_case([70, 200, 33], 16, 8, 2, 128, 5, "mixed", True, paged, torch.bfloat16, "cuda", device="cuda",
                     seed=14, sk_max=320, explicit_qc=True, key_mass=True)
    assert res.key_mass.shape == (3, 8, 320, 5)
    assert (res.key_mass[0, :, 70:] == 0).all() and (res.key_mass[2, :, 33:] == 0).all()
    # the plain outputs do not change when key masses are asked
    gen = torch.Generator().manual_seed(14)
    q, k, v, table, kc = make_cache([70, 200, 33], 16, 8, 2, 128, 5, gen, paged_block=paged, sk_max=320)
    args = (q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(),
            torch.tensor([70, 200, 33], dtype=torch.int32, device="cuda"), kc.cuda())
    kw = dict(block_table=None if table is None else table.cuda(), return_lse=True, backend="cuda")
    a = attention_with_kvcache(*args, return_key_mass=True, **kw)
    b = attention_with_kvcache(*args, **kw)
    for name in ("out", "mass", "lse"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=0, rtol=0)


@gpu
def test_cuda_kernel_all_empty_and_auto_dispatch():
    if not kvcache.cuda_available():
        pytest.skip("avar_kernels._cuda is not built")
    gen = torch.Generator().manual_seed(9)
    q, k, v, _, kc = make_cache([0, 0], 1, 8, 2, 128, 3, gen, sk_max=64)
    q, k, v, kc = q.cuda().half(), k.cuda().half(), v.cuda().half(), kc.cuda()
    res = attention_with_kvcache(q, k, v, torch.zeros(2, dtype=torch.int32, device="cuda"), kc, num_classes=3,
                                 return_lse=True)  # auto -> the CUDA kernel
    assert torch.equal(res.out, torch.zeros_like(res.out))
    assert torch.equal(res.mass, torch.zeros_like(res.mass))
    assert torch.isinf(res.lse).all()


@gpu
def test_cuda_kernel_non_contiguous_q_and_strided_cache():
    if not kvcache.cuda_available():
        pytest.skip("avar_kernels._cuda is not built")
    gen = torch.Generator().manual_seed(10)
    lens = [70, 200]
    q, k, v, _, kc = make_cache(lens, 2, 8, 2, 64, 3, gen, sk_max=256)
    # caches as [B, Hk, S, D] viewed as [B, S, Hk, D] (strided, still 16-byte friendly)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2).cuda().half()
    vt = v.transpose(1, 2).contiguous().transpose(1, 2).cuda().half()
    qt = q.transpose(1, 2).contiguous().transpose(1, 2).cuda().half()
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    a = attention_with_kvcache(qt, kt, vt, sl, kc.cuda(), return_lse=True, backend="cuda")
    b = attention_with_kvcache(q.cuda().half(), k.cuda().half(), v.cuda().half(), sl, kc.cuda(), return_lse=True,
                               backend="cuda")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ nvcc check

def test_nvcc_check_passes():
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no nvcc on this machine")
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "nvcc_check: OK" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AVAR_NVCC_CHECK_FULL") != "1",
                    reason="every head dim compiles in ~3 min: run with AVAR_NVCC_CHECK_FULL=1")
def test_nvcc_check_full_passes():
    """Every head-dim instantiation for sm_80 and sm_90a."""
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no nvcc on this machine")
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "nvcc_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "AVAR_NVCC_CHECK_FULL": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all head dims" in proc.stdout


def test_sass_profile_of_the_decode_kernels():
    """bench/sass_decode.py compiles the kernels and reads their SASS: the split kernel's key loop runs on the tensor
    cores (per warp and 16 keys at D = 64: 8 HMMA for Q K^T, 8 for P V, 1 for the masses) without spills."""
    import importlib.util
    import sys

    script = os.path.join(ROOT, "bench", "sass_decode.py")
    spec = importlib.util.spec_from_file_location("sass_decode", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.find_tool("nvcc") is None or mod.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump (the CUDA toolkit or the triton wheel's copy)")
    proc = subprocess.run([sys.executable, script, "--arch", "90a", "--head-dim", "64"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| decode_split_kernel")]
    assert len(rows) == 2, proc.stdout  # fp16, bf16
    for row in rows:
        cells = [c.strip() for c in row[1:-1]]
        assert cells[2] == "0", f"spills: {cells}"
        assert int(cells[5]) == 17, f"HMMA in the key loop: {cells}"


def test_known_lengths_skip_the_host_read(monkeypatch):
    """Inside kvcache_lengths_known() (with trusted class ids and a given num_classes) the decode checks read nothing
    back; outside, one read serves every check. Same results either way."""
    from avar_kernels import _checks

    reads = []
    real = _checks.kvcache_stats
    monkeypatch.setattr(_checks, "kvcache_stats", lambda *a, **kw: reads.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(5)
    q, k, v, _, kc = make_cache([40, 90], 1, 8, 2, 64, 3, gen)
    args = (q, k, v, torch.tensor([40, 90], dtype=torch.int32), kc)
    plain = attention_with_kvcache(*args, num_classes=3, return_lse=True)
    assert len(reads) == 1
    with _checks.class_ids_checked(), _checks.kvcache_lengths_known():
        known = attention_with_kvcache(*args, num_classes=3, return_lse=True)
        no_classes = attention_with_kvcache(*args[:4], return_lse=True)
    assert len(reads) == 1
    for x, y in zip(plain, known):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    torch.testing.assert_close(no_classes.out, attention_with_kvcache(*args[:4]).out, atol=0, rtol=0)
