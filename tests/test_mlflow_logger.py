"""MLflowLogger against a real local MLflow store (sqlite in tmp_path), read back with MlflowClient."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Crash, make_model, make_regression

import torchcallbacks
from torchcallbacks import BackupAndRestore, CallbackList, MLflowLogger, ModelCheckpoint

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module (creating its tables takes seconds); tests use their own
    experiments or runs."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def uri(store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(store)  # the default artifact root (./mlruns) lands in the store's directory
    return f"sqlite:///{store / 'mlflow.db'}"


def mae(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_pred - y).abs().mean()


def _fit(callbacks: list, epochs: int = 3, **kwargs: Any) -> torchcallbacks.History:
    model = make_model()
    return torchcallbacks.fit(
        model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5),
        loss=torch.nn.functional.mse_loss, metrics=[mae], epochs=epochs, verbose=0,
        validation_data=make_regression(32), callbacks=callbacks, **kwargs,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _runs(client: MlflowClient, name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id])


def test_epoch_logs_params_tags_and_status(uri: str) -> None:
    logger = MLflowLogger(tracking_uri=uri, experiment_name="exp", run_name="first", tags={"team": "a"})
    history = _fit([logger])
    client = MlflowClient(uri)
    (run,) = _runs(client, "exp")
    assert run.info.run_id == logger.run_id and run.info.run_name == "first"
    assert run.info.status == "FINISHED"
    for key in ("loss", "mae", "val_loss", "val_mae"):
        assert _history(client, logger.run_id, key) == list(enumerate(history.history[key]))
    assert _history(client, logger.run_id, "learning_rate") == [(0, 0.01), (1, 0.01), (2, 0.01)]
    params = run.data.params
    assert params["epochs"] == "3" and params["steps"] == "4" and params["batch_size"] == "16"
    assert params["optimizer"] == "SGD" and params["optimizer/lr"] == "0.01" and params["optimizer/momentum"] == "0.5"
    assert params["loss"] == "mse_loss"
    assert "MLflowLogger[experiment_name=exp]" in params["callbacks"]
    assert run.data.tags["team"] == "a"
    assert not any(key.startswith("batch_") for key in run.data.metrics)  # update_freq="epoch"


def test_learning_rate_of_every_param_group(uri: str) -> None:
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    logger = MLflowLogger(tracking_uri=uri, experiment_name="lr")
    step = torchcallbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: scheduler.step())
    torchcallbacks.fit(model, make_regression(), optimizer=optimizer, loss=torch.nn.functional.mse_loss,
                       epochs=2, verbose=0, callbacks=[logger, step])
    client = MlflowClient(uri)
    assert _history(client, logger.run_id, "learning_rate") == [(0, 0.1), (1, 0.05)]  # the rate each epoch trained with
    assert _history(client, logger.run_id, "learning_rate/group_1") == [(0, 0.2), (1, 0.1)]


def test_batch_logs_every_n_batches_at_the_global_step(uri: str) -> None:
    seen: list[tuple[int, float]] = []
    recorder = torchcallbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append((recorder.loop.global_step, float(logs["loss"]))))
    logger = MLflowLogger(tracking_uri=uri, experiment_name="batches", update_freq=3)
    _fit([recorder, logger], epochs=3)  # 4 batches an epoch: global steps 1..12
    client = MlflowClient(uri)
    assert _history(client, logger.run_id, "batch_loss") == [(s, v) for s, v in seen if s % 3 == 0]
    assert [s for s, _ in _history(client, logger.run_id, "batch_mae")] == [3, 6, 9, 12]


def test_batch_hook_is_idle_at_epoch_frequency(uri: str) -> None:
    epoch_logger = MLflowLogger(tracking_uri=uri, experiment_name="idle", update_freq="epoch")
    batch_logger = MLflowLogger(tracking_uri=uri, experiment_name="idle", update_freq="batch")
    callbacks = CallbackList([epoch_logger, batch_logger])
    assert [hook.__self__ for hook in callbacks._dispatch["on_train_batch_end"]] == [batch_logger]


def test_failed_run_and_models_logged_as_artifacts(uri: str, tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(str(tmp_path / "ckpt" / "model-{epoch:02d}.safetensors"), save_weights_only=True)
    best = ModelCheckpoint(str(tmp_path / "best" / "best.safetensors"), monitor="val_loss", save_best_only=True,
                           save_weights_only=True)
    all_logger = MLflowLogger(tracking_uri=uri, experiment_name="models", log_models="all")
    with pytest.raises(RuntimeError, match="crash"):
        _fit([all_logger, checkpoint, Crash(at_step=10)], epochs=3)  # epochs 0 and 1 saved, crash in epoch 2
    client = MlflowClient(uri)
    run = client.get_run(all_logger.run_id)
    assert run.info.status == "FAILED"
    names = sorted(a.path for a in client.list_artifacts(all_logger.run_id, "checkpoints"))
    assert names == ["checkpoints/model-01.safetensors", "checkpoints/model-02.safetensors"]

    best_logger = MLflowLogger(tracking_uri=uri, experiment_name="models", log_models="best")
    _fit([best_logger, best], epochs=2)
    names = [a.path for a in client.list_artifacts(best_logger.run_id, "checkpoints")]
    assert names == ["checkpoints/best.safetensors"]
    local = client.download_artifacts(best_logger.run_id, "checkpoints/best.safetensors", str(tmp_path / "down"))
    assert Path(local).read_bytes() == (tmp_path / "best" / "best.safetensors").read_bytes()  # the last best file


def test_keyboard_interrupt_ends_the_run_killed(uri: str) -> None:
    def interrupt(batch: int, logs: Any) -> None:
        raise KeyboardInterrupt

    logger = MLflowLogger(tracking_uri=uri, experiment_name="killed")
    with pytest.raises(KeyboardInterrupt):
        _fit([logger, torchcallbacks.LambdaCallback(on_train_batch_end=interrupt)])
    assert MlflowClient(uri).get_run(logger.run_id).info.status == "KILLED"


def test_resume_continues_the_run_and_logs_each_step_once(uri: str, tmp_path: Path) -> None:
    """A crash after a mid-epoch backup (step 6) and after the tracker got steps 7 and 8 and the
    epoch-1 logs: the rerun continues the same run, and the steps it holds are not logged again."""
    backup = str(tmp_path / "backup")
    logger = MLflowLogger(tracking_uri=uri, experiment_name="resume", update_freq=1)
    with pytest.raises(RuntimeError, match="crash"):
        _fit([logger, BackupAndRestore(backup, save_freq=6), Crash(at_step=10)], epochs=3)
    client = MlflowClient(uri)
    first = logger.run_id
    assert [s for s, _ in _history(client, first, "batch_loss")] == list(range(1, 11))  # sent at the crash too
    assert client.get_run(first).info.status == "FAILED"

    again = MLflowLogger(tracking_uri=uri, experiment_name="resume", update_freq=1)
    history = _fit([again, BackupAndRestore(backup, save_freq=6)], epochs=3)
    assert again.run_id == first
    (run,) = _runs(client, "resume")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, first, "batch_loss")] == list(range(1, 13))  # each step once
    assert _history(client, first, "val_loss") == list(enumerate(history.history["val_loss"]))
    assert [s for s, _ in _history(client, first, "loss")] == [0, 1, 2]
    assert len(client.get_metric_history(first, "loss")) == 3


@pytest.mark.slow  # two training processes
def test_sigkilled_mid_epoch_then_rerun_makes_one_run_with_each_step_once(tmp_path: Path) -> None:
    """The process is killed at step 7 (backup at step 6, mid-epoch 2) while it waits there, so the kill
    lands at that step however loaded the machine is; the rerun continues the run MLflow holds."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = Path(__file__).resolve().parent / "tracker_script.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PAUSE_AT_STEP": "7"}
    killed = subprocess.Popen([sys.executable, str(script), str(tmp_path), uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert killed.stdout is not None
        for line in killed.stdout:
            if line.strip() == "step 7":
                killed.kill()
                break
        assert killed.wait(timeout=120) == -9, killed.stderr.read() if killed.stderr else ""
    finally:
        killed.kill()
    client = MlflowClient(uri)
    (run,) = _runs(client, "killed")
    assert run.info.status == "RUNNING"  # killed: nobody ended it
    del env["PAUSE_AT_STEP"]
    rerun = subprocess.run([sys.executable, str(script), str(tmp_path), uri], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (again,) = _runs(client, "killed")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run.info.run_id, "batch_loss")] == list(range(1, 13))
    assert [s for s, _ in _history(client, run.info.run_id, "loss")] == [0, 1, 2]
    assert [s for s, _ in _history(client, run.info.run_id, "val_loss")] == [0, 1, 2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite store, artifacts served through it): its URL."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "served")]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s: it answers /health once it serves
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("mlflow server did not answer /health in 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.mark.slow  # starts an mlflow server process
def test_against_a_real_mlflow_server(server: str, tmp_path: Path) -> None:
    best = ModelCheckpoint(str(tmp_path / "best.safetensors"), monitor="val_loss", save_best_only=True,
                           save_weights_only=True)
    logger = MLflowLogger(tracking_uri=server, experiment_name="served", update_freq=2, log_models="best",
                          tags={"team": "vision"})
    history = _fit([logger, best], epochs=2)
    client = MlflowClient(server)
    (run,) = _runs(client, "served")
    assert run.info.run_id == logger.run_id and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "vision" and run.data.params["epochs"] == "2"
    assert _history(client, logger.run_id, "loss") == list(enumerate(history.history["loss"]))
    assert [s for s, _ in _history(client, logger.run_id, "batch_loss")] == [2, 4, 6, 8]
    local = client.download_artifacts(logger.run_id, "checkpoints/best.safetensors", str(tmp_path / "down"))
    assert Path(local).read_bytes() == (tmp_path / "best.safetensors").read_bytes()  # uploaded through the server


def test_user_run_id_wins_over_the_saved_one(uri: str, tmp_path: Path) -> None:
    client = MlflowClient(uri)
    mine = client.create_run(client.create_experiment("mine")).info.run_id
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="crash"):
        _fit([MLflowLogger(tracking_uri=uri, experiment_name="theirs", update_freq=1),
              BackupAndRestore(backup, save_freq=2), Crash(3)])
    logger = MLflowLogger(tracking_uri=uri, experiment_name="theirs", run_id=mine)
    _fit([logger, BackupAndRestore(backup, save_freq=2)])
    assert logger.run_id == mine
    assert [s for s, _ in _history(client, mine, "loss")] == [0, 1, 2]


def test_evaluate_logs_its_results(uri: str) -> None:
    model = make_model()
    logger = MLflowLogger(tracking_uri=uri, experiment_name="eval")
    torchcallbacks.fit(model, make_regression(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                       loss=torch.nn.functional.mse_loss, epochs=2, verbose=0, callbacks=[logger])
    results = torchcallbacks.evaluate(model, make_regression(32), loss=torch.nn.functional.mse_loss,
                                      metrics=[mae], verbose=0, callbacks=[logger], return_dict=True)
    client = MlflowClient(uri)
    (run,) = _runs(client, "eval")  # the same run
    assert _history(client, logger.run_id, "evaluation_loss") == [(8, results["loss"])]
    assert _history(client, logger.run_id, "evaluation_mae") == [(8, results["mae"])]
    assert run.info.status == "FINISHED"


def test_hand_written_loop(uri: str) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    logger = MLflowLogger(tracking_uri=uri, experiment_name="by-hand", update_freq=2)
    callbacks = CallbackList([logger], model=model, optimizer=optimizer, epochs=2, steps=4)
    losses: list[float] = []
    callbacks.on_train_begin()
    for epoch in range(2):
        callbacks.on_epoch_begin(epoch)
        for i, (x, y) in enumerate(make_regression()):
            callbacks.on_train_batch_begin(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            callbacks.on_train_batch_end(i, {"loss": loss.detach()})
        callbacks.on_epoch_end(epoch, {"loss": sum(losses[-4:]) / 4})
    callbacks.on_train_end()
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, logger.run_id, "batch_loss") == [(s, losses[s - 1]) for s in (2, 4, 6, 8)]
    assert _history(client, logger.run_id, "loss") == [(0, sum(losses[:4]) / 4), (1, sum(losses[4:]) / 4)]
    assert run.data.params["optimizer"] == "Adam" and run.data.params["epochs"] == "2"


def test_bad_tracker_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    logger = MLflowLogger(tracking_uri="nosuchscheme://nowhere", update_freq=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit([logger], epochs=2)
    ours = [w for w in caught if "MLflowLogger" in str(w.message)]
    assert len(ours) == 1 and "training goes on" in str(ours[0].message)
    assert len(history.history["loss"]) == 2
    with pytest.raises(Exception, match="nosuchscheme"):
        _fit([MLflowLogger(tracking_uri="nosuchscheme://nowhere", strict=True)])


def test_server_down_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit([MLflowLogger(tracking_uri=f"http://127.0.0.1:{port}")], epochs=2)
    assert len([w for w in caught if "MLflowLogger" in str(w.message)]) == 1
    assert len(history.history["loss"]) == 2


@pytest.mark.parametrize("flush_secs", [0.0, 3600.0])
def test_epoch_logs_wait_in_the_buffer_until_flush_secs_passed_a_backup_or_the_end(
    uri: str, tmp_path: Path, flush_secs: float
) -> None:
    """A write costs milliseconds, more than a short epoch: with flush_secs epoch logs wait, and are
    written at the end; a backup writes them too, so the state it saves never claims an unlogged step."""
    client = MlflowClient(uri)
    seen: list[int] = []
    logger = MLflowLogger(tracking_uri=uri, experiment_name=f"buffer-{flush_secs}", flush_secs=flush_secs)
    look = torchcallbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(len(client.get_metric_history(logger.run_id, "loss"))))
    look.dispatch_order = 3  # after the logger's epoch end
    history = _fit([logger, look], epochs=3)
    assert seen == ([1, 2, 3] if flush_secs == 0 else [1, 1, 1])  # the first epoch's at once, then waiting
    assert _history(client, logger.run_id, "loss") == list(enumerate(history.history["loss"]))  # all, once
    backed_up: list[int] = []
    logger = MLflowLogger(tracking_uri=uri, experiment_name=f"buffer-{flush_secs}", flush_secs=flush_secs)
    look = torchcallbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: backed_up.append(len(client.get_metric_history(logger.run_id, "loss"))))
    look.dispatch_order = 3  # after BackupAndRestore's save (2)
    _fit([logger, BackupAndRestore(str(tmp_path / "b")), look], epochs=2)
    assert backed_up == [1, 2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="flush_secs must be >= 0"):
        MLflowLogger(flush_secs=-1)
    with pytest.raises(TypeError, match="flush_secs: expected a number"):
        MLflowLogger(flush_secs="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="update_freq"):
        MLflowLogger(update_freq=0)
    with pytest.raises(TypeError, match="update_freq"):
        MLflowLogger(update_freq=2.5)
    with pytest.raises(ValueError, match="log_models"):
        MLflowLogger(log_models="last")
    with pytest.raises(TypeError, match="tracking_uri"):
        MLflowLogger(tracking_uri=Path("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tags"):
        MLflowLogger(tags=["a"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "extra"), [(MLflowLogger, "mlflow"), (torchcallbacks.WandbLogger, "wandb")])
def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, cls: type, extra: str) -> None:
    monkeypatch.setitem(sys.modules, extra, None)  # as if it were not installed
    with pytest.raises(ImportError, match=rf"pip install torchcallbacks\[{extra}\]"):
        cls()


@pytest.mark.slow
def test_package_imports_without_the_trackers() -> None:
    code = (
        "import sys; sys.modules['mlflow'] = None; sys.modules['wandb'] = None\n"
        "import torchcallbacks\n"
        "assert torchcallbacks.MLflowLogger and torchcallbacks.WandbLogger\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=120)
