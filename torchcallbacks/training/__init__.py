"""The small training loop: `fit`, `evaluate`, `predict`, `EpochIterator` (epochs of batches whose
position is part of the training state, for hand-written loops too), and `verify_resume` (the proof
that a pipeline resumes exactly)."""

from torchcallbacks.training.data import EpochIterator
from torchcallbacks.training.evaluate import evaluate
from torchcallbacks.training.fingerprint import DataOrderWarning
from torchcallbacks.training.fit import fit
from torchcallbacks.training.predict import predict
from torchcallbacks.training.verify import ResumeReport, verify_resume

__all__ = ["DataOrderWarning", "EpochIterator", "ResumeReport", "evaluate", "fit", "predict", "verify_resume"]
