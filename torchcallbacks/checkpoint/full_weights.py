"""Full-weight files of a model that may be FSDP2-sharded: written a tensor at a time, split above a
size as Hugging Face splits them, and read back from a file, an index or an export directory.

Writing (`write_weights`): for an FSDP2 model (DTensor values in the state dict) every process calls
it; the tensors are gathered one at a time with `DTensor.full_tensor()` (every process takes part in
each gather) and rank 0 appends each to the file it is writing (`stream.write_stream`: the header is
computed up front from the global shapes and dtypes), so the extra memory is about the largest tensor,
not the model. Each file is written atomically. Above `max_shard_size` bytes the tensors are split, in
state-dict order, into `X-00001-of-0000N.safetensors` ... for a path `X.safetensors`, with the index
`X.safetensors.index.json` (`{"metadata": {"total_size": ...}, "weight_map": {name: file}}`), written
last: for `model.safetensors` that is exactly Hugging Face's layout.

Reading (`weight_files`, `load_weights_into`): a path is a weights file, an index (`*.index.json`), a
file path whose index exists beside it (`X.safetensors` -> `X.safetensors.index.json`), or a directory
holding `model.safetensors` or `model.safetensors.index.json` (an export). Into an FSDP2 model, every
process reads each full tensor from the file itself, one at a time, keeps its own chunk
(`distribute_tensor(..., src_data_rank=None)`: no communication) and copies it into its shard.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open

from torchcallbacks.checkpoint.errors import CheckpointError, raise_process_errors
from torchcallbacks.checkpoint.model_keys import check_keys
from torchcallbacks.checkpoint.reader import MAX_HEADER_BYTES, check_header_size, loads_strict
from torchcallbacks.checkpoint.stream import StreamPlan, TensorSpec, write_stream
from torchcallbacks.checkpoint.tensor_files import (
    ALIASES_KEY,
    PREFIX,
    read_file,
    restore_aliases,
)
from torchcallbacks.checkpoint.tensor_files import (
    deduplicate as deduplicate_tensors,  # the argument hides the name
)
from torchcallbacks.checkpoint.writer import atomic_write_json, fsync_dir
from torchcallbacks.checks import check_local_path
from torchcallbacks.distributed import (
    all_gather_json,
    barrier,
    full_tensor,
    get_rank,
    has_dtensors,
    unwrap_model,
)

PathLike = str | os.PathLike[str]

#: The file name of a Hugging Face export (`export_full_weights`) in its directory.
HF_WEIGHTS = "model.safetensors"
#: What an index's name adds to the name of the file it stands for.
INDEX_SUFFIX = ".index.json"


def check_max_shard_size(value: Any, what: str = "max_shard_size") -> int | None:
    """`value` when it is None or a positive number of bytes, else a ValueError naming `what`.

    Args:
        value: the argument.
        what: its name, for the message.

    Example:

    ```python
    check_max_shard_size(0)  # ValueError: max_shard_size: expected None or a positive integer (bytes), ...
    ```
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{what}: expected None or a positive integer (bytes), received {value!r}")
    return value


def index_path(filepath: str) -> str:
    """The index of the split files of `filepath`: `X.safetensors` -> `X.safetensors.index.json`.

    Args:
        filepath: the path of the save.

    Example:

    ```python
    index_path("out/model.safetensors")  # 'out/model.safetensors.index.json'
    ```
    """
    return filepath + INDEX_SUFFIX


