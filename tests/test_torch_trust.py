"""The torch adapter on real code (issue "Trust on real code").

Each class of failure has several variants, each against a small model of ours, with one
of two oracles: an independent autograd computation of the same gradient, or the correct
model known to pass beside a planted bug known to fail with its block named.

1. the caller's grad mode (no_grad, inference_mode, set_grad_enabled(False)) is irrelevant;
2. a backward that calls the module again (adjoint methods, re-entrant checkpoints);
3. only a dtype error in the float64 attempt falls back to the model's own precision;
4. tensors handed to user code are fresh (in-place changes cannot leak);
5. the check runs on a copy: the user's module is bit-identical afterwards;
6. concurrent checks in threads neither interfere nor leave the RNG changed;
7. bad input is a one-line gradcheck error;
8. an error says whether the forward, the loss or the backward raised.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

adapter = pytest.importorskip("gradcheck.adapters.torch")

from stability import assert_stable, in_threads  # noqa: E402
from torch_models import FnLinear, WithStatistic  # noqa: E402

from gradcheck import Report, check_flat, check_gradients  # noqa: E402
from gradcheck._problem import FlatProblem, output_projection  # noqa: E402
from gradcheck._state import GLOBAL_STATE  # noqa: E402
from gradcheck.errors import InvalidOptionError, ModelError, NothingToCheckError  # noqa: E402

f64 = torch.float64


# ------------------------------------------------------------------ helpers
def failed(report: Report) -> list[str]:
    return [b.name for b in report.failed_blocks]


def data(report: Report) -> dict[str, Any]:
    d = report.to_dict()
    d.pop("elapsed", None)
    return d


def build(model: Any, x: Any, y: Any = None, **kw: Any) -> FlatProblem:
    kw.setdefault("loss", None)
    return adapter.build_problem(model, x, y, **kw)


def autograd_gradient(
    model: nn.Module, x: torch.Tensor, project: bool = True
) -> tuple[np.ndarray, float]:
    """The oracle: the gradient of ``sum(model(x) * r)`` by plain autograd on a float64 copy,
    parameters (``named_parameters`` order) then the input."""
    import copy

    twin = copy.deepcopy(model).double()
    leaf = x.detach().to(f64).requires_grad_(True)
    with torch.enable_grad():
        out = twin(leaf)
        r = torch.from_numpy(output_projection(tuple(out.shape), 0, 0))
        value = (out * r).sum()
        params = list(twin.parameters())
        grads = torch.autograd.grad(value, [*params, leaf], allow_unused=True)
    flat = [
        (torch.zeros_like(t) if g is None else g).reshape(-1)
        for g, t in zip(grads, [*params, leaf], strict=True)
    ]
    return torch.cat(flat).numpy(), float(value.detach())


CONTEXTS: dict[str, Callable[[], Any]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "set_grad_enabled(False)": lambda: torch.set_grad_enabled(False),
}


# ------------------------------------------------------------------ small models
def custom_net(bug: str = "none", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(FnLinear(4, 5, bug), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 3))


class EulerAdjoint(torch.autograd.Function):
    """``y(1)`` of ``dy/dt = func(y)`` by ``steps`` Euler steps, differentiated by the adjoint
    method as torchdiffeq's ``odeint_adjoint`` does: the forward runs without a graph and takes
    ``func``'s parameters as inputs; the backward calls ``func`` again at each saved state and
    differentiates with respect to those parameters. ``bug``: "weight" scales the gradient of
    the first parameter by 1.01, "input" the gradient of ``y0``."""

    @staticmethod
    def forward(
        ctx: Any, y0: torch.Tensor, func: nn.Module, steps: int, bug: str, *params: torch.Tensor
    ) -> torch.Tensor:
        h = 1.0 / steps
        states = [y0]
        with torch.no_grad():
            y = y0
            for _ in range(steps):
                y = y + h * func(y)
                states.append(y)
        ctx.func, ctx.steps, ctx.bug = func, steps, bug
        ctx.save_for_backward(*states[:-1], *params)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        states, params = saved[: ctx.steps], saved[ctx.steps :]
        h = 1.0 / ctx.steps
        adjoint = g
        totals = [torch.zeros_like(p) for p in params]
        for y in reversed(states):
            with torch.enable_grad():
                y = y.detach().requires_grad_(True)
                vjp = torch.autograd.grad(ctx.func(y), (y, *params), adjoint, allow_unused=True)
            adjoint = adjoint + h * vjp[0]
            totals = [t if v is None else t + h * v for t, v in zip(totals, vjp[1:], strict=True)]
        if ctx.bug == "weight":
            totals[0] = totals[0] * 1.01
        elif ctx.bug == "input":
            adjoint = adjoint * 1.01
        return (adjoint, None, None, None, *totals)


class NeuralODE(nn.Module):
    def __init__(self, bug: str = "none", steps: int = 4, adjoint: bool = True) -> None:
        super().__init__()
        self.func = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        self.head = nn.Linear(3, 2)
        self.bug, self.steps, self.adjoint = bug, steps, adjoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adjoint:
            params = tuple(self.func.parameters())
            y = EulerAdjoint.apply(x, self.func, self.steps, self.bug, *params)
        else:  # the same integration, differentiated by autograd (the oracle)
            y = x
            for _ in range(self.steps):
                y = y + self.func(y) / self.steps
        return self.head(y)


class Checkpointed(nn.Module):
    """A block recomputed in backward by ``torch.utils.checkpoint`` (re-entrant or not)."""

    def __init__(self, bug: str = "none", reentrant: bool = True, use: bool = True) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 5)
        self.block = nn.Sequential(FnLinear(5, 5, bug), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(5, 2)
        self.reentrant, self.use = reentrant, use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if not self.use:  # the oracle: the same block, kept in the graph
            return self.head(self.block(h))
        return self.head(checkpoint(self.block, h, use_reentrant=self.reentrant))


# ------------------------------------------------------------------ 1. grad mode of the caller
@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("context", list(CONTEXTS))
def test_the_callers_grad_mode_does_not_change_the_report(context: str, where: str) -> None:
    # oracle: the same check with autograd on, on a model and input built the same way
    def made() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        model = custom_net()
        return model, torch.randn(6, 4), torch.randint(0, 3, (6,))

    plain = check_gradients(*made(), loss="cross_entropy")
    assert plain.passed, str(plain)
    if where == "outside":
        model, x, labels = made()
    with CONTEXTS[context]():
        if where == "inside":  # parameters and input made in the context (inference tensors)
            model, x, labels = made()
        report = check_gradients(model, x, labels, loss="cross_entropy")
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
        assert torch.is_inference_mode_enabled() == (context == "inference_mode")
    assert data(report) == data(plain)


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("bug", ["one_entry", "bias"])
def test_a_planted_bug_fails_in_every_grad_mode(context: str, bug: str) -> None:
    with CONTEXTS[context]():
        model = custom_net(bug)
        x = torch.randn(6, 4)
        report = check_gradients(model, x, torch.randn(6, 3))
    expected = {"one_entry": ["0.weight"], "bias": ["0.bias"]}[bug]
    assert failed(report) == expected, str(report)


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_gradient_loss_and_batches_equal_autograd_in_every_grad_mode(context: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    expected, value = autograd_gradient(model, x)
    with CONTEXTS[context]():
        problem = build(model, x)
        assert problem.batching == "loop" and problem.prepare is not None  # not chosen yet
        problem = problem.prepare(2 * problem.size + 2)  # as a full check: chosen here
        assert problem.batching == "vmap"  # the batching choice does not change either
        assert problem.precision == "float64"  # nor the dtype probe
        np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=1e-12)
        assert problem.loss(problem.theta0) == pytest.approx(value, rel=1e-13)
        assert problem.loss_batch is not None
        rows = np.stack([problem.theta0, problem.theta0 + 1e-3])
        np.testing.assert_allclose(
            problem.loss_batch(rows), [problem.loss(r) for r in rows], rtol=1e-12
        )


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_reducer_fallbacks_and_losses_in_every_grad_mode(context: str) -> None:
    def needs_float32(t: torch.Tensor) -> torch.Tensor:
        return t @ torch.ones(3, 2)  # a float32 tensor made inside: float64 is impossible

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    x64, x43 = torch.randn(4, dtype=f64), torch.randn(4, 3)

    def penalised(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        first = model[0]
        assert isinstance(first, nn.Linear)
        return ((out - target) ** 2).mean() + 0.1 * first.weight.square().sum()

    runs = {
        "declared non-differentiable output": lambda: check_gradients(WithStatistic, x64),
        "float32 fallback": lambda: check_gradients(needs_float32, x43),
        "loss callable reading the module": lambda: check_gradients(model, x, y, loss=penalised),
        "wrt inputs": lambda: check_gradients(model, x, wrt="inputs"),
    }
    for name, run in runs.items():
        plain = run()
        assert plain.passed, f"{name}: {plain}"
        with CONTEXTS[context]():
            assert data(run()) == data(plain), name


def test_inference_tensors_made_by_the_user_are_checked_outside_the_context() -> None:
    with torch.inference_mode():
        model = custom_net("one_entry")
        x = torch.randn(6, 4, dtype=f64)
        assert x.is_inference() and next(model.parameters()).is_inference()
        idx = torch.tensor([0, 2, 1, 0, 2, 1])
    report = check_gradients(model, x, idx, loss="cross_entropy")
    assert failed(report) == ["0.weight"], str(report)
    correct = check_gradients(custom_net().double(), x, idx, loss="cross_entropy")
    assert correct.passed, str(correct)

    with torch.inference_mode():  # an embedding saves its (inference) indices for backward
        emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
        tokens = torch.tensor([[1, 4], [4, 0]])
    assert check_gradients(emb, tokens).passed


# ------------------------------------------------------------------ 2. backward calls the module
@pytest.mark.parametrize(
    ("bug", "expected"), [("none", []), ("weight", ["func.0.weight"]), ("input", ["input"])]
)
def test_adjoint_method_that_calls_the_module_in_backward(bug: str, expected: list[str]) -> None:
    torch.manual_seed(3)
    model = NeuralODE(bug)
    x = torch.randn(5, 3)
    report = check_gradients(model, x)
    assert failed(report) == expected, str(report)
    assert report.precision == "float64"


def test_adjoint_gradient_equals_autograd_through_the_same_integration() -> None:
    torch.manual_seed(4)
    model = NeuralODE(steps=6)
    x = torch.randn(4, 3)
    model.adjoint = False
    expected, value = autograd_gradient(model, x)
    model.adjoint = True
    problem = build(model, x)
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=1e-10, atol=1e-14)
    assert problem.loss(problem.theta0) == pytest.approx(value, rel=1e-12)


def test_adjoint_model_is_stable_under_every_condition() -> None:
    torch.manual_seed(5)
    model = NeuralODE()
    x = torch.randn(4, 3)
    report = assert_stable(lambda: check_gradients(model, x, mode="full"))
    assert report.passed, str(report)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize(
    ("bug", "expected"),
    [("none", []), ("one_entry", ["block.0.weight"]), ("bias", ["block.0.bias"])],
)
def test_checkpointed_block_recomputed_in_backward(
    reentrant: bool, bug: str, expected: list[str]
) -> None:
    torch.manual_seed(6)
    model = Checkpointed(bug, reentrant=reentrant)
    report = check_gradients(model, torch.randn(6, 3), torch.randn(6, 2))
    assert failed(report) == expected, str(report)


def test_checkpoint_gradient_equals_autograd_without_the_checkpoint() -> None:
    torch.manual_seed(7)
    model = Checkpointed()
    model.block[2].eval()  # no dropout: the oracle's own RNG draws differ
    x = torch.randn(6, 3)
    model.use = False
    expected, value = autograd_gradient(model, x)
    model.use = True
    problem = build(model, x)
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=1e-12)
    assert problem.loss(problem.theta0) == pytest.approx(value, rel=1e-13)
    report = assert_stable(lambda: check_gradients(model, x))
    assert report.passed, str(report)


def test_reentrant_checkpoint_leaves_the_users_own_leaves_alone() -> None:
    # .backward() (which a re-entrant checkpoint needs) would accumulate into every leaf
    scale = torch.tensor(1.5, requires_grad=True)
    offset = torch.zeros(2, requires_grad=True)
    offset.grad = torch.ones(2)
    torch.manual_seed(8)
    inner = Checkpointed()

    def model(t: torch.Tensor) -> torch.Tensor:
        return inner(t) * scale + offset

    report = check_gradients(model, torch.randn(4, 3))
    assert report.passed, str(report)
    assert scale.grad is None
    assert torch.equal(offset.grad, torch.ones(2))


# ------------------------------------------------------------------ 3. float64 or not
class RaisesOnce(nn.Module):
    """Raises on its first call (a warm-up, a lazy cache); right afterwards. Its custom
    layer's bias gradient is 0.05% off: float64 sees it, float32 cannot."""

    def __init__(self, where: str = "forward") -> None:
        super().__init__()
        self.layer = FnLinear(4, 3, "bias")
        self.where = where
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.where == "forward" and self.calls == 1:
            raise RuntimeError("not warmed up yet")
        out = self.layer(x)
        if self.where == "backward" and self.calls == 1:
            out = _RaiseInBackward.apply(out)
        return out


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward not warmed up yet")


