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