def shard_paths(filepath: str, count: int) -> list[str]:
    """The files `filepath` is written as: itself for one, `X-0000i-of-0000N.safetensors` for more.

    Args:
        filepath: the path asked for, `X.safetensors`.
        count: the number of files.

    Example:

    ```python
    shard_paths("out/model.safetensors", 2)
    # ['out/model-00001-of-00002.safetensors', 'out/model-00002-of-00002.safetensors']
    ```
    """
    if count == 1:
        return [filepath]
    stem = filepath.removesuffix(".safetensors")
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _group(specs: Sequence[TensorSpec], max_shard_size: int | None) -> list[list[TensorSpec]]:
    """The specs split in their order into files of at most `max_shard_size` bytes of tensors (a larger
    tensor gets a file of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_shard_size is not None and groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return groups


def remove_weight_files(filepath: str, keep: Sequence[str] = ()) -> None:
    """Remove the files a weights save at `filepath` may have left: the file, its index and its
    split files `X-?????-of-?????.safetensors`, except those in `keep`.

    Args:
        filepath: the path of the save, `X.safetensors`.
        keep: paths to leave.

    Example:

    ```python
    remove_weight_files("ckpt/epoch-01.safetensors")  # the file, or its split files and index
    ```
    """
    directory = os.path.dirname(os.path.abspath(filepath))
    base = os.path.basename(filepath).removesuffix(".safetensors")
    pattern = re.compile(re.escape(base) + r"-\d{5}-of-\d{5}\.safetensors")
    kept = {os.path.abspath(p) for p in keep}
    try:
        split = [os.path.join(directory, n) for n in os.listdir(directory) if pattern.fullmatch(n)]
    except FileNotFoundError:
        return
    for path in [os.path.abspath(filepath), os.path.abspath(index_path(filepath)), *split]:
        if path not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    fsync_dir(directory)


def _gathered(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> Iterator[torch.Tensor]:
    """Each named tensor in full, one at a time (a DTensor's gather is a collective)."""
    for name in names:
        yield full_tensor(state[name].detach())


def write_weights(
    state: Mapping[str, torch.Tensor],
    filepath: PathLike,
    metadata: Mapping[str, str],
    *,
    max_shard_size: int | None = None,
    collective: bool | None = None,
    deduplicate: bool = True,
    delete_after: Sequence[PathLike] = (),
) -> list[str]:
    """Write a state dict's full tensors under their names, one file or split files and an index.

    With `collective` (the default when `state` holds DTensors) every process must call it: each
    tensor is gathered in turn on every process and rank 0 writes; errors of rank 0 are raised on
    every process. Otherwise this process writes alone. Every file is written atomically; files an
    earlier save at `filepath` left that this one does not write (its split files, index, or single
    file) are removed once the new ones are complete.

    Args:
        state: name -> tensor or DTensor (a DTensor stands for its full tensor).
        filepath: `X.safetensors`; above `max_shard_size` the files are `X-0000i-of-0000N.safetensors`
            and the index `X.safetensors.index.json`.
        metadata: each file's header metadata (strings only).
        max_shard_size: the most bytes of tensors in one file (a larger tensor gets a file of its
            own); None for one file.
        collective: gather and write on rank 0 (see above); None: when `state` holds DTensors.
        deduplicate: store tied tensors (the same view of the same memory) of a state without DTensors
            once, listing the other names in the `torchcallbacks.aliases` entry of the file of the kept
            one; False writes every name.
        delete_after: saves to remove (`remove_weight_files`) once the new files are complete.

    Returns:
        The paths written (by rank 0 when collective), the index last when there is one.

    Raises:
        ValueError: a bad `max_shard_size`.
        TypeError: a dtype safetensors cannot store (every process raises, before any gather).
        CheckpointError: the write failed on rank 0 (collective: raised on every process).
        OSError: the write failed (not collective).

    Example:

    ```python
    write_weights(fsdp_model.state_dict(), "out/model.safetensors", {"format": "pt"}, max_shard_size=2**30)
    ```
    """
    check_max_shard_size(max_shard_size)
    path = os.fspath(filepath)
    if collective is None:
        collective = has_dtensors(state.values())
    aliases: dict[str, str] = {}
    if deduplicate and not has_dtensors(state.values()):
        state, aliases = deduplicate_tensors(state)
    groups = _group([TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state.items()], max_shard_size)
    paths = shard_paths(path, len(groups))
    plans = []
    for group in groups:
        names = {s.name for s in group}
        own = {alias: kept for alias, kept in aliases.items() if kept in names}
        plans.append(StreamPlan(group, {**metadata, ALIASES_KEY: json.dumps(own)} if own else metadata))
    writes = not collective or get_rank() == 0
    error: BaseException | None = None
    for file, plan in zip(paths, plans, strict=True):
        tensors = _gathered(state, plan.order)
        if writes and error is None:
            try:
                write_stream(file, plan, tensors)
            except (OSError, ValueError, TypeError) as exc:
                error = exc
        # The other processes, and a failed write, still take part in every gather (so no process waits
        # forever), holding nothing.
        collections.deque(tensors, maxlen=0)
    written = list(paths)
    if writes and error is None:
        try:
            if len(paths) > 1:
                weight_map = {name: os.path.basename(file) for file, plan in zip(paths, plans, strict=True) for name in plan.order}
                document = {"metadata": {"total_size": sum(p.data_size for p in plans)}, "weight_map": weight_map}
                atomic_write_json(index_path(path), document, indent=2)
                written.append(index_path(path))
            remove_weight_files(path, keep=written)
            for stale in delete_after:
                if os.path.abspath(stale) != os.path.abspath(path):
                    remove_weight_files(os.fspath(stale))
        except OSError as exc:
            error = exc
    if collective:
        raise_process_errors(all_gather_json(repr(error) if error is not None else None), f"writing the weights {path!r}")
    elif error is not None:
        raise error
    return written


# -- reading -------------------------------------------------------------------------------------------
def read_index(path: str) -> dict[str, str]:
    """The `weight_map` of an index file (tensor name -> file name in the index's directory), checked.

    Args:
        path: the `*.index.json` file.

    Raises:
        CheckpointError: not strict JSON, no `weight_map` object of names, or a file name that is not
            a plain name in the index's directory (the message names the index and the entry).

    Example:

    ```python
    read_index("export/model.safetensors.index.json")  # {'0.weight': 'model-00001-of-00002.safetensors', ...}
    ```
    """
    if os.path.getsize(path) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path!r}: an index larger than {MAX_HEADER_BYTES} bytes is refused")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path!r} is not a JSON index: {exc}") from exc
    document = loads_strict(text, repr(path))
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path!r}: field 'weight_map' must be a JSON object of tensor name -> file name")
    for name, file_name in weight_map.items():
        if os.path.basename(file_name) != file_name or file_name in ("", ".", ".."):
            raise CheckpointError(f"{path!r}: field 'weight_map/{name}' names {file_name!r}, not a file beside the index")
    return weight_map


