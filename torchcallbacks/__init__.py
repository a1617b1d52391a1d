"""Keras-style training callbacks for plain PyTorch.

`fit`, `evaluate` and `predict` run a `torch.nn.Module` with Keras' callback hooks, and the same
callback objects work in a hand-written loop through `CallbackList`.
"""

from torchcallbacks.callbacks import (
    Callback,
    CallbackList,
    History,
    LambdaCallback,
    LoopState,
    MonitorCallback,
    ProgbarLogger,
)
from torchcallbacks.training import evaluate, fit, predict

__version__ = "0.1.0"

__all__ = [
    "Callback",
    "CallbackList",
    "History",
    "LambdaCallback",
    "LoopState",
    "MonitorCallback",
    "ProgbarLogger",
    "__version__",
    "evaluate",
    "fit",
    "predict",
]
