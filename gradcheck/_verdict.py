"""The verdict rules, once: when an analytic derivative agrees with a numerical one.

Pure functions of arrays: no model, no evaluation. Full mode applies them to the entries of a
block; fast mode to a direction, as arrays of length one. What they judge (the refined
difference, its error, the one-sided derivatives, whether the loss moved at all) is measured by
`gradcheck._numerics`; the one rule that needs more evaluations (the backward beside a kink) is
measured by the mode, which brings the values back to `beside_agrees`.

Each case has an absolute allowance ``floor`` and a relative one ``rel``:

- an entry: ``floor`` = `block_floor` (``atol`` of its block's scale, and the round-off of the
  model's largest gradient), ``rel`` = ``rtol``;
- a direction: ``floor`` = `direction_floor` (the round-off of ``g . v`` plus ``rtol`` of one
  entry's typical share of it), ``rel`` = 0 (``rtol`` of the whole sum would hide one wrong
  entry among millions).

The rules (``a`` analytic, ``safety`` and the rest from the `Tolerance`):

1. *agreement*: ``|a - numeric| <= floor + rel * (|numeric| + gap) + safety * error``, ``gap``
   the distance between the one-sided derivatives (`allowance`);
2. *a kink* within the step: ``a`` between the one-sided derivatives, give or take
   ``floor + rel * |a| + safety * one_sided_noise`` (`decide`);
3. *beside a kink*, where ``a`` is no one-sided derivative (coincident kinks): the backward half
   the smallest step to each side gives that side's derivative, within
   ``floor + rel * |expected| + safety * one_sided_noise`` (`beside_agrees`);
4. *below resolution*: the loss did not change at any step, and ``|a|`` times the largest step
   is below what values of magnitude ``max(|f0|, 1)`` resolve (`below_resolution`);
5. *unresolved*: an estimate whose ``safety * error`` exceeds `RESOLUTION` of the case's size
   cannot tell agreement from a bug (`unresolved_mask`);
6. *repeatable*: two backward passes at the same point agree within ``allowed`` (`repeats`).

The second judge, for kernels that cannot run in float64 (`gradcheck.check_kernel`), compares no
numerical derivative: a block of the kernel's outputs or gradients passes when, for the max and
for the mean over the block, ``|kernel - golden| <= k * |lowprec - golden| + floor``, ``golden``
the reference in float64 and ``lowprec`` the reference in the kernel's precision
(`judge_against_reference`; the floor is `reference_floor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._numerics import REFINE_FACTORS, Refined
from ._options import Tolerance

#: An estimate whose ``safety * error`` is above this fraction of the size it judges cannot
#: tell agreement from a bug: unresolved (rule 5).
RESOLUTION = 0.25

#: Round-off of the backward's own sums, in units of eps times the largest gradient (the
#: part of an entry's ``floor`` that no ``atol`` removes).
BACKWARD_ROUNDOFF = 64.0


def block_floor(tol: Tolerance, scale: float, grad_scale: float) -> float:
    """An entry's absolute allowance in a block whose largest numerical derivative is
    ``scale``, in a model whose largest analytic gradient is ``grad_scale``."""
    return tol.atol * scale + BACKWARD_ROUNDOFF * tol.eps * max(grad_scale, scale)


def direction_floor(tol: Tolerance, magnitude: float, typical: float) -> float:
    """A direction's absolute allowance: the round-off of ``g . v`` (``magnitude`` is
    ``sum |g_i v_i|``) plus ``rtol`` of one entry's typical share of it (``typical``)."""
    return tol.noise * tol.eps * magnitude + tol.rtol * typical


