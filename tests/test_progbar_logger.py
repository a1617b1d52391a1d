"""ProgbarLogger: Keras' look for verbose 1 and 2, terminals and logs, timer-driven redraws."""

from __future__ import annotations

import io
import re

import torch
import torch.nn.functional as F
from conftest import make_model, make_regression

import torchcallbacks as tc
from torchcallbacks.callbacks import progbar_logger
from torchcallbacks.callbacks.progbar_logger import Progbar, _format_value


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(verbose, file, epochs=2, x=None):
    model = make_model()
    return tc.fit(model, x if x is not None else make_regression(n=64, batch_size=16),
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.01), loss=F.mse_loss, epochs=epochs,
                  verbose=verbose, callbacks=[tc.ProgbarLogger(file=file)])


def test_verbose_1_in_a_log_file_prints_one_readable_line_per_epoch() -> None:
    out = io.StringIO()
    history = _run(1, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2" and len(lines) == 4
    for line, loss in zip(lines[1::2], history.history["loss"], strict=True):
        assert re.fullmatch(r"4/4 ━{20} \d+s \d+(us|ms)/step - loss: \d+\.\d{4}", line), line
        assert line.endswith(f"loss: {loss:.4f}")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_verbose_2_prints_one_line_per_epoch_with_validation_values() -> None:
    out = io.StringIO()
    model = make_model()
    history = tc.fit(model, make_regression(n=64, batch_size=16), optimizer=torch.optim.SGD(model.parameters()),
                     loss=F.mse_loss, epochs=2, verbose=2, validation_data=make_regression(n=32),
                     callbacks=[tc.ProgbarLogger(file=out)])
    lines = out.getvalue().splitlines()
    assert lines[0] == "Epoch 1/2" and len(lines) == 4
    assert re.fullmatch(r"4/4 - \d+s - \d+(us|ms)/step - loss: \d+\.\d{4} - val_loss: \d+\.\d{4}", lines[1]), lines[1]
    assert lines[3].endswith(f"val_loss: {history.history['val_loss'][1]:.4f}")


def test_single_epoch_has_no_epoch_header_and_unknown_length_says_unknown() -> None:
    out = io.StringIO()
    batches = (b for b in make_regression(n=48, batch_size=16))
    _run(1, out, epochs=1, x=batches)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and re.match(r"3/Unknown \d+s \d+(us|ms)/step - loss: ", lines[0]), lines


def test_terminal_redraws_in_place_with_eta_on_a_timer(monkeypatch) -> None:
    clock = iter(i * 0.1 for i in range(10_000))
    monkeypatch.setattr(progbar_logger.time, "monotonic", lambda: next(clock))
    out = Terminal()
    _run(1, out, epochs=1)
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 5  # four timed redraws (the clock moves 0.1 s per read) and the final line
    assert "ETA" in frames[0] and "\x1b[32m" in frames[0]
    assert re.search(r"\b1/4\b", frames[0]) and re.search(r"\b4/4\b", frames[-1]) and frames[-1].endswith("\n")
    assert "ETA" not in frames[-1]


def test_evaluate_and_predict_bars_and_silence_in_fit_validation() -> None:
    out = io.StringIO()
    model = make_model()
    tc.evaluate(model, make_regression(n=32, batch_size=16), loss=F.mse_loss, verbose=2,
                callbacks=[tc.ProgbarLogger(file=out)])
    tc.predict(model, make_regression(n=32, batch_size=16), verbose=1, callbacks=[tc.ProgbarLogger(file=out)])
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"2/2 - \d+s - \d+(us|ms)/step - loss: \d+\.\d{4}", lines[0]), lines
    assert re.fullmatch(r"2/2 ━{20} \d+s \d+(us|ms)/step", lines[1]), lines
    assert len(lines) == 2


def test_verbose_0_adds_no_bar_and_prints_nothing(capsys) -> None:
    model = make_model()
    tc.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters()), loss=F.mse_loss, verbose=0)
    assert capsys.readouterr().out == ""


def test_value_formatting_follows_keras() -> None:
    assert _format_value(0.123456) == "0.1235"
    assert _format_value(0.0001234) == "1.2340e-04"
    assert _format_value("nan") == "nan"


def test_progbar_update_without_redraw_reads_no_value() -> None:
    class Exploding(dict):
        def __iter__(self):
            raise AssertionError("values were read")

    bar = Progbar(10, file=io.StringIO(), interval_no_tty=1e9)
    for step in range(1, 10):
        bar.update(step, Exploding(loss=torch.tensor(1.0)))


class KernelStream(io.StringIO):
    """Like ipykernel's OutStream: not a terminal, yet the notebook redraws a line on a carriage return."""

    def isatty(self) -> bool:
        return False


def _fake_kernel(monkeypatch) -> KernelStream:
    import sys
    import types

    monkeypatch.delenv("PYCHARM_HOSTED", raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    stream = KernelStream()
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def test_jupyter_kernel_is_detected_as_keras_does(monkeypatch) -> None:
    import sys

    monkeypatch.delenv("PYCHARM_HOSTED", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert not progbar_logger.in_notebook_or_ide()
    assert not Progbar(4, file=KernelStream()).dynamic
    stream = _fake_kernel(monkeypatch)
    assert progbar_logger.in_notebook_or_ide()
    assert Progbar(4).dynamic and Progbar(4, file=stream).dynamic
    assert not Progbar(4, file=io.StringIO()).dynamic  # a log file in a notebook is not redrawn
    monkeypatch.delitem(sys.modules, "ipykernel")
    monkeypatch.setenv("PYCHARM_HOSTED", "1")
    assert progbar_logger.in_notebook_or_ide()


def test_jupyter_bar_redraws_in_place_reading_values_only_on_its_timer(monkeypatch) -> None:
    clock = iter(i * 0.1 for i in range(10_000))
    monkeypatch.setattr(progbar_logger.time, "monotonic", lambda: next(clock))
    stream = _fake_kernel(monkeypatch)
    model = make_model()
    tc.fit(model, make_regression(n=64, batch_size=16), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
           loss=F.mse_loss, epochs=1, verbose=1)
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 5  # four timed redraws and the final line, all on one line
    assert all("\n" not in frame for frame in frames[:-1]) and frames[-1].endswith("\n")
    assert "ETA" in frames[0] and "\x1b[32m" in frames[0] and re.search(r"\b4/4\b", frames[-1])

    class Exploding(dict):
        def __iter__(self):
            raise AssertionError("values were read")

    written = len(stream.getvalue())
    bar = Progbar(10, interval=1e9)
    assert bar.dynamic
    for step in range(1, 10):
        bar.update(step, Exploding(loss=torch.tensor(1.0)))  # no redraw due: no value read, nothing written
    assert len(stream.getvalue()) == written
