"""The core checker on plain functions (check_flat) and on hand-written NumPy layers.

Oracles: closed-form derivatives of the test functions, and layers whose backward
is known to be correct (or carries a known planted bug).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from layers import Linear, LinearReLU, MaxPool1d, ReLU

import gradcheck
from gradcheck import Block, GradientCheckError, check_flat, check_gradients
from gradcheck.errors import (
    InvalidOptionError,
    ModelError,
    NonFiniteError,
    NothingToCheckError,
    ShapeMismatchError,
    UnsupportedModelError,
)


def cubic(t):
    return float(np.sum(t**3))


def test_correct_gradient_passes_and_wrong_one_fails():
    t0 = np.linspace(-2, 2, 7)
    assert check_flat(cubic, lambda t: 3 * t**2, t0).passed
    report = check_flat(cubic, lambda t: 3 * t**2 + (t == t0[2]) * 1e-3, t0)
    assert not report.passed
    (block,) = report.failed_blocks
    assert block.mismatches == 1 and block.worst[0].index == (2,)


def test_numeric_gradient_is_accurate_on_smooth_functions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))

    def f(t):
        return float(np.sum(np.tanh(a @ t)) + np.exp(t).sum())

    def g(t):
        return a.T @ (1 - np.tanh(a @ t) ** 2) + np.exp(t)

    t0 = rng.normal(size=5)
    report = check_flat(f, g, t0)
    assert report.passed
    assert np.max(np.abs(report.numeric - g(t0))) <= 1e-9 * np.max(np.abs(g(t0)))
    # about two evaluations per entry when nothing is suspicious (+ f0 twice + the gradient,
    # twice: full mode checks that the backward is deterministic)
    assert report.evaluations == 2 * t0.size + 4


def test_tiny_gradients_are_judged_on_their_own_scale():
    # block `small` has gradients ~1e-7 next to a block with gradients ~1e3; a 2x bug there is
    # caught (the loss itself stays ~10, so its round-off does not drown the small block)
    def f(t):
        return float(1e3 * np.sum(np.sin(t[:3])) + 1e-7 * np.sum(np.sin(t[3:])))

    def g(t, bug=1.0):
        return np.concatenate([1e3 * np.cos(t[:3]), bug * 1e-7 * np.cos(t[3:])])

    blocks = [Block("big", (3,), 0), Block("small", (4,), 3)]
    t0 = np.array([0.005, -0.01, 0.002, 0.1, 0.2, 0.3, 0.4])
    assert check_flat(f, g, t0, blocks=blocks).passed
    report = check_flat(f, lambda t: g(t, bug=2.0), t0, blocks=blocks)
    assert [b.name for b in report.failed_blocks] == ["small"]
    assert "analytic / numeric = 2" in (report.block("small").diagnosis or "")


def test_large_losses_and_parameters_are_checked_relative_to_their_scale():
    scale = 1e6

    def f(t):
        return float(scale * np.sum(np.cos(t / 1e3)))

    def g(t):
        return -scale / 1e3 * np.sin(t / 1e3)

    t0 = np.array([1e3, -2.5e3, 700.0])
    assert check_flat(f, g, t0).passed
    assert not check_flat(f, lambda t: 1.001 * g(t), t0).passed


@pytest.mark.parametrize(
    ("fn", "grad", "t0"),
    [
        (lambda t: float(np.sum(np.abs(t))), np.sign, np.array([0.0, 1.0, -2.0])),
        (
            lambda t: float(np.sum(np.maximum(t, 0))),
            lambda t: (t > 0) * 1.0,
            np.array([0.0, 1e-12, -1e-12, 1e-9, -1e-9]),
        ),
        (
            lambda t: float(np.max(t)),
            lambda t: (np.arange(t.size) == np.argmax(t)) * 1.0,
            np.array([1.0, 3.0, 3.0, 3.0]),
        ),
    ],
    ids=["abs-at-0", "relu-near-0", "max-ties"],
)
def test_kinks_are_not_gradient_bugs(fn, grad, t0):
    report = check_flat(fn, grad, t0)
    assert report.passed, str(report)


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_steps_shrink_to_stay_inside_the_domain(mode):
    # sqrt and log of entries far smaller than the default step: a step of 2e-5 would leave
    # the domain; the checker probes closer instead of giving up on the entries
    t0 = np.array([1e-7, 3e-7, 2e-6, 1.0])

    def f(t):
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN outside the domain
            return float(np.sum(np.sqrt(t)) + np.sum(np.log(t)))

    def g(t):
        return 0.5 / np.sqrt(t) + 1.0 / t

    assert check_flat(f, g, t0, mode=mode).passed
    report = check_flat(f, lambda t: g(t) * np.array([1.0, 1.001, 1.0, 1.0]), t0, mode=mode)
    assert not report.passed
    assert report.blocks[0].worst[0].index == (1,)


def test_kink_outside_the_one_sided_derivatives_is_judged_by_the_backward_beside_it():
    # |t| at 0 has one-sided derivatives -1 and 1. The value at the kink itself is a
    # convention the numerics cannot refute (coincident kinks make values outside [-1, 1]
    # legitimate), so 5 there passes while the backward just off the kink is right
    # (+-1), and fails when the backward is wrong beside the kink too (+-2).
    def loss(t):
        return float(np.sum(np.abs(t)))

    def right_beside(t):
        return np.sign(t) + 5 * (t == 0)

    def wrong_beside(t):
        return np.where(np.abs(t) < 1e-3, 2 * np.sign(t) + 5 * (t == 0), np.sign(t))

    t0 = np.array([0.0, 1.0])
    assert check_flat(loss, right_beside, t0).passed
    report = check_flat(loss, wrong_beside, t0)
    assert not report.passed
    assert report.blocks[0].worst[0].index == (0,)
    assert report.blocks[0].worst[0].kink


def test_relu_layer_with_preactivations_on_and_near_the_kink_passes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4))
    W = rng.normal(size=(4, 5))
    b = -(x[0] @ W)  # sample 0 has every pre-activation exactly on the kink
    b[1] += 1e-10
    b[2] -= 1e-9
    layer = LinearReLU(W, b)
    assert np.abs(layer.forward(x)[0]).max() <= 1e-9
    report = check_gradients(layer, x, None)
    assert report.passed, str(report)
    assert sum(b.kinks for b in report.blocks) > 0


def test_relu_input_gradient_on_the_kink_passes():
    x = np.array([[0.0, 1e-9, -1e-9, 0.5], [-0.3, 0.0, 2.0, 0.0]])
    assert check_gradients(ReLU(), x, None).passed


def test_maxpool_with_ties_passes_and_a_wrong_route_fails():
    x = np.array([[1.0, 1.0, 0.5, 2.0, 2.0, 2.0], [0.0, -1.0, 3.0, 3.0, 1.0, 1.0]])
    pool = MaxPool1d(2)
    assert check_gradients(pool, x, None).passed

    class WrongPool(MaxPool1d):
        def backward(self, dout):
            return np.roll(super().backward(dout), 1, axis=1)

    assert not check_gradients(WrongPool(2), x, None).passed


def test_transposed_weight_gradient_is_diagnosed():
    rng = np.random.default_rng(0)
    layer = Linear(4, 4, bug="transpose")
    report = check_gradients(layer, rng.normal(size=(3, 4)), None)
    assert (
        report.block("W").diagnosis == "the analytic gradient is the transpose of the numeric one"
    )


def test_report_text_json_and_exception():
    report = check_flat(cubic, lambda t: 2 * t**2, np.array([1.0, 2.0]))
    text = str(report)
    assert text.startswith("gradients disagree in the only block")
    assert "`theta`  shape (2,)" in text and "mismatched: 2 / 2 entries" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["blocks"][0]["mismatches"] == 2
    with pytest.raises(GradientCheckError) as info:
        report.raise_if_failed()
    assert info.value.report is report
    assert isinstance(info.value, AssertionError)
    good = check_flat(cubic, lambda t: 3 * t**2, np.array([1.0, 2.0]))
    assert good.raise_if_failed() is good


def test_same_seed_same_report():
    layer = Linear(3, 2)
    x = np.random.default_rng(0).normal(size=(4, 3))
    one = check_gradients(layer, x, None, seed=5).to_dict()
    two = check_gradients(layer, x, None, seed=5).to_dict()
    one.pop("elapsed"), two.pop("elapsed")
    assert one == two


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rtol": -1.0}, "rtol must be a finite number >= 0; got -1.0"),
        ({"atol": float("nan")}, "atol must be a finite number >= 0; got nan"),
        ({"mode": "fastest"}, "mode must be one of 'auto', 'full', 'fast'; got 'fastest'"),
        ({"wrt": "weights"}, "wrt 'weights' matches no block; the blocks are 'W', 'b', 'input'"),
        ({"wrt": 7}, "wrt must be 'all', 'params', 'inputs', a block name or pattern, or a list of these; got 7"),
        ({"seed": 1.5}, "seed must be an int; got 1.5"),
        ({"max_evals": 0}, "max_evals must be a positive int or None; got 0"),
    ],
)
def test_bad_options_are_rejected_with_one_line(options, message):
    with pytest.raises(InvalidOptionError) as info:
        check_gradients(Linear(2, 2), np.ones((1, 2)), None, **options)
    assert str(info.value) == message


def test_non_finite_gradient_names_the_block():
    layer = Linear(2, 2)

    class Broken(Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["b"] = self.grads["b"] * np.nan
            return dx

    for mode in ("full", "fast"):
        report = check_gradients(Broken(2, 2), np.ones((1, 2)), None, mode=mode)
        assert not report.passed
        assert [b.name for b in report.failed_blocks] == ["b"]
        bad = report.block("b")
        assert bad.mismatches == 2 and all(np.isnan(e.analytic) for e in bad.worst)
        assert "NaN at 2 of 2 entries" in bad.diagnosis
        # the other blocks are still checked, and pass
        assert report.block("W").passed and report.block("input").passed
    with pytest.raises(NonFiniteError, match="the loss is not finite"):
        check_flat(lambda t: float("inf"), lambda t: t, np.ones(2))
    assert check_gradients(layer, np.ones((1, 2)), None).passed


def test_gradient_key_and_shape_mismatches():
    class MissingKey(Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            del self.grads["b"]
            return dx

    class WrongShape(Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["W"] = self.grads["W"].ravel()
            return dx

    with pytest.raises(ShapeMismatchError, match=r"model.grads has no entry 'b' after backward"):
        check_gradients(MissingKey(2, 3), np.ones((1, 2)), None)
    with pytest.raises(
        ShapeMismatchError, match=r"model.grads\['W'\] has shape \(6,\); expected \(2, 3\)"
    ):
        check_gradients(WrongShape(2, 3), np.ones((1, 2)), None)


def test_target_shape_must_fit_the_loss():
    with pytest.raises(
        ShapeMismatchError, match=r"loss 'mse' needs y of the output's shape \(1, 3\); got \(1, 4\)"
    ):
        check_gradients(Linear(2, 3), np.ones((1, 2)), np.ones((1, 4)), loss="mse")
    with pytest.raises(InvalidOptionError, match="loss must be a callable or one of"):
        check_gradients(Linear(2, 3), np.ones((1, 2)), np.ones((1, 3)), loss="hinge")


def test_nothing_to_check_and_unsupported_models():
    with pytest.raises(NothingToCheckError, match="nothing to check with wrt='params'"):
        check_gradients(ReLU(), np.ones((2, 2)), None, wrt="params")
    with pytest.raises(
        UnsupportedModelError, match=r"cannot check a model of type builtins\.str; expected"
    ):
        check_gradients("not a model", np.ones(2))


def test_the_users_model_is_untouched_also_when_it_raises():
    layer = Linear(3, 2, seed=1)
    before = {k: v.copy() for k, v in layer.params.items()}
    ids = {k: id(v) for k, v in layer.params.items()}
    state = np.random.get_state()[1].copy()
    check_gradients(layer, np.ones((2, 3)), None)
    for k, v in layer.params.items():
        assert id(v) == ids[k] and np.array_equal(v, before[k])

    class Explodes(Linear):
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            if type(self).calls > 5:
                raise RuntimeError("boom")
            np.random.random()  # draws from the global generator, which is restored
            return super().forward(x)

    model = Explodes(3, 2, seed=1)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(ModelError, match="the model's forward raised RuntimeError: boom") as info:
        check_gradients(model, np.ones((2, 3)), None)
    assert isinstance(info.value.__cause__, RuntimeError)  # the user's traceback is kept
    for k, v in model.params.items():
        assert np.array_equal(v, before[k])
    assert np.array_equal(np.random.get_state()[1], state)


def test_non_deterministic_forward_is_reported_not_blamed_on_the_gradient():
    source = iter(range(10**6))  # outside the model: no copy of the model resets it

    class Noisy(Linear):
        def forward(self, x):
            return super().forward(x) + 1e-3 * next(source)

    report = check_gradients(Noisy(2, 2), np.ones((1, 2)), None)
    assert not report.passed
    assert report.problem is not None and "not deterministic" in report.problem
    assert "inconclusive" in str(report)


def test_a_forward_that_keeps_state_between_calls_is_named_by_the_rule_it_breaks():
    class Counting(Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.source = iter(range(10**6))  # state of the model, carried between calls

        def forward(self, x):
            return super().forward(x) + 1e-3 * next(self.source)

    with pytest.raises(ModelError, match="rule: the forward keeps no state between calls"):
        check_gradients(Counting(), np.ones((1, 2)), None)


def test_evaluation_budget_fails_the_check_and_says_so():
    report = check_flat(cubic, lambda t: 3 * t**2, np.arange(50.0), max_evals=20)
    assert not report.passed
    assert "max_evals=20" in (report.problem or "")


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("budget", [1, 2])
def test_a_budget_spent_before_the_first_difference_is_reported_not_raised(mode, budget):
    # the gradient costs one evaluation, the starting point two: a budget that ends there
    # still gives a report that fails and says why
    grad = lambda t: 3 * t**2 * (1.0 if mode == "full" else 1.1)  # noqa: E731
    report = check_flat(cubic, grad, np.arange(5.0), mode=mode, max_evals=budget)
    assert not report.passed
    assert f"max_evals={budget}" in (report.problem or "")
    assert all(b.checked == 0 for b in report.blocks)


def test_float32_parameters_are_checked_on_a_float64_copy():
    layer = Linear(3, 2)
    layer.params = {k: v.astype(np.float32) for k, v in layer.params.items()}
    report = check_gradients(layer, np.ones((2, 3), dtype=np.float32), None)
    assert report.passed and report.precision == "float64"
    assert any("float64 copy" in w for w in report.warnings)
    assert layer.params["W"].dtype == np.float32


def test_public_names():
    assert sorted(gradcheck.__all__) == sorted(
        [
            "TOLERANCES",
            "Block",
            "BlockResult",
            "Entry",
            "FlatProblem",
            "GradcheckInputError",
            "GradientCheckError",
            "Report",
            "Tolerance",
            "__version__",
            "assert_gradients",
            "check_flat",
            "check_gradients",
            "check_kernel",
            "errors",
        ]
    )
    for name in gradcheck.__all__:
        assert getattr(gradcheck, name) is not None


def test_import_loads_neither_torch_nor_jax():
    code = "import sys, gradcheck, gradcheck.reference; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_adapters_are_a_subpackage_not_a_top_level_package():
    import gradcheck.adapters.numpy as numpy_adapter

    assert numpy_adapter.__name__ == "gradcheck.adapters.numpy"
    code = "import importlib.util; print(importlib.util.find_spec('adapters'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    assert out.stdout.strip() == "None"


class TwoInputs:
    """out = a * W + b @ V: a layer with a tuple input (and an integer input passed through)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.params = {"W": rng.normal(size=(3,)), "V": rng.normal(size=(2, 3))}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x):
        a, b, idx = x
        self.a, self.b = a, b
        return (a * self.params["W"] + b @ self.params["V"])[idx]

    def backward(self, dout):
        full = np.zeros((self.a.shape[0], 3))
        np.add.at(full, np.array([0, 1, 1]), dout)
        self.grads = {"W": (full * self.a).sum(0), "V": self.b.T @ full}
        return (full * self.params["W"], full @ self.params["V"].T, None)


