"""The shapes of NumPy backprop that the NumPy adapter takes, and what to say about the rest.

Hand-written backprop comes in a few shapes (the NumPy guide has one section each):

- an **object**: a dict of parameter arrays, ``forward(...)``, ``backward(dout)`` and a dict
  of gradients, under the names ``params``/``grads`` or numpy-ml's ``parameters``/
  ``gradients``, or under any names given to `model`;
- a **loss model** (cs231n's ``TwoLayerNet``): ``params`` and ``loss(X, y) -> (loss, grads)``;
- a **function pair** (cs231n's layers): ``(forward, backward)`` with
  ``out, cache = forward(*args)`` and ``backward(dout, cache)`` returning one gradient per
  float array argument;
- a **loss function**: ``loss, dx = f(x, y)``. It is a plain callable, which no adapter claims
  by its type: `gradcheck._dispatch` routes it here when it returns ``(loss, dx)``.

This module only recognises and describes; it evaluates nothing (``adapters/numpy.py`` does).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gradcheck.errors import InvalidOptionError, UnsupportedModelError

Kind = Literal["object", "loss_model", "pair"]

#: every shape, for the messages (one clause each)
SHAPES = (
    "an object with `params` (a dict of arrays), `forward(x)`, `backward(dout)` and `grads` "
    "(numpy-ml's `parameters`/`gradients` too, other names through "
    "gradcheck.adapters.numpy.model(obj, params=..., grads=...)); "
    "an object with `params` and `loss(X, y) -> (loss, grads)`; "
    "a pair of functions (forward, backward) with `out, cache = forward(*args)` and "
    "`backward(dout, cache)` returning one gradient per float array argument; "
    "or a function `f(x, y) -> (loss, dx)`"
)


@dataclass(frozen=True)
class Names:
    """The attribute names of an object model's four parts."""

    params: str = "params"
    grads: str = "grads"
    forward: str = "forward"
    backward: str = "backward"


_CONVENTIONS = (Names(), Names(params="parameters", grads="gradients"))


@dataclass(frozen=True)
class NumpyModel:
    """An object with the names of its parts, made by `model`; the adapter checks ``obj``."""

    obj: Any
    names: Names


@dataclass(frozen=True)
class Shape:
    """What the adapter found: the kind, the model (the object, or the pair) and, for an
    object, its attribute names."""

    kind: Kind
    model: Any
    names: Names = Names()


def model(
    obj: Any,
    *,
    params: str = "params",
    grads: str = "grads",
    forward: str = "forward",
    backward: str = "backward",
) -> NumpyModel:
    """Name the attributes of a NumPy object model that does not use the usual names.

    Args:
        obj: the model object.
        params: the attribute holding the dict of parameter arrays.
        grads: the attribute holding the dict of gradients that ``backward`` fills (it may
            be missing until ``backward`` runs).
        forward: the method computing the output.
        backward: the method taking ``dL/dout``, filling the gradients and returning
            ``dL/dx``.

    Returns:
        What `check_gradients` takes in place of ``obj``::

            from gradcheck.adapters import numpy as gc_numpy
            check_gradients(gc_numpy.model(net, params="W_dict", grads="dW_dict"), x)

    Raises:
        UnsupportedModelError: ``obj`` lacks one of the named parts.
    """
    names = Names(params=params, grads=grads, forward=forward, backward=backward)
    for option, value in vars(names).items():
        if not isinstance(value, str) or not value.isidentifier():
            raise InvalidOptionError(
                f"model(..., {option}=) must be an attribute name; got {value!r}"
            )
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if not isinstance(getattr(obj, params, None), Mapping):
        got = type(getattr(obj, params, None)).__name__ if hasattr(obj, params) else "nothing"
        raise UnsupportedModelError(
            f"model(obj, params={params!r}): a {kind} needs a dict of arrays in `{params}`; "
            f"got {got}"
        )
    for method in (forward, backward):
        if not callable(getattr(obj, method, None)):
            raise UnsupportedModelError(
                f"model(obj, ..., {'forward' if method == forward else 'backward'}="
                f"{method!r}): a {kind} has no method `{method}`"
            )
    return NumpyModel(obj, names)


# ---------------------------------------------------------------------------- recognition
def is_function(fn: Any) -> bool:
    """A function, method or ``functools.partial`` of one (not an arbitrary callable object:
    an Equinox module is callable too, and a JAX ``(apply_fn, params)`` pair may hold one)."""
    return isinstance(fn, functools.partial) or inspect.isroutine(fn)


def is_pair(model: Any) -> bool:
    return isinstance(model, tuple) and len(model) == 2 and all(is_function(f) for f in model)


def has_backward(model: Any) -> bool:
    """Whether ``model`` has ``forward`` and ``backward`` methods (NumPy backprop's, when no
    adapter claimed it: a torch module has no ``backward``)."""
    return callable(getattr(model, "forward", None)) and callable(getattr(model, "backward", None))


def _numpy_value(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic, int, float, complex))


def _holds_numpy(params: Any) -> bool:
    """A dict whose values are NumPy arrays (or NumPy/Python numbers): a torch module or an
    Equinox model holding a dict of its own arrays is not a NumPy model."""
    return isinstance(params, Mapping) and all(_numpy_value(v) for v in params.values())


