"""The core checker: compare a FlatProblem's analytic gradient with numerical derivatives."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ._fast import run_fast
from ._full import _FullBlock
from ._numerics import (
    BudgetExhausted,
    Evaluator,
    NotDeterministic,
    StartingPoint,
    base_steps,
)
from ._options import CheckOptions, Mode, Tolerance
from ._problem import Block, FlatProblem
from ._report import MAX_ROWS, BlockResult, Entry, Report
from ._verdict import block_floor, repeats
from .errors import (
    ModelError,
    NonFiniteError,
    ShapeMismatchError,
)

#: ``mode="auto"`` checks every entry up to this many parameters, and probes directions above.
AUTO_FULL_LIMIT = 20_000


def analytic_gradient(problem: FlatProblem, theta: np.ndarray | None = None) -> np.ndarray:
    """The problem's gradient at ``theta`` (default: the start), checked: real, numeric, of
    ``theta``'s shape, as float64."""
    g = np.asarray(problem.gradient(problem.theta0 if theta is None else theta))
    if g.dtype == object or not (
        np.issubdtype(g.dtype, np.number) or np.issubdtype(g.dtype, np.bool_)
    ):
        raise ModelError(f"the analytic gradient must be numeric; got dtype {g.dtype}")
    if np.iscomplexobj(g):
        raise ModelError(
            "the analytic gradient is complex; gradcheck checks real gradients "
            "(split a complex parameter into its real and imaginary parts)"
        )
    g = np.asarray(g, dtype=np.float64)
    if g.shape != problem.theta0.shape:
        raise ShapeMismatchError(
            f"the analytic gradient has shape {g.shape}; expected {problem.theta0.shape}"
        )
    return g


def _non_finite_diagnosis(part: np.ndarray) -> str:
    bad = ~np.isfinite(part)
    kinds = sorted({"NaN" if np.isnan(v) else "Inf" for v in part[bad]})
    return (
        f"the analytic gradient is {' and '.join(kinds)} at {int(bad.sum()):,} of "
        f"{part.size:,} entries (a division by zero, log or sqrt of 0, or an overflow in "
        "the backward?)"
    )


def _with_non_finite(result: BlockResult, part: np.ndarray) -> BlockResult:
    """Full mode's result on a block whose analytic gradient holds NaN or Inf (those entries
    are mismatches like any other, measured): the diagnosis names them first."""
    return replace(
        result,
        diagnosis=_non_finite_diagnosis(part),
        max_abs_diff=math.inf,
        max_rel_diff=math.inf,
    )


def _not_finite(block: Block, g: np.ndarray) -> BlockResult:
    """Fast mode's result on a block whose analytic gradient holds NaN or Inf: a gradient
    defect at this point, failed without numerics (the entries are named; their numeric
    values are not measured, and the block's other entries are not compared)."""
    part = g[block.slice]
    bad = np.flatnonzero(~np.isfinite(part))
    entries = tuple(
        Entry(
            index=block.index(int(i)),
            analytic=float(part[i]),
            numeric=math.nan,
            error=math.nan,
            tolerance=math.nan,
        )
        for i in bad[:MAX_ROWS]
    )
    return BlockResult(
        name=block.name,
        shape=block.shape,
        kind=block.kind,
        checked=int(bad.size),
        size=block.size,
        mismatches=int(bad.size),
        worst=entries,
        max_abs_diff=math.inf,
        max_rel_diff=math.inf,
        diagnosis=_non_finite_diagnosis(part),
        note=(
            "fast mode did not compare this block's other entries (its gradient is not "
            "finite); mode='full' compares every entry"
        ),
    )


def _choose_mode(mode: Mode, size: int) -> tuple[str, str]:
    if mode == "auto":
        if size <= AUTO_FULL_LIMIT:
            return "full", f"auto: {size:,} entries <= {AUTO_FULL_LIMIT:,}"
        return "fast", f"auto: {size:,} entries > {AUTO_FULL_LIMIT:,}"
    return mode, f"mode={mode}"


def _expected_evaluations(mode: str, size: int) -> int:
    """What a passing check costs, in loss evaluations: full mode two per entry (plus the
    starting point twice), fast mode one central difference (a failure costs more)."""
    return 2 * size + 2 if mode == "full" else 2


def unchecked_block(block: Block, why: str) -> BlockResult:
    return BlockResult(
        name=block.name,
        shape=block.shape,
        kind=block.kind,
        checked=0,
        size=block.size,
        mismatches=0,
        note=why,
    )


