"""The zoo of hand-written layers through gradcheck and through the anchors, side by side.

For every zoo layer (``tests/zoo``), correct and with every mutant of its backward,
at every seed asked for, this runs:

- gradcheck (``check_gradients`` with defaults) on the NumPy, torch and jax versions;
- ``torch.autograd.gradcheck`` on the torch version, parameters passed as inputs via
  ``torch.func.functional_call`` (defaults: eps=1e-6, atol=1e-5, rtol=1e-3), in its
  slow mode and with ``fast_mode=True``;
- ``jax.test_util.check_grads(f, (params, x), order=1, modes=("rev",))`` on the jax
  version (defaults; float64 via ``jax_enable_x64``).

It prints, per tool, how many mutants each kind of mistake it caught and how many
correct layers it failed (false alarms), then every miss and false alarm by name.
A benchmark: nothing is asserted about the anchors.

Run from the repository root::

    python benchmarks/zoo_anchors.py                    # seed 0, every framework
    python benchmarks/zoo_anchors.py --seeds 0 1 2      # the three seeds of the tests
    python benchmarks/zoo_anchors.py --frameworks numpy torch
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo import LAYERS, Layer, cases

from gradcheck import check_gradients

Outcome = bool | None  # True: passed, False: failed, None: the tool raised an error


def _ours_numpy(layer: Layer, bug: str | None, seed: int) -> Outcome:
    from zoo.numpy_layers import NumpyLayer

    point = layer.point(seed)
    return check_gradients(NumpyLayer(layer, point, bug), point.x).passed


def _ours_torch(layer: Layer, bug: str | None, seed: int) -> Outcome:
    from zoo.torch_layers import TorchLayer, torch_input

    point = layer.point(seed)
    return check_gradients(TorchLayer(layer, point, bug), torch_input(point)).passed


def _ours_jax(layer: Layer, bug: str | None, seed: int) -> Outcome:
    from zoo.jax_layers import jax_layer

    point = layer.point(seed)
    return check_gradients(jax_layer(layer, point, bug), point.x).passed


def _torch_anchor(fast: bool) -> Callable[[Layer, str | None, int], Outcome]:
    def run(layer: Layer, bug: str | None, seed: int) -> Outcome:
        import torch
        from zoo.torch_layers import TorchLayer, torch_input

        point = layer.point(seed)
        module = TorchLayer(layer, point, bug)
        names = [n for n, _ in module.named_parameters()]
        x = torch_input(point)
        inputs = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
        if x.is_floating_point():
            x = x.detach().clone().requires_grad_(True)

        def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

        return torch.autograd.gradcheck(f, (x, *inputs), fast_mode=fast, raise_exception=False)

    return run


def _jax_anchor(layer: Layer, bug: str | None, seed: int) -> Outcome:
    from jax.test_util import check_grads
    from zoo.jax_layers import jax_layer

    point = layer.point(seed)
    apply_fn, params = jax_layer(layer, point, bug)
    x = point.x
    try:
        if np.issubdtype(x.dtype, np.floating):
            check_grads(apply_fn, (params, x), order=1, modes=("rev",))
        else:
            check_grads(lambda p: apply_fn(p, x), (params,), order=1, modes=("rev",))
    except AssertionError:
        return False
    return True


TOOLS: dict[str, tuple[str, Callable[[Layer, str | None, int], Outcome]]] = {
    "ours:numpy": ("numpy", _ours_numpy),
    "ours:torch": ("torch", _ours_torch),
    "torch.gradcheck": ("torch", _torch_anchor(fast=False)),
    "torch.gradcheck(fast)": ("torch", _torch_anchor(fast=True)),
    "ours:jax": ("jax", _ours_jax),
    "jax.check_grads": ("jax", _jax_anchor),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--frameworks",
        nargs="+",
        default=["numpy", "torch", "jax"],
        choices=["numpy", "torch", "jax"],
    )
    args = parser.parse_args(argv)

    if "torch" in args.frameworks:
        import torch

        torch.set_num_threads(1)
    if "jax" in args.frameworks:
        import jax

        jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore")

    tools = {name: fn for name, (fw, fn) in TOOLS.items() if fw in args.frameworks}
    all_cases = [(layer, bug, seed) for seed in args.seeds for layer, bug in cases()]
    caught: dict[str, dict[str, list[int]]] = {t: defaultdict(lambda: [0, 0]) for t in tools}
    alarms: dict[str, list[str]] = {t: [] for t in tools}
    missed: dict[str, list[str]] = {t: [] for t in tools}
    errors: dict[str, list[str]] = {t: [] for t in tools}
    seconds: dict[str, float] = dict.fromkeys(tools, 0.0)
    n_correct = sum(1 for _, bug, _ in all_cases if bug is None)

    for tool, fn in tools.items():
        start = time.perf_counter()
        for layer, bug, seed in all_cases:
            label = f"{layer.name}/{bug or 'correct'}/s{seed}"
            try:
                outcome = fn(layer, bug, seed)
            except Exception as exc:  # an anchor that raises has not given a verdict
                errors[tool].append(
                    f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                )
                outcome = None
            if bug is None:
                if outcome is not True:
                    alarms[tool].append(label + ("" if outcome is False else " (error)"))
                continue
            row = caught[tool][bug]
            row[1] += 1
            if outcome is True:
                missed[tool].append(label)
            else:  # failed, or raised: either way the mistake did not get through
                row[0] += 1
        seconds[tool] = time.perf_counter() - start
        print(f"# {tool}: {seconds[tool]:.1f} s", file=sys.stderr, flush=True)

    names = list(tools)
    kinds = sorted({k for t in names for k in caught[t]})
    width = max(len(k) for k in [*kinds, "false alarms (correct layers)"]) + 2
    col = max(len(n) for n in names) + 2
    print(f"zoo: {len(LAYERS)} layers, seeds {args.seeds}; cells: caught / planted")
    print("mutant".ljust(width) + "".join(n.rjust(col) for n in names))
    for kind in kinds:
        cells = []
        for t in names:
            hit, total = caught[t].get(kind, [0, 0])
            cells.append(f"{hit}/{total}".rjust(col))
        print(kind.ljust(width) + "".join(cells))
    total_row = []
    for t in names:
        hit = sum(v[0] for v in caught[t].values())
        total = sum(v[1] for v in caught[t].values())
        total_row.append(f"{hit}/{total}".rjust(col))
    print("all mutants".ljust(width) + "".join(total_row))
    print(
        "false alarms (correct layers)".ljust(width)
        + "".join(f"{len(alarms[t])}/{n_correct}".rjust(col) for t in names)
    )
    print("seconds".ljust(width) + "".join(f"{seconds[t]:.1f}".rjust(col) for t in names))
    for t in names:
        if missed[t]:
            print(f"\n{t} missed {len(missed[t])}: " + ", ".join(missed[t]))
        if alarms[t]:
            print(f"\n{t} false alarms {len(alarms[t])}: " + ", ".join(alarms[t]))
        if errors[t]:
            print(f"\n{t} raised (counted as failing) {len(errors[t])}:")
            for line in errors[t]:
                print("  " + line)


if __name__ == "__main__":
    main()
