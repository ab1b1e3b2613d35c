"""What every adapter must do alike, parametrised over the adapters (docs/adapters.md, "What
an adapter must do", says which test here checks which rule).

The oracles: the NumPy definitions in `gradcheck._losses` (named losses); the NumPy reference
MLP projected by hand with `gradcheck._problem.output_projection` (``y=None``); images of the
user's objects and of the global generators taken before the check (state); the same check
run again (randomness); and messages written out here, word for word (errors). The models
are small and written out in each framework with the same numbers and parameter names.

Where an adapter does not conform yet, its parameter is ``xfail(strict=True)`` with the fix in
the reason: the fix makes it pass, and the strict mark then fails until it is dropped.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

from gradcheck import GradcheckInputError, check_gradients
from gradcheck._losses import LOSS_NAMES, NUMPY_LOSSES, implementation, numpy_loss
from gradcheck.errors import (
    InvalidOptionError,
    ModelError,
    NonFiniteError,
    NothingToCheckError,
    ShapeMismatchError,
)

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_JAX = importlib.util.find_spec("jax") is not None


def _tables() -> dict[str, dict]:
    tables: dict[str, dict] = {"numpy": NUMPY_LOSSES}
    if HAVE_TORCH:
        from gradcheck.adapters import torch as torch_adapter

        tables["torch"] = torch_adapter.TORCH_LOSSES
    if HAVE_JAX:
        from gradcheck.adapters import jax as jax_adapter

        tables["jax"] = jax_adapter.JAX_LOSSES
    return tables


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_every_adapter_implements_exactly_the_named_losses(backend):
    tables = _tables()
    if backend not in tables:
        pytest.skip(f"{backend} is not installed")
    assert set(tables[backend]) == set(LOSS_NAMES)


def test_a_name_missing_from_a_table_is_an_error_never_another_loss():
    partial = {"mse": "the mse"}
    assert implementation(partial, "mse", "test") == ("mse", "the mse")
    with pytest.raises(InvalidOptionError, match="loss 'bce' has no test implementation"):
        implementation(partial, "bce", "test")
    with pytest.raises(InvalidOptionError, match="loss must be a callable or one of"):
        implementation(partial, "hinge", "test")


def _numbers(name: str):
    rng = np.random.default_rng(3)
    if name == "categorical_crossentropy":
        out = rng.dirichlet(np.ones(4), size=5)
    elif name == "bce":
        out = rng.uniform(0.05, 0.95, size=(5, 4))
    else:
        out = rng.normal(size=(5, 4))
    if name in ("cross_entropy", "categorical_crossentropy"):
        y = rng.integers(0, 4, size=5)
    elif name in ("bce", "bce_with_logits"):
        y = rng.uniform(0, 1, size=(5, 4))
    else:
        y = rng.normal(size=(5, 4))
    return out, y


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "hinge"}, "loss must be a callable or one of"),
        ({"mode": "slow"}, "mode must be one of"),
        ({"wrt": "weights"}, "wrt 'weights' matches no block; the blocks are "),
        ({"wrt": 7}, "wrt must be 'all', 'params', 'inputs', a block name or pattern"),
        ({"seed": -1}, r"seed must be an int in \[0, 2\*\*64\)"),
        ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
    ],
)
def test_the_same_mistake_gets_the_same_error_in_every_adapter(framework, options, message):
    model, x, y = _linear(framework)
    if "loss" not in options:
        options = {**options, "loss": "mse"}
    with pytest.raises(InvalidOptionError, match=message):
        check_gradients(model, x, y, **options)


def _linear(framework: str):
    """The same linear layer (2 -> 3) in each framework, with its input and target."""
    from gradcheck.reference import MLP

    mlp = MLP([2, 3], activation="tanh", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 3))
    if framework == "numpy":
        return mlp, x, y
    if framework == "torch":
        torch = pytest.importorskip("torch")
        return mlp.to_torch(), torch.from_numpy(x), torch.from_numpy(y)
    pytest.importorskip("jax")
    return mlp.to_jax(), x, y


@pytest.mark.parametrize("name", ["mse", "cross_entropy", "bce_with_logits"])
def test_every_adapter_gives_the_same_verdict_and_loss_scale_on_the_reference(name):
    """The reference MLP (its output is linear: the losses that take any real output) with a
    named loss passes in every adapter; the numeric gradients agree across adapters to
    round-off."""
    from gradcheck.reference import MLP

    mlp = MLP([3, 4], activation="tanh", seed=1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3))
    if name == "cross_entropy":
        y = rng.integers(0, 4, size=5)
    elif name == "bce_with_logits":
        y = rng.uniform(0, 1, size=(5, 4))
    else:
        y = rng.normal(size=(5, 4))
    numeric = {}
    models = {"numpy": mlp}
    if HAVE_TORCH:
        models["torch"] = mlp.to_torch()
    if HAVE_JAX:
        models["jax"] = mlp.to_jax()
    for framework, model in models.items():
        yy = y
        if framework == "torch":
            import torch

            yy = torch.from_numpy(y)
        try:
            report = check_gradients(model, x, yy, loss=name, mode="full", wrt="params")
        except InvalidOptionError:
            if framework == "numpy":  # the reference MLP computes its own loss gradients
                pytest.skip(f"the reference MLP has no {name} gradient")
            raise
        assert report.passed, f"{framework}: {report}"
        numeric[framework] = report.numeric
    first = next(iter(numeric.values()))
    for framework, values in numeric.items():
        np.testing.assert_allclose(values, first, rtol=1e-6, atol=1e-9, err_msg=framework)


# =========================================================================== shared models
# The same small models in each framework, written out by hand, with the same numbers.
FRAMEWORKS = ("numpy", "torch", "jax")
P_DROP = 0.3  # dropout probability of the noisy layer


def _need(framework: str) -> None:
    """Skip unless ``framework`` is installed (NumPy always is)."""
    if framework == "torch":
        pytest.importorskip("torch")
    elif framework == "jax":
        pytest.importorskip("jax")


def _noisy_numbers():
    rng = np.random.default_rng(11)
    w = rng.normal(size=(3, 2)) / np.sqrt(2)
    b = rng.normal(size=3) * 0.1
    x = rng.normal(size=(4, 2))
    y = rng.normal(size=(4, 3))
    return w, b, x, y


class _NumpyNoisy:
    """``tanh(x @ W.T + b)`` times an inverted-dropout mask drawn from NumPy's global
    generator (``np.random.random``, the legacy functions), with a buffer (``running``,
    changed in place by every forward) and a call counter. ``bug``: the backward uses
    ``1 + tanh**2`` where ``1 - tanh**2`` belongs. ``fail``: the forward draws, changes its
    buffer, then raises."""

    def __init__(self, w, b, *, bug=False, fail=False):
        self.params = {"W": w.copy(), "b": b.copy()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.running = np.zeros(w.shape[0])
        self.calls = 0
        self.bug, self.fail = bug, fail

    def forward(self, x):
        self.calls += 1
        z = x @ self.params["W"].T + self.params["b"]
        self.running += z.mean(axis=0)
        u = np.random.random(z.shape)
        if self.fail:
            raise RuntimeError("boom")
        self.x, self.h = x, np.tanh(z)
        self.mask = (u >= P_DROP) / (1.0 - P_DROP)
        return self.h * self.mask

    def backward(self, dout):
        deriv = 1.0 + self.h**2 if self.bug else 1.0 - self.h**2
        dz = dout * self.mask * deriv
        self.grads["W"] = dz.T @ self.x
        self.grads["b"] = dz.sum(axis=0)
        return dz @ self.params["W"]


def _torch_noisy(w, b, *, bug=False, fail=False):
    """`_NumpyNoisy` in torch: the mask from torch's global generator (``torch.rand``), the
    buffer a registered buffer, a submodule in eval mode (the flags are mixed), the bug in a
    custom ``autograd.Function``."""
    import torch
    from torch import nn

    class BadTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            h = torch.tanh(z)
            ctx.save_for_backward(h)
            return h

        @staticmethod
        def backward(ctx, g):
            (h,) = ctx.saved_tensors
            return g * (1.0 + h * h)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.from_numpy(w.copy()))
            self.b = nn.Parameter(torch.from_numpy(b.copy()))
            self.register_buffer("running", torch.zeros(w.shape[0], dtype=torch.float64))
            self.inner = nn.Identity().eval()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            z = x @ self.W.T + self.b
            with torch.no_grad():
                self.running += z.detach().mean(dim=0)
            u = torch.rand(z.shape, dtype=z.dtype)
            if fail:
                raise RuntimeError("boom")
            h = BadTanh.apply(z) if bug else torch.tanh(z)
            return self.inner(h * (u >= P_DROP) / (1.0 - P_DROP))

    return Noisy()


def _jax_noisy(w, b, *, bug=False, fail=False, key_in_x=False):
    """`_NumpyNoisy` as a JAX ``(apply_fn, params)`` pair. JAX has no global generator: the
    mask comes from a fixed key, closed over (or, ``key_in_x``, given in ``x = (data, key)``,
    a leaf that is not floating point and passes through). The bug is a ``custom_vjp``."""
    import jax
    import jax.numpy as jnp

    fixed = jax.random.PRNGKey(0)

    @jax.custom_vjp
    def bad_tanh(z):
        return jnp.tanh(z)

    def bad_fwd(z):
        h = jnp.tanh(z)
        return h, h

    def bad_bwd(h, g):
        return (g * (1.0 + h * h),)

    bad_tanh.defvjp(bad_fwd, bad_bwd)

    def apply_fn(params, x):
        data, key = x if key_in_x else (x, fixed)
        z = data @ params["W"].T + params["b"]
        u = jax.random.uniform(key, z.shape, dtype=z.dtype)
        if fail:
            raise RuntimeError("boom")
        h = bad_tanh(z) if bug else jnp.tanh(z)
        return h * (u >= P_DROP) / (1.0 - P_DROP)

    return apply_fn, {"W": w.copy(), "b": b.copy()}


def _noisy(framework: str, *, bug: bool = False, fail: bool = False, **params: np.ndarray):
    """The noisy layer in ``framework`` with its input and target, each the user's own
    object (torch gets tensors). ``params`` overrides ``W`` or ``b``."""
    _need(framework)
    w, b, x, y = _noisy_numbers()
    w, b = params.get("W", w), params.get("b", b)
    if framework == "numpy":
        return _NumpyNoisy(w, b, bug=bug, fail=fail), x, y
    if framework == "torch":
        import torch

        return _torch_noisy(w, b, bug=bug, fail=fail), torch.from_numpy(x), torch.from_numpy(y)
    return _jax_noisy(w, b, bug=bug, fail=fail), x, y


def _lookup(framework: str, *, float_table: bool = True):
    """Rows of a table picked by integer indices ``x`` (an embedding). ``float_table``: the
    table is the model's one floating-point parameter ``E``; else the model has no
    parameters (the table is a constant it holds)."""
    _need(framework)
    table = np.arange(15.0).reshape(5, 3) / 7.0
    idx = np.array([0, 2, 4, 2])
    if framework == "numpy":

        class Lookup:
            def __init__(self):
                self.params = {"E": table.copy()} if float_table else {}
                self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
                self.table = table.copy()

            def forward(self, i):
                self.i = i
                return self.params.get("E", self.table)[i]

            def backward(self, dout):
                if "E" in self.params:
                    grad = np.zeros_like(self.params["E"])
                    np.add.at(grad, self.i, dout)
                    self.grads["E"] = grad

        return Lookup(), idx
    if framework == "torch":
        import torch
        from torch import nn

        class TorchLookup(nn.Module):
            def __init__(self):
                super().__init__()
                if float_table:
                    self.E = nn.Parameter(torch.from_numpy(table.copy()))
                else:
                    self.register_buffer("E", torch.from_numpy(table.copy()))

            def forward(self, i):
                return self.E[i]

        return TorchLookup(), torch.from_numpy(idx)
    import jax.numpy as jnp

    if float_table:
        return (lambda p, i: jnp.asarray(p["E"])[i], {"E": table.copy()}), idx
    return (lambda p, i: jnp.asarray(table)[i], {}), idx


def _report_data(report) -> dict:
    data = report.to_dict()
    data.pop("elapsed", None)
    return data


# =========================================================================== named losses
@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_adapter_computes_every_named_loss_as_numpy_defines_it(framework, name):
    """The oracle: `gradcheck._losses.NUMPY_LOSSES`, on the same numbers."""
    out, y = _numbers(name)
    want = numpy_loss(name)[0](out, y)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        from gradcheck.adapters import torch as torch_adapter

        value = torch_adapter._named_loss(name, torch.from_numpy(out), torch.from_numpy(y))
        got = float(value(torch.from_numpy(out)))
    else:
        pytest.importorskip("jax")
        from gradcheck.adapters import jax as jax_adapter

        with jax_adapter._scope():
            got = float(jax_adapter.jax_loss(name)(out, y))
    assert got == pytest.approx(want, rel=1e-13)


# =========================================================================== state untouched
def _bits(value) -> object:
    """A comparable, exact image of ``value``: arrays and tensors as dtype, shape, flags and
    bytes; containers element by element."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.flags.writeable, value.tobytes())
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_bits(v) for v in value)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach().cpu()
        return (
            "tensor",
            str(t.dtype),
            tuple(t.shape),
            value.requires_grad,
            t.numpy().tobytes() if t.numel() else b"",
            None if value.grad is None else _bits(value.grad),
        )
    return value


