"""Run the code examples of the docs and the README, and compare what they print.

The convention, in every page:

- a fenced ``python`` block runs, in order, in one namespace per page (so a page
  can build an example up block by block);
- ``<!-- skip -->`` on the line before a block: it does not run (a fragment, or
  something that needs a network or a GPU);
- ``<!-- pytest -->`` before a block: the block is a test file; it is written to a
  temporary folder and run with pytest in a subprocess, which must pass
  (``<!-- pytest: fail -->``: which must fail, exit status 1);
- ``<!-- output -->`` before a block (``text``): what the ``python`` block above
  printed. It is compared with what the block prints now, wall times
  (``0.03s``) excepted, so an example cannot drift from the code.

A page whose blocks import torch, jax, equinox or flax needs them installed;
``tests/test_docs.py`` skips it otherwise.

Usage::

    python docs/scripts/run_examples.py             # run everything, report differences
    python docs/scripts/run_examples.py --update    # rewrite the output blocks
    python docs/scripts/run_examples.py docs/torch.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FRAMEWORKS = ("torch", "jax", "equinox", "flax")

_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)(.*)$")
_MARK = re.compile(r"^\s*<!--\s*(skip|output|pytest(?::\s*fail)?)\s*-->\s*$")
_ELAPSED = re.compile(r"\b\d+\.\d+s\b")
_IMPORT = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(FRAMEWORKS) + r")\b", re.MULTILINE)


@dataclass
class Block:
    """One fenced block: its language, its marker, its text and where it sits."""

    lang: str
    mark: str | None
    code: str
    start: int  # index of the first content line
    stop: int  # index of the closing fence
    output: Block | None = None


@dataclass
class Page:
    path: Path
    lines: list[str]
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return str(self.path.relative_to(ROOT))
        except ValueError:
            return str(self.path)

    def python(self) -> list[Block]:
        return [b for b in self.blocks if b.lang == "python" and b.mark != "output"]

    def frameworks(self) -> list[str]:
        """The optional frameworks that the page's runnable blocks import."""
        found: list[str] = []
        for b in self.python():
            if b.mark == "skip":
                continue
            for name in _IMPORT.findall(b.code):
                if name not in found:
                    found.append(name)
        return found


def parse(path: Path) -> Page:
    lines = path.read_text(encoding="utf-8").splitlines()
    page = Page(path, lines)
    i = 0
    mark: str | None = None
    previous: Block | None = None
    while i < len(lines):
        line = lines[i]
        m = _MARK.match(line)
        if m:
            mark = m.group(1).replace(" ", "")
            i += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            if line.strip():
                mark = None
            i += 1
            continue
        indent, ticks, lang = fence.group(1), fence.group(2), fence.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith(indent + ticks):
            j += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : j]]
        block = Block(lang=lang, mark=mark, code="\n".join(body) + "\n", start=i + 1, stop=j)
        if mark == "output" and previous is not None:
            previous.output = block
        else:
            previous = block if lang == "python" else None
        page.blocks.append(block)
        mark = None
        i = j + 1
    return page


def normalise(text: str) -> str:
    """Output with wall times blanked and trailing blanks dropped."""
    text = _ELAPSED.sub("#.##s", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def same_output(shown: str, printed: str) -> bool:
    """Whether two outputs agree: the words exactly, the numbers closely.

    Numbers below 1e-6 in magnitude are round-off-level quantities (estimated
    errors, differences of nearly equal values) whose last digits depend on the
    machine's floating-point paths, so they need only agree within a factor 10;
    other numbers must agree to a relative 1e-3 (as printed, four or five digits).
    """
    a, b = normalise(shown), normalise(printed)
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    for x_text, y_text in zip(_NUMBER.findall(a), _NUMBER.findall(b), strict=True):
        x, y = float(x_text), float(y_text)
        if x == y:
            continue
        if max(abs(x), abs(y)) < 1e-6:
            if x * y <= 0 or max(abs(x), abs(y)) > 10 * min(abs(x), abs(y)):
                return False
        elif abs(x - y) > 1e-3 * max(abs(x), abs(y)):
            return False
    return True


@dataclass
class Outcome:
    block: Block
    printed: str
    error: str | None = None


def run_page(page: Page) -> list[Outcome]:
    """Run the page's ``python`` blocks in one namespace; pytest blocks in a subprocess."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    outcomes = []
    for block in page.python():
        if block.mark == "skip":
            continue
        if block.mark in ("pytest", "pytest:fail"):
            outcomes.append(_run_pytest(block))
            continue
        buffer = io.StringIO()
        error = None
        try:
            code = compile(block.code, f"{page.name}:{block.start + 1}", "exec")
            with contextlib.redirect_stdout(buffer):
                exec(code, namespace)
        except BaseException:  # report any failure, SystemExit included, as the block's
            error = traceback.format_exc()
        outcomes.append(Outcome(block, buffer.getvalue(), error))
    return outcomes


def _run_pytest(block: Block) -> Outcome:
    expected = 1 if block.mark == "pytest:fail" else 0
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test_example.py"
        test.write_text(block.code, encoding="utf-8")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test.name],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
    printed = proc.stdout + proc.stderr
    error = None
    if proc.returncode != expected:
        error = f"pytest exited with {proc.returncode}, expected {expected}:\n{printed}"
    return Outcome(block, printed, error)


def problems(page: Page, outcomes: list[Outcome]) -> list[str]:
    """What went wrong: blocks that raised, outputs that differ from what the page shows."""
    found = []
    for o in outcomes:
        where = f"{page.name}:{o.block.start}"
        if o.error is not None:
            found.append(f"{where}: the example raised\n{o.error}")
        elif o.block.output is not None and o.block.mark is None:
            shown, now = normalise(o.block.output.code), normalise(o.printed)
            if not same_output(shown, now):
                found.append(
                    f"{where}: the output shown differs from what the example prints now\n"
                    f"--- shown\n{shown}\n--- printed\n{now}"
                )
    return found


def update(page: Page, outcomes: list[Outcome]) -> bool:
    """Rewrite the page's output blocks with what the examples printed; True if it changed."""
    lines = list(page.lines)
    for o in sorted(outcomes, key=lambda o: -o.block.start):
        out = o.block.output
        if out is None or o.error is not None or o.block.mark is not None:
            continue
        lines[out.start : out.stop] = o.printed.rstrip("\n").splitlines()
    text = "\n".join(lines) + "\n"
    changed = text != "\n".join(page.lines) + "\n"
    if changed:
        page.path.write_text(text, encoding="utf-8")
    return changed


def pages() -> list[Path]:
    """README.md and every page of the docs."""
    found = sorted(DOCS.rglob("*.md"))
    readme = ROOT / "README.md"
    return ([readme] if readme.exists() else []) + found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the docs' code examples.")
    parser.add_argument("paths", nargs="*", type=Path, help="pages (default: README and docs/)")
    parser.add_argument("--update", action="store_true", help="rewrite the output blocks")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths or pages():
        page = parse(path.resolve())
        outcomes = run_page(page)
        if args.update:
            if update(page, outcomes):
                print(f"updated {page.name}")
            found = [
                f"{page.name}:{o.block.start}: the example raised\n{o.error}"
                for o in outcomes
                if o.error is not None
            ]
        else:
            found = problems(page, outcomes)
        for p in found:
            print(p, file=sys.stderr)
        status = status or int(bool(found))
        print(f"{page.name}: {len(outcomes)} examples, {len(found)} problems")
    return status


if __name__ == "__main__":
    sys.exit(main())
