"""Custom NumPy layers with hand-written backward passes: the code a gradient check guards.

Every layer follows gradcheck's NumPy protocol:

- ``params``: a dict of float64 arrays;
- ``forward(x)``: returns the output and caches what ``backward`` needs;
- ``backward(dout)``: given ``dL/dout``, fills ``grads`` (same keys and shapes as
  ``params``) and returns ``dL/dx``.
"""

from __future__ import annotations

import numpy as np


class Dense:
    """``out = x @ W.T + b`` with ``W`` of shape ``(n_out, n_in)``."""

    def __init__(self, n_in: int, n_out: int, *, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.params = {
            "W": rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(n_out, n_in)),
            "b": rng.normal(0.0, 0.1, size=n_out),
        }
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return x @ self.params["W"].T + self.params["b"]

    def backward(self, dout: np.ndarray) -> np.ndarray:
        assert self._x is not None, "call forward first"
        self.grads["W"][...] = dout.T @ self._x
        self.grads["b"][...] = dout.sum(axis=0)
        return dout @ self.params["W"]


class Softplus:
    """``out = log(1 + exp(x))``, computed stably; no parameters."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        return np.logaddexp(0.0, x)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        assert self._x is not None, "call forward first"
        return dout * 0.5 * (1.0 + np.tanh(0.5 * self._x))  # d softplus / dx = sigmoid(x)


class LayerNorm:
    """Normalises every row of ``x`` to zero mean and unit variance, then scales and shifts."""

    def __init__(self, n: int, *, eps: float = 1e-5, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.eps = eps
        self.params = {
            "gamma": 1.0 + 0.1 * rng.normal(size=n),
            "beta": 0.1 * rng.normal(size=n),
        }
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=1, keepdims=True)
        inv_std = 1.0 / np.sqrt(x.var(axis=1, keepdims=True) + self.eps)
        xhat = (x - mean) * inv_std
        self._cache = (xhat, inv_std)
        return self.params["gamma"] * xhat + self.params["beta"]

    def backward(self, dout: np.ndarray) -> np.ndarray:
        assert self._cache is not None, "call forward first"
        xhat, inv_std = self._cache
        self.grads["gamma"][...] = (dout * xhat).sum(axis=0)
        self.grads["beta"][...] = dout.sum(axis=0)
        dxhat = dout * self.params["gamma"]
        n = xhat.shape[1]
        return (
            inv_std
            / n
            * (
                n * dxhat
                - dxhat.sum(axis=1, keepdims=True)
                - xhat * (dxhat * xhat).sum(axis=1, keepdims=True)
            )
        )


class Sequential:
    """Layers in a row; the parameters are named ``"{position}.{name}"`` (``"0.W"``)."""

    def __init__(self, *layers: Dense | Softplus | LayerNorm) -> None:
        self.layers = list(layers)
        # the same arrays as the layers hold, so a change to one is a change to the other
        self.params = {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params.items()
        }
        self.grads = {
            f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.grads.items()
        }

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout
