"""The one place that knows about processes: rank, world size and "main process only".

Everything else in the library asks this module instead of calling `torch.distributed` itself, so
that a single-process run never touches the distributed package and a distributed run follows one set
of rules (rank 0 writes, every rank takes part in reductions).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

_F = TypeVar("_F", bound=Callable[..., Any])


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process.

    Example:

    ```python
    if is_distributed():
        sampler = DistributedSampler(dataset)
    ```
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 outside a process group.

    Example:

    ```python
    log_file = f"train-rank{get_rank()}.log"
    ```
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 outside a process group.

    Example:

    ```python
    global_batch_size = batch_size * get_world_size()
    ```
    """
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that writes files, draws progress bars and posts to servers.

    Example:

    ```python
    if is_main_process():
        save_weights(model, "model.safetensors")
    barrier()
    ```
    """
    return get_rank() == 0


def main_process_only(method: _F) -> _F:
    """Decorator: the wrapped function runs on the main process (rank 0) only; elsewhere it returns None.

    It is how callbacks that write files, draw or post to servers (`TensorBoard`, `CSVLogger`,
    `RemoteMonitor`) obey "rank 0 writes": each of their hooks is decorated, so the other ranks skip
    them entirely (they do not even read lazy batch logs, so they are not slowed down by a device
    sync). The rank is read when the hook is called, not when the class is defined, so a callback
    created before `init_process_group` behaves right. A decorated function must not take part in
    a collective, since only one rank runs it. Outside a process group every call runs.

    Args:
        method: the function or method to guard.

    Example:

    ```python
    class WriteLoss(Callback):
        @main_process_only
        def on_epoch_end(self, epoch, logs=None):
            print(epoch, logs["loss"], file=self.file)
    ```
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not is_main_process():
            return None
        return method(*args, **kwargs)

    # A `CallbackList` dispatches a decorated hook as `method` itself on the main process and not at
    # all elsewhere (it reads the rank when a run begins), so the per-batch hooks skip the wrapper.
    wrapper.main_process_only = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def dispatched_hook(method: Callable[..., Any], main: bool) -> Callable[..., Any] | None:
    """The callable a loop should call for the bound hook `method` on a process where `is_main_process()`
    is `main`: the hook itself, or for one decorated with `main_process_only` the undecorated method on
    the main process and None (nothing to call) elsewhere.

    Args:
        method: a bound hook, e.g. `callback.on_train_batch_end`.
        main: whether this is the main process.

    Example:

    ```python
    hook = dispatched_hook(tensorboard.on_train_batch_end, is_main_process())
    ```
    """
    function = getattr(method, "__func__", None)
    if not getattr(function, "main_process_only", False):
        return method
    if not main:
        return None
    return function.__wrapped__.__get__(method.__self__)  # type: ignore[attr-defined,union-attr]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / `torch.compile` wrappers.

    Wrappers nested in one another are all removed; a plain module comes back as it is.

    Args:
        model: a module, possibly wrapped.

    Example:

    ```python
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(model)) is model
    ```
    """
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def has_dtensors(tensors: Iterable[torch.Tensor]) -> bool:
    """True when one of `tensors` is a `DTensor` (the parameters of an FSDP2 `fully_shard` model).

    Args:
        tensors: e.g. `model.parameters()` or `model.state_dict().values()`.

    Example:

    ```python
    if has_dtensors(model.parameters()):
        ...  # every process must take part in gathering them
    ```
    """
    if "torch.distributed.tensor" not in sys.modules:
        return False  # no DTensor can exist before its module is imported (and importing it costs ~0.7 s)
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor`: a `DTensor` gathered with `full_tensor()` (a collective: every process
    of its mesh must call it at the same point), any other tensor as it is.

    Args:
        tensor: a tensor or a DTensor.

    Example:

    ```python
    for name, param in model.named_parameters():  # on every process
        whole = full_tensor(param.detach())
    ```
    """
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


@main_process_only
def print_main(message: str) -> None:
    """Print `message` on the main process only (verbose messages of callbacks).

    Args:
        message: the text to print (flushed at once).

    Example:

    ```python
    print_main(f"Epoch {epoch + 1}: reducing learning rate to {lr}.")
    ```
    """
    print(message, flush=True)


