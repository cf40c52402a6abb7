"""Accuracy x Visual Attention Score x interventions, for one or more models over one dataset.

For every model, every condition (no intervention, or a ``vaf`` / ``pai`` preset at a strength on a layer range)
and every sample, one greedy generation through the fused ``"avar"`` attention (its decode path included) under
:func:`avar_kernels.hf.record` gives, in the same pass:

* the answer, scored against the reference (``accuracy``);
* the prompt's per-class masses: VAS and visual share of the user-turn rows (:func:`avar_kernels.metrics.vas`,
  :func:`~avar_kernels.metrics.visual_share`) per layer, per head and overall;
* the generated rows' masses: the visual share of the response.

Per model, a benchmark runs the same measurement on a few samples the published way (eager attention,
``generate(output_attentions=True)``, masses summed from the weights) in the same process, interleaved with the
fused way (:func:`avar_kernels.benchmark.compare`): time and peak memory ratios, and the largest difference between
the two ways' masses. A heatmap of where the response rows look inside the first sample's image is drawn when the
backend returns key masses.

Cells. Every (model, condition, sample) result is a JSON line under ``OUT/cells/MODEL/CONDITION.RANK.jsonl``,
flushed as it is computed; the benchmark and the heatmap are ``bench.json`` / ``heatmap.json`` cells. A restarted
run reads what is there and computes only what is missing; ``OUT/run.json`` pins the dataset and generation
settings (a different dataset in the same folder is an error, not a silent mix). Under ``accelerate launch`` each
process takes every ``world``-th missing sample (by process index) and the main process writes the report after
all are done. The report (:func:`avar_kernels.eval.report.write_report`) says ``complete: false`` until every cell
is there.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from avar_kernels.types import IMAGE, NUM_CLASSES, RESPONSE, USER

DEFAULT_SYSTEM = "You are a helpful assistant."
CONDITION_KINDS = ("none", "vaf", "pai")


# ------------------------------------------------------------------------------------------------ answers

def score_answer(completion: str, reference: str):
    """``(prediction, correct)`` by the trainer's accuracy reward (:mod:`avar_kernels.train.rewards`): the last
    ``<answer>`` tag's content (else the text without its ``<think>`` part) matched against the reference as
    numbers with a tolerance, fractions, simple LaTeX, choice letters or text. An empty prediction is wrong."""
    from avar_kernels.train import rewards

    pred = rewards.extract_answer(completion)
    return pred, bool(pred) and rewards.answers_match(pred, reference)


# ------------------------------------------------------------------------------------------------ data

@dataclass
class Sample:
    """One question: chat ``messages`` (``<image>`` placeholders in the text), ``images`` (paths, ``{path|bytes}``
    objects or uint8 arrays), the reference ``answer``; ``id`` is unique in the dataset (the JSONL line number, or
    the position for the embedded generator)."""

    id: int
    messages: list
    images: list
    answer: str
    line: int | None = None
    base_dir: str | None = None


@dataclass
class Dataset:
    name: str
    samples: list
    skipped: list = field(default_factory=list)      # {"line", "reason"} of records that could not be used
    fingerprint: dict = field(default_factory=dict)


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _layout(path):
    """``"conversations"`` or ``"problems"`` from the first JSON object of the file."""
    from avar_kernels.train.data import iter_jsonl

    for _, obj in iter_jsonl(path):
        if isinstance(obj, dict):
            return "conversations" if ("messages" in obj or "conversations" in obj) else "problems"
    return "problems"


def load_dataset(path=None, *, limit=None, embedded_samples=48, seed=1, image_dir=None) -> Dataset:
    """The evaluation questions.

    ``path``: a JSONL file in one of the trainer's layouts (``avar_kernels.train.data``): ShareGPT ``messages`` /
    ``conversations`` (the prompt is every turn before the last assistant turn, the reference its ``<answer>`` or
    its text), or ``problem`` / ``question`` + ``answer`` + ``images`` rows. Records that cannot be used (broken
    JSON, missing image file, empty answer, ...) are listed in ``Dataset.skipped`` with their line numbers.
    Without ``path``: ``embedded_samples`` questions of the embedded generator (``avar_kernels.train.embedded``)
    drawn with ``seed``. ``limit`` keeps the first samples. No usable sample is an error.
    """
    from avar_kernels.train import data as D
    from avar_kernels.train import rewards

    if path is None:
        from avar_kernels.train import embedded

        if embedded_samples < 1:
            raise ValueError(f"the embedded dataset needs at least 1 sample, got {embedded_samples}")
        recs = embedded.records(embedded_samples, seed=seed)
        samples = [Sample(i, [{"role": "user", "content": D.IMAGE_PLACEHOLDER + r.question}], list(r.images),
                          r.answer) for i, r in enumerate(recs)]
        fp = {"embedded": True, "samples": embedded_samples, "seed": seed}
        name = f"embedded generator ({embedded_samples} questions, seed {seed})"
        skipped = []
    else:
        if not os.path.isfile(path):
            raise ValueError(f"dataset: no such file: {path}")
        layout = _layout(path)
        reader = D.read_conversations if layout == "conversations" else D.read_problems
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", D.BadRecordWarning)     # listed in the report instead
            recs = reader(path, image_dir=image_dir)
        samples = []
        for r in recs:
            if layout == "conversations":
                last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
                reference = rewards.extract_answer(r.messages[last]["content"])
                samples.append(Sample(r.line, r.messages[:last], r.images, reference, r.line, r.base_dir))
            else:
                samples.append(Sample(r.line, [{"role": "user", "content": r.problem}], r.images, r.answer, r.line,
                                      r.base_dir))
        skipped = [{"line": b.line, "reason": b.reason} for b in recs.bad]
        fp = {"file": os.path.abspath(path), "sha256": _file_digest(path), "layout": layout}
        name = f"{path} ({layout} layout)"
        if not samples:
            why = "; ".join(f"line {b['line']}: {b['reason']}" for b in skipped[:3])
            more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
            raise ValueError(f"dataset {path}: no usable records" + (f" ({len(skipped)} skipped: {why}{more})"
                                                                     if skipped else " (the file is empty)"))
    if limit is not None:
        samples = samples[:limit]
        fp = {**fp, "limit": limit}
    return Dataset(name, samples, skipped, fp)


# ------------------------------------------------------------------------------------------------ conditions

@dataclass(frozen=True)
class Condition:
    """No intervention (``kind="none"``) or a preset of :mod:`avar_kernels.hf.intervene` at ``strength`` on the
    layers ``first..last`` (``last=None``: to the model's last layer; ``layers=None``: the preset's own layers:
    every layer for ``vaf``, 2 to the last for ``pai``, as PAI)."""

    kind: str = "none"
    strength: float = 0.0
    layers: tuple | None = None

    @property
    def key(self) -> str:
        if self.kind == "none":
            return "none"
        key = f"{self.kind}={self.strength:g}"
        if self.layers is not None:
            first, last = self.layers
            key += f"@{first}-{'' if last is None else last}"
        return key

    def layer_range(self, num_layers):
        """The layer indices steered in a model of ``num_layers`` layers (None: the preset's default)."""
        if self.layers is None:
            return None
        first, last = self.layers
        return range(first, (num_layers - 1 if last is None else last) + 1)

    def check(self, num_layers, model_name):
        """A one-line ValueError when the model lacks the layers this condition steers."""
        if self.kind == "none":
            return
        first, last = self.layers if self.layers is not None else ((2, None) if self.kind == "pai" else (0, None))
        top = num_layers - 1 if last is None else last
        if first > top or top >= num_layers:
            raise ValueError(f"intervention {self.key!r}: model {model_name!r} has layers 0..{num_layers - 1}, "
                             f"the intervention steers {first}..{'last' if last is None else last}")

    def preset(self):
        import avar_kernels.hf as ah

        if self.kind == "vaf":
            return ah.vaf(alpha_img=self.strength)
        if self.kind == "pai":
            return ah.pai(alpha=self.strength, start_layer=self.layers[0] if self.layers else 2)
        return None


_SPEC = re.compile(r"^(vaf|pai):([^@]+)(?:@(\d+)-(\d*))?$")


def parse_conditions(specs) -> list:
    """Conditions from specs ``none``, ``KIND:S1[,S2...][@FIRST-[LAST]]`` (KIND ``vaf`` or ``pai``), e.g.
    ``vaf:0.1,0.2,0.4``, ``vaf:0.15@1-2``, ``pai:0.2,0.5@2-``. ``none`` always comes first; duplicates are dropped."""
    out = [Condition()]
    for spec in specs:
        for part in str(spec).split():
            if part == "none":
                continue
            m = _SPEC.match(part)
            if m is None:
                raise ValueError(f"intervention {part!r}: expected none or KIND:STRENGTH[,STRENGTH...][@FIRST-LAST] "
                                 "with KIND vaf or pai, e.g. vaf:0.15,0.3@1-2")
            kind, strengths, first, last = m.groups()
            layers = None
            if first is not None:
                layers = (int(first), int(last) if last else None)
                if layers[1] is not None and layers[1] < layers[0]:
                    raise ValueError(f"intervention {part!r}: the layer range {first}-{last} is empty")
            for s in strengths.split(","):
                try:
                    value = float(s)
                except ValueError:
                    raise ValueError(f"intervention {part!r}: strength {s!r} is not a number") from None
                if not math.isfinite(value):
                    raise ValueError(f"intervention {part!r}: strength must be finite, got {s!r}")
                c = Condition(kind, value, layers)
                if c not in out:
                    out.append(c)
    return out


# ------------------------------------------------------------------------------------------------ models

@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: ``path`` (a checkpoint directory or hub name; None: the embedded default, a randomly
    initialised ``avar_kernels.train.embedded`` model from ``seed``) under a short ``name``."""

    name: str
    path: str | None = None

    @classmethod
    def parse(cls, text):
        """``embedded``, ``PATH`` or ``NAME=PATH``."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = "", text
        if path == "embedded":
            return cls(name or "embedded", None)
        if not path:
            raise ValueError(f"model {text!r}: empty path")
        return cls(name or os.path.basename(os.path.normpath(path)) or path, path)


def _looks_local(path):
    return (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1 or os.sep != "/"
            or os.path.exists(path))


def model_shape(spec: ModelSpec):
    """``(num_layers, num_heads)`` of the text decoder, from the config only (a one-line error if it cannot be
    read)."""
    if spec.path is None:
        from avar_kernels.train import embedded

        return embedded.MODEL["num_hidden_layers"], embedded.MODEL["num_attention_heads"]
    if _looks_local(spec.path) and not os.path.isdir(os.path.expanduser(spec.path)):
        raise ValueError(f"model {spec.name!r}: no such checkpoint directory: {spec.path}")
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(os.path.expanduser(spec.path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {spec.name!r}: cannot read a model config from {spec.path}: {first}") from None
    text = cfg.get_text_config()
    return int(text.num_hidden_layers), int(text.num_attention_heads)


class LoadedModel:
    """A model with ``"avar"`` text attention, its processor and what the evaluation needs to know of it."""

    def __init__(self, spec, model, processor, device):
        self.spec, self.model, self.processor, self.device = spec, model, processor, device
        cfg = model.config
        text = cfg.get_text_config()
        self.num_layers, self.num_heads = int(text.num_hidden_layers), int(text.num_attention_heads)
        self.image_token_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
        self.video_token_id = getattr(cfg, "video_token_id", None)
        vision = getattr(cfg, "vision_config", None)
        self.merge_size = int(getattr(vision, "spatial_merge_size", 1) or 1)
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        tok = self.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos), 0)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def resolve_dtype(dtype, device):
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_model(spec: ModelSpec, *, device="cpu", dtype=None, seed=0) -> LoadedModel:
    import avar_kernels.hf  # noqa: F401 - registers the "avar" attention

    dt = resolve_dtype(dtype, device)
    if spec.path is None:
        from avar_kernels.train import embedded

        model = embedded.model(attn="avar", seed=seed).to(device=device, dtype=dt)
        processor = embedded.processor()
    else:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from avar_kernels.train.processing import QWEN_FAMILY, load_processor

        path = os.path.expanduser(spec.path)
        model_shape(spec)                                    # the one-line error for a missing checkpoint
        cfg = AutoConfig.from_pretrained(path)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dt, device_map=str(device),
                attn_implementation={"text_config": "avar", "vision_config": "sdpa"})
            processor = (load_processor(path, cfg.model_type) if cfg.model_type in QWEN_FAMILY
                         else AutoProcessor.from_pretrained(path))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"model {spec.name!r}: cannot load {spec.path}: {first}") from None
    model.eval()
    return LoadedModel(spec, model, processor, device)


