"""NumPy backprop as people write it: every shape the NumPy adapter takes without glue.

Oracle throughout: the correct layer of `zoo.numpy_as_written` passes, and the same layer with
a planted bug (a sign, a missing term, a wrong index) fails with the block the bug is in named,
in full and in fast mode. Then the protocol's rules and the errors that name them, and the
user's state left bit for bit as it was.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re

import numpy as np
import pytest
from gradcheck.adapters import numpy as numpy_adapter
from layers import Linear
from zoo import numpy_as_written as nw

from gradcheck import check_gradients
from gradcheck._dispatch import select_adapter
from gradcheck._problem import output_projection
from gradcheck.errors import (
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
    UnsupportedModelError,
)

MODES = ("full", "fast")


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _pair(layer: str, bug: str | None = None) -> tuple:
    forward, backward = {
        "affine": (nw.affine_forward, nw.affine_backward),
        "relu": (nw.relu_forward, nw.relu_backward),
        "batchnorm": (nw.batchnorm_forward, nw.batchnorm_backward),
        "conv": (nw.conv_forward_naive, nw.conv_backward_naive),
        "max_pool": (nw.max_pool_forward_naive, nw.max_pool_backward_naive),
    }[layer]
    return forward, (backward if bug is None else functools.partial(backward, bug=bug))


def _arguments(layer: str) -> tuple:
    rng = _rng()
    if layer == "affine":
        return rng.normal(size=(4, 2, 3)), rng.normal(size=(6, 3)), rng.normal(size=3)
    if layer == "relu":
        return (rng.normal(size=(3, 5)),)
    if layer == "batchnorm":
        bn_param = {"mode": "train", "running_mean": np.zeros(4), "running_var": np.ones(4)}
        return rng.normal(size=(6, 4)), 1.0 + 0.2 * rng.normal(size=4), rng.normal(size=4), bn_param
    if layer == "conv":
        x, w = rng.normal(size=(2, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3))
        return x, w, rng.normal(size=3), {"stride": 1, "pad": 1}
    # max-pool: a permutation, so no window holds a tie
    x = rng.permutation(32).reshape(2, 1, 4, 4) / 4.0
    return x, {"pool_height": 2, "pool_width": 2, "stride": 2}


BLOCKS = {
    "affine": ["x", "w", "b"],
    "relu": ["x"],
    "batchnorm": ["x", "gamma", "beta"],
    "conv": ["x", "w", "b"],
    "max_pool": ["x"],
}


# =========================================================================== the shapes
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", list(BLOCKS))
def test_layer_functions_pass_and_their_mutants_fail_in_the_block_named(layer, mode):
    args = _arguments(layer)
    report = check_gradients(_pair(layer), args, mode=mode)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == BLOCKS[layer]
    assert report.warnings == ()
    for bug, block in nw.MUTANTS[layer].items():
        wrong = check_gradients(_pair(layer, bug), args, mode=mode)
        assert [b.name for b in wrong.failed_blocks] == [block], (bug, str(wrong))


@pytest.mark.parametrize("mode", MODES)
def test_a_loss_function_returning_loss_and_dx_is_checked_and_its_mutant_fails(mode):
    rng = _rng()
    x, y = rng.normal(size=(5, 4)), rng.integers(0, 4, size=5)
    report = check_gradients(nw.softmax_loss, x, y, mode=mode)
    assert report.passed, str(report)
    assert report.framework == "numpy" and [b.name for b in report.blocks] == ["x"]
    wrong = check_gradients(functools.partial(nw.softmax_loss, bug="missing_term"), x, y, mode=mode)
    assert [b.name for b in wrong.failed_blocks] == ["x"], str(wrong)


@pytest.mark.parametrize("mode", MODES)
def test_a_model_whose_loss_returns_loss_and_grads_is_checked_and_its_mutant_fails(mode):
    rng = _rng()
    X, y = rng.normal(size=(7, 5)), rng.integers(0, 3, size=7)
    report = check_gradients(nw.TwoLayerNet(), X, y, mode=mode)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["W1", "b1", "W2", "b2"]
    assert report.warnings == (
        "the input is not checked: the model's loss(X, y) returns gradients of its parameters only",
    )
    wrong = check_gradients(nw.TwoLayerNet(bug="missing_term"), X, y, mode=mode)
    assert [b.name for b in wrong.failed_blocks] == ["W2"], str(wrong)
    assert check_gradients(nw.TwoLayerNet(), X, y, wrt="params").warnings == ()


@pytest.mark.parametrize("mode", MODES)
def test_a_numpy_ml_layer_is_checked_and_its_running_statistics_are_named(mode):
    x = _rng().normal(size=(6, 4))
    report = check_gradients(nw.BatchNorm1D(), x, mode=mode)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["scaler", "intercept", "input"]
    assert report.skipped == ("running_mean", "running_var")
    assert report.warnings == (
        "`running_mean`, `running_var` are in model.parameters with no entry in "
        "model.gradients (running statistics?) and not checked",
    )
    assert "skipped (frozen or not checkable): `running_mean`, `running_var`" in str(report)
    wrong = check_gradients(nw.BatchNorm1D(bug="sign"), x, mode=mode)
    assert [b.name for b in wrong.failed_blocks] == ["intercept"], str(wrong)


@pytest.mark.parametrize("mode", MODES)
def test_three_inputs_reach_forward_as_positional_arguments(mode):
    rng = _rng()
    qkv = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    report = check_gradients(nw.Attention(), qkv, mode=mode)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["input[0]", "input[1]", "input[2]"]
    wrong = check_gradients(nw.Attention(bug="wrong_index"), qkv, mode=mode)
    assert [b.name for b in wrong.failed_blocks] == ["input[1]"], str(wrong)
    # the same layer as a function pair: blocks named by the forward's parameters
    pair = (nw.attention_forward, nw.attention_backward)
    assert [b.name for b in check_gradients(pair, qkv, mode=mode).blocks] == ["Q", "K", "V"]
    wrong_pair = (nw.attention_forward, functools.partial(nw.attention_backward, bug="wrong_index"))
    assert [b.name for b in check_gradients(wrong_pair, qkv, mode=mode).failed_blocks] == ["K"]


def test_a_tuple_goes_to_forward_as_one_input_when_forward_takes_one():
    seen = []

    class OneInput:
        params: dict = {}
        grads: dict = {}

        def forward(self, X, retain_derived=True):
            seen.append((type(X).__name__, retain_derived))
            self.a, self.b = X
            return self.a * self.b

        def backward(self, dout):
            return [dout * self.b, dout * self.a]

    rng = _rng()
    report = check_gradients(OneInput(), [rng.normal(size=3), rng.normal(size=3)])
    assert report.passed, str(report)
    assert set(seen) == {("list", True)}


# =========================================================================== pairs in detail
def test_pair_wrt_the_first_argument_is_the_input_and_the_others_parameters():
    args = _arguments("affine")
    assert [b.name for b in check_gradients(_pair("affine"), args, wrt="params").blocks] == [
        "w",
        "b",
    ]
    inputs = check_gradients(_pair("affine"), args, wrt="inputs")
    assert [(b.name, b.kind) for b in inputs.blocks] == [("x", "input")]
    with pytest.raises(NothingToCheckError, match="nothing to check with wrt='params'"):
        check_gradients(_pair("relu"), _arguments("relu"), wrt="params")


def test_pair_integer_arguments_pass_through_and_names_fall_back_to_positions():
    def embed_forward(*args):
        ids, table = args
        return table[ids], (ids, table)

    def embed_backward(dout, cache):
        ids, table = cache
        dtable = np.zeros_like(table)
        np.add.at(dtable, ids, dout)
        return dtable  # one float array argument: its gradient alone

    rng = _rng()
    ids = np.array([[0, 2], [3, 2]])
    report = check_gradients((embed_forward, embed_backward), (ids, rng.normal(size=(4, 3))))
    assert report.passed, str(report)
    assert [(b.name, b.kind) for b in report.blocks] == [("arg1", "param")]


def test_pair_forward_returning_out_alone_gets_its_arguments_in_backward():
    pair = (lambda x, s: np.tanh(x) * s, lambda dout, x, s: (1.0 - np.tanh(x) ** 2) * s * dout)
    report = check_gradients(pair, (_rng().normal(size=5), 2.0))
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["x"]  # a Python float passes through


@pytest.mark.parametrize("bug", [None, "dropped_dc"])
def test_pair_with_two_outputs_and_a_cache_gets_one_dout_each(bug):
    def step_forward(x, w):
        h, c = np.tanh(x @ w), x @ w
        return h, c, (x, w, h)

    def step_backward(dh, dc, cache):
        x, w, h = cache
        dz = dh * (1.0 - h**2) + (0.0 if bug else dc)
        return dz @ w.T, x.T @ dz

    rng = _rng()
    report = check_gradients(
        (step_forward, step_backward), (rng.normal(size=(3, 2)), rng.normal(size=(2, 2)))
    )
    assert report.passed is (bug is None), str(report)


def test_pair_with_a_target_uses_the_named_loss():
    args = _arguments("affine")
    y = _rng().normal(size=(4, 3))
    assert check_gradients(_pair("affine"), args, y, loss="mse").passed
    assert not check_gradients(_pair("affine", "sign"), args, y, loss="mse").passed


def test_pair_float32_arguments_are_checked_in_float64_and_the_report_says_so():
    x, w, b = (a.astype(np.float32) for a in _arguments("affine"))
    report = check_gradients(_pair("affine"), (x, w, b))
    assert report.passed, str(report)
    assert report.warnings == ("arguments of dtype float32 were checked on a float64 copy",)


def test_pair_backward_returning_the_wrong_number_of_gradients_is_a_one_line_error():
    pair = (nw.affine_forward, lambda dout, cache: nw.affine_backward(dout, cache)[:2])
    message = (
        "backward must return one gradient per float array argument (`x`, `w`, `b`), in "
        "that order; got 2 values"
    )
    with pytest.raises(ShapeMismatchError, match=re.escape(message)):
        check_gradients(pair, _arguments("affine"))


def test_a_pair_is_the_numpy_adapters_whatever_is_imported():
    pytest.importorskip("jax")  # the JAX adapter takes any (callable, params) pair
    import jax  # noqa: F401

    assert select_adapter(_pair("affine")) is numpy_adapter
    assert check_gradients(_pair("affine"), _arguments("affine")).framework == "numpy"


def test_a_numpy_loss_function_is_routed_to_numpy_with_torch_or_jax_imported():
    for name in ("torch", "jax"):
        if importlib.util.find_spec(name) is not None:
            __import__(name)
    rng = _rng()
    report = check_gradients(nw.softmax_loss, rng.normal(size=(3, 4)), np.array([0, 3, 1]))
    assert report.framework == "numpy" and report.passed, str(report)
    with pytest.raises(UnsupportedModelError):  # an array alone is no (loss, dx)
        check_gradients(lambda v: np.sin(v), rng.normal(size=3))


# =========================================================================== several outputs
class SinCos:
    """forward returns (sin x, cos x, an integer array); backward gets (d_sin, d_cos, None)."""

    params: dict = {}
    grads: dict = {}

    def __init__(self, bug=False):
        self.bug = bug

    def forward(self, x):
        self.x = x
        return np.sin(x), np.cos(x), np.arange(3)

    def backward(self, dout):
        d_sin, d_cos, d_int = dout
        assert d_int is None
        return d_sin * np.cos(self.x) - (0.0 if self.bug else d_cos * np.sin(self.x))


@pytest.mark.parametrize("mode", MODES)
def test_a_tuple_of_outputs_is_projected_part_by_part(mode):
    x = _rng().normal(size=(2, 3))
    assert check_gradients(SinCos(), x, mode=mode).passed
    wrong = check_gradients(SinCos(bug=True), x, mode=mode)
    assert [b.name for b in wrong.failed_blocks] == ["input"]
    # oracle: sum(sin x * r0) + sum(cos x * r1), the torch adapter's projection of two outputs
    problem = numpy_adapter.build_problem(SinCos(), x, None, loss=None, wrt="all", seed=3)
    want = np.sum(np.sin(x) * output_projection((2, 3), 3, 0)) + np.sum(
        np.cos(x) * output_projection((2, 3), 3, 1)
    )
    assert problem.loss(problem.theta0) == pytest.approx(want, rel=1e-14)


def test_a_tuple_of_outputs_with_a_loss_is_an_error_that_says_what_to_do():
    x = _rng().normal(size=(2, 3))
    message = (
        "the forward returned a tuple of 3 outputs, and a loss applies to one output array: "
        "return one array, or check with y=None"
    )
    with pytest.raises(ModelError, match=re.escape(message)):
        check_gradients(SinCos(), x, np.zeros((2, 3)), loss="mse")


# =========================================================================== explicit names
class Renamed:
    def __init__(self, bug=False):
        self.W_dict = {"W": _rng().normal(size=(3, 2))}
        self.dW_dict: dict = {}
        self.bug = bug

    def predict(self, x):
        self.x = x
        return x @ self.W_dict["W"]

    def backprop(self, dout):
        self.dW_dict["W"] = self.x.T @ dout * (2.0 if self.bug else 1.0)
        return dout @ self.W_dict["W"].T


def test_model_names_the_attributes_of_an_object_with_other_names():
    x = _rng().normal(size=(4, 3))
    names = {"params": "W_dict", "grads": "dW_dict", "forward": "predict", "backward": "backprop"}
    report = check_gradients(numpy_adapter.model(Renamed(), **names), x)
    assert report.passed and [b.name for b in report.blocks] == ["W", "input"], str(report)
    wrong = check_gradients(numpy_adapter.model(Renamed(bug=True), **names), x)
    assert [b.name for b in wrong.failed_blocks] == ["W"]
    with pytest.raises(UnsupportedModelError, match=r"has no method `forward`"):
        numpy_adapter.model(Renamed(), params="W_dict", grads="dW_dict")
    with pytest.raises(UnsupportedModelError, match=r"needs a dict of arrays in `W`; got nothing"):
        numpy_adapter.model(Renamed(), params="W", forward="predict", backward="backprop")
    with pytest.raises(InvalidOptionError, match=r"params=\) must be an attribute name; got 3"):
        numpy_adapter.model(Renamed(), params=3)


# =========================================================================== the rules
class AppendsItsCache(Linear):
    """Keeps every forward's input and backpropagates through the first: a stale cache."""

    def forward(self, x):
        self.inputs = [*getattr(self, "inputs", []), x]
        self.weights = [*getattr(self, "weights", []), self.params["W"].copy()]
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout):
        self.grads["W"] = self.inputs[0].T @ dout
        self.grads["b"] = dout.sum(axis=0)
        return dout @ self.weights[0].T


