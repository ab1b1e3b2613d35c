"""The JAX adapter (``gradcheck.adapters.jax``) against the NumPy reference MLP and JAX's own models."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from gradcheck.adapters import _jax_eager as eager  # noqa: E402
from gradcheck.adapters import jax as adapter  # noqa: E402

from gradcheck import Report, check_gradients  # noqa: E402
from gradcheck._dispatch import select_adapter  # noqa: E402
from gradcheck._losses import LOSS_NAMES, numpy_loss  # noqa: E402
from gradcheck._problem import FlatProblem, output_projection  # noqa: E402
from gradcheck._reference_jax import mlp_penalty_jax  # noqa: E402
from gradcheck.errors import (  # noqa: E402
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
    UnsupportedModelError,
)
from gradcheck.reference import MLP  # noqa: E402


def build(model: Any, x: Any, y: Any = None, **kw: Any) -> FlatProblem:
    kw.setdefault("loss", None)
    kw.setdefault("wrt", "all")
    kw.setdefault("seed", 0)
    return adapter.build_problem(model, x, y, **kw)


def names(problem_or_report: FlatProblem | Report) -> list[str]:
    return [b.name for b in problem_or_report.blocks]


def failed(report: Report) -> set[str]:
    return {b.name for b in report.failed_blocks}


def data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def central_differences(problem: FlatProblem, h: float = 1e-6) -> np.ndarray:
    """A plain numerical gradient of a problem, for tests that must not depend on the core."""
    theta = problem.theta0
    rows = np.concatenate([theta + h * np.eye(theta.size), theta - h * np.eye(theta.size)])
    values = np.array([problem.loss(r) for r in rows])
    return (values[: theta.size] - values[theta.size :]) / (2 * h)


# ----------------------------------------------------------------------- reference MLP
CASES = [
    ("sigmoid", "linear", 0.0, 0.0, "mse"),
    ("tanh", "sigmoid", 0.01, 0.02, "bce"),
    ("relu", "softmax", 0.0, 0.05, "categorical_crossentropy"),
    ("identity", "linear", 0.03, 0.0, "mse"),
    ("tanh", "softmax", 0.0, 0.0, "cross_entropy_labels"),
]


def reference_case(activation: str, output: str, l1: float, l2: float, loss: str) -> Any:
    mlp = MLP([4, 6, 5, 3], activation=activation, output=output, l1=l1, l2=l2, seed=3)  # type: ignore[arg-type]
    x = data((7, 4), 1)
    rng = np.random.default_rng(2)
    y: np.ndarray
    if loss == "cross_entropy_labels":
        loss, y = "categorical_crossentropy", rng.integers(0, 3, size=7)
    elif loss == "bce":
        y = rng.uniform(0.1, 0.9, size=(7, 3))
    elif loss == "categorical_crossentropy":
        y = rng.dirichlet(np.ones(3), size=7)
    else:
        y = rng.normal(size=(7, 3))
    return mlp, x, y, loss


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_exported_mlp_jax_grad_equals_reference_backprop(case: tuple[Any, ...]) -> None:
    mlp, x, y, loss = reference_case(*case)
    loss_fn, loss_grad = numpy_loss(loss)
    out = mlp.forward(x)
    dx = mlp.backward(loss_grad(out, y))
    apply_fn, params = mlp.to_jax()
    penalty = mlp_penalty_jax(mlp)
    jloss = adapter.jax_loss(loss)
    with jax.enable_x64(True):
        value, (gp, gx) = jax.value_and_grad(
            lambda p, xx: jloss(apply_fn(p, xx), y) + penalty(p), argnums=(0, 1)
        )(params, jnp.asarray(x))
    assert abs(float(value) - (loss_fn(out, y) + mlp.regularization())) <= 1e-12
    for key, grad in mlp.grads.items():
        scale = max(1.0, float(np.max(np.abs(grad))))
        assert np.max(np.abs(np.asarray(gp[key]) - grad)) <= 1e-12 * scale, key
    assert np.max(np.abs(np.asarray(gx) - dx)) <= 1e-12 * max(1.0, float(np.max(np.abs(dx))))


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "-".join(map(str, c)))
def test_flat_problem_of_exported_mlp_equals_reference(case: tuple[Any, ...]) -> None:
    mlp, x, y, loss = reference_case(*case)
    mlp.l1 = mlp.l2 = 0.0  # the penalty is not part of apply_fn's output
    _, loss_grad = numpy_loss(loss)
    dx = mlp.backward(loss_grad(mlp.forward(x), y))
    problem = build(mlp.to_jax(), x, y, loss=loss)
    assert names(problem) == ["W0", "W1", "W2", "b0", "b1", "b2", "input"]  # pytree (sorted) order
    assert [b.kind for b in problem.blocks] == ["param"] * 6 + ["input"]
    expected = np.concatenate([mlp.grads[n].ravel() for n in names(problem)[:-1]] + [dx.ravel()])
    assert problem.framework == "jax" and problem.precision == "float64"
    assert problem.batching == "eager" and problem.loss_batch is None
    assert np.max(np.abs(problem.gradient(problem.theta0) - expected)) <= 1e-12
    assert np.array_equal(problem.theta0[: mlp.params["W0"].size], mlp.params["W0"].ravel())
    # the compiled variant the core asks for when many evaluations will repay the compile
    assert problem.prepare is not None and problem.prepare(adapter.COMPILE_FROM - 1) is problem
    compiled = problem.prepare(adapter.COMPILE_FROM)
    assert compiled.batching == "vmap" and compiled.loss_batch is not None
    assert compiled.prepare is None and compiled.blocks == problem.blocks
    assert np.array_equal(compiled.gradient(compiled.theta0), problem.gradient(problem.theta0))
    rng = np.random.default_rng(0)
    for theta in problem.theta0 + 1e-3 * rng.normal(size=(3, problem.size)):
        assert compiled.loss(theta) == pytest.approx(problem.loss(theta), rel=1e-13, abs=1e-15)


def test_reference_mlp_check_passes() -> None:
    mlp = MLP([3, 8, 2], activation="tanh", seed=1)
    report = check_gradients(mlp.to_jax(), data((6, 3)), data((6, 2), 1), loss="mse")
    assert report.passed, str(report)
    # 68 entries: 138 evaluations in full mode, fewer than a compile repays
    assert report.framework == "jax" and report.batching == "eager"
    assert report.precision == "float64"


def test_full_mode_compiles_and_vmaps_where_the_evaluations_repay_it() -> None:
    mlp = MLP([10, 20, 5], activation="tanh", seed=1)  # 325 parameters + 60 inputs
    x, y = data((6, 10)), data((6, 5), 1)
    full = check_gradients(mlp.to_jax(), x, y, mode="full")
    assert full.passed and full.batching == "vmap", str(full)
    assert full.evaluations >= adapter.COMPILE_FROM
    fast = check_gradients(mlp.to_jax(), x, y, mode="fast")
    assert fast.passed and fast.batching == "eager", str(fast)


def test_reference_mlp_dropout_is_deterministic_and_passes() -> None:
    mlp = MLP([3, 8, 2], activation="sigmoid", dropout=0.3, seed=1)
    model = mlp.to_jax()
    problem = build(model, data((6, 3)), data((6, 2), 1), loss="mse")
    assert problem.loss(problem.theta0) == problem.loss(problem.theta0)
    assert check_gradients(model, data((6, 3)), data((6, 2), 1)).passed


# ------------------------------------------------------------ planted custom_vjp bugs
BUGS = {
    "sign_flip": {"layers[0]/W"},
    "missing_bias": {"layers[1]/b"},
    "scale_1.01": {"layers[0]/W", "layers[0]/b", "layers[1]/W", "layers[1]/b"},
    "one_entry": {"layers[0]/W"},
    "wrong_input_grad": {"input"},
}


def vjp_mlp(bug: str | None) -> Callable[[Any, Any], Any]:
    """A tanh MLP whose dense layers have a hand-written custom_vjp, with an optional bug."""

    def make_dense(layer: int, last: bool) -> Callable[[Any, Any, Any], Any]:
        @jax.custom_vjp
        def dense(w: Any, b: Any, a: Any) -> Any:
            return a @ w.T + b

        def fwd(w: Any, b: Any, a: Any) -> Any:
            return dense(w, b, a), (w, a)

        def bwd(res: Any, g: Any) -> Any:
            w, a = res
            dw, db, da = g.T @ a, g.sum(axis=0), g @ w
            if bug == "sign_flip" and layer == 0:
                dw = -dw
            if bug == "missing_bias" and last:
                db = jnp.zeros_like(db)
            if bug == "scale_1.01":
                dw, db = 1.01 * dw, 1.01 * db
            if bug == "one_entry" and layer == 0:
                dw = dw.at[dw.shape[0] // 2, dw.shape[1] // 2].multiply(1.01)
            if bug == "wrong_input_grad" and layer == 0:
                da = 2.0 * da
            return dw, db, da

        dense.defvjp(fwd, bwd)
        return dense

    layers = [make_dense(0, False), make_dense(1, True)]

    def apply_fn(params: Any, x: Any) -> Any:
        h = jnp.tanh(layers[0](params["layers"][0]["W"], params["layers"][0]["b"], x))
        return layers[1](params["layers"][1]["W"], params["layers"][1]["b"], h)

    return apply_fn


def vjp_params() -> dict[str, Any]:
    return {
        "layers": [
            {
                "W": jnp.asarray(data((5, 3), 3), jnp.float32),
                "b": jnp.asarray(data((5,), 4), jnp.float32),
            },
            {
                "W": jnp.asarray(data((2, 5), 5), jnp.float32),
                "b": jnp.asarray(data((2,), 6), jnp.float32),
            },
        ]
    }


def test_custom_vjp_mlp_passes_with_nested_names() -> None:
    report = check_gradients((vjp_mlp(None), vjp_params()), data((4, 3)), data((4, 2), 1))
    assert report.passed, str(report)
    assert names(report) == ["layers[0]/W", "layers[0]/b", "layers[1]/W", "layers[1]/b", "input"]
    assert report.precision == "float64"  # float32 params, checked on a float64 copy


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_custom_vjp_bug_fails_naming_the_block(bug: str) -> None:
    report = check_gradients((vjp_mlp(bug), vjp_params()), data((4, 3)), data((4, 2), 1))
    assert not report.passed
    assert failed(report) == BUGS[bug], str(report)
    for name in BUGS[bug]:
        assert f"`{name}`" in str(report)
    if bug == "one_entry":
        block = report.block("layers[0]/W")
        assert block.mismatches == 1
        assert block.worst[0].index == (2, 1)


def test_planted_bug_without_target_uses_projection() -> None:
    report = check_gradients((vjp_mlp("one_entry"), vjp_params()), data((4, 3)))
    assert failed(report) == {"layers[0]/W"}


# ---------------------------------------------------------------- Equinox and Flax
def test_equinox_mlp_passes() -> None:
    pytest.importorskip("equinox")
    import equinox as eqx

    model = eqx.nn.MLP(3, 2, 8, 2, activation=jax.nn.tanh, key=jax.random.PRNGKey(0))
    before = jax.tree_util.tree_leaves(model)
    report = check_gradients(model, data((3,)), data((2,), 1))
    assert report.passed, str(report)
    assert names(report)[:2] == ["layers[0].weight", "layers[0].bias"]
    assert names(report)[-1] == "input"
    assert report.precision == "float64"
    after = jax.tree_util.tree_leaves(model)
    assert all(a is b for a, b in zip(before, after, strict=True))
    assert model.layers[0].weight.dtype == jnp.float32


def test_equinox_planted_bug_is_found_in_the_right_layer() -> None:
    pytest.importorskip("equinox")
    import equinox as eqx

    @jax.custom_vjp
    def scaled_tanh(z: Any) -> Any:
        return jnp.tanh(z)

    scaled_tanh.defvjp(
        lambda z: (jnp.tanh(z), z), lambda z, g: (1.01 * g * (1 - jnp.tanh(z) ** 2),)
    )

    class Net(eqx.Module):
        first: Any
        second: Any

        def __call__(self, x: Any) -> Any:
            return self.second(scaled_tanh(self.first(x)))

    keys = jax.random.split(jax.random.PRNGKey(1))
    net = Net(eqx.nn.Linear(3, 4, key=keys[0]), eqx.nn.Linear(4, 2, key=keys[1]))
    report = check_gradients(net, data((3,)))
    assert failed(report) == {"first.weight", "first.bias", "input"}


def test_flax_nnx_module_passes_and_is_not_changed() -> None:
    pytest.importorskip("flax")
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.layers = nnx.List([nnx.Linear(3, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)])
            self.norm = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.3, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            h = self.drop(jnp.tanh(self.norm(self.layers[0](x))))
            return self.layers[1](h)

    def snapshot(module: Any) -> list[np.ndarray]:
        leaves = jax.tree_util.tree_leaves(nnx.state(module))
        return [
            np.asarray(
                jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
            )
            for v in leaves
        ]

    net = Net(nnx.Rngs(0, dropout=1))
    state_before = snapshot(net)
    problem = build(net, data((5, 3)), data((5, 2), 1), loss="mse")
    assert problem.loss(problem.theta0) == problem.loss(problem.theta0)  # same dropout mask
    report = check_gradients(net, data((5, 3)), data((5, 2), 1))
    assert report.passed, str(report)
    assert names(report) == [
        "layers[0].bias",
        "layers[0].kernel",
        "layers[1].bias",
        "layers[1].kernel",
        "norm.bias",
        "norm.scale",
        "input",
    ]
    state_after = snapshot(net)
    assert len(state_before) == len(state_after) == 10
    assert all(np.array_equal(a, b) for a, b in zip(state_before, state_after, strict=True))


def test_flax_linen_pair_passes_with_batch_stats_passed_through() -> None:
    pytest.importorskip("flax")
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.Dense(6)(x)
            h = nn.BatchNorm(use_running_average=False)(h)
            return nn.Dense(2)(jnp.tanh(h))

    module = Net()
    variables = module.init(jax.random.PRNGKey(0), jnp.ones((5, 3)))
    assert set(variables) == {"params", "batch_stats"}
    report = check_gradients((module, variables), data((5, 3)), data((5, 2), 1))
    assert report.passed, str(report)
    assert names(report) == [
        "params/BatchNorm_0/bias",
        "params/BatchNorm_0/scale",
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
        "input",
    ]
    # the bound apply method is recognised too
    assert names(build((module.apply, variables), data((5, 3)), wrt="params"))[0] == (
        "params/BatchNorm_0/bias"
    )


def test_bare_linen_module_asks_for_variables() -> None:
    pytest.importorskip("flax")
    import flax.linen as nn

    with pytest.raises(
        UnsupportedModelError, match=r"needs its variables: pass \(module, variables\)"
    ):
        build(nn.Dense(2), data((3, 2)))


# -------------------------------------------------------------------- pytrees, inputs
def test_nested_dict_params_pass_with_slash_names() -> None:
    params = {
        "encoder": {"dense": {"w": data((4, 3)), "b": data((4,), 1)}},
        "head": {"w": data((1, 4), 2)},
        "frozen_steps": np.arange(3),
    }

    def apply_fn(p: Any, x: Any) -> Any:
        h = jnp.sin(x @ p["encoder"]["dense"]["w"].T + p["encoder"]["dense"]["b"])
        return h @ p["head"]["w"].T + 0.0 * p["frozen_steps"].sum()

    report = check_gradients((apply_fn, params), data((5, 3), 3), data((5, 1), 4))
    assert report.passed, str(report)
    assert names(report) == ["encoder/dense/b", "encoder/dense/w", "head/w", "input"]


class Linear(NamedTuple):
    weight: Any
    bias: Any


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (np.ones(3), ["params"]),
        ((np.ones(3), np.ones(())), ["params[0]", "params[1]"]),
        ([Linear(np.ones(3), np.ones(()))], ["[0].weight", "[0].bias"]),
        ({"a": [np.ones(3)], "b": np.ones(())}, ["a[0]", "b"]),
    ],
)
def test_block_names_follow_the_pytree_path(params: Any, expected: list[str]) -> None:
    def apply_fn(p: Any, x: Any) -> Any:
        return sum(jnp.sum(leaf * x) for leaf in jax.tree_util.tree_leaves(p))

    expected = ["params" + e if e.startswith("[") else e for e in expected]
    assert names(build((apply_fn, params), np.ones(3), wrt="params")) == expected


def test_float_inputs_are_blocks_and_integer_inputs_pass_through() -> None:
    table = data((10, 4))

    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(p["table"][x["ids"]] * x["scale"] + x["shift"][0] @ p["w"])

    params = {"table": table, "w": data((3, 4), 1)}
    x = {"ids": np.array([1, 7, 7, 2]), "scale": data((4, 4), 2), "shift": (data((3,), 3), 1)}
    problem = build((apply_fn, params), x)
    assert names(problem) == ["table", "w", "input['scale']", "input['shift'][0]"]
    report = check_gradients((apply_fn, params), x)
    assert report.passed, str(report)
    assert names(build((apply_fn, params), x, wrt="inputs")) == [
        "input['scale']",
        "input['shift'][0]",
    ]
    assert names(build((apply_fn, params), x, wrt="params")) == ["table", "w"]


def test_tuple_inputs_are_named_by_position() -> None:
    problem = build((lambda p, x: jnp.sum(x[0] * x[1] * p), np.ones(2)), (np.ones(2), np.ones(2)))
    assert names(problem) == ["params", "input[0]", "input[1]"]


def test_prng_key_inside_x_gives_the_same_randomness_every_evaluation() -> None:
    def apply_fn(p: Any, x: Any) -> Any:
        data_, key = x
        h = jnp.tanh(data_ @ p)
        return jnp.where(jax.random.bernoulli(key, 0.5, h.shape), h, 0.0) / 0.5

    model = (apply_fn, data((3, 2)))
    x = (data((4, 3), 1), jax.random.PRNGKey(7))
    problem = build(model, x)
    assert names(problem) == ["params", "input[0]"]  # the key is not a block
    assert problem.loss(problem.theta0) == problem.loss(problem.theta0)
    compiled = problem.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
    values = compiled.loss_batch(np.stack([problem.theta0] * 3))  # type: ignore[misc]
    assert values[0] == values[1] == values[2] == compiled.loss(problem.theta0)
    assert check_gradients(model, x).passed


# ------------------------------------------------------------------------ precision
def test_float32_params_are_checked_on_a_float64_copy_and_left_alone() -> None:
    w = jnp.asarray(data((3, 3)), dtype=jnp.float32)
    np_w = data((3,), 1).astype(np.float32)
    np_w.setflags(write=True)
    params = {"w": w, "v": np_w}
    snapshot = np_w.copy()
    problem = build((lambda p, x: jnp.tanh(p["w"] @ x + p["v"]), params), data((3,), 2))
    assert problem.precision == "float64"
    assert np.array_equal(problem.theta0[:3], np_w.astype(np.float64))
    assert check_gradients(
        (lambda p, x: jnp.tanh(p["w"] @ x + p["v"]), params), data((3,), 2)
    ).passed
    assert params["w"] is w and w.dtype == jnp.float32
    assert np.array_equal(np_w, snapshot) and np_w.dtype == np.float32 and np_w.flags.writeable


def test_a_model_that_casts_to_float32_is_checked_in_float32_and_says_so() -> None:
    def apply_fn(p: Any, x: Any) -> Any:
        return jnp.tanh(p.astype(jnp.float32) @ x.astype(jnp.float32))

    problem = build((apply_fn, data((2, 3))), data((3,), 1))
    assert problem.precision == "float32"
    assert any("float32" in note for note in problem.notes)
    report = check_gradients((apply_fn, data((2, 3))), data((3,), 1))
    assert report.passed and report.precision == "float32", str(report)
    assert any("computes in float32" in w for w in report.warnings)


def test_a_custom_vjp_backward_in_float32_is_reported() -> None:
    @jax.custom_vjp
    def f(x: Any) -> Any:
        return jnp.sin(x)

    def bwd(x: Any, g: Any) -> Any:
        low = (g * jnp.cos(x)).astype(jnp.float32)  # computed, then widened again
        return (low.astype(x.dtype),)

    f.defvjp(lambda x: (jnp.sin(x), x), bwd)
    problem = build((lambda p, x: f(p * x), np.ones(3)), data((3,)))
    assert problem.precision == "float32"
    assert any(
        note.startswith("the model computes in float32 in its gradient") for note in problem.notes
    )


X64_SCRIPT = """
import jax, numpy as np
from gradcheck import check_gradients
from gradcheck.reference import MLP
before = jax.config.jax_enable_x64
report = check_gradients(MLP([2, 3, 1]).to_jax(), np.ones((4, 2)), np.zeros((4, 1)))
assert report.passed and report.precision == "float64", report
assert jax.config.jax_enable_x64 == before, (before, jax.config.jax_enable_x64)
assert jax.numpy.ones(2).dtype == ("float64" if before else "float32")
print("x64", before, "->", jax.config.jax_enable_x64)
"""


@pytest.mark.parametrize("initial", ["0", "1"])
def test_check_leaves_jax_enable_x64_as_it_was(initial: str) -> None:
    env = {**os.environ, "JAX_ENABLE_X64": initial, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(X64_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    flag = str(initial == "1")
    assert f"x64 {flag} -> {flag}" in result.stdout


# ------------------------------------------------------------ custom rules, control flow
def test_custom_jvp_is_used_and_a_wrong_rule_is_caught() -> None:
    def make(factor: float) -> Any:
        @jax.custom_jvp
        def softplus(x: Any) -> Any:
            return jnp.logaddexp(x, 0.0)

        @softplus.defjvp
        def _(primals: Any, tangents: Any) -> Any:
            (x,), (t,) = primals, tangents
            return softplus(x), factor * jax.nn.sigmoid(x) * t

        return softplus

    x = data((6,))
    assert check_gradients((lambda p, x: make(1.0)(p * x), np.ones(6)), x).passed
    assert failed(check_gradients((lambda p, x: make(0.999)(p * x), np.ones(6)), x)) == {
        "params",
        "input",
    }


def test_python_control_flow_on_values_falls_back_to_eager_evaluation() -> None:
    def apply_fn(p: Any, x: Any) -> Any:
        if jnp.sum(x) > 0:  # not traceable (jit), fine for eager jax.grad
            return jnp.sin(p * x)
        return jnp.cos(p * x)

    problem = build((apply_fn, np.ones(3)), data((3,)))
    assert problem.batching == "loop" and problem.loss_batch is None
    assert any("cannot be traced" in note for note in problem.notes)
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), central_differences(problem), atol=1e-8
    )
    assert check_gradients((apply_fn, np.ones(3)), data((3,))).passed


def test_a_model_that_cannot_be_vmapped_falls_back_to_a_loop() -> None:
    def host_sin(v: np.ndarray) -> np.ndarray:
        return np.sin(v)

    @jax.custom_vjp
    def f(x: Any) -> Any:
        return jax.pure_callback(host_sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * jnp.cos(x),))
    model = (lambda p, x: f(p * x), np.ones(200))
    problem = build(model, data((200,)))
    assert problem.batching == "eager" and not problem.notes  # no vmap tried yet
    compiled = problem.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
    assert compiled.batching == "loop" and compiled.loss_batch is None
    assert any("cannot be vmapped" in note for note in compiled.notes)
    assert compiled.loss(problem.theta0) == pytest.approx(problem.loss(problem.theta0), rel=1e-14)
    report = check_gradients(model, data((200,)), mode="full")  # 802 evaluations: compiled
    assert report.passed and report.batching == "loop", str(report)
    assert any("cannot be vmapped" in w for w in report.warnings)


# --------------------------------------------------------------------- batching
def test_loss_batch_compiles_once_and_pads_short_chunks() -> None:
    traces = []

    def apply_fn(p: Any, x: Any) -> Any:
        traces.append(1)  # runs once per trace, never per evaluation
        return jnp.tanh(x @ p)

    eager = build((apply_fn, data((3, 2))), data((4, 3), 1))
    assert len(traces) == 1  # value_and_grad, traced once at build time: loss and gradient
    for _ in range(3):  # evaluated from the traced program: the Python never runs again
        eager.loss(eager.theta0)
        eager.gradient(eager.theta0)
    problem = eager.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
    assert len(traces) == 1  # the batched loss is compiled from the traced program too
    rng = np.random.default_rng(0)
    for k in (1, 5, problem.max_batch, problem.max_batch + 3):
        thetas = problem.theta0 + 0.1 * rng.normal(size=(k, problem.size))
        values = problem.loss_batch(thetas)  # type: ignore[misc]
        assert values.shape == (k,)
        np.testing.assert_allclose(values, [problem.loss(t) for t in thetas], rtol=1e-14)
    problem.gradient(problem.theta0)
    assert len(traces) == 1


@jax.custom_vjp
def _dense_vjp(h: Any, w: Any) -> Any:
    return h @ w.T


_dense_vjp.defvjp(lambda h, w: (h @ w.T, (h, w)), lambda res, g: (g @ res[1], g.T @ res[0]))


def _transposing(p: Any, x: Any) -> Any:
    """Transposes of every kind the op-by-op evaluator folds, composes or must keep."""
    h = jnp.tanh(x @ p["w0"].T + p["b"])  # folded into the dot
    h = _dense_vjp(h, p["w1"])  # folded inside a custom_vjp layer
    h = jax.nn.relu(h) + jnp.sin(p["w1"].T)[0]  # custom_jvp; a transpose read by sin
    t = jnp.transpose(p["t"], (0, 2, 1))
    same = jnp.transpose(t, (0, 2, 1))  # a transpose of a transpose: the identity
    batched = jnp.einsum("bij,bjk->bik", t, p["t"])  # batch dimensions
    moved = jnp.einsum("ijk,kl->jil", jnp.transpose(p["t"], (1, 0, 2)), p["u"])  # free dims move
    return (
        jnp.sum(h**2)
        + jnp.sum(same * p["t"])
        + jnp.sum(jnp.tanh(batched))
        + jnp.sum(jnp.cos(moved))
        + jnp.sum(p["w0"].T.T * p["w0"])
    )


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_op_by_op_evaluation_equals_jax_and_folds_transposes(
    what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # oracle: jax's own evaluation of the same traced program (jaxpr_as_fun)
    from jax.extend.core import jaxpr_as_fun

    shapes = {"w0": (5, 4), "b": (5,), "w1": (5, 5), "t": (2, 3, 3), "u": (3, 2)}
    params = {k: jnp.asarray(data(s, i)) for i, (k, s) in enumerate(shapes.items())}
    x = jnp.asarray(data((6, 4), 9))
    fn = (
        (lambda p: _transposing(p, x)) if what == "loss" else jax.grad(lambda p: _transposing(p, x))
    )
    with adapter._x64():
        closed = jax.jit(fn).trace(params).jaxpr
        leaves = jax.tree_util.tree_leaves(params)
        expected = jaxpr_as_fun(closed)(*leaves)
        forced: list[tuple[int, ...]] = []
        force = eager._Transposed.force

        def counted(pending: Any) -> Any:
            forced.append(pending.perm)
            return force(pending)

        monkeypatch.setattr(eager._Transposed, "force", counted)
        got = eager._OpByOp(closed)(*leaves)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)
    transposes = sum(eqn.primitive.name == "transpose" for eqn in eager._walk(closed.jaxpr))
    assert transposes >= 6
    assert 1 <= len(forced) < transposes  # sin's operand and the einsum whose free dims move


def test_a_problem_evaluates_op_by_op_and_its_check_agrees_with_full_mode() -> None:
    shapes = {"w0": (5, 4), "b": (5,), "w1": (5, 5), "t": (2, 3, 3), "u": (3, 2)}
    params = {k: jnp.asarray(data(s, i)) for i, (k, s) in enumerate(shapes.items())}
    x = data((6, 4), 9)
    for mode in ("fast", "full"):
        report = check_gradients((_transposing, params), x, mode=mode, wrt="params")
        assert report.passed, str(report)
    problem = build((_transposing, params), x, wrt="params")
    assert problem.batching == "eager"


def test_max_batch_follows_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter, "MEMORY_BUDGET", 10 * 8 * (100 * 100 + 100))
    problem = build((lambda p, x: jnp.tanh(p @ x), data((100, 100))), data((100,), 1), wrt="params")
    compiled = problem.prepare(adapter.COMPILE_FROM)  # type: ignore[misc]
    assert 1 <= compiled.max_batch <= 8


# ------------------------------------------------------------------------ losses
@pytest.mark.parametrize("name", [*LOSS_NAMES, "cross_entropy_labels", "binary_crossentropy"])
def test_named_losses_equal_the_numpy_definitions(name: str) -> None:
    rng = np.random.default_rng(0)
    out = rng.uniform(0.05, 0.95, size=(6, 4))
    y: Any = rng.uniform(0.0, 1.0, size=(6, 4))
    if name == "cross_entropy_labels":
        name, y = "cross_entropy", rng.integers(0, 4, size=6)
    if name in ("cross_entropy", "categorical_crossentropy") and y.ndim == 2:
        y = y / y.sum(axis=1, keepdims=True)
    with jax.enable_x64(True):
        value = float(adapter.jax_loss(name)(jnp.asarray(out), y))
    assert value == pytest.approx(numpy_loss(name)[0](out, y), rel=1e-13)


def test_projection_uses_the_shared_directions_for_every_float_output() -> None:
    def apply_fn(p: Any, x: Any) -> Any:
        return {"a": p * x, "b": (jnp.arange(3), jnp.sin(p))}

    p, x = data((3,)), data((3,), 1)
    problem = build((apply_fn, p), x, seed=5)
    expected = np.sum(p * x * output_projection((3,), 5, 0)) + np.sum(
        np.sin(p) * output_projection((3,), 5, 1)
    )
    assert problem.loss(problem.theta0) == pytest.approx(expected, rel=1e-14)


def test_callable_loss_gets_out_and_y() -> None:
    def my_loss(out: Any, y: Any) -> Any:
        return jnp.sum(jnp.abs(out - y) ** 3)

    report = check_gradients(
        (lambda p, x: jnp.tanh(x @ p), data((3, 2))), data((4, 3)), data((4, 2)), loss=my_loss
    )
    assert report.passed, str(report)


# ------------------------------------------------------------------- errors, dispatch
def test_errors_name_what_was_expected_and_what_came() -> None:
    model = (lambda p, x: x @ p, data((3, 2)))
    x = data((4, 3))
    with pytest.raises(
        InvalidOptionError, match="wrt must be one of 'all', 'params', 'inputs' when an adapter"
    ):
        build(model, x, wrt="weights")
    with pytest.raises(InvalidOptionError, match="loss must be a callable or one of"):
        build(model, x, np.zeros((4, 2)), loss="hinge")
    with pytest.raises(InvalidOptionError, match="loss 'mse' needs a target y; got y=None"):
        build(model, x, loss="mse")
    with pytest.raises(
        ShapeMismatchError, match=r"needs y of the output's shape \(4, 2\); got \(4, 3\)"
    ):
        build(model, x, np.zeros((4, 3)))
    with pytest.raises(ModelError, match=r"must return a real scalar; got shape \(4, 2\)"):
        build(model, x, np.zeros((4, 2)), loss=lambda out, y: out - y)
    with pytest.raises(NothingToCheckError, match="nothing to check with wrt='inputs'"):
        build(model, np.arange(3), wrt="inputs")
    with pytest.raises(ModelError, match="needs the model to return one array; got tuple"):
        build((lambda p, x: (x @ p, x), data((3, 2))), x, np.zeros((4, 2)))


def test_a_model_jax_cannot_trace_or_differentiate_gets_a_model_error() -> None:
    def shapes_wrong(p: Any, x: Any) -> Any:
        return x @ p.T  # (4, 3) @ (2, 3)

    with pytest.raises(ModelError, match="the model's forward raised while JAX traced it: TypeError"):
        build((shapes_wrong, data((3, 2))), data((4, 3)))

    def dynamic_loop(p: Any, x: Any) -> Any:  # reverse mode cannot go through a while_loop
        return jax.lax.while_loop(
            lambda s: s[0] < 3, lambda s: (s[0] + 1, jnp.tanh(s[1])), (0, x @ p)
        )[1]

    with pytest.raises(
        ModelError,
        match=r"JAX cannot differentiate the model: its backward raised while JAX traced the "
        r"gradient \(the forward traces fine\): ValueError: Reverse",
    ):
        check_gradients((dynamic_loop, data((3, 2))), data((4, 3)))


def test_matches_and_dispatch() -> None:
    assert adapter.matches((lambda p, x: x, {"w": np.ones(2)}))
    assert adapter.matches((lambda p, x: x, {}))
    assert not adapter.matches(lambda x: x)
    assert not adapter.matches((np.ones(2), np.ones(2)))
    assert not adapter.matches(MLP([2, 2]))
    assert not adapter.matches((lambda p, x: x, {}, {"dropout": 0}))  # a triple: only Linen
    assert select_adapter((lambda p, x: x, {"w": jnp.ones(2)})) is adapter
    assert select_adapter(MLP([2, 2])) is not adapter
    assert select_adapter(jax.nn.softplus, jnp.ones(2)) is adapter  # by its inputs
