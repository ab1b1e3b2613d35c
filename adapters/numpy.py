"""The NumPy adapter: hand-written backprop, in the shapes people write it (see the NumPy guide).

The shapes (`adapters._numpy_shapes` recognises them):

- an object with ``params`` (a dict of float arrays), ``forward(x) -> out``,
  ``backward(dout) -> dx`` filling ``grads`` (same keys and shapes as ``params``), and an
  optional ``regularization() -> float`` whose gradient ``backward`` includes; numpy-ml's
  ``parameters``/``gradients`` are found too, other names are given with `model`;
- an object with ``params`` and ``loss(X, y) -> (loss, grads)`` (cs231n's models);
- a pair ``(forward, backward)`` of functions (cs231n's layers): ``x`` is the tuple of the
  forward's arguments, ``out, cache = forward(*x)`` (or ``out`` alone), and
  ``backward(dout, cache)`` (or ``backward(dout, *x)``) returns one gradient per float array
  argument;
- a function ``f(x, y) -> (loss, dx)``, routed here by `gradcheck._dispatch` when it returns
  that on NumPy arrays.

The protocol's rules, checked where they can be (each violation a `ModelError` naming it):
``backward`` uses the latest forward's cache; ``params`` holds only what is trained; the
forward keeps no state between calls.

The check runs on deep copies: the user's model, arrays, caches, generators and pass-through
arguments (a ``bn_param`` whose running statistics the forward updates in place) are never
touched, and every evaluation gets fresh copies of the arguments. Before every evaluation the
copy's random generators (attributes holding ``np.random.Generator`` or ``RandomState``) are
reset to what they were at the start, and NumPy's global random state (what the legacy
``np.random.rand`` draws from) to a state derived from ``seed`` alone, as the torch adapter
does with torch's generator: seeded dropout draws the same mask every time, and the report
does not depend on the caller's global state, which is put back afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from gradcheck import _memory
from gradcheck._calls import call, call_style, input_hint
from gradcheck._errors import first_line
from gradcheck._losses import missing_target, nothing_to_check, numpy_loss
from gradcheck._problem import Block, BlockKind, FlatProblem, block_layout, output_projection
from gradcheck._state import GLOBAL_STATE
from gradcheck.errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
)

from . import _numpy_shapes as shapes
from ._numpy_shapes import Names, NumpyModel, model

__all__ = ["NumpyModel", "build_problem", "matches", "model", "returns_loss_and_gradient"]

_RNG_TYPES = (np.random.Generator, np.random.RandomState, np.random.BitGenerator)


def matches(model: Any) -> bool:
    """Whether ``model`` is a NumPy model object or a ``(forward, backward)`` pair of
    functions (never a plain callable: `gradcheck._dispatch` routes those)."""
    return shapes.recognise(model) is not None


# ----------------------------------------------------------------------------- randomness
def _find_rngs(obj: Any, depth: int = 3, seen: set[int] | None = None) -> Iterator[Any]:
    """Random generators held by ``obj`` (attributes, lists, dicts), a few levels deep."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, _RNG_TYPES):
        yield obj
        return
    if isinstance(obj, np.ndarray):
        return
    if isinstance(obj, Mapping):
        children: Any = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _find_rngs(child, depth - 1, seen)


def _rng_state(rng: Any) -> Any:
    if isinstance(rng, np.random.Generator):
        return rng.bit_generator.state
    if isinstance(rng, np.random.RandomState):
        return rng.get_state(legacy=False)
    return rng.state


def _set_rng_state(rng: Any, state: Any) -> None:
    if isinstance(rng, np.random.Generator):
        rng.bit_generator.state = state
    elif isinstance(rng, np.random.RandomState):
        rng.set_state(state)
    else:
        rng.state = state


def _global_start(seed: int) -> Any:
    """The state NumPy's global generator is set to before every evaluation: a function of
    ``seed`` only (every bit of it), never of the caller's state."""
    return np.random.RandomState(np.random.MT19937([int(seed), 0x6C0B])).get_state()


# ----------------------------------------------------------------------------- the loss
def _loss_pair(
    loss: Any, y: Any, seed: int
) -> tuple[Callable[[np.ndarray], float], Callable[[np.ndarray], np.ndarray]]:
    """``(L(out), dL/dout(out))`` for the loss option, with ``y`` bound."""
    if loss is None and y is None:
        cache: dict[tuple[int, ...], np.ndarray] = {}

        def proj(out: np.ndarray) -> np.ndarray:
            shape = np.shape(out)
            if shape not in cache:
                cache[shape] = output_projection(shape, seed)
            return cache[shape].copy()  # a backward may scale its dout in place

        return (lambda out: float(np.sum(np.asarray(out) * proj(out)))), proj
    if loss is None or isinstance(loss, str):
        fn, grad = numpy_loss(loss or "mse")
    elif isinstance(loss, tuple) and len(loss) == 2 and all(callable(f) for f in loss):
        fn, grad = loss
    elif callable(loss):
        raise InvalidOptionError(
            "for NumPy models, loss must be a name or a (loss, loss_grad) pair; "
            f"got the callable {getattr(loss, '__name__', loss)!r} alone, which has no gradient"
        )
    else:
        raise InvalidOptionError(
            f"loss must be None, a name or a (loss, loss_grad) pair; got {type(loss).__name__}"
        )
    if y is None:
        if isinstance(loss, str):  # (loss None and y None is the projection, above)
            raise missing_target(loss)
        raise InvalidOptionError("a loss was given but y is None; pass the target y")
    target = np.asarray(y)

    def value(out: np.ndarray) -> float:
        return _scalar(fn(out, target.copy()), "the loss")

    return value, (lambda out: grad(out, target.copy()))


