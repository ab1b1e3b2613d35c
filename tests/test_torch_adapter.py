"""The PyTorch adapter: blocks, precision, determinism, state, batching, and the full check."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
import torch
from torch import nn

adapter = pytest.importorskip("gradcheck.adapters.torch")

from torch_models import FnLinear, WithStatistic, make_linear_function  # noqa: E402

from gradcheck import check_flat, check_gradients  # noqa: E402
from gradcheck._losses import numpy_loss  # noqa: E402
from gradcheck._problem import FlatProblem, output_projection  # noqa: E402
from gradcheck.errors import (  # noqa: E402
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
)
from gradcheck.reference import MLP  # noqa: E402

torch.set_num_threads(1)
f64 = torch.float64


# ------------------------------------------------------------------ helpers
def build(model: Any, x: Any, y: Any = None, **kw: Any) -> FlatProblem:
    kw.setdefault("loss", None)
    kw.setdefault("wrt", "all")
    kw.setdefault("seed", 0)
    return adapter.build_problem(model, x, y, **kw)


def for_full(problem: FlatProblem) -> FlatProblem:
    """``problem`` as a full check evaluates it: the batching (vmap or a loop) chosen."""
    assert problem.prepare is not None
    return problem.prepare(2 * problem.size + 2)


def batch(problem: FlatProblem, rows: np.ndarray) -> np.ndarray:
    assert problem.loss_batch is not None
    return problem.loss_batch(rows)


def central_differences(problem: FlatProblem, h: float = 1e-6) -> np.ndarray:
    """Every coordinate's central difference, through ``loss_batch`` (a test-only oracle)."""
    assert problem.loss_batch is not None
    eye = np.eye(problem.size) * h
    rows = np.concatenate([problem.theta0 + eye, problem.theta0 - eye])
    values = batch(problem, rows)
    return (values[: problem.size] - values[problem.size :]) / (2 * h)


def autograd_reference(problem: FlatProblem, f: Callable[..., torch.Tensor], *tensors: Any) -> None:
    """``problem.gradient`` against ``torch.autograd.grad`` of ``f`` on float64 leaves."""
    leaves = [t.detach().to(f64).requires_grad_(True) for t in tensors]
    value = f(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    expected = np.concatenate(
        [
            (torch.zeros_like(t) if g is None else g).reshape(-1).numpy()
            for g, t in zip(grads, leaves, strict=True)
        ]
    )
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=1e-12, atol=1e-14)
    assert problem.loss(problem.theta0) == pytest.approx(float(value.detach()), rel=1e-13)


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything about a module that the check must leave bit-identical."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in module.state_dict(keep_vars=True).items()},
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in module.parameters()],
        "ids": [id(p) for p in module.parameters()],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["dtypes"] == after["dtypes"]
    assert before["ids"] == after["ids"]
    assert [g is None for g in before["grads"]] == [g is None for g in after["grads"]]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def failed(report: Any) -> list[str]:
    return [b.name for b in report.failed_blocks]


def mlp_data(sizes: list[int], n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, sizes[0])), rng.normal(size=(n, sizes[-1]))


# ------------------------------------------------------------------ dispatch
def test_matches_torch_model_objects_only() -> None:
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
            return a * 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g * 2

    assert adapter.matches(nn.Linear(2, 2))
    assert adapter.matches(Fn)
    # a plain callable belongs to no framework by its type: gradcheck._dispatch routes it by
    # the tensors it is given (check_gradients(lambda t: t.sum(), x) still comes here)
    assert not adapter.matches(lambda t: t.sum())
    assert not adapter.matches(MLP([2, 2]))  # the NumPy protocol
    assert not adapter.matches((lambda p, x: x, {}))  # a JAX (apply_fn, params) pair
    assert not adapter.matches(3.0)
    assert not adapter.matches(int)


