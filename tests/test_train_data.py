"""Dataset readers and writers, the synthesis of cold-start samples, and the embedded procedural task."""
import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from avar_kernels import IMAGE, RESPONSE, SYSTEM, USER  # noqa: E402
from avar_kernels.train import data as D  # noqa: E402
from avar_kernels.train import embedded as E  # noqa: E402
from avar_kernels.train import synth  # noqa: E402
from avar_kernels.train.batches import SFTCollator, encode_conversation  # noqa: E402


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


@pytest.fixture
def image_file(tmp_path):
    D.save_image(E.draw(E.random_scene(__import__("random").Random(0))), tmp_path / "img" / "a.png")
    return "img/a.png"


def test_read_conversations_reports_bad_records_with_line_numbers(tmp_path, image_file):
    good = {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A"}],
            "images": [image_file]}
    sharegpt = {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "B"}],
                "system": "Be brief.", "images": [image_file]}
    path = tmp_path / "sft.jsonl"
    write_lines(path, [good, "{broken", dict(good, images=["img/missing.png"]), "",
                       {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": " "}],
                        "images": [image_file]},
                       dict(good, images=[image_file, image_file]), "[1, 2]", sharegpt, {"messages": []}])
    with pytest.warns(D.BadRecordWarning):
        recs = D.read_conversations(path)
    assert [r.line for r in recs] == [1, 8]
    assert recs[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert recs[1].messages[1:] == [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "B"}]
    reasons = {b.line: b.reason for b in recs.bad}
    assert sorted(reasons) == [2, 3, 5, 6, 7, 9]
    assert "broken JSON" in reasons[2] and "image not found" in reasons[3] and reasons[5] == "empty answer"
    assert "1 <image> placeholders but 2 images" in reasons[6] and "JSON object" in reasons[7]
    assert str(recs.bad[0]).startswith(f"{path}:2: ")
    img = D.load_image(recs[0].images[0], recs[0].base_dir)
    assert img.dtype == np.uint8 and img.shape == (E.IMAGE_SIZE, E.IMAGE_SIZE, 3)