def test_a_backward_using_a_stale_cache_is_an_error_naming_the_rule():
    with pytest.raises(ModelError, match="rule: backward uses the cache of the latest forward"):
        check_gradients(AppendsItsCache(3, 2), _rng().normal(size=(4, 3)))

    class NoFlush(nw.BatchNorm1D):  # numpy-ml's layer, without the flush between steps
        flush_gradients = None

    message = (
        "the model's backward does not use the latest forward's cache: after forwards at a "
        "nearby point it fails (the gradient of `input` returned by backward has shape "
        "(1, 6, 4); expected (6, 4))"
    )
    with pytest.raises(ModelError, match=re.escape(message)):
        check_gradients(NoFlush(), _rng().normal(size=(6, 4)))


def test_a_forward_that_keeps_state_between_calls_is_an_error_naming_the_rule():
    class Drifts(Linear):
        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(x) * (1.0 + 1e-3 * self.calls)

    with pytest.raises(ModelError, match=r"rule: the forward keeps no state between calls") as info:
        check_gradients(Drifts(3, 2), _rng().normal(size=(4, 3)))
    assert "a fresh copy of the model gives" in str(info.value)

    class LossDrifts(nw.TwoLayerNet):
        def loss(self, X, y=None):
            self.reg += 0.01
            return super().loss(X, y)

    X, y = _rng().normal(size=(7, 5)), _rng().integers(0, 3, size=7)
    with pytest.raises(ModelError, match=r"rule: the loss\(X, y\) keeps no state between calls"):
        check_gradients(LossDrifts(), X, y)


