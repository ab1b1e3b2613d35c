"""A NumPy multilayer perceptron with hand-written backpropagation: the project's oracle.

It implements the equations of the backpropagation text the project grew from,
with a batch in the rows (``x`` has shape ``(N, n_in)``)::

    z[l] = a[l-1] @ W[l].T + b[l]          a[l] = f(z[l])
    delta[L] = dL/da[L] * f'(z[L])         delta[l] = (delta[l+1] @ W[l+1]) * f'(z[l])
    dL/dW[l] = delta[l].T @ a[l-1]         dL/db[l] = sum over the batch of delta[l]

``W[l]`` has shape ``(n_out, n_in)`` (as ``torch.nn.Linear.weight``). Hidden
activations: ``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"identity"``; output:
``"linear"``, ``"sigmoid"``, ``"softmax"``. Optional L1/L2 penalties on the
weights (reported by `MLP.regularization`, whose gradient ``backward``
adds) and inverted dropout after every hidden layer with a mask drawn from the
model's own seeded generator.

The model follows gradcheck's NumPy protocol (``params``, ``forward``,
``backward``, ``grads``), so ``check_gradients(mlp, x, y, loss="mse")`` checks it;
`MLP.with_bug` returns a copy with a planted mistake for demos and tests.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from .errors import InvalidOptionError, ShapeMismatchError

Activation = Literal["sigmoid", "tanh", "relu", "identity"]
Output = Literal["linear", "sigmoid", "softmax"]
Bug = Literal[
    "sign_flip",
    "factor_2",
    "scale_1.01",
    "missing_bias",
    "wrong_activation_derivative",
    "bias_mean",
    "one_entry",
]

ACTIVATIONS: tuple[str, ...] = get_args(Activation)
OUTPUTS: tuple[str, ...] = get_args(Output)
BUGS: tuple[str, ...] = get_args(Bug)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def activate(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    return z


def activation_derivative(name: str, z: np.ndarray) -> np.ndarray:
    """f'(z) for the hidden activations (ReLU takes 0 at z == 0, a valid subgradient)."""
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s)
    if name == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if name == "relu":
        return (z > 0).astype(z.dtype)
    return np.ones_like(z)


