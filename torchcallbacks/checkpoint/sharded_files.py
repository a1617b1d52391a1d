"""The files of a sharded training-state directory (FSDP2; see `checkpoint.sharded` for the protocol):
their names and format versions, and reading its JSON files. Light: no torch.distributed here, so
`load_weights` can tell such a directory without importing DCP.
"""

from __future__ import annotations

import os
from typing import Any

from torchcallbacks.checkpoint.errors import CheckpointError
from torchcallbacks.checkpoint.reader import loads_strict

PathLike = str | os.PathLike[str]

#: The files of a complete sharded checkpoint directory.
STATE_FILE = "state.json"
METADATA_FILE = "dcp_metadata.json"
REPLICATED_FILE = "replicated.safetensors"
FORMAT = "torchcallbacks.sharded_state"
METADATA_FORMAT = "torchcallbacks.dcp_metadata"
#: Of `state.json`. 2: numpy's and Python's random-state words are tensors (replicated ones), not JSON
#: lists; version 1 directories (lists) are still read.
FORMAT_VERSION = 2
#: Of `dcp_metadata.json` (unchanged since version 1).
METADATA_VERSION = 1


def check_own_file(path: str) -> None:
    """A file of a checkpoint directory must be the directory's own: a symbolic link (to a file
    outside it, or anywhere: an edited or planted directory) is refused without being opened.

    Args:
        path: a file of the directory.

    Example:

    ```python
    check_own_file("ckpt/state.json")  # CheckpointError if it is a symbolic link
    ```
    """
    if os.path.islink(path):
        raise CheckpointError(
            f"{path!r} is a symbolic link: the files of a sharded checkpoint directory must be its own regular files"
        )


def read_json_file(path: str, what: str) -> Any:
    """The strict-JSON object in the file `path` of a sharded checkpoint directory (its own file).

    Args:
        path: the file.
        what: its name in messages (e.g. `STATE_FILE`).

    Raises:
        CheckpointError: missing (the directory is not complete), unreadable, not strict JSON or not
            an object.

    Example:

    ```python
    document = read_json_file("ckpt/state.json", STATE_FILE)
    ```
    """
    check_own_file(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{os.path.dirname(path)!r} is not a complete sharded checkpoint: no {what}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path!r}: cannot read the {what}: {exc}") from exc
    document = loads_strict(text, repr(path))
    if not isinstance(document, dict):
        raise CheckpointError(f"{path!r}: the {what} is not a JSON object")
    return document


def is_sharded_state(path: PathLike) -> bool:
    """Whether `path` is a sharded training-state directory (it holds `state.json`).

    Args:
        path: a file or directory.

    Example:

    ```python
    is_sharded_state("ckpt/m-02")  # True for a full-state ModelCheckpoint of an FSDP2 model
    ```
    """
    return os.path.isfile(os.path.join(os.fspath(path), STATE_FILE))
