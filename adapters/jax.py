"""The JAX adapter: turns a JAX model into a :class:`~gradcheck._problem.FlatProblem`.

Model forms (see :func:`matches` and :func:`build_problem`):

- ``(apply_fn, params)`` with ``apply_fn(params, x)`` and any pytree of params
  (nested dicts, lists, NamedTuples, an Equinox module, ...);
- an Equinox module, called as ``model(x)``;
- a Flax NNX module, called as ``model(x)`` (``nnx.split``/``nnx.merge``);
- a Flax Linen ``(module, variables)`` pair (or ``(module.apply, variables)``),
  called as ``module.apply(variables, x)``, and ``(module, variables, rngs)`` for a
  module that draws random numbers (``rngs={"dropout": key}``: held fixed);
- a plain function of JAX arrays (``jax.nn.softplus``), routed here by
  :mod:`gradcheck._dispatch`: its inputs are checked, as ``f(x)``, ``f(*x)`` for a
  tuple or list and ``f(**x)`` for a dict.

What is checked: every floating-point array leaf of the parameters (for Linen,
of the ``"params"`` collection; for NNX, the ``nnx.Param`` variables) and, with
``wrt="all"`` or ``"inputs"``, every floating-point array leaf of ``x``. Blocks
are named by their pytree path as the user would write it: dict keys joined by
``/`` (``params/Dense_0/kernel``), attributes by ``.`` and sequence positions in
brackets (``layers[1].weight``); inputs are ``input``, ``input[1]``,
``input['key']``. Everything else (integer arrays, PRNG keys, Linen
``batch_stats``, NNX ``BatchStat`` and ``RngState``, functions) is passed
through unchanged as a constant. Python floats and complex arrays are constants
too, and the report names them as not checked; zero-size arrays hold nothing to check.

Caller state: every trace and evaluation runs inside thread-local configuration
scopes (:func:`_scope`): 64-bit types on, ``jax_debug_nans``/``jax_debug_infs`` off
(a NaN gradient is the core's to report), jit enabled and matmul precision at its
highest, on a float64 copy of the model's floating-point leaves, inputs and targets;
the caller's global flags are never touched and never change a verdict. If the
traced computation still holds lower-precision values (a layer built with
``dtype=jnp.float32``, an explicit ``.astype``), the problem's ``precision`` says so
and a note explains.

Randomness: JAX is functional, so a model sees the same randomness at every
evaluation as long as its key is fixed: put the key inside ``x`` (a
``(data, key)`` tuple: keys are not floating point, so they pass through), close
over it in ``apply_fn``, give a Linen module its ``rngs``, or give an NNX module its
``nnx.Rngs`` (the adapter evaluates merged copies, so the rng counter starts from
the same state every time and the user's module is never advanced).

Speed: the model's Python runs once per check: ``jax.value_and_grad`` of the loss is
traced when the problem is built, and both the loss and the gradient are evaluated
from that one program, op by op (no compile): the loss runs the equations the value
needs, the gradient all of them. A loop in the model (``while_loop``, ``scan``: a
solver, an ODE) is one equation, compiled by JAX on its first evaluation and shared by
the loss and the gradient. The evaluation folds a ``transpose`` read by ``dot_general``
into the product (see :class:`_OpByOp`), as a compile would: op by op, ``x @ w.T``
would otherwise copy ``w`` every time. When the core expects at least
:data:`COMPILE_FROM` evaluations (:data:`COMPILE_FROM_LOOPS` for a program with
loops, whose compile costs seconds), the loss is compiled, ``vmap``-ed over the rows
of a ``(max_batch, P)`` array; shorter batches, and single points, are padded to
``max_batch`` rows, so no call compiles again and ``loss`` agrees with
``loss_batch`` bit for bit. ``max_batch`` (a power of two, at most 256) keeps the rows
under 32 MiB and the batch's intermediate values under :data:`MEMORY_BUDGET`. A
model that cannot be vmapped gets a compiled single-point loss instead; one that
branches on values in Python cannot be traced at all and runs eagerly, one
evaluation at a time. Within one check every loss value comes from one of these
paths, never a mix.

Internal JAX APIs: the op-by-op evaluator (:class:`_OpByOp`) reads jaxprs
(``jax.extend.core``), binds primitives and folds transposes; everything else uses
public APIs (``jax.jit(...).trace``, ``jax.value_and_grad``, ``jax.vmap``, eager
calls). It is used only after :func:`interpreter_ok`, a probe run once per process,
has shown it gives what JAX's own eager evaluation gives on a program with every
construct it treats specially, and only for a model whose program it evaluated at the
starting point without error; otherwise the loss and gradient are compiled with
``jax.jit`` instead, and the report says so.

The adapter does no numerics of its own: it only evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from gradcheck import _memory
from gradcheck._errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
    UnsupportedModelError,
)
from gradcheck._losses import canonical_loss_name, implementation
from gradcheck._problem import BlockKind, FlatProblem, Precision, block_layout, output_projection

__all__ = ["build_problem", "matches"]

try:  # public in jax.extend.core in recent jax; jax.core before
    from jax.extend.core import Literal as JaxLiteral
except ImportError:  # pragma: no cover - older jax
    from jax.core import Literal as JaxLiteral  # type: ignore[attr-defined,no-redef]

#: A check expecting at least this many loss evaluations gets a compiled, vmapped loss;
#: fewer run op by op (a compile costs a few hundred ms, an evaluation about a millisecond).
COMPILE_FROM = 256
#: The same for a loss with a loop (``while_loop``, ``scan``): compiling a solver or an
#: ODE integrator, vmapped, can take seconds (jaxopt's LBFGS: 5 to 10 here), while each
#: op-by-op evaluation runs the loop JAX compiled once, for the first evaluation, and
#: shares with the gradient. About where the two cost the same for such a solver.
COMPILE_FROM_LOOPS = 1024
#: Rows of perturbed parameter vectors evaluated in one vmapped call, at most.
MAX_BATCH = 256
#: Memory a batched call may use, roughly (bytes); bounds ``max_batch`` for large models.
MEMORY_BUDGET = 512 * 2**20
#: The ``(max_batch, P)`` float64 block of parameter rows stays under this many bytes.
ROWS_BUDGET = 32 * 2**20

NameStyle = Literal["dict", "attr"]
PathEntry = Any  # one jax.tree_util key (DictKey, GetAttrKey, SequenceKey, ...)

_LOWER_PRECISION: dict[str, Precision] = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}

_LOOPS = frozenset({"while", "scan"})


# --------------------------------------------------------------------------- caller state
def _x64() -> AbstractContextManager[Any]:
    """A thread-local scope with 64-bit types enabled; the global flag is left alone."""
    scope: Any = getattr(jax, "enable_x64", None)  # recent jax: a config context manager
    if scope is None:  # older jax
        import importlib

        experimental: Any = importlib.import_module("jax.experimental")
        return experimental.enable_x64()
    return scope(True)


#: thread-local configuration a check sets for itself, whatever the caller set globally
_NEUTRAL: tuple[tuple[str, Any], ...] = (
    ("debug_nans", False),  # a NaN gradient is a finding to report, not an exception
    ("debug_infs", False),
    ("default_matmul_precision", "highest"),
)


def _scope() -> contextlib.ExitStack:
    """x64 on, jit on, NaN/Inf debugging off, full matmul precision: thread-local scopes."""
    stack = contextlib.ExitStack()
    stack.enter_context(_x64())
    stack.enter_context(jax.disable_jit(False))
    for name, value in _NEUTRAL:
        state = getattr(jax, name, None)
        if callable(state):
            stack.enter_context(state(value))
    return stack


# --------------------------------------------------------------------------- detection
def _module_class(module_name: str, attr: str) -> type | None:
    """``sys.modules[module_name].attr`` if that module was already imported, else None."""
    module = sys.modules.get(module_name)
    cls = getattr(module, attr, None) if module is not None else None
    return cls if isinstance(cls, type) else None


def _is_instance(obj: Any, module_name: str, attr: str) -> bool:
    cls = _module_class(module_name, attr)
    return cls is not None and isinstance(obj, cls)


def _is_equinox(obj: Any) -> bool:
    return _is_instance(obj, "equinox", "Module")


def _is_nnx(obj: Any) -> bool:
    return _is_instance(obj, "flax.nnx", "Module")


def _is_linen(obj: Any) -> bool:
    return _is_instance(obj, "flax.linen", "Module")


def _linen_owner(fn: Any) -> Any:
    """The Linen module of ``fn`` if ``fn`` is a Linen module or its bound ``apply``, else None."""
    if _is_linen(fn):
        return fn
    owner = getattr(fn, "__self__", None)
    if owner is not None and _is_linen(owner) and getattr(fn, "__name__", "") == "apply":
        return owner
    return None


def _is_pair(model: Any) -> bool:
    if not (isinstance(model, tuple) and len(model) == 2 and callable(model[0])):
        return False
    # a torch callable with torch tensors belongs to the torch adapter
    leaves = jax.tree_util.tree_leaves(model[1])
    return not any(type(leaf).__module__.split(".")[0] == "torch" for leaf in leaves)


def _is_linen_triple(model: Any) -> bool:
    return (
        isinstance(model, tuple)
        and len(model) == 3
        and _linen_owner(model[0]) is not None
        and isinstance(model[2], Mapping)
    )


def matches(model: Any) -> bool:
    """Whether ``model`` is a JAX model object this adapter can evaluate (cheap; imports
    nothing). Plain functions of JAX arrays are routed here by `gradcheck._dispatch`."""
    return (
        _is_pair(model)
        or _is_linen_triple(model)
        or _is_equinox(model)
        or _is_nnx(model)
        or _is_linen(model)
    )


# --------------------------------------------------------------------------- model forms
@dataclass
class _Spec:
    """A model reduced to one pytree, a forward function and a rule for its parameters."""

    tree: Any
    forward: Callable[[Any, Any], Any]
    style: NameStyle
    form: str
    is_param: Callable[[tuple[PathEntry, ...]], bool] = lambda path: True
    strip_value: bool = False
    notes: list[str] = field(default_factory=list)
    has_params: bool = True


def _call(model: Any, x: Any) -> Any:
    return model(x)


def _spec_for(model: Any) -> _Spec:
    if isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
        fn, params = model[0], model[1]
        linen = _linen_owner(fn)
        if linen is not None:
            return _linen_spec(linen, params, None)
        return _Spec(tree=params, forward=fn, style="dict", form="(apply_fn, params) pair")
    if _is_linen_triple(model):
        return _linen_spec(_linen_owner(model[0]), model[1], model[2])
    if _is_nnx(model):
        return _nnx_spec(model)
    if _is_equinox(model):
        return _Spec(tree=model, forward=_call, style="attr", form="Equinox module")
    if _is_linen(model):
        raise UnsupportedModelError(
            f"a Flax Linen module needs its variables: pass (module, variables); "
            f"got a bare {type(model).__qualname__}"
        )
    if callable(model) and not isinstance(model, (type, tuple)):
        return _plain_spec(model)
    raise UnsupportedModelError(
        "the JAX adapter expects an (apply_fn, params) pair, an Equinox module, a Flax NNX "
        "module, a Flax Linen (module, variables) pair or a function of JAX arrays; "
        f"got {type(model).__qualname__}"
    )


def _plain_spec(fn: Callable[..., Any]) -> _Spec:
    """A function of JAX arrays: no parameters; called as ``f(x)``, ``f(*x)``, ``f(**x)``."""

    def forward(params: Any, x: Any) -> Any:
        if x is None:
            return fn()
        if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
            return fn(*x)
        if isinstance(x, Mapping):
            return fn(**x)
        return fn(x)

    return _Spec(tree=None, forward=forward, style="dict", form="function", has_params=False)


def _linen_spec(module: Any, variables: Any, rngs: Mapping[str, Any] | None) -> _Spec:
    if not hasattr(variables, "keys") or "params" not in variables:
        got = sorted(map(str, variables.keys())) if hasattr(variables, "keys") else None
        raise NothingToCheckError(
            "a Flax Linen (module, variables) pair needs variables with a 'params' collection; "
            f"got {'collections ' + str(got) if got is not None else type(variables).__name__}"
        )
    others = [str(name) for name in variables if name != "params"]
    keys = dict(rngs) if rngs is not None else None
    from flax import errors as flax_errors

    def forward(tree: Any, x: Any) -> Any:
        try:
            if others:  # batch_stats etc.: updates of a training-mode call are discarded
                out, _ = module.apply(tree, x, mutable=others, rngs=keys)
                return out
            return module.apply(tree, x, rngs=keys)
        except flax_errors.InvalidRngError as exc:
            found = re.search(r'PRNG for "(\w+)"', str(exc))
            stream = found.group(1) if found else "dropout"
            raise ModelError(
                f"the Flax Linen module draws random numbers from {stream!r}: pass its key as a "
                f"third item, (module, variables, {{{stream!r}: jax.random.key(0)}}) (held fixed "
                "across evaluations)"
            ) from exc

    def is_param(path: tuple[PathEntry, ...]) -> bool:
        return bool(path) and isinstance(path[0], DictKey) and path[0].key == "params"

    return _Spec(
        tree=variables, forward=forward, style="dict", form="Flax Linen pair", is_param=is_param
    )


def _nnx_spec(model: Any) -> _Spec:
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    rest = _to_float64(rest)

    def forward(tree: Any, x: Any) -> Any:
        # fresh Variables in every evaluation (and trace): rng counters and batch statistics
        # start from the user's state every time, and the user's module is never written
        fresh = jax.tree_util.tree_map(lambda leaf: leaf, rest)
        return nnx.merge(graphdef, tree, fresh)(x)

    return _Spec(
        tree=params, forward=forward, style="attr", form="Flax NNX module", strip_value=True
    )


# --------------------------------------------------------------------------- leaves and names
def _is_array_of(leaf: Any, kind: Any) -> bool:
    """Whether ``leaf`` is a NumPy or JAX array whose dtype is a subtype of ``kind``."""
    dtype = getattr(leaf, "dtype", None)
    return (
        isinstance(leaf, (np.ndarray, np.generic, jax.Array))
        and dtype is not None
        and jnp.issubdtype(dtype, kind)
    )


def _is_float_array(leaf: Any) -> bool:
    return _is_array_of(leaf, jnp.floating)


def _is_complex_array(leaf: Any) -> bool:
    return _is_array_of(leaf, jnp.complexfloating)


def _as_float64(leaf: Any) -> Any:
    """A float64 JAX copy of a floating-point array leaf, anything else as it is (under x64)."""
    return jnp.asarray(leaf, dtype=jnp.float64) if _is_float_array(leaf) else leaf


def _to_float64(tree: Any) -> Any:
    return jax.tree_util.tree_map(_as_float64, tree)


def _key_name(entry: PathEntry, style: NameStyle) -> str:
    if isinstance(entry, DictKey):
        key = entry.key
        if isinstance(key, int):
            return f"[{key}]"
        return f".{key}" if style == "attr" else f"/{key}"
    if isinstance(entry, SequenceKey):
        return f"[{entry.idx}]"
    if isinstance(entry, GetAttrKey):
        return f".{entry.name}"
    if isinstance(entry, FlattenedIndexKey):
        return f"[{entry.key}]"
    return f"[{entry}]"


def param_name(
    path: Sequence[PathEntry], style: NameStyle = "dict", strip_value: bool = False
) -> str:
    """A parameter's block name from its path: ``params/Dense_0/kernel``, ``layers[1].weight``."""
    path = list(path)
    if strip_value and path and isinstance(path[-1], GetAttrKey) and path[-1].name == "value":
        path = path[:-1]  # NNX Variable wrappers
    name = "".join(_key_name(entry, style) for entry in path).lstrip("/.")
    if not name or name.startswith("["):
        name = "params" + name
    return name


