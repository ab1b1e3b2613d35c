"""The JAX adapter's only use of JAX internals: a traced program evaluated op by op.

:mod:`gradcheck.adapters.jax` uses public JAX APIs only (``jax.jit(...).trace``,
``jax.value_and_grad``, ``jax.vmap``, ``Lowered.as_text``/``compile``, eager calls), plus
this module's interface: :func:`interpreter_ok` and :class:`Evaluator`.

Internal APIs used here, and nowhere else in gradcheck:

- the structure of a jaxpr. ``jax.stages.Traced.jaxpr`` is public, but what it returns
  (``ClosedJaxpr``, ``Jaxpr``, ``JaxprEqn``, ``Var``: :mod:`jax.extend.core`) has no
  compatibility promise: ``closed.consts``, ``jaxpr.constvars``/``invars``/``outvars``/
  ``eqns``, each equation's ``primitive``, ``params``, ``invars``, ``outvars`` and ``ctx``
  (``eqn.ctx.manager``, the context JAX binds the equation in), and ``var.aval``'s
  ``shape`` and ``dtype``; jaxprs nested in parameters are found by duck typing;
- ``jax.extend.core.Literal`` (``jax.core.Literal`` on older JAX), to tell a constant
  written into the program from a variable;
- ``Primitive.get_bind_params``, ``Primitive.bind`` and ``Primitive.multiple_results``:
  each equation is applied to concrete arrays as JAX's own ``jaxpr_as_fun`` does;
- primitive and parameter names, as strings: ``transpose`` (``permutation``),
  ``dot_general`` (``dimension_numbers``), ``custom_vjp_call`` and ``custom_jvp_call``
  (``call_jaxpr``), ``while`` and ``scan``.

What it buys: the model's ``value_and_grad`` program is traced once per check; the
public path then compiles it, and the loss alone, with ``jax.jit`` (a few hundred
milliseconds, seconds for a solver), which a check of a few evaluations never repays.
Run op by op, every primitive is one eager XLA call that JAX compiles once per shape
and caches across checks. Measured (jax 0.10.2, 2 shared CPUs, op by op against the
public path alone): fast mode on the million-parameter MLPs of ``benchmarks/scale.py``,
9.7 against 43 T_fb (``--sizes 1e6``) and 10.8 against 33 T_fb (``--widths
32,981,981,4``), T_fb being one jitted forward+backward (about 10 ms); a check of a
96-entry MLP in a running session, 0.012 s against 0.40 s in fast mode and 0.2 s against
0.5 s in full mode (195 evaluations). Not in a fresh process: the first check there
costs about 2 s op by op against 0.7 s compiled (the probe, about 0.3 s, and the first
eager call of each primitive, which JAX compiles). Folding a ``transpose`` into the
``dot_general`` that reads it (as a compile would) took a loss evaluation of the first
MLP from 4.1 to 2.3 ms.

The same reading of the jaxpr gives the facts the adapter needs about the program:
the narrowest floating-point type it computes in (:meth:`Evaluator.lowest_floats`),
whether its forward pass loops (:meth:`Evaluator.has_loops`) and a bound on one
evaluation's memory (:meth:`Evaluator.bytes_per_evaluation`). The public path reads the
same facts from the program's StableHLO text instead (``Lowered.as_text()``, public),
which it has anyway from its compile: JAX documents what a jaxpr's equations hold, but
not as an API, so only this module, behind its probe, relies on them.

When it is used: only after :func:`interpreter_ok`, a probe run once per process, has
found that the evaluator gives what JAX's public path gives (a ``jax.jit``-compiled
``value_and_grad``, and values worked out in NumPy) on a program with every construct
it treats specially, and that its reading of that program's facts is right; and only
for a model whose program it evaluated at the starting point without error. Anything
it raises later, in a real check, switches that problem to the public path for good
(:mod:`gradcheck.adapters.jax`). This module imports nothing that can fail on another
JAX: a missing internal makes the probe fail, not the import.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Evaluator", "interpreter_ok"]

JaxLiteral: Any
try:  # public in jax.extend.core in recent jax; jax.core before
    from jax.extend.core import Literal as JaxLiteral
except ImportError:  # pragma: no cover - older or newer jax
    try:
        from jax.core import Literal as JaxLiteral  # type: ignore[attr-defined,no-redef]
    except ImportError:
        JaxLiteral = None  # the probe then fails: the adapter runs compiled

#: primitives that loop (a solver, an ODE integrator)
_LOOPS = frozenset({"while", "scan"})


# --------------------------------------------------------------------------- reading jaxprs
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


# --------------------------------------------------------------------------- op by op
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
        if JaxLiteral is None:
            raise NotImplementedError("this JAX has no jax.extend.core.Literal")
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


# --------------------------------------------------------------------------- the interface
class Evaluator:
    """The loss and the gradient of one traced ``value_and_grad`` program, op by op.

    ``traced``: ``jax.jit(jax.value_and_grad(f)).trace(avals)`` of ``f(parts) -> scalar``
    with ``blocks`` parts. :meth:`loss` runs only the equations the value needs,
    :meth:`gradient` those the gradient needs. Both take and return lists of arrays, work
    on concrete arrays and under ``jax.jit``/``jax.vmap`` tracing alike, and raise
    whatever the evaluation raises: the caller decides what a failure means.
    """

    def __init__(self, traced: Any, blocks: int) -> None:
        closed = traced.jaxpr
        self._loss = _OpByOp(closed, outputs=[0])
        self._gradient = _OpByOp(closed, outputs=range(1, blocks + 1))

    def loss(self, parts: Sequence[Any]) -> Any:
        return self._loss(*parts)[0]

    def gradient(self, parts: Sequence[Any]) -> list[Any]:
        return self._gradient(*parts)

    def lowest_floats(self) -> dict[str, str | None]:
        """The narrowest floating-point type below float64 computed in the forward pass,
        and in the rest of the gradient; None where there is none."""
        forward = self._loss.eqns
        kept = {id(eqn) for eqn in forward}
        rest = [eqn for eqn in self._gradient.eqns if id(eqn) not in kept]
        return {"forward pass": _lowest_float(forward), "gradient": _lowest_float(rest)}

    def has_loops(self) -> bool:
        """Whether the forward pass has a loop (``while_loop``, ``scan``)."""
        return _has_loops(self._loss.eqns)

    def bytes_per_evaluation(self, size: int) -> int:
        """A rough upper bound on one forward evaluation's memory (``size`` parameters)."""
        return _bytes_per_evaluation(self._loss.eqns, size)


