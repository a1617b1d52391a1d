"""The errors of the checkpoint package: `CheckpointError` (a file that cannot be used) and
`CheckpointWriteError` (a file that could not be written)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit what it is loaded into.

    The message names the file and, where one is at fault, the field or the keys.

    Example:

    ```python
    try:
        torchcallbacks.load_weights(model, "model.safetensors")
    except CheckpointError as error:
        print(f"cannot use the checkpoint: {error}")
    ```
    """


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (disk full, file too large for the process's limit...):
    an `OSError` with the system's `errno` and the target file's name, where safetensors' own error
    names neither. The previous file at that name is left as it was.

    Example:

    ```python
    try:
        torchcallbacks.save_weights(model, "model.safetensors")
    except CheckpointWriteError as error:
        print(error.errno == errno.ENOSPC, error.filename)
    ```
    """


def raise_process_errors(errors: list[str | None], what: str) -> None:
    """Raise one `CheckpointError` naming every process whose entry of `errors` (one per rank, as
    `all_gather_json` gives them: an error's text or None) is not None; nothing when none failed.

    Args:
        errors: each process's error, by rank.
        what: what failed, for the message (e.g. `"saving 'ckpt/step-3'"`).

    Example:

    ```python
    raise_process_errors(all_gather_json(repr(error) if error else None), "writing 'model.safetensors'")
    ```
    """
    bad = [(rank, message) for rank, message in enumerate(errors) if message]
    if bad:
        raise CheckpointError(f"{what} failed: " + "; ".join(f"process {r}: {m}" for r, m in bad))
