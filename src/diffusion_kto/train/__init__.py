"""Training: the loop (:mod:`.trainer`), crash-safe checkpoints, distributed plumbing, metrics and `dkto cache`."""
from .inputs import load_feedback
from .metrics import TrainResult
from .trainer import DiffusionKTOTrainer, StepOutput, check_output_dir

__all__ = ["DiffusionKTOTrainer", "StepOutput", "TrainResult", "check_output_dir", "load_feedback"]
