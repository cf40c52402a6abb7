"""Every Triton kernel and variant compiles for sm_90a (H100 / H200) at its first launch config, ahead of time and
without a GPU (bench/aot_triton.py --check): with the installed triton at D = 128, with the GPU image's (triton 3.6)
at the GPU tests' head dims 64, 128 and 256.

The two versions lower kernels differently: a kernel that triton 3.9 compiles can fail in 3.6's software
pipeliner (a branch on one product's result feeding another product did, session 4), and the interpreter tests
never reach that compiler. `.ci/run` unpacks triton 3.6 and points AVAR_GPU_TRITON at it; elsewhere that case
skips unless the variable is set (PYTHONPATH-style folder holding a `triton` package).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
GPU_TRITON = os.environ.get("AVAR_GPU_TRITON")


def triton_version(env) -> str:
    return subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("which", ["installed", "gpu-image"])
def test_kernels_compile_for_sm90(which, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    dims = ["128"]
    if which == "gpu-image":  # the GPU tests' head dims
        dims = ["64", "128", "256"]
        if not GPU_TRITON:
            pytest.skip("AVAR_GPU_TRITON is not set (a folder holding triton 3.6, as .ci/run unpacks it)")
        env["PYTHONPATH"] = GPU_TRITON
        assert triton_version(env).startswith("3.6"), f"AVAR_GPU_TRITON={GPU_TRITON} does not hold triton 3.6"
    out = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "bench/aot_triton.py", "--arch", "90", "--dims", *dims, "--first", "1",
                          "--jobs", "2", "--check", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    failures = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert run.returncode == 0, "\n".join(failures) or run.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels = {(r["kernel"], r["variant"]) for r in rows}
    # every kernel of every variant was compiled: the forward and backward of each, the key-mass passes
    assert {k for k, _ in kernels} == {"fwd", "dq", "dkdv", "km", "kmd"}
    assert len({v for _, v in kernels}) >= 5
    assert all(r["regs"] > 0 for r in rows)
