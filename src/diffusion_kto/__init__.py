"""diffusion-kto: align text-to-image diffusion models with like/dislike feedback (Diffusion-KTO, arXiv 2404.04465).

The public API, imported lazily (``import diffusion_kto`` loads no torch)::

    import diffusion_kto as dk

    cfg = dk.load_config("configs/toy-kto.yaml", ["data.path=runs/demo/feedback/feedback.jsonl",
                                                  "train.output_dir=runs/mine"])
    result = dk.Trainer(cfg).train()          # or trainer.loader() / trainer.step(batch) for your own loop
    losses = dk.kto_loss(policy_err, ref_err, desirable, kl=dk.reference_point(policy_err, ref_err), beta=5000)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "Config": ("config", "Config"),
    "load_config": ("config", "load_config"),
    "ConfigError": ("errors", "ConfigError"),
    "UserError": ("errors", "UserError"),
    "Trainer": ("train", "DiffusionKTOTrainer"),
    "DiffusionKTOTrainer": ("train", "DiffusionKTOTrainer"),
    "TrainResult": ("train", "TrainResult"),
    "Objective": ("objectives", "Objective"),
    "OBJECTIVES": ("objectives", "OBJECTIVES"),
    "build_objective": ("objectives", "build_objective"),
    "kto_loss": ("losses", "kto_loss"),
    "dpo_loss": ("losses", "dpo_loss"),
    "sft_loss": ("losses", "sft_loss"),
    "reference_point": ("losses", "reference_point"),
    "implicit_reward": ("losses", "implicit_reward"),
    "load_family": ("models", "load_family"),
    "read_feedback": ("data", "read_feedback"),
    "load_pipeline": ("sampling", "load_pipeline"),
    "generate": ("sampling", "generate"),
    "EvalSettings": ("evaluation.run", "EvalSettings"),
    "ModelSpec": ("evaluation.run", "ModelSpec"),
    "evaluate": ("evaluation.run", "run_eval"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import a public name on first use."""
    if name not in _API:
        raise AttributeError(f"module 'diffusion_kto' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, for tab completion."""
    return sorted(__all__)
