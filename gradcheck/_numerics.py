"""Numerical derivatives with error estimates: steps, central differences, Richardson, kinks.

Framework-free. Everything here works on arrays of loss values that the
`Evaluator` obtains from a `gradcheck._problem.FlatProblem`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _memory
from ._options import Tolerance
from ._problem import FlatProblem
from .errors import NonFiniteError

#: Largest (k, P) float64 array of perturbed points built for one batched call.
BATCH_BYTES = 32 * 2**20

#: Entries per piece where a whole row is written (the piece stays in cache between passes).
_PIECE = 1 << 15

#: Step factors of the refinement, relative to the first-pass step (ratio 2 between neighbours).
REFINE_FACTORS = (16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125)
_FIRST = REFINE_FACTORS.index(1.0)

_ROUND = {"float64": np.float64, "float32": np.float32}

#: Entries of a direction that may be nonzero: a slice or an index array.
Support = slice | np.ndarray


class BudgetExhausted(Exception):
    """Raised inside the checker when ``max_evals`` would be exceeded."""


class NotDeterministic(Exception):
    """Raised inside the checker when two evaluations at the starting point differ."""

    def __init__(self, first: float, second: float) -> None:
        super().__init__(first, second)
        self.first, self.second = first, second


class Evaluator:
    """Evaluates the loss at perturbed points, batched where the problem allows, and counts."""

    def __init__(self, problem: FlatProblem, max_evals: int | None) -> None:
        self.problem = problem
        self.max_evals = max_evals
        self.count = 0
        self.theta0 = problem.theta0
        self._rows: np.ndarray | None = None
        self._dirty = 0  # leading rows of ``_rows`` that may differ from ``theta0``
        self._piece = np.empty(min(_PIECE, max(problem.size, 1)))
        size = max(problem.size, 1)
        self.chunk = max(1, min(problem.max_batch, BATCH_BYTES // (8 * size)))
        self._round = _ROUND.get(problem.precision, np.float64)

    def charge(self, n: int) -> None:
        if self.max_evals is not None and self.count + n > self.max_evals:
            raise BudgetExhausted
        self.count += n

    def representable(self, values: np.ndarray) -> np.ndarray:
        """``values`` rounded to the precision the model runs in (so steps are exact)."""
        if self._round is np.float64:
            return np.asarray(values, dtype=np.float64)
        return np.asarray(values, dtype=self._round).astype(np.float64)

    def point(self, theta: np.ndarray) -> float:
        """The loss at one point, through the same path (batched or not) as the perturbations."""
        self.charge(1)
        batch = self.problem.loss_batch
        if batch is not None:
            return float(np.asarray(batch(theta[None, :]), dtype=np.float64).reshape(-1)[0])
        return float(self.problem.loss(theta))

    def _buffer(self, k: int, clean: bool = True) -> np.ndarray:
        """``k`` rows, kept between calls: with ``clean``, equal to ``theta0``, so that a call
        writes only the entries it perturbs and puts them back (O(entries), not O(P), per
        evaluation). A call that writes whole rows asks for them unclean (nothing is filled)
        and marks them dirty: they are filled with ``theta0`` only when a later call needs it."""
        rows = self._rows
        if rows is None or rows.shape[0] < k:
            rows = self._rows = _memory.empty((k, self.theta0.size))
            self._dirty = k
        if clean and self._dirty:
            rows[: self._dirty] = self.theta0
            self._dirty = 0
        return rows[:k]

    def _values(self, rows: np.ndarray) -> np.ndarray:
        batch = self.problem.loss_batch
        if batch is not None:
            return np.asarray(batch(rows), dtype=np.float64).reshape(-1)
        return np.array([self.problem.loss(row) for row in rows], dtype=np.float64)

    def coordinates(self, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The loss at ``theta0`` with entry ``idx[j]`` set to ``values[j]``, for every ``j``."""
        n = len(idx)
        self.charge(n)
        out = np.empty(n, dtype=np.float64)
        width = self.chunk if self.problem.loss_batch is not None else 1
        for start in range(0, n, width):
            stop = min(start + width, n)
            rows = self._buffer(stop - start)
            at = (np.arange(stop - start), idx[start:stop])
            rows[at] = values[start:stop]
            try:
                out[start:stop] = self._values(rows)
            finally:
                rows[at] = self.theta0[idx[start:stop]]
        return out

    def along(
        self, direction: np.ndarray, steps: np.ndarray, support: Support | None = None
    ) -> np.ndarray:
        """The loss at ``theta0 + s * direction`` for every ``s`` in ``steps``.

        ``support`` (a slice or index array) names the entries where ``direction``
        is nonzero, if known: only those are touched (O(support) work per row). Where
        every entry moves, in float64, a problem's ``loss_along`` evaluates the points
        itself (written where its adapter evaluates them, with the same bits).
        """
        n = len(steps)
        self.charge(n)
        out = np.empty(n, dtype=np.float64)
        size = self.theta0.size
        where: Support = slice(None) if support is None else support
        whole = isinstance(where, slice) and where.indices(size) == (0, size, 1)
        line = self.problem.loss_along
        if whole and self._round is np.float64 and line is not None:
            # the adapter writes each point into its own working vector (no rows here)
            values = np.asarray(line(direction, np.asarray(steps, dtype=np.float64)))
            out[:] = values.astype(np.float64, copy=False).reshape(-1)
            return out
        part_of = direction[where]
        base = self.theta0[where]
        width = self.chunk if self.problem.loss_batch is not None else 1
        for start in range(0, n, width):
            part = steps[start : start + width]
            if whole and self._round is np.float64:
                # every entry moves: each row is written as theta0 + s v, piece by piece (in
                # cache), with nothing filled before or put back after
                rows = self._buffer(len(part), clean=False)
                self._dirty = max(self._dirty, len(part))
                moved = self._piece
                for lo in range(0, size, _PIECE):  # (a piece of v and theta0 read once)
                    hi = min(lo + _PIECE, size)
                    shift, base_piece, last = moved[: hi - lo], self.theta0[lo:hi], None
                    for row, s in zip(rows, part, strict=True):
                        # theta0 - s v for a step -s after s: the same bits as theta0 + (-s) v
                        if last is None or (s != last and s != -last):
                            np.multiply(direction[lo:hi], s, out=shift)
                            last = s
                        if s == last:
                            np.add(base_piece, shift, out=row[lo:hi])
                        else:
                            np.subtract(base_piece, shift, out=row[lo:hi])
                out[start : start + len(part)] = self._values(rows)
                continue
            rows = self._buffer(len(part))
            try:
                for row, s in zip(rows, part, strict=True):
                    if isinstance(where, slice) and self._round is np.float64:
                        view = row[where]  # written in place, no temporaries
                        np.multiply(part_of, s, out=view)
                        view += base
                    else:
                        moved = s * part_of
                        moved += base
                        row[where] = self.representable(moved)
                out[start : start + len(part)] = self._values(rows)
            finally:
                rows[:, where] = base
        return out