def test_tuple_inputs_are_blocks_and_integer_inputs_pass_through():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), np.array([0, 1, 1]))
    report = check_gradients(TwoInputs(), x, None)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["W", "V", "input[0]", "input[1]"]


@pytest.mark.parametrize("seed", range(4))
def test_zero_initialised_relu_layer_passes_and_its_bugs_fail(seed):
    # every hidden unit sits on its kink: one coordinate moves several units across 0 at
    # once, so relu'(0) = 0 need not lie between the one-sided derivatives of the sum; the
    # checker verifies the backward just off the kink instead (oracle: the reference MLP)
    from gradcheck.reference import MLP

    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    mlp = MLP([3, 6, 2], activation="relu", seed=seed)
    mlp.params["W0"][:] = 0.0
    mlp.params["b0"][:] = 0.0
    report = check_gradients(mlp, x, y, loss="mse")
    assert report.passed, str(report)
    assert report.block("W0").kinks > 0
    for bug in ("sign_flip", "factor_2", "missing_bias"):
        assert not check_gradients(mlp.with_bug(bug), x, y, loss="mse").passed, bug


def test_relu_mlp_with_a_zero_input_row_passes():
    from gradcheck.reference import MLP

    mlp = MLP([3, 4, 2], activation="relu", seed=0)
    mlp.params["b0"][:] = 0.0
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    x[2] = 0.0
    assert check_gradients(mlp, x, y, loss="mse").passed


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("batched", [False, True])
def test_points_differ_from_theta0_only_where_perturbed_and_are_read_only(mode, batched):
    # the evaluator reuses its buffers between calls and puts back what it perturbs:
    # each point in full mode differs from theta0 in one entry, and no point is writable
    rng = np.random.default_rng(4)
    t0 = rng.normal(size=12)
    seen: list[np.ndarray] = []

    def f(t):
        assert not t.flags.writeable
        seen.append(np.array(t))
        return float(np.sum(np.sin(t)))

    def f_batch(ts):
        assert not ts.flags.writeable
        return np.array([f(t) for t in ts])

    report = check_flat(f, np.cos, t0, mode=mode, loss_batch=f_batch if batched else None, seed=2)
    assert report.passed
    changed = [int(np.sum(p != t0)) for p in seen]
    if mode == "full":
        assert changed.count(0) == 2  # theta0 itself, twice (the determinism check)
        assert set(changed) == {0, 1}
        assert sorted(np.flatnonzero(p != t0)[0] for p in seen if np.any(p != t0)) == sorted(
            list(range(12)) * 2
        )
    else:  # one direction across the whole vector, which agrees: theta0 is never needed
        assert changed == [12, 12]


