"""The model part of a sharded training-state directory (FSDP2's full-state `ModelCheckpoint`, a sharded
backup) read as weights: `load_weights(model, "ckpt/m-02")`.

Into a plain model this works in one process without a process group, as DCP's own load does: each
tensor is put together from the chunks every saving process wrote (DCP's default load planner over
`dcp_storage.SafetensorsShardReader`: safetensors shards and JSON metadata, nothing unpickled). Into an
FSDP2 model every process calls it and reads the chunks its shards need. Only the model's tensors
are read; key names are checked from the JSON before any tensor is read.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.model_keys import check_keys
from torchcallbacks.checkpoint.sharded import load_sharded
from torchcallbacks.checkpoint.sharded_files import PathLike, is_sharded_state

__all__ = ["is_sharded_state", "load_state_weights"]  # is_sharded_state: from sharded_files, read from here too


def load_state_weights(model: torch.nn.Module, directory: PathLike, strict: bool = True, *, cast_dtypes: bool = False) -> None:
    """Load the model part of a sharded training-state directory into `model` (see the module docstring).

    Args:
        model: the module (plain, or FSDP2-sharded on every process).
        directory: the checkpoint directory.
        strict: require exactly the model's keys. Shapes must match either way.
        cast_dtypes: cast stored tensors of another dtype than the model's (else refused, named).

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: a damaged directory, or keys, shapes or dtypes that differ from the model's
            (named).

    Example:

    ```python
    plain = make_model()                        # no process group, no FSDP
    load_state_weights(plain, "ckpt/m-02")      # the full tensors, put together from every shard
    ```
    """
    path = os.fspath(directory)
    targets = model.state_dict()

    def template(saved: dict[str, Any]) -> dict[str, Any]:
        names = saved.get("model")
        if not isinstance(names, dict):
            raise CheckpointError(f"{path!r}: field 'model' must be a dict of tensors, found {names!r}")
        # key names only here (every tensor of the model's shape): the reader checks the shapes
        check_keys(path, model, {k: targets.get(k, torch.empty(0)) for k in names}, {}, strict)
        return {"model": {k: torch.empty_like(targets[k]) for k in names if k in targets}}

    state, _ = load_sharded(path, template, partial=True, cast_dtypes=cast_dtypes)
    tensors = {k: v for k, v in state["model"].items() if k in targets}
    check_keys(path, model, tensors, {}, strict, cast_dtypes=cast_dtypes)
    model.load_state_dict(tensors, strict=strict)
