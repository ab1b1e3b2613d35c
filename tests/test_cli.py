"""The ``gradcheck`` command: ``gradcheck check TARGET`` (exit statuses, text and JSON) and
``python -m gradcheck``. Most runs call ``main`` in-process; two use a subprocess."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradcheck._cli import main

CASES = """
import numpy as np
from gradcheck.reference import MLP

X = np.random.default_rng(0).normal(size=(4, 2))
Y = np.random.default_rng(1).normal(size=(4, 1))
GOOD = MLP([2, 3, 1], activation="tanh", seed=0)


def good():
    return GOOD, X, Y


def good_with_loss():
    return GOOD, X, Y, "mse"


def mixed():
    return {"good": good(), "bad": (GOOD.with_bug("factor_2"), X, Y, "mse")}


def as_list():
    return [good, (GOOD.with_bug("sign_flip"), X, None)]


def not_a_model():
    return [good(), (object(), X, Y)]


def short_case():
    return {"fine": good(), "short": (GOOD, X)}


def raises():
    raise RuntimeError("cannot build the cases")


def empty():
    return []


def not_cases():
    return 42


def model_crashes():
    class Crashing:
        params = GOOD.params
        grads = GOOD.grads

        def forward(self, x):
            raise FloatingPointError("the forward pass blew up")

        def backward(self, dout):
            return dout

    return Crashing(), X, Y


CONSTANT = {"only": (GOOD, X, Y)}
"""


@pytest.fixture(autouse=True)
def _restore_import_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``gradcheck check`` puts folders on sys.path and imports modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("_gradcheck_target_", "cli_cases")):
            del sys.modules[name]


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    path = tmp_path / "cases.py"
    path.write_text(CASES, encoding="utf-8")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------- exit statuses
def test_all_pass_exits_0(cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["check", f"{cases}::good"], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("PASS  good: gradients agree in all 5 blocks (checked 21 entries")
    assert lines[-1].startswith("gradcheck: 1 case: 1 passed, 0 failed, 0 errors (")
    assert err == ""  # stderr is not a terminal here: no progress line


def test_a_failure_exits_1_and_shows_the_culprit(
    cases: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(["check", f"{cases}::mixed"], capsys)
    assert status == 1
    assert "PASS  mixed[good]: gradients agree" in out
    assert "FAIL  mixed[bad]:\n      gradients disagree in 1 of 5 blocks" in out
    assert "      `W0`  shape (3, 2)\n        mismatched: 6 / 6 entries (100.0%)" in out
    assert "diagnosis: analytic / numeric = 2 at every entry" in out
    assert out.splitlines()[-1].startswith("gradcheck: 2 cases: 1 passed, 1 failed, 0 errors")


def test_list_of_cases_and_case_builders(cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["check", f"{cases}::as_list"], capsys)
    assert status == 1
    assert "PASS  as_list[0]:" in out
    assert "FAIL  as_list[1]:" in out


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{cases}", "TARGET must be path/to/file.py::name or package.module:name; got "),
        ("{cases}::", "TARGET must be path/to/file.py::name or package.module:name; got "),
        ("{folder}/missing.py::good", "no such file: "),
        ("{cases}::nope", "'{cases}' has no attribute 'nope'"),
        ("{cases}::raises", "raises() raised RuntimeError: cannot build the cases ({cases}, line"),
        ("{cases}::empty", "empty gave no cases"),
        ("{cases}::not_cases", "not_cases must give a case (model, x, y[, loss]), a list of cases"),
        ("no_such_module_xyz:cases", "importing module 'no_such_module_xyz' failed: Module"),
    ],
    ids=[
        "no-name",
        "empty-name",
        "missing-file",
        "missing-name",
        "raises",
        "empty",
        "int",
        "module",
    ],
)
def test_usage_and_import_errors_exit_2(
    cases: Path, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    fill = {"cases": cases, "folder": cases.parent}
    status, out, err = run(["check", target.format(**fill)], capsys)
    assert status == 2
    assert err.startswith("gradcheck check: error: " + message.format(**fill)), err
    assert out == ""


def test_import_error_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import math\n\nVALUE = 1 / 0\n", encoding="utf-8")
    status, _, err = run(["check", f"{path}::cases"], capsys)
    assert status == 2
    assert err == (
        f"gradcheck check: error: importing '{path}' failed: "
        f"ZeroDivisionError: division by zero ({path}, line 3)\n"
    )


@pytest.mark.parametrize(
    ("target", "case", "message"),
    [
        ("not_a_model", "not_a_model[1]", "UnsupportedModelError: cannot check a model of type"),
        (
            "short_case",
            "short_case[short]",
            "expected (model, x, y) or (model, x, y, loss); got a tuple of length 2",
        ),
        (
            "model_crashes",
            "model_crashes",
            "ModelError: the model's forward raised FloatingPointError: the forward pass "
            "blew up ({cases}, line ",
        ),
    ],
    ids=["unsupported-model", "short-tuple", "model-raises"],
)
def test_a_case_that_cannot_be_checked_exits_2_and_is_named(
    cases: Path, capsys: pytest.CaptureFixture[str], target: str, case: str, message: str
) -> None:
    status, out, _ = run(["check", f"{cases}::{target}"], capsys)
    assert status == 2
    assert f"ERROR {case}: {message.format(cases=cases)}" in out, out


def test_bad_option_is_a_usage_error(cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--mode", "fastest"], ["--rtol", "-1"], ["--max-evals", "0"], ["--wrt", ""], ["--wrt", "W,"]):
        with pytest.raises(SystemExit) as info:
            main(["check", f"{cases}::good", *argv])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --rtol: rtol must be a finite number >= 0; got -1.0" in err


# ------------------------------------------------------------------------ formats
def test_json_format_on_stdout(cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["check", f"{cases}::mixed", "--format", "json"], capsys)
    assert status == 1
    document = json.loads(out)
    assert document["passed"] is False
    assert document["exit_status"] == 1
    assert document["summary"]["cases"] == 2
    assert (document["summary"]["passed"], document["summary"]["failed"]) == (1, 1)
    by_name = {c["name"]: c for c in document["cases"]}
    assert by_name["mixed[good]"]["status"] == "pass"
    bad = by_name["mixed[bad]"]
    assert bad["status"] == "fail"
    assert [b["name"] for b in bad["report"]["blocks"] if not b["passed"]] == ["W0"]


def test_json_file_with_text_format(
    cases: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out" / "results.json"
    status, out, _ = run(["check", f"{cases}::not_a_model", "--json", str(target)], capsys)
    assert status == 2
    assert out.startswith("PASS  not_a_model[0]")
    document = json.loads(target.read_text(encoding="utf-8"))
    assert [c["status"] for c in document["cases"]] == ["pass", "error"]
    assert document["cases"][1]["error"].startswith("UnsupportedModelError: ")
    assert document["summary"]["errors"] == 1


def test_json_format_reports_an_import_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(["check", f"{tmp_path}/nothing.py::x", "--format=json"], capsys)
    assert status == 2
    document = json.loads(out)
    assert document["error"].startswith("no such file: ")
    assert document["cases"] == []
    assert err.startswith("gradcheck check: error: no such file: ")


def test_options_reach_the_check(cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--mode", "fast", "--seed", "3", "--wrt", "params", "--rtol", "1e-5", "--atol=1e-7"]
    argv += ["--nondet-tol", "0", "--order", "2", "--forward", "yes", "--batched", "no"]
    status, out, _ = run(["check", f"{cases}::good_with_loss", *argv, "--format=json"], capsys)
    assert status == 0
    document = json.loads(out)
    assert document["options"] == {
        "wrt": "params",
        "mode": "fast",
        "seed": 3,
        "rtol": 1e-5,
        "atol": 1e-7,
        "max_evals": None,
        "nondet_tol": 0.0,
        "order": 2,
        "forward": True,
        "batched": False,
    }
    report: dict[str, Any] = document["cases"][0]["report"]
    assert [s["contract"] for s in report["sections"]] == ["second order", "forward mode"]
    assert (report["mode"], report["seed"], report["rtol"], report["atol"]) == (
        "fast",
        3,
        1e-5,
        1e-7,
    )
    assert [b["name"] for b in report["blocks"]] == ["W0", "b0", "W1", "b1"]


def test_max_evals_reaching_the_cap_fails(cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["check", f"{cases}::good", "--max-evals", "3"], capsys)
    assert status == 1
    assert "FAIL  good:" in out


def test_module_target_and_non_callable_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "cli_cases_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "layers.py").write_text(CASES, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    status, out, _ = run(["check", "cli_cases_pkg.layers:CONSTANT"], capsys)
    assert status == 0
    assert out.startswith("PASS  CONSTANT[only]: gradients agree")


# ----------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_a_terminal(
    cases: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["check", f"{cases}::mixed"]) == 1
    progress = terminal.getvalue()
    assert "\r\x1b[Kgradcheck: [1/2] mixed[good] ... " in progress
    assert "\r\x1b[Kgradcheck: [2/2] mixed[bad] ... " in progress
    assert progress.endswith("\r\x1b[K")  # the line is cleared when a case ends
    assert "\x1b" not in capsys.readouterr().out


# --------------------------------------------------------------------- subprocess
def test_python_m_gradcheck(cases: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gradcheck", "check", f"{cases}::mixed", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["summary"]["failed"] == 1


def test_help_lists_both_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert "check" in out
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for option in ("--mode", "--seed", "--wrt", "--rtol", "--atol", "--max-evals", "--json"):
        assert option in out
    assert "exit status: 0 every case passes; 1 a check fails; 2 a usage or import error" in out


# ------------------------------------------------------ only a run that passed exits 0
#: A cases file whose user code ends the process, or tries to, at STAGE with STATEMENT.
QUITTING = """
import os
import sys
import time

