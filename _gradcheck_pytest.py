"""The pytest plugin of gradcheck: the ``gradcheck`` fixture, marker, options and JSON report.

pytest loads this module in every session of every user who installs gradcheck
(the ``pytest11`` entry point ``gradcheck``), so it imports only pytest, the
standard library and ``_gradcheck_options`` (the options' one definition, itself stdlib
only) at top level; gradcheck itself (and NumPy) is imported the first time a test calls
the fixture. ``-p no:gradcheck`` disables it.

Settings resolve, per option: keyword argument of the fixture call >
``@pytest.mark.gradcheck(...)`` (the closest marker wins) > ``--gradcheck-*``
command-line option > ``gradcheck_*`` ini key > the default of
``gradcheck.check_gradients``. ``gradcheck.kernel(...)`` (``gradcheck.check_kernel``)
resolves the options it shares with ``check_gradients`` (``seed``) the same way; the
others (``k``, ``precision``, ...) are keywords of the call only.

Under pytest-xdist the controller makes a journal folder (a temporary one) and
hands its name to every worker; each worker appends every check to its own file
there, one JSON line per check, flushed as it is made, so a worker that crashes
loses nothing it had already checked. At the end of the session the controller
merges the files, prints the summary, writes the ``--gradcheck-report`` file
(which also names the workers that crashed) and removes the folder. A worker
that cannot reach the folder (another machine), or cannot write to it, hands the
checks it could not journal over through ``workeroutput`` at its end instead.

The report path is checked at start-up (a usage error if it is a folder or its
folder cannot be made or written to). ``--gradcheck-report`` is relative to the
folder pytest was started in, the ``gradcheck_report`` ini key to the ini file's
folder (pytest's rule for its own path settings).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

from _gradcheck_options import BY_NAME, OPTIONS

if TYPE_CHECKING:
    from gradcheck import Report

#: The settings a whole session can give (command line, ini), with check_gradients' defaults.
SETTINGS: dict[str, Any] = {option.name: option.default for option in OPTIONS if option.per_session}
#: The keywords of ``@pytest.mark.gradcheck(...)``: every option of a check.
MARKER_KEYWORDS: tuple[str, ...] = tuple(option.name for option in OPTIONS)
#: The keywords of a fixture call, besides ``model``, ``x`` and ``y``.
CALL_KEYWORDS: tuple[str, ...] = (*MARKER_KEYWORDS, "loss")

_WORKER_KEY = "gradcheck_records"
_JOURNAL_KEY = "gradcheck_journal"
_REPORT_FORMAT = 1


@dataclass
class _Session:
    """What the plugin keeps for one pytest session (in ``config.stash``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None
    calls: dict[str, int] = field(default_factory=dict)
    #: on the xdist controller: the folder of the workers' journals, once a worker is configured
    journal_dir: Path | None = None
    #: on an xdist worker: its own journal, appended to as checks are made
    journal: IO[str] | None = None
    #: on an xdist worker: how many of ``records`` are in the journal
    journaled: int = 0
    #: on the xdist controller: the workers that went down with an error
    crashed: list[dict[str, str]] = field(default_factory=list)
    #: what went wrong writing the report, shown in the summary
    write_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, nodeid: str, report: Report) -> None:
        record = {"nodeid": nodeid, "passed": report.passed, "report": report.to_dict()}
        with self.lock:  # a test may run checks in threads
            index = self.calls.get(nodeid, 0)
            self.calls[nodeid] = index + 1
            record = {"nodeid": nodeid, "call": index, **record}
            self.records.append(record)
            if self.journal is not None:
                try:
                    self.journal.write(json.dumps(record) + "\n")
                    self.journal.flush()
                    self.journaled = len(self.records)
                except OSError:  # a full disk: the rest go through workeroutput at the end
                    self.journal = None


_SESSION = pytest.StashKey[_Session]()


