"""`WandbLogger`: epoch and batch logs, run parameters and saved models to a Weights & Biases run."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from typing import Any

from torchcallbacks.callbacks.tracker import TrackerCallback, import_extra


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"WandbLogger: {name} must be a string or None, received {type(value).__name__} ({value!r})")
    return value


def _last_logged_step(transaction_log: str) -> int:
    """The last history step of an offline run's transaction log (`run-<id>.wandb`), read with W&B's
    own reader (`wandb leet inspect --summary --json`); -1 when it holds none."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", transaction_log],
        capture_output=True, text=True, timeout=60, check=True,
    )
    summary = json.loads(result.stdout)
    step = summary.get("summary", {}).get("_step")
    return int(step) if isinstance(step, (int, float)) else -1


class WandbLogger(TrackerCallback):
    """Logs training to a Weights & Biases run (`wandb.init`, `run.log`; W&B queues and sends them).

    What is logged, under the names `MLflowLogger` uses:

    * at the start of a new run, its parameters into `run.config` (`log_params`; see
      `TrackerCallback.run_params`), beside `config`;
    * every epoch's logs under their names (`loss`, `val_loss`, ...) with the learning rate of every
      parameter group and `epoch` (0-based), at W&B's `step=` the global step; the epoch keys are
      charted against `epoch` (`define_metric(..., step_metric="epoch")`);
    * with `update_freq` "batch" or n, the batch logs every n training batches as `batch_<name>` at
      `step=` the global step (1-based);
    * with `log_models`, `ModelCheckpoint`'s files as `model` artifacts once they are written
      ("best": its best file, aliased "best"; "all": every file);
    * after a standalone `evaluate()`, its results as `evaluation_<name>` (in the run trained last).

    One run per job: the run id and the last step logged are this callback's state; after
    `BackupAndRestore` restores, `wandb.init(id=..., resume="must")` continues the run, and steps the
    run already holds (logged after the backup, before the crash: `run.starting_step` online, the
    offline run's transaction log offline) are not logged again. An `id` given here wins. The run
    ends with `finish(exit_code=0)`, or 1 when training raised (after `mark_preempting()` for an
    interrupt or a SIGTERM exit), in `on_train_end`. Only the main process talks to W&B.

    A tracker that fails gives one warning and training goes on without it, unless `strict=True`.

    Args:
        project: the W&B project.
        name: the display name of a new run.
        id: continue (or create) the run of this id.
        update_freq: "epoch", or "batch" / an integer n to log batch logs every n batches.
        log_params: log the run's parameters into its config at its start.
        log_models: "best", "all" or False.
        config: the run's config (a dict).
        strict: raise W&B's errors instead of warning once.
        flush_secs: epoch logs are written once this many seconds passed since the last write, and
            by every backup, at train end and after an error (0: at every epoch end).
        **init_kwargs: passed to `wandb.init` (`entity`, `tags`, `mode`, `dir`, `group`, ...).

    Requires the `wandb` package: `pip install torchcallbacks[wandb]`.

    Example:

    ```python
    logger = torchcallbacks.WandbLogger(project="mnist", mode="offline")
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=5, callbacks=[logger])
    ```
    """

    extra = "wandb"
    epoch_steps_by_epoch = False

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        id: str | None = None,
        update_freq: str | int = "epoch",
        log_params: bool = True,
        log_models: str | bool = False,
        config: dict[str, Any] | None = None,
        *,
        strict: bool = False,
        flush_secs: float = 5.0,
        **init_kwargs: Any,
    ) -> None:
        super().__init__(update_freq=update_freq, log_params=log_params, log_models=log_models, strict=strict,
                         flush_secs=flush_secs)
        import_extra("wandb", "wandb", "WandbLogger")
        self.project = _optional_str(project, "project")
        self.name = _optional_str(name, "name")
        self.user_id = _optional_str(id, "id")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"WandbLogger: config must be a dict or None, received {type(config).__name__}")
        for reserved in ("resume", "reinit"):
            if reserved in init_kwargs:
                raise TypeError(f"WandbLogger: {reserved!r} is chosen by the logger (it continues its run on a resume)")
        self.config = dict(config or {})
        self.init_kwargs = init_kwargs
        self.run: Any = None
        self._epoch_keys: set[str] = set()

    def identity(self) -> dict[str, Any]:
        return {"project": self.project} if self.project else {}

    def _user_id(self) -> str | None:
        return self.user_id

    # -- the backend ------------------------------------------------------------------------------
    def _open(self, run_id: str | None) -> str:
        import wandb

        resume: Any = None
        if run_id is not None:  # a saved run must exist; the user's may be new
            resume = "must" if run_id != self.user_id else "allow"
        self.run = wandb.init(
            project=self.project, name=self.name, id=run_id, config=self.config or None, resume=resume,
            reinit="create_new", **self.init_kwargs,
        )
        self._epoch_keys = set()
        self.run.define_metric("epoch")
        return str(self.run.id)

    def _held(self) -> tuple[dict[str, int], int]:
        run = self.run
        if not run.offline:
            return {}, int(run.starting_step) - 1 if run.resumed else -1
        # Offline: the run's earlier offline directories of this id hold what was logged before.
        here = os.path.abspath(run.sync_dir)
        logs = [
            path
            for path in glob.glob(os.path.join(os.path.dirname(here), f"offline-run-*-{run.id}", f"run-{run.id}.wandb"))
            if os.path.dirname(os.path.abspath(path)) != here
        ]
        return {}, max((_last_logged_step(path) for path in logs), default=-1)

    def _write(self, rows: list[tuple[int, dict[str, float], int | None]]) -> None:
        run = self.run
        for step, values, epoch in rows:
            if epoch is not None:
                for key in values.keys() - self._epoch_keys:
                    run.define_metric(key, step_metric="epoch")
                    self._epoch_keys.add(key)
                values = {**values, "epoch": epoch}
            if step < run.step:  # an evaluation after the run went on: W&B's next step
                run.log(values)
            else:
                run.log(values, step=step)

    def _write_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def _write_file(self, path: str, best: bool) -> None:
        import wandb

        name = f"model-{self.run.id}"
        artifact = wandb.Artifact(name, type="model")
        if os.path.isdir(path):
            artifact.add_dir(path, name=os.path.basename(path))
        else:
            artifact.add_file(path)
        self.run.log_artifact(artifact, aliases=["best", "latest"] if best else ["latest"])

    def _close(self, status: str) -> None:
        run, self.run = self.run, None
        if status == "KILLED":
            run.mark_preempting()
        run.finish(exit_code=0 if status == "FINISHED" else 1)
