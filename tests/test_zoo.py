"""Verdict quality on a zoo of hand-written layers: every correct layer passes, every mutant fails.

Every check runs with ``check_gradients``' defaults. The oracle is by construction:
each layer's backward is written by hand and each mutant plants one known mistake
(``zoo/kernels.py``); ``test_every_mutant_changes_the_gradient`` proves that every
mutant is visible at the point where it is checked, so a mutant that passes is a
missed bug, and a correct layer that fails is a false alarm.

Cost: NumPy runs every layer and mutant at 3 seeds. Torch runs every correct layer at
3 seeds and every mutant at one seed (rotating over the 3). JAX compiles every
problem (~1 s each), so it runs every correct layer at one seed (rotating) and every
layer's own mutants plus the 0.1% scale error. ``GRADCHECK_ZOO_FULL=1`` runs every
framework on every case at every seed.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from zoo import GENERIC, LAYERS, Layer, Point, cases
from zoo.kernels import BY_NAME, LINEAR, PENALTY, run_backward
from zoo.numpy_layers import NumpyLayer, PenalizedLinear
from zoo.ops import NumpyOps

from gradcheck import Report, check_flat, check_gradients
from gradcheck._problem import output_projection

SEEDS = (0, 1, 2)
FULL = os.environ.get("GRADCHECK_ZOO_FULL", "") not in ("", "0")
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

#: (layer, mutant, seed) -> why the defaults give a wrong verdict there (reported to the core).
#: Seed ``None`` matches every seed.
# (layer, mutant or None, seed or None) -> why the verdict is known to be wrong (strict xfail)
KNOWN_WRONG: dict[tuple[str, str | None, int | None], str] = {}


def _case_id(layer: Layer, bug: str | None, seed: int) -> str:
    return f"{layer.name}-{bug or 'correct'}-s{seed}"


def _param(layer: Layer, bug: str | None, seed: int) -> object:
    reason = KNOWN_WRONG.get((layer.name, bug, seed)) or KNOWN_WRONG.get((layer.name, bug, None))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(layer, bug, seed, id=_case_id(layer, bug, seed), marks=marks)


def _kernel_gradients(layer: Layer, bug: str | None, seed: int) -> dict[str, np.ndarray]:
    """The NumPy kernel's gradient blocks at the layer's point, with the check's default projection."""
    point = layer.point(seed)
    ops = NumpyOps(np.random.default_rng(12345))
    params = {k: v.copy() for k, v in point.params.items()}
    x = point.x
    out, cache = layer.forward(ops, params, x, point.cfg)
    dout = output_projection(np.shape(out), 0)
    grads, dx = run_backward(layer, ops, params, x, point.cfg, cache, dout, bug)
    blocks = {k: np.asarray(v) for k, v in grads.items()}
    if dx is not None:
        blocks["input"] = np.asarray(dx)
    return blocks


def mutated_blocks(layer: Layer, bug: str, seed: int) -> dict[str, float]:
    """Blocks a mutant changes at the layer's point: ``{name: max|change| / max|correct|}``."""
    good = _kernel_gradients(layer, None, seed)
    bad = _kernel_gradients(layer, bug, seed)
    out = {}
    for name, g in good.items():
        change = float(np.max(np.abs(bad[name] - g)))
        if change > 0:
            out[name] = change / max(float(np.max(np.abs(g))), 1e-300)
    return out


def expect(report: Report, layer: Layer, bug: str | None, seed: int) -> None:
    """The verdict the oracle asks for: pass when correct; fail, on mutated blocks only, if not."""
    if bug is None:
        assert report.passed, f"false alarm on the correct {layer.name} (seed {seed}):\n{report}"
        return
    assert not report.passed, f"missed mutant {bug!r} of {layer.name} (seed {seed}):\n{report}"
    if report.problem is None:
        failed = {b.name for b in report.failed_blocks}
        changed = set(mutated_blocks(layer, bug, seed))
        assert failed <= changed, (
            f"mutant {bug!r} of {layer.name} changes {sorted(changed)} only, "
            f"but the report blames {sorted(failed - changed)}:\n{report}"
        )


# ----------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("seed", SEEDS)
def test_every_mutant_changes_the_gradient(seed: int) -> None:
    # a mutant that changed nothing at its point would "pass" for the right reason: never allowed
    invisible = []
    for layer, bug in cases(include_correct=False):
        changed = mutated_blocks(layer, bug, seed)
        if not changed or max(changed.values()) < 1e-4:
            invisible.append(f"{layer.name}/{bug}: {changed}")
    assert not invisible, "mutants invisible at their points:\n" + "\n".join(invisible)


def test_every_layer_has_the_generic_mutants_and_its_own() -> None:
    names = {layer.name for layer in LAYERS}
    assert len(names) == len(LAYERS) >= 17
    for layer in LAYERS:
        assert layer.mutants, layer.name
        assert set(GENERIC).isdisjoint(layer.mutants), layer.name
    kinds = {m for layer in LAYERS for m in layer.mutants}
    for wanted in (
        "transpose",
        "wrong_axis",
        "mean_not_sum",
        "missing_1/N",
        "off_by_one",
        "assign_not_accumulate",
        "stats_constant",
        "forgot_skip",
        "dropped_term",
    ):
        assert wanted in kinds, wanted


# ----------------------------------------------------------------- NumPy
NUMPY_CASES = [_param(layer, bug, seed) for seed in SEEDS for layer, bug in cases()]


