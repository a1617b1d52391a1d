"""`TensorBoard`: scalars, histograms, images, graph, profiles and embeddings for TensorBoard."""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.callbacks.learning_rate import LEARNING_RATE, all_lrs
from torchcallbacks.callbacks.loop_state import is_sharded
from torchcallbacks.checks import check_count, check_update_freq
from torchcallbacks.distributed import full_tensor, is_main_process, main_process_only
from torchcallbacks.logs import to_float, to_floats

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

#: `embeddings_metadata` values: a metadata file (TSV, as Keras takes) or the labels themselves.
MetadataSource = str | os.PathLike[str] | Sequence[Any]


def _parse_profile_batch(profile_batch: Any) -> tuple[int, int]:
    """`profile_batch` as (start, stop), 1-based global batches, inclusive; (0, 0) when off."""
    error = (
        "profile_batch: expected a non-negative integer, a pair (start, stop) of positive integers "
        f"with start <= stop, or a string 'start,stop'; received {profile_batch!r}"
    )
    value = profile_batch
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(error) from None
        value = value[0] if len(value) == 1 else value
    if isinstance(value, bool):
        raise ValueError(error)
    if isinstance(value, int):
        start = stop = value
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        start, stop = value
    else:
        raise ValueError(error)
    if start < 0 or stop < start or (start == 0 and stop != 0):
        raise ValueError(error)
    return start, stop


def _read_metadata(source: MetadataSource) -> tuple[list[Any], list[str] | None]:
    """Labels of an embedding: a list as given, or read from a TSV file as the projector reads it
    (one label per line; with tabs, the first line is the header)."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source), None
    with open(source, encoding="utf-8") as file:
        lines = file.read().splitlines()
    if lines and "\t" in lines[0]:
        return [line.split("\t") for line in lines[1:]], lines[0].split("\t")
    return lines, None


def _weight_image(weight: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """A weight as an image (scaled to [0, 1]) and its data format, where that makes sense:
    a bias is a column, a matrix is shown lying down, conv1d kernels are one image per filter, conv2d
    kernels with 1, 3 or 4 input channels are a grid of filters. Other shapes give None."""
    w = weight.detach().float().cpu().squeeze()
    if w.ndim == 1:
        image, fmt = w.reshape(-1, 1), "HW"
    elif w.ndim == 2:
        image, fmt = (w.t() if w.shape[0] > w.shape[1] else w), "HW"
    elif w.ndim == 3:
        image, fmt = w.unsqueeze(1), "NCHW"
    elif w.ndim == 4 and w.shape[1] in (1, 3, 4):
        image, fmt = w, "NCHW"
    else:
        return None
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return image, fmt


class _KeywordCall(torch.nn.Module):
    """Calls a model with keyword inputs given positionally, because the graph tracer passes only
    positional inputs."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], positional: int) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.positional = positional

    def forward(self, *inputs: Any) -> Any:
        args, values = inputs[: self.positional], inputs[self.positional :]
        return self.model(*args, **dict(zip(self.names, values, strict=True)))


