"""Every callback, one module each."""

from torchcallbacks.callbacks.backup_and_restore import BackupAndRestore
from torchcallbacks.callbacks.callback import Callback, LoopState
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.callbacks.csv_logger import CSVLogger
from torchcallbacks.callbacks.history import History
from torchcallbacks.callbacks.lambda_callback import LambdaCallback
from torchcallbacks.callbacks.model_checkpoint import ModelCheckpoint
from torchcallbacks.callbacks.monitor import MonitorCallback
from torchcallbacks.callbacks.progbar_logger import ProgbarLogger
from torchcallbacks.callbacks.remote_monitor import RemoteMonitor
from torchcallbacks.callbacks.tensorboard import TensorBoard

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "History",
    "LambdaCallback",
    "LoopState",
    "ModelCheckpoint",
    "MonitorCallback",
    "ProgbarLogger",
    "RemoteMonitor",
    "TensorBoard",
]
