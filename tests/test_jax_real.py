"""The JAX adapter on models shaped like real JAX code: implicit-differentiation solvers,
ODEs with adjoints, Linen dropout, hyperparameters held as 0-d arrays, plain functions,
and the edge cases real code reaches (constant outputs, NaN gradients, Python floats,
backwards that raise, the caller's JAX configuration).

Oracles: each model's gradient is compared with ``jax.grad`` through the same computation
written without the custom rule (the solver unrolled, the integrator differentiated step
by step), or with an exact derivative; planted bugs in custom backwards must fail with the
right block named.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from gradcheck.adapters import _jax_eager as eager  # noqa: E402
from gradcheck.adapters import jax as adapter  # noqa: E402
from stability import assert_stable  # noqa: E402
from zoo.jax_solvers import (  # noqa: E402
    fixed_point_model,
    fixed_point_params,
    ode_model,
    ode_params,
    rand,
    ridge_model,
)

from gradcheck import Report, check_gradients  # noqa: E402
from gradcheck._dispatch import route_callable, select_adapter  # noqa: E402
from gradcheck._problem import FlatProblem  # noqa: E402
from gradcheck.errors import (  # noqa: E402
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    UnsupportedModelError,
)

lax = jax.lax


def build(model: Any, x: Any, y: Any = None, **kw: Any) -> FlatProblem:
    kw.setdefault("loss", None)
    kw.setdefault("wrt", "all")
    kw.setdefault("seed", 0)
    return adapter.build_problem(model, x, y, **kw)


def failed(report: Report) -> set[str]:
    return {b.name for b in report.failed_blocks}


def names(problem: FlatProblem | Report) -> list[str]:
    return [b.name for b in problem.blocks]


def flat_grad(grads: Any, order: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(grads[k], dtype=np.float64).ravel() for k in order])


def test_implicit_solve_gradient_equals_the_unrolled_solver_and_passes() -> None:
    params, x = fixed_point_params(), rand((4, 3), 4)
    problem = build((fixed_point_model(), params), x)
    assert names(problem) == ["U", "W", "b", "input"]

    def unrolled(p: Any, xx: Any) -> Any:  # oracle: 200 contractions, differentiated by JAX
        r = adapter.output_projection((4, 5), 0, 0)
        return jnp.sum(fixed_point_model(iters=200)(p, xx) * r)

    with jax.enable_x64(True):
        gp, gx = jax.grad(unrolled, argnums=(0, 1))(params, jnp.asarray(x))
    expected = np.concatenate([flat_grad(gp, ["U", "W", "b"]), np.ravel(gx)])
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=1e-9, atol=1e-12)
    report = assert_stable(lambda: check_gradients((fixed_point_model(), params), x), threads=False)
    assert report.passed, str(report)


@pytest.mark.parametrize(("bug", "block"), [("W", "W"), ("input", "input")])
def test_implicit_solve_with_a_planted_backward_bug_fails_naming_the_block(
    bug: str, block: str
) -> None:
    report = check_gradients((fixed_point_model(bug), fixed_point_params()), rand((4, 3), 4))
    assert not report.passed and failed(report) == {block}, str(report)


def test_a_loop_model_stays_op_by_op_where_a_vmapped_compile_would_not_repay() -> None:
    problem = build((fixed_point_model(), fixed_point_params(12, 8)), rand((6, 8), 4))
    assert problem.size > adapter.COMPILE_FROM  # 320 entries: 642 evaluations in full mode
    assert problem.prepare is not None
    assert problem.prepare(2 * problem.size + 2) is problem  # the while loop: not compiled
    assert problem.prepare(adapter.COMPILE_FROM_LOOPS).batching == "vmap"


def test_a_hyperparameter_held_as_a_0d_array_is_checked_through_custom_root() -> None:
    a, t = rand((20, 4), 5), rand((20,), 6)
    params = {"lam": np.asarray(0.3)}
    problem = build((ridge_model(), params), (a, t), wrt="params")
    assert names(problem) == ["lam"] and problem.blocks[0].shape == ()
    # oracle: d w*/d lam = -(H)^-1 * 2 w*, H the Hessian at the optimum (implicit function)
    with jax.enable_x64(True):
        w = ridge_model()(params, (jnp.asarray(a), jnp.asarray(t)))
        hess = 2 * a.T @ a / 20 + 2 * 0.3 * np.eye(4) + 0.1 * np.diag(1 - np.tanh(w) ** 2)
    dw = -np.linalg.solve(hess, 2 * np.asarray(w))
    r = adapter.output_projection((4,), 0, 0)
    np.testing.assert_allclose(problem.gradient(problem.theta0), [r @ dw], rtol=1e-9)
    assert check_gradients((ridge_model(), params), (a, t), wrt="params").passed
    report = check_gradients((ridge_model(bug=True), params), (a, t), wrt="params")
    assert not report.passed and failed(report) == {"lam"}, str(report)


def test_ode_adjoint_equals_jax_grad_through_the_integrator_and_passes() -> None:
    params, y0 = ode_params(), rand((3, 4), 9)
    problem = build((ode_model(), params), y0)
    reference = build((ode_model(adjoint=False), params), y0)  # oracle: jax.grad through scan
    assert names(problem) == names(reference) == ["W", "b", "tau", "input"]
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), reference.gradient(reference.theta0), rtol=1e-12
    )
    assert problem.loss(problem.theta0) == pytest.approx(reference.loss(reference.theta0), 1e-14)
    report = assert_stable(lambda: check_gradients((ode_model(), params), y0))
    assert report.passed, str(report)


@pytest.mark.parametrize("bug", ["tau", "b"])
def test_ode_adjoint_with_a_planted_bug_fails_naming_the_block(bug: str) -> None:
    report = check_gradients((ode_model(bug), ode_params()), rand((3, 4), 9))
    assert not report.passed and failed(report) == {bug}, str(report)


def test_models_whose_only_inputs_are_their_parameters_take_x_none() -> None:
    y0 = rand((2, 4), 9)  # closed over: NumPy float64 (a float32 constant would fix the dtype)
    ode = (lambda p, _: ode_model()(p, y0), ode_params())
    problem = build(ode, None)
    assert names(problem) == ["W", "b", "tau"]
    assert check_gradients(ode, None).passed
    assert failed(check_gradients((lambda p, _: ode_model("tau")(p, y0), ode_params()), None)) == {
        "tau"
    }
    x = rand((4, 3), 4)
    solver = (lambda p, _: fixed_point_model()(p, x), fixed_point_params())
    report = check_gradients(solver, None, mode="fast")
    assert report.passed and names(report) == ["U", "W", "b"], str(report)


# ----------------------------------------------------------- constants among the outputs
def _unused_and_stopped(p: Any, v: Any) -> Any:
    return v * p["a"] + lax.stop_gradient(p["c"]) * 0.0


@pytest.mark.parametrize(
    "model",
    [
        (lambda p, v: v * p["a"], {"a": np.asarray(2.0), "b": np.asarray(1.0)}),  # the issue's
        (_unused_and_stopped, {"a": np.asarray(2.0), "c": np.asarray(1.0)}),
        (lambda p, v: v * p["a"], {"a": np.asarray(2.0), "b": np.ones(3)}),
        (lambda p, v: jnp.sum(v) * 0.0 + p["a"], {"a": np.asarray(2.0)}),
    ],
    ids=["unused-0d", "stop_gradient", "unused-vector", "input-unused"],
)
def test_a_parameter_or_input_whose_gradient_is_exactly_zero_is_checked(model: Any) -> None:
    x = np.arange(3.0)
    problem = build(model, x)
    assert np.all(np.isfinite(problem.gradient(problem.theta0)))
    for mode in ("full", "fast"):
        report = check_gradients(model, x, mode=mode)
        assert report.passed, str(report)
    compiled = problem.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
    np.testing.assert_allclose(compiled.loss(problem.theta0), problem.loss(problem.theta0))


_C = np.array([1.5, -2.0, 0.5])


def _literal_out(p: Any, x: Any) -> Any:
    return 3.0


def _constant_out(p: Any, x: Any) -> Any:
    return jnp.asarray(_C)


def _passthrough_out(p: Any, x: Any) -> Any:
    return x


def _duplicate_out(p: Any, x: Any) -> Any:
    return p["w"] * x


@pytest.mark.parametrize("fn", [_literal_out, _constant_out, _passthrough_out, _duplicate_out])
def test_programs_with_literal_constant_passthrough_or_duplicate_outputs(fn: Any) -> None:
    """Op by op and compiled, in the loss and the gradient programs."""
    params, x = {"w": np.array([0.5, 1.0, -1.0]), "s": np.asarray(2.0)}, rand((3,), 1)

    def loss(p: Any, xx: Any) -> Any:
        out = fn(p, xx)
        return jnp.sum(out * _C) + jnp.sum(p["w"] * _C) + jnp.vdot(p["w"], xx)

    def everything(p: Any, xx: Any) -> Any:  # every kind of output at once, twice over
        out = fn(p, xx)
        return out, out, 2.0, xx, p["s"], jax.grad(loss, argnums=(0, 1))(p, xx)

    with adapter._scope():
        args = (jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(x))
        for program in (loss, everything, jax.value_and_grad(loss, argnums=(0, 1))):
            closed = jax.jit(program).trace(*args).jaxpr
            want = jax.tree_util.tree_leaves(jax.jit(program)(*args))
            leaves = jax.tree_util.tree_leaves(args)
            for outputs in (None, [0], list(range(len(want)))[::-1]):
                got = eager._OpByOp(closed, outputs)(*leaves)
                chosen = want if outputs is None else [want[i] for i in outputs]
                assert len(got) == len(chosen)
                for a, b in zip(got, chosen, strict=True):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14)
    problem = build((loss, params), x, loss=lambda out, y: out)
    assert names(problem) == ["s", "w", "input"]
    w = params["w"]
    dw, dx = _C + x, w  # exact derivatives; s is unused: zero
    if fn is _passthrough_out:
        dx = _C + w
    if fn is _duplicate_out:
        dw, dx = x * _C + _C + x, w * _C + w
    exact = np.concatenate([[0.0], dw, dx])
    np.testing.assert_allclose(problem.gradient(problem.theta0), exact, rtol=1e-14)
    assert check_gradients((loss, params), x, loss=lambda out, y: out, mode="full").passed
    compiled = problem.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
    assert compiled.loss(problem.theta0) == pytest.approx(problem.loss(problem.theta0), 1e-14)


# ----------------------------------------------------------------- non-finite gradients
def _norm_rows(p: Any, x: Any) -> Any:
    return jnp.sum(jnp.linalg.norm(p["w"], axis=1))  # NaN gradient at a zero row


def test_a_nan_gradient_is_returned_to_the_core_as_it_is_whatever_debug_nans_says() -> None:
    params = {"w": np.array([[1.0, 2.0], [0.0, 0.0]])}
    before = jax.config.jax_debug_nans
    try:
        for flag in (False, True):
            jax.config.update("jax_debug_nans", flag)
            problem = build((_norm_rows, params), None)
            g = problem.gradient(problem.theta0)
            assert np.all(np.isfinite(g[:2])) and np.all(np.isnan(g[2:])), g
            assert np.isfinite(problem.loss(problem.theta0))
            compiled = problem.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
            assert np.isnan(compiled.gradient(problem.theta0)[2])
    finally:
        jax.config.update("jax_debug_nans", before)


# ------------------------------------------------------------------- plain functions
def test_a_plain_function_of_jax_arrays_is_routed_to_jax_and_its_inputs_checked() -> None:
    x = jnp.linspace(-2.0, 2.0, 5)
    report = check_gradients(jax.nn.softplus, x)
    assert report.passed and report.framework == "jax" and names(report) == ["input"]
    assert select_adapter(jax.nn.softplus, x) is adapter
    # NumPy inputs: decided by where the function comes from, or what its code names
    assert check_gradients(jax.nn.softplus, np.asarray(x)).framework == "jax"
    assert check_gradients(lambda v: jnp.sum(jnp.sin(v) ** 2), np.asarray(x)).passed
    # a tuple is positional arguments, a dict keyword arguments
    both = check_gradients(lambda a, b: jnp.sin(a) * b, (x, 2 * x))
    assert both.passed and names(both) == ["input[0]", "input[1]"]
    kw = check_gradients(lambda *, a, b: jnp.sin(a) * b, {"a": x, "b": 2 * x})
    assert kw.passed and names(kw) == ["input['a']", "input['b']"]
    with pytest.raises(NothingToCheckError, match="a plain function has no parameters"):
        check_gradients(jax.nn.softplus, x, wrt="params")


def test_a_plain_function_with_a_wrong_rule_fails_on_its_input() -> None:
    @jax.custom_jvp
    def softplus(v: Any) -> Any:
        return jnp.logaddexp(v, 0.0)

    softplus.defjvp(lambda p, t: (softplus(p[0]), 0.999 * jax.nn.sigmoid(p[0]) * t[0]))
    report = check_gradients(softplus, jnp.linspace(-2.0, 2.0, 5))
    assert not report.passed and failed(report) == {"input"}, str(report)


def test_plain_callables_are_routed_by_their_inputs_and_ambiguity_shows_both_forms() -> None:
    torch = pytest.importorskip("torch")
    from gradcheck.adapters import torch as torch_adapter

    assert not torch_adapter.matches(jax.nn.softplus) and not adapter.matches(jnp.sin)
    assert route_callable(lambda t: t.sum(), torch.ones(2)) is torch_adapter
    assert route_callable(lambda t: t.sum(), jnp.ones(2)) is adapter
    assert route_callable(lambda t: t.sum(), (np.ones(2), jnp.ones(2))) is adapter
    assert route_callable(torch.sin, np.ones(2)) is torch_adapter
    assert route_callable(lambda t: torch.sin(t), np.ones(2)) is torch_adapter
    assert route_callable(jnp.sin, np.ones(2)) is adapter
    with pytest.raises(UnsupportedModelError, match="mixes torch tensors and JAX arrays"):
        route_callable(lambda a, b: a, (torch.ones(2), jnp.ones(2)))
    assert "torch" in sys.modules and "jax" in sys.modules
    message = (
        "cannot tell whether `<lambda>` is a JAX or a torch function from NumPy inputs: "
        "for JAX pass JAX arrays (jnp.asarray(x)) or the pair (lambda p, x: f(x), {}), "
        "for torch pass torch tensors (torch.as_tensor(x))"
    )
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        check_gradients(lambda v: v * 2.0, np.ones(3))


# ---------------------------------------------------------------------- Linen dropout
def _linen_dropout_model(bug: bool) -> Any:
    pytest.importorskip("flax")
    import flax.linen as nn

    @jax.custom_vjp
    def scale(h: Any, s: Any) -> Any:
        return h * s

    def bwd(res: Any, g: Any) -> Any:
        h, s = res
        ds = jnp.sum(g * h) * (1.01 if bug else 1.0)
        return g * s, ds

    scale.defvjp(lambda h, s: (h * s, (h, s)), bwd)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = jnp.tanh(nn.Dense(6)(x))
            h = nn.Dropout(rate=0.4, deterministic=False)(h)
            s = self.param("s", lambda key: jnp.asarray(1.3))
            return nn.Dense(2)(scale(h, s))

    return Net()


def test_linen_dropout_gets_its_rngs_held_fixed_and_a_planted_bug_fails() -> None:
    net = _linen_dropout_model(bug=False)
    x = rand((5, 3), 1)
    variables = net.init({"params": jax.random.PRNGKey(0)}, x)
    rngs = {"dropout": jax.random.PRNGKey(3)}
    with pytest.raises(
        ModelError,
        match=re.escape(
            "the Flax Linen module draws random numbers from 'dropout': pass its key as a "
            "third item, (module, variables, {'dropout': jax.random.key(0)})"
        ),
    ):
        build((net, variables), x)
    problem = build((net, variables, rngs), x)
    assert problem.loss(problem.theta0) == problem.loss(problem.theta0)
    assert "params/s" in names(problem)

    def oracle(v: Any) -> Any:  # jax.grad of the module itself, same dropout key
        out = net.apply(v, jnp.asarray(x), rngs=rngs)
        return jnp.sum(out * adapter.output_projection((5, 2), 0, 0))

    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        grads = jax.grad(oracle)(v64)["params"]
    expected = np.concatenate(
        [np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(grads)]  # pytree (sorted) order
    )
    np.testing.assert_allclose(problem.gradient(problem.theta0)[: expected.size], expected, 1e-12)
    report = assert_stable(lambda: check_gradients((net, variables, rngs), x), threads=False)
    assert report.passed, str(report)
    buggy = _linen_dropout_model(bug=True)
    report = check_gradients((buggy.apply, variables, rngs), x)
    assert not report.passed and failed(report) == {"params/s"}, str(report)


# -------------------------------------------------------- leaves that cannot be checked
def test_python_floats_and_complex_leaves_are_named_as_not_checked() -> None:
    def apply_fn(p: Any, x: Any) -> Any:
        steps = int(p["alpha"] * 10)  # a Python float used as one: it stays a constant
        return jnp.sum(x * p["w"]) * p["alpha"] * steps + jnp.sum(jnp.abs(p["c"]))

    params = {"w": jnp.ones(3), "alpha": 0.5, "c": jnp.ones(2, dtype=jnp.complex64)}
    report = check_gradients((apply_fn, params), np.arange(3.0))
    assert report.passed and names(report) == ["w", "input"], str(report)
    assert set(report.skipped) == {"alpha", "c"}
    assert any("Python floats are constants, not checked: `alpha`" in w for w in report.warnings)
    assert any("complex arrays are not checked" in w and "`c`" in w for w in report.warnings)
    with_input = check_gradients((lambda p, x: jnp.sum(x[0] * p), jnp.ones(3)), (np.ones(3), 0.5))
    assert with_input.skipped == ("input[1]",)


def test_zero_size_arrays_hold_nothing_to_check() -> None:
    with pytest.raises(NothingToCheckError, match=r"with entries \(zero-size: w\)"):
        build((lambda p, x: jnp.sum(p["w"]) + 1.0, {"w": jnp.ones((0, 3))}), None)
    params = {"w": jnp.ones((0, 3)), "v": jnp.ones(2)}
    problem = build((lambda p, x: jnp.sum(p["w"]) + jnp.sum(p["v"] ** 2), params), None)
    assert names(problem) == ["v"]


def test_a_one_shot_iterable_as_input_is_a_one_line_error() -> None:
    model = (lambda p, x: jnp.sum(p * x[0]), np.ones(3))

    def gen() -> Iterator[float]:
        yield 1.0

    with pytest.raises(InvalidOptionError, match="which can be iterated only once") as info:
        check_gradients(model, (np.ones(3), gen()))
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidOptionError, match="which can be iterated only once"):
        check_gradients(model, gen())


# ---------------------------------------------------------------- errors of the model's
def test_a_backward_that_raises_is_named_as_the_backward() -> None:
    @jax.custom_vjp
    def f(v: Any) -> Any:
        return jnp.sin(v)

    def bwd(res: Any, g: Any) -> Any:
        raise ValueError("the backward is broken")

    f.defvjp(lambda v: (jnp.sin(v), v), bwd)
    with pytest.raises(
        ModelError,
        match=re.escape(
            "JAX cannot differentiate the model: its backward raised while JAX traced the "
            "gradient (the forward traces fine): ValueError: the backward is broken"
        ),
    ):
        check_gradients((lambda p, x: f(p * x), np.ones(3)), np.arange(3.0))

    def fails_on_host(v: np.ndarray) -> np.ndarray:
        raise RuntimeError("host backward failed")

    @jax.custom_vjp
    def g(v: Any) -> Any:
        return jnp.sin(v)

    def host_bwd(res: Any, ct: Any) -> Any:
        return (jax.pure_callback(fails_on_host, jax.ShapeDtypeStruct(ct.shape, ct.dtype), ct),)

    g.defvjp(lambda v: (jnp.sin(v), v), host_bwd)
    with pytest.raises(
        ModelError, match="the model's backward raised while JAX evaluated its gradient"
    ):
        check_gradients((lambda p, x: g(p * x), np.ones(3)), np.arange(3.0))

    def forward_raises(p: Any, x: Any) -> Any:
        raise KeyError("layer")

    with pytest.raises(ModelError, match="the model's forward raised while JAX traced it: KeyError"):
        check_gradients((forward_raises, np.ones(3)), np.arange(3.0))


# ------------------------------------------------------------- the caller's JAX state
@pytest.fixture
def jax_config() -> Iterator[Callable[[str, Any], None]]:
    saved: dict[str, Any] = {}

    def update(name: str, value: Any) -> None:
        saved.setdefault(name, getattr(jax.config, name))
        jax.config.update(name, value)

    yield update
    for name, value in saved.items():
        jax.config.update(name, value)


def _state_model() -> tuple[Any, Any]:
    return (fixed_point_model(), fixed_point_params(4, 2)), rand((3, 2), 4)


def _report_data(report: Report) -> dict[str, Any]:
    d = report.to_dict()
    d.pop("elapsed", None)
    return d


@pytest.mark.parametrize(
    "state",
    ["x64_off", "x64_on", "debug_nans", "disable_jit", "matmul_bf16", "default_device"],
)
def test_a_check_does_not_depend_on_the_callers_jax_state(
    state: str, jax_config: Callable[[str, Any], None]
) -> None:
    model, x = _state_model()
    expected = _report_data(check_gradients(model, x))
    scope: Any = contextlib_null()
    if state == "x64_off":
        jax_config("jax_enable_x64", False)
    elif state == "x64_on":
        jax_config("jax_enable_x64", True)
    elif state == "debug_nans":
        jax_config("jax_debug_nans", True)
    elif state == "disable_jit":
        scope = jax.disable_jit()
    elif state == "matmul_bf16":
        scope = jax.default_matmul_precision("bfloat16")
    else:
        scope = jax.default_device(jax.devices("cpu")[0])
    model, x = _state_model()
    with scope:
        got = check_gradients(model, x)
    assert _report_data(got) == expected


def contextlib_null() -> Any:
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------- the op-by-op evaluator's fallback
def test_without_the_op_by_op_evaluator_the_check_runs_compiled_and_agrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x = (ode_model(), ode_params()), rand((3, 4), 9)
    op_by_op = build(model, x)
    assert op_by_op.batching == "eager" and eager.interpreter_ok()
    monkeypatch.setitem(eager._PROBED, "ok", False)  # as if the start-up probe had failed
    compiled = build(model, x)
    assert compiled.batching == "compiled"
    assert any("op-by-op evaluator a probe found it disagrees" in n for n in compiled.notes)
    np.testing.assert_allclose(
        compiled.gradient(compiled.theta0), op_by_op.gradient(op_by_op.theta0), rtol=1e-12
    )
    assert check_gradients(model, x).passed
    assert failed(check_gradients((ode_model("tau"), ode_params()), x)) == {"tau"}
    monkeypatch.delitem(eager._PROBED, "ok")
    assert eager.interpreter_ok()  # probed again, before the evaluator breaks

    def broken(self: Any, *args: Any) -> Any:  # an evaluator that breaks on this model
        raise TypeError("unhashable type: 'Literal'")

    monkeypatch.setattr(eager._OpByOp, "__call__", broken)
    problem = build(model, x)
    assert problem.batching == "compiled"
    assert any("raised TypeError: unhashable type" in n for n in problem.notes)
    assert check_gradients(model, x).passed


_BREAKAGES: dict[str, tuple[str, Any]] = {
    "a wrong fold": ("_fold", lambda dims, side, perm: None if side else dims),
    "no Literal type": ("JaxLiteral", None),
    "a bind that changed": ("_bind_params", lambda eqn: {**eqn.params, "unexpected": True}),
    "loops not found": ("_LOOPS", frozenset()),
    "float32 not found": ("_lowest_float", lambda eqns: None),
}


@pytest.mark.parametrize("breakage", list(_BREAKAGES))
def test_the_start_up_probe_fails_closed(breakage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, replacement = _BREAKAGES[breakage]
    monkeypatch.delitem(eager._PROBED, "ok", raising=False)
    monkeypatch.setattr(eager, name, replacement)
    assert eager.interpreter_ok() is False  # wrong numbers, an error or wrong facts: not used
    monkeypatch.delitem(eager._PROBED, "ok")
    monkeypatch.undo()
    assert eager.interpreter_ok() is True


def _dense_model(bug: bool) -> Any:
    """``tanh(x W^T) V`` with a hand-written backward; ``bug``: one weight-gradient entry x1.01."""

    @jax.custom_vjp
    def dense(w: Any, h: Any) -> Any:
        return jnp.tanh(h @ w.T)

    def fwd(w: Any, h: Any) -> Any:
        out = jnp.tanh(h @ w.T)
        return out, (w, h, out)

    def bwd(res: Any, g: Any) -> Any:
        w, h, out = res
        dz = g * (1.0 - out**2)
        dw = dz.T @ h
        return (dw.at[1, 2].multiply(1.01) if bug else dw), dz @ w

    dense.defvjp(fwd, bwd)
    return lambda p, x: dense(p["w"], x) @ p["v"]


def _dense_params() -> dict[str, Any]:
    return {"w": rand((4, 3), 1), "v": rand((4, 2), 2)}


def _verdict(report: Report) -> list[tuple[str, bool, Any]]:
    return [(b.name, b.passed, b.worst[0].index if b.worst else None) for b in report.blocks]


@pytest.mark.parametrize("mode", ["fast", "full"])
@pytest.mark.parametrize("bug", [False, True])
def test_an_evaluator_that_raises_mid_check_hands_the_check_to_the_public_path(
    mode: str, bug: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = (_dense_model(bug), _dense_params()), rand((5, 3), 3)
    with monkeypatch.context() as patch:  # oracle: the check with the evaluator disabled
        patch.setitem(eager._PROBED, "ok", False)
        oracle = check_gradients(model, x, mode=mode)
    assert oracle.batching == "compiled" and oracle.passed is not bug, str(oracle)
    assert eager.interpreter_ok()
    calls: list[Any] = []
    call = eager._OpByOp.__call__

    def breaks_after_the_build(self: Any, *args: Any) -> Any:
        calls.append(self)
        if len(calls) > 1:  # the gradient at the starting point, while building, runs
            raise TypeError("bind() got an unexpected keyword argument 'accumulation_type'")
        return call(self, *args)

    monkeypatch.setattr(eager._OpByOp, "__call__", breaks_after_the_build)
    report = check_gradients(model, x, mode=mode)  # no TypeError reaches the user
    assert report.batching == "eager"  # built op by op; it broke at the first loss
    assert len(calls) == 2  # it raised once: every later evaluation ran on the public path
    assert _verdict(report) == _verdict(oracle), f"{report}\n{oracle}"
    if bug:
        assert failed(report) == {"w"} and report.block("w").worst[0].index == (1, 2)


def test_an_evaluator_that_raises_after_the_build_leaves_the_compiled_loss_to_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x = (_dense_model(False), _dense_params()), rand((5, 3), 3)
    problem = build(model, x)
    assert problem.batching == "eager" and problem.prepare is not None
    theta = problem.theta0 + 0.01
    want_loss, want_gradient = problem.loss(theta), problem.gradient(theta)

    def broken(self: Any, *args: Any) -> Any:
        raise TypeError("unhashable type: 'Literal'")

    monkeypatch.setattr(eager._OpByOp, "__call__", broken)
    compiled = problem.prepare(adapter.COMPILE_FROM)  # the vmapped loss traced from the model
    assert compiled.batching == "vmap" and compiled.notes == problem.notes
    assert compiled.loss(theta) == pytest.approx(want_loss, rel=1e-13)
    np.testing.assert_allclose(compiled.gradient(theta), want_gradient, rtol=1e-12)
    assert problem.loss(theta) == pytest.approx(want_loss, rel=1e-13)  # compiled, public


@pytest.fixture(params=["op by op", "public"])
def evaluator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each path in turn: the op-by-op evaluator, and the public one alone."""
    if request.param == "public":
        monkeypatch.setitem(eager._PROBED, "ok", False)
    else:
        assert eager.interpreter_ok()
    return str(request.param)


