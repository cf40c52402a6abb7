"""Seeded random fuzz of the public op against the float64 ``reference`` backend (docs/op.md, "How results are judged").

    python tests/fuzz_op.py --configs 10000 --seed 0 --jobs 2
    python tests/fuzz_op.py --replay fuzz_failures.jsonl

Each configuration (a JSON dict drawn from its seed) calls ``avar_kernels.attention``, ``attention_varlen`` or
``attention_with_kvcache`` on the ``cpu`` backend (or, for a small share of tiny shapes, ``triton`` under
TRITON_INTERPRET=1) and compares out, mass, lse, key_mass, dq, dk, dv and the gradients of learned re-weighting
tables with the reference run in float64, under the FlashAttention rule of tests/helpers.py. Edge cases: empty inputs,
NaN / inf in q, k or v (NaN must appear exactly where the reference has it), huge logits, class ids out of range
(a ValueError naming the class tensor) and non-bool flags (a TypeError naming the flag).

Configurations run in chunks, each chunk in a fresh subprocess with ``torch.empty`` NaN-poisoned as in
tests/conftest.py and the CPU kernel's block sizes of the chunk (read by the extension when it loads). A config that
crashes or hangs its subprocess is recorded with its seed and the rest of its chunk runs in a new one. The run ends
with a summary table and writes every failing config as one JSON line that ``--replay`` runs again.
tests/test_fuzz.py runs a short fixed-seed selection of the same configurations in CI.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AVAR_TRITON_AUTOTUNE", "0")  # one launch config per specialization: results, not speed

from helpers import ATOL, fa_close  # noqa: E402

import avar_kernels as ak  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CPU kernel's tile (AVAR_CPU_QBLOCK / AVAR_CPU_KBLOCK, one grid for forward and backward): the tuned default,
# and small tiles that take the multi-tile paths at the fuzz's short lengths.
BLOCK_ENV = {
    "default": {},
    "small": {"AVAR_CPU_QBLOCK": "16", "AVAR_CPU_KBLOCK": "32"},
}
EDGES = {"none": 0.76, "empty": 0.06, "nonfinite": 0.07, "huge": 0.06, "bad_class": 0.03, "bad_flag": 0.02}
OPS = {"padded": 0.4, "varlen": 0.4, "kvcache": 0.2}
TRITON_SHARE = 0.04
TABLE_SCALE = {"mul": 0.3, "abs": 0.2, "add": 1.0}
# hq * d * (query-key pairs) above which a config's head dim is lowered: keeps a config near 0.1-1 s on one core
WORK_LIMIT = 3e7
START, RESULT = "@@fuzz-start ", "@@fuzz-result "


# ------------------------------------------------------------------------------------------------ sampling

def _pick(r, weights):
    return r.choices(list(weights), weights=list(weights.values()))[0]


def _length(r, tiny):
    if tiny:
        return r.randint(1, 24)
    u = r.random()
    return r.randint(1, 48) if u < 0.6 else r.randint(49, 200) if u < 0.9 else r.randint(201, 600)


def sample_config(seed, small=False):
    """The configuration drawn from ``seed``; ``small`` keeps shapes short (for CI) and the CPU default blocks."""
    r = random.Random(seed)
    edge = _pick(r, EDGES)
    op = _pick(r, OPS)
    backend = "triton" if r.random() < TRITON_SHARE else "cpu"
    tiny = small or backend == "triton"
    cfg = {"seed": seed, "op": op, "edge": edge, "backend": backend,
           "blocks": "default" if small or backend == "triton" else r.choice(list(BLOCK_ENV)),
           # bf16 tl.dot is wrong in the Triton interpreter: Triton runs fp32 and fp16 here
           "dtype": r.choice(["float32", "float16"] if backend == "triton" else list(DTYPES)),
           "threads": r.choice([1, 2]), "grad": r.random() < 0.7}
    hk = r.choice([1, 1, 2, 3])
    hq = hk * r.choice([1, 2, 3, 4] if hk < 3 else [1, 2])
    if tiny:
        hk, hq = 1, r.choice([1, 2])
    cfg.update(hq=hq, hk=hk, causal=r.random() < 0.5, window=None)

    if op == "padded":
        b, sq, sk = r.randint(1, 3), _length(r, tiny), _length(r, tiny)
        if r.random() < 0.4:
            sq = sk
        cfg.update(b=b, sq=sq, sk=sk, noncontig=r.random() < 0.2)
        pairs = b * sq * sk
    elif op == "varlen":
        n = r.randint(1, 4)
        lens_q, lens_k = [], []
        for _ in range(n):
            lk = 0 if r.random() < 0.1 else _length(r, tiny)
            lq = 0 if r.random() < 0.1 else lk if r.random() < 0.4 else _length(r, tiny)
            lens_q.append(lq)
            lens_k.append(lk)
        cfg.update(lens_q=lens_q, lens_k=lens_k, slack=r.choice([0, 0, 0, 3]))
        pairs = sum(a * b for a, b in zip(lens_q, lens_k))
    else:
        b = r.randint(1, 3)
        sq = r.randint(1, 16) if r.random() < 0.8 else r.randint(17, 40)
        if tiny:
            sq = r.randint(1, 8)
        page = r.choice([0, 0, 16, 32])
        sk_max = max(sq, _length(r, tiny))
        if page:
            sk_max = -(-sk_max // page) * page
        lens = [0 if r.random() < 0.15 else r.randint(sq, sk_max) for _ in range(b)]
        cfg.update(b=b, sq=sq, sk_max=sk_max, page=page, cache_lens=lens, causal=r.random() < 0.7)
        pairs = sum(lens) * sq
    if op != "kvcache" and r.random() < 0.3:
        span = max(cfg.get("sk", 0), max(cfg.get("lens_k", [0])), 1)
        cfg["window"] = [r.choice([-1, r.randint(0, 2 * span)]), r.choice([-1, r.randint(0, 2 * span)])]

    dims = [8, 16, 32] if tiny else [8, 16, 32, 40, 64, 80, 96, 128, 160, 256]
    fit = [d for d in dims if hq * d * max(pairs, 1) <= WORK_LIMIT] or [dims[0]]
    cfg["d"] = r.choice(fit)

    c = 0 if r.random() < 0.15 else r.randint(1, 8)
    cfg.update(c=c, layout=r.choice(["random", "spans", "single"]), qlayout=None, num_classes_given=False,
               class_dtype=r.choice(["int32", "int64"]), tables=[], scale_mult=1.0, huge_add=0.0)
    if c:
        cfg["num_classes_given"] = r.random() < 0.5
        if r.random() < 0.4:
            cfg["qlayout"] = r.choice(["random", "spans", "single"])
        if r.random() < 0.5:
            names = [n for n in ("mul", "abs", "add") if r.random() < 0.5] or [r.choice(["mul", "abs", "add"])]
            for name in names:
                cfg["tables"].append({"name": name, "shape": r.choice(["C", "CC", "HCC"]),
                                      "learned": cfg["grad"] and r.random() < 0.35, "zero": r.random() < 0.1})
    cfg.update(return_mass=r.random() < 0.9, return_lse=r.random() < 0.8, use_dmass=r.random() < 0.8,
               use_dlse=r.random() < 0.7, return_key_mass=c > 0 and r.random() < 0.1, use_dkey_mass=r.random() < 0.8)
    _sample_edge(r, cfg)
    # without query_class a query takes the class of a key position: where queries outnumber keys, it is required
    q_longer = (op == "padded" and cfg["sq"] > cfg["sk"]) or \
               (op == "varlen" and any(a > b for a, b in zip(cfg["lens_q"], cfg["lens_k"])))
    if cfg["c"] and q_longer and cfg["qlayout"] is None:
        cfg["qlayout"] = r.choice(["random", "spans", "single"])
    return cfg


def _sample_edge(r, cfg):
    edge, op = cfg["edge"], cfg["op"]
    if edge == "empty":
        if op == "padded":
            cfg["variant"] = r.choice(["sq0", "sk0", "b0"])
            key = {"sq0": "sq", "sk0": "sk", "b0": "b"}[cfg["variant"]]
            cfg[key] = 0
        elif op == "varlen":
            cfg["variant"] = r.choice(["tq0", "tk0"])
            cfg["lens_q" if cfg["variant"] == "tq0" else "lens_k"] = [0] * len(cfg["lens_q"])
        else:
            cfg["variant"] = r.choice(["b0", "all_empty"])
            if cfg["variant"] == "b0":
                cfg["b"], cfg["cache_lens"] = 0, []
            else:
                cfg["cache_lens"] = [0] * cfg["b"]
    elif edge == "nonfinite":
        cfg["variant"] = {"tensor": r.choice(["q", "k", "v"]), "value": r.choice(["nan", "inf", "-inf"]),
                          "count": r.randint(1, 3)}
    elif edge == "huge":
        if cfg["c"] and r.random() < 0.5:
            # a huge additive entry on some classes: the row's mass concentrates on them and must stay normalised
            cfg["variant"] = "add"
            cfg["huge_add"] = 1e4 if cfg["dtype"] == "float16" else r.choice([1e4, 1e8, 1e30])
        else:
            cfg["variant"] = "scale"  # |z| ~ 30..300
            cfg["scale_mult"] = r.choice([30.0, 100.0, 300.0])
    elif edge == "bad_class":
        if op == "kvcache" and not any(cfg["cache_lens"]):
            cfg["cache_lens"][0] = cfg["sk_max"]
        if cfg["c"] == 0:
            cfg["c"] = r.randint(1, 8)
        which = r.choice(["key_class", "query_class"])
        if which == "query_class" and cfg["qlayout"] is None:
            cfg["qlayout"] = "random"
        bad = [-1, 8, 100] + ([cfg["c"]] if cfg["num_classes_given"] else [])
        cfg["variant"] = {"which": which, "value": r.choice(bad)}
    elif edge == "bad_flag":
        flags = ["causal", "return_mass", "return_lse", "return_key_mass"]
        cfg["variant"] = {"flag": r.choice(flags), "value": r.choice(["yes", 1, None])}


def category(cfg):
    return cfg["op"] if cfg["edge"] == "none" else "edge:" + cfg["edge"]


# ------------------------------------------------------------------------------------------------ one config

def _classes(layout, n, c, gen):
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    if layout == "random":
        return torch.randint(0, c, (n,), generator=gen)
    if layout == "single":
        return torch.full((n,), int(torch.randint(0, c, (1,), generator=gen)), dtype=torch.long)
    # contiguous spans, as in a VLM prompt (system, image, user text, image, response, ...)
    spans = int(torch.randint(1, min(6, n) + 1, (1,), generator=gen))
    cuts = sorted(torch.randperm(n - 1, generator=gen)[:spans - 1].add(1).tolist()) if n > 1 else []
    bounds = [0] + cuts + [n]
    ids = torch.randint(0, c, (len(bounds) - 1,), generator=gen)
    return torch.cat([torch.full((bounds[i + 1] - bounds[i],), int(ids[i])) for i in range(len(bounds) - 1)])


class Case:
    """A config's inputs: the op, float64 q/k/v (already rounded to the config's dtype), the other arguments."""

    def __init__(self, cfg):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg["seed"])
        dtype = DTYPES[cfg["dtype"]]
        hq, hk, d, c = cfg["hq"], cfg["hk"], cfg["d"], cfg["c"]
        cls_dtype = getattr(torch, cfg["class_dtype"])

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).double()

        def classes(layout, lens):
            return torch.cat([_classes(layout, n, c, gen) for n in lens] or [torch.zeros(0, dtype=torch.long)])

        kwargs = {}
        if cfg["op"] == "padded":
            b, sq, sk = cfg["b"], cfg["sq"], cfg["sk"]
            self.fn = ak.attention
            q, k, v = randn(b, sq, hq, d), randn(b, sk, hk, d), randn(b, sk, hk, d)
            kc = classes(cfg["layout"], [sk] * b).view(b, sk) if c else None
            qc = classes(cfg["qlayout"], [sq] * b).view(b, sq) if c and cfg["qlayout"] else None
            self.args = [kc]
            kwargs["window"] = tuple(cfg["window"]) if cfg["window"] else None
        elif cfg["op"] == "varlen":
            lq, lk = cfg["lens_q"], cfg["lens_k"]
            self.fn = ak.attention_varlen
            q, k, v = randn(sum(lq), hq, d), randn(sum(lk), hk, d), randn(sum(lk), hk, d)
            cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
            cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
            kc = classes(cfg["layout"], lk) if c else None
            qc = classes(cfg["qlayout"], lq) if c and cfg["qlayout"] else None
            self.args = [cu_q, cu_k, max(lq) + cfg["slack"], max(lk) + cfg["slack"], kc]
            kwargs["window"] = tuple(cfg["window"]) if cfg["window"] else None
        else:
            b, sq, sk_max, page = cfg["b"], cfg["sq"], cfg["sk_max"], cfg["page"]
            self.fn = ak.attention_with_kvcache
            q = randn(b, sq, hq, d)
            if page:
                per_seq = sk_max // page
                num_blocks = b * per_seq + 2  # two spare pages that no sequence uses
                k, v = randn(num_blocks, page, hk, d), randn(num_blocks, page, hk, d)
                kwargs["block_table"] = torch.randperm(num_blocks, generator=gen)[:b * per_seq].view(
                    b, per_seq).to(torch.int32)
            else:
                k, v = randn(b, sk_max, hk, d), randn(b, sk_max, hk, d)
            kc = classes(cfg["layout"], [sk_max] * b).view(b, sk_max) if c else None
            qc = classes(cfg["qlayout"], [sq] * b).view(b, sq) if c and cfg["qlayout"] else None
            self.args = [torch.tensor(cfg["cache_lens"], dtype=torch.int32), kc]
        if qc is not None and not cfg["num_classes_given"] and not cfg["tables"] and not cfg["huge_add"]:
            # C is then inferred from the key ids (of the valid cache positions in decode): keep the queries' below
            valid = kc if cfg["op"] != "kvcache" else torch.cat(
                [kc[i, :n] for i, n in enumerate(cfg["cache_lens"])] or [kc.view(-1)])
            qc = qc.clamp(max=int(valid.max()) if valid.numel() else 0)
        if kc is not None:
            self.args[-1] = kc.to(cls_dtype)
        if qc is not None:
            kwargs["query_class"] = qc.to(cls_dtype)
        if c and cfg["num_classes_given"]:
            kwargs["num_classes"] = c
        kwargs["causal"] = cfg["causal"]
        if cfg["scale_mult"] != 1.0:
            kwargs["softmax_scale"] = cfg["scale_mult"] * d ** -0.5
        kwargs["return_mass"] = cfg["return_mass"]
        if cfg["return_key_mass"]:
            kwargs["return_key_mass"] = True
        self.kwargs = kwargs

        self.tables = {}  # name -> (float32 value, learned)
        for t in cfg["tables"]:
            shape = {"C": (c,), "CC": (c, c), "HCC": (hq, c, c)}[t["shape"]]
            value = torch.zeros(shape) if t["zero"] else TABLE_SCALE[t["name"]] * torch.randn(*shape, generator=gen)
            self.tables[t["name"]] = (value, t["learned"])
        if cfg["huge_add"]:
            add = self.tables.get("add", (torch.zeros(c), False))
            value = add[0].clone()
            flat = value.view(-1)
            flat[torch.randperm(flat.numel(), generator=gen)[:max(1, flat.numel() // 3)]] = cfg["huge_add"]
            self.tables["add"] = (value, add[1])

        self.poke = None  # (index in q, k, v; bool mask; value): the non-finite entries of the nonfinite edge case
        if cfg["edge"] == "nonfinite":
            var = cfg["variant"]
            which = "qkv".index(var["tensor"])
            t = (q, k, v)[which]
            mask = torch.zeros(t.numel(), dtype=torch.bool)
            if t.numel():
                mask[torch.randint(0, t.numel(), (var["count"],), generator=gen)] = True
            self.poke = (which, mask.view(t.shape), float(var["value"]))
        if cfg["op"] == "padded" and cfg["noncontig"]:
            # a [B, H, S, D] tensor viewed as [B, S, H, D], as transformers hands it over
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        self.qkv = (q, k, v)

    def cotangent(self, name, shape):
        """The upstream gradient of an output: the same for every run of the config (seeded by config and name)."""
        gen = torch.Generator().manual_seed(self.cfg["seed"] * 8 + ("out", "mass", "lse", "key_mass").index(name))
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def run(self, dtype, backend, overrides=None, poke_value=None):
        """The op in ``dtype`` on ``backend`` -> {name: float64 tensor or None}: outputs, then gradients.

        ``poke_value`` replaces the value of the nonfinite edge case's entries.
        """
        cfg = self.cfg
        grad = cfg["grad"]
        qkv = [t.detach().to(dtype) for t in self.qkv]
        if self.poke is not None:
            which, mask, value = self.poke
            qkv[which] = qkv[which].clone()
            qkv[which][mask] = value if poke_value is None else poke_value
        q, k, v = (t.requires_grad_(grad) for t in qkv)
        leaves = {n: value.clone().requires_grad_(learned and grad) for n, (value, learned) in self.tables.items()}
        kwargs = dict(self.kwargs)
        if leaves:
            kwargs["reweight"] = ak.Reweight(**leaves)
        kwargs.update(return_lse=cfg["return_lse"], backend=backend)
        kwargs.update(overrides or {})
        res = self.fn(q, k, v, *self.args, **kwargs)
        got = {"out": res.out, "mass": res.mass, "lse": res.lse, "key_mass": res.key_mass}
        if not grad:
            return {n: None if t is None else t.detach().double() for n, t in got.items()}
        loss = (res.out.double() * self.cotangent("out", res.out.shape)).sum()
        if res.mass is not None and cfg["use_dmass"]:
            loss = loss + (res.mass.double() * self.cotangent("mass", res.mass.shape)).sum()
        if res.key_mass is not None and cfg["use_dkey_mass"]:
            loss = loss + (res.key_mass.double() * self.cotangent("key_mass", res.key_mass.shape)).sum()
        if res.lse is not None and cfg["use_dlse"]:
            lse = res.lse.double()
            loss = loss + (lse.masked_fill(lse == -math.inf, 0) * self.cotangent("lse", lse.shape)).sum()
        wrt = {"dq": q, "dk": k, "dv": v}
        wrt.update({"d_" + n: t for n, t in leaves.items() if t.requires_grad})
        grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True) if loss.requires_grad else \
            [None] * len(wrt)
        got.update({n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(wrt.items(), grads)})
        return {n: None if t is None else t.detach().double() for n, t in got.items()}


def compare(name, got, ref64, ref_lowp, atol, unseen=None):
    """(kind, message) when ``got`` breaks the FlashAttention rule against ``ref64``, else None.

    NaN must appear wherever the float64 reference has it, except in the entries of ``unseen`` (those that do not
    depend on the non-finite inputs: the reference's P @ V spreads NaN there through 0 * NaN on keys a row does not
    see), and nowhere else. The other entries follow tests/helpers.py's rule (entries where the low-precision
    reference itself is NaN give no error baseline and are left out).
    """
    if (got is None) != (ref64 is None):
        return "presence", f"{name}: {'missing' if got is None else 'returned'} while the reference " \
                           f"{'returns it' if got is None else 'does not'}"
    if got is None:
        return None
    if got.shape != ref64.shape:
        return "shape", f"{name}: shape {tuple(got.shape)} != the reference's {tuple(ref64.shape)}"
    nan_ref, nan_got = torch.isnan(ref64), torch.isnan(got)
    missing = nan_ref & ~nan_got & (True if unseen is None else ~unseen)
    if missing.any():
        return "nan_missing", f"{name}: {int(missing.sum())} of the reference's {int(nan_ref.sum())} NaN are not " \
                              f"NaN here (e.g. {got[missing][:3].tolist()})"
    if (nan_got & ~nan_ref).any():
        return "nan_extra", f"{name}: {int((nan_got & ~nan_ref).sum())} NaN where the reference has none"
    keep = ~nan_ref & ~torch.isnan(ref_lowp)
    try:
        fa_close(name, got[keep], ref64[keep], ref_lowp[keep], atol)
    except AssertionError as exc:
        return ("inf_mismatch" if "infinities" in str(exc) else "fa_rule"), str(exc)
    return None


def _error_kind(exc):
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {re.sub(r'(?<![A-Za-z_])[0-9]+', '#', first)[:150]}"


def _check_raises(case, exc_type, needle):
    try:
        case.run(DTYPES[case.cfg["dtype"]], case.cfg["backend"], case.cfg.get("overrides"))
    except exc_type as exc:
        if needle in str(exc):
            return []
        return [("wrong_message", f"{type(exc).__name__} does not name {needle!r}: {exc}")]
    except Exception as exc:  # any other error is the finding
        return [("wrong_error:" + _error_kind(exc), f"expected {exc_type.__name__} naming {needle!r}, got "
                 f"{type(exc).__name__}: {exc}")]
    return [("no_error", f"expected {exc_type.__name__} naming {needle!r}, nothing raised")]


def _check_against_reference(case):
    cfg = case.cfg
    dtype = DTYPES[cfg["dtype"]]
    learned = cfg["grad"] and any(t["learned"] for t in cfg["tables"])
    try:
        ref64 = case.run(torch.float64, "reference")
        ref_lowp = ref64 if dtype == torch.float64 else case.run(dtype, "reference")
        # Table gradients are float32 whatever the inputs' dtype (docs/backends.md): in a float64 config they are
        # judged like a float32 run, against the reference's float32 error.
        ref_tables = case.run(torch.float32, "reference") if learned and dtype == torch.float64 else ref_lowp
    except Exception as exc:
        return [("reference_raised:" + _error_kind(exc), f"the reference raised {type(exc).__name__}: {exc}")]
    try:
        got = case.run(dtype, cfg["backend"])
    except Exception as exc:
        return [("raised:" + _error_kind(exc), f"{type(exc).__name__}: {exc}")]
    unseen = {}
    if case.poke is not None:
        # the entries that depend on the non-finite inputs change when those inputs take two finite values
        zero, one = (case.run(torch.float64, "reference", poke_value=x) for x in (0.0, 1.0))
        unseen = {n: None if zero[n] is None else zero[n] == one[n] for n in zero}
    failures = []
    for name, ref in ref64.items():
        table = name.startswith("d_")
        atol = ATOL[torch.float32 if table and dtype == torch.float64 else dtype] * \
            (1 if name in ("out", "mass", "lse", "key_mass") else 4)
        bad = compare(name, got.get(name), ref, (ref_tables if table else ref_lowp)[name], atol, unseen.get(name))
        if bad:
            failures.append((f"{bad[0]}:{name}", bad[1]))
    return failures


def run_config(cfg):
    """Runs one config in this process -> {"seed", "status": "pass" | "fail", "failures": [[kind, message]], ...}."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        case = Case(cfg)
        if cfg["edge"] == "bad_class":
            var = cfg["variant"]
            cls = case.args[-1] if var["which"] == "key_class" else case.kwargs["query_class"]
            flat = cls.view(-1)
            if cfg["op"] == "kvcache" and var["which"] == "key_class":  # a position below the cache's length
                row = next(i for i, n in enumerate(cfg["cache_lens"]) if n)
                flat = cls[row, :cfg["cache_lens"][row]]
            flat[int(torch.randint(0, flat.numel(), (1,), generator=torch.Generator().manual_seed(cfg["seed"])))] = \
                var["value"]
            failures = _check_raises(case, ValueError, var["which"])
        elif cfg["edge"] == "bad_flag":
            var = cfg["variant"]
            cfg = dict(cfg, overrides={var["flag"]: var["value"]})
            case.cfg = cfg
            failures = _check_raises(case, TypeError, var["flag"])
        else:
            failures = _check_against_reference(case)
    except Exception as exc:  # a fault of the harness itself is reported like any other
        failures = [("harness:" + _error_kind(exc), f"{type(exc).__name__}: {exc}")]
    finally:
        torch.set_num_threads(threads)
    return {"seed": cfg["seed"], "status": "fail" if failures else "pass", "failures": [list(f) for f in failures],
            "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------------------------------ chunks

def _worker():
    """Runs the configs of one chunk (a JSON list on stdin), printing a start line and a result line for each."""
    import conftest  # tests/conftest.py: the same NaN poisoning of torch.empty as the test suite

    torch.empty = lambda *a, **kw: conftest._poison(conftest._empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: conftest._poison(conftest._empty_like(*a, **kw))
    for cfg in json.load(sys.stdin):
        print(START + str(cfg["seed"]), flush=True)
        print(RESULT + json.dumps(run_config(cfg)), flush=True)


def run_chunk(configs, blocks, timeout):
    """Runs configs in subprocesses: a config that crashes or hangs one is recorded, the rest go to a new one."""
    results = {}
    pending = list(configs)
    env = dict(os.environ, TRITON_INTERPRET="1", **BLOCK_ENV[blocks])
    for name in BLOCK_ENV["small"]:
        if name not in BLOCK_ENV[blocks]:
            env.pop(name, None)
    while pending:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(json.dumps(pending), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        running = None
        for line in out.splitlines():
            if line.startswith(START):
                running = int(line[len(START):])
            elif line.startswith(RESULT):
                res = json.loads(line[len(RESULT):])
                results[res["seed"]] = res
                running = None
        pending = [c for c in pending if c["seed"] not in results]
        if not pending:
            break
        status = "timeout" if timed_out else "crash"
        detail = f"exit code {proc.returncode}" + (f" after the chunk's {timeout} s" if timed_out else "")
        tail = err[-2000:]
        if running is None:  # the worker died before its first config (an import error, say): nothing else can run
            for c in pending:
                results[c["seed"]] = {"seed": c["seed"], "status": status, "failures": [[status, detail]],
                                      "stderr": tail}
            break
        results[running] = {"seed": running, "status": status, "failures": [[status, detail]], "stderr": tail}
        pending = [c for c in pending if c["seed"] != running]
    return [results[c["seed"]] for c in configs]


def run_all(configs, jobs, chunk_size, timeout, log):
    by_blocks = collections.defaultdict(list)
    for cfg in configs:
        by_blocks[cfg["blocks"]].append(cfg)
    chunks = [(blocks, group[i:i + chunk_size]) for blocks, group in by_blocks.items()
              for i in range(0, len(group), chunk_size)]
    results, lock, start = [], threading.Lock(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_chunk, chunk, blocks, timeout) for blocks, chunk in chunks]
        for fut in concurrent.futures.as_completed(futures):
            with lock:
                results.extend(fut.result())
                bad = sum(r["status"] != "pass" for r in results)
                log(f"[{len(results)}/{len(configs)}] {bad} not passed, {time.perf_counter() - start:.0f} s")
    return results


# ------------------------------------------------------------------------------------------------ report

def summary(configs, results):
    """The summary tables as text: per category and per feature, then one line per failure kind."""
    by_seed = {c["seed"]: c for c in configs}
    statuses = ("pass", "fail", "crash", "timeout")

    def table(title, key):
        counts = collections.defaultdict(collections.Counter)
        for res in results:
            for k in key(by_seed[res["seed"]]):
                counts[k][res["status"]] += 1
        lines = [f"{title:<22} {'run':>6} {'passed':>7} {'failed':>7} {'crashed':>8} {'timeouts':>9}"]
        for k in sorted(counts):
            n = counts[k]
            lines.append(f"{k:<22} {sum(n.values()):>6} " + " ".join(
                f"{n[s]:>{w}}" for s, w in zip(statuses, (7, 7, 8, 9))))
        return lines

    def features(cfg):
        yield "dtype=" + cfg["dtype"]
        yield "backend=" + cfg["backend"]
        if cfg["backend"] == "cpu":
            yield "cpu blocks=" + cfg["blocks"]
        yield "grad" if cfg["grad"] else "forward only"
        if any(t["learned"] for t in cfg["tables"]):
            yield "learned tables"

    total = collections.Counter(r["status"] for r in results)
    lines = table("category", lambda c: [category(c)]) + [
        f"{'total':<22} {len(results):>6} " + " ".join(f"{total[s]:>{w}}" for s, w in zip(statuses, (7, 7, 8, 9))),
        ""] + table("feature", features) + [""]
    kinds = collections.defaultdict(list)
    for res in results:
        for kind in dict.fromkeys(f[0] for f in res["failures"]):
            kinds[kind].append(by_seed[res["seed"]])
    if kinds:
        lines.append(f"{'configs':>7}  failure kind  [dtypes; backends; categories; example seed]")
        for kind, cfgs in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
            tags = "; ".join(",".join(sorted({f(c) for c in cfgs})) for f in
                             (lambda c: c["dtype"], lambda c: c["backend"], category))
            lines.append(f"{len(cfgs):>7}  {kind}  [{tags}; seed {min(c['seed'] for c in cfgs)}]")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=1000, help="number of random configs")
    parser.add_argument("--seed", type=int, default=0, help="config i uses seed SEED * 10**6 + i")
    parser.add_argument("--jobs", type=int, default=1, help="chunks run at the same time")
    parser.add_argument("--chunk", type=int, default=32, help="configs per subprocess")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per chunk before it counts as hung")
    parser.add_argument("--out", default="fuzz_failures.jsonl", help="the failing configs, one JSON line each")
    parser.add_argument("--replay", metavar="FILE", help="run the configs of FILE (lines of --out) again")
    parser.add_argument("--verbose", action="store_true", help="print every failure's message")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    if args.replay:
        with open(args.replay) as f:
            configs = [json.loads(line)["config"] for line in f if line.strip()]
    else:
        configs = [sample_config(args.seed * 10 ** 6 + i) for i in range(args.configs)]
    start = time.perf_counter()
    results = run_all(configs, args.jobs, args.chunk, args.timeout, lambda msg: print(msg, file=sys.stderr))
    by_seed = {c["seed"]: c for c in configs}
    failed = sorted((r for r in results if r["status"] != "pass"), key=lambda r: r["seed"])
    with open(args.out, "w") as f:
        for res in failed:
            f.write(json.dumps({"config": by_seed[res["seed"]], **res}) + "\n")
    if args.verbose or args.replay:
        for res in failed:
            for kind, msg in res["failures"]:
                print(f"seed {res['seed']} ({category(by_seed[res['seed']])}, {by_seed[res['seed']]['dtype']}): "
                      f"{kind}: {msg}")
            if res.get("stderr"):
                print(res["stderr"])
    print(summary(configs, results))
    print(f"{len(configs)} configs in {time.perf_counter() - start:.0f} s; {len(failed)} not passed, written to "
          f"{args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
