"""What `verify_resume` records of a run at every training step, and how it interrupts one.

`StepRecorder` keeps, for each global step, digests (BLAKE2b of the bytes) of what that step saw and
left behind: the model's inputs (a forward pre-hook: the batch after the loader's augmentation),
the model's weights and buffers, each optimizer state entry, the global random states, and every
plain-data attribute of each callback. Two runs of the same pipeline are compared step by step
through them, so that the first step at which they part is known, and what parted first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.checkpoint.rng import capture_rng_state
from torchcallbacks.distributed import unwrap_model

#: Attributes of every callback that are the loop's handles, not its state.
_HANDLES = frozenset({"params", "optimizer", "optimizers", "loop", "model"})


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, leaf) of a tree of dicts, lists and tuples."""
    if isinstance(value, Mapping):
        for key in value:
            yield from _leaves(value[key], f"{path}/{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}" if path else str(i))
    else:
        yield path, value


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        full = getattr(tensor, "full_tensor", None)  # a DTensor: its whole value
        tensor = (full() if callable(full) else tensor).cpu().contiguous()
        hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        hasher.update(f"{value.dtype}{value.shape}".encode())
        hasher.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, float) and math.isnan(value):
        hasher.update(b"nan")
    else:
        hasher.update(repr(value).encode())


def digest(value: Any) -> str:
    """A short digest of a tree of tensors, arrays and plain values (equal trees, equal digests).

    Args:
        value: tensors, numpy arrays, numbers, strings, or dicts / lists / tuples of them.

    Example:

    ```python
    digest(model.state_dict()) == digest(other.state_dict())  # bitwise the same weights
    ```
    """
    hasher = hashlib.blake2b(digest_size=12)
    for path, leaf in _leaves(value, ""):
        hasher.update(path.encode())
        _feed(hasher, leaf)
    return hasher.hexdigest()


