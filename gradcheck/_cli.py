"""The ``gradcheck`` command: ``gradcheck demo`` (and more, see ``gradcheck --help``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._api import check_gradients
from ._report import Report

#: (framework, the module that must be importable) for every adapter the demo tries
_FRAMEWORKS = (("numpy", "numpy"), ("torch", "torch"), ("jax", "jax"))


def _demo_cases() -> list[tuple[str, bool, Callable[[], Report]]]:
    """(title, expected verdict, run) for every installed adapter: a correct and a buggy MLP."""
    from .reference import MLP

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4))
    y = rng.normal(size=(8, 2))
    mlp = MLP([4, 5, 2], activation="tanh", seed=0)
    buggy = mlp.with_bug("wrong_activation_derivative")
    cases: list[tuple[str, bool, Callable[[], Report]]] = [
        ("numpy: reference MLP 4-5-2, tanh, MSE", True, lambda: check_gradients(mlp, x, y, loss="mse")),
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
                lambda export=export: check_gradients(export(), x, y, loss="mse"),
            )
        )
        buggy_export = getattr(buggy, f"to_{framework}")
        cases.append(
            (
                f"{framework}: the exported MLP with the same bug in a custom backward",
                False,
                lambda export=buggy_export: check_gradients(export(), x, y, loss="mse"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradcheck", description="Check analytical gradients against numerical derivatives."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="check the reference MLP through every installed adapter")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
