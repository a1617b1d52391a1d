"""Turning a loader into epochs of numbered batches: `steps_per_epoch`, endless iterables, and the
position in the data as part of the training state (exact resume)."""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

import torch

from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checkpoint.validate import check_counter, check_generator_state, check_rng_state
from torchcallbacks.distributed import all_gather_json, any_process, is_distributed
from torchcallbacks.training.skipping import iterate_from


def check_steps(value: int | None, name: str) -> int | None:
    """`value` when it is None or an integer >= 1, else a `ValueError` that names the argument.

    Args:
        value: the argument as given (e.g. `steps_per_epoch`).
        name: its name, for the message.

    Example:

    ```python
    steps = check_steps(steps_per_epoch, "steps_per_epoch")
    ```
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected None or an integer >= 1, received {value!r}")
    return value


def known_length(data: Iterable[Any]) -> int | None:
    """`len(data)` when the loader has one, else None (an iterable dataset, a generator).

    Args:
        data: an iterable of batches.

    Example:

    ```python
    known_length(DataLoader(dataset, batch_size=32))  # the number of batches
    known_length(batch for batch in loader)  # None
    ```
    """
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _generators(data: Any) -> list[torch.Generator]:
    """The loader's own random generators (its `generator`, its sampler's and its batch sampler's
    sampler's), each once, in a fixed order: with the global ones they decide the data order."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(data, "batch_sampler", None)
    for owner in (data, getattr(data, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _uses_own_state(data: Any) -> bool:
    """A loader that saves and restores its own position (torchdata's `StatefulDataLoader`)."""
    return callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))


def check_same_length(data: Iterable[Any], name: str) -> None:
    """Under `torch.distributed`, a `ValueError` naming `name` and every process's batch count when
    the processes' loaders have different lengths (one all-gather; nothing outside a process group).

    A process that runs out of batches first leaves the others waiting in DDP's gradient all-reduce
    (a hang) or pairs their collectives wrongly, so `fit` refuses it at train begin. Loaders without
    a length cannot be compared ahead: `EpochIterator` agrees on their end batch by batch instead.

    Args:
        data: this process's loader.
        name: its argument's name, for the message.

    Example:

    ```python
    check_same_length(loader, "x")  # at train begin, on every process
    ```
    """
    from torchcallbacks.distributed import all_gather_json, is_distributed

    if not is_distributed():
        return
    counts = all_gather_json(known_length(data))
    if len(set(counts)) > 1:
        shown = ", ".join(f"process {rank}: {'unknown' if n is None else n}" for rank, n in enumerate(counts))
        raise ValueError(
            f"{name}: the processes have different numbers of batches per epoch ({shown}); a process that runs "
            "out first would leave the others waiting in a collective. Shard with a DistributedSampler "
            f"(equal shards), or pass steps_per_epoch (at most the smallest count) so that every process takes "
            "as many batches"
        )


