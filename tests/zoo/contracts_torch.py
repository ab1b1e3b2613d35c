"""A zoo of twice-differentiable custom torch layers, with mutants, for the contracts beyond
the first-order reverse-mode gradient (second order, forward mode, batched backwards).

Every layer is an ``autograd.Function`` ``F(x, w)`` with a parameter ``w`` held by
`Layer` (one block ``w``, plus the checked input, block ``input``), and a reference in
built-in torch ops (`Spec.reference`): the same function, whose derivatives torch computes
on its own (the oracle for the correct layers, with ``gradgradcheck`` / ``gradcheck`` as
anchors). The second-order layers' backward is itself a custom Function with a hand-written
backward (the double backward). Every mutant changes one rule; its `Case` says which
contract (the report section) must catch it and in which blocks.

With ``y=None`` the loss is ``sum(out * r)``: the upstream gradient ``go`` is constant, so
a bug in a double backward's derivative with respect to ``x`` or ``w`` shows in that block of
``H u`` and nowhere else (``H u``'s ``x`` block is the double backward's ``d_x``, its ``w``
block ``d_w``). With ``y`` given (MSE) ``go`` depends on the output, and a bug in the
derivative with respect to ``go`` shows too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

# Nondeterminism the checker cannot reset (it resets torch's RNG before every evaluation),
# as atomics in a real kernel: a generator of its own, seeded from the OS, and a count of
# calls, so that two calls in a row differ by at least half of ``rel`` (a random draw alone
# could repeat itself closely enough to pass now and then).
_NOISE = random.Random()
_CALLS = [0]


def _noise(t: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    _CALLS[0] += 1
    return t * (1.0 + rel * (_CALLS[0] % 2 + 0.5 * _NOISE.random()))


def _one_entry(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` with its first entry (flat) times ``factor``; vmap-safe (no in-place write)."""
    scale = torch.ones(t.shape, dtype=t.dtype, device=t.device).reshape(-1)
    scale[0] = factor
    return t * scale.reshape(t.shape)


