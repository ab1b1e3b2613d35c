"""NumPy backprop as people write it, correct unless a ``bug`` is planted.

Each shape the NumPy adapter takes without glue (see docs/numpy.md):

- cs231n-style layer functions, ``out, cache = f_forward(...)`` and
  ``grads = f_backward(dout, cache)``: affine, ReLU, batch norm (a ``bn_param`` whose running
  statistics the forward updates in place), a naive convolution (a ``conv_param``) and a naive
  max-pool (a ``pool_param``);
- a loss function ``loss, dx = softmax_loss(x, y)``;
- a cs231n-style model, ``params`` and ``loss(X, y) -> (loss, grads)``;
- a numpy-ml-style layer: ``parameters`` (running statistics among them), ``gradients``, a list
  of cached inputs that ``forward`` appends to and ``flush_gradients()`` empties;
- an object whose ``forward(Q, K, V)`` takes three inputs and whose ``backward`` returns
  ``(dQ, dK, dV)``.

Backward functions take ``bug=`` (bind it with ``functools.partial``); `MUTANTS` maps each
layer to its planted bugs and the block each one lands in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: layer -> {bug: the block the bug is in}
MUTANTS: dict[str, dict[str, str]] = {
    "affine": {"sign": "b"},
    "relu": {"inverted_mask": "x"},
    "batchnorm": {"missing_term": "x"},
    "conv": {"wrong_index": "w"},
    "max_pool": {"wrong_index": "x"},
    "softmax_loss": {"missing_term": "x"},
    "two_layer_net": {"missing_term": "W2"},
    "numpy_ml_batchnorm": {"sign": "intercept"},
    "attention": {"wrong_index": "input[1]"},
}


# ----------------------------------------------------------------------------- layer functions
def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Any]:
    out = x.reshape(x.shape[0], -1) @ w + b
    return out, (x, w, b)


def affine_backward(
    dout: np.ndarray, cache: Any, bug: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w, _ = cache
    dx = (dout @ w.T).reshape(x.shape)
    dw = x.reshape(x.shape[0], -1).T @ dout
    db = dout.sum(axis=0)
    if bug == "sign":
        db = -db
    return dx, dw, db


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Any]:
    return np.maximum(0.0, x), x


def relu_backward(dout: np.ndarray, cache: Any, bug: str | None = None) -> np.ndarray:
    x = cache
    return dout * (x < 0) if bug == "inverted_mask" else dout * (x > 0)


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict[str, Any]
) -> tuple[np.ndarray, Any]:
    """Training mode updates ``bn_param``'s running statistics in place; ``"test"`` mode
    normalises with them."""
    eps, momentum = bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    d = x.shape[1]
    running_mean = bn_param.setdefault("running_mean", np.zeros(d))
    running_var = bn_param.setdefault("running_var", np.ones(d))
    if bn_param.get("mode", "train") == "test":
        out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
        return out, None
    mu, var = x.mean(axis=0), x.var(axis=0)
    std = np.sqrt(var + eps)
    xhat = (x - mu) / std
    running_mean *= momentum
    running_mean += (1.0 - momentum) * mu
    running_var *= momentum
    running_var += (1.0 - momentum) * var
    return gamma * xhat + beta, (xhat, gamma, std)


def batchnorm_backward(
    dout: np.ndarray, cache: Any, bug: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, gamma, std = cache
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    if bug == "missing_term":
        dx = (dxhat - dxhat.mean(axis=0)) / std
    else:
        dx = (dxhat - dxhat.mean(axis=0) - xhat * (dxhat * xhat).mean(axis=0)) / std
    return dx, dgamma, dbeta


def conv_forward_naive(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, conv_param: dict[str, int]
) -> tuple[np.ndarray, Any]:
    stride, pad = conv_param["stride"], conv_param["pad"]
    n, _, h, width = x.shape
    f, _, hh, ww = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = 1 + (h + 2 * pad - hh) // stride, 1 + (width + 2 * pad - ww) // stride
    out = np.zeros((n, f, ho, wo))
    for i in range(ho):
        for j in range(wo):
            window = xp[:, :, i * stride : i * stride + hh, j * stride : j * stride + ww]
            out[:, :, i, j] = np.tensordot(window, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out, (x, w, conv_param)


def conv_backward_naive(
    dout: np.ndarray, cache: Any, bug: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, w, conv_param = cache
    stride, pad = conv_param["stride"], conv_param["pad"]
    _, _, h, width = x.shape
    _, _, hh, ww = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    ho, wo = dout.shape[2:]
    for i in range(ho):
        for j in range(wo):
            rows, cols = slice(i * stride, i * stride + hh), slice(j * stride, j * stride + ww)
            if bug == "wrong_index":  # the window of (j, i): rows and columns swapped
                rows, cols = cols, rows
            d = dout[:, :, i, j]
            dw += np.tensordot(d, xp[:, :, rows, cols], axes=([0], [0]))
            dxp[:, :, i * stride : i * stride + hh, j * stride : j * stride + ww] += np.tensordot(
                d, w, axes=([1], [0])
            )
    return dxp[:, :, pad : pad + h, pad : pad + width], dw, dout.sum(axis=(0, 2, 3))


def max_pool_forward_naive(x: np.ndarray, pool_param: dict[str, int]) -> tuple[np.ndarray, Any]:
    ph, pw, stride = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    n, c, h, width = x.shape
    ho, wo = 1 + (h - ph) // stride, 1 + (width - pw) // stride
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            window = x[:, :, i * stride : i * stride + ph, j * stride : j * stride + pw]
            out[:, :, i, j] = window.max(axis=(2, 3))
    return out, (x, pool_param)


def max_pool_backward_naive(dout: np.ndarray, cache: Any, bug: str | None = None) -> np.ndarray:
    x, pool_param = cache
    ph, pw, stride = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    dx = np.zeros_like(x)
    n, c, ho, wo = dout.shape
    for k in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    window = x[k, ch, i * stride : i * stride + ph, j * stride : j * stride + pw]
                    r, s = np.unravel_index(np.argmax(window), window.shape)
                    if bug == "wrong_index":
                        r, s = s, r
                    dx[k, ch, i * stride + r, j * stride + s] += dout[k, ch, i, j]
    return dx


def softmax_loss(x: np.ndarray, y: np.ndarray, bug: str | None = None) -> tuple[float, np.ndarray]:
    shifted = x - x.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = x.shape[0]
    loss = -float(log_probs[np.arange(n), y].mean())
    dx = np.exp(log_probs)
    if bug != "missing_term":
        dx[np.arange(n), y] -= 1.0
    return loss, dx / n


# ----------------------------------------------------------------------------- a cs231n model
class TwoLayerNet:
    """affine - relu - affine - softmax, with L2 regularisation: ``loss(X, y)`` returns
    ``(loss, grads)`` (and the scores when ``y`` is None), as cs231n's models do."""

    def __init__(
        self,
        input_dim: int = 5,
        hidden_dim: int = 6,
        num_classes: int = 3,
        reg: float = 0.1,
        seed: int = 0,
        bug: str | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.params = {
            "W1": rng.normal(scale=0.5, size=(input_dim, hidden_dim)),
            "b1": rng.normal(scale=0.1, size=hidden_dim),
            "W2": rng.normal(scale=0.5, size=(hidden_dim, num_classes)),
            "b2": rng.normal(scale=0.1, size=num_classes),
        }
        self.reg, self.bug = reg, bug

    def loss(self, X: np.ndarray, y: np.ndarray | None = None) -> Any:
        p = self.params
        h, affine1 = affine_forward(X, p["W1"], p["b1"])
        a, relu = relu_forward(h)
        scores, affine2 = affine_forward(a, p["W2"], p["b2"])
        if y is None:
            return scores
        loss, dscores = softmax_loss(scores, y)
        loss += 0.5 * self.reg * float(np.sum(p["W1"] ** 2) + np.sum(p["W2"] ** 2))
        grads = {}
        da, grads["W2"], grads["b2"] = affine_backward(dscores, affine2)
        if self.bug != "missing_term":
            grads["W2"] += self.reg * p["W2"]
        _, grads["W1"], grads["b1"] = affine_backward(relu_backward(da, relu), affine1)
        grads["W1"] += self.reg * p["W1"]
        return loss, grads


# ----------------------------------------------------------------------------- a numpy-ml layer
class BatchNorm1D:
    """numpy-ml's layout: ``parameters`` (with the running statistics, which have no
    gradient), ``gradients`` (what is trained, added to by ``backward``), ``hyperparameters``,
    a list of the inputs ``forward`` saw (``backward`` takes one ``dLdy`` per input) and
    ``flush_gradients()``, which starts a new step."""

    def __init__(self, n_in: int = 4, seed: int = 0, bug: str | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.parameters = {
            "scaler": 1.0 + 0.3 * rng.normal(size=n_in),
            "intercept": 0.3 * rng.normal(size=n_in),
            "running_mean": np.zeros(n_in),
            "running_var": np.ones(n_in),
        }
        self.gradients = {"scaler": np.zeros(n_in), "intercept": np.zeros(n_in)}
        self.hyperparameters = {"momentum": 0.9, "epsilon": 1e-5}
        self.X: list[np.ndarray] = []
        self.trainable, self.bug = True, bug

    def forward(self, X: np.ndarray, retain_derived: bool = True) -> np.ndarray:
        mm, ep = self.hyperparameters["momentum"], self.hyperparameters["epsilon"]
        p = self.parameters
        mean, var = p["running_mean"], p["running_var"]
        if self.trainable and retain_derived:
            mean, var = X.mean(axis=0), X.var(axis=0)
            p["running_mean"] = mm * p["running_mean"] + (1.0 - mm) * mean
            p["running_var"] = mm * p["running_var"] + (1.0 - mm) * var
        if retain_derived:
            self.X.append(X)
        return p["scaler"] * (X - mean) / np.sqrt(var + ep) + p["intercept"]

    def backward(self, dLdy: Any, retain_grads: bool = True) -> Any:
        dLdys = dLdy if isinstance(dLdy, list) else [dLdy]
        dX = []
        for dy, x in zip(dLdys, self.X, strict=False):
            dx, d_scaler, d_intercept = self._bwd(dy, x)
            dX.append(dx)
            if retain_grads:
                self.gradients["scaler"] += d_scaler
                self.gradients["intercept"] += -d_intercept if self.bug == "sign" else d_intercept
        return dX[0] if len(self.X) == 1 else dX

    def _bwd(self, dy: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scaler, ep = self.parameters["scaler"], self.hyperparameters["epsilon"]
        std = np.sqrt(X.var(axis=0) + ep)
        xhat = (X - X.mean(axis=0)) / std
        d_intercept = dy.sum(axis=0)
        d_scaler = (dy * xhat).sum(axis=0)
        n = X.shape[0]
        dx = (n * dy - d_intercept - xhat * d_scaler) * scaler / (n * std)
        return dx, d_scaler, d_intercept

    def flush_gradients(self) -> None:
        self.X = []
        for k, v in self.gradients.items():
            self.gradients[k] = np.zeros_like(v)


# ----------------------------------------------------------------------------- three inputs
class Attention:
    """``softmax(Q Kᵀ / √d) V``: ``forward(Q, K, V)``, ``backward(dout) -> (dQ, dK, dV)``;
    no parameters."""

    def __init__(self, bug: str | None = None) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.bug = bug

    def forward(self, Q: np.ndarray, K: np.ndarray, V: np.ndarray) -> np.ndarray:
        scores = Q @ K.T / np.sqrt(Q.shape[1])
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        self.cache = (Q, K, V, weights)
        return weights @ V

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        Q, K, V, weights = self.cache
        scale = 1.0 / np.sqrt(Q.shape[1])
        dV = weights.T @ dout
        dweights = dout @ V.T
        dscores = weights * (dweights - (dweights * weights).sum(axis=1, keepdims=True))
        dQ = dscores @ K * scale
        dK = (dscores if self.bug == "wrong_index" else dscores.T) @ Q * scale
        return dQ, dK, dV


def attention_forward(Q: np.ndarray, K: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, Any]:
    layer = Attention()
    return layer.forward(Q, K, V), layer


def attention_backward(
    dout: np.ndarray, cache: Any, bug: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cache.bug = bug
    return cache.backward(dout)
