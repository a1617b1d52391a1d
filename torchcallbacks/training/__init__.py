"""The small training loop: `fit`, `evaluate`, `predict`."""

from torchcallbacks.training.evaluate import evaluate
from torchcallbacks.training.fit import fit
from torchcallbacks.training.predict import predict

__all__ = ["evaluate", "fit", "predict"]
