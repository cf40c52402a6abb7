"""avar_kernels.metrics on hand-made masses."""
import math
import warnings

import pytest
import torch

from avar_kernels import metrics
from avar_kernels.metrics import UndefinedMetricWarning

O, I, S, U, R = 0, 1, 2, 3, 4


def make():
    # B=1, S=5 positions: [sys, img, user, user, resp]; L=2, H=2, C=6
    classes = torch.tensor([[S, I, U, U, R]])
    m = torch.zeros(2, 1, 2, 5, 6)
    # user rows (2, 3): img / sys mass chosen per (layer, head, row)
    vals = {(0, 0, 2): (0.6, 0.2), (0, 0, 3): (0.5, 0.1), (0, 1, 2): (0.3, 0.3), (0, 1, 3): (0.4, 0.2),
            (1, 0, 2): (0.2, 0.4), (1, 0, 3): (0.8, 0.1), (1, 1, 2): (0.1, 0.1), (1, 1, 3): (0.6, 0.3)}
    for (l, h, i), (img, sys_) in vals.items():
        m[l, 0, h, i, I], m[l, 0, h, i, S] = img, sys_
        m[l, 0, h, i, U] = 1 - img - sys_
    m[:, 0, :, 4, I], m[:, 0, :, 4, S] = 0.5, 0.25          # response row
    return m, classes, vals


def test_vas_hand_computed():
    m, classes, vals = make()
    res = metrics.vas(m, classes)
    ratios = {k: a / b for k, (a, b) in vals.items()}
    assert res.overall.item() == pytest.approx(sum(ratios.values()) / 8)
    for l in range(2):
        assert res.per_layer[l].item() == pytest.approx(sum(v for k, v in ratios.items() if k[0] == l) / 4)
        for h in range(2):
            want = sum(v for k, v in ratios.items() if k[:2] == (l, h)) / 2
            assert res.per_head[l, h].item() == pytest.approx(want)
    # list-of-layers input ([B, H, S, C] each) gives the same
    assert metrics.vas([m[0], m[1]], classes).overall.item() == pytest.approx(res.overall.item())


def test_visual_share():
    m, classes, vals = make()
    res = metrics.visual_share(m, classes)
    assert res.overall.item() == pytest.approx(sum(a for a, _ in vals.values()) / 8)
    assert 0 <= res.overall.item() <= 1


def test_vas_without_system_is_nan_with_warning():
    m, classes, _ = make()
    classes2 = classes.clone()
    classes2[0, 0] = O
    with pytest.warns(UndefinedMetricWarning, match="no system"):
        res = metrics.vas(m, classes2)
    assert math.isnan(res.overall.item()) and math.isnan(res.per_sample[0].item())
    # visual share stays defined
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not math.isnan(metrics.visual_share(m, classes2).overall.item())


def test_vas_batch_skips_undefined_sample_and_zero_system_rows():
    m, classes, vals = make()
    mb = torch.cat([m, m], dim=1)
    cb = torch.cat([classes, classes])
    cb[1, 0] = O                                            # sample 1 has no system prompt
    with pytest.warns(UndefinedMetricWarning):
        res = metrics.vas(mb, cb)
    assert res.overall.item() == pytest.approx(metrics.vas(m, classes).overall.item())
    m0 = m.clone()
    m0[0, 0, 0, 2, S] = 0.0                                 # one row with zero system mass: left out, warned
    with pytest.warns(UndefinedMetricWarning, match="zero system mass"):
        res = metrics.vas(m0, classes)
    ratios = [a / b for k, (a, b) in vals.items() if k != (0, 0, 2)]
    assert res.overall.item() == pytest.approx(sum(ratios) / 7)


def test_attention_guided_loss_and_grad():
    m, classes, vals = make()
    m = m.clone().requires_grad_(True)
    l_enh, l_sup = metrics.attention_guided_loss(m, classes)
    # |Q| = 2, |K_img| = 1, |K_sys| = 1
    enh = -sum(math.log((vals[(l, h, 2)][0] + vals[(l, h, 3)][0]) / 2 + 1e-6) for l in range(2) for h in range(2)) / 4
    sup = sum(math.log((vals[(l, h, 2)][1] + vals[(l, h, 3)][1]) / 2 + 1e-6) for l in range(2) for h in range(2)) / 4
    assert l_enh.item() == pytest.approx(enh, rel=1e-5)
    assert l_sup.item() == pytest.approx(sup, rel=1e-5)
    total = metrics.avar_sft_loss(torch.tensor(1.0), m, classes)
    assert total.item() == pytest.approx(1 + 0.15 * enh + 0.15 * sup, rel=1e-5)
    total.backward()
    assert m.grad[..., I].abs().sum() > 0 and m.grad[..., R].abs().sum() == 0


