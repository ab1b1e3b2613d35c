"""Fast mode: random directional probes, then localisation of the wrong entries.

Along a direction ``v`` the analytic directional derivative is ``g . v``; the
numerical one is a central difference of ``t -> loss(theta0 + t v)``. Directions
have entries ``±(1 + u) * max(|theta_i|, 1) * n_b ** (-1/3)`` with ``u`` uniform in
[0, 1) and ``n_b`` the size of the entry's block (see `_block_weights`): every
entry of a block takes part with a weight of at least that block's (a single wrong
entry always shows), and several wrong entries cancel only with vanishing
probability.

A direction spans every block and is checked across all of them first: one
difference (two evaluations) settles a correct model, whatever its size; one that
disagrees is extrapolated over two steps (Richardson, two more). A direction that
still disagrees is narrowed down to blocks (one by one up to `SCAN_BLOCKS`, by
halving above); a block checked on its own is refined with the kink test before
it fails, unless its disagreement is plainly smooth, in which case the wrong
entry localisation names (itself refined) is what fails it. The blocks' verdicts
are the check's.

The tolerance is the estimated numerical error (times ``safety``), plus the
round-off of the dot product, plus ``rtol`` times what one typical entry
contributes to the directional derivative. It is never scaled by the size of the
block. A failing block is searched for its wrong entries: the discrepancy is
linear in the direction, so probing part of the support tells how much of it that
part holds. A rank-weighted probe reads where a single wrong entry lies
(`_Probe.pinpoint`, six bits for four evaluations), bisection takes over below 16
entries or where several share the discrepancy, and each entry found is then
checked like an entry in full mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ._diagnosis import diagnose
from ._numerics import (
    Differences,
    Evaluator,
    Support,
    coordinate_differences,
    line_differences,
    refine_until_resolved,
    shrink_until_finite,
)
from ._options import CheckOptions, Tolerance
from ._problem import Block, FlatProblem
from ._report import MAX_ROWS, BlockResult, Entry

#: wrong entries localisation names per failing block before it stops
MAX_LOCALIZE = 5
#: blocks this small are localised by checking every entry instead of bisecting
SCAN_BELOW = 8
#: localisation narrows a support larger than this by a rank-weighted probe (see
#: `_Probe.pinpoint`) to a window of 1/`PINPOINT_SHRINK` of it, and bisects below
PINPOINT_ABOVE = 16
PINPOINT_SHRINK = 64
#: a direction that fails across this many blocks or fewer is checked on each block;
#: across more, the blocks are halved until groups this small remain
SCAN_BLOCKS = 8


def _contiguous(members: np.ndarray) -> Support:
    """``members`` (sorted indices) as a slice where they are a run, else as they are."""
    if members.size and int(members[-1]) - int(members[0]) + 1 == members.size:
        return slice(int(members[0]), int(members[-1]) + 1)
    return members


@dataclass(frozen=True)
class _Verdict:
    """One direction's comparison."""

    passed: bool
    analytic: float
    numeric: float
    error: float
    allowed: float
    shrink: float  # first step / nominal step (< 1 where the loss left its domain)
    provisional: bool = False  # failed before refinement (see `_Line.check`'s ``defer``)

    @property
    def residual(self) -> float:
        return self.analytic - self.numeric


