"""Tiny random-weight vision-language models and hand-built inputs, for tests and benchmarks (no download).

Every builder returns ``(model, make_inputs)``: ``make_inputs(rows, *, padding="right"|"left")`` turns a list of
token rows (lists of ids; the image placeholder id expands to the right number of image tokens) into the
keyword arguments of ``model(...)`` / ``model.generate(...)``: ``input_ids``, ``attention_mask``, pixel values
and, for the Qwen family, ``image_grid_thw`` and ``mm_token_type_ids``. The vocabulary layout is shared
(:data:`VOCAB`), so one local tokenizer (:func:`chatml_tokenizer`) serves all Qwen-style models.
"""
from __future__ import annotations

import torch

# token ids shared by the tiny models (small vocabulary, special tokens at the top)
VOCAB_SIZE = 128
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 120, 121, 122, 123, 124, 125, 126
LLAVA_IMAGE = 127
NEWLINE = 1

TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            pad_token_id=PAD, bos_token_id=IM_START, eos_token_id=IM_END, tie_word_embeddings=False)
HEAD_DIM = 16


def _attn(text, vision):
    return {"text_config": text, "vision_config": vision}


def qwen2_vl(attn="sdpa", layers=2, seed=0, vision_attn="sdpa", **text_overrides):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(TEXT, num_hidden_layers=layers, **text_overrides)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = Qwen2VLConfig(text_config=text,
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4,
                                           spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2),
                        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                        vision_end_token_id=VISION_END, tie_word_embeddings=False)
    return _build(Qwen2VLForConditionalGeneration, cfg, attn, vision_attn, seed, "qwen")


def qwen2_5_vl(attn="sdpa", layers=2, seed=0, vision_attn="sdpa", **text_overrides):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(TEXT, num_hidden_layers=layers, **text_overrides)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    cfg = Qwen2_5_VLConfig(text_config=text,
                           vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2,
                                              intermediate_size=64, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
                           image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END, tie_word_embeddings=False)
    return _build(Qwen2_5_VLForConditionalGeneration, cfg, attn, vision_attn, seed, "qwen")


def qwen3_vl(attn="sdpa", layers=2, seed=0, vision_attn="sdpa", **text_overrides):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(TEXT, num_hidden_layers=layers, head_dim=HEAD_DIM, **text_overrides)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                               "mrope_interleaved": True}
    cfg = Qwen3VLConfig(text_config=text,
                        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2,
                                           intermediate_size=64, patch_size=4, spatial_merge_size=2,
                                           temporal_patch_size=2, num_position_embeddings=16,
                                           deepstack_visual_indexes=[0]),
                        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                        vision_end_token_id=VISION_END, tie_word_embeddings=False)
    return _build(Qwen3VLForConditionalGeneration, cfg, attn, vision_attn, seed, "qwen")


def llava(attn="sdpa", layers=2, seed=0, vision_attn="sdpa", text_model="llama", **text_overrides):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = dict(TEXT, num_hidden_layers=layers, model_type=text_model, **text_overrides)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16,
                      tie_word_embeddings=False)
    return _build(LlavaForConditionalGeneration, cfg, attn, vision_attn, seed, "llava")


BUILDERS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "llava": llava}


def _build(cls, cfg, attn, vision_attn, seed, family):
    torch.manual_seed(seed)
    impl = attn if isinstance(attn, dict) else _attn(attn, vision_attn)
    model = cls._from_config(cfg, attn_implementation=impl, dtype=torch.float32)
    model.eval()
    return model, _input_maker(model, family)


# ------------------------------------------------------------------------------------------------ inputs

def _input_maker(model, family):
    cfg = model.config
    if family == "qwen":
        vc = cfg.vision_config
        patch, merge, tps = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        grid = (1, 2 * merge, 2 * merge)                      # 16 patches -> 4 image tokens
        n_img_tokens = grid[0] * grid[1] * grid[2] // merge ** 2
        patch_dim = vc.in_channels * tps * patch * patch
        image_id = cfg.image_token_id
    else:
        vc = cfg.vision_config
        n_img_tokens = (vc.image_size // vc.patch_size) ** 2
        image_id = cfg.image_token_index

    def make_inputs(rows, *, padding="right", seed=0):
        """rows: lists of ids; one ``image_id`` entry stands for a whole image (expanded here)."""
        g = torch.Generator().manual_seed(seed)
        expanded, n_images = [], 0
        for r in rows:
            out = []
            for t in r:
                if t == image_id:
                    out += [image_id] * n_img_tokens
                    n_images += 1
                else:
                    out.append(t)
            expanded.append(out)
        width = max(len(r) for r in expanded)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(expanded):
            sl = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        kw = {"input_ids": ids, "attention_mask": mask}
        if n_images:
            if family == "qwen":
                kw["pixel_values"] = torch.randn(n_images * grid[0] * grid[1] * grid[2], patch_dim, generator=g)
                kw["image_grid_thw"] = torch.tensor([grid] * n_images)
            else:
                kw["pixel_values"] = torch.randn(n_images, vc.num_channels, vc.image_size, vc.image_size, generator=g)
        if family == "qwen":
            kw["mm_token_type_ids"] = (ids == image_id).long() + 2 * (ids == VIDEO_PAD).long()
        return kw

    make_inputs.image_id = image_id
    make_inputs.n_image_tokens = n_img_tokens
    return make_inputs


def chatml_tokenizer(image_token="<|image_pad|>"):
    """A local word-level tokenizer over :data:`VOCAB` with the Qwen chat-template special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "\n": NEWLINE}
    words = ["system", "user", "assistant", "You", "are", "a", "helpful", "What", "is", "this", "?", "A", "cat",
             "dog", "and", "the", "Describe", "image", "It", "USER:", "ASSISTANT:", "chat", "between", "human", ".", "US", "ER", ":", "ASSIST", "ANT"]
    for w in words:
        vocab[w] = len(vocab)
    specials = {"<|endoftext|>": PAD, "<|im_start|>": IM_START, "<|im_end|>": IM_END,
                "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END, image_token: IMAGE_PAD,
                "<|video_pad|>": VIDEO_PAD, "<image>": LLAVA_IMAGE, "<s>": 118, "</s>": 119}
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>",
                                   bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in
                                                           ("<|endoftext|>", "<s>", "</s>")]})
    return fast