def test_a_forward_random_beyond_the_resets_is_left_to_the_core_to_report():
    source = iter(range(10**6))  # outside the model: a fresh copy does not reset it

    class Noisy(Linear):
        def forward(self, x):
            return super().forward(x) + 1e-3 * next(source)

    report = check_gradients(Noisy(2, 2), np.ones((1, 2)))
    assert not report.passed and "not deterministic" in (report.problem or "")


def test_params_hold_only_what_is_trained_and_the_errors_say_so():
    class RunningStatsInParams(Linear):
        def __init__(self):
            super().__init__(3, 2)
            self.params["running_mean"] = np.zeros(2)
            self.grads = {}  # nothing declared: every parameter needs a gradient

    with pytest.raises(
        ShapeMismatchError,
        match=re.escape(
            "model.grads has no entry 'running_mean' after backward; expected the keys of "
            "model.params, got ['W', 'b'] (rule: `params` holds only what is trained"
        ),
    ):
        check_gradients(RunningStatsInParams(), _rng().normal(size=(4, 3)))

    class ForgetsB2(nw.TwoLayerNet):
        def loss(self, X, y=None):
            loss, grads = super().loss(X, y)
            del grads["b2"]
            return loss, grads

    X, y = _rng().normal(size=(7, 5)), _rng().integers(0, 3, size=7)
    with pytest.raises(ShapeMismatchError, match=r"have no entry 'b2'.*rule: `params` holds only"):
        check_gradients(ForgetsB2(), X, y)


