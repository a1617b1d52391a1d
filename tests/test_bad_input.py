"""Bad input gets a clear error that names the argument and what was expected."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression

import torchcallbacks as tc


def _fit(**overrides):
    model = overrides.pop("model", None) or make_model()
    kwargs = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=F.mse_loss, verbose=0)
    kwargs.update(overrides)
    x = kwargs.pop("x", make_regression())
    return tc.fit(model, x, **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"fit: model must be a torch.nn.Module, received function"):
        tc.fit(lambda x: x, make_regression(), optimizer=torch.optim.SGD(make_model().parameters()), loss=F.mse_loss)
    with pytest.raises(TypeError, match=r"evaluate: model must be a torch.nn.Module, received str"):
        tc.evaluate("model", make_regression(), loss=F.mse_loss)
    with pytest.raises(TypeError, match=r"predict: model must be a torch.nn.Module"):
        tc.predict(None, make_regression())


def test_optimizer_is_required() -> None:
    with pytest.raises(TypeError, match="fit: optimizer is required"):
        _fit(optimizer=None)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer.*received int"):
        _fit(optimizer=42)  # a name such as "adam" is Keras' shortcut: tests/test_shortcuts.py


def test_loss_is_required_and_must_be_scalar() -> None:
    with pytest.raises(TypeError, match="fit: loss is required"):
        _fit(loss=None)
    with pytest.raises(TypeError, match="loss: expected a callable, received int"):
        _fit(loss=42)  # a name such as "mse" is Keras' shortcut: tests/test_shortcuts.py
    with pytest.raises(ValueError, match=r"loss: expected loss\(y_pred, y\) to return a scalar \(0-d\) tensor, "
                                         r"received shape \(16, 1\)"):
        _fit(loss=lambda p, y: (p - y) ** 2)
    with pytest.raises(TypeError, match="loss: expected loss.* to return a tensor, received float"):
        _fit(loss=lambda p, y: 1.0)


def test_empty_loader() -> None:
    with pytest.raises(ValueError, match="x: the data yielded no batches"):
        _fit(x=[])
    with pytest.raises(ValueError, match="validation_data: the data yielded no batches"):
        _fit(validation_data=[])
    with pytest.raises(ValueError, match="x: the data yielded no batches"):
        tc.predict(make_model(), [], verbose=0)


def test_batch_of_an_unexpected_shape_says_what_was_received() -> None:
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"fit: each batch must be \(x, y\) or \(x, y, sample_weight\); "
                                         r"received Tensor\[8, 4\]"):
        _fit(x=[x])
    with pytest.raises(ValueError, match=r"received tuple of 4 \(Tensor\[8, 4\], Tensor\[8, 4\], Tensor\[8, 4\], "
                                         r"Tensor\[8, 4\]\)"):
        _fit(x=[(x, x, x, x)])


def test_unknown_keyword_arguments() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        _fit(epoch=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'shuffle'"):
        tc.evaluate(make_model(), make_regression(), loss=F.mse_loss, shuffle=True)
    # batch_size is an argument now (for array x), and with a loader an error that names it
    with pytest.raises(TypeError, match="evaluate: batch_size given, but x is DataLoader"):
        tc.evaluate(make_model(), make_regression(), loss=F.mse_loss, batch_size=3)


def test_callbacks_must_be_callbacks() -> None:
    with pytest.raises(TypeError, match="callbacks: expected torchcallbacks.Callback instances, received str"):
        _fit(callbacks=["early_stopping"])


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_must_be_a_positive_integer(epochs) -> None:
    with pytest.raises(ValueError, match=f"epochs: expected an integer >= 1, received {epochs!r}"):
        _fit(epochs=epochs)


@pytest.mark.parametrize("epochs", [1.5, True, "3"])
def test_epochs_of_another_type_is_a_type_error(epochs) -> None:
    """One vocabulary: TypeError for a value of the wrong type, ValueError for one out of range."""
    with pytest.raises(TypeError, match=rf"epochs: expected an integer >= 1, received {type(epochs).__name__} \({epochs!r}\)"):
        _fit(epochs=epochs)


def test_other_arguments() -> None:
    with pytest.raises(ValueError, match="steps_per_epoch: expected None or an integer >= 1, received 0"):
        _fit(steps_per_epoch=0)
    with pytest.raises(ValueError, match="verbose: expected 'auto', 0, 1 or 2, received 3"):
        _fit(verbose=3)
    with pytest.raises(ValueError, match="initial_epoch: expected an integer >= 0"):
        _fit(initial_epoch=-1)
    with pytest.raises(ValueError, match="clip_grad_norm: expected a positive number"):
        _fit(clip_grad_norm=0)
    with pytest.raises(TypeError, match="x: expected an iterable of batches"):
        _fit(x=42)
    with pytest.raises(TypeError, match="metrics: expected a dict or a list of metrics, received str"):
        _fit(metrics="accuracy")
    with pytest.raises(ValueError, match="metrics: 'loss' is reserved"):
        _fit(metrics={"loss": F.l1_loss})
    with pytest.raises(TypeError, match=r"metrics\['mae'\]: expected a callable"):
        _fit(metrics={"mae": 3})


def test_a_non_iterable_callbacks_or_a_non_number_clip_grad_norm_is_named() -> None:
    """Both used to fail with Python's own message ("'int' object is not iterable", "'>' not
    supported between instances of 'str' and 'int'"), which names neither argument."""
    with pytest.raises(TypeError, match=r"callbacks: expected a list of torchcallbacks.Callback.*received int"):
        _fit(callbacks=5)
    with pytest.raises(TypeError, match=r"callbacks: expected a list of torchcallbacks.Callback.*received int"):
        tc.evaluate(make_model(), make_regression(), loss=F.mse_loss, callbacks=5, verbose=0)
    with pytest.raises(ValueError, match=r"clip_grad_norm: expected a positive number, received '1'"):
        _fit(clip_grad_norm="1")


