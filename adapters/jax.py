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
into the product (:mod:`gradcheck.adapters._jax_eager`), as a compile would: op by op,
``x @ w.T`` would otherwise copy ``w`` every time. When the core expects at least
:data:`COMPILE_FROM` evaluations (:data:`COMPILE_FROM_LOOPS` for a program with
loops, whose compile costs seconds), the loss is compiled, ``vmap``-ed over the rows
of a ``(max_batch, P)`` array; shorter batches, and single points, are padded to
``max_batch`` rows, so no call compiles again and ``loss`` agrees with
``loss_batch`` bit for bit. ``max_batch`` (a power of two, at most 256) keeps the rows
under 32 MiB and the batch's intermediate values under :data:`MEMORY_BUDGET`. A
model that cannot be vmapped gets a compiled single-point loss instead; one that
branches on values in Python cannot be traced at all and runs eagerly, one
evaluation at a time. Within one check every loss value comes from one of these
paths, never a mix, unless the op-by-op evaluator raises in the middle of it (below).

JAX APIs: this module uses public ones only (``jax.jit(...).trace``, ``Lowered.compile``
and ``as_text``, ``jax.value_and_grad``, ``jax.vmap``, eager calls). The op-by-op
evaluator, which reads jaxprs and binds primitives (JAX internals), lives in
:mod:`gradcheck.adapters._jax_eager`, whose docstring lists what it uses and what it buys.
It is used only after its probe (:func:`~gradcheck.adapters._jax_eager.interpreter_ok`,
run once per process) has shown it gives what the public path gives on a program with
every construct it treats specially, and only for a model whose program it evaluated at
the starting point without error; otherwise the loss and gradient are compiled with
``jax.jit`` instead (the public path), and the report says so. If it raises later, in a
check, the problem's remaining evaluations run on the public path (:class:`_Switch`;
the two agree to rounding): what the evaluator raises never reaches the user.

The adapter does no numerics of its own: it only evaluates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
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
from gradcheck._calls import call, call_style, input_hint
from gradcheck._errors import first_line
from gradcheck._losses import canonical_loss_name, implementation, missing_target, nothing_to_check
from gradcheck._problem import BlockKind, FlatProblem, Precision, block_layout, output_projection
from gradcheck._select import check_category
from gradcheck.errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
    UnsupportedModelError,
)

from . import _jax_eager as _eager

__all__ = ["build_problem", "matches"]

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
    if inspect.isroutine(model[1]):  # (forward, backward) functions: a NumPy layer pair
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
    #: for an error the forward raises on ``x``: how the rule passed it (`input_hint`)
    hint: Callable[[Any], str] = lambda x: ""


def _call(model: Any, x: Any) -> Any:
    return call(model, call_style(model, x), x)


def _pair_forward(fn: Callable[..., Any]) -> Callable[[Any, Any], Any]:
    """``apply_fn(params, x)``, ``x`` passed by the one rule of every adapter."""

    def forward(params: Any, x: Any) -> Any:
        return call(fn, call_style(fn, x, skip=1), x, params)

    return forward


def _spec_for(model: Any) -> _Spec:
    if isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
        fn, params = model[0], model[1]
        linen = _linen_owner(fn)
        if linen is not None:
            return _linen_spec(linen, params, None)
        return _Spec(
            tree=params,
            forward=_pair_forward(fn),
            style="dict",
            form="(apply_fn, params) pair",
            hint=lambda x: input_hint(fn, x, skip=1),
        )
    if _is_linen_triple(model):
        return _linen_spec(_linen_owner(model[0]), model[1], model[2])
    if _is_nnx(model):
        return _nnx_spec(model)
    if _is_equinox(model):
        return _Spec(
            tree=model,
            forward=_call,
            style="attr",
            form="Equinox module",
            hint=lambda x: input_hint(model, x),
        )
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
    """A function of JAX arrays: no parameters; called as ``f(x)``, ``f(*x)`` or ``f(**x)``
    (`gradcheck._calls`)."""

    def forward(params: Any, x: Any) -> Any:
        return call(fn, call_style(fn, x), x)

    return _Spec(
        tree=None,
        forward=forward,
        style="dict",
        form="function",
        has_params=False,
        hint=lambda x: input_hint(fn, x),
    )


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
        style = call_style(module.__call__, x)
        try:
            if others:  # batch_stats etc.: updates of a training-mode call are discarded
                apply = functools.partial(module.apply, mutable=others, rngs=keys)
                out, _ = call(apply, style, x, tree)
                return out
            return call(functools.partial(module.apply, rngs=keys), style, x, tree)
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
        return _call(nnx.merge(graphdef, tree, fresh), x)

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
    "half_sse": _shaped(lambda o, y: 0.5 * jnp.sum((o - y) ** 2)),
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
            raise missing_target(name)
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


