"""Training: config, schedule, checkpoints and the loop shared by every gradient-trained family."""

from .config import TrainConfig
from .trainer import Trainer, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "TrainResult", "train"]