import numpy as np
from gradcheck.reference import MLP

STAGE = {stage!r}
X = np.random.default_rng(0).normal(size=(4, 2))
Y = np.random.default_rng(1).normal(size=(4, 1))
GOOD = MLP([2, 3, 1], activation="tanh", seed=0)


def quit_here(stage):
    if stage == STAGE:
        {statement}


class Quits:
    \"\"\"GOOD, delegated to, except that forward or backward quits (on call AFTER + 1).\"\"\"

    def __init__(self):
        self.inner = MLP([2, 3, 1], activation="tanh", seed=0)
        self.forwards = 0

    @property
    def params(self):
        return self.inner.params

    @property
    def grads(self):
        return self.inner.grads

    def forward(self, x):
        self.forwards += 1
        if self.forwards > {after}:
            quit_here("forward")
        return self.inner.forward(x)

    def backward(self, dout):
        quit_here("backward")
        return self.inner.backward(dout)


def builder():
    quit_here("builder")
    return GOOD, X, Y


quit_here("import")


def cases():
    quit_here("target")
    return {{
        "bad": (GOOD.with_bug("factor_2"), X, Y, "mse"),
        "built": builder,
        "quits": (Quits(), X, Y),
        "after": (GOOD, X, Y),
    }}


def only_quits():
    return {{"quits": (Quits(), X, Y), "after": (GOOD, X, Y)}}