def _model_state(framework: str, model) -> object:
    """Everything of the user's model a check could change: parameters and buffers
    bit for bit, the torch train/eval flags and ``.grad``, the NumPy model's attributes."""
    if framework == "numpy":
        return {k: _bits(v) for k, v in vars(model).items()}
    if framework == "torch":
        return {
            "params": {n: _bits(p) for n, p in model.named_parameters()},
            "buffers": {n: _bits(t) for n, t in model.named_buffers()},
            "training": [(n, m.training) for n, m in model.named_modules()],
            "calls": model.calls,
        }
    apply_fn, params = model
    return {
        "apply_fn": apply_fn,
        "params": _bits(params),
        "ids": {k: id(v) for k, v in params.items()},
    }


def _global_rngs() -> object:
    """Python's, NumPy's global and torch's default generator states (where imported)."""
    import random
    import sys

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"random": random.getstate(), "numpy": (kind, keys.tobytes(), pos, has_gauss, gauss)}
    if "torch" in sys.modules:
        import torch

        state["torch"] = torch.random.get_rng_state().numpy().tobytes()
    return state


@pytest.fixture
def seeded_rngs():
    """Known global generator states for the test, the previous ones put back after it."""
    import random
    import sys

    saved_random, saved_numpy = random.getstate(), np.random.get_state()
    torch = sys.modules.get("torch")
    saved_torch = torch.random.get_rng_state() if torch is not None else None
    random.seed(5)
    np.random.seed(5)
    if torch is not None:
        torch.manual_seed(5)
    yield
    random.setstate(saved_random)
    np.random.set_state(saved_numpy)
    if torch is not None and saved_torch is not None:
        torch.random.set_rng_state(saved_torch)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", ["passes", "planted_bug", "model_raises"])
