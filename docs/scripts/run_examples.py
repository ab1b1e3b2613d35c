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
  (``0.03s``) excepted, so an example cannot drift from the code. A block may
  have several output blocks (until the next ``python`` block);
- an output block whose first line starts with ``$ `` is a *transcript*: the
  ``python`` block above is written to a file in an empty folder (named by its
  first line, ``# name.py``, or else by the first ``*.py`` in the commands), every
  ``$ command`` runs there in bash (``$?`` is the previous command's status), and
  the transcript must show what they print, stdout and stderr together. Above a
  ``<!-- pytest -->`` block the first command's status must also be 0 (1 for
  ``<!-- pytest: fail -->``);
- ``<!-- output: EXPR -->`` before a block: what ``print(EXPR)`` prints in the
  page's namespace after the ``python`` block above ran (a report shown further
  down the page than the code that makes it);
- a quote in the prose below an output block (`` `939 evaluations` ``) that has the
  shape of a piece of that output (the same text, other numbers) must be a piece of
  it. ``--update`` rewrites such a quote when the output holds one piece of that
  shape; otherwise it says where the prose must be edited.

A page whose blocks import torch, jax, equinox or flax needs them installed;
``tests/test_docs.py`` skips it otherwise.

Usage::

    python docs/scripts/run_examples.py             # run everything, report differences
    python docs/scripts/run_examples.py --update    # rewrite the output blocks and quotes
    python docs/scripts/run_examples.py docs/torch.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
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
_MARK = re.compile(r"^\s*<!--\s*(skip|output(?::\s*\S.*?)?|pytest(?::\s*fail)?)\s*-->\s*$")
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
    #: (python blocks) the output blocks that show what the block printed or ran
    outputs: list[Block] = field(default_factory=list)
    #: (output blocks) the expression of ``<!-- output: EXPR -->``
    expr: str | None = None

    @property
    def transcript(self) -> bool:
        """An output block of ``$ command`` lines and what they printed."""
        return self.code.startswith("$ ")


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
    expr: str | None = None
    previous: Block | None = None
    while i < len(lines):
        line = lines[i]
        m = _MARK.match(line)
        if m:
            mark, expr = m.group(1), None
            if mark.startswith("output:"):
                mark, expr = "output", mark.partition(":")[2].strip()
            mark = mark.replace(" ", "")
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
        block.expr = expr
        if mark == "output" and previous is not None:
            previous.outputs.append(block)
        elif lang == "python":
            previous = block
        page.blocks.append(block)
        mark, expr = None, None
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
    #: each output block of ``block`` with what it would show now
    shown: list[tuple[Block, str]] = field(default_factory=list)


def run_page(page: Page) -> list[Outcome]:
    """Run the page's ``python`` blocks in one namespace; pytest blocks in a subprocess."""
    namespace: dict[str, object] = {"__name__": "__docs__"}
    outcomes = []
    for block in page.python():
        if block.mark == "skip":
            continue
        if block.mark in ("pytest", "pytest:fail"):
            transcripts = [o for o in block.outputs if o.transcript]
            if transcripts:
                outcomes.append(_run_transcripts(block, transcripts))
            else:
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
        outcome = Outcome(block, buffer.getvalue(), error)
        if error is None:
            _fill_outputs(page, outcome, namespace)
        outcomes.append(outcome)
    return outcomes


def _fill_outputs(page: Page, outcome: Outcome, namespace: dict[str, object]) -> None:
    """What each output block of a plain ``python`` block would show now."""
    for out in outcome.block.outputs:
        if out.transcript:
            text, _, error = _transcript(outcome.block, out)
        elif out.expr is not None:
            text, error = _evaluate(page, out, namespace)
        else:
            text, error = outcome.printed, None
        if error is not None:
            outcome.error = error
            return
        outcome.shown.append((out, text))


def _evaluate(page: Page, out: Block, namespace: dict[str, object]) -> tuple[str, str | None]:
    buffer = io.StringIO()
    try:
        code = compile(f"print({out.expr})", f"{page.name}:{out.start - 1}", "exec")
        with contextlib.redirect_stdout(buffer):
            exec(code, namespace)
    except BaseException:
        return "", traceback.format_exc()
    return buffer.getvalue(), None


