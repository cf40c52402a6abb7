"""record / intervene inside tiny VLMs: masses vs eager attention weights, gradients, checkpointing, generate."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from test_hf_models import models, rows_for  # noqa: E402

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
        qc = kc[:, -s:]
        mul, abs_, add = rw.tables(h, C, query.device)
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
            "class_bias": (ah.class_bias(factor={IMAGE: 3.0, SYSTEM: 0.5}), {"query_classes": {USER}}),
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


def test_presets_tables():
    ms, _ = models("qwen2_vl", ("avar",), layers=3)
    from avar_kernels.hf.record import controller

    ctl = controller(ms["avar"])
    with ah.intervene(ms["avar"], ah.pai(0.2), token_classes=torch.zeros(1, 1, dtype=torch.long)):
        assert ctl.reweight(0, 4, "cpu") is None and ctl.reweight(1, 4, "cpu") is None
        rw = ctl.reweight(2, 4, "cpu")
        _, abs_, _ = rw.tables(4, C, "cpu")
        assert abs_[:, RESPONSE, IMAGE].eq(0.2).all() and abs_.sum().item() == pytest.approx(4 * 0.2)
        with ah.intervene(ms["avar"], ah.vaf(0.15, 0.05)):              # composes (tables add)
            mul, abs2, _ = ctl.reweight(2, 4, "cpu").tables(4, C, "cpu")
            assert mul[:, USER, IMAGE].eq(0.15).all() and mul[:, RESPONSE, SYSTEM].eq(-0.05).all()
            assert mul[:, SYSTEM].eq(0).all() and torch.equal(abs2, abs_)
    assert ctl.reweight(2, 4, "cpu") is None


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
