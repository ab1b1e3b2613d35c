"""The torch adapter's contracts beyond the first-order reverse-mode gradient.

`attach` sets three hooks of a `FlatProblem` built by `gradcheck.adapters.torch`, all
evaluating on the adapter's `_Evaluator` (its copy of the user's module, under its
``_evaluating`` context: `GLOBAL_STATE` held, normal mode, the RNG reset, buffers restored):

* ``second_order(u)``: the problem of ``u . g(theta)``, ``g`` the gradient as the model's
  backward computes it; its gradient ``H u`` differentiates that backward
  (``torch.autograd.grad(..., create_graph=True)``, then the gradient of ``sum(u_b * g_b)``).
  The first gradient is seeded with a ``grad_output`` that requires grad, as
  ``torch.autograd.gradgradcheck`` does, so a backward marked ``@once_differentiable``
  leaves its mark in the graph and is reported (`Unavailable`) instead of differentiating
  silently to zero.
* ``jvp(theta, V)``: forward-mode directional derivatives. ``torch.func.vmap`` over
  ``torch.func.jvp`` where the model allows it (checked against one-at-a-time
  ``torch.autograd.forward_ad`` on two directions, once), else one direction at a time with
  ``torch.autograd.forward_ad``, which also runs classic ``autograd.Function``s (``forward``
  taking ``ctx``) that define ``jvp``.
* ``gradient_batch(thetas)``: the loss and the gradient at every row in one
  ``torch.func.vmap(torch.func.grad_and_value(loss))`` call, through the model's batching
  rules (a Function's ``vmap`` staticmethod or ``generate_vmap_rule``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
from gradcheck.adapters.torch import (
    CPU_BATCH_BUDGET,
    MAX_VMAP_BATCH,
    _bytes_per_evaluation,
    _Evaluator,
    _LazyChoice,
    _normal_mode,
    _Raised,
    flat_gradient,
)
from torch.autograd.function import BackwardCFunction, once_differentiable

from gradcheck._errors import first_line
from gradcheck._problem import FlatProblem, Unavailable
from gradcheck.errors import GradcheckInputError

__all__ = ["attach"]

# The node torch puts after a backward marked @once_differentiable when the gradient it
# computes is itself to be differentiated: running it raises; nothing else runs it.
_ERROR_NODE = "torch::autograd::Error"
# Errors that say torch has no rule to differentiate the backward (not a bug of the model's).
_NO_DOUBLE_BACKWARD = re.compile(
    r"once_differentiable|differentiate twice|not implemented|double backward|"
    r"does not require grad|does not have a grad_fn",
    re.IGNORECASE,
)
# torch's words for an op it cannot differentiate in forward mode (not a bug of the model's;
# a Function without jvp is found by `_functions_lacking`): anything else a forward-mode
# evaluation raises is the model's error (a jvp that returns the wrong shape, or raises).
_NO_FORWARD_RULE = re.compile(
    r"forward AD with \S+ that does not support it|is not implemented for forward|"
    r"derivative for .* is not implemented",
    re.IGNORECASE,
)
# torch's words for what torch.func.vmap cannot run (an op without a batching rule, .item(),
# in-place updates of captured buffers, randomness across a batch): anything else is the
# model's error (a vmap staticmethod that returns the wrong out_dims, or raises).
_NO_BATCHING = re.compile(
    r"batching rule not implemented|vmap: we do not yet support|\.item\(\)|"
    r"vmap does not currently support|got a batched tensor as input|"
    r"doesn't have storage|data-dependent|in-place operation|inplace",
    re.IGNORECASE,
)
_JIT_DEPRECATED = r"`torch\.jit\.script` is deprecated"
# The least memory a row of a vmapped call is assumed to take.
_MIN_BYTES_PER_ROW = 64 * 2**10


@contextlib.contextmanager
def _forward_mode(ev: _Evaluator) -> Iterator[None]:
    """One forward-mode evaluation's context: the evaluator's (no autograd needed), and
    torch's one-off warning when forward AD first loads its decompositions (it scripts them
    with the deprecated ``torch.jit.script``) kept from the caller, who did not call it."""
    with ev._evaluating(grad=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", _JIT_DEPRECATED, DeprecationWarning)
        yield


def attach(problem: FlatProblem, ev: _Evaluator) -> None:
    """Set ``problem``'s ``second_order``, ``jvp`` and ``gradient_batch`` hooks (in place)."""
    batched = _Batched(ev)
    problem.second_order = _SecondOrder(ev, problem, batched).build
    problem.jvp = _Forward(ev).jvp
    problem.gradient_batch = batched.gradient_batch


