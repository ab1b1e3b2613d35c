"""The pytest plugin (``_gradcheck_pytest``), run through pytester.

Most runs are in-process (fast); the pytest-xdist runs, the torch and JAX runs and
the import-cost check use a subprocess.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import gradcheck.reference  # noqa: F401  (loaded once here, not again by every in-process run)

pytest_plugins = ["pytester"]

#: Keep other installed plugins out of the inner runs (Hypothesis' summary imports all of
#: Hypothesis, which pytester unloads after every in-process run).
ISOLATE = ("-p", "no:hypothesispytest", "-p", "no:jaxtyping")

#: Shared by the inner test files: the reference MLP, a correct and a buggy copy.
MODELS = """
import numpy as np
import pytest
from gradcheck.reference import MLP

X = np.random.default_rng(0).normal(size=(4, 2))
Y = np.random.default_rng(1).normal(size=(4, 1))
GOOD = MLP([2, 3, 1], activation="tanh", seed=0)
BAD = GOOD.with_bug("one_entry")
"""


def _write_tests(pytester: pytest.Pytester, body: str, name: str = "test_models") -> Path:
    return pytester.makepyfile(**{name: MODELS + textwrap.dedent(body)})


def _read_report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _seeds(document: dict[str, Any]) -> dict[str, int]:
    return {c["nodeid"].split("::")[-1]: c["report"]["seed"] for c in document["checks"]}


# ------------------------------------------------------------------------ registration
def test_help_lists_options_and_ini_keys(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*ISOLATE, "--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["gradcheck: gradient checks of custom layers:"])
    for option in ("mode", "seed", "rtol", "atol", "max-evals", "report"):
        result.stdout.fnmatch_lines([f"*--gradcheck-{option}*"])
        result.stdout.fnmatch_lines([f"*gradcheck_{option.replace('-', '_')} (string)*"])
    assert "--gradcheck-dtype" not in result.stdout.str()


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*ISOLATE, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gradcheck(**options):*"])


def test_disabled_with_p_no_gradcheck(pytester: pytest.Pytester) -> None:
    help_text = pytester.runpytest(*ISOLATE, "-p", "no:gradcheck", "--help").stdout.str()
    assert "--gradcheck-mode" not in help_text
    _write_tests(
        pytester,
        """
        def test_uses_fixture(gradcheck):
            gradcheck(GOOD, X, Y)
        """,
    )
    result = pytester.runpytest(*ISOLATE, "-p", "no:gradcheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'gradcheck' not found*"])


def test_plugin_module_imports_only_pytest() -> None:
    code = (
        "import sys, _gradcheck_pytest; "
        "bad = sorted(m for m in ('numpy', 'gradcheck', 'torch', 'jax') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ----------------------------------------------------------------------------- fixture
def test_passing_run_returns_report_and_prints_summary(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        def test_good(gradcheck):
            report = gradcheck(GOOD, X, Y, loss="mse")
            assert report.passed
            assert report.block("W0").mismatches == 0
            assert report.framework == "numpy"
        """,
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*- gradcheck -*",
            "models checked: 1 in 1 test; failed: 0",
            "blocks checked: 5; entries checked: 21; random directions: 0; evaluations: *",
            "worst error: none (every checked entry within tolerance)",
            "time in checks: *s",
        ]
    )


def test_no_summary_without_checks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(passed=1)
    assert "models checked" not in result.stdout.str()
    assert "gradcheck:" not in result.stdout.str()  # no header line either


