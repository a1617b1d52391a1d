"""The data-order fingerprint (issue 22 item 3): each backup holds, per process, the dataset's length and
a digest of the epoch's order (the sampler's indices, or the first batch of data without indices); a
resume recomputes it from the restored state and warns naming what changed (or refuses with
`strict_data`). It changes nothing that is trained."""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Crash, make_model
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    TensorDataset,
)

import torchcallbacks as tc
from torchcallbacks.callbacks.loop_state import LoopState
from torchcallbacks.checkpoint import read_training_state, write_training_state
from torchcallbacks.training import fingerprint
from torchcallbacks.training.data import known_length

DATA = Path(__file__).resolve().parent / "data"


def dataset(n: int = 40, scale: float = 1.0) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1)) * scale
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


class OwnRandomSampler(Sampler[int]):
    """Shuffles with a random.Random of its own: a state no backup holds."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rng = random.Random(0)

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.n))
        self.rng.shuffle(order)
        return iter(order)

    def __len__(self) -> int:
        return self.n


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Data without indices: batches drawn from the global generator, or from a generator of its own."""

    def __init__(self, own_generator: bool = False, scale: float = 1.0) -> None:
        self.generator = torch.Generator().manual_seed(5) if own_generator else None
        self.scale = scale

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(5):
            x = torch.randn(8, 4, generator=self.generator) * self.scale
            yield x, x.sum(dim=1, keepdim=True)


def batches(n: int = 40, scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of batches (data without indices)."""
    x, y = dataset(n, scale).tensors
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


LOADERS: dict[str, Callable[[], Any]] = {
    "shuffle, global generator": lambda: DataLoader(dataset(), batch_size=8, shuffle=True),
    "shuffle, loader generator": lambda: DataLoader(dataset(), batch_size=8, shuffle=True,
                                                    generator=torch.Generator().manual_seed(3)),
    "RandomSampler with its generator": lambda: DataLoader(
        dataset(), batch_size=8, sampler=RandomSampler(range(40), generator=torch.Generator().manual_seed(4))),
    "DistributedSampler (set_epoch)": lambda: DataLoader(
        dataset(), batch_size=8, sampler=DistributedSampler(dataset(), num_replicas=1, rank=0, seed=2)),
    "batch_size=None": lambda: DataLoader(dataset(), batch_size=None, shuffle=True),
    "list of batches": batches,
    "IterableDataset, global generator": lambda: DataLoader(Stream(), batch_size=None),
}


def train(data: Any, backup_dir: Path, *, crash: int | None = None, epochs: int = 4, save_freq: int | str = 2,
          strict_data: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """fit with a BackupAndRestore (and a crash after global step `crash`); the model and the messages
    of the DataOrderWarnings."""
    torch.manual_seed(0)
    model = make_model()
    callbacks: list[tc.Callback] = [tc.BackupAndRestore(backup_dir, save_freq=save_freq, strict_data=strict_data)]
    if crash is not None:
        callbacks.append(Crash(crash))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tc.fit(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                   loss=torch.nn.functional.mse_loss, epochs=epochs, verbose=0, callbacks=callbacks)
        except RuntimeError as error:
            if crash is None or str(error) != "crash":
                raise
        finally:
            # Persistent workers outlive the run (the loader holds them). They ignore SIGTERM (the
            # backup's shield), so the interpreter's exit, which terminates them by SIGTERM, would wait
            # for them forever: shut them down here.
            workers = getattr(data, "_iterator", None)
            if workers is not None:
                workers._shutdown_workers()
                data._iterator = None
    return model, [str(w.message) for w in caught if issubclass(w.category, tc.DataOrderWarning)]


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def saved_fingerprint(backup_dir: Path) -> dict[str, Any]:
    return read_training_state(backup_dir / "latest.safetensors")["loop"]["data"]["fingerprint"]


# -- what changed is named -----------------------------------------------------------------------------
def test_a_dataset_of_another_length_warns_naming_both_lengths_the_epoch_and_the_file(tmp_path: Path) -> None:
    train(DataLoader(dataset(40), batch_size=8, shuffle=True), tmp_path, crash=13)  # backup at step 12: epoch 3
    _, warned = train(DataLoader(dataset(48), batch_size=8, shuffle=True), tmp_path)
    assert len(warned) == 1, warned
    assert warned[0] == (f"the data order of epoch 3 differs from the one saved in {str(tmp_path / 'latest.safetensors')!r}: "
                         "the dataset had 40 samples and has 48 now")


def test_a_list_of_batches_of_other_content_warns(tmp_path: Path) -> None:
    """Data without indices is compared by the digest of the pass's first batch: the same number of
    batches, other values."""
    train(batches(), tmp_path, crash=7)
    _, warned = train(batches(scale=2.0), tmp_path)
    assert len(warned) == 1 and "the first batch of the pass differs" in warned[0], warned
    assert "epoch 2" in warned[0] and str(tmp_path) in warned[0]


def test_an_iterable_dataset_drawing_from_its_own_generator_warns(tmp_path: Path) -> None:
    """The generator of its own is not in the backup: the resumed pass's first batch is other data."""
    train(DataLoader(Stream(own_generator=True), batch_size=None), tmp_path, crash=7)
    _, warned = train(DataLoader(Stream(own_generator=True), batch_size=None), tmp_path)
    assert len(warned) == 1 and "the first batch of the pass differs" in warned[0], warned


@pytest.mark.parametrize(("crash", "save_freq", "epoch"), [(13, 1, 3), (7, "epoch", 2)], ids=["mid-epoch 3", "end of epoch 1"])
def test_a_sampler_with_a_state_of_its_own_warns_after_the_first_epoch(tmp_path: Path, crash: int, save_freq: int | str,
                                                                         epoch: int) -> None:
    """It shuffles with its own random.Random: resumed, it draws the first epoch's order again. In the first
    epoch that is the right order (no warning); later it is not, and the warning says so."""
    def make() -> DataLoader:
        return DataLoader(dataset(), batch_size=8, sampler=OwnRandomSampler(40))

    first = tmp_path / "first"
    train(make(), first, crash=3, save_freq=1)
    assert train(make(), first, save_freq=1)[1] == []

    train(make(), tmp_path / "later", crash=crash, save_freq=save_freq)
    _, warned = train(make(), tmp_path / "later", save_freq=save_freq)
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"the data order of epoch {epoch} differs from the one saved in ")
    assert "the sampler drew other indices" in warned[0] and "seeded from the loader's generator or the global one" in warned[0]