def test_a_parameter_missing_from_the_declared_gradients_is_checked_when_backward_fills_it():
    class DeclaresW(Linear):  # grads lists `W` only, but backward fills `b` as well
        def __init__(self, bug=False):
            super().__init__(3, 2)
            self.grads = {"W": np.zeros((3, 2))}
            self.bug = bug

        def backward(self, dout):
            dx = super().backward(dout)
            self.grads["b"] = -self.grads["b"] if self.bug else self.grads["b"]
            return dx

    x = _rng().normal(size=(4, 3))
    report = check_gradients(DeclaresW(), x)
    assert report.passed and report.skipped == () and report.warnings == (), str(report)
    assert [b.name for b in check_gradients(DeclaresW(bug=True), x).failed_blocks] == ["b"]


# =========================================================================== what to do instead
SHAPES = "the NumPy shapes are: an object with `params` (a dict of arrays), `forward(x)`"


class ForwardBackwardOnly:
    def __init__(self):
        self.weights = {"W": np.ones((3, 2))}

    def forward(self, x):
        return x @ self.weights["W"]

    def backward(self, dout):
        return dout @ self.weights["W"].T


class NoBackward:
    params = {"W": np.ones(2)}

    def forward(self, x):
        return x * self.params["W"]


class ListParams:
    params = {"W": [1.0, 2.0]}

    def forward(self, x):
        return x

    def backward(self, dout):
        return dout


