"""The report folder of an evaluation: ``results.json``, ``summary.md`` and PNG plots, from ``run.json`` and the
cells that :func:`avar_kernels.eval.run_evaluation` wrote. Rewritable at any time: a folder with missing cells gives a
report marked incomplete (``"complete": false`` and an INCOMPLETE banner), never one that looks finished.

Aggregates of a (model, condition), over the samples whose images could be read:

* ``accuracy``: correct / scored samples (an empty answer is wrong and counted in ``empty``);
* ``vas`` / ``visual_share``: the mean of the per-sample values (the per-sample value is the mean over layers,
  heads and user-turn rows, as :func:`avar_kernels.metrics.vas`); ``*_per_layer`` / ``*_per_head``: means over all
  user-turn rows of all samples (each sample weighted by its rows), which is what the metrics give on one batch of
  all samples;
* ``response_visual_share``: the mean over samples of the image mass of their generated rows.

Correlation of accuracy and VAS over every (model, condition) point: Pearson r with a two-sided p from the t
distribution with n - 2 degrees of freedom (computed here; no scipy).
"""
from __future__ import annotations

import glob
import json
import math
import os

PLOT_FILES = ("vas_per_layer.png", "accuracy_vs_vas.png", "accuracy_vs_strength.png")


# ------------------------------------------------------------------------------------------------ statistics

