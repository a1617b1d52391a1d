"""Every callback, one module each."""

from torchcallbacks.callbacks.callback import Callback, LoopState
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.callbacks.csv_logger import CSVLogger
from torchcallbacks.callbacks.history import History
from torchcallbacks.callbacks.lambda_callback import LambdaCallback
from torchcallbacks.callbacks.monitor import MonitorCallback
from torchcallbacks.callbacks.progbar_logger import ProgbarLogger
from torchcallbacks.callbacks.remote_monitor import RemoteMonitor
from torchcallbacks.callbacks.tensorboard import TensorBoard

__all__ = [
    "CSVLogger",
    "Callback",
    "CallbackList",
    "History",
    "LambdaCallback",
    "LoopState",
    "MonitorCallback",
    "ProgbarLogger",
    "RemoteMonitor",
    "TensorBoard",
]
