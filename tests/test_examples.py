"""The example projects in ``examples/`` pass their own test suites (run through pytester)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import gradcheck.reference  # noqa: F401  (loaded once here, not again by the in-process run)

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: Keep other installed plugins out of the inner run (see tests/test_plugin.py).
ISOLATE = ("-p", "no:hypothesispytest", "-p", "no:jaxtyping", "-p", "no:cacheprovider")


def test_custom_layers_example_passes(pytester: pytest.Pytester) -> None:
    shutil.copytree(
        EXAMPLES / "custom_layers",
        pytester.path,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", "gradcheck-report.json"),
    )
    result = pytester.runpytest(*ISOLATE)
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["models checked: 5 in 5 tests; failed: 1"])
    # the example's pyproject.toml sets gradcheck_mode and gradcheck_report
    document = json.loads((pytester.path / "gradcheck-report.json").read_text(encoding="utf-8"))
    assert document["summary"] == {"checks": 5, "passed": 4, "failed": 1}
    assert {c["report"]["mode"] for c in document["checks"]} == {"full"}
