"""The small training loop: `fit`, `evaluate`, `predict`, and `EpochIterator` (epochs of batches whose
position is part of the training state, for hand-written loops too)."""

from torchcallbacks.training.data import EpochIterator
from torchcallbacks.training.evaluate import evaluate
from torchcallbacks.training.fit import fit
from torchcallbacks.training.predict import predict

__all__ = ["EpochIterator", "evaluate", "fit", "predict"]