def test_the_users_state_is_untouched(framework, case, seeded_rngs):
    """Oracle: images taken before the check. After a passing check, a failing one and one
    whose model raises, the parameters and buffers are bit-identical, torch's train/eval flags
    and ``.grad`` are as they were, the input and target are unchanged, and Python's, NumPy's
    global and torch's default generators are exactly where they were (the models draw from
    their framework's generator, and the raising one raises after it drew)."""
    model, x, y = _noisy(framework, bug=case == "planted_bug", fail=case == "model_raises")
    if framework == "torch":
        import torch

        x.requires_grad_(True)  # the user's input is a leaf of theirs: its .grad stays None
        torch.rand(3)  # the generator has moved away from its seed
    np.random.random(3)
    before = (_model_state(framework, model), _bits(x), _bits(y), _global_rngs())
    if case == "model_raises":
        with pytest.raises(ModelError):
            check_gradients(model, x, y, loss="mse")
    else:
        report = check_gradients(model, x, y, loss="mse")
        assert report.passed == (case == "passes"), str(report)
    after = (_model_state(framework, model), _bits(x), _bits(y), _global_rngs())
    for what, old, new in zip(("model", "x", "y", "global RNGs"), before, after, strict=True):
        assert new == old, f"{framework}: the check changed the {what}"