def _scalar(result: Any, what: str) -> float:
    try:
        return float(result)
    except (TypeError, ValueError):
        shape = getattr(result, "shape", None)
        got = f"an array of shape {shape}" if shape is not None else type(result).__name__
        raise ModelError(f"{what} must return a scalar; got {got}") from None


class _OutputLoss:
    """The loss of a forward's output and its ``dL/dout``: the option's loss for one output
    array; with ``y=None``, ``sum(out * r)``, where a tuple of outputs has each floating-point
    part projected on its own ``r`` (``output_projection(shape, seed, k)``, as the torch
    adapter does) and ``backward`` receives a tuple of ``dout``s (``None`` for the rest)."""

    def __init__(self, loss: Any, y: Any, seed: int) -> None:
        self.value, self.grad = _loss_pair(loss, y, seed)
        self.project = loss is None and y is None
        self.seed = seed
        self._r: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

    def _parts(self, out: tuple[Any, ...]) -> list[tuple[int, np.ndarray]]:
        if not self.project:
            raise ModelError(
                f"the forward returned a tuple of {len(out)} outputs, and a loss applies to "
                "one output array: return one array, or check with y=None (each output is "
                "then projected on a direction of its own)"
            )
        parts = [
            (pos, np.asarray(p))
            for pos, p in enumerate(out)
            if isinstance(p, (np.ndarray, np.floating, float))
            and np.issubdtype(np.asarray(p).dtype, np.floating)
        ]
        if not parts:
            raise ModelError(
                f"the forward returned a tuple of {len(out)} outputs with no floating-point "
                "array to project"
            )
        return parts

    def _projection(self, k: int, shape: tuple[int, ...]) -> np.ndarray:
        if (k, shape) not in self._r:
            self._r[k, shape] = output_projection(shape, self.seed, k)
        return self._r[k, shape].copy()  # a backward may scale its dout in place

    def loss(self, out: Any) -> float:
        if not isinstance(out, tuple):
            return self.value(np.asarray(out))
        return sum(
            float(np.sum(part * self._projection(k, part.shape)))
            for k, (_, part) in enumerate(self._parts(out))
        )

    def dout(self, out: Any) -> Any:
        if isinstance(out, tuple):
            douts: list[Any] = [None] * len(out)
            for k, (pos, part) in enumerate(self._parts(out)):
                douts[pos] = self._projection(k, part.shape)
            return tuple(douts)
        out = np.asarray(out)
        dout = self.grad(out)
        if dout is None:
            raise ModelError(f"loss_grad returned None; expected an array of shape {out.shape}")
        dout = np.asarray(dout, dtype=np.float64)
        if dout.shape != out.shape:
            raise ShapeMismatchError(
                f"loss_grad returned shape {dout.shape}; the output has shape {out.shape}"
            )
        return dout


# ----------------------------------------------------------------------------- arguments
class _Arguments:
    """What the user's code is called with. Float arrays become float64 copies that the
    check may substitute; anything else (integer labels, a ``conv_param`` dict, a ``bn_param``
    holding running statistics, Python values) passes through as given, deep-copied afresh
    for every evaluation, so the user's own objects are never changed.

    ``arrays_only``: only ``np.ndarray`` values are arrays (function arguments); otherwise
    anything ``np.asarray`` takes is (an object model's input, as it always was).
    """

    def __init__(self, items: list[tuple[str, BlockKind, Any]], *, arrays_only: bool) -> None:
        self.names = [name for name, _, _ in items]
        self.kinds = [kind for _, kind, _ in items]
        self.values: list[Any] = []
        self.floats: list[int] = []  # positions of the float arrays, checked or not
        self.complex: list[int] = []
        self.dtypes: set[str] = set()
        for pos, (_, _, value) in enumerate(items):
            arr = _as_array(value, arrays_only)
            if arr is not None and np.issubdtype(arr.dtype, np.floating):
                self.dtypes.add(str(arr.dtype))
                self.values.append(arr.astype(np.float64))
                self.floats.append(pos)
            else:
                if arr is not None and np.issubdtype(arr.dtype, np.complexfloating):
                    self.complex.append(pos)
                self.values.append(copy.deepcopy(value))

    def fresh(self, values: list[Any]) -> list[Any]:
        """Copies of ``values`` for one evaluation (user code may change its arguments in
        place: the next evaluation must not see that)."""
        return [v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v) for v in values]

    def by_float(self, result: Any, who: str) -> dict[int, Any]:
        """``result``, the gradients a function returned, by argument position: one per float
        array argument in order (an array alone when there is one), or one per argument."""
        n, listed = len(self.floats), ", ".join(f"`{self.names[p]}`" for p in self.floats)
        if n == 1 and not isinstance(result, (tuple, list)):
            return {self.floats[0]: result}
        if isinstance(result, (tuple, list)):
            if len(result) == n:
                return dict(zip(self.floats, result, strict=True))
            if len(result) == len(self.values):
                return {pos: result[pos] for pos in self.floats}
        got = (
            f"{len(result)} values"
            if isinstance(result, (tuple, list))
            else (type(result).__name__)
        )
        raise ShapeMismatchError(
            f"{who} must return one gradient per float array argument ({listed}), in that "
            f"order; got {got}"
        )


