"""The docs cannot drift: the step-size figure, every code example, and the site build.

- the figure script runs, and the default step sits near the bottom of the error V;
- every ``python`` block of README.md and docs/*.md runs (see docs/scripts/run_examples.py
  for the convention) and prints what the page shows; test-file blocks pass (or fail) under
  pytest; the transcripts of ``pytest`` and ``gradcheck check`` runs show what those print;
  the CLI example's cases file passes ``gradcheck check``;
- a quote of an output in the prose is a piece of that output; every report pasted in a page
  is one the page's code prints; numbers the prose states about the numerics (steps,
  evaluations per refined entry) are the code's;
- ``mkdocs build --strict`` succeeds.

When the core changes what a report prints, ``python docs/scripts/run_examples.py --update``
regenerates every output block, transcript and quote; the failures below name that command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "docs" / "scripts"
sys.path.insert(0, str(SCRIPTS))

import run_examples  # noqa: E402

PAGES = run_examples.pages()
UPDATE = "python docs/scripts/run_examples.py --update"

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
    # test files run in test_pytest_examples, in one pytest run; those with a transcript here
    page.blocks = [b for b in page.blocks if not _pytest_block(b) or _has_transcript(b)]
    outcomes = run_examples.run_page(page)
    found = run_examples.problems(page, outcomes)
    assert not found, "\n\n".join(found) + (
        f"\n\n(to take the new output: {UPDATE} {_page_id(path)})"
    )


def _pytest_block(block: run_examples.Block) -> bool:
    return block.mark in ("pytest", "pytest:fail")


def _has_transcript(block: run_examples.Block) -> bool:
    return any(o.transcript for o in block.outputs)


def test_pytest_examples(pytester: pytest.Pytester) -> None:
    """Every ``<!-- pytest -->`` block, as a test file, in one in-process pytest run."""
    expected: dict[str, str] = {}
    for path in PAGES:
        page = run_examples.parse(path)
        for block in page.python():
            if not _pytest_block(block) or _has_transcript(block):
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
    for report in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
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


# ------------------------------------------------------------- numbers in the prose
@pytest.mark.parametrize("path", PAGES, ids=[_page_id(p) for p in PAGES])
def test_prose_quotes_the_outputs_shown(path: Path) -> None:
    """A quote like `939 evaluations` below a report is a piece of that report (static)."""
    found = run_examples.quote_problems(run_examples.parse(path))
    assert not found, "\n".join(found) + f"\n\n(then: {UPDATE} {_page_id(path)})"


#: A pasted report that is not yet an ``<!-- output: EXPR -->`` block: the page and the
#: expression that prints it in the page's namespace. (README.md: the lead adds the marker.)
UNMARKED_REPORTS: dict[str, str] = {}
_REPORT = re.compile(r"gradients (?:agree|disagree) in ")


def test_every_pasted_report_is_generated() -> None:
    """A report in a page is an output the page's code prints now, never pasted by hand."""
    generated: set[tuple[Path, int]] = set()
    unmarked: list[tuple[Path, run_examples.Block]] = []
    for path in PAGES:
        page = run_examples.parse(path)
        for block in page.python():
            if block.mark == "skip":
                continue
            for out in block.outputs:
                if not _pytest_block(block) or out.transcript:
                    generated.add((path, out.start))
        for block in page.blocks:
            if _REPORT.search(block.code) and (path, block.start) not in generated:
                unmarked.append((path, block))
    stray = [f"{_page_id(p)}:{b.start}" for p, b in unmarked if _page_id(p) not in UNMARKED_REPORTS]
    assert not stray, (
        f"reports pasted by hand: {', '.join(stray)}; make each the output of an example "
        "(see docs/scripts/run_examples.py: <!-- output -->, a $ transcript, "
        f"<!-- output: EXPR -->), then {UPDATE}"
    )
    for path, block in unmarked:  # checked here until the page marks them
        page = run_examples.parse(path)
        expr = UNMARKED_REPORTS[_page_id(path)]
        for name in page.frameworks():
            pytest.importorskip(name)
        namespace: dict[str, Any] = {"__name__": "__docs__"}
        with contextlib.redirect_stdout(io.StringIO()):
            for code in page.python():
                if code.mark is None and code.start < block.start:
                    exec(compile(code.code, f"{_page_id(path)}:{code.start}", "exec"), namespace)
        out = run_examples.Block("text", "output", "", block.start, block.stop, expr=expr)
        printed, error = run_examples._evaluate(page, out, namespace)
        assert error is None, error
        assert run_examples.same_output(block.code, printed), (
            f"{_page_id(path)}:{block.start}: the pasted report differs from what "
            f"`{expr}` prints now:\n{run_examples.normalise(printed)}\n"
            f"(mark the block `<!-- output: {expr} -->` and run {UPDATE} {_page_id(path)})"
        )


_WORDS = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
]


def _claims(pattern: str, pages: list[Path] = PAGES) -> list[tuple[str, tuple[str, ...]]]:
    """(page:line, groups) of every match of ``pattern`` in ``pages``; a space in the
    pattern matches any white space, a line break included, and ``(\\w+)`` a number, in
    digits or in words."""
    found = []
    number = "(" + "|".join(_WORDS) + r"|\d+)"
    regex = re.compile(pattern.replace(" ", r"\s+").replace(r"(\w+)", number), re.IGNORECASE)
    for path in pages:
        text = path.read_text(encoding="utf-8")
        for m in regex.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((f"{_page_id(path)}:{line}", m.groups()))
    return found