def test_failing_run_names_block_and_worst_entry(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        def test_bad(gradcheck):
            gradcheck(BAD, X, Y, loss="mse")
        """,
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            # the user's own line, then our message
            '>       gradcheck(BAD, X, Y, loss="mse")',
            "E       gradcheck.GradientCheckError: gradients disagree in 1 of 5 blocks *",
            "E       `W0`  shape (3, 2)",
            "E         mismatched: 1 / 6 entries (16.7%)*",
            "E         index      analytic      numeric (± est. error)  abs diff",
            "E         (1, 1)  *",
            "E         diagnosis: only 1 of 6 entries disagree*",
            "E       passed: `b0` (3,), `W1` (1, 3), `b1` (1,), `input` (4, 2)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "models checked: 1 in 1 test; failed: 1",
            "worst error: `W0` in test_models.py::test_bad: max abs diff *, max rel diff *"
            " (1 of 6 mismatched)",
        ]
    )
    # the traceback stops at the user's line: none of the plugin's frames
    assert "_gradcheck_pytest.py" not in result.stdout.str()
    assert "<gradcheck fixture of test_models.py::test_bad>" in result.stdout.str()


def test_failure_can_be_expected_with_pytest_raises(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        from gradcheck import GradientCheckError

        def test_catches_the_bug(gradcheck):
            with pytest.raises(GradientCheckError) as info:
                gradcheck(BAD, X, Y)
            assert [b.name for b in info.value.report.failed_blocks] == ["W0"]
            assert info.value.report.block("W0").worst[0].index == (1, 1)
        """,
    )
    pytester.runpytest(*ISOLATE).assert_outcomes(passed=1)


