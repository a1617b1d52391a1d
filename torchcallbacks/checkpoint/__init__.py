"""The safetensors checkpoint format (weights-only and full training state) and the atomic / async
writer. Loading never unpickles. See docs/checkpoint-format.md. The functional `save_checkpoint` /
`load_checkpoint` are built on `LoopState`, above this package (`torchcallbacks.callbacks`)."""

from torchcallbacks.checkpoint.errors import CheckpointError, CheckpointWriteError
from torchcallbacks.checkpoint.files import load_weights, read_file, save_weights
from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checkpoint.state_file import TrainingState, read_training_state, write_training_state
from torchcallbacks.checkpoint.writer import CheckpointWriter, atomic_save_file

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "CheckpointWriter",
    "TrainingState",
    "atomic_save_file",
    "capture_rng_state",
    "load_weights",
    "read_file",
    "read_training_state",
    "restore_rng_state",
    "save_weights",
    "write_training_state",
]