class MLP:
    """A fully connected network with hand-written forward and backward passes.

    Args:
        sizes: layer widths from input to output, e.g. ``[2, 3, 1]`` (the text's network).
        activation: hidden-layer activation.
        output: output-layer activation.
        l1, l2: penalty weights on the weight matrices (not the biases):
            ``l1 * sum|W| + l2/2 * sum W**2``.
        dropout: drop probability after every hidden layer (inverted dropout).
        seed: seeds both the initial weights and the dropout generator.
        bug: plant a known mistake in ``backward`` (see `BUGS`); for demos and tests.

    Example:
        >>> import numpy as np
        >>> from gradcheck import check_gradients
        >>> from gradcheck.reference import MLP
        >>> mlp = MLP([2, 3, 1], activation="sigmoid")
        >>> x = np.random.default_rng(0).normal(size=(5, 2))
        >>> y = np.random.default_rng(1).normal(size=(5, 1))
        >>> check_gradients(mlp, x, y, loss="mse").passed
        True
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        activation: Activation = "tanh",
        output: Output = "linear",
        l1: float = 0.0,
        l2: float = 0.0,
        dropout: float = 0.0,
        seed: int = 0,
        bug: Bug | None = None,
    ) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise InvalidOptionError(f"sizes must list at least 2 positive widths; got {sizes}")
        if activation not in ACTIVATIONS:
            raise InvalidOptionError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
        if output not in OUTPUTS:
            raise InvalidOptionError(f"output must be one of {OUTPUTS}; got {output!r}")
        if not 0.0 <= dropout < 1.0:
            raise InvalidOptionError(f"dropout must lie in [0, 1); got {dropout}")
        if l1 < 0 or l2 < 0:
            raise InvalidOptionError(f"l1 and l2 must be >= 0; got l1={l1}, l2={l2}")
        if bug is not None and bug not in BUGS:
            raise InvalidOptionError(f"bug must be None or one of {BUGS}; got {bug!r}")
        self.sizes = sizes
        self.activation = activation
        self.output = output
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.dropout = float(dropout)
        self.seed = int(seed)
        self.bug = bug
        init = np.random.default_rng(self.seed)
        self.params: dict[str, np.ndarray] = {}
        for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            scale = 1.0 / np.sqrt(n_in)
            self.params[f"W{layer}"] = init.normal(0.0, scale, size=(n_out, n_in))
            self.params[f"b{layer}"] = init.normal(0.0, 0.1, size=(n_out,))
        self.grads: dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.rng = np.random.default_rng([self.seed, 1])
        self._cache: dict[str, Any] = {}

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def with_bug(self, bug: Bug) -> MLP:
        """A copy of this network (same weights) whose backward has the planted ``bug``."""
        other = copy.deepcopy(self)
        if bug not in BUGS:
            raise InvalidOptionError(f"bug must be one of {BUGS}; got {bug!r}")
        other.bug = bug
        return other

    def to_torch(self) -> Any:
        """The same network (same weights, float64) as a ``torch.nn.Module``; needs PyTorch."""
        from ._reference_torch import mlp_to_torch

        return mlp_to_torch(self)

    def to_jax(self) -> Any:
        """The same network as a JAX pair ``(apply_fn, params)``; needs JAX."""
        from ._reference_jax import mlp_to_jax

        return mlp_to_jax(self)

    # ------------------------------------------------------------------ forward
    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ShapeMismatchError(
                f"MLP input must have shape (N, {self.sizes[0]}); got {x.shape}"
            )
        a = x
        acts = [a]
        zs = []
        masks: list[np.ndarray | None] = []
        for layer in range(self.n_layers):
            z = a @ self.params[f"W{layer}"].T + self.params[f"b{layer}"]
            zs.append(z)
            if layer < self.n_layers - 1:
                a = activate(self.activation, z)
                if self.dropout > 0.0:
                    keep = self.rng.random(a.shape) >= self.dropout
                    mask = keep / (1.0 - self.dropout)
                    a = a * mask
                    masks.append(mask)
                else:
                    masks.append(None)
            else:
                a = self._output(z)
            acts.append(a)
        self._cache = {"acts": acts, "zs": zs, "masks": masks}
        return a

    def _output(self, z: np.ndarray) -> np.ndarray:
        if self.output == "sigmoid":
            return _sigmoid(z)
        if self.output == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return z

    def regularization(self) -> float:
        """The L1/L2 penalty on the weights, part of the loss; ``backward`` adds its gradient."""
        total = 0.0
        for layer in range(self.n_layers):
            w = self.params[f"W{layer}"]
            total += self.l1 * float(np.abs(w).sum()) + 0.5 * self.l2 * float((w * w).sum())
        return total

    # ----------------------------------------------------------------- backward
    def _output_backward(self, dout: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.output == "sigmoid":
            return dout * out * (1.0 - out)
        if self.output == "softmax":
            # Jacobian of softmax applied to dout, row by row: p * (dout - <dout, p>)
            return out * (dout - np.sum(dout * out, axis=1, keepdims=True))
        return dout

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Backpropagate ``dout = dL/d(output)``; fill ``self.grads`` and return ``dL/dx``."""
        if not self._cache:
            raise RuntimeError("MLP.backward called before forward")
        acts, zs, masks = self._cache["acts"], self._cache["zs"], self._cache["masks"]
        dout = np.asarray(dout, dtype=np.float64)
        if dout.shape != acts[-1].shape:
            raise ShapeMismatchError(
                f"dout must have the output's shape {acts[-1].shape}; got {dout.shape}"
            )
        bug = self.bug
        delta = self._output_backward(dout, acts[-1])
        grads: dict[str, np.ndarray] = {}
        for layer in reversed(range(self.n_layers)):
            a_prev = acts[layer]
            w = self.params[f"W{layer}"]
            dw = delta.T @ a_prev
            db = delta.sum(axis=0)
            dw = dw + self.l1 * np.sign(w) + self.l2 * w
            grads[f"W{layer}"] = dw
            grads[f"b{layer}"] = db
            da = delta @ w
            if layer > 0:
                if masks[layer - 1] is not None:
                    da = da * masks[layer - 1]
                z = zs[layer - 1]
                if bug == "wrong_activation_derivative" and layer == 1:
                    # uses f(z) where f'(z) belongs: a classic slip
                    deriv = activate(self.activation, z)
                else:
                    deriv = activation_derivative(self.activation, z)
                delta = da * deriv
            else:
                dx = da
        for key, value in grads.items():
            mask = self.gradient_mask(key, dout.shape[0])
            self.grads[key] = value if mask is None else value * mask
        return dx

    def gradient_mask(self, name: str, batch: int) -> np.ndarray | None:
        """The factor the planted bug multiplies parameter ``name``'s gradient by (None: none).

        Every planted bug but ``wrong_activation_derivative`` is such a factor;
        ``bias_mean`` divides by ``batch`` (the batch mean where the sum belongs).
        The torch and JAX exports apply the same masks in their custom backward.
        """
        bug, shape = self.bug, self.params[name].shape
        if bug == "sign_flip" and name == "W0":
            return -np.ones(shape)
        if bug == "factor_2" and name == "W0":
            return np.full(shape, 2.0)
        if bug == "scale_1.01":
            return np.full(shape, 1.01)
        if bug == "missing_bias" and name == f"b{self.n_layers - 1}":
            return np.zeros(shape)
        if bug == "bias_mean" and name.startswith("b"):
            return np.full(shape, 1.0 / batch)
        if bug == "one_entry" and name == "W0":
            mask = np.ones(shape)
            mask[shape[0] // 2, shape[1] // 2] = 1.01
            return mask
        return None
