"""training/steps.py: the loss call and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchcallbacks as tc
from torchcallbacks.training.steps import compute_loss


def _classification() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def _fit(loss) -> None:
    model = torch.nn.Linear(4, 2)
    tc.fit(model, _classification(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss=loss,
           epochs=1, verbose=0)


def test_a_loss_in_keras_order_names_the_fix() -> None:
    def keras_order(y_true, y_pred):
        return F.cross_entropy(y_pred, y_true)

    with pytest.raises(TypeError, match=r"loss\(y_pred, y\) raised \w+Error .*Keras' order \(y_true, y_pred\)"
                       r".*torchcallbacks calls loss\(y_pred, y\), torch's order .*swap the loss's arguments") as raised:
        _fit(keras_order)
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's own error stays chained
    assert "Long" in str(raised.value.__cause__)


def test_other_loss_errors_pass_through_unchanged() -> None:
    def broken(y_pred, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        _fit(broken)
    with pytest.raises(RuntimeError) as raised:  # fails either way round: torch's error as it is
        compute_loss(F.mse_loss, torch.zeros(3, 2), torch.zeros(4, 5), None)
    assert "swap" not in str(raised.value)


def test_a_loss_that_takes_one_argument_is_a_type_error_naming_loss() -> None:
    with pytest.raises(TypeError, match=r"^loss: must take two arguments, \(y_pred, y\).* takes \(y_pred\)") as raised:
        _fit(lambda y_pred: y_pred.mean())
    assert isinstance(raised.value.__cause__, TypeError)  # Python's own message stays chained

    class OneArgument(torch.nn.Module):
        def forward(self, y_pred: torch.Tensor) -> torch.Tensor:
            return y_pred.mean()

    with pytest.raises(TypeError, match=r"^loss: must take two arguments, \(y_pred, y\)"):
        _fit(OneArgument())
    with pytest.raises(TypeError, match=r"^loss: must take two arguments"):
        tc.evaluate(torch.nn.Linear(4, 2), _classification(), loss=lambda y_pred: y_pred.mean(), verbose=0)


def test_a_type_error_raised_inside_a_two_argument_loss_passes_through_unchanged() -> None:
    def broken(y_pred, y):
        raise TypeError("inside")

    def variadic(*args):
        raise TypeError("inside too")

    with pytest.raises(TypeError, match="^inside$"):
        _fit(broken)
    with pytest.raises(TypeError, match="^inside too$"):
        _fit(variadic)


def test_the_success_path_calls_the_loss_once_per_batch() -> None:
    calls = []

    def counted(y_pred, y):
        calls.append(1)
        return F.cross_entropy(y_pred, y)

    _fit(counted)
    assert len(calls) == 4