"""


def _run_cli(
    tmp_path: Path, *argv: str, target: str = "cases", **fill: Any
) -> subprocess.CompletedProcess[str]:
    source = QUITTING.format(**{"after": 0, **fill})
    (tmp_path / "quitting.py").write_text(source, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "gradcheck", "check", f"quitting.py::{target}", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("stage", "statement", "after", "shown"),
    [
        ("import", "sys.exit(0)", 0, "SystemExit(0), sys.exit() was called"),
        ("import", "sys.exit()", 0, "SystemExit(None), sys.exit() was called"),
        ("import", "raise SystemExit(None)", 0, "SystemExit(None), sys.exit() was called"),
        ("target", "sys.exit(0)", 0, "SystemExit(0), sys.exit() was called"),
        ("target", "raise SystemExit", 0, "SystemExit(None), sys.exit() was called"),
        ("builder", "sys.exit(0)", 0, "SystemExit(0), sys.exit() was called"),
        ("forward", "sys.exit(0)", 0, "SystemExit(0), sys.exit() was called"),
        ("forward", "sys.exit()", 0, "SystemExit(None), sys.exit() was called"),
        ("forward", "sys.exit(0)", 5, "SystemExit(0), sys.exit() was called"),
        ("backward", "sys.exit(0)", 0, "SystemExit(0), sys.exit() was called"),
        ("backward", "raise SystemExit(None)", 0, "SystemExit(None), sys.exit() was called"),
        ("forward", "raise GeneratorExit('odd')", 0, "GeneratorExit: odd"),
    ],
    ids=[
        "import-exit-0",
        "import-exit",
        "import-SystemExit-None",
        "target-exit-0",
        "target-SystemExit",
        "builder-exit-0",
        "forward-exit-0",
        "forward-exit",
        "forward-exit-0-mid-check",
        "backward-exit-0",
        "backward-SystemExit-None",
        "forward-GeneratorExit",
    ],
)
def test_user_code_that_exits_never_makes_the_run_exit_0(
    tmp_path: Path, stage: str, statement: str, after: int, shown: str
) -> None:
    done = _run_cli(tmp_path, stage=stage, statement=statement, after=after)
    assert done.returncode == 2, done.stdout + done.stderr
    where = f"({tmp_path / 'quitting.py'}, line "
    if stage in ("import", "target"):  # no case ran: a usage error that names the code
        assert done.stdout == ""
        assert done.stderr.startswith("gradcheck check: error: "), done.stderr
        assert shown in done.stderr and where in done.stderr, done.stderr
        return
    # the case that quit is an error; the others still ran, the failure above it still shows
    assert "FAIL  cases[bad]:" in done.stdout
    case = "built" if stage == "builder" else "quits"
    assert f"ERROR cases[{case}]: " in done.stdout
    error_line = next(ln for ln in done.stdout.splitlines() if ln.startswith("ERROR"))
    assert shown in error_line and where in error_line, error_line
    assert "PASS  cases[after]:" in done.stdout
    assert done.stdout.splitlines()[-1].startswith(
        "gradcheck: 4 cases: 2 passed, 1 failed, 1 error ("
    )
    assert done.stderr == ""


def test_user_code_that_exits_without_failures_still_exits_2(tmp_path: Path) -> None:
    # every other case correct: the exit status alone must tell CI
    fill = {"stage": "forward", "statement": "sys.exit(0)"}
    done = _run_cli(tmp_path, "--format", "json", target="only_quits", **fill)
    assert done.returncode == 2, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert document["passed"] is False
    assert document["exit_status"] == 2
    statuses = {c["name"]: c["status"] for c in document["cases"]}
    assert statuses == {"only_quits[quits]": "error", "only_quits[after]": "pass"}


@pytest.mark.parametrize("stage", ["import", "target", "builder", "forward", "backward"])
def test_an_interrupt_is_not_a_pass(tmp_path: Path, stage: str) -> None:
    done = _run_cli(
        tmp_path, "--json", "out.json", stage=stage, statement="raise KeyboardInterrupt"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    document = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert document["passed"] is False
    assert document["exit_status"] == 2
    if stage in ("import", "target"):
        doing = "importing 'quitting.py'" if stage == "import" else "calling cases()"
        assert done.stderr == f"gradcheck check: error: interrupted while {doing}\n"
        assert document["cases"] == []
        return
    case = "built" if stage == "builder" else "quits"
    assert f"ERROR cases[{case}]: interrupted (KeyboardInterrupt)" in done.stdout
    left = 2 if stage == "builder" else 1  # the run stops: what comes after is not checked
    plural = "s" if left != 1 else ""
    assert done.stderr == (
        f"gradcheck check: error: interrupted during cases[{case}]; "
        f"{left} more case{plural} not checked\n"
    )
    assert f", {left} not checked (" in done.stdout.splitlines()[-1]
    assert document["summary"]["not_checked"] == left
    assert document["summary"]["cases"] == 4


def test_ctrl_c_during_a_check_exits_2(tmp_path: Path) -> None:
    """A real SIGINT while a model runs: the run stops, says so, and does not exit 0."""
    statement = "open('started', 'w').close(); time.sleep(60)"
    source = QUITTING.format(stage="forward", statement=statement, after=0)
    (tmp_path / "quitting.py").write_text(source, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcheck", "check", "quitting.py::cases"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the model never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, out + err
    assert "FAIL  cases[bad]:" in out
    assert "ERROR cases[quits]: interrupted (KeyboardInterrupt)" in out
    assert err.endswith("interrupted during cases[quits]; 1 more case not checked\n"), err


@pytest.mark.parametrize(
    ("value", "shown"), [("[]", "an empty list"), ("{}", "an empty dict")], ids=["list", "dict"]
)
def test_no_cases_is_not_a_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, shown: str
) -> None:
    path = tmp_path / "nothing.py"
    path.write_text(f"def cases():\n    return {value}\n\n\nNONE = {value}\n", encoding="utf-8")
    for name in ("cases", "NONE"):
        status, out, err = run(["check", f"{path}::{name}", "--format=json"], capsys)
        assert status == 2
        assert err == (
            f"gradcheck check: error: {name} gave no cases ({shown}): nothing to check\n"
        )
        assert json.loads(out)["passed"] is False


# ------------------------------------------------------------------- kernel cases
KERNEL_CASES = """
import torch
from zoo.low_precision_torch import case