def weight_files(filepath: PathLike) -> tuple[str, list[str], dict[str, str] | None]:
    """What a weights path stands for: `(where, files, weight_map)`.

    `where` is the file or index that was found (for messages), `files` the safetensors files to read
    and `weight_map` the index's map (None for a single file). A path is taken as: an existing file
    (an index when it ends in `.index.json`); else `path + ".index.json"` when that exists (the split
    files of a save at `X.safetensors`); a directory: its `model.safetensors`, else its
    `model.safetensors.index.json`.

    Args:
        filepath: the path.

    Raises:
        FileNotFoundError: none of those exists.
        CheckpointError: a damaged index, or one that names files the directory lacks.

    Example:

    ```python
    weight_files("export")  # ('export/model.safetensors.index.json', ['export/model-00001-of-00002...', ...], {...})
    ```
    """
    path = os.fspath(filepath)
    if os.path.isdir(path):
        candidates = [os.path.join(path, HF_WEIGHTS), os.path.join(path, HF_WEIGHTS + INDEX_SUFFIX)]
    else:
        candidates = [path, index_path(path)]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist (nor {candidates[1]!r})")
    if not found.endswith(INDEX_SUFFIX):
        return found, [found], None
    weight_map = read_index(found)
    directory = os.path.dirname(found)
    files = [os.path.join(directory, n) for n in dict.fromkeys(weight_map.values())]
    absent = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if absent:
        raise CheckpointError(f"{found!r} names files the directory lacks: {absent[:10]}")
    return found, files, weight_map


def _check_index(where: str, file: str, names: Any, weight_map: Mapping[str, str] | None) -> None:
    if weight_map is None:
        return
    expected = [n for n, f in weight_map.items() if f == os.path.basename(file)]
    missing = sorted(set(expected) - set(names))
    if missing:
        raise CheckpointError(f"{where!r} puts tensors in {os.path.basename(file)!r} that it lacks: {missing[:10]}")


