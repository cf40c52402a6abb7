"""Two processes (torchrun, gloo, CPU) train the embedded default: identical weights on both ranks, and the loss
and the weights of one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

WORKER = os.path.join(os.path.dirname(__file__), "sft_dist_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(cmds, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run_all([[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               WORKER, "--out", str(ddp), "--per-device", "2"],
              [sys.executable, WORKER, "--out", str(single), "--per-device", "4"]], tmp_path)
    w0, w1 = (torch.load(ddp / f"rank{r}.pt") for r in (0, 1))
    ws = torch.load(single / "rank0.pt")
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        torch.testing.assert_close(w0[name], ws[name], rtol=1e-4, atol=1e-6, msg=name)
    a, b = (json.loads((d / "log.json").read_text()) for d in (ddp, single))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("loss", "lm_loss", "l_enh", "l_sup"):
            assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-4), key
    assert a[0]["loss"] != a[1]["loss"]                       # the weights moved between the two steps
