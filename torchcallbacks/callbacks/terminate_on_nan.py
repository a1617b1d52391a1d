"""`TerminateOnNaN`: stop (or raise) when the loss becomes NaN or infinite."""

from __future__ import annotations

import math

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.checks import check_count
from torchcallbacks.distributed import any_process, is_distributed, print_main
from torchcallbacks.logs import to_float

#: The default check interval (batches) where a check costs a device sync or a collective.
AUTO_CHECK_EVERY = 100


class NonFiniteLossError(RuntimeError):
    """Raised by `TerminateOnNaN(raise_error=True)` when the loss is NaN or infinite."""


class TerminateOnNaN(Callback):
    """Stops training, or raises `NonFiniteLossError`, when the loss is NaN or infinite.

    It reads `logs["loss"]` after training batches. Inside `fit` that value is the running mean of
    the epoch so far, so once a batch produced a non-finite loss every later check sees it too.
    The check is made at every epoch end as well (on the epoch's loss, already a number there).

    Cost of a check: reading a loss that lives on an accelerator waits for the device (a host-device
    synchronisation), and under `torch.distributed` the decision is all-reduced (one small
    collective), so that every process stops (or raises) at the same batch. The default
    (`check_every=None`) is therefore: every batch when that is free, a single process training on
    the CPU (Keras' behaviour); every `AUTO_CHECK_EVERY` (100) batches on an accelerator or under
    `torch.distributed`. Inside `fit` the loss read is the epoch's running mean, so a NaN is still
    caught, at most that many batches later, and always at the epoch end. Pass `check_every=1` for a
    check (and its cost) after every batch everywhere. With a hand-written loop that passes each
    batch's own loss, a NaN in a batch that is not checked is missed unless the loss you pass is a
    running value.

    Args:
        raise_error: raise `NonFiniteLossError` (a RuntimeError) instead of setting
            `model.stop_training = True`. Inside `fit`, `on_train_end` still runs, with
            `loop.exception` set, before the error reaches the caller.
        check_every: check after every this many training batches (counted by the global step); None
            for the default described above.

    Attributes:
        interval: the check interval in effect (batches): `check_every`, or the default's choice,
            made at `on_train_begin`.

    Example:

    ```python
    torchcallbacks.fit(model, loader, optimizer=opt, loss=F.mse_loss, epochs=10,
                       callbacks=[torchcallbacks.TerminateOnNaN(check_every=10)])
    ```
    """

    stops_in_sync = True  # batch hooks: decides with any_process (see Callback.stops_in_sync)

    def __init__(self, raise_error: bool = False, *, check_every: int | None = None) -> None:
        super().__init__()
        self.raise_error = bool(raise_error)
        self.check_every = None if check_every is None else check_count(check_every, "check_every", minimum=1)
        self.interval = self.check_every or 1

    def on_train_begin(self, logs: Logs | None = None) -> None:
        if self.check_every is not None:
            self.interval = self.check_every
            return
        model = self._model
        first = next(iter(model.parameters()), None) if model is not None else None
        free = not is_distributed() and (first is None or first.device.type == "cpu")
        self.interval = 1 if free else AUTO_CHECK_EVERY

    def _check(self, loss: object, where: str) -> None:
        value = math.nan if loss is None else to_float(loss)
        invalid = loss is not None and not math.isfinite(value)
        # Per-batch losses differ between processes: stop everywhere when any process sees one.
        if not any_process(invalid):
            return
        # Keras' phrases first ("NaN or Inf loss encountered at batch N", "Batch N: Invalid loss"),
        # so code that matches on them keeps working; the loss value or the other process after them.
        detail = f"loss value: {value}" if invalid else "in another process"
        if self.raise_error:
            raise NonFiniteLossError(f"NaN or Inf loss encountered at {where} ({detail}). Terminating training.")
        print_main(f"{where[0].upper()}{where[1:]}: Invalid loss, terminating training ({detail})")
        setattr(self.model, "stop_training", True)  # noqa: B010  (the Keras idiom; typed setattr of nn.Module)

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.loop.at_every(self.interval):
            self._check((logs or {}).get("loss"), f"batch {batch}")

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._check((logs or {}).get("loss"), f"epoch {epoch + 1}")
