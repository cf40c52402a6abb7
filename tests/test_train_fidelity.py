"""The attention-guided SFT loss against a transcription of the published formula on eager attention weights."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import avar_kernels.hf as ah  # noqa: E402
from avar_kernels import IMAGE, SYSTEM, USER, metrics  # noqa: E402
from avar_kernels.hf import testing as T  # noqa: E402
from avar_kernels.train import query_mask  # noqa: E402

warnings.filterwarnings("ignore", message=".*falling back to the slow reference backend.*")
TOK = T.chatml_tokenizer()


def published_guidance_loss(attentions, image_mask, system_mask, query_mask_, eps):
    """The published ``compute_attention_guidance_loss`` written out: per layer, per sample and head,
    ``sum_{q in Q, k in K} A[q, k] / (|Q| |K| + eps)``, then ``-log(. + eps)`` (image) / ``log(. + eps)`` (system)
    averaged over heads, then over the batch, then over layers."""
    qm = query_mask_[:, None, :, None].float()
    n_q = query_mask_.sum(-1, keepdim=True).float()
    enh = sup = 0.0
    for a in attentions:
        n_img, n_sys = image_mask.sum(-1, keepdim=True), system_mask.sum(-1, keepdim=True)
        img = (a * qm * image_mask[:, None, None, :].float()).sum((2, 3)) / (n_q * n_img + eps)
        sys_ = (a * qm * system_mask[:, None, None, :].float()).sum((2, 3)) / (n_q * n_sys + eps)
        enh = enh + (-torch.log(img + eps).mean(1)).mean()
        sup = sup + torch.log(sys_ + eps).mean(1).mean()
    return enh / len(attentions), sup / len(attentions)


def conversation_batch(mk):
    nl, img = T.NEWLINE, mk.image_id
    system = [T.IM_START, 2, nl, 5, 6, 7, 8, T.IM_END, nl]                       # "system\nYou are a helpful"
    rows, answers = [], []
    for question, answer in (([9, 10, 11, 12], [13, 14, 15, 16, 17]), ([9, 22, 23, 12], [28, 29])):
        prompt = system + [T.IM_START, 3, nl, T.VISION_START, img, T.VISION_END, *question, T.IM_END, nl,
                           T.IM_START, 4, nl]
        rows.append(prompt + answer + [T.IM_END])
        answers.append(len(answer) + 1)
    kw = mk(rows, padding="right")
    labels = torch.full_like(kw["input_ids"], -100)
    for b, n in enumerate(answers):
        end = int(kw["attention_mask"][b].sum())
        labels[b, end - n:end] = kw["input_ids"][b, end - n:end]
    return kw, labels


@pytest.mark.parametrize("query_set", ["turn", "user_text"])
def test_sft_loss_and_gradient_match_published_formula_on_eager_weights(query_set):
    avar, mk = T.qwen2_5_vl(attn="avar")
    eager, _ = T.qwen2_5_vl(attn="eager", vision_attn="eager")
    eager.load_state_dict(avar.state_dict())
    kw, labels = conversation_batch(mk)
    classes = ah.token_classes(kw["input_ids"], TOK, labels=labels, attention_mask=kw["attention_mask"])
    q = query_mask(kw["input_ids"], classes, TOK, labels=labels, attention_mask=kw["attention_mask"],
                   query_set=query_set)
    if query_set == "turn":     # from the user turn's <|im_start|> to the first trained token, nothing else
        for b in range(2):
            start = 9                                                            # after the 9 system-turn tokens
            first_trained = int((labels[b] != -100).nonzero()[0])
            want = torch.zeros_like(q[b])
            want[start:first_trained] = True
            assert torch.equal(q[b], want) and kw["input_ids"][b, start] == T.IM_START
            assert (classes[b][q[b]] == IMAGE).sum() == mk.n_image_tokens
    else:
        assert torch.equal(q, classes == USER)
    eps = 1e-6

    out = eager(**kw, labels=labels, output_attentions=True)
    enh_ref, sup_ref = published_guidance_loss(out.attentions, classes == IMAGE, classes == SYSTEM, q, eps)
    loss_ref = out.loss + 0.15 * enh_ref + 0.15 * sup_ref
    loss_ref.backward()

    with ah.record(avar, classes) as rec:
        res = avar(**kw, labels=labels)
    enh, sup = metrics.attention_guided_loss(rec.mass, classes, query_mask=q, eps=eps)
    loss = metrics.avar_sft_loss(res.loss, rec.mass, classes, query_mask=q, eps=eps)
    loss.backward()

    torch.testing.assert_close(enh, enh_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sup, sup_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert len(grads) > 10
    for n, p in avar.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_query_sets_differ_and_llava_turn_starts_at_marker():
    avar, mk = T.qwen2_5_vl(attn="avar")
    kw, labels = conversation_batch(mk)
    classes = ah.token_classes(kw["input_ids"], TOK, labels=labels, attention_mask=kw["attention_mask"])
    turn = query_mask(kw["input_ids"], classes, TOK, labels=labels, attention_mask=kw["attention_mask"])
    text = query_mask(kw["input_ids"], classes, TOK, query_set="user_text")
    assert (text & ~turn).sum() == 0 and turn.sum() > text.sum()
    with torch.no_grad(), ah.record(avar, classes) as rec:
        avar(**kw)
    a = metrics.attention_guided_loss(rec.mass, classes, query_mask=turn)
    b = metrics.attention_guided_loss(rec.mass, classes, query_mask=text)
    assert all(abs(x.item() - y.item()) > 1e-3 for x, y in zip(a, b))
    # LLaVA-1.5: "<s> sys USER: <image> q ASSISTANT: a</s>", the turn starts at the USER: marker
    vocab = TOK.get_vocab()
    ids = torch.tensor([[vocab["<s>"], vocab["You"], vocab["are"], vocab["USER:"], vocab["<image>"], vocab["What"],
                         vocab["is"], vocab["ASSISTANT:"], vocab["A"], vocab["cat"], vocab["</s>"]]])
    cls = ah.token_classes(ids, TOK, template="llava")
    q = query_mask(ids, cls, TOK, template="llava")
    assert q[0].tolist() == [False] * 3 + [True] * 5 + [False] * 3

