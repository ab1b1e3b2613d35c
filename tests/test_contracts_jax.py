"""The JAX adapter's contract hooks (second order, forward mode, batched gradients), and the
contracts' sections of `check_gradients` on the zoo of ``zoo/contracts_jax.py``.

Oracles:

- the exact derivatives written by hand for every zoo layer (its gradient and its 2x2-block
  Hessian, ``Layer.hvp``): the hooks must give them to round-off on every correct layer, and
  every mutant must move them in exactly the blocks its zoo entry names (so a section that
  fails there found the mutant, not noise);
- ``jax.test_util.check_grads(..., order=2, modes=("fwd", "rev"))`` (the modes a layer has):
  the anchor on the correct layers' rules, and it rejects the mutants it can see.

Every case runs at seeds 0, 1 and 2 (the point, ``u``, the directions and the batch's points).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import gradcheck.adapters.jax as jax_adapter  # noqa: E402
from jax.test_util import check_grads  # noqa: E402
from zoo.contracts_jax import LAYERS, MUTANTS, Entry, Layer, N, Point  # noqa: E402

from gradcheck import Report, check_gradients  # noqa: E402
from gradcheck._problem import FlatProblem, Unavailable  # noqa: E402

SEEDS = (0, 1, 2)
SECTION = {"second_order": "second order", "forward": "forward mode", "batched": "batched backward"}
#: What a hook's Unavailable says when the layer lacks the contract.
UNAVAILABLE = {
    "second_order": r"^JAX raised differentiating it: \w+Error: ",
    "forward": r"^no forward-mode rule: TypeError: .*custom_vjp",
    "batched": r"^the gradient cannot be vmapped: \w+",
}


def _x64() -> Any:
    return jax.enable_x64(True)


def _problem(layer: Layer, bug: str | None, seed: int) -> tuple[FlatProblem, Point]:
    point = layer.point(seed)
    problem = jax_adapter.build_problem((layer.apply_fn(bug), point.params), point.x, point.y)
    assert [b.name for b in problem.blocks] == [layer.param, "input"]
    return problem, point


def _at(layer: Layer, point: Point, theta: np.ndarray) -> Point:
    """``point`` with its parameter and input taken from the flat ``theta``."""
    return Point(params={layer.param: theta[:N]}, x=theta[N:], y=point.y)


def _u(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7]).standard_normal(2 * N)


def _rows(problem: FlatProblem, seed: int) -> np.ndarray:
    """The start and two points 5% away, as rows (distinct: a rule mixing rows shows)."""
    rng = np.random.default_rng([seed, 8])
    theta0 = problem.theta0
    return np.stack([theta0, *(theta0 * (1 + 0.05 * rng.standard_normal((2, theta0.size))))])


def _has(layer: Layer, contract: str) -> bool:
    return bool(getattr(layer, contract))


def _layer(name: str) -> Layer:
    return next(layer for layer in LAYERS if layer.name == name)


def _differs_in(got: np.ndarray, exact: np.ndarray, scale: float) -> set[str]:
    """The blocks (``"p"``, ``"input"``) where ``got`` is off ``exact`` beyond round-off;
    asserts the others agree to round-off."""
    names = ("p", "input")
    off = set()
    for name, part in zip(names, (slice(0, N), slice(N, 2 * N)), strict=True):
        gap = float(np.max(np.abs(got[..., part] - exact[..., part])))
        if gap > 1e-6 * scale:
            off.add(name)
        else:
            assert gap <= 1e-12 * scale, (name, gap)
    return off


def _blocks(layer: Layer, names: set[str]) -> set[str]:
    return {layer.param if name == "p" else name for name in names}


# --------------------------------------------------------------------------- the anchor
def _anchor(layer: Layer, bug: str | None, order: int, modes: tuple[str, ...], seed: int) -> None:
    point = layer.point(seed)
    loss = layer.loss_fn(bug)
    with _x64():
        params = {k: jnp.asarray(v) for k, v in point.params.items()}
        x, y = jnp.asarray(point.x), jnp.asarray(point.y)
        check_grads(lambda p, v: loss(p, v, y), (params, x), order=order, modes=modes)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_check_grads_accepts_the_correct_layers_in_the_modes_they_have(layer: Layer) -> None:
    order = 2 if layer.second_order else 1
    modes = ("fwd", "rev") if layer.forward else ("rev",)
    for seed in SEEDS:
        _anchor(layer, None, order, modes, seed)
    if not layer.forward:  # the contract our hook calls unavailable, JAX refuses too
        with pytest.raises(TypeError, match="custom_vjp"):
            _anchor(layer, None, 1, ("fwd",), 0)
    if not layer.second_order:
        with pytest.raises(Exception):  # noqa: B017 - JAX's error varies with the rule
            _anchor(layer, None, 2, ("rev",), 0)


@pytest.mark.parametrize(
    "entry",
    [entry for entry in MUTANTS if entry.contract != "batched"],  # check_grads never vmaps
    ids=lambda entry: f"{entry.layer}-{entry.bug}",
)
def test_check_grads_rejects_the_mutants_it_can_see(entry: Entry) -> None:
    layer = _layer(entry.layer)
    order, modes = (2, ("rev",)) if entry.contract == "second_order" else (1, ("fwd",))
    if entry.first_order_passes:
        _anchor(layer, entry.bug, 1, ("rev",), 0)  # invisible at first order, by design
    with pytest.raises(AssertionError):
        _anchor(layer, entry.bug, order, modes, 0)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_the_hand_derivatives_are_jax_derivatives(layer: Layer) -> None:
    """The oracle itself: the hand-written gradient and Hessian against JAX's own
    derivatives of the same function without custom rules."""
    point = layer.point(0)

    def plain(theta: Any) -> Any:
        p, x = theta[:N], theta[N:]
        out = {
            "sin_ax": lambda: jnp.sin(p * x),
            "callback_bwd": lambda: jnp.sin(p * x),
            "softplus_jvp": lambda: p * jnp.logaddexp(0.0, x),
            "tanh_vmap": lambda: p * jnp.tanh(x),
        }[layer.name]()
        return jnp.mean((out - point.y) ** 2)

    with _x64():
        theta = jnp.concatenate([jnp.asarray(point.params[layer.param]), jnp.asarray(point.x)])
        np.testing.assert_allclose(jax.grad(plain)(theta), layer.gradient(point), rtol=1e-12)
        u = _u(0)
        hessian = np.asarray(jax.hessian(plain)(theta))
        np.testing.assert_allclose(hessian @ u, layer.hvp(point, u), rtol=1e-11, atol=1e-14)
        assert layer.loss(point) == pytest.approx(float(plain(theta)), rel=1e-14)


# --------------------------------------------------------------------------- the hooks
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_hooks_give_the_hand_derivatives_on_correct_layers(layer: Layer, seed: int) -> None:
    problem, point = _problem(layer, None, seed)
    theta0 = problem.theta0
    assert problem.second_order and problem.jvp and problem.gradient_batch
    u = _u(seed)
    if layer.second_order:
        inner = problem.second_order(u)
        assert inner.blocks == problem.blocks and inner.theta0 is problem.theta0
        assert inner.framework == "jax" and inner.precision == "float64"
        np.testing.assert_allclose(
            inner.gradient(theta0), layer.hvp(point, u), rtol=1e-12, atol=1e-15
        )
        rows = _rows(problem, seed)
        u_dot_g = [float(u @ layer.gradient(_at(layer, point, row))) for row in rows]
        np.testing.assert_allclose([inner.loss(row) for row in rows], u_dot_g, rtol=1e-12)
        assert inner.loss_batch is not None and inner.batching == "vmap"
        # the loss batch agrees with the loss bit for bit (one compiled program)
        np.testing.assert_array_equal(inner.loss_batch(rows), [inner.loss(row) for row in rows])
        # the gradient away from the start (not the value served from the build)
        np.testing.assert_allclose(
            inner.gradient(rows[1]), layer.hvp(_at(layer, point, rows[1]), u), rtol=1e-12
        )
    else:
        with pytest.raises(Unavailable, match=UNAVAILABLE["second_order"]):
            problem.second_order(u)
    directions = np.random.default_rng([seed, 9]).standard_normal((3, theta0.size))
    if layer.forward:
        exact = directions @ layer.gradient(point)
        np.testing.assert_allclose(problem.jvp(theta0, directions), exact, rtol=1e-12)
        eye = np.eye(theta0.size)
        np.testing.assert_allclose(problem.jvp(theta0, eye), layer.gradient(point), rtol=1e-12)
    else:
        with pytest.raises(Unavailable, match=UNAVAILABLE["forward"]):
            problem.jvp(theta0, directions)
    rows = _rows(problem, seed)
    if layer.batched:
        values, gradients = problem.gradient_batch(rows)
        exact = np.stack([layer.gradient(_at(layer, point, row)) for row in rows])
        np.testing.assert_allclose(gradients, exact, rtol=1e-12, atol=1e-15)
        losses = [layer.loss(_at(layer, point, row)) for row in rows]
        np.testing.assert_allclose(values, losses, rtol=1e-13)
    else:
        with pytest.raises(Unavailable, match=UNAVAILABLE["batched"]):
            problem.gradient_batch(rows)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("entry", MUTANTS, ids=lambda entry: f"{entry.layer}-{entry.bug}")
def test_every_mutant_moves_its_hook_in_its_blocks_only(entry: Entry, seed: int) -> None:
    """Against the hand-written oracle: the mutant is visible where its entry says, and only
    there (so a section failing in exactly those blocks found it)."""
    layer = _layer(entry.layer)
    problem, point = _problem(layer, entry.bug, seed)
    found: set[str] = set()
    if entry.contract == "second_order":
        u = _u(seed)
        exact = layer.hvp(point, u)
        got = problem.second_order(u).gradient(problem.theta0)
    elif entry.contract == "forward":
        exact = layer.gradient(point)
        got = problem.jvp(problem.theta0, np.eye(problem.size))
    else:
        rows = _rows(problem, seed)
        exact = np.stack([layer.gradient(_at(layer, point, row)) for row in rows])
        values, got = problem.gradient_batch(rows)
        losses = np.array([layer.loss(_at(layer, point, row)) for row in rows])
        gap = float(np.max(np.abs(values - losses)))
        if gap > 1e-6 * np.max(np.abs(losses)):
            found.add("loss")
        else:
            assert gap <= 1e-12 * np.max(np.abs(losses)), gap
    scale = float(np.max(np.abs(exact)))
    found |= _blocks(layer, _differs_in(got, exact, scale))
    assert found == set(entry.blocks)


def test_hooks_reject_wrong_shapes() -> None:
    problem, _ = _problem(_layer("softplus_jvp"), None, 0)
    from gradcheck.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match=r"\(k, 10\)"):
        problem.jvp(problem.theta0, np.ones(10))
    with pytest.raises(ShapeMismatchError, match=r"\(10,\)"):
        problem.second_order(np.ones(3))
    with pytest.raises(ShapeMismatchError, match=r"\(k, 10\)"):
        problem.gradient_batch(np.ones((2, 4)))
    assert problem.jvp(problem.theta0, np.ones((0, 10))).shape == (0,)


def test_hooks_survive_prepare_and_chunk_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled problem (`prepare` for many evaluations) has the hooks too; rows beyond
    one chunk are evaluated in several calls and agree with the exact values."""
    layer = _layer("softplus_jvp")
    problem, point = _problem(layer, None, 1)
    compiled = problem.prepare(10**6) if problem.prepare else problem
    assert compiled is not problem and compiled.batching == "vmap"
    from gradcheck.adapters import _jax_contracts

    monkeypatch.setattr(_jax_contracts, "MAX_ROWS", 4)  # 11 rows: chunks of 4, 4, 3 (padded)
    directions = np.random.default_rng(3).standard_normal((11, problem.size))
    np.testing.assert_allclose(
        compiled.jvp(problem.theta0, directions), directions @ layer.gradient(point), rtol=1e-12
    )
    thetas = problem.theta0 * (1 + 0.05 * np.random.default_rng(4).standard_normal((11, 10)))
    exact = np.stack([layer.gradient(_at(layer, point, row)) for row in thetas])
    values, gradients = compiled.gradient_batch(thetas)
    np.testing.assert_allclose(gradients, exact, rtol=1e-12, atol=1e-15)
    losses = [layer.loss(_at(layer, point, row)) for row in thetas]
    np.testing.assert_allclose(values, losses, rtol=1e-13)
    assert compiled.second_order is not None
    u = _u(1)
    np.testing.assert_allclose(
        compiled.second_order(u).gradient(problem.theta0), layer.hvp(point, u), rtol=1e-12
    )