class StartingPoint:
    """The loss at ``theta0``, evaluated when a verdict first needs it.

    It is evaluated twice: a forward pass that is still random gives two different
    values, and the check must stop as inconclusive rather than blame the noise on
    the gradient (`NotDeterministic`). Full mode needs the value for every entry and
    asks at once; fast mode settles a direction that agrees from ``f(theta0 ± s v)``
    alone, and asks only before it judges one that does not (so that no failing
    verdict is ever reached without the determinism check).
    """

    def __init__(self, ev: Evaluator) -> None:
        self.ev = ev
        self._value: float | None = None

    @property
    def value(self) -> float:
        if self._value is None:
            theta0 = self.ev.theta0
            f0 = self.ev.point(theta0)
            if not math.isfinite(f0):
                raise NonFiniteError(f"the loss is not finite at the starting point: {f0}")
            again = self.ev.point(theta0)
            if again != f0:
                raise NotDeterministic(f0, again)
            self._value = f0
        return self._value


def base_steps(theta: np.ndarray, tol: Tolerance) -> np.ndarray:
    """The first-pass step of every entry: ``tol.step * max(|theta_i|, 1)``.

    Relative to the entry's magnitude for large entries (a weight of 1e3 is
    probed with a step of 1e3 * step), absolute for entries below 1: the
    curvature of a loss in a small parameter (a bias of 0.01, a weight of 1e-4)
    is set by the rest of the model, not by the parameter's own size, and a
    step that shrank with it would drown in round-off.
    """
    return tol.step * np.maximum(np.abs(theta), 1.0)