class _Line:
    """Compares the analytic ``g . v`` with numerical derivatives along directions ``v``.

    A direction is a full-length vector; ``support`` names its nonzero entries (a
    slice or an index array), so that the work per evaluation is O(support).
    """

    def __init__(self, ev: Evaluator, g: np.ndarray, f0: float, tol: Tolerance) -> None:
        self.ev, self.g, self.f0, self.tol = ev, g, f0, tol

    def differences(self, v: np.ndarray, support: Support, s: float) -> Differences:
        return line_differences(self.ev, v, s, self.f0, support)

    def first(self, v: np.ndarray, support: Support, s: float) -> tuple[Differences, float]:
        """Central-difference data with step ``s``, and the step used.

        A step that leaves the loss's domain is retried 10x smaller, a few times.
        """
        for _ in range(6):
            big = self.differences(v, support, s)
            if np.isfinite(big.fp[0]) and np.isfinite(big.fm[0]):
                break
            s /= 10.0
        return big, s

    def richardson2(
        self, v: np.ndarray, support: Support, big: Differences, s: float
    ) -> tuple[float, float, Differences]:
        """Directional derivative extrapolated from steps s (``big``, given) and s/2.

        Returns (value, error estimate, the differences at s/2).
        """
        small = self.differences(v, support, s / 2)
        d1, d2 = float(big.central[0]), float(small.central[0])
        value = d2 + (d2 - d1) / 3.0
        # the extrapolation's own error is far below |d2 - d1| on smooth losses; the
        # first pass counts round-off only and sends anything that disagrees on
        error = 2.0 * float(small.roundoff(self.tol)[0])
        return value, error, small

    def allowed(self, v: np.ndarray, support: Support, count: int, error: float) -> float:
        """``safety`` x error + round-off of the dot product + rtol x one entry's typical share."""
        tol = self.tol
        terms = self.g[support] * v[support]
        l1 = float(np.sum(np.abs(terms)))
        l2 = float(np.sqrt(np.dot(terms, terms)))
        typical = l2 / math.sqrt(max(count, 1))
        return tol.safety * error + tol.noise * tol.eps * l1 + tol.rtol * typical

    def check(
        self,
        v: np.ndarray,
        support: Support,
        count: int,
        refine: bool = True,
        defer: bool = False,
    ) -> _Verdict:
        """``g . v`` against the numerical derivative along ``v`` (``count`` entries take part).

        One central difference (two evaluations) settles a direction that agrees;
        one that disagrees is extrapolated over two steps (two more), then, with
        ``refine``, refined with the kink test before it fails. With ``defer``, a
        disagreement that looks smooth (the two steps agree with each other far
        better than with the analytic value, and the gap between the one-sided
        derivatives halves with the step, so no kink lies within it) is returned
        unrefined and marked provisional: the caller must confirm it (localisation
        confirms it by naming a wrong entry, itself refined) or refine it.
        """
        tol, g = self.tol, self.g
        analytic = float(np.dot(g[support], v[support]))
        first, step = self.first(v, support, tol.step)

        def verdict(numeric: float, error: float, passed: bool | None = None) -> _Verdict:
            allowed = self.allowed(v, support, count, error)
            ok = abs(analytic - numeric) <= allowed if passed is None else passed
            return _Verdict(ok, analytic, numeric, error, allowed, step / tol.step)

        result = verdict(float(first.central[0]), float(first.roundoff(tol)[0]))
        if result.passed:
            return result
        value, error, small = self.richardson2(v, support, first, step)
        result = verdict(value, error)
        if result.passed or not refine:
            return result
        if defer and _smooth_disagreement(first, small, analytic, tol):
            return replace(result, provisional=True)
        ev, f0 = self.ev, self.f0
        wanted = result.allowed - tol.safety * result.error
        r = refine_until_resolved(
            lambda factor, sel: line_differences(ev, v, step * factor, f0, support),
            first,
            tol,
            np.array([wanted]),
        )
        result = verdict(float(r.numeric[0]), float(r.error[0]))
        if result.passed or not bool(r.kink[0]):
            return result
        slack = result.allowed + tol.safety * float(r.one_sided_noise[0])
        return verdict(result.numeric, result.error, r.lo[0] - slack <= analytic <= r.hi[0] + slack)


class _Probe:
    """One block's directional check and, on failure, its localisation."""

    def __init__(self, line: _Line, block: Block) -> None:
        self.line, self.block = line, block
        self.ev, self.g, self.f0, self.tol = line.ev, line.g, line.f0, line.tol
        self.shrink = 1.0  # of the failing direction being localised (see `_Verdict`)

    def residual(self, v: np.ndarray, members: np.ndarray) -> float:
        """analytic - numeric along ``v`` restricted to ``members``.

        One central difference at the default step (plenty to tell which half holds
        an error); where the direction's step had to shrink to stay in the loss's
        domain, the curvature is large, and two steps are extrapolated instead.
        """
        line, support = self.line, _contiguous(members)
        analytic = float(np.dot(self.g[support], v[support]))
        step = self.tol.step
        if self.shrink >= 1.0:
            d = line.differences(v, support, step)
            return analytic - float(d.central[0])
        big, step = line.first(v, support, step * self.shrink)
        numeric, _, _ = line.richardson2(v, support, big, step)
        return analytic - numeric

    def entry(self, i: int) -> tuple[Entry, bool]:
        """Check entry ``i`` (absolute index) as full mode would: (entry, is a mismatch)."""
        tol, ev, f0 = self.tol, self.ev, self.f0
        idx = np.array([i])
        h = tol.step * np.maximum(np.abs(ev.theta0[idx]), 1.0)
        first = coordinate_differences(ev, idx, h, f0)
        shrink_until_finite(ev, idx, h, first)
        a = float(self.g[i])
        wanted = np.array([tol.rtol * abs(a) + 64.0 * tol.eps * abs(a)])
        r = refine_until_resolved(
            lambda factor, sel: coordinate_differences(ev, idx, h * factor, f0), first, tol, wanted
        )
        n, err = float(r.numeric[0]), float(r.error[0])
        allowed = tol.rtol * abs(n) + tol.safety * err + 64.0 * tol.eps * abs(a)
        bad = abs(a - n) > allowed
        kink = bool(r.kink[0]) and bad
        if kink:
            slack = allowed + tol.safety * float(r.one_sided_noise[0])
            bad = not (r.lo[0] - slack <= a <= r.hi[0] + slack)
        local = i - self.block.offset
        return (
            Entry(
                index=self.block.index(local),
                analytic=a,
                numeric=n,
                error=err,
                tolerance=allowed,
                kink=kink,
                one_sided=(float(r.lo[0]), float(r.hi[0])) if kink else None,
            ),
            bad,
        )

    def pinpoint(
        self, v: np.ndarray, members: np.ndarray, d: float
    ) -> tuple[np.ndarray, float] | None:
        """A window of ``members`` holding the discrepancy ``d``, from two residuals.

        Along ``v`` with each member weighted by its rank ``(k + 1) / n``, a single
        wrong entry's discrepancy is scaled by its own rank: one residual reads
        where it lies. The window of ``n / PINPOINT_SHRINK`` members around that
        rank is accepted only if its own residual (the ``d`` of the next step) carries
        ``d`` to within a quarter; several wrong entries, or a discrepancy too close to
        the noise to be read this finely, fail that test (None: bisect instead). Four
        evaluations for six bits of the position, where bisection spends two per bit.
        """
        n = members.size
        weighted = np.zeros_like(v)
        weighted[members] = v[members] * ((np.arange(n) + 1.0) / n)
        rank = self.residual(weighted, members) / d * n - 1.0
        width = max(-(-n // PINPOINT_SHRINK), 4)
        if not (-width <= rank <= n - 1 + width):  # noise moves an end entry a little past
            return None
        start = min(max(round(rank) - width // 2, 0), n - width)
        window = members[start : start + width]
        d_window = self.residual(v, window)
        if abs(d_window - d) > 0.25 * abs(d):
            return None
        return window, d_window

    def localize(self, v: np.ndarray, total: float) -> tuple[list[Entry], bool]:
        """Search the block's support for wrong entries: (entries found, the search finished).

        A large support is first narrowed by rank-weighted probes (`pinpoint`);
        then each step probes one half of the current support, and the discrepancy
        of the other half follows by linearity. An entry the bisection ends on is checked
        as in full mode; after each wrong entry the direction without the entries
        found so far is checked again, with the same test as the block's probe.
        """
        found: list[Entry] = []
        remaining = np.arange(self.block.offset, self.block.offset + self.block.size)
        if remaining.size <= SCAN_BELOW:  # cheaper and surer to check every entry
            for k in remaining.tolist():
                entry, bad = self.entry(k)
                if bad:
                    found.append(entry)
            return found, True
        residual = total
        while len(found) < MAX_LOCALIZE and remaining.size:
            pinpoint = True  # until a window fails to hold the discrepancy (several wrong entries)
            members, d = remaining, residual
            while members.size > 1:
                if pinpoint and members.size > PINPOINT_ABOVE:
                    window = self.pinpoint(v, members, d)
                    if window is not None:
                        members, d = window
                        continue
                    pinpoint = False
                half = members[: members.size // 2]
                d_half = self.residual(v, half)
                if abs(d_half) >= 0.5 * abs(d):
                    members, d = half, d_half
                else:
                    members, d = members[members.size // 2 :], d - d_half
            i = int(members[0])
            entry, bad = self.entry(i)
            if not bad:  # the discrepancy is spread too thin to single out an entry
                return found, False
            found.append(entry)
            remaining = remaining[remaining != i]
            if not remaining.size:
                return found, True
            verdict = self.line.check(v, _contiguous(remaining), remaining.size)
            if verdict.passed:
                return found, True
            residual = verdict.residual
        return found, False

    def run(self, directions: list[np.ndarray], probes: int) -> BlockResult:
        """Check the block along ``directions`` (their part in it); localise the first failure.

        ``probes``: how many random directions the check drew; those not given here
        agreed across all blocks, and so count as passed in this one.
        """
        b = self.block
        failures: list[tuple[np.ndarray, _Verdict]] = []
        for v in directions:
            # the first failure may stay unrefined if it looks smooth: localisation confirms it
            verdict = self.line.check(v, b.slice, b.size, defer=not failures)
            if not verdict.passed:
                failures.append((v, verdict))
        result = BlockResult(
            name=b.name,
            shape=b.shape,
            kind=b.kind,
            checked=probes,
            size=b.size,
            mismatches=0,
            scale=float(np.max(np.abs(self.g[b.slice]))) if b.size else 0.0,
        )
        if not failures:
            return result
        v, verdict = failures[0]
        self.shrink = verdict.shrink
        found, finished = self.localize(v, verdict.residual)
        if verdict.provisional and not found:  # unconfirmed: refine before failing the block
            verdict = self.line.check(v, b.slice, b.size)
            if verdict.passed:
                failures.pop(0)
                if not failures:
                    return result
                v, verdict = failures[0]
        analytic, numeric = verdict.analytic, verdict.numeric
        found.sort(key=lambda e: -e.abs_diff)
        diagnosis = None
        if found:
            a = np.array([e.analytic for e in found])
            n = np.array([e.numeric for e in found])
            every = np.ones(len(found), dtype=bool)
            diagnosis = diagnose(a, n, every, b.shape, size=b.size if finished else b.size + 1)
        ratio = analytic / numeric if numeric != 0 else math.inf
        if finished and found:
            note = (
                f"localisation found every wrong entry along the failing direction ({len(found)})"
            )
        elif found:
            note = (
                f"localisation stopped after {len(found)} entries (at most {MAX_LOCALIZE}); "
                f"more are wrong: along the failing direction analytic / numeric = {ratio:.6g}"
            )
        else:
            note = (
                "localisation named no single entry (the error is spread over many); "
                f"along the failing direction analytic / numeric = {ratio:.6g}"
            )
        if diagnosis is None or not finished:
            diagnosis = _direction_diagnosis(ratio) or diagnosis
        return replace(
            result,
            mismatches=len(failures),
            worst=tuple(found[:MAX_ROWS]),
            max_abs_diff=abs(analytic - numeric),
            max_rel_diff=abs(analytic - numeric) / abs(numeric) if numeric else math.inf,
            diagnosis=diagnosis,
            localized=len(found),
            note=note,
        )


def _smooth_disagreement(
    first: Differences, small: Differences, analytic: float, tol: Tolerance
) -> bool:
    """Differences at s and s/2 that agree with each other, not with ``analytic``, and no kink.

    The one-sided derivatives differ by about ``s * v.Hv`` on a smooth loss, so their gap
    halves with the step; a kink within the step keeps it.
    """
    d1, d2 = float(first.central[0]), float(small.central[0])
    consistent = abs(d1 - d2) < 0.1 * abs(analytic - d2)
    gap_big = abs(float(first.right[0] - first.left[0]))
    gap_small = abs(float(small.right[0] - small.left[0]))
    noise = tol.safety * 4.0 * float(small.roundoff(tol)[0])
    kink = gap_small > 0.75 * gap_big and gap_small > noise
    return consistent and not kink


def _direction_diagnosis(ratio: float) -> str | None:
    if abs(ratio + 1.0) < 1e-3:
        return "analytic = -numeric along the probe (a flipped sign over the whole block?)"
    if ratio == 0:
        return "the analytic gradient is zero along the probe (a gradient never computed?)"
    return None


def _block_weights(problem: FlatProblem, tol: Tolerance) -> np.ndarray:
    """Per entry, how far a direction moves it relative to a coordinate step.

    ``max(|theta_i|, 1) * n_b ** (-1/3)`` in float64, ``n_b`` the size of the
    entry's block: along a random direction in ``n`` entries the curvature adds up
    over the entries (the truncation error of a difference grows about as ``n``,
    ``g . v`` as its square root), the round-off does not; the smaller step keeps
    the two balanced. Each block's part of a direction across all blocks moves as a
    probe of that block alone would, so that a block of few entries is seen at its
    own resolution, not at that of the largest block. In float32 the factor is 1:
    rounding the perturbed point to float32 would swamp smaller moves.
    """
    weights = np.maximum(np.abs(problem.theta0), 1.0)
    if tol.eps <= 1e-12:
        for b in problem.blocks:
            weights[b.slice] *= max(b.size, 1) ** (-1.0 / 3.0)
    return weights


def _direction(rng: np.random.Generator, scale: np.ndarray) -> np.ndarray:
    """Entries ``±(1 + u) * scale_i``, ``u`` uniform in [0, 1), independent signs."""
    u = rng.random(scale.size, dtype=np.float32).astype(np.float64)
    u -= 0.5  # sign and magnitude from one draw: |2u| is uniform in [0, 1)
    v = np.copysign(1.0, u)
    v += 2.0 * u
    v *= scale
    return v


def _span(blocks: list[Block]) -> Support:
    """The entries of ``blocks``, as a slice where they are one run."""
    return _contiguous(np.concatenate([np.arange(b.offset, b.offset + b.size) for b in blocks]))


def run_fast(
    problem: FlatProblem,
    ev: Evaluator,
    g: np.ndarray,
    f0: float,
    tol: Tolerance,
    options: CheckOptions,
) -> tuple[list[BlockResult], list[str]]:
    """Fast mode over every block; returns the block results and warnings.

    Each random direction spans every block and is first checked across all of
    them: two evaluations when it agrees, two more to extrapolate. A direction
    that still disagrees is narrowed down to blocks: up to `SCAN_BLOCKS` blocks
    are checked one by one, more are halved (group testing: a half along which the
    direction agrees passes as a whole). Each block checked on its own gets the
    full refinement and kink test; those verdicts are the check's, and a failing
    block is localised.
    """
    rng = np.random.default_rng([options.seed & 0xFFFFFFFF, 0xFA57])
    scale = _block_weights(problem, tol)
    line = _Line(ev, g, f0, tol)
    probes = options.probes
    results: dict[int, BlockResult] = {}  # by id() of the block

    def screen(group: list[Block], directions: list[np.ndarray]) -> list[np.ndarray]:
        """The directions that disagree along ``group`` (extrapolated, not refined)."""
        support, count = _span(group), sum(b.size for b in group)
        return [v for v in directions if not line.check(v, support, count, refine=False).passed]

    def settle(group: list[Block], directions: list[np.ndarray]) -> None:
        """Verdicts for ``group``, along which ``directions`` disagree (none: all pass)."""
        if not directions or len(group) <= SCAN_BLOCKS:
            for block in group:
                results[id(block)] = _Probe(line, block).run(directions, probes)
            return
        half = len(group) // 2
        for part in (group[:half], group[half:]):
            settle(part, screen(part, directions) if len(part) > 1 else directions)

    blocks = list(problem.blocks)
    failing = []  # only directions that fail are kept (O(P) each)
    for _ in range(probes):
        failing += screen(blocks, [_direction(rng, scale)])
    settle(blocks, failing)
    warnings = []
    if any(r.mismatches for r in results.values()):
        warnings.append(
            "fast mode: a failing block is localised by bisection; "
            "run mode='full' to compare every entry"
        )
    return [results[id(b)] for b in blocks], warnings