def _as_array(value: Any, arrays_only: bool) -> np.ndarray | None:
    if arrays_only:
        return value if isinstance(value, np.ndarray) else None
    if isinstance(value, (str, bytes)):
        return None
    try:
        return np.asarray(value)
    except ValueError:  # a ragged list: passed through as it is
        return None


class _Inputs(_Arguments):
    """An object model's input ``x``: one array, a tuple/list of arrays or a dict of arrays.

    ``forward`` receives it by the one rule of every adapter (`gradcheck._calls`): a tuple
    (or a list of arrays) is spread over ``forward``'s positional parameters when it requires
    more than one or takes ``*args`` (``forward(Q, K, V)``), else it is the one input
    (``forward(x)`` unpacking it itself, numpy-ml's ``forward(X, retain_derived=True)``); a
    dict is keyword arguments when its keys name ``forward``'s parameters, else one input.
    """

    def __init__(self, x: Any, forward: Callable[..., Any]) -> None:
        self.kind = "none" if x is None else "array"
        items: list[tuple[Any, Any]] = []
        if isinstance(x, Mapping):
            self.kind, items = "dict", list(x.items())
        elif isinstance(x, tuple) or (
            isinstance(x, list) and x and all(isinstance(v, np.ndarray) for v in x)
        ):
            self.kind, items = type(x).__name__, list(enumerate(x))
        elif x is not None:
            items = [(None, x)]
        self.keys = [k for k, _ in items]
        self.style = call_style(forward, x)
        names = ["input" if self.kind == "array" else f"input[{key!r}]" for key, _ in items]
        super().__init__(
            [(name, "input", value) for name, (_, value) in zip(names, items, strict=True)],
            arrays_only=False,
        )

    def call(self, forward: Callable[..., Any], values: list[Any]) -> Any:
        """``forward`` on the input for one evaluation (fresh copies of the arrays)."""
        values = self.fresh(values)
        if self.kind == "none":
            x: Any = None
        elif self.kind == "array":
            x = values[0]
        elif self.kind == "dict":
            x = dict(zip(self.keys, values, strict=True))
        else:
            x = tuple(values) if self.kind == "tuple" else list(values)
        try:
            return _call("forward", call, forward, self.style, x)
        except ModelError as exc:
            hint = input_hint(forward, x)
            if not hint:
                raise
            raise ModelError(f"{exc}{hint}") from exc.__cause__

    def gradient(self, dx: Any, pos: int) -> Any:
        """The part of ``backward``'s return value that belongs to input ``pos``."""
        if self.kind == "array":
            return dx
        if self.kind == "dict":
            if not isinstance(dx, Mapping) or self.keys[pos] not in dx:
                raise ShapeMismatchError(
                    f"backward must return a dict with the input's keys; got {type(dx).__name__}"
                )
            return dx[self.keys[pos]]
        if not isinstance(dx, (tuple, list)) or len(dx) != len(self.values):
            raise ShapeMismatchError(
                f"backward must return a sequence of {len(self.values)} input gradients, "
                f"one per input; got {type(dx).__name__}"
            )
        return dx[pos]


# ----------------------------------------------------------------------------- user code
def _real_array(value: Any, what: str) -> np.ndarray:
    """``value`` as a real float array, or a one-line error saying what it is."""
    arr = np.asarray(value) if value is not None else None
    if arr is None or arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        got = type(value).__name__
        if arr is not None:
            got += f" of dtype {arr.dtype}"
        raise ModelError(f"{what} must be a numeric array; got {got}")
    if np.iscomplexobj(arr):
        raise ModelError(
            f"{what} is complex ({arr.dtype}) for a real parameter or input; "
            "its imaginary part would be dropped"
        )
    return arr