def test_a_loss_that_writes_into_its_argument_gets_a_clear_error():
    def f(t):
        t[0] = 0.0
        return float(np.sum(t**2))

    with pytest.raises(ValueError, match="read-only"):
        check_flat(f, lambda t: 2 * t, np.ones(3))


@pytest.mark.parametrize("mode, expected", [("full", 2 * 30 + 2), ("fast", 2)])
def test_prepare_is_asked_once_before_any_evaluation_and_its_problem_is_checked(mode, expected):
    # an adapter with a one-off cost (JAX compiles) hands over a prepared problem; the core
    # evaluates only that one, and tells the adapter how many evaluations a pass costs
    from gradcheck._check import run_check
    from gradcheck._options import CheckOptions
    from gradcheck._problem import FlatProblem, block_layout

    t0 = np.linspace(-1.0, 1.0, 30)
    asked: list[int] = []

    def unprepared(_: np.ndarray) -> float:
        raise AssertionError("the unprepared problem was evaluated")

    prepared = FlatProblem(
        theta0=t0,
        loss=cubic,
        gradient=lambda t: 3 * t**2,
        blocks=block_layout([("w", (30,), "param")]),
        batching="compiled",
    )

    def prepare(evaluations: int) -> FlatProblem:
        asked.append(evaluations)
        return prepared

    problem = FlatProblem(
        theta0=t0,
        loss=unprepared,
        gradient=unprepared,  # type: ignore[arg-type]
        blocks=prepared.blocks,
        prepare=prepare,
    )
    report = run_check(problem, CheckOptions(mode=mode))
    assert report.passed and report.batching == "compiled", str(report)
    assert asked == [expected]
    if mode == "full":
        # the gradient is counted as one, twice in full mode (is the backward deterministic?)
        assert report.evaluations == expected + (2 if mode == "full" else 1)


