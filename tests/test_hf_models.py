"""The "avar" attention inside tiny random-weight VLMs: logits against sdpa/eager, packing, generate()."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import avar_kernels.hf as ah  # noqa: E402
from avar_kernels.hf import testing as T  # noqa: E402

warnings.filterwarnings("ignore", message=".*falling back to the slow reference backend.*")
FAMILIES = list(T.BUILDERS)


def rows_for(mk):
    I = mk.image_id
    nl = T.NEWLINE
    sys_turn = [T.IM_START, 2, nl, 5, 6, 7, 8, T.IM_END, nl]
    user = [T.IM_START, 3, nl, T.VISION_START, I, T.VISION_END, 10, 11, 12, 13, T.IM_END, nl]
    asst = [T.IM_START, 4, nl, 15, 16, 17]
    short = [T.IM_START, 3, nl, I, 10, 11, T.IM_END, nl, T.IM_START, 4, nl]
    return [sys_turn + user + asst, short]


def models(family, impls=("avar", "sdpa"), **kw):
    out = {}
    ref = None
    for impl in impls:
        m, mk = T.BUILDERS[family](impl, **kw)
        if ref is None:
            ref = m.state_dict()
        else:
            m.load_state_dict(ref)
        out[impl] = m
    return out, mk


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_logits_match_sdpa(family):
    ms, mk = models(family)
    rows = rows_for(mk)
    for padding in ("left", "right"):
        kw = mk(rows, padding=padding)
        with torch.no_grad():
            a = ms["avar"](**kw).logits
            s = ms["sdpa"](**kw).logits
        valid = kw["attention_mask"].bool()
        torch.testing.assert_close(a[valid], s[valid], atol=2e-5, rtol=1e-4)
    # unpadded single row (mask None path)
    kw = mk(rows[:1])
    with torch.no_grad():
        torch.testing.assert_close(ms["avar"](**kw).logits, ms["sdpa"](**kw).logits, atol=2e-5, rtol=1e-4)


def _packed_positions(lengths, family):
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return pos[None].expand(4, 1, -1).clone() if family != "llava" else pos


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_packed_batch_matches_separate_rows(family):
    ms, mk = models(family)
    convs = [[T.IM_START, 2, T.NEWLINE, 5, 6, T.IM_END, T.IM_START, 3, T.NEWLINE, 10, 11],
             [T.IM_START, 3, T.NEWLINE, 12, 13, 14, T.IM_END], [T.IM_START, 4, 15]]
    ids = torch.tensor([sum(convs, [])])
    pos = _packed_positions([len(c) for c in convs], family)
    with torch.no_grad():
        pa = ms["avar"](input_ids=ids, position_ids=pos, use_cache=False).logits
        ps = ms["sdpa"](input_ids=ids, position_ids=pos, use_cache=False).logits
        sep = torch.cat([ms["sdpa"](input_ids=torch.tensor([c]), use_cache=False).logits for c in convs], 1)
    torch.testing.assert_close(pa, ps, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pa, sep, atol=2e-5, rtol=1e-4)
    if family == "llava":    # the flash-attention style kwargs (DataCollatorWithFlattening)
        lens = torch.tensor([0] + [len(c) for c in convs]).cumsum(0).to(torch.int32)
        mx = max(len(c) for c in convs)
        with torch.no_grad():
            pk = ms["avar"](input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=lens,
                            cu_seq_lens_k=lens, max_length_q=mx, max_length_k=mx).logits
        torch.testing.assert_close(pk, sep, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_generate_same_tokens(family):
    ms, mk = models(family)
    kw = mk(rows_for(mk), padding="left")
    outs = {}
    for impl, m in ms.items():
        with torch.no_grad():
            outs[impl] = m.generate(**kw, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(outs["avar"], outs["sdpa"])


def test_sliding_window_text_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**dict(T.TEXT, num_hidden_layers=2), use_sliding_window=True, sliding_window=3,
                      max_window_layers=1)
    torch.manual_seed(0)
    res = {}
    m0 = None
    ids = torch.randint(0, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for impl in ("avar", "sdpa"):
        m = Qwen2ForCausalLM._from_config(cfg, attn_implementation=impl).eval()
        if m0 is None:
            m0 = m.state_dict()
        m.load_state_dict(m0)
        assert "sliding_attention" in m.config.layer_types
        with torch.no_grad():
            res[impl] = (m(input_ids=ids).logits, m(input_ids=ids, attention_mask=mask).logits,
                         m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                    min_new_tokens=4))
    torch.testing.assert_close(res["avar"][0], res["sdpa"][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(res["avar"][1][mask.bool()], res["sdpa"][1][mask.bool()], atol=2e-5, rtol=1e-4)
    assert torch.equal(res["avar"][2], res["sdpa"][2])


def test_register_idempotent_and_set_attn_implementation():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert ah.register() == "avar" and ah.register() == "avar"
    assert AttentionInterface._global_mapping["avar"] is ah.avar_attention
    assert AttentionMaskInterface._global_mapping["avar"] is sdpa_mask
    m, mk = T.qwen2_vl("sdpa")
    kw = mk(rows_for(mk), padding="left")
    with torch.no_grad():
        s = m(**kw).logits
        m.set_attn_implementation({"text_config": "avar", "vision_config": "sdpa"})
        assert m.config.text_config._attn_implementation == "avar"
        assert m.config.vision_config._attn_implementation == "sdpa"
        a = m(**kw).logits
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(a[valid], s[valid], atol=2e-5, rtol=1e-4)


def test_from_pretrained_with_dict(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    m, mk = T.qwen2_5_vl("sdpa")
    m.save_pretrained(tmp_path)
    m2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation={"text_config": "avar", "vision_config": "sdpa"})
    assert m2.config.text_config._attn_implementation == "avar"
    kw = mk(rows_for(mk), padding="right")
    with torch.no_grad():
        valid = kw["attention_mask"].bool()
        torch.testing.assert_close(m2.eval()(**kw).logits[valid], m(**kw).logits[valid], atol=2e-5, rtol=1e-4)


class _Mod(torch.nn.Module):
    is_causal = True
    layer_idx = 0
    num_key_value_groups = 2


def _eager(q, k, v, mask, scale):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    p = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def test_custom_mask_uses_fallback_with_warning():
    from avar_kernels import _backends

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 9, 8, generator=g) for n in (4, 2, 2))
    mask = torch.rand(2, 1, 9, 9, generator=g) > 0.4
    mask |= torch.eye(9, dtype=torch.bool)
    _backends._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="fallback"):
        out, w = ah.avar_attention(_Mod(), q, k, v, mask, scaling=0.3)
    assert w is None and out.shape == (2, 9, 4, 8)
    torch.testing.assert_close(out, _eager(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-4)


def test_decode_mask_with_left_padding_compiles_to_varlen():
    from avar_kernels.hf import attention as A

    g = torch.Generator().manual_seed(1)
    sk, sq = 10, 2
    q = torch.randn(2, 4, sq, 8, generator=g)
    k, v = (torch.randn(2, 2, sk, 8, generator=g) for _ in range(2))
    pos = torch.arange(sk)
    mask = (pos[None, :] <= (pos[sk - sq:, None]))[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = False                     # row 1: three left-pad keys
    plan = A.compile_mask(mask, sq, sk, True, None)
    assert plan.kind == "varlen" and plan.cu_k.tolist() == [0, 10, 13, 20] and plan.cu_q.tolist() == [0, 2, 2, 4]
    out, _ = ah.avar_attention(_Mod(), q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(out, _eager(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_generate_on_gpu_uses_decode_kernel(monkeypatch):
    from avar_kernels import kvcache

    if not kvcache.cuda_available():
        pytest.fail("the CUDA decode extension is not built (pip install -e . on the GPU machine)")
    calls = []
    run_cuda = kvcache._run_cuda
    monkeypatch.setattr(kvcache, "_run_cuda", lambda *a, **kw: calls.append(1) or run_cuda(*a, **kw))
    ms, mk = models("qwen2_5_vl")
    kw = {n: t.cuda() for n, t in mk(rows_for(mk)[:1]).items()}
    avar, sdpa = (ms[i].to("cuda", torch.float16) for i in ("avar", "sdpa"))
    with torch.no_grad():
        gen = avar.generate(**kw, max_new_tokens=5, do_sample=False, min_new_tokens=5, output_scores=True,
                            return_dict_in_generate=True)
        assert calls, "the decode steps did not reach the CUDA kernel"
        # Each step's logits must match one cache-free sdpa forward over the generated sequence.
        full = dict(kw, input_ids=gen.sequences, attention_mask=torch.ones_like(gen.sequences))
        full["mm_token_type_ids"] = (gen.sequences == mk.image_id).long()
        logits = sdpa(**full).logits.float()
    start = kw["input_ids"].shape[1] - 1
    for i, step in enumerate(gen.scores):
        torch.testing.assert_close(step.float(), logits[:, start + i], atol=3e-2, rtol=3e-2)
