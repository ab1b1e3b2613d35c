"""Small hand-written NumPy layers used by the tests (correct unless a bug is asked for)."""

from __future__ import annotations

import numpy as np


class Linear:
    def __init__(self, n_in: int, n_out: int, seed: int = 0, bug: str | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.params = {
            "W": rng.normal(size=(n_in, n_out)) / np.sqrt(n_in),
            "b": rng.normal(size=n_out),
        }
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.bug = bug

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.grads["W"] = self.x.T @ dout
        self.grads["b"] = dout.sum(axis=0)
        if self.bug == "transpose":
            self.grads["W"] = self.grads["W"].T
        return dout @ self.params["W"].T


class ReLU:
    """A parameter-free ReLU; checked with respect to its input."""

    params: dict[str, np.ndarray] = {}
    grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.mask = x > 0
        return np.where(self.mask, x, 0.0)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * self.mask


class LinearReLU:
    """x @ W + b followed by ReLU, so pre-activations can be placed on the kink."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        self.params = {"W": W.copy(), "b": b.copy()}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        self.z = x @ self.params["W"] + self.params["b"]
        return np.maximum(self.z, 0.0)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dz = dout * (self.z > 0)
        self.grads["W"] = self.x.T @ dz
        self.grads["b"] = dz.sum(axis=0)
        return dz @ self.params["W"].T


class MaxPool1d:
    """Non-overlapping max pooling over windows of ``k`` along the last axis."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, m = x.shape
        win = x.reshape(n, m // self.k, self.k)
        self.arg = win.argmax(axis=2)  # first of any tie
        self.shape = x.shape
        return win.max(axis=2)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        n, m = self.shape
        dx = np.zeros((n, m // self.k, self.k))
        rows, cols = np.meshgrid(np.arange(n), np.arange(m // self.k), indexing="ij")
        dx[rows, cols, self.arg] = dout
        return dx.reshape(n, m)