# ------------------------------------------------------------------ the reference MLP (the oracle)
@pytest.mark.parametrize(
    ("activation", "output", "loss"),
    [
        ("tanh", "linear", "mse"),
        ("sigmoid", "sigmoid", "bce"),
        ("relu", "linear", "mse"),
        ("identity", "linear", None),
        ("tanh", "softmax", "categorical_crossentropy"),
        ("sigmoid", "linear", "cross_entropy"),
        ("tanh", "linear", "bce_with_logits"),
    ],
)
def test_reference_mlp_gradient_equals_the_numpy_oracle(
    activation: str, output: str, loss: str | None
) -> None:
    sizes = [3, 6, 5, 4]
    mlp = MLP(sizes, activation=activation, output=output, seed=3)  # type: ignore[arg-type]
    x, y = mlp_data(sizes)
    if loss in ("cross_entropy", "categorical_crossentropy"):
        y = np.array([0, 3, 1, 1, 2])
    elif loss in ("bce", "bce_with_logits"):
        y = np.random.default_rng(7).uniform(size=y.shape)
    module = mlp.to_torch()
    problem = build(
        module, torch.from_numpy(x), None if loss is None else torch.from_numpy(y), loss=loss
    )

    out = mlp.forward(x)
    if loss is None:
        value = float(np.sum(out * output_projection(out.shape, 0, 0)))
        dout = output_projection(out.shape, 0, 0)
    else:
        loss_fn, loss_grad = numpy_loss(loss)
        value, dout = loss_fn(out, y), loss_grad(out, y)
    dx = mlp.backward(dout)
    expected = np.concatenate(
        [mlp.grads[f"{k}{layer}"].ravel() for layer in range(len(sizes) - 1) for k in "Wb"]
        + [dx.ravel()]
    )
    assert [b.name for b in problem.blocks] == [
        f"layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")
    ] + ["input"]
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=0, atol=1e-12)
    assert problem.loss(problem.theta0) == pytest.approx(value, rel=1e-13)
    np.testing.assert_array_equal(
        problem.theta0[: problem.blocks[0].size], mlp.params["W0"].ravel()
    )


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_reference_mlp_check_passes(activation: str) -> None:
    sizes = [4, 8, 3]
    mlp = MLP(sizes, activation=activation, seed=1)  # type: ignore[arg-type]
    x, y = mlp_data(sizes)
    report = check_gradients(mlp.to_torch(), torch.from_numpy(x), torch.from_numpy(y), loss="mse")
    assert report.passed, str(report)
    assert report.framework == "torch"
    assert report.batching == "vmap"
    assert report.precision == "float64"


def test_reference_mlp_with_dropout_exports_train_mode_dropout_and_passes() -> None:
    mlp = MLP([4, 8, 8, 2], activation="tanh", dropout=0.3, seed=4)
    module = mlp.to_torch()
    assert module.training
    assert [n for n, _ in module.named_parameters()][:2] == ["layers.0.weight", "layers.0.bias"]
    x, y = mlp_data([4, 8, 8, 2])
    report = check_gradients(module, torch.from_numpy(x), torch.from_numpy(y))
    assert report.passed, str(report)


