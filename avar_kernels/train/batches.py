"""SFT samples as model inputs: tokens, labels, token classes and query rows; padded or packed batches."""
from __future__ import annotations

import torch

from avar_kernels import hf as ah
from avar_kernels.types import OTHER, RESPONSE

from .data import Conversation, load_image, to_chat
from .queries import query_mask


class SampleError(ValueError):
    """A record that cannot become a training sample (too long, unreadable image); names its line."""


def encode_conversation(conv: Conversation, processor, *, cutoff_len=None, query_set="turn") -> dict:
    """One sample: 1-D ``input_ids``, ``labels`` (the assistant turns and their end-of-turn token; -100 elsewhere),
    ``mm_token_type_ids``, ``token_classes``, ``query_mask`` and, with images, ``pixel_values`` /
    ``image_grid_thw``. Longer than ``cutoff_len``: cut at the end, unless that would cut into image tokens."""
    where = f"line {conv.line}: " if conv.line is not None else ""
    try:
        images = [load_image(ref, conv.base_dir) for ref in conv.images]
    except (OSError, ValueError) as e:
        raise SampleError(f"{where}cannot read image: {e}") from None
    text = processor.apply_chat_template(to_chat(conv.messages, len(images)), tokenize=False)
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0]
    tok = processor.tokenizer
    image_id = processor.image_token_id
    classes = ah.token_classes(ids, tok, image_token_id=image_id)
    labels = torch.where(classes == RESPONSE, ids, torch.full_like(ids, -100))
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    after = torch.zeros_like(classes, dtype=torch.bool)
    after[1:] = (classes[:-1] == RESPONSE) & (ids[1:] == end_of_turn)
    labels[after] = ids[after]
    if cutoff_len is not None and len(ids) > cutoff_len:
        if bool((ids[cutoff_len:] == image_id).any()):
            raise SampleError(f"{where}{len(ids)} tokens, longer than cutoff_len={cutoff_len}, and the cut would "
                              "fall into an image")
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        enc["mm_token_type_ids"] = enc["mm_token_type_ids"][:, :cutoff_len]
    if not bool((labels != -100).any()):
        raise SampleError(f"{where}no trained token left (cutoff_len={cutoff_len})")
    classes = ah.token_classes(ids, tok, labels=labels, image_token_id=image_id)
    out = {"input_ids": ids, "labels": labels, "mm_token_type_ids": enc["mm_token_type_ids"][0],
           "token_classes": classes,
           "query_mask": query_mask(ids, classes, tok, labels=labels, query_set=query_set)[0]}
    if images:
        out["pixel_values"], out["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    return out


class SFTDataset(torch.utils.data.Dataset):
    """Encodes :class:`~avar_kernels.train.data.Conversation` s on access (images are read when a batch needs
    them)."""

    def __init__(self, conversations, processor, *, cutoff_len=None, query_set="turn"):
        self.conversations = list(conversations)
        self.processor, self.cutoff_len, self.query_set = processor, cutoff_len, query_set

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return encode_conversation(self.conversations[i], self.processor, cutoff_len=self.cutoff_len,
                                   query_set=self.query_set)


PER_TOKEN = {"input_ids": None, "labels": -100, "mm_token_type_ids": 0, "token_classes": OTHER, "query_mask": False}


class SFTCollator:
    """Pads samples to one ``[B, S]`` batch (right padding) or, with ``packing=True``, lays them end to end in one
    row with per-sample positions. A packed row gets ``position_ids`` ``[4, 1, T]`` (text positions, then the
    model's 3-D rope positions per sample from ``rope_index``, e.g. ``model.model.get_rope_index``) and no
    ``attention_mask``, which is how Qwen2-VL models detect packing; ``seq_lengths`` ``[N]`` gives the samples'
    lengths (the attention terms are per sample)."""

    def __init__(self, pad_token_id, *, packing=False, rope_index=None):
        if packing and rope_index is None:
            raise ValueError("SFTCollator: packing needs rope_index (the model's get_rope_index)")
        self.pad_token_id, self.packing, self.rope_index = pad_token_id, packing, rope_index

    def __call__(self, samples):
        batch = self._pack(samples) if self.packing else self._pad(samples)
        images = [s for s in samples if "pixel_values" in s]
        if images:
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in images])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in images])
        return batch

    def _pad(self, samples):
        width = max(len(s["input_ids"]) for s in samples)
        batch = {}
        for key, fill in PER_TOKEN.items():
            fill = self.pad_token_id if fill is None else fill
            rows = [torch.cat([s[key], s[key].new_full((width - len(s[key]),), fill)]) for s in samples]
            batch[key] = torch.stack(rows)
        batch["attention_mask"] = torch.stack([(torch.arange(width) < len(s["input_ids"])).long() for s in samples])
        return batch

    def _pack(self, samples):
        batch = {key: torch.cat([s[key] for s in samples])[None] for key in PER_TOKEN}
        text_pos, rope_pos = [], []
        for s in samples:
            n = len(s["input_ids"])
            text_pos.append(torch.arange(n))
            kw = {"input_ids": s["input_ids"][None], "mm_token_type_ids": s["mm_token_type_ids"][None],
                  "attention_mask": torch.ones(1, n, dtype=torch.long)}
            if "image_grid_thw" in s:
                kw["image_grid_thw"] = s["image_grid_thw"]
                pos, _ = self.rope_index(**kw)
            else:
                pos = torch.arange(n).view(1, 1, n).expand(3, 1, n)
            rope_pos.append(pos)
        batch["position_ids"] = torch.cat([torch.cat(text_pos)[None, None], torch.cat(rope_pos, -1)], 0)
        batch["seq_lengths"] = torch.tensor([len(s["input_ids"]) for s in samples])
        return batch


def unpack(masses, classes, query, seq_lengths):
    """The per-layer ``[1, H, T, C]`` masses, ``[1, T]`` classes and query rows of a packed row as a padded batch of
    its samples (``[N, H, max_len, C]``, ``[N, max_len]``), so per-sample metrics see one sample per row."""
    lengths = [int(n) for n in seq_lengths]
    width = max(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]

    def split(x, dim, fill):
        out = []
        for a, n in zip(starts, lengths):
            piece = x.narrow(dim, a, n)
            shape = list(piece.shape)
            shape[dim] = width - n
            out.append(torch.cat([piece, piece.new_full(shape, fill)], dim))
        return torch.cat(out, 0)

    return [split(m, 2, 0.0) for m in masses], split(classes, 1, OTHER), split(query, 1, False)