def test_unknown_call_keyword_is_a_type_error(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        def test_typo(gradcheck):
            gradcheck(GOOD, X, Y, mdoe="full")
        """,
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E * TypeError: gradcheck() got unknown keyword 'mdoe'; allowed: mode, seed, *, loss"]
    )


def test_invalid_option_value_names_it(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        @pytest.mark.gradcheck(mode="fastest")
        def test_bad_mode(gradcheck):
            gradcheck(GOOD, X, Y)
        """,
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*InvalidOptionError: mode must be one of*'fastest'*"])


# ----------------------------------------------------------------------------- markers
def test_unknown_marker_keyword_errors(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        @pytest.mark.gradcheck(mdoe="full")
        def test_typo(gradcheck):
            gradcheck(GOOD, X, Y)

        @pytest.mark.gradcheck("full")
        def test_positional():
            pass

        @pytest.mark.gradcheck(mode="full")
        def test_fine(gradcheck):
            gradcheck(GOOD, X, Y)
        """,
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_typo*",
            "@pytest.mark.gradcheck got unknown keyword 'mdoe'; "
            "allowed: mode, seed, rtol, atol, max_evals, nondet_tol, order, forward, batched, wrt",
        ]
    )
    result.stdout.fnmatch_lines(
        ["@pytest.mark.gradcheck takes keyword arguments only (*); got positional ('full',)"]
    )


def test_marker_wrt_and_mode(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        @pytest.mark.gradcheck(wrt="params", mode="fast")
        def test_params_fast(gradcheck):
            report = gradcheck(GOOD, X, Y)
            assert report.mode == "fast"
            assert [b.name for b in report.blocks] == ["W0", "b0", "W1", "b1"]
        """,
    )
    pytester.runpytest(*ISOLATE).assert_outcomes(passed=1)


# ------------------------------------------------------------------------- precedence
PRECEDENCE_TESTS = """
def test_default(gradcheck):
    gradcheck(GOOD, X, Y)

@pytest.mark.gradcheck(seed=30)
def test_marker(gradcheck):
    gradcheck(GOOD, X, Y)

@pytest.mark.gradcheck(seed=30)
def test_keyword(gradcheck):
    gradcheck(GOOD, X, Y, seed=40)

@pytest.mark.gradcheck(seed=50, rtol=1e-4)
class TestClass:
    @pytest.mark.gradcheck(seed=60)
    def test_closest_marker(self, gradcheck):
        report = gradcheck(GOOD, X, Y)
        assert report.rtol == 1e-4  # the class marker still gives what the closer one leaves

    def test_keyword_over_class(self, gradcheck):
        gradcheck(GOOD, X, Y, seed=70)
"""


@pytest.mark.parametrize(
    ("ini", "cmdline", "default_seed"),
    [
        (None, None, 0),
        ("gradcheck_seed = 10", None, 10),
        (None, "--gradcheck-seed=20", 20),
        ("gradcheck_seed = 10", "--gradcheck-seed=20", 20),
    ],
    ids=["default", "ini", "cmdline", "cmdline-over-ini"],
)
def test_precedence_keyword_marker_cmdline_ini_default(
    pytester: pytest.Pytester, ini: str | None, cmdline: str | None, default_seed: int
) -> None:
    if ini is not None:
        pytester.makeini(f"[pytest]\n{ini}\n")
    _write_tests(pytester, PRECEDENCE_TESTS)
    args = ["--gradcheck-report=out.json"] + ([cmdline] if cmdline else [])
    result = pytester.runpytest(*ISOLATE, *args)
    result.assert_outcomes(passed=5)
    assert _seeds(_read_report(pytester.path / "out.json")) == {
        "test_default": default_seed,
        "test_marker": 30,
        "test_keyword": 40,
        "test_closest_marker": 60,
        "test_keyword_over_class": 70,
    }


def test_ini_keys_and_command_line_options(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        gradcheck_mode = "fast"
        gradcheck_rtol = "1e-5"
        gradcheck_atol = 1e-7
        gradcheck_max_evals = 1000
        gradcheck_forward = "yes"
        gradcheck_report = "reports/gradcheck.json"
        """
    )
    _write_tests(
        pytester,
        """
        def test_settings(gradcheck):
            assert gradcheck.settings() == {
                "mode": "fast", "seed": 0, "rtol": 1e-5, "atol": 1e-7, "max_evals": 1000,
                "nondet_tol": None, "order": 1, "forward": True, "batched": False,
            }
            report = gradcheck(GOOD, X, Y)
            assert (report.mode, report.rtol, report.atol) == ("fast", 1e-5, 1e-7)
            assert report.section("forward mode").not_checked  # a NumPy model: first order only

        def test_settings_cmdline(gradcheck, request):
            if request.config.getoption("gradcheck_mode") is None:
                pytest.skip("only with the command-line options")
            assert gradcheck.settings() == {
                "mode": "full", "seed": 3, "rtol": 0.5, "atol": 1e-7, "max_evals": 1000,
                "nondet_tol": None, "order": 2, "forward": True, "batched": False,
            }
        """,
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(passed=1, skipped=1)
    assert (pytester.path / "reports" / "gradcheck.json").is_file()
    result = pytester.runpytest(
        *ISOLATE,
        "-v",
        "--gradcheck-mode=full",
        "--gradcheck-seed",
        "3",
        "--gradcheck-rtol=0.5",
        "--gradcheck-order=2",
    )
    result.assert_outcomes(passed=1, failed=1)  # test_settings now sees the command line
    result.stdout.fnmatch_lines(
        [
            "gradcheck: mode=full, seed=3, rtol=0.5, atol=1e-07, max_evals=1000, "
            "nondet_tol=None, order=2, forward=True, batched=False; report: *"
            "gradcheck.json"
        ]
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "ini",
            "*ini key gradcheck_mode: mode must be one of 'auto', 'full', 'fast'; got 'fastest'*",
        ),
        (
            "cmdline",
            "*--gradcheck-mode: mode must be one of 'auto', 'full', 'fast'; got 'fastest'*",
        ),
    ],
    ids=["ini", "cmdline"],
)
def test_bad_setting_is_a_usage_error(pytester: pytest.Pytester, source: str, message: str) -> None:
    pytester.makepyfile("def test_plain():\n    pass\n")
    if source == "ini":
        pytester.makeini("[pytest]\ngradcheck_mode = fastest\n")
        result = pytester.runpytest(*ISOLATE)
    else:
        result = pytester.runpytest(*ISOLATE, "--gradcheck-mode=fastest")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


# ------------------------------------------------------------------------- JSON report
def test_json_report_holds_every_check(pytester: pytest.Pytester) -> None:
    _write_tests(
        pytester,
        """
        def test_two_checks(gradcheck):
            gradcheck(GOOD, X, Y)
            gradcheck(GOOD, X, None, wrt="inputs")

        def test_bad(gradcheck):
            gradcheck(BAD, X, Y)
        """,
    )
    result = pytester.runpytest(*ISOLATE, "--gradcheck-report", "sub/dir/report.json")
    result.assert_outcomes(passed=1, failed=1)
    document = _read_report(pytester.path / "sub" / "dir" / "report.json")
    assert document["format"] == 1
    assert document["summary"] == {"checks": 3, "passed": 2, "failed": 1}
    keys = [(c["nodeid"], c["call"], c["passed"]) for c in document["checks"]]
    assert keys == [
        ("test_models.py::test_bad", 0, False),
        ("test_models.py::test_two_checks", 0, True),
        ("test_models.py::test_two_checks", 1, True),
    ]
    bad = document["checks"][0]["report"]
    assert [b["name"] for b in bad["blocks"] if not b["passed"]] == ["W0"]
    assert bad["blocks"][0]["worst"][0]["index"] == [1, 1]


XDIST_TESTS = """
@pytest.mark.parametrize("seed", range(6))
def test_good(gradcheck, seed):
    gradcheck(MLP([2, 3, 1], seed=seed), X, Y, seed=seed)

@pytest.mark.parametrize("bug", ["one_entry", "factor_2"])
def test_bad(gradcheck, bug):
    from gradcheck import GradientCheckError
    with pytest.raises(GradientCheckError):
        gradcheck(GOOD.with_bug(bug), X, Y)
"""


def test_json_report_under_xdist_holds_every_check(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    _write_tests(pytester, XDIST_TESTS, name="test_one")
    _write_tests(pytester, XDIST_TESTS, name="test_two")
    result = pytester.runpytest_subprocess(*ISOLATE, "-n", "2", "--gradcheck-report=report.json")
    result.assert_outcomes(passed=16)
    result.stdout.fnmatch_lines(
        [
            "*- gradcheck -*",
            "models checked: 16 in 16 tests; failed: 4",
            "worst error: *",
        ]
    )
    document = _read_report(pytester.path / "report.json")
    nodeids = [c["nodeid"] for c in document["checks"]]
    expected = sorted(
        f"{module}.py::{test}"
        for module in ("test_one", "test_two")
        for test in [f"test_good[{s}]" for s in range(6)]
        + ["test_bad[one_entry]", "test_bad[factor_2]"]
    )
    assert nodeids == expected
    assert document["summary"] == {"checks": 16, "passed": 12, "failed": 4}


# -------------------------------------------------------------------- other frameworks
TORCH_TESTS = """
import torch

class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x**2 * grad  # the bug: d(x**3)/dx is 3 x**2

def test_torch_mlp(gradcheck):
    report = gradcheck(GOOD.to_torch(), torch.from_numpy(X), torch.from_numpy(Y), loss="mse")
    assert report.framework == "torch"
    assert not report.failed_blocks

def test_torch_custom_function_bug(gradcheck):
    gradcheck(Cube.apply, torch.linspace(0.5, 2.0, 5, dtype=torch.float64))
"""

JAX_TESTS = """
import jax

@jax.custom_vjp
def cube(x):
    return x**3

def cube_fwd(x):
    return x**3, x

def cube_bwd(x, grad):
    return (2 * x**2 * grad,)  # the bug: d(x**3)/dx is 3 x**2

cube.defvjp(cube_fwd, cube_bwd)

def test_jax_mlp(gradcheck):
    report = gradcheck(GOOD.to_jax(), X, Y, loss="mse")
    assert report.framework == "jax"
    assert not report.failed_blocks

def test_jax_custom_vjp_bug(gradcheck):
    params = {"scale": np.ones(5)}
    gradcheck((lambda p, x: cube(p["scale"] * x), params), np.linspace(0.5, 2.0, 5))
"""


def _skip_unless_installed(name: str) -> None:
    """Skip without importing: what a test imports while ``pytester`` is active is unloaded
    after it, and torch and jaxlib abort the process when a later test imports them again.
    So the framework runs in a subprocess only."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")


def test_fixture_with_torch_models(pytester: pytest.Pytester) -> None:
    _skip_unless_installed("torch")
    _write_tests(pytester, TORCH_TESTS)
    result = pytester.runpytest_subprocess(*ISOLATE)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            ">       gradcheck(Cube.apply, torch.linspace(*",
            "E       *GradientCheckError: gradients disagree in the only block*",
            "E         mismatched: 5 / 5 entries*",
        ]
    )


