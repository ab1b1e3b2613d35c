"""Fast mode: random directional probes per block, then localisation of the wrong entries.

Along a direction ``v`` the analytic directional derivative is ``g . v``; the
numerical one is a central difference of ``t -> loss(theta0 + t v)``. One
difference (two evaluations) settles a correct block; one that disagrees is
extrapolated over two steps (Richardson, two more), then refined with the kink
test, before it fails. The cost does not depend on the block's size. Directions have entries
``±(1 + u) * max(|theta_i|, 1)`` with ``u`` uniform in [0, 1): every entry takes
part with a weight of at least 1 (a single wrong entry always shows), and
several wrong entries cancel only with vanishing probability.

The tolerance is the estimated numerical error (times ``safety``), plus the
round-off of the dot product, plus ``rtol`` times what one typical entry
contributes to the directional derivative. It is never scaled by the size of the
block. A failing block is searched by bisection: the discrepancy is linear in the
direction, so probing one half of the support tells which half holds the error;
each entry found is then checked like an entry in full mode.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ._diagnosis import diagnose
from ._numerics import (
    Differences,
    Evaluator,
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


def _first_difference(
    ev: Evaluator, v: np.ndarray, s: float, f0: float
) -> tuple[Differences, float]:
    """Central-difference data along ``v`` with step ``s``, and the step used.

    A step that leaves the loss's domain is retried 10x smaller, a few times.
    """
    for _ in range(6):
        big = line_differences(ev, v, s, f0)
        if np.isfinite(big.fp[0]) and np.isfinite(big.fm[0]):
            break
        s /= 10.0
    return big, s


def _richardson2(
    ev: Evaluator, v: np.ndarray, big: Differences, s: float, f0: float, tol: Tolerance
) -> tuple[float, float]:
    """Directional derivative extrapolated from steps s (``big``, given) and s/2.

    Returns (value, error estimate).
    """
    small = line_differences(ev, v, s / 2, f0)
    d1, d2 = float(big.central[0]), float(small.central[0])
    value = d2 + (d2 - d1) / 3.0
    # the extrapolation's own error is far below |d2 - d1| on smooth losses; the first
    # pass counts round-off only and sends anything that disagrees to full refinement
    error = 2.0 * float(small.roundoff(tol)[0])
    return value, error


class _Probe:
    """One block's directional check and, on failure, its localisation."""

    def __init__(
        self,
        ev: Evaluator,
        block: Block,
        g: np.ndarray,
        f0: float,
        tol: Tolerance,
        scale: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        self.ev, self.block, self.g, self.f0, self.tol = ev, block, g, f0, tol
        self.scale = scale
        self.rng = rng
        self.step = tol.step  # of the last direction checked

    def direction(self) -> np.ndarray:
        b = self.block
        signs = self.rng.choice(np.array([-1.0, 1.0]), size=b.size)
        weights = signs * (1.0 + self.rng.random(b.size)) * self.scale[b.slice]
        v = np.zeros(self.ev.theta0.size)
        v[b.slice] = weights
        return v

    def allowed(self, v: np.ndarray, support: int, error: float) -> float:
        tol = self.tol
        terms = self.g * v
        l1 = float(np.sum(np.abs(terms)))
        l2 = float(np.sqrt(np.sum(terms**2)))
        typical = l2 / math.sqrt(max(support, 1))
        return tol.safety * error + tol.noise * tol.eps * l1 + tol.rtol * typical

    def check_direction(self, v: np.ndarray) -> tuple[bool, float, float, float, float]:
        """(passed, analytic, numeric, error, allowed) along ``v``; refined before failing."""
        tol = self.tol
        analytic = float(self.g @ v)
        first, step = _first_difference(self.ev, v, tol.step, self.f0)
        self.step = step
        # one central difference (two evaluations) settles a correct block; anything that
        # disagrees is extrapolated over two steps, then refined, before it fails
        numeric = float(first.central[0])
        error = float(first.roundoff(tol)[0])
        allowed = self.allowed(v, self.block.size, error)
        if abs(analytic - numeric) <= allowed:
            return True, analytic, numeric, error, allowed
        numeric, error = _richardson2(self.ev, v, first, step, self.f0, tol)
        allowed = self.allowed(v, self.block.size, error)
        wanted = allowed - tol.safety * error
        if abs(analytic - numeric) <= allowed:
            return True, analytic, numeric, error, allowed
        ev, f0 = self.ev, self.f0
        r = refine_until_resolved(
            lambda factor, sel: line_differences(ev, v, step * factor, f0),
            first,
            tol,
            np.array([wanted]),
        )
        numeric, error = float(r.numeric[0]), float(r.error[0])
        allowed = self.allowed(v, self.block.size, error)
        if abs(analytic - numeric) <= allowed:
            return True, analytic, numeric, error, allowed
        if bool(r.kink[0]):
            slack = allowed + tol.safety * float(r.one_sided_noise[0])
            if r.lo[0] - slack <= analytic <= r.hi[0] + slack:
                return True, analytic, numeric, error, allowed
        return False, analytic, numeric, error, allowed

    def residual(self, v: np.ndarray, members: np.ndarray) -> float:
        """analytic - numeric along ``v`` restricted to ``members``.

        One central difference at the default step (plenty to tell which half holds
        an error); where the direction's step had to shrink to stay in the loss's
        domain, the curvature is large, and two steps are extrapolated instead.
        """
        w = np.zeros_like(v)
        w[members] = v[members]
        analytic = float(self.g[members] @ v[members])
        if self.step >= self.tol.step:
            d = line_differences(self.ev, w, self.tol.step, self.f0)
            return analytic - float(d.central[0])
        big, _ = _first_difference(self.ev, w, self.step, self.f0)
        numeric, _ = _richardson2(self.ev, w, big, self.step, self.f0, self.tol)
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

    def localize(self, v: np.ndarray, total: float) -> tuple[list[Entry], bool]:
        """Bisect the block's support for wrong entries: (entries found, the search finished).

        Each step probes one half of the current support; the discrepancy of the
        other half follows by linearity. An entry the bisection ends on is checked
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
            members, d = remaining, residual
            while members.size > 1:
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
            rest = np.zeros_like(v)
            rest[remaining] = v[remaining]
            ok, analytic, numeric, _, _ = self.check_direction(rest)
            if ok:
                return found, True
            residual = analytic - numeric
        return found, False

    def run(self, probes: int) -> BlockResult:
        b = self.block
        failures = []
        for _ in range(probes):
            v = self.direction()
            ok, analytic, numeric, error, allowed = self.check_direction(v)
            if not ok:
                failures.append((v, analytic, numeric, error, allowed, self.step))
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
        v, analytic, numeric, error, allowed, self.step = failures[0]
        found, finished = self.localize(v, analytic - numeric)
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


def _direction_diagnosis(ratio: float) -> str | None:
    if abs(ratio + 1.0) < 1e-3:
        return "analytic = -numeric along the probe (a flipped sign over the whole block?)"
    if ratio == 0:
        return "the analytic gradient is zero along the probe (a gradient never computed?)"
    return None


def run_fast(
    problem: FlatProblem,
    ev: Evaluator,
    g: np.ndarray,
    f0: float,
    tol: Tolerance,
    options: CheckOptions,
) -> tuple[list[BlockResult], list[str]]:
    """Fast mode over every block; returns the block results and warnings."""
    rng = np.random.default_rng([options.seed & 0xFFFFFFFF, 0xFA57])
    scale = np.maximum(np.abs(problem.theta0), 1.0)
    results = []
    for block in problem.blocks:
        probe = _Probe(ev, block, g, f0, tol, scale, rng)
        results.append(probe.run(options.probes))
    warnings = []
    if any(r.mismatches for r in results):
        warnings.append(
            "fast mode: a failing block is localised by bisection; "
            "run mode='full' to compare every entry"
        )
    return results, warnings