# ------------------------------------------------------------------------------ hooks
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradcheck", "gradcheck: gradient checks of custom layers")
    for option in OPTIONS:
        if not option.per_session:
            continue
        key = option.name
        group.addoption(
            "--gradcheck-" + key.replace("_", "-"),
            dest=f"gradcheck_{key}",
            default=None,
            metavar=option.metavar,
            type=option.argparse_type(),
            help=f"{option.help} (default: {option.default_text}). Ini key: gradcheck_{key}.",
        )
        parser.addini(f"gradcheck_{key}", f"gradcheck: {option.help}", type="string", default="")
    group.addoption(
        "--gradcheck-report",
        dest="gradcheck_report",
        default=None,
        metavar="FILE.json",
        help="write every gradient check of the session to FILE.json (works under pytest-xdist). "
        "Ini key: gradcheck_report.",
    )
    parser.addini(
        "gradcheck_report",
        "gradcheck: write every check of the session to this JSON file",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "gradcheck(**options): options for the `gradcheck` fixture in this test "
        f"({', '.join(MARKER_KEYWORDS)}); a keyword given to the fixture call wins.",
    )
    state = _Session(report_path=_report_path(config))
    config.stash[_SESSION] = state
    # Fail early, as a usage error, on a malformed ini value.
    _session_settings(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: journal every check as it is made
        state.journal = _open_journal(workerinput)
    elif state.report_path is not None:  # only the process that writes the report checks it
        _check_report_path(state.report_path)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, on the controller: tell a worker where to journal its checks."""
    state = node.config.stash.get(_SESSION, None)
    if state is None:
        return
    if state.journal_dir is None:
        state.journal_dir = Path(tempfile.mkdtemp(prefix="gradcheck-xdist-"))
    node.workerinput[_JOURNAL_KEY] = str(state.journal_dir)


def pytest_report_header(config: pytest.Config) -> str | None:
    """The effective session settings, when any was set or with ``-v``."""
    settings, sources = _session_settings(config)
    state = config.stash[_SESSION]
    if not sources and state.report_path is None and config.get_verbosity() < 1:
        return None
    shown = ", ".join(
        f"{k}={'table default' if v is None and k in ('rtol', 'atol') else v}"
        for k, v in settings.items()
    )
    line = f"gradcheck: {shown}"
    if state.report_path is not None:
        line += f"; report: {state.report_path}"
    return line


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Reject a ``gradcheck`` marker with positional arguments or an unknown keyword."""
    for marker in item.iter_markers("gradcheck"):
        _check_marker(marker)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash.get(_SESSION, None)
    if state is None:
        return
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller merges and writes
        if state.journal is not None:
            state.journal.close()
            state.journal = None
        if state.journaled < len(state.records):  # no journal (or a failed one): hand over
            workeroutput[_WORKER_KEY] = json.dumps(state.records[state.journaled :])
        return
    if state.journal_dir is not None:
        state.records.extend(_read_journals(state.journal_dir))
        shutil.rmtree(state.journal_dir, ignore_errors=True)
        state.journal_dir = None
    if state.report_path is not None:
        try:
            _write_report(state)
        except OSError as exc:  # the folder went away, the disk filled: say so, fail the run
            state.write_error = f"cannot write the report {state.report_path}: {exc}"
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, on the controller: note a crashed worker; take checks handed over."""
    state = node.config.stash.get(_SESSION, None)
    if state is None:
        return
    if error is not None:
        worker = str(getattr(node, "workerinput", {}).get("workerid", node))
        state.crashed.append({"worker": worker, "error": str(error)})
    output = getattr(node, "workeroutput", None) or {}
    if _WORKER_KEY in output:
        state.records.extend(json.loads(output[_WORKER_KEY]))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is None or hasattr(config, "workeroutput"):
        return
    if not (state.records or state.write_error or (state.crashed and state.report_path)):
        return
    terminalreporter.write_sep("-", "gradcheck")
    for line in _summary_lines(state):
        terminalreporter.write_line(line)


# ---------------------------------------------------------------------------- fixture
class GradcheckFixture:
    """The ``gradcheck`` fixture's value: ``gradcheck(model, x, y=None, **options)``, and
    ``gradcheck.kernel(kernel, reference, x, y=None, **options)``."""

    def __init__(self, config: pytest.Config, node: pytest.Item) -> None:
        self._config = config
        self._node = node

    def __repr__(self) -> str:
        return f"<gradcheck fixture of {self._node.nodeid}>"

    def settings(self, **options: Any) -> dict[str, Any]:
        """The keyword arguments a call with ``options`` passes to ``check_gradients``."""
        __tracebackhide__ = True
        unknown = sorted(set(options) - set(CALL_KEYWORDS))
        if unknown:
            raise TypeError(
                f"gradcheck() got unknown keyword {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(CALL_KEYWORDS)}"
            )
        settings, _ = _session_settings(self._config)
        settings.update(_marker_options(self._node))
        settings.update(options)
        return settings

    def __call__(self, model: Any, x: Any = None, y: Any = None, **options: Any) -> Report:
        __tracebackhide__ = True
        settings = self.settings(**options)

        from gradcheck import check_gradients

        report = check_gradients(model, x, y, **settings)
        return self._record(report)

    def kernel(
        self, kernel: Any, reference: Any, x: Any = None, y: Any = None, **options: Any
    ) -> Report:
        """Check a low-precision kernel against a reference: `gradcheck.check_kernel`.

        Takes its arguments (``loss``, ``k``, ``seed``, ``precision``, ``check_reference``).
        ``seed`` resolves as in a gradient check (marker > command line > ini > default);
        the marker's other options do not apply to a kernel check and are not used. Returns
        the report when the kernel passes; otherwise the test fails with the report's text
        (a `gradcheck.GradientCheckError`). The report is in the session's summary and
        JSON report.
        """
        __tracebackhide__ = True
        import inspect

        from gradcheck import check_kernel

        keywords = [
            name
            for name, p in inspect.signature(check_kernel).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        unknown = sorted(set(options) - set(keywords))
        if unknown:
            raise TypeError(
                f"gradcheck.kernel() got unknown keyword {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(keywords)}"
            )
        settings = {k: v for k, v in self.settings().items() if k in keywords}
        settings.update(options)
        report = check_kernel(kernel, reference, x, y, **settings)
        return self._record(report)

    def _record(self, report: Report) -> Report:
        __tracebackhide__ = True
        from gradcheck import GradientCheckError

        self._config.stash[_SESSION].add(self._node.nodeid, report)
        if not report.passed:
            raise GradientCheckError(report)
        return report


@pytest.fixture
def gradcheck(request: pytest.FixtureRequest) -> GradcheckFixture:
    """Check a model's gradients: ``gradcheck(model, x, y=None, **options) -> Report``.

    Takes the arguments of :func:`gradcheck.check_gradients`. Returns the report
    when the gradients agree; otherwise the test fails with the report's text
    (a :class:`gradcheck.GradientCheckError`, so ``pytest.raises`` can expect it).
    Options not given resolve through ``@pytest.mark.gradcheck(...)``, the
    ``--gradcheck-*`` options, the ``gradcheck_*`` ini keys and the defaults.
    ``gradcheck.settings(**options)`` shows what a call would use.
    ``gradcheck.kernel(kernel, reference, x, y=None, **options)`` checks a low-precision
    kernel against a reference (:func:`gradcheck.check_kernel`) in the same way.
    """
    return GradcheckFixture(request.config, request.node)


# ---------------------------------------------------------------------------- helpers
def _session_settings(config: pytest.Config) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings from command line > ini > default, and where each non-default came from."""
    settings = dict(SETTINGS)
    sources: dict[str, str] = {}
    for key in SETTINGS:
        value = config.getoption(f"gradcheck_{key}", None)
        if value is not None:
            settings[key] = value
            sources[key] = "command line"
            continue
        raw = config.getini(f"gradcheck_{key}")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        try:
            settings[key] = BY_NAME[key].parse(raw)
        except ValueError as exc:
            raise pytest.UsageError(f"ini key gradcheck_{key}: {exc}") from None
        sources[key] = "ini"
    return settings, sources


def _check_marker(marker: pytest.Mark) -> None:
    __tracebackhide__ = True
    allowed = ", ".join(MARKER_KEYWORDS)
    if marker.args:
        pytest.fail(
            f"@pytest.mark.gradcheck takes keyword arguments only ({allowed}); "
            f"got positional {marker.args!r}",
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - set(MARKER_KEYWORDS))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        pytest.fail(
            f"@pytest.mark.gradcheck got unknown keyword {names}; allowed: {allowed}",
            pytrace=False,
        )


def _marker_options(node: pytest.Item) -> dict[str, Any]:
    """The options of every ``gradcheck`` marker on the test, the closest one winning."""
    options: dict[str, Any] = {}
    for marker in reversed(list(node.iter_markers("gradcheck"))):
        _check_marker(marker)
        options.update(marker.kwargs)
    return options


def _failed_blocks(records: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for record in records:
        for block in record["report"]["blocks"]:
            if not block["passed"]:
                yield record["nodeid"], block


def _as_float(value: Any) -> float:
    return float(value)  # to_dict writes non-finite floats as "inf"/"nan"; float() reads them


def _is_kernel_check(record: dict[str, Any]) -> bool:
    """A `gradcheck.check_kernel` report (its ``to_dict`` has ``kind: "reference"``)."""
    return record["report"].get("kind", "gradients") == "reference"


def _gradient_lines(records: list[dict[str, Any]]) -> list[str]:
    failed = [r for r in records if not r["passed"]]
    tests = {r["nodeid"] for r in records}
    blocks = sum(len(r["report"]["blocks"]) for r in records)
    entries = sum(int(r["report"]["entries_checked"]) for r in records)
    directions = sum(int(r["report"].get("directions_checked", 0)) for r in records)
    evaluations = sum(int(r["report"]["evaluations"]) for r in records)
    lines = [
        f"models checked: {len(records)} in {len(tests)} test{'s' if len(tests) != 1 else ''}; "
        f"failed: {len(failed)}",
        f"blocks checked: {blocks:,}; entries checked: {entries:,}; "
        f"random directions: {directions:,}; evaluations: {evaluations:,}",
    ]
    bad = list(_failed_blocks(records))
    if bad:
        nodeid, block = max(
            bad, key=lambda nb: (_as_float(nb[1]["max_rel_diff"]), _as_float(nb[1]["max_abs_diff"]))
        )
        abs_diff, rel_diff = _as_float(block["max_abs_diff"]), _as_float(block["max_rel_diff"])
        lines.append(
            f"worst error: `{block['name']}` in {nodeid}: max abs diff {abs_diff:.1e}, "
            f"max rel diff {rel_diff:.1e} ({block['mismatches']} of {block['checked']} mismatched)"
        )
    else:
        inconclusive = [r for r in failed if r["report"]["problem"]]
        lines.append(
            "worst error: none (every checked entry within tolerance"
            + (f"; {len(inconclusive)} inconclusive)" if inconclusive else ")")
        )
    return lines


def _over_allowance(block: dict[str, Any]) -> float:
    """How many times its allowance a kernel block's worse statistic (max or mean) is."""
    c = block.get("comparison") or {}
    ratios = [0.0]
    for stat in ("max", "mean"):
        error, allowed = (
            _as_float(c.get(f"kernel_{stat}", 0.0)),
            _as_float(c.get(f"allowed_{stat}", 0.0)),
        )
        if error > allowed:
            ratios.append(error / allowed if allowed > 0 else float("inf"))
    return max(ratios)


def _kernel_lines(records: list[dict[str, Any]]) -> list[str]:
    failed = [r for r in records if not r["passed"]]
    tests = {r["nodeid"] for r in records}
    blocks = sum(len(r["report"]["blocks"]) for r in records)
    evaluations = sum(int(r["report"]["evaluations"]) for r in records)
    lines = [
        f"kernels checked: {len(records)} in {len(tests)} test{'s' if len(tests) != 1 else ''}; "
        f"failed: {len(failed)}",
        f"kernel blocks checked (outputs and gradients): {blocks:,}; evaluations: {evaluations:,}",
    ]
    judged = [r for r in records if not r["report"]["problem"]]
    bad = list(_failed_blocks(judged))
    if bad:
        nodeid, block = max(bad, key=lambda nb: _over_allowance(nb[1]))
        c = block.get("comparison") or {}
        stats = ", ".join(
            f"{stat} error {_as_float(c.get(f'kernel_{stat}', 0.0)):.1e} "
            f"(allowed {_as_float(c.get(f'allowed_{stat}', 0.0)):.1e})"
            for stat in ("max", "mean")
        )
        lines.append(f"worst kernel error: `{block['name']}` in {nodeid}: {stats}")
    else:
        unjudged = len(records) - len(judged)
        lines.append(
            "worst kernel error: none (every block within its allowance"
            + (f"; {unjudged} not judged: the reference failed its own check)" if unjudged else ")")
        )
    return lines


def _summary_lines(state: _Session) -> list[str]:
    records = state.records
    kernels = [r for r in records if _is_kernel_check(r)]
    gradients = [r for r in records if not _is_kernel_check(r)]
    elapsed = sum(float(r["report"]["elapsed"]) for r in records)
    lines = _gradient_lines(gradients) if gradients or not kernels else []
    if kernels:
        lines.extend(_kernel_lines(kernels))
    lines.append(f"time in checks: {elapsed:.2f}s")
    if state.crashed:
        workers = ", ".join(c["worker"] for c in state.crashed)
        lines.append(
            f"crashed xdist worker{'s' if len(state.crashed) != 1 else ''}: {workers} "
            "(every check made before the crash is counted)"
        )
    if state.write_error is not None:
        lines.append(f"error: {state.write_error}")
    elif state.report_path is not None:
        lines.append(f"report: {state.report_path}")
    return lines


def _write_report(state: _Session) -> None:
    records = sorted(state.records, key=lambda r: (r["nodeid"], r["call"]))
    try:
        from importlib.metadata import version

        gradcheck_version = version("gradcheck")
    except Exception:  # pragma: no cover - not installed as a distribution
        gradcheck_version = None
    document = {
        "format": _REPORT_FORMAT,
        "gradcheck_version": gradcheck_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "summary": {
            "checks": len(records),
            "passed": sum(1 for r in records if r["passed"]),
            "failed": sum(1 for r in records if not r["passed"]),
        },
        "crashed_workers": state.crashed,
        "checks": records,
    }
    path = state.report_path
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -------------------------------------------------------------- report path and journals
def _report_path(config: pytest.Config) -> Path | None:
    """The report file: the option against the invocation folder, the ini key against the
    ini file's folder (the invocation folder when there is no ini file), as pytest resolves
    its own path settings."""
    option = config.getoption("gradcheck_report")
    if option:
        return Path(config.invocation_params.dir, os.path.expanduser(option))
    value = str(config.getini("gradcheck_report")).strip()
    if not value:
        return None
    base = config.inipath.parent if config.inipath is not None else config.invocation_params.dir
    return Path(base, os.path.expanduser(value))


def _check_report_path(path: Path) -> None:
    """A usage error now, not a traceback at the end, if the report cannot be written there."""
    where = f"--gradcheck-report / gradcheck_report: cannot write {str(path)!r}"
    if path.is_dir():
        raise pytest.UsageError(f"{where}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise pytest.UsageError(
            f"{where}: cannot make its folder ({exc.strerror or exc})"
        ) from None
    try:  # the report is written beside itself, then moved over: the folder must take files
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as exc:
        raise pytest.UsageError(
            f"{where}: its folder takes no files ({exc.strerror or exc})"
        ) from None


def _open_journal(workerinput: dict[str, Any]) -> IO[str] | None:
    """An xdist worker's journal in the controller's folder; None when it cannot be reached."""
    folder = workerinput.get(_JOURNAL_KEY)
    if not folder or not Path(folder).is_dir():
        return None
    name = f"{workerinput.get('workerid', 'worker')}-{os.getpid()}.jsonl"
    try:
        return open(Path(folder, name), "a", encoding="utf-8")  # closed at the session end
    except OSError:
        return None


def _read_journals(folder: Path) -> list[dict[str, Any]]:
    """Every check the workers journaled; a last line cut short by a crash is dropped."""
    records: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    break  # a crash while writing: only ever the last line
    return records
