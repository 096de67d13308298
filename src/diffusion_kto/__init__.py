"""diffusion-kto: align text-to-image diffusion models with like/dislike feedback (Diffusion-KTO, arXiv 2404.04465)."""

__version__ = "0.1.0"
