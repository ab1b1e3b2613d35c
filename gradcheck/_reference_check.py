"""``check_kernel``: a low-precision kernel against a reference implementation of the same math.

Finite differences cannot resolve a gradient in bfloat16 (its unit round-off is 2**-8), so a
kernel that only runs in low precision is judged the way kernel projects judge theirs: against a
float64 evaluation of a reference written in plain framework ops (the golden values), with the
error of that same reference evaluated in the kernel's precision as the measure of what the
precision allows. The rule is `gradcheck._verdict.judge_against_reference`; the framework
evaluations are the adapters' (``gradcheck.adapters._torch_kernels``,
``gradcheck.adapters._jax_kernels``); this module knows no framework.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ._dispatch import select_adapter
from ._options import MODES, CheckOptions, Mode
from ._problem import check_container
from ._report import BlockResult, Entry, Report
from ._verdict import REFERENCE_FLOOR_ROUNDINGS, REFERENCE_K, judge_against_reference
from .errors import InvalidOptionError, UnsupportedModelError

__all__ = ["KernelEvaluation", "check_kernel", "compare"]

Precision = Literal["bfloat16", "float16", "float32"]
#: The precisions a kernel can be checked in.
PRECISIONS: tuple[str, ...] = ("bfloat16", "float16", "float32")

#: The reference's own check runs in full mode up to this many entries (inputs and
#: parameters), in fast mode above: cheap either way, next to what a test already costs.
REFERENCE_FULL_UP_TO = 2_000

#: Unit round-off (half the machine epsilon) of each precision a kernel may run in.
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


@dataclass
class KernelEvaluation:
    """What an adapter measured, as float64 NumPy arrays keyed by block name.

    Attributes:
        blocks: ``(name, kind, shape)`` in report order: the outputs (kind ``"output"``),
            then the gradients of the parameters (``"param"``) and of the float inputs
            (``"input"``).
        kernel: the kernel's values (its outputs, and the gradients its backward gives).
        golden: the reference's values in float64 (on the quantized inputs and parameters).
        lowprec: the reference's values in the kernel's precision.
        precision: the kernel's precision (``"bfloat16"``).
        framework: ``"torch"`` or ``"jax"``.
        evaluations: forward-and-backward evaluations made (3).
        reference_check: ``run(seed, mode) -> Report``: checks the float64 reference's
            gradients with finite differences (`gradcheck.check_gradients`), or None.
        size: the entries of the parameters and float inputs (what that check checks).
        notes: warnings for the report.
    """

    blocks: Sequence[tuple[str, str, tuple[int, ...]]]
    kernel: dict[str, np.ndarray]
    golden: dict[str, np.ndarray]
    lowprec: dict[str, np.ndarray]
    precision: str
    framework: str
    evaluations: int = 3
    reference_check: Callable[[int, str], Report] | None = None
    size: int = 0
    notes: list[str] = field(default_factory=list)


def _diagnosis(kernel: np.ndarray, golden: np.ndarray) -> str | None:
    """A sentence when the kernel's block is the golden one times a constant ``c`` (a scale
    or a sign error: what is left after the scale is under a tenth of ``|c - 1|``), or zero
    where the golden block is not."""
    g = golden.ravel()
    kv = kernel.ravel()
    gg = float(g @ g)
    if not (gg > 0 and np.all(np.isfinite(kv))):
        return None
    if not np.any(kv):
        return "the kernel's values are all zero (a missing term or an unconnected gradient?)"
    c = float(kv @ g) / gg
    residual = float(np.linalg.norm(kv - c * g)) / math.sqrt(gg)
    if abs(c - 1.0) > 0.01 and residual <= 0.1 * abs(c - 1.0):
        hint = "a sign error?" if abs(c + 1.0) <= 0.05 else "a wrong scale?"
        return f"kernel = {c:.3g} x reference across the block ({hint})"
    return None


def _worst(
    kernel: np.ndarray, golden: np.ndarray, lowprec: np.ndarray, allowed: float
) -> tuple[Entry, ...]:
    err = np.abs(kernel - golden).ravel()
    err = np.where(np.isnan(err), np.inf, err)
    order = np.argsort(-err, kind="stable")[:5]
    shape = golden.shape
    entries = []
    for flat in order:
        if not err[flat] > 0:
            break
        index = tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else ()
        entries.append(
            Entry(
                index=index,
                analytic=float(kernel.ravel()[flat]),
                numeric=float(golden.ravel()[flat]),
                error=float(abs(lowprec.ravel()[flat] - golden.ravel()[flat])),
                tolerance=allowed,
            )
        )
    return tuple(entries)


def compare(evaluation: KernelEvaluation, k: float) -> tuple[BlockResult, ...]:
    """The reference rule on every block of ``evaluation``."""
    u = UNIT_ROUNDOFF[evaluation.precision]
    results = []
    for name, kind, shape in evaluation.blocks:
        kv = np.asarray(evaluation.kernel[name], dtype=np.float64).reshape(shape)
        gv = np.asarray(evaluation.golden[name], dtype=np.float64).reshape(shape)
        lv = np.asarray(evaluation.lowprec[name], dtype=np.float64).reshape(shape)
        verdict = judge_against_reference(kv, lv, gv, k, u)
        failed = (not verdict.max_ok) + (not verdict.mean_ok)
        results.append(
            BlockResult(
                name=name,
                shape=tuple(shape),
                kind=kind,
                checked=2,
                size=int(gv.size),
                mismatches=failed,
                worst=_worst(kv, gv, lv, verdict.allowed_max) if failed else (),
                max_abs_diff=verdict.kernel_max,
                max_rel_diff=verdict.kernel_max / verdict.scale_max if verdict.scale_max else 0.0,
                scale=verdict.scale_max,
                diagnosis=_diagnosis(kv, gv) if failed else None,
                unit="statistics",
                comparison=verdict,
            )
        )
    return tuple(results)


def _reference_fault(ref: Report) -> str:
    failed = ref.failed_blocks
    names = ", ".join(f"`{b.name}`" for b in failed)
    if ref.problem is not None or not failed:
        return f"the reference's gradients could not be verified: {ref.problem or 'inconclusive'}"
    verb = "disagrees" if len(failed) == 1 else "disagree"
    return (
        f"the reference's gradients are wrong: {names} {verb} with finite differences in "
        "float64, so the kernel is not judged against them (fix the reference first)"
    )


def check_kernel(
    kernel: Any,
    reference: Any,
    x: Any = None,
    y: Any = None,
    *,
    loss: Any = None,
    k: float = REFERENCE_K,
    seed: int = 0,
    precision: Precision | None = None,
    check_reference: bool | Mode = True,
) -> Report:
    """Check a low-precision kernel's outputs and gradients against a reference implementation.

    For kernels that only run in bfloat16, float16 or float32 (fused attention, norm and
    activation kernels with a hand-written backward), where finite differences cannot
    resolve a gradient. The inputs (and a module's parameters) are quantized to the kernel's
    precision first, then three evaluations are compared: the kernel (in its precision), the
    reference in float64 (the golden values; TF32 off on CUDA) and the reference in the
    kernel's precision. Each output and each gradient block passes when, for both the largest
    and the mean ``|error|`` against the golden values,
    ``kernel error <= k * (low-precision reference error) + floor``, the floor being two
    unit round-offs of the precision times the golden block's magnitude.

    Args:
        kernel: a ``torch.nn.Module`` or a function of torch tensors (a custom
            ``autograd.Function`` inside either), or a JAX ``(apply_fn, params)`` pair or a
            function of JAX arrays (a ``jax.custom_vjp`` inside). Its parameters' dtype (or
            else its float inputs') is the precision checked.
        reference: the same math in plain framework ops: a module with the same parameter
            names (the kernel's parameters are loaded into it), an ``apply_fn`` taking the
            same params, or a function of the same inputs.
        x: the input (a tensor, or a tuple/dict of tensors), as for `check_gradients`.
        y: the target; ``None`` projects the output onto a fixed random direction (the
            vector-Jacobian product of every output is checked).
        loss: as for `check_gradients` (a callable ``loss(out, y)`` or a name).
        k: how many times the low-precision reference's error the kernel may have
            (default 2, as flash-attention's tests).
        seed: seeds the output projection and the RNG reset before each evaluation.
        precision: the kernel's precision (``"bfloat16"``, ``"float16"``, ``"float32"``),
            which the inputs are quantized to. Default: the dtype of the kernel's first
            float parameter, else of its first float input.
        check_reference: also check the reference's gradients against finite differences
            in float64 with `check_gradients`, so that kernel = reference = numerical
            derivative is verified in one call. ``True`` (default): in full mode up to
            `REFERENCE_FULL_UP_TO` entries, in fast mode (a few evaluations) above;
            ``"full"``, ``"fast"`` or ``"auto"``: that mode; ``False``: not checked. A
            wrong reference fails the check as the reference's fault, not the kernel's.

    Returns:
        A `Report` (``report.kind == "reference"``): ``report.passed``, ``str(report)``,
        ``report.raise_if_failed()`` and ``to_dict()`` work as for `check_gradients`. Each
        block's ``comparison`` holds the errors, the allowances and the detection limit
        (the smallest relative error of the block this check is sure to see).
    """
    started = time.perf_counter()
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 1):
        raise InvalidOptionError(f"k must be a finite number >= 1; got {k!r}")
    seed = CheckOptions(seed=seed).seed  # validated as check_gradients validates it
    if precision is not None and precision not in PRECISIONS:
        allowed = ", ".join(repr(p) for p in PRECISIONS)
        raise InvalidOptionError(f"precision must be one of {allowed} or None; got {precision!r}")
    if check_reference not in (True, False, *MODES):
        raise InvalidOptionError(
            "check_reference must be True, False, 'auto', 'full' or 'fast'; "
            f"got {check_reference!r}"
        )
    check_container(x, "x")
    check_container(y, "y")
    adapter = select_adapter(kernel, x)
    framework = getattr(adapter, "__name__", "").rsplit(".", 1)[-1]
    if framework not in ("torch", "jax"):
        raise UnsupportedModelError(
            "check_kernel checks torch or JAX kernels (a module, an (apply_fn, params) pair or "
            f"a function of tensors); got {type(kernel).__name__}"
        )
    import importlib

    kernels = importlib.import_module(f"gradcheck.adapters._{framework}_kernels")
    evaluation: KernelEvaluation = kernels.evaluate(
        kernel, reference, x, y, loss=loss, seed=seed, precision=precision
    )
    blocks = compare(evaluation, float(k))
    ref_report = None
    problem = None
    if check_reference is not False and evaluation.reference_check is not None:
        mode = check_reference
        if mode is True:
            mode = "full" if evaluation.size <= REFERENCE_FULL_UP_TO else "fast"
        ref_report = evaluation.reference_check(seed, mode)
        if not ref_report.passed:
            problem = _reference_fault(ref_report)
    evaluations = evaluation.evaluations + (ref_report.evaluations if ref_report else 0)
    reason = (
        f"floor={REFERENCE_FLOOR_ROUNDINGS:g} unit round-offs of the block's magnitude, "
        f"u={UNIT_ROUNDOFF[evaluation.precision]:.2g}"
    )
    return Report(
        blocks=blocks,
        mode="reference",
        mode_reason=reason,
        precision=evaluation.precision,
        rtol=0.0,
        atol=0.0,
        safety=float(k),
        seed=seed,
        evaluations=evaluations,
        elapsed=time.perf_counter() - started,
        framework=evaluation.framework,
        batching="eager",
        warnings=tuple(evaluation.notes),
        problem=problem,
        kind="reference",
        reference_check=ref_report,
    )
