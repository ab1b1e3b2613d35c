"""The same verdict everywhere: plain, under torch.no_grad(), in 4 threads, twice in a row.

``assert_stable(run)`` calls ``run()`` (which returns a `gradcheck.Report`) in each of
those conditions and asserts that every ``to_dict()`` is identical, apart from the
wall time. The oracle is the plain call: any condition that changes the report is a
check that depends on the caller's state.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from typing import Any

from gradcheck import Report


def _data(report: Report) -> dict[str, Any]:
    d = report.to_dict()
    d.pop("elapsed", None)
    return d


def in_threads(work: Callable[[int], Any], n: int = 4) -> list[Any]:
    """``[work(0), ..., work(n - 1)]``, each in its own thread, all started together (a
    barrier); the first exception a thread raised is raised here."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _in_threads(run: Callable[[], Report], n: int = 4) -> list[dict[str, Any]]:
    return in_threads(lambda i: _data(run()), n)


def assert_stable(run: Callable[[], Report], *, threads: bool = True) -> Report:
    """Assert that ``run()`` gives the same report in every condition; return the plain one."""
    first = run()
    expected = _data(first)
    assert _data(run()) == expected, "a second call gave a different report"
    if importlib.util.find_spec("torch") is not None:
        import torch

        with torch.no_grad():
            assert _data(run()) == expected, "torch.no_grad() changed the report"
        with torch.inference_mode():
            assert _data(run()) == expected, "torch.inference_mode() changed the report"
    if threads:
        for i, got in enumerate(_in_threads(run)):
            assert got == expected, f"thread {i} of 4 got a different report"
    return first