class Both(Linear):
    def __init__(self):
        super().__init__(3, 2)
        self.parameters = dict(self.params)


@pytest.mark.parametrize(
    ("model", "closest"),
    [
        (
            ForwardBackwardOnly(),
            "it has `forward` and `backward` but no `params`: give it `params`, a dict of the "
            "arrays it trains (`{}` if none), and fill `grads` in backward; or name its "
            'attributes with gradcheck.adapters.numpy.model(obj, params="...", grads="...") '
            "(its dicts of arrays: `weights`)",
        ),
        (NoBackward(), "it has `params` and `forward` but no `backward(dout)`"),
        (ListParams(), "`params['W']` is a list, not a NumPy array"),
        (Both(), "say which dict holds the parameters, with gradcheck.adapters.numpy.model("),
        (
            (nw.affine_forward, nw.affine_backward, nw.relu_forward),
            "a tuple of 3 callables (`affine_forward`, `affine_backward`, `relu_forward`); a "
            "NumPy pair is the tuple (forward, backward)",
        ),
    ],
    ids=["no_params", "no_backward", "list_params", "params_and_parameters", "three_callables"],
)
def test_an_unsupported_numpy_looking_model_names_the_closest_shape_and_the_fix(model, closest):
    with pytest.raises(UnsupportedModelError) as info:
        check_gradients(model, np.ones((2, 3)))
    message = str(info.value)
    assert message.startswith("cannot check a model of type "), message
    assert closest in message and SHAPES in message, message


