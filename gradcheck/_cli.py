"""The ``gradcheck`` command (also ``python -m gradcheck``).

- ``gradcheck demo``: the reference MLP, correct and buggy, through every installed adapter.
- ``gradcheck check TARGET``: check the cases a user's function returns (models, checked with
  ``check_gradients``; low-precision kernels, checked against a reference with
  ``check_kernel``); for CI. Exit status
  0 only when there was at least one case and every case passed; 1 when a check fails; 2 for
  usage or import errors, for cases that could not be checked (the message names the case),
  and for a run that was interrupted.

User code runs inside ``gradcheck check`` (the TARGET's module, its functions, the models), so
whatever it raises, ``SystemExit`` and ``KeyboardInterrupt`` included, is caught and reported
as that code's failure: a ``sys.exit(0)`` in a model cannot end the run with status 0.
``os._exit`` ends the process without Python seeing it, and is out of reach.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from _gradcheck_options import OPTIONS

from ._api import check_gradients
from ._reference_check import check_kernel
from ._report import Report
from .errors import GradcheckInputError

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_ERROR = 2

#: (framework, the module that must be importable) for every adapter the demo tries
_FRAMEWORKS = (("numpy", "numpy"), ("torch", "torch"), ("jax", "jax"))


def _check_export(export: Callable[[], Any], x: Any, y: Any) -> Callable[[], Report]:
    """A run that exports the model inside it (an export error then belongs to that case)."""
    return lambda: check_gradients(export(), x, y, loss="mse")


def _demo_cases() -> list[tuple[str, bool, Callable[[], Report]]]:
    """(title, expected verdict, run) for every installed adapter: a correct and a buggy MLP."""
    from .reference import MLP

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4))
    y = rng.normal(size=(8, 2))
    mlp = MLP([4, 5, 2], activation="tanh", seed=0)
    buggy = mlp.with_bug("wrong_activation_derivative")
    cases: list[tuple[str, bool, Callable[[], Report]]] = [
        (
            "numpy: reference MLP 4-5-2, tanh, MSE",
            True,
            lambda: check_gradients(mlp, x, y, loss="mse"),
        ),
        (
            "numpy: the same MLP with f(z) where f'(z) belongs in backward",
            False,
            lambda: check_gradients(buggy, x, y, loss="mse"),
        ),
    ]
    for framework, module in _FRAMEWORKS[1:]:
        if importlib.util.find_spec(module) is None:
            continue
        export = getattr(mlp, f"to_{framework}")
        cases.append(
            (
                f"{framework}: the reference MLP exported to {framework}",
                True,
                _check_export(export, x, y),
            )
        )
        buggy_export = getattr(buggy, f"to_{framework}")
        cases.append(
            (
                f"{framework}: the exported MLP with the same bug in a custom backward",
                False,
                _check_export(buggy_export, x, y),
            )
        )
    return cases


def _demo(args: argparse.Namespace) -> int:
    ok = True
    for title, expected, run in _demo_cases():
        print(f"=== {title} (expected: {'pass' if expected else 'fail'})")
        try:
            report = run()
        except Exception as exc:  # the demo reports every adapter, even a broken one
            print(f"error: {type(exc).__name__}: {exc}\n")
            ok = False
            continue
        print(report)
        print()
        if report.passed != expected:
            ok = False
            print(f"!!! unexpected verdict: passed={report.passed}\n")
    print("demo: every verdict as expected" if ok else "demo: some verdicts were not as expected")
    return 0 if ok else 1


# ------------------------------------------------------------------------- gradcheck check
_CHECK_EPILOG = """\
TARGET names a function (or a module-level value) in a file or a module:
  path/to/file.py::name     the file is imported as a script would be (its folder first on sys.path)
  package.module:name       imported from the current folder or the installed packages

It must give one case, a tuple (model, x, y) or (model, x, y, loss) (y may be None);
or a list of such cases; or a dict {name: case}. A case may also be a function
returning a case. Each tuple is checked with gradcheck.check_gradients.

