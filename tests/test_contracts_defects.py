"""Defects a new-user trial of the contracts found, each kept fixed. The oracle in each: torch's
own checkers (``gradcheck(check_forward_ad=True)``, ``torch.func.vmap`` against a loop) or the
exact derivative, and what the report must say about it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gradcheck import check_gradients  # noqa: E402

torch.set_num_threads(1)
X = torch.linspace(-1, 1, 10, dtype=torch.float64)


def _sin(jvp=None, vmap=None):
    """``sin`` as a Function with a right backward and the given ``jvp`` / ``vmap`` rules."""
    namespace = {
        "generate_vmap_rule": vmap is None,
        "forward": staticmethod(lambda x: x.sin()),
        "setup_context": staticmethod(lambda ctx, inputs, output: ctx.save_for_backward(*inputs)),
        "backward": staticmethod(lambda ctx, d: d * ctx.saved_tensors[0].cos()),
    }
    if jvp is not None:
        namespace["jvp"] = staticmethod(jvp)
    if vmap is not None:
        namespace["vmap"] = staticmethod(vmap)
    return type("Sin", (torch.autograd.Function,), namespace)


def _wrong_shape(ctx, t):
    return t[:-1]


def _raises(ctx, t):
    raise ValueError("oops in jvp")


@pytest.mark.parametrize("jvp", [_wrong_shape, _raises], ids=["wrong-shape", "raises"])
def test_a_forward_mode_rule_that_breaks_fails_its_section_and_is_never_not_checked(jvp) -> None:
    fn = _sin(jvp=jvp)
    with warnings.catch_warnings():  # forward AD's first use warns about torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        try:  # the anchor sees it too (or raises on it)
            anchor = torch.autograd.gradcheck(
                fn.apply,
                (X.clone().requires_grad_(True),),
                check_forward_ad=True,
                check_backward_ad=False,
                check_undefined_grad=False,
                raise_exception=False,
            )
        except Exception:
            anchor = False
    assert not anchor
    report = check_gradients(fn.apply, X, forward=True)
    section = report.section("forward mode")
    assert not report.passed and section.not_checked is None
    assert section.problem is not None and "forward-mode rule" in section.problem
    assert report.section("first order").blocks[0].passed  # the gradient itself is right


def test_a_batching_rule_that_breaks_fails_its_section() -> None:
    def vmap(info, in_dims, x):
        return Sin.apply(x.movedim(in_dims[0], 0)), 1  # wrong out_dims

    Sin = _sin(vmap=vmap)
    x = X[:4].reshape(2, 2)
    points = torch.stack([x, 2 * x])  # the oracle: vmap against a loop, in torch alone
    batched = torch.func.vmap(Sin.apply)(points)
    assert not torch.equal(batched, torch.stack([Sin.apply(p) for p in points]))
    report = check_gradients(Sin.apply, x, batched=True)
    section = report.section("batched backward")
    assert not report.passed and section.not_checked is None
    assert section.problem is not None and "under vmap" in section.problem


def test_a_nan_gradient_with_order_2_is_a_verdict_not_an_exception() -> None:
    class N(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        def backward(ctx, d):
            (x,) = ctx.saved_tensors
            return 2 * x * d * (x / x)  # NaN at x = 0

    for mode in ("full", "fast"):
        report = check_gradients(
            N.apply, torch.tensor([0.0, 1.0, 2.0]).double(), order=2, mode=mode
        )
        assert not report.passed
        assert "NaN" in (report.blocks[0].diagnosis or "")
        assert "not finite" in (report.section("second order").problem or "")


def test_a_backward_that_raises_only_when_differentiated_fails_the_second_order_alone() -> None:
    class InPlace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, d):
            y = d.new_zeros(d.shape, requires_grad=d.requires_grad)
            y[:] = 2 * d  # in place on a leaf that requires grad: only under create_graph
            return y

    report = check_gradients(InPlace.apply, X, order=2)
    assert report.section("first order").blocks[0].passed
    second = report.section("second order")
    assert not second.passed and "backward raised" in (second.problem or "")
    assert str(report).splitlines()[0] == (
        "gradient check FAILED: first order passed; second order FAILED"
    )


def test_a_section_not_checked_says_so_when_printed_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double().train()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    section = check_gradients(model, x, batched=True).section("batched backward")
    assert str(section).startswith("batched backward not checked: torch.func.vmap cannot run")


def test_numpy_bools_are_flags() -> None:
    report = check_gradients(_sin().apply, X, forward=np.True_, batched=np.bool_(False))
    assert [s.contract for s in report.sections] == ["forward mode"]