def test_attention_guided_loss_query_mask_overrides_class():
    m, classes, vals = make()
    # the query class alone and the same rows as a mask agree
    rows = classes == U
    by_mask = metrics.attention_guided_loss(m, classes, query_mask=rows)
    for a, b in zip(metrics.attention_guided_loss(m, classes), by_mask):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # Q = rows 1..3 (image row and the user rows): |Q| = 3; the image row's own masses are 0 in make()
    q = torch.tensor([[False, True, True, True, False]])
    l_enh, l_sup = metrics.attention_guided_loss(m, classes, query_mask=q, query_class=R, eps=1e-3)
    enh = -sum(math.log((vals[(l, h, 2)][0] + vals[(l, h, 3)][0]) / 3 + 1e-3) for l in range(2) for h in range(2)) / 4
    sup = sum(math.log((vals[(l, h, 2)][1] + vals[(l, h, 3)][1]) / 3 + 1e-3) for l in range(2) for h in range(2)) / 4
    assert l_enh.item() == pytest.approx(enh, rel=1e-5) and l_sup.item() == pytest.approx(sup, rel=1e-5)
    total = metrics.avar_sft_loss(torch.tensor(0.0), m, classes, query_mask=q, eps=1e-3, w_enh=1.0, w_sup=2.0)
    assert total.item() == pytest.approx(enh + 2 * sup, rel=1e-5)
    with pytest.raises(TypeError, match="bool"):
        metrics.attention_guided_loss(m, classes, query_mask=q.long())
    with pytest.raises(ValueError, match="query_mask"):
        metrics.attention_guided_loss(m, classes, query_mask=q[:, :4])


def test_visual_reward():
    m, classes, _ = make()
    r = metrics.visual_reward(m, classes)
    assert r.shape == (1,)
    assert r.item() == pytest.approx((4 * 0.5) / (4 * 0.25 + 1e-6), rel=1e-5)
    assert metrics.visual_reward(m, classes, correct=[False]).item() == 0.0


def test_visual_reward_ratio_of_sums_differs_from_per_token_mean():
    m, classes, vals = make()
    rows = torch.tensor([[False, False, True, True, True]])        # user rows and the response row
    per_token = metrics.visual_reward(m, classes, query_mask=rows)
    ratio = metrics.visual_reward(m, classes, query_mask=rows, aggregate="ratio_of_sums")
    img = {i: sum(vals[(l, h, i)][0] for l in range(2) for h in range(2)) for i in (2, 3)}
    sys_ = {i: sum(vals[(l, h, i)][1] for l in range(2) for h in range(2)) for i in (2, 3)}
    img[4], sys_[4] = 4 * 0.5, 4 * 0.25
    want_mean = sum(img[i] / (sys_[i] + 1e-6) for i in (2, 3, 4)) / 3
    want_ratio = sum(img.values()) / (sum(sys_.values()) + 1e-6)
    assert per_token.item() == pytest.approx(want_mean, rel=1e-5)
    assert ratio.item() == pytest.approx(want_ratio, rel=1e-5)
    assert abs(want_mean - want_ratio) > 0.1
    assert metrics.visual_reward(m, classes, query_mask=rows, aggregate="ratio_of_sums", correct=[0]).item() == 0
    with pytest.raises(ValueError, match="aggregate"):
        metrics.visual_reward(m, classes, aggregate="sum")


def test_bands_and_shape_errors():
    assert metrics.vas_band(7.5) == "narrow" and metrics.vas_band(12) == "wide"
    assert metrics.vas_band(18.9) == "panoramic" and metrics.vas_band(float("nan")) == "undefined"
    m, classes, _ = make()
    with pytest.raises(ValueError, match="do not match"):
        metrics.vas(m, classes[:, :4])