_VERBOSE_CALLBACKS = {
    "EarlyStopping": lambda verbose: tc.EarlyStopping(monitor="loss", verbose=verbose),
    "ReduceLROnPlateau": lambda verbose: tc.ReduceLROnPlateau(monitor="loss", verbose=verbose),
    "LearningRateScheduler": lambda verbose: tc.LearningRateScheduler(lambda epoch, lr: lr, verbose=verbose),
    "ModelCheckpoint": lambda verbose: tc.ModelCheckpoint("m.safetensors", verbose=verbose),
}


@pytest.mark.parametrize("owner", sorted(_VERBOSE_CALLBACKS))
def test_every_callback_checks_verbose_the_same_way(owner: str) -> None:
    make = _VERBOSE_CALLBACKS[owner]
    assert make("auto").verbose == 1 and make(2).verbose == 2 and make(0).verbose == 0
    for wrong_type in (1.0, True, None, [1]):
        with pytest.raises(TypeError, match=rf"^{owner}: verbose: expected 'auto', 0, 1 or 2, received "):
            make(wrong_type)
    for wrong_value in (3, -1, "1", "silent"):
        with pytest.raises(ValueError, match=rf"^{owner}: verbose: expected 'auto', 0, 1 or 2, received {wrong_value!r}"):
            make(wrong_value)
    with pytest.raises(TypeError, match=r"^verbose: expected"):
        _fit(verbose=1.5)


