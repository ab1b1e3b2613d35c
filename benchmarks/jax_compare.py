"""gradcheck against ``jax.test_util.check_grads`` on the same MLPs, in one run.

For each MLP (the reference MLP exported to JAX, float64) this measures:

- wall time of gradcheck's check (full and fast mode), split into building the problem
  (tracing the loss and its gradient) and running the check (which compiles the loss
  first where the evaluations repay it: full mode here, not fast mode);
- wall time of ``check_grads(f, (params,), order=1, modes=("rev",))``, first call (JAX's
  own tracing and compile caches warm up) and warm calls, with ``f`` eager and jitted;
- whether each notices a single wrong entry: the first layer is a ``custom_vjp`` whose
  backward multiplies one entry of the 1000-entry weight ``W0`` (50 x 20) by 1.01.

Times are medians over ``--repeat`` runs. Run: ``python benchmarks/jax_compare.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gradcheck.adapters import jax as jax_adapter
from jax.test_util import check_grads

from gradcheck import check_gradients
from gradcheck._check import run_check
from gradcheck._options import CheckOptions
from gradcheck.reference import MLP

SIZES = {"mlp-20-50-10": [20, 50, 10], "mlp-20-50-50-10": [20, 50, 50, 10]}
BATCH = 32
MIDDLE = (25, 10)  # the planted entry of the timing table: W0 is 50 x 20


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, list[float], Any]:
    """(first time, later times, last result), on the chosen clock."""
    times, result = [], None
    for _ in range(repeat + 1):
        start = clock()
        result = fn()
        times.append(clock() - start)
    return times[0], times[1:], result


Position = tuple[int, int]


def model_with_bug(
    mlp: MLP, bug: Position | None
) -> tuple[Callable[[Any, Any], Any], dict[str, Any]]:
    """The exported MLP, first layer behind a custom_vjp (x1.01 on ``W0[bug]`` if given)."""
    apply_ref, params = mlp.to_jax()

    @jax.custom_vjp
    def dense(w: Any, b: Any, a: Any) -> Any:
        return a @ w.T + b

    def fwd(w: Any, b: Any, a: Any) -> Any:
        return dense(w, b, a), (w, a)

    def bwd(res: Any, g: Any) -> Any:
        w, a = res
        dw = g.T @ a
        if bug is not None:
            dw = dw.at[bug].multiply(1.01)
        return dw, g.sum(axis=0), g @ w

    dense.defvjp(fwd, bwd)

    def apply_fn(p: Any, x: Any) -> Any:
        a = x
        for layer in range(mlp.n_layers):
            w, b = jnp.asarray(p[f"W{layer}"]), jnp.asarray(p[f"b{layer}"])
            z = dense(w, b, a) if layer == 0 else a @ w.T + b
            a = z if layer == mlp.n_layers - 1 else jnp.tanh(z)
        return a

    with jax.enable_x64(True):  # the same network as the reference export
        x = np.random.default_rng(1).normal(size=(3, mlp.sizes[0]))
        assert np.allclose(apply_fn(params, x), apply_ref(params, x), rtol=1e-14, atol=1e-14)
    return apply_fn, params


def jax_check_grads(
    apply_fn: Any, params: Any, x: np.ndarray, y: np.ndarray, jit: bool, dtype: str = "float64"
) -> bool:
    """True when check_grads passes (does not notice anything), with its default tolerances."""

    with jax.enable_x64(dtype == "float64"):
        xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)

        def loss(p: Any) -> Any:
            return jnp.mean((apply_fn(p, xs) - ys) ** 2)

        f = jax.jit(loss) if jit else loss
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
        try:
            check_grads(f, (p,), order=1, modes=("rev",))
        except AssertionError:
            return False
    return True


def row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs after the first (median)")
    parser.add_argument("--positions", type=int, default=12, help="W0 entries to plant the bug in")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or CPU time of this process (all threads; steadier on a shared machine)",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    repeat = args.repeat
    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({cpu})")
    print(
        f"{args.clock} time, median of {repeat} runs after a first run; batch {BATCH}; MSE loss\n"
    )
    widths = [16, 26, 12, 12, 12, 22]
    print(
        row(
            ["model", "checker", "first (s)", "median (s)", "ratio", "catches W0[25,10] x1.01"],
            widths,
        )
    )
    for label, sizes in SIZES.items():
        mlp = MLP(sizes, activation="tanh", seed=0)
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(BATCH, sizes[0])), rng.normal(size=(BATCH, sizes[-1]))
        good, bad = model_with_bug(mlp, None), model_with_bug(mlp, MIDDLE)
        n_params = sum(v.size for v in good[1].values())
        results: list[tuple[str, float, float, bool]] = []

        for mode in ("full", "fast"):
            opts = CheckOptions(mode=mode)
            build = partial(jax_adapter.build_problem, good, x, y, loss="mse", wrt="params", seed=0)
            b_first, b_times, problem = timed(build, repeat)
            r_first, r_times, report = timed(partial(run_check, problem, opts), repeat)
            assert report.passed, str(report)
            caught = not check_gradients(bad, x, y, loss="mse", wrt="params", mode=mode).passed
            total = [b + r for b, r in zip(b_times, r_times, strict=True)]
            results += [
                (f"gradcheck {mode}: build", b_first, statistics.median(b_times), caught),
                (f"gradcheck {mode}: check", r_first, statistics.median(r_times), caught),
                (f"gradcheck {mode}: total", b_first + r_first, statistics.median(total), caught),
            ]

        for jit in (False, True):
            first, times, passed = timed(partial(jax_check_grads, *good, x, y, jit), repeat)
            assert passed
            caught = not jax_check_grads(*bad, x, y, jit)
            name = f"check_grads ({'jit' if jit else 'eager'})"
            results.append((name, first, statistics.median(times), caught))

        reference = next(m for n, _, m, _ in results if n == "check_grads (jit)")
        print(f"{label} ({n_params} params)")
        for name, first, med, caught in results:
            ratio = f"{med / reference:.2f}x"
            print(
                row(
                    ["", name, f"{first:.4f}", f"{med:.4f}", ratio, "yes" if caught else "NO"],
                    widths,
                )
            )
        print()
    detection(args.positions)
    print("ratio: median time / median time of check_grads (jit);")
    print("build = build_problem (traces the loss and its gradient);")
    print(
        "check = the core (full mode compiles the batched loss first, fast mode runs the traced "
        "programs op by op); check_grads projects on one random direction."
    )


def detection(n_positions: int) -> None:
    """Plant x1.01 in each of ``n_positions`` random entries of W0; count who notices."""
    mlp = MLP(SIZES["mlp-20-50-10"], activation="tanh", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(BATCH, 20)), rng.normal(size=(BATCH, 10))
    flat = rng.choice(1000, size=n_positions, replace=False)
    positions = [MIDDLE, *((int(i) // 20, int(i) % 20) for i in flat if int(i) != 25 * 20 + 10)]
    positions = positions[:n_positions]
    checkers: dict[str, Callable[[Any], bool]] = {
        "gradcheck full (float64)": lambda m: (
            not check_gradients(m, x, y, loss="mse", wrt="params", mode="full").passed
        ),
        "gradcheck fast (float64)": lambda m: (
            not check_gradients(m, x, y, loss="mse", wrt="params", mode="fast").passed
        ),
        "check_grads (float64)": lambda m: not jax_check_grads(m[0], m[1], x, y, False),
        "check_grads (float32)": lambda m: not jax_check_grads(m[0], m[1], x, y, False, "float32"),
    }
    caught = dict.fromkeys(checkers, 0)
    for position in positions:
        model = model_with_bug(mlp, position)
        for name, check in checkers.items():
            caught[name] += check(model)
    print(f"x1.01 planted in one of {len(positions)} random entries of W0 (50 x 20), mlp-20-50-10:")
    for name, count in caught.items():
        print(f"  {name:<26} caught {count} / {len(positions)}")
    print()


if __name__ == "__main__":
    main()
