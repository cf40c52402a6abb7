"""The embedded default: a procedural visual-reasoning task, a local tokenizer and a small Qwen2.5-VL, no download.

Images are 48 x 48 pixels, a 3 x 3 grid of 16-pixel cells holding 2 to 4 shapes (circle, square, triangle) in
four colours and two sizes. With 8-pixel patches merged 2 x 2 each cell is one image token (9 per image).
Questions cannot be answered without the image: how many shapes of a colour, the colour of a shape, the colour of
the shape left of another, whether one shape is bigger than another, which shape has a colour. Every record has
an exact answer, a description of the image and the reasoning to the answer (what ``synth`` turns into
``<think>...</think><answer>...</answer>`` samples).

The tokenizer is word-level (``tokenizers``), built from the words the generator and the synthesis templates use,
with the Qwen ChatML special tokens and ``<think>``, ``</think>``, ``<answer>``, ``</answer>``. The image processor
is transformers' ``Qwen2VLImageProcessorPil`` (no torchvision). The model is a Qwen2.5-VL built from a config.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from . import synth
from .data import SynthRecord

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL, GRID = 16, 3
IMAGE_SIZE = CELL * GRID
PATCH, MERGE = 8, 2
QUESTION_KINDS = ("count", "colour", "left_of", "bigger", "shape")
SYSTEM_PROMPT = "You are a helpful assistant."
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def name(self):
        return f"{self.size} {self.colour} {self.kind}"

    @property
    def place(self):
        return f"{ROWS[self.row]} {COLS[self.col]}"


def draw(shapes) -> np.ndarray:
    """uint8 ``[48, 48, 3]``: the shapes on a white background."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[0:CELL, 0:CELL] + 0.5
    for s in shapes:
        half = 7.0 if s.size == "big" else 4.0
        c = CELL / 2
        if s.kind == "circle":
            mask = (yy - c) ** 2 + (xx - c) ** 2 <= half ** 2
        elif s.kind == "square":
            mask = (np.abs(yy - c) <= half) & (np.abs(xx - c) <= half)
        else:                                   # apex up: the width grows linearly from the top
            top, bottom = c - half, c + half
            mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - c) <= (yy - top) / 2 + 0.25)
        cell = img[s.row * CELL:(s.row + 1) * CELL, s.col * CELL:(s.col + 1) * CELL]
        cell[mask] = COLOURS[s.colour]
    return img


def random_scene(rng: random.Random) -> list:
    cells = rng.sample(range(GRID * GRID), rng.randint(2, 4))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c // GRID, c % GRID)
            for c in sorted(cells)]


def _unique(shapes, attr):
    counts = Counter(getattr(s, attr) for s in shapes)
    return [s for s in shapes if counts[getattr(s, attr)] == 1]


def _and(names):
    return names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]


def ask(kind: str, shapes, rng: random.Random):
    """``(question, answer, reasoning)`` of ``kind`` about ``shapes``, or None when the scene does not fit it."""
    if kind == "count":                         # a uniform count in 0..3: a colour with that many shapes
        target = rng.randint(0, 3)
        colours = [c for c in COLOURS if sum(s.colour == c for s in shapes) == target]
        if not colours:
            return None
        colour = rng.choice(colours)
        hits = [s for s in shapes if s.colour == colour]
        if hits:
            why = f"the {colour} shapes are the " + _and([f"{s.name} at the {s.place}" for s in hits])
        else:
            why = f"no shape is {colour}"
        return f"How many {colour} shapes are there ?", str(len(hits)), why
    if kind == "colour":
        cands = _unique(shapes, "kind")
        if not cands:
            return None
        s = rng.choice(cands)
        return f"What colour is the {s.kind} ?", s.colour, f"the {s.kind} is the {s.name} at the {s.place}"
    if kind == "left_of":
        uniq = _unique(shapes, "kind")
        pairs = []
        for b in uniq:
            left = [a for a in shapes if a.row == b.row and a.col < b.col]
            if left:
                pairs.append((max(left, key=lambda a: a.col), b))
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return (f"What colour is the shape left of the {b.kind} ?", a.colour,
                f"the {b.kind} is at the {b.place} and the shape left of it is the {a.name} at the {a.place}")
    if kind == "bigger":
        uniq = _unique(shapes, "kind")
        pairs = [(p, q) for p in uniq for q in uniq if p.size != q.size]   # yes and no equally often
        if not pairs:
            return None
        p, q = rng.choice(pairs)
        answer = "yes" if p.size == "big" else "no"
        return (f"Is the {p.kind} bigger than the {q.kind} ?", answer,
                f"the {p.kind} is {p.size} and the {q.kind} is {q.size}")
    if kind == "shape":
        cands = _unique(shapes, "colour")
        if not cands:
            return None
        s = rng.choice(cands)
        return f"Which shape is {s.colour} ?", s.kind, f"the {s.colour} shape is the {s.name} at the {s.place}"
    raise ValueError(f"unknown question kind {kind!r}")