# --------------------------------------------------------------------------- program facts
@dataclass(frozen=True)
class _Facts:
    """What the adapter needs to know about a traced program, however it is evaluated.

    ``lowest``: the narrowest floating-point type below float64 computed in the forward
    pass and in the rest of the gradient (None where there is none); ``loops``: whether the
    forward pass has a loop; ``memory``: a rough upper bound on the bytes one forward
    evaluation needs. The op-by-op path reads them from the jaxpr
    (:class:`~gradcheck.adapters._jax_eager.Evaluator`), the public path from the lowered
    programs' StableHLO text (:func:`_text_facts`).
    """

    lowest: dict[str, str | None]
    loops: bool
    memory: int
    notes: tuple[str, ...] = ()


#: one StableHLO tensor type: its dimensions (``2x3x``) and element type (``f32``)
_TENSOR = re.compile(r"tensor<((?:[0-9?]+x)*)([a-z]\w*)>")
#: a floating-point element type: ``f16``, ``bf16``, ``f32``, ``f64``, ``f8E4M3FN``, ...
_FLOAT = re.compile(r"(b?f)(\d+)(\w*)")


def _float_type(element: str) -> tuple[int, str] | None:
    """``(bits, NumPy name)`` of a StableHLO floating-point element type, else None."""
    found = _FLOAT.fullmatch(element)
    if found is None:
        return None
    prefix, bits, rest = found.groups()
    name = f"{'bfloat' if prefix == 'bf' else 'float'}{bits}" + (f"_{rest.lower()}" if rest else "")
    return int(bits), name


def _results(text: str) -> Iterator[tuple[str, int]]:
    """``(element type, elements)`` of every value the ops of a StableHLO module compute
    (constants excepted: a float32 constant read as float64 is not float32 arithmetic).
    Public: the text ``jax.stages.Lowered.as_text()`` prints."""
    for raw in text.splitlines():
        line = raw.strip()
        if "stablehlo.constant" in line:
            continue
        if "->" in line:  # "... : (operand types) -> result types"
            types = line.rsplit("->", 1)[1]
        elif line.startswith("%") and " : " in line:  # "%1 = op %0 : type"
            types = line.rsplit(" : ", 1)[1]
        else:
            continue
        for dims, element in _TENSOR.findall(types):
            shape = [int(d) if d.isdigit() else 1 for d in dims.split("x") if d]
            yield element, math.prod(shape)


def _floats(results: Sequence[tuple[str, int]]) -> set[tuple[int, str]]:
    return {kind for element, _ in results if (kind := _float_type(element)) is not None}


def _narrowest(found: set[tuple[int, str]]) -> str | None:
    below = sorted(kind for kind in found if kind[0] < 64)
    return below[0][1] if below else None


def _text_facts(forward: str, value_and_grad: str, size: int) -> _Facts:
    """:class:`_Facts` from the StableHLO text of the loss and the ``value_and_grad``
    programs: the gradient's types are those the value-and-gradient program computes and
    the forward pass does not."""
    ahead = list(_results(forward))
    seen, both = _floats(ahead), _floats(list(_results(value_and_grad)))
    notes: tuple[str, ...] = ()
    if not both:  # every such program computes in floating point: the text is not understood
        notes = ("the precision of the compiled program could not be read; assumed float64",)
    bits = re.compile(r"\d+")
    memory = 8 * size
    for element, count in ahead:
        found = bits.search(element)
        memory += count * max(int(found.group()) if found else 64, 8) // 8
    return _Facts(
        lowest={"forward pass": _narrowest(seen), "gradient": _narrowest(both - seen)},
        loops="stablehlo.while" in forward,
        memory=memory,
        notes=notes,
    )


