"""The CUDA decode kernels (csrc/cuda/decode.cu) run on the CPU under the warp emulator (csrc/cuda/emulate/simt.h).

The same source as the GPU build, compiled by the host compiler with -DAVAR_DECODE_EMULATE together with the torch
binding, becomes a module that takes CPU tensors; installed as ``avar_kernels._cuda``, it serves
``attention_with_kvcache(..., backend="cuda")`` end to end (binding checks, split planner, split / combine /
key-mass kernels). The cases are the GPU tests' (tests/test_kvcache.py), with caches capped near 1k keys: the
emulator runs every thread of every CTA as a fiber, about 10^5 times slower than a GPU. Outputs start as NaN, so an
element a kernel forgets shows. What this cannot check: speed, and the tensor cores' exact rounding (the emulated
mma accumulates in double) — the gpu-marked tests of tests/test_kvcache.py do, on a GPU.
"""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_kvcache import GPU_CASES, GPU_KEY_MASS_CASES, _cid, check_case, install_cuda_binding

from avar_kernels import kvcache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include():
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_bf16.h")):
            return os.path.join(home, "include")
    return None


@pytest.fixture(scope="module")
def emulated_module():
    """Builds (once per checkout; ninja rebuilds on a source change) the emulated extension under build/."""
    include = _cuda_include()
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_bf16.h): the emulated build needs them, not a GPU")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", "decode_emulated")
    os.makedirs(build, exist_ok=True)
    return load(name="avar_decode_emulated", sources=[os.path.join(ROOT, "csrc", "cuda", "emulate",
                                                                   "decode_emulated.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc", "cuda"), include],
                extra_cflags=["-O2", "-std=c++17", "-DAVAR_DECODE_EMULATE=1"], build_directory=build)


@pytest.fixture
def emulated_kernels(emulated_module, monkeypatch):
    """kvcache.py takes its CUDA path for CPU tensors, and avar_kernels._cuda is the emulated build."""
    install_cuda_binding(monkeypatch, emulated_module)
    return emulated_module


def _capped(case):
    """The case with its caches capped near 1k keys (odd lengths stay odd-ish, several splits and chunks remain)."""
    lens = [min(n, 1024 + n % 7) for n in case[0]]
    return (lens, *case[1:])


@pytest.mark.parametrize("splits", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [_capped(c) for c in GPU_CASES], ids=_cid)
def test_emulated_kernel_matches_reference(emulated_kernels, case, dtype, splits, monkeypatch):
    monkeypatch.setattr(kvcache, "_FORCE_SPLITS", splits)
    lens, sq, hq, hk, d, c, rw, causal, pb = case
    check_case(lens, sq, hq, hk, d, c, rw, causal, pb, dtype, "cuda", seed=sum(lens) + d)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", [_capped(c) for c in GPU_KEY_MASS_CASES], ids=_cid)
def test_emulated_key_mass_matches_reference(emulated_kernels, case, splits, monkeypatch):
    """The key-mass kernel reads the final lse of the split (splits=1) or combine kernel (splits > 1)."""
    monkeypatch.setattr(kvcache, "_FORCE_SPLITS", splits)
    lens, sq, hq, hk, d, c, rw, causal, pb = case
    check_case(lens, sq, hq, hk, d, c, rw, causal, pb, torch.bfloat16, "cuda", seed=sum(lens) + d + 1,
               key_mass=True)


@pytest.mark.parametrize("paged", [0, 16])
def test_emulated_key_mass_query_classes_and_zeros_past_the_cache(emulated_kernels, paged):
    """Several query classes among the new rows; a cache buffer longer than every cache (key blocks of zeros)."""
    res = check_case([70, 200, 33], 16, 8, 2, 128, 5, "mixed", True, paged, torch.float16, "cuda", seed=14,
                     sk_max=320, explicit_qc=True, key_mass=True)
    assert (res.key_mass[0, :, 70:] == 0).all() and (res.key_mass[2, :, 33:] == 0).all()


def test_emulated_empty_caches_and_nan_rows(emulated_kernels):
    """Empty caches give out = 0, mass = 0, lse = -inf; a NaN in q makes its row's out, mass and lse NaN only."""
    from test_kvcache import make_cache

    gen = torch.Generator().manual_seed(9)
    q, k, v, _, kc = make_cache([0, 0], 1, 8, 2, 128, 3, gen, sk_max=64)
    res = kvcache.attention_with_kvcache(q.half(), k.half(), v.half(), torch.zeros(2, dtype=torch.int32), kc,
                                         num_classes=3, return_lse=True, backend="cuda")
    assert torch.equal(res.out, torch.zeros_like(res.out)) and torch.equal(res.mass, torch.zeros_like(res.mass))
    assert torch.isinf(res.lse).all() and (res.lse < 0).all()

    q, k, v, _, kc = make_cache([40, 90], 1, 8, 2, 64, 3, gen)
    q[1, 0, 5, 7] = float("nan")  # sequence 1, query head 5
    res = kvcache.attention_with_kvcache(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                         torch.tensor([40, 90], dtype=torch.int32), kc, num_classes=3,
                                         return_lse=True, backend="cuda")
    bad = torch.zeros(2, 8, dtype=torch.bool)
    bad[1, 5] = True
    assert res.out.isnan().any(-1)[:, 0].eq(bad).all()
    assert res.lse.isnan()[:, :, 0].eq(bad).all()
    assert res.mass.isnan().any(-1)[:, :, 0].eq(bad).all()


