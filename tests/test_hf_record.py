"""record / intervene inside tiny VLMs: masses vs eager attention weights, gradients, checkpointing, generate."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_models import models, rows_for  # noqa: E402
from test_kvcache import emulated_cuda  # noqa: E402,F401 - the fixture

import avar_kernels  # noqa: E402
import avar_kernels.hf as ah  # noqa: E402
from avar_kernels import IMAGE, RESPONSE, SYSTEM, USER  # noqa: E402
from avar_kernels.hf import testing as T  # noqa: E402

warnings.filterwarnings("ignore", message=".*falling back to the slow reference backend.*")
C = ah.NUM_CLASSES
TOK = T.chatml_tokenizer()


def classes_of(kw):
    return ah.token_classes(kw["input_ids"], TOK, attention_mask=kw["attention_mask"])


def eager_mass(attn, cls):
    return attn.float() @ torch.nn.functional.one_hot(cls, C).float()[:, None]       # [B, H, S, C]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_record_matches_eager_weights(family):
    ms, mk = models(family, ("avar", "eager"))
    kw = mk(rows_for(mk), padding="left")
    cls = classes_of(kw)
    assert (cls == IMAGE).any() and (cls == SYSTEM).any() and (cls == USER).any() and (cls == RESPONSE).any()
    with torch.no_grad():
        with ah.record(ms["avar"], cls) as rec:
            la = ms["avar"](**kw).logits
        out = ms["eager"](**kw, output_attentions=True)
    valid = kw["attention_mask"].bool()
    torch.testing.assert_close(la[valid], out.logits[valid], atol=2e-5, rtol=1e-4)
    assert rec.layers == [0, 1] and len(rec.mass) == 2
    for l, m in enumerate(rec.mass):
        assert m.shape == (2, 4, cls.shape[1], C) and m.dtype == torch.float32
        want = eager_mass(out.attentions[l], cls)
        torch.testing.assert_close(m.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=1e-4)
        assert (m.permute(0, 2, 1, 3)[~valid] == 0).all()      # padding rows: mass 0


def test_record_layers_and_reduce():
    ms, mk = models("qwen2_vl", ("avar",), layers=3)
    kw = mk(rows_for(mk), padding="right")
    cls = classes_of(kw)
    with torch.no_grad():
        with ah.record(ms["avar"], cls) as full:
            ms["avar"](**kw)
        with ah.record(ms["avar"], cls, layers={2}, reduce="mean_heads") as part:
            ms["avar"](**kw)
        with ah.record(ms["avar"], cls, layers=range(1, 3), reduce=lambda m: m[..., IMAGE].sum(-1)) as tiny:
            ms["avar"](**kw)
    assert part.layers == [2] and part.mass[0].shape == (2, cls.shape[1], C)
    torch.testing.assert_close(part.mass[0], full.mass[2].mean(1))
    assert tiny.layers == [1, 2] and tiny.mass[0].shape == (2, 4)
    # the hook is gone after the contexts
    assert not ms["avar"].model.language_model._forward_pre_hooks


def test_record_packed_batch():
    ms, mk = models("llava", ("avar", "eager"))
    convs = [[T.IM_START, 2, T.NEWLINE, 5, 6, T.IM_END, T.IM_START, 3, T.NEWLINE, 10, 11],
             [T.IM_START, 3, T.NEWLINE, 12, 13, T.IM_END, T.IM_START, 4, T.NEWLINE, 15]]
    ids = torch.tensor([sum(convs, [])])
    pos = torch.cat([torch.arange(len(c)) for c in convs])[None]
    cls = ah.token_classes(ids, TOK)
    with torch.no_grad():
        with ah.record(ms["avar"], cls) as rec:
            ms["avar"](input_ids=ids, position_ids=pos, use_cache=False)
        out = ms["eager"](input_ids=ids, position_ids=pos, use_cache=False, output_attentions=True)
    for l in range(2):
        torch.testing.assert_close(rec.mass[l], eager_mass(out.attentions[l], cls), atol=1e-5, rtol=1e-4)
    # no mass crosses the packing boundary: the second conversation has no system key
    assert (rec.mass[0][0, :, len(convs[0]):, SYSTEM] == 0).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_record_during_generate(family):
    ms, mk = models(family, ("avar", "eager"))
    kw = mk(rows_for(mk), padding="left")
    cls = classes_of(kw)
    n = 4
    with torch.no_grad(), ah.record(ms["avar"], cls) as rec:
        seq = ms["avar"].generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    s0 = kw["input_ids"].shape[1]
    assert rec.classes.shape == (2, s0 + n - 1) and (rec.classes[:, s0:] == RESPONSE).all()
    assert rec.mass[0].shape == (2, 4, s0 + n - 1, C)
    # the same rows from one eager forward over the generated sequence (minus its last token)
    full = dict(kw)
    full["input_ids"] = seq[:, :-1]
    full["attention_mask"] = torch.cat([kw["attention_mask"], torch.ones(2, n - 1, dtype=torch.long)], 1)
    if "mm_token_type_ids" in kw:
        full["mm_token_type_ids"] = torch.nn.functional.pad(kw["mm_token_type_ids"], (0, n - 1))
    with torch.no_grad():
        out = ms["eager"](**full, output_attentions=True)
    for l in range(2):
        want = eager_mass(out.attentions[l], rec.classes)
        torch.testing.assert_close(rec.mass[l][:, :, s0:], want[:, :, s0:], atol=1e-5, rtol=1e-4)


def _eager_reweight_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Test oracle: eager attention with the same class-wise score change, written out."""
    from transformers.integrations.sdpa_attention import repeat_kv

    b, h, s, d = query.shape
    k = repeat_kv(key, h // key.shape[1])
    v = repeat_kv(value, h // key.shape[1])
    z = (query @ k.transpose(-1, -2)) * scaling
    ctx, cls = kw.get("avar_context"), kw.get("avar_classes")
    rw = ctx.reweight(module.layer_idx, h, query.device) if ctx is not None else None
    if rw is not None:
        kc = cls[:, -k.shape[2]:]
        qc = kw["avar_query_classes"][:, -k.shape[2]:][:, -s:]
        mul, abs_, add = rw.tables(h, ctx.num_classes, query.device)
        sel = lambda t: t[:, qc[:, :, None], kc[:, None, :]].permute(1, 0, 2, 3)   # noqa: E731
        z0 = z
        z = z0 + (z0 * sel(mul) if mul is not None else 0) + (z0.abs() * sel(abs_) if abs_ is not None else 0) \
            + (sel(add) if add is not None else 0)
    if attention_mask is None:
        attention_mask = torch.ones(s, k.shape[2], dtype=torch.bool).tril(k.shape[2] - s)[None, None]
    z = z.masked_fill(~attention_mask, float("-inf"))
    p = torch.softmax(z, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).contiguous(), p


def _register_oracle():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("avar_test_oracle", _eager_reweight_attention)
    AttentionMaskInterface.register("avar_test_oracle", sdpa_mask)


@pytest.mark.parametrize("preset", ["vaf", "pai", "class_bias", "per_head"])
def test_intervene_matches_eager_oracle(preset):
    _register_oracle()
    ms, mk = models("qwen2_5_vl", ("avar", "avar_test_oracle"), layers=3)
    kw = mk(rows_for(mk), padding="left")
    cls = classes_of(kw)
    spec = {"vaf": (ah.vaf(0.5, 0.3), {}), "pai": (ah.pai(0.8), {}),
            "class_bias": (ah.class_bias(factor={IMAGE: 3.0, SYSTEM: 0.5}), {"rows": {USER}}),
            "per_head": (avar_kernels.Reweight(mul=torch.tensor([0, 1.0, -0.5, 0, 0.3, 0])),
                         {"heads": {1, 3}, "layers": {0, 2}})}[preset]
    valid = kw["attention_mask"].bool()
    with torch.no_grad():
        base = ms["avar"](**kw).logits
        res = {}
        for impl, m in ms.items():
            with ah.intervene(m, spec[0], token_classes=cls, **spec[1]):
                res[impl] = m(**kw).logits
    torch.testing.assert_close(res["avar"][valid], res["avar_test_oracle"][valid], atol=2e-5, rtol=1e-4)
    assert (res["avar"][valid] - base[valid]).abs().max() > 1e-4        # it did change something


def test_presets_tables_and_rows():
    from avar_kernels.hf.record import controller
    from avar_kernels.hf.rows import NUM_SIGNATURES, row_signatures, signature_parts

    ms, _ = models("qwen2_vl", ("avar",), layers=3)
    ctl = controller(ms["avar"])
    # [system, image x2, user, other (header), response]: rows after the image and rows predicting a response
    cls = torch.tensor([[SYSTEM, IMAGE, IMAGE, USER, 0, RESPONSE, RESPONSE]])
    parts = [signature_parts(int(x)) for x in row_signatures(cls)[0]]
    assert [p[1] for p in parts] == [False, False, False, True, True, True, True]      # after the image
    assert [p[2] for p in parts] == [False, False, False, False, True, True, True]     # predicts a response token
    with ah.intervene(ms["avar"], ah.pai(0.2), token_classes=cls):
        plan = ctl.plan()
        assert plan.reweight(0, 4, "cpu") is None and plan.reweight(1, 4, "cpu") is None
        qc = plan.query_classes(cls)[0].tolist()
        steered = {qc[i] for i in (4, 5, 6)}
        assert len(steered) == 1 and not steered & {qc[i] for i in (0, 1, 2, 3)}
        _, abs_, _ = plan.reweight(2, 4, "cpu").tables(4, plan.num_classes, "cpu")
        g = steered.pop()
        assert abs_[:, g, IMAGE].eq(0.2).all() and abs_.sum().item() == pytest.approx(4 * 0.2)
        with ah.intervene(ms["avar"], ah.vaf(0.15, 0.05)):              # composes (tables add)
            plan2 = ctl.plan()
            qc2 = plan2.query_classes(cls)[0].tolist()
            mul, abs2, _ = plan2.reweight(2, 4, "cpu").tables(4, plan2.num_classes, "cpu")
            assert mul[:, qc2[3], IMAGE].eq(0.15).all() and mul[:, qc2[4], SYSTEM].eq(-0.05).all()
            assert mul[:, qc2[0]].eq(0).all() and abs2[:, qc2[3]].eq(0).all() and abs2[:, qc2[5], IMAGE].eq(0.2).all()
            assert len(set(qc2)) == 3 and plan2.lut.shape == (NUM_SIGNATURES,)     # none, vaf, vaf + pai
    assert ctl.plan() is None


def test_intervene_bad_layers_and_rows():
    ms, _ = models("qwen2_vl", ("avar",), layers=3)
    with pytest.raises(ValueError, match=r"layers: the model has layers 0..2, got \[3, 4, 5\]"):
        with ah.intervene(ms["avar"], ah.vaf(layers=range(3, 6))):
            pass
    with pytest.raises(ValueError, match="layers: starts at 3"):
        with ah.intervene(ms["avar"], ah.pai(start_layer=3)):
            pass
    with pytest.raises(ValueError, match="rows: expected 'after_image'"):
        with ah.intervene(ms["avar"], ah.vaf(), rows="everything"):
            pass


def _published_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Eager attention with PAI's / ClearSight's score change written out as the published code applies it, on
    the spans of ``_PUBLISHED["classes"]`` (the prompt's token classes; generated tokens follow)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    cfg = _PUBLISHED
    b, h, s, d = query.shape
    k = repeat_kv(key, h // key.shape[1])
    v = repeat_kv(value, h // key.shape[1])
    sk = k.shape[2]
    z = (query @ k.transpose(-1, -2)) * scaling
    cls = torch.nn.functional.pad(cfg["classes"], (0, max(0, sk - cfg["classes"].shape[1])), value=RESPONSE)[:, :sk]
    img = (cls == IMAGE)[:, None, None, :]                                                   # [B, 1, 1, Sk]
    if cfg["method"] == "pai" and module.layer_idx >= 2:
        # PAI: attn[:, :, -1, image] = attn[:, :, -1, image].abs() * alpha + attn[:, :, -1, image], pre-softmax
        last = z[:, :, -1:, :]
        z = torch.cat([z[:, :, :-1], torch.where(img, last + cfg["alpha"] * last.abs(), last)], 2)
    if cfg["method"] == "vaf":
        # ClearSight VAF: rows after the image span; image-key scores x (1 + a), system-key scores x (1 - b)
        first = (cls == IMAGE).float().argmax(1)                                             # [B]
        qpos = torch.arange(sk - s, sk)
        qcls = cls[:, sk - s:]
        rows = ((qpos[None] > first[:, None]) & (qcls != IMAGE))[:, None, :, None]          # [B, 1, S, 1]
        sys_ = (cls == SYSTEM)[:, None, None, :]
        z = torch.where(rows & img, z * (1 + cfg["alpha"]), z)
        z = torch.where(rows & sys_, z * (1 - cfg["alpha_sys"]), z)
    if attention_mask is None:
        attention_mask = torch.ones(s, sk, dtype=torch.bool).tril(sk - s)[None, None]
    z = z.masked_fill(~attention_mask, float("-inf"))
    p = torch.softmax(z, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).contiguous(), p


_PUBLISHED = {}


@pytest.mark.parametrize("method", ["pai", "vaf"])
def test_presets_match_published_formulas(method):
    """Each preset's logits, the first generated token's included, equal the published formula applied on the
    published rows (PAI: row -1 of every forward, layers >= 2; ClearSight: every row after the image)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("avar_test_published", _published_attention)
    AttentionMaskInterface.register("avar_test_published", sdpa_mask)
    ms, mk = models("qwen2_5_vl", ("avar", "avar_test_published"), layers=4)
    kw = mk(rows_for(mk)[:1])                     # one prompt ending with the assistant header
    cls = classes_of(kw)
    preset = ah.pai(0.8) if method == "pai" else ah.vaf(0.5, 0.3)
    _PUBLISHED.update(method=method, classes=cls, alpha=0.8 if method == "pai" else 0.5, alpha_sys=0.3)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = ms["avar"].generate(**kw, **gen)
        with ah.intervene(ms["avar"], preset, token_classes=cls):
            steered = ms["avar"].generate(**kw, **gen)
        published = ms["avar_test_published"].generate(**kw, **gen)
    torch.testing.assert_close(steered.sequences, published.sequences)
    for step, (a, b) in enumerate(zip(steered.scores, published.scores)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m, step=step: f"step {step}: {m}")
    # the first generated token's distribution moves (the last prompt row is steered); -inf: suppressed tokens
    finite = plain.scores[0].isfinite()
    assert (steered.scores[0] - plain.scores[0])[finite].abs().max() > 1e-4


def _mass_loss(rec, kw, weights):
    valid = kw["attention_mask"].float()[:, None, :, None]
    return sum(((m * valid) * weights[l]).sum() for l, m in enumerate(rec))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_mass_loss_gradient_matches_eager(family):
    ms, mk = models(family, ("avar", "eager"))
    kw = mk(rows_for(mk), padding="right")
    cls = classes_of(kw)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(2, C, generator=g)
    grads = {}
    for impl, m in ms.items():
        m.zero_grad()
        if impl == "avar":
            with ah.record(m, cls) as rec:
                out = m(**kw)
            masses = rec.mass
        else:
            out = m(**kw, output_attentions=True)
            masses = [eager_mass(a, cls) for a in out.attentions]
        loss = _mass_loss(masses, kw, weights) + out.logits[kw["attention_mask"].bool()].pow(2).mean()
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads["avar"].keys() == grads["eager"].keys()
    for n in grads["avar"]:
        torch.testing.assert_close(grads["avar"][n], grads["eager"][n], atol=1e-5, rtol=1e-3, msg=n)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_same_gradients():
    ms, mk = models("qwen2_5_vl", ("avar",))
    m = ms["avar"]
    kw = mk(rows_for(mk), padding="left")
    cls = classes_of(kw)
    weights = torch.randn(2, C, generator=torch.Generator().manual_seed(2))
    m.train()
    grads = []
    for ckpt in (False, True):
        if ckpt:
            m.gradient_checkpointing_enable()
        m.zero_grad()
        with ah.record(m, cls) as rec, ah.intervene(m, ah.vaf(0.3, 0.1)):
            out = m(**kw, use_cache=False)
        # backward runs after the contexts closed: the recomputation must still take the same path
        assert len(rec.mass) == 2 and len(rec.chunks[0]) == 1          # not stored twice on recomputation
        loss = _mass_loss(rec.mass, kw, weights) + out.logits[kw["attention_mask"].bool()].pow(2).mean()
        loss.backward()
        assert len(rec.chunks[0]) == 1
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert m.is_gradient_checkpointing
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_intervene_needs_classes():
    ms, mk = models("llava", ("avar",))
    kw = mk(rows_for(mk))
    with ah.intervene(ms["avar"], ah.vaf()), pytest.raises(ValueError, match="no token classes"):
        ms["avar"](**kw)


def test_class_ids_read_back_once_per_forward(monkeypatch):
    """The hook checks the id range once; the layers' attention calls must not read the ids back again."""
    from avar_kernels import _checks

    reads = []
    real = _checks.read_class_range
    monkeypatch.setattr(_checks, "read_class_range", lambda c: reads.append(1) or real(c))
    ms, mk = models("qwen2_5_vl", ("avar",), layers=3)
    kw = mk(rows_for(mk), padding="left")
    cls = classes_of(kw)
    with torch.no_grad(), ah.record(ms["avar"], cls) as rec:
        ms["avar"](**kw)
    assert len(rec.mass) == 3 and len(reads) == 1
    bad = cls.clone()
    bad[0, 0] = C
    with pytest.raises(ValueError, match=r"token classes: class ids must lie in \[0, num_classes=6\)"):
        with torch.no_grad(), ah.record(ms["avar"], bad):
            ms["avar"](**kw)


def eager_key_mass(attn, cls):
    """[B, H, Sq, Sk] weights summed over the query rows of each class -> [B, H, Sk, C]."""
    return attn.float().transpose(-1, -2) @ torch.nn.functional.one_hot(cls[:, -attn.shape[-2]:], C).float()[:, None]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_record_key_mass_matches_eager(family):
    ms, mk = models(family, ("avar", "eager"))
    kw = mk(rows_for(mk), padding="left")
    cls = classes_of(kw)
    with torch.no_grad():
        with ah.record(ms["avar"], cls, key_mass=True) as rec:
            ms["avar"](**kw)
        out = ms["eager"](**kw, output_attentions=True)
    valid = kw["attention_mask"].bool()
    for l, km in enumerate(rec.key_mass):
        want = eager_key_mass(out.attentions[l] * valid[:, None, :, None], cls)   # real query rows only
        assert km.shape == (2, 4, cls.shape[1], C)
        torch.testing.assert_close(km.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5,
                                   rtol=1e-4)
    maps = ah.image_heatmaps(rec.key_mass, cls, image_grid_thw=kw.get("image_grid_thw"), query_class={USER, RESPONSE})
    assert len(maps) == 2 and all(len(m) >= 1 for m in maps)
    for m in (x for sample in maps for x in sample):
        assert m.dim() == 2 and m.shape[0] == m.shape[1] and abs(float(m.sum()) - 1) < 1e-5


def _generate_key_mass_matches_eager(n=3):
    """Key masses recorded over n generated tokens equal eager weights of the whole sequence summed by query class."""
    ms, mk = models("qwen2_5_vl", ("avar", "eager"))
    kw = mk(rows_for(mk)[:1])
    cls = classes_of(kw)
    n = 3
    with torch.no_grad(), ah.record(ms["avar"], cls, key_mass=True) as rec:
        seq = ms["avar"].generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    s0 = kw["input_ids"].shape[1]
    full = dict(kw, input_ids=seq[:, :-1], attention_mask=torch.ones(1, s0 + n - 1, dtype=torch.long),
                mm_token_type_ids=torch.nn.functional.pad(kw["mm_token_type_ids"], (0, n - 1)))
    with torch.no_grad():
        out = ms["eager"](**full, output_attentions=True)
    for l, km in enumerate(rec.key_mass):
        torch.testing.assert_close(km, eager_key_mass(out.attentions[l], rec.classes), atol=1e-5, rtol=1e-4)


def test_record_key_mass_accumulates_over_generate():
    _generate_key_mass_matches_eager()


def test_record_key_mass_on_the_decode_kernel_path(emulated_cuda, monkeypatch):  # noqa: F811 - the fixture
    """Generation steps take the CUDA decode kernel's path with key masses (here its binding emulated in float64 on
    the CPU, tests/test_kvcache.py); the accumulated key masses still equal eager weights summed by query class."""
    from avar_kernels import kvcache
    from avar_kernels.hf import attention as hf_attention

    # the tiny model's head dim (32) is not one the kernel is built for; the emulated binding takes any
    why_not = kvcache._cuda_why_not                             # the fixture's CUDA-looking check
    monkeypatch.setattr(kvcache, "_cuda_why_not", lambda q, d, sq, needs_grad: why_not(q, 64, sq, needs_grad))
    monkeypatch.setattr(hf_attention, "_use_decode_kernel",
                        lambda q, sq, sk, causal, window: causal and window is None and sq < sk
                        and not torch.is_grad_enabled())
    _generate_key_mass_matches_eager()
    assert emulated_cuda and all(c["key_mass"] for c in emulated_cuda)   # every decode step went through it


def test_key_mass_gradient_matches_eager():
    ms, mk = models("qwen2_vl", ("avar", "eager"))
    kw = mk(rows_for(mk)[:1])
    cls = classes_of(kw)
    grads = {}
    for impl, m in ms.items():
        m.zero_grad()
        if impl == "avar":
            with ah.record(m, cls, key_mass=True) as rec:
                m(**kw)
            kms = rec.key_mass
        else:
            kms = [eager_key_mass(a, cls) for a in m(**kw, output_attentions=True).attentions]
        # grounding-style loss: the attention image tokens receive from the response rows
        loss = sum(km[..., RESPONSE][:, :, (cls[0] == IMAGE)].sum() for km in kms)
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None and "layers" in n}
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["avar"][n], g, atol=1e-5, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
