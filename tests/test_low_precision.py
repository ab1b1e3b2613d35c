"""`gradcheck.check_kernel`: low-precision kernels against a reference implementation.

The zoo (``tests/zoo/low_precision_torch.py``): every correct kernel passes at three seeds, in
bfloat16 and float16; every mutant fails, in the blocks it breaks; a wrong reference is
reported as the reference's fault; the detection limit the report states is the one the rule
applies; the report renders and serialises like every other.
"""

from __future__ import annotations

import importlib.util
import json
import math
from typing import Any

import numpy as np
import pytest

import gradcheck
from gradcheck import GradientCheckError, check_kernel
from gradcheck._reference_check import compare
from gradcheck._verdict import judge_against_reference
from gradcheck.errors import InvalidOptionError, ModelError

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

if HAS_TORCH:
    import torch
    from gradcheck.adapters import _torch_kernels
    from zoo.low_precision_torch import (
        KERNELS,
        MUTANTS,
        FusedLayerNorm,
        LayerNormReference,
        attention_kernel,
        attention_reference,
        case,
    )

    torch.set_num_threads(1)
    DTYPES: dict[str, Any] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
else:  # pragma: no cover - torch is in the test extra
    KERNELS, MUTANTS, DTYPES = (), {}, {}

if HAS_JAX:
    from zoo import low_precision_jax as jz

    JAX_KERNELS, JAX_MUTANTS = jz.KERNELS, jz.MUTANTS
else:  # pragma: no cover
    JAX_KERNELS, JAX_MUTANTS = (), {}

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="the torch zoo needs torch")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("name", KERNELS)
def test_correct_kernel_passes(name: str, precision: str, seed: int) -> None:
    c = case(name, DTYPES[precision], seed)
    report = check_kernel(c.kernel, c.reference, c.x, seed=seed)
    assert report.passed, report
    assert report.precision == precision
    assert report.reference_check is not None and report.reference_check.passed
    for block in report.blocks:
        assert block.comparison is not None
        # what the check can see, at this precision: about a percent in bfloat16
        assert 0 < block.comparison.limit < (0.05 if precision == "bfloat16" else 0.01)


@pytest.mark.parametrize(("name", "bug"), list(MUTANTS))
def test_mutant_fails_in_its_blocks(name: str, bug: str) -> None:
    c = case(name, torch.bfloat16, 0, bug)
    report = check_kernel(c.kernel, c.reference, c.x)
    assert not report.passed
    expected = MUTANTS[name, bug]
    if expected == "reference":
        assert report.problem is not None
        assert report.problem.startswith("the reference's gradients are wrong: `input`")
        assert report.reference_check is not None
        assert [b.name for b in report.reference_check.failed_blocks] == ["input"]
        assert "the reference's gradients are wrong" in str(report)
    else:
        assert report.problem is None
        assert {b.name for b in report.failed_blocks} == expected, report
        assert str(report).startswith("kernel disagrees with the reference in ")


@pytest.mark.parametrize(("name", "bug"), [k for k, v in MUTANTS.items() if v != "reference"])
def test_mutant_fails_in_float16(name: str, bug: str) -> None:
    c = case(name, torch.float16, 0, bug)
    report = check_kernel(c.kernel, c.reference, c.x, check_reference=False)
    assert {b.name for b in report.failed_blocks} == MUTANTS[name, bug], report


def test_bf16_accumulation_is_a_precision_bug() -> None:
    """Right math, accumulated in bfloat16: measurably worse than the bfloat16 reference."""
    c = case("layer_norm", torch.bfloat16, 0, "bf16_accumulation")
    report = check_kernel(c.kernel, c.reference, c.x, check_reference=False)
    w = report.block("weight").comparison
    assert w is not None and w.kernel_mean > 4 * w.ref_mean
    assert report.block("weight").diagnosis is None  # not a scale: noise


def test_diagnosis_names_a_scale_and_a_sign() -> None:
    report = check_kernel(attention_kernel("no_scale"), attention_reference, _qkv())
    assert (
        report.block("input[0]").diagnosis
        == "kernel = 4 x reference across the block (a wrong scale?)"
    )
    report = check_kernel(attention_kernel("sign"), attention_reference, _qkv())
    assert (
        report.block("input[1]").diagnosis
        == "kernel = -1 x reference across the block (a sign error?)"
    )


