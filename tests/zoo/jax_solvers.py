"""Solver and ODE models in JAX with custom backwards, as real code writes them: an implicit
fixed-point solve, a hyperparameter through ``lax.custom_root``, an RK4 integrator with a
discrete adjoint. Used by ``tests/test_jax_real.py`` and ``benchmarks/jax_solvers.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

lax = jax.lax


def rand(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).normal(size=shape)



# ----------------------------------------------------------------- model: implicit solve
def fixed_point_model(bug: str | None = None, iters: int = 0) -> Callable[[Any, Any], Any]:
    """z* = tanh(W z* + U x + b), found by a while_loop; the backward solves the adjoint
    equation by a second fixed-point loop (implicit differentiation). ``iters > 0``: the
    same map unrolled ``iters`` times with no custom rule (the oracle)."""

    def f(p: Any, z: Any, x: Any) -> Any:
        return jnp.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

    def iterate(g: Callable[[Any], Any], z0: Any) -> Any:
        def cond(c: Any) -> Any:
            return (c[1] > 1e-15) & (c[2] < 500)

        def body(c: Any) -> Any:
            zn = g(c[0])
            return zn, jnp.max(jnp.abs(zn - c[0])), c[2] + 1

        return lax.while_loop(cond, body, (z0, jnp.asarray(jnp.inf, z0.dtype), 0))[0]

    if iters:

        def unrolled(p: Any, x: Any) -> Any:
            z = jnp.zeros((x.shape[0], p["W"].shape[0]), x.dtype)
            return lax.fori_loop(0, iters, lambda _, z: f(p, z, x), z)

        return unrolled

    @jax.custom_vjp
    def solve(p: Any, x: Any) -> Any:
        return iterate(lambda z: f(p, z, x), jnp.zeros((x.shape[0], p["W"].shape[0]), x.dtype))

    def fwd(p: Any, x: Any) -> Any:
        z = solve(p, x)
        return z, (p, x, z)

    def bwd(res: Any, g: Any) -> Any:
        p, x, z = res
        _, vjp_z = jax.vjp(lambda zz: f(p, zz, x), z)
        u = iterate(lambda u: g + vjp_z(u)[0], jnp.zeros_like(g))
        _, vjp_px = jax.vjp(lambda pp, xx: f(pp, z, xx), p, x)
        dp, dx = vjp_px(u)
        if bug == "W":
            dp = {**dp, "W": dp["W"].at[1, 2].multiply(1.01)}
        if bug == "input":
            dx = 1.001 * dx
        return dp, dx

    solve.defvjp(fwd, bwd)
    return solve


def fixed_point_params(n: int = 5, d: int = 3) -> dict[str, np.ndarray]:
    return {
        "W": rand((n, n), 1, 0.3 / np.sqrt(n)),
        "U": rand((n, d), 2, 1 / np.sqrt(d)),
        "b": rand((n,), 3, 0.1),
    }


# ------------------------------------------------- model: a hyperparameter via custom_root
def ridge_model(bug: bool = False) -> Callable[[Any, Any], Any]:
    """argmin_w |A w - t|^2 / n + lam |w|^2 by Newton on the optimality condition, through
    lax.custom_root (the gradient is implicit); ``lam`` is a 0-d array."""

    def apply_fn(p: Any, data: Any) -> Any:
        a, t = data
        lam = p["lam"]

        def grad_obj(w: Any) -> Any:
            return 2 * a.T @ (a @ w - t) / a.shape[0] + 2 * lam * w + 0.1 * jnp.tanh(w)

        def newton(g: Callable[[Any], Any], w0: Any) -> Any:
            def body(_: int, w: Any) -> Any:
                return w - jnp.linalg.solve(jax.jacobian(g)(w), g(w))

            return lax.fori_loop(0, 30, body, w0)

        def tangent_solve(g: Callable[[Any], Any], y: Any) -> Any:
            jac = jax.jacobian(g)(y)
            out = jnp.linalg.solve(jac, y)
            return out * 1.01 if bug else out

        return lax.custom_root(grad_obj, jnp.zeros(a.shape[1]), newton, tangent_solve)

    return apply_fn


# ------------------------------------------------------------ model: ODE with an adjoint
def ode_model(bug: str | None = None, adjoint: bool = True, steps: int = 30) -> Any:
    """dy/dt = tanh(y W^T + b) / tau - y by RK4 in a lax.scan; the custom_vjp backward is
    the discrete adjoint (a reverse scan over the saved states)."""
    dt = 1.0 / steps

    def vf(p: Any, y: Any) -> Any:
        return jnp.tanh(y @ p["W"].T + p["b"]) / p["tau"] - y

    def step(p: Any, y: Any) -> Any:
        k1 = vf(p, y)
        k2 = vf(p, y + 0.5 * dt * k1)
        k3 = vf(p, y + 0.5 * dt * k2)
        k4 = vf(p, y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def integrate(p: Any, y0: Any) -> Any:
        return lax.scan(lambda y, _: (step(p, y), y), y0, None, length=steps)

    if not adjoint:
        return lambda p, y0: integrate(p, y0)[0]

    @jax.custom_vjp
    def solve(p: Any, y0: Any) -> Any:
        return integrate(p, y0)[0]

    def fwd(p: Any, y0: Any) -> Any:
        y_end, ys = integrate(p, y0)
        return y_end, (p, ys)

    def bwd(res: Any, g: Any) -> Any:
        p, ys = res

        def back(carry: Any, y: Any) -> Any:
            a, gp = carry
            dp, dy = jax.vjp(step, p, y)[1](a)
            return (dy, jax.tree_util.tree_map(jnp.add, gp, dp)), None

        zero = jax.tree_util.tree_map(jnp.zeros_like, p)
        (a0, gp), _ = lax.scan(back, (g, zero), ys, reverse=True)
        if bug == "tau":
            gp = {**gp, "tau": gp["tau"] * 1.0001}
        if bug == "b":
            gp = {**gp, "b": gp["b"].at[0].set(0.0)}
        return gp, a0

    solve.defvjp(fwd, bwd)
    return solve


def ode_params(n: int = 4) -> dict[str, np.ndarray]:
    return {"W": rand((n, n), 7, 1 / np.sqrt(n)), "b": rand((n,), 8, 0.1), "tau": np.asarray(0.7)}