def describe(shapes) -> str:
    return " ; ".join(f"a {s.name} at the {s.place}" for s in shapes)


def records(n: int, seed: int = 0, kinds=QUESTION_KINDS) -> list:
    """``n`` :class:`SynthRecord` s with in-memory images (uint8 arrays), reproducible from ``seed``; every
    question kind equally often."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        shapes = random_scene(rng)
        qa = ask(kind, shapes, rng)
        if qa is None:
            continue
        question, answer, reasoning = qa
        out.append(SynthRecord(question, answer, [draw(shapes)], reasoning=reasoning, description=describe(shapes),
                               line=len(out) + 1))
    return out


def blind_accuracy(train, test) -> float:
    """Accuracy on ``test`` of the best answerer that cannot see the image: for each question text, the most
    frequent answer to it in ``train`` (the chance level of this task)."""
    by_question = defaultdict(Counter)
    for r in train:
        by_question[r.question][r.answer] += 1
    overall = Counter(r.answer for r in train)
    hits = 0
    for r in test:
        counts = by_question.get(r.question) or overall
        hits += counts.most_common(1)[0][0] == r.answer
    return hits / max(len(test), 1)


# ------------------------------------------------------------------------------------------------ tokenizer

def _words(text):
    return re.findall(r"\w+|[^\w\s]", text)


def vocabulary() -> list:
    """Every word the generator, the synthesis templates and the system prompt can produce."""
    words = set(_words(SYSTEM_PROMPT))
    for phrase in synth.PHRASES:
        words.update(_words(phrase))
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(SIZES)
    words.update(ROWS)
    words.update(COLS)
    words.update(str(i) for i in range(10))
    words.update(["yes", "no", "system", "user", "assistant"])
    templates = ("How many shapes are there ? What colour is the shape left of the ? Is the bigger than the ? "
                 "Which shape is ? the shapes are the at the , and no is the it a ;")
    words.update(_words(templates))
    return sorted(words)


def tokenizer():
    """The local word-level tokenizer (``PreTrainedTokenizerFast``): ``[UNK]``, the special tokens, the reasoning
    tags (plain added tokens, so decoding keeps them) and :func:`vocabulary`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "\n": 1}
    for t in (*SPECIAL_TOKENS, *REASONING_TOKENS, *vocabulary()):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)     # joins words with single spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # the newline of the chat template is a token of its own (whitespace splitting would drop it)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("\n", *REASONING_TOKENS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]})
    return fast


def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    size={"shortest_edge": pixels, "longest_edge": pixels})


def processor():
    """The embedded :class:`~avar_kernels.train.processing.QwenVLProcessor`."""
    from .processing import QwenVLProcessor

    return QwenVLProcessor(image_processor(), tokenizer())


# ------------------------------------------------------------------------------------------------ model

# Measured on the shapes task (1500 steps at batch 16, 200 held-out questions, blind answerer 0.41): 4 layers
# plain 0.54; 6 layers plain 0.675, guided 0.70; 8 layers plain 0.60 (slower to fit). The descriptions come out right
# with 4 layers; the depth is for the reasoning's look-ups in them. The text weights start at std 0.06 (not
# transformers' 0.02): at 0.02 this small model sat on a loss plateau without reading the image (0.35 after the
# same 1500 steps).
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.06)
VISION = dict(depth=1, hidden_size=64, out_hidden_size=128, num_heads=2, intermediate_size=128)


def model(attn="avar", seed=0, **text_overrides):
    """A randomly initialised Qwen2.5-VL of the embedded size, text attention ``attn`` (vision: sdpa)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import avar_kernels.hf  # noqa: F401 - registers the "avar" attention

    tok = tokenizer()
    text = dict(MODEL, vocab_size=len(tok), max_position_embeddings=1024, rms_norm_eps=1e-6,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                tie_word_embeddings=True, **text_overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]}
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                           window_size=IMAGE_SIZE * 2, fullatt_block_indexes=[VISION["depth"] - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    m = Qwen2_5_VLForConditionalGeneration._from_config(
        cfg, attn_implementation={"text_config": attn, "vision_config": "sdpa"}, dtype=torch.float32)
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    return m
