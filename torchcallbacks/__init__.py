"""Keras-style training callbacks for plain PyTorch.

`fit`, `evaluate` and `predict` run a `torch.nn.Module` with Keras' callback hooks, and the same
callback objects work in a hand-written loop through `CallbackList`.
"""

from torchcallbacks.callbacks import (
    BackupAndRestore,
    Callback,
    CallbackList,
    CSVLogger,
    EarlyStopping,
    History,
    LambdaCallback,
    LearningRateScheduler,
    LoopState,
    MLflowLogger,
    ModelCheckpoint,
    MonitorCallback,
    NonFiniteLossError,
    ProgbarLogger,
    ReduceLROnPlateau,
    RemoteMonitor,
    SwapEMAWeights,
    TensorBoard,
    TerminateOnNaN,
    TrackerCallback,
    WandbLogger,
    load_checkpoint,
    save_checkpoint,
)
from torchcallbacks.checkpoint import CheckpointError, load_weights, save_weights
from torchcallbacks.training import EpochIterator, evaluate, fit, predict
from torchcallbacks.version import __version__

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "CheckpointError",
    "EarlyStopping",
    "EpochIterator",
    "History",
    "LambdaCallback",
    "LearningRateScheduler",
    "LoopState",
    "MLflowLogger",
    "ModelCheckpoint",
    "MonitorCallback",
    "NonFiniteLossError",
    "ProgbarLogger",
    "ReduceLROnPlateau",
    "RemoteMonitor",
    "SwapEMAWeights",
    "TensorBoard",
    "TerminateOnNaN",
    "TrackerCallback",
    "WandbLogger",
    "__version__",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_weights",
    "predict",
    "save_checkpoint",
    "save_weights",
]