A low-precision kernel is a case too: a dict of gradcheck.check_kernel's arguments,
{"kernel": ..., "reference": ..., "x": ...} (and "y", "loss", "k", "precision",
"check_reference", "seed" if needed), checked against its reference with check_kernel.
Of the options, only --seed applies to it (a "seed" in the case wins).

exit status: 0 every case passes; 1 a check fails; 2 a usage or import error, no
cases at all, a case that could not be checked (the message names it), or an
interrupted run. User code that calls sys.exit() is an error of that code (2), not
an exit of gradcheck.
"""


class _UsageError(Exception):
    """Stops ``gradcheck check`` with exit status 2 and this message."""


class _Interrupted(Exception):
    """A ``KeyboardInterrupt`` in ``gradcheck check``: stop, report what ran, exit status 2."""


@dataclass
class _Case:
    name: str
    report: Report | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        if self.error is not None or self.report is None:
            return "error"
        return "pass" if self.report.passed else "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "passed": self.status == "pass",
            "error": self.error,
            "report": None if self.report is None else self.report.to_dict(),
        }


def _where(exc: BaseException) -> str:
    """`` (file, line N)`` of the innermost frame of ``exc``'s traceback, or ``""``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<", stdlib)) and f.filename != __file__
    ]
    if not frames:
        return ""
    last = frames[-1]
    return f" ({last.filename}, line {last.lineno})"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):  # sys.exit(0) reads "SystemExit: 0"; say what it was
        return f"SystemExit({exc.code!r}), sys.exit() was called{_where(exc)}"
    return f"{type(exc).__name__}: {exc}{_where(exc)}"


def _user_error(exc: BaseException, doing: str, message: str) -> Exception:
    """What user code raising ``exc`` while ``doing`` ends ``gradcheck check`` with.

    Any exception, ``SystemExit`` included, is the user code's error (exit status 2, the
    message names it); a ``KeyboardInterrupt`` interrupts the run (exit status 2 as well).
    """
    if isinstance(exc, KeyboardInterrupt):
        return _Interrupted(f"interrupted while {doing}")
    return _UsageError(f"{message} {_describe(exc)}")


