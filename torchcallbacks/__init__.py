"""Keras-style training callbacks for plain PyTorch.

`fit`, `evaluate` and `predict` run a `torch.nn.Module` with Keras' callback hooks, and the same
callback objects work in a hand-written loop through `CallbackList`.
"""

from typing import TYPE_CHECKING, Any

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
from torchcallbacks.checkpoint import CheckpointError, CheckpointWriteError, load_weights, save_weights
from torchcallbacks.training import (
    DataOrderWarning,
    EpochIterator,
    ResumeReport,
    evaluate,
    fit,
    predict,
    verify_resume,
)
from torchcallbacks.version import __version__

if TYPE_CHECKING:
    from torchcallbacks.checkpoint.sharded import export_full_weights


def __getattr__(name: str) -> Any:
    # export_full_weights lives with the FSDP2 code, which imports torch.distributed.checkpoint:
    # imported on first use, so `import torchcallbacks` stays light.
    if name == "export_full_weights":
        from torchcallbacks.checkpoint.sharded import export_full_weights

        return export_full_weights
    raise AttributeError(f"module 'torchcallbacks' has no attribute {name!r}")

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "CheckpointError",
    "CheckpointWriteError",
    "DataOrderWarning",
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
    "ResumeReport",
    "SwapEMAWeights",
    "TensorBoard",
    "TerminateOnNaN",
    "TrackerCallback",
    "WandbLogger",
    "__version__",
    "evaluate",
    "export_full_weights",
    "fit",
    "load_checkpoint",
    "load_weights",
    "predict",
    "save_checkpoint",
    "save_weights",
    "verify_resume",
]