# ------------------------------------------------------------------------------------------------ one batch

def encode(lm: LoadedModel, samples):
    """Left-padded chat-template inputs of ``samples`` on the model's device and their token classes ``[B, S]``."""
    from avar_kernels import hf as ah
    from avar_kernels.train.data import load_image, to_chat

    texts = [lm.processor.apply_chat_template(to_chat(s.messages, len(s.images)), add_generation_prompt=True,
                                              tokenize=False) for s in samples]
    images = [load_image(ref, s.base_dir) for s in samples for ref in s.images]
    kw = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
    if images:
        kw["images"] = images
    enc = dict(lm.processor(**kw))
    classes = ah.token_classes(enc["input_ids"], lm.processor, attention_mask=enc["attention_mask"],
                               image_token_id=lm.image_token_id, video_token_id=lm.video_token_id)
    enc = {k: v.to(lm.device) for k, v in enc.items()}
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(lm.model.dtype)
    return enc, classes.to(lm.device)


def _float(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _floats(t):
    return [[_float(v) for v in row] for row in t.tolist()] if t.dim() == 2 else [_float(v) for v in t.tolist()]


def sample_metrics(masses, classes, b, prompt_len, new_tokens):
    """VAS and visual share of sample ``b``'s prompt (its user-turn rows) per layer / head / overall, and the
    visual share of its first ``new_tokens - 1`` generated rows (the rows the model computed for its answer)."""
    from avar_kernels import metrics

    prompt = [m[b:b + 1, :, :prompt_len] for m in masses]
    cls = classes[b:b + 1, :prompt_len]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", metrics.UndefinedMetricWarning)
        v = metrics.vas(prompt, cls)
        s = metrics.visual_share(prompt, cls)
        response = None
        rows = masses[0].shape[-2]
        if new_tokens > 1 and rows > prompt_len:
            rcls = torch.zeros(1, rows, dtype=torch.long, device=classes.device)
            rcls[0, prompt_len:prompt_len + new_tokens - 1] = RESPONSE
            response = _float(metrics.visual_share([m[b:b + 1] for m in masses], rcls, query_class=RESPONSE).overall)
        caught = sorted({str(x.message) for x in w if issubclass(x.category, metrics.UndefinedMetricWarning)})
    return {"user_rows": int((cls == USER).sum()), "image_tokens": int((cls == IMAGE).sum()),
            "vas": _float(v.overall), "visual_share": _float(s.overall), "response_visual_share": response,
            "vas_per_layer": _floats(v.per_layer), "vas_per_head": _floats(v.per_head),
            "share_per_layer": _floats(s.per_layer), "share_per_head": _floats(s.per_head),
            "warnings": caught}


def _new_tokens(lm, row):
    """How many of the generated ids ``row`` are the answer: up to and including the first end-of-sequence id."""
    for i, t in enumerate(row.tolist()):
        if t in lm.eos:
            return i + 1
    return len(row)


def _intervention(lm, cond, classes):
    import avar_kernels.hf as ah

    preset = cond.preset()
    if preset is None:
        return contextlib.nullcontext()
    return ah.intervene(lm.model, preset, layers=cond.layer_range(lm.num_layers), token_classes=classes)


def generate_and_measure(lm: LoadedModel, samples, cond: Condition, max_new_tokens: int):
    """One greedy generation of ``samples`` under ``cond`` with the masses recorded; a result dict per sample."""
    import avar_kernels.hf as ah

    enc, classes = encode(lm, samples)
    prompt_len = enc["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.no_grad(), ah.record(lm.model, classes) as rec, _intervention(lm, cond, classes):
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.pad_token_id)
        masses = rec.mass
    if str(lm.device).startswith("cuda"):
        torch.cuda.synchronize(lm.device)
    seconds = time.perf_counter() - t0
    results = []
    for b, s in enumerate(samples):
        gen = out[b, prompt_len:]
        n = _new_tokens(lm, gen)
        text = lm.tokenizer.decode(gen[:n], skip_special_tokens=True).strip()
        pred, correct = score_answer(text, s.answer)
        entry = {"id": s.id, "line": s.line, "answer": s.answer, "completion": text, "prediction": pred,
                 "correct": bool(correct), "empty": not text, "new_tokens": n,
                 "prompt_tokens": int(enc["attention_mask"][b].sum()), "seconds": seconds / len(samples)}
        entry.update(sample_metrics(masses, classes, b, prompt_len, n))
        results.append(entry)
    return results


def eager_masses(attentions, classes, num_classes=NUM_CLASSES):
    """Per-layer ``[B, H, R, C]`` masses from ``generate(output_attentions=True)``'s weights (a tuple over steps of
    tuples over layers of ``[B, H, q, k]``), summed by the key classes (``classes [B, >= k]``): the published way."""
    onehot = torch.nn.functional.one_hot(classes, num_classes).to(torch.float32)    # [B, S_total, C]
    steps = attentions if isinstance(attentions[0], (tuple, list)) else (attentions,)
    per_layer = []
    for layer in range(len(steps[0])):
        rows = [a[layer].float() @ onehot[:, None, :a[layer].shape[-1]] for a in steps]
        per_layer.append(torch.cat(rows, dim=-2))
    return per_layer


# ------------------------------------------------------------------------------------------------ benchmark

def benchmark(lm: LoadedModel, samples, *, new_tokens=16, reps=3):
    """The measurement of :func:`generate_and_measure` on ``samples`` (one batch) done two ways in this process:
    the fused ``"avar"`` attention with recorded masses, and eager attention with ``output_attentions=True`` and
    masses summed from the weights. Interleaved timing (median ratio over repetitions) and peak memory beyond the
    model (:func:`avar_kernels.benchmark.peak_memory` on CUDA, :func:`~avar_kernels.benchmark.peak_tensor_memory`
    elsewhere), both ways' VAS and the largest mass difference."""
    import avar_kernels.hf as ah
    from avar_kernels import benchmark as bm
    from avar_kernels import metrics

    enc, classes = encode(lm, samples)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=lm.pad_token_id)
    model = lm.model
    got = {}

    def fused():
        model.set_attn_implementation({"text_config": "avar"})
        with torch.no_grad(), ah.record(model, classes) as rec:
            out = model.generate(**enc, **gen)
            masses = rec.mass
        got["avar"] = (out, masses, metrics.vas([m[..., :classes.shape[1], :] for m in masses], classes).overall)

    def eager():
        model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                out = model.generate(**enc, **gen, output_attentions=True, return_dict_in_generate=True)
            full = torch.cat([classes, classes.new_full((classes.shape[0], out.sequences.shape[1] - classes.shape[1]),
                                                        RESPONSE)], 1)
            masses = eager_masses(out.attentions, full)
            got["eager"] = (out.sequences, masses,
                            metrics.vas([m[..., :classes.shape[1], :] for m in masses], classes).overall)
        finally:
            model.set_attn_implementation({"text_config": "avar"})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # CUDA: the allocator's peak; elsewhere the tensors' own bytes (a process's resident set does not show
        # a peak of a few MiB that reuses pages malloc already holds).
        peak = (lambda f: bm.peak_memory(f, lm.device)) if str(lm.device).startswith("cuda") else bm.peak_tensor_memory
        mem_eager = peak(eager)
        mem_avar = peak(fused)
        timing = bm.compare({"eager": eager, "avar": fused}, baseline="eager", device=lm.device, reps=reps, warmup=0)
    for name, t in timing.items():
        if t.error:
            raise RuntimeError(f"benchmark of model {lm.spec.name!r}: the {name} way failed: {t.error}")
    s = classes.shape[1]
    valid = enc["attention_mask"].bool()[:, None, :, None]           # left padding rows are not compared
    diff = max(float(((a[..., :s, :] - e[..., :s, :]) * valid).abs().max())
               for a, e in zip(got["avar"][1], got["eager"][1]))
    same_tokens = bool(torch.equal(got["avar"][0], got["eager"][0]))
    n = len(samples)
    return {
        "samples": n, "new_tokens": new_tokens, "reps": reps, "prompt_tokens": s,
        "avar": {"seconds": timing["avar"].median, "samples_per_s": n / timing["avar"].median,
                 "peak_bytes": mem_avar.bytes, "vas": _float(got["avar"][2])},
        "eager": {"seconds": timing["eager"].median, "samples_per_s": n / timing["eager"].median,
                  "peak_bytes": mem_eager.bytes, "vas": _float(got["eager"][2])},
        "time_ratio": timing["avar"].ratio,                 # avar time / eager time, median of paired repetitions
        "speedup": 1 / timing["avar"].ratio if timing["avar"].ratio else None,
        "memory_ratio": (mem_avar.bytes / mem_eager.bytes) if mem_eager.bytes else None,
        "memory_method": mem_avar.method,
        "max_abs_mass_diff": diff, "same_tokens": same_tokens,
    }


