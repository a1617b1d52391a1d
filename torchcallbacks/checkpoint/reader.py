"""Strict, bounded reading of checkpoint files: checks made before a parser sees the data.

A safetensors file starts with its header length, a little-endian unsigned 64-bit integer, followed
by that many bytes of JSON. Parsing the header costs memory many times its size (and safetensors
accepts up to 100 MB), so `check_header_size` refuses a header longer than `MAX_HEADER_BYTES` from
those first 8 bytes alone, before safetensors or `json` reads any of it; it also refuses a file too
short to hold the header it announces.

`loads_strict` parses the JSON strings of the header metadata (the training-state document, the
aliases) as strict JSON: no `NaN` / `Infinity` tokens, no number too large for a float, no object
with the same key twice (which readers resolve differently, or silently keep the last of).

Both raise `torchcallbacks.CheckpointError` naming the file (or field) and what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from torchcallbacks.checkpoint.errors import CheckpointError

#: The largest safetensors header (in bytes: 16 MiB) a checkpoint may have. Each tensor takes about
#: 100 bytes of header, so this holds some 150,000 tensors (a model and its Adam state: 50,000
#: parameter tensors) plus the training-state document; a weights file of a 100M-parameter model has
#: a header of a few kB. Parsing a header of this size takes a few seconds and at most about 12 times
#: its size in memory (with `MAX_JSON_CONTAINERS`).
MAX_HEADER_BYTES = 16 * 1024 * 1024

#: The header length field: the first 8 bytes of a safetensors file, a little-endian u64.
HEADER_LENGTH_BYTES = 8


def check_header_size(path: str | os.PathLike[str]) -> int:
    """Read the header length of a safetensors file (its first 8 bytes) and check it, reading
    nothing else: the header must be at most `MAX_HEADER_BYTES` long and fit in the file.

    Args:
        path: the file.

    Returns:
        The header length in bytes.

    Raises:
        CheckpointError: the file is shorter than 8 bytes, announces a header larger than
            `MAX_HEADER_BYTES`, or is too short to hold the header it announces (the message names
            the file and both sizes).
        OSError: the file cannot be opened.

    Example:

    ```python
    check_header_size("model.safetensors")  # e.g. 1024; raises CheckpointError for a foreign file
    ```
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        prefix = f.read(HEADER_LENGTH_BYTES)
        file_size = os.fstat(f.fileno()).st_size
    if len(prefix) < HEADER_LENGTH_BYTES:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file: it has {file_size} bytes, fewer than the "
            f"{HEADER_LENGTH_BYTES} of the header length field"
        )
    header_size = int.from_bytes(prefix, "little")
    if header_size > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file: its header length field says {header_size} bytes, "
            f"more than the limit of {MAX_HEADER_BYTES} bytes (torchcallbacks.checkpoint.reader.MAX_HEADER_BYTES); "
            "a foreign or damaged file, or one with far more tensors than a checkpoint has"
        )
    available = file_size - HEADER_LENGTH_BYTES
    if header_size > available:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file: truncated header (its header length field says "
            f"{header_size} bytes, only {available} follow)"
        )
    return header_size


#: The deepest nesting of JSON that `loads_strict` takes (a training state nests about 10 deep; the
#: callbacks' own states are in it).
MAX_JSON_DEPTH = 100

#: The most JSON objects and arrays `loads_strict` takes: a training state holds about four per
#: optimizer state tensor (150,000 tensors: some 600,000), and parsed each costs some 60 bytes.
MAX_JSON_CONTAINERS = 1_000_000


def loads_strict(text: str, where: str) -> Any:
    """`json.loads` for strict JSON: refuses `NaN`, `Infinity` and `-Infinity`, numbers that
    overflow a float (`1e999`), objects with a repeated key, nesting deeper than `MAX_JSON_DEPTH`,
    and more than `MAX_JSON_CONTAINERS` objects and arrays (counted before parsing).

    Args:
        text: the JSON text.
        where: what is parsed, for the error message (e.g. `"'c.safetensors': metadata 'torchcallbacks.state'"`).

    Returns:
        The parsed value.

    Raises:
        CheckpointError: (a ValueError) `text` is not strict JSON; the message starts with `where`
            and names the token or key.

    Example:

    ```python
    loads_strict('{"epoch": 3}', "state")  # {'epoch': 3}
    loads_strict('{"best": NaN}', "state")  # CheckpointError: state: NaN is not allowed ...
    ```
    """

    def constant(token: str) -> Any:
        raise CheckpointError(f"{where}: {token} is not allowed (strict JSON has no NaN or Infinity)")

    def number(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise CheckpointError(f"{where}: the number {token[:50]} does not fit a float")
        return value

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise CheckpointError(f"{where}: duplicate key {key!r} in a JSON object")
            result[key] = value
        return result

    _check_containers(text, where)  # before anything is built: each costs some 60 bytes in Python
    try:
        value = json.loads(text, parse_constant=constant, parse_float=number, object_pairs_hook=unique)
    except CheckpointError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not valid JSON: {exc}") from exc
    _check_depth(value, where)
    return value


def _check_depth(value: Any, where: str) -> None:
    """Refuse JSON nested deeper than `MAX_JSON_DEPTH` (checked without recursion, holding one
    iterator per level): what reads it afterwards recurses, and a state of ours nests about 10 deep."""
    stack: list[Any] = [iter([value])]
    while stack:
        node = next(stack[-1], _END)
        if node is _END:
            stack.pop()
            continue
        if isinstance(node, (dict, list)):
            if len(stack) > MAX_JSON_DEPTH:
                raise CheckpointError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} deep")
            stack.append(iter(node.values() if isinstance(node, dict) else node))


_END = object()
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _check_containers(text: str, where: str) -> None:
    """Refuse JSON with more than `MAX_JSON_CONTAINERS` objects and arrays, counted in the text
    (outside its strings) before it is parsed: an empty one is 2 bytes of JSON and some 60 bytes
    once parsed, so a header of nothing else would cost 30 times its size."""
    if text.count("{") + text.count("[") <= MAX_JSON_CONTAINERS:
        return  # an upper bound (brackets inside strings count too): nothing more to do
    outside = _STRING.sub("", text)
    count = outside.count("{") + outside.count("[")
    if count > MAX_JSON_CONTAINERS:
        raise CheckpointError(
            f"{where}: JSON with {count} objects and arrays, more than the {MAX_JSON_CONTAINERS} this reader "
            "takes (a training state holds a few per tensor)"
        )