def test_fixture_with_jax_models(pytester: pytest.Pytester) -> None:
    _skip_unless_installed("jax")
    _write_tests(pytester, JAX_TESTS)
    result = pytester.runpytest_subprocess(*ISOLATE)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            ">       gradcheck((lambda p, x: cube(*",
            "E       *GradientCheckError: gradients disagree in 2 of 2 blocks*",
        ]
    )


# ------------------------------------------------------------------------ kernel checks
KERNEL_TESTS = """
import pytest
import torch
from gradcheck import GradientCheckError
from kernel_zoo import case

torch.set_num_threads(1)


def test_kernel_passes(gradcheck):
    c = case("bias_gelu")
    report = gradcheck.kernel(c.kernel, c.reference, c.x)
    assert (report.kind, report.precision, report.seed) == ("reference", "bfloat16", 0)


@pytest.mark.gradcheck(seed=5, mode="full", rtol=1e-3)  # only the seed applies to a kernel
def test_kernel_marker_seed_and_call_k(gradcheck):
    c = case("bias_gelu")
    report = gradcheck.kernel(c.kernel, c.reference, c.x, k=3, check_reference=False)
    assert (report.seed, report.safety, report.reference_check) == (5, 3.0, None)


def test_kernel_bug_fails(gradcheck):
    c = case("bias_gelu", bug="scale_10%")
    gradcheck.kernel(c.kernel, c.reference, c.x)


def test_kernel_bug_expected(gradcheck):
    c = case("attention", bug="no_scale")
    with pytest.raises(GradientCheckError, match="kernel disagrees with the reference"):
        gradcheck.kernel(c.kernel, c.reference, c.x)


def test_kernel_unknown_keyword(gradcheck):
    with pytest.raises(TypeError, match="gradcheck.kernel.. got unknown keyword 'rtol'; allowed: loss, k, seed, precision, check_reference"):
        gradcheck.kernel(None, None, None, rtol=1e-3)
"""


