"""torchrun worker: FSDP2 (`fully_shard` on a CPU device mesh, gloo) with the sharded checkpoint module.

`fsdp_worker.py WORKDIR MODE CKPT [STEPS]`, MODE one of:

- `save`: train STEPS Adam steps (default 3), `save_sharded` the model, the optimizer and some
  non-tensor leaves into CKPT, export the full weights (WORKDIR/export, and WORKDIR/export_small with a
  small `max_shard_size`), then train CONTINUE more steps. Rank 0 writes the gathered full state at the
  save (WORKDIR/<CKPT name>.before.safetensors) and after the further steps (.continued.safetensors);
  every process writes WORKDIR/<CKPT name>.save_R.json (bytes written, the bytes of its local shards).
- `hold`: like `save`, but every process sleeps between writing its files and the publication of the
  directory, after writing WORKDIR/held_R, for the test to SIGKILL the job.
- `load`: build the model with other initial weights, `load_sharded` CKPT with pickle.load /
  pickle.loads / pickle.Unpickler / torch.load made to raise, `set_state_dict`, and write the gathered
  full state (WORKDIR/<CKPT name>.after_W.safetensors, W the number of processes) and, after CONTINUE
  more steps, .resumed_W.safetensors. Then, as a control, save with DCP's default FileSystemWriter and
  load it under the same ban: rank 0 writes WORKDIR/control.txt saying whether the ban tripped.
- `backup NAME [states]` / `backup-hold NAME [states]`: `fit` with `BackupAndRestore` (see `backup`;
  `async_save=True` when NAME starts with "async"), and with `states` EarlyStopping(restore_best_weights)
  and SwapEMAWeights too; `backup-hold` sleeps at step 10 (after the backup at step 8) after writing
  WORKDIR/held_R.
- `checkpoint`: `fit` with ModelCheckpoint (full training state: sharded directories), then
  `load_checkpoint` of the last one into a fresh model (see `checkpoint`).
- `load-checkpoint DIR`: only that load (e.g. on another number of processes).
- `kit`: `fit` with the other callbacks together, then `evaluate` and `predict` (see `kit`).
- `probe NAME`: `fit` with one callback (see `probe`), printing `PROBE <name>: OK | FAIL ...` (the
  investigation of what breaks under FSDP2; not run by the tests).
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import sys
import time
import traceback
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import torchcallbacks as tc
from torchcallbacks.checkpoint import sharded
from torchcallbacks.checkpoint.encoding import encode

CONTINUE = 2
ATTEMPTS: list[str] = []  # what refuse_unpickling refused, in this process


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 33 rows: uneven shards; the last layer's weight has one row, so process 1 holds an empty shard
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 1))
    model.register_buffer("scale", torch.tensor([2.0, 3.0]))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, first: int, steps: int) -> None:
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x = torch.randn(8, 16, generator=generator)
        loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def tree(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state, "step": step, "note": {"tuple": (1, 2.5), "inf": float("inf")}}


def write_full(state: dict[str, Any], path: str) -> None:
    """Rank 0 writes every tensor of the tree gathered in full, and the rest as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    document = {k: encode(v, k, tensors) for k, v in state.items()}
    full = {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for name, t in sorted(tensors.items())}
    if dist.get_rank() == 0:
        save_file(full, path, metadata={"document": json.dumps(document)})
    dist.barrier()


def local_bytes(state: dict[str, Any]) -> int:
    tensors: dict[str, torch.Tensor] = {}
    encode(state, "s", tensors)
    return sum(t.to_local().numel() * t.to_local().element_size() for t in tensors.values() if isinstance(t, DTensor))


def refuse_unpickling() -> dict[str, Any]:
    saved = {"pickle.load": pickle.load, "pickle.loads": pickle.loads, "pickle.Unpickler": pickle.Unpickler,
             "torch.load": torch.load}

    def refuse(*args: Any, **kwargs: Any) -> Any:
        ATTEMPTS.append("".join(traceback.format_stack(limit=3)))
        raise AssertionError("UNPICKLING ATTEMPTED during load")

    pickle.load = pickle.loads = pickle.Unpickler = torch.load = refuse  # type: ignore[assignment,misc]
    return saved


def restore_unpickling(saved: dict[str, Any]) -> None:
    pickle.load, pickle.loads = saved["pickle.load"], saved["pickle.loads"]
    pickle.Unpickler, torch.load = saved["pickle.Unpickler"], saved["torch.load"]


