"""`fit`: Keras' training loop for a plain `torch.nn.Module`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from torchcallbacks.callbacks.callback import Callback
from torchcallbacks.callbacks.callback_list import CallbackList
from torchcallbacks.callbacks.history import History
from torchcallbacks.checks import UNSET, check_count, check_optional_count, renamed_argument
from torchcallbacks.distributed import set_sampler_epoch
from torchcallbacks.logs import to_floats
from torchcallbacks.training.arguments import (
    check_callable,
    check_model,
    check_optimized,
    check_optimizers,
    check_verbose,
    make_callback_list,
    resolve_device,
)
from torchcallbacks.training.arrays import (
    array_loader,
    batch_parts,
    check_batch_size,
    check_validation_split,
    class_weights_to_sample_weights,
    float_dtype_of,
    is_array_data,
    is_array_validation,
    refuse_array_arguments,
    split_for_validation,
    uniform_weights,
)
from torchcallbacks.training.data import EpochIterator, check_same_length, check_steps, known_length
from torchcallbacks.training.evaluate import run_evaluation
from torchcallbacks.training.metrics import MetricLike, MetricTracker, metric_directions, normalize_metrics
from torchcallbacks.training.run import run_hooks
from torchcallbacks.training.shortcuts import resolve_loss, resolve_optimizer
from torchcallbacks.training.steps import StepFunction, Stepper


def _validation_due(epoch: int, validation_freq: int | Sequence[int]) -> bool:
    if isinstance(validation_freq, int):
        return (epoch + 1) % validation_freq == 0
    return epoch + 1 in validation_freq


def _check_validation_freq(validation_freq: Any) -> int | Sequence[int]:
    if isinstance(validation_freq, bool):
        raise ValueError(f"validation_freq: expected an integer >= 1 or a list of epochs, received {validation_freq!r}")
    if isinstance(validation_freq, int) and validation_freq >= 1:
        return validation_freq
    if isinstance(validation_freq, (list, tuple, set, frozenset, range)) and all(
        isinstance(e, int) and e >= 1 for e in validation_freq
    ):
        return list(validation_freq)
    raise ValueError(
        f"validation_freq: expected an integer >= 1 or a list of 1-based epochs, received {validation_freq!r}"
    )


def _is_positive(value: Any) -> bool:
    try:
        return bool(value > 0)
    except TypeError:  # not a number: the caller's error names the argument
        return False


def fit(
    model: torch.nn.Module,
    x: Any,
    y: Any = None,
    *,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | str,
    loss: Callable[..., Any] | str | None = None,
    metrics: Mapping[str, MetricLike] | Sequence[MetricLike] | None = None,
    batch_size: int | None = None,
    epochs: int = 1,
    verbose: int | str = "auto",
    callbacks: Sequence[Callback] | CallbackList | None = None,
    validation_split: float = 0.0,
    validation_data: Any = None,
    shuffle: bool = True,
    class_weight: Mapping[int, float] | None = None,
    sample_weight: Any = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
    validation_batch_size: int | None = None,
    validation_freq: int | Sequence[int] = 1,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = UNSET,
    clip_grad_norm: float | None = None,
    gradient_accumulation_steps: int | None = None,
    train_step: StepFunction | None = None,
    test_step: StepFunction | None = None,
    warn_unoptimized: bool = True,
    grad_scaler: torch.amp.GradScaler | None = UNSET,
) -> History:
    """Trains `model` on the batches of `x` for a number of epochs, calling the callbacks' hooks.

    The call order, the `val_` prefix, stopping (`model.stop_training = True` in a callback, checked
    after every batch and every epoch) and `validation_freq` follow Keras' `Model.fit`. Batch logs are
    running means over the epoch kept on the device; nothing forces a host-device synchronisation per
    batch unless a callback reads a value.

    Under `torchrun` with a DistributedDataParallel-wrapped model (see docs/distributed.md): the
    sampler's `set_epoch(epoch)` is called each epoch before the data iterator is created; epoch logs
    and validation results are means over every process's samples (one all-reduce per epoch), so
    every process's callbacks take the same decisions; a stop asked on any process stops all of them
    at the same epoch (or batch, see `CallbackList`).

    Args:
        model: a `torch.nn.Module` (DistributedDataParallel-wrapped models work too).
        x: an iterable of batches, e.g. a DataLoader. A batch is `(x, y)` or `(x, y, sample_weight)`;
            `x` is a tensor, a tuple (positional arguments of the model) or a dict (keyword arguments).
            Or, as in Keras, the inputs themselves: a tensor, a numpy array, or a tuple or dict of them
            (one row per sample), with the targets in `y`; a loader is built for them (see
            `batch_size`, `shuffle`, `validation_split`, `class_weight`, `sample_weight`). Numpy
            arrays are shared with `torch.from_numpy`; floating arrays and tensors are cast to the
            model's floating dtype (its first floating parameter's: float32 for most models), as
            Keras casts inputs to its layers' dtype (no copy where the dtype is already right). A
            loader's batches are not cast: a floating dtype other than the model's is a `TypeError`
            naming `x` and both dtypes, at the first batch, before any optimizer step.
        y: the targets when `x` holds arrays: a tensor, a numpy array, or a tuple or dict of them.
            Not with a loader (its batches hold the targets): that is a `TypeError`.
        optimizer: a `torch.optim.Optimizer`, or a list of them (all are stepped). Or, as in Keras, a
            name (any case): `"sgd"`, `"adam"`, `"adamw"`, `"rmsprop"`, built once over the model's
            trainable parameters as torch's optimizer with Keras 3's defaults (SGD lr 0.01; Adam lr
            0.001, eps 1e-7; AdamW the same with weight_decay 0.004; RMSprop lr 0.001, alpha (Keras'
            rho) 0.9, eps 1e-7). Torch applies epsilon differently: Keras' Adam / AdamW add it to
            `sqrt(v)` before the bias correction (an epsilon `1e-7 / sqrt(1 - beta_2**t)` next to
            torch's `sqrt(v_hat)`, about 32 times larger at the first step), and Keras' RMSprop adds
            it under the square root (`g / sqrt(v + eps)`, torch: `g / (sqrt(v) + eps)`); the two
            differ only for very small gradients (see docs/porting-from-keras.md). Callbacks
            see the optimizer built as `self.optimizer` (and `history.optimizer` after `fit`).
        loss: `loss(y_pred, y) -> scalar tensor`, any callable (e.g. `torch.nn.functional.mse_loss`).
            With sample weights in the batch (or `sample_weight` / `class_weight` given) it must
            return per-sample values (`reduction="none"`); they are weighted and averaged over the
            batch's elements as Keras does (`compute_loss` in steps.py). Or one of Keras' names,
            computed as Keras computes it (also per sample, with weights): `"mse"` /
            `"mean_squared_error"`, `"mae"`, `"mape"`, `"msle"`, `"huber"` (delta 1), `"log_cosh"`,
            `"binary_crossentropy"`, `"categorical_crossentropy"` (one-hot targets),
            `"sparse_categorical_crossentropy"` (class indices), `"crossentropy"` (one of the three,
            chosen from the shapes), `"kl_divergence"`, `"poisson"`, `"hinge"`, `"squared_hinge"`,
            `"categorical_hinge"`, `"cosine_similarity"`, or their Keras class names. The
            crossentropies take probabilities, as Keras' do without `from_logits`: end the model in
            a sigmoid / softmax, or pass torch's logit losses (`F.binary_cross_entropy_with_logits`,
            `F.cross_entropy`) instead.
        metrics: a dict name -> metric, or a list of metrics (named after the function or class). A
            metric is a callable `(y_pred, y) -> tensor`, averaged over the epoch weighted by batch
            size, or an object with `update/compute/reset` (torchmetrics style). Give a metric the
            attribute `mode = "max"` (or torchmetrics' `higher_is_better`) to tell monitors its direction.
            Or one of Keras' names, logged under the name given (`val_` + it in validation):
            `"accuracy"` / `"acc"` (binary, threshold 0.5, when the output's last dimension is 1;
            sparse categorical when the targets have one dimension less; else categorical),
            `"binary_accuracy"`, `"categorical_accuracy"`, `"sparse_categorical_accuracy"`, `"mae"`,
            `"mse"`, `"mape"`, `"msle"`, the crossentropies, `"kl_divergence"`, `"hinge"`, ...
            (`shortcuts.metric_names()`), and `"auc"` (torchmetrics' `BinaryAUROC` with Keras' 200
            thresholds; needs `pip install torchcallbacks[torchmetrics]`).
        batch_size: samples per batch with array `x` (default 32, as Keras); not with a loader.
        epochs: the epoch to stop at (training runs epochs `initial_epoch` .. `epochs - 1`).
        verbose: "auto" or 1 for a progress bar, 2 for one line per epoch, 0 for silence.
        callbacks: callbacks (or a `CallbackList`). A `History` is added, and a `ProgbarLogger` unless
            `verbose=0`, when the list has none.
        validation_split: with array `x`, the fraction of the samples to hold out for validation:
            the LAST ones, taken before any shuffling, as Keras does (with their sample weights, if
            given; `class_weight` applies to training only). Not with a loader, nor together with
            `validation_data`.
        validation_data: an iterable of batches evaluated at the end of epochs; results are logged
            with a `val_` prefix. Or Keras' tuple of arrays `(x_val, y_val)` or
            `(x_val, y_val, sample_weight_val)`.
        shuffle: with array `x`, reshuffle the training samples at every epoch (Keras' default for
            arrays is True). A loader shuffles by its own sampler: ignored for it, as in Keras.
        class_weight: with array `x`, a dict class index -> weight; each training sample weighs its
            class's weight (1 for a class not in the dict), as a per-sample `sample_weight`. The class
            is `y` itself (class indices, shape `(n,)` or `(n, 1)`), or the argmax of one-hot rows.
            `loss` must then return per-sample values (see `loss`). Not with `sample_weight`. As in
            Keras 3, validation ignores it: the `validation_split` samples and a `(x_val, y_val)`
            tuple weigh 1 each (a `(x_val, y_val, sample_weight_val)` tuple its own weights).
        sample_weight: with array `x`, one weight per training sample (a tensor or numpy array);
            batches become `(x, y, sample_weight)`, and `loss` must return per-sample values. With
            `validation_split` the held-out samples keep theirs (Keras splits them along with `x`);
            a `(x_val, y_val)` tuple weighs 1 per sample.
        initial_epoch: epoch to start at (to continue an earlier run).
        steps_per_epoch: batches per epoch. With it, one iterator carries over between epochs (so an
            endless iterable works); without it, an epoch is one pass over `x`.
        validation_steps: batches per validation; None for one pass.
        validation_batch_size: batch size of array validation data (`validation_split` or a tuple
            of arrays); default `batch_size`.
        validation_freq: validate every this many epochs, or at the listed (1-based) epochs.
        device: where to train (the model and each batch are moved there); default: where the model's
            weights are.
        amp_dtype: mixed precision: forward and loss under `torch.autocast(dtype=amp_dtype)`. With
            `torch.float16` a `GradScaler` is created unless `scaler` is given.
        scaler: a `torch.amp.GradScaler` to scale the loss (`save_checkpoint`'s and
            `CallbackList`'s name too).
        clip_grad_norm: clip the gradients' total norm to this value before each optimizer step.
        gradient_accumulation_steps: Keras 3's name: step the optimizers once every this many batches,
            with each batch's loss scaled by 1/k, so that k batches make one step equal to a step on
            their concatenation (for a mean loss). The batches are counted over the run, as Keras
            does: an epoch whose length is not a multiple of k leaves gradients that carry into the
            next epoch's first batches, and the gradients of an incomplete group at the end of
            training are not applied. With a GradScaler, unscaling, clipping, `step` and `update`
            happen on stepping batches only; a DistributedDataParallel model does not all-reduce
            gradients on the other batches (`no_sync`). The accumulated gradients are part of the
            training state, so a backup taken between optimizer steps resumes exactly. Callbacks see
            it as `params["gradient_accumulation_steps"]`; per-batch learning-rate schedules count
            optimizer steps (`global_step // k`). None or 1: a step every batch.
        train_step: `train_step(batch) -> loss tensor or dict of scalars`, replacing the whole default
            step (forward, backward and optimizer step are then yours); the batch is already on the
            device. Returned values are logged as running means.
        test_step: the same for validation: `test_step(batch) -> loss tensor or dict of scalars`.
        warn_unoptimized: before the first step, `fit` compares the optimizers' parameters with the
            model's trainable ones (`requires_grad`; frozen ones do not count): an optimizer that holds
            none of them is a `ValueError` (it would train nothing), and when the optimizers together
            leave some out a `UserWarning` says how many; False silences that warning (parameters
            left out on purpose). Not checked with a custom `train_step`, which steps what it likes.
        grad_scaler: the deprecated name of `scaler`.

    Returns:
        The `History` of the run.

    Example:

    ```python
    history = torchcallbacks.fit(
        model, train_loader, optimizer=torch.optim.Adam(model.parameters()),
        loss=torch.nn.functional.cross_entropy, metrics={"accuracy": accuracy},
        validation_data=val_loader, epochs=10,
        callbacks=[torchcallbacks.EarlyStopping(patience=2)])
    history.history["val_accuracy"]

    # Keras' names: a model ending in a softmax, integer class targets
    history = torchcallbacks.fit(model, x, y, optimizer="adam", loss="sparse_categorical_crossentropy",
                                 metrics=["accuracy"], epochs=10)
    history.history["accuracy"]
    ```
    """
    grad_scaler = renamed_argument(scaler, grad_scaler, "scaler", "grad_scaler", "fit")
    loss_fn = resolve_loss(loss)  # Keras' names, resolved once
    _check_arguments(model, loss_fn, train_step, test_step, validation_data, epochs, initial_epoch, clip_grad_norm)
    accumulation = _check_accumulation(gradient_accumulation_steps, train_step)
    x, validation_data = _training_data(
        x, y, batch_size, validation_split, validation_data, shuffle, class_weight, sample_weight,
        validation_batch_size, float_dtype_of(model),
    )
    if validation_data is not None and loss_fn is None and test_step is None:
        raise TypeError("fit: validation_data needs a loss or a test_step to evaluate with")
    optimizers = check_optimizers(resolve_optimizer(optimizer, model))
    if train_step is None:
        several = isinstance(optimizer, (list, tuple)) and len(optimizers) > 1
        check_optimized(model, optimizers, several, bool(warn_unoptimized), loss_fn)
    verbose = check_verbose(verbose)
    steps_per_epoch = check_steps(steps_per_epoch, "steps_per_epoch")
    validation_steps = check_steps(validation_steps, "validation_steps")
    validation_freq = _check_validation_freq(validation_freq)
    named_metrics = normalize_metrics(metrics)
    if train_step is not None and named_metrics:
        raise ValueError("metrics: not computed with a custom train_step; return them from the step instead")
    device = resolve_device(model, device)
    if grad_scaler is None and amp_dtype == torch.float16:
        grad_scaler = torch.amp.GradScaler(device.type)

    # -- wiring: the step, the data, the callbacks and the loop's own state -------------------------
    tracker = MetricTracker(named_metrics, device)
    stepper = Stepper(
        model, device, tracker, loss=loss_fn, optimizers=optimizers, amp_dtype=amp_dtype,
        scaler=grad_scaler, clip_grad_norm=clip_grad_norm, train_step=train_step, test_step=test_step,
        gradient_accumulation_steps=accumulation, weights_from=_weights_from(class_weight, sample_weight),
    )
    train_data = EpochIterator(x, steps_per_epoch, "x")
    params: dict[str, Any] = {
        "verbose": verbose,
        "epochs": epochs,
        "steps": steps_per_epoch if steps_per_epoch is not None else known_length(x),
        "metric_directions": metric_directions(named_metrics),
    }
    if accumulation > 1:
        params["gradient_accumulation_steps"] = accumulation
    if loss is not None:
        params["loss"] = _loss_name(loss)
    callback_list = make_callback_list(callbacks, model, optimizers, True, verbose != 0, params)
    loop = callback_list.loop
    loop.start_run(initial_epoch, scaler=grad_scaler)
    loop.track("metrics", tracker)
    loop.track("data", train_data)
    if accumulation > 1:
        loop.track("gradients", stepper.accumulator)
    if steps_per_epoch is None:
        check_same_length(x, "x")  # under torch.distributed: uneven batch counts would hang or mis-pair
    # The step per batch, chosen once: the default path costs what it did without accumulation.
    train_batch = stepper.train if stepper.accumulator is None else stepper.accumulate

    def validate(epoch: int) -> dict[str, float]:
        if validation_data is None or not _validation_due(epoch, validation_freq):
            return {}
        val_logs = run_evaluation(stepper, validation_data, validation_steps, callback_list, "validation_data")
        return {"val_" + name: value for name, value in val_logs.items()}

    try:
        with run_hooks(callback_list, model, "on_train_begin", "on_train_end") as run:
            run.logs = {}
            for epoch in range(loop.initial_epoch, epochs):
                resumed = loop.initial_batch if epoch == loop.initial_epoch else 0  # batches trained before a resume
                if not _train_epoch(epoch, resumed, model, x, train_data, train_batch, tracker, callback_list):
                    break
                run.logs = to_floats(tracker.reduced_result())
                run.logs.update(validate(epoch))
                callback_list.on_epoch_end(epoch, run.logs)
                if callback_list.stop_training or train_data.exhausted:
                    break
    finally:
        train_data.close()  # DataLoader workers end now, even if an error's traceback keeps the loop alive
        for name in ("metrics", "data", "gradients"):
            loop.parts.pop(name, None)  # the loop keeps no tensors of this run once it is over
    history = callback_list.history
    assert history is not None
    return history


def _check_arguments(
    model: Any, loss: Any, train_step: Any, test_step: Any, validation_data: Any, epochs: Any, initial_epoch: Any,
    clip_grad_norm: Any,
) -> None:
    check_model(model, "fit")
    check_callable(train_step, "train_step")
    check_callable(test_step, "test_step")
    if check_callable(loss, "loss") is None and train_step is None:
        raise TypeError("fit: loss is required (loss(y_pred, y) -> scalar tensor), or pass a train_step")
    check_count(epochs, "epochs", minimum=1)
    check_count(initial_epoch, "initial_epoch")
    if clip_grad_norm is not None and not _is_positive(clip_grad_norm):
        raise ValueError(f"clip_grad_norm: expected a positive number, received {clip_grad_norm!r}")


def _weights_from(class_weight: Any, sample_weight: Any) -> str:
    """Where the batches' sample weights come from, for the loss's message (Stepper.weights_from)."""
    if class_weight is not None:
        return "class_weight was given"
    if sample_weight is not None:
        return "sample_weight was given"
    return "the batch has sample_weight"


def _check_accumulation(value: Any, train_step: Any) -> int:
    value = check_optional_count(value, "gradient_accumulation_steps")
    if value is None:
        return 1
    if value > 1 and train_step is not None:
        raise ValueError(
            "gradient_accumulation_steps: not applied to a custom train_step, which does its own backward and "
            "optimizer step; accumulate inside the step instead"
        )
    return value


def _training_data(
    x: Any, y: Any, batch_size: Any, validation_split: Any, validation_data: Any, shuffle: bool,
    class_weight: Any, sample_weight: Any, validation_batch_size: Any, float_dtype: torch.dtype | None,
) -> tuple[Iterable[Any], Any]:
    """The training loader and the validation data: `x` and `validation_data` as given when they
    are loaders, else loaders built from the arrays (Keras' `fit(x, y, ...)`), whose floating arrays
    are cast to the model's `float_dtype`."""
    batch_size = check_batch_size(batch_size)
    validation_batch_size = check_batch_size(validation_batch_size, "validation_batch_size")
    validation_split = check_validation_split(validation_split)
    if validation_split and validation_data is not None:
        raise ValueError(
            "fit: validation_split and validation_data both given; pass one (Keras lets validation_data win "
            "silently)"
        )
    if is_array_validation(validation_data):
        val_sample_weight = validation_data[2] if len(validation_data) == 3 else None
        if val_sample_weight is None and (class_weight is not None or sample_weight is not None):
            # the loss returns per-sample values (weighted training needs them): validation averages them
            val_sample_weight = uniform_weights(validation_data[1], "validation_data")
        val_parts, val_names = batch_parts(validation_data[0], validation_data[1], val_sample_weight, "validation_data")
        validation_data = array_loader(val_parts, val_names, validation_batch_size or batch_size, shuffle=False, float_dtype=float_dtype)
    if not is_array_data(x):
        given = [
            name for name, value in (
                ("y", y), ("batch_size", batch_size), ("class_weight", class_weight), ("sample_weight", sample_weight),
            ) if value is not None
        ] + (["validation_split"] if validation_split else [])
        drop = "it" if len(given) == 1 else "them"
        refuse_array_arguments(x, given, "fit", f". Drop {drop}, or put sample weights in the batches: (x, y, sample_weight)")
        return x, validation_data
    if class_weight is not None:
        if sample_weight is not None:
            raise ValueError("fit: class_weight and sample_weight both given; pass one (as in Keras)")
        if y is None:
            raise TypeError("fit: class_weight needs the targets y")
    if validation_split:
        # Keras 3 splits x, y and a given sample_weight; class_weight applies to training only, so the
        # held-out samples are weighted by sample_weight alone (unweighted with class_weight).
        train, held_out = split_for_validation((x, y, sample_weight), validation_split)
        x, y, sample_weight = train
        val_weight = held_out[2]
        if class_weight is not None:
            val_weight = uniform_weights(held_out[1], "validation_split")  # unweighted, per-sample loss
        val_parts, val_names = batch_parts(held_out[0], held_out[1], val_weight, "validation_split")
        validation_data = array_loader(val_parts, val_names, validation_batch_size or batch_size, shuffle=False, float_dtype=float_dtype)
    if class_weight is not None:
        sample_weight = class_weights_to_sample_weights(y, class_weight)  # of the training samples only
    parts, names = batch_parts(x, y, sample_weight, "fit")
    return array_loader(parts, names, batch_size, shuffle=bool(shuffle), float_dtype=float_dtype), validation_data


def _train_epoch(
    epoch: int,
    resumed: int,
    model: torch.nn.Module,
    x: Iterable[Any],
    train_data: EpochIterator,
    train_batch: Callable[[Any], None],
    tracker: MetricTracker,
    callback_list: CallbackList,
) -> bool:
    """The training batches of one epoch; False when there were none because the data ran dry.

    `resumed` batches of the epoch were trained before a resume: the running means restored with
    the training state already hold them, so they are not reset, and the data iterator continues
    after them.
    """
    if not resumed:
        tracker.reset()
    model.train()
    callback_list.on_epoch_begin(epoch)
    set_sampler_epoch(x, epoch)  # a DistributedSampler's shuffle order for this epoch
    seen = 0
    batch_logs = callback_list.has_hook("on_train_batch_end")
    with contextlib.closing(train_data.epoch()) as batches:  # closed at a stop too: the epoch is over
        for index, batch in batches:
            callback_list.on_train_batch_begin(index)
            train_batch(batch)
            seen += 1
            callback_list.on_train_batch_end(index, tracker.batch_logs() if batch_logs else None)
            if callback_list.stop_training:
                break
    if seen == 0 and not resumed:
        if train_data.exhausted:
            return False
        raise ValueError("x: the data yielded no batches; fit needs at least one batch per epoch")
    return True


def _loss_name(loss: Any) -> str:
    """How `params["loss"]` names the loss: a Keras name as given, a function by its name, a loss
    module by its repr (`MSELoss()`, `CrossEntropyLoss()`)."""
    if isinstance(loss, str):
        return loss
    if isinstance(loss, torch.nn.Module):
        return repr(loss)
    return str(getattr(loss, "__qualname__", None) or type(loss).__name__)
