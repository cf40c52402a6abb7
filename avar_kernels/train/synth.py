"""Visual-anchored cold-start samples from (image, question, answer[, reasoning, description]) records.

A sample's response is ``<think>`` a structured image description, reasoning, a step that goes back to the image
("Looking at the image again, ..."), a reflection ``</think><answer>`` the answer ``</answer>``: the shape of the
AVAR cold-start data. Two rewriters write it:

* :class:`TemplateRewriter` (the default): deterministic, from the record's own fields and fixed phrasings (the
  phrasing is chosen by a hash of the record's question, description, reasoning and images, so the same record
  always gives the same text; never of the answer, see :func:`phrasing_seed`).
* :class:`ModelRewriter`: prompts a local transformers vision-language model (a path) for the description and the
  reasoning, then assembles the sample around the record's answer (the model never changes the answer).

:func:`synthesize` runs a rewriter over records and writes LLaMA-Factory ShareGPT JSONL, resumably.
"""
from __future__ import annotations

import os
import zlib
from typing import NamedTuple

from tqdm.auto import tqdm

from .data import IMAGE_PLACEHOLDER, SynthRecord

REASONING_OPENERS = ("Reasoning :", "Step by step :")
LOOK_AGAIN = ("Looking at the image again ,", "Going back to the image ,")
CONFIRM = ("it shows", "it confirms")
REFLECTIONS = ("Reflection : each step agrees with the image .", "Reflection : the image supports every step .")
DESCRIPTION_OPENER = "Image description :"
# every fixed phrase of the template, for tokenizers that must cover them (the embedded word-level vocabulary)
PHRASES = (*REASONING_OPENERS, *LOOK_AGAIN, *CONFIRM, *REFLECTIONS, DESCRIPTION_OPENER, ".")


def response(think: str, answer: str) -> str:
    return f"<think> {think} </think> <answer> {answer} </answer>"


class TemplateRewriter:
    """The deterministic rewriter: description, reasoning, look-back and reflection from fixed phrasings."""

    name = "template"

    def __call__(self, record: SynthRecord) -> str:
        pick = phrasing_seed(record)
        parts = []
        if record.description:
            parts.append(f"{DESCRIPTION_OPENER} {_sentence(record.description)}")
        if record.reasoning:
            parts.append(f"{REASONING_OPENERS[pick % 2]} {_sentence(record.reasoning)}")
        parts.append(f"{LOOK_AGAIN[(pick >> 1) % 2]} {CONFIRM[(pick >> 2) % 2]} {record.answer} .")
        parts.append(REFLECTIONS[(pick >> 3) % 2])
        return response(" ".join(parts), record.answer)


def phrasing_seed(record: SynthRecord) -> int:
    """The hash that picks a record's phrasings: of everything but the answer. Hashing the answer (as an earlier
    version did) makes the phrasing, written before the answer, encode it: on the embedded task the 4 phrasing bits
    told the answer of 89% of the questions, and a model trained on those samples learned to pick a phrasing by
    the question's prior and then to write the answer that phrasing implies, ignoring its own image description."""
    h = zlib.crc32(f"{record.question}\x00{record.description}\x00{record.reasoning}".encode())
    for image in record.images:      # a path, or pixels (numpy array, PIL image)
        data = image.tobytes() if hasattr(image, "tobytes") else str(image).encode()
        h = zlib.crc32(data, h)
    return h


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith(".") else text + " ."


DESCRIBE_PROMPT = ("Describe the image in detail: the objects, their attributes, positions and any text or numbers. "
                   "Use plain sentences.")
REASON_PROMPT = ("Question: {question}\nThe correct answer is {answer}. Explain step by step how the image leads to "
                 "this answer, referring to what can be seen in it. Do not state the answer as a new claim.")


class ModelRewriter:
    """Prompts a local vision-language model (``path``: a checkpoint directory of the Qwen family) for an image
    description and a reasoning toward the record's answer; the sample wraps them like :class:`TemplateRewriter`.
    Records whose generation comes back empty raise ``ValueError`` (reported and skipped by :func:`synthesize`)."""

    name = "model"

    def __init__(self, path, *, device="cpu", max_new_tokens=256, dtype=None):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        from .processing import load_processor

        config = AutoConfig.from_pretrained(path)
        self.processor = load_processor(path, getattr(config, "model_type", None))
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32).to(device)
        self.model.eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def _ask(self, image, prompt):
        import torch

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image], return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def __call__(self, record: SynthRecord) -> str:
        from .data import load_image

        image = load_image(record.images[0], record.base_dir)
        description = record.description or self._ask(image, DESCRIBE_PROMPT)
        reasoning = self._ask(image, REASON_PROMPT.format(question=record.question, answer=record.answer))
        if not description.strip() or not reasoning.strip():
            raise ValueError("the model's description or reasoning came back empty")
        return TemplateRewriter()(SynthRecord(record.question, record.answer, record.images, reasoning=reasoning,
                                              description=description, line=record.line,
                                              base_dir=record.base_dir))


class SynthReport(NamedTuple):
    """What :func:`synthesize` did: ``written`` new rows, ``resumed`` rows kept from an earlier run, ``bad`` the
    records it skipped (with their line numbers)."""

    written: int
    resumed: int
    bad: list


def synthesize(records, out_path, *, rewriter=None, source="<records>", resume=True, progress=False) -> SynthReport:
    """Writes one ShareGPT multimodal row per record to ``out_path`` (JSONL). In-memory images (arrays) are saved
    as PNG under ``images/`` next to it. Each row carries ``source_line``: with ``resume`` an interrupted run
    continues after the last row written. A record the rewriter fails on is reported and skipped."""
    from .data import BadRecord, JsonlWriter, conversation_row, save_image

    rewriter = rewriter or TemplateRewriter()
    out_dir = os.path.dirname(os.path.abspath(out_path))
    bad, written = [], 0
    with JsonlWriter(out_path, resume=resume) as writer:
        resumed = writer.count
        done = writer.last("source_line", 0)
        todo = [r for r in records if r.line is None or r.line > done]
        for rec in tqdm(todo, desc="synth", unit="record", disable=not progress):
            try:
                text = rewriter(rec)
                images = []
                for k, img in enumerate(rec.images):
                    if isinstance(img, str):
                        images.append(img if rec.base_dir is None else
                                      os.path.relpath(os.path.join(rec.base_dir, img), out_dir))
                    else:
                        name = os.path.join("images", f"{rec.line:07d}_{k}.png")
                        save_image(img, os.path.join(out_dir, name))
                        images.append(name)
            except (ValueError, OSError) as e:
                bad.append(BadRecord(source, rec.line or 0, str(e)))
                continue
            messages = [{"role": "user", "content": IMAGE_PLACEHOLDER * len(images) + rec.question},
                        {"role": "assistant", "content": text}]
            writer.write(conversation_row(messages, images, source_line=rec.line))
            written += 1
    return SynthReport(written, resumed, bad)