def _run_full(
    problem: FlatProblem,
    ev: Evaluator,
    g: np.ndarray,
    at0: StartingPoint,
    tol: Tolerance,
    options: CheckOptions,
    numeric_all: np.ndarray,
    broken: dict[int, BlockResult],
    raw: np.ndarray,
) -> tuple[list[BlockResult], str | None]:
    """Full mode, block by block (each block's numerical gradient into ``numeric_all``):
    the block results, and why the blocks after some were not checked (the budget).
    ``g`` has the non-finite entries of the ``broken`` blocks set to 0; ``raw`` has them."""
    blocks: list[BlockResult] = []
    issue: str | None = None
    at0.value  # noqa: B018 (the starting point first: a loss not finite there is an input error)
    h = base_steps(problem.theta0, tol)
    grad_scale = float(np.max(np.abs(g))) if g.size else 0.0
    for block in problem.blocks:
        if issue is not None:
            blocks.append(unchecked_block(block, "not checked: the evaluation budget ran out"))
            continue
        try:
            own = raw if id(block) in broken else g  # NaN and Inf entries fail as mismatches
            result, numeric = _FullBlock(
                ev, block, own, h, at0.value, tol, grad_scale, options.max_refine
            ).run()
            if id(block) in broken:
                result = _with_non_finite(result, raw[block.slice])
        except BudgetExhausted:
            issue = (
                f"the evaluation budget ran out (max_evals={options.max_evals:,}) "
                f"before `{block.name}` was checked"
            )
            blocks.append(unchecked_block(block, "not checked: the evaluation budget ran out"))
            continue
        numeric_all[block.slice] = numeric
        blocks.append(result)
    return blocks, issue


def run_check(problem: FlatProblem, options: CheckOptions, started: float | None = None) -> Report:
    """Check ``problem``'s analytic gradient; the whole of the core in one call.

    ``started``: the ``time.perf_counter()`` of the call the report's time should cover
    (`check_gradients` passes its own start, so the adapter's set-up counts).

    The core's own arithmetic ignores NumPy's floating-point errors (whatever the caller
    set with ``np.seterr``: the verdict must not depend on it); the model's code runs
    under the caller's settings, as it would without gradcheck. Thread-local, and the
    caller's settings are back afterwards.
    """
    caller: dict[str, Any] = dict(np.geterr())
    with np.errstate(all="ignore"):
        return _run_check(problem, options, caller, started)


