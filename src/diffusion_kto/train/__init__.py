"""Training: the accelerate loop and crash-safe checkpoints."""
from .inputs import load_feedback
from .trainer import DiffusionKTOTrainer, StepOutput, TrainResult, check_output_dir

__all__ = ["DiffusionKTOTrainer", "StepOutput", "TrainResult", "check_output_dir", "load_feedback"]
