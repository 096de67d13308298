"""Pipeline loading and seeded generation (diffusion_kto.sampling) on the shipped toy model."""
import warnings

import torch

from diffusion_kto.sampling import dtype_kwarg, generate, load_pipeline


def test_dtype_kwarg_follows_the_diffusers_release():
    assert dtype_kwarg(torch.float16, "0.39.0") == {"torch_dtype": torch.float16}
    assert dtype_kwarg(torch.float16, "0.40.0") == {"dtype": torch.float16}
    assert dtype_kwarg(torch.float16, "0.42.1.dev0") == {"dtype": torch.float16}


def test_load_pipeline_gives_the_dtype_without_deprecation_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline("toy", device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


def test_generate_depends_only_on_prompt_and_seed():
    pipe = load_pipeline("toy", device="cpu")
    prompts = ["a red circle on black", "a red square"]
    together = generate(pipe, prompts, [7, 8], steps=4, guidance=3.0, resolution=32, batch_size=2)
    alone = generate(pipe, prompts[1:], [8], steps=4, guidance=3.0, resolution=32)
    a, b = (torch.tensor(list(im.getdata()), dtype=torch.int16) for im in (together[1], alone[0]))
    assert (a - b).abs().max() <= 2  # batched and single convolutions may differ in the last bits
