"""Full mode against ``torch.autograd.gradcheck`` on MLPs of about 1e3 and 1e4 parameters.

Both tools check every parameter of the same float64 MLP (tanh, MSE loss):
``torch.autograd.gradcheck`` gets the parameters as its inputs through
``torch.func.functional_call``; gradcheck runs ``check_gradients(..., mode="full",
wrt="params")``. For each size the script prints, as medians over ``--repeats`` runs (the two tools
alternate, so both see the same machine load):

* the wall time of each tool and their ratio;
* each tool's cost per loss evaluation (wall time / evaluations; gradcheck counts its own,
  ``torch.autograd.gradcheck`` needs 2 per parameter) next to one plain forward call of
  the model with its loss (``torch.no_grad``);
* each tool's largest error against the analytic (autograd) gradient, absolute and
  normwise (``max |numeric - analytic| / max |analytic|``): gradcheck's numerical
  gradient from the report, torch's from its own numerical Jacobian (``eps=1e-6``,
  central differences, as ``gradcheck`` computes it);
* the same error with gradcheck's refinement (Richardson over eight steps) applied to every
  entry instead of only to suspicious ones, and its evaluations per entry.

Run: ``python benchmarks/torch_full.py [--repeats 5]`` (one thread, CPU).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from gradcheck.adapters.torch import build_problem
from torch import nn

from gradcheck import TOLERANCES, check_gradients
from gradcheck._numerics import Evaluator, base_steps, coordinate_differences, refine

SIZES = {"~1e3": [16, 48, 4, 1], "~1e4": [64, 128, 16, 1]}
BATCH = 32


def make_mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in pairwise(sizes):
        layers += [nn.Linear(n_in, n_out, dtype=torch.float64), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def interleaved_medians(
    first: Callable[[], Any], second: Callable[[], Any], repeats: int
) -> tuple[float, Any, float, Any]:
    """Median wall times of ``first`` and ``second``, run alternately (so that both see
    the same machine load), with their last results."""
    a_times, b_times, a, b = [], [], None, None
    for _ in range(repeats):
        start = time.perf_counter()
        a = first()
        a_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = second()
        b_times.append(time.perf_counter() - start)
    return statistics.median(a_times), a, statistics.median(b_times), b


def forward_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Median seconds of one plain ``((model(x) - y)**2).mean().item()`` call."""
    with torch.no_grad():
        for _ in range(50):
            ((model(x) - y) ** 2).mean().item()
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            for _ in range(100):
                ((model(x) - y) ** 2).mean().item()
            samples.append((time.perf_counter() - start) / 100)
    return statistics.median(samples)


def torch_numerical_gradient(
    fn: Callable[..., torch.Tensor], params: tuple[Any, ...]
) -> np.ndarray:
    """The numerical Jacobian ``torch.autograd.gradcheck`` compares with (eps=1e-6)."""
    module = importlib.import_module("torch.autograd.gradcheck")
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in params)
    private = getattr(module, "_get_numerical_jacobian", None)
    if private is not None:
        columns = private(fn, inputs, eps=1e-6)
        return np.concatenate([c[0].reshape(-1).numpy() for c in columns])
    flat = []  # the same central differences, written out
    with torch.no_grad():
        for t in inputs:
            for i in range(t.numel()):
                v = t.view(-1)
                old = float(v[i])
                v[i] = old + 1e-6
                plus = float(fn(*inputs))
                v[i] = old - 1e-6
                minus = float(fn(*inputs))
                v[i] = old
                flat.append((plus - minus) / 2e-6)
    return np.array(flat)


def run(label: str, sizes: list[int], repeats: int) -> dict[str, float]:
    model = make_mlp(sizes, seed=0)
    x = torch.randn(BATCH, sizes[0], dtype=torch.float64)
    y = torch.randn(BATCH, sizes[-1], dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    n_params = sum(p.numel() for p in params)

    def loss_of(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return ((out - y) ** 2).mean()

    analytic = np.concatenate(
        [g.reshape(-1).numpy() for g in torch.autograd.grad(loss_of(*params), params)]
    )

    def ours() -> Any:
        return check_gradients(model, x, y, loss="mse", mode="full", wrt="params")

    def theirs() -> bool:
        return bool(torch.autograd.gradcheck(loss_of, params))

    ours()  # warm-up
    theirs()
    ours_s, report, theirs_s, ok = interleaved_medians(ours, theirs, repeats)
    assert report.passed, str(report)
    assert ok
    forward_s = forward_time(model, x, y)
    ours_err = float(np.max(np.abs(report.numeric - analytic)))
    refined, per_entry = refined_everywhere(model, x, y)
    refined_err = float(np.max(np.abs(refined - analytic)))
    theirs_err = float(np.max(np.abs(torch_numerical_gradient(loss_of, params) - analytic)))
    scale = float(np.max(np.abs(analytic)))
    ours_eval = ours_s / report.evaluations
    theirs_eval = theirs_s / (2 * n_params)
    print(f"\nMLP {sizes} ({label}): {n_params:,} parameters, batch {BATCH}, float64, 1 thread")
    print(
        f"  wall time      gradcheck full {ours_s:8.3f} s"
        f"   torch.autograd.gradcheck {theirs_s:8.3f} s"
    )
    print(f"  speed-up       {theirs_s / ours_s:6.1f}x   (batching: {report.batching})")
    print(
        f"  per evaluation gradcheck {ours_eval * 1e6:7.1f} us ({report.evaluations:,} evaluations)"
        f"   torch {theirs_eval * 1e6:7.1f} us ({2 * n_params:,})"
        f"   plain forward call {forward_s * 1e6:7.1f} us"
    )
    print(
        f"  ratio to one forward call: gradcheck {ours_eval / forward_s:5.2f}"
        f"   torch {theirs_eval / forward_s:5.2f}"
    )
    print(
        f"  max |numeric - analytic|: gradcheck {ours_err:.2e}   torch {theirs_err:.2e}"
        f"   (largest gradient {scale:.2e})"
    )
    print(
        f"  normwise relative error: gradcheck {ours_err / scale:.2e}"
        f" ({report.evaluations / n_params:.2f} evaluations per entry)"
        f"   torch {theirs_err / scale:.2e}"
        f"   gradcheck refined everywhere {refined_err / scale:.2e}"
        f" ({per_entry:.0f} evaluations per entry)"
    )
    return {
        "params": n_params,
        "ours_s": ours_s,
        "theirs_s": theirs_s,
        "speedup": theirs_s / ours_s,
        "ours_eval_us": ours_eval * 1e6,
        "theirs_eval_us": theirs_eval * 1e6,
        "forward_us": forward_s * 1e6,
        "ours_err": ours_err,
        "theirs_err": theirs_err,
        "refined_err": refined_err,
    }


def refined_everywhere(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, float]:
    """gradcheck's refinement (``refine``: Richardson over eight steps, error estimates) on
    every parameter; returns the numerical gradient and the evaluations per entry."""
    problem = build_problem(model, x, y, loss="mse", wrt="params")
    ev = Evaluator(problem, None)
    tol = TOLERANCES["float64"]
    f0 = ev.point(problem.theta0)
    h = base_steps(problem.theta0, tol)
    idx = np.arange(problem.size)
    first = coordinate_differences(ev, idx, h, f0)
    r = refine(lambda factor: coordinate_differences(ev, idx, h * factor, f0), first, tol)
    return r.numeric, ev.count / problem.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per tool and size (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, median of {args.repeats} runs")
    for label, sizes in SIZES.items():
        run(label, sizes, args.repeats)


if __name__ == "__main__":
    main()
