"""Draw the error of numerical derivatives against the step size: docs/img/step_size.png.

Everything numerical comes from gradcheck itself: the loss is the reference MLP
(tanh, MSE) seen through the NumPy adapter, the differences are taken by
``gradcheck._numerics.coordinate_differences`` and refined by
``gradcheck._numerics.refine``, and the default step is ``base_steps`` with
``TOLERANCES["float64"]``. The exact derivative is the reference MLP's own
backpropagation, which is right to rounding. So the picture follows the code: if
the default step or the refinement changes, rerun this script.

Usage::

    python docs/scripts/step_size_figure.py [--out DIR] [--no-plot]

It prints the numbers the figure shows and, with ``--json``, writes them as JSON too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gradcheck.adapters.numpy import build_problem

from gradcheck import TOLERANCES, FlatProblem
from gradcheck._numerics import Evaluator, base_steps, coordinate_differences, refine, subset
from gradcheck.reference import MLP

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "img"

#: Steps of the sweep, as multiples of each entry's scale ``max(|theta_i|, 1)``
#: (the same scale the checker multiplies ``TOLERANCES[...].step`` by).
RELATIVE_STEPS = np.logspace(-11, -1, 81)


def _problem() -> FlatProblem:
    """The reference MLP's loss as a FlatProblem, with a vectorised ``loss_batch``.

    The layout and the exact gradient come from the NumPy adapter (the reference
    MLP's backpropagation); the batched loss evaluates the same network for many
    parameter vectors in one call, so the sweep takes seconds, not minutes.
    """
    mlp = MLP([4, 8, 1], activation="tanh", seed=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4))
    y = rng.normal(size=(16, 1))
    ref = build_problem(mlp, x, y, loss="mse", wrt="params", seed=0)
    blocks = {b.name: b for b in ref.blocks}

    def unpack(thetas: np.ndarray, name: str) -> np.ndarray:
        return thetas[:, blocks[name].slice].reshape((len(thetas), *blocks[name].shape))

    def loss_batch(thetas: np.ndarray) -> np.ndarray:
        w0, b0, w1, b1 = (unpack(thetas, n) for n in ("W0", "b0", "W1", "b1"))
        hidden = np.tanh(np.einsum("ni,khi->knh", x, w0) + b0[:, None, :])
        out = np.einsum("knh,koh->kno", hidden, w1) + b1[:, None, :]
        return np.mean((out - y) ** 2, axis=(1, 2))

    problem = FlatProblem(
        theta0=ref.theta0,
        loss=lambda theta: float(loss_batch(theta[None, :])[0]),
        gradient=ref.gradient,
        blocks=ref.blocks,
        loss_batch=loss_batch,
        max_batch=4096,
    )
    same = abs(problem.loss(ref.theta0) - ref.loss(ref.theta0))
    assert same <= 1e-12 * abs(ref.loss(ref.theta0)), f"batched loss differs by {same}"
    return problem


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def sweep() -> dict[str, object]:
    """Errors of the central difference and of the refined estimate for every step.

    Every parameter entry of the network is differentiated at every relative step;
    the curves are root-mean-square errors over the entries, which smooths the
    round-off noise that makes the curve of a single entry jagged.
    """
    tol = TOLERANCES["float64"]
    problem = _problem()
    ev = Evaluator(problem, max_evals=None)
    theta0 = problem.theta0
    exact = np.asarray(problem.gradient(theta0.copy()), dtype=np.float64)
    f0 = ev.point(theta0)
    idx = np.arange(theta0.size)
    default = base_steps(theta0, tol)  # the step the checker's first pass takes
    scale = np.maximum(np.abs(theta0), 1.0)
    default_relative = float(np.median(default / scale))

    central, refined, estimated, roundoff = [], [], [], []
    for s in RELATIVE_STEPS:
        h = s * scale
        first = coordinate_differences(ev, idx, h, f0)
        central.append(_rms(first.central - exact))
        roundoff.append(_rms(first.roundoff(tol)))
        r = refine(
            lambda factor, h=h: coordinate_differences(ev, idx, h * factor, f0),
            subset(first, np.ones(idx.size, dtype=bool)),
            tol,
        )
        refined.append(_rms(r.numeric - exact))
        estimated.append(_rms(r.error))

    central_arr = np.array(central)
    best = int(np.argmin(central_arr))
    log_steps = np.log(RELATIVE_STEPS)

    def at_default(values: list[float]) -> float:
        return float(np.exp(np.interp(np.log(default_relative), log_steps, np.log(values))))

    return {
        "function": f"reference MLP 4-8-1 (tanh), MSE on 16 samples: {idx.size} parameters, "
        f"loss {f0:.4g}, gradient RMS {_rms(exact):.3g}",
        "entries": int(idx.size),
        "loss": f0,
        "default_step": default_relative,
        "steps": RELATIVE_STEPS.tolist(),
        "central_error": central,
        "refined_error": refined,
        "estimated_error": estimated,
        "roundoff_model": roundoff,
        "best_central_step": float(RELATIVE_STEPS[best]),
        "best_central_error": float(central_arr[best]),
        "central_error_at_default": at_default(central),
        "refined_error_at_default": at_default(refined),
        "estimated_error_at_default": at_default(estimated),
        "best_refined_error": float(np.min(refined)),
    }


def plot(data: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array(data["steps"])
    floor = 1e-15  # exact zeros would vanish from a log axis
    n = data["entries"]
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=120)
    ax.loglog(
        steps,
        np.maximum(data["central_error"], floor),
        "o-",
        ms=3,
        lw=1.2,
        label="central difference with step h",
    )
    ax.loglog(
        steps,
        np.maximum(data["refined_error"], floor),
        "s-",
        ms=3,
        lw=1.2,
        label="Richardson, refined from first-pass step h",
    )
    ax.loglog(
        steps,
        data["estimated_error"],
        "--",
        lw=1.0,
        color="C1",
        alpha=0.8,
        label="its error estimate",
    )
    ax.loglog(
        steps,
        data["roundoff_model"],
        ":",
        lw=1.0,
        color="0.4",
        label="round-off model of the central difference",
    )
    ax.axvline(data["default_step"], color="C3", lw=1.2)
    ax.annotate(
        f"default step {data['default_step']:.0e}",
        xy=(data["default_step"], 0.04),
        xycoords=("data", "axes fraction"),
        xytext=(6, 0),
        textcoords="offset points",
        color="C3",
        fontsize=9,
    )
    ax.set_xlabel("step h, relative to max(|entry|, 1)")
    ax.set_ylabel(f"RMS error over {n} entries")
    ax.set_title("Error of the numerical derivative against the step (float64)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center")
    ax.set_ylim(floor, None)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for step_size.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-plot", action="store_true", help="print the numbers only")
    args = parser.parse_args(argv)

    data = sweep()
    ratio = data["default_step"] / data["best_central_step"]
    print(data["function"])
    print("steps relative to max(|entry|, 1); errors are RMS over the entries")
    print(f"default step (TOLERANCES['float64'].step): {data['default_step']:.2e}")
    print(
        f"best central-difference step in the sweep: {data['best_central_step']:.2e} "
        f"(default / best = {ratio:.2f})"
    )
    print(
        f"central difference error: {data['best_central_error']:.2e} at the best step, "
        f"{data['central_error_at_default']:.2e} at the default step"
    )
    print(
        f"Richardson error: {data['refined_error_at_default']:.2e} at the default step "
        f"(its estimate {data['estimated_error_at_default']:.2e}), "
        f"{data['best_refined_error']:.2e} at best"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1))
    if not args.no_plot:
        path = args.out / "step_size.png"
        plot(data, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
