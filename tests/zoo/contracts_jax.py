"""A zoo of JAX layers with custom rules for the contracts beyond first order, and their mutants.

Every layer is elementwise over ``N`` entries, with one parameter vector ``a`` (or ``w``) and
one input ``x``, and is checked with the MSE loss against a target ``y``: the loss is then
not linear in the output, so the backward's cotangent depends on ``theta`` and a second-order
check also differentiates *through* it. Elementwise layers have a 2x2 Hessian per entry,
over ``(a_i, x_i)``, which each layer writes by hand (:meth:`Layer.hessian_blocks`): the
exact oracle of the tests, with the exact gradient (:meth:`Layer.gradient`).

- :class:`SinAx`: ``sin(a * x)``, a ``custom_vjp`` whose bwd is itself a ``custom_vjp`` with
  a hand-written bwd of the bwd. Mutants in the bwd of the bwd (the first-order gradient
  stays right: only ``order=2`` sees them).
- :class:`SoftplusJvp`: ``w * softplus(x)``, softplus a ``custom_jvp`` whose tangent calls a
  ``custom_jvp`` sigmoid. Mutants in either tangent rule.
- :class:`TanhVmap`: ``a * tanh(x)``, a ``custom_vjp`` whose fwd (the output) and bwd (the
  input's cotangent) call ``jax.custom_batching.custom_vmap`` functions with their own
  batching rules. Mutants in the batching rules (seen only by a batched evaluation). Its
  bwd cannot be differentiated (JAX has no reverse mode through ``custom_vmap``): its
  ``order=2`` is unavailable, as is its forward mode (a ``custom_vjp``).
- :class:`CallbackBwd`: ``sin(a * x)`` whose bwd runs NumPy through ``jax.pure_callback``
  (no JVP, no batching rule): every contract beyond first order unavailable.

Each :class:`Entry` names the contract (``"second_order"``, ``"forward"``, ``"batched"``) whose
check must find the mutant and the blocks it must be found in (exactly those fail; ``"loss"``
is the batched section's block of loss values).

Not expressible here: a nondeterministic backward (JAX is functional: the same program on
the same inputs gives the same values, short of a callback reading global state).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

N = 5  # entries per block

ApplyFn = Callable[[Any, Any], Any]  # apply_fn(params, x), with params {name: array}


@dataclass(frozen=True)
class Point:
    params: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray


def _signed(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Entries of magnitude in ``[lo, hi]``, random signs: away from zero."""
    return rng.choice([-1.0, 1.0], size=N) * rng.uniform(lo, hi, size=N)


