"""Training: the accelerate loop and crash-safe checkpoints."""
from .trainer import DiffusionKTOTrainer, StepOutput, TrainResult, check_output_dir, load_feedback

__all__ = ["DiffusionKTOTrainer", "StepOutput", "TrainResult", "check_output_dir", "load_feedback"]
