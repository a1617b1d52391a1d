"""RemoteMonitor against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_model, make_regression

import torchcallbacks
from torchcallbacks import RemoteMonitor


class Server:
    """A real HTTP server in a thread that records every request and answers `status`; with `hold`,
    only once that event is set (a server that does not answer in time, whatever the machine's speed)."""

    def __init__(self, status: int = 200, hold: threading.Event | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if hold is not None:
                    hold.wait(timeout=60)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


def _fit(callbacks: list, epochs: int = 2) -> torchcallbacks.History:
    model = make_model()
    return torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loss=torch.nn.functional.mse_loss, epochs=epochs, verbose=0, validation_data=make_regression(32),
        callbacks=callbacks,
    )


def _expected(history: torchcallbacks.History) -> list[dict[str, Any]]:
    return [
        {"epoch": epoch, **{key: values[i] for key, values in history.history.items()}}
        for i, epoch in enumerate(history.epoch)
    ]


def test_json_payloads_and_headers(server: Server) -> None:
    monitor = RemoteMonitor(root=server.root, send_as_json=True, headers={"X-Token": "secret"})
    history = _fit([monitor])
    assert len(server.requests) == 2
    for request in server.requests:
        assert request["path"] == "/publish/epoch/end/"
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["headers"]["X-Token"] == "secret"
    assert [json.loads(r["body"]) for r in server.requests] == _expected(history)


def test_form_encoded_payloads(server: Server) -> None:
    monitor = RemoteMonitor(root=server.root, path="/events", field="metrics")
    history = _fit([monitor])
    payloads = []
    for request in server.requests:
        assert request["path"] == "/events"
        assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
        form = urllib.parse.parse_qs(request["body"].decode("ascii"), strict_parsing=True)
        assert list(form) == ["metrics"]
        payloads.append(json.loads(form["metrics"][0]))
    assert payloads == _expected(history)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _monitor_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "RemoteMonitor" in str(w.message)]


def test_closed_port_warns_once_per_epoch_and_training_completes() -> None:
    monitor = RemoteMonitor(root=f"http://127.0.0.1:{_free_port()}")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _fit([monitor], epochs=3)
    messages = _monitor_warnings(record)
    assert len(messages) == 3
    assert all(m.startswith("Could not reach RemoteMonitor root server at ") for m in messages)
    assert history.epoch == [0, 1, 2]


def test_slow_server_times_out_with_a_warning() -> None:
    answer = threading.Event()
    slow = Server(hold=answer)  # answers only after the run: the post must time out
    try:
        monitor = RemoteMonitor(root=slow.root, timeout=0.2)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            history = _fit([monitor], epochs=1)
    finally:
        answer.set()
        slow.close()
    assert len(slow.requests) == 1
    messages = _monitor_warnings(record)
    assert len(messages) == 1 and "Could not reach RemoteMonitor root server" in messages[0]
    assert history.epoch == [0]


def test_http_error_status_warns() -> None:
    failing = Server(status=500)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            history = _fit([RemoteMonitor(root=failing.root, send_as_json=True)], epochs=2)
    finally:
        failing.close()
    messages = _monitor_warnings(record)
    assert len(messages) == 2 and all("500" in m for m in messages)
    assert history.epoch == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"root": "localhost:9000"}, "root"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"headers": {"X": 1}}, "headers"),
        ({"field": None}, "field"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises((TypeError, ValueError), match=name):
        RemoteMonitor(**kwargs)


class _NumpyLogs(torchcallbacks.Callback):
    """Puts numpy values (and one value JSON cannot hold) into the epoch logs, as Keras-ported code does."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        assert logs is not None
        logs.update({
            "np_float": np.float32(0.5), "np_int": np.int64(7), "np_bool": np.bool_(True),
            "np_array": np.array([2.5]), "tensor": torch.tensor([1.5]), "matrix": np.zeros((2, 2)),
        })


@pytest.mark.parametrize("send_as_json", [True, False])
def test_numpy_values_are_sent_as_json_numbers(server: Server, send_as_json: bool) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _fit([_NumpyLogs(), RemoteMonitor(root=server.root, send_as_json=send_as_json)], epochs=2)
    assert history.epoch == [0, 1]
    assert len(server.requests) == 2
    for epoch, request in enumerate(server.requests):
        body = request["body"].decode("ascii")
        payload = json.loads(body if send_as_json else urllib.parse.parse_qs(body)["data"][0])
        assert payload["epoch"] == epoch
        assert payload["np_float"] == 0.5 and payload["np_int"] == 7 and payload["np_bool"] is True
        assert payload["np_array"] == 2.5 and payload["tensor"] == 1.5
        assert "matrix" not in payload and isinstance(payload["loss"], float)
    skipped = [m for m in _monitor_warnings(record) if "matrix" in m]
    assert len(skipped) == 2 and "ndarray" in skipped[0]


def test_a_url_that_http_client_rejects_warns_instead_of_crashing(server: Server) -> None:
    monitor = RemoteMonitor(root=server.root, path="/épochs")  # not ASCII: http.client raises UnicodeEncodeError
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = _fit([monitor], epochs=1)
    messages = _monitor_warnings(record)
    assert len(messages) == 1 and messages[0].startswith("Could not reach RemoteMonitor root server")
    assert history.epoch == [0]