def _write_kernel_tests(pytester: pytest.Pytester) -> None:
    zoo = Path(__file__).parent / "zoo" / "low_precision_torch.py"
    pytester.makepyfile(kernel_zoo=zoo.read_text(encoding="utf-8"))
    pytester.makepyfile(test_kernels=MODELS + KERNEL_TESTS + GRADIENT_NEXT_TO_KERNELS)


GRADIENT_NEXT_TO_KERNELS = """

def test_model(gradcheck):
    gradcheck(GOOD, X, Y)
"""


def test_fixture_kernel_checks_pass_fail_and_reach_the_report(pytester: pytest.Pytester) -> None:
    _skip_unless_installed("torch")
    _write_kernel_tests(pytester)
    result = pytester.runpytest_subprocess(*ISOLATE, "--gradcheck-report=report.json")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(
        [
            ">       gradcheck.kernel(c.kernel, c.reference, c.x)",
            "E       *GradientCheckError: kernel disagrees with the reference in 1 of 3 blocks *",
            "E       `bias`  shape (16,)",
            "E         max  error: kernel *<- too large",
            "E         diagnosis: kernel = 1.1 x reference across the block (a wrong scale?)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*- gradcheck -*",
            "models checked: 1 in 1 test; failed: 0",
            "blocks checked: 5; entries checked: 21; random directions: 0; evaluations: *",
            "worst error: none (every checked entry within tolerance)",
            "kernels checked: 4 in 4 tests; failed: 2",
            "kernel blocks checked (outputs and gradients): 13; evaluations: *",
            "worst kernel error: `input[[]0]` in test_kernels.py::test_kernel_bug_expected: "
            "max error * (allowed *), mean error * (allowed *)",
            "time in checks: *s",
            "report: *report.json",
        ]
    )
    document = _read_report(pytester.path / "report.json")
    assert document["summary"] == {"checks": 5, "passed": 3, "failed": 2}
    checks = {c["nodeid"].split("::")[-1]: c for c in document["checks"]}
    assert "kind" not in checks["test_model"]["report"]
    bug = checks["test_kernel_bug_fails"]
    assert (bug["passed"], bug["report"]["kind"]) == (False, "reference")
    assert [b["name"] for b in bug["report"]["blocks"] if not b["passed"]] == ["bias"]
    failed = next(b for b in bug["report"]["blocks"] if not b["passed"])
    assert failed["comparison"]["max_ok"] is False and failed["unit"] == "statistics"
    assert bug["report"]["reference_check"]["passed"] is True
    marked = checks["test_kernel_marker_seed_and_call_k"]["report"]
    assert (marked["seed"], marked["safety"], marked["reference_check"]) == (5, 3.0, None)


