"""CSVLogger: the file read back with the csv module equals History."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_regression

import torchcallbacks
from torchcallbacks import CallbackList, CSVLogger, LambdaCallback


def mae(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred - y).abs().mean()


def _fit(callbacks: list, epochs: int = 3, validation: bool = True, **kwargs) -> torchcallbacks.History:
    model = make_model()
    return torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss=torch.nn.functional.mse_loss, metrics=[mae], epochs=epochs, verbose=0,
        validation_data=make_regression(32) if validation else None, callbacks=callbacks, **kwargs,
    )


def _read(path: Path, delimiter: str = ",") -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        return list(reader.fieldnames or []), list(reader)


def test_rows_equal_history_at_full_precision(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    history = _fit([CSVLogger(path)])
    header, rows = _read(path)
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    for key in ("loss", "mae", "val_loss", "val_mae"):
        assert [float(row[key]) for row in rows] == history.history[key]  # exact, not approximate


def test_val_columns_are_na_without_validation(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    history = _fit([CSVLogger(path)], epochs=2, validation=False)
    header, rows = _read(path)
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert [row["val_loss"] for row in rows] == ["NA", "NA"]
    assert [row["val_mae"] for row in rows] == ["NA", "NA"]
    assert [float(row["loss"]) for row in rows] == history.history["loss"]


def test_validation_every_other_epoch_fills_na_between(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    history = _fit([CSVLogger(path)], epochs=4, validation_freq=2)
    header, rows = _read(path)
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert [row["val_loss"] for row in rows[0::2]] == ["NA", "NA"]
    assert [float(row["val_loss"]) for row in rows[1::2]] == history.history["val_loss"]


def test_append_writes_the_header_once(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    first = _fit([CSVLogger(path, append=True)], epochs=2)
    second = _fit([CSVLogger(path, append=True)], epochs=2)
    lines = path.read_text().splitlines()
    assert sum(line.startswith("epoch,") for line in lines) == 1
    _, rows = _read(path)
    assert [float(row["loss"]) for row in rows] == first.history["loss"] + second.history["loss"]
    assert [int(row["epoch"]) for row in rows] == [0, 1, 0, 1]


def test_append_to_an_empty_file_writes_a_header(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.touch()
    history = _fit([CSVLogger(path, append=True)], epochs=1)
    header, rows = _read(path)
    assert header[0] == "epoch"
    assert [float(row["loss"]) for row in rows] == history.history["loss"]


def test_without_append_the_file_is_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("old,content\n1,2\n")
    _fit([CSVLogger(path)], epochs=1)
    header, rows = _read(path)
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert len(rows) == 1


@pytest.mark.parametrize("append", [False, True])
def test_a_resumed_run_continues_its_rows_whatever_append_says(tmp_path: Path, append: bool) -> None:
    """Keras' `append=False` rewrites the file at train begin; a run resumed by BackupAndRestore is
    not a new run: it keeps the backed-up epochs' rows and writes each later epoch once."""
    path, backup = tmp_path / "log.csv", tmp_path / "backup"

    def crash(epoch: int, logs: dict) -> None:
        if epoch == 2:  # after the CSV row of epoch 2, before its backup (BackupAndRestore saves last)
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        _fit([CSVLogger(path, append=append), LambdaCallback(on_epoch_end=crash),
              torchcallbacks.BackupAndRestore(backup)], epochs=5)
    before = path.read_text().splitlines()
    assert [line.split(",")[0] for line in before] == ["epoch", "0", "1", "2"]
    _fit([CSVLogger(path, append=append), torchcallbacks.BackupAndRestore(backup)], epochs=5)
    lines = path.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch", "0", "1", "2", "3", "4"]
    assert lines[:3] == before[:3]  # the backed-up epochs' rows are kept, the row of epoch 2 written again
    # A fresh run after the finished one (its backup is gone) starts the file again with append=False.
    _fit([CSVLogger(path, append=append), torchcallbacks.BackupAndRestore(backup)], epochs=2)
    epochs = [line.split(",")[0] for line in path.read_text().splitlines()]
    assert epochs == (["epoch", "0", "1", "2", "3", "4", "0", "1"] if append else ["epoch", "0", "1"])


def test_separator(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv"
    history = _fit([CSVLogger(path, separator="\t")], epochs=2)
    header, rows = _read(path, delimiter="\t")
    assert header == ["epoch", "loss", "mae", "val_loss", "val_mae"]
    assert [float(row["val_mae"]) for row in rows] == history.history["val_mae"]


def test_each_epoch_is_flushed_and_the_file_closed_on_exception(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.csv"
    logger = CSVLogger(path)
    seen_during_training: list[int] = []

    def check(epoch: int, logs: dict) -> None:
        seen_during_training.append(len(_read(path)[1]))  # what another process would read right now
        if epoch == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _fit([logger, LambdaCallback(on_epoch_end=check)], epochs=5)
    assert seen_during_training == [1, 2]
    assert logger.csv_file is None
    _, rows = _read(path)
    assert [int(row["epoch"]) for row in rows] == [0, 1]


def test_hand_written_loop_with_tensor_logs(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    callbacks = CallbackList([CSVLogger(path)], model=make_model(), epochs=2)
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        callbacks.on_epoch_end(epoch, {"loss": torch.tensor(0.1 * (epoch + 1), dtype=torch.float64)})
    callbacks.on_train_end()
    _, rows = _read(path)
    assert [float(row["loss"]) for row in rows] == [0.1, 0.2]


@pytest.mark.parametrize("separator", ["", ",,", 1])
def test_bad_separator(tmp_path: Path, separator: object) -> None:
    with pytest.raises(ValueError, match="separator"):
        CSVLogger(tmp_path / "x.csv", separator=separator)  # type: ignore[arg-type]


def test_bad_filename() -> None:
    with pytest.raises(TypeError, match="filename"):
        CSVLogger(3)  # type: ignore[arg-type]
