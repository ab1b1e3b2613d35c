"""An external suite: every differentiable op in torch's OpInfo database.

For each op with float64 support and ``supports_autograd`` we take its first float64
sample input that is small enough (at most ``MAX_ENTRIES`` differentiable entries) and
check it with ``wrt="inputs", y=None`` (the fixed random projection of every float
output):

1. agreement: where ``torch.autograd.gradcheck`` passes on the sample, our verdict
   must be "passed" too;
2. catches: the op wrapped in an ``autograd.Function`` whose backward recomputes the
   right vector-Jacobian product, then (a) flips its sign or (b) multiplies one entry
   (the largest) by 1.001, in the input with the largest gradient, must fail; the
   same wrapper with the backward left alone must pass (the control).

Excluded, with the reason recorded per op (see ``EXCLUDED_REASONS``): ops whose torch
test suite skips or expects failure of its own gradcheck test for CPU float64; ops
with no sample of at most ``MAX_ENTRIES`` entries; ops without a floating-point
output (complex or integer only); samples with an all-zero gradient (a perturbed
zero is still zero, so no backward bug can show). The counts are printed and
asserted: when torch changes its op database they change, and this file says so.

Runs in about 3-4 minutes on two slow cores (``-m slow`` selects it; CI runs it).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("torch")
import torch

pytest.importorskip("expecttest")  # needed by torch.testing._internal

from gradcheck import check_gradients

pytestmark = pytest.mark.slow

MAX_ENTRIES = 400  # differentiable input entries per sample (bounds the runtime)
MIN_GRADIENT = 1e-9  # below this everywhere, a gradient is round-off (corrcoef of 2 numbers)
MAX_SAMPLES_TRIED = 8  # sample inputs looked at per op to find a small one

# The counts this suite produced on torch 2.13.0 (CPU); asserted below.
EXPECTED_TORCH = "2.13"
EXPECTED = {
    "ops": 540,
    "checked": 481,
    "torch_passed": 481,
    "agree": 481,
    "perturbable": 468,
    "control_passed": 468,
    "caught_sign": 468,
    "caught_scale": 468,
}


@dataclass
class Outcome:
    ops: int = 0
    checked: int = 0
    torch_passed: int = 0
    agree: int = 0
    perturbable: int = 0
    control_passed: int = 0
    caught_sign: int = 0
    caught_scale: int = 0
    excluded: Counter[str] = field(default_factory=Counter)
    disagreements: list[str] = field(default_factory=list)
    torch_failed: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in EXPECTED}


def op_label(op: Any) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def skipped_by_torch(op: Any) -> bool:
    """Torch's own suite skips or xfails ``test_fn_grad`` for this op on CPU float64."""
    for info in op.skips:
        for cls in ("TestBwdGradients", "TestGradients"):
            try:
                active = info.is_active(cls, "test_fn_grad", "cpu", torch.float64, {})
            except Exception:
                active = False
            if active:
                return True
    return False


