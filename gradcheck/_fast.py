"""Fast mode: random directional probes, then localisation of the wrong entries.

Along a direction ``v`` the analytic directional derivative is ``g . v``; the
numerical one is a central difference of ``t -> loss(theta0 + t v)``. Directions
have entries ``±(1 + u) * max(|theta_i|, 1) * n_b ** (-1/3)`` with ``u`` uniform in
[0, 1) and ``n_b`` the size of the entry's block (see `_block_factors`): every
entry of a block takes part with a weight of at least that block's (a single wrong
entry always shows), and several wrong entries cancel only with vanishing
probability.

A direction spans every block and is checked across all of them first: one
difference (two evaluations) settles a correct model, whatever its size; one that
disagrees is extrapolated over two steps (Richardson, two more). Where that
disagreement is plainly smooth, a single wrong entry is searched for across all
the blocks at once (`_Probe.one_entry`): if the entry it leads to checks out as
wrong and the direction without it agrees, its block fails and every other block
passes. Otherwise the direction is narrowed down to blocks (one by one up to
`SCAN_BLOCKS`, by halving above); a block checked on its own is refined, with the
kink test and, at a kink, the backward beside it, before it fails, unless its
disagreement is plainly smooth, in which case the wrong entry localisation names
is what fails it. The blocks' verdicts are the check's.

A direction is judged by the rules entries are judged by (`gradcheck._verdict`), as a case
of length one. Its absolute allowance is the round-off of the dot product plus ``rtol``
times what one typical entry contributes to the directional derivative, and it has no
relative one (``rtol`` of the whole sum would hide one wrong entry): never scaled by the
size of the block. A failing block is searched for its wrong entries: the discrepancy is
linear in the direction, so probing part of the support tells how much of it that
part holds. Residuals along rank-weighted directions read where a single wrong
entry lies, to within what the measured noise allows (`_Probe.pinpoint`; at a
million entries, three readings usually name it), bisection takes over for what
they leave, and each entry found is then refined and judged as full mode judges it
(`gradcheck._full.judge_entries`).
"""

from __future__ import annotations

import bisect
import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from . import _memory
from ._diagnosis import diagnose
from ._full import full_block, judge_entries
from ._numerics import (
    Differences,
    Evaluator,
    Refined,
    StartingPoint,
    Support,
    central_roundoff,
    coordinate_differences,
    line_data,
    line_differences,
    refine_until_resolved,
    shrink_until_finite,
)
from ._options import CheckOptions, Tolerance
from ._problem import Block, FlatProblem
from ._report import MAX_ROWS, BlockResult, Entry
from ._verdict import (
    RESOLUTION,
    agrees,
    allowance,
    beside_agrees,
    block_floor,
    decide,
    direction_floor,
    unresolved_mask,
)

#: wrong entries localisation names per failing block before it stops
MAX_LOCALIZE = 5
#: blocks this small are localised by checking every entry instead of bisecting
SCAN_BELOW = 8
#: localisation narrows a support larger than this by rank-weighted probes (see
#: `_Probe.pinpoint`), to windows of at most 1/`PINPOINT_SHRINK` of it, and bisects below
PINPOINT_ABOVE = 4
PINPOINT_SHRINK = 64
#: a window is drawn this many times wider than the estimated error of the rank it is
#: centred on
PINPOINT_MARGIN = 4.0
#: entries per piece where an O(P) computation is done piecewise (no O(P) temporaries:
#: a fresh array of a million entries costs milliseconds of page faults)
CHUNK = 1 << 16
#: a block along which the loss is not finite on both sides is checked entry by entry (as
#: full mode does) up to this many entries; above, it is unresolved
ENTRYWISE_LIMIT = 20_000
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
    # error of one central difference at the first step along (part of) the direction,
    # likely and at most: the truncation seen between the two steps, plus round-off of one
    # unit or of ``tol.noise`` units per loss value (inf: not measured)
    noise: tuple[float, float] = (math.inf, math.inf)
    unmeasured: bool = False  # the loss is not finite on both sides at any step tried
    invisible: bool = False  # passed: the loss is flat and g . v too small to show
    floor: float = 0.0  # the direction's absolute allowance (see `gradcheck._verdict`)

    @property
    def residual(self) -> float:
        return self.analytic - self.numeric