# ------------------------------------------------------------------ memory
def test_large_scratch_arrays_start_on_a_huge_page_boundary():
    from gradcheck import _memory

    big = _memory.empty((3, 400_000))
    assert big.shape == (3, 400_000) and big.dtype == np.float64
    assert big.flags.c_contiguous and big.flags.writeable
    assert big.ctypes.data % _memory.HUGE_PAGE == 0
    big[...] = 1.5  # the whole view is usable memory
    assert float(big.sum()) == 1.5 * big.size
    small = _memory.empty(10, np.intp)
    assert small.shape == (10,) and small.dtype == np.intp
    t = np.arange(300_000.0)
    copied = _memory.copy(t)
    assert np.array_equal(copied, t) and not np.shares_memory(copied, t)


def test_a_frozen_theta0_is_kept_and_anything_writable_is_copied():
    from gradcheck import _memory
    from gradcheck._problem import FlatProblem, block_layout

    def problem(theta):
        return FlatProblem(
            theta0=theta,
            loss=cubic,
            gradient=lambda t: 3 * t**2,
            blocks=block_layout([("w", (theta.size,), "param")]),
        )

    frozen = _memory.freeze(_memory.copy(np.linspace(0.0, 1.0, 300_000)))
    assert problem(frozen).theta0 is frozen  # an adapter's fresh vector: no O(P) copy
    writable = np.linspace(0.0, 1.0, 50)
    base = np.linspace(0.0, 1.0, 50)
    through_base = base[:]
    through_base.setflags(write=False)  # read-only, but its base is not
    for theta, owner in ((writable, writable), (through_base, base)):
        kept = problem(theta).theta0
        assert kept is not theta and not kept.flags.writeable
        owner[0] = 7.0
        assert kept[0] == 0.0  # the user's later writes do not reach the problem


