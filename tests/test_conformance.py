"""What every adapter must do alike, parametrised over the adapters.

The oracle is the NumPy definition in `gradcheck._losses` (for named losses) and the
other adapters (for messages and verdicts): the same mistake gets the same exception type,
the same numbers the same loss.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gradcheck import InvalidOptionError, check_gradients
from gradcheck._losses import LOSS_NAMES, NUMPY_LOSSES, implementation, numpy_loss

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None


def _tables() -> dict[str, dict]:
    tables: dict[str, dict] = {"numpy": NUMPY_LOSSES}
    if HAVE_TORCH:
        from gradcheck.adapters import torch as torch_adapter

        tables["torch"] = torch_adapter.TORCH_LOSSES
    if HAVE_JAX:
        from gradcheck.adapters import jax as jax_adapter

        tables["jax"] = jax_adapter.JAX_LOSSES
    return tables


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_every_adapter_implements_exactly_the_named_losses(backend):
    tables = _tables()
    if backend not in tables:
        pytest.skip(f"{backend} is not installed")
    assert set(tables[backend]) == set(LOSS_NAMES)


def test_a_name_missing_from_a_table_is_an_error_never_another_loss():
    partial = {"mse": "the mse"}
    assert implementation(partial, "mse", "test") == ("mse", "the mse")
    with pytest.raises(InvalidOptionError, match="loss 'bce' has no test implementation"):
        implementation(partial, "bce", "test")
    with pytest.raises(InvalidOptionError, match="loss must be a callable or one of"):
        implementation(partial, "hinge", "test")


def _numbers(name: str):
    rng = np.random.default_rng(3)
    if name == "categorical_crossentropy":
        out = rng.dirichlet(np.ones(4), size=5)
    elif name == "bce":
        out = rng.uniform(0.05, 0.95, size=(5, 4))
    else:
        out = rng.normal(size=(5, 4))
    if name in ("cross_entropy", "categorical_crossentropy"):
        y = rng.integers(0, 4, size=5)
    elif name in ("bce", "bce_with_logits"):
        y = rng.uniform(0, 1, size=(5, 4))
    else:
        y = rng.normal(size=(5, 4))
    return out, y


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_torch_computes_every_named_loss_as_numpy_defines_it(name):
    torch = pytest.importorskip("torch")
    from gradcheck.adapters import torch as torch_adapter

    out, y = _numbers(name)
    value = torch_adapter._named_loss(name, torch.from_numpy(out), torch.from_numpy(y))
    got = float(value(torch.from_numpy(out)))
    assert got == pytest.approx(numpy_loss(name)[0](out, y), rel=1e-13)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "hinge"}, "loss must be a callable or one of"),
        ({"mode": "slow"}, "mode must be one of"),
        ({"wrt": "weights"}, "wrt must be one of"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*64\)"),
        ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
    ],
)
def test_the_same_mistake_gets_the_same_error_in_every_adapter(framework, options, message):
    model, x, y = _linear(framework)
    if "loss" not in options:
        options = {**options, "loss": "mse"}
    with pytest.raises(InvalidOptionError, match=message):
        check_gradients(model, x, y, **options)


def _linear(framework: str):
    """The same linear layer (2 -> 3) in each framework, with its input and target."""
    from gradcheck.reference import MLP

    mlp = MLP([2, 3], activation="tanh", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 3))
    if framework == "numpy":
        return mlp, x, y
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return mlp.to_torch(), torch.from_numpy(x), torch.from_numpy(y)
    pytest.importorskip("jax")
    return mlp.to_jax(), x, y


@pytest.mark.parametrize("name", ["mse", "cross_entropy", "bce_with_logits"])
def test_every_adapter_gives_the_same_verdict_and_loss_scale_on_the_reference(name):
    """The reference MLP (its output is linear: the losses that take any real output) with a
    named loss passes in every adapter; the numeric gradients agree across adapters to
    round-off."""
    from gradcheck.reference import MLP

    mlp = MLP([3, 4], activation="tanh", seed=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3))
    if name == "cross_entropy":
        y = rng.integers(0, 4, size=5)
    elif name == "bce_with_logits":
        y = rng.uniform(0, 1, size=(5, 4))
    else:
        y = rng.normal(size=(5, 4))
    numeric = {}
    models = {"numpy": mlp}
    if HAVE_TORCH:
        models["torch"] = mlp.to_torch()
    if HAVE_JAX:
        models["jax"] = mlp.to_jax()
    for framework, model in models.items():
        yy = y
        if framework == "torch":
            import torch

            yy = torch.from_numpy(y)
        try:
            report = check_gradients(model, x, yy, loss=name, mode="full", wrt="params")
        except InvalidOptionError:
            if framework == "numpy":  # the reference MLP computes its own loss gradients
                pytest.skip(f"the reference MLP has no {name} gradient")
            raise
        assert report.passed, f"{framework}: {report}"
        numeric[framework] = report.numeric
    first = next(iter(numeric.values()))
    for framework, values in numeric.items():
        np.testing.assert_allclose(values, first, rtol=1e-6, atol=1e-9, err_msg=framework)