def heatmap(lm: LoadedModel, sample, *, max_new_tokens):
    """Where the response rows look in the sample's first image: ``{"map": [[...]], "answer": ...}``, or
    ``{"unavailable": reason}`` when the backend returns no key masses or the sample has no image."""
    import avar_kernels.hf as ah

    if not sample.images:
        return {"unavailable": f"sample {sample.id} has no image"}
    enc, classes = encode(lm, [sample])
    try:
        with torch.no_grad(), ah.record(lm.model, classes, key_mass=True) as rec, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=lm.pad_token_id)
            maps = ah.image_heatmaps(rec.key_mass, rec.classes, image_grid_thw=enc.get("image_grid_thw"),
                                     merge_size=lm.merge_size)
    except (ValueError, RuntimeError, NotImplementedError) as e:
        return {"unavailable": " ".join(str(e).split()) or type(e).__name__}
    if not maps[0]:
        return {"unavailable": "no image tokens in the prompt"}
    text = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    notes = sorted({" ".join(str(w.message).split()) for w in caught if "key mass" in str(w.message)})
    from avar_kernels.train.data import IMAGE_PLACEHOLDER

    question = sample.messages[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
    return {"sample": sample.id, "question": question, "completion": text,
            "map": _floats(maps[0][0].float().cpu()), "notes": notes}


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class EvalConfig:
    """What :func:`run_evaluation` does. ``models``: :class:`ModelSpec` s (default: the embedded default);
    ``data``: a JSONL file (default: ``embedded_samples`` questions of the embedded generator, ``data_seed``);
    ``conditions``: from :func:`parse_conditions`; ``bench_samples`` 0 skips the eager comparison."""

    out: str
    models: list = field(default_factory=lambda: [ModelSpec("embedded")])
    data: str | None = None
    image_dir: str | None = None
    limit: int | None = None
    embedded_samples: int = 48
    data_seed: int = 1
    conditions: list = field(default_factory=lambda: [Condition()])
    max_new_tokens: int = 128
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    bench_samples: int = 4
    bench_new_tokens: int = 16
    bench_reps: int = 3
    heatmap: bool = True
    overwrite: bool = False
    progress: bool = True


def _safe(name):
    return re.sub(r"[^\w.=@+-]", "_", name)


class Processes:
    """This process's index and the number of processes: from ``accelerate`` under ``accelerate launch`` (or
    ``torchrun``), else 0 of 1. ``cpu``: processes on the CPU (gloo), also where a GPU is present."""

    def __init__(self, cpu=False):
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=cpu or not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self):
        return self.rank == 0

    def device(self):
        if self.state is not None:
            return str(self.state.device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def barrier(self):
        if self.state is not None:
            self.state.wait_for_everyone()


def cell_dir(out, model_name):
    return os.path.join(out, "cells", _safe(model_name))


def done_ids(out, model_name, cond_key):
    """The sample ids already computed for (model, condition), from every process's cell file."""
    ids = set()
    for path in glob.glob(os.path.join(cell_dir(out, model_name), f"{glob.escape(_safe(cond_key))}.*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for raw in f:
                try:
                    ids.add(json.loads(raw)["id"])
                except (json.JSONDecodeError, KeyError):
                    continue                          # a torn last line: the writer cuts it off on resume
    return ids


def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _check_run_file(cfg, run):
    """Pins the dataset and generation settings of the report folder; a different run there is an error."""
    path = os.path.join(cfg.out, "run.json")
    if os.path.exists(path) and not cfg.overwrite:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        for key in ("dataset_fingerprint", "max_new_tokens", "dtype"):
            if old.get(key) != run.get(key):
                raise ValueError(f"{cfg.out} holds the cells of a different run ({key}: {old.get(key)} there, "
                                 f"{run.get(key)} now): pass --overwrite to start it anew, or another --out")


def run_evaluation(cfg: EvalConfig) -> dict | None:
    """Runs the evaluation (see the module doc) and writes the report; returns the results (None on the
    non-main processes of a multi-process run)."""
    from avar_kernels import benchmark as bm

    from .report import write_report

    procs = Processes(cpu=cfg.device is not None and str(cfg.device).startswith("cpu"))
    device = cfg.device or procs.device()
    if not cfg.models:
        raise ValueError("no model to evaluate")
    names = [m.name for m in cfg.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"models: the name(s) {dup} are used twice; name them NAME=PATH")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    shapes = {}
    for spec in cfg.models:                               # every input error before any work
        shapes[spec.name] = model_shape(spec)
        for cond in cfg.conditions:
            cond.check(shapes[spec.name][0], spec.name)
    dataset = load_dataset(cfg.data, limit=cfg.limit, embedded_samples=cfg.embedded_samples, seed=cfg.data_seed,
                           image_dir=cfg.image_dir)
    dt = resolve_dtype(cfg.dtype, device)
    run = {
        "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint, "skipped_records": dataset.skipped,
        "sample_ids": [s.id for s in dataset.samples], "answers": {str(s.id): s.answer for s in dataset.samples},
        "models": [{"name": m.name, "path": m.path or "embedded (random init, avar_kernels.train.embedded)",
                    "num_layers": shapes[m.name][0], "num_heads": shapes[m.name][1]} for m in cfg.models],
        "conditions": [{"key": c.key, **asdict(c)} for c in cfg.conditions],
        "max_new_tokens": cfg.max_new_tokens, "dtype": str(dt).removeprefix("torch."),
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("models", "conditions", "out", "progress")},
        "seeds": {"data_seed": cfg.data_seed, "model_init_seed": cfg.seed, "torch_seed": cfg.seed},
        "answer_check": "avar_kernels.train.rewards.answers_match (the GRPO accuracy reward)",
        "processes": procs.world, "environment": bm.environment(device), "versions": _versions(),
    }
    if procs.main:
        if cfg.overwrite and os.path.isdir(os.path.join(cfg.out, "cells")):
            import shutil

            shutil.rmtree(os.path.join(cfg.out, "cells"))
        _check_run_file(cfg, run)
        os.makedirs(cfg.out, exist_ok=True)
        _write_json(os.path.join(cfg.out, "run.json"), run)
    procs.barrier()
    pending = {(spec.name, c.key): [s for s in dataset.samples if s.id not in done_ids(cfg.out, spec.name, c.key)]
               for spec in cfg.models for c in cfg.conditions}
    procs.barrier()                                       # every process planned from the same files
    try:
        for spec in cfg.models:
            _evaluate_model(cfg, spec, dataset, pending, procs, device)
        procs.barrier()
    finally:
        results = write_report(cfg.out) if procs.main else None
    return results


def _versions():
    import importlib.metadata

    out = {}
    for name in ("avar-kernels", "torch", "transformers", "accelerate", "trl", "tokenizers", "matplotlib", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _evaluate_model(cfg, spec, dataset, pending, procs, device):
    from tqdm import tqdm

    mine = {c.key: pending[(spec.name, c.key)][procs.rank::procs.world] for c in cfg.conditions}
    cdir = cell_dir(cfg.out, spec.name)
    bench_path, heat_path = os.path.join(cdir, "bench.json"), os.path.join(cdir, "heatmap.json")
    want_bench = procs.main and cfg.bench_samples > 0 and not os.path.exists(bench_path)
    want_heat = procs.main and cfg.heatmap and not os.path.exists(heat_path)
    total = sum(len(v) for v in mine.values())
    if not total and not want_bench and not want_heat:
        return
    os.makedirs(cdir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    lm = load_model(spec, device=device, dtype=cfg.dtype, seed=cfg.seed)
    from avar_kernels.train.data import JsonlWriter

    bar = tqdm(total=total, desc=f"eval {spec.name}", unit="sample", disable=not (cfg.progress and procs.main),
               dynamic_ncols=True)
    try:
        for cond in cfg.conditions:
            todo = mine[cond.key]
            if not todo:
                continue
            bar.set_postfix_str(cond.key)
            path = os.path.join(cdir, f"{_safe(cond.key)}.{procs.rank}.jsonl")
            with JsonlWriter(path, resume=True) as writer, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*generation flags.*")
                for i in range(0, len(todo), cfg.batch_size):
                    batch = todo[i:i + cfg.batch_size]
                    for entry in _batch_entries(lm, batch, cond, cfg.max_new_tokens):
                        entry["condition"] = cond.key
                        writer.write(entry)
                    bar.update(len(batch))
        if want_bench:
            bar.set_postfix_str("eager vs avar")
            samples = [s for s in dataset.samples[:cfg.bench_samples] if _readable(s)]
            if samples:
                _write_json(bench_path, benchmark(lm, samples, new_tokens=cfg.bench_new_tokens, reps=cfg.bench_reps))
            else:
                _write_json(bench_path, {"unavailable": "no readable sample among the first bench_samples"})
        if want_heat:
            bar.set_postfix_str("heatmap")
            sample = next((s for s in dataset.samples if s.images and _readable(s)), None)
            cell = ({"unavailable": "no sample with a readable image"} if sample is None else
                    heatmap(lm, sample, max_new_tokens=cfg.max_new_tokens))
            if "map" in cell:
                from avar_kernels.train.data import load_image, save_image

                save_image(load_image(sample.images[0], sample.base_dir), os.path.join(cdir, "heatmap_image.png"))
            _write_json(heat_path, cell)
    finally:
        bar.close()
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _readable(sample):
    from avar_kernels.train.data import load_image

    try:
        for ref in sample.images:
            load_image(ref, sample.base_dir)
    except (OSError, ValueError):
        return False
    return True


def _batch_entries(lm, batch, cond, max_new_tokens):
    """Results of a batch; samples whose images cannot be read become entries with an ``error``."""
    from avar_kernels.train.data import load_image

    good, bad = [], []
    for s in batch:
        try:
            images = [load_image(ref, s.base_dir) for ref in s.images]      # read once, kept as arrays
            good.append(Sample(s.id, s.messages, images, s.answer, s.line, s.base_dir))
        except (OSError, ValueError) as e:
            bad.append({"id": s.id, "line": s.line, "answer": s.answer, "error": f"cannot read image: {e}",
                        "correct": False, "empty": False})
    return (generate_and_measure(lm, good, cond, max_new_tokens) if good else []) + bad