_PROBED: dict[str, bool] = {}
_PROBE_LOCK = threading.Lock()


def interpreter_ok() -> bool:
    """Whether the op-by-op evaluator gives what JAX's public path gives, on this JAX.

    Probed once per process on a small program with every construct the evaluator
    handles specially: transposes folded into products (and composed), ``custom_vjp``
    and ``custom_jvp`` calls evaluated in line, nested ``jit``, a float32 cast, and
    outputs that are literals, constants, inputs passed straight through and one
    variable twice, against ``jax.jit`` of the same function and NumPy; its reading of
    the program's precision, loops and memory is checked too. Any difference or error
    and the adapter uses compiled programs (``jax.jit``) instead.
    """
    with _PROBE_LOCK:
        if "ok" not in _PROBED:
            try:
                # the configuration every check runs in (x64 on, full matmul precision)
                from .jax import _scope

                with _scope():
                    _PROBED["ok"] = _probe()
            except Exception:  # an interpreter that raises is an interpreter not to use
                _PROBED["ok"] = False
        return _PROBED["ok"]


def _probe() -> bool:
    """Run :class:`Evaluator` on a small ``value_and_grad`` program with every construct it
    treats specially and compare with JAX's public path (``jax.jit`` of the same function)
    and with the values worked out in NumPy (one small compile: the evaluator runs under
    ``jax.jit`` next to the public path); then check what it reads of the program (its
    float32 values, a loop in another, traced only: loops are bound as they are, so JAX
    itself evaluates them)."""

    @jax.custom_vjp
    def dense(w: Any, h: Any) -> Any:
        return h @ w.T

    dense.defvjp(lambda w, h: (h @ w.T, (w, h)), lambda r, g: (g.T @ r[1], g @ r[0]))

    def loss(parts: list[Any]) -> Any:
        w, h, a, unused = parts
        z = jax.nn.relu(dense(w, h)) + jnp.transpose(jnp.transpose(h @ w.T))  # custom_jvp
        z = jax.jit(jnp.sin)(z)
        narrow = (a * 2.0).astype(jnp.float32).astype(jnp.float64) * a  # float32 both ways
        return jnp.sum(z * z) * a + narrow + jax.lax.stop_gradient(unused) * 0.0

    def both(parts: list[Any]) -> Any:
        w, h, a, _ = parts
        # outputs that are literals, constants, inputs passed through, one variable twice
        return jax.value_and_grad(loss)(parts), (w, w, 2.0, jnp.arange(2.0), a, h @ w.T)

    w, h = np.array([[0.3, -1.2], [0.8, 0.5]]), np.array([[1.1, 0.4], [-0.7, 0.9]])
    a = 0.7
    m = h @ w.T
    z = np.sin(np.maximum(m, 0.0) + m)
    dm = 2 * a * z * np.cos(np.maximum(m, 0.0) + m) * ((m > 0) + 1.0)
    narrow, back = float(np.float32(2 * a)), 2 * float(np.float32(a))
    value = a * np.sum(z * z) + narrow * a
    want = [value, dm.T @ h, dm @ w, np.sum(z * z) + narrow + back, 0.0]
    want += [w, w, 2.0, np.arange(2.0), a, m]
    parts = [jnp.asarray(v, dtype=jnp.float64) for v in (w, h, a, 1.0)]
    traced = jax.jit(both).trace(parts)
    every = _OpByOp(traced.jaxpr)
    evaluator = Evaluator(traced, 4)

    def run(*args: Any) -> Any:
        public = jax.tree_util.tree_leaves(both(list(args)))
        return [*every(*args), evaluator.loss(args), *evaluator.gradient(args), *public]

    got = jax.jit(run)(*parts)
    expected = [*want, want[0], *want[1:5], *want]
    values_agree = len(got) == len(expected) and all(
        np.shape(g) == np.shape(v) and np.allclose(g, v, rtol=1e-12, atol=1e-14)
        for g, v in zip(got, expected, strict=True)
    )

    def looped(v: Any) -> Any:
        return jnp.sum(jax.lax.scan(lambda c, _: (jnp.sin(c), None), v, length=2)[0])

    loops = Evaluator(jax.jit(jax.value_and_grad(looped)).trace(parts[1]), 1)
    plain = Evaluator(jax.jit(jax.value_and_grad(jnp.sum)).trace(parts[1]), 1)
    facts_agree = (
        evaluator.lowest_floats() == {"forward pass": "float32", "gradient": "float32"}
        and plain.lowest_floats() == {"forward pass": None, "gradient": None}
        and loops.has_loops()
        and not evaluator.has_loops()
        and evaluator.bytes_per_evaluation(9) > 8 * 9 + 8 * m.size
    )
    return values_agree and facts_agree
