"""The result of a check: data first, every rendering (text, JSON) made from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GradientCheckError

if TYPE_CHECKING:
    from ._verdict import ReferenceVerdict

MAX_ROWS = 5


@dataclass(frozen=True)
class Entry:
    """One checked entry of a block.

    Attributes:
        index: position in the block, a tuple into its shape (empty for a scalar).
        analytic: the model's gradient.
        numeric: the numerical estimate.
        error: the estimated error of ``numeric``.
        tolerance: the largest ``|analytic - numeric|`` the entry was allowed.
        kink: the loss is not differentiable within the step at this entry.
        one_sided: ``(left, right)`` one-sided derivative estimates, at a kink.
    """

    index: tuple[int, ...]
    analytic: float
    numeric: float
    error: float
    tolerance: float
    kink: bool = False
    one_sided: tuple[float, float] | None = None

    @property
    def abs_diff(self) -> float:
        return abs(self.analytic - self.numeric)

    @property
    def rel_diff(self) -> float:
        denom = abs(self.numeric)
        if denom == 0.0:
            return math.inf if self.abs_diff > 0 else 0.0
        return self.abs_diff / denom

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": list(self.index),
            "analytic": _json_float(self.analytic),
            "numeric": _json_float(self.numeric),
            "error": _json_float(self.error),
            "tolerance": _json_float(self.tolerance),
            "abs_diff": _json_float(self.abs_diff),
            "rel_diff": _json_float(self.rel_diff),
            "kink": self.kink,
            "one_sided": None
            if self.one_sided is None
            else [_json_float(v) for v in self.one_sided],
        }


@dataclass(frozen=True)
class BlockResult:
    """The verdict on one block (a parameter tensor or an input).

    Attributes:
        name: the block's name as the user knows it (``layers.1.weight``).
        shape: the block's shape.
        kind: ``"param"`` or ``"input"``.
        checked: entries compared, or directions probed (see ``unit``).
        size: entries in the block.
        mismatches: how many of the checked entries (or directions) disagree.
        worst: the worst mismatching entries, largest difference first (at most 5).
        kinks: entries where the loss is not differentiable within the step and the
            analytic value is a valid one-sided derivative (not counted as mismatches).
        kink_examples: a few of those entries.
        max_abs_diff, max_rel_diff: the largest differences over the entries measured
            (full mode; a passing block's too), or along the failing direction (fast mode).
        unresolved: entries (full mode) or directions (fast mode) whose numerical derivative
            could not be measured closely enough to tell agreement from a bug, at any step
            tried (or not at all: the loss is not finite around them). They are neither
            mismatches nor agreement: a block with any is inconclusive and fails.
        unresolved_examples: a few of those entries.
        unit: what ``checked``, ``mismatches`` and ``unresolved`` count: ``"entries"``
            (full mode, and a fast-mode block checked entry by entry) or ``"directions"``
            (fast mode's random directions).
        scale: the largest numerical gradient magnitude in the block.
        diagnosis: a sentence naming the likely kind of bug, where the data show one.
        localized: fast mode only: how many wrong entries localisation named.
        note: anything else worth a line (a budget ran out, entries not evaluable).
        comparison: a reference check only (`gradcheck.check_kernel`): the kernel's and
            the low-precision reference's errors against the float64 reference, the
            allowances and the detection limit (a `gradcheck._verdict.ReferenceVerdict`).
            ``kind`` is then also ``"output"`` for the kernel's outputs, and ``checked``
            counts the two statistics judged (max and mean error), ``mismatches`` those
            over their allowance.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    checked: int
    size: int
    mismatches: int
    worst: tuple[Entry, ...] = ()
    kinks: int = 0
    kink_examples: tuple[Entry, ...] = ()
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    scale: float = 0.0
    diagnosis: str | None = None
    localized: int | None = None
    note: str | None = None
    unresolved: int = 0
    unresolved_examples: tuple[Entry, ...] = ()
    unit: str = "entries"
    comparison: ReferenceVerdict | None = None

    @property
    def passed(self) -> bool:
        """Every entry (or direction) checked, none disagrees, none is unresolved (an empty
        block has nothing to disagree)."""
        return self.mismatches == 0 and self.unresolved == 0 and (self.checked > 0 or not self.size)

    @property
    def inconclusive(self) -> bool:
        """Nothing disagrees, but not everything could be verified (or nothing was checked)."""
        return self.mismatches == 0 and not self.passed

    def to_dict(self) -> dict[str, Any]:
        data = self._base_dict()
        if self.comparison is not None:
            data["comparison"] = {
                key: (_json_float(value) if isinstance(value, float) else value)
                for key, value in vars(self.comparison).items()
            }
        return data

    def _base_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "kind": self.kind,
            "passed": self.passed,
            "checked": self.checked,
            "size": self.size,
            "mismatches": self.mismatches,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "scale": _json_float(self.scale),
            "diagnosis": self.diagnosis,
            "kinks": self.kinks,
            "worst": [e.to_dict() for e in self.worst],
            "kink_examples": [e.to_dict() for e in self.kink_examples],
            "localized": self.localized,
            "note": self.note,
            "unresolved": self.unresolved,
            "unresolved_examples": [e.to_dict() for e in self.unresolved_examples],
            "unit": self.unit,
        }


@dataclass(frozen=True)
class Report:
    """Everything a check found. ``str(report)`` is the readable message.

    Attributes:
        blocks: one result per checked block, in the model's order.
        mode: the mode that ran (``"full"`` or ``"fast"``).
        mode_reason: why (``"auto: 1,234 entries <= 20,000"``).
        precision: the floating-point type the model was evaluated in.
        rtol, atol, safety: the tolerances in force.
        seed: the seed of every random choice (directions, projections, dropout resets).
        evaluations: loss evaluations used (the analytic gradient counts one).
        elapsed: wall time of the check in seconds (of the whole `check_gradients` call,
            the adapter's set-up included).
        framework: which adapter evaluated the model.
        batching: how evaluations ran (``"vmap"``, ``"loop"``).
        warnings: things the user should know (fallbacks taken, kinks, ...).
        skipped: parameters that were not checked (frozen, or not checkable: a Python
            float or a complex leaf in a JAX pytree; the warnings say which).
        problem: set when no gradient verdict was possible (a non-deterministic
            forward, the evaluation budget ran out): the check then fails.
        numeric: the numerical gradient (full mode), flat, in the blocks' layout.
        kind: ``"gradients"`` (a check against numerical derivatives) or ``"reference"``
            (`gradcheck.check_kernel`: a kernel against a reference implementation;
            ``safety`` is then its ``k``, ``precision`` the kernel's).
        reference_check: a reference check only: the report of checking the reference's
            own gradients against finite differences in float64 (None when not run).
        contract: what this report checked (`CONTRACTS`): ``"first order"`` (the gradient by
            the backward), ``"second order"`` (``u . g(theta)``'s gradient, by differentiating
            the backward), ``"forward mode"`` (the forward-mode derivatives),
            ``"batched backward"`` (the backward under vmap against one point at a time).
        sections: the reports of the other contracts asked for (``order=2``,
            ``forward=True``, ``batched=True``), in that order; the check passes when this
            report and every section pass. Each has the same blocks, format and JSON.
        not_checked: a section only: why the contract could not be checked on this model (a
            layer without a forward-mode rule, NumPy models' first order only); such a
            section has no blocks and does not fail the check.
    """

    blocks: tuple[BlockResult, ...]
    mode: str
    mode_reason: str
    precision: str
    rtol: float
    atol: float
    safety: float
    seed: int
    evaluations: int
    elapsed: float
    framework: str = "function"
    batching: str = "loop"
    warnings: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    problem: str | None = None
    numeric: np.ndarray | None = field(default=None, repr=False, compare=False)
    kind: str = "gradients"
    reference_check: Report | None = None
    contract: str = "first order"
    sections: tuple[Report, ...] = ()
    not_checked: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.problem is None
            and all(b.passed for b in self.blocks)
            and all(s.passed for s in self.sections)
        )

    def section(self, contract: str) -> Report:
        """The report on ``contract`` (``"first order"`` is this report itself)."""
        for report in (self, *self.sections):
            if report.contract == contract:
                return report
        names = ", ".join(repr(r.contract) for r in (self, *self.sections))
        raise KeyError(f"no section {contract!r}; this report has {names}")

    @property
    def failed_blocks(self) -> tuple[BlockResult, ...]:
        return tuple(b for b in self.blocks if not b.passed)

    @property
    def entries_checked(self) -> int:
        """Entries compared one by one (full mode; fast mode only where it fell back to it)."""
        return sum(b.checked for b in self.blocks if b.unit == "entries")

    @property
    def directions_checked(self) -> int:
        """Random directions probed across the blocks (fast mode; 0 in full mode)."""
        return max((b.checked for b in self.blocks if b.unit == "directions"), default=0)

    def block(self, name: str) -> BlockResult:
        """The result for the block called ``name``."""
        for b in self.blocks:
            if b.name == name:
                return b
        names = ", ".join(repr(b.name) for b in self.blocks)
        raise KeyError(f"no block named {name!r}; the blocks are {names}")

    def raise_if_failed(self) -> Report:
        """Raise `GradientCheckError` (an ``AssertionError``) unless the check passed."""
        if not self.passed:
            raise GradientCheckError(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dictionary of the whole report (without the numeric gradient)."""
        data = self._base_dict()
        if self.kind != "gradients":
            data["kind"] = self.kind
            data["reference_check"] = (
                None if self.reference_check is None else self.reference_check.to_dict()
            )
        return data

    def _base_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "precision": self.precision,
            "rtol": self.rtol,
            "atol": self.atol,
            "safety": self.safety,
            "seed": self.seed,
            "evaluations": self.evaluations,
            "elapsed": self.elapsed,
            "framework": self.framework,
            "batching": self.batching,
            "entries_checked": self.entries_checked,
            "directions_checked": self.directions_checked,
            "warnings": list(self.warnings),
            "skipped": list(self.skipped),
            "problem": self.problem,
            "blocks": [b.to_dict() for b in self.blocks],
            "contract": self.contract,
            "not_checked": self.not_checked,
            "sections": [s.to_dict() for s in self.sections],
        }

    def __str__(self) -> str:
        if self.kind == "reference":
            return render_reference(self)
        if self.sections:
            return render_sections(self)
        return render(self)


def _json_float(x: float) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _index(index: tuple[int, ...]) -> str:
    return _shape(index)


def _num(x: float) -> str:
    return f"{x: .4e}"


def _small(x: float) -> str:
    return f"{x:.1e}"


def _pct(k: int, n: int) -> str:
    return f"{100.0 * k / n:.1f}%" if n else "-"


def _blocks(n: int, all_: str = "") -> str:
    return "the only block" if n == 1 and all_ else f"{all_}{n} block{'s' if n != 1 else ''}"


#: The contracts a check can cover, in the order of a report's sections.
CONTRACTS = ("first order", "second order", "forward mode", "batched backward")

#: What a section's first line calls its values, and its check.
_WORDS = {
    "first order": ("gradients", "gradient check"),
    "second order": ("second derivatives (H u)", "second-order check"),
    "forward mode": ("forward-mode derivatives", "forward-mode check"),
    "batched backward": ("batched gradients", "batched-backward check"),
}


def _header(report: Report) -> list[str]:
    if report.mode == "fast" and report.contract == "forward mode":
        checked = "1 random direction per block"
    elif report.mode == "fast":
        k = report.directions_checked
        checked = f"{k} random direction{'s' if k != 1 else ''} across all blocks"
        if report.entries_checked:
            checked += f" and {report.entries_checked:,} entries one by one"
    else:
        checked = f"{report.entries_checked:,} entries"
    summary = (
        f"checked {checked}, "
        f"{report.mode} mode, {report.precision}, {report.evaluations:,} evaluations, "
        f"{report.elapsed:.2f}s"
    )
    n = len(report.blocks)
    wrong = [b for b in report.blocks if b.mismatches]
    vague = [b for b in report.blocks if b.inconclusive]

    def where(k: int) -> str:
        return "the only block" if n == 1 else f"{k} of {_blocks(n)}"

    what, check = _WORDS[report.contract]
    if report.problem is not None and report.contract != "first order":
        # a contract asked for and not delivered (a backward that cannot be differentiated)
        first = f"{check} failed: {report.problem} ({summary})"
    elif report.problem is not None:
        first = f"{check} inconclusive: {report.problem} ({summary})"
    elif report.passed:
        first = f"{what} agree in {_blocks(n, 'all ')} ({summary})"
    elif wrong:
        first = f"{what} disagree in {where(len(wrong))} ({summary})"
        if vague:
            first += f"; {len(vague)} more not verified"
    else:
        first = f"{check} inconclusive: {where(len(vague))} could not be verified ({summary})"
    if report.contract == "batched backward":
        formula = (
            "test: the loss and the gradients at several points in one vmapped call equal "
            "those at each point alone, within atol*scale + round-off"
        )
    elif report.contract == "forward mode" and report.mode == "fast":
        formula = (
            "test per block: the JVP along a random direction equals reverse mode's <g, v> "
            "within round-off; where not, the entries halving finds are judged against finite "
            "differences as full mode judges them"
        )
    elif report.mode == "fast":
        formula = (
            f"test per random direction: |analytic - numeric| <= {report.safety:g}*estimated error"
            " + rtol*(one typical entry's share)"
        )
    else:
        formula = (
            f"test: |analytic - numeric| <= atol*scale + rtol*|numeric| + "
            f"{report.safety:g}*estimated error"
        )
    test = (
        f"{formula}; rtol={report.rtol:g} atol={report.atol:g} "
        f"seed={report.seed} ({report.mode_reason}; {report.framework}, {report.batching})"
    )
    return [first, test]


def _entry_table(entries: tuple[Entry, ...]) -> list[str]:
    width = max([len(_index(e.index)) for e in entries] + [5])
    lines = [
        f"  {'index':<{width}}  {'analytic':>11}  {'numeric':>11} (± est. error)  {'abs diff':>8}"
    ]
    for e in entries:
        tag = (
            "  kink: one-sided " + f"{e.one_sided[0]:.3e} / {e.one_sided[1]:.3e}"
            if (e.kink and e.one_sided is not None)
            else ""
        )
        if math.isnan(e.numeric) and math.isnan(e.error):
            measured = f"{'not measured':>11}   {'':<8}  {'':>8}"
        else:
            measured = f"{_num(e.numeric):>11} ± {_small(e.error):<8}  {_small(e.abs_diff):>8}"
        lines.append(f"  {_index(e.index):<{width}}  {_num(e.analytic):>11}  {measured}{tag}")
    return lines


def _block_lines(b: BlockResult) -> list[str]:
    lines = [f"`{b.name}`  shape {_shape(b.shape)}" + ("  (input)" if b.kind == "input" else "")]
    unit = b.unit
    lines.append(
        f"  mismatched: {b.mismatches:,} / {b.checked:,} {unit} ({_pct(b.mismatches, b.checked)})"
        f"   max abs diff {_small(b.max_abs_diff)}   max rel diff {_small(b.max_rel_diff)}"
    )
    if b.unresolved:
        lines.append(
            f"  not verified: {b.unresolved:,} {unit} unresolved (the numerical derivative "
            "cannot tell agreement from a bug)"
        )
    if b.worst:
        lines.extend(_entry_table(b.worst))
    elif b.unresolved_examples:
        lines.extend(_entry_table(b.unresolved_examples))
    if b.diagnosis:
        lines.append(f"  diagnosis: {b.diagnosis}")
    if b.localized is not None:
        lines.append(
            f"  localisation named {b.localized} wrong entr{'y' if b.localized == 1 else 'ies'}"
        )
    if b.note:
        lines.append(f"  note: {b.note}")
    return lines


def render(report: Report) -> str:
    """The readable report: culprits first, at most five rows per block."""
    if report.not_checked is not None:
        return f"{report.contract} not checked: {report.not_checked}"
    lines = _header(report)
    for b in report.failed_blocks:
        if b.checked == 0 and not b.unresolved:
            continue  # listed below as not checked
        lines.append("")
        lines.extend(_block_lines(b))
    passed = [b for b in report.blocks if b.passed]
    unchecked = [b for b in report.blocks if b.checked == 0 and b.size and not b.unresolved]
    if passed or unchecked:
        lines.append("")
    if passed:
        lines.append("passed: " + ", ".join(f"`{b.name}` {_shape(b.shape)}" for b in passed))
    if unchecked:
        lines.append(
            "not checked: "
            + ", ".join(f"`{b.name}` {_shape(b.shape)}" for b in unchecked)
            + (f" ({unchecked[0].note})" if unchecked[0].note else "")
        )
    kinked = [b for b in report.blocks if b.kinks]
    if kinked:
        lines.append(
            "non-differentiable points accepted (the analytic value is a valid one-sided choice): "
            + ", ".join(f"`{b.name}` {b.kinks}" for b in kinked)
        )
    notes = [f"`{b.name}`: {b.note}" for b in report.blocks if b.passed and b.note]
    if report.skipped:
        names = ", ".join(f"`{s}`" for s in report.skipped)
        lines.append(f"skipped (frozen or not checkable): {names}")
    for w in (*report.warnings, *notes):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _verdict_word(report: Report) -> str:
    if report.not_checked is not None:
        return "not checked"
    if report.problem is None and all(b.passed for b in report.blocks):
        return "passed"
    if any(b.mismatches for b in report.blocks):
        return "FAILED"
    if report.problem is not None and report.contract != "first order":
        return "FAILED"  # asked for and not delivered (as its header says)
    return "inconclusive"


def render_sections(report: Report) -> str:
    """A report with sections: one line per contract, then each contract's report."""
    parts = (report, *report.sections)
    verdict = "passed" if report.passed else "FAILED"
    lines = [
        f"gradient check {verdict}: " + "; ".join(f"{r.contract} {_verdict_word(r)}" for r in parts)
    ]
    for r in parts:
        lines.append("")
        lines.append(f"== {r.contract} ==")
        lines.append(render(replace(r, sections=())))
    return "\n".join(lines)


# --------------------------------------------------------------------------- reference checks
def _ratio(kernel: float, reference: float) -> str:
    if reference > 0:
        return f"{kernel / reference:.2g}"
    return "0" if kernel == 0 else "inf"


def _visible(limit: float) -> str:
    return "nothing (the block is zero)" if not math.isfinite(limit) else f"{100 * limit:.2g}%"


def _reference_table(b: BlockResult, lowprec: str) -> list[str]:
    width = max([len(_index(e.index)) for e in b.worst] + [5])
    lines = [
        f"  {'index':<{width}}  {'kernel':>11}  {'float64 ref':>11}  "
        f"{'|' + lowprec + ' ref - ref|':>22}  {'|kernel - ref|':>14}"
    ]
    for e in b.worst:
        lines.append(
            f"  {_index(e.index):<{width}}  {_num(e.analytic):>11}  {_num(e.numeric):>11}  "
            f"{_small(e.error):>22}  {_small(e.abs_diff):>14}"
        )
    return lines


def _reference_block_lines(b: BlockResult, lowprec: str) -> list[str]:
    c = b.comparison
    kind = {"input": "  (input)", "output": "  (output)"}.get(b.kind, "")
    lines = [f"`{b.name}`  shape {_shape(b.shape)}{kind}"]
    if c is None:  # pragma: no cover - every block of a reference check has one
        return lines
    for what, ke, re_, allowed, ok in (
        ("max ", c.kernel_max, c.ref_max, c.allowed_max, c.max_ok),
        ("mean", c.kernel_mean, c.ref_mean, c.allowed_mean, c.mean_ok),
    ):
        lines.append(
            f"  {what} error: kernel {_small(ke)}   {lowprec} reference {_small(re_)}   "
            f"ratio {_ratio(ke, re_)}   allowed {_small(allowed)}"
            + ("" if ok else "   <- too large")
        )
    lines.append(f"  errors above {_visible(c.limit)} of the values are visible here")
    if b.worst:
        lines.extend(_reference_table(b, lowprec))
    if b.diagnosis:
        lines.append(f"  diagnosis: {b.diagnosis}")
    if b.note:
        lines.append(f"  note: {b.note}")
    return lines


def render_reference(report: Report) -> str:
    """The readable report of a reference check (`gradcheck.check_kernel`)."""
    lowprec = report.precision
    n = len(report.blocks)
    wrong = report.failed_blocks
    summary = (
        f"{lowprec} kernel, float64 and {lowprec} reference, {report.evaluations:,} evaluations, "
        f"{report.elapsed:.2f}s"
    )
    ref = report.reference_check
    if report.problem is not None:
        first = f"kernel not judged: {report.problem} ({summary})"
    elif not wrong:
        first = f"kernel agrees with the reference in {_blocks(n, 'all ')} ({summary})"
    else:
        where = "the only block" if n == 1 else f"{len(wrong)} of {_blocks(n)}"
        first = f"kernel disagrees with the reference in {where} ({summary})"
    lines = [
        first,
        f"test per block: kernel error <= k*({lowprec} reference error) + floor, for the max and "
        f"the mean |error| against the float64 reference; k={report.safety:g} "
        f"({report.mode_reason}; seed={report.seed}; {report.framework})",
    ]
    if ref is not None:
        if ref.passed:
            lines.append(
                "reference: its gradients agree with finite differences in float64 "
                f"({ref.mode} mode, {ref.evaluations:,} evaluations)"
            )
        else:
            lines.append("")
            lines.append("the reference's own gradients, against finite differences in float64:")
            for b in ref.failed_blocks:
                lines.extend(_block_lines(b))
    shown = report.blocks if report.problem is not None else wrong
    if report.problem is not None:
        lines.append("")
        lines.append("the kernel against this reference (for information, not a verdict):")
    for b in shown:
        lines.append("")
        lines.extend(_reference_block_lines(b, lowprec))
    passed = [b for b in report.blocks if b.passed and b not in shown]
    if passed:
        lines.append("")
        lines.append(
            f"passed (kernel error / {lowprec} reference error, max and mean; "
            "smallest error visible):"
        )
        width = max(len(f"`{b.name}` {_shape(b.shape)}") for b in passed)
        for b in passed:
            c = b.comparison
            if c is None:  # pragma: no cover
                continue
            label = f"`{b.name}` {_shape(b.shape)}"
            lines.append(
                f"  {label:<{width}}  ratio {_ratio(c.kernel_max, c.ref_max):>4} / "
                f"{_ratio(c.kernel_mean, c.ref_mean):<4}  visible above {_visible(c.limit)}"
            )
    for w in report.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