def test_a_model_that_cannot_be_traced_gets_eager_hooks() -> None:
    """Python control flow on values: no jit, no vmap; second order and forward mode run
    eagerly, the batched gradient is unavailable."""

    def apply_fn(p: Any, x: Any) -> Any:
        if jnp.sum(x) > 0:
            return jnp.sin(p * x)
        return jnp.cos(p * x)

    layer = _layer("sin_ax")  # the same function: sin(a x), x sums above 0 below
    point = layer.point(0)
    x = np.abs(point.x)
    point = Point(params=point.params, x=x, y=point.y)
    problem = jax_adapter.build_problem((apply_fn, point.params["a"]), x, point.y)
    assert any("cannot be traced" in note for note in problem.notes)
    assert problem.second_order and problem.jvp and problem.gradient_batch
    u = _u(0)
    inner = problem.second_order(u)
    assert inner.batching == "eager" and inner.loss_batch is None
    np.testing.assert_allclose(inner.gradient(problem.theta0), layer.hvp(point, u), rtol=1e-12)
    directions = np.eye(problem.size)[:3]
    np.testing.assert_allclose(
        problem.jvp(problem.theta0, directions),
        layer.gradient(point)[:3],
        rtol=1e-12,
    )
    with pytest.raises(Unavailable, match="branches on values in Python"):
        problem.gradient_batch(problem.theta0[None, :])
    report = check_gradients((apply_fn, point.params["a"]), x, point.y, order=2, forward=True)
    assert report.passed, str(report)


