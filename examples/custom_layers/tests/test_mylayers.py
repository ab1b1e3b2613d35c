"""Gradient checks of the custom layers, with gradcheck's pytest fixture.

``gradcheck(model, x, y=None, **options)`` returns the report when the analytical
gradients agree with numerical ones, and fails the test with a readable report
(the wrong block, its worst entries, a diagnosis) when they do not.
"""

from __future__ import annotations

import numpy as np
import pytest
from mylayers import Dense, LayerNorm, Sequential, Softplus

from gradcheck import GradientCheckError


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(6, 4))


def test_dense(gradcheck, x):
    # y=None: the output is reduced with a fixed random projection, so the whole
    # vector-Jacobian product (parameters and input) is checked
    report = gradcheck(Dense(4, 3), x)
    assert [b.name for b in report.blocks] == ["W", "b", "input"]


def test_softplus(gradcheck, x):
    gradcheck(Softplus(), x)


def test_layernorm(gradcheck, x):
    gradcheck(LayerNorm(4), x)


@pytest.mark.gradcheck(wrt="params", seed=1)
def test_network_with_a_loss(gradcheck, x):
    net = Sequential(Dense(4, 8, seed=1), LayerNorm(8, seed=2), Softplus(), Dense(8, 2, seed=3))
    y = np.random.default_rng(1).normal(size=(6, 2))
    report = gradcheck(net, x, y, loss="mse")
    assert report.seed == 1  # from the marker
    assert len(report.blocks) == 6  # wrt="params": the input is not a block


class LayerNormForgotTheMean(LayerNorm):
    """A classic slip: the backward pass drops the term that comes from the mean."""

    def backward(self, dout: np.ndarray) -> np.ndarray:
        assert self._cache is not None
        xhat, inv_std = self._cache
        self.grads["gamma"][...] = (dout * xhat).sum(axis=0)
        self.grads["beta"][...] = dout.sum(axis=0)
        dxhat = dout * self.params["gamma"]
        n = xhat.shape[1]
        return inv_std / n * (n * dxhat - xhat * (dxhat * xhat).sum(axis=1, keepdims=True))


def test_the_check_catches_a_wrong_backward(gradcheck, x):
    with pytest.raises(GradientCheckError) as info:
        gradcheck(LayerNormForgotTheMean(4), x)
    report = info.value.report
    assert [b.name for b in report.failed_blocks] == ["input"]
