"""The NumPy adapter: models with ``params``, ``forward(x)``, ``backward(dout)`` and ``grads``.

The protocol (see the NumPy guide):

- ``model.params``: a dict of float arrays, the parameters;
- ``model.forward(x) -> out``: caches what ``backward`` needs;
- ``model.backward(dout) -> dx``: given ``dL/dout``, fills ``model.grads`` (same
  keys and shapes as ``params``) and returns ``dL/dx`` (may be ``None`` when only
  parameters are checked);
- optional ``model.regularization() -> float``: a penalty added to the loss,
  whose gradient ``backward`` includes in ``grads``.

The check runs on a deep copy of the model, so the user's arrays, caches and
random generators are never touched. Before every evaluation the copy's random
generators (attributes holding ``np.random.Generator`` or ``RandomState``) and
NumPy's global random state are reset to what they were at the start, so seeded
dropout draws the same mask every time; the global state is put back afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from gradcheck import _memory
from gradcheck._errors import (
    GradcheckInputError,
    InvalidOptionError,
    ModelError,
    NothingToCheckError,
    ShapeMismatchError,
    first_line,
)
from gradcheck._losses import numpy_loss
from gradcheck._problem import BlockKind, FlatProblem, block_layout, output_projection
from gradcheck._state import GLOBAL_STATE

_RNG_TYPES = (np.random.Generator, np.random.RandomState, np.random.BitGenerator)


def matches(model: Any) -> bool:
    return (
        isinstance(getattr(model, "params", None), Mapping)
        and callable(getattr(model, "forward", None))
        and callable(getattr(model, "backward", None))
    )


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
        raise InvalidOptionError("a loss was given but y is None; pass the target y")
    target = np.asarray(y)

    def value(out: np.ndarray) -> float:
        result = fn(out, target.copy())
        try:
            return float(result)
        except (TypeError, ValueError):
            shape = getattr(result, "shape", None)
            got = f"an array of shape {shape}" if shape is not None else type(result).__name__
            raise ModelError(f"the loss must return a scalar; got {got}") from None

    return value, (lambda out: grad(out, target.copy()))


def _float_params(model: Any, notes: list[str]) -> dict[str, np.ndarray]:
    """The real floating-point parameters; every other one is named in ``notes``."""
    params = {}
    for name, value in model.params.items():
        if not isinstance(value, np.ndarray):
            raise ModelError(
                f"model.params[{name!r}] must be a NumPy array; got {type(value).__name__}"
            )
        if np.issubdtype(value.dtype, np.floating):
            params[str(name)] = value
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
    return params


def _promote(work: Any, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Give the copy float64 parameters, also where an attribute aliases a params entry."""
    promoted = {}
    for name, value in params.items():
        if value.dtype == np.float64:
            promoted[name] = value
            continue
        new = value.astype(np.float64)
        work.params[name] = new
        for attr, held in list(vars(work).items()):
            if held is value:
                setattr(work, attr, new)
        promoted[name] = new
    return promoted


class _Inputs:
    """The model's input: one array, or a tuple/list of arrays, or a dict of arrays.

    Float arrays become float64 copies that the check may substitute; anything
    else (integer indices, masks, Python values) passes through as given.
    """

    def __init__(self, x: Any) -> None:
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
        self.values: list[Any] = []
        self.floats: list[int] = []
        self.complex: list[int] = []
        for pos, (_, value) in enumerate(items):
            arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
            if arr is not None and np.issubdtype(arr.dtype, np.floating):
                self.values.append(arr.astype(np.float64))
                self.floats.append(pos)
            else:
                if arr is not None and np.issubdtype(arr.dtype, np.complexfloating):
                    self.complex.append(pos)
                self.values.append(copy.deepcopy(value))

    def name(self, pos: int) -> str:
        key = self.keys[pos]
        return "input" if self.kind == "array" else f"input[{key!r}]"

    def build(self, values: list[Any]) -> Any:
        """The input for one evaluation, from fresh copies (a forward may change its input
        in place: the next evaluation must not see that)."""
        values = [v.copy() if isinstance(v, np.ndarray) else copy.deepcopy(v) for v in values]
        if self.kind == "none":
            return None
        if self.kind == "array":
            return values[0]
        if self.kind == "dict":
            return dict(zip(self.keys, values, strict=True))
        return tuple(values) if self.kind == "tuple" else list(values)

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