# --------------------------------------------------------------------------- check_gradients
def _check(layer: Layer, bug: str | None, seed: int, **contracts: Any) -> Report:
    point = layer.point(seed)
    return check_gradients(
        (layer.apply_fn(bug), point.params), point.x, point.y, seed=seed, **contracts
    )


def _first_order_passed(report: Report) -> bool:
    """The first-order section's own verdict (``report.passed`` covers every section)."""
    return report.problem is None and all(b.passed for b in report.blocks)


def _failing(report: Report) -> set[str]:
    return {b.name for b in report.blocks if not b.passed}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_every_correct_layer_passes_the_contracts_it_has(layer: Layer, seed: int) -> None:
    report = _check(layer, None, seed, order=2, forward=True, batched=True)
    assert _first_order_passed(report), str(report)
    for contract, title in SECTION.items():
        section = report.section(title)
        if _has(layer, contract):
            assert section.passed and section.not_checked is None, str(report)
            extra = {"loss"} if contract == "batched" else set()
            assert {b.name for b in section.blocks} == {layer.param, "input", *extra}
            assert all(b.checked > 0 for b in section.blocks)
        elif contract == "second_order":  # asked for and impossible: the section fails
            assert not section.passed
            assert section.problem is not None
            assert "the backward cannot be differentiated" in section.problem
        else:  # not checked, which does not fail the check
            assert section.passed and section.not_checked is not None, str(report)
            assert section.blocks == ()
    assert report.passed == layer.second_order, str(report)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("entry", MUTANTS, ids=lambda entry: f"{entry.layer}-{entry.bug}")
