"""The contracts beyond the first-order gradient, each checked by the one judge.

A check covers the contracts a user asks for (`gradcheck.check_gradients`' ``order``,
``forward`` and ``batched``); each becomes a problem the core already knows how to judge, or a
comparison of two analytic computations (rule 6 of `gradcheck._verdict`), through the hooks an
adapter puts on its `FlatProblem`:

- *second order*: ``u . g(theta)``, ``g`` the model's own gradient and ``u`` a fixed random
  vector, is a scalar loss of ``theta`` whose gradient (``H u``) the adapter gets by
  differentiating the backward: a first-order problem of its own (``second_order``), checked
  by `run_check` in the same mode as the gradient, so it scales as the first order does;
- *forward mode*: in full mode, the forward-mode derivative along each coordinate (``jvp``
  over identity rows) is the gradient of a problem checked by `run_check` against the same
  numerical derivatives; in fast mode (where ``P`` derivatives would cost ``P`` forward
  passes) the forward-mode derivative along a random direction of each block must equal the
  reverse-mode one, ``<g, v>``, within round-off (rule 6 on a direction); where it does not,
  halving the direction's support (forward against reverse again) narrows the disagreement
  down to entries, and each is judged against finite differences by full mode's rules (a kink,
  where the modes may take different one-sided values, passes there);
- *batched backward*: the loss and the gradient at a few distinct points in one vmapped call
  (``gradient_batch``) against those at each point alone (rule 6).

A contract a model cannot have (no forward-mode rule, no batching rule; NumPy models have first
order only) is a section "not checked", which does not fail the check; a backward that cannot
be differentiated fails the second-order section, which was asked for, and a rule that exists
and raises fails its section. Either way the other sections keep their verdicts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ._check import analytic_gradient, disagreement, run_check, unchecked_block
from ._options import CheckOptions, Tolerance
from ._problem import Block, FlatProblem, Unavailable
from ._report import MAX_ROWS, BlockResult, Entry, Report
from ._verdict import BACKWARD_ROUNDOFF, agrees, block_floor, direction_floor
from .errors import ModelError, NonFiniteError

#: Rows of the identity per `FlatProblem.jvp` call in full mode: at most 32 MiB of rows.
_IDENTITY_BYTES = 1 << 25

#: The batched backward is compared at this many points (the starting point and others).
BATCH_POINTS = 3

#: How far the other points of the batched-backward comparison lie from the start, relative to
#: each entry's magnitude (or its block's root mean square, for entries near 0): far enough
#: that a rule mixing the points of a batch shows, near enough to stay in the model's domain.
BATCH_SPREAD = 1e-2


def run_contracts(
    problem: FlatProblem, options: CheckOptions, started: float | None = None
) -> Report:
    """The first-order check of ``problem``, with a section for every other contract
    ``options`` asks for (the report's time covers them all)."""
    start = time.perf_counter() if started is None else started
    first = run_check(problem, options, start)
    asked = [
        (options.order == 2, "second order", _second_order),
        (options.forward, "forward mode", _forward),
        (options.batched, "batched backward", _batched),
    ]
    sections = []
    caller: dict[str, Any] = dict(np.geterr())
    for wanted, name, contract in asked:
        if not wanted:
            continue
        try:
            with np.errstate(all="ignore"):
                sections.append(contract(problem, options, first, caller))
        except (ModelError, NonFiniteError) as exc:
            # the model's code raised in this contract alone (a double backward, a jvp, a
            # batching rule), or its gradient is not finite where this contract needs it:
            # this section fails and says why; the others keep their verdicts
            sections.append(_failed(first, problem, name, _why_raised(name, exc)))
    if not sections:
        return first
    return replace(first, sections=tuple(sections), elapsed=time.perf_counter() - start)


def _why_raised(contract: str, exc: Exception) -> str:
    if isinstance(exc, NonFiniteError) and contract == "second order":
        return (
            "u . g is not finite at the starting point: the model's gradient is NaN or Inf "
            "there (see the first order)"
        )
    return str(exc)


def _section(report: Report, first: Report, contract: str) -> Report:
    """``report`` as the section on ``contract``, without the warnings the first order shows."""
    own = tuple(w for w in report.warnings if w not in first.warnings)
    return replace(report, contract=contract, warnings=own)


def _theirs(caller: dict[str, Any], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (the model's code) under the caller's NumPy error settings."""
    with np.errstate(**caller):
        return fn(*args)


def _not_checked(first: Report, contract: str, why: str) -> Report:
    return replace(
        first,
        blocks=(),
        contract=contract,
        not_checked=why,
        evaluations=0,
        elapsed=0.0,
        warnings=(),
        skipped=(),
        problem=None,
        numeric=None,
    )


def _no_hook(problem: FlatProblem, contract: str) -> str:
    if problem.framework == "numpy":
        return "NumPy models have first order only (gradcheck checks the backward you wrote)"
    return f"this problem offers no {contract} (its adapter sets no hook for it)"


def _failed(first: Report, problem: FlatProblem, contract: str, why: str) -> Report:
    """A section that could not be judged although the contract was asked for: it fails."""
    unchecked = tuple(unchecked_block(b, f"not checked: {why}") for b in problem.blocks)
    return replace(
        _not_checked(first, contract, why), blocks=unchecked, not_checked=None, problem=why
    )


def _draw(seed: int, size: int, salt: int) -> np.ndarray:
    """A fixed standard-normal vector for a contract (``salt`` tells the contracts apart)."""
    return np.random.default_rng([int(seed), 0xC0DE, salt]).standard_normal(size)


# ------------------------------------------------------------------------------ second order
def _second_order(
    problem: FlatProblem, options: CheckOptions, first: Report, caller: dict[str, Any]
) -> Report:
    hook = problem.second_order
    if hook is None:
        return _not_checked(first, "second order", _no_hook(problem, "second order"))
    started = time.perf_counter()
    u = _draw(options.seed, problem.size, 2)
    try:
        inner = _theirs(caller, hook, u)
    except Unavailable as exc:
        why = f"the backward cannot be differentiated: {exc}"
        return replace(_failed(first, problem, "second order", why), elapsed=0.0)
    return _section(run_check(inner, options, started), first, "second order")


# ------------------------------------------------------------------------------ forward mode
def _forward(
    problem: FlatProblem, options: CheckOptions, first: Report, caller: dict[str, Any]
) -> Report:
    hook = problem.jvp
    if hook is None:
        return _not_checked(first, "forward mode", _no_hook(problem, "forward mode"))
    started = time.perf_counter()
    try:
        if first.mode == "full":
            return _forward_full(problem, options, first, hook, caller, started)
        return _forward_fast(problem, options, first, hook, caller, started)
    except Unavailable as exc:
        return _not_checked(first, "forward mode", str(exc))


def _forward_gradient(
    jvp: Callable[[np.ndarray, np.ndarray], np.ndarray], theta: np.ndarray
) -> np.ndarray:
    """The gradient by forward mode: the derivative along every coordinate, in chunks of
    identity rows."""
    size = theta.size
    rows = max(1, min(size, _IDENTITY_BYTES // (8 * size)))
    out = np.empty(size)
    for lo in range(0, size, rows):
        hi = min(size, lo + rows)
        eye = np.zeros((hi - lo, size))
        eye[np.arange(hi - lo), np.arange(lo, hi)] = 1.0
        values = np.asarray(jvp(theta, eye), dtype=np.float64).reshape(-1)
        if values.shape != (hi - lo,):
            raise ValueError(
                f"the adapter's jvp returned {values.size} values for {hi - lo} directions"
            )
        out[lo:hi] = values
    return out


def _forward_full(
    problem: FlatProblem,
    options: CheckOptions,
    first: Report,
    jvp: Callable[[np.ndarray, np.ndarray], np.ndarray],
    caller: dict[str, Any],
    started: float,
) -> Report:
    at0 = _theirs(caller, _forward_gradient, jvp, problem.theta0)  # Unavailable: not checked

    def gradient(theta: np.ndarray) -> np.ndarray:
        if theta is problem.theta0 or np.array_equal(theta, problem.theta0):
            return at0
        return _forward_gradient(jvp, theta)

    def forward(p: FlatProblem) -> FlatProblem:
        return replace(
            p,
            gradient=gradient,
            prepare=None if p.prepare is None else (lambda n: forward(p.prepare(n))),  # type: ignore[misc]
            second_order=None,
            jvp=None,
            gradient_batch=None,
        )

    report = run_check(forward(problem), replace(options, mode="full", nondet_tol=None), started)
    return replace(_section(report, first, "forward mode"), mode_reason=first.mode_reason)


def _forward_fast(
    problem: FlatProblem,
    options: CheckOptions,
    first: Report,
    jvp: Callable[[np.ndarray, np.ndarray], np.ndarray],
    caller: dict[str, Any],
    started: float,
) -> Report:
    """Fast mode: along a random direction of each block, forward mode against reverse mode;
    where they differ by more than round-off, the entries are narrowed down by halving the
    direction's support (forward against reverse again), and each entry found is judged
    against finite differences by full mode's rules (a kink, where the two modes may take
    different one-sided values, passes there)."""
    tol = options.tolerance(first.precision)
    theta0 = problem.theta0
    blocks = list(problem.blocks)
    directions = np.zeros((len(blocks), problem.size))
    rng = np.random.default_rng([int(options.seed), 0xC0DE, 3])
    for k, b in enumerate(blocks):
        directions[k, b.slice] = rng.standard_normal(b.size)

    def along(rows: np.ndarray) -> np.ndarray:
        return np.asarray(_theirs(caller, jvp, theta0, rows), dtype=np.float64).reshape(-1)

    forward = along(directions)
    g = _theirs(caller, analytic_gradient, problem)
    finite = np.abs(g[np.isfinite(g)])
    grad_scale = float(finite.max()) if finite.size else 0.0
    evaluations = len(blocks) + 1
    results = []
    for k, b in enumerate(blocks):
        v, gb = directions[k, b.slice], g[b.slice]
        terms = gb * v
        reverse = float(terms.sum())
        passed = BlockResult(
            name=b.name,
            shape=b.shape,
            kind=b.kind,
            checked=1,
            size=b.size,
            mismatches=0,
            unit="directions",
            max_abs_diff=abs(float(forward[k]) - reverse),
            scale=float(np.abs(terms).sum()),
        )
        if _consistent(float(forward[k]), terms, tol):
            results.append(passed)
            continue
        part = np.abs(gb[np.isfinite(gb)])
        entry_floor = block_floor(tol, float(part.max()) if part.size else 0.0, grad_scale)
        suspects, calls = _suspects(
            along, problem.size, b, v, gb, float(forward[k]), tol, entry_floor
        )
        evaluations += calls
        wrong: list[Entry] = []
        for i in suspects:
            judged = _judge_entry(problem, options, jvp, caller, b, i)
            evaluations += judged.evaluations
            if not judged.passed and judged.blocks[0].worst:
                wrong.append(replace(judged.blocks[0].worst[0], index=b.index(i)))
        if not wrong:
            why = (
                f"at {len(suspects)} entr{'y' if len(suspects) == 1 else 'ies'} finite "
                "differences accept the forward-mode value (a kink, or a reverse-mode "
                "gradient that is wrong there: see the first order)"
                if suspects
                else "spread over the block: round-off"
            )
            results.append(replace(passed, note=f"forward and reverse mode differ: {why}"))
            continue
        results.append(
            replace(
                passed,
                mismatches=1,
                worst=tuple(wrong),
                localized=len(wrong),
                max_rel_diff=max(e.rel_diff for e in wrong),
                diagnosis=(
                    "forward mode disagrees with reverse mode and with finite differences "
                    "(a wrong tangent in a forward-mode rule?): the table's 'analytic' is the "
                    "forward-mode derivative, 'numeric' the finite differences"
                ),
            )
        )
    return replace(
        first,
        blocks=tuple(results),
        contract="forward mode",
        evaluations=evaluations,
        elapsed=time.perf_counter() - started,
        warnings=(),
        problem=None,
        numeric=None,
    )


def _judge_entry(
    problem: FlatProblem,
    options: CheckOptions,
    jvp: Callable[[np.ndarray, np.ndarray], np.ndarray],
    caller: dict[str, Any],
    block: Block,
    i: int,
) -> Report:
    """Entry ``i`` of ``block`` alone, its forward-mode derivative judged against finite
    differences by full mode's rules (kinks included)."""
    j = block.offset + i
    unit = np.zeros((1, problem.size))
    unit[0, j] = 1.0

    def embed(t: np.ndarray) -> np.ndarray:
        full = problem.theta0.copy()
        full[j] = t[0]
        return full

    alone = FlatProblem(
        theta0=problem.theta0[j : j + 1],
        loss=lambda t: problem.loss(embed(t)),
        gradient=lambda t: np.asarray(jvp(embed(t), unit), dtype=np.float64).reshape(1),
        blocks=(Block(block.name, (1,), 0, block.kind),),
        precision=problem.precision,
    )
    return run_check(alone, replace(options, mode="full", nondet_tol=None))


def _consistent(forward: float, terms: np.ndarray, tol: Tolerance) -> bool:
    """Forward mode's derivative along a direction against reverse mode's ``sum(terms)``
    (``terms = g * v``): equal within the round-off of the sum (rule 6 on a direction)."""
    magnitude = float(np.abs(terms).sum())
    floor = direction_floor(tol, magnitude, magnitude / max(terms.size, 1))
    floor += BACKWARD_ROUNDOFF * tol.eps * magnitude
    return bool(agrees(forward, float(terms.sum()), floor))


def _suspects(
    along: Callable[[np.ndarray], np.ndarray],
    size: int,
    block: Block,
    v: np.ndarray,
    g: np.ndarray,
    whole: float,
    tol: Tolerance,
    entry_floor: float,
) -> tuple[list[int], int]:
    """The entries of ``block`` (positions in it) where forward and reverse mode disagree,
    at most `MAX_ROWS`, found by halving the support of ``v`` where the halves disagree
    (forward mode along each half against reverse mode's sum over it); an entry disagrees
    beyond ``entry_floor`` (full mode's allowance for an entry). Also the calls made."""
    found: list[int] = []
    calls = 0
    segments = [(0, block.size, whole)]
    while segments and len(found) < MAX_ROWS:
        leaves = [(lo, value) for lo, hi, value in segments if hi - lo == 1]
        for lo, value in leaves:
            if not bool(agrees(value / v[lo], g[lo], entry_floor)):
                found.append(lo)
        halves = [
            piece
            for lo, hi, _ in segments
            if hi - lo > 1
            for piece in ((lo, (lo + hi) // 2), ((lo + hi) // 2, hi))
        ]
        if not halves:
            break
        rows = np.zeros((len(halves), size))
        for r, (lo, hi) in enumerate(halves):
            rows[r, block.offset + lo : block.offset + hi] = v[lo:hi]
        values = along(rows)
        calls += len(halves)
        segments = [
            (lo, hi, float(value))
            for (lo, hi), value in zip(halves, values, strict=True)
            if hi - lo == 1 or not _consistent(float(value), g[lo:hi] * v[lo:hi], tol)
        ][: 2 * MAX_ROWS]
    return found[:MAX_ROWS], calls


# ------------------------------------------------------------------------------ batched backward
def _batched(
    problem: FlatProblem, options: CheckOptions, first: Report, caller: dict[str, Any]
) -> Report:
    hook = problem.gradient_batch
    if hook is None:
        return _not_checked(first, "batched backward", _no_hook(problem, "batched backward"))
    started = time.perf_counter()
    tol = options.tolerance(first.precision)
    rows = _batch_points(problem, options.seed)
    try:
        values, batched = _theirs(caller, hook, rows)
    except Unavailable as exc:
        return _not_checked(first, "batched backward", str(exc))
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    batched = np.asarray(batched, dtype=np.float64)
    if batched.shape != rows.shape or values.shape != rows.shape[:1]:
        raise ValueError(
            f"the adapter's gradient_batch returned shapes {values.shape} and {batched.shape}; "
            f"expected {rows.shape[:1]} and {rows.shape}"
        )
    alone = np.array([float(_theirs(caller, problem.loss, row)) for row in rows])
    single = np.stack([_theirs(caller, analytic_gradient, problem, row) for row in rows])
    results = [_batched_values(values, alone, tol)]
    grad_scale = float(np.nanmax(np.abs(single))) if single.size else 0.0
    for b in problem.blocks:
        scale = float(np.nanmax(np.abs(single[:, b.slice]))) if b.size else 0.0
        allowed = block_floor(tol, scale, grad_scale)
        found = [
            disagreement(
                b, batched[r, b.slice], single[r, b.slice], allowed, _batch_diagnosis(r, rows)
            )
            for r in range(rows.shape[0])
        ]
        failed = [f for f in found if f is not None]
        results.append(
            max(failed, key=lambda f: f.max_abs_diff)
            if failed
            else BlockResult(
                name=b.name,
                shape=b.shape,
                kind=b.kind,
                checked=b.size,
                size=b.size,
                mismatches=0,
                scale=scale,
            )
        )
    return replace(
        first,
        blocks=tuple(results),
        contract="batched backward",
        mode_reason=f"{rows.shape[0]} points, one vmapped call against one at a time",
        evaluations=3 * rows.shape[0],
        elapsed=time.perf_counter() - started,
        warnings=(),
        problem=None,
        numeric=None,
    )


def _batched_values(values: np.ndarray, alone: np.ndarray, tol: Tolerance) -> BlockResult:
    """The loss at each point under vmap against one point at a time, as a block ``loss``
    (kind ``"output"``): a forward's batching rule can mix the points of a batch in the
    values and leave the gradients alone. Allowed: the round-off of values of that size."""
    size = float(np.nanmax(np.abs(alone))) if alone.size else 0.0
    allowed = BACKWARD_ROUNDOFF * tol.eps * max(size, 1.0)
    block = Block("loss", alone.shape, 0)

    def diagnosis(largest: float) -> str:
        return (
            f"the loss under vmap differs from the loss at each point alone (up to "
            f"{largest:.2g} apart, {allowed:.2g} allowed): a batching rule of the forward that "
            "mixes the points of a batch, or ignores the batch dimension? The table's "
            "'analytic' is the batched value and 'numeric' the value at that point alone; "
            "index (i,) is point i"
        )

    found = disagreement(block, values, alone, allowed, diagnosis)
    if found is None:
        found = BlockResult(
            name=block.name,
            shape=block.shape,
            kind="output",
            checked=block.size,
            size=block.size,
            mismatches=0,
            scale=size,
        )
    return replace(found, kind="output")


def _batch_diagnosis(point: int, rows: np.ndarray) -> Callable[[float], str]:
    def diagnosis(largest: float) -> str:
        return (
            f"the backward under vmap disagrees with the backward at one point alone (point "
            f"{point + 1} of {rows.shape[0]}; up to {largest:.2g} apart): a "
            "batching rule that mixes the points of a batch, or ignores the batch dimension? "
            "The table's 'analytic' is the batched gradient and 'numeric' the gradient at that "
            "point alone"
        )

    return diagnosis


def _batch_points(problem: FlatProblem, seed: int) -> np.ndarray:
    """The starting point and `BATCH_POINTS` - 1 others around it, as rows."""
    theta0 = problem.theta0
    rng = np.random.default_rng([int(seed), 0xC0DE, 4])
    rows = np.repeat(theta0[None, :], BATCH_POINTS, axis=0)
    for b in problem.blocks:
        part = theta0[b.slice]
        rms = float(np.sqrt(np.mean(part**2))) if b.size else 0.0
        size = np.maximum(np.abs(part), rms if rms else 1.0)
        noise = rng.standard_normal((BATCH_POINTS - 1, b.size))
        rows[1:, b.slice] += BATCH_SPREAD * noise * size
    return rows
