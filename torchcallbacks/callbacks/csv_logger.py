"""`CSVLogger`: streams every epoch's logs to a CSV file."""

from __future__ import annotations

import csv
import os
from typing import IO, Any

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.distributed import main_process_only
from torchcallbacks.logs import to_floats


def _cell(value: Any) -> Any:
    """A value as a CSV cell: numbers as they are (`str(float)` is its repr, so nothing is rounded),
    lists and arrays as Keras writes them, `"[a, b]"`."""
    if isinstance(value, (str, int, float)):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(str, value))}]"
    return value


class CSVLogger(Callback):
    """Streams epoch results to a CSV file, one row per epoch.

    Columns are `epoch` (0-based, as Keras writes it) and the sorted keys of the first epoch's logs.
    When the first epoch has no validation results, `val_<name>` columns are added anyway, holding
    `"NA"` until (and unless) validation runs, so a run with `validation_freq > 1` keeps one
    header. A key missing from a later epoch is written as `"NA"`; keys that appear only after the
    first epoch are not written (the header is fixed). Values are written at full precision (a
    float's shortest exact representation), so reading the file back gives the logged numbers.
    The file is flushed after every row and closed when training ends, also when it ends by an
    exception. Under a distributed run only rank 0 writes.

    Its state (the header and the file's length after the last row) is part of every backup: a run
    resumed by `BackupAndRestore` cuts the file back to the rows of the backed-up epochs and goes on
    from there, so after a crash and a rerun the file has exactly the rows of an uninterrupted run
    (whatever `append` says: a resumed run continues its own file).

    Args:
        filename: path of the CSV file (a missing parent directory is created).
        separator: the one-character string that separates cells.
        append: append to an existing file instead of overwriting it; the header is then written
            only when the file is empty or does not exist yet. With False (the default, as Keras), a
            fresh run rewrites the file at train begin, so rerunning a finished script leaves one
            run's rows.

    Example:

    ```python
    csv_logger = torchcallbacks.CSVLogger("training.log")
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=5,
                       validation_data=val_loader, callbacks=[csv_logger])
    ```
    """

    transient_attributes = frozenset({"append_header"})  # follows the file on disk at train begin

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False) -> None:
        super().__init__()
        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"filename: expected a path (str or os.PathLike), received {type(filename).__name__}")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator: expected a one-character string, received {separator!r}")
        self.filename = os.fspath(filename)
        self.sep = separator
        self.append = bool(append)
        self.keys: list[str] | None = None
        self.csv_file: IO[str] | None = None
        self.writer: csv.DictWriter[str] | None = None
        self.append_header = True
        self._size = 0
        self._resume: tuple[list[str] | None, int] | None = None

    def identity(self) -> dict[str, Any]:
        return {"filename": self.filename}

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "size": self._size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys, size = state_dict["keys"], state_dict["size"]
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise TypeError(f"CSVLogger state 'keys': expected None or a list of strings, received {keys!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"CSVLogger state 'size': expected an integer >= 0, received {size!r}")
        self._resume = (keys, size)

    @main_process_only
    def on_train_begin(self, logs: Logs | None = None) -> None:
        directory = os.path.dirname(self.filename)
        if directory:
            os.makedirs(directory, exist_ok=True)
        resume, self._resume = self._resume, None
        if resume is not None and self.loop.resumed and resume[1] <= self._file_size():
            # Continue the file of the interrupted run: rows written after its backup go.
            self.csv_file = open(self.filename, "r+", newline="", encoding="utf-8")  # noqa: SIM115 (closed in on_train_end)
            self.csv_file.truncate(resume[1])
            self.csv_file.seek(resume[1])
            self.keys, self._size = resume
            self.append_header = resume[1] == 0
            self.writer = None
            return
        if self.append:
            self.append_header = not (os.path.exists(self.filename) and os.path.getsize(self.filename) > 0)
            mode = "a"
        else:
            self.append_header = True
            mode = "w"
        self.csv_file = open(self.filename, mode, newline="", encoding="utf-8")  # noqa: SIM115 (closed in on_train_end)
        self.writer = None
        self.keys = None
        self._size = self.csv_file.tell()

    def _file_size(self) -> int:
        return os.path.getsize(self.filename) if os.path.exists(self.filename) else -1

    @main_process_only
    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.csv_file is None:
            raise RuntimeError("CSVLogger: on_epoch_end was called before on_train_begin opened the file")
        values = to_floats(logs)
        if self.keys is None:
            self.keys = sorted(values)
            if self.keys and not any(key.startswith("val_") for key in self.keys):
                self.keys.extend("val_" + key for key in list(self.keys))
        if self.writer is None:
            separator = self.sep

            class Dialect(csv.excel):
                delimiter = separator

            self.writer = csv.DictWriter(self.csv_file, fieldnames=["epoch", *self.keys], dialect=Dialect)
            if self.append_header:
                self.writer.writeheader()
        row: dict[str, Any] = {"epoch": epoch}
        row.update((key, _cell(values.get(key, "NA"))) for key in self.keys)
        self.writer.writerow(row)
        self.csv_file.flush()
        self._size = self.csv_file.tell()

    @main_process_only
    def on_train_end(self, logs: Logs | None = None) -> None:
        if self.csv_file is not None:
            self.csv_file.close()
        self.csv_file = None
        self.writer = None
