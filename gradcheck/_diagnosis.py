"""Name the likely kind of bug from the pattern of mismatches in one block."""

from __future__ import annotations

import numpy as np

#: mismatches within this relative error are "small": no factor or term is missing
SMALL_RELATIVE = 1e-3


def _factor_hint(c: float) -> str:
    if abs(c - 2.0) < 1e-3:
        return " (a term counted twice?)"
    if abs(c - 0.5) < 1e-3:
        return " (a missing factor 2?)"
    inv = 1.0 / c if c != 0 else 0.0
    if c < 1 and abs(inv - round(inv)) < 1e-3 * inv and round(inv) > 2:
        return f" (1/{round(inv)}: a mean where a sum belongs?)"
    if c > 1 and abs(c - round(c)) < 1e-3 * c and round(c) > 2:
        return f" ({round(c)}x: a sum where a mean belongs?)"
    return ""


def diagnose(
    analytic: np.ndarray,
    numeric: np.ndarray,
    bad: np.ndarray,
    shape: tuple[int, ...],
    size: int | None = None,
) -> str | None:
    """A sentence naming the pattern of the mismatches, or None where there is none to name.

    ``analytic``/``numeric`` hold the checked entries (all of the block in full mode,
    the localised ones in fast mode); ``size`` is the block's size when they are
    only part of it.
    """
    k = int(bad.sum())
    n = analytic.size if size is None else size
    if k == 0:
        return None
    a, num = analytic[bad], numeric[bad]
    scale = float(np.max(np.abs(numeric))) if n else 0.0
    if np.all(a == 0.0):
        if k == n or (size is None and np.all(analytic == 0.0)):
            return (
                "the analytic gradient of this block is zero everywhere "
                "(a gradient never computed or returned?)"
            )
        return (
            f"the analytic gradient is zero at {k} entries where the numeric one is not "
            "(a dropped term?)"
        )
    if (scale > 0 and np.all(np.abs(num) <= 1e-6 * scale)) or np.all(num == 0.0):
        return (
            "the analytic gradient is nonzero where the loss does not change "
            "(a gradient written to the wrong place?)"
        )
    if size is None and len(shape) == 2 and shape[0] == shape[1] and shape[0] > 1:
        a2 = analytic.reshape(shape)
        n2 = numeric.reshape(shape)
        if np.allclose(a2.T, n2, rtol=1e-4, atol=1e-6 * max(scale, 1e-300)):
            return "the analytic gradient is the transpose of the numeric one"
    few = k <= 3 and k < 0.5 * n
    nonzero = num != 0
    if few:
        ratios = ", ".join(_ratio(r) for r in (a / num)[nonzero][:3]) if np.any(nonzero) else ""
        tail = f"; analytic / numeric = {ratios}" if ratios else ""
        return f"only {k} of {n:,} entries disagree (an indexing slip or a one-off term?{tail})"
    if not np.all(nonzero):
        return None
    ratio = a / num
    med = float(np.median(ratio))
    if np.all(np.abs(ratio + 1.0) < 1e-3):
        return "analytic = -numeric at every mismatch (a flipped sign)"
    where = "every entry" if k == n else "every mismatch"
    # one factor everywhere, to within a small part of its distance from 1: a wrong constant
    # (N - 1 for N, a doubled term), however close to 1 it is
    if med != 0 and np.all(np.abs(ratio - med) <= 1e-3 * min(abs(med), abs(med - 1.0))):
        return f"analytic / numeric = {_ratio(med)} at {where}{_factor_hint(med)}"
    rel = np.abs(ratio - 1.0)
    if np.all(rel < SMALL_RELATIVE):
        worst = float(rel.max())
        return (
            f"analytic and numeric agree to within {worst:.1e} relative at {where}, by "
            "differing factors: a small, spread error, typical of a backward that is "
            "approximate by design (an iterative solver, a clamped dual, a truncated series); "
            f"if that is expected, set rtol above {worst:.1e}"
        )
    return None


def _ratio(r: float) -> str:
    """A ratio, with the digits that tell it from 1 (``1 + 3.0e-04``, not ``1``)."""
    if r != 1.0 and abs(r - 1.0) < 1e-3:
        return f"1 {'+' if r > 1 else '-'} {abs(r - 1.0):.1e}"
    return f"{r:.4g}"
