"""torchrun worker: full weights of an FSDP2 model (`fully_shard` on a CPU mesh, gloo) for the world.

`fsdp_weights_worker.py WORKDIR MODE`, MODE one of:

- `weights`: train a few steps, then rank 0 writes the state gathered by hand (WORKDIR/expected.safetensors)
  and every process calls `save_weights` (w/one.safetensors; w/split.safetensors with a small
  `max_shard_size`), `export_full_weights` (export/, export_small/) and `load_weights` into sharded
  models with other weights (from the split files, an export directory and one file), each then
  gathered by hand (WORKDIR/loaded_<name>.safetensors). Then `fit` 4 epochs with three weights-only
  `ModelCheckpoint`s (`max_to_keep=2`; `save_best_only` and `async_save`), one with `mode="max"` on the
  falling loss (its best stays epoch 1's file), and `TensorBoard`
  (histograms, gradients, images, embeddings, and the graph it skips), a `Record` callback writing the gathered parameters and
  gradients of every epoch end (WORKDIR/epoch_<e>.safetensors). WORKDIR/report_<rank>.json: the
  checkpoints' paths, the losses, how many gathered tensors were alive at once during the saves, the error of `max_shard_size=0` and that of a save rank 0 cannot write.
- `hf`: a tiny GPT-2 (tied embeddings) sharded with `fully_shard`, exported with a small
  `max_shard_size` (WORKDIR/hf, with the config), and its gathered state (WORKDIR/hf_expected.safetensors).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import ddp_common as common
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchcallbacks as tc
from torchcallbacks.checkpoint.sharded import export_full_weights
from torchcallbacks.distributed import full_tensor

EPOCHS = 4
SMALL = 600  # bytes: several files for these models


class Net(torch.nn.Module):
    """Uneven shards: 33 rows over 2 processes, and a 1-row weight and bias (process 1 holds empty
    shards); an embedding for the projector; a buffer (not sharded)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 1))
        self.emb = torch.nn.Embedding(5, 3)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale[0] + self.emb((x[:, 0] > 0).long()).sum(1, keepdim=True)


def make_model(seed: int, shard: bool = True) -> Net:
    torch.manual_seed(seed)
    model = Net()
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (*model.body, model.emb):
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def write_gathered(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Every process gathers each tensor; rank 0 writes them (the reference the tests compare with)."""
    full = {name: full_tensor(t.detach()).clone() for name, t in tensors.items()}
    if dist.get_rank() == 0:
        save_file(full, path)
    dist.barrier()


@contextlib.contextmanager
def count_gathered() -> Iterator[dict[str, int]]:
    """Counts the tensors `DTensor.full_tensor` returns and the most of them alive at once."""
    counts = {"total": 0, "alive": 0, "peak": 0}
    original = DTensor.full_tensor

    def died() -> None:
        counts["alive"] -= 1

    def tracked(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        full = original(self, *args, **kwargs)
        counts["total"] += 1
        counts["alive"] += 1
        counts["peak"] = max(counts["peak"], counts["alive"])
        weakref.finalize(full, died)
        return full

    DTensor.full_tensor = tracked  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        DTensor.full_tensor = original  # type: ignore[method-assign]


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=generator)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Record(tc.Callback):
    """After the other callbacks at each epoch end: the gathered parameters and gradients."""

    dispatch_order = 5

    def __init__(self, workdir: str) -> None:
        super().__init__()
        self.workdir = workdir

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        tensors: dict[str, torch.Tensor] = dict(self.model.state_dict())
        tensors.update({f"grad/{n}": p.grad for n, p in self.model.named_parameters() if p.grad is not None})
        write_gathered(tensors, os.path.join(self.workdir, f"epoch_{epoch}.safetensors"))


def weights(workdir: str) -> None:
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(data(), batch_size=5, sampler=DistributedSampler(data(), shuffle=False))
    for x, y in list(loader)[:2]:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    write_gathered(model.state_dict(), os.path.join(workdir, "expected.safetensors"))
    out = os.path.join(workdir, "w")
    with count_gathered() as gathered:
        tc.save_weights(model, os.path.join(out, "one.safetensors"))
        tc.save_weights(model, os.path.join(out, "split.safetensors"), max_shard_size=SMALL)
        export_full_weights(model, os.path.join(workdir, "export"))
        export_full_weights(model, os.path.join(workdir, "export_small"), max_shard_size=SMALL)
    report: dict[str, Any] = {"gathered": gathered}
    try:
        tc.save_weights(model, os.path.join(out, "bad.safetensors"), max_shard_size=0)
    except ValueError as exc:
        report["bad_max_shard_size"] = str(exc)
    try:  # rank 0 cannot write there (a file stands where the directory would be): every process raises
        tc.save_weights(model, os.path.join(workdir, "expected.safetensors", "x.safetensors"))
    except tc.CheckpointError as exc:
        report["unwritable"] = str(exc)
    for seed, (name, source) in enumerate({"split": os.path.join(out, "split.safetensors"),
                                           "export": os.path.join(workdir, "export_small"),
                                           "one": os.path.join(out, "one.safetensors")}.items(), start=1):
        other = make_model(seed)
        tc.load_weights(other, source)
        write_gathered(other.state_dict(), os.path.join(workdir, f"loaded_{name}.safetensors"))

    ckpt = os.path.join(workdir, "ckpt")
    every = tc.ModelCheckpoint(os.path.join(ckpt, "every-{epoch:02d}.safetensors"), monitor="loss",
                               save_weights_only=True, max_to_keep=2)
    best = tc.ModelCheckpoint(os.path.join(ckpt, "best-{epoch:02d}.safetensors"), monitor="loss", save_best_only=True,
                              save_weights_only=True, max_to_keep=2, async_save=True)
    first = tc.ModelCheckpoint(os.path.join(ckpt, "first-{epoch:02d}.safetensors"), monitor="loss", mode="max",
                               save_best_only=True, save_weights_only=True)  # the loss falls: epoch 1's only
    board = tc.TensorBoard(os.path.join(workdir, "tb"), histogram_freq=1, write_grads=True, write_images=True,
                           embeddings_freq=1)  # write_graph: skipped (tracing on rank 0 alone would hang)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = tc.fit(model, loader, optimizer=optimizer, loss=torch.nn.functional.mse_loss, epochs=EPOCHS,
                         verbose=0, callbacks=[every, best, first, board, Record(workdir)])
    report["warnings"] = [str(w.message) for w in caught if "TensorBoard" in str(w.message)]
    report.update({
        "loss": history.history["loss"],
        "every": {"best_path": every.best_path, "last_path": every.last_path, "kept": every.state_dict()["kept"]},
        "best": {"best_path": best.best_path, "last_path": best.last_path, "kept": best.state_dict()["kept"]},
        "first": {"best_path": first.best_path, "last_path": first.last_path, "kept": first.state_dict()["kept"]},
    })
    with open(os.path.join(workdir, f"report_{dist.get_rank()}.json"), "w") as file:
        json.dump(report, file)


def hf(workdir: str) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out = os.path.join(workdir, "hf")
    export_full_weights(model, out, max_shard_size=2000)
    if dist.get_rank() == 0:
        config.save_pretrained(out)
    write_gathered(model.state_dict(), os.path.join(workdir, "hf_expected.safetensors"))


def main() -> None:
    workdir, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    {"weights": weights, "hf": hf}[mode](workdir)
    common.shut_down()  # the FSDP modules freed first (they sit in reference cycles)


if __name__ == "__main__":
    main()
