"""Keras-style training callbacks for plain PyTorch.

`fit`, `evaluate` and `predict` run a `torch.nn.Module` with Keras' callback hooks, and the same
callback objects work in a hand-written loop through `CallbackList`.
"""

from torchcallbacks.callbacks import (
    Callback,
    CallbackList,
    CSVLogger,
    EarlyStopping,
    History,
    LambdaCallback,
    LearningRateScheduler,
    LoopState,
    MonitorCallback,
    NonFiniteLossError,
    ProgbarLogger,
    ReduceLROnPlateau,
    RemoteMonitor,
    SwapEMAWeights,
    TensorBoard,
    TerminateOnNaN,
)
from torchcallbacks.training import evaluate, fit, predict

__version__ = "0.1.0"

__all__ = [
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "LearningRateScheduler",
    "LoopState",
    "MonitorCallback",
    "NonFiniteLossError",
    "ProgbarLogger",
    "ReduceLROnPlateau",
    "RemoteMonitor",
    "SwapEMAWeights",
    "TensorBoard",
    "TerminateOnNaN",
    "__version__",
    "evaluate",
    "fit",
    "predict",
]