def input_name(path: Sequence[PathEntry]) -> str:
    """The block name of an input leaf: ``input``, ``input[1]``, ``input['key']``."""
    return "input" + jax.tree_util.keystr(tuple(path))


# --------------------------------------------------------------------------- losses
def _mean_batch(out: jax.Array) -> int:
    return int(out.shape[0]) if out.ndim else 1


def _targets_as_probs(name: str, out: jax.Array, y: Any) -> jax.Array:
    if out.ndim != 2:
        raise ShapeMismatchError(f"loss {name!r} needs out of shape (N, C); got {out.shape}")
    y_shape = tuple(np.shape(y))
    if y_shape == tuple(out.shape):
        return jnp.asarray(y, dtype=jnp.float64)
    y_dtype = np.asarray(y).dtype
    if y_shape == tuple(out.shape[:1]) and np.issubdtype(y_dtype, np.integer):
        labels = np.asarray(y)
        if labels.size and (labels.min() < 0 or labels.max() >= out.shape[1]):
            raise ShapeMismatchError(
                f"loss {name!r}: labels must lie in [0, {out.shape[1]}); "
                f"got values from {labels.min()} to {labels.max()}"
            )
        return jax.nn.one_hot(labels, out.shape[1], dtype=jnp.float64)
    raise ShapeMismatchError(
        f"loss {name!r} with out of shape {tuple(out.shape)} needs y of shape {tuple(out.shape)} "
        f"or integer labels of shape {tuple(out.shape[:1])}; got y of shape {y_shape}, "
        f"dtype {y_dtype}"
    )


