"""Named losses, shared by every adapter (each implements the same names in its framework).

The NumPy versions below are the definitions; the torch and jax adapters must
compute the same values. The exact formulas are in docs/api.md ("Named losses").

========================  ==============================  =====================================
name                      ``out``                         ``y``
========================  ==============================  =====================================
``"mse"``                 any shape                       same shape; mean((out - y)**2)
``"half_sse"``            any shape                       same shape; 0.5 * sum((out - y)**2)
``"cross_entropy"``       logits ``(N, C)``               int labels ``(N,)`` or probs ``(N, C)``
``"categorical_crossentropy"``  probabilities ``(N, C)``  int labels ``(N,)`` or probs ``(N, C)``
``"bce"``                 probabilities in (0, 1)         same shape, targets in [0, 1]
``"bce_with_logits"``     logits                          same shape, targets in [0, 1]
========================  ==============================  =====================================

``"binary_crossentropy"`` is an alias of ``"bce"``, ``"categorical_cross_entropy"`` of
``"categorical_crossentropy"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from .errors import InvalidOptionError, NothingToCheckError, ShapeMismatchError

LossFn = Callable[[np.ndarray, np.ndarray], float]
LossGrad = Callable[[np.ndarray, np.ndarray], np.ndarray]

ALIASES = {"binary_crossentropy": "bce", "categorical_cross_entropy": "categorical_crossentropy"}
LOSS_NAMES = (
    "mse",
    "half_sse",
    "cross_entropy",
    "categorical_crossentropy",
    "bce",
    "bce_with_logits",
)


#: losses that take class targets (integer labels or probabilities); the others take a target
#: of the output's shape
CLASS_LOSSES = frozenset({"cross_entropy", "categorical_crossentropy"})

T = TypeVar("T")


def canonical_loss_name(name: str) -> str:
    """The canonical spelling of a loss name, or an error listing the known names."""
    key = ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in LOSS_NAMES:
        known = ", ".join(repr(n) for n in (*LOSS_NAMES, *ALIASES))
        raise InvalidOptionError(f"loss must be a callable or one of {known}; got {name!r}")
    return key


def implementation(table: Mapping[str, T], name: str, backend: str) -> tuple[str, T]:
    """``(canonical name, table[canonical name])``: every adapter looks its named losses up
    here, in a table keyed by canonical name, so a name one backend lacks is an error,
    never another loss."""
    key = canonical_loss_name(name)
    if key not in table:
        raise InvalidOptionError(
            f"loss {key!r} has no {backend} implementation; pass a callable loss instead"
        )
    return key, table[key]


# ----------------------------------------------------------------------------- shared messages
# Every adapter raises these two mistakes with these words (tests/test_conformance.py
# compares the adapters' messages): build the error here rather than spell it again.


def missing_target(name: str) -> InvalidOptionError:
    """The error for a named loss given with ``y=None``: the loss has nothing to compare with.
    Named by its canonical spelling (``"binary_crossentropy"`` is ``'bce'``)."""
    key = canonical_loss_name(name)
    return InvalidOptionError(f"loss {key!r} needs a target y; got y=None")


_NOTHING = {
    "params": "the model has no floating-point parameters",
    "inputs": "x holds no floating-point array",
    "all": "the model has no floating-point parameters and x holds no floating-point array",
}


def nothing_to_check(wrt: str, detail: str = "") -> NothingToCheckError:
    """The error for a model and input with no floating-point entries to check for ``wrt``.

    ``detail`` is appended as it is, for what an adapter knows beyond that (frozen
    parameters, zero-size arrays, leaves not checked); the text before it is the same in
    every adapter."""
    what = _NOTHING.get(wrt, _NOTHING["all"])
    return NothingToCheckError(f"nothing to check with wrt={wrt!r}: {what}{detail}")


def _batch(out: np.ndarray) -> int:
    return int(out.shape[0]) if out.ndim else 1


def _targets_as_probs(name: str, out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class targets as a probability array shaped like ``out`` (N, C)."""
    if out.ndim != 2:
        raise ShapeMismatchError(f"loss {name!r} needs out of shape (N, C); got {out.shape}")
    if y.shape == out.shape:
        return y.astype(np.float64)
    if y.shape == out.shape[:1] and np.issubdtype(y.dtype, np.integer):
        if y.size and (y.min() < 0 or y.max() >= out.shape[1]):
            raise ShapeMismatchError(
                f"loss {name!r}: labels must lie in [0, {out.shape[1]}); "
                f"got values from {y.min()} to {y.max()}"
            )
        probs = np.zeros(out.shape, dtype=np.float64)
        probs[np.arange(out.shape[0]), y] = 1.0
        return probs
    raise ShapeMismatchError(
        f"loss {name!r} with out of shape {out.shape} needs y of shape {out.shape} "
        f"or integer labels of shape {out.shape[:1]}; got y of shape {y.shape}, dtype {y.dtype}"
    )