def test_an_error_in_the_float64_attempt_is_the_models_not_a_float32_pass() -> None:
    torch.manual_seed(9)
    model = RaisesOnce("forward")  # float32, so a float32 attempt would follow
    x = torch.randn(5, 4)
    with pytest.raises(ModelError) as info:
        check_gradients(model, x)
    assert str(info.value) == (
        "the model's forward raised at the starting point: RuntimeError: not warmed up yet"
    )
    assert model.calls == 0  # the user's module never ran (see 5.)
    # oracle: past the warm-up error the float64 check sees the 0.05% bug
    model.calls = 1
    report = check_gradients(model, x)
    assert failed(report) == ["layer.bias"], str(report)
    assert report.precision == "float64"


def test_a_backward_that_raises_once_is_retried_in_float64_and_said() -> None:
    # autograd.grad raised, .backward() (tried for re-entrant checkpoints) did not: the
    # check goes on in float64 (the 0.05% bug is seen) and the report says what happened
    torch.manual_seed(9)
    report = check_gradients(RaisesOnce("backward"), torch.randn(5, 4))
    assert failed(report) == ["layer.bias"], str(report)
    assert report.precision == "float64"
    assert any(
        w.startswith(
            "torch.autograd.grad could not differentiate the model (the model's "
            "backward raised RuntimeError: backward not warmed up yet)"
        )
        for w in report.warnings
    ), report.warnings


