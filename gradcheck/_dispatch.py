"""Pick the adapter for a model without importing a framework the model cannot belong to.

Two steps, both here:

1. Each adapter whose framework is already imported claims the model objects that are
   unambiguously its own (``matches``: a ``torch.nn.Module``, a JAX ``(apply_fn, params)``
   pair, an Equinox module, a NumPy model with ``forward``/``backward``, a NumPy
   ``(forward, backward)`` pair of functions, ...). No adapter claims a plain callable, and
   none relies on another's list of exclusions. NumPy asks first: its claims are the
   narrowest (dicts of NumPy arrays, a pair of two *functions*), and the JAX adapter takes
   any ``(callable, params)`` pair.
2. A plain callable (a function, a lambda, ``jax.nn.softplus``, ``torch.sin``) belongs to
   no one by its type, so it is routed by what it is given: torch tensors go to the torch
   adapter, JAX arrays to the JAX adapter. With NumPy inputs (or none) the callable itself
   decides: the module it comes from, or the modules its code refers to (``jnp``,
   ``torch``). If that is not conclusive, a callable that returns ``(loss, dx)`` on the
   NumPy inputs (``softmax_loss(x, y)``) is a NumPy loss function; otherwise, if only one
   of torch and jax is imported, that one. Anything still ambiguous is an error that shows
   the forms.

`select_adapter(model, x)` does both.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .errors import MissingFrameworkError, ModelError, UnsupportedModelError

if TYPE_CHECKING:
    from ._problem import FlatProblem

# (adapter module, the framework module that must already be imported for a model to be its)
_ADAPTERS: tuple[tuple[str, str | None], ...] = (
    ("gradcheck.adapters.numpy", None),
    ("gradcheck.adapters.torch", "torch"),
    ("gradcheck.adapters.jax", "jax"),
)

#: top-level package -> the adapter whose arrays a plain callable from that package takes
_CALLABLE_FRAMEWORKS: dict[str, str] = {
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "flax": "jax",
    "equinox": "jax",
    "optax": "jax",
    "diffrax": "jax",
    "optimistix": "jax",
    "lineax": "jax",
    "jaxopt": "jax",
    "haiku": "jax",
}

SUPPORTED = (
    "a torch.nn.Module; "
    "a JAX (apply_fn, params) pair, an Equinox module or a Flax module with its variables; "
    "NumPy backprop (an object with `params`, `forward(x)`, `backward(dout)` and `grads`, "
    "an object with `params` and `loss(X, y) -> (loss, grads)`, a (forward, backward) pair "
    "of functions, or a function returning (loss, dx)); "
    "or a plain function of torch tensors or of JAX arrays"
)


class Adapter(Protocol):
    """What `check_gradients` needs of an adapter (a module, or the plain-callable router)."""

    def build_problem(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        *,
        loss: Any = None,
        wrt: str = "all",
        seed: int = 0,
    ) -> FlatProblem: ...


def load_adapter(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # the adapter itself exists; its framework may not
        framework = module_name.rsplit(".", 1)[-1]
        raise MissingFrameworkError(
            f"The {framework} adapter needs {framework}, which is not installed: "
            f"`pip install 'gradcheck[{framework}]'`"
        ) from exc


def select_adapter(model: Any, x: Any = None) -> Adapter:
    """The adapter for ``model``: the one whose ``matches(model)`` is true, else, for a
    plain callable, the one its inputs ``x`` (or its own module) point to.

    A framework's adapter is imported only when that framework is already in
    ``sys.modules``: a model cannot be a torch module if torch was never imported.
    """
    for module_name, framework in _ADAPTERS:
        if framework is not None and framework not in sys.modules:
            continue
        adapter = load_adapter(module_name)
        if adapter.matches(model):
            return adapter
    from gradcheck.adapters import _numpy_shapes  # NumPy only, no framework

    numpy_like = _numpy_shapes.closest_match(model)
    if numpy_like is not None and (
        not is_plain_callable(model) or _numpy_shapes.has_backward(model)
    ):
        raise _numpy_shapes.unsupported(model, numpy_like)
    if is_plain_callable(model):
        return route_callable(model, x)
    raise UnsupportedModelError(
        f"cannot check a model of type {type(model).__module__}.{type(model).__qualname__}; "
        f"expected {SUPPORTED}"
    )


def is_plain_callable(model: Any) -> bool:
    """A function or callable object that no adapter claims by its type (not a class)."""
    return callable(model) and not isinstance(model, type)


def route_callable(fn: Any, x: Any) -> Adapter:
    """The adapter of a plain callable ``fn`` given ``x``: by the arrays in ``x``, else by
    ``fn``'s own module and references; if neither tells, the NumPy adapter when ``fn``
    returns ``(loss, dx)`` on ``x`` and ``y`` (known only when the problem is built, so a
    `_Undecided` router is returned), else the one framework imported."""
    given = _input_frameworks(x)
    if len(given) > 1:
        raise UnsupportedModelError(
            "x mixes torch tensors and JAX arrays; a plain function takes one framework's arrays"
        )
    framework = next(iter(given), None) or _callable_framework(fn)
    if framework is not None:
        return load_adapter(f"gradcheck.adapters.{framework}")
    return _Undecided(fn)


class _Undecided:
    """The router of a plain callable that its inputs, module and code do not place: a NumPy
    loss function if it returns ``(loss, dx)`` when called once on ``x`` and ``y``, else the
    one framework imported, else an error that shows the forms."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def build_problem(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        *,
        loss: Any = None,
        wrt: str = "all",
        seed: int = 0,
    ) -> FlatProblem:
        numpy_adapter = load_adapter("gradcheck.adapters.numpy")
        imported = [name for name in ("torch", "jax") if name in sys.modules]
        try:
            why_not = numpy_adapter.returns_loss_and_gradient(model, x, y)
        except ModelError:
            if imported:  # it may be a torch or JAX function given NumPy arrays
                why_not = "it raised on NumPy arrays"
            else:
                raise
        adapter = numpy_adapter if why_not is None else self.framework(why_not)
        problem: FlatProblem = adapter.build_problem(model, x, y, loss=loss, wrt=wrt, seed=seed)
        return problem

    def framework(self, why_not: str) -> Any:
        imported = [name for name in ("torch", "jax") if name in sys.modules]
        if len(imported) == 1:
            return load_adapter(f"gradcheck.adapters.{imported[0]}")
        name = _describe(self.fn)
        if not imported:
            raise UnsupportedModelError(
                f"cannot check {name}: a plain function is checked through torch or JAX, and "
                "neither is imported, or, on NumPy arrays, as a loss function "
                f"f(x, y) -> (loss, dx), which it is not ({why_not}); pass a function of torch "
                "tensors or JAX arrays, or use check_flat(loss, gradient, theta0) for NumPy code"
            )
        raise UnsupportedModelError(
            f"cannot tell whether {name} is a JAX or a torch function from NumPy inputs: "
            "for JAX pass JAX arrays (jnp.asarray(x)) or the pair (lambda p, x: f(x), {}), "
            "for torch pass torch tensors (torch.as_tensor(x))"
        )