def _same_shape(name: str, out: np.ndarray, y: np.ndarray) -> None:
    if out.shape != y.shape:
        raise ShapeMismatchError(
            f"loss {name!r} needs y of the output's shape {out.shape}; got {y.shape}"
        )


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _mse(out: np.ndarray, y: np.ndarray) -> float:
    _same_shape("mse", out, y)
    return float(np.mean((out - y) ** 2))


def _mse_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    _same_shape("mse", out, y)
    return 2.0 * (out - y) / max(out.size, 1)


def _half_sse(out: np.ndarray, y: np.ndarray) -> float:
    _same_shape("half_sse", out, y)
    return float(0.5 * np.sum((out - y) ** 2))


def _half_sse_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    _same_shape("half_sse", out, y)
    return out - y


def _cross_entropy(out: np.ndarray, y: np.ndarray) -> float:
    t = _targets_as_probs("cross_entropy", out, y)
    return float(-np.sum(t * _log_softmax(out)) / _batch(out))


def _cross_entropy_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = _targets_as_probs("cross_entropy", out, y)
    p = np.exp(_log_softmax(out))
    return (p * t.sum(axis=1, keepdims=True) - t) / _batch(out)


def _categorical(out: np.ndarray, y: np.ndarray) -> float:
    t = _targets_as_probs("categorical_crossentropy", out, y)
    return float(-np.sum(t * np.log(out)) / _batch(out))


def _categorical_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = _targets_as_probs("categorical_crossentropy", out, y)
    return -t / out / _batch(out)


def _bce(out: np.ndarray, y: np.ndarray) -> float:
    _same_shape("bce", out, y)
    return float(-np.mean(y * np.log(out) + (1.0 - y) * np.log1p(-out)))


def _bce_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    _same_shape("bce", out, y)
    return (out - y) / (out * (1.0 - out)) / max(out.size, 1)


def _bce_logits(out: np.ndarray, y: np.ndarray) -> float:
    _same_shape("bce_with_logits", out, y)
    # log(1 + exp(-|z|)) + max(z, 0) - y z, stable for any z
    return float(np.mean(np.logaddexp(0.0, out) - y * out))


def _bce_logits_grad(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    _same_shape("bce_with_logits", out, y)
    sig = 0.5 * (1.0 + np.tanh(0.5 * out))
    return (sig - y) / max(out.size, 1)


#: The definitions: ``(loss, loss_grad)`` on NumPy arrays, by canonical name.
NUMPY_LOSSES: dict[str, tuple[LossFn, LossGrad]] = {
    "mse": (_mse, _mse_grad),
    "half_sse": (_half_sse, _half_sse_grad),
    "cross_entropy": (_cross_entropy, _cross_entropy_grad),
    "categorical_crossentropy": (_categorical, _categorical_grad),
    "bce": (_bce, _bce_grad),
    "bce_with_logits": (_bce_logits, _bce_logits_grad),
}


def numpy_loss(name: str) -> tuple[LossFn, LossGrad]:
    """The ``(loss, loss_grad)`` pair for a loss name, on NumPy arrays."""
    return implementation(NUMPY_LOSSES, name, "NumPy")[1]
