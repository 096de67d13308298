"""FLOPs and weight bytes of SD 1.5's parts at 512 px, counted on the meta device (no weights, no compute, no download).

What `benchmarks/results/step.md` uses to say where the official step design's per-step costs (VAE and text
encoding, the reference weight swap) would grow on SD 1.5: counted work, not measured time.
Run: python benchmarks/sd15_flops.py"""
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel


def sd15_parts(device: str = "meta"):
    """SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder built from their published configs (no weights on meta)."""
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    return unet, vae, text


def gflops(fn) -> float:
    """Forward GFLOPs of ``fn()`` as torch's flop counter sees them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    """Print per-image GFLOPs of a UNet forward, a VAE encode and a text encode, and the UNet's fp32 size."""
    unet, vae, text = sd15_parts()
    with torch.device("meta"):
        x_t, t, cond = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
        pixels, ids = torch.randn(1, 3, 512, 512), torch.zeros(1, 77, dtype=torch.long)
    unet_fwd = gflops(lambda: unet(x_t, t, encoder_hidden_states=cond))
    vae_enc = gflops(lambda: vae.encode(pixels))
    text_enc = gflops(lambda: text(ids))
    params = sum(p.numel() for p in unet.parameters())
    step = 4 * unet_fwd  # policy forward + backward (about 2 forwards) + reference forward
    print(f"UNet: {params / 1e6:.1f} M parameters, {params * 4 / 1e9:.2f} GB in fp32")
    print(f"GFLOPs per image: UNet forward {unet_fwd:.0f}, VAE encode {vae_enc:.0f}, text encode {text_enc:.1f}")
    print(f"official step per image: UNet passes ~{step:.0f}, VAE + text {vae_enc + text_enc:.0f} "
          f"({100 * (vae_enc + text_enc) / (step + vae_enc + text_enc):.0f}% of the step's FLOPs)")


if __name__ == "__main__":
    main()