class TensorBoard(Callback):
    """Writes logs for TensorBoard with `torch.utils.tensorboard.SummaryWriter`.

    What is written, under the tags Keras uses so that dashboards look the same:

    * `log_dir/train`: `epoch_<name>` for every epoch log (at step = epoch, 0-based), including
      `epoch_learning_rate` (the first optimizer's first param group's rate during the epoch: the
      logged `learning_rate` when another callback wrote it, else the rate at the epoch's begin,
      read after the other callbacks' `on_epoch_begin` (where schedules set it), so a scheduler
      stepped at epoch end does not shift it by one epoch), the other
      groups' rates the same way as `epoch_learning_rate/group_<j>` and
      `epoch_learning_rate/optimizer_<i>/group_<j>` (the log names of `learning_rate.lr_name`) and, with `write_steps_per_second`,
      `epoch_steps_per_second`. With `update_freq` "batch" or n, `batch_<name>` (the running means of
      the epoch so far) every n training batches at the global step (1-based batch count).
    * `log_dir/validation`: the `val_<name>` epoch logs as `epoch_<name>` (no prefix), so TensorBoard
      draws training and validation on one chart; and after every evaluation (validation inside
      `fit`, or a standalone `evaluate`) `evaluation_<name>_vs_iterations` at the number of training
      steps done so far (after a `fit` with this callback, its final global step).
    * `histogram_freq`: every `histogram_freq` epochs (epochs 0, n, 2n, ...) a histogram of each
      parameter, `<param>/histogram`; with `write_grads` also its gradient (the last training
      batch's), `<param>/gradient`. With `write_images`, weights are also drawn as images,
      `<param>/image`.
    * `write_graph`: the model's graph, traced with the writer's tracer (in eval mode, without
      gradients) from the input of the first training batch. A model that cannot be traced gives
      one warning and training continues.
    * `profile_batch`: the batches `start..stop` (1-based, counted over the whole run, inclusive)
      profiled with `torch.profiler`, the trace written into `log_dir/train` by
      `torch.profiler.tensorboard_trace_handler` (each profiled batch is a `batch_<n>` range).
    * `embeddings_freq`: every `embeddings_freq` epochs, the weights of each `nn.Embedding` /
      `nn.EmbeddingBag` for the projector, tagged with the module's name.

    Every `fit` adds event files of its own to `log_dir/train` and `log_dir/validation`, as Keras does.
    TensorBoard shows the event files of one directory as one run, so a second run with the same
    `log_dir` draws its curves over the first's: give each run its own `log_dir` (TensorBoard's guide
    uses `logs/fit/<date-time>`), or remove the previous run's logs to start over. A run resumed by
    `BackupAndRestore` is the same run: it writes into the same `log_dir` and continues its curves.

    Writers are flushed at every epoch end and closed when training ends, also when it ends by an
    exception. Batch logs are read only on the batches that are written, so with `update_freq=n`
    the other batches cost no device synchronisation. Under a distributed run only rank 0 writes.
    With an FSDP2-sharded model (`fully_shard`), histograms, images and embeddings are of the full
    tensors: at those epoch ends every process takes part in gathering each parameter (and gradient)
    in turn, one at a time, and rank 0 writes; `write_graph` is skipped with a warning.

    Args:
        log_dir: directory of the runs; `train` and `validation` are created under it.
        histogram_freq: write histograms every this many epochs; 0 for none.
        write_graph: write the model graph, traced from the first training batch.
        write_images: write the weights as images (with the histograms).
        write_steps_per_second: log training steps per second (epoch and, with `update_freq`, batch).
        update_freq: "epoch" for epoch scalars only; "batch" or an integer n to also write batch
            scalars every n batches.
        profile_batch: batch to profile (an int), a pair `(start, stop)` or a string `"start,stop"`;
            0 for no profiling.
        embeddings_freq: write embedding layers for the projector every this many epochs; 0 for none.
        embeddings_metadata: labels of the embedding rows: a metadata file (TSV; with tabs, the
            first line is the header) for every embedding layer, or a dict from layer name (as in
            `model.named_modules()`) to a file or a list of labels.
        write_grads: with `histogram_freq`, also write gradient histograms.

    Example:

    ```python
    tensorboard = torchcallbacks.TensorBoard(log_dir="./logs", histogram_freq=1, update_freq=50)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=5,
                       validation_data=val_loader, callbacks=[tensorboard])
    # then: tensorboard --logdir ./logs
    ```
    """

    stops_in_sync = True  # batch hooks: writes only (see Callback.stops_in_sync)
    #: After the other callbacks' hooks (as `ModelCheckpoint`): at epoch begin it reads the learning
    #: rate the schedules have set, at epoch end the logs they have added to.
    dispatch_order = 1

    def __init__(
        self,
        log_dir: str | os.PathLike[str] = "logs",
        histogram_freq: int = 0,
        write_graph: bool = True,
        write_images: bool = False,
        write_steps_per_second: bool = False,
        update_freq: str | int = "epoch",
        profile_batch: int | str | Sequence[int] = 0,
        embeddings_freq: int = 0,
        embeddings_metadata: MetadataSource | Mapping[str, MetadataSource] | None = None,
        *,
        write_grads: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir: expected a path (str or os.PathLike), received {type(log_dir).__name__}")
        update_freq = check_update_freq(update_freq, "TensorBoard")
        if embeddings_metadata is not None and not isinstance(embeddings_metadata, (str, os.PathLike, Mapping)):
            raise TypeError(
                "embeddings_metadata: expected a metadata file path or a dict from embedding layer name to "
                f"a file path or a list of labels, received {type(embeddings_metadata).__name__}"
            )
        self.log_dir = os.fspath(log_dir)
        self.histogram_freq = check_count(histogram_freq, "histogram_freq", note=" (0 turns it off)")
        self.write_graph = bool(write_graph)
        self.write_images = bool(write_images)
        self.write_steps_per_second = bool(write_steps_per_second)
        self.update_freq: str | int = update_freq
        self.profile_batch = profile_batch
        self._start_batch, self._stop_batch = _parse_profile_batch(profile_batch)
        self.embeddings_freq = check_count(embeddings_freq, "embeddings_freq", note=" (0 turns it off)")
        self.embeddings_metadata = embeddings_metadata
        self.write_grads = bool(write_grads)

        self._writers: dict[str, SummaryWriter] = {}
        self._training = False
        self._trained_steps = 0
        self._epoch_start_time = 0.0
        self._epoch_start_step = 0
        self._batch_start_time = 0.0
        self._epoch_lr: dict[str, Any] | None = None  # the learning rates when the epoch began
        self._graph_hook: torch.utils.hooks.RemovableHandle | None = None
        self._graph_input: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._profiler: torch.profiler.profile | None = None
        self._batch_trace: torch.profiler.record_function | None = None
        self._embedding_labels: dict[str, tuple[list[Any], list[str] | None]] = {}

    # -- writers --------------------------------------------------------------------------------
    def _writer(self, run: str) -> SummaryWriter:
        """The writer of run "train" or "validation", created on first use."""
        writer = self._writers.get(run)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = self._writers[run] = SummaryWriter(os.path.join(self.log_dir, run))
        return writer

    def _close_writers(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _write_scalars(self, run: str, prefix: str, logs: Mapping[str, Any], step: int, suffix: str = "") -> None:
        writer = self._writer(run)
        for name, value in logs.items():
            if isinstance(value, Real):
                writer.add_scalar(f"{prefix}{name}{suffix}", float(value), step)

    def _current_lrs(self) -> dict[str, Any]:
        """Every parameter group's learning rate now, named as in the logs; tensors are copied (no
        device sync now, read at epoch end)."""
        rates = all_lrs([o for o in self.optimizers if isinstance(o, torch.optim.Optimizer)])
        return {name: lr.detach().clone() if isinstance(lr, torch.Tensor) else lr for name, lr in rates.items()}

    # -- training -------------------------------------------------------------------------------
    @main_process_only
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._training = True
        self._writer("train")
        if self.embeddings_freq:
            self._embedding_labels = self._resolve_embedding_metadata()
        if self.write_graph and is_sharded(self.model):
            warnings.warn(
                "TensorBoard: write_graph is skipped for an FSDP2-sharded model (tracing it on rank 0 alone "
                "would wait in its all-gathers); pass write_graph=False to silence this",
                stacklevel=2,
            )
        elif self.write_graph:
            self._graph_hook = self.model.register_forward_pre_hook(self._capture_graph_input, with_kwargs=True)

    @main_process_only
    def on_train_end(self, logs: Logs | None = None) -> None:
        try:
            self._remove_graph_hook()
            self._graph_input = None
            self._stop_profiler()
        finally:
            self._trained_steps = self.loop.global_step
            self._training = False
            self._close_writers()

    def idle_hooks(self) -> frozenset[str]:
        """The batch hooks when there is nothing to do in them: no batch scalars, no graph still to
        write, no profiling still to come (read again after every epoch begin)."""
        profiling = bool(self._start_batch) and (self._profiler is not None or self.loop.global_step < self._start_batch)
        idle = set()
        if not profiling and not (self.write_steps_per_second and self.update_freq != "epoch"):
            idle.add("on_train_batch_begin")
        graph_pending = self._graph_hook is not None or self._graph_input is not None
        if not profiling and not graph_pending and self.update_freq == "epoch":
            idle.add("on_train_batch_end")
        return frozenset(idle)

    @main_process_only
    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        self._epoch_lr = self._current_lrs()  # after the schedules' epoch begin (dispatch_order)
        if self.write_steps_per_second:
            self._epoch_start_step = self.loop.global_step
            self._epoch_start_time = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        # An FSDP2 model's parameters are gathered for histograms, images and embeddings, one at a
        # time, and every process must take part in each gather; only rank 0 writes.
        sharded = (self.histogram_freq or self.embeddings_freq) and is_sharded(self.model)
        if sharded:
            self._write_model(epoch)
        self._write_epoch(epoch, logs, gathered=bool(sharded))

    def _write_model(self, epoch: int) -> None:
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            self._write_weights(epoch)
        if self.embeddings_freq and epoch % self.embeddings_freq == 0:
            self._write_embeddings(epoch)

    @main_process_only
    def _write_epoch(self, epoch: int, logs: Logs | None, gathered: bool) -> None:
        values = to_floats(logs)
        train = {k: v for k, v in values.items() if not k.startswith("val_")}
        validation = {k[len("val_") :]: v for k, v in values.items() if k.startswith("val_")}
        # The rate the epoch trained with: the logged one (what History and CSVLogger record, written
        # by a learning-rate callback before it steps a scheduler), else the one at the epoch's begin.
        # The optimizer's rate now may already be the next epoch's (a scheduler stepped here).
        if LEARNING_RATE not in train:
            rates = self._epoch_lr if self._epoch_lr is not None else self._current_lrs()
            train.update({name: to_float(lr) for name, lr in rates.items()})
        if self.write_steps_per_second:
            elapsed = time.perf_counter() - self._epoch_start_time
            train["steps_per_second"] = (self.loop.global_step - self._epoch_start_step) / max(elapsed, 1e-12)
        self._write_scalars("train", "epoch_", train, epoch)
        if validation:
            self._write_scalars("validation", "epoch_", validation, epoch)
        if not gathered:
            self._write_model(epoch)
        for writer in self._writers.values():
            writer.flush()

    @main_process_only
    def on_train_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        if self.write_steps_per_second and self.update_freq != "epoch":
            self._batch_start_time = time.perf_counter()
        if self._start_batch:
            number = self.loop.global_step + 1  # this batch, counted from 1 over the whole run
            if number == self._start_batch:
                self._start_profiler()
            if self._profiler is not None and number <= self._stop_batch:
                self._batch_trace = torch.profiler.record_function(f"batch_{number}")
                self._batch_trace.__enter__()

    @main_process_only
    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self._graph_input is not None:
            self._write_graph()
        step = self.loop.global_step
        if self.loop.at_every(self.update_freq):
            values = to_floats(logs)  # the only read of the lazy logs: one sync, on written batches only
            if self.write_steps_per_second:
                values["steps_per_second"] = 1.0 / max(time.perf_counter() - self._batch_start_time, 1e-12)
            self._write_scalars("train", "batch_", values, step)
        if self._batch_trace is not None:
            self._batch_trace.__exit__(None, None, None)
            self._batch_trace = None
        if self._profiler is not None and step >= self._stop_batch:
            self._stop_profiler()

    # -- evaluation -----------------------------------------------------------------------------
    @main_process_only
    def on_test_end(self, logs: Logs | None = None) -> None:
        step = self.loop.global_step if self._training else self._trained_steps
        self._write_scalars("validation", "evaluation_", to_floats(logs), step, suffix="_vs_iterations")
        if not self._training:  # a standalone evaluate: nothing else will close the writers
            self._close_writers()

    # -- histograms and images ------------------------------------------------------------------
    def _write_weights(self, epoch: int) -> None:
        """Histograms (and images) of every parameter. For an FSDP2 model, called on every process:
        each parameter (and gradient) is gathered in full in turn; rank 0 writes."""
        writer = self._writer("train") if is_main_process() else None
        for name, param in self.model.named_parameters():
            weight = full_tensor(param.detach())
            grad = full_tensor(param.grad.detach()) if self.write_grads and param.grad is not None else None
            if writer is None:
                continue
            writer.add_histogram(f"{name}/histogram", weight.float().cpu(), epoch)
            if grad is not None:
                writer.add_histogram(f"{name}/gradient", grad.float().cpu(), epoch)
            if self.write_images:
                image = _weight_image(weight)
                if image is not None:
                    pixels, fmt = image
                    if fmt == "HW":
                        writer.add_image(f"{name}/image", pixels, epoch, dataformats=fmt)
                    else:
                        writer.add_images(f"{name}/image", pixels, epoch, dataformats=fmt)

    # -- graph ----------------------------------------------------------------------------------
    def _capture_graph_input(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook, called once: keeps the first batch's inputs for tracing at batch end."""
        self._graph_input = (args, dict(kwargs))
        self._remove_graph_hook()

    def _remove_graph_hook(self) -> None:
        if self._graph_hook is not None:
            self._graph_hook.remove()
            self._graph_hook = None

    def _write_graph(self) -> None:
        assert self._graph_input is not None
        args, kwargs = self._graph_input
        self._graph_input = None
        model: torch.nn.Module = self.model
        if kwargs:
            model = _KeywordCall(model, list(kwargs), len(args))
            args = (*args, *kwargs.values())
        printed = io.StringIO()
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(printed):
                # the tracer's own notes (data-dependent branches, its deprecation) are not the user's to act on
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
                self._writer("train").add_graph(model, args, use_strict_trace=False)
        except Exception as exc:
            warnings.warn(
                f"TensorBoard: write_graph could not trace {type(self.model).__name__}, so no graph was "
                f"written ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}). "
                "Pass write_graph=False to skip it.",
                stacklevel=2,
            )

    # -- profiler -------------------------------------------------------------------------------
    def _start_profiler(self) -> None:
        try:
            handler = torch.profiler.tensorboard_trace_handler(os.path.join(self.log_dir, "train"))
            profiler = torch.profiler.profile(on_trace_ready=handler)
            profiler.start()
        except Exception as exc:  # a profiler that cannot start must not stop training
            warnings.warn(f"TensorBoard: could not start the profiler ({exc!r}); profile_batch is ignored", stacklevel=2)
            return
        self._profiler = profiler

    def _stop_profiler(self) -> None:
        if self._batch_trace is not None:
            self._batch_trace.__exit__(None, None, None)
            self._batch_trace = None
        profiler, self._profiler = self._profiler, None
        if profiler is not None:
            profiler.stop()  # writes the trace through the handler

    # -- embeddings -----------------------------------------------------------------------------
    def _embedding_layers(self) -> dict[str, torch.nn.Embedding | torch.nn.EmbeddingBag]:
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
        }

    def _resolve_embedding_metadata(self) -> dict[str, tuple[list[Any], list[str] | None]]:
        layers = self._embedding_layers()
        source = self.embeddings_metadata
        if source is None:
            return {}
        if isinstance(source, Mapping):
            unknown = sorted(set(source) - set(layers))
            if unknown:
                raise ValueError(
                    f"embeddings_metadata: no embedding layer named {unknown}; the model's embedding layers "
                    f"are {sorted(layers)}"
                )
            sources = dict(source)
        else:
            sources = dict.fromkeys(layers, source)
        labels = {}
        for name, item in sources.items():
            rows, header = _read_metadata(item)
            count = layers[name].weight.shape[0]
            if len(rows) != count:
                raise ValueError(
                    f"embeddings_metadata[{name!r}]: {len(rows)} labels for an embedding with {count} rows"
                )
            labels[name] = (rows, header)
        return labels

    def _write_embeddings(self, epoch: int) -> None:
        """The embedding layers for the projector. For an FSDP2 model, called on every process: each
        weight is gathered in full in turn; rank 0 writes."""
        writer = self._writer("train") if is_main_process() else None
        for name, layer in self._embedding_layers().items():
            weight = full_tensor(layer.weight.detach())
            if writer is None:
                continue
            rows, header = self._embedding_labels.get(name, (None, None))
            weight = weight.float().cpu()
            writer.add_embedding(weight, metadata=rows, metadata_header=header, global_step=epoch, tag=name)