@dataclass
class Differences:
    """Loss values at ``theta0 ± steps`` for a set of entries, and what follows from them."""

    f0: float
    fp: np.ndarray  # f(theta + hp)
    fm: np.ndarray  # f(theta - hm)
    hp: np.ndarray  # actual forward step (> 0)
    hm: np.ndarray  # actual backward step (> 0)

    @property
    def central(self) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return (self.fp - self.fm) / (self.hp + self.hm)

    @property
    def right(self) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return (self.fp - self.f0) / self.hp

    @property
    def left(self) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return (self.f0 - self.fm) / self.hm

    def roundoff(self, tol: Tolerance) -> np.ndarray:
        """Estimated round-off error of the central difference."""
        with np.errstate(invalid="ignore", over="ignore"):
            level = np.maximum(np.maximum(np.abs(self.fp), np.abs(self.fm)), abs(self.f0))
            return central_roundoff(tol, level, self.hp + self.hm)


def central_roundoff(tol: Tolerance, level: Any, width: Any) -> Any:
    """Round-off error of ``(fp - fm) / width`` for loss values of magnitude up to ``level``."""
    return tol.noise * tol.eps * level * 2.0 / width


def coordinate_differences(ev: Evaluator, idx: np.ndarray, h: np.ndarray, f0: float) -> Differences:
    """Central-difference data for the entries ``idx`` with nominal steps ``h``."""
    theta = ev.theta0[idx]
    xp = ev.representable(theta + h)
    xm = ev.representable(theta - h)
    hp = xp - theta
    hm = theta - xm
    # a step lost to rounding (h below the spacing of theta): take the next representable values
    tiny = (hp <= 0) | (hm <= 0)
    if np.any(tiny):
        dtype = ev._round
        xp[tiny] = np.nextafter(theta[tiny].astype(dtype), dtype(np.inf)).astype(np.float64)
        xm[tiny] = np.nextafter(theta[tiny].astype(dtype), dtype(-np.inf)).astype(np.float64)
        hp, hm = xp - theta, theta - xm
    fp = ev.coordinates(idx, xp)
    fm = ev.coordinates(idx, xm)
    return Differences(f0=f0, fp=fp, fm=fm, hp=hp, hm=hm)


@dataclass
class Refined:
    """Refined estimates for a set of entries."""

    numeric: np.ndarray
    error: np.ndarray
    kink: np.ndarray  # bool: one-sided derivatives disagree beyond what curvature explains
    lo: np.ndarray  # smallest one-sided derivative seen
    hi: np.ndarray  # largest one-sided derivative seen
    left: np.ndarray  # one-sided derivatives at the smallest step
    right: np.ndarray
    one_sided_noise: np.ndarray  # error of the one-sided derivatives (round-off + truncation)
    step: np.ndarray  # the smallest step used
    right0: np.ndarray  # one-sided derivatives extrapolated to step 0
    left0: np.ndarray
    flat: np.ndarray  # bool: the loss did not change at all at any step (float resolution)
    floor: np.ndarray  # the model's round-off in the extrapolation from the largest steps

    def take(self, where: np.ndarray, other: Refined, sel: np.ndarray) -> None:
        """Replace this record's entries ``where`` with ``other``'s entries ``sel``."""
        for name in (
            "numeric",
            "error",
            "kink",
            "lo",
            "hi",
            "left",
            "right",
            "one_sided_noise",
            "step",
            "right0",
            "left0",
            "flat",
            "floor",
        ):
            getattr(self, name)[where] = getattr(other, name)[sel]