def _number(text: str) -> float:
    return float(_WORDS.index(text.lower())) if text.lower() in _WORDS else float(text)


def test_numerics_the_prose_states_are_the_codes() -> None:
    """Numbers the pages state about the numerics, against the constants of the code."""
    from gradcheck import TOLERANCES
    from gradcheck._full import KINK_SIDE_CHECKS
    from gradcheck._numerics import DEEPER, GROW, REFINE_FACTORS, shrink_until_finite
    from gradcheck._options import CheckOptions

    steps = len(REFINE_FACTORS)
    f64 = TOLERANCES["float64"]
    numerics = [ROOT / "docs" / "numerics.md"]
    expected: list[tuple[str, list[Path], tuple[float, ...]]] = [
        # a refined entry: the other steps, two evaluations each
        (r"\b(\w+) more evaluations (?:each|per entry)\b", PAGES, (2 * (steps - 1),)),
        (r"\bat (\w+) more steps\b", PAGES, (steps - 1,)),
        (r"\b(?:[Rr]efinement|Richardson) over (?:the )?(\w+) steps\b", PAGES, (steps,)),
        (r"\bseen over all (\w+) steps\b", PAGES, (steps,)),
        (r"\b(\w+)-step refinement\b", PAGES, (steps,)),
        (r"refined everywhere \((\d+) per entry\)", PAGES, (2 * steps,)),
        (r"from steps (\d+) and then (\d+) times smaller", numerics, tuple(1 / f for f in DEEPER)),
        (r"from steps (\d+) and then (\d+) times larger", numerics, GROW),
        (r"`max_refine` \((\d+)\)", numerics, (CheckOptions().max_refine,)),
        (r"at most (\d+) per block", numerics, (KINK_SIDE_CHECKS,)),
        (r"\(`([\d.e-]+)` in float64\)", numerics, (f64.step,)),
        (r"\((\d+) in float64, that is, (\d+) units", numerics, (f64.noise, f64.noise)),
        (r"`safety = (\d+)`", numerics, (f64.safety,)),
        (
            r"retried (\w+) times smaller, up to (\w+) times",
            numerics,
            (10, inspect.signature(shrink_until_finite).parameters["tries"].default),
        ),
    ]
    wrong, seen = [], 0
    for pattern, pages, want in expected:
        claims = _claims(pattern, pages)
        assert claims, f"no page states {pattern!r} any more: drop it from this test"
        for where, groups in claims:
            seen += 1
            if tuple(_number(g) for g in groups) != tuple(float(w) for w in want):
                wrong.append(f"{where}: {pattern!r} gives {groups}, the code {want}")
    assert not wrong, "\n".join(wrong)
    assert seen >= 15
    # the list of refinement steps, written out
    factors = ", ".join(f"{f:g}" if f >= 1 else f"1/{1 / f:g}" for f in REFINE_FACTORS)
    assert f"`h * {{{factors}}}`" in numerics[0].read_text(encoding="utf-8")


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


# ------------------------------------------------------------------ the options, defined once
def test_every_front_end_offers_the_options_defined_once() -> None:
    """`_gradcheck_options.OPTIONS` is the one definition: check_gradients' keywords and
    defaults, its docstring, the CLI's flags, and the option tables of docs/pytest.md and
    docs/ci.md are checked against it (the oracle)."""
    from _gradcheck_options import OPTIONS
    from gradcheck import check_gradients
    from gradcheck._cli import build_parser

    signature = inspect.signature(check_gradients).parameters
    keywords = {k: p.default for k, p in signature.items() if k not in ("model", "x", "y", "loss")}
    assert keywords == {option.name: option.default for option in OPTIONS}
    doc = inspect.getdoc(check_gradients) or ""
    for option in OPTIONS:
        assert re.search(rf"^\s+(\w+, )?{option.name}(, \w+)?:", doc, re.M), option.name

    cli_help = build_parser()._subparsers._group_actions[0].choices["check"].format_help()  # type: ignore[union-attr]
    ci_page = (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")
    pytest_page = (ROOT / "docs" / "pytest.md").read_text(encoding="utf-8")
    for option in OPTIONS:
        shown = f"{option.flag} {option.metavar}"
        assert shown in cli_help, shown
        assert f"`{shown}`" in ci_page, f"docs/ci.md does not list `{shown}`"
        row = next((r for r in pytest_page.splitlines() if f"| `{option.name}=` |" in r), None)
        assert row is not None, f"docs/pytest.md has no row for {option.name}="
        if option.per_session:
            pytest_flag = "--gradcheck-" + option.name.replace("_", "-")
            assert f"`{pytest_flag}={option.metavar}`" in row and f"`gradcheck_{option.name}`" in row
        else:
            assert "--gradcheck-" not in row and "gradcheck_" not in row


def test_the_option_types_are_the_options_choices() -> None:
    from typing import get_args

    from _gradcheck_options import BY_NAME
    from gradcheck._options import Mode, Wrt

    assert get_args(Mode) == BY_NAME["mode"].choices
    assert get_args(Wrt) == BY_NAME["wrt"].choices


def test_the_named_loss_table_lists_every_named_loss() -> None:
    """docs/api.md's table of named losses has exactly one row per canonical name (oracle:
    `gradcheck._losses.LOSS_NAMES`), and names every alias."""
    from gradcheck._losses import ALIASES, LOSS_NAMES

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    table = page.split("<!-- loss-table -->", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r'^\| `"(\w+)"` \|', table, re.M)
    assert rows == list(LOSS_NAMES)
    for alias in ALIASES:
        assert f'`"{alias}"`' in page, alias