@pytest.mark.parametrize("seed", range(40))
def test_emulated_random_shapes(emulated_kernels, seed, monkeypatch):
    """Seeded random shapes: head dim, GQA group, Sq, odd and empty caches, classes, tables, paging, causal or not,
    forced split counts, key masses."""
    import random

    r = random.Random(seed)
    d = r.choice([64, 80, 96, 128, 256])
    hk, group = r.choice([1, 2, 3]), r.choice([1, 2, 4, 5, 7, 8])
    sq = r.choice([1, 1, 2, 3, 7, 16])
    lens = [r.choice([0, sq, r.randint(sq, 700)]) for _ in range(r.randint(1, 3))]
    c = r.choice([0, 1, 3, 8])
    rw = r.choice(["none", "vaf", "pai", "add", "mixed"]) if c else "none"
    paged = r.choice([0, 16, 48])
    monkeypatch.setattr(kvcache, "_FORCE_SPLITS", r.choice([0, 1, 2, 5]))
    dtype = r.choice([torch.float16, torch.bfloat16])
    key_mass = c > 0 and r.random() < 0.5
    check_case(lens, sq, hk * group, hk, d, c, rw, r.random() < 0.7, paged, dtype, "cuda", seed=seed,
               explicit_qc=c > 0 and r.random() < 0.5, key_mass=key_mass)


def test_emulated_kernel_in_model_generation(emulated_kernels, monkeypatch):
    """generate() on a tiny bf16 Llava (head dim 64) with "avar" attention takes the decode kernel on every step after
    the prefill, without reading anything back to the host; teacher-forced logits of the whole sequence through the
    packed path agree with each step's."""
    pytest.importorskip("transformers")
    from test_hf_models import rows_for

    from avar_kernels.hf import attention as hf_attention
    from avar_kernels.hf import testing as T

    calls = []
    real_decode = emulated_kernels.decode_fwd
    monkeypatch.setattr(emulated_kernels, "decode_fwd", lambda *a, **kw: calls.append(a[0].shape) or
                        real_decode(*a, **kw))
    gpu_only = hf_attention._use_decode_kernel  # the same conditions, minus q.is_cuda
    monkeypatch.setattr(hf_attention, "_use_decode_kernel", lambda q, sq, sk, causal, window: gpu_only(
        SimpleNamespace(is_cuda=True, shape=q.shape, dtype=q.dtype), sq, sk, causal, window))
    from avar_kernels import _checks

    reads = []  # the decode checks' host reads (a sync per layer and step on a GPU)
    real_stats = _checks.kvcache_stats
    monkeypatch.setattr(_checks, "kvcache_stats", lambda *a, **kw: reads.append(1) or real_stats(*a, **kw))
    model, mk = T.llava("avar", head_dim=64)
    model = model.to(torch.bfloat16)
    kw = mk(rows_for(mk)[:1])
    kw["pixel_values"] = kw["pixel_values"].to(torch.bfloat16)
    n = 4
    with torch.no_grad():
        gen = model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert calls == [torch.Size([1, 1, 4, 64])] * (2 * (n - 1))  # 2 layers x the n - 1 steps after the prefill
    assert reads == []  # the integration passes lengths it knows: no read-back

    monkeypatch.setattr(hf_attention, "_use_decode_kernel", lambda *a: False)
    seq, s0 = gen.sequences, kw["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**dict(kw, input_ids=seq[:, :-1], attention_mask=torch.ones_like(seq[:, :-1]))).logits
    for i in range(n):
        torch.testing.assert_close(gen.logits[i][0].float(), logits[0, s0 - 1 + i].float(), atol=1e-2, rtol=2e-2)


def test_emulated_many_splits(emulated_kernels, monkeypatch):
    """A forced split count far above the default: 33 splits of 64 keys, merged by the combine kernel."""
    monkeypatch.setattr(kvcache, "_FORCE_SPLITS", 64)
    check_case([2100, 77], 2, 4, 2, 64, 3, "mixed", True, 0, torch.bfloat16, "cuda", seed=3, key_mass=True)
