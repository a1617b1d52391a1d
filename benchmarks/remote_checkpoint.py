"""Remote checkpoint benchmark: a ~100M-parameter model (400 MB of float32) saved to an S3 API.

The store is moto's S3 server on 127.0.0.1 (in this process's threads: no network, no disk), reached
through s3fs, so the numbers compare the protocols, not a network. Measures:
- `torchcallbacks.save_weights` to `s3://...` (serialize, upload, then the manifest that commits it)
  against s3fs' own `pipe_file` of the same serialized bytes (goal: within 1.1x);
- the time the training thread is blocked by `ModelCheckpoint(async_save=True)`-style writes
  (`CheckpointWriter(async_save=True)` over the storage) against the same async save to a local disk
  (goal: within 1.2x);
- the peak extra resident memory of a remote save (the serialized file is held once).

Run: `PYTHONPATH=. python benchmarks/remote_checkpoint.py [--repeats 3]` (needs `pip install
torchcallbacks[s3] moto[server]`). Prints medians and minima and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import save

import torchcallbacks as tc
from torchcallbacks.checkpoint import CheckpointWriter
from torchcallbacks.checkpoint.fsspec_storage import FsspecStorage


def make_model() -> torch.nn.Module:
    # 24 blocks of 2048x2048 linear layers: 24 * (2048*2048 + 2048) ~ 100.7M parameters.
    return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)])


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}, "key": "testing", "secret": "testing"}
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
    torch.manual_seed(0)
    model = make_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    storage = FsspecStorage("s3://bench", options)
    fs = storage.fs
    rows: dict[str, list[float]] = {}
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows["save_weights to s3://"] = timed(
            lambda: tc.save_weights(model, "s3://bench/w.safetensors", storage_options=options), args.repeats)
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        rows["s3fs pipe_file of save(...)"] = timed(lambda: fs.pipe_file("bench/raw.safetensors", save(state)), args.repeats)

        remote = CheckpointWriter(async_save=True, storage=storage)
        with tempfile.TemporaryDirectory() as directory:
            local = CheckpointWriter(async_save=True)
            for name, writer, path in (("async save, blocked: s3://", remote, "s3://bench/a.safetensors"),
                                       ("async save, blocked: local disk", local, os.path.join(directory, "a.safetensors"))):
                blocked = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    writer.write(path, state, {"format": "pt"})
                    blocked.append(time.perf_counter() - start)
                    writer.flush()  # untimed: the write itself, off the training thread
                rows[name] = blocked
                writer.close()
    finally:
        server.stop()
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    print(f"torch {torch.__version__}, {size_mb:.0f} MB of weights, moto's S3 server on 127.0.0.1 via s3fs, "
          f"{args.repeats} repeats; peak extra memory of a remote save: {grown_mb:.0f} MB")
    print(f"| {'method':<34} | median s | min s |")
    print(f"|{'-' * 36}|---------:|------:|")
    for name, times in rows.items():
        print(f"| {name:<34} | {statistics.median(times):8.3f} | {min(times):5.3f} |")
    ratio = statistics.median(rows["save_weights to s3://"]) / statistics.median(rows["s3fs pipe_file of save(...)"])
    blocked = statistics.median(rows["async save, blocked: s3://"]) / statistics.median(rows["async save, blocked: local disk"])
    print(f"save_weights / s3fs put: {ratio:.2f}x; async blocked time, s3 / local: {blocked:.2f}x")


if __name__ == "__main__":
    main()