def test_another_shard_of_a_distributed_sampler_warns(tmp_path: Path) -> None:
    """Another world (here another rank's shard of the same size) draws other indices."""
    def make(rank: int) -> DataLoader:
        return DataLoader(dataset(), batch_size=4, sampler=DistributedSampler(dataset(), num_replicas=2, rank=rank, seed=2))

    train(make(0), tmp_path, crash=7)
    _, warned = train(make(1), tmp_path)
    assert len(warned) == 1 and "the sampler drew other indices" in warned[0], warned


# -- a resumable setup: no warning, nothing changed ----------------------------------------------------
@pytest.mark.parametrize("save_freq", [2, "epoch"])
@pytest.mark.parametrize("name", list(LOADERS))
def test_a_seeded_setup_resumes_exactly_without_a_warning(tmp_path: Path, name: str, save_freq: int | str) -> None:
    make = LOADERS[name]
    uninterrupted, warned = train(make(), tmp_path / "reference", save_freq=save_freq)
    assert warned == []
    steps = known_length(make()) or 5
    train(make(), tmp_path / "resumed", crash=2 * steps + 3, save_freq=save_freq)  # mid-epoch 3, or its start
    held = saved_fingerprint(tmp_path / "resumed")
    indices = fingerprint.index_sampler(make()) is not None
    if indices or save_freq == 2:  # data without indices holds its first batch mid-pass only
        assert isinstance(held["indices" if indices else "first_batch"], str), held
    resumed, warned = train(make(), tmp_path / "resumed", save_freq=save_freq)
    assert warned == []
    assert same(resumed, uninterrupted)


def test_saving_and_loading_the_fingerprint_changes_no_random_state_and_no_batch() -> None:
    """The indices are drawn from a copy of the sampler under the saved random state: the batches after a
    state_dict (mid-pass and between passes) and a load are those of a run without them, and the
    generators are where they were."""
    def make() -> tc.EpochIterator:
        sampler = OwnRandomSampler(40)  # even a sampler of its own is not advanced by the fingerprint
        return tc.EpochIterator(DataLoader(dataset(), batch_size=8, sampler=sampler, generator=torch.Generator()))

    def run(save: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        iterator, seen = make(), []
        for _ in range(3):
            for index, (x, _) in iterator.epoch():
                if save and index == 1:
                    before = torch.get_rng_state(), random.getstate()
                    state = iterator.state_dict()
                    assert isinstance(state["fingerprint"]["indices"], str)
                    other = make()  # what a resume does with it: the indices drawn from the saved state
                    other._check(state)
                    other._difference(state)
                    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
                seen.append(x)
            if save:
                iterator.state_dict()
        return seen

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True), strict=True))