def _same_shape(name: str, out: jax.Array, y: Any) -> None:
    if tuple(out.shape) != tuple(np.shape(y)):
        raise ShapeMismatchError(
            f"loss {name!r} needs y of the output's shape {tuple(out.shape)}; got {np.shape(y)}"
        )


def _class_loss(log: Callable[[jax.Array], jax.Array]) -> Callable[[str, jax.Array, Any], Any]:
    def loss(key: str, out: jax.Array, y: Any) -> jax.Array:
        t = _targets_as_probs(key, out, y)
        return -jnp.sum(t * log(out)) / _mean_batch(out)

    return loss


def _shaped(fn: Callable[[jax.Array, Any], jax.Array]) -> Callable[[str, jax.Array, Any], Any]:
    def loss(key: str, out: jax.Array, y: Any) -> jax.Array:
        _same_shape(key, out, y)
        return fn(out, y)

    return loss


#: The named losses in jax.numpy, by canonical name (`gradcheck._losses` defines them).
JAX_LOSSES: dict[str, Callable[[str, jax.Array, Any], jax.Array]] = {
    "mse": _shaped(lambda o, y: jnp.mean((o - y) ** 2)),
    "cross_entropy": _class_loss(lambda o: jax.nn.log_softmax(o, axis=1)),
    "categorical_crossentropy": _class_loss(jnp.log),
    "bce": _shaped(lambda o, y: -jnp.mean(y * jnp.log(o) + (1.0 - y) * jnp.log1p(-o))),
    "bce_with_logits": _shaped(lambda o, y: jnp.mean(jnp.logaddexp(0.0, o) - y * o)),
}


def jax_loss(name: str) -> Callable[[jax.Array, Any], jax.Array]:
    """The named loss in jax.numpy, with the semantics of :mod:`gradcheck._losses`."""
    key, fn = implementation(JAX_LOSSES, name, "JAX")
    return lambda out, y: fn(key, out, y)


