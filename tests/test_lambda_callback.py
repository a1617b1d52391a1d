"""LambdaCallback: any hook by name, only the given hooks dispatched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_regression

import torchcallbacks as tc


def test_hooks_by_name_in_fit_evaluate_and_predict() -> None:
    seen = []
    callback = tc.LambdaCallback(
        on_train_begin=lambda logs: seen.append("train_begin"),
        on_epoch_end=lambda epoch, logs: seen.append(("epoch_end", epoch, sorted(logs))),
        on_batch_end=lambda batch, logs: seen.append(("batch_end", batch)),
        on_test_end=lambda logs: seen.append(("test_end", sorted(logs))),
        on_predict_batch_end=lambda batch, logs: seen.append(("predict", tuple(logs["outputs"].shape))),
        on_train_end=lambda logs: seen.append("train_end"),
    )
    model = make_model()
    tc.fit(model, make_regression(n=32, batch_size=16), optimizer=torch.optim.SGD(model.parameters()),
           loss=F.mse_loss, validation_data=make_regression(n=16), callbacks=[callback], verbose=0)
    tc.predict(model, make_regression(n=16, batch_size=16), callbacks=[callback], verbose=0)
    assert seen == [
        "train_begin", ("batch_end", 0), ("batch_end", 1), ("test_end", ["loss"]),
        ("epoch_end", 0, ["loss", "val_loss"]), "train_end", ("predict", (16, 1)),
    ]


def test_unknown_hooks_and_non_callables_are_rejected() -> None:
    with pytest.raises(TypeError, match="LambdaCallback: unknown hook 'on_epoch_finish'"):
        tc.LambdaCallback(on_epoch_finish=print)
    with pytest.raises(TypeError, match="LambdaCallback: on_epoch_end must be callable, received int"):
        tc.LambdaCallback(on_epoch_end=3)


def test_alias_hooks_take_their_arguments_positionally() -> None:
    """`on_batch_begin` / `on_batch_end` receive `(batch, logs)` like every other hook, whatever the
    function names its parameters (the base class used to pass `logs=` by keyword)."""
    seen = []
    callback = tc.LambdaCallback(
        on_batch_begin=lambda b, l: seen.append(("begin", b)),  # noqa: E741
        on_batch_end=lambda b, l: seen.append(("end", b, float(l["loss"]))),  # noqa: E741
    )
    model = make_model()
    tc.fit(model, make_regression(n=32, batch_size=16), optimizer=torch.optim.SGD(model.parameters()),
           loss=F.mse_loss, verbose=0, callbacks=[callback])
    assert [s[:2] for s in seen] == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1)]