class Layer:
    """One elementwise layer ``out = f(p, x)``; subclasses define the model and its exact
    derivatives."""

    name: str
    param: str  # the parameter's key: its block name
    bugs: tuple[str, ...]
    #: whether the layer has each contract (False: the hook raises Unavailable)
    second_order: bool = True
    forward: bool = True
    batched: bool = True

    def point(self, seed: int) -> Point:
        rng = np.random.default_rng([seed, 0xC0DE])
        return Point(
            params={self.param: _signed(rng, 0.5, 1.5)},
            x=_signed(rng, 0.3, 1.2),
            y=rng.normal(size=N),
        )

    def apply_fn(self, bug: str | None = None) -> ApplyFn:
        """``apply_fn(params, x)`` with the (mutated) custom rules."""
        raise NotImplementedError

    def value(self, p: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``f`` in NumPy."""
        raise NotImplementedError

    def partials(self, p: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(df/dp, df/dx, d2f/dp2, d2f/dx2, d2f/dpdx)`` per entry, by hand."""
        raise NotImplementedError

    # ------------------------------------------------------------------ exact oracles
    def loss(self, point: Point) -> float:
        out = self.value(point.params[self.param], point.x)
        return float(np.mean((out - point.y) ** 2))

    def gradient(self, point: Point) -> np.ndarray:
        """The exact gradient of the MSE loss, flat in the blocks' order ``[p, input]``."""
        p, x = point.params[self.param], point.x
        r = self.value(p, x) - point.y
        fp, fx, *_ = self.partials(p, x)
        return np.concatenate([2 / N * r * fp, 2 / N * r * fx])

    def hessian_blocks(self, point: Point) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(d2L/dp2, d2L/dx2, d2L/dpdx)`` per entry (the Hessian is 2x2 block diagonal)."""
        p, x = point.params[self.param], point.x
        r = self.value(p, x) - point.y
        fp, fx, fpp, fxx, fpx = self.partials(p, x)
        return (
            2 / N * (fp * fp + r * fpp),
            2 / N * (fx * fx + r * fxx),
            2 / N * (fp * fx + r * fpx),
        )

    def hvp(self, point: Point, u: np.ndarray) -> np.ndarray:
        """The exact ``H u``, flat in the blocks' order ``[p, input]``."""
        hpp, hxx, hpx = self.hessian_blocks(point)
        up, ux = u[:N], u[N:]
        return np.concatenate([hpp * up + hpx * ux, hpx * up + hxx * ux])

    def loss_fn(self, bug: str | None = None) -> Callable[[Any, Any, Any], Any]:
        """``loss(params, x, y)`` in JAX through the (mutated) model, for ``check_grads``."""
        apply_fn = self.apply_fn(bug)
        return lambda params, x, y: jnp.mean((apply_fn(params, x) - y) ** 2)


# --------------------------------------------------------------------------- sin(a x)
class SinAx(Layer):
    """``sin(a * x)``: a ``custom_vjp``; its bwd ``(g x cos(ax), g a cos(ax))`` is itself a
    ``custom_vjp`` whose bwd (of the bwd) is written by hand:

    with ``s, c = sin(ax), cos(ax)`` and cotangents ``(ca, cx)`` of the bwd's outputs
    ``(da, dx)``::

        a_bar = ca * (-g x^2 s)       + cx * (g c - g a x s)
        x_bar = ca * (g c - g a x s)  + cx * (-g a^2 s)
        g_bar = ca * x c              + cx * a c
    """

    name = "sin_ax"
    param = "a"
    bugs = ("dropped_cross", "sign_self", "scale_a", "sign_g")
    forward = False  # a custom_vjp: no forward-mode rule

    def value(self, p: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.sin(p * x)

    def partials(self, p: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        s, c = np.sin(p * x), np.cos(p * x)
        return x * c, p * c, -(x**2) * s, -(p**2) * s, c - p * x * s

    def apply_fn(self, bug: str | None = None) -> ApplyFn:
        @jax.custom_vjp
        def backward(a: Any, x: Any, g: Any) -> Any:
            c = jnp.cos(a * x)
            return g * x * c, g * a * c

        def backward_fwd(a: Any, x: Any, g: Any) -> Any:
            return backward(a, x, g), (a, x, g)

        def backward_bwd(res: Any, cot: Any) -> Any:
            a, x, g = res
            ca, cx = cot
            s, c = jnp.sin(a * x), jnp.cos(a * x)
            self_a = -g * x**2 * s
            cross = g * c - g * a * x * s
            self_x = -g * a**2 * s
            if bug == "sign_self":  # a sign flipped in d(da)/da
                self_a = -self_a
            a_bar = ca * self_a + cx * cross
            # the second-order term dropped: x_bar loses d(da)/dx
            x_bar = cx * self_x if bug == "dropped_cross" else ca * cross + cx * self_x
            g_bar = ca * x * c + cx * a * c
            if bug == "scale_a":  # 1% off
                a_bar = 1.01 * a_bar
            if bug == "sign_g":  # the cotangent's own derivative, sign flipped
                g_bar = -g_bar
            return a_bar, x_bar, g_bar

        backward.defvjp(backward_fwd, backward_bwd)

        @jax.custom_vjp
        def sin_ax(a: Any, x: Any) -> Any:
            return jnp.sin(a * x)

        def fwd(a: Any, x: Any) -> Any:
            return jnp.sin(a * x), (a, x)

        def bwd(res: Any, g: Any) -> Any:
            a, x = res
            return backward(a, x, g)

        sin_ax.defvjp(fwd, bwd)
        return lambda params, x: sin_ax(params["a"], x)


# --------------------------------------------------------------------------- w softplus(x)
class SoftplusJvp(Layer):
    """``w * softplus(x)``; softplus a ``custom_jvp`` with tangent ``sigmoid(x) t``, sigmoid a
    ``custom_jvp`` with tangent ``sigmoid(x) (1 - sigmoid(x)) t``. JAX derives the reverse
    mode by transposing the tangent rules, so a wrong tangent is wrong in both modes."""

    name = "softplus_jvp"
    param = "w"
    bugs = ("tangent_scale", "inner_tangent_sign")

    def value(self, p: np.ndarray, x: np.ndarray) -> np.ndarray:
        return p * np.logaddexp(0.0, x)

    def partials(self, p: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        sp = np.logaddexp(0.0, x)
        sig = 1.0 / (1.0 + np.exp(-x))
        return sp, p * sig, np.zeros_like(p), p * sig * (1 - sig), sig

    def apply_fn(self, bug: str | None = None) -> ApplyFn:
        @jax.custom_jvp
        def sigmoid(x: Any) -> Any:
            return 1.0 / (1.0 + jnp.exp(-x))

        @sigmoid.defjvp
        def sigmoid_jvp(primals: Any, tangents: Any) -> Any:
            (x,), (t,) = primals, tangents
            s = sigmoid(x)
            slope = s * (1.0 - s)
            if bug == "inner_tangent_sign":  # a wrong tangent in the inner rule
                slope = -slope
            return s, slope * t

        @jax.custom_jvp
        def softplus(x: Any) -> Any:
            return jnp.logaddexp(0.0, x)

        @softplus.defjvp
        def softplus_jvp(primals: Any, tangents: Any) -> Any:
            (x,), (t,) = primals, tangents
            slope = sigmoid(x)
            if bug == "tangent_scale":  # a wrong tangent: 1% off
                slope = 1.01 * slope
            return softplus(x), slope * t

        return lambda params, x: params["w"] * softplus(x)


# --------------------------------------------------------------------------- a tanh(x), custom_vmap
class TanhVmap(Layer):
    """``a * tanh(x)``: a ``custom_vjp`` whose fwd computes the output, and whose bwd the
    input's cotangent ``g a (1 - tanh(x)^2)``, with ``custom_vmap`` functions; their batching
    rules compute the batch in one go."""

    name = "tanh_vmap"
    param = "a"
    bugs = ("mix_batch", "batch_scale", "mix_values")
    second_order = False  # JAX cannot reverse-differentiate custom_vmap
    forward = False  # a custom_vjp

    def value(self, p: np.ndarray, x: np.ndarray) -> np.ndarray:
        return p * np.tanh(x)

    def partials(self, p: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        t = np.tanh(x)
        return t, p * (1 - t**2), np.zeros_like(p), -2 * p * t * (1 - t**2), 1 - t**2

    def apply_fn(self, bug: str | None = None) -> ApplyFn:
        def batch_of(axis_size: int, in_batched: list[bool], *args: Any) -> list[Any]:
            return [
                v if batched else jnp.broadcast_to(v, (axis_size, *jnp.shape(v)))
                for v, batched in zip(args, in_batched, strict=True)
            ]

        @custom_vmap
        def output(a: Any, x: Any) -> Any:
            return a * jnp.tanh(x)

        @output.def_vmap
        def output_rule(axis_size: int, in_batched: list[bool], a: Any, x: Any) -> Any:
            a, x = batch_of(axis_size, in_batched, a, x)
            out = a * jnp.tanh(x)
            if bug == "mix_values":  # each row gets its neighbour's output (values only)
                out = jnp.roll(out, 1, axis=0)
            return out, True

        @custom_vmap
        def input_cotangent(g: Any, a: Any, x: Any) -> Any:
            t = jnp.tanh(x)
            return g * a * (1.0 - t * t)

        @input_cotangent.def_vmap
        def rule(axis_size: int, in_batched: list[bool], g: Any, a: Any, x: Any) -> Any:
            g, a, x = batch_of(axis_size, in_batched, g, a, x)
            t = jnp.tanh(x)
            out = g * a * (1.0 - t * t)
            if bug == "mix_batch":  # each row gets its neighbour's result
                out = jnp.roll(out, 1, axis=0)
            if bug == "batch_scale":  # 1% off, only when batched
                out = 1.01 * out
            return out, True

        @jax.custom_vjp
        def layer(a: Any, x: Any) -> Any:
            return output(a, x)

        def fwd(a: Any, x: Any) -> Any:
            return output(a, x), (a, x)

        def bwd(res: Any, g: Any) -> Any:
            a, x = res
            return g * jnp.tanh(x), input_cotangent(g, a, x)

        layer.defvjp(fwd, bwd)
        return lambda params, x: layer(params["a"], x)


# --------------------------------------------------------------------------- callback bwd
class CallbackBwd(Layer):
    """``sin(a * x)`` whose bwd computes ``cos(a x)`` in NumPy through ``jax.pure_callback``
    (no ``vmap_method``): JAX can neither differentiate nor batch the bwd."""

    name = "callback_bwd"
    param = "a"
    bugs = ()
    second_order = False
    forward = False
    batched = False

    def value(self, p: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.sin(p * x)

    def partials(self, p: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return SinAx().partials(p, x)

    def apply_fn(self, bug: str | None = None) -> ApplyFn:
        def cos(v: Any) -> Any:
            return jax.pure_callback(np.cos, jax.ShapeDtypeStruct(v.shape, v.dtype), v)

        @jax.custom_vjp
        def layer(a: Any, x: Any) -> Any:
            return jnp.sin(a * x)

        def fwd(a: Any, x: Any) -> Any:
            return jnp.sin(a * x), (a, x)

        def bwd(res: Any, g: Any) -> Any:
            a, x = res
            c = cos(a * x)
            return g * x * c, g * a * c

        layer.defvjp(fwd, bwd)
        return lambda params, x: layer(params["a"], x)


LAYERS: tuple[Layer, ...] = (SinAx(), SoftplusJvp(), TanhVmap(), CallbackBwd())
BY_NAME = {layer.name: layer for layer in LAYERS}


@dataclass(frozen=True)
class Entry:
    """One mutant: the contract whose check must find it and the blocks it must fail in."""

    layer: str
    bug: str
    contract: str  # "second_order", "forward" or "batched"
    blocks: tuple[str, ...]
    first_order_passes: bool  # whether the first-order check cannot see it (by design)
    why: str


MUTANTS: tuple[Entry, ...] = (
    Entry("sin_ax", "dropped_cross", "second_order", ("input",), True,
          "bwd of bwd: x_bar loses the cross term d(da)/dx (a second-order term dropped)"),
    Entry("sin_ax", "sign_self", "second_order", ("a",), True,
          "bwd of bwd: the sign of d(da)/da flipped"),
    Entry("sin_ax", "scale_a", "second_order", ("a",), True,
          "bwd of bwd: a_bar 1% off"),
    Entry("sin_ax", "sign_g", "second_order", ("a", "input"), True,
          "bwd of bwd: the cotangent's derivative g_bar with its sign flipped (reaches both "
          "blocks through the MSE loss's dependence on the output)"),
    Entry("softplus_jvp", "tangent_scale", "forward", ("input",), False,
          "custom_jvp tangent 1% off (reverse mode transposes it: first order sees it too)"),
    Entry("softplus_jvp", "inner_tangent_sign", "second_order", ("input",), True,
          "the inner custom_jvp's tangent (the sigmoid's slope) with its sign flipped: only "
          "the derivative of the outer tangent reads it"),
    Entry("tanh_vmap", "mix_batch", "batched", ("input",), True,
          "the custom_vmap rule rolls the batch: each row gets its neighbour's cotangent"),
    Entry("tanh_vmap", "batch_scale", "batched", ("input",), True,
          "the custom_vmap rule 1% off (the unbatched call is right)"),
    Entry("tanh_vmap", "mix_values", "batched", ("loss", "a", "input"), True,
          "the forward's custom_vmap rule rolls the batch: the batched loss values are mixed, "
          "and the gradients through the MSE's cotangent 2 (out - y) / N"),
)  # fmt: skip