def _env() -> dict[str, str]:
    """The environment of a transcript's commands: this checkout first, no outer pytest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(COLUMNS="80", PY_COLORS="0", MPLBACKEND="Agg")
    return env


_FILE = re.compile(r"[\w./-]+\.py\b")


def _commands(transcript: Block) -> list[str]:
    return [line[2:] for line in transcript.code.splitlines() if line.startswith("$ ")]


def _transcript(block: Block, transcript: Block) -> tuple[str, list[int], str | None]:
    """Run the commands of ``transcript`` beside ``block`` written to a file."""
    commands = _commands(transcript)
    first = block.code.splitlines()[0] if block.code.strip() else ""
    named = _FILE.search(first) if first.startswith("#") else None
    named = named or next(filter(None, (_FILE.search(c) for c in commands)), None)
    if named is None:
        return "", [], "a transcript needs a file name: `# name.py` or a *.py in a command"
    printed: list[str] = []
    statuses: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, named.group(0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code, encoding="utf-8")
        status = 0
        for command in commands:
            proc = subprocess.run(
                ["bash", "-c", f"(exit {status}); {command}"],
                cwd=tmp,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env(),
                timeout=300,
            )
            status = proc.returncode
            statuses.append(status)
            printed.append(f"$ {command}\n{proc.stdout}")
    return "".join(printed), statuses, None


def _run_transcripts(block: Block, transcripts: list[Block]) -> Outcome:
    expected = 1 if block.mark == "pytest:fail" else 0
    outcome = Outcome(block, "")
    for out in transcripts:
        text, statuses, error = _transcript(block, out)
        if error is None and statuses and statuses[0] != expected:
            error = f"`{_commands(out)[0]}` exited with {statuses[0]}, expected {expected}:\n{text}"
        if error is not None:
            outcome.error = error
            break
        outcome.shown.append((out, text))
    return outcome


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
    """What went wrong: blocks that raised, outputs that differ from what the page shows,
    quotes in the prose that the page's outputs do not show."""
    found = []
    for o in outcomes:
        where = f"{page.name}:{o.block.start}"
        if o.error is not None:
            found.append(f"{where}: the example raised\n{o.error}")
            continue
        for out, text in o.shown:
            shown, now = normalise(out.code), normalise(text)
            if not same_output(shown, now):
                found.append(
                    f"{page.name}:{out.start}: the output shown differs from what the example "
                    f"prints now\n--- shown\n{shown}\n--- printed\n{now}"
                )
    found.extend(quote_problems(page))
    return found


def update(page: Page, outcomes: list[Outcome]) -> bool:
    """Rewrite the output blocks that differ from what the examples printed, then the
    quotes of them in the prose (see `quotes`); True if the page changed."""
    lines = list(page.lines)
    shown = [
        (out, text)
        for o in outcomes
        if o.error is None
        for out, text in o.shown
        if not same_output(out.code, text)  # wall times alone do not rewrite a page
    ]
    for out, text in sorted(shown, key=lambda pair: -pair[0].start):
        lines[out.start : out.stop] = [ln.rstrip() for ln in text.rstrip("\n").splitlines()]
    text = "\n".join(lines) + "\n"
    page.path.write_text(text, encoding="utf-8")
    fresh = parse(page.path)
    for quote in reversed(quotes(fresh)):
        if quote.fix is not None:
            line, (a, b) = fresh.lines[quote.line], quote.span
            fresh.lines[quote.line] = line[:a] + quote.fix + line[b:]
    final = "\n".join(fresh.lines) + "\n"
    page.path.write_text(final, encoding="utf-8")
    return final != "\n".join(page.lines) + "\n"


# ------------------------------------------------------------------- quotes in the prose
_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")  # `code`, or ``code with ` in it``
_ANY_NUMBER = r"(?<![\d.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\d])"


@dataclass
class Quote:
    """An inline code span in the prose with the shape of a piece of the output above it."""

    text: str
    line: int  # index in the page's lines
    span: tuple[int, int]  # where the text sits in the line
    output: Block
    pieces: list[str]  # the pieces of the output with the same shape

    @property
    def fix(self) -> str | None:
        """The piece to quote instead, when the output has one piece of this shape."""
        if self.text in self.pieces or len(set(self.pieces)) != 1:
            return None
        return self.pieces[0]


def _shape(text: str) -> re.Pattern[str] | None:
    """``text`` as a pattern with every number a wildcard; None for no number or no word."""
    parts = _NUMBER.split(text)
    if len(parts) == 1 or not re.search(r"[A-Za-z]", "".join(parts)):
        return None
    return re.compile(_ANY_NUMBER.join(re.escape(p) for p in parts))


def quotes(page: Page) -> list[Quote]:
    """Every quote of an output block in the prose that follows it (up to the next
    ``python`` or output block), in page order."""
    found: list[Quote] = []
    fenced: set[int] = set()
    for b in page.blocks:
        fenced.update(range(b.start - 1, b.stop + 1))
    outputs = sorted((b for b in page.blocks if b.mark == "output"), key=lambda b: b.start)
    ends = sorted(b.start - 1 for b in page.blocks if b.mark == "output" or b.lang == "python")
    for out in outputs:
        stop = next((e for e in ends if e > out.stop), len(page.lines))
        for index in range(out.stop + 1, stop):
            if index in fenced:
                continue
            for m in _SPAN.finditer(page.lines[index]):
                text = m.group(2).strip()  # the padding of ``...``
                shape = _shape(text)
                if shape is None:
                    continue
                pieces = [p.group(0) for p in shape.finditer(out.code)]
                if pieces:
                    a = m.start(2) + m.group(2).index(text)
                    found.append(Quote(text, index, (a, a + len(text)), out, pieces))
    return found


def quote_problems(page: Page) -> list[str]:
    """Quotes in the prose that the output above them does not show."""
    found = []
    for q in quotes(page):
        if q.text in q.pieces:
            continue
        shown = ", ".join(f"`{p}`" for p in dict.fromkeys(q.pieces))
        fix = (
            "(python docs/scripts/run_examples.py --update rewrites it)"
            if q.fix is not None
            else "(edit the prose: the output has several pieces of this shape)"
        )
        found.append(
            f"{page.name}:{q.line + 1}: the prose quotes `{q.text}`, but the output at line "
            f"{q.output.start} shows {shown} {fix}"
        )
    return found


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
            ] + quote_problems(parse(page.path))
        else:
            found = problems(page, outcomes)
        for p in found:
            print(p, file=sys.stderr)
        status = status or int(bool(found))
        print(f"{page.name}: {len(outcomes)} examples, {len(found)} problems")
    return status


if __name__ == "__main__":
    sys.exit(main())