def _reducer(loss: Any, y: Any, seed: int) -> Callable[[Any], jax.Array]:
    """``out -> scalar``: the projection (``y is None`` and no loss), a named loss or the user's."""
    if loss is None and y is None:
        cache: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

        def project(out: Any) -> jax.Array:
            leaves = [leaf for leaf in jax.tree_util.tree_leaves(out) if _is_float_array(leaf)]
            if not leaves:
                raise ModelError(
                    "with y=None the model's output must contain a floating-point array; "
                    f"got {type(out).__name__}"
                )
            total = jnp.zeros((), dtype=jnp.float64)
            for k, leaf in enumerate(leaves):
                shape = tuple(int(s) for s in leaf.shape)
                r = cache.setdefault((k, shape), output_projection(shape, seed, k))
                total = total + jnp.sum(leaf * r)
            return total

        return project

    if loss is None or isinstance(loss, str):
        name = "mse" if loss is None else loss
        if y is None:
            raise InvalidOptionError(f"loss {name!r} needs a target y; got y=None")
        fn = jax_loss(name)

        def named(out: Any) -> jax.Array:
            if not isinstance(out, jax.Array):
                raise ModelError(
                    f"loss {name!r} needs the model to return one array; got {type(out).__name__}"
                )
            return fn(out, y)

        return named

    if not callable(loss):
        raise InvalidOptionError(
            f"loss must be None, a callable loss(out, y) or a loss name; got {type(loss).__name__}"
        )

    def user(out: Any) -> jax.Array:
        value = loss(out, y)
        shape = np.shape(value)
        if math.prod(shape) != 1 or not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise ModelError(
                "loss(out, y) must return a real scalar; "
                f"got shape {shape}, dtype {jnp.result_type(value)}"
            )
        return jnp.reshape(value, ())

    return user


# --------------------------------------------------------------------------- jaxpr inspection
def _subjaxprs(value: Any) -> Iterator[Any]:
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subjaxprs(item)


def _walk_eqns(eqns: Sequence[Any]) -> Iterator[Any]:
    """``eqns`` and the equations of the jaxprs nested in them (jit, scan, cond, custom_vjp)."""
    for eqn in eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                yield from _walk_eqns(sub.eqns)