def _plain(value: Any) -> bool:
    """Data a callback's state is made of (not a handle, a file or a function)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, np.ndarray, np.generic)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def callback_attributes(callback: Callback) -> dict[str, str]:
    """Digests of a callback's public plain-data attributes, by name (handles, `_private` ones — a
    warning already given, a cache — and its `transient_attributes` left out)."""
    skipped = _HANDLES | callback.transient_attributes
    return {
        name: digest(value)
        for name, value in vars(callback).items()
        if not name.startswith("_") and name not in skipped and _plain(value)
    }


@dataclass
class Step:
    """What one training step saw and left (digests), and where it was."""

    epoch: int
    batch: int
    inputs: list[str] = field(default_factory=list)
    model: dict[str, str] = field(default_factory=dict)
    optimizers: dict[str, str] = field(default_factory=dict)
    rng: dict[str, str] = field(default_factory=dict)
    callbacks: dict[str, dict[str, str]] = field(default_factory=dict)


class StepRecorder(Callback):
    """Records a `Step` at every training batch end, after every other callback's update.

    Args:
        watched: the user's callbacks, whose attributes are recorded (by their position in the list).
    """

    dispatch_order = 10  # after every callback of ours (BackupAndRestore's save included)
    stops_in_sync = True  # it never stops training

    def __init__(self, watched: list[Callback], stream: str | None = None) -> None:
        super().__init__()
        self.watched = list(watched)
        self.stream = stream  # a file each record is appended to as a JSON line, flushed: read by a parent process
        self.steps: dict[int, Step] = {}  # by global step
        self.epoch_ends: dict[int, Step] = {}  # after each epoch's end (and its backup), by epoch
        self.restored: Step | None = None  # right after a resume's restore phase
        self.saved_keys: dict[str, set[str]] = {}  # the keys of each watched callback's state_dict
        self.epoch_logs: dict[int, dict[str, float]] = {}
        self.final: dict[str, str] = {}
        self._inputs: list[str] = []
        self._hook: Any = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        model = self.model
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        if self.loop.resumed:  # after the restore phase and every other callback's on_train_begin
            self.restored = self._snapshot(self.loop.epoch, -1)
        self.saved_keys = {_name(i, c): _state_keys(c) for i, c in enumerate(self.watched)}
        self._emit("saved_keys", 0, {k: sorted(v) for k, v in self.saved_keys.items()})

    @classmethod
    def read_stream(cls, path: str) -> StepRecorder:
        """The records a `StepRecorder(stream=path)` of another process wrote (up to a kill)."""
        recorder = cls([])
        with open(path, encoding="utf-8") as file:
            for line in file:
                if not line.endswith("\n"):
                    break  # the line a kill cut short
                kind, key, value = json.loads(line)
                if kind == "step":
                    recorder.steps[key] = Step(**value)
                elif kind == "epoch_end":
                    recorder.epoch_ends[key] = Step(**value)
                elif kind == "logs":
                    recorder.epoch_logs[key] = value
                else:
                    recorder.saved_keys = {k: set(v) for k, v in value.items()}
        return recorder

    def _record_inputs(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if module.training:
            self._inputs.append(digest([args, kwargs]))

    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        self._inputs = []

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self.steps[self.loop.global_step] = self._snapshot(self.loop.epoch, batch, self._inputs)
        self._emit("step", self.loop.global_step, self.steps[self.loop.global_step])

    def _emit(self, kind: str, key: int, value: Any) -> None:
        if self.stream is not None:
            with open(self.stream, "a", encoding="utf-8") as file:
                file.write(json.dumps([kind, key, asdict(value) if isinstance(value, Step) else value]) + "\n")
                file.flush()

    def _snapshot(self, epoch: int, batch: int, inputs: list[str] | None = None) -> Step:
        model = unwrap_model(self.model) if self.model is not None else None
        step = Step(epoch, batch, inputs=list(inputs or []))
        if model is not None:
            step.model = {name: digest(value) for name, value in model.state_dict().items()}
        for i, optimizer in enumerate(self.optimizers):
            state = optimizer.state_dict()
            step.optimizers.update({f"optimizers/{i}/{path}": digest(leaf) for path, leaf in _leaves(state, "")})
        step.rng = {name: digest(value) for name, value in capture_rng_state().items()}
        step.callbacks = {_name(i, c): callback_attributes(c) for i, c in enumerate(self.watched)}
        return step

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.epoch_logs[epoch] = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.epoch_ends[epoch] = self._snapshot(epoch, -1)
        self._emit("logs", epoch, self.epoch_logs[epoch])
        self._emit("epoch_end", epoch, self.epoch_ends[epoch])

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        model = unwrap_model(self.model) if self.model is not None else None
        self.final = {"model": digest(model.state_dict()) if model is not None else ""}
        for i, optimizer in enumerate(self.optimizers):
            self.final[f"optimizers/{i}"] = digest(optimizer.state_dict())
        if self.loop.scaler is not None:
            self.final["scaler"] = digest(self.loop.scaler.state_dict())
        for name, part in self.loop.parts.items():
            if name.startswith("scheduler/"):
                self.final[name] = digest(part.state_dict())


def _name(index: int, callback: Callback) -> str:
    return f"{index}:{type(callback).__name__}"


def _state_keys(callback: Callback) -> set[str]:
    state = callback.state_dict()
    return set(state) if isinstance(state, Mapping) else set()


class Interrupted(Exception):
    """Raised by `Interrupt` to end a run where `verify_resume` interrupts it."""


class Interrupt(Callback):
    """Raises `Interrupted` at a point of the run: after training step `step` (and the backup made
    there), at the end of epoch `epoch` (after its backup), or inside the validation of `epoch`.

    Args:
        kind: "step", "epoch_end" or "validation".
        at: the global step (1-based) for "step"; the epoch (0-based) otherwise.
    """

    dispatch_order = 11  # after the recorder: the step it interrupts after is recorded
    stops_in_sync = True  # every process raises at the same point

    def __init__(self, kind: str, at: int) -> None:
        super().__init__()
        self.kind, self.at = kind, at

    def _stop(self, message: str) -> None:
        raise Interrupted(message)

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.kind == "step" and self.loop.global_step == self.at:
            self._stop(f"interrupted after step {self.at}")

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.kind == "epoch_end" and epoch == self.at:
            self._stop(f"interrupted at the end of epoch {epoch + 1}")

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.kind == "validation" and self.loop.epoch == self.at:
            self._stop(f"interrupted inside the validation of epoch {self.at + 1}")


class Kill(Interrupt):
    """`Interrupt`'s points, where the process is killed with SIGKILL instead (no hook runs after)."""

    def _stop(self, message: str) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