def _under(settings: dict[str, Any], problem: FlatProblem) -> FlatProblem:
    """``problem`` whose functions (the model's code) run under NumPy error ``settings``."""

    def theirs(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            with np.errstate(**settings):
                return fn(*args)

        return call

    batch = problem.loss_batch
    return replace(
        problem,
        loss=theirs(problem.loss),
        gradient=theirs(problem.gradient),
        loss_batch=None if batch is None else theirs(batch),
        loss_along=None if problem.loss_along is None else theirs(problem.loss_along),
        prepare=None,
    )


def _run_check(
    problem: FlatProblem, options: CheckOptions, caller: dict[str, Any], started: float | None
) -> Report:
    start = time.perf_counter() if started is None else started
    mode, reason = _choose_mode(options.mode, problem.size)
    if problem.prepare is not None:
        with np.errstate(**caller):
            problem = problem.prepare(_expected_evaluations(mode, problem.size))
    problem = _under(caller, problem)
    tol = options.tolerance(problem.precision)
    _check_start(problem)
    ev = Evaluator(problem, options.max_evals)
    warnings = list(problem.notes)
    g = analytic_gradient(problem)
    ev.charge(1)
    # a NaN or Inf analytic entry is a mismatch: full mode measures and compares its block
    # as any other; fast mode fails the block as it is (`_not_finite`) and checks the rest
    # with those entries set to 0 (its directions then disagree only within those blocks,
    # whose verdicts are replaced)
    raw = g
    broken = {id(b): _not_finite(b, g) for b in problem.blocks if not _all_finite(g[b.slice])}
    if broken:
        g = np.where(np.isfinite(g), g, 0.0)
    at0 = StartingPoint(ev)  # the loss at theta0, evaluated (twice) when first needed
    blocks: list[BlockResult] = []
    numeric_all: np.ndarray | None = None
    issue: str | None = None
    unstable: dict[int, BlockResult] = {}
    try:
        if options.nondet_tol is not None or mode == "full":
            unstable = _unrepeatable(problem, ev, raw, tol, options.nondet_tol)
        if mode == "full":
            numeric_all = np.full(problem.size, np.nan)
            blocks, issue = _run_full(problem, ev, g, at0, tol, options, numeric_all, broken, raw)
        else:
            blocks, fast_warnings = run_fast(problem, ev, g, at0, tol, options)
            warnings.extend(fast_warnings)
    except NotDeterministic as exc:
        issue = (
            f"the loss is not deterministic: two evaluations at the same point gave "
            f"{exc.first!r} and {exc.second!r} (reset or fix the randomness in the forward pass)"
        )
        blocks = [unchecked_block(b, "not checked: non-deterministic loss") for b in problem.blocks]
        numeric_all = None
    except BudgetExhausted:
        issue = f"the evaluation budget ran out (max_evals={options.max_evals:,})"
        blocks = [
            unchecked_block(b, "not checked: the evaluation budget ran out") for b in problem.blocks
        ]
        numeric_all = None
    if mode == "fast":
        blocks = [broken.get(id(b), r) for b, r in zip(problem.blocks, blocks, strict=True)]
    if unstable and issue is None:
        blocks = [unstable.get(id(b), r) for b, r in zip(problem.blocks, blocks, strict=True)]
    return Report(
        blocks=tuple(blocks),
        mode=mode,
        mode_reason=reason,
        precision=problem.precision,
        rtol=tol.rtol,
        atol=tol.atol,
        safety=tol.safety,
        seed=options.seed,
        evaluations=ev.count,
        elapsed=time.perf_counter() - start,
        framework=problem.framework,
        batching=problem.batching,
        warnings=tuple(warnings),
        skipped=tuple(problem.skipped),
        problem=issue,
        numeric=numeric_all,
    )


def _unrepeatable(
    problem: FlatProblem,
    ev: Evaluator,
    first: np.ndarray,
    tol: Tolerance,
    nondet_tol: float | None,
) -> dict[int, BlockResult]:
    """The blocks whose backward gives another gradient when called again at the same point
    (rule 6 of `gradcheck._verdict`), failed: a gradient that varies from call to call cannot
    be compared with numerical derivatives, and varies in the user's training too. Each
    block may differ by ``nondet_tol`` times its largest gradient, or (not given) by its
    ``atol`` floor (`block_floor`, on the analytic scale)."""
    second = analytic_gradient(problem)
    ev.charge(1)
    finite = np.abs(first[np.isfinite(first)])
    grad_scale = float(finite.max()) if finite.size else 0.0
    failed: dict[int, BlockResult] = {}
    for block in problem.blocks:
        a, b = first[block.slice], second[block.slice]
        part = np.abs(a[np.isfinite(a)])
        scale = float(part.max()) if part.size else 0.0
        own = block_floor(tol, scale, grad_scale)
        allowed = own if nondet_tol is None else nondet_tol * scale
        result = disagreement(block, a, b, allowed, _not_repeatable(allowed, nondet_tol))
        if result is not None:
            failed[id(block)] = result
    return failed


def _not_repeatable(allowed: float, nondet_tol: float | None) -> Callable[[float], str]:
    given = "" if nondet_tol is None else f", nondet_tol={nondet_tol:g}"

    def diagnosis(largest: float) -> str:
        return (
            "the backward is not deterministic: called twice at the same point it gave "
            f"other values (up to {largest:.2g} apart, {allowed:.2g} allowed{given}); "
            "the table's 'analytic' is the first pass and 'numeric' the second"
        )

    return diagnosis


def disagreement(
    block: Block,
    a: np.ndarray,
    b: np.ndarray,
    allowed: float,
    diagnosis: Callable[[float], str],
) -> BlockResult | None:
    """Rule 6 of `gradcheck._verdict` on one block: two analytic computations ``a`` and ``b``
    of the same values (two backward passes; forward and reverse mode; a batched backward
    and a loop) agree within ``allowed``; where they do not, the failed block (``a`` in the
    table's 'analytic' column, ``b`` in 'numeric'; ``diagnosis(largest gap)`` says which is
    which), else None."""
    differ = np.flatnonzero(repeats(a, b, allowed))
    if not differ.size:
        return None
    with np.errstate(invalid="ignore"):
        gap = np.abs(a - b)
    order = differ[np.argsort(-np.nan_to_num(gap[differ], nan=np.inf), kind="stable")]
    worst = tuple(
        Entry(
            index=block.index(int(i)),
            analytic=float(a[i]),
            numeric=float(b[i]),
            error=0.0,
            tolerance=allowed,
        )
        for i in order[:MAX_ROWS]
    )
    largest = float(np.nanmax(gap[differ])) if np.any(np.isfinite(gap[differ])) else math.inf
    finite = np.abs(a[np.isfinite(a)])
    scale = float(finite.max()) if finite.size else 0.0
    return BlockResult(
        name=block.name,
        shape=block.shape,
        kind=block.kind,
        checked=block.size,
        size=block.size,
        mismatches=int(differ.size),
        worst=worst,
        max_abs_diff=largest,
        max_rel_diff=largest / scale if scale else math.inf,
        scale=scale,
        diagnosis=diagnosis(largest),
    )


def _all_finite(a: np.ndarray) -> bool:
    """``np.all(np.isfinite(a))`` without a temporary of ``a``'s size (a NaN or an Inf makes
    the largest or the smallest entry not finite)."""
    return not a.size or (math.isfinite(float(a.max())) and math.isfinite(float(a.min())))


def _check_start(problem: FlatProblem) -> None:
    """The starting point must be finite: a step from an Inf or NaN parameter means nothing."""
    theta = problem.theta0
    if _all_finite(theta):
        return
    for block in problem.blocks:
        part = theta[block.slice]
        if not np.all(np.isfinite(part)):
            i = int(np.flatnonzero(~np.isfinite(part))[0])
            raise NonFiniteError(
                f"`{block.name}` is not finite at the starting point "
                f"(entry {block.index(i)} is {part[i]}); check at finite values"
            )