def _qkv(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return tuple(torch.randn(1, 2, 8, 16, generator=g).to(dtype) for _ in range(3))


@pytest.mark.parametrize("name", KERNELS)
def test_stated_limit_is_what_the_rule_catches(name: str) -> None:
    """A uniform scale error of a gradient block at twice the stated limit fails; at a
    quarter of it, passes (``benchmarks/low_precision_limit.py`` bisects the exact value)."""
    c = case(name, torch.bfloat16, 0)
    evaluation = _torch_kernels.evaluate(c.kernel, c.reference, c.x)
    stated = {b.name: b.comparison for b in compare(evaluation, 2.0)}
    for block, kind, _ in evaluation.blocks:
        if kind == "output":
            continue
        limit = stated[block].limit  # type: ignore[union-attr]
        original = evaluation.kernel[block]
        for factor, fails in ((2.0, True), (0.25, False)):
            scaled = original * (1.0 + factor * limit)
            evaluation.kernel[block] = torch.from_numpy(scaled).bfloat16().double().numpy()
            result = {b.name: b for b in compare(evaluation, 2.0)}[block]
            assert result.passed is not fails, (name, block, factor)
        evaluation.kernel[block] = original


def test_report_renders_serialises_and_raises() -> None:
    c = case("bias_gelu", torch.bfloat16, 0, "scale_10%")
    report = check_kernel(c.kernel, c.reference, c.x)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith(
        "kernel disagrees with the reference in 1 of 3 blocks (bfloat16 kernel, "
        "float64 and bfloat16 reference, "
    )
    assert lines[1].startswith(
        "test per block: kernel error <= k*(bfloat16 reference error) + floor, for the max "
        "and the mean |error| against the float64 reference; k=2 (floor=2 unit round-offs"
    )
    assert lines[2].startswith("reference: its gradients agree with finite differences in float64")
    assert "`bias`  shape (16,)" in lines
    assert any(
        line.startswith("  mean error: kernel ") and "<- too large" in line for line in lines
    )
    assert any(
        line.startswith("  errors above ") and line.endswith(" of the values are visible here")
        for line in lines
    )
    assert "  diagnosis: kernel = 1.1 x reference across the block (a wrong scale?)" in lines
    assert any(line.startswith("  `output` (32, 16)") for line in lines)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["kind"] == "reference" and data["passed"] is False
    bias = next(b for b in data["blocks"] if b["name"] == "bias")
    assert bias["comparison"]["mean_ok"] is False
    assert data["reference_check"]["passed"] is True
    with pytest.raises(GradientCheckError) as info:
        report.raise_if_failed()
    assert str(info.value) == text
    assert info.value.report is report


def test_gradient_reports_keep_their_json() -> None:
    """A check_gradients report's dictionary has no new keys."""
    report = gradcheck.check_gradients(lambda t: (t**2).sum(), torch.ones(3, dtype=torch.float64))
    assert "kind" not in report.to_dict() and "comparison" not in report.to_dict()["blocks"][0]


def test_user_state_untouched() -> None:
    c = case("layer_norm", torch.bfloat16, 1)
    kernel = c.kernel
    before = {k: v.clone() for k, v in kernel.state_dict().items()}
    x = c.x.clone()
    rng = torch.get_rng_state()
    check_kernel(kernel, c.reference, c.x)
    assert all(torch.equal(before[k], v) for k, v in kernel.state_dict().items())
    assert all(p.grad is None for p in kernel.parameters())
    assert torch.equal(c.x, x) and c.x.dtype == torch.float32 and c.x.grad is None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.dtype == torch.float32 for p in c.reference.parameters())


def test_inputs_are_quantized_before_the_reference_sees_them() -> None:
    """float32 inputs to a bfloat16 kernel: the golden reference gets the bfloat16 values,
    so input rounding does not count as kernel error."""
    c = case("bias_gelu", torch.bfloat16, 0)
    evaluation = _torch_kernels.evaluate(c.kernel, c.reference, c.x)
    x = c.x.bfloat16().double()
    b = c.kernel.bias.detach().double()
    golden = torch.nn.functional.gelu(x + b).numpy()
    np.testing.assert_allclose(evaluation.golden["output"], golden, rtol=1e-12)


def test_precision_option_for_functions() -> None:
    q, k, v = (t.float() for t in _qkv())
    report = check_kernel(attention_kernel(), attention_reference, (q, k, v), precision="bfloat16")
    # the kernel computes in float32 inside, so float32 inputs give float32 outputs: its
    # errors are far below bfloat16's
    assert report.precision == "bfloat16"
    assert report.passed, report