class _Line:
    """Compares the analytic ``g . v`` with numerical derivatives along directions ``v``.

    A direction is a full-length vector; ``support`` names its nonzero entries (a
    slice or an index array), so that the work per evaluation is O(support).
    """

    def __init__(self, ev: Evaluator, g: np.ndarray, start: StartingPoint, tol: Tolerance) -> None:
        self.ev, self.g, self.start, self.tol = ev, g, start, tol
        self._positions: np.ndarray | None = None
        self._scratch: np.ndarray | None = None
        self._piece = np.empty(min(CHUNK, max(g.size, 1)))  # temporaries of `_sums`
        self.blocks = list(ev.problem.blocks)
        self._scales: list[float] | None = None  # max |g| per block
        #: per drawn direction (`draw`), its (g . v, ||g * v||**2, sum |g * v|) per
        #: block, kept as long as the direction lives (see `sums`)
        self._known: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._block_sums: dict[int, list[tuple[float, float, float]]] = {}
        self._block_index = {id(b): k for k, b in enumerate(self.blocks)}
        self._first_block = {b.offset: k for k, b in reversed(list(enumerate(self.blocks)))}
        self._last_block = {b.offset + b.size: k for k, b in enumerate(self.blocks)}
        #: the largest allowance of a direction that agreed (what a block's share of
        #: ``g . v`` must stand out from to be resolved), and the first direction across all
        #: blocks that agreed (see `_Probe.resolved`)
        self.allowance = 0.0
        self.direction: np.ndarray | None = None

    @property
    def f0(self) -> float:
        """The loss at ``theta0``: evaluated (twice, see `StartingPoint`) when first asked for."""
        return self.start.value

    @functools.cached_property
    def grad_scale(self) -> float:
        """The largest analytic gradient (what full mode's ``atol`` floor also counts)."""
        return max(self.scales(), default=0.0)

    def scales(self) -> list[float]:
        """The largest ``|g|`` of each block (one chunked pass, made once per check)."""
        if self._scales is None:
            g = self.g  # (finite: the check zeroes what is not before fast mode)
            self._scales = [
                max(float(g[b.slice].max()), -float(g[b.slice].min())) if b.size else 0.0
                for b in self.blocks
            ]
        return self._scales

    def scale(self, block: Block) -> float:
        """The largest ``|g|`` of ``block`` (one of the problem's blocks)."""
        k = self._block_index.get(id(block))
        return self.scales()[self.blocks.index(block) if k is None else k]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """A random direction (`_direction`), with what every check of it needs (`sums`,
        block by block) computed in the same pass, a chunk at a time while it is in cache,
        and kept for as long as the direction lives; the blocks' `scales` too, the first
        time."""
        need_scales = self._scales is None
        per_block = [[0.0, 0.0, 0.0] for _ in self.blocks]
        tops = [0.0] * len(self.blocks)
        g, piece = self.g, self._piece
        offsets = [b.offset for b in self.blocks]

        def visit(start: int, part: np.ndarray) -> None:
            for k, lo, hi in _segments(self.blocks, offsets, start, start + part.size):
                terms = np.multiply(g[lo:hi], part[lo - start : hi - start], out=piece[: hi - lo])
                sums = per_block[k]
                sums[0] += float(np.sum(terms))
                sums[1] += _dot(terms, terms)
                sums[2] += float(np.sum(np.abs(terms, out=terms)))
                if need_scales:  # (two reductions that write nothing; g is finite)
                    tops[k] = max(tops[k], float(g[lo:hi].max()), -float(g[lo:hi].min()))

        v = _direction(rng, self.ev.problem, self.tol, visit)
        if need_scales:
            self._scales = tops
        self._known[id(v)] = v
        self._block_sums[id(v)] = [(a, b, c) for a, b, c in per_block]
        return v

    def sums(self, v: np.ndarray, support: Support) -> tuple[float, float, float]:
        """``g . v``, ``|| g * v ||**2`` and ``sum |g * v|`` over ``support``: added up from
        the blocks' where ``v`` is a remembered direction and ``support`` whole blocks,
        else in one chunked pass (temporaries of a chunk, not of P entries)."""
        if isinstance(support, slice) and self._known.get(id(v)) is v:
            first = self._first_block.get(support.start)
            last = self._last_block.get(support.stop)
            if first is not None and last is not None and first <= last:
                parts = self._block_sums[id(v)][first : last + 1]
                return (
                    sum(p[0] for p in parts),
                    sum(p[1] for p in parts),
                    sum(p[2] for p in parts),
                )
        g, w = self.g[support], v[support]
        dot = squares = magnitude = 0.0
        for lo in range(0, g.size, CHUNK):
            hi = min(lo + CHUNK, g.size)
            terms = np.multiply(g[lo:hi], w[lo:hi], out=self._piece[: hi - lo])
            dot += float(np.sum(terms))
            squares += _dot(terms, terms)
            magnitude += float(np.sum(np.abs(terms, out=terms)))
        return dot, squares, magnitude

    def positions(self, span: slice) -> np.ndarray:
        """The indices ``span`` covers, as a view of one array made once per check."""
        if self._positions is None:
            self._positions = np.arange(self.g.size)
        return self._positions[span]

    def scratch(self) -> np.ndarray:
        """A zero vector of the problem's size, made once per check; whoever writes into
        it sets it back to zero (fresh O(P) arrays cost page faults at every use)."""
        if self._scratch is None:
            self._scratch = _memory.empty(self.g.size)
            self._scratch.fill(0.0)
        return self._scratch

    def differences(self, v: np.ndarray, support: Support, s: float) -> Differences:
        return line_differences(self.ev, v, s, self.f0, support)

    def ends(self, v: np.ndarray, support: Support, s: float) -> tuple[float, float, float]:
        """``f(theta0 + s v)``, ``f(theta0 - s v)`` and the step ``s`` used.

        A step that leaves the loss's domain is retried 10x smaller, a few times, once
        the loss is known to be finite at ``theta0`` itself (a loss that is not is an
        error, not a domain to stay in).
        """
        for _ in range(6):
            fp, fm = self.ev.along(v, np.array([s, -s]), support)
            if math.isfinite(fp) and math.isfinite(fm):
                break
            self.start.value  # noqa: B018 (raises if the loss is not finite at theta0)
            s /= 10.0
        return float(fp), float(fm), s

    def first(self, v: np.ndarray, support: Support, s: float) -> tuple[Differences, float]:
        """Central-difference data with step ``s`` (retried smaller, see `ends`), and the
        step used."""
        fp, fm, s = self.ends(v, support, s)
        return line_data(self.f0, fp, fm, s), s

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

    def slack(self, squares: float, magnitude: float, count: int) -> float:
        """What a direction is allowed beyond ``safety`` x its error: round-off of the dot
        product + rtol x one entry's typical share (from its `sums`)."""
        typical = math.sqrt(squares) / math.sqrt(max(count, 1))
        return direction_floor(self.tol, magnitude, typical)

    def check(
        self,
        v: np.ndarray,
        support: Support,
        count: int,
        refine: bool = True,
        defer: bool = False,
        resolve: float | None = None,
    ) -> _Verdict:
        """``g . v`` against the numerical derivative along ``v`` (``count`` entries take part).

        One central difference (two evaluations) settles a direction that agrees;
        one that disagrees is extrapolated over two steps (two more), then, with
        ``refine``, refined with the kink test before it fails. With ``defer``, a
        disagreement that looks smooth (the two steps agree with each other far
        better than with the analytic value, and the gap between the one-sided
        derivatives halves with the step, so no kink lies within it) is returned
        unrefined and marked provisional: the caller must confirm it (localisation
        confirms it by naming a wrong entry, itself refined) or refine it. With ``resolve``,
        a direction that agrees is refined too (with larger steps where round-off
        dominates) until ``safety * error`` is at most ``resolve``, where it can be.
        """
        tol = self.tol
        analytic, squares, magnitude = self.sums(v, support)
        fp, fm, step = self.ends(v, support, tol.step)

        noise = (math.inf, math.inf)
        dot_slack = self.slack(squares, magnitude, count)

        def verdict(numeric: float, error: float, passed: bool | None = None) -> _Verdict:
            # a direction's allowance: its floor, and no rtol of the whole sum (`_verdict`)
            allowed = float(allowance(tol, numeric, error, dot_slack, 0.0))
            ok = bool(agrees(analytic, numeric, allowed)) if passed is None else passed
            return _Verdict(
                ok, analytic, numeric, error, allowed, step / tol.step, noise=noise, floor=dot_slack
            )

        if not (math.isfinite(fp) and math.isfinite(fm)):
            # not measurable along this direction: narrowed down to blocks, where full
            # mode's one-sided differences take over (see `_Probe.run`)
            return replace(verdict(math.nan, math.inf, False), unmeasured=True)
        # a direction that agrees is settled by the two values alone, without f(theta0)
        level = max(abs(fp), abs(fm))

        def settled(result: _Verdict) -> bool:
            if result.passed:
                self.allowance = max(self.allowance, result.allowed)
            if resolve is None:
                return result.passed
            return result.passed and tol.safety * result.error <= resolve

        result = verdict((fp - fm) / (2.0 * step), float(central_roundoff(tol, level, 2.0 * step)))
        if settled(result):
            return result
        first = line_data(self.f0, fp, fm, step)  # the starting point, and so the determinism check
        roundoff = float(first.roundoff(tol)[0])
        result = verdict(float(first.central[0]), roundoff)
        if settled(result):
            return result
        value, error, small = self.richardson2(v, support, first, step)
        truncation = 4.0 / 3.0 * abs(float(first.central[0]) - float(small.central[0]))
        noise = (truncation + roundoff / tol.noise, truncation + roundoff)
        result = verdict(value, error)
        if settled(result):
            return result
        if defer and _smooth_disagreement(first, small, analytic, tol):
            return replace(result, provisional=True)
        if not refine:
            return result
        ev, f0 = self.ev, self.f0
        wanted = result.allowed - tol.safety * result.error
        if resolve is not None:
            wanted = min(wanted, resolve)
        r = refine_until_resolved(
            lambda factor, sel: line_differences(ev, v, step * factor, f0, support),
            first,
            tol,
            np.array([wanted]),
        )
        d = decide(np.array([analytic]), r, dot_slack, 0.0, tol, f0, np.array([step]))
        passed = bool(d.ok[0] or d.tiny[0]) or (
            bool(d.beside[0]) and self.beside(v, support, r, dot_slack)
        )
        return replace(
            verdict(float(r.numeric[0]), float(r.error[0]), passed),
            allowed=float(d.allowed[0]),
            invisible=bool(d.tiny[0]),
        )

    def beside(self, v: np.ndarray, support: Support, r: Refined, floor: float) -> bool:
        """Whether the backward just off a kink along ``v`` matches the one-sided derivatives.

        Where ``g . v`` is no one-sided derivative at a kink, several kinks may coincide
        along ``v`` (a zero-initialised ReLU layer puts every unit on its kink at once):
        the value at the kink is then a convention the numerics cannot refute, but the
        gradient half the smallest step to either side must give the derivative on that
        side, as full mode checks an entry. Two gradient evaluations.
        """
        ev, tol = self.ev, self.tol
        problem = ev.problem
        step = float(r.step[0]) / 2.0
        for sign, expected in ((1.0, float(r.right0[0])), (-1.0, float(r.left0[0]))):
            theta = _memory.copy(problem.theta0)
            theta[support] = ev.representable(theta[support] + sign * step * v[support])
            ev.charge(1)
            g = np.asarray(problem.gradient(theta), dtype=np.float64)
            along = _dot(g[support], v[support])
            if not beside_agrees(along, expected, float(r.one_sided_noise[0]), floor, 0.0, tol):
                return False
        return True


