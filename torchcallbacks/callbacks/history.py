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
        if not self.loop.resumed:
            self.epoch = []
        if self._model is not None:
            # Keras' `model.history`, as a record detached from the loop: the model carries no
            # callbacks, optimizer or loop (copy.deepcopy(model) stays cheap and possible).
            setattr(self._model, "history", HistoryRecord(self.epoch, self.history))  # noqa: B010

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in to_floats(logs).items():
            self.history.setdefault(key, []).append(value)

    def state_dict(self) -> dict[str, Any]:
        """The epochs and values recorded so far, so that a resumed run's History holds the whole run."""
        return {"epoch": list(self.epoch), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, history = state_dict["epoch"], state_dict["history"]
        if not isinstance(epoch, list) or not isinstance(history, dict):
            raise TypeError("History state: expected 'epoch' (a list) and 'history' (a dict of lists)")
        self.epoch = [int(e) for e in epoch]
        self.history = {str(k): list(v) for k, v in history.items()}


class HistoryRecord:
    """What `model.history` holds once `fit` ran: the `epoch` list and the `history` dict of the run
    (the same lists the `History` callback fills), without any tie to the loop.

    Example:

    ```python
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=3)
    model.history.history["loss"]  # one value per epoch
    ```
    """

    def __init__(self, epoch: list[int], history: dict[str, list[Any]]) -> None:
        self.epoch = epoch
        self.history = history