def test_no_module_of_the_core_imports_in_a_cycle():
    """Module- and function-level imports between gradcheck's modules form no cycle (imports
    under ``if TYPE_CHECKING:`` are for annotations only and do not count)."""
    import ast
    import pathlib

    import gradcheck

    root = pathlib.Path(gradcheck.__file__).parent
    modules = {p.stem: p for p in root.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
                targets = [node.module] if node.module else [a.name for a in node.names]
                found.update(t.split(".")[0] for t in targets)
        edges[name] = found & set(modules)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cyclic = sorted(m for m in edges if reaches(m, m, {m}))
    assert cyclic == []


def test_the_specific_errors_live_in_gradcheck_errors():
    """The input errors are in `gradcheck.errors`; the top level keeps the two bases, and
    the old top-level names still work, with a DeprecationWarning naming the new place."""
    import gradcheck
    from gradcheck import errors

    assert {"GradientCheckError", "GradcheckInputError", "errors"} <= set(gradcheck.__all__)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, (errors.GradcheckInputError, errors.GradientCheckError))
        if name in ("GradientCheckError", "GradcheckInputError"):
            assert getattr(gradcheck, name) is cls
            continue
        assert name not in gradcheck.__all__
        with pytest.warns(DeprecationWarning, match=f"moved to gradcheck.errors.{name}"):
            assert getattr(gradcheck, name) is cls
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gradcheck.Nope  # noqa: B018