def build_problem(model: Any, x: Any, y: Any, *, loss: Any, wrt: str, seed: int) -> FlatProblem:
    try:
        work = copy.deepcopy(model)
    except Exception as exc:  # pragma: no cover - exotic models
        raise ModelError(f"cannot copy the model to check it safely: {exc}") from exc
    notes: list[str] = []
    params = _float_params(work, notes)
    original_dtypes = {p.dtype for p in params.values()}
    params = _promote(work, params)
    loss_fn, loss_grad = _loss_pair(loss, y, seed)
    inputs = _Inputs(x)
    for pos in inputs.complex:
        notes.append(
            f"input `{inputs.name(pos)}` is complex and is not checked: gradcheck checks "
            "real inputs (it is passed to the model as it is)"
        )

    layout: list[tuple[str, tuple[int, ...], BlockKind]] = []
    if wrt in ("all", "params"):
        layout += [(name, p.shape, "param") for name, p in params.items() if p.size]
    checked_inputs = {}  # block name -> position in inputs.values
    if wrt in ("all", "inputs"):
        for pos in inputs.floats:
            if inputs.values[pos].size:
                checked_inputs[inputs.name(pos)] = pos
                layout.append((inputs.name(pos), inputs.values[pos].shape, "input"))
    if not layout:
        raise NothingToCheckError(
            f"nothing to check with wrt={wrt!r}: the model has {len(params)} float "
            f"parameters and {len(inputs.floats)} float inputs"
        )
    blocks = block_layout(layout)
    theta0 = np.concatenate(
        [
            (inputs.values[checked_inputs[b.name]] if b.kind == "input" else params[b.name]).ravel()
            for b in blocks
        ],
        out=_memory.empty(sum(b.size for b in blocks)),
    )
    _memory.freeze(theta0)  # the problem keeps it as it is (no second copy)

    rngs = list(_find_rngs(work))
    rng_states = [_rng_state(r) for r in rngs]
    with GLOBAL_STATE:  # what the model's legacy np.random calls draw from, every time
        start_state = np.random.get_state()
    regularization = getattr(work, "regularization", None)

    @contextmanager
    def evaluation(theta: np.ndarray) -> Iterator[Any]:
        """One evaluation: the model's generators and NumPy's global one reset, the
        parameters set to ``theta``; the caller's global generator restored afterwards (under
        the lock that every check holds for that, so that threads do not interleave)."""
        with GLOBAL_STATE:
            global_state = np.random.get_state()
            try:
                np.random.set_state(start_state)
                for rng, state in zip(rngs, rng_states, strict=True):
                    _set_rng_state(rng, copy.deepcopy(state))
                values = list(inputs.values)
                for block in blocks:
                    part = theta[block.slice].reshape(block.shape)
                    if block.kind == "param":
                        np.copyto(params[block.name], part)
                    else:
                        values[checked_inputs[block.name]] = part
                yield inputs.build(values)
            finally:
                np.random.set_state(global_state)

    def total_loss(out: Any) -> float:
        value = loss_fn(np.asarray(out))
        if callable(regularization):
            value += float(regularization())
        return value

    def loss_at(theta: np.ndarray) -> float:
        with evaluation(theta) as x_eval:
            return total_loss(_call("forward", work.forward, x_eval))

    def gradient_at(theta: np.ndarray) -> np.ndarray:
        with evaluation(theta) as x_eval:
            out = np.asarray(_call("forward", work.forward, x_eval))
            dout = loss_grad(out)
            if dout is None:
                raise ModelError(f"loss_grad returned None; expected an array of shape {out.shape}")
            dout = np.asarray(dout, dtype=np.float64)
            if dout.shape != out.shape:
                raise ShapeMismatchError(
                    f"loss_grad returned shape {dout.shape}; the output has shape {out.shape}"
                )
            grads = getattr(work, "grads", None)
            if isinstance(grads, dict):
                for value in grads.values():
                    if isinstance(value, np.ndarray) and value.flags.writeable:
                        value.fill(0.0)
            dx = _call("backward", work.backward, dout)
            grads = getattr(work, "grads", None)
            flat = _memory.empty(theta.size)
            for block in blocks:
                if block.kind == "input":
                    if dx is None:
                        raise ModelError(
                            "backward returned None, so the input gradient cannot be checked; "
                            "return dL/dx from backward or pass wrt='params'"
                        )
                    value = inputs.gradient(dx, checked_inputs[block.name])
                    what = f"the gradient of `{block.name}` returned by backward"
                else:
                    if not isinstance(grads, Mapping) or block.name not in grads:
                        have = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
                        raise ShapeMismatchError(
                            f"model.grads has no entry {block.name!r} after backward; "
                            f"expected the keys of model.params, got {have}"
                        )
                    value = grads[block.name]
                    what = f"model.grads[{block.name!r}]"
                value = _real_array(value, what)
                if value.shape != block.shape:
                    raise ShapeMismatchError(
                        f"{what} has shape {value.shape}; expected {block.shape}"
                    )
                flat[block.slice] = value.reshape(-1)
            return flat

    # (notes holds the complex parameters and inputs left out, from above)
    if any(d != np.float64 for d in original_dtypes):
        names = ", ".join(sorted(str(d) for d in original_dtypes))
        notes.append(f"parameters of dtype {names} were checked on a float64 copy")
    return FlatProblem(
        theta0=theta0,
        loss=loss_at,
        gradient=gradient_at,
        blocks=blocks,
        framework="numpy",
        notes=notes,
        batching="loop",
    )