def _max_batch(memory: int, size: int) -> int:
    rows = MEMORY_BUDGET // max(memory, 1)
    rows = max(1, min(MAX_BATCH, rows, ROWS_BUDGET // (8 * max(size, 1))))
    return 1 << (rows.bit_length() - 1)  # a power of two: one compiled batch shape


# --------------------------------------------------------------------------- build
_TRACE_ERRORS: tuple[type[BaseException], ...] = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
)

Parts = list[Any]  # one array per block, shaped as the model's arrays


def _compile(traced: Any) -> Any:
    """Lower and compile a traced program, with XLA's default (optimising) settings.

    Lower LLVM optimisation levels halve compile times on the CPU but can make a
    vmapped convolution run 80 times slower; a check's programs run hundreds of times.
    """
    return traced.lower().compile()


def _compile_with_text(traced: Any) -> tuple[Any, str]:
    """:func:`_compile`, with the program's StableHLO text (for :func:`_text_facts`)."""
    lowered = traced.lower()
    return lowered.compile(), lowered.as_text()


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
    check_category(wrt)
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
    from . import _jax_contracts as _contracts  # the contract hooks

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
        extra = f" with entries (zero-size: {', '.join(empty)})" if empty else ""
        if skipped:
            extra += f"; not checked: {', '.join(skipped)}"
        raise nothing_to_check(wrt, extra)
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
        untraceable = problem(
            loss=_flat_loss(of_parts, device_parts),
            gradient=_flat_gradient(grad_of_parts, of_parts, device_parts),
            batching="loop",
        )
        return _contracts.attach(untraceable, of_parts, split, _scope, traceable=False)
    except GradcheckInputError:
        raise
    except Exception as exc:
        raise _trace_failure(of_parts, avals, exc, spec.hint(x)) from exc

    programs = _Programs.of(vg, of_parts, avals, device_parts(theta0), theta0.size)
    notes.extend(programs.notes)
    precision: Precision = "float64"
    lowered = programs.facts.lowest
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
        loss_along=_flat_loss_along(programs.loss, theta0, placements),
    )
    # the contract hooks (second order, forward mode, batched gradients): lazy; `_compiled`
    # copies them onto the compiled problem
    _contracts.attach(eager, of_parts, split, _scope, memory=programs.facts.memory)
    threshold = COMPILE_FROM_LOOPS if programs.facts.loops else COMPILE_FROM

    def prepare(evaluations: int) -> FlatProblem:
        if evaluations < threshold:
            return eager
        return _compiled(eager, programs, split, avals, device_parts)

    eager.prepare = prepare
    return eager


def _trace_failure(
    of_parts: Callable[[Parts], Any], avals: Any, exc: Exception, hint: str = ""
) -> Exception:
    """The error for a ``value_and_grad`` trace that raised: the forward's (with ``hint``, how
    the input reached it), or the backward's."""
    try:
        jax.jit(of_parts).trace(avals)
    except GradcheckInputError as forward:
        return forward
    except Exception as forward:
        return ModelError(
            f"the model's forward raised while JAX traced it: {first_line(forward)}{hint}"
        )
    return ModelError(
        "JAX cannot differentiate the model: its backward raised while JAX traced the "
        f"gradient (the forward traces fine): {first_line(exc)}"
    )


