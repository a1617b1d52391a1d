"""Turning a loader into epochs of numbered batches: `steps_per_epoch`, endless iterables, and the
position in the data as part of the training state (exact resume)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

import torch

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.rng import capture_rng_state, restore_rng_state
from torchcallbacks.checkpoint.validate import check_counter, check_generator_state, check_rng_state
from torchcallbacks.distributed import all_gather_json, any_process, is_distributed
from torchcallbacks.training import fingerprint
from torchcallbacks.training.fingerprint import DataOrderWarning
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

    The state also holds a `fingerprint` of the data (`training.fingerprint`): the dataset's and the
    loader's lengths, and a digest of the pass's indices (a DataLoader over a map-style dataset), or
    of its first batch (data without indices). `load_state_dict` recomputes it from the restored
    state and compares: a difference (the dataset changed length or content, the sampler drew other
    indices from the same random state: not seeded from the loader's generator or the global one,
    or holding a state of its own the backup does not hold) is a `DataOrderWarning` naming what
    changed, or a `CheckpointError` with `strict`. Nothing of it is computed per batch.

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
        self._loader_iterator: Iterator[Any] | None = None  # iter(data) itself, for close()
        # The fingerprint of the current pass: a copy of the index sampler taken before iter(data),
        # its indices' digest (drawn from it when a state is first saved in the pass) and the digest
        # of the first batch (data without indices).
        self._pass_sampler: fingerprint.SamplerSnapshot | None = None
        self._pass_indices: tuple[str, int | None] | None = None
        self._first_batch: str | None = None
        self._report_to: tuple[str | None, int | None, bool] = (None, None, False)  # source, epoch, strict

    # -- the position as state ----------------------------------------------------------------
    def _rng(self) -> dict[str, Any]:
        return {"global": capture_rng_state(), "generators": [g.get_state() for g in _generators(self.data)]}

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        restore_rng_state(state["global"])
        for generator, saved in zip(_generators(self.data), state["generators"], strict=True):
            generator.set_state(saved)

    @contextlib.contextmanager
    def _random_state(self, state: Mapping[str, Any]) -> Iterator[None]:
        """Inside: the random generators at `state`; afterwards exactly as they were before."""
        before = self._rng()
        self._restore_rng(state)
        try:
            yield
        finally:
            self._restore_rng(before)

    def _fingerprint(self, in_pass: bool, rng: Mapping[str, Any]) -> dict[str, Any]:
        """The fingerprint of the pass under way (`in_pass`), else of the pass the next `epoch()`
        starts from the random state `rng` (the one saved with it)."""
        found: dict[str, Any] = {
            "samples": fingerprint.dataset_length(self.data), "batches": known_length(self.data),
            "indices": None, "sampler_epoch": None, "first_batch": None,
        }
        if _uses_own_state(self.data):
            return found
        if in_pass:
            if self._pass_indices is None and self._pass_sampler is not None and self._pass_rng is not None:
                with self._random_state(self._pass_rng):
                    self._pass_indices = self._pass_sampler.indices()
            found["first_batch"] = self._first_batch
            drawn = self._pass_indices
        else:
            taken = fingerprint.snapshot(self.data)
            drawn = None
            if taken is not None:
                with self._random_state(rng):
                    drawn = taken.indices()
        if drawn is not None:
            found["indices"], found["sampler_epoch"] = drawn
        return found

    def state_dict(self) -> dict[str, Any]:
        """The position in the data (see the class docstring); tensors are random states.

        Example:

        ```python
        state = batches.state_dict()
        state["epoch_batch"]  # batches of the current epoch taken so far
        ```
        """
        rng = self._rng()
        state: dict[str, Any] = {"epoch_batch": self._epoch_batch, "rng": rng}
        in_pass = self._iterator is not None
        if _uses_own_state(self.data):
            state["loader"] = self.data.state_dict()  # type: ignore[attr-defined]
        else:
            state["consumed"] = self._consumed if in_pass else 0
            state["pass_rng"] = self._pass_rng if in_pass else None
        state["fingerprint"] = self._fingerprint(in_pass, rng)
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
        saved = state.get("fingerprint")
        if saved is None:  # a state saved before fingerprints: nothing to compare
            return
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where}: field 'fingerprint' must be a dict, found {saved!r}")
        for name in ("samples", "batches"):
            if saved.get(name) is not None:
                check_counter(saved[name], where, f"fingerprint/{name}")
        epoch = saved.get("sampler_epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise ValueError(f"{where}: field 'fingerprint/sampler_epoch' must be an integer or null, found {epoch!r}")
        for name in ("indices", "first_batch"):
            if saved.get(name) is not None and not isinstance(saved[name], str):
                raise ValueError(f"{where}: field 'fingerprint/{name}' must be a digest (a string) or null, found {saved[name]!r}")

    def _difference(self, state: Mapping[str, Any]) -> str | None:
        """What differs between the data the checked `state` was saved on and this data, in words
        (lengths, then the indices drawn from the saved random state); None if nothing does or the
        state has no fingerprint."""
        saved = state.get("fingerprint")
        if not saved:
            return None
        samples = fingerprint.dataset_length(self.data)
        if saved.get("samples") is not None and samples is not None and samples != saved["samples"]:
            return f"the dataset had {saved['samples']} samples and has {samples} now"
        batches = known_length(self.data)
        if saved.get("batches") is not None and batches is not None and batches != saved["batches"]:
            return (f"{self.name} had {saved['batches']} batches per pass and has {batches} now (another batch_size, "
                    "drop_last or sampler?)")
        if saved.get("indices") is None or "loader" in state:
            return None
        taken = fingerprint.snapshot(self.data)
        if taken is None:
            return None
        with self._random_state(state["pass_rng"] if state.get("pass_rng") is not None else state["rng"]):
            drawn, _ = taken.indices(saved.get("sampler_epoch"))
        if drawn == saved["indices"]:
            return None
        message = ("the sampler drew other indices from the same random state: is it seeded from the loader's generator "
                   "or the global one? (A sampler shuffling with a random.Random or a torch.Generator of its own that the "
                   "backup does not hold draws another order on resume; so do another sampler, shuffle setting or world "
                   "size.)")
        if getattr(self.data, "persistent_workers", False) and getattr(self.data, "num_workers", 0) > 0:
            message += (" With persistent_workers=True the loader draws a base seed at its first pass only, and a resumed "
                        "loader's first pass is a later epoch's: its order differs unless the sampler has a generator of "
                        "its own (RandomSampler(generator=...)).")
        return message

    def _report(self, difference: str) -> None:
        """A `DataOrderWarning` (a `CheckpointError` when strict) naming the file, the epoch and what differs."""
        source, epoch, strict = self._report_to
        where = repr(source) if source is not None else "the state it was loaded from"
        which = f"epoch {epoch + 1}" if epoch is not None else "the resumed epoch"
        message = f"the data order of {which} differs from the one saved in {where}: {difference}"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, DataOrderWarning, stacklevel=2)

    def load_state_dict(
        self, state: Mapping[str, Any], source: str | None = None, epoch: int | None = None, strict: bool = False,
    ) -> None:
        """Check a position from `state_dict()` and resume from it at the next `epoch()`.

        Its fingerprint is compared with this data's (see the class docstring): the lengths and the
        indices drawn from the saved random state now, the first batch (data without indices) when
        the resumed pass fetches it again. A state without a fingerprint (saved by an older
        version) is taken as it is. `LoopState.load_state_dict` passes `source`, `epoch` and
        `strict` (`BackupAndRestore(strict_data=...)`).

        Args:
            state: a position from `state_dict()`.
            source: where it was read from (a file), for the message.
            epoch: the epoch (0-based) the resumed run continues at, for the message.
            strict: a difference of the fingerprint is a `CheckpointError` instead of a `DataOrderWarning`.

        Raises:
            CheckpointError: with `strict`, when the data differs (before anything is changed, except
                for a first batch, compared when the resumed epoch starts).
            ValueError: the state is not a position (a field of the wrong kind, named).

        Example:

        ```python
        batches.load_state_dict(saved)
        for index, batch in batches.epoch():  # index starts at saved["epoch_batch"]
            ...
        ```
        """
        self._check(state)
        self._report_to = (source, epoch, bool(strict))
        difference = self._difference(state)
        if difference is not None:
            self._report(difference)
        self._resume = dict(state)

    def _apply_resume(self) -> None:
        state, self._resume = self._resume, None
        assert state is not None
        self._epoch_batch = state["epoch_batch"]
        self._loader_iterator = None
        if "loader" in state:
            self.data.load_state_dict(state["loader"])  # type: ignore[attr-defined]
            self._iterator, self._consumed, self._pass_rng = iter(self.data), 0, None
        elif state["pass_rng"] is not None:
            self._restore_rng(state["pass_rng"])
            self._pass_rng = state["pass_rng"]
            self._iterator, self._consumed = self._resumed_pass(state), state["consumed"]
        else:
            self._iterator, self._consumed, self._pass_rng = None, 0, None
        self._restore_rng(state["rng"])

    def _resumed_pass(self, state: Mapping[str, Any]) -> Iterator[Any]:
        """`iter(data)` positioned after the pass's `consumed` batches, under the pass's random state;
        for data without indices its first batch is digested on the way and compared with the saved one."""
        self._pass_indices, self._first_batch = None, None
        self._pass_sampler = fingerprint.snapshot(self.data)
        if self._pass_sampler is not None or fingerprint.index_sampler(self.data) is not None:
            return iterate_from(self.data, state["consumed"])
        self._loader_iterator = iterator = iter(self.data)
        head, self._first_batch = fingerprint.first_batch(self.data, iterator)
        saved = (state.get("fingerprint") or {}).get("first_batch")
        if saved is not None and self._first_batch is not None and saved != self._first_batch:
            self._report("the first batch of the pass differs: the data changed, or it draws random numbers from "
                         "something the backup does not hold (a generator of its own, an IterableDataset without a "
                         "state_dict)")
        return iterate_from(head, state["consumed"])

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
        iterator = self._loader_iterator if self._loader_iterator is not None else self._iterator
        self._iterator = None
        self._loader_iterator = None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if callable(shutdown):
            shutdown()

    # -- iteration ------------------------------------------------------------------------------
    def _new_pass(self) -> Iterator[Any]:
        own = _uses_own_state(self.data)
        self._pass_rng = self._rng() if not own else None
        # The fingerprint: the index sampler as this pass starts (its digest is drawn from this copy
        # when a state is saved), or, for data without indices, the first batch's digest.
        self._pass_sampler = fingerprint.snapshot(self.data) if not own else None
        self._pass_indices, self._first_batch = None, None
        self._consumed = 0
        self._iterator = self._loader_iterator = iter(self.data)
        if not own and self._pass_sampler is None and fingerprint.index_sampler(self.data) is None:
            self._iterator, self._first_batch = fingerprint.first_batch(self.data, self._iterator)
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
                self._iterator = self._loader_iterator = None

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