def test_early_stopping_verbose_auto_restores_the_best_weights(capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model()
    stopper = tc.EarlyStopping(monitor="loss", verbose="auto", restore_best_weights=True)
    _fit(model=model, epochs=2, callbacks=[stopper])
    assert "Restoring model weights from the end of the best epoch" in capsys.readouterr().out
    assert stopper.best_weights is not None
    for key, value in model.state_dict().items():
        assert torch.equal(value, stopper.best_weights[key])


def test_arguments_keras_lacks_are_keyword_only() -> None:
    import inspect

    keyword_only = {
        tc.ModelCheckpoint: {"max_to_keep", "async_save"},
        tc.TensorBoard: {"write_grads"},
        tc.TerminateOnNaN: {"check_every"},
        tc.RemoteMonitor: {"timeout"},
        tc.SwapEMAWeights: {"decay", "use_buffers", "use_ema_at_end"},
        tc.ProgbarLogger: {"file", "interval", "interval_no_tty"},
        tc.LearningRateScheduler: {"per_batch", "monitor"},
    }
    for cls, names in keyword_only.items():
        params = inspect.signature(cls.__init__).parameters
        found = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert names <= found, cls.__name__
    keras_positional = {  # Keras 3's signatures: only these may be passed by position
        tc.EarlyStopping: ["monitor", "min_delta", "patience", "verbose", "mode", "baseline",
                           "restore_best_weights", "start_from_epoch"],
        tc.ReduceLROnPlateau: ["monitor", "factor", "patience", "verbose", "mode", "min_delta", "cooldown", "min_lr"],
        tc.ModelCheckpoint: ["filepath", "monitor", "verbose", "save_best_only", "save_weights_only", "mode",
                             "save_freq", "initial_value_threshold"],
    }
    for cls, names in keras_positional.items():
        params = inspect.signature(cls.__init__).parameters.values()
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == ["self", *names], cls.__name__
    with pytest.raises(TypeError):
        tc.ModelCheckpoint("m.safetensors", "val_loss", 0, False, False, "auto", "epoch", None, 3)  # type: ignore[misc]


# -- optimizers that train nothing (or not everything) -----------------------------------------------
def test_an_optimizer_of_another_model_is_a_value_error_naming_it() -> None:
    model, other = make_model(), make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"fit: optimizer \(Adam\) holds none of the model's trainable parameters \(0 of 4\)"):
        _fit(model=model, optimizer=torch.optim.Adam(other.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # before any step
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"fit: optimizer\[1\] \(SGD\) holds none of the model's trainable parameters \(0 of 4\)"):
        _fit(model=model, optimizer=[good, torch.optim.SGD(other.parameters(), lr=0.1)])
    history = _fit(model=model, optimizer=[good])  # the right optimizer in a list of one
    assert len(history.history["loss"]) == 1


def test_frozen_parameters_do_not_count_and_a_loss_module_may_have_its_own_optimizer() -> None:
    model = make_model()
    model[0].requires_grad_(False)  # trainable: the last layer's weight and bias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(model=model, optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1))

    class ScaledMSE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.scale * F.mse_loss(y_pred, y)

    loss = ScaledMSE()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(model=model, loss=loss, optimizer=[torch.optim.SGD(model[2].parameters(), lr=0.1),
                                                torch.optim.SGD(loss.parameters(), lr=0.1)])


def test_parameters_in_no_optimizer_are_a_warning_unless_warn_unoptimized_is_false() -> None:
    model = make_model()  # Linear(4, 8), ReLU, Linear(8, 1): 4 trainable parameters
    with pytest.warns(UserWarning, match=r"fit: 2 of the model's 4 trainable parameters are in no optimizer"):
        _fit(model=model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(model=model, optimizer=torch.optim.SGD(model[0].parameters(), lr=0.1), warn_unoptimized=False)
        _fit(model=model, optimizer=[torch.optim.SGD(model[0].parameters(), lr=0.1),
                                     torch.optim.Adam(model[2].parameters())])


def test_a_custom_train_step_may_step_what_it_likes() -> None:
    model, other = make_model(), make_model()

    def train_step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y).detach()

    history = _fit(model=model, optimizer=torch.optim.SGD(other.parameters()), train_step=train_step)
    assert len(history.history["loss"]) == 1


def test_a_model_on_the_meta_device_is_a_value_error_naming_model() -> None:
    with torch.device("meta"):
        model = make_model()
    message = r"model has tensors on the 'meta' device \(shapes without data\), e.g. '0.weight'; materialize"
    with pytest.raises(ValueError, match="^fit: " + message):
        _fit(model=model)
    with pytest.raises(ValueError, match="^fit: " + message):  # before moving it (.to() cannot)
        _fit(model=model, device="cpu")
    with pytest.raises(ValueError, match="^evaluate: " + message):
        tc.evaluate(model, make_regression(), loss=F.mse_loss, verbose=0)
    with pytest.raises(ValueError, match="^predict: " + message):
        tc.predict(model, make_regression(), verbose=0)
    model.to_empty(device="cpu")  # materialized: it trains
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    assert len(_fit(model=model).history["loss"]) == 1