@dataclass
class _Programs:
    """How the loss and the gradient of one traced ``value_and_grad`` program are evaluated.

    ``loss(parts) -> scalar`` and ``gradient(parts) -> [block gradients]``; ``traceable``:
    forms of the loss JAX can trace again, best first (for the compiled, vmapped loss);
    ``facts`` what the program computes in, whether it loops, its memory; ``first`` the
    gradient at the starting point, evaluated while building (the core asks for it first).
    """

    loss: Callable[[Parts], Any]
    gradient: Callable[[Parts], Sequence[Any]]
    traceable: tuple[Callable[[Parts], Any], ...]
    facts: _Facts
    batching: str
    notes: list[str]
    first: Sequence[Any] = ()

    @classmethod
    def of(
        cls,
        vg: Any,
        of_parts: Callable[[Parts], Any],
        avals: Any,
        parts0: Parts,
        size: int,
    ) -> _Programs:
        """The op-by-op evaluator's programs where its probe passed and it evaluates the
        gradient at the starting point; the public path's (compiled) otherwise."""
        why = "a probe found it disagrees with JAX on this version"
        if _eager.interpreter_ok():
            try:
                evaluator = _eager.Evaluator(vg, len(avals))
                first = jax.block_until_ready(evaluator.gradient(parts0))  # its errors here
                facts = _Facts(
                    lowest=evaluator.lowest_floats(),
                    loops=evaluator.has_loops(),
                    memory=evaluator.bytes_per_evaluation(size),
                )
            except Exception as exc:  # the model's error, or the evaluator's: compiled decides
                why = f"raised {first_line(exc)[:160]}"
            else:
                switch = _Switch(
                    evaluator, lambda: cls.public(vg, of_parts, avals, size, "raised in a check")
                )
                return cls(
                    loss=switch.loss,
                    gradient=switch.gradient,
                    traceable=(evaluator.loss, of_parts),
                    facts=facts,
                    batching="eager",
                    notes=[],
                    first=first,
                )
        programs = cls.public(vg, of_parts, avals, size, why)
        try:
            programs.first = list(programs.gradient(parts0))
        except Exception as exc:
            raise _evaluation_failure(of_parts, parts0, exc) from exc
        return programs

    @classmethod
    def public(
        cls, vg: Any, of_parts: Callable[[Parts], Any], avals: Any, size: int, why: str
    ) -> _Programs:
        """The public path: the loss and ``value_and_grad`` compiled with ``jax.jit``."""
        grad_exe, grad_text = _compile_with_text(vg)
        loss_exe, loss_text = _compile_with_text(jax.jit(of_parts).trace(avals))
        facts = _text_facts(loss_text, grad_text, size)
        why = f"the loss and gradient run compiled: the op-by-op evaluator {why}"
        return cls(
            loss=loss_exe,
            gradient=lambda parts: grad_exe(parts)[1],
            traceable=(of_parts,),
            facts=facts,
            batching="compiled",
            notes=[why, *facts.notes],
        )


class _Switch:
    """The op-by-op evaluator's loss and gradient until it raises; from then on, for good,
    the public path's (compiled once, at that first failure). What the evaluator raises is
    never the user's to see: a model that really fails fails again on the public path,
    which reports it."""

    def __init__(self, evaluator: _eager.Evaluator, public: Callable[[], _Programs]) -> None:
        self._evaluator = evaluator
        self._make_public = public
        self._public: _Programs | None = None
        self._lock = threading.Lock()

    def _fallback(self) -> _Programs:
        with self._lock:
            if self._public is None:
                self._public = self._make_public()
            return self._public

    def loss(self, parts: Parts) -> Any:
        if self._public is None:
            # (the public path runs outside the handler: its error is not chained to this one;
            # waiting for the value here brings any error of the evaluator's calls here)
            with contextlib.suppress(Exception):
                return jax.block_until_ready(self._evaluator.loss(parts))
        return self._fallback().loss(parts)

    def gradient(self, parts: Parts) -> Sequence[Any]:
        if self._public is None:
            with contextlib.suppress(Exception):
                return jax.block_until_ready(self._evaluator.gradient(parts))
        return self._fallback().gradient(parts)


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
        return ModelError(
            f"the model's forward raised while JAX evaluated it: {first_line(forward)}"
        )
    return ModelError(
        "the model's backward raised while JAX evaluated its gradient (the forward runs "
        f"fine): {first_line(exc)}"
    )


def _flat_loss(
    fn: Callable[[Parts], Any], device_parts: Callable[[np.ndarray], Parts]
) -> Callable[[np.ndarray], float]:
    """``fn(blocks) -> loss`` as a function of the flat vector."""

    def loss(theta: np.ndarray) -> float:
        with _scope():
            return _loss_value(fn, device_parts(theta))

    return loss


