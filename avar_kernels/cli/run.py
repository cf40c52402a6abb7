"""``avar-kernels run``: the main job, end to end.

1. data: SFT samples written by the trainer's synthesizer (``avar_kernels.train.synth``), GRPO problems and
   held-out test questions (problem / answer / images JSONL), from the embedded procedural task with three
   disjoint seeds; or the files given with ``--sft-data`` / ``--grpo-data`` / ``--data``.
2. sft: plain SFT (``use_avar_attn_guide: false``) from the start model (``--model``, default the embedded model
   initialised with ``--seed``);
3. avar-sft: attention-guided SFT (``L_LM + 0.15 L_enh + 0.15 L_sup``) from the same start, same seed and data;
4. grpo: GRPO with the visual reward (``r_acc + 0.3 r_visual + 0.1 r_format``) from the avar-sft model;
5. eval: every model (start, sft, avar-sft, grpo) with and without an intervention (``avar_kernels.eval``), the
   fused attention timed against eager ``output_attentions=True``.

Every step keeps its output under ``OUT/``; a step whose output is complete is not run again, an interrupted
training resumes from its last checkpoint and the evaluation from its cells. Everything the final table shows is
measured in the run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from . import args as A
from .eval import add_eval_arguments, eval_config, print_results

STEPS = ("data", "sft", "avar-sft", "grpo", "eval")
# The main job on the embedded default is the short demonstration (about 2 minutes on 2 idle cores): shorter runs
# than `train sft` / `train grpo` alone (1500 SFT steps at batch 16, 20 GRPO steps; docs/training.md), which the
# config keys and --sft-steps / --grpo-steps / --set-* override.
MAIN_JOB_SFT = dict(max_steps=300, per_device_train_batch_size=8, learning_rate=1e-3, warmup_steps=25, save_steps=100)
MAIN_JOB_GRPO = dict(max_steps=10)
MAIN_JOB_TRAIN_SAMPLES = 4000


def register(sub):
    p = sub.add_parser(
        "run", help="the main job: data -> plain SFT and attention-guided SFT -> GRPO -> evaluation report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  avar-kernels run                      (embedded default: offline, a few minutes on 2 CPU cores)\n"
               "  avar-kernels run --model Qwen/Qwen2.5-VL-7B-Instruct --sft-data coldstart.jsonl \\\n"
               "      --grpo-data geo3k_train.jsonl --data geo3k_test.jsonl --sft-config sft.yaml \\\n"
               "      --grpo-config grpo.yaml --interventions vaf:0.15 pai:0.2 --out runs/qwen7b   (a GPU)")
    p.add_argument("--out", default="avar-run", metavar="DIR", help="everything the job writes (default avar-run)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the start checkpoint (local path or hub name; Qwen2-VL / 2.5-VL / 3-VL); default: the "
                        "embedded model, random init from --seed")
    p.add_argument("--sft-data", type=A.existing_file, default=None, metavar="FILE.jsonl",
                   help="SFT conversations (ShareGPT messages + images); default: synthesized from the embedded task")
    p.add_argument("--grpo-data", type=A.existing_file, default=None, metavar="FILE.jsonl",
                   help="GRPO problems (problem / answer / images); default: the embedded task")
    p.add_argument("--train-samples", type=A.positive_int, default=MAIN_JOB_TRAIN_SAMPLES, metavar="N",
                   help=f"embedded SFT samples to synthesize (default {MAIN_JOB_TRAIN_SAMPLES})")
    p.add_argument("--grpo-samples", type=A.positive_int, default=256, metavar="N",
                   help="embedded GRPO problems (default 256)")
    p.add_argument("--sft-config", type=A.existing_file, default=None, metavar="YAML",
                   help="trainer config of both SFT runs (TrainingArguments / avar_sft.yaml / LLaMA-Factory keys)")
    p.add_argument("--grpo-config", type=A.existing_file, default=None, metavar="YAML",
                   help="trainer config of the GRPO run (GRPOConfig / reward keys)")
    p.add_argument("--sft-steps", type=A.positive_int, default=None, metavar="N",
                   help="max_steps of each SFT run (default: the config's; the embedded task: "
                        f"{MAIN_JOB_SFT['max_steps']} at batch {MAIN_JOB_SFT['per_device_train_batch_size']})")
    p.add_argument("--grpo-steps", type=A.positive_int, default=None, metavar="N",
                   help=f"max_steps of GRPO (default: the config's; the embedded task: {MAIN_JOB_GRPO['max_steps']})")
    p.add_argument("--set-sft", action="append", default=[], metavar="KEY=VALUE",
                   help="an SFT config key (value read as YAML), repeatable")
    p.add_argument("--set-grpo", action="append", default=[], metavar="KEY=VALUE",
                   help="a GRPO config key (value read as YAML), repeatable")
    add_eval_arguments(p, models=False)
    p.set_defaults(run=run, parser=p, samples=40, data_seed=2, interventions=["vaf:0.15"])
    return p


# ------------------------------------------------------------------------------------------------ data

def _problems_file(records, path):
    """Writes embedded records as problem / answer / images rows, images as PNG next to the file."""
    from avar_kernels.train.data import IMAGE_PLACEHOLDER, JsonlWriter, problem_row, save_image

    folder = os.path.dirname(os.path.abspath(path))
    with JsonlWriter(path, resume=False) as w:
        for i, r in enumerate(records):
            names = []
            for k, img in enumerate(r.images):
                name = os.path.join("images", f"{i:07d}_{k}.png")
                save_image(img, os.path.join(folder, name))
                names.append(name)
            w.write(problem_row(IMAGE_PLACEHOLDER * len(names) + r.question, r.answer, names))


def data_paths(args, folder):
    """``(sft, grpo, test)`` JSONL paths: the given files, else those :func:`make_data` writes under ``folder``."""
    return (args.sft_data or os.path.join(folder, "sft", "sft.jsonl"),
            args.grpo_data or os.path.join(folder, "grpo", "grpo.jsonl"),
            args.data or os.path.join(folder, "test", "test.jsonl"))


def make_data(args, folder):
    """Writes the files that were not given, from the embedded task (seeds: SFT ``--seed``, GRPO ``--seed`` +
    1000, test ``--data-seed``), and returns :func:`data_paths`."""
    from avar_kernels.train import embedded, synth

    sft, grpo, test = data_paths(args, folder)
    if args.data is None and args.data_seed in (args.seed, args.seed + 1000):
        raise ValueError(f"--data-seed {args.data_seed}: the test questions must not share the seed of the training "
                         "data (--seed, --seed + 1000)")
    if args.sft_data is None:
        rep = synth.synthesize(embedded.records(args.train_samples, seed=args.seed), sft, source="<embedded>", resume=False)
        if rep.bad:
            raise RuntimeError(f"synth: {len(rep.bad)} embedded records failed, first: {rep.bad[0]}")
    if args.grpo_data is None:
        _problems_file(embedded.records(args.grpo_samples, seed=args.seed + 1000), grpo)
    if args.data is None:
        _problems_file(embedded.records(args.samples, seed=args.data_seed), test)
    return sft, grpo, test


# ------------------------------------------------------------------------------------------------ training

def _config(path, overrides):
    from avar_kernels.train.config import load_yaml, parse_override

    cfg = load_yaml(path) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        cfg[key] = value
    return cfg


def _done(output_dir):
    """A training step is complete when the trainer wrote its report after saving the final model."""
    return os.path.isfile(os.path.join(output_dir, "report.json"))


def _resume(output_dir):
    from transformers.trainer_utils import get_last_checkpoint

    return "last" if os.path.isdir(output_dir) and get_last_checkpoint(output_dir) else None


def sft_config(args, data, output_dir, guided):
    from avar_kernels.train import run as R

    cfg = _config(args.sft_config, [])
    if args.model is None:
        cfg = {**R.EMBEDDED_SFT, **MAIN_JOB_SFT, **cfg}
    else:
        cfg["model_name_or_path"] = args.model
    cfg.update(dataset=data, output_dir=output_dir, seed=args.seed, use_avar_attn_guide=guided)
    if args.no_progress:
        cfg["disable_tqdm"] = True
    if args.sft_steps is not None:
        cfg["max_steps"] = args.sft_steps
    cfg.update(_config(None, args.set_sft))
    cfg["resume_from_checkpoint"] = _resume(output_dir)
    return cfg


def grpo_config(args, data, start, output_dir):
    from avar_kernels.train import run as R

    cfg = _config(args.grpo_config, [])
    if args.model is None:
        cfg = {**R.EMBEDDED_GRPO, **MAIN_JOB_GRPO, **cfg}
    cfg.update(model_name_or_path=start, dataset=data, output_dir=output_dir, seed=args.seed)
    if args.no_progress:
        cfg["disable_tqdm"] = True
    if args.grpo_steps is not None:
        cfg["max_steps"] = args.grpo_steps
    cfg.update(_config(None, args.set_grpo))
    cfg["resume_from_checkpoint"] = _resume(output_dir)
    return cfg


# ------------------------------------------------------------------------------------------------ the job

def _log(step, text):
    print(f"[{STEPS.index(step) + 1}/{len(STEPS)}] {step}: {text}", flush=True)


def run(args):
    from avar_kernels import eval as ev
    from avar_kernels.eval.evaluate import Processes, model_shape
    from avar_kernels.train import run as trainer

    out = args.out
    start = ev.ModelSpec("start", args.model)
    model_shape(start)                                    # a missing checkpoint fails before any work
    procs = Processes(cpu=args.device is not None and args.device.startswith("cpu"))
    job_path = os.path.join(out, "job.json")
    job = {"command": None, "start": args.model or f"embedded (random init, seed {args.seed})", "steps": {}}
    if os.path.exists(job_path):
        with open(job_path, encoding="utf-8") as f:
            job["steps"] = json.load(f).get("steps", {})

    def finished(step, seconds, **info):
        job["steps"][step] = {"seconds": round(seconds, 2), **info}
        if procs.main:
            from avar_kernels.benchmark import environment

            job["command"] = environment()["command"]
            with open(job_path, "w", encoding="utf-8") as f:
                json.dump(job, f, indent=1)

    t = time.perf_counter()
    folder = os.path.join(out, "data")
    paths = data_paths(args, folder)
    if "data" in job["steps"] and all(os.path.isfile(p) for p in paths):
        _log("data", f"done earlier ({folder})")
    else:
        if procs.main:
            os.makedirs(out, exist_ok=True)
            make_data(args, folder)
        procs.barrier()
        finished("data", time.perf_counter() - t, sft=paths[0], grpo=paths[1], test=paths[2])
        _log("data", f"SFT {paths[0]}, GRPO {paths[1]}, test {paths[2]} ({time.perf_counter() - t:.1f} s)")
    sft_data, grpo_data, test_data = paths

    dirs = {step: os.path.join(out, step) for step in ("sft", "avar-sft", "grpo")}
    for step in ("sft", "avar-sft", "grpo"):
        if _done(dirs[step]):
            _log(step, f"done earlier ({dirs[step]})")
            continue
        t = time.perf_counter()
        if step == "grpo":
            cfg = grpo_config(args, grpo_data, dirs["avar-sft"], dirs[step])
            what = "GRPO with the visual reward, from avar-sft"
        else:
            cfg = sft_config(args, sft_data, dirs[step], guided=step == "avar-sft")
            what = "attention-guided SFT" if step == "avar-sft" else "plain SFT from the same start"
        _log(step, f"{what}, {cfg.get('max_steps', 'config')} steps -> {dirs[step]}"
             + (" (resuming)" if cfg["resume_from_checkpoint"] else ""))
        report = trainer.run_grpo(cfg) if step == "grpo" else trainer.run_sft(cfg)
        # the main process saves the model and its report after the others have left train(): no process reads
        # this step's output (the next step's start model, or the evaluation) before it is complete
        procs.barrier()
        finished(step, time.perf_counter() - t, train=report["train"])
        _log(step, f"{time.perf_counter() - t:.1f} s, train loss {report['train'].get('train_loss', math.nan):.4f}")

    t = time.perf_counter()
    embedded_task = args.sft_data is None and args.data is None
    models = [start] + [ev.ModelSpec(step, dirs[step]) for step in ("sft", "avar-sft", "grpo")]
    _log("eval", f"{len(models)} models x {1 + len(args.interventions)} conditions on {test_data}")
    args.data = test_data
    report_dir = os.path.join(out, "report")
    res = ev.run_evaluation(eval_config(args, report_dir, models))
    if res is None:                                       # not the main process
        return 0
    finished("eval", time.perf_counter() - t, complete=res["complete"])
    print()
    for step, info in job["steps"].items():
        loss = info.get("train", {}).get("train_loss")
        print(f"{step:>9}: {info['seconds']:7.1f} s" + ("" if loss is None else f", train loss {loss:.4f}"))
    print(f"{'total':>9}: {sum(s['seconds'] for s in job['steps'].values()):7.1f} s ({job_path})\n")
    print_results(res, report_dir)
    if embedded_task:                                     # the chance level the accuracies are read against
        from avar_kernels.train import embedded

        test = embedded.records(args.samples, seed=args.data_seed)
        blind = embedded.blind_accuracy(embedded.records(args.train_samples, seed=args.seed), test)
        print(f"image-blind answerer (the most frequent training answer to the same question) on these questions: "
              f"{blind:.3f} ({round(blind * len(test))}/{len(test)})")
    return 0
