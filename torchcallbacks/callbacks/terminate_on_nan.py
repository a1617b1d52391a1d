"""`TerminateOnNaN`: stop (or raise) when the loss becomes NaN or infinite."""

from __future__ import annotations

import math

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.checks import check_count
from torchcallbacks.distributed import any_process, print_main
from torchcallbacks.logs import to_float


class NonFiniteLossError(RuntimeError):
    """Raised by `TerminateOnNaN(raise_error=True)` when the loss is NaN or infinite."""


class TerminateOnNaN(Callback):
    """Stops training, or raises `NonFiniteLossError`, when the loss is NaN or infinite.

    It reads `logs["loss"]` after training batches. Inside `fit` that value is the running mean of
    the epoch so far, so once a batch produced a non-finite loss every later check sees it too.
    The check is made at every epoch end as well (on the epoch's loss, already a number there).

    Cost: reading a loss that lives on an accelerator waits for the device (a host-device
    synchronisation). This callback is the one that does so per batch by design; pass
    `check_every=n` to read the loss only every n-th batch (n batches may then run after the first
    NaN before training stops). Under `torch.distributed` the decision is all-reduced at each check,
    so every process stops (or raises) at the same batch. With a hand-written loop that passes each batch's own loss, a NaN
    in a batch that is not checked is missed unless the loss you pass is a running value.

    Args:
        raise_error: raise `NonFiniteLossError` (a RuntimeError) instead of setting
            `model.stop_training = True`. Inside `fit`, `on_train_end` still runs, with
            `loop.exception` set, before the error reaches the caller.
        check_every: check after every this many training batches (counted by the global step).

    Example:

    ```python
    torchcallbacks.fit(model, loader, optimizer=opt, loss=F.mse_loss, epochs=10,
                       callbacks=[torchcallbacks.TerminateOnNaN(check_every=10)])
    ```
    """

    stops_in_sync = True  # batch hooks: decides with any_process (see Callback.stops_in_sync)

    def __init__(self, raise_error: bool = False, *, check_every: int = 1) -> None:
        super().__init__()
        self.raise_error = bool(raise_error)
        self.check_every = check_count(check_every, "check_every", minimum=1)

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
        if self.loop.at_every(self.check_every):
            self._check((logs or {}).get("loss"), f"batch {batch}")

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._check((logs or {}).get("loss"), f"epoch {epoch + 1}")
