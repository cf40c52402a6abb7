"""The benchmark harness (avar_kernels/benchmark.py) on the CPU: interleaving, ratios, errors, memory, reports."""
import csv
import json
import time

import pytest
import torch

from avar_kernels import benchmark as bm


def test_compare_interleaves_in_rotating_order_after_warmup():
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    res = bm.compare(cases, baseline="a", reps=3, warmup=2)
    assert calls == list("aabbcc") + list("abc") + list("bca") + list("cab")
    assert [t.name for t in res.values()] == list("abc")
    assert all(len(t.times) == 3 and t.error is None for t in res.values())
    assert res["a"].ratio == 1.0


def test_compare_ratio_is_the_median_of_same_repetition_ratios(monkeypatch):
    # A fake clock that each case advances by its own schedule: the ratios are exact, whatever the machine's load.
    clock = [0.0]
    monkeypatch.setattr(bm.time, "perf_counter", lambda: clock[0])
    schedule = {"fast": iter([1.0, 2.0, 2.0, 2.0, 1.0]), "slow": iter([2.0, 2.0, 6.0, 6.0, 1.0])}

    def step(name):
        clock[0] += next(schedule[name])

    res = bm.compare({"fast": lambda: step("fast"), "slow": lambda: step("slow")}, baseline="fast", reps=5,
                     warmup=0)
    # per-repetition ratios 2, 1, 3, 3, 1: their median is 2, while the ratio of the median times is 2 / 2 = 1
    assert res["slow"].ratio == pytest.approx(2.0)
    assert res["slow"].min == 1.0 and res["slow"].median == 2.0
    assert res["fast"].ratio == pytest.approx(1.0)


def test_compare_number_divides_a_sample():
    res = bm.compare({"x": lambda: time.sleep(0.002)}, reps=2, warmup=0, number=3)
    assert all(0.002 <= t < 0.02 for t in res["x"].times)


def test_compare_records_a_failing_case_and_goes_on():
    calls = []

    def bad():
        calls.append("bad")
        raise RuntimeError("no kernel for this shape\nsecond line")

    res = bm.compare({"base": lambda: calls.append("base"), "bad": bad}, baseline="base", reps=3, warmup=1)
    assert res["bad"].error == "RuntimeError: no kernel for this shape"
    assert res["bad"].times == [] and res["bad"].median is None and res["bad"].ratio is None
    assert calls.count("bad") == 1 and len(res["base"].times) == 3
    failed_base = bm.compare({"base": bad, "other": lambda: None}, baseline="base", reps=2, warmup=0)
    assert failed_base["base"].error is not None and failed_base["other"].ratio is None


def test_compare_rejects_bad_arguments():
    with pytest.raises(ValueError, match="baseline"):
        bm.compare({"a": lambda: None}, baseline="b")
    with pytest.raises(ValueError, match="reps"):
        bm.compare({"a": lambda: None}, reps=0)


def test_timer_measures_the_block():
    with bm.timer("cpu") as t:
        time.sleep(0.01)
    assert 0.009 <= t.seconds < 1.0


_PEAK_SCRIPT = """
import torch
from avar_kernels import benchmark as bm

def alloc():
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    return float(x[-1])

big = bm.peak_memory(alloc)
assert 56 * 2**20 <= big.bytes <= 160 * 2**20, (big.bytes, big.method)
held = bm.memory_in_use()
keep = torch.ones(32 * 2**20 // 4)
assert bm.memory_in_use() - held >= 28 * 2**20
del keep
small = bm.peak_memory(lambda: None)
assert small.bytes < 16 * 2**20, (small.bytes, small.method)
assert big.method
"""


def test_peak_memory_counts_what_the_call_allocates():
    # A fresh process: pages that malloc kept from earlier tests would be reused without raising the peak.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_peak_tensor_memory_sees_a_square_buffer_and_its_release():
    q = torch.randn(1, 4, 256, 32)
    square = 4 * 256 * 256 * 4                                   # one fp32 [1, 4, 256, 256] buffer

    def eager():                                                  # scores and their softmax are alive together
        return torch.softmax(q @ q.transpose(-1, -2), -1) @ q

    def sequential():                                             # one square buffer at a time
        for _ in range(3):
            w = q @ q.transpose(-1, -2)
            del w
        return None

    assert 2 * square <= bm.peak_tensor_memory(eager).bytes < 3 * square
    assert square <= bm.peak_tensor_memory(sequential).bytes < 2 * square
    fused = bm.peak_tensor_memory(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert fused.bytes < square and fused.method
    assert bm.peak_tensor_memory(lambda: q.transpose(-1, -2)).bytes == 0   # a view of an input allocates nothing


def test_report_writes_markdown_json_csv_naming_the_environment(tmp_path):
    stem = str(tmp_path / "sub" / "table")
    report = bm.Report("Demo", ["S", "case", "ms", "ratio"], notes=["A note."], path=stem, digits={"ratio": 3})
    report.add({"S": 2048, "case": "sdpa", "ms": 157.43, "ratio": 1.0, "extra": "kept in json/csv"})
    report.add({"S": 2048, "case": "avar", "ms": None, "ratio": float("nan")})
    md = open(stem + ".md").read()
    assert md.startswith("# Demo\n\nA note.\n")
    assert "| S | case | ms | ratio |" in md and "| 2048 | sdpa | 157.4 | 1.000 |" in md
    assert "| 2048 | avar | n/a | n/a |" in md
    assert "Command: `" in md and report.env["device_name"] in md
    data = json.load(open(stem + ".json"))
    env = data["environment"]
    for key in ("device", "device_name", "torch", "triton", "transformers", "command", "date", "commit"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device_name"]
    assert data["rows"][0]["extra"] == "kept in json/csv" and len(data["rows"]) == 2
    rows = list(csv.DictReader(open(stem + ".csv")))
    assert len(rows) == 2 and rows[0]["case"] == "sdpa" and rows[0]["extra"] == "kept in json/csv"
    assert rows[1]["env_device_name"] == env["device_name"] and rows[1]["env_torch"] == torch.__version__


def test_fmt_and_attention_flops():
    assert bm.fmt(None) == "n/a" and bm.fmt(float("inf")) == "n/a" and bm.fmt(3) == "3"
    assert bm.fmt(0.93312) == "0.933" and bm.fmt(12.345) == "12.35" and bm.fmt(1234.56) == "1234.6"
    assert bm.fmt(1.23456, 2) == "1.23"
    assert bm.attention_flops(1, 1, 4, 4, 8, causal=False) == 4 * 4 * 4 * 8
    assert bm.attention_flops(2, 16, 4096, 4096, 128, causal=True, mode="fwd+bwd") == 3.5 * 2 * 2 * 16 * 4096**2 * 128