def test_a_loss_given_to_a_shape_that_has_its_own_is_an_error():
    X, y = _rng().normal(size=(7, 5)), _rng().integers(0, 3, size=7)
    with pytest.raises(InvalidOptionError, match=r"computes its own loss.*drop loss='mse'"):
        check_gradients(nw.TwoLayerNet(), X, y, loss="mse")
    with pytest.raises(InvalidOptionError, match=r"loss\(X, y\) needs the target y; got y=None"):
        check_gradients(nw.TwoLayerNet(), X)
    with pytest.raises(NothingToCheckError, match="returns gradients of its parameters only"):
        check_gradients(nw.TwoLayerNet(), X, y, wrt="inputs")
    with pytest.raises(InvalidOptionError, match=r"`softmax_loss` returns its own loss"):
        check_gradients(nw.softmax_loss, X, y, loss="cross_entropy")


# =========================================================================== the user's state
def _bits(value):
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bits(v) for v in value]
    return value


def test_bn_param_and_the_arguments_are_untouched_also_when_the_layer_raises():
    args = _arguments("batchnorm")
    bn_param = args[3]
    running = bn_param["running_mean"]
    before = _bits(args)
    assert check_gradients(_pair("batchnorm"), args).passed
    assert not check_gradients(_pair("batchnorm", "missing_term"), args).passed
    assert _bits(args) == before and bn_param["running_mean"] is running

    def raises(dout, cache):
        raise RuntimeError("boom")

    with pytest.raises(ModelError, match="the model's backward raised RuntimeError: boom"):
        check_gradients((nw.batchnorm_forward, raises), args)
    assert _bits(args) == before
    # the forward did update its own copies: the running statistics moved there
    mine = copy.deepcopy(bn_param)
    nw.batchnorm_forward(args[0], args[1], args[2], mine)
    assert not np.array_equal(mine["running_mean"], bn_param["running_mean"])


