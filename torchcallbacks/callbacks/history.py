"""`History`: records the epoch logs of a training run."""

from __future__ import annotations

from typing import Any

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.logs import to_floats


class History(Callback):
    """Records every epoch's logs; `fit` adds one automatically and returns it.

    Attributes:
        epoch: the epochs that ran (0-based).
        history: metric name -> list with one value per epoch, e.g. `history["val_loss"]`.

    Example:

    ```python
    history = torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=3,
                                 validation_data=val_loader)
    history.history["val_loss"]   # [0.71, 0.52, 0.44]
    ```
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch: list[int] = []
        self.history: dict[str, list[Any]] = {}

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.epoch = []

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in to_floats(logs).items():
            self.history.setdefault(key, []).append(value)
        if self._model is not None:
            setattr(self._model, "history", self)  # noqa: B010 (nn.Module typing)
