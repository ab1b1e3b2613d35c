"""Zoo layers as NumPy protocol models: ``params``, ``forward(x)``, ``backward(dout)``, ``grads``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .kernels import L1, L2, Layer, Point, run_backward
from .ops import NumpyOps


class NumpyLayer:
    """``layer`` at ``point`` with ``bug`` planted in backward (``None``: correct)."""

    def __init__(
        self, layer: Layer, point: Point, bug: str | None = None, dtype: Any = np.float64
    ) -> None:
        self.layer, self.cfg, self.bug = layer, point.cfg, bug
        self.params = {k: np.array(v, dtype=dtype) for k, v in point.params.items()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        # dropout draws from this generator; the adapter resets it before every evaluation
        self.ops = NumpyOps(np.random.default_rng(12345))

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        out, self.cache = self.layer.forward(self.ops, self.params, x, self.cfg)
        return np.asarray(out)

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        grads, dx = run_backward(
            self.layer, self.ops, self.params, self.x, self.cfg, self.cache, dout, self.bug
        )
        for name, value in grads.items():
            self.grads[name] = np.asarray(value)
        return dx


class PenalizedLinear:
    """``x @ W`` with an L1/L2 penalty reported by ``regularization()`` (the protocol's hook)."""

    MUTANTS = ("sign_l1", "missing_half", "dropped_term")

    def __init__(self, point: Point, bug: str | None = None) -> None:
        self.params = {"W": point.params["W"].copy()}
        self.grads = {"W": np.zeros_like(self.params["W"])}
        self.bug = bug

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.params["W"]

    def regularization(self) -> float:
        w = self.params["W"]
        return float(L1 * np.abs(w).sum() + 0.5 * L2 * (w * w).sum())

    def backward(self, dout: np.ndarray) -> np.ndarray:
        w = self.params["W"]
        l1 = -L1 if self.bug == "sign_l1" else L1
        l2 = 2 * L2 if self.bug == "missing_half" else L2
        dw = self.x.T @ dout
        if self.bug != "dropped_term":
            dw = dw + l1 * np.sign(w) + l2 * w
        self.grads["W"] = dw
        return dout @ w.T
