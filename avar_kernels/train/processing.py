"""A processor for the Qwen vision-language family that needs no torchvision.

The stock ``Qwen2_5_VLProcessor`` cannot be built without torchvision (its video processor needs it). This one
holds the torchvision-free ``Qwen2VLImageProcessorPil`` and the tokenizer, renders ChatML, and expands each
``<|image_pad|>`` to ``grid_t * grid_h * grid_w / merge_size**2`` copies, as the stock processor does. It is a
``ProcessorMixin``, so TRL and the ``Trainer`` treat it as a VLM processor (``apply_chat_template`` with images,
``save_pretrained``). It serves the embedded default and real Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints alike.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

IMAGE_TOKEN = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN_FAMILY = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# ChatML as the Qwen2-VL template renders it: a default system turn when the conversation has none; images as
# <|vision_start|><|image_pad|><|vision_end|> where their content part stands.
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class QwenVLProcessor(ProcessorMixin):
    """``processor(text=..., images=...)`` -> ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 on image
    tokens) and, with images, ``pixel_values`` and ``image_grid_thw``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHATML_TEMPLATE)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: not a Qwen vision-language tokenizer")

    def __call__(self, images=None, text=None, padding=False, return_tensors=None, padding_side=None, **kwargs):
        if text is None:
            raise ValueError("QwenVLProcessor: text is required")
        texts = [text] if isinstance(text, str) else list(text)
        flat = _flatten_images(images)
        out = {}
        if flat:
            vision = self.image_processor(images=flat, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            counts = (out["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
            texts = _expand(texts, counts)
        elif any(IMAGE_TOKEN in t for t in texts):
            raise ValueError(f"the text has {IMAGE_TOKEN} placeholders but no images were given")
        tok_kwargs = {k: v for k, v in kwargs.items() if k in ("truncation", "max_length", "add_special_tokens")}
        if padding_side is not None:
            tok_kwargs["padding_side"] = padding_side
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **tok_kwargs)
        ids = enc["input_ids"]
        if return_tensors == "pt":
            mm = (ids == self.image_token_id).long()
        else:
            mm = [[int(t == self.image_token_id) for t in row] for row in ids]
        out.update(input_ids=ids, attention_mask=enc["attention_mask"], mm_token_type_ids=mm)
        return BatchFeature(out, tensor_type=return_tensors if return_tensors == "pt" else None)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]


def _flatten_images(images):
    if images is None:
        return []
    if isinstance(images, (np.ndarray, torch.Tensor)) or hasattr(images, "convert"):
        return [images]
    flat = []
    for x in images:
        flat.extend(_flatten_images(x))
    return flat


def _expand(texts, counts):
    n_placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
    if n_placeholders != len(counts):
        raise ValueError(f"{n_placeholders} {IMAGE_TOKEN} placeholders in the text but {len(counts)} images")
    it = iter(counts)
    out = []
    for t in texts:
        parts = t.split(IMAGE_TOKEN)
        out.append(parts[0] + "".join(IMAGE_TOKEN * next(it) + p for p in parts[1:]))
    return out


def load_processor(path, model_type=None):
    """A :class:`QwenVLProcessor` from a checkpoint directory (its tokenizer, ``preprocessor_config.json`` and chat
    template; ChatML when it has none). ``model_type`` (from the model's config) must be of the Qwen family."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    if model_type is not None and model_type not in QWEN_FAMILY:
        raise ValueError(f"model type {model_type!r} is not supported by the trainer's data pipeline "
                         f"(supported: {', '.join(QWEN_FAMILY)})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    template = getattr(tokenizer, "chat_template", None)
    jinja, js = os.path.join(path, "chat_template.jinja"), os.path.join(path, "chat_template.json")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    elif os.path.isfile(js):
        with open(js, encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
    return QwenVLProcessor(image_processor, tokenizer, chat_template=template)
