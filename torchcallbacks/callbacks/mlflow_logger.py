"""`MLflowLogger`: epoch and batch logs, run parameters and saved models to an MLflow run."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from torchcallbacks.callbacks.tracker import TrackerCallback, import_extra

_MAX_METRICS = 1000  # MLflow's limit per log_batch call
_MAX_PARAMS = 100
_MAX_PARAM_LENGTH = 6000


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"MLflowLogger: {name} must be a string or None, received {type(value).__name__} ({value!r})")
    return value


class MLflowLogger(TrackerCallback):
    """Logs training to an MLflow run, through `mlflow.MlflowClient` (no global active run).

    What is logged:

    * at the start of a new run, its parameters (`log_params`): `epochs`, `steps` (per epoch),
      `batch_size`, each optimizer's class and hyperparameters, the callbacks (see
      `TrackerCallback.run_params`), and `tags` as run tags;
    * every epoch's logs under their names (`loss`, `val_loss`, ... as `CSVLogger` writes them) at
      `step=epoch` (0-based), with the learning rate of every parameter group (`learning_rate`,
      `learning_rate/group_1`, ...: the rate the epoch trained with, as `TensorBoard` logs it);
    * with `update_freq` "batch" or n, the batch logs (running means of the epoch so far) every n
      training batches as `batch_<name>` at `step=` the global step (1-based batch count). They are
      buffered and sent with `log_batch` at the epoch end (or when a backup takes this callback's
      state), so a batch costs no request;
    * with `log_models`, `ModelCheckpoint`'s files as artifacts under `checkpoints/` once they are
      written ("best": its best file, "all": every file), at the epoch end after the save;
    * after a standalone `evaluate()` with this callback, its results as `evaluation_<name>` at the
      number of training steps done, in the run trained last (or a new one).

    One run per job: the run id and the last step logged are this callback's state, so after
    `BackupAndRestore` restores, the same run continues (status back to RUNNING). The run is asked for
    the steps it already holds (logged after the backup, before the crash); those are not logged
    again, so every metric has each step once. A `run_id` given here wins over the saved one. The
    run ends FINISHED, or FAILED when training raised (KILLED for an interrupt or a SIGTERM exit), in
    `on_train_end`. Only the main process talks to MLflow; no collective is added.

    A tracker that fails (a server down, a bad URI) gives one warning and training goes on without
    it, unless `strict=True`.

    Args:
        tracking_uri: where the runs are stored (`"sqlite:///mlflow.db"`, `"http://host:5000"`, a
            directory); None for MLflow's default (`MLFLOW_TRACKING_URI`).
        experiment_name: the experiment (created if it does not exist); None for MLflow's default
            experiment (`MLFLOW_EXPERIMENT_NAME`, else "Default").
        run_name: the name of a new run.
        run_id: continue this run instead of starting one.
        update_freq: "epoch", or "batch" / an integer n to log batch logs every n batches.
        log_params: log the run's parameters at its start.
        log_models: "best", "all" or False (see above).
        tags: run tags of a new run (a dict of strings).
        strict: raise MLflow's errors instead of warning once.
        flush_secs: epoch logs are written once this many seconds passed since the last write, and
            by every backup, at train end and after an error (0: at every epoch end).

    Requires the `mlflow` package: `pip install torchcallbacks[mlflow]`.

    Example:

    ```python
    logger = torchcallbacks.MLflowLogger(tracking_uri="sqlite:///mlflow.db", experiment_name="mnist")
    torchcallbacks.fit(model, loader, optimizer=opt, loss=loss_fn, epochs=5, callbacks=[logger])
    print(logger.run_id)
    ```
    """

    extra = "mlflow"
    epoch_steps_by_epoch = True

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        update_freq: str | int = "epoch",
        log_params: bool = True,
        log_models: str | bool = False,
        tags: dict[str, Any] | None = None,
        *,
        strict: bool = False,
        flush_secs: float = 5.0,
    ) -> None:
        super().__init__(update_freq=update_freq, log_params=log_params, log_models=log_models, strict=strict,
                         flush_secs=flush_secs)
        import_extra("mlflow", "mlflow", "MLflowLogger")
        self.tracking_uri = _optional_str(tracking_uri, "tracking_uri")
        self.experiment_name = _optional_str(experiment_name, "experiment_name")
        self.run_name = _optional_str(run_name, "run_name")
        self.user_run_id = _optional_str(run_id, "run_id")
        if tags is not None and not isinstance(tags, dict):
            raise TypeError(f"MLflowLogger: tags must be a dict or None, received {type(tags).__name__}")
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.client: Any = None

    def identity(self) -> dict[str, Any]:
        return {"experiment_name": self.experiment_name} if self.experiment_name else {}

    def _user_id(self) -> str | None:
        return self.user_run_id

    # -- the backend ------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self.client is None:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        return self.client

    def _open(self, run_id: str | None) -> str:
        client = self._client()
        if run_id is not None:
            client.get_run(run_id)  # raises when there is no such run
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment_id = self._experiment_id(client)
        run = client.create_run(experiment_id, tags=self.tags or None, run_name=self.run_name)
        return str(run.info.run_id)

    def _experiment_id(self, client: Any) -> str:
        import mlflow

        name = self.experiment_name
        if name is None:
            from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME

            if MLFLOW_EXPERIMENT_ID.get():
                return str(MLFLOW_EXPERIMENT_ID.get())
            name = MLFLOW_EXPERIMENT_NAME.get()
            if not name:
                return mlflow.tracking.default_experiment.DEFAULT_EXPERIMENT_ID
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        return str(client.create_experiment(name))

    def _held(self) -> tuple[dict[str, int], int]:
        client = self._client()
        assert self.run_id is not None
        keys = client.get_run(self.run_id).data.metrics
        held = {key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1) for key in keys}
        return held, -1

    def _write(self, rows: list[tuple[int, dict[str, float], int | None]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values, _ in rows for key, value in values.items()]
        for start in range(0, len(metrics), _MAX_METRICS):
            self._client().log_batch(self.run_id, metrics=metrics[start : start + _MAX_METRICS])

    def _write_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        def text(value: Any) -> str:
            value = value if isinstance(value, str) else json.dumps(value)
            return value if len(value) <= _MAX_PARAM_LENGTH else value[: _MAX_PARAM_LENGTH - 3] + "..."

        items = [Param(key, text(value)) for key, value in params.items()]
        for start in range(0, len(items), _MAX_PARAMS):
            self._client().log_batch(self.run_id, params=items[start : start + _MAX_PARAMS])

    def _write_file(self, path: str, best: bool) -> None:
        if os.path.isdir(path):  # a sharded training state
            self._client().log_artifacts(self.run_id, path, artifact_path=f"checkpoints/{os.path.basename(path)}")
        else:
            self._client().log_artifact(self.run_id, path, artifact_path="checkpoints")

    def _close(self, status: str) -> None:
        self._client().set_terminated(self.run_id, status=status)
