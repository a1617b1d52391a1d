"""`CheckpointError`: the one error of the checkpoint package."""

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