def save(workdir: str, ckpt: str, steps: int, hold: bool) -> None:
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 0, steps)
    state = tree(model, optimizer, steps)
    name = os.path.basename(ckpt)
    if hold:
        def wait() -> None:
            path = os.path.join(workdir, f"held_{dist.get_rank()}")
            with open(path + ".tmp", "w") as file:
                file.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(120)

        sharded._before_publish = wait
    written = sharded.save_sharded(ckpt, state, per_process={"rank": dist.get_rank(), "t": torch.full((2,), float(dist.get_rank()))})
    with open(os.path.join(workdir, f"{name}.save_{dist.get_rank()}.json"), "w") as file:
        json.dump({"written": written, "local_bytes": local_bytes(state)}, file)
    write_full(state, os.path.join(workdir, f"{name}.before.safetensors"))
    sharded.export_full_weights(model, os.path.join(workdir, "export"))
    sharded.export_full_weights(model, os.path.join(workdir, "export_small"), max_shard_size=1000)
    train(model, optimizer, steps, CONTINUE)
    write_full(tree(model, optimizer, steps + CONTINUE), os.path.join(workdir, f"{name}.continued.safetensors"))


def load(workdir: str, ckpt: str) -> None:
    model = make_model(1)  # other initial weights: the load must overwrite all of them
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    template = tree(model, optimizer, 0)  # get_state_dict initialises the optimizer state
    template["note"] = None
    banned = refuse_unpickling()
    try:
        state, processes = sharded.load_sharded(ckpt, template)
    finally:
        restore_unpickling(banned)
    assert not ATTEMPTS, ATTEMPTS
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert state["note"] == {"tuple": (1, 2.5), "inf": float("inf")}, state["note"]
    world = dist.get_world_size()
    name = os.path.basename(ckpt)
    with open(os.path.join(workdir, f"{name}.processes_{world}_{dist.get_rank()}.json"), "w") as file:
        json.dump([{"rank": p["rank"], "t": p["t"].tolist()} for p in processes or []], file)
    write_full(tree(model, optimizer, state["step"]), os.path.join(workdir, f"{name}.after_{world}.safetensors"))
    train(model, optimizer, state["step"], CONTINUE)
    write_full(tree(model, optimizer, state["step"] + CONTINUE), os.path.join(workdir, f"{name}.resumed_{world}.safetensors"))
    control(workdir, model)


def control(workdir: str, model: torch.nn.Module) -> None:
    """DCP's own format under the same ban: proves the ban catches DCP's unpickling."""
    path = os.path.join(workdir, "dcp_default")
    dcp.save({"model": model.state_dict(), "extra": {"a": 1}}, checkpoint_id=path)
    banned = refuse_unpickling()
    try:
        dcp.load({"model": model.state_dict(), "extra": {"a": 0}}, checkpoint_id=path)
        outcome = "loaded"
    except BaseException as exc:  # a CheckpointException (a BaseException) wrapping it (and may go on with other files before it gives up)
        outcome = "tripped" if ATTEMPTS else f"other: {exc!r}"
    finally:
        restore_unpickling(banned)
    if dist.get_rank() == 0:
        with open(os.path.join(workdir, "control.txt"), "w") as file:
            file.write(outcome)


