"""The query rows Q of the attention-guided SFT loss, from the token classes of a chat-template sequence.

Two definitions (docs/training.md compares them):

* ``"turn"`` (the default, the set the published AVAR code uses): every position from the first token of the first
  user turn up to, not including, the first trained response token. In ChatML that starts at the user turn's
  ``<|im_start|>`` and takes its role header, the vision markers, the image rows, the text and the assistant
  header; in LLaVA-1.5 it starts at the ``USER:`` marker. The published code finds the user turn with a
  character-offset estimate; here it comes from the template's tokens, exactly.
* ``"user_text"``: only the rows of the user's text (class USER).
"""
from __future__ import annotations

import torch

from avar_kernels.types import IMAGE, OTHER, RESPONSE, USER, VIDEO

QUERY_SETS = ("turn", "user_text")


def query_mask(input_ids, token_classes, tokenizer, *, labels=None, attention_mask=None, query_set="turn",
               template=None):
    """bool ``[B, S]``: the query rows of each row of ``input_ids`` (one conversation per row).

    Args:
        input_ids, token_classes: ``[B, S]`` (``token_classes`` from :func:`avar_kernels.hf.token_classes`).
        tokenizer: the tokenizer (or a processor with ``.tokenizer``) of the chat template.
        labels: optional ``[B, S]`` (-100 = not trained): the response starts at the first trained token; without
            labels at the first RESPONSE token; a row without a response runs to its last real token.
        attention_mask: optional ``[B, S]``; padding is never a query row.
        query_set: ``"turn"`` or ``"user_text"`` (see the module doc).
        template: ``"chatml"`` or ``"llava"``; by default ChatML when the tokenizer knows ``<|im_start|>``, as in
            :func:`avar_kernels.hf.token_classes`.
    """
    if query_set not in QUERY_SETS:
        raise ValueError(f"query_mask: query_set must be one of {QUERY_SETS}, got {query_set!r}")
    classes = torch.as_tensor(token_classes)
    ids = torch.as_tensor(input_ids)
    if classes.dim() == 1:
        classes, ids = classes[None], ids[None]
        labels = None if labels is None else torch.as_tensor(labels)[None]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask)[None]
    if ids.shape != classes.shape:
        raise ValueError(f"query_mask: input_ids {tuple(ids.shape)} and token_classes {tuple(classes.shape)} differ")
    valid = torch.ones_like(classes, dtype=torch.bool) if attention_mask is None else torch.as_tensor(
        attention_mask).to(classes.device).bool()
    if query_set == "user_text":
        return (classes == USER) & valid
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if template is None:
        template = "chatml" if "<|im_start|>" in tok.get_vocab() else "llava"
    if template not in ("chatml", "llava"):
        raise ValueError(f"query_mask: template must be 'chatml' or 'llava', got {template!r}")
    turn_start = tok.convert_tokens_to_ids("<|im_start|>") if template == "chatml" else None
    stops = {t for t in (tok.bos_token_id, tok.pad_token_id) if t is not None}
    if labels is not None:
        trained = torch.as_tensor(labels).to(classes.device) != -100
    else:
        trained = classes == RESPONSE
    out = torch.zeros_like(classes, dtype=torch.bool)
    cls_rows, id_rows, trained_rows, valid_rows = classes.tolist(), ids.tolist(), trained.tolist(), valid.tolist()
    for b, (cls, row) in enumerate(zip(cls_rows, id_rows)):
        first = next((i for i, c in enumerate(cls) if c in (USER, IMAGE, VIDEO) and valid_rows[b][i]), None)
        if first is None:
            continue
        start = first
        if turn_start is not None:          # ChatML: back to the <|im_start|> of this turn
            while start > 0 and row[start] != turn_start:
                start -= 1
        else:                               # LLaVA: back over the role marker (template tokens)
            while start > 0 and cls[start - 1] == OTHER and row[start - 1] not in stops and valid_rows[b][start - 1]:
                start -= 1
        end = next((i for i in range(first, len(row)) if trained_rows[b][i]), None)
        if end is None:
            end = max(i for i in range(len(row)) if valid_rows[b][i]) + 1
        out[b, start:end] = True
    return out & valid