# -- strict, old backups, a hand-written loop ------------------------------------------------------------
def test_strict_data_refuses_the_backup_naming_the_file_and_changes_nothing(tmp_path: Path) -> None:
    train(DataLoader(dataset(40), batch_size=8, shuffle=True), tmp_path, crash=13)
    torch.manual_seed(0)
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backup = tc.BackupAndRestore(tmp_path, save_freq=2, strict_data=True)
    with pytest.raises(tc.CheckpointError, match="the dataset had 40 samples and has 48 now") as raised:
        tc.fit(model, DataLoader(dataset(48), batch_size=8, shuffle=True), optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
               loss=torch.nn.functional.mse_loss, epochs=4, verbose=0, callbacks=[backup])
    assert str(tmp_path / "latest.safetensors") in str(raised.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before anything is applied


def test_strict_data_refuses_other_first_batches_when_the_resumed_epoch_starts(tmp_path: Path) -> None:
    train(batches(), tmp_path, crash=7)
    with pytest.raises(tc.CheckpointError, match="the first batch of the pass differs") as raised:
        train(batches(scale=2.0), tmp_path, strict_data=True)
    assert str(tmp_path / "latest.safetensors") in str(raised.value)


def test_an_old_backup_without_a_fingerprint_loads_without_a_warning(tmp_path: Path) -> None:
    """tests/data/backup_format2.safetensors (written before fingerprints, at step 6 of a run over 64 samples)
    resumes on 80 samples without a word, while today's backup of the same run says the length changed."""
    def make(n: int) -> DataLoader:
        x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16, shuffle=True)

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(DATA / "backup_format2.safetensors", old / "latest.safetensors")
    assert "fingerprint" not in read_training_state(old / "latest.safetensors")["loop"]["data"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = torch.nn.Sequential(make_model(), torch.nn.Dropout(0.2))
        backup = tc.BackupAndRestore(old, save_freq=3)
        tc.fit(model, make(80), optimizer=torch.optim.Adam(model.parameters(), lr=0.01), loss=torch.nn.functional.mse_loss,
               epochs=3, verbose=0, callbacks=[tc.EarlyStopping(monitor="loss", patience=5), backup])
    assert backup.restored is not None and (backup.restored.epoch, backup.restored.batch) == (1, 2)
    assert not [w for w in caught if issubclass(w.category, tc.DataOrderWarning)]

    # today's backup of a run over 64 samples, resumed on 80: the difference is named
    today, stripped = tmp_path / "today", tmp_path / "stripped"
    train(make(64), today, crash=7, save_freq=3)
    state = read_training_state(today / "latest.safetensors")
    assert train(make(80), today, save_freq=3)[1] == [
        f"the data order of epoch 2 differs from the one saved in {str(today / 'latest.safetensors')!r}: "
        "the dataset had 64 samples and has 80 now"]
    # the same backup with its fingerprint removed (as an older writer wrote it) loads silently
    del state["loop"]["data"]["fingerprint"]
    for rank in state.get("ranks") or []:
        rank["loop"]["data"].pop("fingerprint", None)
    write_training_state(stripped / "latest.safetensors", state)
    assert train(make(80), stripped, save_freq=3)[1] == []


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("indices", 3, "'fingerprint/indices' must be a digest"),
    ("samples", -1, "'fingerprint/samples' must be an integer >= 0"),
    ("sampler_epoch", "1", "'fingerprint/sampler_epoch' must be an integer or null"),
])
def test_a_damaged_fingerprint_is_refused_naming_the_field(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    train(DataLoader(dataset(), batch_size=8, shuffle=True), tmp_path, crash=5)
    state = read_training_state(tmp_path / "latest.safetensors")
    state["loop"]["data"]["fingerprint"][field] = value
    write_training_state(tmp_path / "latest.safetensors", state)
    with pytest.raises(tc.CheckpointError, match=expected):
        train(DataLoader(dataset(), batch_size=8, shuffle=True), tmp_path)


def test_a_hand_written_loop_is_told_through_load_state_dict() -> None:
    """LoopState.load_state_dict passes the source and the epoch to the data part; EpochIterator's own
    load_state_dict warns without them too."""
    loader = DataLoader(dataset(40), batch_size=8, shuffle=True)
    saved = tc.EpochIterator(loader)
    next(iter(saved.epoch()))
    writer = LoopState()
    writer.track("data", saved)
    state = writer.state_dict()

    loop = LoopState()
    loop.track("data", tc.EpochIterator(DataLoader(dataset(32), batch_size=8, shuffle=True)))
    with pytest.warns(tc.DataOrderWarning, match=r"^the data order of epoch 1 differs from the one saved in 'run\.safetensors': "
                                                 r"the dataset had 40 samples and has 32 now$"):
        loop.load_state_dict(state, "run.safetensors", restore_rng=False)
    with pytest.raises(tc.CheckpointError, match="'run.safetensors'"):
        loop.load_state_dict(state, "run.safetensors", restore_rng=False, strict_data=True)
    with pytest.warns(tc.DataOrderWarning, match="the resumed epoch differs from the one saved in the state it was loaded from"):
        tc.EpochIterator(DataLoader(dataset(32), batch_size=8)).load_state_dict(state["loop"]["data"])


def test_a_sampler_that_cannot_be_copied_is_compared_by_length_only() -> None:
    class Uncopyable(Sampler[int]):
        def __init__(self) -> None:
            self.lock = __import__("threading").Lock()

        def __iter__(self) -> Iterator[int]:
            return iter(range(40))

        def __len__(self) -> int:
            return 40

    iterator = tc.EpochIterator(DataLoader(dataset(), batch_size=8, sampler=Uncopyable()))
    next(iter(iterator.epoch()))
    held = iterator.state_dict()["fingerprint"]
    assert held == {"samples": 40, "batches": 5, "indices": None, "sampler_epoch": None, "first_batch": None}


@pytest.mark.parametrize("make", [
    lambda: DataLoader(TensorDataset(torch.arange(40)), batch_size=8, shuffle=True),
    lambda: DataLoader(TensorDataset(torch.arange(40)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2)),
    lambda: DataLoader(TensorDataset(torch.arange(40)), batch_size=None, shuffle=True),
    lambda: DataLoader(TensorDataset(torch.arange(40)), batch_size=8, shuffle=True, num_workers=1),
], ids=["global generator", "loader generator", "batch_size=None", "a worker"])
def test_the_digest_is_of_the_indices_the_loader_draws(make: Callable[[], DataLoader]) -> None:
    """Drawn as iter(loader) draws them (its base seed first, from the same generator as the shuffle):
    the digest of the order the pass yields, from the same random state."""
    import hashlib

    loader = make()
    torch.manual_seed(11)
    taken = fingerprint.snapshot(loader)
    assert taken is not None
    digest, _ = taken.indices()
    torch.manual_seed(11)
    if loader.generator is not None:
        loader.generator.manual_seed(2)
    order = [int(i) for (batch,) in loader for i in batch.reshape(-1)]
    hasher = hashlib.blake2b(digest_size=16)
    if loader.batch_size is not None:
        hasher.update(f"batches of {loader.batch_size}, drop_last=False:".encode())
    fingerprint._feed_stream(hasher, iter(order))
    assert digest == hasher.hexdigest()


def test_persistent_workers_resumed_after_their_first_pass_warn(tmp_path: Path) -> None:
    """A loader with persistent workers draws its base seed (from the generator the shuffle draws from
    next) at its first pass only: a resumed loader's first pass is a later epoch's, so it draws another
    order. That resume is not exact, and the warning says why."""
    def make() -> DataLoader:
        return DataLoader(dataset(), batch_size=8, shuffle=True, num_workers=1, persistent_workers=True)

    uninterrupted, warned = train(make(), tmp_path / "reference", epochs=3)
    assert warned == []
    train(make(), tmp_path / "resumed", crash=8, epochs=3)
    resumed, warned = train(make(), tmp_path / "resumed", epochs=3)
    assert len(warned) == 1 and "With persistent_workers=True the loader draws a base seed at its first pass only" in warned[0]
    assert not same(resumed, uninterrupted)
