"""Per-token classes from a VLM chat template.

Classes (``avar_kernels``): 0 OTHER (template, padding), 1 IMAGE, 2 SYSTEM, 3 USER, 4 RESPONSE, 5 VIDEO.

Two template families are recognised (``template=`` forces one; by default ChatML when the tokenizer knows
``<|im_start|>``, LLaVA-1.5 otherwise):

``"chatml"`` -- Qwen2-VL, Qwen2.5-VL, Qwen3-VL, and LLaVA-NeXT / LLaVA-OneVision with a Qwen2 LM::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>What is this?<|im_end|>\\n
    <|im_start|>assistant\\nA cat.<|im_end|>\\n

  ``<|im_start|>``, the role header up to and including its newline, ``<|im_end|>`` and everything outside a
  turn are OTHER; the content of a turn gets its role's class (system 2, user 3, assistant 4; other roles 0);
  ``<|vision_start|>``/``<|vision_end|>`` (and ``<|vision_pad|>``) are OTHER; image tokens (``<|image_pad|>``,
  ``<image>``) are IMAGE and video tokens (``<|video_pad|>``, ``<video>``) VIDEO wherever they are.

``"llava"`` -- LLaVA-1.5 (``llava-hf/llava-1.5-*``)::

    <s>[system prompt] USER: <image>\\nWhat is this? ASSISTANT: A cat.</s>USER: ... ASSISTANT:

  ``<s>`` starts a conversation; text before the first ``USER:`` is SYSTEM; the tokens that spell ``USER:`` /
  ``ASSISTANT:`` are OTHER; then USER content, resp. RESPONSE content up to ``</s>`` (OTHER); ``<image>`` is
  IMAGE (its id from the tokenizer or ``image_token_id``, e.g. ``config.image_token_index``).

In both, padding (``pad_token_id`` or ``attention_mask == 0``) is OTHER, and a row may hold several
conversations (packed rows): each ``<|im_start|>`` / ``<s>`` restarts the state machine.

With ``labels`` (same positions as ``input_ids``, -100 = ignored), RESPONSE is exactly where ``labels != -100``
(image/video tokens keep their class); assistant content that is not trained on becomes OTHER.
"""
from __future__ import annotations

import torch

from avar_kernels import IMAGE, OTHER, RESPONSE, SYSTEM, USER, VIDEO

ROLE_CLASS = {"system": SYSTEM, "user": USER, "assistant": RESPONSE}
IMAGE_TOKENS = ("<|image_pad|>", "<image>")
VIDEO_TOKENS = ("<|video_pad|>", "<video>")
CHATML_OTHER = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def _tokenizer(p):
    return getattr(p, "tokenizer", p)


def _ids_of(tok, tokens):
    out = set()
    vocab = tok.get_vocab()
    for t in tokens:
        if t in vocab:
            out.add(vocab[t])
    return out


