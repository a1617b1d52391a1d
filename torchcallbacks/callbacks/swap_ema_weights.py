"""`SwapEMAWeights`: keep an exponential moving average of the weights and evaluate with it."""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.callbacks.loop_state import is_sharded
from torchcallbacks.checks import check_number


class SwapEMAWeights(Callback):
    """Keeps an exponential moving average (EMA) of the model's weights and swaps it in for
    evaluation and prediction.

    Keras gets the EMA from an optimizer with `use_ema=True`; torch optimizers keep none, so this
    callback owns one: `self.ema_model`, a `torch.optim.swa_utils.AveragedModel` updated with
    `get_ema_multi_avg_fn(decay)` after every training batch (`ema = decay * ema + (1 - decay) *
    weights`; the first update copies the weights). The update runs on the device with no
    host-device synchronisation. Parameters and, with `use_buffers=True`, floating-point buffers
    (e.g. BatchNorm running statistics) are averaged; other buffers follow the model.

    The EMA weights are copied into the model, in place, at `on_test_begin` (validation inside `fit`
    and `evaluate`) and `on_predict_begin`, and the training weights are copied back at
    `on_test_end` / `on_predict_end` (Keras leaves the EMA weights in the model after predict).
    With `swap_on_epoch=True` the EMA weights are also in the model from `on_epoch_end` to the next
    `on_epoch_begin`, so callbacks after this one in the list (e.g. `ModelCheckpoint`) see them.
    At the end of training the training weights are put back, or, with `use_ema_at_end=True`, the
    EMA weights are left in the model (what Keras' `use_ema` optimizers do).

    Its hooks run before every other callback's (`dispatch_order = -1`), wherever it is in the list:
    callbacks that read or replace the weights at the same hooks (`ModelCheckpoint` at epoch end,
    `EarlyStopping(restore_best_weights=True)` at train end) act after the swap.

    Before the first training run there is no EMA, and evaluate/predict run with the model's own
    weights. The average is part of `state_dict()` (as tensors), so a resumed run continues it.

    Under FSDP2 (DTensor parameters, which cannot be deep-copied) there is no `AveragedModel`: the
    average is one DTensor per parameter and buffer with the same mesh and placements, on the same
    device, so each process averages and swaps its own shards, with no communication. A sharded
    backup stores it as shards (see `state_template`).

    Args:
        swap_on_epoch: also swap the EMA weights in at epoch end and out at the next epoch begin.
        decay: the EMA decay in [0, 1]; higher is smoother. Defaults to 0.999.
        use_buffers: also average floating-point buffers (BatchNorm statistics). Defaults to True.
        use_ema_at_end: leave the EMA weights in the model when training ends.

    Attributes:
        ema_model: the `AveragedModel` holding the EMA (its `.module` is a usable model), or None
            before training and for an FSDP2 model (whose average is `ema_tensors`).
        ema_tensors: the average, one tensor per parameter then buffer of the model (a DTensor for
            each DTensor of an FSDP2 model); empty before training.
        num_updates: EMA updates so far.

    Example:

    ```python
    ema = torchcallbacks.SwapEMAWeights(decay=0.99)
    torchcallbacks.fit(model, train_loader, optimizer=opt, loss=F.cross_entropy,
                       validation_data=val_loader, epochs=10, callbacks=[ema])  # val_ metrics use the EMA
    predictions = torchcallbacks.predict(model, test_loader, callbacks=[ema])   # so does predict
    ```
    """

    stops_in_sync = True  # batch hooks: averages only (see Callback.stops_in_sync)
    dispatch_order = -1  # swaps the weights before any other callback reads them

    def __init__(
        self,
        swap_on_epoch: bool = False,
        *,
        decay: float = 0.999,
        use_buffers: bool = True,
        use_ema_at_end: bool = False,
    ) -> None:
        super().__init__()
        decay = check_number(decay, "decay")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a number in [0, 1], received {decay}")
        self.swap_on_epoch = bool(swap_on_epoch)
        self.decay = decay
        self.use_buffers = bool(use_buffers)
        self.use_ema_at_end = bool(use_ema_at_end)
        self.ema_model: AveragedModel | None = None
        self.num_updates = 0
        self._source: torch.nn.Module | None = None
        self._average = get_ema_multi_avg_fn(decay)
        self._averaged: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._followed: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model tensor, EMA tensor), local shards
        self.ema_tensors: list[torch.Tensor] = []
        self._ema_in_model = False
        self._swapped_for: str | None = None

    @property
    def ema_weights_in_model(self) -> bool:
        """True while the model holds the EMA weights (and the EMA holds the training weights)."""
        return self._ema_in_model

    # -- the EMA --------------------------------------------------------------------------------
    @staticmethod
    def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p for p in model.parameters()] + [b for b in model.buffers()]

    def _build(self, model: torch.nn.Module) -> None:
        self._source = model
        self.num_updates = 0
        self._ema_in_model = False
        model_tensors = self._tensors(model)
        if is_sharded(model):  # DTensors: an average of the same placements, no AveragedModel (deepcopy)
            self.ema_model = None
            ema_tensors = [t.detach().clone() for t in model_tensors]
        else:
            self.ema_model = AveragedModel(model, multi_avg_fn=self._average, use_buffers=self.use_buffers)
            self.ema_model.requires_grad_(False)
            ema_tensors = self._tensors(self.ema_model.module)
        if len(model_tensors) != len(ema_tensors):
            raise RuntimeError("SwapEMAWeights: the copied model has a different number of tensors")
        self.ema_tensors = ema_tensors
        model_tensors, ema_tensors = _local(model_tensors), _local(ema_tensors)
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(
            lambda: ([], [])
        )
        followed: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        n_params = len(list(model.parameters()))
        for index, (ours, theirs) in enumerate(zip(ema_tensors, model_tensors, strict=True)):
            averaged = (index < n_params or self.use_buffers) and (ours.is_floating_point() or ours.is_complex())
            target = groups[(ours.device, ours.dtype)] if averaged else followed
            target[0].append(ours)
            target[1].append(theirs)
        self._averaged = list(groups.values())
        self._followed = followed
        self._pairs = list(zip(model_tensors, ema_tensors, strict=True))

    def _check_model(self) -> None:
        if self._source is not None and self.model is not self._source:
            raise ValueError(
                "SwapEMAWeights: this callback holds the EMA of another model; use one SwapEMAWeights per model"
            )

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the EMA (called after every training batch)."""
        if self._source is None:
            self._build(self.model)
        if self._ema_in_model:
            raise RuntimeError("SwapEMAWeights: cannot update the EMA while the EMA weights are in the model")
        if self.num_updates == 0:
            for ours, theirs in self._averaged:
                torch._foreach_copy_(ours, theirs)
        else:
            for ours, theirs in self._averaged:
                self._average(ours, theirs, None)
        if self._followed[0]:
            torch._foreach_copy_(self._followed[0], self._followed[1])
        if self.ema_model is not None:
            self.ema_model.n_averaged += 1
        self.num_updates += 1

    @torch.no_grad()
    def _swap(self) -> None:
        if self.ema_model is None and self._source is not None:
            _reshard(self._source)
        for model_tensor, ema_tensor in self._pairs:
            saved = model_tensor.clone()
            model_tensor.copy_(ema_tensor)
            ema_tensor.copy_(saved)
        self._ema_in_model = not self._ema_in_model

    def swap_in(self) -> None:
        """Put the EMA weights into the model (the training weights are kept in their place)."""
        if self._source is not None and not self._ema_in_model:
            self._check_model()
            self._swap()

    def swap_out(self) -> None:
        """Put the training weights back into the model."""
        if self._ema_in_model:
            self._swap()

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The average itself (tensors, stored as tensors in training-state files), the number of
        updates and whether the EMA weights are in the model (with `swap_on_epoch` they are when a
        backup is written at epoch end; the EMA slots then hold the training weights)."""
        if self._source is None:
            return {}
        return {"num_updates": self.num_updates, "ema_in_model": self._ema_in_model, "tensors": list(self.ema_tensors)}

    def state_template(self, saved: dict[str, Any]) -> dict[str, Any]:
        """When the saved state has an average: under FSDP2, new DTensors of the model's placements to
        read it into (None in the places of plain tensors, which need none); for a plain model (an FSDP2
        run's checkpoint read in one process), full tensors."""
        if not saved.get("tensors"):
            return {}
        if not is_sharded(self.model):
            return {"tensors": [t.detach().clone() for t in self._tensors(self.model)]}
        from torch.distributed.tensor import DTensor

        return {"tensors": [t.detach().clone() if isinstance(t, DTensor) else None for t in self._tensors(self.model)]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the average. When the state says the EMA weights were in the model (a backup taken
        at an epoch end with `swap_on_epoch`), they are swapped out at `on_train_begin`, once the
        model's weights are loaded too, so that training resumes with the training weights."""
        if not state_dict:
            return
        if self._source is not self.model:
            self._build(self.model)
        tensors = state_dict["tensors"]
        if len(tensors) != len(self._pairs):
            raise ValueError(
                f"SwapEMAWeights.load_state_dict: the state holds {len(tensors)} tensors, the model has "
                f"{len(self._pairs)}"
            )
        for (_, ema_tensor), saved in zip(self._pairs, _local(tensors), strict=True):
            ema_tensor.copy_(saved)
        self.num_updates = int(state_dict["num_updates"])
        if self.ema_model is not None:
            self.ema_model.n_averaged.fill_(self.num_updates)
        self._ema_in_model = bool(state_dict["ema_in_model"])
        self._swapped_for = None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        if self._source is not self.model:
            self._build(self.model)
        self.swap_out()
        self._swapped_for = None

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self.update()

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        if self.swap_on_epoch:
            self.swap_out()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.swap_on_epoch:
            self.swap_in()

    def _begin(self, what: str) -> None:
        if self._source is not None and not self._ema_in_model:
            self.swap_in()
            self._swapped_for = what

    def _end(self, what: str) -> None:
        if self._swapped_for == what:
            self._swapped_for = None
            self.swap_out()

    def on_test_begin(self, logs: Logs | None = None) -> None:
        self._begin("test")

    def on_test_end(self, logs: Logs | None = None) -> None:
        self._end("test")

    def on_predict_begin(self, logs: Logs | None = None) -> None:
        self._begin("predict")

    def on_predict_end(self, logs: Logs | None = None) -> None:
        self._end("predict")

    @torch.no_grad()
    def on_train_end(self, logs: Logs | None = None) -> None:
        self._swapped_for = None
        if self.use_ema_at_end:
            if not self._ema_in_model:
                self.swap_in()
            # The EMA weights now are the model's weights; the EMA keeps averaging from them.
            for model_tensor, ema_tensor in self._pairs:
                ema_tensor.copy_(model_tensor)
            self._ema_in_model = False
        else:
            self.swap_out()


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's shards of DTensors (the local tensors themselves: writing them writes the
    DTensor), other tensors as they are."""
    if "torch.distributed.tensor" not in sys.modules:
        return tensors
    from torch.distributed.tensor import DTensor

    return [t.to_local().detach() if isinstance(t, DTensor) else t for t in tensors]


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2: put every module's sharded parameters back in place of gathered ones (a forward without
    backward leaves the root module's gathered parameters in use), so that the next forward gathers
    the shards this callback writes. No communication."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
