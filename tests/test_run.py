"""The main job (``avar-kernels run``) on the embedded default, shortened: every step runs, the report covers every
model with and without an intervention, a restart redoes nothing, and bad input is a one-line error."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("matplotlib")

from avar_kernels.cli import main  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run faster on one thread than on two (op dispatch dominates); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHORT = ["--train-samples", "32", "--grpo-samples", "8", "--samples", "4", "--sft-steps", "2", "--grpo-steps", "1",
         "--set-grpo", "max_completion_length=16", "--max-new-tokens", "6", "--batch-size", "4", "--bench-samples",
         "2", "--bench-new-tokens", "2", "--bench-reps", "1", "--no-progress"]


def test_main_job_end_to_end_and_restart(tmp_path, capsys):
    out = str(tmp_path / "job")
    assert main(["run", "--out", out, *SHORT]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5] data", "[2/5] sft: plain SFT", "[3/5] avar-sft: attention-guided SFT",
                 "[4/5] grpo: GRPO with the visual reward", "[5/5] eval: 4 models x 2 conditions"):
        assert step in printed
    for model in ("start", "sft", "avar-sft", "grpo"):
        assert re.search(rf"^{re.escape(model)}\s+none\s+\d\.\d{{3}} \(\d/4\)\s+\d", printed, re.M), model
        assert re.search(rf"^{re.escape(model)}\s+vaf=0\.15\s+\d\.\d{{3}} \(\d/4\)", printed, re.M), model
    assert f"report (complete): {os.path.join(out, 'report', 'summary.md')}" in printed
    assert re.search(r"^image-blind answerer .* on these questions: \d\.\d{3} \(\d/4\)$", printed, re.M)
    for step in ("sft", "avar-sft", "grpo"):
        assert os.path.isfile(os.path.join(out, step, "report.json")), step
        assert os.path.isfile(os.path.join(out, step, "config.json")), step
    with open(os.path.join(out, "job.json")) as f:
        job = json.load(f)
    assert set(job["steps"]) == {"data", "sft", "avar-sft", "grpo", "eval"} and job["steps"]["eval"]["complete"]
    with open(os.path.join(out, "report", "results.json")) as f:
        res = json.load(f)
    assert res["complete"] and list(res["models"]) == ["start", "sft", "avar-sft", "grpo"]
    assert res["run"]["dataset_fingerprint"]["file"] == os.path.abspath(os.path.join(out, "data", "test", "test.jsonl"))
    # the two SFT runs differ only in the attention-guided terms
    sft = json.load(open(os.path.join(out, "sft", "report.json")))["train"]
    avar = json.load(open(os.path.join(out, "avar-sft", "report.json")))["train"]
    assert sft["train_loss"] != avar["train_loss"]

    # a restart finds every step done and recomputes nothing
    assert main(["run", "--out", out, *SHORT]) == 0
    again = capsys.readouterr().out
    for step in ("data", "sft", "avar-sft", "grpo"):
        assert f"{step}: done earlier" in again
    assert "report (complete)" in again


def test_main_job_in_two_processes(tmp_path):
    """The same job under torchrun (2 CPU processes over gloo): one table printed, one complete report in which every
    question of every (model, condition) is scored exactly once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "avar_kernels", "run", "--out", str(out), *SHORT]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report (complete)") == 1                   # only the main process prints
    with open(out / "report" / "results.json") as f:
        res = json.load(f)
    assert res["complete"] and res["run"]["processes"] == 2
    assert list(res["models"]) == ["start", "sft", "avar-sft", "grpo"]
    for name, m in res["models"].items():
        assert list(m["conditions"]) == ["none", "vaf=0.15"], name
        for c in m["conditions"].values():
            assert c["samples"] == c["scored"] == 4, name
    with open(out / "job.json") as f:
        assert set(json.load(f)["steps"]) == {"data", "sft", "avar-sft", "grpo", "eval"}


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/ckpt"], "model 'start': no such checkpoint directory: /nonexistent/ckpt"),
    (["--data-seed", "0"], "--data-seed 0: the test questions must not share the seed of the training data"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert main(["run", "--out", str(tmp_path / "job"), *SHORT, *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("avar-kernels run: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "job" / "sft")


def test_missing_data_file_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--out", str(tmp_path / "job"), "--sft-data", "/nonexistent/sft.jsonl"])
    assert exit_.value.code == 2 and "argument --sft-data: no such file" in capsys.readouterr().err