def _root(module: Any) -> str | None:
    return module.split(".", 1)[0] if isinstance(module, str) and module else None


def _framework_of_module(module: Any) -> str | None:
    root = _root(module)
    return _CALLABLE_FRAMEWORKS.get(root) if root is not None else None


def _input_frameworks(x: Any, depth: int = 0) -> set[str]:
    """The frameworks whose arrays appear in ``x`` (tuples, lists and dicts are searched)."""
    if depth > 32:
        return set()
    if isinstance(x, Mapping):
        items: Any = x.values()
    elif isinstance(x, (tuple, list)):
        items = x
    else:
        framework = _framework_of_module(type(x).__module__)
        return {framework} if framework is not None and hasattr(x, "shape") else set()
    found: set[str] = set()
    for item in items:
        found |= _input_frameworks(item, depth + 1)
    return found


def _callable_framework(fn: Any) -> str | None:
    """The framework ``fn`` belongs to by its module, or by the modules its code names."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    own = {
        _framework_of_module(getattr(fn, "__module__", None)),
        _framework_of_module(getattr(getattr(fn, "__objclass__", None), "__module__", None)),
        *(_framework_of_module(cls.__module__) for cls in type(fn).__mro__),
    }
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
        own.update(_framework_of_module(cls.__module__) for cls in type(owner).__mro__)
    own.discard(None)
    if own:
        return own.pop() if len(own) == 1 else None
    referenced = {_framework_of_module(_module_of(value)) for value in _references(fn)}
    referenced.discard(None)
    return referenced.pop() if len(referenced) == 1 else None


def _module_of(value: Any) -> Any:
    if isinstance(value, types.ModuleType):
        return value.__name__
    return getattr(value, "__module__", None)


def _references(fn: Any) -> list[Any]:
    """The globals and closure values a function's code names (one level deep)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        call = type(fn).__call__  # a callable object: its __call__
        code = getattr(call, "__code__", None)
        fn = call
    if code is None:
        return []
    scope = getattr(fn, "__globals__", {})
    values = [scope[name] for name in code.co_names if name in scope]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    return values


def _describe(fn: Any) -> str:
    name = getattr(fn, "__name__", None)
    return f"`{name}`" if name else f"a {type(fn).__qualname__}"