class EpochIterator:
    """Numbered batches, one epoch at a time, with the position in the data as state.

    Without `steps`, each epoch is one full pass (`iter(data)` anew). With `steps`, each epoch takes
    that many batches from one iterator that carries over between epochs, starting a new pass when a
    pass ends, as Keras does; a loader that runs dry (a generator) ends training with a warning.

    Its `state_dict()` is the position: the batches taken from the current pass and in the current
    epoch, the random state the pass's order was drawn from (torch's, numpy's and Python's global
    generators and the loader's and sampler's own `generator`s, captured right before `iter(data)`),
    and the random state at the time of saving. After `load_state_dict`, the next `epoch()` restores
    the pass's random state, creates the iterator, skips the batches already taken (without loading
    them for a DataLoader over a map-style dataset without workers; with workers they are loaded, so
    that worker-side random draws match), restores the random state of the moment of saving, and
    yields the rest of the interrupted epoch. A loader with its own `state_dict()` /
    `load_state_dict()` (torchdata's `StatefulDataLoader`) is positioned through them instead.

    Under torch.distributed, for data without a length, the processes agree before each batch (one
    all-reduce) that every one of them has one, so all of them end the epoch at the same batch: the
    shortest process's count, with a warning naming the processes that had more (`even_end`).

    Args:
        data: an iterable of batches, e.g. a `torch.utils.data.DataLoader`.
        steps: batches per epoch (validated with `check_steps`), or None for one pass.
        name: the argument's name, for error messages.
        even_end: under torch.distributed, end each epoch at the same batch on every process for
            data without a length (as training needs: each process must take as many steps). False
            lets each process take all its own batches (evaluation, prediction).

    Example:

    ```python
    batches = EpochIterator(loader, steps=100, name="x")
    callbacks.loop.track("data", batches)  # backups hold the position; a resume continues from it
    for epoch in range(epochs):
        for index, batch in batches.epoch():
            train(batch)
    ```
    """

    def __init__(self, data: Iterable[Any], steps: int | None = None, name: str = "x", *, even_end: bool = True) -> None:
        if not isinstance(data, Iterable):
            raise TypeError(
                f"{name}: expected an iterable of batches (e.g. a torch.utils.data.DataLoader), "
                f"received {type(data).__name__}"
            )
        self.data = data
        self.steps = steps
        self.name = name
        self.even_end = even_end
        self.exhausted = False
        self._iterator: Iterator[Any] | None = None
        self._consumed = 0  # batches taken from the current pass
        self._epoch_batch = 0  # batches yielded in the current epoch
        self._pass_rng: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None

    # -- the position as state ----------------------------------------------------------------
    def _rng(self) -> dict[str, Any]:
        return {"global": capture_rng_state(), "generators": [g.get_state() for g in _generators(self.data)]}

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        restore_rng_state(state["global"])
        for generator, saved in zip(_generators(self.data), state["generators"], strict=True):
            generator.set_state(saved)

    def state_dict(self) -> dict[str, Any]:
        """The position in the data (see the class docstring); tensors are random states.

        Example:

        ```python
        state = batches.state_dict()
        state["epoch_batch"]  # batches of the current epoch taken so far
        ```
        """
        state: dict[str, Any] = {"epoch_batch": self._epoch_batch, "rng": self._rng()}
        if _uses_own_state(self.data):
            state["loader"] = self.data.state_dict()  # type: ignore[attr-defined]
            return state
        in_pass = self._iterator is not None
        state["consumed"] = self._consumed if in_pass else 0
        state["pass_rng"] = self._pass_rng if in_pass else None
        return state

    def _check(self, state: Mapping[str, Any]) -> None:
        where = f"{self.name} position"
        check_counter(state.get("epoch_batch"), where, "epoch_batch")
        for name in ("rng", *(["pass_rng"] if state.get("pass_rng") is not None else [])):
            rng = state.get(name)
            if not isinstance(rng, Mapping):
                raise ValueError(f"{where}: field {name!r} must be a random state, found {rng!r}")
            check_rng_state(rng.get("global"), where, f"{name}/global")
            saved = rng.get("generators")
            if not isinstance(saved, list) or len(saved) != len(_generators(self.data)):
                raise ValueError(
                    f"{where}: field '{name}/generators' holds {len(saved) if isinstance(saved, list) else saved!r} "
                    f"generator state(s); the loader has {len(_generators(self.data))}"
                )
            for i, generator_state in enumerate(saved):
                check_generator_state(generator_state, where, f"{name}/generators/{i}")
        if "loader" not in state:
            check_counter(state.get("consumed"), where, "consumed")
        elif not _uses_own_state(self.data):
            raise ValueError(f"{where}: the state was saved by a loader with its own state_dict; {self.name} has none")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check a position from `state_dict()` and resume from it at the next `epoch()`.

        Example:

        ```python
        batches.load_state_dict(saved)
        for index, batch in batches.epoch():  # index starts at saved["epoch_batch"]
            ...
        ```
        """
        self._check(state)
        self._resume = dict(state)

    def _apply_resume(self) -> None:
        state, self._resume = self._resume, None
        assert state is not None
        self._epoch_batch = state["epoch_batch"]
        if "loader" in state:
            self.data.load_state_dict(state["loader"])  # type: ignore[attr-defined]
            self._iterator, self._consumed, self._pass_rng = iter(self.data), 0, None
        elif state["pass_rng"] is not None:
            self._restore_rng(state["pass_rng"])
            self._pass_rng = state["pass_rng"]
            self._iterator, self._consumed = iterate_from(self.data, state["consumed"]), state["consumed"]
        else:
            self._iterator, self._consumed, self._pass_rng = None, 0, None
        self._restore_rng(state["rng"])

    def close(self) -> None:
        """Let go of the data iterator now: a DataLoader's worker processes are shut down, also when
        the iterator is still referenced elsewhere (e.g. by an exception's traceback).

        Example:

        ```python
        try:
            train(batches)
        finally:
            batches.close()
        ```
        """
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if callable(shutdown):
            shutdown()

    # -- iteration ------------------------------------------------------------------------------
    def _new_pass(self) -> Iterator[Any]:
        self._pass_rng = self._rng() if not _uses_own_state(self.data) else None
        self._consumed = 0
        self._iterator = iter(self.data)
        return self._iterator

    def epoch(self) -> Generator[tuple[int, Any], None, None]:
        """Yield `(index, batch)` for one epoch (after a `load_state_dict`, the rest of the interrupted
        epoch, from the index it stopped at).

        Example:

        ```python
        for index, batch in batches.epoch():
            train(batch)
        ```
        """
        if self._resume is not None:
            self._apply_resume()
            start = self._epoch_batch
        else:
            start = self._epoch_batch = 0
        try:
            if self.even_end and known_length(self.data) is None and is_distributed():
                yield from self._agreed_epoch(start)
                return
            if self.steps is None:
                iterator = self._iterator if self._iterator is not None else self._new_pass()
                for index, batch in enumerate(iterator, start):
                    self._consumed += 1
                    self._epoch_batch = index + 1
                    yield index, batch
                return
            for index in range(start, self.steps):
                batch = self._next()
                if batch is _END:
                    self.exhausted = True
                    warnings.warn(
                        f"{self.name} ran out of data after {index} of {self.steps} steps in this epoch; "
                        "training stops. Make sure the loader can provide steps_per_epoch * epochs batches.",
                        stacklevel=4,
                    )
                    return
                self._epoch_batch = index + 1
                yield index, batch
        finally:
            # The epoch is over (done, or left by a stop or an error): the next one starts at its first
            # batch, and without steps with a new pass.
            self._epoch_batch = 0
            if self.steps is None:
                self._iterator = None

    def _agreed_epoch(self, start: int) -> Generator[tuple[int, Any], None, None]:
        """`epoch()` for data without a length under torch.distributed: before each batch the processes
        agree (one all-reduce) on whether every one of them has one, so all of them end the epoch at
        the same batch, the shortest process's count, instead of waiting in a collective for a batch
        another process never trains."""
        index = start
        while self.steps is None or index < self.steps:
            if self.steps is None:
                iterator = self._iterator if self._iterator is not None else self._new_pass()
                batch = next(iterator, _END)
                self._consumed += batch is not _END
            else:
                batch = self._next()
            if any_process(batch is _END):
                self._uneven_end(index, batch is _END)
                return
            self._epoch_batch = index + 1
            yield index, batch
            index += 1

    def _uneven_end(self, index: int, ran_out: bool) -> None:
        """Some process ran out of batches at `index` (agreed): say which ones (one all-gather)."""
        ran_out_where = all_gather_json(ran_out)
        short = [rank for rank, out in enumerate(ran_out_where) if out]
        longer = [rank for rank, out in enumerate(ran_out_where) if not out]
        if self.steps is not None:
            self.exhausted = True
            warnings.warn(
                f"{self.name} ran out of data on process(es) {short} after {index} of {self.steps} steps in this "
                "epoch; training stops on every process. Make sure the loader can provide steps_per_epoch * epochs "
                "batches on each process.",
                stacklevel=5,
            )
        elif longer:
            warnings.warn(
                f"{self.name}: process(es) {short} ran out of batches after {index} batches in this epoch while "
                f"process(es) {longer} had more; every process ends the epoch there (each must train as many "
                "batches), so the rest of their data is not trained. Shard the data evenly, or give it a length "
                "or steps_per_epoch.",
                stacklevel=5,
            )

    def _next(self) -> Any:
        if self._iterator is not None:
            batch = next(self._iterator, _END)
            if batch is not _END:
                self._consumed += 1
                return batch
        batch = next(self._new_pass(), _END)
        if batch is not _END:
            self._consumed += 1
        return batch


_END = object()