class _Texts:
    """Cached text of single tokens (sentencepiece / byte-level markers resolved)."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def __call__(self, i):
        s = self.cache.get(i)
        if s is None:
            t = self.tok.convert_ids_to_tokens(int(i))
            try:
                s = self.tok.convert_tokens_to_string([t])
            except Exception:  # noqa: BLE001 - some tokenizers cannot render a lone piece
                s = t
            if t and t.startswith("\u2581") and not s.startswith(" "):
                s = " " + s          # sentencepiece word start
            self.cache[i] = s = s if s is not None else ""
        return s


def token_classes(input_ids, processor_or_tokenizer, *, labels=None, attention_mask=None, template=None,
                  image_token_id=None, video_token_id=None) -> torch.Tensor:
    """int64 ``[B, S]`` classes of ``input_ids`` (``[B, S]`` or ``[S]``); see the module docstring.

    Args:
        processor_or_tokenizer: a processor (its ``.tokenizer`` is used) or a tokenizer.
        labels: optional ``[B, S]``; RESPONSE becomes exactly ``labels != -100``.
        attention_mask: optional ``[B, S]``; positions with 0 are OTHER.
        template: ``"chatml"`` or ``"llava"``; default from the tokenizer's special tokens.
        image_token_id / video_token_id: extra ids of image / video placeholder tokens (e.g.
            ``config.image_token_index`` for LLaVA, ``config.image_token_id`` for Qwen).
    """
    tok = _tokenizer(processor_or_tokenizer)
    ids = torch.as_tensor(input_ids)
    squeeze = ids.dim() == 1
    if squeeze:
        ids = ids[None]
    vocab = tok.get_vocab()
    if template is None:
        template = "chatml" if "<|im_start|>" in vocab else "llava"
    if template not in ("chatml", "llava"):
        raise ValueError(f"token_classes: template must be 'chatml' or 'llava', got {template!r}")
    image_ids = _ids_of(tok, IMAGE_TOKENS) | ({int(image_token_id)} if image_token_id is not None else set())
    video_ids = _ids_of(tok, VIDEO_TOKENS) | ({int(video_token_id)} if video_token_id is not None else set())
    pad_id = tok.pad_token_id
    texts = _Texts(tok)
    rows = ids.tolist()
    if template == "chatml":
        out = [_chatml_row(r, tok, texts, image_ids, video_ids) for r in rows]
    else:
        out = [_llava_row(r, tok, texts, image_ids, video_ids) for r in rows]
    cls = torch.tensor(out, dtype=torch.long).reshape(ids.shape)
    if pad_id is not None:
        cls[ids == pad_id] = OTHER
    if attention_mask is not None:
        am = torch.as_tensor(attention_mask).reshape(ids.shape)
        cls[am == 0] = OTHER
    if labels is not None:
        lab = torch.as_tensor(labels).reshape(ids.shape)
        cls[cls == RESPONSE] = OTHER
        media = (cls == IMAGE) | (cls == VIDEO)
        cls[(lab != -100) & ~media] = RESPONSE
    cls = cls.to(ids.device)
    return cls[0] if squeeze else cls


def _media(t, image_ids, video_ids):
    if t in image_ids:
        return IMAGE
    if t in video_ids:
        return VIDEO
    return None


def _chatml_row(row, tok, texts, image_ids, video_ids):
    start = _ids_of(tok, ["<|im_start|>"])
    end = _ids_of(tok, ["<|im_end|>"])
    other = _ids_of(tok, CHATML_OTHER)
    out = []
    role_cls = None          # None: outside a turn
    header = None            # accumulating role header text, or None when in content
    for t in row:
        m = _media(t, image_ids, video_ids)
        if t in start:
            out.append(OTHER)
            header, role_cls = "", None
            continue
        if t in end:
            out.append(OTHER)
            header, role_cls = None, None
            continue
        if header is not None:
            if m is not None:       # a malformed header; never hide media
                out.append(m)
                continue
            out.append(OTHER)
            s = texts(t)
            if "\n" in s:
                header += s.split("\n", 1)[0]
                role_cls = ROLE_CLASS.get(header.strip().lower(), OTHER)
                header = None
            else:
                header += s
            continue
        if m is not None:
            out.append(m)
        elif t in other or role_cls is None:
            out.append(OTHER)
        else:
            out.append(role_cls)
    return out


_LLAVA_MARKERS = (("USER:", USER), ("ASSISTANT:", RESPONSE))


def _llava_row(row, tok, texts, image_ids, video_ids):
    bos = {tok.bos_token_id} - {None}
    eos = {tok.eos_token_id} - {None}
    out = [OTHER] * len(row)
    # character spans of each token in the concatenated text, to find the role markers across token boundaries
    spans, text = [], []
    pos = 0
    for t in row:
        s = "" if (t in bos or t in eos or t in image_ids or t in video_ids) else texts(t)
        spans.append((pos, pos + len(s)))
        text.append(s)
        pos += len(s)
    full = "".join(text)
    marker_at = {}         # token index -> class that starts after the marker ending in this token
    in_marker = set()
    for marker, cls in _LLAVA_MARKERS:
        i = full.find(marker)
        while i >= 0:
            j = i + len(marker)
            toks = [n for n, (a, b) in enumerate(spans) if a < j and b > i]
            in_marker.update(toks)
            if toks:
                marker_at[toks[-1]] = cls
            i = full.find(marker, j)
    state = SYSTEM
    for n, t in enumerate(row):
        m = _media(t, image_ids, video_ids)
        if t in bos:
            state = SYSTEM
            continue
        if t in eos:
            state = OTHER
            continue
        if m is not None:
            out[n] = m
            continue
        if n in in_marker:
            if n in marker_at:
                state = marker_at[n]
            continue
        if not texts(t).strip() and state == SYSTEM:
            continue           # whitespace before anything: template
        out[n] = state
    return out
