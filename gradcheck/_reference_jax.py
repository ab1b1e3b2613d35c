"""The reference MLP as a JAX ``(apply_fn, params)`` pair, for ``MLP.to_jax``.

It imports JAX, so only ``MLP.to_jax`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .reference import MLP

__all__ = ["mlp_penalty_jax", "mlp_to_jax"]


def mlp_to_jax(mlp: MLP) -> tuple[Callable[..., Any], dict[str, np.ndarray]]:
    """The same network as ``(apply_fn, params)`` with ``apply_fn(params, x, key=None)``.

    ``params`` is ``{"W0": ..., "b0": ..., "W1": ...}``: float64 NumPy copies of the
    reference's weights (so no precision is lost whether or not ``jax_enable_x64``
    is on; JAX converts them on use, and the adapter checks them in float64).
    ``W{l}`` has shape ``(n_out, n_in)`` and ``z = a @ W.T + b``, as in the reference.

    The L1/L2 penalty is not part of the output; `mlp_penalty_jax` gives it.
    A planted bug (``mlp.bug``, see `MLP.with_bug`) is exported too, in a
    ``jax.custom_vjp`` backward that makes the same mistake as the reference.
    Dropout, if the reference has it, is inverted dropout with masks drawn from
    ``key`` (default ``jax.random.PRNGKey(mlp.seed)``, the same at every call), so
    the masks differ from the NumPy model's, whose generator advances each call.
    """
    import jax
    import jax.numpy as jnp

    activation, output = mlp.activation, mlp.output
    n_layers, drop, seed = mlp.n_layers, mlp.dropout, mlp.seed
    params = {
        name: np.array(value, dtype=np.float64, copy=True) for name, value in mlp.params.items()
    }

    def hidden(z: Any) -> Any:
        if activation == "sigmoid":
            return 0.5 * (1.0 + jnp.tanh(0.5 * z))
        if activation == "tanh":
            return jnp.tanh(z)
        if activation == "relu":
            return jax.nn.relu(z)  # derivative 0 at 0, as the reference's
        return z

    def planted_linear(layer: int) -> Callable[..., Any]:
        """``a @ w.T + b`` whose custom backward applies the reference's planted bug."""

        @jax.custom_vjp
        def linear(a: Any, w: Any, b: Any) -> Any:
            return a @ w.T + b

        def fwd(a: Any, w: Any, b: Any) -> tuple[Any, Any]:
            return a @ w.T + b, (a, w)

        def bwd(res: Any, g: Any) -> tuple[Any, Any, Any]:
            a, w = res
            grads = {f"W{layer}": g.T @ a, f"b{layer}": g.sum(axis=0)}
            for name in grads:
                mask = mlp.gradient_mask(name, g.shape[0])
                if mask is not None:
                    grads[name] = grads[name] * jnp.asarray(mask)
            return g @ w, grads[f"W{layer}"], grads[f"b{layer}"]

        linear.defvjp(fwd, bwd)
        return linear

    @jax.custom_vjp
    def wrong_hidden(z: Any) -> Any:
        return hidden(z)

    def wrong_fwd(z: Any) -> tuple[Any, Any]:
        return hidden(z), z

    def wrong_bwd(z: Any, g: Any) -> tuple[Any]:
        return (g * hidden(z),)  # f(z) where f'(z) belongs, as the reference's planted bug

    wrong_hidden.defvjp(wrong_fwd, wrong_bwd)

    def final(z: Any) -> Any:
        if output == "sigmoid":
            return 0.5 * (1.0 + jnp.tanh(0.5 * z))
        if output == "softmax":
            return jax.nn.softmax(z, axis=1)
        return z

    def apply_fn(params: Any, x: Any, key: Any = None) -> Any:
        a = jnp.asarray(x)
        if drop > 0.0 and key is None:
            key = jax.random.PRNGKey(seed)
        for layer in range(n_layers):
            w, b = jnp.asarray(params[f"W{layer}"]), jnp.asarray(params[f"b{layer}"])
            z = planted_linear(layer)(a, w, b) if mlp.bug else a @ w.T + b
            if layer == n_layers - 1:
                return final(z)
            a = (
                wrong_hidden(z)
                if mlp.bug == "wrong_activation_derivative" and layer == 0
                else hidden(z)
            )
            if drop > 0.0:
                keep = jax.random.bernoulli(jax.random.fold_in(key, layer), 1.0 - drop, a.shape)
                a = jnp.where(keep, a / (1.0 - drop), 0.0)
        return a

    return apply_fn, params


def mlp_penalty_jax(mlp: MLP) -> Callable[[Any], Any]:
    """``penalty(params)``: the reference's ``l1 * sum|W| + l2/2 * sum W**2`` in jax.numpy."""
    import jax.numpy as jnp

    l1, l2, n_layers = mlp.l1, mlp.l2, mlp.n_layers

    def penalty(params: Any) -> Any:
        total = jnp.zeros(())
        for layer in range(n_layers):
            w = jnp.asarray(params[f"W{layer}"])
            total = total + l1 * jnp.sum(jnp.abs(w)) + 0.5 * l2 * jnp.sum(w * w)
        return total

    return penalty