def read_weights(filepath: PathLike) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a weights path (a file, an index, an export directory), on the CPU, tied
    names restored, with the files' header metadata merged: `(where, tensors, metadata)`.

    Args:
        filepath: see `weight_files`.

    Raises:
        FileNotFoundError: nothing there.
        CheckpointError: a damaged file or index, an index whose files lack the tensors it names, or a
            tensor in two files.

    Example:

    ```python
    where, tensors, metadata = read_weights("export")
    ```
    """
    return _read_all(filepath, read_file)


def _read_all(
    filepath: PathLike, read: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, str]]]
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """`read(file)` of every file of a weights path, checked against the index and merged."""
    where, files, weight_map = weight_files(filepath)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        part, meta = read(file)
        _check_index(where, file, part, weight_map)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise CheckpointError(f"{where!r}: tensors in more than one file: {twice[:10]}")
        tensors.update(part)
        metadata.update(meta)
    return where, tensors, metadata


def load_sharded_weights(
    model: torch.nn.Module, filepath: PathLike, strict: bool = True, *, cast_dtypes: bool = False
) -> None:
    """Load full weights into an FSDP2-sharded model: every process reads each tensor from the file
    itself, one at a time, and copies its own chunk into its shard.

    No communication: `distribute_tensor(full, mesh, placements, src_data_rank=None)` cuts each
    process's chunk from the full tensor it read (`set_model_state_dict(..., broadcast_from_rank0=True)`
    would need the whole model's full state in rank 0's memory). Extra memory: about the largest
    tensor. Keys and shapes are checked from the files' headers before anything is loaded.

    Args:
        model: the sharded model (its plain module).
        filepath: see `weight_files`.
        strict: require exactly the model's keys.
        cast_dtypes: cast tensors of another dtype than the model's (else refused, named).

    Raises:
        FileNotFoundError: nothing there.
        CheckpointError: a damaged file or index, or keys, shapes or dtypes that differ (named).

    Example:

    ```python
    load_sharded_weights(fsdp_model, "export")  # on every process
    ```
    """
    # DTensor's module (most of a second) only for a sharded model: `import torchcallbacks` stays light
    from torch.distributed.tensor import DTensor, distribute_tensor

    sources: dict[int, tuple[str, str]] = {}  # id(meta tensor) -> (file, key)

    def read_header(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Meta tensors (the shape and dtype are what is checked) standing for the file's tensors."""
        check_header_size(file)

        def meta_tensor(f: Any, key: str) -> torch.Tensor:
            piece = f.get_slice(key)
            shape = piece.get_shape()
            dtype = (piece[0:0] if shape else f.get_tensor(key)).dtype  # the dtype without reading the data
            return torch.empty(shape, dtype=dtype, device="meta")

        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                part = {key: meta_tensor(f, key)
                        for key in f.keys() if not key.startswith(PREFIX)}  # noqa: SIM118 (a training state's own tensors left out)
        except Exception as exc:
            raise CheckpointError(f"{file!r} is not a readable safetensors file (truncated, damaged or another format): {exc}") from exc
        sources.update({id(t): (file, key) for key, t in part.items()})
        restore_aliases(file, meta, part)
        return part, meta

    where, headers, metadata = _read_all(filepath, read_header)
    check_keys(where, model, headers, metadata, strict, cast_dtypes=cast_dtypes)
    targets = model.state_dict()
    per_file: dict[str, list[tuple[str, str]]] = {}
    for name in targets:
        if name in headers:
            file, key = sources[id(headers[name])]
            per_file.setdefault(file, []).append((name, key))
    with torch.no_grad():
        for file, items in per_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name, key in items:
                    target = targets[name]
                    value = f.get_tensor(key).to(target.dtype)
                    if isinstance(target, DTensor):
                        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
                    else:
                        value = value.to(target.device)
                    target.copy_(value)
                    del value


# -- a Hugging Face export ---------------------------------------------------------------------------
def export_full_weights(model: torch.nn.Module, directory: PathLike, *, max_shard_size: int = 5_000_000_000) -> list[str]:
    """Write the model's full, unsharded weights in Hugging Face's layout: `model.safetensors`, or
    `model-00001-of-0000N.safetensors` ... and `model.safetensors.index.json` when they exceed
    `max_shard_size` bytes. Keys are the plain `state_dict()` names, every one written (tied ones too).

    Collective: every process calls it. The tensors are gathered one at a time
    (`DTensor.full_tensor()`) and rank 0 streams each into the file it writes
    (`full_weights.write_weights`), so it holds one tensor at a time, not a file's worth; each file is
    written atomically; files of an earlier export that the new one does not have are removed.
    `torchcallbacks.load_weights(model, directory)` and `transformers`' `from_pretrained` read it.

    Args:
        model: the model (FSDP2-sharded or not; wrappers are removed).
        directory: where to write (created if needed).
        max_shard_size: the most bytes of tensors in one file (a larger tensor gets a file of its own).

    Returns:
        The names of the files written, the index last when there is one.

    Raises:
        ValueError: `max_shard_size` is not a positive integer.
        CheckpointError: the write failed (on every process).

    Example:

    ```python
    export_full_weights(model, "export/")
    safetensors.torch.load_file("export/model.safetensors")
    ```
    """
    if max_shard_size is None:
        raise ValueError("max_shard_size: expected a positive integer (bytes), received None")
    out = check_local_path(directory, "export_full_weights: directory")
    written = write_weights(unwrap_model(model).state_dict(), os.path.join(out, HF_WEIGHTS), {"format": "pt"},
                            max_shard_size=max_shard_size, collective=True, deduplicate=False)
    barrier()
    return [os.path.basename(p) for p in written]