def test_reference_regularization_in_a_loss_callable_sees_the_substituted_weights() -> None:
    mlp = MLP([3, 4, 2], l1=0.01, l2=0.1, seed=2)
    module = mlp.to_torch()
    x, y = mlp_data([3, 4, 2])

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean() + module.regularization()

    problem = build(module, torch.from_numpy(x), torch.from_numpy(y), loss=loss, wrt="params")
    out = mlp.forward(x)
    mlp.backward(numpy_loss("mse")[1](out, y))
    expected = np.concatenate([mlp.grads[k].ravel() for k in ("W0", "b0", "W1", "b1")])
    np.testing.assert_allclose(problem.gradient(problem.theta0), expected, rtol=0, atol=1e-12)
    value = numpy_loss("mse")[0](out, y) + mlp.regularization()
    assert problem.loss(problem.theta0) == pytest.approx(value, rel=1e-13)
    # and the loss moves with theta (it is not the user's fixed weights)
    np.testing.assert_allclose(central_differences(problem), expected, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ planted bugs in a custom Function
BUGS = ("none", "sign_flip", "missing_bias", "scale_1.01", "one_entry", "input_grad")


EXPECTED_FAILURES = {
    # the custom layer is the first one (`0`), the input feeds it directly
    "none": [],
    "sign_flip": ["0.weight"],
    "missing_bias": ["0.bias"],
    "scale_1.01": ["0.weight", "0.bias", "input"],
    "one_entry": ["0.weight"],
    "input_grad": ["input"],
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bug_in_a_custom_function_names_the_block(bug: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(FnLinear(4, 5, bug, f64), nn.Tanh(), nn.Linear(5, 3, dtype=f64))
    x = torch.randn(6, 4, dtype=f64)
    y = torch.randn(6, 3, dtype=f64)
    report = check_gradients(model, x, y, loss="mse")
    assert failed(report) == EXPECTED_FAILURES[bug], str(report)
    assert report.passed == (bug == "none")
    assert report.batching == "loop"  # an old-style Function cannot be vmapped
    if bug == "one_entry":
        worst = report.block("0.weight").worst
        assert report.block("0.weight").mismatches == 1
        assert worst[0].index == (1, 2)


def test_wrong_input_gradient_of_an_inner_layer_fails_the_layers_below_it() -> None:
    """Right weight gradients, wrong input gradient: it is the layer *below* that looks wrong."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5, dtype=f64), nn.Tanh(), FnLinear(5, 3, "input_grad", f64))
    x, y = torch.randn(6, 4, dtype=f64), torch.randn(6, 3, dtype=f64)
    report = check_gradients(model, x, y, loss="mse", wrt="params")
    assert failed(report) == ["0.weight", "0.bias"], str(report)
    assert report.block("2.weight").passed
    assert report.block("2.bias").passed


def test_torch_gradcheck_misses_a_wrong_weight_gradient_that_we_catch() -> None:
    fn = make_linear_function("sign_flip")
    torch.manual_seed(2)
    x = torch.randn(3, 4, dtype=f64)
    w = torch.randn(2, 4, dtype=f64)
    b = torch.randn(2, dtype=f64)
    # torch.autograd.gradcheck on the input only (as a module's user would call it) passes
    assert torch.autograd.gradcheck(lambda t: fn.apply(t, w, b), (x.requires_grad_(),))
    report = check_gradients(lambda t, w_, b_: fn.apply(t, w_, b_), (x.detach(), w, b))
    assert failed(report) == ["input[1]"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_mode_on_a_large_module_with_relu_dropout_and_layer_norm(seed: int) -> None:
    # Above 20,000 parameters auto mode probes directions (fast mode). A module as users write
    # them, ReLU kinks, dropout in train mode and a layer norm: the correct one passes, and one
    # wrong entry in its custom layer's weight gradient is caught and named in its block.
    # Oracle: the planted index, and numeric / analytic = 1 / 1.01 on it.
    def module(bug: str) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            FnLinear(64, 256, bug, f64),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.LayerNorm(256, dtype=f64),
            nn.Linear(256, 64, dtype=f64),
            nn.ReLU(),
            nn.Linear(64, 10, dtype=f64),
        )

    x = torch.randn(16, 64, dtype=f64, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(16) % 10
    correct = module("none")
    assert sum(p.numel() for p in correct.parameters()) > 20_000
    report = check_gradients(correct, x, y, loss="cross_entropy", seed=seed)
    assert report.mode == "fast" and report.passed, str(report)
    assert correct.training  # the module is left as it was given

    buggy = check_gradients(module("one_entry"), x, y, loss="cross_entropy", seed=seed)
    assert failed(buggy) == ["0.weight"], str(buggy)
    (entry,) = buggy.block("0.weight").worst
    assert entry.index == (1, 2)
    assert entry.analytic == pytest.approx(1.01 * entry.numeric, rel=1e-6)


# ------------------------------------------------------------------ correct modules pass
def relu_net_at_kinks() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    first = nn.Linear(4, 6, dtype=f64)
    x = torch.randn(5, 4, dtype=f64)
    with torch.no_grad():
        first.bias.sub_(first(x)[0])  # row 0's pre-activations at 0 ...
        first.bias.add_(1e-10 * torch.randn(6, dtype=f64))  # ... within 1e-9 of it
        assert first(x)[0].abs().max() < 1e-9
    return nn.Sequential(first, nn.ReLU(), nn.Linear(6, 2, dtype=f64)), x


def test_relu_net_with_preactivations_at_zero_passes() -> None:
    model, x = relu_net_at_kinks()
    report = check_gradients(model, x)
    assert report.passed, str(report)
    assert report.block("0.weight").kinks > 0
    assert report.block("input").kinks > 0  # one input entry moves 6 ReLUs across 0 at once


def test_maxpool_with_ties_passes() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3, dtype=f64))
    x = torch.randn(2, 2, 2, 2, dtype=f64).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = x[0, 0, 1, 0]  # more ties, within one window
    report = check_gradients(model, x)
    assert report.passed, str(report)
    assert report.block("input").kinks > 0


def test_dropout_in_train_mode_passes_and_batches_agree() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2))
    assert model.training
    x = torch.randn(6, 4)
    problem = for_full(build(model, x))
    assert problem.batching == "vmap"
    rows = problem.theta0 + 1e-3 * np.random.default_rng(0).normal(size=(4, problem.size))
    np.testing.assert_allclose(batch(problem, rows), [problem.loss(r) for r in rows], rtol=1e-13)
    assert problem.loss(problem.theta0) == problem.loss(problem.theta0)
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), central_differences(problem), rtol=1e-6, atol=1e-9
    )
    report = check_gradients(model, x)
    assert report.passed, str(report)


def test_dropout_masks_follow_the_seed() -> None:
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 1, dtype=f64))
    x = torch.ones(4, 8, dtype=f64)
    a = batch(build(model, x, seed=0), np.stack([build(model, x, seed=0).theta0]))
    b = batch(build(model, x, seed=1), np.stack([build(model, x, seed=1).theta0]))
    assert a[0] != b[0]


def test_batchnorm_in_train_mode_passes_and_running_stats_are_untouched() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(8, 4)
    before = snapshot(model)
    report = check_gradients(model, x)
    assert report.passed, str(report)
    assert_same(before, snapshot(model))
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_batches_tracked is not None
    assert bn.num_batches_tracked.item() == 0


def test_batchnorm_buffers_are_restored_between_evaluations() -> None:
    """With momentum=None the running mean is a cumulative average: in eval mode the
    output would drift if our copies kept their updates."""
    bn = nn.BatchNorm1d(3, momentum=None).double()
    model = nn.Sequential(bn)
    x = torch.randn(5, 3, dtype=f64)
    problem = build(model, x)
    first = problem.loss(problem.theta0)
    for _ in range(3):
        assert problem.loss(problem.theta0) == first


def test_lstm_passes() -> None:
    torch.manual_seed(7)
    model = nn.LSTM(3, 4, batch_first=True)
    report = check_gradients(model, torch.randn(2, 5, 3))
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == [
        "weight_ih_l0",
        "weight_hh_l0",
        "bias_ih_l0",
        "bias_hh_l0",
        "input",
    ]


def test_lstm_output_tuple_is_projected_leaf_by_leaf() -> None:
    torch.manual_seed(8)
    model = nn.LSTM(2, 3).double()
    x = torch.randn(4, 1, 2, dtype=f64)
    problem = build(model, x, wrt="params")

    def projected(*params: torch.Tensor) -> torch.Tensor:
        names = [n for n, _ in model.named_parameters()]
        out, (h, c) = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))
        total = torch.zeros((), dtype=f64)
        for k, t in enumerate((out, h, c)):
            total = total + (t * torch.from_numpy(output_projection(tuple(t.shape), 0, k))).sum()
        return total

    autograd_reference(problem, projected, *model.parameters())


def test_embedding_with_duplicate_indices_passes() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(12, 2))
    idx = torch.tensor([[1, 1, 3, 1], [0, 3, 3, 4]])
    report = check_gradients(model, idx)
    assert report.passed, str(report)
    assert [b.name for b in report.blocks] == ["0.weight", "2.weight", "2.bias"]  # no `input`


def test_float32_model_is_checked_on_a_float64_copy() -> None:
    torch.manual_seed(10)
    first = nn.Linear(4, 5)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    before = snapshot(model)
    problem = build(model, x)
    assert problem.precision == "float64"
    assert problem.notes == []
    np.testing.assert_array_equal(
        problem.theta0[:20], first.weight.detach().double().reshape(-1).numpy()
    )
    report = check_gradients(model, x)
    assert report.passed, str(report)
    assert_same(before, snapshot(model))
    assert first.weight.dtype == torch.float32


def test_unused_parameter_is_checked_as_zero() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Unused()
    problem = build(model, torch.randn(4, 3))
    grad = problem.gradient(problem.theta0)
    for block in problem.blocks:
        if block.name.startswith("unused"):
            assert np.all(grad[block.slice] == 0)
    report = check_gradients(model, torch.randn(4, 3))
    assert report.passed, str(report)


def test_frozen_parameters_are_skipped_and_listed() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    problem = build(model, torch.randn(5, 3), wrt="params")
    assert [b.name for b in problem.blocks] == ["0.bias", "2.weight", "2.bias"]
    assert problem.skipped == ["0.weight"]
    report = check_gradients(model, torch.randn(5, 3))
    assert report.passed, str(report)
    assert report.skipped == ("0.weight",)
    assert model[0].weight.requires_grad is False


def test_tied_weights_form_one_block() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3, dtype=f64)
            self.b = nn.Linear(3, 3, dtype=f64)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))

    model = Tied()
    problem = build(model, torch.randn(2, 3, dtype=f64), wrt="params")
    assert [b.name for b in problem.blocks] == ["a.weight", "a.bias", "b.bias"]
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), central_differences(problem), rtol=1e-6, atol=1e-9
    )


# ------------------------------------------------------------------ inputs
def test_tuple_dict_and_integer_inputs() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(4, 3, dtype=f64)

        def forward(self, a: torch.Tensor, idx: torch.Tensor, extra: dict[str, Any]) -> Any:
            return torch.tanh(a * self.emb(idx)) * extra["scale"] + extra["shift"] ** 2

    torch.manual_seed(11)
    a = torch.randn(2, 3, dtype=f64)
    idx = torch.tensor([0, 0])
    extra = {"scale": torch.randn(2, 3, dtype=f64), "shift": torch.randn(3, dtype=f64)}
    problem = build(Net(), (a, idx, extra))
    assert [(b.name, b.kind) for b in problem.blocks] == [
        ("emb.weight", "param"),
        ("input[0]", "input"),
        ("input[2]['scale']", "input"),
        ("input[2]['shift']", "input"),
    ]
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), central_differences(problem), rtol=1e-6, atol=1e-9
    )
    assert idx.tolist() == [0, 0]


def test_dict_input_is_passed_as_keyword_arguments() -> None:
    def f(*, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return u * torch.sin(v)

    problem = build(f, {"u": torch.ones(2, dtype=f64), "v": torch.zeros(2, dtype=f64)})
    assert [b.name for b in problem.blocks] == ["input['u']", "input['v']"]
    r = output_projection((2,), 0, 0)
    np.testing.assert_allclose(problem.gradient(problem.theta0), np.concatenate([0 * r, r]))


def test_plain_callable_and_autograd_function_class() -> None:
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(t)
            return t**3

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (t,) = ctx.saved_tensors
            return 3 * t**2 * g

    x = torch.linspace(-1, 1, 5, dtype=f64)
    problem = build(Cube, x)
    assert [b.name for b in problem.blocks] == ["input"]
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), 3 * x.numpy() ** 2 * output_projection((5,), 0, 0)
    )
    assert check_gradients(Cube, x).passed
    assert check_gradients(lambda t: torch.exp(t).sum(), x, mode="full").passed


def test_user_inputs_are_not_modified() -> None:
    x = torch.randn(3, 2)
    x_before = x.clone()
    build(nn.Linear(2, 2), x)
    assert torch.equal(x, x_before)
    assert x.dtype == torch.float32
    assert not x.requires_grad


def test_numpy_inputs_become_tensors() -> None:
    model = nn.Linear(3, 2, dtype=f64)
    x = np.random.default_rng(0).normal(size=(4, 3))
    y = np.zeros((4, 2))
    report = check_gradients(model, x, y)
    assert report.passed, str(report)


# ------------------------------------------------------------------ losses
@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("mse", False),
        ("cross_entropy", False),
        ("cross_entropy", True),
        ("categorical_crossentropy", False),
        ("categorical_crossentropy", True),
        ("bce", False),
        ("binary_crossentropy", False),
        ("bce_with_logits", False),
    ],
)
def test_named_losses_match_the_numpy_definitions(name: str, labels: bool) -> None:
    rng = np.random.default_rng(12)
    out = rng.uniform(0.05, 0.95, size=(5, 3))
    if name == "categorical_crossentropy":
        out = out / out.sum(axis=1, keepdims=True)
    if labels:
        y = np.array([0, 2, 1, 1, 0])
    elif name in ("cross_entropy", "categorical_crossentropy"):
        y = rng.dirichlet(np.ones(3), size=5)
    else:
        y = rng.uniform(size=(5, 3))
    problem = build(lambda t: t * 1.0, torch.from_numpy(out), torch.from_numpy(y), loss=name)
    loss_fn, loss_grad = numpy_loss(name)
    assert problem.loss(problem.theta0) == pytest.approx(loss_fn(out, y), rel=1e-14)
    np.testing.assert_allclose(
        problem.gradient(problem.theta0), loss_grad(out, y).ravel(), rtol=1e-12, atol=1e-15
    )


def test_loss_errors_are_one_line_and_name_what_came() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(
        ShapeMismatchError, match=re.escape("needs y of the output's shape (4, 2); got (4, 3)")
    ):
        build(model, x, torch.randn(4, 3), loss="mse")
    with pytest.raises(ShapeMismatchError, match=re.escape("labels must lie in [0, 2)")):
        build(model, x, torch.tensor([0, 1, 2, 0]), loss="cross_entropy")
    with pytest.raises(InvalidOptionError, match="loss must be a callable or one of"):
        build(model, x, torch.randn(4, 2), loss="hinge")
    with pytest.raises(InvalidOptionError, match=re.escape("wrt must be one of 'all'")):
        build(model, x, wrt="weights")
    with pytest.raises(
        ModelError,
        match=re.escape("the loss must return a scalar tensor; got a tensor of shape (4, 2)"),
    ):
        build(model, x, torch.randn(4, 2), loss=lambda o, t: o - t)
    with pytest.raises(
        ModelError, match=re.escape("the loss must return a scalar tensor; got float")
    ):
        build(model, x, torch.randn(4, 2), loss=lambda o, t: 1.0)


def test_nothing_to_check() -> None:
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NothingToCheckError, match=re.escape("frozen: weight, bias")):
        build(model, torch.randn(2, 3), wrt="params")
    with pytest.raises(NothingToCheckError):
        build(nn.Embedding(3, 2), torch.tensor([0, 1]), wrt="inputs")


def test_a_model_that_raises_at_the_start_is_a_model_error() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(
        ModelError,
        match=re.escape("the model's forward raised at the starting point: RuntimeError"),
    ):
        build(model, torch.randn(4, 5))


# ------------------------------------------------------------------ precision
class HardFloat32(torch.autograd.Function):
    """Computes in float32 whatever it is given (a common shortcut in custom kernels)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.tanh(x.float() @ w.float().T)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        out = torch.tanh(x.float() @ w.float().T)
        d = g.float() * (1 - out**2)
        return (d @ w.float()).to(x.dtype), (d.T @ x.float()).to(w.dtype)


class HardFloat32Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return HardFloat32.apply(x, self.weight)


def test_a_model_that_cannot_run_in_float64_falls_back_to_float32_and_says_so() -> None:
    torch.manual_seed(13)
    model = HardFloat32Layer()
    x = torch.randn(5, 4)
    problem = build(model, x)
    assert problem.precision == "float32"
    assert any("cannot run in float64" in n for n in problem.notes)
    report = check_gradients(model, x)
    assert report.passed, str(report)
    assert report.precision == "float32"
    assert any("cannot run in float64" in w for w in report.warnings)


def test_float32_only_model_with_a_bug_still_fails() -> None:
    class Bad(HardFloat32):
        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dx, dw = HardFloat32.backward(ctx, g)
            return dx, 1.1 * dw

    class Layer(HardFloat32Layer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Bad.apply(x, self.weight)

    torch.manual_seed(13)
    report = check_gradients(Layer(), torch.randn(5, 4))
    assert failed(report) == ["weight"], str(report)


def test_a_function_that_only_runs_in_float32_passes_where_torch_gradcheck_cannot() -> None:
    x = torch.randn(6)
    report = check_gradients(lambda t: (t * t).sum(), x)
    assert report.passed, str(report)
    assert report.precision == "float64"  # checked on a float64 copy


# ------------------------------------------------------------------ determinism and state
def test_global_rng_state_is_bit_identical_afterwards() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    report = check_gradients(model, torch.ones(3, 4))
    assert report.passed
    assert torch.equal(torch.get_rng_state(), before)


class Exploding(nn.Module):
    """Raises on its ``fail_at``-th forward call, after using the RNG and writing a buffer."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.drop(self.bn(self.lin(x)))
        if self.calls == self.fail_at:
            torch.rand(3)
            raise RuntimeError("boom")
        return out


@pytest.mark.parametrize(
    ("fail_at", "dtype"),
    # calls: 1 the gradient at theta0 (building), 2 and 3 the vmap probe (full mode's
    # batching choice, where a BatchNorm in train mode cannot run), 4 the check's first
    [(1, f64), (4, f64), (5, f64), (40, f64), (1, torch.float32), (40, torch.float32)],
)
def test_state_is_untouched_when_the_forward_raises_mid_check(
    fail_at: int, dtype: torch.dtype
) -> None:
    # (a float32 model that raises in its first calls is a ModelError too, not a float32 check)
    torch.manual_seed(14)
    model = Exploding(fail_at).to(dtype)
    model.lin.bias.requires_grad_(False)
    model.bn.eval()
    model.bn.train()  # a non-default pattern of flags
    model.drop.eval()
    x = torch.randn(6, 3, dtype=dtype)
    before = snapshot(model)
    torch.manual_seed(99)
    rng_before = torch.get_rng_state()
    with pytest.raises(ModelError, match="boom"):
        check_gradients(model, x, mode="full")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert_same(before, snapshot(model))
    assert model.lin.weight.grad is None


def numpy_global_key() -> np.ndarray:
    state = np.random.get_state()
    assert isinstance(state, tuple)
    return np.array(state[1], copy=True)


def test_other_random_state_is_not_touched() -> None:
    np.random.seed(5)
    random.seed(5)
    np_state, py_state = numpy_global_key(), random.getstate()
    check_gradients(nn.Linear(2, 2), torch.randn(2, 2))
    assert np.array_equal(numpy_global_key(), np_state)
    assert random.getstate() == py_state


def test_a_forward_that_stays_random_is_reported_not_blamed() -> None:
    gen = torch.Generator().manual_seed(0)  # the user's own generator: we cannot reset it

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + 0.1 * torch.rand(t.shape, generator=gen, dtype=t.dtype))

    report = check_gradients(noisy, torch.ones(3))
    assert not report.passed
    assert report.problem is not None and "not deterministic" in report.problem


# ------------------------------------------------------------------ batching
def test_batched_and_single_evaluations_agree() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randn(4, 2, 6)
    problem = for_full(build(model, x, torch.randn(4, 2), loss="mse"))
    assert problem.batching == "vmap"
    assert 1 <= problem.max_batch <= adapter.MAX_VMAP_BATCH
    rows = problem.theta0 + 0.01 * np.random.default_rng(1).normal(size=(7, problem.size))
    np.testing.assert_allclose(batch(problem, rows), [problem.loss(r) for r in rows], rtol=1e-12)


def test_vmap_failure_falls_back_to_a_loop_with_a_note() -> None:
    def needs_item(t: torch.Tensor) -> torch.Tensor:
        return t * float(t.sum().item() > -1e9)

    problem = for_full(build(needs_item, torch.randn(3, dtype=f64)))
    assert problem.batching == "loop"
    assert any("torch.func.vmap cannot run it" in n for n in problem.notes)
    rows = problem.theta0 + np.eye(3)
    np.testing.assert_allclose(batch(problem, rows), [problem.loss(r) for r in rows])


def test_loss_batch_chunks_beyond_max_batch() -> None:
    problem = for_full(build(nn.Linear(3, 2), torch.randn(2, 3)))
    problem_rows = problem.theta0 + np.random.default_rng(2).normal(
        size=(problem.max_batch + 3, problem.size)
    )
    values = batch(problem, problem_rows)
    assert values.shape == (problem.max_batch + 3,)
    assert values[-1] == pytest.approx(problem.loss(problem_rows[-1]), rel=1e-12)


def test_full_mode_uses_batches() -> None:
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 1))
    report = check_gradients(model, torch.randn(8, 10), mode="full")
    assert report.passed
    assert report.batching == "vmap"


class PlantedLinear(torch.autograd.Function):
    """``x @ w.T + b`` that ``torch.func.vmap`` can run (``setup_context``, a generated vmap
    rule), whose weight gradient has entry (1, 2) times ``factor``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
        return x @ w.T + b

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, w, _, factor = inputs
        ctx.save_for_backward(x, w)
        ctx.factor = factor

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        scale = torch.ones_like(w)
        scale[1, 2] = ctx.factor
        return g @ w, (g.T @ x) * scale, g.sum(0), None


class Planted(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        torch.manual_seed(17)
        self.lin = nn.Linear(4, 5, dtype=f64)
        self.out = nn.Linear(5, 3, dtype=f64)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = PlantedLinear.apply(x, self.lin.weight, self.lin.bias, self.factor)
        return self.out(torch.tanh(h))


def spy_on_batching_choice(monkeypatch: pytest.MonkeyPatch, pause: float = 0.0) -> list[int]:
    """Count the calls of the adapter's batching choice (vmap probe), each ``pause`` longer."""
    calls: list[int] = []
    choose = adapter._choose_batching

    def spy(*args: Any) -> Any:
        calls.append(1)
        time.sleep(pause)
        return choose(*args)

    monkeypatch.setattr(adapter, "_choose_batching", spy)
    return calls


@pytest.mark.parametrize("factor", [1.0, 1.01])
def test_the_batching_choice_is_made_for_full_mode_not_for_fast_mode(
    monkeypatch: pytest.MonkeyPatch, factor: float
) -> None:
    calls = spy_on_batching_choice(monkeypatch)
    x, y = torch.randn(6, 4, dtype=f64), torch.randn(6, 3, dtype=f64)
    expected = [] if factor == 1.0 else ["lin.weight"]
    fast = check_gradients(Planted(factor), x, y, mode="fast")
    assert calls == [] and fast.batching == "loop"  # two evaluations: never worth a probe
    full = check_gradients(Planted(factor), x, y, mode="full")
    assert calls == [1] and full.batching == "vmap"
    assert failed(fast) == failed(full) == expected, (str(fast), str(full))
    # the same fast check with the choice made (vmap) beforehand: the same verdicts
    problem = for_full(build(Planted(factor), x, y, loss="mse"))
    assert calls == [1, 1] and problem.batching == "vmap"
    batched = check_flat(problem, mode="fast")
    assert failed(batched) == expected, str(batched)
    assert calls == [1, 1]  # chosen once per problem
    if expected:
        for report in (fast, full, batched):
            assert [e.index for e in report.block("lin.weight").worst] == [(1, 2)], str(report)


def test_the_reports_time_covers_the_adapters_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = adapter._probe

    def slow_probe(ev: Any) -> Any:
        time.sleep(0.2)
        return probe(ev)

    monkeypatch.setattr(adapter, "_probe", slow_probe)  # building the problem
    spy_on_batching_choice(monkeypatch, pause=0.2)  # full mode's batching choice
    x = torch.randn(6, 4, dtype=f64)
    assert check_gradients(Planted(1.0), x, mode="fast").elapsed >= 0.2
    assert check_gradients(Planted(1.0), x, mode="full").elapsed >= 0.4


# ------------------------------------------------------------------ outputs
def test_outputs_declared_non_differentiable_are_left_out_of_the_projection() -> None:
    report = check_gradients(WithStatistic, torch.randn(4, dtype=f64))
    assert report.passed, str(report)
    assert any(
        "output #2 of 2 floating-point outputs does not require grad" in w for w in report.warnings
    )


def test_a_wholly_detached_output_is_a_failure_not_left_out() -> None:
    report = check_gradients(lambda t: t.detach() * 2, torch.randn(4, dtype=f64))
    assert failed(report) == ["input"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_stay_on_the_model_device() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 1)).cuda()
    x = torch.randn(5, 3, device="cuda")
    cuda_state = torch.cuda.get_rng_state()
    seen: list[torch.device] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.device))
    report = check_gradients(model, x)
    assert report.passed, str(report)
    assert seen and all(d.type == "cuda" for d in seen)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