def test_errors() -> None:
    c = case("layer_norm", torch.bfloat16, 0)
    with pytest.raises(InvalidOptionError, match=r"^k must be a finite number >= 1; got 0.5$"):
        check_kernel(c.kernel, c.reference, c.x, k=0.5)
    with pytest.raises(InvalidOptionError, match=r"^precision must be one of "):
        check_kernel(c.kernel, c.reference, c.x, precision="float8")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="check_gradients"):
        check_kernel(c.kernel.double(), c.reference, c.x)
    with pytest.raises(ModelError, match=r"the reference must have the kernel's parameters"):
        check_kernel(FusedLayerNorm(8, torch.bfloat16, 0), torch.nn.Embedding(8, 8), c.x)
    with pytest.raises(ModelError, match=r"the reference must be a module"):
        check_kernel(FusedLayerNorm(8, torch.bfloat16, 0), lambda x: x, c.x)
    assert isinstance(LayerNormReference(8), torch.nn.Module)


def test_rule_floor_and_limit() -> None:
    """The rule on plain arrays: an exact low-precision reference still leaves the rounding
    floor (two unit round-offs of the block's magnitude), and the stated limit is
    ``allowed / magnitude``."""
    golden = np.array([1.0, -2.0, 4.0])
    u = 2.0**-8
    exact = judge_against_reference(golden * (1 + u), golden, golden, 2.0, u)
    assert exact.passed and exact.floor_max == pytest.approx(2 * u * 4.0)
    wrong = judge_against_reference(golden * (1 + 4 * u), golden, golden, 2.0, u)
    assert not wrong.passed
    assert wrong.limit == pytest.approx(2 * u)
    nan = judge_against_reference(golden * math.nan, golden, golden, 2.0, u)
    assert not nan.passed


# --------------------------------------------------------------------------- JAX (bfloat16)
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="needs jax")


@needs_jax
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", JAX_KERNELS)
def test_jax_correct_kernel_passes(name: str, seed: int) -> None:
    c = jz.case(name, seed)
    # the reference's own check compiles each reference anew (seconds): once, on the cheapest
    once = name == "bias_gelu" and seed == 0
    report = check_kernel(c.kernel, c.reference, c.x, seed=seed, check_reference=once)
    assert (report.reference_check is not None) is once
    assert report.passed, report
    assert report.precision == "bfloat16" and report.framework == "jax"
    for block in report.blocks:
        assert block.comparison is not None and 0 < block.comparison.limit < 0.05


@needs_jax
@pytest.mark.parametrize(("name", "bug"), list(JAX_MUTANTS))
def test_jax_mutant_fails_in_its_blocks(name: str, bug: str) -> None:
    c = jz.case(name, 0, bug)
    expected = JAX_MUTANTS[name, bug]
    report = check_kernel(c.kernel, c.reference, c.x, check_reference=expected == "reference")
    assert not report.passed
    if expected == "reference":
        assert report.problem is not None
        assert report.problem.startswith("the reference's gradients are wrong: `input`")
    else:
        assert {b.name for b in report.failed_blocks} == expected, report


@pytest.mark.parametrize("loss", ["mse", "callable"])
@pytest.mark.parametrize("bug", [None, "scale_10%"])
def test_with_a_target_and_a_loss(bug: str | None, loss: str) -> None:
    c = case("bias_gelu", torch.bfloat16, 0, bug)
    y = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    fn: Any = "mse" if loss == "mse" else (lambda o, t: ((o - t) ** 2).sum())
    report = check_kernel(c.kernel, c.reference, c.x, y, loss=fn)
    assert [b.name for b in report.failed_blocks] == ([] if bug is None else ["bias"]), report


@needs_jax
@pytest.mark.parametrize("bug", [None, "scale_10%"])
def test_jax_with_a_target_and_a_loss(bug: str | None) -> None:
    c = jz.case("bias_gelu", 0, bug)
    y = np.random.default_rng(3).standard_normal((32, 16))
    report = check_kernel(c.kernel, c.reference, c.x, y, loss="mse", check_reference=False)
    assert [b.name for b in report.failed_blocks] == ([] if bug is None else ["bias"]), report


def test_float32_master_parameters_are_quantized_too() -> None:
    """A bfloat16 kernel keeping float32 parameters: with ``precision="bfloat16"`` they are
    rounded to bfloat16 values (kept float32) for all three evaluations."""
    c = case("bias_gelu", torch.float32, 0)
    kernel = c.kernel
    report = check_kernel(kernel, c.reference, c.x, precision="bfloat16")
    assert report.passed, report
    assert kernel.bias.dtype == torch.float32
    evaluation = _torch_kernels.evaluate(kernel, c.reference, c.x, precision="bfloat16")
    x = c.x.bfloat16().double()
    b = kernel.bias.detach().bfloat16().double()
    np.testing.assert_allclose(
        evaluation.golden["output"], torch.nn.functional.gelu(x + b).numpy(), rtol=1e-12
    )