def _refined(**values):
    from gradcheck._numerics import Refined

    n = len(values["numeric"])
    base = {name: np.zeros(n) for name in Refined.__dataclass_fields__}
    base.update(kink=np.zeros(n, bool), flat=np.zeros(n, bool), step=np.full(n, 1e-3))
    base.update({k: np.asarray(v) for k, v in values.items()})
    return Refined(**base)


def test_the_verdict_rules_are_elementwise_and_a_direction_is_a_case_of_length_one():
    """`gradcheck._verdict.decide` on several cases at once equals it on each case alone
    (fast mode judges a direction as an array of length one), and each rule does what its
    formula says (oracle: the formulas in the module's docstring, computed by hand here)."""
    from gradcheck._options import TOLERANCES
    from gradcheck._verdict import decide

    tol = TOLERANCES["float64"]
    a = np.array([1.0, 1.0, 0.5, 2.0, 1e-20])
    r = _refined(
        numeric=[1.0 + 5e-7, 1.01, 0.0, 0.0, 0.0],
        error=[1e-9, 1e-9, 1e-9, 1e-9, 0.0],
        kink=[False, False, True, True, False],
        lo=[0, 0, 0.0, 0.0, 0],
        hi=[0, 0, 1.0, 1.0, 0],
        flat=[False, False, False, False, True],
    )
    h = np.full(5, 2e-5)
    d = decide(a, r, 0.0, tol.rtol, tol, 3.0, h)
    # agreement within rtol; a 1% error; inside the kink interval; outside it; a flat loss
    assert d.ok.tolist() == [True, False, True, False, False]
    assert d.beside.tolist() == [False, False, False, True, False]
    assert d.tiny.tolist() == [False, False, False, False, True]
    assert d.allowed[1] == pytest.approx(tol.rtol * 1.01 + tol.safety * 1e-9)
    for i in range(a.size):
        one = decide(a[i : i + 1], _refined(**{k: getattr(r, k)[i : i + 1] for k in (
            "numeric", "error", "kink", "lo", "hi", "flat")}), 0.0, tol.rtol, tol, 3.0, h[i : i + 1])
        for field in ("ok", "allowed", "kink", "beside", "tiny"):
            assert getattr(one, field)[0] == getattr(d, field)[i], (i, field)


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_wrt_names_blocks_and_patterns(mode):
    """``wrt`` by block name or pattern (oracle: the reference MLP with one wrong entry in
    ``W0``): the bug fails the check when ``W0`` is selected, and is left out, and named as
    not checked, when it is not; the blocks kept are checked at the same values."""
    from gradcheck.reference import MLP

    mlp = MLP([3, 4, 2], bug="one_entry", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    for wrt in ("W0", "W*", ["b1", "W0"], ("params",)):
        report = check_gradients(mlp, x, y, wrt=wrt, mode=mode)
        assert not report.passed and [b.name for b in report.failed_blocks] == ["W0"], wrt
    report = check_gradients(mlp, x, y, wrt=["b*", "inputs"], mode=mode)
    assert report.passed
    assert [b.name for b in report.blocks] == ["b0", "b1", "input"]
    assert any("not checked" in w and "`W0`, `W1`" in w for w in report.warnings)
    whole = check_gradients(mlp, x, y, mode="full")
    part = check_gradients(mlp, x, y, wrt="b1", mode="full")
    # b1 comes after W0 (12), b0 (4) and W1 (8) in the whole problem
    np.testing.assert_allclose(part.numeric, whole.numeric[24:26], rtol=1e-9)


def test_wrt_that_names_no_block_lists_the_blocks():
    from gradcheck.reference import MLP

    mlp = MLP([3, 2], seed=0)
    x, y = np.ones((2, 3)), np.zeros((2, 2))
    with pytest.raises(InvalidOptionError, match=r"wrt 'w0' matches no block; the blocks are 'W0', 'b0', 'input'"):
        check_gradients(mlp, x, y, wrt="w0")
    for bad in ("", [], ["W0", 3], 3):
        with pytest.raises(InvalidOptionError, match="wrt must be 'all', 'params', 'inputs', a block name"):
            check_gradients(mlp, x, y, wrt=bad)


def _drifting_gradient(scale):
    """A gradient of sum(t**3) over two blocks whose second block drifts by ``scale``
    (relative) at every call: a backward that is not deterministic."""
    calls = iter(range(10**6))

    def gradient(t):
        g = 3 * t**2
        g[3:] = g[3:] * (1 + scale * next(calls))
        return g

    return gradient


def test_a_backward_that_varies_between_calls_fails_its_block_in_full_mode():
    """Rule 6 (oracle: the drift is planted in block `b` only): full mode calls the backward
    twice at the starting point and fails the block whose gradients differ, naming why."""
    blocks = [Block("a", (3,), 0), Block("b", (3,), 3)]
    report = check_flat(
        lambda t: float(np.sum(t**3)), _drifting_gradient(1e-6), np.arange(1.0, 7.0),
        blocks=blocks, mode="full",
    )
    assert [b.name for b in report.failed_blocks] == ["b"]
    assert "the backward is not deterministic" in (report.blocks[1].diagnosis or "")
    assert report.blocks[0].passed


def test_nondet_tol_allows_the_drift_it_names_and_checks_fast_mode_too():
    blocks = [Block("a", (3,), 0), Block("b", (3,), 3)]
    loss = lambda t: float(np.sum(t**3))  # noqa: E731
    theta = np.arange(1.0, 7.0)
    # fast mode checks determinism only when asked: a drift below rtol goes unseen without it
    quiet = check_flat(loss, _drifting_gradient(1e-9), theta, blocks=blocks, mode="fast")
    assert quiet.passed
    asked = check_flat(
        loss, _drifting_gradient(1e-9), theta, blocks=blocks, mode="fast", nondet_tol=0.0
    )
    assert [b.name for b in asked.failed_blocks] == ["b"]
    allowed = check_flat(
        loss, _drifting_gradient(1e-9), theta, blocks=blocks, mode="full", nondet_tol=1e-6
    )
    assert allowed.passed
    with pytest.raises(InvalidOptionError, match="nondet_tol must be a finite number >= 0"):
        check_flat(loss, _drifting_gradient(0.0), theta, nondet_tol=-1.0)