# --------------------------------------------------------------------------- cube
def cube(bug: str | None = None) -> type[Function]:
    """``out = w * x**3`` (``x`` (n, d), ``w`` (d,)): backward `CubeGrad` (its own backward),
    forward mode ``jvp``, ``generate_vmap_rule``."""

    class CubeGrad(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(go: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> Any:
            gx = 3.0 * w * x**2 * go
            gw = (x**3 * go).sum(0)
            return gx, gw

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx: Any, ggx: torch.Tensor, ggw: torch.Tensor) -> Any:
            go, x, w = ctx.saved_tensors
            d_go = ggx * 3.0 * w * x**2 + ggw * x**3
            xx = ggx * 6.0 * w * x * go
            if bug == "drop_xx":  # the second-order term d2/dx2 dropped
                xx = torch.zeros_like(xx)
            d_x = xx + ggw * 3.0 * x**2 * go
            d_w = (ggx * 3.0 * x**2 * go).sum(0)
            if bug == "sign_wx":
                d_w = -d_w
            if bug == "scale_w":
                d_w = _one_entry(d_w, 1.01)
            return d_go, d_x, d_w

    class Cube(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return w * x**3

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs)
            ctx.save_for_forward(*inputs)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w = ctx.saved_tensors
            gx, gw = CubeGrad.apply(go, x, w)
            return gx, gw

        @staticmethod
        def jvp(ctx: Any, tx: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
            x, w = ctx.saved_tensors
            return 3.0 * w * x**2 * tx + x**3 * tw

    return Cube


def cube_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * x**3


# --------------------------------------------------------------------------- bilinear
def _outer_sum(go: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_n go[n] * outer(a[n], b[n])`` without einsum (torch's legacy vmap, which
    ``gradcheck(check_batched_grad=True)`` uses, has no batching rule for it)."""
    return (go[:, None, None] * a[:, :, None] * b[:, None, :]).sum(0)


def bilinear(bug: str | None = None) -> type[Function]:
    """``out[n] = x[n] @ W @ x[n]`` (``x`` (n, d), ``W`` (d, d)): backward `BilinearGrad`
    with its own backward; ``generate_vmap_rule``; no ``jvp``."""

    class BilinearGrad(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(go: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> Any:
            a = w + w.T
            gx = go[:, None] * (x @ a)
            gw = _outer_sum(go, x, x)
            return gx, gw

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx: Any, ggx: torch.Tensor, ggw: torch.Tensor) -> Any:
            go, x, w = ctx.saved_tensors
            a = w + w.T
            b = ggw + ggw.T
            d_go = (ggx * (x @ a)).sum(1) + ((x @ ggw) * x).sum(1)
            cross = x @ b
            if bug == "drop_xw":  # the mixed term d2/(dx dW) dropped from d_x
                cross = torch.zeros_like(cross)
            d_x = go[:, None] * (ggx @ a + cross)
            half = _outer_sum(go, ggx, x)
            d_w = half + half.T
            if bug == "scale_w":
                d_w = _one_entry(d_w, 1.01)
            if bug == "nondet":
                d_w = _noise(d_w)
            return d_go, d_x, d_w

    class Bilinear(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return ((x @ w) * x).sum(1)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w = ctx.saved_tensors
            gx, gw = BilinearGrad.apply(go, x, w)
            return gx, gw

    return Bilinear


def bilinear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ni,ij,nj->n", x, w, x)


# --------------------------------------------------------------------------- softplus (classic)
def softplus(bug: str | None = None) -> type[Function]:
    """``out = softplus(x + b)`` (``b`` (d,)), classic style (``forward(ctx, ...)``): backward
    `SoftplusGrad`, classic too, with its own backward. No jvp, no vmap support."""

    class SoftplusGrad(Function):
        @staticmethod
        def forward(ctx: Any, go: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> Any:
            ctx.save_for_backward(go, x, b)
            s = torch.sigmoid(x + b)
            gx = go * s
            gb = (go * s).sum(0)
            if bug == "nondet_first":
                gb = _noise(gb)
            return gx, gb

        @staticmethod
        def backward(ctx: Any, ggx: torch.Tensor, ggb: torch.Tensor) -> Any:
            go, x, b = ctx.saved_tensors
            s = torch.sigmoid(x + b)
            t = (ggx + ggb) * s * (1.0 - s) * go
            d_go = (ggx + ggb) * s
            d_x = t
            d_b = t.sum(0)
            if bug == "sign_b":
                d_b = -d_b
            if bug == "nondet":
                d_b = _noise(d_b)
            if bug == "scale_go":  # the derivative with respect to the upstream gradient
                d_go = _one_entry(d_go, 1.01)
            return d_go, d_x, d_b

    class Softplus(Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, b)
            return nn.functional.softplus(x + b)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, b = ctx.saved_tensors
            gx, gb = SoftplusGrad.apply(go, x, b)
            return gx, gb

    return Softplus


def softplus_reference(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.softplus(x + b)


# --------------------------------------------------------------------------- exp (jvp)
def exp_scale(bug: str | None = None) -> type[Function]:
    """``out = exp(w * x)``: setup_context style with ``jvp`` and ``generate_vmap_rule``
    (``torch.func.jvp`` under vmap); a backward in built-in ops."""

    class ExpScale(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.exp(w * x)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs, output)
            ctx.save_for_forward(*inputs, output)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w, out = ctx.saved_tensors
            return go * out * w, (go * out * x).sum(0)

        @staticmethod
        def jvp(ctx: Any, tx: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
            x, w, out = ctx.saved_tensors
            along_x = w * tx
            if bug == "jvp_sign_x":
                along_x = -along_x
            along_w = x * tw
            if bug == "jvp_drop_w":  # a wrong tangent: the parameter's term left out
                along_w = torch.zeros_like(along_w)
            return out * (along_x + along_w)

    return ExpScale


def exp_scale_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.exp(w * x)


# --------------------------------------------------------------------------- sin (classic jvp)
def classic_sin(bug: str | None = None) -> type[Function]:
    """``out = sin(w * x)``, classic style (``forward(ctx, ...)``) with ``jvp``: only
    ``torch.autograd.forward_ad`` runs it (``torch.func`` needs setup_context)."""

    class ClassicSin(Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            ctx.save_for_forward(x, w)
            return torch.sin(w * x)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w = ctx.saved_tensors
            c = torch.cos(w * x)
            return go * c * w, (go * c * x).sum(0)

        @staticmethod
        def jvp(ctx: Any, tx: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
            x, w = ctx.saved_tensors
            c = torch.cos(w * x)
            tangent = c * (w * tx + x * tw)
            if bug == "jvp_scale_w":  # one term of the tangent 1% off
                tangent = c * (w * tx + 1.01 * x * tw)
            return tangent

    return ClassicSin


def classic_sin_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sin(w * x)


# --------------------------------------------------------------------------- tanh (vmap rule)
def tanh_vmap(bug: str | None = None) -> type[Function]:
    """``out = tanh(w * x)`` with a ``vmap`` staticmethod (and ``jvp``); the backward uses
    the saved output, so a vmap rule that mixes the batch mixes the batched gradient."""

    class TanhScale(Function):
        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.tanh(w * x)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs, output)
            ctx.save_for_forward(*inputs, output)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w, out = ctx.saved_tensors
            d = go * (1.0 - out**2)
            return d * w, (d * x).sum(0)

        @staticmethod
        def jvp(ctx: Any, tx: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
            x, w, out = ctx.saved_tensors
            return (1.0 - out**2) * (w * tx + x * tw)

        @staticmethod
        def vmap(info: Any, in_dims: Any, x: torch.Tensor, w: torch.Tensor) -> Any:
            x_dim, w_dim = in_dims
            size = info.batch_size
            xb = x.movedim(x_dim, 0) if x_dim is not None else x.expand(size, *x.shape)
            wb = w.movedim(w_dim, 0) if w_dim is not None else w.expand(size, *w.shape)
            out = torch.tanh(wb.unsqueeze(-2) * xb)  # (B, n, d) with w (B, 1, d)
            if bug == "vmap_mix":  # the batch rolled: row i gets row i-1's output
                out = out.roll(1, 0)
            return out, 0

    return TanhScale


def tanh_vmap_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w * x)


# --------------------------------------------------------------------------- square (vmap rule)
def square_vmap(bug: str | None = None) -> type[Function]:
    """``out = w * x**2`` with a ``vmap`` staticmethod; the backward uses the saved inputs
    only, so a vmap rule that mixes the batch mixes the batched values, not the gradients."""

    class SquareScale(Function):
        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return w * x**2

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs)
            ctx.save_for_forward(*inputs)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w = ctx.saved_tensors
            return 2.0 * w * x * go, (x**2 * go).sum(0)

        @staticmethod
        def jvp(ctx: Any, tx: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
            x, w = ctx.saved_tensors
            return 2.0 * w * x * tx + x**2 * tw

        @staticmethod
        def vmap(info: Any, in_dims: Any, x: torch.Tensor, w: torch.Tensor) -> Any:
            x_dim, w_dim = in_dims
            size = info.batch_size
            xb = x.movedim(x_dim, 0) if x_dim is not None else x.expand(size, *x.shape)
            wb = w.movedim(w_dim, 0) if w_dim is not None else w.expand(size, *w.shape)
            out = wb.unsqueeze(-2) * xb**2
            if bug == "vmap_mix":
                out = out.roll(1, 0)
            return out, 0

    return SquareScale


def square_vmap_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * x**2


# --------------------------------------------------------------------------- without rules
def once(bug: str | None = None) -> type[Function]:
    """``out = w * x**3`` whose backward is marked ``@once_differentiable``: first order
    only; no double backward, no jvp, no vmap support."""

    class OnceCube(Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            return w * x**3

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w = ctx.saved_tensors
            return 3.0 * w * x**2 * go, (x**3 * go).sum(0)

    return OnceCube


def no_vmap(bug: str | None = None) -> type[Function]:
    """``out = w * x**3``, setup_context style, twice differentiable (a backward in built-in
    ops) but with neither ``vmap`` nor ``generate_vmap_rule`` nor ``jvp``."""

    class NoVmapCube(Function):
        @staticmethod
        def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return w * x**3

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx: Any, go: torch.Tensor) -> Any:
            x, w = ctx.saved_tensors
            return 3.0 * w * x**2 * go, (x**3 * go).sum(0)

    return NoVmapCube


# --------------------------------------------------------------------------- the zoo
class Layer(nn.Module):
    """A parameter ``w`` and a Function ``fn(x, w)`` (or its reference, ``reference``)."""

    def __init__(self, fn: Callable[..., torch.Tensor], w: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.w)


@dataclass(frozen=True)
class Spec:
    """One layer: the Function factory, its reference in built-in ops, shapes, and which
    contracts it has (the others must be `Unavailable`)."""

    name: str
    factory: Callable[[str | None], type[Function]]
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    w_shape: Callable[[int], tuple[int, ...]]
    has: frozenset[str]  # among "second", "forward", "batched"


def _vec(d: int) -> tuple[int, ...]:
    return (d,)


def _square(d: int) -> tuple[int, ...]:
    return (d, d)


ALL = frozenset({"second", "forward", "batched"})
SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        Spec("cube", cube, cube_reference, _vec, ALL),
        Spec("bilinear", bilinear, bilinear_reference, _square, frozenset({"second", "batched"})),
        Spec("softplus", softplus, softplus_reference, _vec, frozenset({"second"})),
        Spec("exp_scale", exp_scale, exp_scale_reference, _vec, ALL),
        Spec(
            "classic_sin",
            classic_sin,
            classic_sin_reference,
            _vec,
            frozenset({"second", "forward"}),
        ),
        Spec("tanh_vmap", tanh_vmap, tanh_vmap_reference, _vec, ALL),
        Spec("square_vmap", square_vmap, square_vmap_reference, _vec, ALL),
        Spec("once", once, cube_reference, _vec, frozenset()),
        Spec("no_vmap", no_vmap, cube_reference, _vec, frozenset({"second"})),
    ]
}


@dataclass(frozen=True)
class Case:
    """A layer with one rule mutated (``bug``), or correct (``bug=None``).

    ``contract``: the section that must catch the bug: "first" (the first-order check; a
    nondeterministic backward is caught by its repeat), "second", "forward" or "batched".
    ``blocks``: the blocks that must fail there (and only they). ``mse``: the loss is the
    MSE against a target (else a fixed random projection of the output)."""

    layer: str
    bug: str | None
    contract: str | None
    blocks: frozenset[str]
    mse: bool = False
    also: frozenset[str] = frozenset()  # other sections the bug fails too (see MUTANTS)

    @property
    def name(self) -> str:
        return f"{self.layer}-{self.bug or 'correct'}" + ("-mse" if self.mse else "")

    @property
    def spec(self) -> Spec:
        return SPECS[self.layer]


def _case(
    layer: str, bug: str, contract: str, *blocks: str, mse: bool = False, also: str = ""
) -> Case:
    return Case(layer, bug, contract, frozenset(blocks), mse, frozenset(also.split()))


CORRECT: list[Case] = [Case(name, None, None, frozenset()) for name in SPECS] + [
    Case("softplus", None, None, frozenset(), mse=True),
    Case("cube", None, None, frozenset(), mse=True),
]

MUTANTS: list[Case] = [
    _case("cube", "drop_xx", "second", "input"),
    _case("cube", "sign_wx", "second", "w"),
    _case("cube", "scale_w", "second", "w"),
    _case("bilinear", "drop_xw", "second", "input"),
    _case("bilinear", "scale_w", "second", "w"),
    _case("bilinear", "nondet", "second", "w"),
    _case("softplus", "sign_b", "second", "w"),
    _case("softplus", "nondet", "second", "w"),
    # a backward that varies from call to call makes u . g vary too: second order fails
    _case("softplus", "nondet_first", "first", "w", also="second"),
    # with the MSE, the upstream gradient depends on the output, and so on x and b
    _case("softplus", "scale_go", "second", "w", "input", mse=True),
    _case("exp_scale", "jvp_drop_w", "forward", "w"),
    _case("exp_scale", "jvp_sign_x", "forward", "input"),
    _case("classic_sin", "jvp_scale_w", "forward", "w"),
    # the batched section's block "loss" holds the values under vmap against one at a time
    _case("tanh_vmap", "vmap_mix", "batched", "w", "input", "loss"),
    _case("square_vmap", "vmap_mix", "batched", "loss"),
]


def build(case: Case, seed: int = 0, *, reference: bool = False) -> tuple[nn.Module, Any, Any]:
    """``(model, x, y)`` for ``case`` (``y`` None unless ``case.mse``); with ``reference``,
    the same model on the reference in built-in ops (the oracle). Values depend on ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n, d = 4, 3
    x = 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = 0.7 * torch.randn(case.spec.w_shape(d), generator=gen, dtype=torch.float64)
    fn = case.spec.reference if reference else case.spec.factory(case.bug).apply
    model = Layer(fn, w)
    y = None
    if case.mse:
        with torch.no_grad():
            out = case.spec.reference(x, w)
            y = out + 0.3 * torch.randn(out.shape, generator=gen, dtype=torch.float64)
    return model, x, y
