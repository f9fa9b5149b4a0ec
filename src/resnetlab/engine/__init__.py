"""Training engine: optimiser and schedule, the loop, fit(), checkpoints, metrics, DDP helpers."""

from resnetlab.engine.fit import NonFiniteLossError, Result, TrainingError, fit, resume_config
from resnetlab.engine.loop import evaluate, train_one_epoch

__all__ = ["NonFiniteLossError", "Result", "TrainingError", "evaluate", "fit", "resume_config",
           "train_one_epoch"]