def test_a_loss_that_raises_once_is_a_model_error() -> None:
    calls = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first batch")
        return ((out - y) ** 2).mean()

    with pytest.raises(
        ModelError,
        match=re.escape("the loss raised at the starting point: ValueError: first batch"),
    ):
        check_gradients(nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2), loss=loss)


class MixesFloat32(nn.Module):
    """Makes float32 tensors inside and mixes them with its input, as real code does."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.how == "matmul":
            return h @ torch.eye(3, dtype=torch.float32)
        if self.how == "scatter":
            out = torch.zeros(h.shape, dtype=torch.float32)
            return out.scatter(0, torch.arange(h.shape[0])[:, None].expand(h.shape), h)
        if self.how == "index_put":
            out = torch.zeros(h.shape, dtype=torch.float32)
            out[torch.arange(h.shape[0])] = h
            return out
        return torch.tanh(h.float())  # "cast": the output comes out float32


@pytest.mark.parametrize("how", ["matmul", "scatter", "index_put", "cast"])
def test_a_model_that_needs_float32_is_checked_in_float32_with_a_note(how: str) -> None:
    torch.manual_seed(10)
    model = MixesFloat32(how)
    report = check_gradients(model, torch.randn(5, 4))
    assert report.passed, str(report)
    assert report.precision == "float32"
    (note,) = [w for w in report.warnings if "cannot run in float64" in w]
    if how == "cast":
        assert "its output came out torch.float32" in note
    else:
        assert "the model's forward raised" in note


# ------------------------------------------------------------------ 4. fresh tensors
class ScaleInPlace(torch.autograd.Function):
    """``x * w``; its backward scales ``grad_output`` in place and returns it (correct)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        dw = (grad_output * x).sum(0)
        grad_output *= w  # in place
        return grad_output, dw


