"""`ProgbarLogger`: Keras' progress bar, redrawn on a timer so that batches cost no device sync."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.distributed import is_main_process
from torchcallbacks.logs import to_floats


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) > 1e-3 else f"{value:.4e}"
    return str(value)


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    if seconds >= 60:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds}s"


def _format_per_step(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


def in_notebook_or_ide() -> bool:
    """Whether standard output is a Jupyter kernel's (or PyCharm's run console), which redraws a line
    on `\r` though it is not a terminal. Decided as Keras' `Progbar` does: the `ipykernel` module is
    loaded (IPython kernels import it: Jupyter, JupyterLab, VS Code and Colab notebooks), or
    `PYCHARM_HOSTED` is set. (Keras also counts any POSIX system; a CI log is not redrawn here.)

    Example:

    ```python
    if in_notebook_or_ide():
        print("\rstep 3/10", end="")
    ```
    """
    return "ipykernel" in sys.modules or "PYCHARM_HOSTED" in os.environ


def _redraws_in_place(file: TextIO) -> bool:
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return True
    # The kernel replaces sys.stdout/sys.stderr with its own streams; another file (a log) is not live.
    return (file is sys.stdout or file is sys.stderr) and in_notebook_or_ide()


class Progbar:
    """A Keras-style progress bar: `k/N ━━━━━━──── ETA 3s 12ms/step - loss: 0.1234`.

    `update` is cheap: it remembers the latest logs and renders (converting their values to numbers,
    a device sync) only when `interval` seconds have passed, and at `finalize`. On a terminal it
    redraws one line, and so it does in a Jupyter notebook (standard output of an IPython kernel, see
    `in_notebook_or_ide`); elsewhere (a CI log, a file) it writes a new line at most every
    `interval_no_tty` seconds and one line at the end.

    Args:
        target: number of steps, or None when unknown.
        width: width of the bar in characters.
        verbose: 1 for the live bar, 2 for one line at the end.
        interval: seconds between redraws on a terminal.
        interval_no_tty: seconds between lines when the output is not a terminal.
        file: where to write; standard output by default.
    """

    def __init__(
        self,
        target: int | None,
        width: int = 20,
        verbose: int = 1,
        interval: float = 0.05,
        interval_no_tty: float = 10.0,
        file: TextIO | None = None,
    ) -> None:
        self.target = target
        self.width = width
        self.verbose = verbose
        self.file = file if file is not None else sys.stdout
        self.dynamic = _redraws_in_place(self.file)
        self.interval = interval if self.dynamic else interval_no_tty
        self._start = time.monotonic()
        self._last_render = self._start
        self._seen = 0
        self._logs: Mapping[str, Any] | None = None
        self._line_width = 0

    def update(self, current: int, logs: Mapping[str, Any] | None = None, finalize: bool = False) -> None:
        """Record progress; draws only when the timer is due or when `finalize` is True."""
        self._seen = current
        if logs is not None:
            self._logs = logs
        if finalize:
            self._render(finalize=True)
            return
        if self.verbose != 1:
            return
        now = time.monotonic()
        if now - self._last_render >= self.interval:
            self._last_render = now
            self._render(finalize=False)

    def _render(self, finalize: bool) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        current = self._seen
        per_step = elapsed / current if current else 0.0
        values = to_floats(self._logs)
        if self.target is not None:
            counter = f"{current:{len(str(self.target))}d}/{self.target}"
        else:
            counter = f"{current}/Unknown"
        if self.verbose == 2:
            line = f"{counter} - {_format_duration(elapsed)} - {_format_per_step(per_step)}"
        else:
            parts = [counter]
            if self.target is not None:
                filled = min(self.width, self.width * current // self.target) if self.target else self.width
                if self.dynamic:
                    parts.append(f"\x1b[32m{'━' * filled}\x1b[0m\x1b[37m{'━' * (self.width - filled)}\x1b[0m")
                else:
                    parts.append("━" * filled + "─" * (self.width - filled))
            if finalize or self.target is None:
                parts.append(_format_duration(elapsed))
            else:
                parts.append(f"ETA {_format_duration(per_step * max(self.target - current, 0))}")
            parts.append(_format_per_step(per_step))
            line = " ".join(parts)
        for key, value in values.items():
            line += f" - {key}: {_format_value(value)}"
        if self.dynamic and self.verbose == 1:
            padding = " " * max(self._line_width - len(line), 0)
            self._line_width = len(line)
            self.file.write("\r" + line + padding + ("\n" if finalize else ""))
        else:
            self.file.write(line + "\n")
        self.file.flush()


class ProgbarLogger(Callback):
    """Prints Keras' progress bar: `Epoch i/N`, then `k/N ━━━━ ETA 1s 12ms/step - loss: 0.1234`.

    `fit`, `evaluate` and `predict` add one unless `verbose=0`. The verbosity comes from
    `params["verbose"]`: 1 (or "auto") for a live bar, 2 for one line per epoch. Validation inside
    `fit` draws nothing; its values appear on the epoch's last line. The bar converts logged tensors
    to numbers only when it redraws (on a timer), never per batch. Only the main process prints.

    Args:
        file: where to write; standard output by default.
        interval: seconds between redraws on a terminal (lines every `interval_no_tty` seconds when
            the output is not a terminal, e.g. a CI log).
        interval_no_tty: see `interval`.

    Example:

    ```python
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=3, verbose=2)
    # Epoch 1/3
    # 32/32 - 0s - 2ms/step - loss: 0.6931
    ```
    """

    stops_in_sync = True  # batch hooks: draws only (see Callback.stops_in_sync)

    def __init__(self, *, file: TextIO | None = None, interval: float = 0.05, interval_no_tty: float = 10.0) -> None:
        super().__init__()
        self.file = file
        self.interval = interval
        self.interval_no_tty = interval_no_tty
        self.progbar: Progbar | None = None
        self._in_fit = False
        self._verbose = 1

    def _read_verbose(self) -> int:
        verbose = self.params.get("verbose", 1)
        verbose = 1 if verbose == "auto" else int(verbose)
        return verbose if is_main_process() else 0

    def _new_bar(self, target: int | None) -> None:
        self.progbar = Progbar(
            target,
            verbose=self._verbose,
            interval=self.interval,
            interval_no_tty=self.interval_no_tty,
            file=self.file,
        )

    def _write(self, text: str) -> None:
        file = self.file if self.file is not None else sys.stdout
        file.write(text + "\n")
        file.flush()

    def _update(self, batch: int, logs: Logs | None, finalize: bool = False) -> None:
        if self.progbar is not None:
            self.progbar.update(batch + 1, logs, finalize=finalize)

    def _finish(self, logs: Logs | None) -> None:
        if self.progbar is not None:
            self.progbar.update(self.progbar._seen, logs, finalize=True)
            self.progbar = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._verbose = self._read_verbose()
        self._in_fit = True

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._in_fit = False
        self.progbar = None

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        if not self._verbose:
            return
        epochs = self.params.get("epochs")
        if epochs is not None and epochs > 1:
            self._write(f"Epoch {epoch + 1}/{epochs}")
        self._new_bar(self.params.get("steps"))

    def on_train_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._update(batch, logs)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._finish(logs)

    def on_test_begin(self, logs: Logs | None = None) -> None:
        if not self._in_fit:
            self._verbose = self._read_verbose()
            if self._verbose:
                self._new_bar(self.params.get("steps"))

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if not self._in_fit:
            self._update(batch, logs)

    def on_test_end(self, logs: Logs | None = None) -> None:
        if not self._in_fit:
            self._finish(logs)

    def on_predict_begin(self, logs: Logs | None = None) -> None:
        self._verbose = self._read_verbose()
        if self._verbose:
            self._new_bar(self.params.get("steps"))

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._update(batch, None)

    def on_predict_end(self, logs: Logs | None = None) -> None:
        self._finish(None)