def _walk(jaxpr: Any) -> Iterator[Any]:
    """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
    return _walk_eqns(jaxpr.eqns)


def _lowest_float(eqns: Sequence[Any]) -> str | None:
    """The narrowest floating-point type any value computed by ``eqns`` (and the jaxprs
    nested in them) has, if below float64."""
    lowest: tuple[int, str] | None = None
    for eqn in _walk_eqns(eqns):
        for var in eqn.outvars:
            dtype = getattr(getattr(var, "aval", None), "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                continue
            size = np.dtype(dtype).itemsize
            if size < 8 and (lowest is None or size < lowest[0]):
                lowest = (size, str(np.dtype(dtype)))
    return None if lowest is None else lowest[1]


def _has_loops(eqns: Sequence[Any]) -> bool:
    return any(eqn.primitive.name in _LOOPS for eqn in _walk_eqns(eqns))


def _bytes_per_evaluation(eqns: Sequence[Any], size: int) -> int:
    """A rough upper bound on the memory one evaluation needs: every intermediate value kept."""
    total = 8 * size
    for eqn in _walk_eqns(eqns):
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            shape = getattr(aval, "shape", None)
            dtype = getattr(aval, "dtype", None)
            if shape is not None and dtype is not None:
                try:
                    total += math.prod(shape) * np.dtype(dtype).itemsize
                except TypeError:  # extended dtypes (PRNG keys)
                    total += math.prod(shape) * 8
    return total


def _max_batch(eqns: Sequence[Any], size: int) -> int:
    rows = MEMORY_BUDGET // max(_bytes_per_evaluation(eqns, size), 1)
    rows = max(1, min(MAX_BATCH, rows, ROWS_BUDGET // (8 * max(size, 1))))
    return 1 << (rows.bit_length() - 1)  # a power of two: one compiled batch shape


# --------------------------------------------------------------------------- op by op
# Everything in this section reads jaxprs and binds primitives: JAX's internal API
# (``jax.extend`` promises no compatibility across releases). It is used only where
# :func:`interpreter_ok` found it agrees with JAX's public eager evaluation on this JAX.
@dataclass(frozen=True)
class _Transposed:
    """``transpose(value, perm)``, not computed yet: a ``dot_general`` can read ``value``
    with its dimensions renumbered instead (XLA runs each eager op on its own, so the
    transpose would otherwise copy the whole array first)."""

    value: Any
    perm: tuple[int, ...]
    eqn: Any  # the transpose equation (its primitive and parameters)

    def force(self) -> Any:
        params = {**_bind_params(self.eqn), "permutation": self.perm}
        return _bind(self.eqn, [self.value], params)


def _fold(dims: Any, side: int, perm: tuple[int, ...]) -> Any:
    """``dot_general``'s dimension numbers with operand ``side`` read through ``perm``, or
    None where the result's layout would change (its free dimensions must keep their order).
    """
    (lc, rc), (lb, rb) = dims
    contract, batch = (lc, lb) if side == 0 else (rc, rb)
    free = [d for d in range(len(perm)) if d not in contract and d not in batch]
    moved = [perm[d] for d in free]
    if moved != sorted(moved):
        return None
    contract = tuple(perm[d] for d in contract)
    batch = tuple(perm[d] for d in batch)
    return ((contract, rc), (batch, rb)) if side == 0 else ((lc, contract), (lb, batch))


def _bind_params(eqn: Any) -> dict[str, Any]:
    """``eqn``'s parameters as its primitive's ``bind`` takes them. Before JAX 0.9.2,
    ``get_bind_params`` returned ``(subfuns, params)``: a primitive with sub-functions is
    not evaluated here (the start-up probe or the model's own run then falls back to the
    compiled path)."""
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple):
        subfuns, got = got
        if subfuns:
            raise NotImplementedError(f"{eqn.primitive.name} binds sub-functions")
    return dict(got)


def _bind(eqn: Any, args: Sequence[Any], params: dict[str, Any]) -> Any:
    """``eqn``'s primitive applied to ``args``, in the equation's context (as jax does)."""
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    with ctx if ctx is not None else contextlib.nullcontext():
        return eqn.primitive.bind(*args, **params)


def _is_var(atom: Any) -> bool:
    return not isinstance(atom, JaxLiteral)


def _needed(eqns: Sequence[Any], outvars: Sequence[Any]) -> list[Any]:
    """The equations (in order) that the values ``outvars`` depend on."""
    wanted = {var for var in outvars if _is_var(var)}
    kept = []
    for eqn in reversed(eqns):
        if any(var in wanted for var in eqn.outvars):
            kept.append(eqn)
            wanted.update(var for var in eqn.invars if _is_var(var))
    return kept[::-1]


def _dead_after(eqns: Sequence[Any], outvars: Sequence[Any]) -> list[list[Any]]:
    """For each equation, the variables no later equation or output reads."""
    last: dict[Any, int] = {}
    for k, eqn in enumerate(eqns):
        for var in (*eqn.invars, *eqn.outvars):
            if _is_var(var):
                last[var] = k
    for var in outvars:  # an output may be a literal, an input or a constant
        if _is_var(var):
            last.pop(var, None)
    dead: list[list[Any]] = [[] for _ in eqns]
    for var, k in last.items():
        dead[k].append(var)
    return dead


@dataclass(frozen=True)
class _Plan:
    """What to evaluate of one jaxpr: its equations (in order), outputs and dead variables."""

    jaxpr: Any
    eqns: tuple[Any, ...]
    outvars: tuple[Any, ...]
    dead: tuple[tuple[Any, ...], ...]

    @classmethod
    def of(cls, jaxpr: Any, outputs: Sequence[int] | None = None) -> _Plan:
        outvars = tuple(jaxpr.outvars if outputs is None else [jaxpr.outvars[i] for i in outputs])
        eqns = tuple(jaxpr.eqns if outputs is None else _needed(jaxpr.eqns, outvars))
        dead = tuple(tuple(d) for d in _dead_after(eqns, outvars))
        return cls(jaxpr, eqns, outvars, dead)


class _OpByOp:
    """A closed jaxpr evaluated one equation at a time, as ``jaxpr_as_fun`` does, with two
    shortcuts that keep XLA from materialising arrays an eager op would copy:

    - a ``transpose`` read only by ``dot_general`` becomes a renumbering of the dot's
      dimensions, and transposes of transposes compose (an identity vanishes);
    - the primal computation inside ``custom_vjp_call`` / ``custom_jvp_call`` is evaluated
      in line (what those primitives compute outside of differentiation), so the same
      shortcut applies in a user's custom layer.

    ``outputs`` selects some of the jaxpr's outputs; only the equations they need run
    (so the loss of a ``value_and_grad`` program skips the backward). Each value is
    dropped after its last use. Everything else is bound as it is: a loop is one
    equation, which JAX compiles once and caches.
    """

    INLINE = ("custom_vjp_call", "custom_jvp_call")

    def __init__(self, closed: Any, outputs: Sequence[int] | None = None) -> None:
        self.closed = closed
        self.plan = _Plan.of(closed.jaxpr, outputs)
        self._inner: dict[int, _Plan] = {}

    @property
    def eqns(self) -> tuple[Any, ...]:
        """The top-level equations this evaluation runs."""
        return self.plan.eqns

    def __call__(self, *args: Any) -> list[Any]:
        return self._run(self.plan, self.closed.consts, args)

    def _inner_plan(self, jaxpr: Any) -> _Plan:
        key = id(jaxpr)
        if key not in self._inner:  # (the plan keeps the jaxpr, so the id stays its own)
            self._inner[key] = _Plan.of(jaxpr)
        return self._inner[key]

    def _run(self, plan: _Plan, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        jaxpr = plan.jaxpr
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))

        def read(var: Any) -> Any:
            return var.val if isinstance(var, JaxLiteral) else env[var]

        def value(var: Any) -> Any:
            """The variable's array, a pending transpose computed (once: it is kept)."""
            x = read(var)
            if isinstance(x, _Transposed):
                x = env[var] = x.force()
            return x

        for eqn, dead in zip(plan.eqns, plan.dead, strict=True):
            name = eqn.primitive.name
            call = eqn.params.get("call_jaxpr") if name in self.INLINE else None
            if name == "transpose":
                x, perm = read(eqn.invars[0]), tuple(eqn.params["permutation"])
                if isinstance(x, _Transposed):  # compose: out[d] = in[perm[d]]
                    x, perm = x.value, tuple(x.perm[d] for d in perm)
                outs: Any = [x if perm == tuple(range(len(perm))) else _Transposed(x, perm, eqn)]
            elif name == "dot_general" and any(
                isinstance(read(var), _Transposed) for var in eqn.invars[:2]
            ):
                params = _bind_params(eqn)
                dims = params["dimension_numbers"]
                operands = []
                for side, var in enumerate(eqn.invars[:2]):
                    x = read(var)
                    folded = _fold(dims, side, x.perm) if isinstance(x, _Transposed) else None
                    if folded is None:
                        operands.append(value(var))
                    else:
                        dims = folded
                        operands.append(x.value)
                rest = [value(var) for var in eqn.invars[2:]]
                outs = [_bind(eqn, [*operands, *rest], {**params, "dimension_numbers": dims})]
            elif call is not None and hasattr(call, "jaxpr") and hasattr(call, "consts"):
                inner = self._inner_plan(call.jaxpr)
                outs = self._run(inner, call.consts, [value(var) for var in eqn.invars])
            else:
                ins = [value(var) for var in eqn.invars]
                ans = _bind(eqn, ins, _bind_params(eqn))
                outs = ans if eqn.primitive.multiple_results else [ans]
            env.update(zip(eqn.outvars, outs, strict=True))
            for var in dead:
                env.pop(var, None)
        return [value(var) for var in plan.outvars]


_PROBED: dict[str, bool] = {}
_PROBE_LOCK = threading.Lock()


def interpreter_ok() -> bool:
    """Whether the op-by-op evaluator gives what JAX's eager evaluation gives, on this JAX.

    Probed once per process on a small program with every construct the evaluator
    handles specially: transposes folded into products (and composed), ``custom_vjp``
    and ``custom_jvp`` calls evaluated in line, nested ``jit``, ``while_loop``, ``scan``,
    ``cond``, and outputs that are literals, constants, inputs passed straight through
    and one variable twice. Any difference or error and the adapter uses compiled
    programs (``jax.jit``) instead.
    """
    with _PROBE_LOCK:
        if "ok" not in _PROBED:
            try:
                with _scope():
                    _PROBED["ok"] = _probe()
            except Exception:  # an interpreter that raises is an interpreter not to use
                _PROBED["ok"] = False
        return _PROBED["ok"]


