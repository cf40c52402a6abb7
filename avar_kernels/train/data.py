"""Datasets in the layouts AVAR users already have, read and written as JSONL.

* SFT: LLaMA-Factory's ShareGPT multimodal layout (the layout of the released AVAR-ColdStart-30K)::

      {"messages": [{"role": "user", "content": "<image>How many ...?"}, {"role": "assistant", "content": "..."}],
       "images": ["images/0001.png"]}

  ``conversations`` with ``from`` / ``value`` (``human`` / ``gpt`` / ``system``) and a top-level ``system`` are read
  too. Each ``<image>`` in the text stands for the next image; with none, the images go before the first user text.
* GRPO: EasyR1's geometry3k layout, ``{"problem": "<image>Find x.", "answer": "3", "images": [...]}``.
* Synthesis input: ``image`` or ``images``, ``question`` (or ``problem``), ``answer``, optional ``reasoning`` and
  ``description``.

Image paths are relative to the JSONL file's folder unless ``image_dir`` is given. A record that cannot be used
(broken JSON, missing field, empty answer, a missing image file, placeholders that do not match the images) is
reported with its line number (:class:`BadRecord`, also as a warning) and skipped, never dropped silently.
:class:`JsonlWriter` appends and resumes after an interruption.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class BadRecord(NamedTuple):
    """A record that was skipped: ``path``, 1-based ``line`` and ``reason``."""

    path: str
    line: int
    reason: str

    def __str__(self):
        return f"{self.path}:{self.line}: {self.reason}"


class BadRecordWarning(UserWarning):
    """A dataset record was skipped (its line number and the reason are in the message)."""


@dataclass
class Conversation:
    """An SFT sample: ``messages`` (role, content with ``<image>`` placeholders) and its ``images``."""

    messages: list
    images: list = field(default_factory=list)
    line: int | None = None
    base_dir: str | None = None


@dataclass
class Problem:
    """A GRPO prompt: ``problem`` (with ``<image>`` placeholders), the reference ``answer`` and ``images``."""

    problem: str
    answer: str
    images: list = field(default_factory=list)
    line: int | None = None
    base_dir: str | None = None


@dataclass
class SynthRecord:
    """Input of ``avar-kernels synth``."""

    question: str
    answer: str
    images: list = field(default_factory=list)
    reasoning: str | None = None
    description: str | None = None
    line: int | None = None
    base_dir: str | None = None


class Records(list):
    """The usable records of a file (a list) with ``bad``: the :class:`BadRecord` s that were skipped."""

    def __init__(self, items=(), bad=()):
        super().__init__(items)
        self.bad = list(bad)


# ------------------------------------------------------------------------------------------------ reading

def iter_jsonl(path):
    """``(line_number, object_or_BadRecord)`` for each non-blank line of ``path``."""
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield n, BadRecord(str(path), n, f"broken JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield n, BadRecord(str(path), n, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield n, obj


def _read(path, parse, image_dir, check_images):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such dataset file: {path}")
    base = image_dir or os.path.dirname(os.path.abspath(path))
    good, bad = [], []
    for n, obj in iter_jsonl(path):
        if isinstance(obj, BadRecord):
            bad.append(obj)
            continue
        try:
            rec = parse(obj)
            rec.line, rec.base_dir = n, base
            if check_images:
                for img in rec.images:
                    if isinstance(img, str) and not os.path.isfile(_image_path(img, base)):
                        raise ValueError(f"image not found: {img}")
        except (ValueError, TypeError, KeyError) as e:
            bad.append(BadRecord(str(path), n, str(e)))
            continue
        good.append(rec)
    for b in bad:
        warnings.warn(f"skipped {b}", BadRecordWarning, stacklevel=3)
    return Records(good, bad)


def _text(obj, *keys):
    for k in keys:
        v = obj.get(k)
        if v is not None:
            if not isinstance(v, (str, int, float)):
                raise TypeError(f"field {k!r} must be text, got {type(v).__name__}")
            return str(v)
    return None


def _images(obj):
    imgs = obj.get("images", obj.get("image"))
    if imgs is None:
        return []
    if isinstance(imgs, (str, dict)):
        imgs = [imgs]
    if not isinstance(imgs, list):
        raise TypeError(f"field 'images' must be a list, got {type(imgs).__name__}")
    for im in imgs:
        if not (isinstance(im, str) or (isinstance(im, dict) and ("path" in im or "bytes" in im))):
            raise TypeError("each image must be a path or a {'path' | 'bytes'} object")
    return imgs


def parse_conversation(obj) -> Conversation:
    msgs = obj.get("messages", obj.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("missing 'messages' (or 'conversations'): a non-empty list of turns")
    out = []
    system = _text(obj, "system")
    if system:
        out.append({"role": "system", "content": system})
    for m in msgs:
        if not isinstance(m, dict):
            raise TypeError("each message must be an object")
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None:
            raise ValueError(f"unknown role {m.get('role', m.get('from'))!r} (expected user/assistant/system)")
        if not isinstance(content, str):
            raise TypeError("message content must be text (with <image> placeholders)")
        out.append({"role": role, "content": content})
    answers = [m for m in out if m["role"] == "assistant"]
    if not answers:
        raise ValueError("no assistant turn")
    if any(not m["content"].strip() for m in answers):
        raise ValueError("empty answer")
    if not any(m["role"] == "user" for m in out):
        raise ValueError("no user turn")
    images = _images(obj)
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in out)
    if n_placeholders and n_placeholders != len(images):
        raise ValueError(f"{n_placeholders} <image> placeholders but {len(images)} images")
    return Conversation(out, images)


def parse_problem(obj) -> Problem:
    problem = _text(obj, "problem", "question", "prompt")
    answer = _text(obj, "answer", "solution", "ground_truth")
    if not problem or not problem.strip():
        raise ValueError("missing or empty 'problem'")
    if answer is None or not answer.strip():
        raise ValueError("empty answer")
    images = _images(obj)
    n = problem.count(IMAGE_PLACEHOLDER)
    if n and n != len(images):
        raise ValueError(f"{n} <image> placeholders but {len(images)} images")
    return Problem(problem, answer.strip(), images)


def parse_synth_record(obj) -> SynthRecord:
    question = _text(obj, "question", "problem")
    answer = _text(obj, "answer")
    if not question or not question.strip():
        raise ValueError("missing or empty 'question'")
    if answer is None or not answer.strip():
        raise ValueError("empty answer")
    images = _images(obj)
    if not images:
        raise ValueError("missing image")
    return SynthRecord(question.replace(IMAGE_PLACEHOLDER, "").strip(), answer.strip(), images,
                       reasoning=_text(obj, "reasoning"), description=_text(obj, "description"))


def read_conversations(path, *, image_dir=None, check_images=True) -> Records:
    """The SFT records of a ShareGPT multimodal JSONL file (see the module doc)."""
    return _read(path, parse_conversation, image_dir, check_images)


def read_problems(path, *, image_dir=None, check_images=True) -> Records:
    """The GRPO records of a problem / answer / images JSONL file."""
    return _read(path, parse_problem, image_dir, check_images)


def read_synth_records(path, *, image_dir=None, check_images=True) -> Records:
    """The input records of ``synth``."""
    return _read(path, parse_synth_record, image_dir, check_images)


# ------------------------------------------------------------------------------------------------ images

def _image_path(ref, base_dir):
    return ref if os.path.isabs(ref) or base_dir is None else os.path.join(base_dir, ref)


def load_image(ref, base_dir=None):
    """uint8 ``[H, W, 3]`` RGB from a path (relative to ``base_dir``), a ``{'path' | 'bytes'}`` object, a PIL image
    or an array. Files are decoded with Pillow."""
    import numpy as np

    if isinstance(ref, np.ndarray):
        return ref
    if hasattr(ref, "convert"):
        return np.asarray(ref.convert("RGB"))
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image files needs Pillow (pip install pillow)") from None
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            import io

            return np.asarray(Image.open(io.BytesIO(ref["bytes"])).convert("RGB"))
        ref = ref["path"]
    with Image.open(_image_path(ref, base_dir)) as im:
        return np.asarray(im.convert("RGB"))


def save_image(array, path):
    """Writes a uint8 ``[H, W, 3]`` array as PNG (Pillow)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def to_chat(messages, n_images: int) -> list:
    """Messages with ``<image>`` placeholders -> chat-template messages with ``{"type": "image"}`` parts (images
    without a placeholder go before the first user text)."""
    placed = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    out = []
    for m in messages:
        pieces = m["content"].split(IMAGE_PLACEHOLDER)
        parts = []
        if not placed and m["role"] == "user" and n_images and not any(x["role"] == "user" for x in out):
            parts += [{"type": "image"}] * n_images
        for i, text in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out