def allowance(
    tol: Tolerance,
    numeric: np.ndarray | float,
    error: np.ndarray | float,
    floor: float,
    rel: float,
    gap: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Rule 1's allowance (NaN where ``numeric`` or ``gap`` is: nothing agrees with it)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(floor + rel * (np.abs(numeric) + gap) + tol.safety * np.asarray(error))


def agrees(
    a: np.ndarray | float, numeric: np.ndarray | float, allow: np.ndarray | float
) -> np.ndarray:
    """Rule 1."""
    with np.errstate(invalid="ignore"):
        return np.asarray(np.abs(np.asarray(a) - numeric) <= allow)


@dataclass
class Decision:
    """Rules 1, 2 and 4 on refined estimates (arrays in the order of the cases)."""

    ok: np.ndarray  # agrees (rule 1), or at a kink with ``a`` between the sides (rule 2)
    allowed: np.ndarray  # rule 1's allowance (inf where it is not finite)
    kink: np.ndarray  # disagrees and the loss has a kink within the step
    beside: np.ndarray  # at a kink, ``a`` outside the sides: rule 3 decides
    tiny: np.ndarray  # rule 4: the loss is flat and ``a`` too small to show


def decide(
    a: np.ndarray, r: Refined, floor: float, rel: float, tol: Tolerance, f0: float, h: np.ndarray
) -> Decision:
    """Rules 1, 2 and 4 for cases with analytic values ``a``, refined estimates ``r`` and
    first-pass steps ``h``; the cases in ``beside`` are left to rule 3."""
    with np.errstate(invalid="ignore"):
        gap = np.abs(r.right - r.left)
        gap = np.where(np.isfinite(gap), gap, 0.0)
        allow = allowance(tol, r.numeric, r.error, floor, rel, gap)
        ok = agrees(a, r.numeric, allow)
        at_kink = ~ok & r.kink
        slack = floor + rel * np.abs(a) + tol.safety * r.one_sided_noise
        inside = (a >= r.lo - slack) & (a <= r.hi + slack)
    return Decision(
        ok=ok | (at_kink & inside),
        allowed=np.where(np.isfinite(allow), allow, np.inf),
        kink=at_kink,
        beside=at_kink & ~inside,
        tiny=below_resolution(r.flat, a, h, f0, tol),
    )


def beside_agrees(
    g: float, expected: float, noise: float, floor: float, rel: float, tol: Tolerance
) -> bool:
    """Rule 3 on one side of a kink: the backward there, ``g``, against that side's
    derivative ``expected`` (``noise``: the one-sided derivatives' noise)."""
    return bool(abs(g - expected) <= floor + rel * abs(expected) + tol.safety * noise)


def below_resolution(
    flat: np.ndarray, a: np.ndarray, h: np.ndarray, f0: float, tol: Tolerance
) -> np.ndarray:
    """Rule 4: a loss that did not change at all at any step cannot show a derivative whose
    effect over the largest step is below the resolution of values of magnitude
    ``max(|f0|, 1)``."""
    resolution = tol.noise * tol.eps * max(abs(f0), 1.0)
    return np.asarray(flat & (np.abs(a) * REFINE_FACTORS[0] * h <= resolution))


def unresolved_mask(
    tol: Tolerance,
    a: np.ndarray,
    numeric: np.ndarray,
    error: np.ndarray,
    scale: float,
    floor: float,
) -> np.ndarray:
    """Rule 5: cases whose numerical derivative is too uncertain to tell agreement from a bug:
    ``safety * error`` above `RESOLUTION` times the largest of ``|analytic|``, ``|numeric|``
    and ``scale`` (an entry's block scale, as ``atol`` judges small entries; a direction's
    block share). An analytic value within ``floor`` is zero at the precision of the backward
    itself: nothing smaller can be asked of it, and it is not unresolved."""
    with np.errstate(invalid="ignore"):
        size = np.maximum(np.maximum(np.abs(a), np.abs(numeric)), scale)
        zero = np.abs(a) <= floor
        return np.asarray(~zero & ~(tol.safety * error <= RESOLUTION * size))


def repeats(first: np.ndarray, second: np.ndarray, allowed: float) -> np.ndarray:
    """Rule 6: which entries of two backward passes at the same point differ by more than
    ``allowed`` (a NaN or Inf in both at the same entry, the same value, agrees)."""
    with np.errstate(invalid="ignore"):
        same = (first == second) | (np.isnan(first) & np.isnan(second))
        return np.asarray(~same & ~(np.abs(first - second) <= allowed))


# --------------------------------------------------------------------------- reference rule
#: The reference comparison's rounding floor, in unit round-offs of the kernel's precision times
#: the golden block's magnitude (its largest entry for the max error, its mean entry for the
#: mean error): one rounding of the result to the kernel's precision, and one of an intermediate
#: stored in it in another order than the reference's.
REFERENCE_FLOOR_ROUNDINGS = 2.0

#: The default ``k``: the kernel may be this many times further from the float64 reference than
#: the same math in plain ops in the kernel's precision (flash-attention's tests use 2).
REFERENCE_K = 2.0


@dataclass(frozen=True)
class ReferenceVerdict:
    """The reference rule on one output or gradient block (see `judge_against_reference`).

    Attributes:
        kernel_max, kernel_mean: max and mean ``|kernel - golden|``.
        ref_max, ref_mean: max and mean ``|lowprec reference - golden|``.
        allowed_max, allowed_mean: ``k * ref + floor`` for each statistic.
        floor_max, floor_mean: the rounding floors.
        scale_max, scale_mean: max and mean ``|golden|``.
        limit: the smallest uniform relative error of the whole block (``kernel = (1 + s) *
            golden``) that the rule is sure to see: ``min(allowed_max / scale_max,
            allowed_mean / scale_mean)`` (inf for an all-zero block).
        max_ok, mean_ok: whether each statistic is within its allowance.
    """

    kernel_max: float
    kernel_mean: float
    ref_max: float
    ref_mean: float
    allowed_max: float
    allowed_mean: float
    floor_max: float
    floor_mean: float
    scale_max: float
    scale_mean: float
    limit: float
    max_ok: bool
    mean_ok: bool

    @property
    def passed(self) -> bool:
        return self.max_ok and self.mean_ok


def reference_floor(unit_roundoff: float, magnitude: float) -> float:
    """The rounding floor for a statistic of a block of golden magnitude ``magnitude``.

    A sum of ``n`` terms of size ``t`` with random signs has magnitude ``t * sqrt(n)``, and
    rounding its terms in the kernel's precision moves it by about ``u * t * sqrt(n)``: a
    floor proportional to the block's magnitude grows with the square root of the reduction
    size without knowing it."""
    return REFERENCE_FLOOR_ROUNDINGS * unit_roundoff * magnitude


def judge_against_reference(
    kernel: np.ndarray, lowprec: np.ndarray, golden: np.ndarray, k: float, unit_roundoff: float
) -> ReferenceVerdict:
    """The reference rule: a block passes when, for both the max and the mean,
    ``|kernel - golden| <= k * |lowprec - golden| + floor`` (`reference_floor`). NaN or inf
    in the kernel's values fails (unless the golden value is the same inf)."""
    kernel, lowprec, golden = (
        np.asarray(a, dtype=np.float64).ravel() for a in (kernel, lowprec, golden)
    )
    if not golden.size:
        z = 0.0
        return ReferenceVerdict(z, z, z, z, z, z, z, z, z, z, math.inf, True, True)
    with np.errstate(invalid="ignore"):
        same = kernel == golden  # an inf the golden values share is no error
        ek = np.where(same, 0.0, np.abs(kernel - golden))
        er = np.where(lowprec == golden, 0.0, np.abs(lowprec - golden))
    ek = np.where(np.isnan(ek), np.inf, ek)
    er = np.where(np.isfinite(er), er, 0.0)  # a reference that overflows allows nothing extra
    finite = np.abs(golden[np.isfinite(golden)])
    scale_max = float(finite.max()) if finite.size else 0.0
    scale_mean = float(finite.mean()) if finite.size else 0.0
    floor_max = reference_floor(unit_roundoff, scale_max)
    floor_mean = reference_floor(unit_roundoff, scale_mean)
    kernel_max, kernel_mean = float(ek.max()), float(ek.mean())
    ref_max, ref_mean = float(er.max()), float(er.mean())
    allowed_max = k * ref_max + floor_max
    allowed_mean = k * ref_mean + floor_mean
    limits = [a / s for a, s in ((allowed_max, scale_max), (allowed_mean, scale_mean)) if s > 0]
    return ReferenceVerdict(
        kernel_max=kernel_max,
        kernel_mean=kernel_mean,
        ref_max=ref_max,
        ref_mean=ref_mean,
        allowed_max=allowed_max,
        allowed_mean=allowed_mean,
        floor_max=floor_max,
        floor_mean=floor_mean,
        scale_max=scale_max,
        scale_mean=scale_mean,
        limit=min(limits, default=math.inf),
        max_ok=bool(kernel_max <= allowed_max),
        mean_ok=bool(kernel_mean <= allowed_mean),
    )
