"""The evaluator (avar_kernels.eval) on the embedded tiny Qwen2.5-VL: the report's numbers against eager attention
weights summed by hand, the report files, resuming, and bad input."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from avar_kernels import eval as ev  # noqa: E402
from avar_kernels.cli import main  # noqa: E402
from avar_kernels.train.embedded import MODEL  # noqa: E402

LAYERS, HEADS = MODEL["num_hidden_layers"], MODEL["num_attention_heads"]
from avar_kernels.eval import evaluate as E  # noqa: E402  (the module: the package exports run_evaluation)
from avar_kernels.eval import report as R  # noqa: E402
from avar_kernels.types import IMAGE, SYSTEM, USER  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run faster on one thread than on two (op dispatch dominates); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = dict(embedded_samples=5, max_new_tokens=3, batch_size=3, bench_samples=2, bench_new_tokens=2, bench_reps=1,
             progress=False)
CONDITIONS = ["vaf:0.3@1-2", "pai:0.5"]


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    """One small evaluation for the content checks: 5 samples in batches of 3 (left padding, two batches)."""
    out = str(tmp_path_factory.mktemp("report"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ev.run_evaluation(ev.EvalConfig(out=out, conditions=ev.parse_conditions(CONDITIONS), **SMALL))
    return out, res


def _by_hand(samples):
    """VAS and visual share of every sample from eager ``output_attentions=True`` weights, one unpadded sample at
    a time, as plain sums over the key columns: ``{per_sample: [(vas, share)], ratios: [L][H] lists of every
    user-row value, shares: the same for the image mass}``."""
    import avar_kernels.hf as ah
    from avar_kernels.train import embedded
    from avar_kernels.train.data import to_chat

    model = embedded.model(attn="eager", seed=0).eval()
    proc = embedded.processor()
    per_sample, ratios, shares = [], None, None
    for s in samples:
        text = proc.apply_chat_template(to_chat(s.messages, len(s.images)), add_generation_prompt=True,
                                        tokenize=False)
        enc = proc(text=[text], images=list(s.images), return_tensors="pt")
        cls = ah.token_classes(enc["input_ids"], proc, image_token_id=proc.image_token_id)[0].tolist()
        with torch.no_grad():
            att = model(**enc, output_attentions=True).attentions
        if ratios is None:
            ratios = [[[] for _ in range(att[0].shape[1])] for _ in att]
            shares = [[[] for _ in range(att[0].shape[1])] for _ in att]
        vals, imgs = [], []
        for layer, a in enumerate(att):
            for h in range(a.shape[1]):
                for i, c in enumerate(cls):
                    if c != USER:
                        continue
                    row = a[0, h, i].double().tolist()
                    img = sum(w for w, k in zip(row, cls) if k == IMAGE)
                    sys_ = sum(w for w, k in zip(row, cls) if k == SYSTEM)
                    ratios[layer][h].append(img / sys_)
                    shares[layer][h].append(img)
                    vals.append(img / sys_)
                    imgs.append(img)
        per_sample.append((sum(vals) / len(vals), sum(imgs) / len(imgs)))
    return per_sample, ratios, shares


def test_report_vas_equals_eager_weights_by_hand(small_report):
    out, res = small_report
    samples = ev.load_dataset(None, embedded_samples=SMALL["embedded_samples"], seed=1).samples
    per_sample, ratios, shares = _by_hand(samples)
    none = res["models"]["embedded"]["conditions"]["none"]
    got = {e["id"]: e for e in res["models"]["embedded"]["samples"]["none"]}
    for s, (v, sh) in zip(samples, per_sample):
        assert got[s.id]["vas"] == pytest.approx(v, rel=1e-5)
        assert got[s.id]["visual_share"] == pytest.approx(sh, rel=1e-5)
    assert none["vas"] == pytest.approx(sum(v for v, _ in per_sample) / len(per_sample), rel=1e-5)
    assert none["visual_share"] == pytest.approx(sum(s for _, s in per_sample) / len(per_sample), rel=1e-5)
    mean = lambda xs: sum(xs) / len(xs)
    for layer in range(len(ratios)):
        assert none["vas_per_layer"][layer] == pytest.approx(mean(sum(ratios[layer], [])), rel=1e-5)
        assert none["share_per_layer"][layer] == pytest.approx(mean(sum(shares[layer], [])), rel=1e-5)
        for h in range(len(ratios[layer])):
            assert none["vas_per_head"][layer][h] == pytest.approx(mean(ratios[layer][h]), rel=1e-5)
            assert none["share_per_head"][layer][h] == pytest.approx(mean(shares[layer][h]), rel=1e-5)
    # the bench's eager way agrees with the fused way on the same weights
    bench = res["models"]["embedded"]["bench"]
    assert bench["max_abs_mass_diff"] < 1e-5 and bench["same_tokens"]
    assert bench["avar"]["vas"] == pytest.approx(bench["eager"]["vas"], rel=1e-5)


def test_report_files(small_report):
    out, res = small_report
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["complete"] is True and saved["cells_done"] == saved["cells_total"] == 3 * 5 + 2
    conds = saved["models"]["embedded"]["conditions"]
    assert list(conds) == ["none", "vaf=0.3@1-2", "pai=0.5"]
    for c in conds.values():
        assert c["samples"] == c["scored"] == 5 and 0 <= c["accuracy"] <= 1
        assert math.isfinite(c["vas"]) and c["vas"] > 0 and 0 < c["visual_share"] < 1
        assert len(c["vas_per_layer"]) == len(c["vas_per_head"]) == LAYERS and len(c["vas_per_head"][0]) == HEADS
    # VAF on layers 1-2 changes the image share of the user rows there and leaves layer 0 as it is
    assert conds["vaf=0.3@1-2"]["share_per_layer"][0] == pytest.approx(conds["none"]["share_per_layer"][0])
    assert abs(conds["vaf=0.3@1-2"]["share_per_layer"][1] - conds["none"]["share_per_layer"][1]) > 1e-5
    bench = saved["models"]["embedded"]["bench"]
    for way in ("avar", "eager"):
        assert bench[way]["seconds"] > 0
    # tensor bytes on the CPU: eager keeps a [B, H, S, S] weight tensor per layer and step, avar [B, H, S, C] masses
    assert bench["eager"]["peak_bytes"] > bench["avar"]["peak_bytes"] > 0
    assert bench["memory_ratio"] == pytest.approx(bench["avar"]["peak_bytes"] / bench["eager"]["peak_bytes"])
    assert bench["time_ratio"] > 0
    corr = saved["accuracy_vs_vas"]
    assert corr["n"] == 3 and len(corr["points"]) == 3
    env = saved["run"]["environment"]
    assert env["torch"] and env["transformers"] and env["command"] and saved["run"]["seeds"]["data_seed"] == 1
    for name in ("vas_per_layer.png", "vas_heads_embedded.png", "accuracy_vs_vas.png", "accuracy_vs_strength.png"):
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(path) > 2000, name
        assert name in saved["plots"]
    heat = saved["models"]["embedded"]["heatmap"]
    with open(os.path.join(out, "summary.md")) as f:
        summary = f.read()
    if "map" in heat:
        assert len(heat["map"]) == 3 and os.path.getsize(os.path.join(out, "image_heatmap_embedded.png")) > 2000
    else:
        assert "Image heatmaps not drawn: embedded: " + heat["unavailable"][:40] in summary
    assert summary.startswith("# Evaluation report\n\nComplete: 17 of 17 cells.")
    for key in conds:
        assert f"| embedded | {key} | 5 | " in summary
    assert "| embedded | 2 x 2 | " in summary and "INCOMPLETE" not in summary


def test_resume_after_interrupt(tmp_path, monkeypatch):
    calls = []
    real = E.generate_and_measure

    def stop_on_second(lm, samples, cond, max_new_tokens):
        calls.append([s.id for s in samples])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm, samples, cond, max_new_tokens)

    monkeypatch.setattr(E, "generate_and_measure", stop_on_second)
    cfg = ev.EvalConfig(out=str(tmp_path), embedded_samples=4, max_new_tokens=2, batch_size=2, bench_samples=0,
                        heatmap=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        ev.run_evaluation(cfg)
    with open(tmp_path / "results.json") as f:
        partial = json.load(f)
    assert partial["complete"] is False and partial["cells_done"] == 2 and partial["cells_total"] == 4
    assert partial["missing"] == ["embedded / none: 2 of 4 samples"]
    assert (tmp_path / "summary.md").read_text().startswith("# Evaluation report\n\n**INCOMPLETE: 2 of 4 cells")
    monkeypatch.setattr(E, "generate_and_measure", lambda *a: calls.append([s.id for s in a[1]]) or real(*a))
    res = ev.run_evaluation(cfg)
    assert calls == [[0, 1], [2, 3], [2, 3]]            # the restarted run computed only the missing samples
    assert res["complete"] is True and [e["id"] for e in res["models"]["embedded"]["samples"]["none"]] == [0, 1, 2, 3]
    # the same folder with another dataset is refused
    with pytest.raises(ValueError, match="different run .*--overwrite"):
        ev.run_evaluation(ev.EvalConfig(out=str(tmp_path), embedded_samples=3, max_new_tokens=2, bench_samples=0,
                                        heatmap=False, progress=False))


def test_empty_answer_is_marked(tmp_path, monkeypatch):
    real = E.load_model

    def ends_at_once(*a, **kw):
        lm = real(*a, **kw)
        lm.model.generation_config.forced_eos_token_id = lm.model.generation_config.eos_token_id
        return lm

    monkeypatch.setattr(E, "load_model", ends_at_once)
    res = ev.run_evaluation(ev.EvalConfig(out=str(tmp_path), embedded_samples=2, max_new_tokens=1, bench_samples=0,
                                          heatmap=False, progress=False))
    entries = res["models"]["embedded"]["samples"]["none"]
    assert all(e["empty"] and e["completion"] == "" and e["correct"] is False for e in entries)
    c = res["models"]["embedded"]["conditions"]["none"]
    assert c["empty"] == 2 and c["accuracy"] == 0
    assert "embedded / none: empty answer on sample(s) 0, 1" in (tmp_path / "summary.md").read_text()


def _problems(tmp_path, rows):
    from avar_kernels.train import embedded
    from avar_kernels.train.data import problem_row, save_image

    lines = []
    for i, (question, answer, image) in enumerate(rows):
        if image == "present":
            recs = embedded.records(1, seed=i)
            save_image(recs[0].images[0], str(tmp_path / f"img{i}.png"))
        lines.append(json.dumps(problem_row("<image>" + question, answer, [f"img{i}.png"])))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return str(path)


def test_missing_images_are_listed(tmp_path, capsys):
    data = _problems(tmp_path, [("How many red shapes are there ?", "1", "present"),
                                ("What colour is the circle ?", "red", "missing"),
                                ("Which shape is blue ?", "square", "present")])
    out = str(tmp_path / "report")
    assert main(["eval", "--data", data, "--out", out, "--max-new-tokens", "1", "--bench-samples", "0",
                 "--no-heatmap", "--no-progress", "--interventions"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["complete"] is True and res["run"]["sample_ids"] == [1, 3]
    assert res["run"]["skipped_records"] == [{"line": 2, "reason": "image not found: img1.png"}]
    summary = open(os.path.join(out, "summary.md")).read()
    assert "2 samples, 1 records skipped (listed below)" in summary and "| 2 | image not found: img1.png |" in summary
    assert "report (complete)" in capsys.readouterr().out


def test_sharegpt_layout_prompt_and_reference(tmp_path):
    """A ShareGPT file (the SFT layout): the prompt is every turn before the last assistant turn, the reference its
    <answer>."""
    from avar_kernels.train import embedded, synth

    recs = embedded.records(2, seed=5)
    synth.synthesize(recs, str(tmp_path / "sft.jsonl"))
    ds = ev.load_dataset(str(tmp_path / "sft.jsonl"))
    assert ds.fingerprint["layout"] == "conversations" and [s.id for s in ds.samples] == [1, 2]
    for s, r in zip(ds.samples, recs):
        assert s.messages == [{"role": "user", "content": "<image>" + r.question}] and s.answer == r.answer
        assert s.images == ["images/%07d_0.png" % r.line] and s.base_dir == str(tmp_path)


def test_unreadable_image_at_run_time_is_an_error_entry():
    lm = E.load_model(ev.ModelSpec("embedded"))
    good = ev.load_dataset(None, embedded_samples=1).samples[0]
    gone = E.Sample(7, good.messages, ["/nonexistent/gone.png"], "1", line=7)
    entries = E._batch_entries(lm, [good, gone], ev.parse_conditions([])[0], 1)
    assert [e["id"] for e in entries] == [0, 7]
    assert "error" not in entries[0] and entries[1]["error"].startswith("cannot read image")
    agg = R.aggregate(entries)
    assert agg["samples"] == 2 and agg["scored"] == 1 and agg["errors"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--data", "EMPTY"], "dataset EMPTY: no usable records (the file is empty)"),
    (["--data", "BAD"], "dataset BAD: no usable records (2 skipped: line 1: broken JSON"),
    (["--model", "/nonexistent/ckpt"], "model 'ckpt': no such checkpoint directory: /nonexistent/ckpt"),
    (["--model", "a=embedded", "--model", "a=embedded"], "models: the name(s) ['a'] are used twice"),
    (["--interventions", "vaf:0.2@2-9"], f"intervention 'vaf=0.2@2-9': model 'embedded' has layers 0..{LAYERS - 1}, "
                                         "the intervention steers 2..9"),
    (["--interventions", f"pai:0.2@{LAYERS}-"], f"intervention 'pai=0.2@{LAYERS}-': model 'embedded' has layers "
                                                f"0..{LAYERS - 1}"),
    (["--interventions", "boost:2"], "intervention 'boost:2': expected none or KIND:STRENGTH"),
    (["--interventions", "vaf:x"], "intervention 'vaf:x': strength 'x' is not a number"),
    (["--report-only"], "no run.json (not an evaluation folder)"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("")
    bad.write_text('{"problem": "x"\n{"problem": "<image>q", "answer": "", "images": ["a.png"]}\n')
    argv = [str(empty) if a == "EMPTY" else str(bad) if a == "BAD" else a for a in argv]
    message = message.replace("EMPTY", str(empty)).replace("BAD", str(bad))
    assert main(["eval", "--out", str(tmp_path / "out"), "--no-progress", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("avar-kernels eval: error: ") and message in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_answer_check_is_the_accuracy_reward():
    assert E.score_answer("<think> the red shapes ... </think> <answer> 2 </answer>", "2") == ("2", True)
    assert E.score_answer("<answer>3</answer>", "2") == ("3", False)
    assert E.score_answer("", "2") == ("", False)
    assert E.score_answer("<answer> \\frac{1}{2} </answer>", "0.5")[1]
    assert E.score_answer("<answer>(B)</answer>", "B")[1]
    assert E.score_answer("<answer> Red </answer>", "red")[1]
    assert not E.score_answer("<answer> red </answer>", "green")[1]


def test_conditions():
    keys = [c.key for c in ev.parse_conditions(["vaf:0.1,0.2@1-2", "pai:0.5@2-", "none", "vaf:0.1@1-2"])]
    assert keys == ["none", "vaf=0.1@1-2", "vaf=0.2@1-2", "pai=0.5@2-"]
    assert list(ev.parse_conditions(["vaf:0.1@1-2"])[1].layer_range(4)) == [1, 2]
    assert list(ev.parse_conditions(["pai:0.1@2-"])[1].layer_range(4)) == [2, 3]
    with pytest.raises(ValueError, match="the layer range 3-1 is empty"):
        ev.parse_conditions(["vaf:0.1@3-1"])


def test_pearson_p_from_the_t_distribution():
    # critical values of Student's t: two-sided p = 0.05
    assert R.t_two_sided_p(12.706204736, 1) == pytest.approx(0.05, rel=1e-6)
    assert R.t_two_sided_p(2.228138852, 10) == pytest.approx(0.05, rel=1e-6)
    assert R.t_two_sided_p(1.959963985, 10**7) == pytest.approx(0.05, rel=1e-5)
    res = R.pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert res["r"] == pytest.approx(0.7745966692414834) and res["p"] == pytest.approx(0.1240270626575533, rel=1e-6)
    assert R.pearson([1, 2, 3], [1, 2, 3])["p"] == 0.0
    assert R.pearson([1, 2], [1, 2])["r"] is None and R.pearson([1, 1, 1], [1, 2, 3])["note"] == "a constant series"


@pytest.mark.slow
def test_two_processes_match_one(small_report, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): each computes half of the samples, the report merges
    them and equals the one-process report."""
    pytest.importorskip("accelerate")
    one_out, one = small_report
    out = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "avar_kernels", "eval",
           "--device", "cpu", "--out", out, "--samples", "5", "--max-new-tokens", "3", "--batch-size", "3",
           "--bench-samples", "2", "--bench-new-tokens", "2", "--bench-reps", "1", "--no-progress",
           "--interventions", *CONDITIONS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report (complete)" in proc.stdout
    cells = os.listdir(os.path.join(out, "cells", "embedded"))
    assert "none.0.jsonl" in cells and "none.1.jsonl" in cells
    with open(os.path.join(out, "results.json")) as f:
        two = json.load(f)
    assert two["complete"] and two["run"]["processes"] == 2
    for key, c in one["models"]["embedded"]["conditions"].items():
        d = two["models"]["embedded"]["conditions"][key]
        assert d["accuracy"] == c["accuracy"]
        assert d["vas"] == pytest.approx(c["vas"], rel=1e-5) and d["visual_share"] == pytest.approx(c["visual_share"],
                                                                                                     rel=1e-5)
