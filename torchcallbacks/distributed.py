"""The one place that knows about processes: rank, world size and "main process only".

Everything else in the library asks this module instead of calling `torch.distributed` itself, so
that a single-process run never touches the distributed package and a distributed run follows one set
of rules (rank 0 writes, every rank takes part in reductions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

_F = TypeVar("_F", bound=Callable[..., Any])


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 outside a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 outside a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that writes files, draws progress bars and posts to servers."""
    return get_rank() == 0


def main_process_only(method: _F) -> _F:
    """Decorator: the wrapped function runs on the main process (rank 0) only; elsewhere it returns None.

    It is how callbacks that write files, draw or post to servers (`TensorBoard`, `CSVLogger`,
    `RemoteMonitor`) obey "rank 0 writes": each of their hooks is decorated, so the other ranks skip
    them entirely (they do not even read lazy batch logs, so they are not slowed down by a device
    sync). The rank is read when the hook is called, not when the class is defined, so a callback
    created before `init_process_group` behaves right. A decorated function must not take part in
    a collective, since only one rank runs it. Outside a process group every call runs.

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

    return wrapper  # type: ignore[return-value]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / `torch.compile` wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@main_process_only
def print_main(message: str) -> None:
    """Print `message` on the main process only (verbose messages of callbacks)."""
    print(message, flush=True)


def any_process(flag: bool) -> bool:
    """True when `flag` is True on any process (an all-reduce in a process group, else `flag`).

    Every process must call it at the same point, so a decision taken on per-process values (e.g. a
    per-batch loss) is the same everywhere and no process waits in a collective another one skipped.
    """
    if not is_distributed():
        return flag
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