# =========================================================================== randomness reset
@pytest.mark.parametrize("framework", [*FRAMEWORKS, "jax_key_in_x"])
def test_a_random_forward_passes_with_the_same_report_whatever_the_callers_rng(framework):
    """Oracle: the report of the same check run again. Dropout from the framework's usual
    generator passes: NumPy's global generator, torch's default one (both reset before every
    evaluation to a state derived from ``seed``), and for JAX a fixed key, the JAX norm (JAX
    has no global generator to reset: a model holds or is given its key, closed over or as a
    non-float leaf of ``x``, and the adapter passes it through unchanged). The report is the
    same twice, after the caller's generators were seeded differently (a reset that went
    back to the caller's state would give other masks, other numbers); a bug still fails."""
    import random
    import sys

    fw = "jax" if framework == "jax_key_in_x" else framework
    model, x, y = _noisy(fw)
    buggy, _, _ = _noisy(fw, bug=True)
    if framework == "jax_key_in_x":
        import jax

        w, b, _, _ = _noisy_numbers()
        model = _jax_noisy(w, b, key_in_x=True)
        buggy = _jax_noisy(w, b, bug=True, key_in_x=True)
        x = (x, jax.random.PRNGKey(0))
    reports = []
    saved = (random.getstate(), np.random.get_state())
    torch = sys.modules.get("torch")
    saved_torch = torch.random.get_rng_state() if torch is not None else None
    try:
        for caller_seed in (1, 2):
            random.seed(caller_seed)
            np.random.seed(caller_seed)
            if torch is not None:
                torch.manual_seed(caller_seed)
            reports.append(check_gradients(model, x, y, loss="mse", wrt="params", seed=3))
        failing = check_gradients(buggy, x, y, loss="mse", wrt="params", seed=3)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        if torch is not None and saved_torch is not None:
            torch.random.set_rng_state(saved_torch)
    assert reports[0].passed, str(reports[0])
    assert _report_data(reports[1]) == _report_data(reports[0])
    assert not failing.passed and {b.name for b in failing.failed_blocks} >= {"W"}, str(failing)


