"""The JAX adapter's contract hooks: second order, forward mode and batched gradients.

:func:`attach` sets the three optional hooks of a `~gradcheck._problem.FlatProblem` built by
:mod:`gradcheck.adapters.jax` (see the hooks' contract in that class's docstring):

- ``second_order(u)``: the problem of ``u . g(theta)``, ``g = jax.grad(loss)`` (the model's
  own backward: its ``custom_vjp`` bwd rules, the transposes of its ``custom_jvp`` rules),
  whose gradient is ``jax.grad`` of that: the backward differentiated, ``H u``. ``H u`` at
  ``theta0`` is computed when ``second_order(u)`` builds that problem; a backward JAX cannot
  differentiate (a callback without a JVP, a ``custom_vmap``, a ``while_loop`` in the bwd)
  raises `Unavailable` there.
- ``jvp(theta, V)``: ``jax.jvp`` of the loss along every row of ``V`` (vmapped over the
  rows); a model without a forward-mode rule (a ``custom_vjp``, a callback) raises
  `Unavailable` on the first call.
- ``gradient_batch(thetas)``: ``jax.vmap(jax.value_and_grad(loss))`` over the rows (the loss
  and the gradient at each), through the model's batching rules (``custom_vmap``, the
  batching of its ``custom_vjp`` fwd and bwd); a model that cannot be vmapped raises
  `Unavailable` on the first call.

Nothing is traced or compiled until a hook is called, so a first-order check pays nothing.
The hooks trace the model's Python (``of_parts``) again, not the adapter's first-order
program: that program has the custom rules already applied, and differentiating it again
would bypass them. Each hook's programs are ``jax.jit``-ed once per problem and take ``u``
and the rows as arguments (a new ``u`` or new rows compile nothing); rows are evaluated in
chunks whose size is a power of two, bounded by memory (as the loss batch is), so a hook
compiles at most one program per chunk size it sees. A model that cannot be traced (it
branches on values in Python) gets the same hooks evaluated eagerly, row by row, and no
batched gradient.

Public JAX APIs only: ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``, ``jax.jvp``,
``jax.vmap``. Every trace
and evaluation runs inside the adapter's thread-local configuration scope (``scope``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradcheck import _memory
from gradcheck._errors import first_line
from gradcheck._problem import FlatProblem, Unavailable
from gradcheck.errors import GradcheckInputError, ModelError, ShapeMismatchError

__all__ = ["attach"]

#: Rows of one vmapped call, at most (as the adapter's loss batch).
MAX_ROWS = 256
#: Memory one vmapped call may use, roughly (bytes).
MEMORY_BUDGET = 512 * 2**20
#: The ``(rows, P)`` float64 block of one call stays under this many bytes.
ROWS_BUDGET = 32 * 2**20

#: Rough cost of one row of each program, in forward evaluations' memory.
_JVP_COST = 2
_GRAD_COST = 3
_SECOND_ORDER_COST = 6

#: An error JAX raises for a model without a forward-mode rule (a ``custom_vjp``, a callback).
_NO_JVP = re.compile(
    r"can't apply forward-mode|forward-mode autodiff|do(?:es)? not support JVP|"
    r"jvp rule .*not implemented|Differentiation rule for .* not implemented",
    re.IGNORECASE,
)
#: An error JAX raises for a model that cannot be vmapped.
_NO_VMAP = re.compile(
    r"batching rule|vmap_method|vmap is only supported|not supported (?:under|with) vmap|"
    r"cannot be vmapped|vmap",
    re.IGNORECASE,
)

Scope = Callable[[], contextlib.AbstractContextManager[Any]]


def _power_of_two_below(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _power_of_two_above(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


@dataclasses.dataclass
class _Hooks:
    """The hooks of one problem: ``flat(theta) -> loss`` on a flat (traced) vector."""

    flat: Callable[[Any], Any]
    theta0: np.ndarray
    scope: Scope
    traceable: bool
    memory: int
    _programs: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ shared
    @property
    def size(self) -> int:
        return int(self.theta0.size)

    def rows(self, cost: int) -> int:
        """Rows per vmapped call: a power of two within the row and memory budgets."""
        by_memory = MEMORY_BUDGET // max(1, cost * self.memory)
        by_rows = ROWS_BUDGET // (8 * max(1, self.size))
        return _power_of_two_below(min(MAX_ROWS, by_memory, by_rows))

    def program(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per problem (a jitted function: it compiles per chunk shape)."""
        if name not in self._programs:
            self._programs[name] = make()
        return self._programs[name]

    def vector(self, theta: Any, what: str = "theta") -> np.ndarray:
        flat = np.asarray(theta, dtype=np.float64)
        if flat.shape != (self.size,):
            raise ShapeMismatchError(f"{what} must have shape ({self.size},); got {flat.shape}")
        return flat

    def matrix(self, rows: Any, what: str) -> np.ndarray:
        block = np.asarray(rows, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != self.size:
            raise ShapeMismatchError(
                f"{what} needs an array of shape (k, {self.size}); got {block.shape}"
            )
        return block

    def chunked(
        self, rows: np.ndarray, cost: int, call: Callable[[np.ndarray], Any], width: int
    ) -> np.ndarray:
        """``call`` on chunks of at most ``rows(cost)`` rows, each padded to a power of two
        by repeating its last row; the results, ``(k, width)`` (or ``(k,)`` for width 0)."""
        k = rows.shape[0]
        out = np.empty((k, width) if width else (k,), dtype=np.float64)
        if k == 0:
            return out
        chunk = self.rows(cost)
        for start in range(0, k, chunk):
            part = rows[start : start + chunk]
            n = part.shape[0]
            padded = min(chunk, _power_of_two_above(n))
            if padded > n:
                part = np.concatenate([part, np.broadcast_to(part[-1], (padded - n, self.size))])
            out[start : start + n] = np.asarray(call(part), dtype=np.float64)[:n]
        return out

    # ------------------------------------------------------------------ forward mode
    def jvp(self, theta: np.ndarray, directions: np.ndarray) -> np.ndarray:
        theta = self.vector(theta)
        directions = self.matrix(directions, "jvp")
        flat = self.flat

        def along(t: Any, v: Any) -> Any:
            return jax.jvp(flat, (t,), (v,))[1]

        with self.scope():
            if self.traceable:
                batched = self.program("jvp", lambda: jax.jit(jax.vmap(along, in_axes=(None, 0))))
                t = jnp.asarray(theta)
                return self._forward(lambda rows: batched(t, rows), directions, _JVP_COST)
            t = jnp.asarray(theta)
            return self._forward(
                lambda rows: np.array([float(along(t, jnp.asarray(v))) for v in rows]),
                directions,
                1,
            )

    def _forward(
        self, call: Callable[[np.ndarray], Any], directions: np.ndarray, cost: int
    ) -> np.ndarray:
        try:
            return self.chunked(directions, cost, call, 0)
        except (GradcheckInputError, Unavailable):
            raise
        except Exception as exc:
            if _NO_JVP.search(str(exc)):
                raise Unavailable(f"no forward-mode rule: {first_line(exc)}") from exc
            raise ModelError(
                f"the model raised while JAX evaluated its forward-mode derivatives: "
                f"{first_line(exc)}"
            ) from exc

    # ------------------------------------------------------------------ batched gradients
    def gradient_batch(self, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The loss ``(k,)`` and the gradient ``(k, P)`` at every row, one vmapped call."""
        thetas = self.matrix(thetas, "gradient_batch")
        if not self.traceable:
            raise Unavailable(
                "the model branches on values in Python, so it cannot be traced or vmapped"
            )
        flat = self.flat

        def values_and_gradients(rows: Any) -> Any:
            values, gradients = jax.vmap(jax.value_and_grad(flat))(rows)
            return jnp.concatenate([values[:, None], gradients], axis=1)

        with self.scope():
            batched = self.program("gradient_batch", lambda: jax.jit(values_and_gradients))
            try:
                both = self.chunked(thetas, _GRAD_COST, batched, self.size + 1)
            except (GradcheckInputError, Unavailable):
                raise
            except Exception as exc:
                if _NO_VMAP.search(str(exc)) or isinstance(exc, NotImplementedError):
                    raise Unavailable(f"the gradient cannot be vmapped: {first_line(exc)}") from exc
                raise ModelError(
                    f"the model raised while JAX evaluated its vmapped gradient: {first_line(exc)}"
                ) from exc
        return both[:, 0].copy(), both[:, 1:]

    # ------------------------------------------------------------------ second order
    def second_order(self, u: np.ndarray, problem: FlatProblem) -> FlatProblem:
        """The problem of ``u . g(theta)``; its gradient ``H u`` by differentiating ``g``."""
        u = self.vector(u, "u")
        flat = self.flat
        grad = jax.grad(flat)

        def u_dot_g(t: Any, v: Any) -> Any:
            return jnp.vdot(v, grad(t))

        hvp_of = jax.grad(u_dot_g)
        notes: list[str] = []
        with self.scope():
            uj = jnp.asarray(u)
            if self.traceable:
                hvp = self.program("hvp", lambda: jax.jit(hvp_of))
                single = self.program("u_dot_g", lambda: jax.jit(u_dot_g))
            else:
                hvp, single = hvp_of, u_dot_g
            try:
                first = np.asarray(hvp(jnp.asarray(self.theta0), uj), dtype=np.float64)
            except GradcheckInputError:
                raise
            except Exception as exc:
                # (the core's section says "the backward cannot be differentiated: ...")
                raise Unavailable(f"JAX raised differentiating it: {first_line(exc)}") from exc
            max_batch = self.rows(_SECOND_ORDER_COST)
            loss_batch = None
            if self.traceable and max_batch > 1:
                batched = self.program(
                    "u_dot_g_batch", lambda: jax.jit(jax.vmap(u_dot_g, in_axes=(0, None)))
                )
                try:
                    rows = np.broadcast_to(self.theta0, (max_batch, self.size))
                    jax.block_until_ready(batched(rows, uj))
                except Exception as exc:
                    notes.append(
                        f"u . g cannot be vmapped ({first_line(exc)[:120]}); its evaluations "
                        "run one at a time"
                    )
                else:
                    loss_batch = self._padded_batch(batched, uj, max_batch)

        loss: Callable[[np.ndarray], float]
        if loss_batch is not None:
            batch = loss_batch

            def loss(theta: np.ndarray) -> float:  # a padded batch of one: agrees with batch
                return float(batch(self.vector(theta)[None, :])[0])

        else:

            def loss(theta: np.ndarray) -> float:
                with self.scope():
                    try:
                        return float(single(jnp.asarray(self.vector(theta)), uj))
                    except Exception as exc:
                        raise ModelError(
                            f"the model raised while JAX evaluated u . g: {first_line(exc)}"
                        ) from exc

        pending = [first]

        def gradient(theta: np.ndarray) -> np.ndarray:
            theta = self.vector(theta)
            if pending and np.array_equal(theta, self.theta0):
                return pending.pop().copy()
            with self.scope():
                try:
                    value = hvp(jnp.asarray(theta), uj)
                except Exception as exc:
                    raise ModelError(
                        f"the model raised while JAX differentiated its backward: {first_line(exc)}"
                    ) from exc
                out = _memory.empty(self.size)
                out[:] = np.asarray(value, dtype=np.float64)
                return out

        return FlatProblem(
            theta0=problem.theta0,
            loss=loss,
            gradient=gradient,
            blocks=problem.blocks,
            loss_batch=loss_batch,
            max_batch=max_batch if loss_batch is not None else 1,
            precision=problem.precision,
            framework=problem.framework,
            notes=notes,
            skipped=list(problem.skipped),
            batching=("vmap" if loss_batch is not None else "loop") if self.traceable else "eager",
        )

    def _padded_batch(
        self, batched: Any, uj: Any, max_batch: int
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``loss_batch`` of ``u . g`` over any number of rows, padded to ``max_batch``."""

        def loss_batch(thetas: np.ndarray) -> np.ndarray:
            thetas = self.matrix(thetas, "loss_batch")
            out = np.empty(thetas.shape[0], dtype=np.float64)
            with self.scope():
                for start in range(0, thetas.shape[0], max_batch):
                    chunk = thetas[start : start + max_batch]
                    k = chunk.shape[0]
                    if k < max_batch:
                        pad = np.broadcast_to(self.theta0, (max_batch - k, self.size))
                        chunk = np.concatenate([chunk, pad])
                    try:
                        values = batched(chunk, uj)
                    except Exception as exc:
                        raise ModelError(
                            f"the model raised while JAX evaluated u . g: {first_line(exc)}"
                        ) from exc
                    out[start : start + k] = np.asarray(values, dtype=np.float64)[:k]
            return out

        return loss_batch


def attach(
    problem: FlatProblem,
    of_parts: Callable[[Sequence[Any]], Any],
    split: Callable[[Any], list[Any]],
    scope: Scope,
    *,
    traceable: bool = True,
    memory: int | None = None,
) -> FlatProblem:
    """Set ``problem``'s ``second_order``, ``jvp`` and ``gradient_batch`` hooks (in place;
    returned for convenience). ``of_parts``: the model's loss of its blocks (the model's
    Python); ``split``: a flat vector to blocks; ``scope``: the adapter's configuration
    scope; ``traceable``: False for a model that can only run eagerly; ``memory``: bytes one
    forward evaluation needs, roughly (bounds the rows of a vmapped call)."""
    hooks = _Hooks(
        flat=lambda theta: of_parts(split(theta)),
        theta0=problem.theta0,
        scope=scope,
        traceable=traceable,
        memory=memory if memory is not None else 8 * problem.size,
    )
    problem.second_order = lambda u: hooks.second_order(u, problem)
    problem.jvp = hooks.jvp
    problem.gradient_batch = hooks.gradient_batch
    return problem