class _Probe:
    """Directional checks of one block, or of consecutive blocks at once, and localisation."""

    def __init__(self, line: _Line, blocks: list[Block]) -> None:
        self.line, self.blocks = line, blocks
        self.ev, self.g, self.tol = line.ev, line.g, line.tol
        self.span = _span(blocks)
        self.count = self.span.stop - self.span.start
        self.shrink = 1.0  # of the failing direction being localised (see `_Verdict`)
        self._first: dict[int, tuple[Differences, np.ndarray]] = {}  # see `first_pass`

    @property
    def f0(self) -> float:
        return self.line.f0

    @functools.cached_property
    def members(self) -> np.ndarray:
        """The indices of the span (only localisation needs them)."""
        return self.line.positions(self.span)

    def block_of(self, i: int) -> Block:
        """The block holding entry ``i`` (absolute index)."""
        return next(b for b in self.blocks if b.offset <= i < b.offset + b.size)

    def check_without(self, v: np.ndarray, entries: list[int], refine: bool = True) -> _Verdict:
        """The probe's check along ``v`` without ``entries`` (absolute indices).

        The entries are zeroed in a copy of ``v`` rather than left out of the support,
        which stays one slice: O(P) work per evaluation either way, but no gathers.
        """
        w = _memory.copy(v)
        w[entries] = 0.0
        count = self.count - len(entries)
        return self.line.check(w, self.span, count, refine=refine)

    def residual(self, v: np.ndarray, members: np.ndarray) -> float:
        """analytic - numeric along ``v`` restricted to ``members``.

        One central difference at the default step (plenty to tell which half holds
        an error); where the direction's step had to shrink to stay in the loss's
        domain, the curvature is large, and two steps are extrapolated instead.
        """
        line, support = self.line, _contiguous(members)
        analytic = _dot(self.g[support], v[support])
        step = self.tol.step
        if self.shrink >= 1.0:
            d = line.differences(v, support, step)
            return analytic - float(d.central[0])
        big, step = line.first(v, support, step * self.shrink)
        numeric, _, _ = line.richardson2(v, support, big, step)
        return analytic - numeric

    def first_pass(self, i: int) -> tuple[Differences, np.ndarray]:
        """The central difference of entry ``i`` (absolute index) at full mode's step, and
        the step; kept, as `entry` starts from it."""
        if i not in self._first:
            ev, idx = self.ev, np.array([i])
            h = self.tol.step * np.maximum(np.abs(ev.theta0[idx]), 1.0)
            first = coordinate_differences(ev, idx, h, self.f0)
            shrink_until_finite(ev, idx, h, first)
            self._first[i] = (first, h)
        return self._first[i]

    def entry(self, i: int) -> tuple[Entry, bool]:
        """Check entry ``i`` (absolute index) as full mode would: (entry, is a mismatch).

        ``atol`` is relative to the largest analytic gradient of the entry's block (full
        mode's is the largest numerical one, which fast mode does not have).
        """
        tol, g = self.tol, self.g
        block = self.block_of(i)
        scale = self.line.scale(block)
        floor = block_floor(tol, scale, self.line.grad_scale)
        first, h = self.first_pass(i)
        idx = np.array([i])
        judged = judge_entries(self.ev, idx, g[idx], h, first, self.f0, tol, floor)
        kink = bool(judged.kink[0])
        return (
            Entry(
                index=block.index(i - block.offset),
                analytic=float(g[i]),
                numeric=float(judged.numeric[0]),
                error=float(judged.error[0]),
                tolerance=float(judged.allowed[0]),
                kink=kink,
                one_sided=(float(judged.lo[0]), float(judged.hi[0])) if kink else None,
            ),
            not bool(judged.ok[0]),
        )

    def read(self, v: np.ndarray, members: np.ndarray, d: float, low: float) -> tuple[float, float]:
        """Where along ``members`` a single wrong entry holding ``d`` lies: (q, its rank).

        Along ``v`` with the members weighted from ``low`` (the first) to 1 (the last)
        in equal steps, the entry's discrepancy is scaled by its own weight, so the
        residual divided by ``d`` is that weight, ``q``, and gives the rank. Were ``d``
        not there at all, ``q`` would be about 0.
        """
        n = members.size
        weighted = self.line.scratch()
        where = _contiguous(members)
        weighted[where] = v[where] * np.linspace(low, 1.0, n)
        try:
            q = self.residual(weighted, members) / d
        finally:
            weighted[where] = 0.0
        return q, (q - low) / (1.0 - low) * (n - 1)

    def pinpoint(
        self,
        v: np.ndarray,
        members: np.ndarray,
        d: float,
        noise: tuple[float, float] = (math.inf, math.inf),
    ) -> tuple[np.ndarray, float, bool]:
        """Narrow ``members`` (holding the discrepancy ``d``) by rank-weighted readings
        (`read`): (the members left, their discrepancy, whether it behaved as one entry's).

        A reading is off by about ``2 * noise / |d|`` in ``q`` (``noise``: the error of
        one residual, likely and at most; see `_Verdict`), so windows `PINPOINT_MARGIN`
        times that wide in ranks are tried around it, the narrower first, then one of
        ``n / PINPOINT_SHRINK`` members. A window is read with weights from about 1/2
        to 1: the same residual tells whether it holds the discrepancy (``q`` near 0
        if not) and where in it the entry lies. A window of one entry must carry ``d``
        to within a quarter on its own. Several wrong entries, or a discrepancy too
        close to the noise to be read this finely, fail every window (False: bisect
        from what is left). Each step costs two evaluations; at a million entries
        with one wrong, three steps usually name it, where bisection takes twenty.
        """
        n = members.size
        if not (d != 0.0 and math.isfinite(d)):
            return members, d, False
        low = 1.0 / n
        _, rank = self.read(v, members, d, low)
        widest = max(-(-n // PINPOINT_SHRINK), 4)
        if not (-widest <= rank <= n - 1 + widest):  # noise moves an end entry a little past
            return members, d, False
        while members.size > 1:
            n = members.size
            per_noise = 2.0 / abs(d) * (n - 1) / (1.0 - low)  # ranks per unit of noise
            widest = max(-(-n // PINPOINT_SHRINK), 4)
            spreads = [PINPOINT_MARGIN * level * per_noise for level in noise]
            widths = {max(math.ceil(x), 1) for x in spreads if x <= widest}  # (not NaN or inf)
            if n > PINPOINT_ABOVE:
                widths.add(widest)
            candidates = sorted(w for w in widths if w < n)
            if not candidates:  # (small, and the noise unknown): bisection is as cheap
                break
            for width in candidates:
                start = min(max(round(rank) - width // 2, 0), n - width)
                window = members[start : start + width]
                if width == 1:  # the entry's own difference, which its check then starts from
                    i = int(window[0])
                    first, _ = self.first_pass(i)
                    d_window = (float(self.g[i]) - float(first.central[0])) * float(v[i])
                    if abs(d_window - d) <= 0.25 * abs(d):
                        return window, d_window, True
                    continue
                window_low = (width + 1.0) / (2.0 * width)
                q, window_rank = self.read(v, window, d, window_low)
                if 0.25 <= q <= 1.25:
                    members, rank, low = window, window_rank, window_low
                    break
            else:
                return members, d, False
        return members, d, True

    def narrow(
        self,
        v: np.ndarray,
        members: np.ndarray,
        d: float,
        noise: tuple[float, float],
        strict: bool = False,
    ) -> tuple[int, float] | None:
        """The one entry of ``members`` that the discrepancy ``d`` along ``v`` leads to, and
        its own discrepancy.

        Rank-weighted readings (`pinpoint`) narrow a support larger than
        `PINPOINT_ABOVE`; halving takes over for what they leave, the half holding at
        least half of the discrepancy being kept (the other half's follows by
        linearity). With ``strict``, a discrepancy that does not behave as one entry's
        ends the search instead (None).
        """
        if members.size > PINPOINT_ABOVE:
            members, d, single = self.pinpoint(v, members, d, noise)
            if strict and not single:
                return None
        while members.size > 1:
            half = members[: members.size // 2]
            d_half = self.residual(v, half)
            if abs(d_half) >= 0.5 * abs(d):
                members, d = half, d_half
            else:
                members, d = members[members.size // 2 :], d - d_half
        return int(members[0]), d

    def localize(self, v: np.ndarray, failed: _Verdict) -> tuple[list[Entry], bool]:
        """Search the support for the wrong entries behind ``failed`` along ``v``: (entries
        found, the search finished).

        Each search narrows the support to one entry (`narrow`), which is then checked
        as in full mode; after each wrong entry the direction without the entries
        found so far is checked again, with the same test as the block's probe.
        """
        found: list[Entry] = []
        named: list[int] = []  # their absolute indices
        remaining = self.members
        if remaining.size <= SCAN_BELOW:  # few enough to check every entry
            for k in remaining.tolist():
                entry, bad = self.entry(k)
                if bad:
                    found.append(entry)
            return found, True
        self.shrink = failed.shrink
        residual, noise = failed.residual, failed.noise
        while len(found) < MAX_LOCALIZE and remaining.size:
            narrowed = self.narrow(v, remaining, residual, noise)
            assert narrowed is not None  # (only a strict search gives up)
            entry, bad = self.entry(narrowed[0])
            if not bad:  # the discrepancy is spread too thin to single out an entry
                return found, False
            found.append(entry)
            named.append(narrowed[0])
            remaining = remaining[remaining != narrowed[0]]
            if not remaining.size:
                return found, True
            verdict = self.check_without(v, named)
            if verdict.passed:
                return found, True
            residual, noise = verdict.residual, verdict.noise
        return found, False

    def one_entry(self, v: np.ndarray, failed: _Verdict) -> tuple[Entry, int, float] | None:
        """The single wrong entry that explains ``failed`` along ``v``, if there is one:
        (the entry, its absolute index, its discrepancy along ``v``).

        The search gives up as soon as the discrepancy does not behave as one entry's
        (a window that fails to hold it, an entry that checks out), and the direction
        without the entry found must agree: ``failed``'s residual less the entry's own
        (its refined difference times ``v[i]``) must be within ``failed``'s tolerance,
        widened by the entry's error.
        """
        self.shrink = failed.shrink
        narrowed = self.narrow(v, self.members, failed.residual, failed.noise, strict=True)
        if narrowed is None:
            return None
        i, _ = narrowed
        entry, bad = self.entry(i)
        if not bad:
            return None
        # the rest of the direction: its residual is the direction's less the entry's (the
        # derivative is linear in the direction), both measured, so no evaluation is needed
        d = (entry.analytic - entry.numeric) * float(v[i])
        rest = failed.residual - d
        if not abs(rest) <= failed.allowed + self.tol.safety * abs(float(v[i])) * entry.error:
            return None
        return entry, i, d

    def run(self, directions: list[np.ndarray], probes: int) -> BlockResult:
        """Check the block along ``directions`` (their part in it); localise the first failure.

        ``probes``: how many random directions the check drew; those not given here
        agreed across all blocks, and so count as passed in this one.
        """
        (b,) = self.blocks
        failures: list[tuple[np.ndarray, _Verdict]] = []
        for v in directions:
            # the first failure may stay unrefined if it looks smooth: localisation confirms it
            verdict = self.line.check(v, b.slice, b.size, defer=not failures)
            if verdict.unmeasured:
                return self.entrywise(b)
            if not verdict.passed:
                failures.append((v, verdict))
        result = _passed(b, self.line.scale(b), probes)
        if not failures:
            return result
        v, verdict = failures[0]
        found, finished = self.localize(v, verdict)
        if verdict.provisional and not found:  # unconfirmed: refine before failing the block
            verdict = self.line.check(v, b.slice, b.size)
            if verdict.passed:
                failures.pop(0)
                if not failures:
                    return result
                v, verdict = failures[0]
        return _failed(result, len(failures), found, finished, verdict.analytic, verdict.numeric)

    def entrywise(self, b: Block) -> BlockResult:
        """The block checked entry by entry, as full mode does (the loss is not finite on
        both sides along a direction: full mode measures such entries from one side), up to
        `ENTRYWISE_LIMIT` entries; above, the block is unresolved."""
        if b.size > ENTRYWISE_LIMIT:
            return replace(
                _passed(b, self.line.scale(b), 1),
                unresolved=1,
                note=(
                    "the loss is not finite on both sides along the probe, at any step tried; "
                    "run mode='full' to measure its entries one side at a time"
                ),
            )
        return full_block(self.ev, b, self.g, self.line.f0, self.tol)

    def resolved(self, b: Block, directions: list[np.ndarray], result: BlockResult) -> BlockResult:
        """``result`` (passed) as it is where the directions resolved the block: their
        allowance is at most `RESOLUTION` times the block's share of ``g . v``. Otherwise
        (a block of gradients far below the loss's magnitude) the block is probed alone
        with larger steps; still unresolved, it is inconclusive."""
        line, tol = self.line, self.tol
        v = directions[0] if directions else line.direction
        if v is None or result.unit == "entries":  # judged entry by entry, by full mode's rules
            return result
        share = math.sqrt(line.sums(v, b.slice)[1])
        if line.allowance <= RESOLUTION * share:
            return result
        verdict = line.check(v, b.slice, b.size, resolve=RESOLUTION * share)
        if verdict.unmeasured:
            return self.entrywise(b)
        if not verdict.passed:
            found, finished = self.localize(v, verdict)
            return _failed(result, 1, found, finished, verdict.analytic, verdict.numeric)
        vague = unresolved_mask(
            tol,
            np.array([verdict.analytic]),
            np.array([verdict.numeric]),
            np.array([verdict.error]),
            share,
            verdict.floor,
        )
        if not vague[0] or verdict.invisible:
            return result
        return replace(
            result,
            unresolved=1,
            note=(
                "unresolved: along the probe, the numerical derivative cannot tell agreement "
                f"from a bug at any step tried (estimated error {verdict.error:.2g} against "
                f"a share of {share:.2g}: a gradient far below the loss's magnitude?)"
            ),
        )


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` without BLAS: a BLAS dot may start its own threads, which at a million
    entries fight the framework's (XLA's, torch's) for the cores and cost tens of ms; the
    library leaves the user's thread settings alone, so it sums in one thread itself."""
    return float(np.einsum("i,i->", a, b))


def _passed(block: Block, scale: float, probes: int) -> BlockResult:
    """A block along which every one of the ``probes`` directions agreed (``scale``: its
    largest analytic gradient)."""
    return BlockResult(
        name=block.name,
        shape=block.shape,
        kind=block.kind,
        checked=probes,
        size=block.size,
        mismatches=0,
        unit="directions",
        scale=scale,
    )


def _failed(
    result: BlockResult,
    mismatches: int,
    found: list[Entry],
    finished: bool,
    analytic: float,
    numeric: float,
) -> BlockResult:
    """``result`` failed by ``mismatches`` directions, with the wrong entries localisation
    ``found`` (all of them if ``finished``); ``analytic`` and ``numeric``: the block's part of
    the first failing direction."""
    found = sorted(found, key=lambda e: -e.abs_diff)
    diagnosis = None
    if found and finished:  # (stopped early, the entries found are not the pattern: the note says)
        a = np.array([e.analytic for e in found])
        n = np.array([e.numeric for e in found])
        every = np.ones(len(found), dtype=bool)
        diagnosis = diagnose(a, n, every, result.shape, size=result.size)
    ratio = analytic / numeric if numeric != 0 else math.inf
    if finished and found:
        note = f"localisation found every wrong entry along the failing direction ({len(found)})"
    elif found:
        note = (
            f"localisation stopped after {len(found)} entr{'y' if len(found) == 1 else 'ies'} "
            f"(at most {MAX_LOCALIZE}); "
            f"more are wrong: along the failing direction analytic / numeric = {ratio:.6g}"
        )
    else:
        note = (
            "localisation named no single entry (the error is spread over many); "
            f"along the failing direction analytic / numeric = {ratio:.6g}"
        )
    if diagnosis is None:
        diagnosis = _direction_diagnosis(ratio)
    return replace(
        result,
        mismatches=mismatches,
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
    if all(d.fp[0] == d.f0 == d.fm[0] for d in (first, small)):
        return False  # a loss flat at float resolution: refinement judges it
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


def _block_factors(problem: FlatProblem, tol: Tolerance) -> list[float]:
    """Per block, how far a direction moves its entries relative to a coordinate step:
    ``n_b ** (-1/3)`` in float64, ``n_b`` the size of the block.

    Along a random direction in ``n`` entries the curvature adds up over the entries
    (the truncation error of a difference grows about as ``n``, ``g . v`` as its square
    root), the round-off does not; the smaller step keeps the two balanced. Each block's
    part of a direction across all blocks moves as a probe of that block alone would,
    so that a block of few entries is seen at its own resolution, not at that of the
    largest block. In float32 the factor is 1: rounding the perturbed point to float32
    would swamp smaller moves.
    """
    if tol.eps > 1e-12:
        return [1.0] * len(problem.blocks)
    return [max(b.size, 1) ** (-1.0 / 3.0) for b in problem.blocks]


def _direction(
    rng: np.random.Generator,
    problem: FlatProblem,
    tol: Tolerance,
    visit: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Entries ``±(1 + u) * w_i``, ``u`` uniform on [0, 1) (a grid of 2**-23), independent
    signs, ``w_i = max(|theta_i|, 1)`` times its block's factor (`_block_factors`).

    Each entry takes 32 random bits: 23 for the mantissa of a float32 in [1, 2), one for
    its sign (no float arithmetic, and half the random bits of a float64 draw). Made in
    one pass, a chunk at a time (temporaries of a chunk, not of P entries); ``visit(start,
    part)`` is shown each finished chunk, while it is in cache.
    """
    theta0, blocks = problem.theta0, list(problem.blocks)
    offsets = [b.offset for b in blocks]
    factors = _block_factors(problem, tol)
    v = _memory.empty(problem.size)
    source = rng.bit_generator
    for start in range(0, v.size, CHUNK):
        stop = min(start + CHUNK, v.size)
        part = v[start:stop]
        np.abs(theta0[start:stop], out=part)
        np.maximum(part, 1.0, out=part)
        for k, lo, hi in _segments(blocks, offsets, start, stop):
            if factors[k] != 1.0:  # (multiplying by 1 changes nothing)
                part[lo - start : hi - start] *= factors[k]
        bits = source.random_raw((part.size + 1) // 2).view(np.uint32)[: part.size]
        bits &= np.uint32(0x807FFFFF)  # the sign bit and 23 mantissa bits
        bits |= np.uint32(0x3F800000)  # the exponent of [1, 2)
        part *= bits.view(np.float32)
        if visit is not None:
            visit(start, part)
    return v


def _segments(
    blocks: list[Block], offsets: list[int], start: int, stop: int
) -> list[tuple[int, int, int]]:
    """``(k, lo, hi)`` for each block ``k`` that ``[start, stop)`` overlaps, ``[lo, hi)``
    the overlap (blocks tile the vector in order; ``offsets``: theirs)."""
    k = bisect.bisect_right(offsets, start) - 1
    out = []
    while 0 <= k < len(blocks) and blocks[k].offset < stop:
        b = blocks[k]
        lo, hi = max(b.offset, start), min(b.offset + b.size, stop)
        if lo < hi:
            out.append((k, lo, hi))
        k += 1
    return out


def _span(blocks: list[Block]) -> slice:
    """The entries of consecutive ``blocks`` (blocks tile the vector in order)."""
    return slice(blocks[0].offset, blocks[-1].offset + blocks[-1].size)


def run_fast(
    problem: FlatProblem,
    ev: Evaluator,
    g: np.ndarray,
    start: StartingPoint,
    tol: Tolerance,
    options: CheckOptions,
) -> tuple[list[BlockResult], list[str]]:
    """Fast mode over every block; returns the block results and warnings.

    Each random direction spans every block and is first checked across all of
    them: two evaluations when it agrees, two more to extrapolate. A direction
    that still disagrees smoothly is explained, where it can be, by one wrong entry
    searched for across the blocks at once (``at_once``). Otherwise it is narrowed
    down to blocks: up to `SCAN_BLOCKS` blocks are checked one by one, more are
    halved (group testing: a half along which the direction agrees passes as a
    whole, and a half is again searched at once first). Each block checked on its
    own gets the full refinement and kink test; those verdicts are the check's, and
    a failing block is localised.
    """
    rng = np.random.default_rng([options.seed, 0xFA57])  # every bit of the seed counts
    line = _Line(ev, g, start, tol)
    probes = options.probes
    results: dict[int, BlockResult] = {}  # by id() of the block

    def screen(
        group: list[Block], directions: list[np.ndarray]
    ) -> list[tuple[np.ndarray, _Verdict]]:
        """The directions that disagree along ``group`` (extrapolated, not refined), with
        their verdicts."""
        support, count = _span(group), sum(b.size for b in group)
        verdicts = [
            (v, line.check(v, support, count, refine=False, defer=True)) for v in directions
        ]
        return [(v, verdict) for v, verdict in verdicts if not verdict.passed]

    def at_once(group: list[Block], failing: list[tuple[np.ndarray, _Verdict]]) -> bool:
        """Settle ``group`` by one wrong entry that explains every failing direction, if one does.

        The first direction must disagree smoothly (no kink to refine first); the
        entry it leads to must check out as wrong, and every failing direction must
        agree without it. Its block then fails, and every other block passes.
        """
        (v, verdict), others = failing[0], failing[1:]
        probe = _Probe(line, group)
        if not verdict.provisional or probe.count <= SCAN_BELOW:
            return False
        named = probe.one_entry(v, verdict)
        if named is None:
            return False
        entry, i, d = named
        if not all(probe.check_without(w, [i], refine=False).passed for w, _ in others):
            return False
        for b in group:
            results[id(b)] = _passed(b, line.scale(b), probes)
        block = probe.block_of(i)
        analytic = line.sums(v, block.slice)[0]
        results[id(block)] = _failed(
            results[id(block)], len(failing), [entry], True, analytic, analytic - d
        )
        return True

    def settle(group: list[Block], failing: list[tuple[np.ndarray, _Verdict]]) -> None:
        """Verdicts for ``group``, along which the ``failing`` directions disagree (none: all
        pass)."""
        if failing and len(group) > 1 and at_once(group, failing):
            return
        directions = [v for v, _ in failing]
        if not failing or len(group) <= SCAN_BLOCKS:
            for block in group:
                results[id(block)] = _Probe(line, [block]).run(directions, probes)
            return
        half = len(group) // 2
        for part in (group[:half], group[half:]):
            settle(part, screen(part, directions) if len(part) > 1 else failing)

    blocks = list(problem.blocks)
    failing = []  # only directions that fail are kept (O(P) each)
    everything = _span(blocks)
    for _ in range(probes):
        v = line.draw(rng)
        verdict = line.check(v, everything, problem.size, refine=False, defer=True)
        if not verdict.passed:
            failing.append((v, verdict))
            continue
        if line.direction is None:
            line.direction = v
    settle(blocks, failing)
    for b in blocks:  # a block whose share of g . v was below what the directions resolve
        if results[id(b)].passed and (line.direction is not None or failing):
            results[id(b)] = _Probe(line, [b]).resolved(b, [v for v, _ in failing], results[id(b)])
    warnings = []
    if any(r.mismatches for r in results.values()):
        warnings.append(
            "fast mode: a failing block is localised by bisection; "
            "run mode='full' to compare every entry"
        )
    return [results[id(b)] for b in blocks], warnings
