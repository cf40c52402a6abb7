"""token_classes on hand-labelled token sequences (local tokenizers, no download)."""
import pytest
import torch

pytest.importorskip("transformers")

from avar_kernels import IMAGE, OTHER, RESPONSE, SYSTEM, USER, VIDEO  # noqa: E402
from avar_kernels.hf import token_classes  # noqa: E402
from avar_kernels.hf.testing import chatml_tokenizer  # noqa: E402

O, I, S, U, R, V = OTHER, IMAGE, SYSTEM, USER, RESPONSE, VIDEO


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


def labelled(tok, pairs):
    """pairs: (token string, class) -> (ids [S], classes [S])."""
    vocab = tok.get_vocab()
    return torch.tensor([vocab[t] for t, _ in pairs]), torch.tensor([c for _, c in pairs])


QWEN_CONV = [
    ("<|im_start|>", O), ("system", O), ("\n", O), ("You", S), ("are", S), ("a", S), ("helpful", S), ("<|im_end|>", O),
    ("\n", O),
    ("<|im_start|>", O), ("user", O), ("\n", O), ("<|vision_start|>", O), ("<|image_pad|>", I), ("<|image_pad|>", I),
    ("<|vision_end|>", O), ("What", U), ("is", U), ("this", U), ("<|vision_start|>", O), ("<|image_pad|>", I),
    ("<|vision_end|>", O), ("?", U), ("<|im_end|>", O), ("\n", O),
    ("<|im_start|>", O), ("assistant", O), ("\n", O), ("A", R), ("cat", R), ("<|im_end|>", O), ("\n", O),
    ("<|im_start|>", O), ("user", O), ("\n", O), ("<|vision_start|>", O), ("<|video_pad|>", V), ("<|video_pad|>", V),
    ("<|vision_end|>", O), ("Describe", U), ("<|im_end|>", O), ("\n", O),
    ("<|im_start|>", O), ("assistant", O), ("\n", O), ("It", R), ("<|im_end|>", O),
]


def test_chatml_single(tok):
    ids, want = labelled(tok, QWEN_CONV)
    got = token_classes(ids, tok)
    assert got.dtype == torch.int64
    assert got.tolist() == want.tolist()


def test_chatml_generation_prompt_and_processor_wrapper(tok):
    conv = QWEN_CONV[:25] + [("<|im_start|>", O), ("assistant", O), ("\n", O)]
    ids, want = labelled(tok, conv)

    class Proc:
        tokenizer = tok

    assert token_classes(ids[None], Proc()).tolist() == [want.tolist()]


@pytest.mark.parametrize("side", ["left", "right"])
def test_chatml_padding(tok, side):
    ids, want = labelled(tok, QWEN_CONV[:32])
    ids2, want2 = labelled(tok, QWEN_CONV[9:32])
    pad = torch.full((len(ids) - len(ids2),), tok.pad_token_id)
    row2 = torch.cat([pad, ids2]) if side == "left" else torch.cat([ids2, pad])
    w2 = torch.cat([pad * 0, want2]) if side == "left" else torch.cat([want2, pad * 0])
    got = token_classes(torch.stack([ids, row2]), tok)
    assert got.tolist() == [want.tolist(), w2.tolist()]


def test_chatml_packed_row(tok):
    a, wa = labelled(tok, QWEN_CONV[:32])
    b, wb = labelled(tok, QWEN_CONV[9:32])
    got = token_classes(torch.cat([a, b])[None], tok)
    assert got[0].tolist() == wa.tolist() + wb.tolist()


def test_chatml_labels(tok):
    ids, want = labelled(tok, QWEN_CONV)
    labels = torch.full_like(ids, -100)
    labels[45:47] = ids[45:47]            # train only on the last answer ("It", "<|im_end|>")
    got = token_classes(ids, tok, labels=labels)
    exp = want.clone()
    exp[exp == R] = O
    exp[45:47] = R
    assert got.tolist() == exp.tolist()


def test_chatml_attention_mask(tok):
    ids, want = labelled(tok, QWEN_CONV[:20])
    am = torch.ones_like(ids)
    am[:3] = 0
    want[:3] = O
    assert token_classes(ids, tok, attention_mask=am).tolist() == want.tolist()


LLAVA_CONV = [
    ("<s>", O), ("A", S), ("chat", S), ("between", S), ("human", S), (".", S),
    ("USER:", O), ("<image>", I), ("<image>", I), ("\n", U), ("What", U), ("is", U), ("this", U), ("?", U),
    ("ASSISTANT:", O), ("A", R), ("cat", R), ("</s>", O),
    ("US", O), ("ER", O), (":", O), ("Describe", U), ("ASSIST", O), ("ANT", O), (":", O), ("It", R), ("</s>", O),
]


def test_llava15_template(tok):
    ids, want = labelled(tok, LLAVA_CONV)
    assert token_classes(ids, tok, template="llava").tolist() == want.tolist()


def test_llava15_packed_and_padded(tok):
    a, wa = labelled(tok, LLAVA_CONV)
    b, wb = labelled(tok, [("<s>", O), ("USER:", O), ("<image>", I), ("What", U), ("ASSISTANT:", O)])
    pad = torch.full((3,), tok.pad_token_id)
    row = torch.cat([pad, a, b])
    got = token_classes(row[None], tok, template="llava")
    assert got[0].tolist() == [O] * 3 + wa.tolist() + wb.tolist()


def test_llava_image_token_from_config(tok):
    # an image placeholder the tokenizer does not call "<image>" (config.image_token_index)
    ids, want = labelled(tok, [("<s>", O), ("USER:", O), ("cat", I), ("What", U), ("ASSISTANT:", O), ("A", R)])
    got = token_classes(ids, tok, template="llava", image_token_id=tok.get_vocab()["cat"])
    assert got.tolist() == want.tolist()


def test_llava_onevision_uses_chatml_with_image_token(tok):
    conv = [("<|im_start|>", O), ("user", O), ("\n", O), ("<image>", I), ("<image>", I), ("What", U),
            ("<|im_end|>", O), ("<|im_start|>", O), ("assistant", O), ("\n", O), ("A", R)]
    ids, want = labelled(tok, conv)
    assert token_classes(ids, tok).tolist() == want.tolist()


def test_bad_template(tok):
    with pytest.raises(ValueError, match="template"):
        token_classes(torch.tensor([1, 2]), tok, template="vicuna")
