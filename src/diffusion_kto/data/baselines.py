"""Data-side part of the CSFT baseline: prompt prefixes (Diffusion-DPO's pairs live in pairs.py).

CSFT (paper §5, after HPS v1) trains on both classes with the prompt prefixed by a quality phrase and samples
with the "good" phrase."""
from __future__ import annotations

CSFT_PHRASE = {True: "good image", False: "bad image"}


def csft_prompt(prompt: str, desirable: bool = True, position: str = "prefix") -> str:
    """The CSFT conditioning: "good image, <prompt>" for liked rows (and at sampling time), "bad image, ..." else;
    with ``position="suffix"``: "<prompt>, good image"."""
    phrase = CSFT_PHRASE[bool(desirable)]
    return f"{phrase}, {prompt}" if position == "prefix" else f"{prompt}, {phrase}"
