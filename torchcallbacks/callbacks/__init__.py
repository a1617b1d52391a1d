"""Every callback, one module each; `LoopState`, the owner of the training state, and the functional
`save_checkpoint` / `load_checkpoint` built on it."""

from torchcallbacks.callbacks.backup_and_restore import BackupAndRestore
from torchcallbacks.callbacks.callback import Callback, LoopState
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.callbacks.checkpoint_functions import load_checkpoint, save_checkpoint
from torchcallbacks.callbacks.csv_logger import CSVLogger
from torchcallbacks.callbacks.early_stopping import EarlyStopping
from torchcallbacks.callbacks.history import History
from torchcallbacks.callbacks.lambda_callback import LambdaCallback
from torchcallbacks.callbacks.learning_rate_scheduler import LearningRateScheduler
from torchcallbacks.callbacks.mlflow_logger import MLflowLogger
from torchcallbacks.callbacks.model_checkpoint import ModelCheckpoint
from torchcallbacks.callbacks.monitor import MonitorCallback
from torchcallbacks.callbacks.progbar_logger import ProgbarLogger
from torchcallbacks.callbacks.reduce_lr_on_plateau import ReduceLROnPlateau
from torchcallbacks.callbacks.remote_monitor import RemoteMonitor
from torchcallbacks.callbacks.swap_ema_weights import SwapEMAWeights
from torchcallbacks.callbacks.tensorboard import TensorBoard
from torchcallbacks.callbacks.terminate_on_nan import NonFiniteLossError, TerminateOnNaN
from torchcallbacks.callbacks.tracker import TrackerCallback
from torchcallbacks.callbacks.wandb_logger import WandbLogger

__all__ = [
    "BackupAndRestore",
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
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
    "load_checkpoint",
    "save_checkpoint",
]
