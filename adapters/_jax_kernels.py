"""Evaluations for `gradcheck.check_kernel` in JAX: a low-precision kernel and its reference.

The kernel is an ``(apply_fn, params)`` pair or a function of JAX arrays (a ``jax.custom_vjp``
inside); the reference is the same math in plain ``jax.numpy``: an ``apply_fn`` taking the same
params (or a pair, whose params are ignored: the kernel's are used) for a pair, a function of the
same inputs for a function. Evaluates only, like ``_torch_kernels``: the kernel in its own
precision, the reference in float64 (matmul precision "highest") and in the kernel's precision,
on the same quantized inputs and parameters and the same upstream gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcheck._errors import first_line
from gradcheck._losses import canonical_loss_name
from gradcheck._problem import output_projection
from gradcheck._reference_check import KernelEvaluation
from gradcheck._report import Report
from gradcheck.errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    UnsupportedModelError,
)

from .jax import _is_float_array, _plain_spec, _spec_for, _x64, input_name, jax_loss, param_name

__all__ = ["evaluate"]

_NAMES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
_PRECISION = {np.dtype(v): k for k, v in _NAMES.items()}


def _numpy(a: Any) -> np.ndarray:
    return np.array(np.asarray(a).astype(np.float64), copy=True)


class _Case:
    def __init__(
        self, kernel: Any, reference: Any, x: Any, y: Any, loss: Any, seed: int, precision: Any
    ) -> None:
        spec = _spec_for(kernel)
        if spec.form not in ("(apply_fn, params) pair", "function"):
            raise UnsupportedModelError(
                "check_kernel takes a JAX kernel as an (apply_fn, params) pair or a function of "
                f"arrays; got a {spec.form}"
            )
        self.forward = spec.forward
        self.style = spec.style
        self.pair = spec.has_params
        if self.pair:
            ref = reference[0] if isinstance(reference, tuple) else reference
            if not callable(ref):
                raise InvalidOptionError(
                    "the reference of an (apply_fn, params) kernel must be an apply_fn taking the "
                    f"same params, or a pair; got {type(reference).__name__}"
                )
            self.ref_apply: Callable[..., Any] = ref
            self.ref_forward: Callable[[Any, Any], Any] = ref
        else:
            if not callable(reference):
                raise InvalidOptionError(
                    f"the reference must be a function of arrays; got {type(reference).__name__}"
                )
            self.ref_apply = reference
            self.ref_forward = _plain_spec(reference).forward
        if loss is not None and not (callable(loss) or isinstance(loss, str)):
            raise InvalidOptionError(
                "loss must be None, a callable loss(out, y) or a loss name; "
                f"got {type(loss).__name__}"
            )
        if isinstance(loss, str):
            canonical_loss_name(loss)
        if loss is None and y is not None:
            loss = "mse"
        self.loss = jax_loss(loss) if isinstance(loss, str) else loss
        self.seed = int(seed)
        p_items, self.p_def = jax.tree_util.tree_flatten_with_path(spec.tree)
        x_items, self.x_def = jax.tree_util.tree_flatten_with_path(x)
        self.p_leaves = [leaf for _, leaf in p_items]
        self.x_leaves = [leaf for _, leaf in x_items]
        self.p_float = [i for i, leaf in enumerate(self.p_leaves) if _is_float_array(leaf)]
        self.x_float = [i for i, leaf in enumerate(self.x_leaves) if _is_float_array(leaf)]
        self.p_names = [param_name(p_items[i][0], self.style) for i in self.p_float]
        self.x_names = [input_name(x_items[i][0]) for i in self.x_float]
        dtypes = [np.dtype(self.p_leaves[i].dtype) for i in self.p_float] or [
            np.dtype(self.x_leaves[i].dtype) for i in self.x_float
        ]
        if precision is not None:
            self.dtype = np.dtype(_NAMES[precision])
        elif dtypes:
            self.dtype = dtypes[0]
        else:
            raise GradcheckInputError(
                "cannot tell the kernel's precision: it has no float parameters and x has no "
                "float arrays"
            )
        if self.dtype not in _PRECISION:
            raise InvalidOptionError(
                f"the kernel runs in {self.dtype}: check_kernel checks bfloat16, float16 and "
                "float32 kernels (a float64 one: check_gradients(kernel, x))"
            )
        self.precision = _PRECISION[self.dtype]
        # inputs and target quantized to the kernel's precision
        for i in self.x_float:
            self.x_leaves[i] = jnp.asarray(self.x_leaves[i], dtype=self.dtype)
        for i in self.p_float:  # parameters too, in their own dtype (a float32 master copy)
            leaf = self.p_leaves[i]
            self.p_leaves[i] = jnp.asarray(jnp.asarray(leaf, self.dtype), np.dtype(leaf.dtype))
        self.y = jnp.asarray(y, dtype=self.dtype) if _is_float_array(y) else y
        self.projections: list[np.ndarray] | None = None

    def size(self) -> int:
        leaves = [self.p_leaves[i] for i in self.p_float] + [self.x_leaves[i] for i in self.x_float]
        return sum(int(np.size(leaf)) for leaf in leaves)

    def _trees(self, pf: list[Any], xf: list[Any]) -> tuple[Any, Any]:
        p = list(self.p_leaves)
        for i, v in zip(self.p_float, pf, strict=True):
            p[i] = v
        xs = list(self.x_leaves)
        for i, v in zip(self.x_float, xf, strict=True):
            xs[i] = v
        return jax.tree_util.tree_unflatten(self.p_def, p), jax.tree_util.tree_unflatten(
            self.x_def, xs
        )

    def run(self, who: str, forward: Callable[[Any, Any], Any], cast: Any) -> dict[str, np.ndarray]:
        pf = [
            jnp.asarray(self.p_leaves[i], dtype=cast) if cast is not None else self.p_leaves[i]
            for i in self.p_float
        ]
        xf = [
            jnp.asarray(self.x_leaves[i], dtype=cast) if cast is not None else self.x_leaves[i]
            for i in self.x_float
        ]

        def outputs(pf: list[Any], xf: list[Any]) -> Any:
            params, xs = self._trees(pf, xf)
            return forward(params, xs)

        try:
            out, vjp = jax.vjp(outputs, pf, xf)
        except Exception as exc:
            raise ModelError(f"the {who} raised: {first_line(exc)}") from exc
        leaves, _ = jax.tree_util.tree_flatten_with_path(out)
        if not leaves or not all(_is_float_array(v) for _, v in leaves):
            raise ModelError(f"the {who} must return float arrays only")
        names = [
            "output" if len(leaves) == 1 else "output" + jax.tree_util.keystr(tuple(path))
            for path, _ in leaves
        ]
        values = {n: _numpy(v) for n, (_, v) in zip(names, leaves, strict=True)}
        try:
            if self.loss is None:
                if self.projections is None:  # quantized once, to the kernel's output dtypes
                    self.projections = [
                        _numpy(
                            jnp.asarray(output_projection(tuple(v.shape), self.seed, i), v.dtype)
                        )
                        for i, (_, v) in enumerate(leaves)
                    ]
                cot = jax.tree_util.tree_unflatten(
                    jax.tree_util.tree_structure(out),
                    [
                        jnp.asarray(r, dtype=v.dtype)
                        for r, (_, v) in zip(self.projections, leaves, strict=True)
                    ],
                )
                gp, gx = vjp(cot)
            else:
                y = (
                    jnp.asarray(self.y, dtype=cast)
                    if (cast is not None and _is_float_array(self.y))
                    else self.y
                )
                loss = self.loss

                def objective(pf: list[Any], xf: list[Any]) -> Any:
                    return loss(outputs(pf, xf), y)

                value, lvjp = jax.vjp(objective, pf, xf)
                gp, gx = lvjp(jnp.ones_like(value))
        except Exception as exc:
            raise ModelError(f"the {who}'s backward raised: {first_line(exc)}") from exc
        for name, g in zip(self.p_names, gp, strict=True):
            values[name] = _numpy(g)
        for name, g in zip(self.x_names, gx, strict=True):
            values[name] = _numpy(g)
        return values

    def blocks(self, values: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
        outs = [n for n in values if n.startswith("output")]
        return [
            *((n, "output", tuple(values[n].shape)) for n in outs),
            *((n, "param", tuple(values[n].shape)) for n in self.p_names),
            *((n, "input", tuple(values[n].shape)) for n in self.x_names),
        ]

    def reference_check(self, seed: int, mode: str) -> Report:
        from gradcheck._api import check_gradients

        params = [
            np.asarray(v, dtype=np.float64) if i in self.p_float else v
            for i, v in enumerate(self.p_leaves)
        ]
        xs = [
            np.asarray(v, dtype=np.float64) if i in self.x_float else v
            for i, v in enumerate(self.x_leaves)
        ]
        x = jax.tree_util.tree_unflatten(self.x_def, xs)
        y = np.asarray(self.y, dtype=np.float64) if _is_float_array(self.y) else self.y
        loss = self.loss
        model: Any = (
            (self.ref_apply, jax.tree_util.tree_unflatten(self.p_def, params))
            if self.pair
            else self.ref_apply
        )
        return check_gradients(model, x, y, loss=loss, seed=seed, mode=mode)  # type: ignore[arg-type]


def evaluate(
    kernel: Any,
    reference: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    seed: int = 0,
    precision: str | None = None,
) -> KernelEvaluation:
    """The kernel's and the reference's values for `gradcheck.check_kernel`."""
    with _x64():
        case = _Case(kernel, reference, x, y, loss, seed, precision)
        kernel_values = case.run("kernel", case.forward, None)
        with jax.default_matmul_precision("highest"):
            golden = case.run("reference (float64)", case.ref_forward, jnp.float64)
        lowprec = case.run(f"reference ({case.precision})", case.ref_forward, case.dtype)
    for name in kernel_values:
        if golden.get(name, kernel_values[name]).shape != kernel_values[name].shape:
            raise ModelError(
                f"the kernel's {name} has shape {kernel_values[name].shape}, the reference's "
                f"{golden[name].shape}"
            )

    def reference_check(seed: int, mode: str) -> Report:
        return case.reference_check(seed, mode)

    return KernelEvaluation(
        blocks=case.blocks(kernel_values),
        kernel=kernel_values,
        golden=golden,
        lowprec=lowprec,
        precision=case.precision,
        framework="jax",
        evaluations=3,
        reference_check=reference_check,
        size=case.size(),
    )
