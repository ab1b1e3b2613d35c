"""An external suite for the contracts beyond the gradient: torch's OpInfo database again.

For each op and sample of ``tests/test_torch_opinfo.py`` (float64, CPU, at most
``MAX_ENTRIES`` differentiable entries, ``wrt="inputs", y=None``), and for each contract the op
declares:

- second order, where ``op.supports_gradgrad``: the anchor is
  ``torch.autograd.gradgradcheck``; ours is ``check_gradients(..., order=2)``'s section;
- forward mode, where ``op.supports_forward_ad``: the anchor is ``torch.autograd.gradcheck``
  with ``check_forward_ad=True`` (and the backward left out); ours is ``forward=True``;
- batched backward, where ``op.check_batched_grad``: the anchor is ``gradcheck`` with
  ``check_batched_grad=True``; ours is ``batched=True``.

Where the anchor passes, our section must pass (agreement: no false alarm on torch's own
correct rules). Our section "not checked" where torch checked is counted apart, with the
reason (a rule torch.func cannot run, for instance), and is not an agreement. Exclusions are
those of ``tests/test_torch_opinfo.py`` (ops torch's own suite skips, no small sample). The
counts are printed and asserted on the torch this file was written against.

Slow (``-m slow``): several minutes on two cores.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("torch")
import torch

pytest.importorskip("expecttest")

from test_torch_opinfo import op_label, pick_sample, skipped_by_torch

from gradcheck import check_gradients

pytestmark = pytest.mark.slow

CONTRACTS = ("second order", "forward mode", "batched backward")

# Ops where the anchor passes and our verdict differs, each examined: ours is right at the
# letter, and the anchor's looser tolerance (atol=1e-5, rtol=1e-3) accepts the difference.
EXCLUDED: dict[str, dict[str, str]] = {
    "second order": {
        "logcumsumexp": "the sample's Hessian is zero; the double backward returns round-off "
        "of 3e-12 (1e4 ulps of the gradient) where the loss u.g does not change at all",
        "scatter_reduce.prod": "inconclusive, not wrong: the sample's Hessian is zero; the "
        "double backward returns round-off of 2e-16 that finite differences (noise 1e-13) "
        "cannot resolve",
        "nn.functional.multi_head_attention_forward": "inconclusive, not wrong: two input "
        "blocks' second derivatives are round-off (1e-11) below what finite differences of "
        "u.g resolve (noise 1.6e-10)",
    },
    "forward mode": {
        "cholesky_inverse": "torch's forward-mode and reverse-mode rules differ by 1e-5 "
        "relative on this well-conditioned sample (jacfwd against jacrev); reverse mode agrees "
        "with finite differences to 1e-9",
    },
    "batched backward": {},
}

# The counts this suite produced on torch 2.13.0 (CPU); asserted below (None: not yet measured).
EXPECTED_TORCH = "2.13"
EXPECTED: dict[str, dict[str, int]] | None = {
    "second order": {
        "declared": 473,
        "anchor_passed": 471,
        "agree": 468,
        "not_checked": 0,
        "excluded": 3,
    },
    "forward mode": {
        "declared": 461,
        "anchor_passed": 461,
        "agree": 460,
        "not_checked": 0,
        "excluded": 1,
    },
    # not checked: 12 ops torch.func.vmap cannot run over their inputs (batch norm's running
    # statistics, .item(), rrelu's and bernoulli's randomness); torch's check_batched_grad
    # vmaps over the output gradients only, which these ops support
    "batched backward": {
        "declared": 461,
        "anchor_passed": 461,
        "agree": 449,
        "not_checked": 12,
        "excluded": 0,
    },
}


@dataclass
class Tally:
    declared: int = 0  # ops that declare the contract, with a usable sample
    anchor_passed: int = 0
    agree: int = 0
    not_checked: Counter[str] = field(default_factory=Counter)
    not_checked_ops: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    anchor_failed: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "declared": self.declared,
            "anchor_passed": self.anchor_passed,
            "agree": self.agree,
            "not_checked": sum(self.not_checked.values()),
            "excluded": len(self.excluded),
        }


def declares(op: Any, contract: str) -> bool:
    if contract == "second order":
        return bool(op.supports_gradgrad)
    if contract == "forward mode":
        return bool(op.supports_forward_ad)
    return bool(getattr(op, "check_batched_grad", False))


def anchor(op: Any, contract: str, fn: Callable[..., Any], tensors: list[torch.Tensor]) -> bool:
    inputs = tuple(t.clone().requires_grad_(True) for t in tensors)
    tol = op.gradcheck_nondet_tol
    try:
        if contract == "second order":
            return bool(
                torch.autograd.gradgradcheck(fn, inputs, nondet_tol=tol, raise_exception=False)
            )
        if contract == "forward mode":
            return bool(
                torch.autograd.gradcheck(
                    fn,
                    inputs,
                    nondet_tol=tol,
                    raise_exception=False,
                    check_forward_ad=True,
                    check_backward_ad=False,
                    check_undefined_grad=False,
                    check_batched_grad=False,
                )
            )
        return bool(
            torch.autograd.gradcheck(
                fn, inputs, nondet_tol=tol, raise_exception=False, check_batched_grad=True
            )
        )
    except Exception:
        return False


def ours(
    fn: Callable[..., Any], tensors: list[torch.Tensor], asked: list[str]
) -> dict[str, tuple[bool, str | None]] | str:
    """Our verdict on each contract asked: (passed, why not checked), or why the call raised."""
    try:
        report = check_gradients(
            fn,
            tuple(tensors),
            wrt="inputs",
            mode="full",
            order=2 if "second order" in asked else 1,
            forward="forward mode" in asked,
            batched="batched backward" in asked,
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return {c: (report.section(c).passed, report.section(c).not_checked) for c in asked}


def run_suite() -> dict[str, Tally]:
    from torch.testing._internal.common_methods_invocations import op_db

    torch.set_num_threads(1)
    tallies = {c: Tally() for c in CONTRACTS}
    ops = [o for o in op_db if o.supports_autograd and torch.float64 in o.supported_dtypes("cpu")]
    for op in ops:
        asked = [c for c in CONTRACTS if declares(op, c)]
        if not asked or skipped_by_torch(op):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            picked = pick_sample(op)
            if isinstance(picked, str):
                continue
            tensors, fn = picked
            verdicts = ours(fn, tensors, asked)
            for contract in asked:
                tally = tallies[contract]
                tally.declared += 1
                if not anchor(op, contract, fn, tensors):
                    tally.anchor_failed.append(op_label(op))
                    continue
                tally.anchor_passed += 1
                if isinstance(verdicts, str):
                    tally.disagreements.append(f"{op_label(op)} ({verdicts})")
                    continue
                passed, why = verdicts[contract]
                if why is not None:
                    tally.not_checked[why.split(":")[0]] += 1
                    tally.not_checked_ops.append(f"{op_label(op)} ({why[:100]})")
                elif passed:
                    tally.agree += 1
                elif op_label(op) in EXCLUDED[contract]:
                    tally.excluded.append(op_label(op))
                else:
                    tally.disagreements.append(op_label(op))
    return tallies


def report(tallies: dict[str, Tally]) -> str:
    lines = []
    for contract, t in tallies.items():
        lines.append(
            f"{contract}: {t.declared} ops declare it; the anchor passed {t.anchor_passed}; "
            f"ours agrees on {t.agree}; not checked {dict(t.not_checked)}: {t.not_checked_ops}; "
            f"excluded (see EXCLUDED) {t.excluded}; disagreements {t.disagreements}; "
            f"the anchor failed on {t.anchor_failed}"
        )
    return "\n".join(lines)


def test_opinfo_contracts_agree_with_torchs_checkers(capsys: pytest.CaptureFixture[str]) -> None:
    tallies = run_suite()
    text = report(tallies)
    with capsys.disabled():
        print("\n" + text)
    for t in tallies.values():
        assert t.disagreements == [], text
        assert t.anchor_passed > 0, text
    if EXPECTED is not None and torch.__version__.startswith(EXPECTED_TORCH):
        assert {c: t.counts() for c, t in tallies.items()} == EXPECTED, text


if __name__ == "__main__":
    t0 = time.perf_counter()
    result = run_suite()
    print(report(result))
    print({c: t.counts() for c, t in result.items()})
    print(f"{time.perf_counter() - t0:.0f} s")
