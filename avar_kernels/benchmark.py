"""The benchmark harness of bench/ and the CLI: timing, interleaved comparisons, peak memory, reports.

    from avar_kernels import benchmark as bm

    # Interleaved repetitions: every repetition runs every case once (in a rotating order), so that a slow
    # moment of a shared machine hits all cases alike; the ratio of a case is the median over repetitions of
    # time(case) / time(baseline) from the same repetition.
    res = bm.compare({"sdpa": run_sdpa, "avar": run_avar}, baseline="sdpa", device="cuda", reps=10, warmup=2)
    res["avar"].median, res["avar"].min, res["avar"].ratio, res["avar"].error   # seconds, seconds, x, str | None
    res["avar"].ratio_to(res["other"])                                          # the same ratio to another case

    with bm.timer("cuda") as t:        # one timed region; synchronizes CUDA (events on the GPU)
        step()
    t.seconds

    mem = bm.peak_memory(step, "cpu")  # PeakMemory(bytes, method): peak beyond what was held before the call
    bm.memory_in_use("cpu")            # bytes held now (CUDA tensors, or the resident set on the CPU)
    mem = bm.peak_tensor_memory(step)  # peak bytes of the tensors the call creates, on any device

    report = bm.Report("Decode bandwidth", columns=["Sk", "ms", "GB/s"], device="cuda", path="out/decode")
    report.add({"Sk": 4096, "ms": 0.21, "GB/s": 2500.0})   # each add rewrites out/decode.{md,json,csv}
    print(report.markdown())

Timing. On CUDA a sample is bracketed by CUDA events and read after an event synchronize (GPU time of the
calls); on the CPU by ``time.perf_counter``. ``number`` calls make one sample (amortizes launch gaps of short
calls); ``flush_l2=True`` (CUDA) overwrites a 256 MiB buffer before every sample so that inputs smaller than
the L2 cache are read from device memory, as in ``triton.testing.do_bench``. A case that raises is recorded
with its error (``Timing.error``) and left out of the later repetitions; the others go on.

Peak memory beyond the inputs. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus ``memory_allocated`` before the call (the caching allocator's bytes handed to tensors). CPU: the kernel's
resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` before the call (Linux >= 4.0),
minus the resident size before it: this counts every allocation (torch tensors, extension scratch, BLAS buffers)
at page granularity. Memory that malloc kept from earlier calls is reused without showing, so measure the first
call of a size in a fresh process (bench/run_cpu.py runs one subprocess per case). Where ``clear_refs`` cannot be
written, a thread samples ``VmRSS`` every millisecond (a lower bound; ``PeakMemory.method`` says which).
``peak_tensor_memory`` counts instead, at byte granularity, the storages of the tensors that the call's torch
operators create (custom ops included), from creation to release: in a long-lived process on the CPU, where reused
malloc pages hide a small peak from the resident set, it still sees an S x S buffer; scratch memory that a kernel
allocates outside torch (the C++ backend's per-thread tiles) is not counted.

Reports. ``Report`` holds rows (dicts) and writes ``<path>.md`` (a title, notes, the environment and a markdown
table of ``columns``), ``<path>.json`` (environment, notes, every row with every key) and ``<path>.csv`` (every
key of every row, the environment repeated in ``env_*`` columns) after each ``add``, so a run cut off midway
leaves its figures. ``environment`` names the device (CPU model or GPU name), the versions of python, torch,
triton and transformers, the command line, the git commit and the date.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

__all__ = ["Timing", "PeakMemory", "Report", "compare", "timer", "sync", "peak_memory", "peak_tensor_memory",
           "memory_in_use",
           "environment", "attention_flops", "copy_bandwidth", "fmt"]


def _device(device) -> torch.device:
    return torch.device(device) if not isinstance(device, torch.device) else device


def sync(device) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if _device(device).type == "cuda":
        torch.cuda.synchronize(_device(device))


class _Timer:
    seconds: float = math.nan


@contextlib.contextmanager
def timer(device="cpu"):
    """Times the block: CUDA events around it and an event synchronize on the GPU, perf_counter on the CPU."""
    t = _Timer()
    if _device(device).type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield t
        end.record()
        end.synchronize()
        t.seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        yield t
        t.seconds = time.perf_counter() - t0


@dataclass
class Timing:
    """Seconds per call of one case: every sample, their median and minimum, the median ratio to the baseline."""
    name: str
    times: list = field(default_factory=list)
    ratio: float | None = None
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def min(self) -> float | None:
        return min(self.times) if self.times else None

    def ratio_to(self, other: Timing) -> float | None:
        """Median over repetitions of time(self) / time(other) in the same repetition (None if either failed)."""
        if self.error is not None or other.error is not None or not self.times or len(self.times) != len(other.times):
            return None
        return statistics.median(a / b for a, b in zip(self.times, other.times))


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def compare(cases: dict[str, Callable[[], object]], *, baseline: str | None = None, device="cpu", reps: int = 5,
            warmup: int = 1, number: int = 1, flush_l2: bool = False) -> dict[str, Timing]:
    """Times each case ``reps`` times, interleaved, after ``warmup`` calls each (compilation, autotuning).

    Repetition r runs the cases in the order rotated by r. Returns a Timing per case, in the order of ``cases``;
    with a baseline, ``Timing.ratio`` is the median of the per-repetition ratios time(case) / time(baseline).
    """
    if baseline is not None and baseline not in cases:
        raise ValueError(f"baseline: {baseline!r} is not one of the cases {list(cases)}")
    if reps < 1 or number < 1 or warmup < 0:
        raise ValueError(f"reps and number must be >= 1 and warmup >= 0, got {reps}, {number}, {warmup}")
    dev = _device(device)
    flush = torch.empty(64 * 2**20, dtype=torch.float32, device=dev) if (flush_l2 and dev.type == "cuda") else None
    out = {name: Timing(name) for name in cases}
    for name, fn in cases.items():
        try:
            for _ in range(warmup):
                fn()
            sync(dev)
        except Exception as exc:  # a failing case is reported, never fatal
            out[name].error = _error_text(exc)
    names = list(cases)
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if out[name].error is not None:
                continue
            if flush is not None:
                flush.zero_()
            try:
                with timer(dev) as t:
                    for _ in range(number):
                        cases[name]()
            except Exception as exc:
                out[name].error = _error_text(exc)
                continue
            out[name].times.append(t.seconds / number)
    if baseline is not None:
        for timing in out.values():
            timing.ratio = timing.ratio_to(out[baseline])
    return out


# ------------------------------------------------------------------------------------------------ memory

@dataclass
class PeakMemory:
    bytes: int
    method: str


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"/proc/self/status has no {key}")
    return int(m.group(1)) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def memory_in_use(device="cpu") -> int:
    """Bytes held now: CUDA tensors (torch.cuda.memory_allocated) or the process's resident set (VmRSS)."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev)
    return _status_bytes("VmRSS")


