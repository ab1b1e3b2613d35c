"""Full mode: every entry of a block, judged by the rules of `gradcheck._verdict`.

`judge_entries` refines entries and decides them (fast mode calls it on the entries its
localisation names); `_FullBlock` runs full mode on one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _memory
from ._diagnosis import diagnose
from ._numerics import (
    Differences,
    Evaluator,
    Refined,
    base_steps,
    coordinate_differences,
    one_sided,
    refine_until_resolved,
    shrink_until_finite,
    subset,
)
from ._options import CheckOptions, Tolerance
from ._problem import Block
from ._report import MAX_ROWS, BlockResult, Entry
from ._verdict import agrees, allowance, beside_agrees, block_floor, decide, unresolved_mask

#: kink entries per block whose backward is checked on both sides of the kink (2 gradients each)
KINK_SIDE_CHECKS = 256


@dataclass
class Judged:
    """Full mode's verdict on some entries after refinement (arrays in the order given)."""

    ok: np.ndarray
    numeric: np.ndarray
    error: np.ndarray
    allowed: np.ndarray
    kink: np.ndarray  # not differentiable within the step, judged by the one-sided derivatives
    lo: np.ndarray
    hi: np.ndarray
    unverified_kinks: int  # coincident kinks beyond ``side_checks``, accepted unchecked
    below_resolution: int  # accepted: the loss cannot resolve their gradient
    invisible: np.ndarray  # bool: the loss is flat and the gradient too small to show


def judge_entries(
    ev: Evaluator,
    idx: np.ndarray,
    a: np.ndarray,
    h: np.ndarray,
    first: Differences,
    f0: float,
    tol: Tolerance,
    floor: float,
    side_checks: int = KINK_SIDE_CHECKS,
) -> Judged:
    """Refine the entries ``idx`` (absolute indices; analytic values ``a``; first-pass
    steps ``h`` and differences ``first``) and decide each as full mode does.

    An entry passes when it agrees with its refined numerical derivative within
    ``floor + rtol * |numeric| + safety * error`` (plus ``rtol`` times the gap between the
    one-sided derivatives); at a kink, when its value lies between the one-sided
    derivatives, or else when the backward just beside the kink matches them (at most
    ``side_checks`` entries; `_both_sides`); and where the loss does not change at float
    resolution and the gradient is too small to show.
    """
    r = refine_until_resolved(
        lambda factor, sel: coordinate_differences(ev, idx[sel], h[sel] * factor, f0),
        first,
        tol,
        wanted=floor + tol.rtol * np.abs(a),
    )
    d = decide(a, r, floor, tol.rtol, tol, f0, h)
    accepted = d.ok.copy()
    outside = np.flatnonzero(d.beside)
    checked, unchecked = outside[:side_checks], outside[side_checks:]
    if checked.size:
        accepted[checked] = _both_sides(ev, tol, idx[checked], r, checked, floor)
    if unchecked.size:  # beyond the budget: not verified, not blamed either
        accepted[unchecked] = True
    invisible = ~accepted & d.tiny
    accepted[invisible] = True
    return Judged(
        ok=accepted,
        numeric=r.numeric,
        error=r.error,
        allowed=d.allowed,
        kink=d.kink,
        lo=r.lo,
        hi=r.hi,
        unverified_kinks=int(unchecked.size),
        below_resolution=int(np.sum(invisible)),
        invisible=d.tiny,
    )


def _both_sides(
    ev: Evaluator, tol: Tolerance, entries: np.ndarray, r: Refined, pos: np.ndarray, floor: float
) -> np.ndarray:
    """A kink entry whose analytic value is no one-sided derivative: check just off the kink.

    Several kinks can coincide along one coordinate: a zero-initialised ReLU
    layer puts every unit on its kink at once, and max-pool windows that
    overlap can share a tie. The value a backward returns there is a
    convention (``relu'(0) = 0``, the first argmax of each window) and can lie
    outside the one-sided derivatives of the sum: any combination of the
    units' one-sided choices is valid, and the sum hides the units. What can be
    checked is the backward pass on either side: the analytic gradient a step
    to the right must match the right derivative, and a step to the left the
    left one. Two gradient evaluations per entry (``entries``: absolute indices;
    ``pos``: their positions in ``r``).
    """
    problem = ev.problem
    ok = np.zeros(entries.size, dtype=bool)
    for j, (i, p) in enumerate(zip(entries.tolist(), pos.tolist(), strict=True)):
        step = float(r.step[p]) / 2.0
        sides = []
        for sign, expected in ((1.0, r.right0[p]), (-1.0, r.left0[p])):
            theta = _memory.copy(problem.theta0)
            theta[i] = ev.representable(np.array([theta[i] + sign * step]))[0]
            ev.charge(1)
            g = np.asarray(problem.gradient(theta), dtype=np.float64)[i]
            noise = float(r.one_sided_noise[p])
            sides.append(beside_agrees(float(g), float(expected), noise, floor, tol.rtol, tol))
        ok[j] = all(sides)
    return ok