class DoubleInPlace(torch.autograd.Function):
    """``2 x`` computed in place on its input (``mark_dirty``), correct."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.mul_(2)


class InPlaceNet(nn.Module):
    def __init__(self, last: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 2)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mul_(1.5)  # changes its input in place
        h = ScaleInPlace.apply(torch.tanh(self.lin(x)), self.w)
        h = DoubleInPlace.apply(h)
        return h if self.last else self.out(h)


@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("loss", ["projection", "mse", "callable"])
def test_in_place_changes_to_inputs_and_grad_outputs_cannot_leak(loss: str, last: bool) -> None:
    torch.manual_seed(11)
    model = InPlaceNet(last)
    x = torch.randn(5, 3)
    x_before = x.clone()
    y = torch.randn(5, 4 if last else 2)
    y_before = y.clone()

    def scaled_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target.mul_(3)  # the target handed to the loss, changed in place
        return ((out - target) ** 2).mean()

    def run(mode: str) -> Report:
        if loss == "projection":
            return check_gradients(model, x, mode=mode)  # type: ignore[arg-type]
        chosen = scaled_mse if loss == "callable" else "mse"
        return check_gradients(model, x, y, loss=chosen, mode=mode)  # type: ignore[arg-type]

    for mode in ("full", "fast"):
        report = run(mode)
        assert report.passed, str(report)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert_stable(lambda: run("full"), threads=False)


def test_a_forward_that_changes_an_unchecked_input_in_place() -> None:
    def model(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b.add_(1.0)  # not checked (wrt="params" below) and changed every call
        idx.add_(1)
        return (a * b).sum() + idx.sum()

    lin = nn.Linear(3, 1)

    def module_model(t: torch.Tensor) -> torch.Tensor:
        t.add_(1.0)
        return lin(t)

    b = torch.ones(3)
    assert check_gradients(model, (torch.randn(3), b, torch.tensor([1, 2]))).passed
    assert torch.equal(b, torch.ones(3))
    report = check_gradients(_Wrap(module_model, lin), torch.randn(4, 3), wrt="params")
    assert report.passed, str(report)


class _Wrap(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.add_(1.0))


# ------------------------------------------------------------------ 5. a copy, not the module
def module_state(module: nn.Module) -> dict[str, Any]:
    """Everything about a module the check must leave as it was, ``__dict__`` included."""
    state: dict[str, Any] = {}
    for name, sub in module.named_modules():
        for key, value in vars(sub).items():
            if key in ("_parameters", "_buffers"):
                value = {
                    k: None if v is None else (id(v), v.detach().clone(), v.requires_grad, v.grad)
                    for k, v in value.items()
                }
            elif isinstance(value, torch.Tensor):
                value = (id(value), value.detach().clone())
            elif isinstance(value, dict):
                value = {k: id(v) for k, v in value.items()}  # hooks and modules by identity
            elif isinstance(value, list):
                value = [id(v) for v in value]
            state[f"{name}.{key}"] = value
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple) and isinstance(value[1], torch.Tensor):
            assert value[0] == other[0] and torch.equal(value[1], other[1]), key
        elif key.endswith(("._parameters", "._buffers")):
            assert value.keys() == other.keys(), key
            for k, entry in value.items():
                if entry is None:
                    assert other[k] is None, k
                    continue
                ident, tensor, flag, grad = entry
                assert other[k][0] == ident and other[k][2] == flag and other[k][3] is grad, k
                assert torch.equal(other[k][1], tensor), k
        else:
            assert value == other, key


class SideEffects(nn.Module):
    """A forward with side effects of every kind: counters, caches, lists, new attributes
    and buffers, hooks that add state; optionally raising on its ``fail_at``-th call."""

    def __init__(self, fail_at: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=False)  # a bias before a BatchNorm has no gradient
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(4, 2)
        self.calls = 0
        self.history: list[float] = []
        self.fail_at = fail_at
        self.lin.register_forward_hook(self._remember)
        self.out.register_forward_pre_hook(lambda m, args: setattr(m, "seen", args[0].shape))

    @staticmethod
    def _remember(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        module.hooked = out.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.drop(torch.tanh(self.bn(self.lin(x))))
        self.last_out = h  # a cache, part of the graph
        self.history.append(float(h.detach().sum()))
        steps = self._buffers.get("steps")
        if steps is None:  # a buffer registered by the forward
            steps = torch.zeros(())
            self.register_buffer("steps", steps)
        steps.add_(1)
        if self.calls == self.fail_at:
            torch.rand(3)
            raise RuntimeError("boom")
        return self.out(h)


# calls: 1 the gradient at theta0 (building), 2 and 3 the vmap probe of full mode's batching
# choice (a BatchNorm in train mode cannot run under vmap), 4 the check's first evaluation
@pytest.mark.parametrize("fail_at", [0, 1, 4, 7, 60])
def test_the_users_module_is_left_bit_identical(fail_at: int) -> None:
    torch.manual_seed(12)
    model = SideEffects()
    model(torch.randn(5, 3))  # one forward of the user's own: a cached activation with a graph
    model.drop.eval()  # a non-default pattern of flags
    model.calls, model.fail_at = 0, fail_at
    x = torch.randn(6, 3)
    before = module_state(model)
    torch.manual_seed(99)
    rng = torch.get_rng_state()
    if fail_at:
        with pytest.raises(ModelError, match="boom"):
            check_gradients(model, x, mode="full")
    else:
        assert check_gradients(model, x, mode="full").passed
    assert_same_state(before, module_state(model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.calls == 0 and len(model.history) == 1


def test_a_module_that_cannot_be_copied_is_a_one_line_model_error() -> None:
    model = nn.Linear(3, 2)
    model.lock = threading.Lock()  # type: ignore[assignment]
    with pytest.raises(ModelError) as info:
        check_gradients(model, torch.randn(4, 3))
    message = str(info.value)
    assert message.startswith("the module cannot be copied (copy.deepcopy raised TypeError")
    assert "\n" not in message


def test_a_loss_that_reads_the_module_sees_the_evaluated_parameters() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), FnLinear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    before = module_state(model)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        penalty = sum(p.square().sum() for p in model.parameters())
        return ((out - target) ** 2).mean() + 0.05 * penalty

    report = assert_stable(lambda: check_gradients(model, x, y, loss=loss))
    assert report.passed, str(report)
    assert_same_state(before, module_state(model))
    # oracle: autograd of the same loss, on the user's parameters
    problem = build(model, x, y, loss=loss, wrt="params")
    params = [p.detach().double().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    with torch.enable_grad():
        out = torch.func.functional_call(
            model, dict(zip(names, params, strict=True)), (x.double(),)
        )
        value = ((out - y.double()) ** 2).mean() + 0.05 * sum(p.square().sum() for p in params)
        grads = torch.autograd.grad(value, params)
    expected = torch.cat([g.reshape(-1) for g in grads]).numpy()
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=1e-12)


# ------------------------------------------------------------------ 6. threads
def dropout_model() -> nn.Module:
    torch.manual_seed(14)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2))


@pytest.mark.parametrize("shared", [True, False])
def test_concurrent_checks_of_dropout_models_agree_and_restore_the_rng(shared: bool) -> None:
    x = torch.randn(6, 4)
    common = dropout_model()
    models = [common if shared else dropout_model() for _ in range(4)]
    expected = data(check_gradients(common, x, mode="full"))
    torch.manual_seed(2024)
    rng = torch.get_rng_state()

    def work(i: int) -> Any:
        with GLOBAL_STATE:  # what this thread sees as its RNG state
            mine = torch.get_rng_state()
        report = check_gradients(models[i], x, mode="full")
        with GLOBAL_STATE:
            assert torch.equal(torch.get_rng_state(), mine)
        return data(report)

    results = in_threads(work)
    assert results == [expected] * 4
    assert expected["passed"]
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_batching_choice_is_made_once_per_problem_whichever_threads_ask() -> None:
    # full mode's batching choice is made when a check first prepares the problem: checks of
    # one problem in several threads at once share one choice (made under a lock)
    problem = build(dropout_model(), torch.randn(6, 4))
    prepare = problem.prepare
    assert problem.batching == "loop" and prepare is not None
    calls: list[int] = []
    choose = adapter._choose_batching

    def slow(*args: Any) -> Any:
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to ask meanwhile
        return choose(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapter, "_choose_batching", slow)
        prepared = in_threads(lambda i: prepare(2 * problem.size + 2))
        reports = in_threads(lambda i: data(check_flat(problem, mode="full")))
    assert calls == [1]
    assert all(p is prepared[0] for p in prepared) and prepared[0].batching == "vmap"
    assert reports == [reports[0]] * 4 and reports[0]["passed"]
    assert prepare(2) is problem  # fast mode's two evaluations: the problem as built


def test_dropout_batchnorm_model_is_stable() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    report = assert_stable(lambda: check_gradients(model, x, y, mode="full"))
    assert report.passed, str(report)


# ------------------------------------------------------------------ 7. bad input
def test_a_lazy_module_before_its_first_call_is_a_one_line_error() -> None:
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(ModelError) as info:
        check_gradients(model, torch.randn(4, 5))
    assert str(info.value) == (
        "the model has uninitialized (lazy) parameters or buffers (`0.weight`, `0.bias`); "
        "call it once on an input to initialize them before checking"
    )
    model(torch.randn(4, 5))  # initialized: now it can be checked
    assert check_gradients(model, torch.randn(4, 5)).passed


def _gen() -> Iterator[torch.Tensor]:
    yield torch.ones(2)


@pytest.mark.parametrize(
    ("x", "where", "what"),
    [
        (_gen(), "x", "generator"),
        (map(torch.ones, [2]), "x", "map"),
        ((torch.ones(2), iter([torch.ones(2)])), "x[1]", "list_iterator"),
        ({"a": {torch.tensor(1.0)}}, "x['a']", "set"),
    ],
)
def test_a_one_shot_or_unordered_iterable_as_input_is_a_one_line_error(
    x: Any, where: str, what: str
) -> None:
    with pytest.raises(InvalidOptionError, match=re.escape(f"got a {what}, which")):
        build(lambda *a, **k: torch.ones(1, requires_grad=True), x)
    with pytest.raises(InvalidOptionError, match=re.escape(f"{where} must be")):
        build(lambda *a, **k: torch.ones(1, requires_grad=True), x)


class Affine(nn.Module):
    """``x @ w.T`` (an ``nn.Linear`` without its warning about zero-size initialisation)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@pytest.mark.parametrize(
    ("make", "wrt"),
    [
        (lambda: (Affine(3, 0), torch.randn(4, 3)), "params"),
        (lambda: (Affine(0, 2), torch.randn(4, 0)), "all"),
        (lambda: ((lambda t: t.sum() + 1.0), torch.zeros(0, 3)), "all"),
        (lambda: ((lambda a, b: a.sum() * b.sum()), (torch.zeros(0), torch.zeros(2, 0))), "inputs"),
    ],
)
def test_zero_size_only_is_nothing_to_check(make: Callable[[], Any], wrt: Any) -> None:
    model, x = make()
    with pytest.raises(
        NothingToCheckError, match=re.escape("nothing to check: every block is empty")
    ):
        check_gradients(model, x, wrt=wrt)


