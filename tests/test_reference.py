"""The reference MLP against the core's numerics, and planted bugs against the checker.

Oracle: the numerical derivatives of the core (independent of the MLP's backward) for
the first group; for the bug tests, the known location of the planted mistake.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gradcheck import check_gradients
from gradcheck.reference import ACTIVATIONS, BUGS, MLP

LOSSES_FOR_OUTPUT = {
    "linear": ["mse", None],
    "sigmoid": ["bce", "mse"],
    "softmax": ["categorical_crossentropy", "mse"],
}


def _data(sizes: list[int], output: str, loss: str | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, sizes[0]))
    if loss is None:
        return x, None
    if output == "softmax" and loss == "categorical_crossentropy":
        return x, rng.integers(0, sizes[-1], size=6)
    if output == "sigmoid":
        return x, rng.uniform(0.05, 0.95, size=(6, sizes[-1]))
    return x, rng.normal(size=(6, sizes[-1]))


def _analytic(mlp: MLP, x: np.ndarray, report_blocks: list[str], dout: np.ndarray) -> np.ndarray:
    mlp.forward(x)
    dx = mlp.backward(dout)
    parts = [mlp.grads[name].ravel() for name in report_blocks if name != "input"]
    if "input" in report_blocks:
        parts.append(dx.ravel())
    return np.concatenate(parts)


@pytest.mark.parametrize(
    ("activation", "output", "loss"),
    [
        (a, o, l)
        for a, o in itertools.product(ACTIVATIONS, LOSSES_FOR_OUTPUT)
        for l in LOSSES_FOR_OUTPUT[o]
    ],
)
def test_reference_mlp_agrees_with_numerics(activation, output, loss):
    sizes = [3, 4, 3]
    mlp = MLP(sizes, activation=activation, output=output, l1=0.01, l2=0.05, seed=3)
    x, y = _data(sizes, output, loss)
    report = check_gradients(mlp, x, y, loss=loss, mode="full")
    assert report.passed, str(report)
    # the numeric gradient itself agrees with the hand-written backward to 1e-9 (relative, normwise)
    from gradcheck._losses import numpy_loss
    from gradcheck._problem import output_projection

    out = mlp.forward(x)
    dout = output_projection(out.shape, 0) if loss is None else numpy_loss(loss)[1](out, y)
    analytic = _analytic(mlp, x, [b.name for b in report.blocks], dout)
    err = np.max(np.abs(report.numeric - analytic)) / np.max(np.abs(analytic))
    assert err <= 1e-9, err


def test_text_network_2_3_1_with_dropout_passes():
    # the text's 2-3-1 network; dropout masks come from the model's own seeded generator,
    # which the adapter resets before every evaluation
    mlp = MLP([2, 3, 1], activation="sigmoid", output="sigmoid", dropout=0.5, l2=0.1, seed=1)
    x, y = _data([2, 3, 1], "sigmoid", "bce", seed=2)
    report = check_gradients(mlp, x, y, loss="bce")
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["W0", "b0", "W1", "b1", "input"]
    assert report.problem is None


def test_dropout_masks_differ_between_calls_but_not_between_evaluations():
    mlp = MLP([4, 8, 2], activation="relu", dropout=0.5, seed=0)
    x = np.random.default_rng(0).normal(size=(5, 4))
    assert not np.array_equal(mlp.forward(x), mlp.forward(x))  # the mask really is random
    assert check_gradients(mlp, x, None).passed


EXPECTED_BLOCKS = {
    "sign_flip": {"W0"},
    "factor_2": {"W0"},
    "scale_1.01": {"W0", "b0", "W1", "b1"},
    "missing_bias": {"b1"},
    "wrong_activation_derivative": {"W0", "b0", "input"},
    "bias_mean": {"b0", "b1"},
    "one_entry": {"W0"},
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bugs_are_caught_in_the_right_block(bug):
    mlp = MLP([4, 5, 2], activation="tanh", seed=0).with_bug(bug)
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    report = check_gradients(mlp, x, y, loss="mse")
    assert not report.passed
    assert {b.name for b in report.failed_blocks} == EXPECTED_BLOCKS[bug]
    text = str(report)
    for name in EXPECTED_BLOCKS[bug]:
        assert f"`{name}`  shape" in text


def test_one_wrong_entry_in_a_1000_entry_weight_is_found_exactly():
    mlp = MLP([40, 25, 3], activation="tanh", seed=5).with_bug("one_entry")
    assert mlp.params["W0"].size == 1000
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 40)), rng.normal(size=(16, 3))
    report = check_gradients(mlp, x, y, loss="mse", wrt="params")
    assert not report.passed
    w0 = report.block("W0")
    assert w0.mismatches == 1
    assert w0.worst[0].index == (12, 20)
    assert w0.worst[0].analytic == pytest.approx(1.01 * w0.worst[0].numeric, rel=1e-6)
    assert "only 1 of 1,000 entries disagree" in (w0.diagnosis or "")
    assert [b.name for b in report.failed_blocks] == ["W0"]


def test_diagnoses_name_the_pattern():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    base = MLP([4, 5, 2], seed=0)

    def diagnosis(bug: str, block: str) -> str:
        report = check_gradients(base.with_bug(bug), x, y, loss="mse")
        return report.block(block).diagnosis or ""

    assert "flipped sign" in diagnosis("sign_flip", "W0")
    assert "analytic / numeric = 2" in diagnosis("factor_2", "W0")
    assert "analytic / numeric = 1.01" in diagnosis("scale_1.01", "b1")
    assert "zero everywhere" in diagnosis("missing_bias", "b1")
    assert "1/8: a mean where a sum belongs" in diagnosis("bias_mean", "b0")


def test_mlp_rejects_bad_configuration():
    with pytest.raises(ValueError, match="sizes must list at least 2"):
        MLP([3])
    with pytest.raises(ValueError, match="activation must be one of"):
        MLP([2, 2], activation="swish")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        MLP([2, 2], dropout=1.0)
    with pytest.raises(ValueError, match=r"MLP input must have shape \(N, 2\)"):
        MLP([2, 2]).forward(np.ones((3, 5)))


TORCH_NAMES = {
    "W0": "layers.0.weight",
    "b0": "layers.0.bias",
    "W1": "layers.1.weight",
    "b1": "layers.1.bias",
    "input": "input",
}


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("bug", BUGS)
def test_exports_carry_the_planted_bug(framework, bug):
    # the export's custom backward makes the reference's mistake: the same blocks fail
    pytest.importorskip(framework)
    mlp = MLP([4, 5, 2], activation="tanh", seed=0)
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 2))
    export = f"to_{framework}"
    assert check_gradients(getattr(mlp, export)(), x, y, loss="mse").passed
    report = check_gradients(getattr(mlp.with_bug(bug), export)(), x, y, loss="mse")
    names = {TORCH_NAMES[n] if framework == "torch" else n for n in EXPECTED_BLOCKS[bug]}
    assert {b.name for b in report.failed_blocks} == names
