"""No confident wrong verdict, no silent pass, nothing of the user's touched (core and NumPy).

Each test names its oracle: an exact derivative written out by hand, or a correct model
known to pass beside the same model with a planted bug known to fail in the block named.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from layers import Linear
from stability import assert_stable

from gradcheck import Block, check_flat, check_gradients
from gradcheck.errors import InvalidOptionError, ModelError, NonFiniteError, NothingToCheckError

MODES = ("full", "fast")


# --------------------------------------------------------------------------- NaN at the steps
def _one_sided_loss(bad: float):
    """sum(t + t**2) for t >= 0, ``bad`` (NaN or ±Inf) for any t < 0: at t = 0 the loss is
    defined on the right only. Exact gradient 1 + 2t (the right derivative at 0)."""

    def loss(t):
        with np.errstate(invalid="ignore"):
            return float(np.sum(np.where(t >= 0, t + t**2, bad)))

    return loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_entry_defined_on_one_side_only_is_measured_from_that_side(mode, bad):
    t0 = np.array([0.0, 0.5, 1.0, 0.0, 2.0])
    loss = _one_sided_loss(bad)
    report = check_flat(loss, lambda t: 1 + 2 * t, t0, mode=mode)
    assert report.passed, str(report)
    assert report.block("theta").unresolved == 0
    # a wrong gradient at exactly those entries is caught, not waved through
    wrong = check_flat(loss, lambda t: np.where(t == 0, 1.5, 1 + 2 * t), t0, mode=mode)
    assert not wrong.passed and wrong.block("theta").mismatches >= 1, str(wrong)
    if mode == "full":
        assert "measured from one side" in (report.block("theta").note or "")
        assert {e.index for e in wrong.block("theta").worst} == {(0,), (3,)}


@pytest.mark.parametrize("mode", MODES)
def test_an_entry_undefined_on_both_sides_is_inconclusive_never_agreeing(mode):
    t0 = np.array([0.3, 0.7])

    def loss(t):  # finite at t0 only: nothing around it can be measured
        return float(np.sum(t**2)) if np.array_equal(t, t0) else float("nan")

    for grad in (lambda t: 2 * t, lambda t: 5 * t):  # right or wrong: neither can be seen
        report = check_flat(loss, grad, t0, mode=mode)
        assert not report.passed
        assert report.block("theta").unresolved > 0 and report.block("theta").mismatches == 0
        assert str(report).startswith("gradient check inconclusive"), str(report)
        assert "gradients agree" not in str(report)


@pytest.mark.parametrize("mode", MODES)
def test_only_the_block_that_cannot_be_measured_is_inconclusive(mode):
    blocks = (Block("a", (3,), 0), Block("b", (2,), 3))
    t0 = np.array([0.2, 0.4, 0.6, 1.0, 2.0])

    def loss(t):
        fine = float(np.sum(np.sin(t[:3])))
        return fine + (float(np.sum(t[3:] ** 2)) if np.array_equal(t[3:], t0[3:]) else np.nan)

    def grad(t):
        return np.concatenate([np.cos(t[:3]), 2 * t[3:]])

    report = check_flat(loss, grad, t0, blocks=blocks, mode=mode)
    assert not report.passed
    assert report.block("a").passed, str(report)
    assert report.block("b").inconclusive and report.block("b").mismatches == 0


# --------------------------------------------------------------------------- tiny gradients
def _vanishing(scale: float, bug: float = 1.0):
    """1 + sum(sin(a)) + scale * sum(sin(3 b)): block ``b``'s gradient is ``scale`` times
    smaller than the loss (an early layer of a deep net). Exact gradient, ``bug`` times
    too large in ``b``."""
    blocks = (Block("a", (4,), 0), Block("b", (6,), 4))

    def loss(t):
        return 1.0 + float(np.sum(np.sin(t[:4]))) + scale * float(np.sum(np.sin(3 * t[4:])))

    def grad(t):
        return np.concatenate([np.cos(t[:4]), bug * 3 * scale * np.cos(3 * t[4:])])

    t0 = np.linspace(-1.0, 1.0, 10)
    return loss, grad, t0, blocks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e-9, 1e-10, 1e-11])
@pytest.mark.parametrize("bug", [2.0, 0.5, -1.0])
def test_a_wrong_tiny_gradient_is_not_waved_through(mode, scale, bug):
    loss, grad, t0, blocks = _vanishing(scale, bug)
    report = check_flat(loss, grad, t0, blocks=blocks, mode=mode)
    assert not report.passed, str(report)
    assert report.block("a").passed
    assert not report.block("b").passed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e-9, 1e-10, 1e-11])
def test_a_right_tiny_gradient_passes(mode, scale):
    loss, grad, t0, blocks = _vanishing(scale)
    report = check_flat(loss, grad, t0, blocks=blocks, mode=mode)
    assert report.passed, str(report)


def test_a_passing_block_reports_its_true_largest_differences():
    loss, grad, t0, blocks = _vanishing(1.0)
    report = check_flat(loss, grad, t0, blocks=blocks, mode="full")
    assert report.passed
    a = report.block("a")
    numeric = report.numeric[:4]
    expected = np.max(np.abs(np.cos(t0[:4]) - numeric))
    assert a.max_abs_diff == pytest.approx(expected, rel=1e-12)
    assert 0.0 < a.max_abs_diff < 1e-8 and 0.0 < a.max_rel_diff < 1e-6


# --------------------------------------------------------------------------- diagnoses
def test_a_small_spread_relative_error_is_named_as_approximate_by_design():
    # an iterative solver's backward: every entry off by a different small relative error
    t0 = np.linspace(0.1, 1.0, 12)
    off = 1e-5 * (1.0 + 4.0 * np.linspace(0.0, 1.0, 12))
    report = check_flat(lambda t: float(np.sum(t**3)), lambda t: 3 * t**2 * (1 + off), t0)
    (block,) = report.failed_blocks
    assert "approximate by design" in block.diagnosis and "rtol" in block.diagnosis


@pytest.mark.parametrize("factor", [1 + 3e-5, 1 + 3.3e-4, 3000 / 2999, 1 - 2e-4])
def test_a_constant_factor_close_to_1_is_named_as_a_factor_not_as_approximation(factor):
    # N - 1 where N belongs (N = 3000) is a bug, however small: the ratio is the same everywhere
    t0 = np.linspace(0.1, 1.0, 12)
    report = check_flat(lambda t: float(np.sum(t**3)), lambda t: 3 * t**2 * factor, t0)
    (block,) = report.failed_blocks
    assert block.diagnosis.startswith("analytic / numeric = 1 "), block.diagnosis
    assert "approximate" not in block.diagnosis


def test_a_few_entries_off_by_a_tiny_relative_error_show_their_ratio():
    t0 = np.linspace(0.1, 1.0, 40)

    def grad(t):
        g = 3 * t**2
        g[[3, 17]] *= 1 + 2e-5
        return g

    report = check_flat(lambda t: float(np.sum(t**3)), grad, t0)
    (block,) = report.failed_blocks
    assert block.mismatches == 2
    assert "analytic / numeric = 1 + 2.0e-05, 1 + 2.0e-05" in block.diagnosis


def test_a_non_finite_entry_does_not_hide_the_other_wrong_entries_of_its_block():
    t0 = np.linspace(0.5, 1.0, 8)

    def grad(t):
        g = 2 * t
        g[1] = np.nan
        g[5] *= 2.0  # a second, ordinary bug in the same block
        return g

    report = check_flat(lambda t: float(np.sum(t**2)), grad, t0, mode="full")
    block = report.block("theta")
    assert block.mismatches == 2 and block.checked == 8
    assert {e.index for e in block.worst} == {(1,), (5,)}
    assert block.worst[0].index == (1,)  # the NaN first
    assert block.worst[1].numeric == pytest.approx(2 * t0[5], rel=1e-8)  # measured
    assert "NaN at 1 of 8 entries" in block.diagnosis
    fast = check_flat(lambda t: float(np.sum(t**2)), grad, t0, mode="fast").block("theta")
    assert fast.checked == 1 and "mode='full' compares every entry" in fast.note
    assert "not measured" in str(check_flat(lambda t: float(np.sum(t**2)), grad, t0, mode="fast"))


def test_an_inconclusive_report_lists_blocks_as_not_checked_not_passed():
    report = check_gradients(Linear(3, 2), np.ones((2, 3)), None, max_evals=3)
    text = str(report)
    assert not report.passed and "passed:" not in text
    assert "not checked: `W` (3, 2), `b` (2,), `input` (2, 3)" in text


def test_a_numpy_backward_that_raises_is_named_as_the_backward():
    class Raises(Linear):
        def backward(self, dout):
            raise ZeroDivisionError("in my backward")

    with pytest.raises(ModelError, match="the model's backward raised ZeroDivisionError"):
        check_gradients(Raises(2, 2), np.ones((1, 2)), None)


# --------------------------------------------------------------------------- NaN gradients
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_analytic_gradient_fails_the_block_and_names_the_entries(mode, bad):
    t0 = np.linspace(0.5, 1.0, 6)

    def grad(t):
        g = 2 * t
        g[4] = bad
        return g

    blocks = (Block("p", (3,), 0), Block("q", (3,), 3))
    report = check_flat(lambda t: float(np.sum(t**2)), grad, t0, blocks=blocks, mode=mode)
    assert not report.passed
    assert report.block("p").passed
    q = report.block("q")
    assert q.mismatches == 1 and [e.index for e in q.worst] == [(1,)]
    assert ("NaN" if np.isnan(bad) else "Inf") in q.diagnosis


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("seed", [2**64, -1, 10**30])
def test_a_seed_outside_64_bits_is_a_one_line_error(seed):
    with pytest.raises(InvalidOptionError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        check_flat(lambda t: float(np.sum(t**2)), lambda t: 2 * t, np.ones(3), seed=seed)


def test_seeds_that_differ_beyond_32_bits_give_different_reports():
    layer = Linear(3, 2)
    x = np.ones((2, 3))
    low = check_gradients(layer, x, None, seed=0).to_dict()
    high = check_gradients(layer, x, None, seed=2**32).to_dict()
    assert low["blocks"] != high["blocks"]  # another output projection, other numbers
    assert check_gradients(layer, x, None, seed=2**64 - 1).passed


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_parameter_is_a_one_line_error(bad):
    layer = Linear(3, 2)
    layer.params["W"][1, 0] = bad
    with pytest.raises(NonFiniteError, match=r"`W` is not finite at the starting point \(entry"):
        check_gradients(layer, np.ones((2, 3)), None)
    with pytest.raises(NonFiniteError, match="`theta` is not finite"):
        check_flat(lambda t: float(np.sum(t)), np.ones_like, np.array([1.0, bad]))


def test_nothing_but_empty_arrays_is_nothing_to_check():
    with pytest.raises(NothingToCheckError, match="every block is empty"):
        check_flat(lambda t: 0.0, lambda t: t, np.zeros(0))

    class Empty:
        params = {"W": np.zeros((0, 3))}
        grads = {"W": np.zeros((0, 3))}

        def forward(self, x):
            return x.sum() * 0.0 + np.zeros(1)

        def backward(self, dout):
            return None

    with pytest.raises(NothingToCheckError):
        check_gradients(Empty(), np.zeros((2, 0)), None)


@pytest.mark.parametrize(
    "x", [(v for v in [np.ones(3)]), iter([np.ones(3)]), map(np.asarray, [[1.0]])]
)
def test_a_one_shot_iterable_as_x_is_a_one_line_error(x):
    with pytest.raises(InvalidOptionError, match="x must be an array, a tuple, list or dict"):
        check_gradients(Linear(3, 2), x, None)


def test_a_loss_pair_that_returns_an_array_is_a_one_line_error():
    pair = (lambda out, y: (out - y) ** 2, lambda out, y: 2 * (out - y))
    with pytest.raises(ModelError, match=r"the loss must return a scalar; got an array of shape"):
        check_gradients(Linear(3, 2), np.ones((2, 3)), np.zeros((2, 2)), loss=pair)


@pytest.mark.parametrize("bad", ["strings", None, object(), np.array(["a", "b"])])
def test_non_numeric_grads_are_a_one_line_error(bad):
    class Odd(Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["b"] = bad
            return dx

    with pytest.raises(ModelError, match=r"model.grads\['b'\] must be a numeric array"):
        check_gradients(Odd(2, 2), np.ones((1, 2)), None, wrt="params")


# --------------------------------------------------------------------------- complex
def test_complex_parameters_and_inputs_are_named_as_not_checked():
    class Mixed(Linear):
        def __init__(self):
            super().__init__(3, 2)
            self.params["phase"] = np.ones(2, dtype=complex)

        def forward(self, x):
            self.c = x[1]
            return super().forward(x[0])

        def backward(self, dout):
            return (super().backward(dout), np.zeros_like(self.c))

    report = check_gradients(Mixed(), (np.ones((2, 3)), np.ones(3, dtype=complex)), None)
    assert report.passed
    assert {b.name for b in report.blocks} == {"W", "b", "input[0]"}
    warned = " ".join(report.warnings)
    assert "parameter `phase` is complex" in warned and "input `input[1]` is complex" in warned


def test_complex_grads_for_a_real_parameter_are_an_error_not_a_dropped_part():
    class Complexified(Linear):
        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["W"] = self.grads["W"] + 1j
            return dx

    with pytest.raises(ModelError, match=r"model.grads\['W'\] is complex"):
        check_gradients(Complexified(2, 2), np.ones((1, 2)), None)


# --------------------------------------------------------------------------- fresh arrays
class InPlaceDropout:
    """Inverted dropout whose backward scales ``dout`` in place (as numpy-ml's does), with
    one weight so that there is a parameter. Correct: it must pass."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p
        self.params = {"w": np.array([1.5])}
        self.grads = {"w": np.zeros(1)}

    def forward(self, x):
        self.mask = np.random.rand(*x.shape) > self.p  # the global generator, reset each time
        self.x = x
        return x * self.mask / (1 - self.p) * self.params["w"]

    def backward(self, dout):
        dout *= 1 / (1 - self.p)  # in place
        dout *= self.mask
        self.grads["w"] = np.array([np.sum(dout * self.x)])
        return dout * self.params["w"]


def test_a_backward_that_scales_dout_in_place_does_not_corrupt_later_evaluations():
    x = np.random.default_rng(0).normal(size=(4, 3))
    for mode in MODES:
        report = check_gradients(InPlaceDropout(), x, None, mode=mode)
        assert report.passed, str(report)


def test_a_forward_that_changes_its_input_in_place_sees_a_fresh_input_each_time():
    class Centers(Linear):
        def forward(self, x):
            shift = x[1]
            shift -= shift.mean()  # an unchecked input, changed in place
            return super().forward(x[0] + shift[:, None])

        def backward(self, dout):
            return (super().backward(dout), np.zeros_like(self.x))

    x = (np.ones((2, 3)), np.array([1.0, 3.0]))
    report = check_gradients(Centers(3, 2), x, None, wrt="params")
    assert report.passed, str(report)
    assert np.array_equal(x[1], [1.0, 3.0])  # the user's input is untouched


# --------------------------------------------------------------------------- state
def test_the_same_verdict_plainly_in_threads_and_twice():
    x = np.random.default_rng(0).normal(size=(4, 3))
    before = np.random.get_state()[1].copy()
    assert assert_stable(lambda: check_gradients(InPlaceDropout(), x, None)).passed
    wrong = assert_stable(lambda: check_gradients(Linear(3, 3, bug="transpose"), x, None))
    assert [b.name for b in wrong.failed_blocks] == ["W"]
    assert np.array_equal(np.random.get_state()[1], before)


def test_the_callers_global_rng_is_restored_in_every_thread():
    x = np.random.default_rng(0).normal(size=(4, 3))
    failures = []

    def work(i):
        np.random.seed(i)  # the legacy global generator is process-wide: seed, then compare
        for _ in range(3):
            report = check_gradients(InPlaceDropout(), x, None)
            if not report.passed:
                failures.append(str(report))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    state = np.random.get_state()
    check_gradients(InPlaceDropout(), x, None)
    assert np.array_equal(np.random.get_state()[1], state[1]) and np.random.get_state()[2] == state[2]


@pytest.mark.parametrize("setting", ["raise", "warn", "ignore", "call"])
def test_the_verdict_does_not_depend_on_the_callers_numpy_error_settings(setting):
    loss, grad, t0, blocks = _vanishing(1e-10, 2.0)
    plain = check_flat(loss, grad, t0, blocks=blocks).to_dict()
    plain.pop("elapsed")
    old = np.seterr(all=setting) if setting != "call" else np.geterr()
    if setting == "call":
        np.seterrcall(lambda *a: None)
        np.seterr(all="call")
    try:
        report = check_flat(loss, grad, t0, blocks=blocks).to_dict()
        assert np.geterr()["over"] == ("call" if setting == "call" else setting)
    finally:
        np.seterr(**old)
    report.pop("elapsed")
    assert report == plain


def test_a_numpy_integer_seed_is_an_int():
    layer = Linear(3, 2)
    x = np.ones((2, 3))
    a = check_gradients(layer, x, None, seed=np.int64(3)).to_dict()
    b = check_gradients(layer, x, None, seed=3).to_dict()
    a.pop("elapsed"), b.pop("elapsed")
    assert a == b and a["seed"] == 3 and type(a["seed"]) is int
    with pytest.raises(InvalidOptionError, match="seed must be an int"):
        check_gradients(layer, x, None, seed=np.True_)


def test_a_gradient_or_loss_grad_that_returns_none_says_so():
    with pytest.raises(ModelError, match="gradient returned None; expected an array of shape"):
        check_flat(lambda t: float(np.sum(t**2)), lambda t: None, np.ones(3))
    pair = (lambda out, y: float(np.sum((out - y) ** 2)), lambda out, y: None)
    with pytest.raises(ModelError, match="loss_grad returned None"):
        check_gradients(Linear(3, 2), np.ones((2, 3)), np.zeros((2, 2)), loss=pair)


def test_an_integer_numpy_parameter_is_named_as_not_checked():
    layer = Linear(3, 2)
    layer.params["steps"] = np.arange(4)
    report = check_gradients(layer, np.ones((2, 3)), None)
    assert report.passed and "steps" not in {b.name for b in report.blocks}
    assert any("parameter `steps` has dtype int64 and is not checked" in w for w in report.warnings)


def test_check_flat_takes_a_flat_problem_as_it_is():
    from gradcheck import FlatProblem

    blocks = (Block("a", (2,), 0), Block("b", (1,), 2))
    problem = FlatProblem(
        theta0=np.array([0.3, 0.6, 0.9]),
        loss=lambda t: float(np.sum(np.sin(t))),
        gradient=lambda t: np.cos(t) * np.array([1.0, 1.0, 2.0]),
        blocks=blocks,
    )
    report = check_flat(problem)
    assert [b.name for b in report.failed_blocks] == ["b"]
    with pytest.raises(InvalidOptionError, match="takes the FlatProblem alone"):
        check_flat(problem, np.cos, np.zeros(3))
    with pytest.raises(InvalidOptionError, match="check_flat needs loss, gradient and theta0"):
        check_flat(np.sin)


def test_the_tolerance_table_is_read_only():
    from gradcheck import TOLERANCES, Tolerance

    with pytest.raises(TypeError):
        TOLERANCES["float64"] = Tolerance(rtol=1.0, atol=1.0, step=1e-3, eps=1e-16)  # type: ignore[index]
    assert TOLERANCES["float64"].rtol == 1e-6


def test_the_reports_time_covers_the_adapters_set_up():
    import time as _time

    class SlowToCopy(Linear):
        def __deepcopy__(self, memo):  # the NumPy adapter copies the model once, at set-up
            _time.sleep(0.3)
            new = Linear(3, 2)
            new.params = {k: v.copy() for k, v in self.params.items()}
            return new

    report = check_gradients(SlowToCopy(3, 2), np.ones((2, 3)), None)
    assert report.passed and report.elapsed >= 0.3


def test_an_entry_measured_from_one_side_too_coarsely_is_unresolved_not_agreeing():
    # defined for t >= 0 only, with a gradient (1e-9) below what a one-sided difference of a
    # loss of 1 resolves: a factor-2 bug there must not read as agreement
    def loss(t):
        with np.errstate(invalid="ignore"):
            return 1.0 + float(np.sum(np.where(t >= 0, 1e-9 * t, np.nan)))

    report = check_flat(loss, lambda t: np.full_like(t, 2e-9), np.zeros(2), mode="full")
    block = report.block("theta")
    assert not report.passed
    assert block.mismatches + block.unresolved == 2  # never "agree"


def test_a_tiny_block_checked_entry_by_entry_in_fast_mode_is_not_probed_again():
    # block `b` (gradients 1e-10) is defined on one side only at its entries: fast mode
    # checks it entry by entry; its verdict must stand (oracle: the exact gradient)
    blocks = (Block("a", (3,), 0), Block("b", (2,), 3))
    t0 = np.array([0.2, 0.4, 0.6, 0.0, 0.0])

    def loss(t):
        with np.errstate(invalid="ignore"):
            tail = np.where(t[3:] >= 0, 1e-10 * (t[3:] + t[3:] ** 2), np.nan)
        return 1.0 + float(np.sum(np.sin(t[:3]))) + float(np.sum(tail))

    def grad(t):
        return np.concatenate([np.cos(t[:3]), 1e-10 * (1 + 2 * t[3:])])

    full = check_flat(loss, grad, t0, blocks=blocks, mode="full")
    fast = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert full.block("a").passed and fast.block("a").passed
    assert fast.block("b").unit == "entries"
    assert fast.block("b").passed == full.block("b").passed
    assert fast.block("b").mismatches == 0 and full.block("b").mismatches == 0