def test_empty_tensors_beside_others_are_named_and_the_rest_is_checked() -> None:
    class WithEmpty(nn.Module):
        def __init__(self, bug: str) -> None:
            super().__init__()
            self.empty = nn.Parameter(torch.ones(0, 3))
            self.layer = FnLinear(3, 2, bug)

        def forward(self, x: torch.Tensor, none: torch.Tensor) -> torch.Tensor:
            return self.layer(x) + (x @ self.empty.T).sum() + none.sum()

    x = (torch.randn(4, 3), torch.zeros(0))
    report = check_gradients(WithEmpty("none"), x)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["layer.weight", "layer.bias", "input[0]"]
    assert "no entries, nothing to check: `empty` (0, 3), `input[1]` (0,)" in report.warnings
    assert failed(check_gradients(WithEmpty("one_entry"), x)) == ["layer.weight"]


def test_complex_parameters_and_inputs_are_named_as_not_checked() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.phase = nn.Parameter(torch.randn(3, dtype=torch.complex128))
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self.lin((x * self.phase * c).real)

    report = check_gradients(Mixed(), (torch.randn(4, 3), torch.randn(3, dtype=torch.complex64)))
    assert report.passed, str(report)
    assert "parameter `phase` has dtype torch.complex128 and is not checked" in report.warnings
    assert "`input[1]` has dtype torch.complex64 and is not checked" in report.warnings
    assert [b.name for b in report.blocks] == ["lin.weight", "lin.bias", "input[0]"]