def _probe() -> bool:
    """Run :class:`_OpByOp` on a small ``value_and_grad`` program with every construct it
    treats specially and compare with the values worked out in NumPy (one small compile:
    the evaluator runs under ``jax.jit``)."""

    @jax.custom_vjp
    def dense(w: Any, h: Any) -> Any:
        return h @ w.T

    dense.defvjp(lambda w, h: (h @ w.T, (w, h)), lambda r, g: (g.T @ r[1], g @ r[0]))

    def loss(parts: list[Any]) -> Any:
        w, h, a, unused = parts
        z = jax.nn.relu(dense(w, h)) + jnp.transpose(jnp.transpose(h @ w.T))  # custom_jvp
        z = jax.jit(jnp.sin)(z)
        return jnp.sum(z * z) * a + jax.lax.stop_gradient(unused) * 0.0

    def both(parts: list[Any]) -> Any:
        w, h, a, _ = parts
        # outputs that are literals, constants, inputs passed through, one variable twice
        return jax.value_and_grad(loss)(parts), (w, w, 2.0, jnp.arange(2.0), a, h @ w.T)

    w, h = np.array([[0.3, -1.2], [0.8, 0.5]]), np.array([[1.1, 0.4], [-0.7, 0.9]])
    a = 0.7
    m = h @ w.T
    z = np.sin(np.maximum(m, 0.0) + m)
    dm = 2 * a * z * np.cos(np.maximum(m, 0.0) + m) * ((m > 0) + 1.0)
    want = [a * np.sum(z * z), dm.T @ h, dm @ w, np.sum(z * z), 0.0]
    want += [w, w, 2.0, np.arange(2.0), a, m]
    parts = [jnp.asarray(v, dtype=jnp.float64) for v in (w, h, a, 1.0)]
    closed = jax.jit(both).trace(parts).jaxpr
    every, loss_only = _OpByOp(closed), _OpByOp(closed, outputs=[0])
    got = jax.jit(lambda *args: [*every(*args), *loss_only(*args)])(*parts)
    return len(got) == len(want) + 1 and all(
        np.shape(g) == np.shape(v) and np.allclose(g, v, rtol=1e-12, atol=1e-14)
        for g, v in zip(got, [*want, want[0]], strict=True)
    )


# --------------------------------------------------------------------------- build
_TRACE_ERRORS: tuple[type[BaseException], ...] = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
)

Parts = list[Any]  # one array per block, shaped as the model's arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _compile(traced: Any) -> Any:
    """Lower and compile a traced program, with XLA's default (optimising) settings.

    Lower LLVM optimisation levels halve compile times on the CPU but can make a
    vmapped convolution run 80 times slower; a check's programs run hundreds of times.
    """
    return traced.lower().compile()


def build_problem(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    loss: Any = None,
    wrt: str = "all",
    seed: int = 0,
) -> FlatProblem:
    """The :class:`FlatProblem` of a JAX model at its current parameters and ``x``.

    Args:
        model: ``(apply_fn, params)``, an Equinox module, a Flax NNX module, a Flax
            Linen ``(module, variables)`` pair or ``(module, variables, rngs)``, or a
            function of JAX arrays.
        x: the input, any pytree, or None for a model whose only inputs are its
            parameters; its floating-point arrays are blocks unless ``wrt="params"``;
            other leaves (integer arrays, keys) pass through.
        y: the target (constant), or None for a fixed random projection of the output.
        loss: None (``"mse"`` when ``y`` is given), a callable ``loss(out, y)`` in
            jax.numpy, or a loss name from :mod:`gradcheck._losses`.
        wrt: ``"all"``, ``"params"`` or ``"inputs"``.
        seed: seeds the output projection.
    """
    if wrt not in ("all", "params", "inputs"):
        raise InvalidOptionError(f"wrt must be 'all', 'params' or 'inputs'; got {wrt!r}")
    if isinstance(loss, str):
        canonical_loss_name(loss)
    with _scope():
        spec = _spec_for(model)
        return _build(spec, x, y, loss=loss, wrt=wrt, seed=int(seed))


def _is_one_shot(value: Any) -> bool:
    return isinstance(value, Iterator)


def _reject_one_shot(items: Sequence[tuple[Any, Any]], what: str) -> None:
    for path, leaf in items:
        if _is_one_shot(leaf):
            where = f" at {what}{jax.tree_util.keystr(tuple(path))}" if path else ""
            raise InvalidOptionError(
                f"{what} must be an array or a pytree of arrays; got a {type(leaf).__name__}"
                f"{where}, which can be iterated only once (pass a tuple, list or array)"
            )


