"""gradcheck against ``jax.test_util.check_grads`` on solver- and ODE-shaped JAX models.

Models (all float64, written here, shaped like jaxopt / optimistix / diffrax code):

- ``fixed-point``: z* = tanh(W z* + U x + b) found by ``lax.while_loop``, with a
  ``custom_vjp`` whose backward solves the adjoint equation by a second fixed-point loop
  (implicit differentiation, as a deep-equilibrium layer or jaxopt's ``implicit_diff``);
- ``fixed-point-large``: the same with 464 entries (more than a compiled, vmapped loss
  would repay for a model with loops);
- ``ode-rk4``: dy/dt = tanh(y W^T + b) / tau - y integrated by RK4 in ``lax.scan``, with
  a ``custom_vjp`` discrete adjoint (a reverse scan, as diffrax's checkpointed adjoint);
- ``ridge-root``: a ridge regression solved by Newton steps through ``lax.custom_root``,
  checked with respect to its regularisation strength (a 0-d array).

For each, in one run:

- *session*: both tools check a fresh instance of the model (new closures, so neither
  reuses the other's compiled loops) ``--repeat`` times, alternating which goes first, in
  this process after a warm-up; medians. This is a check inside a test session.
- *cold*: each tool checks the model once in a fresh Python process (``--cold`` processes
  each, after importing JAX and running one tiny jitted function); medians. This is a
  first check in a process, paying every compile.
- ``check_grads(f, (params, x), order=1, modes=("rev",))`` with ``f`` the same scalar
  gradcheck checks (``sum(out * r)``, ``r`` fixed), eager, as its documentation shows.
- gradcheck runs ``check_gradients((apply_fn, params), x)`` with its defaults (``auto``:
  full mode here, every entry) and in fast mode; the last rows are the planted-bug runs
  (a backward with one wrong entry or a scaled hyperparameter gradient): their
  evaluations and time, and whether the right block is named.

Run: ``python benchmarks/jax_solvers.py`` (``--repeat 5 --cold 3`` by default; the numbers
in docs/jax.md come from this command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo.jax_solvers import (
    fixed_point_model,
    fixed_point_params,
    ode_model,
    ode_params,
    rand,
    ridge_model,
)

from gradcheck import check_gradients

Model = tuple[Callable[[Any, Any], Any], dict[str, np.ndarray], Any, str]


# ------------------------------------------------------------------------------ models
# (the models of tests/test_jax_real.py, at the sizes measured here)
def fixed_point(n: int = 8, d: int = 4, batch: int = 5, bug: bool = False) -> Model:
    model = fixed_point_model("W" if bug else None)
    return model, fixed_point_params(n, d), rand((batch, d), 4), "W"


def ode_rk4(n: int = 6, batch: int = 4, steps: int = 40, bug: bool = False) -> Model:
    model = ode_model("tau" if bug else None, steps=steps)
    return model, ode_params(n), rand((batch, n), 9), "tau"


def ridge_root(bug: bool = False) -> Model:
    data = (rand((40, 6), 5), rand((40,), 6))
    return ridge_model(bug), {"lam": np.asarray(0.3)}, data, "lam"


MODELS: dict[str, Callable[..., Model]] = {
    "fixed-point": fixed_point,
    "fixed-point-large": lambda bug=False: fixed_point(16, 8, 8, bug),
    "ode-rk4": ode_rk4,
    "ridge-root": ridge_root,
}
WRT = {"ridge-root": "params"}


# ------------------------------------------------------------------------------ timing
def run_ours(name: str, mode: str = "auto", bug: bool = False) -> tuple[float, Any]:
    fn, params, x, _ = MODELS[name](bug=bug)
    start = time.perf_counter()
    report = check_gradients((fn, params), x, mode=mode, wrt=WRT.get(name, "all"))  # type: ignore[arg-type]
    return time.perf_counter() - start, report


def run_check_grads(name: str) -> float:
    fn, params, x, _ = MODELS[name]()
    with jax.enable_x64(True):
        p = jax.tree_util.tree_map(jnp.asarray, params)
        xx = jax.tree_util.tree_map(jnp.asarray, x)
        r = np.random.default_rng(0).normal(size=np.shape(jax.eval_shape(fn, p, xx)))
        args = (p,) if name in WRT else (p, xx)

        def f(*a: Any) -> Any:
            return jnp.sum(fn(a[0], xx if name in WRT else a[1]) * r)

        start = time.perf_counter()
        check_grads(f, args, order=1, modes=("rev",))
        return time.perf_counter() - start


def warm_up() -> None:
    with jax.enable_x64(True):
        jax.jit(lambda v: jnp.sin(v) @ v)(jnp.ones((2, 2))).block_until_ready()


def one(tool: str, name: str) -> float:
    """A single check in this (fresh) process: the cold number."""
    warm_up()
    if tool == "check_grads":
        return run_check_grads(name)
    return run_ours(name, mode=tool)[0]


def cold(tool: str, name: str, times: int) -> float:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    values = []
    for _ in range(times):
        out = subprocess.run(
            [sys.executable, __file__, "--one", tool, name],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        values.append(json.loads(out.strip().splitlines()[-1]))
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="checks per tool in session")
    parser.add_argument("--cold", type=int, default=3, help="fresh processes per tool")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print(
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; medians in seconds; ratio = gradcheck / check_grads"
    )
    warm_up()
    run_ours("ode-rk4")  # first-use costs of the adapter and of XLA, outside the numbers
    header = (
        f"{'model':18} {'entries':>7} | {'session: ours':>13} {'fast':>6} {'check_grads':>11} "
        f"{'ratio':>6} | {'cold: ours':>10} {'check_grads':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        ours, fast, theirs = [], [], []
        size = 0
        for k in range(args.repeat):
            if k % 2:
                theirs.append(run_check_grads(name))
            seconds, report = run_ours(name)
            assert report.passed, str(report)
            size = sum(b.size for b in report.blocks)
            ours.append(seconds)
            fast.append(run_ours(name, "fast")[0])
            if not k % 2:
                theirs.append(run_check_grads(name))
        o, f, t = (statistics.median(v) for v in (ours, fast, theirs))
        c_ours = cold("auto", name, args.cold) if args.cold else float("nan")
        c_theirs = cold("check_grads", name, args.cold) if args.cold else float("nan")
        print(
            f"{name:18} {size:>7} | {o:>13.2f} {f:>6.2f} {t:>11.2f} {o / t:>6.2f} | "
            f"{c_ours:>10.2f} {c_theirs:>11.2f} {c_ours / c_theirs:>6.2f}"
        )
    print()
    print(f"{'planted bug':18} {'mode':>5} {'evaluations':>11} {'seconds':>8}  named")
    for name in args.models:
        block = MODELS[name]()[3]
        for mode in ("auto", "fast"):
            seconds, report = run_ours(name, mode=mode, bug=True)
            named = sorted(b.name for b in report.failed_blocks)
            ok = "yes" if not report.passed and named == [block] else f"NO {named}"
            print(f"{name:18} {mode:>5} {report.evaluations:>11} {seconds:>8.2f}  {block}: {ok}")


if __name__ == "__main__":
    main()