def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def pearson(xs, ys):
    """``{"r", "p", "n"}``: Pearson's r of the finite pairs and its two-sided p (t = r sqrt((n-2)/(1-r^2)),
    n - 2 degrees of freedom); r and p are None with a ``note`` when fewer than 3 pairs or a constant series."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    if n < 3:
        return {"r": None, "p": None, "n": n, "note": "fewer than 3 points"}
    mx, my = sum(p[0] for p in pairs) / n, sum(p[1] for p in pairs) / n
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    if sxx <= 0 or syy <= 0:
        return {"r": None, "p": None, "n": n, "note": "a constant series"}
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    df = n - 2
    t = math.inf if abs(r) == 1 else r * math.sqrt(df / (1 - r * r))
    return {"r": r, "p": t_two_sided_p(t, df), "n": n}


# ------------------------------------------------------------------------------------------------ aggregation

def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _weighted(entries, key):
    """Row-weighted mean over samples of the per-sample lists (or list of lists) under ``key``."""
    acc = cnt = None
    for e in entries:
        v, w = e.get(key), e.get("user_rows", 0)
        if v is None or not w:
            continue
        flat = [x for row in v for x in row] if v and isinstance(v[0], list) else list(v)
        if acc is None:
            acc, cnt = [0.0] * len(flat), [0] * len(flat)
        for i, x in enumerate(flat):
            if x is not None:
                acc[i] += w * x
                cnt[i] += w
    if acc is None:
        return None
    out = [a / c if c else None for a, c in zip(acc, cnt)]
    first = next(e[key] for e in entries if e.get(key) is not None and e.get("user_rows"))
    if first and isinstance(first[0], list):
        width = len(first[0])
        return [out[i:i + width] for i in range(0, len(out), width)]
    return out


def aggregate(entries):
    scored = [e for e in entries if "error" not in e]
    n_ok = len(scored)
    correct = sum(bool(e["correct"]) for e in scored)
    acc = correct / n_ok if n_ok else None
    secs = [e["seconds"] for e in scored if e.get("seconds") is not None]
    return {
        "samples": len(entries), "scored": n_ok, "correct": correct, "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / n_ok) if n_ok else None,
        "empty": sum(bool(e.get("empty")) for e in scored), "errors": len(entries) - n_ok,
        "vas": _mean(e.get("vas") for e in scored), "visual_share": _mean(e.get("visual_share") for e in scored),
        "response_visual_share": _mean(e.get("response_visual_share") for e in scored),
        "vas_undefined": sum(e.get("vas") is None for e in scored),
        "vas_per_layer": _weighted(scored, "vas_per_layer"), "vas_per_head": _weighted(scored, "vas_per_head"),
        "share_per_layer": _weighted(scored, "share_per_layer"),
        "share_per_head": _weighted(scored, "share_per_head"),
        "new_tokens_mean": _mean(e.get("new_tokens") for e in scored),
        "seconds_per_sample": _mean(secs),
    }


def read_cells(out, model_name, cond_key):
    """The entries of (model, condition), deduplicated by sample id (the first one kept), sorted by id."""
    from .evaluate import _safe, cell_dir

    seen = {}
    for path in sorted(glob.glob(os.path.join(cell_dir(out, model_name), f"{glob.escape(_safe(cond_key))}.*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for raw in f:
                try:
                    e = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                seen.setdefault(e["id"], e)
    return [seen[k] for k in sorted(seen)]


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


SAMPLE_KEYS = ("id", "line", "answer", "prediction", "completion", "correct", "empty", "error", "vas",
               "visual_share", "response_visual_share", "new_tokens", "prompt_tokens", "seconds", "warnings")


def collect(out) -> dict:
    """The results dict of the report folder ``out`` (see :func:`write_report`)."""
    from .evaluate import cell_dir

    run = _read_json(os.path.join(out, "run.json"))
    if run is None:
        raise ValueError(f"{out}: no run.json (not an evaluation folder)")
    ids = set(run["sample_ids"])
    settings = run["settings"]
    total = done = 0
    missing = []
    models = {}
    for m in run["models"]:
        name = m["name"]
        mres = {"info": m, "conditions": {}, "samples": {}}
        for c in run["conditions"]:
            entries = [e for e in read_cells(out, name, c["key"]) if e["id"] in ids]
            total += len(ids)
            done += len(entries)
            if len(entries) < len(ids):
                missing.append(f"{name} / {c['key']}: {len(ids) - len(entries)} of {len(ids)} samples")
            agg = aggregate(entries)
            agg.update(kind=c["kind"], strength=c["strength"], layers=c["layers"])
            mres["conditions"][c["key"]] = agg
            mres["samples"][c["key"]] = [{k: e[k] for k in SAMPLE_KEYS if k in e} for e in entries]
        cdir = cell_dir(out, name)
        for cell, wanted in (("bench", settings.get("bench_samples", 0) > 0), ("heatmap", settings.get("heatmap"))):
            value = _read_json(os.path.join(cdir, f"{cell}.json"))
            mres[cell] = value
            if wanted:
                total += 1
                done += value is not None
                if value is None:
                    missing.append(f"{name} / {cell}")
        models[name] = mres
    points = [(name, key, c["vas"], c["accuracy"]) for name, mres in models.items()
              for key, c in mres["conditions"].items()]
    corr = pearson([p[2] for p in points], [p[3] for p in points])
    corr["points"] = [{"model": p[0], "condition": p[1], "vas": p[2], "accuracy": p[3]} for p in points]
    complete = done == total
    return {"complete": complete, "cells_done": done, "cells_total": total, "missing": missing,
            "run": run, "models": models, "accuracy_vs_vas": corr,
            "cells": os.path.join(out, "cells"),
            "note": None if complete else "INCOMPLETE: not every cell is computed; rerun the same command to finish"}


# ------------------------------------------------------------------------------------------------ writing

def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return str(x)


def _mib(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def summary_markdown(res) -> str:
    run = res["run"]
    env = run["environment"]
    lines = ["# Evaluation report", ""]
    if not res["complete"]:
        lines += [f"**INCOMPLETE: {res['cells_done']} of {res['cells_total']} cells computed.** Missing: "
                  + "; ".join(res["missing"][:10]) + (" ..." if len(res["missing"]) > 10 else "")
                  + ". Rerun the same command to finish; the numbers below cover only what is computed.", ""]
    else:
        lines += [f"Complete: {res['cells_done']} of {res['cells_total']} cells.", ""]
    lines += [f"Command: `{env.get('command')}`", "",
              f"Dataset: {run['dataset']}, {len(run['sample_ids'])} samples"
              + (f", {len(run['skipped_records'])} records skipped (listed below)" if run["skipped_records"] else "")
              + f". Greedy decoding, up to {run['max_new_tokens']} new tokens, {run['dtype']}, "
              f"{run['processes']} process(es). Answer check: `{run['answer_check']}`.", "",
              f"Device: {env.get('device_name')} ({env.get('device')}); "
              + ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v)
              + f"; commit {env.get('commit')}; {env.get('date')}. Seeds: "
              + ", ".join(f"{k} {v}" for k, v in run["seeds"].items()) + ".", ""]
    lines += ["## Accuracy and attention", "",
              "VAS and visual share: user-turn rows of the prompt (mean over layers, heads, rows, then samples); "
              "response share: image mass of the generated rows.", "",
              "| model | condition | samples | accuracy | empty | errors | VAS | visual share | response share | "
              "s / sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for key, c in m["conditions"].items():
            acc = "n/a" if c["accuracy"] is None else f"{c['accuracy']:.3f} ({c['correct']}/{c['scored']})"
            lines.append(f"| {name} | {key} | {c['samples']} | {acc} | {c['empty']} | {c['errors']} | "
                         f"{_fmt(c['vas'])} | {_fmt(c['visual_share'], 4)} | {_fmt(c['response_visual_share'], 4)} | "
                         f"{_fmt(c['seconds_per_sample'])} |")
    corr = res["accuracy_vs_vas"]
    lines += ["", f"Accuracy vs VAS over the {corr['n']} (model, condition) points: "
              + (f"Pearson r = {corr['r']:.3f}, p = {corr['p']:.3g}." if corr["r"] is not None
                 else f"undefined ({corr['note']})."), ""]
    benches = {n: m["bench"] for n, m in res["models"].items() if m.get("bench")}
    if benches:
        lines += ["## Against the eager way", "",
                  "The same measurement (greedy generation with per-class masses of every row) on the first samples, "
                  "fused `avar` attention vs eager attention with `output_attentions=True` and masses summed from the "
                  "weights, interleaved in one process; time ratio = median over repetitions of avar / eager; "
                  "peak memory beyond the model.", "",
                  "| model | samples x new tokens | avar s | eager s | time avar / eager | avar peak | eager peak | "
                  "memory avar / eager | max abs mass diff | same tokens |", "|---" * 10 + "|"]
        for name, b in benches.items():
            if "unavailable" in b:
                lines.append(f"| {name} | {b['unavailable']} |||||||||")
                continue
            lines.append(f"| {name} | {b['samples']} x {b['new_tokens']} | {_fmt(b['avar']['seconds'])} | "
                         f"{_fmt(b['eager']['seconds'])} | {_fmt(b['time_ratio'])} | {_mib(b['avar']['peak_bytes'])} | "
                         f"{_mib(b['eager']['peak_bytes'])} | {_fmt(b['memory_ratio'])} | "
                         f"{b['max_abs_mass_diff']:.1e} | {b['same_tokens']} |")
        lines += ["", f"Memory method: {next(iter(benches.values())).get('memory_method', 'n/a')}.", ""]
    lines += ["## Plots", ""]
    for f in res.get("plots", []):
        lines.append(f"![{f}]({f})")
    lines.append("")
    heat = {n: m["heatmap"] for n, m in res["models"].items() if m.get("heatmap")}
    unavailable = {n: h["unavailable"] for n, h in heat.items() if "unavailable" in h}
    if unavailable:
        lines += ["Image heatmaps not drawn: " + "; ".join(f"{n}: {why}" for n, why in unavailable.items()), ""]
    notes = sorted({note for h in heat.values() for note in h.get("notes", [])})
    if notes:
        lines += ["Image heatmaps: " + " ".join(notes), ""]
    marked = []
    for name, m in res["models"].items():
        for key, samples in m["samples"].items():
            empty = [str(s["id"]) for s in samples if s.get("empty")]
            errors = [f"{s['id']} ({s['error']})" for s in samples if s.get("error")]
            if empty:
                marked.append(f"- {name} / {key}: empty answer on sample(s) {', '.join(empty[:20])}"
                              + (" ..." if len(empty) > 20 else ""))
            if errors:
                marked.append(f"- {name} / {key}: not scored: {'; '.join(errors[:5])}" + (" ..." if len(errors) > 5
                                                                                          else ""))
    if marked:
        lines += ["## Marked entries", "", *marked, ""]
    if run["skipped_records"]:
        lines += ["## Skipped dataset records", "", "| line | reason |", "|---|---|"]
        lines += [f"| {b['line']} | {b['reason']} |" for b in run["skipped_records"]]
        lines.append("")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(res, text):
    return text + ("" if res["complete"] else " (INCOMPLETE)")


def _wide(values):
    """Whether positive values span more than 50x (then the axis is logarithmic)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 50


