"""`RemoteMonitor`: posts every epoch's logs to an HTTP server."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from torchcallbacks.callbacks.callback import Callback, Logs
from torchcallbacks.distributed import main_process_only


def _json_value(value: Any) -> Any:
    """`value` as something `json.dumps` writes: one-element tensors and numpy values (scalars and
    one-element arrays) become Python numbers with `.item()`, as Keras does; other values stay as
    they are (and may still fail to serialise)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().item()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.item()
    return value


class RemoteMonitor(Callback):
    """Sends the logs of every epoch to a server with an HTTP POST.

    The payload is `{"epoch": epoch, **logs}` (epoch 0-based). Tensors and numpy values (scalars or
    one-element arrays) are sent as JSON numbers, with `.item()`, as Keras does; a value that cannot
    be written as JSON (e.g. a multi-element array) is left out of the payload with a warning. With
    `send_as_json=True` it is the request body, as `application/json`; otherwise it is JSON-encoded
    into the form field `field` of an `application/x-www-form-urlencoded` body (Keras' default).
    Non-finite values are written as Python's `json` module writes them (`NaN`, `Infinity`).

    The request uses the standard library (`urllib`), so nothing needs installing. A server that
    cannot be reached, does not answer within `timeout` seconds or answers with an HTTP error status
    produces a warning, and training goes on. The post happens on the training thread, so a slow
    server delays the epoch end by at most `timeout`. Under a distributed run only rank 0 posts.

    Args:
        root: the server's root URL, e.g. `"http://localhost:9000"`.
        path: the path the events are posted to, appended to `root`.
        field: the form field that holds the JSON payload (when `send_as_json=False`).
        headers: extra HTTP headers, a dict of strings.
        send_as_json: send the payload as a JSON body instead of a form field.
        timeout: seconds to wait for the server before giving up on this epoch's post.

    Example:

    ```python
    monitor = torchcallbacks.RemoteMonitor(root="http://localhost:9000", send_as_json=True)
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=5, callbacks=[monitor])
    ```
    """

    def __init__(
        self,
        root: str = "http://localhost:9000",
        path: str = "/publish/epoch/end/",
        field: str = "data",
        headers: Mapping[str, str] | None = None,
        send_as_json: bool = False,
        *,
        timeout: float = 10.0,
    ) -> None:
        super().__init__()
        for name, value in (("root", root), ("path", path), ("field", field)):
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a string, received {type(value).__name__}")
        if urllib.parse.urlsplit(root).scheme not in ("http", "https"):
            raise ValueError(f"root: expected an http:// or https:// URL, received {root!r}")
        if headers is not None and (
            not isinstance(headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise TypeError(f"headers: expected a dict of strings to strings, received {headers!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, received {timeout!r}")
        self.root = root
        self.path = path
        self.field = field
        self.headers = dict(headers) if headers is not None else None
        self.send_as_json = bool(send_as_json)
        self.timeout = float(timeout)

    def _request(self, payload: dict[str, Any]) -> urllib.request.Request:
        headers = dict(self.headers or {})
        if self.send_as_json:
            body = json.dumps(payload).encode("utf-8")
            headers.setdefault("Content-Type", "application/json")
        else:
            body = urllib.parse.urlencode({self.field: json.dumps(payload)}).encode("ascii")
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return urllib.request.Request(self.root + self.path, data=body, headers=headers, method="POST")

    @main_process_only
    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        payload: dict[str, Any] = {"epoch": epoch}
        skipped = []
        for key, value in (logs or {}).items():
            try:
                value = _json_value(value)
                json.dumps(value)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                skipped.append(f"{key} ({type(value).__name__})")
                continue
            payload[key] = value
        if skipped:
            warnings.warn(
                f"RemoteMonitor: left out of epoch {epoch}'s payload, not a number or JSON value: "
                f"{', '.join(skipped)}",
                stacklevel=2,
            )
        request = self._request(payload)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            warnings.warn(
                f"RemoteMonitor: the server at {request.full_url} answered {exc.code} {exc.reason}; "
                f"epoch {epoch} was not recorded",
                stacklevel=2,
            )
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: e.g. InvalidURL
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            warnings.warn(
                f"Could not reach RemoteMonitor root server at {self.root} ({reason}); "
                f"epoch {epoch} was not sent",
                stacklevel=2,
            )