def _model_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the user's errors raised as `ModelError` saying where they came from."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except _Raised as exc:
            raise exc.model_error("during the check") from exc.exc

    return call


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    out: np.ndarray = t.detach().to("cpu", torch.float64).numpy()
    return out


def _rows(ev: _Evaluator, thetas: np.ndarray) -> torch.Tensor:
    """``thetas`` (2-D) as a tensor in the model's dtype and device, made in normal mode."""
    arr = np.array(np.atleast_2d(thetas), dtype=np.float64, order="C", copy=True)
    with _normal_mode(False):
        return torch.from_numpy(arr).to(device=ev.spec.device, dtype=ev.dtype)


def _functional(ev: _Evaluator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss as a function of one row tensor: the copy's checked parameters and the
    checked inputs substituted by views of the row (``functional_call``), as
    ``_Evaluator.values_vmap`` does; fit for ``torch.func`` transforms and dual tensors."""
    n_params = len(ev.param_names)

    def loss(row: torch.Tensor) -> torch.Tensor:
        views = ev._views(row)
        leaves = ev._leaves([v.clone() for v in views[n_params:]])
        if ev.scope is None:
            return ev._objective(leaves, grad=True)
        params = dict(ev.user_tensors)
        for name, view in zip(ev.param_names, views[:n_params], strict=True):
            params[f"model.{name}"] = view
            if ev.user_tensors:
                params[f"user.{name}"] = view
        value: torch.Tensor = ev._run(params, lambda: ev._objective(leaves, grad=True))
        return value

    return loss


def _flat(ev: _Evaluator, grads: list[Any]) -> np.ndarray:
    """Per-block gradients (None for zeros) as one float64 vector."""
    return flat_gradient(ev.sizes, grads)


def _chunk_rows(ev: _Evaluator) -> int:
    """Rows per vmapped call: the memory of one evaluation against the CPU budget."""
    used = _bytes_per_evaluation(lambda: ev.values_loop(ev.theta0[None, :]))
    per_row = max(_MIN_BYTES_PER_ROW, 2 * (used or 64 * 8 * ev.size) + 8 * ev.size)
    return int(max(1, min(MAX_VMAP_BATCH, CPU_BATCH_BUDGET // per_row)))


# --------------------------------------------------------------------------- second order
def _graph_nodes(roots: list[Any]) -> list[Any]:
    found: list[Any] = []
    seen: set[int] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


_ONCE_CODE = once_differentiable(lambda ctx, *grads: grads).__code__


def _function_names(value: torch.Tensor, *, once: bool) -> list[str]:
    """The custom ``autograd.Function``s in ``value``'s graph (only those whose backward is
    marked ``@once_differentiable`` if ``once``), by name."""
    names: list[str] = []
    for node in _graph_nodes([value.grad_fn]):
        if not isinstance(node, BackwardCFunction):
            continue
        cls = getattr(type(node), "_forward_cls", None)
        backward = getattr(cls, "backward", None)
        marked = getattr(backward, "__code__", None) is _ONCE_CODE
        if once and not marked:
            continue
        node_name = str(type(node).__name__)  # "<Function>Backward"
        name = getattr(cls, "__name__", None) or re.sub(r"Backward$", "", node_name)
        if name not in names:
            names.append(name)
    return names


def _lacks(cls: Any, method: str) -> bool:
    """Whether the ``autograd.Function`` ``cls`` lacks ``method``: "jvp", "setup_context"
    (classic style: no torch.func transform runs it), or "vmap" (nor generate_vmap_rule)."""
    base = torch.autograd.Function
    if method == "vmap" and getattr(cls, "generate_vmap_rule", False):
        return False
    return getattr(cls, method, None) is getattr(base, method)


def _functions_lacking(ev: _Evaluator, row: torch.Tensor, method: str) -> list[str]:
    """The custom ``autograd.Function``s in the model's graph at ``row`` that lack ``method``
    (see `_lacks`), by name; empty where the graph cannot be had."""
    try:
        with ev._evaluating(grad=True):
            ev._load(row)
            leaves = ev._leaves([v.detach().clone().requires_grad_(True) for v in ev.input_views])
            value: torch.Tensor = ev._run(ev.user_tensors, lambda: ev._objective(leaves, grad=True))
    except Exception:
        return []
    names: list[str] = []
    for node in _graph_nodes([value.grad_fn]):
        cls = getattr(type(node), "_forward_cls", None)
        if not isinstance(node, BackwardCFunction) or cls is None:
            continue
        if _lacks(cls, method) and cls.__name__ not in names:
            names.append(cls.__name__)
    return names


def _batching_reason(ev: _Evaluator, row: torch.Tensor, cause: BaseException) -> str | None:
    """Why ``torch.func.vmap`` cannot run the model, naming the Functions where it can; None
    when the model has the rules it needs and one of them raised (``cause`` is its error)."""
    classic = _functions_lacking(ev, row, "setup_context")
    if classic:
        return (
            f"no batching rule: autograd.Function {', '.join(classic)} has no setup_context "
            "staticmethod (torch.func transforms need it)"
        )
    unbatched = _functions_lacking(ev, row, "vmap")
    if unbatched:
        return (
            f"no batching rule: autograd.Function {', '.join(unbatched)} has neither a vmap "
            "staticmethod nor generate_vmap_rule=True"
        )
    if _NO_BATCHING.search(str(cause)):
        return f"torch.func.vmap cannot run the model: {first_line(cause)}"
    return None


class _SecondOrder:
    """Builds the problem of ``u . g(theta)`` and its gradient ``H u`` (see the module)."""

    def __init__(self, ev: _Evaluator, first: FlatProblem, batched: _Batched) -> None:
        self._ev = ev
        self._first = first
        self._batched = batched

    def build(self, u: np.ndarray) -> FlatProblem:
        ev = self._ev
        u = np.array(u, dtype=np.float64, copy=True).reshape(-1)
        if u.size != ev.size:
            raise GradcheckInputError(f"u must have {ev.size} entries; got {u.size}")
        u.setflags(write=False)
        with _normal_mode(False):  # not inference tensors, whatever the caller's mode
            us = [
                torch.from_numpy(np.array(u[b.slice]).reshape(b.shape)).to(
                    device=ev.spec.device, dtype=ev.dtype
                )
                for b in ev.blocks
            ]
        try:
            hu0 = self._hvp(us, ev.theta0)
        except _Raised as exc:
            raise exc.model_error("at the starting point") from exc.exc
        cache: list[np.ndarray | None] = [hu0]
        lock = threading.Lock()

        def loss(theta: np.ndarray) -> float:
            g, _ = ev.gradient_and_loss(np.asarray(theta, dtype=np.float64))
            return float(np.dot(u, g))

        def gradient(theta: np.ndarray) -> np.ndarray:
            theta = np.asarray(theta, dtype=np.float64)
            with lock:
                if cache[0] is not None and (
                    theta is ev.theta0 or np.array_equal(theta, ev.theta0)
                ):
                    hu, cache[0] = cache[0], None
                    return hu
            return self._hvp(us, theta)

        first = self._first
        looped = FlatProblem(
            theta0=ev.theta0,
            loss=_model_errors(loss),
            gradient=_model_errors(gradient),
            blocks=ev.blocks,
            loss_batch=None,
            precision=first.precision,
            framework=first.framework,
            notes=list(first.notes),
            skipped=list(first.skipped),
            batching="loop",
        )
        looped.prepare = _LazyValues(looped, self._batched, u, loss).prepare
        return looped

    def _hvp(self, us: list[torch.Tensor], theta: np.ndarray) -> np.ndarray:
        """``H u`` at ``theta``: the gradient of ``sum(u_b * g_b)``, ``g`` by the backward
        with ``create_graph=True``."""
        ev = self._ev
        row = _rows(ev, theta)[0]
        with ev._evaluating(grad=True):
            ev._load(row)
            inputs = [v.detach().clone().requires_grad_(True) for v in ev.input_views]
            leaves = ev._leaves([t.clone() for t in inputs])
            targets: list[torch.Tensor] = [*ev.params, *inputs]

            def body() -> list[Any]:
                value = ev._objective(leaves, grad=True)
                if not value.requires_grad:
                    return [None] * len(targets)
                # a grad_output that requires grad, as gradgradcheck's: a once-differentiable
                # backward then leaves an Error node in the graph of g
                seed = torch.ones_like(value).requires_grad_(True)
                try:
                    g = torch.autograd.grad(
                        value, targets, grad_outputs=seed, create_graph=True, allow_unused=True
                    )
                except GradcheckInputError:
                    raise
                except Exception as exc:
                    if ev._use_backward:  # the first order fell back to .backward() too
                        raise Unavailable(
                            "the gradient runs only under .backward() (torch.autograd.grad "
                            f"raised {first_line(exc)}), which cannot be differentiated again"
                        ) from exc
                    raise _Raised("backward", exc) from exc
                roots = [t.grad_fn for t in g if t is not None]
                if any(node.name() == _ERROR_NODE for node in _graph_nodes(roots)):
                    raise Unavailable(self._once_message(value))
                dot: torch.Tensor | None = None
                for gb, ub in zip(g, us, strict=True):
                    if gb is None or not gb.requires_grad:
                        continue
                    term = (gb * ub).sum()
                    dot = term if dot is None else dot + term
                if dot is None:
                    return [None] * len(targets)
                try:
                    hu = torch.autograd.grad(dot, targets, allow_unused=True)
                except GradcheckInputError:
                    raise
                except Exception as exc:
                    if _NO_DOUBLE_BACKWARD.search(str(exc)):
                        raise Unavailable(
                            f"differentiating the backward, torch raised {first_line(exc)}"
                        ) from exc
                    raise _Raised("backward", exc) from exc
                return list(hu)

            grads: list[Any] = ev._run(ev.user_tensors, body)
        return _flat(ev, grads)

    @staticmethod
    def _once_message(value: torch.Tensor) -> str:
        marked = _function_names(value, once=True)
        if marked:
            return f"autograd.Function {', '.join(marked)} is marked @once_differentiable"
        found = _function_names(value, once=False)
        among = f" (custom Functions in the model: {', '.join(found)})" if found else ""
        return f"a backward in the model is marked @once_differentiable{among}"


class _LazyValues(_LazyChoice):
    """The second-order problem's values ``u . g`` at many rows in one vmapped call
    (``gradient_batch``), chosen as the first-order problem's batching is
    (`gradcheck.adapters.torch._LazyBatching`): only for a check expecting `VMAP_FROM`
    evaluations or more, and only where the vmapped values agree with the loop's at two
    points; otherwise (or for fewer evaluations) the problem as built, one row at a time."""

    def __init__(
        self,
        looped: FlatProblem,
        batched: _Batched,
        u: np.ndarray,
        loss: Callable[[np.ndarray], float],
    ) -> None:
        super().__init__(looped)
        self._batched = batched
        self._u = u
        self._loss = loss

    def _values(self, thetas: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._batched.gradient_batch(thetas)[1] @ self._u
        return out

    def _choose(self) -> FlatProblem:
        looped = self._looped
        theta0 = looped.theta0
        rows = np.stack([theta0, theta0 * (1.0 + 1e-3) + 1e-3])
        try:
            batched = self._values(rows)
        except Exception:  # no batching rule (or vmap cannot run it): one row at a time
            return dataclasses.replace(looped, prepare=None)
        single = np.array([self._loss(row) for row in rows])
        rtol = 1e-10 if looped.precision == "float64" else 1e-4
        scale = max(1.0, float(np.max(np.abs(single))))
        if not np.allclose(batched, single, rtol=rtol, atol=rtol * scale):
            return dataclasses.replace(looped, prepare=None)
        return dataclasses.replace(
            looped,
            loss_batch=_model_errors(self._values),
            max_batch=MAX_VMAP_BATCH,
            batching="vmap",
            prepare=None,
        )


# --------------------------------------------------------------------------- forward mode
class _Forward:
    """Directional derivatives by forward-mode AD (see the module)."""

    def __init__(self, ev: _Evaluator) -> None:
        self._ev = ev
        self._loss = _functional(ev)
        self._lock = threading.Lock()
        self._how: str | None = None  # "vmap" or "loop", chosen at the first call
        self._missing: str | None = None  # why forward mode is unavailable, once found
        self._chunk = 1

    def jvp(self, theta: np.ndarray, directions: np.ndarray) -> np.ndarray:
        try:
            return self._jvp(theta, directions)
        except _Raised as exc:
            raise exc.model_error("during the check") from exc.exc

    def _jvp(self, theta: np.ndarray, directions: np.ndarray) -> np.ndarray:
        ev = self._ev
        V = np.atleast_2d(np.asarray(directions, dtype=np.float64))
        if V.shape[1] != ev.size:
            raise GradcheckInputError(
                f"directions must have {ev.size} columns; got an array of shape {V.shape}"
            )
        if V.shape[0] == 0:
            return np.zeros(0)
        row = _rows(ev, np.asarray(theta, dtype=np.float64))[0]
        with self._lock:
            if self._missing is not None:  # found at an earlier call: the same answer
                raise Unavailable(self._missing)
            if self._how is None:
                try:
                    self._how = self._choose(row, V)
                except Unavailable as exc:
                    self._missing = str(exc)
                    raise
        out = np.empty(V.shape[0])
        step = self._chunk if self._how == "vmap" else V.shape[0]
        for start in range(0, V.shape[0], step):
            part = _rows(ev, V[start : start + step])
            if self._how == "vmap":
                out[start : start + step] = _to_numpy(self._vectorized(row, part))
            else:
                out[start : start + step] = self._looped(row, part)
        return out

    def _choose(self, row: torch.Tensor, V: np.ndarray) -> str:
        """vmap over ``torch.func.jvp`` if it runs and agrees with forward_ad on two
        directions; else forward_ad one direction at a time; `Unavailable` if neither runs."""
        ev = self._ev
        probe = _rows(ev, V[:2] if V.shape[0] >= 2 else np.vstack([V, 0.5 * V]))
        try:
            looped = self._looped(row, probe)
        except GradcheckInputError:
            raise
        except Exception as exc:
            cause = exc.exc if isinstance(exc, _Raised) else exc
            if isinstance(exc, _Raised) and exc.where != "forward":
                raise  # the loss callable raised: the model's error, whatever the mode
            lacking = _functions_lacking(ev, row, "jvp")
            if lacking:
                which = f"autograd.Function {', '.join(lacking)} defines no jvp"
                raise Unavailable(f"no forward-mode rule: {which}") from cause
            if isinstance(cause, NotImplementedError) or _NO_FORWARD_RULE.search(str(cause)):
                raise Unavailable(f"no forward-mode rule: {first_line(cause)}") from cause
            raise _Raised("jvp", cause) from cause
        try:
            batched = _to_numpy(self._vectorized(row, probe))
        except GradcheckInputError:
            raise
        except Exception:  # what torch.func cannot run (a classic Function), forward_ad can
            return "loop"
        scale = max(1.0, float(np.max(np.abs(looped))))
        rtol = 1e-10 if ev.dtype == torch.float64 else 1e-4
        if not np.allclose(batched, looped, rtol=rtol, atol=rtol * scale):
            return "loop"
        self._chunk = _chunk_rows(ev)
        return "vmap"

    def _vectorized(self, row: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        ev = self._ev
        loss = self._loss

        def one(tangent: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(loss, (row,), (tangent,))[1]

        with _forward_mode(ev):
            ev._load(None)
            result: torch.Tensor = torch.func.vmap(one, randomness="same")(tangents)
        return result

    def _looped(self, row: torch.Tensor, tangents: torch.Tensor) -> np.ndarray:
        ev = self._ev
        out = np.empty(tangents.shape[0])
        with _forward_mode(ev):
            for i, tangent in enumerate(tangents):
                ev._load(None)
                with fwad.dual_level():
                    value = self._loss(fwad.make_dual(row, tangent))
                    derivative = fwad.unpack_dual(value).tangent
                out[i] = 0.0 if derivative is None else float(derivative.item())
        return out


# --------------------------------------------------------------------------- batched
class _Batched:
    """The loss and gradient at many rows in one ``torch.func.vmap`` call."""

    def __init__(self, ev: _Evaluator) -> None:
        self._ev = ev
        self._loss = _functional(ev)
        self._lock = threading.Lock()
        self._chunk: int | None = None

    def gradient_batch(self, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._gradient_batch(thetas)
        except _Raised as exc:
            raise exc.model_error("during the check") from exc.exc

    def _gradient_batch(self, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ev = self._ev
        T = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
        if T.shape[1] != ev.size:
            raise GradcheckInputError(
                f"thetas must have {ev.size} columns; got an array of shape {T.shape}"
            )
        with self._lock:
            if self._chunk is None:
                self._chunk = _chunk_rows(ev)
        out = np.empty(T.shape)
        values = np.empty(T.shape[0])
        grad = torch.func.grad_and_value(self._loss)
        for start in range(0, T.shape[0], self._chunk):
            rows = _rows(ev, T[start : start + self._chunk])
            try:
                with ev._evaluating(grad=True):
                    ev._load(None)
                    result, value = torch.func.vmap(grad, randomness="same")(rows)
            except GradcheckInputError:
                raise
            except Exception as exc:  # what runs one row at a time but not under vmap
                cause = exc.exc if isinstance(exc, _Raised) else exc
                why = _batching_reason(ev, rows[0], cause)
                if why is None:  # a batching rule the model has, raising: its error
                    raise _Raised("vmap", cause) from cause
                raise Unavailable(why) from cause
            out[start : start + rows.shape[0]] = _to_numpy(result)
            values[start : start + rows.shape[0]] = _to_numpy(value)
        return values, out
