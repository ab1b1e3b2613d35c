"""Low-precision JAX kernels (``jax.custom_vjp``), their references, and mutants.

The JAX twin of ``low_precision_torch``: each kernel computes in float32 from bfloat16 inputs and
parameters, stores its results in bfloat16, and has a hand-written backward; ``bug`` plants the
same mistakes (`MUTANTS`). `case(name, seed, bug)` gives ``(kernel, reference, x)``: the kernel an
``(apply_fn, params)`` pair (attention: a function of ``(q, k, v)``), the reference an apply_fn
(a function) of the same math in plain ``jax.numpy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Bug = str | None
F32 = jnp.float32


# --------------------------------------------------------------------------- attention
def attention_kernel(bug: Bug = None) -> Callable[..., Any]:
    def probs(q: Any, k: Any) -> Any:
        scale = q.shape[-1] ** -0.5
        return jax.nn.softmax(q.astype(F32) @ jnp.swapaxes(k.astype(F32), -1, -2) * scale, -1)

    @jax.custom_vjp
    def attention(q: Any, k: Any, v: Any) -> Any:
        return (probs(q, k) @ v.astype(F32)).astype(q.dtype)

    def fwd(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        o = attention(q, k, v)
        return o, (q, k, v, o)

    def bwd(res: Any, do: Any) -> tuple[Any, Any, Any]:
        q, k, v, o = res
        scale = q.shape[-1] ** -0.5
        p = probs(q, k)  # recomputed
        dof = do.astype(F32)
        dv = jnp.swapaxes(p, -1, -2) @ dof
        dp = dof @ jnp.swapaxes(v.astype(F32), -1, -2)
        delta = (dof * o.astype(F32)).sum(-1, keepdims=True)
        ds = p * dp if bug == "dropped_term" else p * (dp - delta)
        dq = ds @ k.astype(F32) if bug == "no_scale" else ds @ k.astype(F32) * scale
        dk = jnp.swapaxes(ds, -1, -2) @ q.astype(F32) * scale
        if bug == "sign":
            dk = -dk
        if bug == "scale_10%":
            dv = dv * 1.1
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    attention.defvjp(fwd, bwd)
    return attention


def attention_reference(q: Any, k: Any, v: Any) -> Any:
    scale = 1.0 / math.sqrt(q.shape[-1])
    return jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) * scale, -1) @ v


# --------------------------------------------------------------------------- layer norm
def layer_norm_kernel(bug: Bug = None) -> Callable[..., Any]:
    eps = 1e-5

    def stats(x: Any) -> tuple[Any, Any]:
        xf = x.astype(F32)
        mean = xf.mean(-1, keepdims=True)
        return mean, jax.lax.rsqrt(((xf - mean) ** 2).mean(-1, keepdims=True) + eps)

    @jax.custom_vjp
    def layer_norm(x: Any, w: Any, b: Any) -> Any:
        mean, rstd = stats(x)
        return ((x.astype(F32) - mean) * rstd * w.astype(F32) + b.astype(F32)).astype(x.dtype)

    def fwd(x: Any, w: Any, b: Any) -> tuple[Any, Any]:
        return layer_norm(x, w, b), (x, w)

    def bwd(res: Any, dy: Any) -> tuple[Any, Any, Any]:
        x, w = res
        mean, rstd = stats(x)
        xhat = (x.astype(F32) - mean) * rstd
        dyf = dy.astype(F32)
        dxhat = dyf * w.astype(F32)
        if bug == "constant_stats":
            dx = rstd * dxhat
        else:
            dx = rstd * (
                dxhat
                - dxhat.mean(-1, keepdims=True)
                - xhat * (dxhat * xhat).mean(-1, keepdims=True)
            )
        terms = dyf * xhat
        if bug == "bf16_accumulation":  # a running sum kept in the storage precision
            dw = jax.lax.scan(
                lambda acc, row: (acc + row, None),
                jnp.zeros_like(terms[0], x.dtype),
                terms.astype(x.dtype),
            )[0]
        else:
            dw = terms.sum(0)
        return dx.astype(x.dtype), dw.astype(w.dtype), dyf.sum(0).astype(w.dtype)

    layer_norm.defvjp(fwd, bwd)

    def apply(params: dict[str, Any], x: Any) -> Any:
        return layer_norm(x, params["weight"], params["bias"])

    return apply


def layer_norm_reference(wrong: bool = False) -> Callable[..., Any]:
    def apply(params: dict[str, Any], x: Any) -> Any:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        if wrong:  # statistics treated as constants: the reference's gradient is not its forward's
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        return (x - mean) / jnp.sqrt(var + 1e-5) * params["weight"] + params["bias"]

    return apply


# --------------------------------------------------------------------------- bias + GELU
def bias_gelu_kernel(bug: Bug = None) -> Callable[..., Any]:
    @jax.custom_vjp
    def bias_gelu(x: Any, b: Any) -> Any:
        z = x.astype(F32) + b.astype(F32)
        return (0.5 * z * (1.0 + jax.lax.erf(z / math.sqrt(2.0)))).astype(x.dtype)

    def fwd(x: Any, b: Any) -> tuple[Any, Any]:
        return bias_gelu(x, b), (x, b)

    def bwd(res: Any, dy: Any) -> tuple[Any, Any]:
        x, b = res
        z = x.astype(F32) + b.astype(F32)
        cdf = 0.5 * (1.0 + jax.lax.erf(z / math.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        slope = cdf if bug == "dropped_term" else cdf + z * pdf
        dz = dy.astype(F32) * slope
        db = dz.sum(0)
        if bug == "scale_10%":
            db = db * 1.1
        return dz.astype(x.dtype), db.astype(b.dtype)

    bias_gelu.defvjp(fwd, bwd)
    return lambda params, x: bias_gelu(x, params["bias"])


def bias_gelu_reference(params: dict[str, Any], x: Any) -> Any:
    return jax.nn.gelu(x + params["bias"], approximate=False)


# --------------------------------------------------------------------------- linear + CE
def linear_cross_entropy_kernel(bug: Bug = None) -> Callable[..., Any]:
    @jax.custom_vjp
    def linear_ce(h: Any, w: Any, labels: Any) -> Any:
        logits = h.astype(F32) @ w.astype(F32).T
        picked = jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
        return (jax.nn.logsumexp(logits, 1) - picked).mean().astype(h.dtype)

    def fwd(h: Any, w: Any, labels: Any) -> tuple[Any, Any]:
        return linear_ce(h, w, labels), (h, w, labels)

    def bwd(res: Any, g: Any) -> tuple[Any, Any, Any]:
        h, w, labels = res
        hf, wf = h.astype(F32), w.astype(F32)
        p = jax.nn.softmax(hf @ wf.T, 1)
        onehot = jax.nn.one_hot(labels, w.shape[0], dtype=F32)
        if bug == "sign":
            p = p + onehot
        elif bug != "dropped_term":
            p = p - onehot
        p = p * (g.astype(F32) / h.shape[0])
        labels_ct = np.zeros(labels.shape, dtype=jax.dtypes.float0)
        return (p @ wf).astype(h.dtype), (p.T @ hf).astype(w.dtype), labels_ct

    linear_ce.defvjp(fwd, bwd)
    return lambda params, x: linear_ce(x[0], params["weight"], x[1])


def linear_cross_entropy_reference(params: dict[str, Any], x: Any) -> Any:
    h, labels = x
    logits = h @ params["weight"].T
    picked = jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
    return (jax.nn.logsumexp(logits, 1) - picked).mean()


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    kernel: Any
    reference: Any
    x: Any


KERNELS = ("attention", "layer_norm", "bias_gelu", "linear_cross_entropy")

#: (kernel, bug) -> the blocks that must fail ("reference": the reference is wrong).
MUTANTS: dict[tuple[str, str], frozenset[str] | str] = {
    ("attention", "dropped_term"): frozenset({"input[0]", "input[1]"}),
    ("attention", "sign"): frozenset({"input[1]"}),
    ("attention", "no_scale"): frozenset({"input[0]"}),
    ("attention", "scale_10%"): frozenset({"input[2]"}),
    ("layer_norm", "constant_stats"): frozenset({"input"}),
    ("layer_norm", "bf16_accumulation"): frozenset({"weight"}),
    ("layer_norm", "wrong_reference"): "reference",
    ("bias_gelu", "dropped_term"): frozenset({"bias", "input"}),
    ("bias_gelu", "scale_10%"): frozenset({"bias"}),
    ("linear_cross_entropy", "sign"): frozenset({"weight", "input[0]"}),
    ("linear_cross_entropy", "dropped_term"): frozenset({"weight", "input[0]"}),
}


def case(name: str, seed: int = 0, bug: Bug = None) -> Case:
    """The kernel ``name`` in bfloat16 (with ``bug`` planted), its reference and its inputs."""
    rng = np.random.default_rng(seed)
    bf16 = jnp.bfloat16
    if name == "attention":
        q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 8, 16)), bf16) for _ in range(3))
        return Case(attention_kernel(bug), attention_reference, (q, k, v))
    if name == "layer_norm":
        d, n = 8, 1024
        params = {
            "weight": jnp.asarray(1.0 + 0.3 * rng.standard_normal(d), bf16),
            "bias": jnp.asarray(0.3 * rng.standard_normal(d), bf16),
        }
        x = (2.0 + rng.standard_normal((n, d))).astype(np.float32)
        wrong = bug == "wrong_reference"
        kernel = layer_norm_kernel(None if wrong else bug)
        return Case((kernel, params), layer_norm_reference(wrong), x)
    if name == "bias_gelu":
        d = 16
        params = {"bias": jnp.asarray(0.5 * rng.standard_normal(d), bf16)}
        x = rng.standard_normal((32, d)).astype(np.float32)
        return Case((bias_gelu_kernel(bug), params), bias_gelu_reference, x)
    if name == "linear_cross_entropy":
        d, classes, n = 16, 10, 32
        params = {"weight": jnp.asarray(rng.standard_normal((classes, d)) / math.sqrt(d), bf16)}
        h = rng.standard_normal((n, d)).astype(np.float32)
        labels = rng.integers(0, classes, n)
        kernel = linear_cross_entropy_kernel(bug)
        return Case((kernel, params), linear_cross_entropy_reference, (h, labels))
    raise KeyError(name)