def collective_device() -> torch.device:
    """Where the tensors of a collective must live: the current CUDA device with NCCL, else the CPU.

    (NCCL only reduces CUDA tensors; gloo reduces CPU tensors. The NCCL path is written for GPUs but
    is not exercised by the CPU test suite.) Call it only inside an initialised process group.

    Example:

    ```python
    flag = torch.tensor(1.0, device=collective_device())
    torch.distributed.all_reduce(flag)
    ```
    """
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (nothing outside a process group).

    Used after a file is saved on the main process, before any process may read it.

    Example:

    ```python
    if is_main_process():
        save_weights(model, "best.safetensors")
    barrier()
    load_weights(model, "best.safetensors")  # every process sees the complete file
    ```
    """
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def any_process(flag: bool) -> bool:
    """True when `flag` is True on any process (an all-reduce in a process group, else `flag`).

    Every process must call it at the same point, so a decision taken on per-process values (e.g. a
    per-batch loss) is the same everywhere and no process waits in a collective another one skipped.

    Args:
        flag: this process's answer.

    Example:

    ```python
    if any_process(not math.isfinite(loss)):
        model.stop_training = True  # on every process at once
    ```
    """
    if not is_distributed():
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reduce_weighted_means(
    sums: Mapping[str, tuple[torch.Tensor | float | None, float]],
) -> dict[str, torch.Tensor]:
    """Means over all processes' samples from per-process `(weighted sum, total weight)` pairs.

    The sums and weights of every name are added up across processes in ONE all-reduce (not one per
    value), then divided: the mean over all samples, not a mean of per-process means. Outside a
    process group this is just `sum / weight`. Names whose total weight is 0 are left out. Every
    process must call it at the same point with the same names in the same order.

    Returns 0-d float64 tensors (float32 on MPS) on the device of the first sum given.

    Args:
        sums: name -> `(weighted sum, total weight)` of this process; a sum may be a tensor, a float,
            or None (taken as 0).

    Example:

    ```python
    means = reduce_weighted_means({"loss": (loss_sum, n_samples), "mae": (mae_sum, n_samples)})
    epoch_loss = means["loss"].item()
    ```
    """
    if not sums:
        return {}
    first = next((s for s, _ in sums.values() if isinstance(s, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = torch.float32 if device.type == "mps" else torch.float64
    parts = [
        s.detach().reshape(()).to(device, dtype) if isinstance(s, torch.Tensor)
        else torch.tensor(float(s or 0.0), dtype=dtype, device=device)
        for s, _ in sums.values()
    ]
    weights = torch.tensor([float(w) for _, w in sums.values()], dtype=dtype, device=device)
    packed = torch.cat([torch.stack(parts), weights])
    totals = [float(w) for _, w in sums.values()]
    if is_distributed():
        reduced = packed.to(collective_device(), torch.float64)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        totals = reduced[len(parts):].tolist()  # the weights: one small copy, needed to drop empty names
        packed = reduced.to(device, dtype)
    n = len(parts)
    return {name: packed[i] / packed[n + i] for i, name in enumerate(sums) if totals[i] > 0}


def mean_over_processes(values: Mapping[str, float]) -> dict[str, float]:
    """The plain mean of each number over all processes (one all-reduce for all of them).

    For values that are already means over equally many samples per process (e.g. batch logs under a
    `DistributedSampler`). Values that are not numbers are kept as they are. Outside a process group
    the values come back unchanged. Every process must call it at the same point with the same keys.

    Args:
        values: name -> this process's number.

    Example:

    ```python
    logs = mean_over_processes({"loss": 0.25, "accuracy": 0.9})  # the same on every process
    ```
    """
    out = dict(values)
    keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not is_distributed() or not keys:
        return out
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    out.update(zip(keys, (packed / get_world_size()).tolist(), strict=True))
    return out


def reduce_logs(logs: Mapping[str, Any], weight: float = 1.0) -> dict[str, float]:
    """Epoch logs averaged over processes, weighting each process's values by `weight` (its number of
    samples), in one all-reduce: for hand-written loops, so that every process's callbacks see the same
    numbers (`fit` reduces its logs itself). Tensor values are read once (`to_floats`).

    Args:
        logs: this process's epoch logs (numbers or 0-d tensors; other values are kept as they are).
        weight: this process's weight, usually its number of samples this epoch.

    Example:

    ```python
    logs = reduce_logs({"loss": epoch_loss_sum / n_local, "val_loss": ...}, weight=n_local)
    callbacks.on_epoch_end(epoch, logs)
    ```
    """
    from torchcallbacks.logs import to_floats

    floats = to_floats(logs)
    numbers = {k: v for k, v in floats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    means = reduce_weighted_means({k: (float(v) * weight, float(weight)) for k, v in numbers.items()})
    floats.update(to_floats(means))
    return floats


def _gather_padded(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension may differ between processes (padded, then cut)."""
    device = tensor.device
    local = tensor.to(collective_device())
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if local.shape[0] < longest:
        pad = torch.zeros((longest - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local.contiguous())
    return [part[:count].to(device) for part, count in zip(parts, counts, strict=True)]


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (same dtype and trailing shape; the first dimension may differ), in
    rank order. Outside a process group: `[tensor]`.

    Every process must call it at the same point.

    Args:
        tensor: this process's tensor (at least one dimension).

    Example:

    ```python
    predictions = torch.cat(all_gather_tensors(local_predictions))
    ```
    """
    if not is_distributed():
        return [tensor]
    return _gather_padded(tensor)


def all_gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in rank order (sent as UTF-8 JSON bytes: no pickle).
    Outside a process group: `[value]`.

    Every process must call it at the same point.

    Args:
        value: this process's value (anything `json.dumps` accepts; NaN and infinities included).

    Example:

    ```python
    states = all_gather_json(callback.state_dict())  # states[rank] is that process's state
    ```
    """
    if not is_distributed():
        return [value]
    data = torch.frombuffer(bytearray(json.dumps(value, allow_nan=True).encode()), dtype=torch.uint8)
    return [json.loads(part.cpu().numpy().tobytes().decode()) for part in _gather_padded(data)]


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call `set_epoch(epoch)` on the loader's sampler when it has one (`loader.sampler`, else
    `loader.batch_sampler`, else `loader.batch_sampler.sampler`), as a `DistributedSampler` needs it
    each epoch to draw a new shuffle order (without it every epoch repeats epoch 0's order).

    Args:
        loader: a `DataLoader` or any object with such attributes (others are left alone).
        epoch: the epoch about to start.

    Example:

    ```python
    for epoch in range(epochs):
        set_sampler_epoch(loader, epoch)
        for x, y in loader:
            ...
    ```
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return