class _FullBlock:
    """Full mode on one block: every entry, refined where the first pass disagrees or cannot
    resolve it."""

    def __init__(
        self,
        ev: Evaluator,
        block: Block,
        g: np.ndarray,
        h: np.ndarray,
        f0: float,
        tol: Tolerance,
        grad_scale: float,
        max_refine: int,
    ) -> None:
        self.ev, self.block, self.tol, self.f0 = ev, block, tol, f0
        self.idx = np.arange(block.offset, block.offset + block.size)
        self.a = g[block.slice]
        self.h = h[block.slice].copy()
        self.grad_scale = grad_scale
        self.max_refine = max_refine
        self.unverified_kinks = 0  # coincident kinks beyond KINK_SIDE_CHECKS
        self.below_resolution = 0  # entries the loss cannot resolve in float64
        self.one_sided = 0  # entries measured from one side (the loss is not finite on the other)

    def run(self) -> tuple[BlockResult, np.ndarray]:
        tol, a = self.tol, self.a
        first = coordinate_differences(self.ev, self.idx, self.h, self.f0)
        nominal = (first.fp.copy(), first.fm.copy(), self.h.copy())
        shrink_until_finite(self.ev, self.idx, self.h, first)
        numeric = first.central
        error = first.roundoff(tol)
        finite = np.isfinite(numeric)
        scale = float(np.max(np.abs(numeric[finite]))) if np.any(finite) else 0.0
        floor = block_floor(tol, scale, self.grad_scale)
        with np.errstate(invalid="ignore"):
            curvature = np.abs(first.right - first.left)
        allowed = allowance(tol, numeric, error, floor, tol.rtol, curvature)
        ok = agrees(a, numeric, allowed)
        kink = np.zeros(a.size, dtype=bool)
        lo = np.full(a.size, np.nan)
        hi = np.full(a.size, np.nan)
        unresolved = np.zeros(a.size, dtype=bool)
        lost = np.flatnonzero(~finite)
        if lost.size:
            self._one_side(lost, nominal, first, floor, numeric, error, allowed, ok)
            unresolved[lost] = ~np.isfinite(numeric[lost])
            ok[lost] |= unresolved[lost]  # not measured: not a mismatch, not agreement either
        two_sided = np.isfinite(first.central)
        suspicious = np.flatnonzero(~ok & two_sided)
        vague = unresolved_mask(tol, a, numeric, error, scale, floor)
        coarse = np.flatnonzero(ok & two_sided & vague)
        coarse = coarse[~self._zero_everywhere(coarse, first)]
        # an entry measured from one side is not refined: too coarse, it stays unresolved
        one = lost[np.isfinite(numeric[lost])]
        unresolved[one] |= ok[one] & vague[one]
        # refinement budget: the worst suspicious entries first, then the coarse ones
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.abs(a - numeric)[suspicious] / np.maximum(allowed[suspicious], 1e-300)
        order = np.concatenate(
            [suspicious[np.argsort(-np.nan_to_num(ratio, nan=np.inf), kind="stable")], coarse]
        ).astype(np.intp)
        chosen, rest = order[: self.max_refine], order[self.max_refine :]
        if chosen.size:
            judged = self._refine(chosen, first, floor, numeric, error, allowed, kink, lo, hi)
            ok[chosen] = judged.ok
            unresolved[chosen] = (
                judged.ok
                & ~judged.kink
                & ~judged.invisible
                & unresolved_mask(tol, a[chosen], numeric[chosen], error[chosen], scale, floor)
            )
        rest_suspicious = rest[~ok[rest]]
        if rest_suspicious.size:
            ok[rest_suspicious] = self._decide_unrefined(
                rest_suspicious, first, floor, allowed, kink, lo, hi
            )
        unresolved[rest[np.isin(rest, coarse)]] = True  # coarse beyond the budget: not verified
        allowed = np.where(np.isfinite(allowed), allowed, np.inf)
        result = self._result(
            numeric,
            error,
            allowed,
            ~ok,
            kink,
            lo,
            hi,
            scale,
            unresolved,
            refined=min(order.size, self.max_refine),
            unrefined=max(suspicious.size - self.max_refine, 0),
        )
        return result, numeric

    def _zero_everywhere(self, entries: np.ndarray, first: Differences) -> np.ndarray:
        """Which of ``entries`` have an analytic zero and a loss that takes the same value on
        both sides at the first step (flat, or a jump on both sides: a label compared with
        ``==``): zero agrees with zero exactly (a piecewise-constant op, an unused
        parameter, a label). A hidden tiny gradient would move the two sides apart."""
        return (self.a[entries] == 0) & (first.fp[entries] == first.fm[entries])

    def _one_side(
        self,
        lost: np.ndarray,
        nominal: tuple[np.ndarray, np.ndarray, np.ndarray],
        first: Differences,
        floor: float,
        numeric: np.ndarray,
        error: np.ndarray,
        allowed: np.ndarray,
        ok: np.ndarray,
    ) -> None:
        """Entries ``lost`` (positions in the block) whose loss is not finite on both sides at
        any step tried: measured from the side where it is, at the first step that had it
        (`one_sided`). Where neither side is finite, they stay not finite (unresolved)."""
        fp0, fm0, h0 = nominal
        side = np.where(np.isfinite(fp0[lost]), 1.0, np.where(np.isfinite(fm0[lost]), -1.0, 0.0))
        late = np.where(
            np.isfinite(first.fp[lost]), 1.0, np.where(np.isfinite(first.fm[lost]), -1.0, 0.0)
        )
        step = np.where(side != 0, h0[lost], self.h[lost])
        side = np.where(side != 0, side, late)
        has = np.flatnonzero(side != 0)
        if not has.size:
            return
        pos = lost[has]
        value, err = one_sided(self.ev, self.idx[pos], step[has], side[has], self.f0, self.tol)
        tol = self.tol
        numeric[pos], error[pos] = value, err
        allowed[pos] = allowance(tol, value, err, floor, tol.rtol)
        ok[pos] = agrees(self.a[pos], value, allowed[pos])
        self.one_sided += int(np.sum(np.isfinite(value)))

    def _refine(
        self,
        chosen: np.ndarray,
        first: Differences,
        floor: float,
        numeric: np.ndarray,
        error: np.ndarray,
        allowed: np.ndarray,
        kink: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> Judged:
        judged = judge_entries(
            self.ev,
            self.idx[chosen],
            self.a[chosen],
            self.h[chosen],
            subset(first, chosen),
            self.f0,
            self.tol,
            floor,
        )
        numeric[chosen] = judged.numeric
        error[chosen] = judged.error
        allowed[chosen] = judged.allowed
        kink[chosen] = judged.kink
        lo[chosen] = judged.lo
        hi[chosen] = judged.hi
        self.unverified_kinks += judged.unverified_kinks
        self.below_resolution += judged.below_resolution
        return judged

    def _decide_unrefined(
        self,
        rest: np.ndarray,
        first: Differences,
        floor: float,
        allowed: np.ndarray,
        kink: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> np.ndarray:
        """Beyond the refinement budget: a generous test on first-pass data (sure mismatches)."""
        tol, a = self.tol, self.a[rest]
        with np.errstate(invalid="ignore"):
            left, right = first.left[rest], first.right[rest]
            curvature = np.abs(right - left)
            central = first.central[rest]
            generous = allowed[rest] + tol.safety * curvature
            ok = np.abs(a - central) <= generous
            low, high = np.minimum(left, right), np.maximum(left, right)
            inside = (a >= low - allowed[rest]) & (a <= high + allowed[rest])
        allowed[rest] = generous
        kink[rest] = ~ok & inside
        lo[rest], hi[rest] = low, high
        return ok | inside

    def _result(
        self,
        numeric: np.ndarray,
        error: np.ndarray,
        allowed: np.ndarray,
        bad: np.ndarray,
        kink: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        scale: float,
        unresolved: np.ndarray,
        refined: int,
        unrefined: int,
    ) -> BlockResult:
        block, a = self.block, self.a

        def entry(i: int) -> Entry:
            at_kink = bool(kink[i])
            return Entry(
                index=block.index(i),
                analytic=float(a[i]),
                numeric=float(numeric[i]),
                error=float(error[i]),
                tolerance=float(allowed[i]),
                kink=at_kink,
                one_sided=(float(lo[i]), float(hi[i])) if at_kink else None,
            )

        bad_idx = np.flatnonzero(bad)
        diffs = np.abs(a[bad_idx] - numeric[bad_idx])
        ranked = np.where(np.isnan(diffs), np.inf, diffs)  # a NaN analytic value first
        worst = bad_idx[np.argsort(-ranked, kind="stable")][:MAX_ROWS]
        kink_ok = np.flatnonzero(kink & ~bad)
        vague = np.flatnonzero(unresolved)
        measured = np.isfinite(numeric) & ~unresolved
        notes = []
        not_measured = int(np.sum(unresolved & ~np.isfinite(numeric)))
        if not_measured:
            notes.append(
                f"{not_measured} entries not checked: the loss is not finite on either side "
                "within the smallest step"
            )
        if vague.size - not_measured:
            notes.append(
                f"{vague.size - not_measured} entries unresolved: their numerical derivative "
                "cannot be estimated closely enough to tell a wrong gradient from round-off, "
                "at any step tried (a gradient far below the loss's magnitude?)"
            )
        if self.one_sided:
            notes.append(
                f"{self.one_sided} entries measured from one side (the loss is not finite on "
                "the other)"
            )
        if self.unverified_kinks:
            notes.append(
                f"{self.unverified_kinks} entries at coincident kinks accepted without the "
                f"two-sided check (at most {KINK_SIDE_CHECKS} per block)"
            )
        if self.below_resolution:
            notes.append(
                f"{self.below_resolution} entries not resolved: the loss does not change at "
                "float resolution within the steps, and their gradient is too small to show"
            )
        if unrefined:
            notes.append(
                f"{unrefined} suspicious entries judged on the first pass only "
                f"(max_refine={self.max_refine})"
            )
        if bad_idx.size and np.any(kink[bad_idx]):
            notes.append(
                f"{int(np.sum(kink[bad_idx]))} mismatches lie at non-differentiable points "
                "where the "
                "analytic value is not a one-sided derivative"
            )
        max_abs, max_rel = _max_diffs(a[measured], numeric[measured])
        return BlockResult(
            name=block.name,
            shape=block.shape,
            kind=block.kind,
            checked=block.size - not_measured,
            size=block.size,
            mismatches=int(bad_idx.size),
            worst=tuple(entry(int(i)) for i in worst),
            kinks=int(kink_ok.size),
            kink_examples=tuple(entry(int(i)) for i in kink_ok[:MAX_ROWS]),
            max_abs_diff=max_abs,
            max_rel_diff=max_rel,
            scale=scale,
            diagnosis=diagnose(a, numeric, bad, block.shape),
            note="; ".join(notes) or None,
            unresolved=int(vague.size),
            unresolved_examples=tuple(entry(int(i)) for i in vague[:MAX_ROWS]),
        )


def _max_diffs(a: np.ndarray, numeric: np.ndarray) -> tuple[float, float]:
    """The largest absolute and relative differences over the entries given (all measured)."""
    if not a.size:
        return 0.0, 0.0
    diffs = np.abs(a - numeric)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(numeric != 0, diffs / np.abs(numeric), np.where(diffs > 0, np.inf, 0.0))
    return float(diffs.max()), float(rel.max())


def full_block(
    ev: Evaluator, block: Block, g: np.ndarray, f0: float, tol: Tolerance
) -> BlockResult:
    """Full mode's verdict on one block (fast mode's fallback where a direction cannot be
    measured: full mode measures such entries from one side)."""
    h = np.zeros(ev.theta0.size)
    h[block.slice] = base_steps(ev.theta0[block.slice], tol)
    grad_scale = float(np.max(np.abs(g))) if g.size else 0.0
    result, _ = _FullBlock(ev, block, g, h, f0, tol, grad_scale, CheckOptions().max_refine).run()
    return result