def test_read_problems(tmp_path, image_file):
    path = tmp_path / "rl.jsonl"
    write_lines(path, [{"problem": "<image>Find x.", "answer": "3", "images": [image_file]},
                       {"problem": "<image>Find y.", "answer": "", "images": [image_file]},
                       {"problem": "Find z.", "answer": 4}, {"answer": "1"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", D.BadRecordWarning)
        recs = D.read_problems(path)
    assert [(r.line, r.problem, r.answer) for r in recs] == [(1, "<image>Find x.", "3"), (3, "Find z.", "4")]
    assert [(b.line, b.reason) for b in recs.bad] == [(2, "empty answer"), (4, "missing or empty 'problem'")]
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        D.read_problems(tmp_path / "nope.jsonl")


def test_jsonl_writer_resumes_after_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with D.JsonlWriter(path) as w:
        for i in range(3):
            w.write({"i": i})
    with open(path, "a") as f:
        f.write('{"i": 3, "tr')                                  # the run died mid-write
    w = D.JsonlWriter(path)
    assert w.count == 3 and w.last("i") == 2
    w.write({"i": 3})
    w.close()
    assert [json.loads(x)["i"] for x in path.read_text().splitlines()] == [0, 1, 2, 3]
    with D.JsonlWriter(path, resume=False) as w:
        assert w.count == 0
    assert path.read_text() == ""


def test_synthesize_writes_visual_anchored_samples_and_resumes(tmp_path):
    records = E.records(6, seed=3)
    out = tmp_path / "cold" / "train.jsonl"
    rep = synth.synthesize(records, out)
    assert (rep.written, rep.resumed, rep.bad) == (6, 0, [])
    full = out.read_text().splitlines()
    # interrupted after 3 rows and part of the 4th: the rerun keeps them and writes the rest once
    out.write_text("\n".join(full[:3]) + "\n" + full[3][:20])
    rep = synth.synthesize(records, out)
    assert (rep.written, rep.resumed) == (3, 3)
    assert out.read_text().splitlines() == full
    back = D.read_conversations(out)
    assert len(back) == 6 and not back.bad
    for rec, conv in zip(records, back):
        user, answer = conv.messages[0]["content"], conv.messages[1]["content"]
        assert user == "<image>" + rec.question
        assert answer.startswith("<think> Image description : " + rec.description)
        assert answer.endswith(f"</think> <answer> {rec.answer} </answer>")
        assert "Looking at the image again" in answer or "Going back to the image" in answer
        assert "Reflection" in answer
        assert np.array_equal(D.load_image(conv.images[0], conv.base_dir), rec.images[0])
    assert synth.TemplateRewriter()(records[0]) == synth.TemplateRewriter()(records[0])


def test_synthesize_reports_records_the_rewriter_fails_on(tmp_path):
    def picky(rec):
        if rec.line == 2:
            raise ValueError("the model's description came back empty")
        return synth.TemplateRewriter()(rec)

    rep = synth.synthesize(E.records(3, seed=0), tmp_path / "o.jsonl", rewriter=picky, source="in.jsonl")
    assert rep.written == 2 and [str(b) for b in rep.bad] == ["in.jsonl:2: the model's description came back empty"]


def test_template_phrasing_does_not_tell_the_answer():
    """The phrasings come before the answer in a sample: if they depended on it, a model could learn them as a
    shortcut (pick a phrasing by prior, then write the answer it implies) instead of reading the image. Out of
    sample, (question, phrasings) must predict the answer no better than the question alone (with the answer in
    the hash they predicted 90% of it)."""
    from collections import Counter, defaultdict

    rewrite = synth.TemplateRewriter()
    choices = (*synth.REASONING_OPENERS, *synth.LOOK_AGAIN, *synth.CONFIRM, *synth.REFLECTIONS)

    def keys(recs):
        return [(r.question, tuple(c in rewrite(r) for c in choices)) for r in recs]

    train, test = E.records(4000, seed=0), E.records(1000, seed=1)
    by_phrasing, by_question = defaultdict(Counter), defaultdict(Counter)
    for r, key in zip(train, keys(train)):
        by_phrasing[key][r.answer] += 1
        by_question[key[0]][r.answer] += 1

    def accuracy(table, pick):
        return sum((table.get(pick(key)) or Counter({None: 1})).most_common(1)[0][0] == r.answer
                   for r, key in zip(test, keys(test))) / len(test)

    blind = accuracy(by_question, lambda key: key[0])
    with_phrasing = accuracy(by_phrasing, lambda key: key)
    assert with_phrasing <= blind + 0.03, (with_phrasing, blind)


def test_embedded_task_needs_the_image():
    recs = E.records(400, seed=0)
    assert {r.line for r in recs} == set(range(1, 401))
    kinds = [r.question.split()[0] for r in recs]
    assert len(set(kinds)) == 4                                   # How, What (x2 kinds), Is, Which
    assert E.blind_accuracy(E.records(2000, seed=1), recs) < 0.45  # the best answer without the image
    tok = E.tokenizer()
    for r in recs[:50]:
        ids = tok(synth.TemplateRewriter()(r) + " " + r.question)["input_ids"]
        assert tok.unk_token_id not in ids
    # the same scene renders the same pixels, different scenes differ
    assert not np.array_equal(recs[0].images[0], recs[1].images[0])


def test_encode_conversation_labels_classes_and_queries():
    proc = E.processor()
    rec = E.records(1, seed=0)[0]
    conv = D.Conversation([{"role": "user", "content": "<image>" + rec.question},
                           {"role": "assistant", "content": synth.TemplateRewriter()(rec)}], rec.images)
    s = encode_conversation(conv, proc)
    ids, labels, cls, q = s["input_ids"], s["labels"], s["token_classes"], s["query_mask"]
    tok = proc.tokenizer
    assert int((ids == proc.image_token_id).sum()) == 9 and s["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert (cls == IMAGE).sum() == 9 and (cls == SYSTEM).any() and (cls == USER).any()
    trained = labels != -100
    assert tok.decode(ids[trained]).startswith("<think> Image description")
    assert ids[trained][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert ((cls == RESPONSE) == trained).all()
    first_q = int(q.nonzero()[0])
    assert ids[first_q] == tok.convert_tokens_to_ids("<|im_start|>") and q[first_q:int(trained.nonzero()[0])].all()
    with pytest.raises(ValueError, match="cut would fall into an image"):
        encode_conversation(conv, proc, cutoff_len=12)
    short = encode_conversation(conv, proc, cutoff_len=len(ids) - 5)
    assert len(short["input_ids"]) == len(ids) - 5
    batch = SFTCollator(tok.pad_token_id)([s, short])
    assert batch["input_ids"].shape == (2, len(ids)) and batch["attention_mask"][1].sum() == len(ids) - 5
    assert (batch["labels"][1, -5:] == -100).all() and batch["pixel_values"].shape[0] == 2 * 36    # 6 x 6 patches


def test_model_rewriter_prompts_a_local_model(tmp_path):
    model, proc = E.model("sdpa", seed=0, num_hidden_layers=1), E.processor()
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    rewriter = synth.ModelRewriter(str(tmp_path / "m"), max_new_tokens=6)
    rec = E.records(1, seed=0)[0]
    rec.description = None
    # the random model's greedy words decode to nothing printable: reported as a failed record
    with pytest.raises(ValueError, match="came back empty"):
        rewriter(rec)
    seen, generate = [], rewriter.model.generate

    def answer_with_words(**inputs):                # the real forward and prompt, fixed generated words
        seen.append(proc.decode(inputs["input_ids"][0]))
        out = generate(**{**inputs, "max_new_tokens": 1})
        words = proc.tokenizer(f"a big {rec.answer} shape", return_tensors="pt")["input_ids"]
        return torch.cat([out[:, :inputs["input_ids"].shape[1]], words], 1)

    rewriter.model.generate = answer_with_words
    text = rewriter(rec)
    assert "<|image_pad|>" in seen[0] and len(seen) == 2
    assert text.startswith(f"<think> Image description : a big {rec.answer} shape .")
    assert text.endswith(f"<answer> {rec.answer} </answer>")
