"""Argument checks shared by every layer, with errors that name the argument and what was expected."""

from __future__ import annotations

import numbers
import os
import re
import tempfile
import warnings
from typing import Any

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_count(value: object, name: str, minimum: int = 0, note: str = "") -> int:
    """`value` when it is an integer >= `minimum`: a TypeError naming the argument when it is not an
    integer (a bool, a float, a string), a ValueError when it is below `minimum`.

    Args:
        value: the argument as given.
        name: its name, for the message.
        minimum: the smallest accepted value.
        note: added after "expected an integer >= minimum" in the message, e.g. "(0 turns it off)".

    Example:

    ```python
    patience = check_count(patience, "patience")
    epochs = check_count(epochs, "epochs", minimum=1)
    ```
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer >= {minimum}{note}, received {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}{note}, received {value!r}")
    return value


def check_optional_count(value: object, name: str, minimum: int = 1) -> int | None:
    """None, or an integer >= `minimum`: a TypeError naming the argument for another type, a
    ValueError for a value below `minimum`.

    Args:
        value: the argument as given.
        name: its name, for the message.
        minimum: the smallest accepted integer.

    Example:

    ```python
    batch_size = check_optional_count(batch_size, "batch_size")  # None or >= 1
    ```
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected None or an integer >= {minimum}, received {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}: expected None or an integer >= {minimum}, received {value!r}")
    return value


def check_update_freq(update_freq: Any, owner: str) -> str | int:
    """`update_freq` (TensorBoard's, the trackers') as `"epoch"` or an integer n >= 1 (`"batch"`
    is 1): a TypeError for another type, a ValueError for n < 1.

    Args:
        update_freq: the argument as given.
        owner: the callback, for the message.

    Example:

    ```python
    self.update_freq = check_update_freq(update_freq, "TensorBoard")
    ```
    """
    if update_freq == "batch":
        return 1
    if update_freq == "epoch":
        return "epoch"
    if isinstance(update_freq, bool) or not isinstance(update_freq, int):
        raise TypeError(f"{owner}: update_freq must be 'epoch', 'batch' or an integer >= 1, received {update_freq!r}")
    if update_freq < 1:
        raise ValueError(f"{owner}: update_freq must be 'epoch', 'batch' or an integer >= 1, received {update_freq!r}")
    return update_freq


def check_number(value: object, name: str) -> float:
    """`value` as a float when it is a real number (not a bool), else a TypeError naming the argument.

    Args:
        value: the argument as given.
        name: its name, for the message.

    Example:

    ```python
    min_delta = check_number(min_delta, "min_delta")
    ```
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, received {type(value).__name__} ({value!r})")
    return float(value)


def check_verbose(verbose: object, name: str = "verbose") -> int:
    """The verbosity as 0, 1 or 2 (`"auto"` is 1, as in Keras), for `fit` and every callback.

    A value of the wrong type (a float, a bool, None) is a TypeError, an int or string that is not
    one of the accepted values a ValueError; both name the argument.

    Args:
        verbose: `"auto"`, 0, 1 or 2.
        name: the argument's name, for the message (e.g. `"EarlyStopping: verbose"`).

    Example:

    ```python
    self.verbose = check_verbose(verbose, "EarlyStopping: verbose")  # "auto" -> 1
    ```
    """
    if isinstance(verbose, bool) or not isinstance(verbose, (int, str)):
        raise TypeError(f"{name}: expected 'auto', 0, 1 or 2, received {type(verbose).__name__} ({verbose!r})")
    if verbose == "auto":
        return 1
    if verbose not in (0, 1, 2):
        raise ValueError(f"{name}: expected 'auto', 0, 1 or 2, received {verbose!r}")
    return int(verbose)


def check_save_freq(save_freq: object, owner: str) -> str | int | bool:
    """`save_freq` of `ModelCheckpoint` or `BackupAndRestore`: `"epoch"` or an integer >= 1 (batches).

    `BackupAndRestore` also takes `False` (returned as False): no periodic backup, only the one at
    preemption (SIGTERM), as Keras documents. `True`, 0 and other values are a ValueError whose message
    begins as Keras' does for that owner ("Unrecognized save_freq" for ModelCheckpoint, "Invalid value
    for argument `save_freq`" for BackupAndRestore), so code that matches on it keeps working.

    Args:
        save_freq: the argument as given.
        owner: `"ModelCheckpoint"` or `"BackupAndRestore"`: picks the accepted values and the message.

    Example:

    ```python
    self.save_freq = check_save_freq(save_freq, "BackupAndRestore")  # "epoch", an int, or False
    ```
    """
    if owner == "BackupAndRestore" and save_freq is False:
        return False
    if save_freq == "epoch" or (isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq >= 1):
        return save_freq
    expected = "'epoch', an integer >= 1 (batches)" + (" or False (only at preemption)" if owner == "BackupAndRestore" else "")
    if owner == "BackupAndRestore":
        raise ValueError(
            f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
            f"BackupAndRestore expects {expected}."
        )
    raise ValueError(f"Unrecognized save_freq: {save_freq!r}. {owner} expects {expected}.")


def check_path(path: str | os.PathLike[str], name: str) -> str:
    """`path` as a string: a local path, a `file://` URL as its path, or a URL of another scheme
    (`s3://bucket/run/m.safetensors`, `memory://...`) as it is, for fsspec
    (`checkpoint.fsspec_storage`).

    Args:
        path: the path or URL given.
        name: the argument it came from, for the message (e.g. `"ModelCheckpoint: filepath"`).

    Raises:
        TypeError: `path` is not a str or path.

    Example:

    ```python
    check_path("file:///tmp/ckpt/m.safetensors", "save_weights: filepath")  # "/tmp/ckpt/m.safetensors"
    check_path("s3://bucket/m.safetensors", "save_weights: filepath")       # as it is
    ```
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or path, received {type(path).__name__}")
    match = _URL.match(text)
    if match is not None and match.group(1).lower() == "file":
        return text[len(match.group(0)):] or "."
    return text


