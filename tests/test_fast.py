"""Fast mode: directional probes per block, localisation by bisection, auto mode's choice.

Oracle: the reference MLP (correct backward) and its planted bugs at known places.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_reference import EXPECTED_BLOCKS

from gradcheck import check_gradients
from gradcheck.reference import BUGS, MLP


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 40)), rng.normal(size=(16, 3))


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_models_pass_in_fast_mode(data, activation, seed):
    x, y = data
    mlp = MLP([40, 25, 3], activation=activation, seed=seed)
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", seed=seed)
    assert report.passed, str(report)
    assert report.mode == "fast"
    # per block one central difference (two evaluations), two more where it needs
    # extrapolating; + f0 twice + the gradient
    assert report.evaluations <= 4 * len(report.blocks) + 3


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bugs_fail_in_fast_mode_in_the_right_blocks(data, bug):
    x, y = data
    report = check_gradients(MLP([40, 25, 3], seed=5).with_bug(bug), x, y, loss="mse", mode="fast")
    assert {b.name for b in report.failed_blocks} == EXPECTED_BLOCKS[bug]


def test_a_single_wrong_entry_is_localised(data):
    x, y = data
    mlp = MLP([40, 25, 3], seed=5).with_bug("one_entry")
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", wrt="params")
    w0 = report.block("W0")
    assert w0.localized == 1
    assert w0.worst[0].index == (12, 20)
    assert w0.worst[0].analytic == pytest.approx(1.01 * w0.worst[0].numeric, rel=1e-6)
    assert "found every wrong entry" in (w0.note or "")
    assert "localisation named 1 wrong entry" in str(report)


def test_cost_does_not_grow_with_size():
    rng = np.random.default_rng(1)
    costs = []
    for width in (10, 300):
        mlp = MLP([width, width, 2], seed=0)
        x = rng.normal(size=(4, width))
        report = check_gradients(mlp, x, None, mode="fast", wrt="params")
        assert report.passed
        costs.append(report.evaluations)
    # two to four evaluations per block, whatever its size (blocks: W0, b0, W1, b1)
    assert all(2 * 4 + 3 <= c <= 4 * 4 + 3 for c in costs), costs


def test_auto_mode_switches_to_fast_for_large_models_and_says_why():
    rng = np.random.default_rng(2)
    small = check_gradients(MLP([3, 4, 2]), rng.normal(size=(2, 3)), None)
    assert small.mode == "full" and small.mode_reason.startswith("auto: ")
    big = MLP([150, 150, 2])  # 22,952 parameters
    report = check_gradients(big, rng.normal(size=(2, 150)), None, wrt="params")
    assert report.mode == "fast" and "> 20,000" in report.mode_reason
    assert report.passed


def test_fast_mode_respects_the_evaluation_budget(data):
    x, y = data
    mlp = MLP([40, 25, 3], seed=5).with_bug("one_entry")
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", max_evals=12)
    assert not report.passed and "max_evals=12" in (report.problem or "")