def _extrapolate(d: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Richardson values of neighbouring steps and the one with the smallest error estimate.

    ``d``: central differences, one row per step (ratio 2); ``r``: their round-off.
    Returns (numeric, error) per entry.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        rich = d[1:] + (d[1:] - d[:-1]) / 3.0  # (n_steps - 1, n)
        rich_noise = (4.0 * r[1:] + r[:-1]) / 3.0
        gaps = np.abs(np.diff(rich, axis=0))
        below = np.full_like(rich, -np.inf)
        above = np.full_like(rich, -np.inf)
        below[1:] = gaps
        above[:-1] = gaps
        err = np.maximum(below, above) + rich_noise
    err = np.where(np.isfinite(err) & np.isfinite(rich), err, np.inf)
    best = np.argmin(err, axis=0)
    cols = np.arange(d.shape[1])
    numeric = rich[best, cols]
    error = err[best, cols]
    # entries with no finite extrapolation: fall back to the best finite plain difference
    lost = ~np.isfinite(error)
    if np.any(lost):
        plain_err = np.where(np.isfinite(d), r, np.inf)
        k = np.argmin(plain_err, axis=0)
        numeric = np.where(lost, d[k, cols], numeric)
        error = np.where(lost, np.where(np.isfinite(d[k, cols]), np.abs(d[k, cols]), np.inf), error)
    return numeric, error


def refine(
    at_factor: Callable[[float], Differences], first: Differences, tol: Tolerance
) -> Refined:
    """Richardson extrapolation over steps ``h * REFINE_FACTORS`` and a kink test.

    ``at_factor(f)`` evaluates the differences with the first-pass steps scaled by
    ``f``; the first pass (factor 1) is reused, every other factor costs two
    evaluations per entry. For each pair of neighbouring steps the extrapolated value removes
    the h**2 error term; the error of each extrapolated value is estimated from its
    disagreement with its neighbours plus round-off, and the value with the smallest
    estimate wins. The kink test compares the gap between right and left
    derivatives at the largest and smallest step: smooth functions shrink it in
    proportion to the step, a kink inside the step does not.
    """
    diffs: list[Differences] = []
    for factor in REFINE_FACTORS:
        if factor == 1.0:
            diffs.append(first)
        else:
            diffs.append(at_factor(factor))
    d = np.stack([x.central for x in diffs])  # (n_steps, n)
    r = np.stack([x.roundoff(tol) for x in diffs])
    # Round-off seen in the values themselves: second differences scale as step**2 on a
    # smooth loss, so what remains of Δ2(s/2) - Δ2(s)/4 is noise (a sigmoid quantised
    # inside a log, cancellation inside the loss: a staircase) that an estimate
    # proportional to |f| cannot see. The largest over the pairs of steps counts. A kink
    # breaks the scaling too, so kink entries keep the model's round-off (below).
    with np.errstate(invalid="ignore", over="ignore"):
        delta2 = np.stack([x.fp - 2.0 * x.f0 + x.fm for x in diffs])
        second = np.abs(delta2[1:] - delta2[:-1] / 4.0)
        seen = np.where(np.isfinite(second), second, 0.0).max(axis=0)
        steps = np.stack([(x.hp + x.hm) / 2.0 for x in diffs])
        r_seen = np.maximum(r, seen[None, :] / steps)
    flat = np.all(np.stack([(x.fp == x.f0) & (x.fm == x.f0) for x in diffs]), axis=0)
    numeric, error = _extrapolate(d, r_seen)
    with np.errstate(invalid="ignore", over="ignore"):
        floor = np.min((4.0 * r[1:] + r[:-1]) / 3.0, axis=0)
    kink_numeric, kink_error = _extrapolate(d, r)

    rights = np.stack([x.right for x in diffs])
    lefts = np.stack([x.left for x in diffs])
    small, before, large = diffs[-1], diffs[-2], diffs[0]
    with np.errstate(invalid="ignore", over="ignore"):
        # one-sided derivatives extrapolated to step 0 (their error is O(h), not O(h**2))
        right0 = 2.0 * small.right - before.right
        left0 = 2.0 * small.left - before.left
        one_sided = np.concatenate([rights, lefts, right0[None], left0[None]])
        finite = np.isfinite(one_sided)
        lo = np.where(finite, one_sided, np.inf).min(axis=0)
        hi = np.where(finite, one_sided, -np.inf).max(axis=0)
        gap_small = np.abs(small.right - small.left)
        gap_large = np.abs(large.right - large.left)
        # (round-off as the model's scale predicts it: a kink also breaks the s**2 scaling
        # of second differences, so the noise seen in them must not hide the kink)
        noise = 4.0 * small.roundoff(tol)
        truncation = np.maximum(
            np.abs(small.right - before.right), np.abs(small.left - before.left)
        )
        one_sided_noise = noise + np.where(np.isfinite(truncation), truncation, 0.0)
        kink = (gap_small > 0.25 * gap_large) & (gap_small > tol.safety * noise)
    kink = np.where(np.isfinite(gap_small) & np.isfinite(gap_large), kink, False)
    numeric = np.where(kink, kink_numeric, numeric)
    error = np.where(kink, kink_error, error)
    return Refined(
        numeric=numeric,
        error=error,
        kink=kink,
        lo=lo,
        hi=hi,
        left=small.left,
        right=small.right,
        one_sided_noise=one_sided_noise,
        step=np.minimum(small.hp, small.hm),
        right0=right0,
        left0=left0,
        flat=flat,
        floor=floor,
    )


def shrink_until_finite(
    ev: Evaluator, idx: np.ndarray, h: np.ndarray, first: Differences, tries: int = 6
) -> None:
    """Retry entries whose loss is not finite at ``theta0 ± h`` with steps 10x smaller, in place.

    A step can leave the loss's domain (``sqrt`` or ``log`` of a small positive
    entry); the entry is then probed closer to its value, and ``h`` and ``first``
    are updated for it, so refinement starts from the step that worked.
    """
    for _ in range(tries):
        lost = np.flatnonzero(~(np.isfinite(first.fp) & np.isfinite(first.fm)))
        if not lost.size:
            return
        h[lost] /= 10.0
        retry = coordinate_differences(ev, idx[lost], h[lost], first.f0)
        first.fp[lost], first.fm[lost] = retry.fp, retry.fm
        first.hp[lost], first.hm[lost] = retry.hp, retry.hm


def subset(d: Differences, sel: np.ndarray) -> Differences:
    return Differences(f0=d.f0, fp=d.fp[sel], fm=d.fm[sel], hp=d.hp[sel], hm=d.hm[sel])


#: further refinements, from steps this much smaller, for entries whose error stays too large
DEEPER = (1.0 / 16.0, 1.0 / 256.0)
#: ... and from steps this much larger, where the error is round-off (tiny gradients)
GROW = (16.0, 256.0)


def refine_until_resolved(
    at: Callable[[float, np.ndarray], Differences],
    first: Differences,
    tol: Tolerance,
    wanted: np.ndarray,
) -> Refined:
    """`refine`, repeated from other steps where the error estimate stays above ``wanted``.

    ``at(factor, sel)`` evaluates the differences of the entries ``sel`` with their
    first-pass steps scaled by ``factor``. Where ``safety * error`` exceeds the
    resolution the tolerance asks for (``wanted``, per entry), the numbers cannot
    tell a small bug from numerical error. Two causes, two remedies:

    - truncation: a loss whose curvature scale is far below the step (``log`` or
      ``1/x`` of a tiny entry, a kink within the step) is probed 16x and 256x closer;
    - round-off: a gradient far below the loss's own magnitude (the early layers of a
      deep network whose gradients vanish, 1e-11 against a loss of 1) changes the loss
      by less than its round-off at the default step, and the truncation error scales
      with the same tiny higher derivatives: it is probed 16x and 256x farther.

    Each keeps whichever estimate has the smaller error; the entries where it still
    stays above ``wanted`` may be unresolved (see `gradcheck._full.unresolved_mask`).
    """
    everyone = np.arange(len(first.fp))
    r = refine(lambda factor: at(factor, everyone), first, tol)
    taken_at = np.ones(len(first.fp))  # the step factor of each entry's current estimate
    for shrink in DEEPER:
        with np.errstate(invalid="ignore"):
            could_help = ~(r.error <= r.floor * (taken_at / shrink))
            weak = np.flatnonzero(~(tol.safety * r.error <= wanted) & could_help)
        if not weak.size:
            break
        _refine_from(at, r, weak, shrink, tol, taken_at)
    for grow in GROW:
        with np.errstate(invalid="ignore"):
            # round-off dominates: the error is within a few times the model's round-off at
            # the largest steps (or the loss did not change at all), and no kink
            roundoff = (r.error <= 4.0 * r.floor) | r.flat
            weak = np.flatnonzero(~(tol.safety * r.error <= wanted) & roundoff & ~r.kink)
        if not weak.size:
            break
        _refine_from(at, r, weak, grow, tol, taken_at)
    return r


def _refine_from(
    at: Callable[[float, np.ndarray], Differences],
    r: Refined,
    weak: np.ndarray,
    factor: float,
    tol: Tolerance,
    taken_at: np.ndarray,
) -> None:
    """Refine the entries ``weak`` from steps ``factor`` times their first-pass steps and
    keep, per entry, whichever of the two estimates has the smaller error (in ``r``)."""

    def scaled(f: float) -> Differences:
        return at(factor * f, weak)

    other = refine(scaled, scaled(1.0), tol)
    with np.errstate(invalid="ignore"):
        # a loss that stops changing at the smaller steps is below its resolution there
        better = (other.error < r.error[weak]) & ~(other.flat & (factor < 1.0))
    r.take(weak[better], other, better)
    taken_at[weak[better]] = factor


def one_sided(
    ev: Evaluator, idx: np.ndarray, h: np.ndarray, sign: np.ndarray, f0: float, tol: Tolerance
) -> tuple[np.ndarray, np.ndarray]:
    """Derivatives of entries ``idx`` from one side only: (estimate, error estimate).

    Where the loss is finite on one side of an entry and not on the other (a domain
    boundary at the point itself), ``sign`` (+1 or -1 per entry) names the side. The
    second-order one-sided formula ``(-3 f0 + 4 f(s) - f(2 s)) / (2 s)`` (``s`` the
    signed step) at steps ``h`` and ``h/2`` is extrapolated (its error is O(h**2)); the
    error estimate is the extrapolation's own correction plus round-off. Three
    evaluations per entry. Non-finite values give an infinite error.
    """
    theta = ev.theta0[idx]
    points = [ev.representable(theta + sign * h * k) for k in (0.5, 1.0, 2.0)]
    f_half, f_one, f_two = (ev.coordinates(idx, p) for p in points)
    s = np.abs(points[1] - theta)  # the steps actually taken
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        coarse = sign * (-3.0 * f0 + 4.0 * f_one - f_two) / (2.0 * s)
        fine = sign * (-3.0 * f0 + 4.0 * f_half - f_one) / s
        value = fine + (fine - coarse) / 3.0
        level = np.maximum(np.maximum(np.abs(f_half), np.abs(f_one)), abs(f0))
        roundoff = tol.noise * tol.eps * level * 8.0 / s
        error = np.abs(fine - coarse) / 3.0 + roundoff
    bad = ~(np.isfinite(value) & np.isfinite(error))
    return np.where(bad, np.nan, value), np.where(bad, np.inf, error)


def line_differences(
    ev: Evaluator, direction: np.ndarray, s: float, f0: float, support: Support | None = None
) -> Differences:
    """Central-difference data along ``theta0 + t * direction`` with step ``s``.

    ``support``: where ``direction`` is nonzero, if known (see `Evaluator.along`).
    """
    fp, fm = ev.along(direction, np.array([s, -s]), support)
    return line_data(f0, float(fp), float(fm), s)


def line_data(f0: float, fp: float, fm: float, s: float) -> Differences:
    """The central-difference data of one direction: ``f0`` and ``f(theta0 ± s v)``."""
    one = np.ones(1)
    return Differences(f0=f0, fp=np.array([fp]), fm=np.array([fm]), hp=s * one, hm=s * one)