def recognise(model: Any) -> Shape | None:
    """The NumPy shape of ``model``, or ``None``. Never claims a plain callable."""
    if isinstance(model, NumpyModel):
        return Shape("object", model.obj, model.names)
    if is_pair(model):
        return Shape("pair", model)
    if isinstance(model, type):
        return None
    found = [
        names
        for names in _CONVENTIONS
        if _holds_numpy(getattr(model, names.params, None))
        and callable(getattr(model, names.forward, None))
        and callable(getattr(model, names.backward, None))
    ]
    if len(found) == 1:
        return Shape("object", model, found[0])
    if (
        not found
        and _holds_numpy(getattr(model, "params", None))
        and callable(getattr(model, "loss", None))
    ):
        return Shape("loss_model", model)
    return None


# ---------------------------------------------------------------------------- arguments
def argument_names(fn: Callable[..., Any], count: int) -> list[str]:
    """Names for ``count`` positional arguments of ``fn``: its parameter names
    (``affine_forward(x, w, b)``: ``x``, ``w``, ``b``), else ``arg0``, ``arg1``, ..."""
    names = [f"arg{k}" for k in range(count)]
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return names
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for k, parameter in enumerate(p for p in parameters if p.kind in positional):
        if k < count:
            names[k] = parameter.name
    return names


# ---------------------------------------------------------------------------- messages
def describe(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"`{name}`" if name else f"a {type(fn).__qualname__}"


def _dict_attributes(obj: Any) -> list[str]:
    try:
        items = vars(obj).items()
    except TypeError:
        return []
    return [k for k, v in items if isinstance(v, Mapping) and v and _holds_numpy(v)]


def _first_foreign(params: Mapping[Any, Any]) -> str:
    """``"['W']` is a list"``: the first entry of ``params`` that is not a NumPy array."""
    for key, value in params.items():
        if not _numpy_value(value):
            kind = type(value)
            name = (
                kind.__qualname__
                if kind.__module__ == "builtins"
                else (f"{kind.__module__}.{kind.__qualname__}")
            )
            return f"[{key!r}]` is a {name}"
    return "`"  # pragma: no cover - only called on a dict that is not all NumPy


def closest_match(model: Any) -> str | None:
    """What a NumPy-looking ``model`` lacks, in one clause naming the fix; ``None`` when it
    does not look like NumPy backprop at all (no ``forward``, ``backward``, ``loss``, ``params``
    or ``parameters``, and not a tuple of callables)."""
    if isinstance(model, (tuple, list)) and model and all(callable(f) for f in model):
        got = ", ".join(describe(f) for f in model)
        if len(model) != 2:
            return (
                f"a {type(model).__name__} of {len(model)} callables ({got}); a NumPy pair is "
                "the tuple (forward, backward)"
            )
        return (
            f"a pair ({got}) whose parts are not both functions; a NumPy pair is "
            "(forward, backward), two functions (or functools.partial of them)"
        )
    if isinstance(model, type) or not any(
        hasattr(model, a) for a in ("forward", "backward", "loss", "params", "parameters")
    ):
        return None
    has = [a for a in ("params", "parameters", "forward", "backward", "loss") if hasattr(model, a)]
    listed = (
        " and ".join(f"`{a}`" for a in has)
        if len(has) < 3
        else (", ".join(f"`{a}`" for a in has[:-1]) + f" and `{has[-1]}`")
    )
    both = [n for n in _CONVENTIONS if hasattr(model, n.params)]
    if len(both) == 2 and callable(getattr(model, "forward", None)):
        return (
            f"it has {listed}: say which dict holds the parameters, with "
            "gradcheck.adapters.numpy.model(obj, params=..., grads=...)"
        )
    for names in _CONVENTIONS:
        params = getattr(model, names.params, None)
        if params is None or (names.params == "parameters" and callable(params)):
            continue
        if not isinstance(params, Mapping):
            return (
                f"its `{names.params}` is a {type(params).__name__}, not a dict of arrays "
                "(name → array, one block each)"
            )
        if not _holds_numpy(params):
            return (
                f"`{names.params}{_first_foreign(params)}, not a NumPy array "
                "(the NumPy adapter checks NumPy arrays; a layer that makes its parameters "
                "on its first call needs one forward(X) before the check)"
            )
        if callable(getattr(model, "forward", None)):
            return (
                f"it has {listed} but no `backward(dout)`: gradcheck compares your backward "
                f"with numerical derivatives; add `backward(dout)` that fills `{names.grads}` "
                "and returns dL/dx"
            )
        return (
            f"it has {listed} but neither `forward`/`backward` nor `loss(X, y)` returning "
            "(loss, grads)"
        )
    if callable(getattr(model, "forward", None)) and callable(getattr(model, "backward", None)):
        candidates = _dict_attributes(model)
        hint = (
            f" (its dicts of arrays: {', '.join(f'`{c}`' for c in candidates)})"
            if candidates
            else ""
        )
        return (
            "it has `forward` and `backward` but no `params`: give it `params`, a dict of the "
            "arrays it trains (`{}` if none), and fill `grads` in backward; or name its "
            'attributes with gradcheck.adapters.numpy.model(obj, params="...", grads="...")' + hint
        )
    if callable(getattr(model, "loss", None)):
        return (
            "it has `loss` but no `params`: a model whose `loss(X, y)` returns (loss, grads) "
            "keeps its parameter arrays in `params`, keyed like `grads`"
        )
    if callable(getattr(model, "forward", None)):
        return (
            f"it has {listed} but no `backward(dout)`: gradcheck compares your backward with "
            "numerical derivatives"
        )
    return f"it has {listed}, but not the parts of any NumPy shape"


def unsupported(model: Any, detail: str) -> UnsupportedModelError:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    return UnsupportedModelError(
        f"cannot check a model of type {kind}: {detail}; the NumPy shapes are: {SHAPES}"
    )