def plot_vas_per_layer(res, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    seen = []
    for name, m in res["models"].items():
        per_layer = m["conditions"].get("none", {}).get("vas_per_layer")
        if per_layer:
            ax.plot(range(len(per_layer)), [math.nan if v is None else v for v in per_layer], marker="o", label=name)
            seen += per_layer
    if _wide(seen):
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("VAS (image / system mass, user-turn rows)")
    ax.set_title(_title(res, "VAS per layer, no intervention"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(res, name, path):
    plt = _plt()
    per_head = res["models"][name]["conditions"].get("none", {}).get("vas_per_head")
    if not per_head:
        return False
    grid = [[math.nan if v is None else v for v in row] for row in per_head]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(grid[0]) + 2), max(3, 0.3 * len(grid) + 1.5)))
    from matplotlib.colors import LogNorm

    norm = LogNorm() if _wide([v for row in per_head for v in row]) else None
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower", norm=norm)
    fig.colorbar(im, ax=ax, label="VAS")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(_title(res, f"VAS per layer and head: {name}"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy_vs_vas(res, path):
    plt = _plt()
    corr = res["accuracy_vs_vas"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {name: f"C{i % 10}" for i, name in enumerate(res["models"])}
    markers = {"none": "o", "vaf": "^", "pai": "s"}
    for p in corr["points"]:
        if p["vas"] is None or p["accuracy"] is None:
            continue
        kind = p["condition"].split("=")[0]
        ax.scatter(p["vas"], p["accuracy"], marker=markers.get(kind, "x"), color=colours[p["model"]],
                   label=f"{p['model']} {p['condition']}", alpha=0.8)
    stat = (f"Pearson r = {corr['r']:.3f}, p = {corr['p']:.3g}, n = {corr['n']}" if corr["r"] is not None
            else f"r undefined ({corr['note']}), n = {corr['n']}")
    if _wide([p["vas"] for p in corr["points"]]):
        ax.set_xscale("log")
    ax.set_xlabel("VAS")
    ax.set_ylabel("accuracy")
    ax.set_title(_title(res, f"Accuracy vs VAS ({stat})"), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_strength(res, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, m in res["models"].items():
        base = m["conditions"].get("none", {}).get("accuracy")
        series = {}
        for key, c in m["conditions"].items():
            if c["kind"] != "none" and c["accuracy"] is not None:
                layers = key.partition("@")[2]
                label = f"{name} {c['kind']}" + (f" @{layers}" if layers else "")
                series.setdefault(label, []).append((c["strength"], c["accuracy"]))
        for label, pts in series.items():
            pts = sorted(([(0.0, base)] if base is not None else []) + pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("intervention strength (0 = none)")
    ax.set_ylabel("accuracy")
    ax.set_title(_title(res, "Accuracy vs intervention strength"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_image_heatmap(res, name, out, path):
    from .evaluate import cell_dir

    cell = res["models"][name].get("heatmap") or {}
    image_path = os.path.join(cell_dir(out, name), "heatmap_image.png")
    if "map" not in cell or not os.path.exists(image_path):
        return False
    import numpy as np
    from PIL import Image

    plt = _plt()
    img = np.asarray(Image.open(image_path).convert("RGB"))
    grid = np.array([[math.nan if v is None else v for v in row] for row in cell["map"]], dtype=np.float32)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(img)
    im = axes[1].imshow(grid, cmap="inferno", alpha=0.6, extent=(0, img.shape[1], img.shape[0], 0),
                        interpolation="nearest")
    fig.colorbar(im, ax=axes[1], label="share of the response rows' image attention")
    axes[1].set_title(f"where the answer looks: {name}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(_title(res, f"{cell.get('question', '')} -> {cell.get('completion', '')[:60]}"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out) -> dict:
    """Writes ``results.json``, ``summary.md`` and the plots into ``out`` and returns the results dict:
    ``complete``, ``cells_done`` / ``cells_total``, ``missing``, ``run`` (command, environment, versions, seeds,
    settings, dataset, skipped records), ``models`` (per model: ``info``, ``conditions`` with the aggregates,
    ``samples`` (per-sample scalars; the per-head values of each sample are in the cell files), ``bench`` and
    ``heatmap``), ``accuracy_vs_vas`` (r, p, n, points) and ``plots``."""
    from .evaluate import _safe, _write_json

    res = collect(out)
    plots = []
    plot_vas_per_layer(res, os.path.join(out, PLOT_FILES[0]))
    plots.append(PLOT_FILES[0])
    for name in res["models"]:
        f = f"vas_heads_{_safe(name)}.png"
        if plot_heads(res, name, os.path.join(out, f)):
            plots.append(f)
    plot_accuracy_vs_vas(res, os.path.join(out, PLOT_FILES[1]))
    plot_accuracy_vs_strength(res, os.path.join(out, PLOT_FILES[2]))
    plots += PLOT_FILES[1:]
    for name in res["models"]:
        f = f"image_heatmap_{_safe(name)}.png"
        if plot_image_heatmap(res, name, out, os.path.join(out, f)):
            plots.append(f)
    res["plots"] = plots
    _write_json(os.path.join(out, "results.json"), res)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(res))
    return res


def console_table(res) -> str:
    """The results as a plain-text table: per (model, condition) accuracy, VAS, visual shares and, per model, time
    and peak memory of the fused way against the eager way."""
    head = ("model", "condition", "accuracy", "VAS", "visual share", "response share", "time avar/eager",
            "memory avar/eager")
    rows = []
    for name, m in res["models"].items():
        b = m.get("bench") or {}
        t = "n/a" if b.get("time_ratio") is None else f"{b['time_ratio']:.2f}x"
        mem = "n/a" if b.get("memory_ratio") is None else f"{b['memory_ratio']:.2f}x"
        for key, c in m["conditions"].items():
            acc = "n/a" if c["accuracy"] is None else f"{c['accuracy']:.3f} ({c['correct']}/{c['scored']})"
            rows.append((name, key, acc, _fmt(c["vas"]), _fmt(c["visual_share"], 4),
                         _fmt(c["response_visual_share"], 4), t if key == "none" else "", mem if key == "none" else ""))
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    corr = res["accuracy_vs_vas"]
    if corr["r"] is not None:
        lines.append(f"accuracy vs VAS over {corr['n']} points: Pearson r = {corr['r']:.3f}, p = {corr['p']:.3g}")
    return "\n".join(lines)