def split_sample(op: Any, sample: Any) -> tuple[list[torch.Tensor], Callable[..., Any]] | None:
    """The differentiable tensors of a sample and a function of them that calls the op."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    slots = [
        i
        for i, v in enumerate(leaves)
        if isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.requires_grad
    ]
    if not slots:
        return None
    tensors = [leaves[i].detach() for i in slots]
    variant = op.get_op()

    def fn(*xs: torch.Tensor) -> Any:
        values = list(leaves)
        for i, x in zip(slots, xs, strict=True):
            values[i] = x
        inp, args, kwargs = pytree.tree_unflatten(values, spec)
        out = op.gradcheck_wrapper(variant, inp, *args, **kwargs)
        out = sample.output_process_fn_grad(out)
        floats = [
            t
            for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        return tuple(floats)

    return tensors, fn


def pick_sample(op: Any) -> tuple[list[torch.Tensor], Callable[..., Any]] | str:
    """The first usable sample whose gradient is not zero (else the first usable one),
    among the first ``MAX_SAMPLES_TRIED``; or why there is none."""
    reason = "no float64 sample with differentiable tensors"
    fallback: tuple[list[torch.Tensor], Callable[..., Any]] | None = None
    try:
        samples = op.sample_inputs("cpu", torch.float64, requires_grad=True)
        for n, sample in enumerate(samples):
            if n >= MAX_SAMPLES_TRIED:
                break
            found = split_sample(op, sample)
            if found is None:
                continue
            tensors, fn = found
            size = sum(t.numel() for t in tensors)
            if size == 0:
                reason = "only empty samples"
                continue
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                # gradcheck refuses a starting point that is not finite (NonFiniteError)
                reason = "only samples with Inf or NaN inputs"
                continue
            if size > MAX_ENTRIES:
                reason = f"no sample with at most {MAX_ENTRIES} entries"
                continue
            with torch.no_grad():
                outs = fn(*tensors)
            if not outs:
                reason = "no floating-point output (complex or integer only)"
                continue
            if has_gradient(fn, tensors):
                return tensors, fn
            if fallback is None:
                fallback = (tensors, fn)
    except Exception as exc:  # a sample generator that does not work on CPU float64
        return f"sample inputs raise {type(exc).__name__}"
    return reason if fallback is None else fallback


def torch_verdict(op: Any, fn: Callable[..., Any], tensors: list[torch.Tensor]) -> bool:
    inputs = tuple(t.clone().requires_grad_(True) for t in tensors)
    try:
        return bool(
            torch.autograd.gradcheck(
                fn, inputs, nondet_tol=op.gradcheck_nondet_tol, raise_exception=False
            )
        )
    except Exception:
        return False


def ours(fn: Callable[..., Any], tensors: list[torch.Tensor]) -> bool:
    try:
        return check_gradients(fn, tuple(tensors), wrt="inputs", mode="full").passed
    except Exception:
        return False


def perturbed(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """``fn`` as an autograd.Function whose backward is right, then perturbed by ``kind``."""

    class Wrapped(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *xs: torch.Tensor) -> Any:
            ctx.save_for_backward(*xs)
            with torch.enable_grad():  # which outputs the op itself calls differentiable
                probe = fn(*[x.detach().requires_grad_(True) for x in xs])
            outs = tuple(o.detach().clone() for o in probe)
            ctx.mark_non_differentiable(
                *[o for o, p in zip(outs, probe, strict=True) if not p.requires_grad]
            )
            return outs

        @staticmethod
        def backward(ctx: Any, *gs: torch.Tensor) -> Any:
            xs = [x.detach().requires_grad_(True) for x in ctx.saved_tensors]
            with torch.enable_grad():
                outs = fn(*xs)
            pairs = [(o, g) for o, g in zip(outs, gs, strict=True) if o.requires_grad]
            grads = torch.autograd.grad(
                [o for o, _ in pairs], xs, [g for _, g in pairs], allow_unused=True
            )
            result = [
                torch.zeros_like(x) if g is None else g.clone()
                for g, x in zip(grads, xs, strict=True)
            ]
            target = max(
                range(len(result)),
                key=lambda i: float(result[i].abs().max()) if result[i].numel() else 0.0,
            )
            if kind == "sign":
                result[target] = -result[target]
            elif kind == "scale":
                flat = result[target].view(-1)
                flat[int(flat.abs().argmax())] *= 1.001
            return tuple(result)

    def call(*xs: torch.Tensor) -> Any:
        return Wrapped.apply(*xs)

    return call


def has_gradient(fn: Callable[..., Any], tensors: list[torch.Tensor]) -> bool:
    xs = [t.clone().requires_grad_(True) for t in tensors]
    outs = [o for o in fn(*xs) if o.requires_grad]
    if not outs:
        return False
    total = sum((o * torch.randn_like(o)).sum() for o in outs)
    grads = torch.autograd.grad(total, xs, allow_unused=True)
    return any(bool(g.abs().max() > MIN_GRADIENT) for g in grads if g is not None and g.numel())


def run_suite() -> Outcome:
    from torch.testing._internal.common_methods_invocations import op_db

    torch.set_num_threads(1)
    out = Outcome()
    ops = [o for o in op_db if o.supports_autograd and torch.float64 in o.supported_dtypes("cpu")]
    out.ops = len(ops)
    for op in ops:
        label = op_label(op)
        if skipped_by_torch(op):
            out.excluded["torch's own suite skips its gradcheck (CPU float64)"] += 1
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            picked = pick_sample(op)
            if isinstance(picked, str):
                out.excluded[picked] += 1
                continue
            tensors, fn = picked
            out.checked += 1
            torch_ok = torch_verdict(op, fn, tensors)
            our_ok = ours(fn, tensors)
            if not torch_ok:
                out.torch_failed.append(f"{label} (ours: {'pass' if our_ok else 'fail'})")
            else:
                out.torch_passed += 1
                if our_ok:
                    out.agree += 1
                else:
                    out.disagreements.append(label)
            if torch_ok and our_ok:
                if not has_gradient(fn, tensors):
                    out.excluded["zero gradient (a perturbation cannot show)"] += 1
                else:
                    out.perturbable += 1
                    out.control_passed += ours(perturbed(fn, "none"), tensors)
                    sign = not ours(perturbed(fn, "sign"), tensors)
                    scale = not ours(perturbed(fn, "scale"), tensors)
                    out.caught_sign += sign
                    out.caught_scale += scale
                    if not (sign and scale):
                        out.missed.append(
                            f"{label} (sign {'caught' if sign else 'missed'}, x1.001 {'caught' if scale else 'missed'})"
                        )
        out.slowest.append((time.perf_counter() - start, label))
    out.slowest = sorted(out.slowest, reverse=True)[:8]
    return out


def report(out: Outcome) -> str:
    lines = [
        f"OpInfo ops with autograd and float64: {out.ops}; checked {out.checked}",
        f"torch.autograd.gradcheck passed on {out.torch_passed}; ours agrees on {out.agree}",
        f"disagreements: {out.disagreements}",
        f"torch.autograd.gradcheck failed on {len(out.torch_failed)}: {out.torch_failed}",
        f"perturbed backward: {out.perturbable} ops; control passed {out.control_passed}; "
        f"sign flip caught {out.caught_sign}; x1.001 on one entry caught {out.caught_scale}",
        f"missed: {out.missed}",
        f"excluded: {dict(out.excluded)}",
        "slowest: " + ", ".join(f"{name} {secs:.1f}s" for secs, name in out.slowest),
    ]
    return "\n".join(lines)


def test_opinfo_agreement_and_catches(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_suite()
    text = report(out)
    with capsys.disabled():
        print("\n" + text)
    assert out.disagreements == [], text
    assert out.control_passed == out.perturbable, text
    if torch.__version__.startswith(EXPECTED_TORCH):
        assert out.counts() == EXPECTED, text
    else:
        assert math.isfinite(out.agree)


if __name__ == "__main__":
    t0 = time.perf_counter()
    result = run_suite()
    print(report(result))
    print(result.counts())
    print(f"{time.perf_counter() - t0:.0f} s")
