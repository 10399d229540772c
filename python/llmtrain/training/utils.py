"""The documented helper API: `from llmtrain.training.utils import TrainingLogger, load_checkpoint, compute_perplexity`."""

from llmtrain.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from llmtrain.training.logger import TrainingLogger, compute_perplexity

__all__ = ["CheckpointError", "TrainingLogger", "compute_perplexity", "load_checkpoint", "save_checkpoint"]
