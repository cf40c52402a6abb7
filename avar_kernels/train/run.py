"""What ``avar-kernels train sft`` / ``train grpo`` run: model, processor and data from a config, the trainer, the
held-out evaluation of the embedded task (answer accuracy, VAS, visual share)."""
from __future__ import annotations

import json
import os
import re
import warnings

import torch

from . import embedded
from .config import split_config
from .data import Conversation, Problem, read_conversations, read_problems, to_chat
from .processing import QWEN_FAMILY, load_processor


def _number_like(cfg):
    """YAML reads ``1e-4`` as text; numbers that look like numbers become numbers."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", v.strip()):
            v = float(v) if any(c in v for c in ".eE") else int(v)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ model

def load_model(data_args, training_args, *, seed=0):
    """``(model, processor, embedded?)``: the checkpoint of ``model_name_or_path`` with ``"avar"`` text attention,
    or the embedded model (random init, ``seed``)."""
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    if data_args.model_name_or_path is None:            # weights in the training dtype, as a checkpoint is loaded
        return embedded.model(attn="avar", seed=seed).to(dtype), embedded.processor(), True
    from transformers import AutoConfig, AutoModelForImageTextToText

    import avar_kernels.hf  # noqa: F401 - registers "avar"

    path = data_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"model_name_or_path: cannot load a checkpoint from {path!r} "
                                f"({' '.join(str(e).split())[:200]})") from None
    if config.model_type not in QWEN_FAMILY:
        raise ValueError(f"model type {config.model_type!r} ({path}): the token classes and the data pipeline know "
                         f"{', '.join(QWEN_FAMILY)}")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation={"text_config": "avar", "vision_config": "sdpa"})
    processor = load_processor(path, config.model_type)
    ip = processor.image_processor
    if data_args.image_max_pixels:
        ip.size = {**dict(ip.size or {}), "longest_edge": int(data_args.image_max_pixels)}
        ip.max_pixels = int(data_args.image_max_pixels)
    if data_args.image_min_pixels:
        ip.size = {**dict(ip.size or {}), "shortest_edge": int(data_args.image_min_pixels)}
        ip.min_pixels = int(data_args.image_min_pixels)
    return model, processor, False


def freeze(model, data_args, is_embedded):
    """LLaMA-Factory's freezing keys. The vision tower is frozen by default for a checkpoint (as there) and
    trained for the embedded model (it starts from random weights)."""
    inner = model.model
    vision = getattr(inner, "visual", None)
    frozen_vision = data_args.freeze_vision_tower if data_args.freeze_vision_tower is not None else not is_embedded
    if vision is not None:
        merger = getattr(vision, "merger", None)
        for name, p in vision.named_parameters():
            in_merger = merger is not None and name.startswith("merger.")
            p.requires_grad_(not (data_args.freeze_multi_modal_projector if in_merger else frozen_vision))
    if data_args.freeze_language_model:
        for p in inner.language_model.parameters():
            p.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ data

def _dataset_paths(data_args, name):
    paths = []
    for part in str(name).split(","):
        part = part.strip()
        candidates = [part]
        if data_args.dataset_dir:
            candidates = [os.path.join(data_args.dataset_dir, part), os.path.join(data_args.dataset_dir,
                                                                                   part + ".jsonl")]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise FileNotFoundError(f"dataset: no such file {candidates[0]!r}")
        paths.append(found)
    return paths


def _read(reader, data_args, name):
    records, bad = [], []
    for path in _dataset_paths(data_args, name):
        recs = reader(path, image_dir=data_args.media_dir)
        records += recs
        bad += recs.bad
    if not records:
        raise ValueError(f"dataset {name!r}: no usable record ({len(bad)} bad: {bad[0] if bad else 'empty file'})")
    if data_args.max_samples:
        records = records[:int(data_args.max_samples)]
    return records, bad


def embedded_conversation(rec, rewriter=None) -> Conversation:
    from .synth import TemplateRewriter

    text = (rewriter or TemplateRewriter())(rec)
    return Conversation([{"role": "user", "content": "<image>" + rec.question},
                         {"role": "assistant", "content": text}], rec.images, line=rec.line)


def sft_data(data_args, seed):
    """``(train conversations, held-out conversations or None, held-out records for answer accuracy or None, bad)``"""
    if data_args.dataset is None:
        train = embedded.records(data_args.embedded_train_size, seed=seed)
        heldout = embedded.records(data_args.embedded_eval_size, seed=seed + 1_000_003)
        return [embedded_conversation(r) for r in train], None, heldout, []
    records, bad = _read(read_conversations, data_args, data_args.dataset)
    evals = None
    if data_args.eval_dataset:
        evals, more = _read(read_conversations, data_args, data_args.eval_dataset)
        bad += more
    elif data_args.val_size:
        n = max(1, int(len(records) * float(data_args.val_size)))
        records, evals = records[:-n], records[-n:]
    return records, evals, None, bad


def grpo_data(data_args, seed):
    """Problems in TRL's conversational form with an ``answer`` column: ``(train rows, bad)``."""
    if data_args.dataset is None:
        problems = [Problem(r.question, r.answer, r.images, line=r.line)
                    for r in embedded.records(data_args.embedded_train_size, seed=seed)]
        bad = []
    else:
        problems, bad = _read(read_problems, data_args, data_args.dataset)
    return [problem_row(p) for p in problems], bad