def _call(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, the model's own code: what it raises becomes a `ModelError` that says
    which stage raised (the original is chained, with its traceback)."""
    try:
        return fn(*args)
    except GradcheckInputError:
        raise
    except Exception as exc:
        raise ModelError(f"the model's {stage} raised {first_line(exc)}") from exc


Gradients = dict[str, tuple[Any, str]]  # block name -> (the user's gradient, what it is)


def _tuple_hint(douts: int) -> str:
    """What a backward received from a forward of several outputs ("" for one output)."""
    if not douts:
        return ""
    return (
        f" (the forward returned a tuple of {douts} outputs, so backward received a tuple "
        f"of {douts} douts, one per output)"
    )


class _Subject(Protocol):
    """One shape, evaluated: ``work`` holds the parameters and generators (``None`` for
    functions); ``loss`` and ``gradients`` run the user's code on one evaluation's arguments."""

    work: Any

    def params(self) -> Mapping[Any, Any]: ...

    def start(self) -> None: ...

    def loss(self, args: list[Any]) -> float: ...

    def gradients(self, args: list[Any], blocks: list[Block]) -> Gradients: ...


class _Object:
    """``params``, ``forward``, ``backward`` and ``grads``, under ``names``."""

    def __init__(self, work: Any, names: Names, inputs: _Inputs, output: _OutputLoss) -> None:
        self.work, self.names, self.inputs, self.output = work, names, inputs, output
        self.forward = getattr(work, names.forward)
        self.backward = getattr(work, names.backward)
        self.regularization = getattr(work, "regularization", None)
        self.flush = getattr(work, "flush_gradients", None)  # numpy-ml: a fresh step
        self.douts = 0  # how many douts the latest backward received, where more than one

    def params(self) -> Mapping[Any, Any]:
        return getattr(self.work, self.names.params)

    def start(self) -> None:
        if callable(self.flush):
            _call("flush_gradients", self.flush)

    def loss(self, args: list[Any]) -> float:
        value = self.output.loss(self.inputs.call(self.forward, args))
        if callable(self.regularization):
            value += float(self.regularization())
        return value

    def gradients(self, args: list[Any], blocks: list[Block]) -> Gradients:
        dout = self.output.dout(self.inputs.call(self.forward, args))
        names = self.names
        grads = getattr(self.work, names.grads, None)
        if isinstance(grads, dict):  # a backward that adds to its gradients starts at zero
            for value in grads.values():
                if isinstance(value, np.ndarray) and value.flags.writeable:
                    value.fill(0.0)
        self.douts = len(dout) if isinstance(dout, tuple) else 0
        try:
            dx = _call("backward", self.backward, dout)
        except ModelError as exc:
            if self.douts:  # a forward of several outputs: say what the backward received
                raise ModelError(f"{exc}{_tuple_hint(self.douts)}") from exc.__cause__
            raise
        grads = getattr(self.work, names.grads, None)
        found: Gradients = {}
        for block in blocks:
            if block.kind == "input":
                if dx is None:
                    raise ModelError(
                        "backward returned None, so the input gradient cannot be checked; "
                        "return dL/dx from backward or pass wrt='params'"
                    )
                pos = self.inputs.names.index(block.name)
                what = f"the gradient of `{block.name}` returned by backward"
                found[block.name] = (self.inputs.gradient(dx, pos), what)
                continue
            where = f"model.{names.grads}"
            value = _grad_entry(grads, block.name, f"{where} has", "after backward", names.params)
            found[block.name] = (value, f"{where}[{block.name!r}]")
        return found


def _grad_entry(grads: Any, name: str, holder: str, when: str, params: str) -> Any:
    """``grads[name]``, or an error quoting the rule a missing entry breaks: the parameters
    hold only what is trained, and each gets a gradient."""
    if isinstance(grads, Mapping) and name in grads:
        return grads[name]
    have = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
    raise ShapeMismatchError(
        f"{holder} no entry {name!r}{' ' + when if when else ''}; expected the keys of "
        f"model.{params}, got {have} (rule: `{params}` holds only what is trained, and each "
        "gets a gradient)"
    )


class _LossModel:
    """``params`` and ``loss(X, y) -> (loss, grads)`` (cs231n's models)."""

    def __init__(self, work: Any, x: Any, y: Any) -> None:
        self.work, self.x, self.y = work, copy.deepcopy(x), np.asarray(y)

    def params(self) -> Mapping[Any, Any]:
        return self.work.params

    def start(self) -> None:
        pass

    def _run(self) -> tuple[Any, Any]:
        x = self.x.copy() if isinstance(self.x, np.ndarray) else copy.deepcopy(self.x)
        result = _call("loss", self.work.loss, x, self.y.copy())
        if not (isinstance(result, tuple) and len(result) == 2):
            got = (
                f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
            )
            raise ModelError(
                f"the model's loss(X, y) must return (loss, grads) when given y; got {got}"
            )
        return result

    def loss(self, args: list[Any]) -> float:
        return _scalar(self._run()[0], "the model's loss(X, y)")

    def gradients(self, args: list[Any], blocks: list[Block]) -> Gradients:
        grads = self._run()[1]
        found: Gradients = {}
        for block in blocks:
            holder = "the grads returned by loss(X, y) have"
            value = _grad_entry(grads, block.name, holder, "", "params")
            found[block.name] = (value, f"grads[{block.name!r}] from loss(X, y)")
        return found


class _Pair:
    """``(forward, backward)``: ``out, cache = forward(*args)`` (``out`` a tuple of outputs
    when the forward returns more than two values: the last is the cache), then
    ``backward(*douts, cache)``; a forward returning an array alone has
    ``backward(dout, *args)`` called."""

    work = None

    def __init__(self, pair: tuple[Any, Any], arguments: _Arguments, output: _OutputLoss) -> None:
        (self.forward, self.backward), self.arguments, self.output = pair, arguments, output

    def params(self) -> Mapping[Any, Any]:
        return {}

    def start(self) -> None:
        pass

    def _run_forward(self, args: list[Any]) -> tuple[Any, tuple[Any, ...]]:
        """``(out, what backward gets after the douts)``."""
        result = _call("forward", self.forward, *args)
        if not isinstance(result, tuple):
            return result, tuple(args)
        if len(result) < 2:
            raise ModelError(
                f"the forward returned a tuple of {len(result)}; a forward returns "
                "(out, cache), (out1, out2, ..., cache) or out alone"
            )
        outs = result[:-1]
        return (outs[0] if len(outs) == 1 else tuple(outs)), (result[-1],)

    def loss(self, args: list[Any]) -> float:
        return self.output.loss(self._run_forward(args)[0])

    def gradients(self, args: list[Any], blocks: list[Block]) -> Gradients:
        out, rest = self._run_forward(args)
        dout = self.output.dout(out)
        douts = dout if isinstance(out, tuple) else (dout,)
        result = _call("backward", self.backward, *douts, *rest)
        by_pos = self.arguments.by_float(result, "backward")
        names = self.arguments.names
        what = "the gradient of `{}` returned by backward"
        return {b.name: (by_pos[names.index(b.name)], what.format(b.name)) for b in blocks}


class _LossFunction:
    """``f(*x, y) -> (loss, dx)`` (``f(*x)`` when ``y`` is None)."""

    work = None

    def __init__(self, fn: Callable[..., Any], arguments: _Arguments, y: Any) -> None:
        self.fn, self.arguments = fn, arguments
        self.y = None if y is None else copy.deepcopy(y)
        self.name = shapes.describe(fn)

    def params(self) -> Mapping[Any, Any]:
        return {}

    def start(self) -> None:
        pass

    def _run(self, args: list[Any]) -> tuple[Any, Any]:
        extra = () if self.y is None else (copy.deepcopy(self.y),)
        result = _call(f"loss function {self.name}", self.fn, *args, *extra)
        if not (isinstance(result, tuple) and len(result) == 2):
            got = (
                f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
            )
            raise ModelError(f"{self.name} must return (loss, dx); got {got}")
        return result

    def loss(self, args: list[Any]) -> float:
        return _scalar(self._run(args)[0], self.name)

    def gradients(self, args: list[Any], blocks: list[Block]) -> Gradients:
        by_pos = self.arguments.by_float(self._run(args)[1], self.name)
        names = self.arguments.names
        return {
            b.name: (
                by_pos[names.index(b.name)],
                f"the gradient of `{b.name}` returned by {self.name}",
            )
            for b in blocks
        }


# ----------------------------------------------------------------------------- evaluation
class _Evaluations:
    """Evaluations of one subject at points ``theta``: the subject's generators and NumPy's
    global one reset, the parameters set in place, the arguments fresh; the caller's global
    generator restored afterwards (under the lock that every check holds for that, so that
    threads do not interleave)."""

    def __init__(
        self, subject: _Subject, arguments: _Arguments, blocks: list[Block], seed: int
    ) -> None:
        self.subject, self.arguments, self.blocks = subject, arguments, blocks
        self.rngs = list(_find_rngs(subject.work)) if subject.work is not None else []
        self.rng_states = [_rng_state(r) for r in self.rngs]
        self.start_state = _global_start(seed)  # what legacy np.random calls draw from
        self.positions = {name: pos for pos, name in enumerate(arguments.names)}

    @contextmanager
    def at(self, theta: np.ndarray) -> Iterator[list[Any]]:
        with GLOBAL_STATE:
            global_state = np.random.get_state()
            try:
                np.random.set_state(self.start_state)
                for rng, state in zip(self.rngs, self.rng_states, strict=True):
                    _set_rng_state(rng, copy.deepcopy(state))
                self.subject.start()
                params = self.subject.params()
                values = list(self.arguments.values)
                for block in self.blocks:
                    part = theta[block.slice].reshape(block.shape)
                    if block.name in self.positions:
                        values[self.positions[block.name]] = part
                    else:
                        _set_param(params, block.name, part)
                yield values
            finally:
                np.random.set_state(global_state)

    def loss(self, theta: np.ndarray) -> float:
        with self.at(theta) as values:
            return self.subject.loss(values)

    def gradient(self, theta: np.ndarray) -> np.ndarray:
        with self.at(theta) as values:
            found = self.subject.gradients(values, self.blocks)
            flat = _memory.empty(theta.size)
            for block in self.blocks:
                value, what = found[block.name]
                value = _real_array(value, what)
                if value.shape != block.shape:
                    hint = _tuple_hint(getattr(self.subject, "douts", 0))
                    raise ShapeMismatchError(
                        f"{what} has shape {value.shape}; expected {block.shape}{hint}"
                    )
                flat[block.slice] = value.reshape(-1)
            return flat


def _set_param(params: Mapping[Any, Any], name: str, part: np.ndarray) -> None:
    """Write ``part`` into the parameter array (looked up now: a forward may have replaced
    the dict's entry by a new array)."""
    target = params.get(name) if isinstance(params, Mapping) else None
    if not isinstance(target, np.ndarray) or target.shape != part.shape:
        got = (
            type(target).__name__
            if target is None
            else f"{type(target).__name__} " + str(getattr(target, "shape", ""))
        )
        raise ModelError(
            f"parameter {name!r} became {got} during the check; the model must keep its "
            "parameter arrays (set them in place, not replace them)"
        )
    np.copyto(target, part)


# ----------------------------------------------------------------------------- the shapes
def _float_params(params: Mapping[Any, Any], attr: str, notes: list[str]) -> dict[str, np.ndarray]:
    """The real floating-point parameters; every other one is named in ``notes``."""
    found = {}
    for name, value in params.items():
        if not isinstance(value, np.ndarray):
            raise ModelError(
                f"model.{attr}[{name!r}] must be a NumPy array; got {type(value).__name__}"
            )
        if np.issubdtype(value.dtype, np.floating):
            found[str(name)] = value
        elif np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
            notes.append(
                f"parameter `{name}` has dtype {value.dtype} and is not checked "
                "(only floating-point parameters have gradients)"
            )
        elif np.issubdtype(value.dtype, np.complexfloating):
            notes.append(
                f"parameter `{name}` is complex ({value.dtype}) and is not checked: "
                "gradcheck checks real parameters (hold its real and imaginary parts as two)"
            )
    return found


def _promote(work: Any, attr: str, params: dict[str, np.ndarray]) -> None:
    """Give the copy float64 parameters, also where an attribute aliases a params entry."""
    for name, value in params.items():
        if value.dtype == np.float64:
            continue
        new = value.astype(np.float64)
        getattr(work, attr)[name] = new
        for held_attr, held in list(vars(work).items()):
            if held is value:
                setattr(work, held_attr, new)


def _copy(model: Any) -> Any:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # pragma: no cover - exotic models
        raise ModelError(f"cannot copy the model to check it safely: {exc}") from exc


def _untrained(
    master: Any, names: Names, params: dict[str, np.ndarray], probe: Callable[[], _Object]
) -> list[str]:
    """Parameters that are not trained: missing from a gradients dict that the model declares
    up front (numpy-ml's ``gradients`` lists what is trained; its ``parameters`` also hold
    running statistics) and still missing after one ``backward`` (of ``probe()``, a fresh
    copy). An empty or missing dict declares nothing: every parameter is checked."""
    declared = getattr(master, names.grads, None)
    if not isinstance(declared, Mapping) or not declared:
        return []
    undeclared = [name for name in params if name not in declared]
    if not undeclared:
        return []
    subject = probe()
    with _Evaluations(subject, subject.inputs, [], 0).at(np.empty(0)) as values:
        subject.gradients(values, [])
    filled = getattr(subject.work, names.grads, None)
    return [n for n in undeclared if not (isinstance(filled, Mapping) and n in filled)]


def _model_blocks(
    params: dict[str, np.ndarray], arguments: _Arguments, wrt: str
) -> list[tuple[str, tuple[int, ...], BlockKind]]:
    """Parameters (in their order) then the float arguments (in theirs), as ``wrt`` asks."""
    layout: list[tuple[str, tuple[int, ...], BlockKind]] = []
    if wrt in ("all", "params"):
        layout += [(name, p.shape, "param") for name, p in params.items() if p.size]
    for pos in arguments.floats:
        kind = arguments.kinds[pos]
        if wrt in ("all", f"{kind}s") and arguments.values[pos].size:
            layout.append((arguments.names[pos], arguments.values[pos].shape, kind))
    return layout


def _object(
    shape: shapes.Shape, x: Any, y: Any, loss: Any, wrt: str, seed: int
) -> tuple[Callable[[], _Subject], _Arguments, dict[str, np.ndarray], list[str], list[str]]:
    names = shape.names
    master = _copy(shape.model)
    notes: list[str] = []
    params = _float_params(getattr(master, names.params), names.params, notes)
    dtypes = {str(p.dtype) for p in params.values()}
    _promote(master, names.params, params)
    params = {k: getattr(master, names.params)[k] for k in params}
    inputs = _Inputs(x, getattr(master, names.forward))
    output = _OutputLoss(loss, y, seed)
    if dtypes - {"float64"}:
        listed = ", ".join(sorted(dtypes))
        notes.append(f"parameters of dtype {listed} were checked on a float64 copy")
    skipped = _untrained(
        master, names, params, lambda: _Object(_copy(master), names, inputs, output)
    )
    if skipped:
        listed = ", ".join(f"`{n}`" for n in skipped)
        notes.append(
            f"{listed} {'is' if len(skipped) == 1 else 'are'} in model.{names.params} with no "
            f"entry in model.{names.grads} (running statistics?) and not checked"
        )
        params = {k: v for k, v in params.items() if k not in skipped}

    def subject() -> _Subject:
        return _Object(_copy(master), names, inputs, output)

    return subject, inputs, params, notes, skipped


def _loss_model(
    shape: shapes.Shape, x: Any, y: Any, loss: Any, wrt: str
) -> tuple[Callable[[], _Subject], _Arguments, dict[str, np.ndarray], list[str], list[str]]:
    if loss is not None:
        raise InvalidOptionError(
            "this model computes its own loss: loss(X, y) returns (loss, grads); drop "
            f"loss={loss!r}"
        )
    if y is None:
        raise InvalidOptionError("the model's loss(X, y) needs the target y; got y=None")
    master = _copy(shape.model)
    notes: list[str] = []
    params = _float_params(master.params, "params", notes)
    dtypes = {str(p.dtype) for p in params.values()}
    _promote(master, "params", params)
    params = {k: master.params[k] for k in params}
    if dtypes - {"float64"}:
        notes.append(
            f"parameters of dtype {', '.join(sorted(dtypes))} were checked on a float64 copy"
        )
    inputs = _Inputs(x, master.loss)
    if wrt == "inputs":
        raise NothingToCheckError(
            "nothing to check with wrt='inputs': the model's loss(X, y) returns gradients of "
            "its parameters only, none for X"
        )
    if wrt == "all" and inputs.floats:
        notes.append(
            "the input is not checked: the model's loss(X, y) returns gradients of its "
            "parameters only"
        )
    no_inputs = _Arguments([], arrays_only=True)
    x_copy = copy.deepcopy(x)

    def subject() -> _Subject:
        return _LossModel(_copy(master), x_copy, y)

    return subject, no_inputs, params, notes, []


def _function_arguments(fn: Callable[..., Any], x: Any) -> _Arguments:
    """The arguments of a pair's forward or a loss function: ``x`` is their tuple (an array
    alone is one argument); named by ``fn``'s parameters; the first is the input, the other
    float arrays the parameters."""
    if isinstance(x, np.ndarray):
        x = (x,)
    if not isinstance(x, (tuple, list)):
        got = "None" if x is None else type(x).__name__
        raise InvalidOptionError(
            f"x must be the tuple of {shapes.describe(fn)}'s arguments (an array alone for "
            f"one); got {got}"
        )
    names = shapes.argument_names(fn, len(x))
    kinds: list[BlockKind] = ["input" if k == 0 else "param" for k in range(len(x))]
    return _Arguments(list(zip(names, kinds, x, strict=True)), arrays_only=True)


def _function_notes(arguments: _Arguments) -> list[str]:
    notes = [
        f"argument `{arguments.names[pos]}` is complex and is not checked: gradcheck checks "
        "real arrays (it is passed as it is)"
        for pos in arguments.complex
    ]
    if arguments.dtypes - {"float64"}:
        listed = ", ".join(sorted(arguments.dtypes))
        notes.append(f"arguments of dtype {listed} were checked on a float64 copy")
    return notes


def build_problem(model: Any, x: Any, y: Any, *, loss: Any, wrt: str, seed: int) -> FlatProblem:
    shape = shapes.recognise(model)
    notes: list[str]
    skipped: list[str] = []
    params: dict[str, np.ndarray] = {}
    if shape is not None and shape.kind == "object":
        make, arguments, params, notes, skipped = _object(shape, x, y, loss, wrt, seed)
    elif shape is not None and shape.kind == "loss_model":
        make, arguments, params, notes, skipped = _loss_model(shape, x, y, loss, wrt)
    elif shape is not None:  # a pair
        pair = shape.model
        arguments = _function_arguments(pair[0], x)
        output = _OutputLoss(loss, y, seed)
        notes = _function_notes(arguments)

        def make() -> _Subject:
            return _Pair(pair, arguments, output)

    elif callable(model):
        if loss is not None:
            raise InvalidOptionError(
                f"{shapes.describe(model)} returns its own loss, (loss, dx); drop loss={loss!r}"
            )
        arguments = _function_arguments(model, x)
        notes = _function_notes(arguments)

        def make() -> _Subject:
            return _LossFunction(model, arguments, y)

    else:
        raise shapes.unsupported(model, shapes.closest_match(model) or "not a NumPy shape")

    if shape is not None and shape.kind == "object":
        for pos in arguments.complex:
            notes.append(
                f"input `{arguments.names[pos]}` is complex and is not checked: gradcheck "
                "checks real inputs (it is passed to the model as it is)"
            )
    layout = _model_blocks(params, arguments, wrt)
    if not layout:
        detail = f" (not checked: {', '.join(skipped)})" if skipped else ""
        raise nothing_to_check(wrt, detail)
    blocks = list(block_layout(layout))
    theta0 = np.concatenate(
        [
            (
                params[b.name]
                if b.name in params
                else arguments.values[arguments.names.index(b.name)]
            ).ravel()
            for b in blocks
        ],
        out=_memory.empty(sum(b.size for b in blocks)),
    )
    _memory.freeze(theta0)  # the problem keeps it as it is (no second copy)
    evaluations = _Evaluations(make(), arguments, blocks, seed)
    if shape is not None and shape.kind in ("object", "loss_model"):
        _check_rules(evaluations, lambda: _Evaluations(make(), arguments, blocks, seed), theta0)
    return FlatProblem(
        theta0=theta0,
        loss=evaluations.loss,
        gradient=evaluations.gradient,
        blocks=blocks,
        framework="numpy",
        notes=notes,
        skipped=skipped,
        batching="loop",
    )


# ----------------------------------------------------------------------------- the rules
def _same(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b))


def _check_rules(work: _Evaluations, fresh: Callable[[], _Evaluations], theta0: np.ndarray) -> None:
    """The protocol's rules, checked where a violation shows at the starting point.

    - The forward keeps no state between calls: two evaluations at ``theta0`` (after one
      elsewhere) agree, or a fresh copy of the model reproduces neither of them (then the
      forward is random in a way the resets cannot fix, which the core reports).
    - ``backward`` uses the latest forward's cache: after forwards at other points, the
      gradient at ``theta0`` is the fresh copy's after one forward, bit for bit.
    """
    if not np.all(np.isfinite(theta0)):
        return  # the core says which entry (NonFiniteError) before evaluating anything
    is_object = isinstance(work.subject, _Object)
    stage = "forward" if is_object else "loss(X, y)"
    nearby = theta0 + 1e-6 * np.maximum(np.abs(theta0), 1.0)
    work.loss(nearby)
    first, second = work.loss(theta0), work.loss(theta0)
    if not _same(first, second):
        replay = fresh()  # the same calls on a fresh copy: the object's state, or randomness?
        replay.loss(nearby)
        if not _same(replay.loss(theta0), first):
            return  # random in a way the resets cannot fix: the core reports it
        raise ModelError(
            f"the model's {stage} keeps state between calls: at the same parameters and "
            f"input it gave {first!r}, then {second!r}, and a fresh copy of the model gives "
            f"{first!r} again (rule: the {stage} keeps no state between calls; a counter, an "
            "iterator, a list it appends to, or a random generator held more than three "
            "attributes deep, which gradcheck does not reset, changes every call)"
        )
    if not is_object:
        return
    try:
        after = work.gradient(theta0)
    except GradcheckInputError as exc:
        try:
            fresh().gradient(theta0)
        except GradcheckInputError:
            raise exc from exc.__cause__  # the user's own error stays the cause
        raise ModelError(
            "the model's backward does not use the latest forward's cache: after forwards at "
            f"a nearby point it fails ({exc}), after one forward on a fresh copy it does not "
            "(rule: backward uses the cache of the latest forward; overwrite the cache in "
            "forward rather than append to it)"
        ) from exc
    once = fresh().gradient(theta0)
    if not np.array_equal(after, once, equal_nan=True):
        diff = np.abs(after - once)
        worst = next(b for b in work.blocks if np.nanmax(diff[b.slice], initial=0.0) > 0.0)
        raise ModelError(
            "the model's backward does not use the latest forward's cache: at the starting "
            f"point, after forwards at a nearby point, its gradient of `{worst.name}` differs "
            f"from a fresh copy's after one forward (by up to {np.nanmax(diff):.3g}, where "
            "the two must agree bit for bit) (rule: backward uses the cache of the latest "
            "forward, and sets its gradients rather than adding to them)"
        )


# ----------------------------------------------------------------------------- routing
def returns_loss_and_gradient(fn: Callable[..., Any], x: Any, y: Any) -> str | None:
    """Whether the plain callable ``fn`` is a NumPy loss function: called once on fresh copies
    of ``x`` (its arguments: an array, or a tuple of them) and ``y``, with NumPy's global
    random state put back afterwards, it returns ``(loss, dx)``: a real scalar and one float
    array per float array argument, shaped like it. ``None`` if it is; else why not, in
    words (what it raised, or what it returned), for the error that names the forms.

    Raises:
        ModelError: ``fn`` raised (with the user's exception as its cause): NumPy inputs
            and code that names no framework leave nothing else it could be.
    """
    if not isinstance(x, (np.ndarray, tuple, list)):
        return "x is not an array or a tuple of arrays"
    try:
        arguments = _function_arguments(fn, x)
    except GradcheckInputError as exc:
        return str(exc)
    if not arguments.floats:
        return "x holds no floating-point array"
    with GLOBAL_STATE:
        state = np.random.get_state()
        try:
            extra = () if y is None else (copy.deepcopy(y),)
            result = fn(*arguments.fresh(arguments.values), *extra)
        except Exception as exc:
            call = "f(*x, y)" if y is not None else "f(*x)"
            raise ModelError(
                f"the function raised when called as a NumPy loss function {call} -> "
                f"(loss, dx): {first_line(exc)}"
            ) from exc
        finally:
            np.random.set_state(state)
    if not (isinstance(result, tuple) and len(result) == 2):
        return f"it returned {_shape_of(result)}, not (loss, dx)"
    value, grads = result
    if (
        np.ndim(value) != 0
        or not np.isrealobj(value)
        or not isinstance(value, (float, int, np.floating, np.integer, np.ndarray))
    ):
        return f"its loss is {_shape_of(value)}, not a real scalar"
    try:
        by_pos = arguments.by_float(grads, "")
    except GradcheckInputError as exc:
        return str(exc)
    for pos, g in by_pos.items():
        want = arguments.values[pos].shape
        if not (isinstance(g, np.ndarray) and g.shape == want):
            return f"its gradient for argument {pos} is {_shape_of(g)}; the argument has {want}"
    return None


def _shape_of(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"