# =========================================================================== y=None projections
_CANONICAL = {
    "layers.0.weight": "W0",
    "layers.0.bias": "b0",
    "layers.1.weight": "W1",
    "layers.1.bias": "b1",
}


def _numeric_by_block(report) -> dict[str, np.ndarray]:
    """``report.numeric`` split by block, keyed by the reference's names (torch names its
    blocks as ``named_parameters()`` does; the layout differs, the entries do not)."""
    parts, offset = {}, 0
    for block in report.blocks:
        size = int(np.prod(block.shape))
        name = _CANONICAL.get(block.name, block.name)
        parts[name] = report.numeric[offset : offset + size].reshape(block.shape)
        offset += size
    return parts


@pytest.mark.parametrize("seed", [0, 2**64 - 1])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_y_none_projects_the_output_identically_in_every_adapter(framework, seed):
    """Oracle: the NumPy reference MLP, projected by hand with
    `gradcheck._problem.output_projection` (loss ``sum(out * r)``) and differentiated by its
    hand-written backward (``dout = r``). Every adapter's loss at theta0 is that number to
    round-off, and its numeric gradients (full mode, every block) agree with it and with the
    NumPy adapter's to round-off."""
    from gradcheck._dispatch import select_adapter
    from gradcheck._problem import output_projection
    from gradcheck.reference import MLP

    mlp = MLP([3, 4, 2], activation="tanh", seed=4)
    x = np.random.default_rng(4).normal(size=(5, 3))
    oracle = MLP([3, 4, 2], activation="tanh", seed=4)
    out = oracle.forward(x)
    r = output_projection(out.shape, seed, 0)
    want_loss = float(np.sum(out * r))
    dx = oracle.backward(r)
    exact = {**oracle.grads, "input": dx}

    _need(framework)
    model, xx = mlp, x
    if framework == "torch":
        import torch

        model, xx = mlp.to_torch(), torch.from_numpy(x)
    elif framework == "jax":
        model = mlp.to_jax()
    problem = select_adapter(model, xx).build_problem(
        model, xx, None, loss=None, wrt="all", seed=seed
    )
    assert problem.loss(problem.theta0) == pytest.approx(want_loss, rel=1e-13, abs=1e-15)

    report = check_gradients(model, xx, None, mode="full", seed=seed)
    assert report.passed, str(report)
    numeric = _numeric_by_block(report)
    reference = _numeric_by_block(check_gradients(mlp, x, None, mode="full", seed=seed))
    assert set(numeric) == set(exact) == set(reference)
    for name, values in numeric.items():
        np.testing.assert_allclose(values, reference[name], rtol=1e-7, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(values, exact[name], rtol=1e-6, atol=1e-8, err_msg=name)


# =========================================================================== same mistake, same words
# When an adapter's error says *when* the model raised, that clause is the only part of a
# message compared loosely: it describes how each framework runs the model, not the mistake.
# torch evaluates eagerly and says "at the starting point" (or "during the check"); JAX runs
# the forward's Python once, tracing it with abstract values, and says "while JAX traced it";
# the NumPy adapter is evaluated by the core and says nothing of when (its wording is pinned
# by tests/test_trust.py). Everything else must be the same text.
_WHEN = re.compile(
    r"^(the model's forward|the model's backward|the loss) raised "
    r"(?:(?:at the starting point|near the starting point|during the check"
    r"|while JAX traced it|while JAX evaluated it): )?"
)


def _same_words(message: str) -> str:
    return _WHEN.sub(r"\1 raised ", message)


def _wrong_y_shape(fw):
    model, x, y = _noisy(fw)
    return model, x, y[:, :2], {"loss": "mse"}


def _named_loss_without_y(name):
    def make(fw):
        model, x, _ = _noisy(fw)
        return model, x, None, {"loss": name}

    return make


def _inputs_of_integer_x(fw):
    model, idx = _lookup(fw)
    return model, idx, None, {"wrt": "inputs"}


def _inputs_of_no_x(fw):
    model, _, _ = _noisy(fw)
    return model, None, None, {"wrt": "inputs"}


def _integer_x_only(wrt):
    def make(fw):
        model, idx = _lookup(fw, float_table=False)
        return model, idx, None, {"wrt": wrt}

    return make


def _forward_raises(fw):
    model, x, y = _noisy(fw, fail=True)
    return model, x, y, {"loss": "mse"}


def _one_shot(which):
    def make(fw):
        model, x, y = _noisy(fw)
        if which == "x":
            return model, iter([x]), y, {}
        return model, x, (row for row in y), {}

    return make


def _non_finite(bad):
    def make(fw):
        w, _, _, _ = _noisy_numbers()
        w = w.copy()
        w[1, 0] = bad
        model, x, y = _noisy(fw, W=w)
        return model, x, y, {"loss": "mse"}

    return make


_ONE_SHOT = "x must be an array, a tuple, list or dict of arrays, or None; got a {}, which can "
MISTAKES = [
    # (id, make(framework) -> (model, x, y, options), exception, message, {framework: xfail})
    (
        "mse_with_y_of_the_wrong_shape",
        _wrong_y_shape,
        ShapeMismatchError,
        "loss 'mse' needs y of the output's shape (4, 3); got (4, 2)",
        {},
    ),
    (
        "a_loss_name_with_y_none",
        _named_loss_without_y("mse"),
        InvalidOptionError,
        "loss 'mse' needs a target y; got y=None",
        {},
    ),
    (
        "an_alias_with_y_none_is_named_canonically",
        _named_loss_without_y("binary_crossentropy"),
        InvalidOptionError,
        "loss 'bce' needs a target y; got y=None",
        {},
    ),
    (
        "wrt_inputs_with_integer_x",
        _inputs_of_integer_x,
        NothingToCheckError,
        "nothing to check with wrt='inputs': x holds no floating-point array",
        {},
    ),
    (
        "wrt_inputs_with_no_x",
        _inputs_of_no_x,
        NothingToCheckError,
        "nothing to check with wrt='inputs': x holds no floating-point array",
        {},
    ),
    (
        "integer_x_and_no_float_parameters",
        _integer_x_only("all"),
        NothingToCheckError,
        "nothing to check with wrt='all': the model has no floating-point parameters and x "
        "holds no floating-point array",
        {},
    ),
    (
        "wrt_params_and_no_float_parameters",
        _integer_x_only("params"),
        NothingToCheckError,
        "nothing to check with wrt='params': the model has no floating-point parameters",
        {},
    ),
    (
        "a_forward_that_raises",
        _forward_raises,
        ModelError,
        "the model's forward raised RuntimeError: boom",
        {},
    ),
    (
        "a_one_shot_iterator_as_x",
        _one_shot("x"),
        InvalidOptionError,
        _ONE_SHOT.format("list_iterator") + "be iterated only once (pass a tuple or list)",
        {},
    ),
    (
        "a_generator_as_y",
        _one_shot("y"),
        InvalidOptionError,
        _ONE_SHOT.format("generator").replace("x must", "y must")
        + "be iterated only once (pass a tuple or list)",
        {},
    ),
    (
        "an_infinite_parameter",
        _non_finite(np.inf),
        NonFiniteError,
        "`W` is not finite at the starting point (entry (1, 0) is inf); check at finite values",
        {},
    ),
    (
        "a_nan_parameter",
        _non_finite(np.nan),
        NonFiniteError,
        "`W` is not finite at the starting point (entry (1, 0) is nan); check at finite values",
        {},
    ),
]


@pytest.mark.parametrize(
    ("framework", "make", "error", "message"),
    [
        pytest.param(
            fw,
            make,
            error,
            message,
            id=f"{case}-{fw}",
            marks=[pytest.mark.xfail(strict=True, reason=xfail[fw])] if fw in xfail else [],
        )
        for case, make, error, message, xfail in MISTAKES
        for fw in FRAMEWORKS
    ],
)
def test_the_same_mistake_gets_the_same_type_and_words_in_every_adapter(
    framework, make, error, message
):
    """Oracle: the message written out here, which every adapter gives word for word (the
    clause saying *when* the model raised aside, see `_WHEN`). The models are the same
    numbers in each framework, their parameters named alike (``W``, ``b``, ``E``)."""
    model, x, y, options = make(framework)
    with pytest.raises(GradcheckInputError) as info:
        check_gradients(model, x, y, **options)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert _same_words(str(info.value)) == message


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_integer_inputs_pass_through_unchecked_in_every_adapter(framework):
    """Oracle: the table's gradient is a count of picks, exact in floating point. With
    ``wrt="all"`` an integer ``x`` is passed to the model as it is and only the parameter is
    a block, in every adapter."""
    model, idx = _lookup(framework)
    report = check_gradients(model, idx, None, mode="full")
    assert report.passed, str(report)
    assert [(b.name, b.shape, b.kind) for b in report.blocks] == [("E", (5, 3), "param")]


def test_the_contract_page_names_a_conformance_test_for_a_rule_only_if_it_exists():
    """Oracle: this module. Every ``test_...`` that docs/adapters.md's "What an adapter must
    do" names is a test here, and every test here is named there."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "adapters.md").read_text(encoding="utf-8")
    section = page.split("## What an adapter must do", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    here = {name for name in globals() if name.startswith("test_")}
    assert named <= here, f"the page names tests that do not exist: {sorted(named - here)}"
    left_out = (
        here
        - named
        - {
            "test_a_name_missing_from_a_table_is_an_error_never_another_loss",
            "test_the_contract_page_names_a_conformance_test_for_a_rule_only_if_it_exists",
        }
    )
    assert not left_out, f"the page does not say which rule these check: {sorted(left_out)}"


# ------------------------------------------------------------------------- several inputs
class _Received(Exception):
    """Raised by a recording model once it has seen its arguments (no check needed)."""


def _shape_of(value) -> object:
    """What a model received, as a comparable outline: ``"array"``, a tuple or dict of outlines."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_shape_of(v) for v in value)
    if isinstance(value, dict):
        return {k: _shape_of(v) for k, v in value.items()}
    return "array" if hasattr(value, "shape") else type(value).__name__


def _recording(framework: str, signature: str, seen: dict):
    """A model of ``framework`` whose call has ``signature`` (after ``self``/``params``): it
    records the outline of what it received in ``seen`` and raises `_Received`."""
    lead = {"numpy": "self, ", "jax_pair": "params, "}.get(framework, "")
    namespace: dict = {"seen": seen, "_Received": _Received, "_shape_of": _shape_of}
    exec(  # a signature written out in the parametrisation below, nothing from outside
        f"def call({lead}{signature}):\n"
        "    got = dict(locals())\n"
        "    got.pop('self', None); got.pop('params', None)\n"
        "    seen.update({k: _shape_of(v) for k, v in got.items()})\n"
        "    raise _Received\n",
        namespace,
    )
    call = namespace["call"]
    if framework == "numpy":
        model = type("Recording", (), {"forward": call, "backward": lambda self, dout: dout})()
        model.params = {"w": np.ones(2)}
        model.grads = {"w": np.zeros(2)}
        return model
    if framework == "jax_pair":
        import jax.numpy as jnp

        return (call, {"w": jnp.ones(2)})
    return call


def _as_arrays(framework: str, x):
    if framework == "torch":
        import torch

        convert = torch.from_numpy
    elif framework.startswith("jax"):
        import jax.numpy as jnp

        convert = jnp.asarray
    else:
        return x
    if isinstance(x, tuple):
        return tuple(convert(v) for v in x)
    if isinstance(x, dict):
        return {k: convert(v) for k, v in x.items()}
    return convert(x)


_A, _B = np.arange(3.0), np.arange(2.0)


@pytest.mark.parametrize("framework", [*FRAMEWORKS, "jax_pair"])
@pytest.mark.parametrize(
    "signature, x, received",
    [
        ("a, b", (_A, _B), {"a": "array", "b": "array"}),
        ("inputs", (_A, _B), {"inputs": ("array", "array")}),
        ("x, mask=None", (_A, _B), {"x": ("array", "array"), "mask": None}),
        ("x, mask=None", {"x": _A, "mask": _B}, {"x": "array", "mask": "array"}),
        ("batch", {"p": _A, "q": _B}, {"batch": {"p": "array", "q": "array"}}),
        ("inputs", (_A,), {"inputs": "array"}),
        ("*xs", (_A, _B), {"xs": ("array", "array")}),
    ],
    ids=[
        "spread",
        "one-container",
        "optional-not-filled",
        "dict-keywords",
        "dict-one",
        "one-tuple",
        "varargs",
    ],
)
def test_several_inputs_reach_every_adapters_model_by_one_rule(framework, signature, x, received):
    """Oracle: the rule as written in `gradcheck._calls` and on every framework page (a tuple
    spreads when the call requires several positional arguments or takes ``*args``; a dict is
    keywords when its keys name parameters; a 1-tuple always spreads), applied to a model that
    records what it receives: the same outline in every adapter."""
    _need("jax" if framework == "jax_pair" else framework)
    seen: dict = {}
    model = _recording(framework, signature, seen)
    with pytest.raises(ModelError):
        check_gradients(model, _as_arrays(framework, x))
    assert seen == received


@pytest.mark.parametrize("framework", ["jax_pair", "numpy"])  # plain functions need an x
@pytest.mark.parametrize(
    "signature, received", [("x", {"x": None}), ("x=1", {"x": "int"}), ("", {})]
)
def test_no_input_reaches_the_model_as_none_only_where_it_needs_an_argument(
    framework, signature, received
):
    """Oracle: the rule for ``x=None`` (`gradcheck._calls`): a call that requires a positional
    parameter gets ``None``; any other gets no argument (its defaults stand)."""
    _need("jax" if framework == "jax_pair" else framework)
    seen: dict = {}
    with pytest.raises(ModelError):
        check_gradients(_recording(framework, signature, seen), None)
    assert seen == received


def _needs_a_mask(framework: str):
    """A model of ``framework`` whose call is ``(x, mask=None)`` and which fails on a tuple."""
    if framework == "numpy":

        class Masked:
            params = {"w": np.ones(3)}
            grads = {"w": np.zeros(3)}

            def forward(self, x, mask=None):
                return x.reshape(3) * self.params["w"]

            def backward(self, dout):
                return dout

        return Masked()
    if framework == "torch":
        import torch

        class MaskedModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

            def forward(self, x, mask=None):
                return x.reshape(3) * self.w

        return MaskedModule()
    import jax.numpy as jnp

    return (lambda p, x, mask=None: x.reshape(3) * p["w"], {"w": jnp.ones(3)})


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_input_that_went_as_one_argument_is_explained_in_the_models_error(framework):
    """Oracle: the rule (`gradcheck._calls`): a tuple does not fill ``mask=None``; when the model
    then raises on its input, every adapter's error says how x was passed and what to do."""
    _need(framework)
    x = tuple(_as_arrays(framework, (np.ones(3), np.ones(3))))
    with pytest.raises(ModelError) as info:
        check_gradients(_needs_a_mask(framework), x)
    assert "went to the call as its one argument `x`" in str(info.value)
    assert "x={'x': ..., ...}" in str(info.value)