# ------------------------------------------------------------------ 8. which part raised
class RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise ValueError("backward is not implemented for this case")


def test_the_error_says_whether_the_forward_or_the_backward_raised() -> None:
    x = torch.randn(3, dtype=f64)
    with pytest.raises(
        ModelError,
        match=re.escape(
            "the model's backward raised at the starting point: "
            "ValueError: backward is not implemented for this case"
        ),
    ):
        check_gradients(RaisingBackward, x)
    lin = nn.Linear(3, 2)
    with pytest.raises(
        ModelError,
        match=re.escape("the model's forward raised at the starting point: RuntimeError: mat1"),
    ):
        check_gradients(lin, torch.randn(4, 5))


@pytest.mark.parametrize("context", ["plain", *CONTEXTS])
def test_global_state_is_restored_when_user_code_raises(context: str) -> None:
    torch.manual_seed(16)
    models = [SideEffects(fail_at) for fail_at in (1, 9)]
    x, x3 = torch.randn(6, 3), torch.randn(3)

    def run() -> None:
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        dtype = torch.get_default_dtype()
        rng = torch.get_rng_state()
        for model in models:
            with pytest.raises(ModelError, match="boom"):
                check_gradients(model, x, mode="full")
        with pytest.raises(ModelError, match="backward raised"):
            check_gradients(RaisingBackward, x3)
        assert torch.is_grad_enabled() == grad
        assert torch.is_inference_mode_enabled() == inference
        assert torch.get_default_dtype() == dtype
        assert torch.equal(torch.get_rng_state(), rng)

    if context == "plain":
        run()
    else:
        with CONTEXTS[context]():
            run()


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 10])
def test_a_forward_that_raises_once_is_the_models_error_whichever_call_it_is(fail_at: int) -> None:
    torch.manual_seed(3)

    class Flaky(nn.Module):
        calls = 0

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            type(self).calls += 1
            if type(self).calls == fail_at:
                raise RuntimeError("boom")
            return self.lin(x)

    with pytest.raises(ModelError, match="boom"):
        check_gradients(Flaky(), torch.randn(7, 6))


def test_a_custom_backward_that_is_not_deterministic_fails_its_parameter():
    """A torch Function whose backward drifts between calls (a counter stands in for
    atomics, which CPUs do not reorder): full mode fails the weight it writes, by rule 6;
    the other blocks pass (oracle: the drift is planted in the weight's gradient only)."""
    calls = iter(range(10**6))

    class Drifting(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w.T

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            return grad @ w, (grad.T @ x) * (1 + 1e-7 * next(calls))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

        def forward(self, x):
            return Drifting.apply(x, self.weight)

    torch.manual_seed(0)
    report = check_gradients(Layer(), torch.randn(4, 3, dtype=torch.float64), mode="full")
    assert [b.name for b in report.failed_blocks] == ["weight"], str(report)
    assert "not deterministic" in (report.failed_blocks[0].diagnosis or "")
