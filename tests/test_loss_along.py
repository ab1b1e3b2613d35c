"""``FlatProblem.loss_along``: an adapter evaluates the points ``theta0 + s * v`` itself (no rows
built by the core). The oracle: the same points evaluated through ``loss`` (the bits must be
equal), and the same check run without the hook (the report must be equal)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gradcheck import check_flat
from gradcheck._problem import Block, FlatProblem
from gradcheck._select import select_blocks


def _comparable(report) -> dict:
    data = report.to_dict()
    data.pop("elapsed")
    for section in data["sections"]:
        section.pop("elapsed")
    return data


def _problem(calls: list[int], wrong: int | None = None) -> FlatProblem:
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=30_000)  # fast mode by default (above 20,000 entries)

    def loss(t: np.ndarray) -> float:
        return float(np.sum(np.sin(t) * t))

    def gradient(t: np.ndarray) -> np.ndarray:
        g = np.cos(t) * t + np.sin(t)
        if wrong is not None:
            g[wrong] *= 1.01
        return g

    def loss_along(v: np.ndarray, steps: np.ndarray) -> np.ndarray:
        calls.append(len(steps))
        return np.array([loss(theta0 + s * v) for s in steps])

    return FlatProblem(
        theta0=theta0,
        loss=loss,
        gradient=gradient,
        blocks=(Block("a", (10_000,), 0), Block("b", (20_000,), 10_000)),
        loss_along=loss_along,
    )


@pytest.mark.parametrize("wrong", [None, 12_345])
def test_the_core_uses_loss_along_and_the_report_is_the_same_without_it(wrong) -> None:
    calls: list[int] = []
    problem = _problem(calls, wrong)
    with_hook = check_flat(problem, mode="fast")
    assert calls, "fast mode never asked the adapter for a line of points"
    without = check_flat(replace(problem, loss_along=None), mode="fast")
    assert _comparable(with_hook) == _comparable(without)
    assert with_hook.passed is (wrong is None)


def test_wrt_by_name_passes_the_hook_on_with_the_other_blocks_held() -> None:
    calls: list[int] = []
    problem = _problem(calls, wrong=12_345)  # in block `b`
    chosen = select_blocks(problem, ("b",))
    with_hook = check_flat(chosen, mode="fast")
    assert calls and not with_hook.passed
    without = check_flat(select_blocks(replace(problem, loss_along=None), ("b",)), mode="fast")
    assert _comparable(with_hook) == _comparable(without)


def test_torch_evaluates_the_line_with_the_bits_of_its_rows() -> None:
    torch = pytest.importorskip("torch")
    from gradcheck.adapters.torch import build_problem

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    x = torch.randn(4, 5, dtype=torch.float64)
    problem = build_problem(model.double(), x)
    assert problem.loss_along is not None
    v = np.random.default_rng(1).normal(size=problem.size)
    steps = np.array([1e-3, -1e-3, 2e-3, -2e-3])
    along = problem.loss_along(v, steps)
    rows = [problem.loss(problem.theta0 + s * v) for s in steps]
    assert along.tolist() == rows  # bit for bit


def test_jax_evaluates_the_line_with_the_bits_of_its_rows() -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from gradcheck.adapters.jax import build_problem

    params = {"w": jnp.arange(6.0).reshape(2, 3) / 10, "b": jnp.ones(3)}
    x = np.random.default_rng(2).normal(size=(4, 2))
    problem = build_problem((lambda p, x: jax.nn.tanh(x @ p["w"] + p["b"]), params), x)
    assert problem.loss_along is not None
    v = np.random.default_rng(1).normal(size=problem.size)
    steps = np.array([1e-3, -1e-3, 2e-3])
    along = problem.loss_along(v, steps)
    rows = [problem.loss(problem.theta0 + s * v) for s in steps]
    assert along.tolist() == rows