def _import_file(path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise _UsageError(f"no such file: {path_text!r}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = "_gradcheck_target_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise _UsageError(f"cannot import {path_text!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: see the module doc
        sys.modules.pop(module_name, None)
        raise _user_error(
            exc, f"importing {path_text!r}", f"importing {path_text!r} failed:"
        ) from exc
    return module


def _import_module(module_name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except BaseException as exc:
        raise _user_error(
            exc, f"importing module {module_name!r}", f"importing module {module_name!r} failed:"
        ) from exc


def _resolve_target(target: str) -> tuple[str, Any]:
    """(the name to show, the object) for ``file.py::name`` or ``package.module:name``."""
    if "::" in target:
        where, _, name = target.rpartition("::")
        module = _import_file(where)
    elif ":" in target:
        where, _, name = target.rpartition(":")
        module = _import_module(where)
    else:
        raise _UsageError(
            f"TARGET must be path/to/file.py::name or package.module:name; got {target!r}"
        )
    if not name or not where:
        raise _UsageError(
            f"TARGET must be path/to/file.py::name or package.module:name; got {target!r}"
        )
    obj = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _UsageError(f"{where!r} has no attribute {name!r}") from None
        except BaseException as exc:  # a module __getattr__ is user code too
            raise _user_error(
                exc, f"looking up {name!r}", f"looking up {name!r} in {where!r} raised"
            ) from exc
    return name, obj


#: The keys of a kernel case: `check_kernel`'s arguments.
_KERNEL_CASE_KEYS: tuple[str, ...] = tuple(inspect.signature(check_kernel).parameters)


def _is_kernel_case(value: Any) -> bool:
    """A dict with ``"kernel"`` and ``"reference"``: `check_kernel`'s arguments, one case
    (never a dict of named cases)."""
    return isinstance(value, dict) and "kernel" in value and "reference" in value


def _build(value: Any) -> Any:
    """A case builder's case (a case that is a function is called)."""
    if callable(value) and not isinstance(value, (tuple, list, dict)):
        try:
            return value()
        except BaseException as exc:
            raise _user_error(exc, "building the case", "building the case raised") from exc
    return value


def _as_case(value: Any) -> tuple[Any, Any, Any, Any]:
    if not isinstance(value, tuple) or len(value) not in (3, 4):
        what = (
            f"a tuple of length {len(value)}"
            if isinstance(value, tuple)
            else f"a {type(value).__name__}"
        )
        raise _UsageError(
            f"expected (model, x, y) or (model, x, y, loss); got {what}"
            + (
                ""
                if isinstance(value, tuple)
                else " (a kernel case is a dict with the keys 'kernel', 'reference' and 'x')"
            )
        )
    model, x, y, *rest = value
    return model, x, y, (rest[0] if rest else None)


def _kernel_arguments(value: dict[Any, Any], seed: int) -> dict[str, Any]:
    """`check_kernel`'s keyword arguments for a kernel case, ``seed`` unless it gives one."""
    unknown = [key for key in value if key not in _KERNEL_CASE_KEYS]
    if unknown:
        raise _UsageError(
            f"a kernel case got unknown key {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(_KERNEL_CASE_KEYS)}"
        )
    return {"seed": seed, **value}


def _check_case(value: Any, settings: dict[str, Any]) -> Report:
    """Build the case and check it: a kernel case with `check_kernel`, a tuple with
    `check_gradients`."""
    value = _build(value)
    if _is_kernel_case(value):
        return check_kernel(**_kernel_arguments(value, settings["seed"]))
    model, x, y, loss = _as_case(value)
    return check_gradients(model, x, y, loss=loss, **settings)


def _collect_cases(name: str, obj: Any) -> list[tuple[str, Any]]:
    """(case name, case or case builder) for everything TARGET gives, not yet validated."""
    if callable(obj) and not isinstance(obj, (tuple, list, dict)):
        try:
            obj = obj()
        except BaseException as exc:
            raise _user_error(exc, f"calling {name}()", f"{name}() raised") from exc
    if isinstance(obj, tuple) or _is_kernel_case(obj):
        return [(name, obj)]
    if isinstance(obj, dict):
        cases = [(f"{name}[{key}]", value) for key, value in obj.items()]
    elif isinstance(obj, list):
        cases = [(f"{name}[{i}]", value) for i, value in enumerate(obj)]
    else:
        raise _UsageError(
            f"{name} must give a case (model, x, y[, loss]), a list of cases or a dict of "
            "named cases (a kernel case is a dict with the keys 'kernel', 'reference' and "
            f"'x'); got a {type(obj).__name__}"
        )
    if not cases:  # nothing checked is not a pass
        raise _UsageError(f"{name} gave no cases (an empty {type(obj).__name__}): nothing to check")
    return cases


class _Output:
    """stdout that stops writing, quietly, once its reader has gone (``... | head``)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.broken = True
            try:  # so that the interpreter's own flush at exit does not complain
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass

    def flush(self) -> None:
        pass


class _Progress:
    """A live line on stderr while a case runs, only when stderr is a terminal."""

    def __init__(self, stream: IO[str], total: int) -> None:
        self.stream = stream
        self.total = total
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, text: str) -> None:
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()

    def start(self, index: int, name: str) -> None:
        if not self.enabled:
            return
        started = time.perf_counter()
        self._stop.clear()

        def tick() -> None:
            while True:
                elapsed = time.perf_counter() - started
                self._write(f"gradcheck: [{index}/{self.total}] {name} ... {elapsed:.1f}s")
                if self._stop.wait(0.25):
                    return

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._write("")


def _first_line(report: Report) -> str:
    return str(report).splitlines()[0]


def _print_case(case: _Case, out: Any) -> None:
    if case.report is None:
        print(f"ERROR {case.name}: {case.error}", file=out)
        return
    if case.report.passed:
        print(f"PASS  {case.name}: {_first_line(case.report)}", file=out)
        for line in str(case.report).splitlines():
            if line.startswith("warning: "):
                print(f"      {line}", file=out)
        return
    print(f"FAIL  {case.name}:", file=out)
    for line in str(case.report).splitlines():
        print(f"      {line}".rstrip(), file=out)


def _run_check(args: argparse.Namespace) -> int:
    out: Any = _Output(sys.stdout)
    err: IO[str] = sys.stderr
    started = time.perf_counter()
    settings: dict[str, Any] = {option.name: getattr(args, option.name) for option in OPTIONS}
    cases: list[_Case] = []
    error: str | None = None
    try:
        name, obj = _resolve_target(args.target)
        todo = _collect_cases(name, obj)
    except (_UsageError, _Interrupted) as exc:
        error = str(exc)
        todo = []
    progress = _Progress(err, len(todo))
    for index, (case_name, value) in enumerate(todo, start=1):
        case = _Case(case_name)
        cases.append(case)
        progress.start(index, case_name)
        try:
            case.report = _check_case(value, settings)
        except _UsageError as exc:
            case.error = str(exc)
        except GradcheckInputError as exc:  # the model's own error, if any, says where
            cause = exc.__cause__
            case.error = f"{type(exc).__name__}: {exc}" + (_where(cause) if cause else "")
        except (_Interrupted, KeyboardInterrupt):
            case.error = "interrupted (KeyboardInterrupt)"
            left = len(todo) - index
            error = f"interrupted during {case_name}" + (
                f"; {left} more case{'s' if left != 1 else ''} not checked" if left else ""
            )
        except BaseException as exc:  # the model failed (sys.exit() too): no verdict, name it
            case.error = f"the check raised {_describe(exc)}"
        finally:
            progress.stop()
        if args.format == "text":
            _print_case(case, out)
        if error is not None:
            break
    elapsed = time.perf_counter() - started
    counts = {s: sum(1 for c in cases if c.status == s) for s in ("pass", "fail", "error")}
    not_checked = len(todo) - len(cases)
    # Exit status 0 only for a run that checked every case it was given, at least one, and
    # saw each of them pass; anything else that stopped a case, or the run, is 2.
    if error is not None or counts["error"] or not_checked or not cases:
        status = EXIT_ERROR
    elif counts["fail"]:
        status = EXIT_FAILED
    else:
        status = EXIT_PASSED
    document = {
        "target": args.target,
        "passed": status == EXIT_PASSED,
        "exit_status": status,
        "error": error,
        "options": settings,
        "summary": {
            "cases": len(todo),
            "passed": counts["pass"],
            "failed": counts["fail"],
            "errors": counts["error"],
            "not_checked": not_checked,
            "elapsed": elapsed,
        },
        "cases": [c.to_dict() for c in cases],
    }
    if error is not None:
        print(f"gradcheck check: error: {error}", file=err)
    if args.format == "json":
        json.dump(document, out, indent=2)
        out.write("\n")
    elif cases:
        summary = (
            f"gradcheck: {len(todo)} case{'s' if len(todo) != 1 else ''}: "
            f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} "
            f"error{'s' if counts['error'] != 1 else ''}"
        )
        if not_checked:
            summary += f", {not_checked} not checked"
        print(f"{summary} ({elapsed:.2f}s)", file=out)
    if args.json is not None:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"gradcheck check: error: cannot write {args.json!r}: {exc}", file=err)
            return EXIT_ERROR
    return status


def _add_check(sub: Any) -> None:
    check = sub.add_parser(
        "check",
        help="check the cases a function returns (for CI)",
        description="Check the gradients of the models (and the low-precision kernels) in "
        "TARGET; for CI.",
        epilog=_CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "target", metavar="TARGET", help="path/to/file.py::name or package.module:name"
    )
    for option in OPTIONS:  # every option of check_gradients, as a flag
        check.add_argument(
            option.flag,
            type=option.argparse_type(),
            default=option.default,
            metavar=option.metavar,
            help=f"{option.help} (default: {option.default_text})",
        )
    check.add_argument(
        "--json", metavar="FILE", default=None, help="also write the results as JSON"
    )
    check.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="what to print on stdout (default: text)",
    )
    check.set_defaults(run=_run_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcheck", description="Check analytical gradients against numerical derivatives."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check the reference MLP through every installed adapter")
    demo.set_defaults(run=_demo)
    _add_check(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except SystemExit as exc:  # user code's sys.exit() that slipped past the command's own net
        print(f"gradcheck {args.command}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