def test_fixture_kernel_checks_under_xdist(pytester: pytest.Pytester) -> None:
    _skip_unless_installed("torch")
    pytest.importorskip("xdist")
    _write_kernel_tests(pytester)
    result = pytester.runpytest_subprocess(*ISOLATE, "-n", "2", "--gradcheck-report=r.json")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["kernels checked: 4 in 4 tests; failed: 2"])
    document = _read_report(pytester.path / "r.json")
    kinds = sorted(c["report"].get("kind", "gradients") for c in document["checks"])
    assert kinds == ["gradients"] + ["reference"] * 4


# ------------------------------------------------------- the report under xdist crashes
CRASH_TESTS = """
import os

@pytest.mark.parametrize("seed", range(6))
def test_good(gradcheck, seed):
    gradcheck(MLP([2, 3, 1], seed=seed), X, Y, seed=seed)

def test_crash(gradcheck):
    gradcheck(GOOD, X, Y, seed=9)
    os._exit(1)  # the worker dies after its check: the check must still be in the report
"""


def test_xdist_worker_crash_loses_no_check(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    temp = pytester.mkdir("temp")
    monkeypatch.setenv("TMPDIR", str(temp))  # where the journal folder goes
    _write_tests(pytester, CRASH_TESTS)
    result = pytester.runpytest_subprocess(*ISOLATE, "-n", "2", "--gradcheck-report=r.json")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- gradcheck -*",
            "models checked: 7 in 7 tests; failed: 0",
            "crashed xdist worker: gw? (every check made before the crash is counted)",
        ]
    )
    document = _read_report(pytester.path / "r.json")
    assert document["summary"] == {"checks": 7, "passed": 7, "failed": 0}
    assert _seeds(document) == {
        **{f"test_good[{s}]": s for s in range(6)},
        "test_crash": 9,
    }
    (crashed,) = document["crashed_workers"]
    assert crashed["worker"] in ("gw0", "gw1")
    assert crashed["error"]
    assert list(temp.iterdir()) == []  # the journals are merged and removed


def test_journal_lines_are_flushed_and_a_cut_line_is_dropped(tmp_path: Path) -> None:
    """The merge on its own: a worker's journal is readable at any moment of a crash."""
    import numpy as np

    import _gradcheck_pytest as plugin
    from gradcheck import check_gradients
    from gradcheck.reference import MLP

    x = np.random.default_rng(0).normal(size=(4, 2))
    y = np.random.default_rng(1).normal(size=(4, 1))
    good = check_gradients(MLP([2, 3, 1], seed=0), x, y)
    bad = check_gradients(MLP([2, 3, 1], seed=0).with_bug("factor_2"), x, y)
    journal = plugin._open_journal({plugin._JOURNAL_KEY: str(tmp_path), "workerid": "gw3"})
    assert journal is not None
    state = plugin._Session(journal=journal)
    state.add("t.py::test_a", good)
    state.add("t.py::test_a", bad)
    # flushed as made: readable while the file is still open, as after os._exit
    assert len(list(tmp_path.glob("gw3-*.jsonl"))) == 1
    assert [(r["nodeid"], r["call"], r["passed"]) for r in plugin._read_journals(tmp_path)] == [
        ("t.py::test_a", 0, True),
        ("t.py::test_a", 1, False),
    ]
    journal.write('{"nodeid": "t.py::test_b", "call": 0, "pas')  # killed while writing
    journal.close()
    other = tmp_path / "gw4-1.jsonl"
    other.write_text(json.dumps(state.records[0]) + "\n", encoding="utf-8")
    records = plugin._read_journals(tmp_path)
    assert len(records) == 3
    assert records[:2] == state.records
    assert records[1]["report"] == bad.to_dict()
    # a worker whose journal folder is not there (another machine) keeps its checks in memory
    assert plugin._open_journal({plugin._JOURNAL_KEY: str(tmp_path / "gone")}) is None
    assert plugin._open_journal({}) is None

    # a journal that stops taking lines (a full disk): what it missed goes at the end
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            if len(self.getvalue()) > 0:
                raise OSError(28, "No space left on device")
            return super().write(text)

    state = plugin._Session(journal=Full())
    for report in (good, bad, good):
        state.add("t.py::test_c", report)
    assert state.journal is None
    assert state.journaled == 1
    assert [r["call"] for r in state.records[state.journaled :]] == [1, 2]