def _float32_custom_backward() -> Any:
    @jax.custom_vjp
    def f(x: Any) -> Any:
        return jnp.sin(x)

    def bwd(x: Any, g: Any) -> Any:
        return ((g * jnp.cos(x)).astype(jnp.float32).astype(x.dtype),)

    f.defvjp(lambda x: (jnp.sin(x), x), bwd)
    return lambda p, x: f(p * x)


_F32 = np.linspace(-1.0, 1.0, 3).astype(np.float32)


@pytest.mark.parametrize(
    ("fn", "precision", "where"),
    [
        (
            lambda p, x: jnp.tanh(p.astype(jnp.float32) * x.astype(jnp.float32)),
            "float32",
            "forward pass",
        ),
        (_float32_custom_backward(), "float32", "gradient"),
        (lambda p, x: jnp.tanh(p * x + jnp.asarray(_F32)), "float64", None),  # a float32 constant
        (lambda p, x: jnp.tanh(p.astype(jnp.bfloat16)).astype(jnp.float64) * x, "bfloat16", None),
    ],
)
def test_both_paths_read_the_programs_precision_alike(
    evaluator: str, fn: Any, precision: str, where: str | None
) -> None:
    problem = build((fn, rand((3,), 1)), rand((3,), 2))
    assert problem.batching == ("eager" if evaluator == "op by op" else "compiled")
    assert problem.precision == precision, problem.notes
    if where is not None:
        assert any(f"computes in {precision} in its {where}" in note for note in problem.notes)


def test_both_paths_find_loops_and_bound_memory(
    evaluator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = build((fixed_point_model(), fixed_point_params(12, 8)), rand((6, 8), 4))
    assert problem.prepare is not None
    assert problem.prepare(adapter.COMPILE_FROM) is problem  # the while loop: not compiled
    monkeypatch.setattr(adapter, "MEMORY_BUDGET", 10 * 8 * (100 * 100 + 100))
    problem = build((lambda p, x: jnp.tanh(p @ x), rand((100, 100))), rand((100,), 1), wrt="params")
    assert problem.prepare is not None and problem.prepare(adapter.COMPILE_FROM - 1) is problem
    assert 1 <= problem.prepare(adapter.COMPILE_FROM).max_batch <= 8