torch.set_num_threads(1)


def kernel_case(name, bug=None, **extra):
    c = case(name, torch.bfloat16, 0, bug)
    return {"kernel": c.kernel, "reference": c.reference, "x": c.x, **extra}


def one():
    return kernel_case("bias_gelu")


def mixed():
    from gradcheck.reference import MLP
    import numpy as np

    x = np.random.default_rng(0).normal(size=(4, 2))
    return {
        "model": (MLP([2, 3, 1], seed=0), x, None),
        "gelu": kernel_case("bias_gelu", k=3),
        "gelu-bug": lambda: kernel_case("bias_gelu", "scale_10%", check_reference=False),
    }


def typo():
    return [kernel_case("bias_gelu", tolerance=1.0)]


def half_a_kernel_case():
    return {"only": {"kernel": None, "x": 1}}
"""


@pytest.fixture
def kernel_cases(tmp_path: Path) -> Path:
    pytest.importorskip("torch")
    path = tmp_path / "kernel_cases.py"
    path.write_text(KERNEL_CASES, encoding="utf-8")
    return path


def test_a_kernel_case_alone_passes_and_exits_0(
    kernel_cases: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(["check", f"{kernel_cases}::one"], capsys)
    assert status == 0, out
    assert out.startswith("PASS  one: kernel agrees with the reference in all 3 blocks (bfloat16")
    assert out.splitlines()[-1].startswith("gradcheck: 1 case: 1 passed, 0 failed, 0 errors")


def test_kernel_cases_next_to_model_cases_fail_with_the_report(
    kernel_cases: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(["check", f"{kernel_cases}::mixed"], capsys)
    assert status == 1
    assert "PASS  mixed[model]: gradients agree" in out
    assert "PASS  mixed[gelu]: kernel agrees with the reference in all 3 blocks" in out
    assert "FAIL  mixed[gelu-bug]:\n      kernel disagrees with the reference in 1 of 3 blocks" in out
    assert "      `bias`  shape (16,)\n        max  error: kernel " in out
    assert "diagnosis: kernel = 1.1 x reference across the block" in out
    assert out.splitlines()[-1].startswith("gradcheck: 3 cases: 2 passed, 1 failed, 0 errors")


def test_kernel_cases_in_json(kernel_cases: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["check", f"{kernel_cases}::mixed", "--format=json", "--seed=3"], capsys)
    assert status == 1
    document = json.loads(out)
    assert (document["exit_status"], document["options"]["seed"]) == (1, 3)
    assert document["summary"]["passed"] == 2 and document["summary"]["failed"] == 1
    by_name = {c["name"]: c for c in document["cases"]}
    assert set(by_name["mixed[model]"]) == {"name", "status", "passed", "error", "report"}
    assert "kind" not in by_name["mixed[model]"]["report"]  # a model case's JSON as before
    gelu = by_name["mixed[gelu]"]["report"]
    assert (gelu["kind"], gelu["seed"], gelu["safety"]) == ("reference", 3, 3.0)
    assert gelu["reference_check"]["passed"] is True
    assert all(b["comparison"]["max_ok"] for b in gelu["blocks"])
    bug = by_name["mixed[gelu-bug]"]
    assert (bug["status"], bug["report"]["reference_check"]) == ("fail", None)
    assert [b["name"] for b in bug["report"]["blocks"] if not b["passed"]] == ["bias"]


def test_a_kernel_case_that_cannot_be_checked_exits_2(
    kernel_cases: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(["check", f"{kernel_cases}::typo"], capsys)
    assert status == 2
    assert "ERROR typo[0]: a kernel case got unknown key 'tolerance'; allowed: kernel, " in out
    status, out, _ = run(["check", f"{kernel_cases}::half_a_kernel_case"], capsys)
    assert status == 2
    assert (
        "ERROR half_a_kernel_case[only]: expected (model, x, y) or (model, x, y, loss); got a "
        "dict (a kernel case is a dict with the keys 'kernel', 'reference' and 'x')"
    ) in out
