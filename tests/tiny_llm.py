"""Tiny Qwen-style text encoders' tokenizers and models, all offline (imported by tests as `tiny_llm`): a byte-level BPE
Qwen2TokenizerFast with a chat template of Qwen's shape, and tiny Qwen3 models built from configs."""
from __future__ import annotations

from tiny import WORDS

TOKENS = 64  # the tiny tokenizers' context (model_max_length): the pipelines' 512 capped to it
WIDTH = 16  # hidden size of the tiny encoders
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen3's template for the turns and the generation prompt, with enable_thinking=False's empty think block
QWEN_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def qwen_tokenizer(extra_words: tuple[str, ...] = ()):
    """A byte-level BPE Qwen2TokenizerFast: every byte a token; each tiny word (after a space) and each of
    ``extra_words`` one merged token."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in ["user", "assistant", "system", *extra_words] + ["\u0120" + w for w in WORDS]:  # \u0120: a space
        pieces = list(word)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return Qwen2TokenizerFast(vocab=vocab, merges=list(dict.fromkeys(merges)), unk_token=None, bos_token=None,
                              eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIAL,
                              model_max_length=TOKENS, chat_template=QWEN_TEMPLATE)


def qwen3(tokenizer, layers: int = 2, cls_name: str = "Qwen3Model"):
    """A tiny Qwen3 (``cls_name``: Qwen3Model or Qwen3ForCausalLM) of width WIDTH."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=8, max_position_embeddings=TOKENS, tie_word_embeddings=True,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return getattr(transformers, cls_name)(config)


def qwen25_vl(tokenizer):
    """A tiny Qwen2_5_VLForConditionalGeneration: 2 text layers of width WIDTH (multimodal RoPE) and a one-block
    vision tower, as Qwen-Image's text encoder."""
    import torch
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=True,
                bos_token_id=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=WIDTH, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=16)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>")))
