"""The docs cannot drift: the step-size figure, every code example, and the site build.

- the figure script runs, and the default step sits near the bottom of the error V;
- every ``python`` block of README.md and docs/*.md runs (see docs/scripts/run_examples.py
  for the convention) and prints what the page shows; test-file blocks pass (or fail) under
  pytest; the CLI example's cases file passes ``gradcheck check``;
- ``mkdocs build --strict`` succeeds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "docs" / "scripts"
sys.path.insert(0, str(SCRIPTS))

import run_examples  # noqa: E402

PAGES = run_examples.pages()

pytest_plugins = ["pytester"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------------- the figure
def test_step_size_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    numbers = tmp_path / "numbers.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "step_size_figure.py"),
            "--out",
            str(tmp_path),
            "--json",
            str(numbers),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "step_size.png").stat().st_size > 10_000
    data = json.loads(numbers.read_text())
    default, best = data["default_step"], data["best_central_step"]
    # the default step lies near the bottom of the central difference's V
    assert best / 10 <= default <= best * 10, (default, best)
    # ...where the error is within a factor 10 of the best the sweep found
    assert data["central_error_at_default"] <= 10 * data["best_central_error"]
    # Richardson does not lose accuracy at the default step, and its estimate is not optimistic
    assert data["refined_error_at_default"] <= data["central_error_at_default"]
    assert data["estimated_error_at_default"] >= data["refined_error_at_default"]

    # the page quotes what the script prints: at least the default step must match
    page = (ROOT / "docs" / "numerics.md").read_text(encoding="utf-8")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("default step"))
    assert line in page, (
        f"docs/numerics.md quotes another default step than the script prints ({line!r}); "
        "rerun docs/scripts/step_size_figure.py and paste its output"
    )


# ----------------------------------------------------------------------- the examples
def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", PAGES, ids=[_page_id(p) for p in PAGES])
def test_examples(path: Path) -> None:
    page = run_examples.parse(path)
    for name in page.frameworks():
        pytest.importorskip(name)
    runnable = [b for b in page.python() if b.mark is None]
    if not runnable:
        pytest.skip("no runnable example")
    if "torch" in page.frameworks():
        import torch

        torch.set_num_threads(1)  # tiny float64 matmuls are slower with many threads
    page.blocks = [b for b in page.blocks if b.mark not in ("pytest", "pytest:fail")]
    outcomes = run_examples.run_page(page)
    found = run_examples.problems(page, outcomes)
    assert not found, "\n\n".join(found) + (
        "\n\n(to take the new output: python docs/scripts/run_examples.py --update "
        f"{_page_id(path)})"
    )


def test_pytest_examples(pytester: pytest.Pytester) -> None:
    """Every ``<!-- pytest -->`` block, as a test file, in one in-process pytest run."""
    expected: dict[str, str] = {}
    for path in PAGES:
        page = run_examples.parse(path)
        for block in page.python():
            if block.mark not in ("pytest", "pytest:fail"):
                continue
            needs = run_examples._IMPORT.findall(block.code)
            if any(importlib.util.find_spec(n) is None for n in needs):
                continue
            for name in needs:  # imported here once: pytester unloads what an inner run imports
                importlib.import_module(name)
            safe = re.sub(r"\W", "_", path.stem)
            stem = f"test_{safe}_{block.start}"
            pytester.makepyfile(**{stem: block.code})
            expected[stem + ".py"] = "fail" if block.mark == "pytest:fail" else "pass"
    if not expected:
        pytest.skip("no runnable pytest example")
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        "-p",
        "no:jaxtyping",
        *sorted(expected),
    )
    outcome: dict[str, list[bool]] = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):
        if report.when == "call" or report.outcome == "failed":
            module = report.nodeid.split("::")[0]
            outcome.setdefault(module, []).append(report.outcome == "failed")
    text = "\n".join(result.outlines)
    for name, want in expected.items():
        results = outcome.get(name)
        assert results, f"{name}: no test ran\n{text}"
        if want == "pass":
            assert not any(results), f"{name} should pass\n{text}"
        else:
            assert any(results), f"{name} should fail\n{text}"


def test_cli_example(tmp_path: Path) -> None:
    """The cases file of docs/ci.md passes ``gradcheck check``; its ``broken`` cases fail."""
    page = run_examples.parse(ROOT / "docs" / "ci.md")
    block = next(b for b in page.python() if b.code.startswith("# gradcases.py"))
    (tmp_path / "gradcases.py").write_text(block.code, encoding="utf-8")
    for target, status in (("gradcases.py::cases", 0), ("gradcases.py::broken", 1)):
        proc = subprocess.run(
            [sys.executable, "-m", "gradcheck", "check", target],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert proc.returncode == status, proc.stdout + proc.stderr


def test_yaml_examples_parse() -> None:
    yaml = pytest.importorskip("yaml")
    for path in PAGES:
        for block in run_examples.parse(path).blocks:
            if block.lang in ("yaml", "yml"):
                assert isinstance(yaml.safe_load(block.code), dict), f"{path}:{block.start}"


# ------------------------------------------------------------------------ the site
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()