def check_local_path(path: str | os.PathLike[str], name: str) -> str:
    """`path` as a local filesystem path; a `file://` URL becomes its path.

    For what only the local protocol writes (sharded FSDP2 directories, `export_full_weights`): a
    path with another scheme (`s3://bucket/run`, `memory://...`) is refused with a ValueError naming
    the argument, instead of silently becoming a local folder named `s3:`. Single files go to URLs
    through `check_path` and `checkpoint.fsspec_storage`.

    Args:
        path: the path or URL given.
        name: the argument it came from, for the message (e.g. `"export_full_weights: directory"`).

    Example:

    ```python
    check_local_path("file:///tmp/ckpt", "export_full_weights: directory")  # "/tmp/ckpt"
    ```
    """
    text = check_path(path, name)
    match = _URL.match(text)
    if match is None:
        return text
    raise ValueError(
        f"{name}: {text!r} is a {match.group(1)!r} URL; sharded remote states are not supported yet "
        "(sharded checkpoints and split weights are written to local paths only): give a local path, or a file:// URL"
    )


def check_writable_dir(path: str | os.PathLike[str], name: str) -> str:
    """`path` as a string once it is a directory this process can write to, created if needed.

    Writability is verified by creating and removing a probe file in it, so a read-only mount, a
    missing permission or a path that is a file fails here, before training, instead of at the first
    save. The error is an OSError naming the argument, the path and the reason.

    Args:
        path: the directory.
        name: the argument it came from, for the message (e.g. `"ModelCheckpoint: filepath"`).

    Example:

    ```python
    check_writable_dir("ckpt/run1", "ModelCheckpoint: filepath")
    ```
    """
    directory = os.fspath(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".torchcallbacks-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OSError(
            exc.errno, f"{name}: cannot write to the directory {directory!r} ({exc.strerror or exc})"
        ) from exc
    return directory


def check_writable_dir_everywhere(path: str | os.PathLike[str], name: str) -> None:
    """`check_writable_dir` on the main process (the one that writes); under `torch.distributed` the
    others learn of a failure through one all-reduce and raise too, instead of waiting in a later
    collective that the failed process never reaches.

    Args:
        path: the directory.
        name: the argument it came from, for the message.

    Example:

    ```python
    check_writable_dir_everywhere("backup/", "BackupAndRestore: backup_dir")  # at train begin
    ```
    """
    from torchcallbacks.distributed import any_process, is_main_process

    error: OSError | None = None
    if is_main_process():
        try:
            check_writable_dir(path, name)
        except OSError as exc:
            error = exc
    if any_process(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"{name}: the main process cannot write to {os.fspath(path)!r}")


#: Stands for "not given" where None is a meaningful value of an argument.
UNSET: Any = object()


def renamed_argument(new: Any, old: Any, new_name: str, old_name: str, owner: str) -> Any:
    """The value of an argument that was renamed: `new` (`UNSET` when not given, then None), or the
    deprecated `old` with a FutureWarning saying the new name; both given is a TypeError.

    Args:
        new: the value given under the new name, or `UNSET`.
        old: the value given under the old name, or `UNSET`.
        new_name: the new name, e.g. `"optimizer"`.
        old_name: the old name, e.g. `"optimizers"`.
        owner: the function or class, for the messages.

    Example:

    ```python
    optimizer = renamed_argument(optimizer, optimizers, "optimizer", "optimizers", "ReduceLROnPlateau")
    ```
    """
    if old is UNSET:
        return None if new is UNSET else new
    if new is not UNSET:
        raise TypeError(f"{owner}: {old_name} is the old name of {new_name}; pass {new_name} only")
    warnings.warn(f"{owner}: {old_name}= is deprecated, pass {new_name}= (same meaning)", FutureWarning, stacklevel=3)
    return old
