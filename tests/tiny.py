"""Tiny Stable Diffusion (1.x-style and XL) pipelines built from configs and tiny feedback datasets, all offline (imported by tests as `tiny`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


WORDS = ["a", "red", "green", "blue", "circle", "square", "photo", "of"]


def write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer whose vocabulary is a handful of whole words (transformers tokenizer-test idiom)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for w in WORDS for c in w})
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars] + [w + "</w>" for w in WORDS]
    merges = ["#version: 0.2"]
    for word in WORDS:  # merge characters left to right into the whole word
        pieces = list(word)
        pieces[-1] += "</w>"
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("\n".join(dict.fromkeys(merges)) + "\n")


def build_tiny_sd(folder: Path, *, prediction_type: str = "epsilon") -> Path:
    """Save a tiny StableDiffusionPipeline (random weights, 16x16 images) with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tiny_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=16,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=len(json.loads((folder / "_tok" / "vocab.json").read_text())), max_position_embeddings=8,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_tiny_sdxl(folder: Path, *, prediction_type: str = "epsilon") -> Path:
    """Save a tiny StableDiffusionXLPipeline (random weights, 16x16 images) with save_pretrained: SDXL's layout in
    miniature -- two CLIP text encoders (the second with a projection), a text_time UNet (DownBlock2D then
    cross-attention, as SDXL starts; 1 layer per block where SDXL has 2, to keep tests fast: the naming of SDXL's own
    layout is checked on its real config in test_export.py), an Euler scheduler as SDXL ships, and SDXL's latent scale."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"), model_max_length=8)
    vocab = len(json.loads((folder / "_tok" / "vocab.json").read_text()))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=vocab,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32, norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16,  # 6 time ids x 4 + text_encoder_2's projection (16)
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=16, scaling_factor=0.13025,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=16))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=100, prediction_type=prediction_type,
                                       beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def write_feedback(folder: Path, n: int = 8, *, size: int = 16, sizes: list[tuple[int, int]] | None = None) -> Path:
    """Solid-colour PNGs with prompts and alternating like/dislike labels, as JSONL with relative paths; image i is
    size x size, or sizes[i % len(sizes)] (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = list(colours)[i % 3]
        width, height = sizes[i % len(sizes)] if sizes else (size, size)
        arr = np.clip(np.array(colours[name]) + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        shape = "circle" if i % 2 else "square"
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": f"a {name} {shape}", "label": i % 2 == 0}))
    path = folder / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(pipe: Path, data: Path, out: Path, **extra) -> list[str]:
    """Config overrides for a seconds-long run on the tiny pipeline."""
    base = {
        "model.pretrained": str(pipe), "data.path": str(data), "data.resolution": 16, "train.output_dir": str(out),
        "train.max_steps": 3, "train.batch_size": 4, "train.checkpoint_every": 0, "log.every": 1,
        "optim.lr": 1e-3, "optim.warmup_steps": 0, "loss.beta": 100.0, "data.caption_dropout": 0.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


BAD_ROW_COUNTS = {"missing image": 1, "unreadable image": 1, "unknown label": 1, "empty prompt": 1}


def write_bad_feedback(folder: Path, n: int = 12) -> Path:
    """write_feedback's rows with one bad row of each kind in lines 2-5: missing image, unreadable image, unknown
    label, empty prompt (n=12 leaves 4 liked and 4 disliked good rows)."""
    path = write_feedback(folder, n)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    (folder / records[1]["image"]).unlink()
    (folder / records[2]["image"]).write_bytes(b"not a png")
    records[3]["label"] = "maybe"
    records[4]["prompt"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def logged_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl without data_wait_ms, the one wall-clock metric (differs run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k != "data_wait_ms"} for line in path.read_text().splitlines()]