def _loss_value(fn: Callable[[Parts], Any], parts: Parts) -> float:
    """``fn(parts)`` as a float; what the model raises is a `ModelError` quoting it."""
    try:
        return float(fn(parts))
    except GradcheckInputError:
        raise
    except Exception as exc:
        raise ModelError(
            f"the model raised while JAX evaluated its loss: {first_line(exc)}"
        ) from exc


def _flat_loss_along(
    fn: Callable[[Parts], Any],
    theta0: np.ndarray,
    placements: Sequence[tuple[Any, Any, int, int, tuple[int, ...]]],
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``fn(blocks) -> loss`` at ``theta0 + s * v`` for each ``s`` (`FlatProblem.loss_along`),
    as `_flat_loss` evaluates a flat vector: each block is written as ``theta0 + (s * v)``
    straight into memory JAX takes without a copy (no row of the core's, no copy of a
    block that does not start on a 64-byte boundary), one set of blocks for every step."""

    def loss_along(direction: np.ndarray, steps: np.ndarray) -> np.ndarray:
        direction = np.asarray(direction, dtype=np.float64)
        blocks = [_aligned_empty(shape) for *_, shape in placements]
        values = np.empty(len(steps), dtype=np.float64)
        with _scope():
            for k, s in enumerate(np.asarray(steps, dtype=np.float64)):
                for block, (_, _, offset, size, _) in zip(blocks, placements, strict=True):
                    flat = block.reshape(-1)
                    np.multiply(direction[offset : offset + size], s, out=flat)
                    np.add(theta0[offset : offset + size], flat, out=flat)
                parts = jax.device_put(blocks)
                values[k] = _loss_value(fn, parts)
                del parts  # (evaluated: nothing reads these blocks before they are rewritten)
        return values

    return loss_along


#: JAX on CPU takes a NumPy array's memory as it is (no copy) only where it starts on a
#: boundary of this many bytes; a block of the flat vector at any other offset is copied
#: (a millisecond for 5 MB here)
_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float64 array of ``shape`` starting on an `_ALIGN` boundary."""
    count = math.prod(shape)
    if count * 8 >= _memory.HUGE_PAGE:
        return _memory.empty(shape)  # (on a huge-page boundary)
    raw = np.empty(count * 8 + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + count * 8].view(np.float64).reshape(shape)


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

    The compiled loss is the traced program again (``programs.traceable[0]``: the op-by-op
    evaluator's loss, traced), not the model's Python: the model runs once per check. If
    tracing that raises, the model's own loss is traced instead (the public path).
    """
    size = eager.size
    notes = list(eager.notes)
    max_batch = _max_batch(programs.facts.memory, size)
    loss_batch = None

    def first_traced(trace: Callable[[Callable[[Parts], Any]], Any]) -> Any:
        """``trace(single)`` for the first of the traceable losses that traces."""
        *better, last = programs.traceable
        for single in better:
            try:
                return trace(single)
            except Exception:  # the evaluator's failure, or the model's: the next decides
                continue
        return trace(last)

    def batched_loss(single: Callable[[Parts], Any]) -> Any:
        rows = jax.ShapeDtypeStruct((max_batch, size), jnp.float64)
        return _compile(jax.jit(jax.vmap(lambda theta: single(split(theta)))).trace(rows))

    with _scope():
        if max_batch > 1:
            try:
                batch_exe = first_traced(batched_loss)
            except Exception as exc:  # no batching rule, a callback that cannot vmap, ...
                why = first_line(exc)[:160]
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
            exe = first_traced(lambda single: _compile(jax.jit(single).trace(avals)))
            loss_fn = _flat_loss(exe, device_parts)

    return dataclasses.replace(
        eager,
        loss=loss_fn,
        loss_batch=loss_batch,
        max_batch=max_batch,
        notes=notes,
        batching="loop" if loss_batch is None else "vmap",
        prepare=None,
        loss_along=None,  # (the op-by-op loss's: the compiled one evaluates every point)
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
                        f"the model raised while JAX evaluated its loss: {first_line(exc)}"
                    ) from exc
                out[start : start + k] = np.asarray(values, dtype=np.float64)[:k]
        return out

    return loss_batch