# ------------------------------------------------------------------------------------------------ writing

class JsonlWriter:
    """Appends JSON lines to ``path``, one flushed line per record, so an interrupted run keeps what it wrote.

    ``resume=True`` keeps an existing file: a torn last line (the run died mid-write) is cut off, and
    ``last(key)`` tells where to continue (the value of ``key`` in the last complete line). ``resume=False``
    starts the file anew.
    """

    def __init__(self, path, *, resume=True):
        self.path = str(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        self.count = 0
        self._last: dict[str, Any] | None = None
        if resume and os.path.exists(self.path):
            self._recover()
        else:
            open(self.path, "w").close()
        self._f = open(self.path, "a", encoding="utf-8")

    def _recover(self):
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1          # everything up to the last newline is complete
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        for raw in data[:keep].splitlines():
            if raw.strip():
                self.count += 1
                last = raw
        if self.count:
            self._last = json.loads(last)

    def last(self, key, default=None):
        return default if self._last is None else self._last.get(key, default)

    def write(self, obj):
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()
        self.count += 1
        self._last = obj

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def conversation_row(messages, images, **extra) -> dict:
    """A ShareGPT multimodal JSONL row (``messages`` + ``images``) with optional extra fields."""
    return {"messages": messages, "images": list(images), **extra}


def problem_row(problem, answer, images, **extra) -> dict:
    """An EasyR1 problem / answer / images row."""
    return {"problem": problem, "answer": answer, "images": list(images), **extra}