def _build(spec: _Spec, x: Any, y: Any, *, loss: Any, wrt: str, seed: int) -> FlatProblem:
    notes = list(spec.notes)
    if not spec.has_params and wrt == "params":
        raise NothingToCheckError(
            "nothing to check with wrt='params': a plain function has no parameters "
            "(its inputs are checked with wrt='all' or 'inputs')"
        )
    one_shot = _is_one_shot  # a leaf, said explicitly (jax warns about iterables as leaves)
    p_items, p_def = jax.tree_util.tree_flatten_with_path(spec.tree, is_leaf=one_shot)
    x_items, x_def = jax.tree_util.tree_flatten_with_path(x, is_leaf=one_shot)
    _reject_one_shot(x_items, "x")
    _reject_one_shot(p_items, "params")
    p_leaves = [_as_float64(leaf) for _, leaf in p_items]
    x_leaves = [_as_float64(leaf) for _, leaf in x_items]
    y64 = None if y is None else _to_float64(y)

    # (source, leaf index, name, shape, kind) for every block, params first, in pytree order
    entries: list[tuple[str, int, str, tuple[int, ...], BlockKind]] = []
    complex_names: list[str] = []
    python_names: list[str] = []
    empty: list[str] = []

    def consider(source: str, i: int, leaf: Any, name: str, kind: BlockKind) -> None:
        if _is_complex_array(leaf) or isinstance(leaf, complex):
            complex_names.append(name)
        elif isinstance(leaf, float):
            python_names.append(name)
        elif _is_float_array(leaf):
            if np.size(leaf) == 0:
                empty.append(name)
            else:
                entries.append((source, i, name, tuple(np.shape(leaf)), kind))

    if wrt != "inputs":
        for i, (path, leaf) in enumerate(p_items):
            if spec.is_param(path):
                consider("p", i, leaf, param_name(path, spec.style, spec.strip_value), "param")
    if wrt != "params":
        for i, (path, leaf) in enumerate(x_items):
            consider("x", i, leaf, input_name(path), "input")
    skipped = [*complex_names, *python_names]
    if complex_names:
        notes.append(
            "complex arrays are not checked (gradcheck checks real floating point): "
            + ", ".join(f"`{name}`" for name in complex_names)
        )
    if python_names:
        notes.append(
            "Python floats are constants, not checked: "
            + ", ".join(f"`{name}`" for name in python_names)
            + " (make one a 0-d array, jnp.asarray(value), to check it)"
        )
    if not entries:
        what = "inputs" if wrt == "inputs" or not spec.has_params else "parameters"
        if wrt == "all" and spec.has_params:
            what = "arrays"
        extra = f" with entries (zero-size: {', '.join(empty)})" if empty else ""
        if skipped:
            extra += f"; not checked: {', '.join(skipped)}"
        raise NothingToCheckError(
            f"nothing to check with wrt={wrt!r}: the {spec.form} has no floating-point "
            f"{what}{extra}"
        )
    blocks = block_layout([(name, shape, kind) for _, _, name, shape, kind in entries])
    source = {"p": p_leaves, "x": x_leaves}
    theta0 = np.concatenate(
        [np.asarray(source[src][i], dtype=np.float64).ravel() for src, i, *_ in entries],
        out=_memory.empty(sum(block.size for block in blocks)),
    )
    _memory.freeze(theta0)  # the problem keeps it as it is (no second copy)
    placements = [
        (src, i, block.offset, block.size, block.shape)
        for (src, i, *_), block in zip(entries, blocks, strict=True)
    ]
    reduce = _reducer(loss, y64, seed)
    forward = spec.forward

    def of_parts(parts: Sequence[Any]) -> jax.Array:
        """The loss with block ``k`` of the flat vector replaced by ``parts[k]``."""
        leaves = {"p": list(p_leaves), "x": list(x_leaves)}
        for (src, i, *_), part in zip(placements, parts, strict=True):
            leaves[src][i] = part
        params = jax.tree_util.tree_unflatten(p_def, leaves["p"])
        inputs = jax.tree_util.tree_unflatten(x_def, leaves["x"])
        return reduce(forward(params, inputs))

    def split(theta: Any) -> list[Any]:
        """The blocks of a flat vector (NumPy or traced), shaped as the model's arrays."""
        return [
            theta[offset : offset + size].reshape(shape) for _, _, offset, size, shape in placements
        ]

    def device_parts(theta: np.ndarray) -> list[jax.Array]:
        # one transfer call for every block (jax.device_put of a list)
        parts: list[jax.Array] = jax.device_put(split(np.asarray(theta, dtype=np.float64)))
        return parts

    problem = functools.partial(
        FlatProblem, theta0=theta0, blocks=blocks, framework="jax", notes=notes, skipped=skipped
    )
    avals = [jax.ShapeDtypeStruct(shape, jnp.float64) for *_, shape in placements]
    try:
        # one trace of the model's Python gives the loss and the gradient
        vg = jax.jit(jax.value_and_grad(of_parts)).trace(avals)
    except _TRACE_ERRORS as exc:
        notes.append(
            "the model branches on values in Python, so it cannot be traced "
            f"({type(exc).__name__}); evaluated eagerly, one point at a time"
        )
        grad_of_parts = jax.grad(of_parts)
        return problem(
            loss=_flat_loss(of_parts, device_parts),
            gradient=_flat_gradient(grad_of_parts, of_parts, device_parts),
            batching="loop",
        )
    except GradcheckInputError:
        raise
    except Exception as exc:
        raise _trace_failure(of_parts, avals, exc) from exc

    programs = _Programs.of(vg, len(blocks), of_parts, avals, device_parts(theta0))
    notes.extend(programs.notes)
    precision: Precision = "float64"
    lowered = {what: _lowest_float(eqns) for what, eqns in programs.eqns.items()}
    narrow = [dtype for dtype in lowered.values() if dtype is not None]
    if narrow:
        lowest = min(narrow, key=lambda name: jnp.dtype(name).itemsize)
        where = " and ".join(what for what, dtype in lowered.items() if dtype is not None)
        precision = _LOWER_PRECISION.get(lowest, "float32")
        notes.append(
            f"the model computes in {lowest} in its {where}, even on a float64 copy "
            f"(a layer dtype or an explicit cast?); steps and tolerances follow {lowest}"
        )
    eager = problem(
        loss=_flat_loss(programs.loss, device_parts),
        gradient=_flat_gradient(
            programs.gradient, programs.loss, device_parts, (theta0, programs.first)
        ),
        precision=precision,
        batching=programs.batching,
    )
    threshold = COMPILE_FROM_LOOPS if _has_loops(programs.eqns["forward pass"]) else COMPILE_FROM

    def prepare(evaluations: int) -> FlatProblem:
        if evaluations < threshold:
            return eager
        return _compiled(eager, programs, split, avals, device_parts)

    eager.prepare = prepare
    return eager


def _trace_failure(of_parts: Callable[[Parts], Any], avals: Any, exc: Exception) -> Exception:
    """The error for a ``value_and_grad`` trace that raised: the forward's, or the backward's."""
    try:
        jax.jit(of_parts).trace(avals)
    except GradcheckInputError as forward:
        return forward
    except Exception as forward:
        return ModelError(f"the model raised while JAX traced it: {_describe(forward)}")
    return ModelError(
        "JAX cannot differentiate the model: its backward raised while JAX traced the "
        f"gradient (the forward traces fine): {_describe(exc)}"
    )


@dataclass
class _Programs:
    """How the loss and the gradient of one traced ``value_and_grad`` program are evaluated.

    ``loss(parts) -> scalar`` and ``gradient(parts) -> [block gradients]``; ``single``
    is ``loss`` in a form JAX can trace again (for the compiled, vmapped loss);
    ``eqns`` the top-level equations of the forward pass and of the rest of the
    gradient (for the precision and the loop checks); ``first`` the gradient at the
    starting point, evaluated while building (the core asks for it first).
    """

    loss: Callable[[Parts], Any]
    gradient: Callable[[Parts], Sequence[Any]]
    single: Callable[[Parts], Any]
    eqns: dict[str, Sequence[Any]]
    batching: str
    notes: list[str]
    first: Sequence[Any] = ()

    @classmethod
    def of(
        cls,
        vg: Any,
        blocks: int,
        of_parts: Callable[[Parts], Any],
        avals: Any,
        parts0: Parts,
    ) -> _Programs:
        program = vg.jaxpr
        why = "a probe found it disagrees with JAX on this version"
        if interpreter_ok():
            try:
                loss_run = _OpByOp(program, outputs=[0])
                grad_run = _OpByOp(program, outputs=range(1, blocks + 1))
                first = grad_run(*parts0)
            except Exception as exc:  # the model's error, or the evaluator's: compiled decides
                why = f"raised {_describe(exc)[:160]}"
            else:
                kept = {id(eqn) for eqn in loss_run.eqns}
                rest = [eqn for eqn in grad_run.eqns if id(eqn) not in kept]

                def loss(parts: Parts) -> Any:
                    return loss_run(*parts)[0]

                return cls(
                    loss=loss,
                    gradient=lambda parts: grad_run(*parts),
                    single=loss,
                    eqns={"forward pass": loss_run.eqns, "gradient": rest},
                    batching="eager",
                    notes=[],
                    first=first,
                )
        return cls._compiled(vg, of_parts, avals, parts0, why)

    @classmethod
    def _compiled(
        cls, vg: Any, of_parts: Callable[[Parts], Any], avals: Any, parts0: Parts, why: str
    ) -> _Programs:
        """The public path: the loss and ``value_and_grad`` compiled with ``jax.jit``."""
        grad_exe = _compile(vg)
        try:
            first = list(grad_exe(parts0)[1])
        except Exception as exc:
            raise _evaluation_failure(of_parts, parts0, exc) from exc
        loss_traced = jax.jit(of_parts).trace(avals)
        loss_exe = _compile(loss_traced)
        return cls(
            loss=loss_exe,
            gradient=lambda parts: grad_exe(parts)[1],
            single=of_parts,
            eqns={"forward pass": loss_traced.jaxpr.jaxpr.eqns, "gradient": vg.jaxpr.jaxpr.eqns},
            batching="compiled",
            notes=[f"the loss and gradient run compiled: the op-by-op evaluator {why}"],
            first=first,
        )