def peak_memory(fn: Callable[[], object], device="cpu") -> PeakMemory:
    """Peak memory of one call of fn beyond what was held before it (its results included while alive)."""
    dev = _device(device)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        result = fn()
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del result
        return PeakMemory(int(peak), "torch.cuda.max_memory_allocated")
    if _reset_hwm():
        before = _status_bytes("VmRSS")
        result = fn()
        peak = _status_bytes("VmHWM") - before
        del result
        return PeakMemory(max(0, peak), "VmHWM (reset via /proc/self/clear_refs)")
    before = _status_bytes("VmRSS")
    high = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            high[0] = max(high[0], _status_bytes("VmRSS"))
            time.sleep(1e-3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
        high[0] = max(high[0], _status_bytes("VmRSS"))
    finally:
        done.set()
        sampler.join()
    del result
    return PeakMemory(max(0, high[0] - before), "VmRSS sampled every 1 ms (lower bound)")


class _TensorPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of the storages that operators create while active, each until it is released."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {}

    def _release(self, key, nbytes):
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in known or key in self._refs or st.nbytes() == 0:   # a view, an in-place result, seen before
                continue
            nbytes = st.nbytes()
            self._refs[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._release(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def peak_tensor_memory(fn: Callable[[], object]) -> PeakMemory:
    """Peak bytes held by the tensors that ``fn`` creates through torch operators (its results while alive)."""
    mode = _TensorPeak()
    with mode:
        result = fn()
    del result
    return PeakMemory(int(mode.peak), "tensor storages created by torch operators (TorchDispatchMode)")


# ------------------------------------------------------------------------------------------------ environment

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device="cpu") -> dict:
    """Where and how a benchmark ran: device name, versions, command line, commit and date."""
    dev = _device(device)
    env = {"device": str(dev)}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(device_name=props.name, gpu_sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env.update(device_name=_cpu_model(), cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    env.update(python=platform.python_version(), torch=torch.__version__, triton=_version("triton"),
               transformers=_version("transformers"),
               command=shlex.join([os.path.basename(sys.executable)] + sys.argv), commit=_git_commit(),
               date=datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"))
    return env


# ------------------------------------------------------------------------------------------------ reports

def fmt(x, digits: int | None = None) -> str:
    """A table cell: n/a for None/NaN, floats with 3 significant digits at least (or ``digits`` decimals)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, float):
        return str(x)
    if digits is not None:
        return f"{x:.{digits}f}"
    ax = abs(x)
    return f"{x:.3f}" if ax < 10 else f"{x:.2f}" if ax < 100 else f"{x:.1f}"


class Report:
    """Rows of one benchmark, written as markdown, JSON and CSV (see the module docstring)."""

    def __init__(self, title: str, columns: Sequence[str], *, device="cpu", notes: Iterable[str] = (),
                 path: str | None = None, digits: dict[str, int] | None = None, env: dict | None = None):
        self.title = title
        self.columns = list(columns)
        self.notes = list(notes)
        self.digits = dict(digits or {})
        self.env = env if env is not None else environment(device)
        self.rows: list[dict] = []
        self.path = path

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.path is not None:
            self.write()
        return row

    def markdown(self) -> str:
        e = self.env
        where = ", ".join(f"{k} {e[k]}" for k in ("torch", "triton", "transformers") if e.get(k))
        lines = [f"# {self.title}", ""]
        for note in self.notes:
            lines += [note, ""]
        lines += [f"Device: {e.get('device_name')} ({e.get('device')}); {where}; {e.get('date')}; "
                  f"commit {e.get('commit')}.", "", f"Command: `{e.get('command')}`", "",
                  "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(fmt(row.get(c), self.digits.get(c)) for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def write(self, path: str | None = None) -> list[str]:
        """Writes <path>.md, .json and .csv (path without suffix; default: the Report's path)."""
        stem = os.path.splitext(path or self.path)[0]
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        paths = [stem + ".md", stem + ".json", stem + ".csv"]
        with open(paths[0], "w") as f:
            f.write(self.markdown())
        with open(paths[1], "w") as f:
            json.dump({"title": self.title, "environment": self.env, "notes": self.notes, "columns": self.columns,
                       "rows": self.rows}, f, indent=1, default=str)
        keys = list(self.columns) + sorted({k for r in self.rows for k in r} - set(self.columns))
        env_keys = [f"env_{k}" for k in self.env]
        with open(paths[2], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys + env_keys)
            w.writeheader()
            for row in self.rows:
                w.writerow({**{k: row.get(k) for k in keys}, **{f"env_{k}": v for k, v in self.env.items()}})
        return paths


# ------------------------------------------------------------------------------------------------ figures

def attention_flops(batch: int, heads: int, sq: int, sk: int, head_dim: int, causal: bool,
                    mode: str = "fwd") -> float:
    """Nominal attention FLOPs (two [sq, sk, head_dim] products), halved for a causal square; the backward
    counts 2.5x the forward (five products) and ``fwd+bwd`` 3.5x, the FlashAttention convention."""
    f = 4.0 * batch * heads * sq * sk * head_dim
    if causal:
        f /= 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def copy_bandwidth(device="cuda", nbytes: int = 2**30, reps: int = 10) -> float:
    """Measured device-memory bandwidth of a large copy, bytes read plus written per second (median)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    res = compare({"copy": lambda: dst.copy_(src)}, device=device, reps=reps, warmup=2)
    return 2 * n * 4 / res["copy"].median