def test_every_mutant_is_caught_in_its_section_and_blocks(entry: Entry, seed: int) -> None:
    layer = _layer(entry.layer)
    report = _check(
        layer,
        entry.bug,
        seed,
        order=2 if layer.second_order else 1,
        forward=layer.forward,
        batched=layer.batched,
    )
    assert not report.passed
    section = report.section(SECTION[entry.contract])
    assert section.not_checked is None and section.problem is None, str(report)
    assert _failing(section) == set(entry.blocks), str(section)
    assert _first_order_passed(report) == entry.first_order_passes, str(report)
    text = str(report)
    assert f"{SECTION[entry.contract]} FAILED" in text.splitlines()[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_fast_mode_catches_a_wrong_tangent_in_the_first_order_section(seed: int) -> None:
    """In fast mode the forward section compares forward with reverse mode; for a custom_jvp
    the reverse mode is the transpose of the same tangent rule, so the two agree on a wrong
    tangent and only the first-order section (against finite differences) catches it."""
    layer = _layer("softplus_jvp")
    report = _check(layer, "tangent_scale", seed, mode="fast", forward=True, order=2)
    assert not report.passed
    assert _failing(report.section("first order")) == {"input"}
    assert report.section("forward mode").mode == "fast"
    correct = _check(layer, None, seed, mode="fast", forward=True, order=2, batched=True)
    assert correct.passed, str(correct)
    assert all(s.mode == "fast" for s in correct.sections if s.contract != "batched backward")


def test_a_custom_vjp_under_forward_mode_is_not_checked_with_its_reason() -> None:
    report = _check(_layer("sin_ax"), None, 0, forward=True)
    assert report.passed, str(report)
    section = report.section("forward mode")
    assert section.not_checked is not None
    assert section.not_checked.startswith("no forward-mode rule: ")
    assert "can't apply forward-mode autodiff (jvp) to a custom_vjp function" in section.not_checked
    assert "\n" not in section.not_checked
    assert "forward mode not checked" in str(report).splitlines()[0]


def test_a_backward_jax_cannot_batch_or_differentiate_is_named() -> None:
    report = _check(_layer("callback_bwd"), None, 0, order=2, batched=True)
    second = report.section("second order")
    assert not second.passed and second.problem is not None
    assert "Pure callbacks do not support JVP" in second.problem
    batched = report.section("batched backward")
    assert batched.passed and batched.not_checked is not None
    assert batched.not_checked.startswith("the gradient cannot be vmapped: NotImplementedError")
    assert _first_order_passed(report)


def test_the_callers_jax_config_is_untouched_and_never_changes_a_verdict() -> None:
    """x64 off and NaN debugging on, globally: the hooks run in the adapter's own scope
    (float64 exact values, a NaN in H u reported, not raised), and leave both flags alone."""
    before = (jax.config.jax_enable_x64, jax.config.jax_debug_nans)
    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_debug_nans", True)
    try:
        layer = _layer("softplus_jvp")
        report = _check(layer, None, 1, order=2, forward=True, batched=True)
        assert report.passed, str(report)
        problem, point = _problem(layer, None, 1)
        assert problem.second_order is not None
        u = _u(1)
        hvp = problem.second_order(u).gradient(problem.theta0)
        np.testing.assert_allclose(hvp, layer.hvp(point, u), rtol=1e-12)  # float64

        # x ** 1.5 at 0: a finite gradient, an infinite second derivative (a NaN in H u)
        params, x = np.ones(3), np.array([0.0, 0.5, 1.0])
        model = (lambda p, v: p * v**1.5, params)
        problem = jax_adapter.build_problem(model, x, np.zeros(3))
        assert problem.second_order is not None
        hvp = problem.second_order(np.ones(6)).gradient(problem.theta0)
        assert not np.all(np.isfinite(hvp))
        report = check_gradients(model, x, np.zeros(3), order=2, forward=True, batched=True)
        assert _first_order_passed(report)
        assert not report.section("second order").passed
        assert (jax.config.jax_enable_x64, jax.config.jax_debug_nans) == (False, True)
    finally:
        jax.config.update("jax_enable_x64", before[0])
        jax.config.update("jax_debug_nans", before[1])
