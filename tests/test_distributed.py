"""The "rank 0 only" rule of `torchcallbacks.distributed`, and the logging callbacks that follow it.

Multi-process runs under torchrun are tested in tests/distributed/; here the rank that the module
reports is set by monkeypatching `get_rank`, the single function every rank decision goes through.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_model, make_regression

import torchcallbacks
from torchcallbacks import distributed
from torchcallbacks.distributed import main_process_only


class Counter:
    def __init__(self) -> None:
        self.calls: list[int] = []

    @main_process_only
    def hook(self, value: int) -> str:
        """Doc of the hook."""
        self.calls.append(value)
        return "ran"


def test_main_process_only_runs_on_rank_0_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Counter()
    assert counter.hook(1) == "ran"  # single process: unchanged behaviour
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    assert counter.hook(2) is None
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    assert counter.hook(3) == "ran"
    assert counter.calls == [1, 3]
    assert Counter.hook.__doc__ == "Doc of the hook." and Counter.hook.__name__ == "hook"


class BatchCounter(torchcallbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    @main_process_only
    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches.append(batch)


def test_a_callback_list_reads_the_rank_when_a_run_begins_not_at_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []

    def rank(value: int) -> Any:
        return lambda: reads.append(value) or value

    monkeypatch.setattr(distributed, "get_rank", rank(0))
    counter = BatchCounter()
    callbacks = torchcallbacks.CallbackList([counter])  # built on the main process
    callbacks.on_train_begin()
    before = len(reads)
    for i in range(5):
        callbacks.on_train_batch_end(i)
    assert counter.batches == [0, 1, 2, 3, 4]
    assert len(reads) == before  # the hook runs undecorated: no rank read per batch

    # The same list, now on another rank (e.g. made before init_process_group): the next run's
    # begin sees it, and the hook is not called at all there.
    monkeypatch.setattr(distributed, "get_rank", rank(1))
    callbacks.on_train_begin()
    callbacks.on_train_batch_end(5)
    assert counter.batches == [0, 1, 2, 3, 4]
    assert not callbacks.has_hook("on_train_batch_end")  # so fit builds no batch logs there
    monkeypatch.setattr(distributed, "get_rank", rank(0))
    callbacks.on_test_begin()  # an evaluation begin checks too
    callbacks.on_train_batch_end(6)
    assert counter.batches == [0, 1, 2, 3, 4, 6]


def test_logging_callbacks_write_nothing_off_rank_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    posts: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}"

    def run(name: str) -> torchcallbacks.History:
        model = make_model()
        callbacks = [
            torchcallbacks.TensorBoard(tmp_path / name / "tb", update_freq=1, histogram_freq=1, profile_batch=1),
            torchcallbacks.CSVLogger(tmp_path / name / "log.csv"),
            torchcallbacks.RemoteMonitor(root=root),
        ]
        return torchcallbacks.fit(
            model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss=torch.nn.functional.mse_loss, epochs=2, verbose=0, callbacks=callbacks,
        )

    try:
        monkeypatch.setattr(distributed, "get_rank", lambda: 1)
        history = run("rank1")
        assert history.epoch == [0, 1]
        assert not (tmp_path / "rank1").exists()
        assert posts == []
        monkeypatch.setattr(distributed, "get_rank", lambda: 0)
        run("rank0")
        assert (tmp_path / "rank0" / "log.csv").exists() and (tmp_path / "rank0" / "tb" / "train").is_dir()
        assert len(posts) == 2
    finally:
        server.shutdown()
        server.server_close()