# -------------------------------------------------------------- where the report goes
@pytest.mark.parametrize(
    ("make", "given", "message"),
    [
        ("folder", "out", "it is a folder"),
        ("file", "afile/report.json", "cannot make its folder (*)"),
        ("file", "afile/deeper/report.json", "cannot make its folder (*)"),
    ],
    ids=["folder", "under-a-file", "deep-under-a-file"],
)
@pytest.mark.parametrize("source", ["cmdline", "ini"])
def test_report_path_that_cannot_be_written_is_a_usage_error(
    pytester: pytest.Pytester, make: str, given: str, message: str, source: str
) -> None:
    if make == "folder":
        pytester.mkdir("out")
    else:
        pytester.makefile("", afile="not a folder")
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError\n")
    if source == "ini":
        pytester.makeini(f"[pytest]\ngradcheck_report = {given}\n")
        result = pytester.runpytest(*ISOLATE)
    else:
        result = pytester.runpytest(*ISOLATE, f"--gradcheck-report={given}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: --gradcheck-report / gradcheck_report: cannot write '*{given}': {message}"]
    )
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert not list(pytester.path.rglob("*.tmp"))
    assert not list(pytester.path.rglob("*.json"))


@pytest.mark.parametrize("becomes", ["folder", "file-as-folder"])
def test_report_that_cannot_be_written_at_the_end_fails_the_run_and_leaves_nothing(
    pytester: pytest.Pytester, becomes: str
) -> None:
    # the path was fine at start-up; a test takes it away
    _write_tests(
        pytester,
        f"""
        import shutil
        from pathlib import Path

        def test_takes_the_path(gradcheck):
            gradcheck(GOOD, X, Y)
            if {becomes!r} == "folder":
                Path("reports/r.json").mkdir()
            else:
                shutil.rmtree("reports")
                Path("reports").write_text("now a file")
        """,
    )
    result = pytester.runpytest(*ISOLATE, "--gradcheck-report=reports/r.json")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(["error: cannot write the report *r.json: *"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert not list(pytester.path.rglob("*.tmp"))


@pytest.mark.parametrize("config_file", ["pytest.ini", "pyproject.toml"])
def test_ini_report_path_is_relative_to_the_ini_file(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, config_file: str
) -> None:
    if config_file == "pytest.ini":
        pytester.makeini("[pytest]\ngradcheck_report = reports/gradcheck.json\n")
    else:
        pytester.makepyprojecttoml(
            '[tool.pytest.ini_options]\ngradcheck_report = "reports/gradcheck.json"\n'
        )
    sub = pytester.mkdir("sub")
    (sub / "test_models.py").write_text(
        MODELS + "\n\ndef test_good(gradcheck):\n    gradcheck(GOOD, X, Y)\n", encoding="utf-8"
    )
    monkeypatch.chdir(sub)
    result = pytester.runpytest(*ISOLATE, "-v")
    result.assert_outcomes(passed=1)
    report = pytester.path / "reports" / "gradcheck.json"
    result.stdout.fnmatch_lines([f"gradcheck: *; report: {report}", f"report: {report}"])
    assert _read_report(report)["summary"]["checks"] == 1
    assert not (sub / "reports").exists()


def test_command_line_report_path_is_relative_to_the_invocation_folder(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\ngradcheck_report = reports/from-ini.json\n")
    sub = pytester.mkdir("sub")
    (sub / "test_models.py").write_text(
        MODELS + "\n\ndef test_good(gradcheck):\n    gradcheck(GOOD, X, Y)\n", encoding="utf-8"
    )
    monkeypatch.chdir(sub)
    result = pytester.runpytest(*ISOLATE, "--gradcheck-report=out/cli.json")
    result.assert_outcomes(passed=1)
    assert _read_report(sub / "out" / "cli.json")["summary"]["checks"] == 1
    assert not (pytester.path / "reports").exists()  # the option wins over the ini key
    assert not (pytester.path / "out").exists()
