"""Tiny FLUX.2 [dev] and [klein] pipelines built from configs, all offline (imported by tests as `tiny_flux2`).

The published layouts in miniature: Flux2Transformer2DModel (1 double + 1 single block), AutoencoderKLFlux2 (2x2
patches, batch-norm statistics set away from 0 / 1 so that the latent normalisation is seen), a dynamic-shifting
flow-matching Euler scheduler, and the text encoders the pipelines read three hidden layers of: Mistral3 for [dev]
(layers 10, 20, 30: 31 tiny text layers) and Qwen3 for [klein] (layers 9, 18, 27: 28 tiny layers).

Tokenizers are `tokenizers` models built here with a chat template in the real one's shape. [dev]'s is a
WordLevel model over the system message's words and the tiny prompts in a generic PreTrainedTokenizerFast: the real
[dev] tokenizer is a PixtralProcessor, which transformers builds only with torchvision (not installed here: its PyPI
build does not load beside a CPU torch), and Flux2Pipeline only calls its apply_chat_template, which a tokenizer
answers the same way for text-only conversations. [klein]'s is tiny_llm's byte-level BPE Qwen2TokenizerFast, as
published. The transformer's joint_attention_dim is 3 x WIDTH: three stacked hidden layers."""
from __future__ import annotations

import re
from pathlib import Path

from tiny import WORDS
from tiny_llm import TOKENS, WIDTH, qwen3, qwen_tokenizer

MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
# the Mistral Small 3.1 chat template's text path: bos, [SYSTEM_PROMPT]...[/SYSTEM_PROMPT], [INST]...[/INST]
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}{%- else %}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{%- endif %}{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- else %}{{- text + eos_token }}"
    "{%- endif %}{%- endfor %}")


def mistral_tokenizer():
    """A WordLevel tokenizer over FLUX.2's system message and the tiny words, with Mistral's special tokens."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"\w+|[^\w\s]+", SYSTEM_MESSAGE) + WORDS
    vocab = {token: i for i, token in enumerate(dict.fromkeys(MISTRAL_SPECIAL + words))}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=MISTRAL_SPECIAL[4:],
                                   model_max_length=TOKENS, chat_template=MISTRAL_TEMPLATE)


def _mistral3(tokenizer):
    """A Mistral3ForConditionalGeneration: 31 text layers of width WIDTH and a one-layer Pixtral vision tower."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32,
                num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=TOKENS, sliding_window=None, bos_token_id=ids("<s>"),
                eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"))
    vision = dict(model_type="pixtral", hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=16, patch_size=4, num_channels=3)
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           image_token_index=ids("[IMG]"), spatial_merge_size=2,
                                                           vision_feature_layer=-1))


def _parts(guidance: bool) -> dict:
    """The transformer, VAE and scheduler both tiny FLUX.2 pipelines share (the transformer with or without a
    guidance embedding)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=3 * WIDTH, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(  # 16x16 RGB <-> 8x8x4, patchified to 4x4x16
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, patch_size=(2, 2))
    generator = torch.Generator().manual_seed(0)
    vae.bn.running_mean.copy_(0.2 * torch.randn(16, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(16, generator=generator))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


def build_tiny_flux2(folder: Path) -> Path:
    """Save a tiny Flux2Pipeline ([dev]: Mistral3 text encoder, a guidance embedding; random weights, 16x16 images)."""
    from diffusers import Flux2Pipeline

    tokenizer = mistral_tokenizer()
    pipe = Flux2Pipeline(text_encoder=_mistral3(tokenizer), tokenizer=tokenizer, **_parts(guidance=True))
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_tiny_flux2_klein(folder: Path, *, distilled: bool = True) -> Path:
    """Save a tiny Flux2KleinPipeline ([klein]: Qwen3 text encoder, no guidance embedding; step-distilled like
    FLUX.2 [klein] 4B / 9B, or not like their base models)."""
    from diffusers import Flux2KleinPipeline

    tokenizer = qwen_tokenizer()
    pipe = Flux2KleinPipeline(text_encoder=qwen3(tokenizer, layers=28, cls_name="Qwen3ForCausalLM"), tokenizer=tokenizer, is_distilled=distilled,
                              **_parts(guidance=False))
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"