def test_models_and_inputs_are_untouched_also_when_they_raise():
    rng = _rng()
    X, y = rng.normal(size=(7, 5)), rng.integers(0, 3, size=7)
    net, layer = nw.TwoLayerNet(), nw.BatchNorm1D()
    x = rng.normal(size=(6, 4))
    before = _bits([vars(net), X, y]), _bits([layer.parameters, layer.gradients, layer.X, x])
    check_gradients(net, X, y)
    check_gradients(layer, x)

    class Raises(nw.BatchNorm1D):
        def backward(self, dLdy, retain_grads=True):
            raise ValueError("no")

    raising = Raises()
    raising_before = _bits([raising.parameters, raising.gradients, raising.X])
    with pytest.raises(ModelError, match="the model's backward raised ValueError: no"):
        check_gradients(raising, x)
    assert _bits([raising.parameters, raising.gradients, raising.X]) == raising_before
    after = _bits([vars(net), X, y]), _bits([layer.parameters, layer.gradients, layer.X, x])
    assert after == before
    qkv = tuple(rng.normal(size=(4, 3)) for _ in range(3))
    qkv_before = _bits(qkv)
    check_gradients(nw.Attention(), qkv)
    assert _bits(qkv) == qkv_before


_NUMPY_ONLY = """
import re, sys
import numpy as np
from gradcheck import check_gradients
from gradcheck.errors import ModelError, UnsupportedModelError
sys.path.insert(0, {tests!r})
from zoo import numpy_as_written as nw
assert "torch" not in sys.modules and "jax" not in sys.modules
scores, labels = np.random.default_rng(7).normal(size=(4, 3)), np.array([0, 2, 1, 1])

def typo(x, y):
    loss, dx = nw.softmax_loss(x, y)
    return loss, dx.reshpe(x.shape)  # the student's typo

def transposed(x, y):
    loss, dx = nw.softmax_loss(x, y)
    return loss, dx.T

try:
    check_gradients(typo, scores, labels)
except ModelError as exc:
    assert "raised when called as a NumPy loss function" in str(exc), exc
    assert "AttributeError" in str(exc) and isinstance(exc.__cause__, AttributeError)
else:
    raise AssertionError("no error")
try:
    check_gradients(transposed, scores, labels)
except UnsupportedModelError as exc:
    want = "its gradient for argument 0 is an array of shape (3, 4); the argument has (4, 3)"
    assert want in str(exc), exc
else:
    raise AssertionError("no error")
print("ok")
"""


def test_a_loss_function_that_raises_or_returns_the_wrong_shape_says_so():
    """Found by a new-user trial: a NumPy loss function that raised was called "not a loss
    function" and its traceback lost. With NumPy inputs, code naming no framework and neither
    torch nor JAX imported (a fresh interpreter: this test process has them), it can be
    nothing else: a ModelError with the user's exception as its cause; and one that returns
    a gradient of the wrong shape is told which."""
    import pathlib
    import subprocess
    import sys

    tests = str(pathlib.Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", _NUMPY_ONLY.format(tests=tests)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_backward_that_raises_keeps_the_users_error_as_the_cause():
    class Broken:
        def __init__(self):
            self.params = {"W": np.ones((3, 2))}
            self.grads = {}

        def forward(self, x):
            return x @ self.params["W"]

        def backward(self, dout):
            raise KeyError("boom")

    with pytest.raises(ModelError, match="backward") as info:
        check_gradients(Broken(), np.ones((4, 3)))
    assert isinstance(info.value.__cause__, KeyError)


def test_a_backward_that_fails_on_a_tuple_of_douts_is_told_it_got_one():
    """Found by a new-user trial (numpy-ml's LSTMCell returns (A, C)): the backward received
    a tuple of douts and failed deep inside; the error now says what it received."""

    class TwoOutputs:
        def __init__(self):
            self.params = {"W": np.ones((3, 2))}
            self.grads = {"W": np.zeros((3, 2))}

        def forward(self, x):
            self.x = x
            out = x @ self.params["W"]
            return out, 2 * out

        def backward(self, dout):  # written for one output
            self.grads["W"] = self.x.T @ dout
            return dout @ self.params["W"].T

    # numpy turns the tuple into one (2, 4, 2) array: the gradient's shape is what fails
    with pytest.raises(ShapeMismatchError, match=r"backward received a tuple of 2 douts"):
        check_gradients(TwoOutputs(), np.ones((4, 3)))