def problem_row(p: Problem) -> dict:
    from .data import IMAGE_PLACEHOLDER, load_image

    images = [load_image(ref, p.base_dir) for ref in p.images]
    text = p.problem if IMAGE_PLACEHOLDER in p.problem else IMAGE_PLACEHOLDER * len(images) + p.problem
    messages = to_chat([{"role": "user", "content": text}], len(images))
    it = iter(images)
    for part in messages[0]["content"]:
        if part["type"] == "image":
            part["image"] = next(it)
    return {"prompt": messages, "answer": p.answer}


# ------------------------------------------------------------------------------------------------ held-out

def heldout_report(model, processor, records, *, max_new_tokens=128, batch_size=50) -> dict:
    """Greedy answers to held-out :class:`~avar_kernels.train.data.SynthRecord` s: ``accuracy`` (the accuracy
    reward on ``<answer>``), and the model's ``vas`` / ``visual_share`` on the prompts (user-text rows, masses of
    the fused kernels recorded during generation)."""
    from avar_kernels import hf as ah
    from avar_kernels import metrics

    from .rewards import accuracy_reward

    model.eval()
    hits, vas, share, n_prompts = 0, 0.0, 0.0, 0
    samples = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        texts = [processor.apply_chat_template(to_chat([{"role": "user", "content": "<image>" + r.question}], 1),
                                               add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = processor(text=texts, images=[r.images[0] for r in chunk], return_tensors="pt", padding=True,
                        padding_side="left").to(model.device)
        classes = ah.token_classes(enc["input_ids"], processor, attention_mask=enc["attention_mask"],
                                   image_token_id=processor.image_token_id)
        prompt_len = enc["input_ids"].shape[1]
        with torch.no_grad(), ah.record(model, classes) as rec:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_rows = [m[..., :prompt_len, :] for m in rec.mass]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.UndefinedMetricWarning)
            vas += float(metrics.vas(prompt_rows, classes).overall) * len(chunk)
            share += float(metrics.visual_share(prompt_rows, classes).overall) * len(chunk)
        texts = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        hits += sum(accuracy_reward(None, texts, answer=[r.answer for r in chunk]))
        n_prompts += len(chunk)
        samples += [{"question": r.question, "answer": r.answer, "response": t} for r, t in zip(chunk, texts)][:2]
    return {"accuracy": hits / max(n_prompts, 1), "vas": vas / max(n_prompts, 1),
            "visual_share": share / max(n_prompts, 1), "n": n_prompts, "samples": samples[:4]}


# ------------------------------------------------------------------------------------------------ runs

def _resume_arg(training_args):
    resume = training_args.resume_from_checkpoint
    if resume in (None, False, "false", "False"):
        return None
    if resume in (True, "true", "True", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint in {training_args.output_dir!r}")
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint at {resume!r}")
    return resume


def run_sft(cfg: dict) -> dict:
    """Trains with :class:`~avar_kernels.train.sft.AvarSFTTrainer`; returns the train metrics and, for the
    embedded task, the held-out report (also written to ``output_dir/heldout.json``)."""
    from .batches import SFTCollator, SFTDataset
    from .sft import AvarSFTTrainer

    cfg = _number_like(cfg)
    if cfg.get("model_name_or_path") is None and cfg.get("dataset") is None:
        cfg = {**EMBEDDED_SFT, **cfg}
    training_args, avar_args, data_args = split_config(cfg, "sft")
    resume = _resume_arg(training_args)
    model, processor, is_embedded = load_model(data_args, training_args, seed=training_args.seed)
    freeze(model, data_args, is_embedded)
    train, evals, heldout, bad = sft_data(data_args, training_args.seed)       # bad records: warned, reported
    kw = dict(cutoff_len=data_args.cutoff_len, query_set=avar_args.avar_query_set)
    rope = model.model.get_rope_index if data_args.packing else None
    trainer = AvarSFTTrainer(
        model=model, args=training_args, avar_args=avar_args, processing_class=processor,
        train_dataset=SFTDataset(train, processor, **kw),
        eval_dataset=SFTDataset(evals, processor, **kw) if evals else None,
        data_collator=SFTCollator(processor.tokenizer.pad_token_id, packing=data_args.packing, rope_index=rope))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    report = {"train": result.metrics, "skipped": [str(b) for b in bad]}
    if heldout is not None and trainer.is_world_process_zero():
        report["heldout"] = heldout_report(trainer.accelerator.unwrap_model(trainer.model), processor, heldout,
                                           max_new_tokens=data_args.max_new_tokens)
        report["heldout"]["chance"] = embedded.blind_accuracy(
            embedded.records(data_args.embedded_train_size, seed=training_args.seed), heldout)
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


# The embedded task's defaults: a few minutes on 2 CPU cores (a config or flags override any of them)
EMBEDDED_SFT = dict(learning_rate=5e-4, per_device_train_batch_size=16, max_steps=1500, warmup_steps=50,
                    lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=25, save_steps=500,
                    save_total_limit=2, seed=0, dataloader_num_workers=0)


EMBEDDED_GRPO = dict(learning_rate=1e-5, per_device_train_batch_size=4, num_generations=4, max_completion_length=96,
                     max_steps=20, logging_steps=1, save_steps=100, seed=0, temperature=1.0, beta=0.0,
                     dataloader_num_workers=0)


def run_grpo(cfg: dict) -> dict:
    """GRPO with the AVAR rewards (:func:`avar_kernels.train.grpo.build_trainer`). Without ``model_name_or_path``
    it starts from the embedded model: give it the output of ``train sft`` to start from a model that answers."""
    from .grpo import build_trainer

    cfg = _number_like(cfg)
    if cfg.get("dataset") is None:
        cfg = {**EMBEDDED_GRPO, "embedded_train_size": 256, **cfg}
    training_args, reward_args, data_args = split_config(cfg, "grpo")
    resume = _resume_arg(training_args)
    model, processor, is_embedded = load_model(data_args, training_args, seed=training_args.seed)
    freeze(model, data_args, is_embedded)
    rows, bad = grpo_data(data_args, training_args.seed)
    trainer = build_trainer(model, processor, rows, training_args, reward_args)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    report = {"train": result.metrics, "skipped": [str(b) for b in bad],
              "log": [e for e in trainer.state.log_history if "reward" in e]}
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
    return report