def probe(workdir: str, name: str) -> None:
    """`fit` with one callback (a launch per callback: a failure can leave the other process in a
    collective); prints `PROBE <name>: OK` or the error and where it was raised, and exits 3 on failure."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=generator)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    callbacks = {
        "fit": lambda: [],
        "EarlyStopping": lambda: [tc.EarlyStopping(monitor="loss", patience=1)],
        "EarlyStopping(restore_best_weights)": lambda: [tc.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True)],
        "ModelCheckpoint(weights)": lambda: [tc.ModelCheckpoint(os.path.join(workdir, "w.safetensors"), save_weights_only=True)],
        "ModelCheckpoint(full)": lambda: [tc.ModelCheckpoint(os.path.join(workdir, "s.safetensors"), save_weights_only=False)],
        "BackupAndRestore": lambda: [tc.BackupAndRestore(os.path.join(workdir, "backup"))],
        "SwapEMAWeights": lambda: [tc.SwapEMAWeights()],
        "TensorBoard(histogram_freq=1)": lambda: [tc.TensorBoard(os.path.join(workdir, "tb"), histogram_freq=1)],
        "ReduceLROnPlateau": lambda: [tc.ReduceLROnPlateau(monitor="loss")],
        "CSVLogger": lambda: [tc.CSVLogger(os.path.join(workdir, "log.csv"))],
    }[name]()
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, shuffle=False))
    try:
        tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=2, verbose=0, callbacks=callbacks)
    except Exception as exc:
        frames = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-6:]]
        print(f"PROBE {name} (rank {dist.get_rank()}): FAIL {type(exc).__name__}: {str(exc)[:200]} at {frames}", flush=True)
        os._exit(3)
    print(f"PROBE {name} (rank {dist.get_rank()}): OK", flush=True)


def kit(workdir: str) -> None:
    """`fit` of an FSDP2 model with the callbacks no other mode covers, together (ReduceLROnPlateau,
    LearningRateScheduler, CSVLogger, TerminateOnNaN, LambdaCallback, RemoteMonitor to a port nobody
    listens on, the progress bar), then `evaluate` and `predict(gather=True)`; every process writes
    WORKDIR/kit_R.json with what it saw."""
    import socket

    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=generator)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    with socket.socket() as probe_socket:  # a free port, closed again: RemoteMonitor cannot reach it
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    ends: list[int] = []
    callbacks = [
        tc.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),  # lowers every epoch
        tc.LearningRateScheduler(lambda epoch, lr: lr * 0.9),
        tc.CSVLogger(os.path.join(workdir, "kit.csv")),
        tc.TerminateOnNaN(),
        tc.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(epoch)),
        tc.RemoteMonitor(root=f"http://127.0.0.1:{port}"),
    ]
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, shuffle=False))
    history = tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=3, verbose=2,
                     callbacks=callbacks)
    scores = tc.evaluate(model, loader, loss=torch.nn.functional.mse_loss, return_dict=True, verbose=0)
    predictions = tc.predict(model, loader, gather=True, verbose=0)
    report = {"lrs": history.history["learning_rate"], "loss": history.history["loss"], "ends": ends,
              "evaluated": scores["loss"], "predictions": list(predictions.shape)}
    with open(os.path.join(workdir, f"kit_{dist.get_rank()}.json"), "w") as file:
        json.dump(report, file)


BACKUP_FREQ, HOLD_AFTER, BACKUP_EPOCHS = 4, 10, 3


class Hold(tc.Callback):
    """Two steps after the backup at step 8: write WORKDIR/held_R and sleep, for the test to SIGKILL."""

    stops_in_sync = True

    def __init__(self, workdir: str) -> None:
        super().__init__()
        self.workdir = workdir

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.loop.global_step == HOLD_AFTER:
            path = os.path.join(self.workdir, f"held_{dist.get_rank()}")
            with open(path + ".tmp", "w") as file:
                file.write(str(os.getpid()))
            os.replace(path + ".tmp", path)
            time.sleep(120)


class Decay(tc.Callback):
    """Lower the learning rate after every batch: it lives only in the optimizer's param_groups, so a
    resume that did not restore them would train on with another rate."""

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.9


def backup_loader() -> Any:
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 16, generator=generator)
    data = TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(60, 1, generator=generator))
    return DataLoader(data, batch_size=5, sampler=DistributedSampler(data, shuffle=True, seed=3))


def state_callbacks() -> list[Any]:
    """EarlyStopping with a snapshot (mode="max" on the falling loss: the best epoch is the first, so
    the end restores the snapshot of epoch 0) and SwapEMAWeights: callback states of local shards."""
    return [tc.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True), tc.SwapEMAWeights(decay=0.9)]


def callback_tensors(callbacks: list[Any]) -> dict[str, Any]:
    """The DTensor states of `state_callbacks()`, under the paths a sharded checkpoint stores them at."""
    stopper, ema = callbacks
    return {stopper.state_key: {"best_weights": stopper.best_weights}, ema.state_key: {"tensors": ema.ema_tensors}}


def write_shard_info(callbacks: list[Any], path: str) -> None:
    """Each process: the local shape and device of the snapshot's and the average's first weight."""
    stopper, ema = callbacks
    info = {what: [type(t).__name__, list(t.to_local().shape), t.to_local().device.type, list(t.shape)]
            for what, t in (("best", stopper.best_weights["0.weight"]), ("ema", ema.ema_tensors[0]))}
    with open(f"{path}_{dist.get_rank()}.json", "w") as file:
        json.dump(info, file)


def backup(workdir: str, name: str, hold: bool, with_states: bool) -> None:
    """`fit` with BackupAndRestore(save_freq=4) (resuming from WORKDIR/backup if there is one), and
    with `with_states` `state_callbacks()` too; rank 0 writes the final gathered state to
    WORKDIR/<name>.safetensors (and the callbacks' tensors to <name>.callbacks.safetensors)."""
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    saver = tc.BackupAndRestore(os.path.join(workdir, "backup"), save_freq=BACKUP_FREQ, async_save=name.startswith("async"))
    states = state_callbacks() if with_states else []
    tc.fit(model, backup_loader(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=BACKUP_EPOCHS,
           verbose=0, callbacks=[saver, Decay(), *states] + ([Hold(workdir)] if hold else []))
    write_full(tree(model, optimizer, 0), os.path.join(workdir, f"{name}.safetensors"))
    if states:
        write_full(callback_tensors(states), os.path.join(workdir, f"{name}.callbacks.safetensors"))
        write_shard_info(states, os.path.join(workdir, f"{name}.shards"))
    if dist.get_rank() == 0:
        with open(os.path.join(workdir, f"{name}.json"), "w") as file:
            json.dump({"resumed_at": saver.restored.global_step if saver.restored else None}, file)


class Gather(tc.Callback):
    """At every epoch end, after ModelCheckpoint's save: the training state's tensors gathered in full,
    under the paths of the sharded checkpoint (WORKDIR/epoch-E.safetensors, written by rank 0)."""

    dispatch_order = 3

    def __init__(self, workdir: str, states: list[Any]) -> None:
        super().__init__()
        self.workdir, self.states = workdir, states

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizers": [optim_state], "callbacks": callback_tensors(self.states)}
        write_full(state, os.path.join(self.workdir, f"epoch-{epoch}.safetensors"))


def checkpoint(workdir: str) -> None:
    """`fit` with ModelCheckpoint (full state) into WORKDIR/ckpt/state-{epoch:02d} (max_to_keep=2) and
    WORKDIR/best (save_best_only, async_save), `state_callbacks()` and Gather; then `load_checkpoint` of the last
    directory into a fresh model and optimizer (see `load_into_fresh`). Rank 0 writes the callbacks'
    paths to WORKDIR/checkpoint.json."""
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    states = state_callbacks()
    every = tc.ModelCheckpoint(os.path.join(workdir, "ckpt", "state-{epoch:02d}.safetensors"), monitor="loss", max_to_keep=2)
    best = tc.ModelCheckpoint(os.path.join(workdir, "best.safetensors"), monitor="loss", save_best_only=True, async_save=True)
    tc.fit(model, backup_loader(), optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=BACKUP_EPOCHS,
           verbose=0, callbacks=[every, best, *states, Gather(workdir, states)])
    write_shard_info(states, os.path.join(workdir, "checkpoint.shards"))
    if dist.get_rank() == 0:
        with open(os.path.join(workdir, "checkpoint.json"), "w") as file:
            json.dump({"every": every.state_dict(), "best": best.state_dict()}, file)
    assert every.last_path is not None
    load_into_fresh(workdir, every.last_path)


def load_into_fresh(workdir: str, path: str) -> None:
    """`load_checkpoint` of a sharded directory into a model with other weights, a fresh optimizer and
    fresh `state_callbacks()` (unpickling banned); the gathered result (Gather's layout) goes to
    WORKDIR/loaded_W.safetensors, W the number of processes."""
    model = make_model(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    states = state_callbacks()
    callbacks = tc.CallbackList(states, model=model, optimizer=optimizer)
    banned = refuse_unpickling()
    try:
        loaded = tc.load_checkpoint(model, path, optimizer, callbacks=callbacks)
    finally:
        restore_unpickling(banned)
    assert not ATTEMPTS, ATTEMPTS
    assert (loaded.epoch, loaded.batch) == (BACKUP_EPOCHS, 0), loaded
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizers": [optim_state], "callbacks": callback_tensors(states)}
    write_full(state, os.path.join(workdir, f"loaded_{dist.get_world_size()}.safetensors"))


def main() -> None:
    workdir, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if mode in ("save", "hold"):
        save(workdir, sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 3, hold=mode == "hold")
    elif mode == "load":
        load(workdir, sys.argv[3])
    elif mode in ("backup", "backup-hold"):
        backup(workdir, sys.argv[3], hold=mode == "backup-hold", with_states=sys.argv[4:] == ["states"])
    elif mode == "checkpoint":
        checkpoint(workdir)
    elif mode == "load-checkpoint":
        load_into_fresh(workdir, sys.argv[3])
    elif mode == "kit":
        kit(workdir)
    elif mode == "probe":
        probe(workdir, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    common.shut_down()  # the FSDP modules freed first (they sit in reference cycles)


if __name__ == "__main__":
    main()