def _evaluation_failure(
    of_parts: Callable[[Parts], Any], parts: Parts, exc: Exception
) -> Exception:
    """The error for a gradient evaluation that raised: the forward's, or the backward's."""
    if isinstance(exc, GradcheckInputError):
        return exc
    try:
        with _scope():
            of_parts(parts)
    except GradcheckInputError as forward:
        return forward
    except Exception as forward:
        return ModelError(f"the model raised while JAX evaluated it: {_describe(forward)}")
    return ModelError(
        "the model's backward raised while JAX evaluated its gradient (the forward runs "
        f"fine): {_describe(exc)}"
    )


def _flat_loss(
    fn: Callable[[Parts], Any], device_parts: Callable[[np.ndarray], Parts]
) -> Callable[[np.ndarray], float]:
    """``fn(blocks) -> loss`` as a function of the flat vector."""

    def loss(theta: np.ndarray) -> float:
        with _scope():
            parts = device_parts(theta)
            try:
                return float(fn(parts))
            except GradcheckInputError:
                raise
            except Exception as exc:
                raise ModelError(
                    f"the model raised while JAX evaluated its loss: {_describe(exc)}"
                ) from exc

    return loss


def _flat_gradient(
    fn: Callable[[Parts], Sequence[Any]],
    forward: Callable[[Parts], Any],
    device_parts: Callable[[np.ndarray], Parts],
    start: tuple[np.ndarray, Sequence[Any]] | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """``fn(blocks) -> [gradient of each block]`` as a function of the flat vector; NaN
    and Inf are returned as they are (the core reports them). ``start``: ``(theta0, its
    gradient)``, evaluated while building, served once (the core asks for it first)."""
    pending = [start] if start is not None else []

    def gradient(theta: np.ndarray) -> np.ndarray:
        with _scope():
            parts: Sequence[Any] | None = None
            if pending:
                theta0, ready = pending.pop()
                if theta is theta0 or np.array_equal(theta, theta0):
                    parts = ready
            if parts is None:
                inputs = device_parts(theta)
                try:
                    parts = fn(inputs)
                except Exception as exc:
                    raise _evaluation_failure(forward, inputs, exc) from exc
            flat = [np.asarray(part, dtype=np.float64).ravel() for part in parts]
            return np.concatenate(flat, out=_memory.empty(sum(part.size for part in flat)))

    return gradient


def _compiled(
    eager: FlatProblem,
    programs: _Programs,
    split: Callable[[Any], Parts],
    avals: Any,
    device_parts: Callable[[np.ndarray], Parts],
) -> FlatProblem:
    """``eager`` with its loss compiled: ``vmap``-ed over ``max_batch`` rows where it can be.

    The compiled loss is the traced program again (``programs.single``), not the model's
    Python: the model runs once per check.
    """
    size = eager.size
    notes = list(eager.notes)
    max_batch = _max_batch(programs.eqns["forward pass"], size)
    loss_batch = None
    single = programs.single

    def scalar(theta: jax.Array) -> jax.Array:
        return single(split(theta))

    with _scope():
        if max_batch > 1:
            try:
                rows = jax.ShapeDtypeStruct((max_batch, size), jnp.float64)
                batch_exe = _compile(jax.jit(jax.vmap(scalar)).trace(rows))
            except Exception as exc:  # no batching rule, a callback that cannot vmap, ...
                why = f"{type(exc).__name__}: {_first_line(exc)[:120]}"
                notes.append(f"the model cannot be vmapped ({why}); evaluations run one at a time")
            else:
                loss_batch = _padded(batch_exe, eager.theta0, max_batch)
        loss_fn: Callable[[np.ndarray], float]
        if loss_batch is not None:
            # one compiled forward for every evaluation: a single point is a padded batch of
            # one, so loss() and loss_batch() agree to the last bit
            batched = loss_batch

            def loss_fn(theta: np.ndarray) -> float:
                return float(batched(np.asarray(theta, dtype=np.float64)[None, :])[0])

        else:
            loss_fn = _flat_loss(_compile(jax.jit(single).trace(avals)), device_parts)

    return dataclasses.replace(
        eager,
        loss=loss_fn,
        loss_batch=loss_batch,
        max_batch=max_batch,
        notes=notes,
        batching="loop" if loss_batch is None else "vmap",
        prepare=None,
    )


def _padded(
    batch_exe: Callable[[np.ndarray], Any], theta0: np.ndarray, max_batch: int
) -> Callable[[np.ndarray], np.ndarray]:
    """``loss_batch`` over any number of rows, in chunks padded to ``max_batch`` (one compile)."""

    def loss_batch(thetas: np.ndarray) -> np.ndarray:
        thetas = np.asarray(thetas, dtype=np.float64)
        if thetas.ndim != 2 or thetas.shape[1] != theta0.size:
            raise ShapeMismatchError(
                f"loss_batch needs an array of shape (k, {theta0.size}); got {thetas.shape}"
            )
        out = np.empty(thetas.shape[0], dtype=np.float64)
        with _scope():
            for start in range(0, thetas.shape[0], max_batch):
                chunk = thetas[start : start + max_batch]
                k = chunk.shape[0]
                if k < max_batch:
                    pad = np.broadcast_to(theta0, (max_batch - k, theta0.size))
                    chunk = np.concatenate([chunk, pad])
                try:
                    values = batch_exe(chunk)
                except Exception as exc:
                    raise ModelError(
                        f"the model raised while JAX evaluated its loss: {_describe(exc)}"
                    ) from exc
                out[start : start + k] = np.asarray(values, dtype=np.float64)[:k]
        return out

    return loss_batch