@pytest.mark.parametrize(("layer", "bug", "seed"), NUMPY_CASES)
def test_numpy_zoo(layer: Layer, bug: str | None, seed: int) -> None:
    point = layer.point(seed)
    model = NumpyLayer(layer, point, bug)
    expect(check_gradients(model, point.x), layer, bug, seed)


WITH_PARAMS = [layer for layer in LAYERS if layer.point(0).params]


@pytest.mark.parametrize("bug", [None, "scale_0.1%", "one_entry"])
@pytest.mark.parametrize("layer", WITH_PARAMS, ids=lambda layer: layer.name)
def test_numpy_zoo_float32_parameters(layer: Layer, bug: str | None) -> None:
    # float32 parameters are checked on a float64 copy: a 0.1% error stays visible
    seed = 0
    point = layer.point(seed)
    model = NumpyLayer(layer, point, bug, dtype=np.float32)
    report = check_gradients(model, point.x)
    if bug is None:
        assert report.passed, str(report)
    else:
        assert not report.passed, str(report)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bug", [None, *PenalizedLinear.MUTANTS])
def test_numpy_regularization_hook(bug: str | None, seed: int) -> None:
    point = PENALTY.point(seed)
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(point.x.shape[0], point.params["W"].shape[1]))
    report = check_gradients(PenalizedLinear(point, bug), point.x, y, loss="mse")
    assert report.passed is (bug is None), str(report)


# ----------------------------------------------------------------- fast mode (auto, large)
def _large_linear(seed: int) -> Point:
    # 150 x 150 + 150 = 22,650 entries: above the auto limit, so the defaults run fast mode
    r = np.random.default_rng([seed, 99])
    d = 150
    params = {"W": r.normal(size=(d, d)) / np.sqrt(d), "b": r.normal(size=d)}
    return Point(params, r.normal(size=(8, d)))


@pytest.mark.parametrize(
    ("bug", "seed"),
    [(None, s) for s in SEEDS] + [("one_entry", s) for s in SEEDS] + [("scale_0.1%", 0)],
)
def test_numpy_large_linear_in_fast_mode(bug: str | None, seed: int) -> None:
    point = _large_linear(seed)
    report = check_gradients(NumpyLayer(LINEAR, point, bug), point.x)
    assert report.mode == "fast"
    assert report.passed is (bug is None), str(report)
    if bug == "one_entry":
        assert [b.name for b in report.failed_blocks] == ["W"], str(report)


# ----------------------------------------------------------------- the false alarm, minimal
def test_max_tied_across_overlapping_windows_is_not_a_bug() -> None:
    # max(t0, t1) and max(t1, t2) share t1; all three tie. First-argmax (torch's and
    # numpy's rule) sends window 1 to t0 and window 2 to t1: the gradient of the smooth
    # piece t0 > t1 > t2 next to the point, and what every framework's max-pool returns.
    # Along e1 alone the one-sided derivatives are 0 (down) and d1 + d2 (up).
    d1, d2 = -0.3, 0.4

    def loss(t: np.ndarray) -> float:
        return d1 * max(t[0], t[1]) + d2 * max(t[1], t[2])

    def gradient(t: np.ndarray) -> np.ndarray:
        g = np.zeros(3)
        g[0 if t[0] >= t[1] else 1] += d1
        g[1 if t[1] >= t[2] else 2] += d2
        return g

    report = check_flat(loss, gradient, np.array([0.5, 0.5, 0.5]))
    assert report.passed, str(report)


# ----------------------------------------------------------------- torch
def _torch_cases() -> list[object]:
    out = []
    for i, (layer, bug) in enumerate(cases()):
        seeds = SEEDS if (FULL or bug is None) else (SEEDS[i % len(SEEDS)],)
        out += [_param(layer, bug, seed) for seed in seeds]
    return out


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize(("layer", "bug", "seed"), _torch_cases())
def test_torch_zoo(layer: Layer, bug: str | None, seed: int) -> None:
    from zoo.torch_layers import TorchLayer, torch_input

    point = layer.point(seed)
    model = TorchLayer(layer, point, bug)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expect(check_gradients(model, torch_input(point)), layer, bug, seed)
    for name, value in model.state_dict().items():
        assert value.equal(before[name]), f"the check changed {name}"


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("bug", [None, "scale_0.1%"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_torch_zoo_float32(layer: Layer, bug: str | None) -> None:
    import torch
    from zoo.torch_layers import TorchLayer, torch_input

    # float32 parameters and input, checked on a float64 copy
    point = layer.point(1)
    model = TorchLayer(layer, point, bug, dtype=torch.float32)
    report = check_gradients(model, torch_input(point, torch.float32))
    if bug is None:
        assert report.passed, str(report)
    else:
        assert not report.passed, str(report)


# ----------------------------------------------------------------- JAX
def _jax_cases() -> list[object]:
    out = []
    for i, (layer, bug) in enumerate(cases()):
        if FULL:
            out += [_param(layer, bug, seed) for seed in SEEDS]
        elif bug is None or bug in layer.mutants or bug == "scale_0.1%":
            out.append(_param(layer, bug, SEEDS[i % len(SEEDS)]))
    return out


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
@pytest.mark.parametrize(("layer", "bug", "seed"), _jax_cases())
def test_jax_zoo(layer: Layer, bug: str | None, seed: int) -> None:
    from zoo.jax_layers import jax_layer

    point = layer.point(seed)
    expect(check_gradients(jax_layer(layer, point, bug), point.x), layer, bug, seed)


def test_known_wrong_verdicts_name_real_cases() -> None:
    for name, bug, _seed in KNOWN_WRONG:
        assert name in BY_NAME
        assert bug is None or bug in BY_NAME[name].all_mutants
