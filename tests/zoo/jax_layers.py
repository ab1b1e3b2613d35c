"""Zoo layers as ``jax.custom_vjp`` functions: ``(apply_fn, params)`` with a hand-written bwd."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .kernels import Layer, Point, run_backward
from .ops import JaxOps


def jax_layer(
    layer: Layer, point: Point, bug: str | None = None, dtype: Any = np.float64
) -> tuple[Any, dict[str, np.ndarray]]:
    """``(apply_fn, params)``: ``apply_fn(params, x)`` is a ``custom_vjp`` with ``layer``'s backward."""
    ops = JaxOps(seed=12345)
    cfg = point.cfg

    @jax.custom_vjp
    def apply_fn(p: Any, x: Any) -> Any:
        return layer.forward(ops, p, x, cfg)[0]

    def fwd(p: Any, x: Any) -> Any:
        out, cache = layer.forward(ops, p, x, cfg)
        return out, (p, x, cache)

    def bwd(res: Any, dout: Any) -> Any:
        p, x, cache = res
        grads, dx = run_backward(layer, ops, p, x, cfg, cache, dout, bug)
        if not np.issubdtype(x.dtype, np.floating):
            dx = None
        return grads, dx

    apply_fn.defvjp(fwd, bwd)
    params = {k: np.array(v, dtype=dtype) for k, v in point.params.items()}
    return apply_fn, params
