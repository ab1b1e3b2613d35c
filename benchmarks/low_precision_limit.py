"""The detection limit of `gradcheck.check_kernel`, measured on the low-precision zoo.

For each correct kernel of ``tests/zoo/low_precision_torch.py``, each precision and each
gradient block: the smallest uniform scale error ``s`` (the block's gradient times ``1 + s``,
rounded to the kernel's precision) that the check catches, found by bisection over the
kernel's measured values (the kernel, the float64 and the low-precision reference are
evaluated once per seed; the rule is applied to the scaled block). Printed beside the limit
the report states for that block (``comparison.limit``). The worst (largest) over the seeds.

Run: ``python benchmarks/low_precision_limit.py [--seeds 3] [--framework torch|jax]`` (the JAX
zoo is bfloat16 only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gradcheck.adapters import _torch_kernels

from gradcheck._reference_check import KernelEvaluation, compare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo.low_precision_torch import KERNELS, case

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _round(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(values).to(dtype).double().numpy()


def smallest_caught(evaluation: KernelEvaluation, block: str, dtype: torch.dtype) -> float:
    """The smallest ``s`` in [0, 1] for which scaling ``block`` by ``1 + s`` fails the check."""
    original = evaluation.kernel[block]

    def fails(s: float) -> bool:
        evaluation.kernel[block] = _round(original * (1.0 + s), dtype)
        try:
            result = {b.name: b for b in compare(evaluation, 2.0)}[block]
        finally:
            evaluation.kernel[block] = original
        return not result.passed

    if not fails(1.0):
        return float("inf")
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fails(mid) else (mid, hi)
    return hi


def _evaluations(framework: str, seeds: int) -> Iterator[tuple[str, str, int, KernelEvaluation]]:
    if framework == "torch":
        for precision, dtype in DTYPES.items():
            for name in KERNELS:
                for seed in range(seeds):
                    c = case(name, dtype, seed)
                    yield (
                        name,
                        precision,
                        seed,
                        _torch_kernels.evaluate(c.kernel, c.reference, c.x, seed=seed),
                    )
        return
    from gradcheck.adapters import _jax_kernels
    from zoo import low_precision_jax as jz

    for name in jz.KERNELS:
        for seed in range(seeds):
            c = jz.case(name, seed)
            yield (
                name,
                "bfloat16",
                seed,
                _jax_kernels.evaluate(c.kernel, c.reference, c.x, seed=seed),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--framework", choices=("torch", "jax"), default="torch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'kernel':<22} {'precision':<9} {'block':<10} {'caught from':>12} {'stated':>8}")
    rows: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for name, precision, _seed, evaluation in _evaluations(args.framework, args.seeds):
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
        worst = rows.setdefault((name, precision), {})
        stated = {b.name: b.comparison for b in compare(evaluation, 2.0)}
        for block, kind, _ in evaluation.blocks:
            if kind == "output":
                continue
            caught = smallest_caught(evaluation, block, dtype)
            limit = stated[block].limit if stated[block] is not None else float("nan")
            old = worst.get(block, (0.0, 0.0))
            worst[block] = (max(old[0], caught), max(old[1], limit))
    for (name, precision), worst in rows.items():
        for block, (caught, limit) in worst.items():
            print(
                f"{name:<22} {precision:<9} {block:<10} {100 * caught:>11.2f}% {100 * limit:>7.2f}%"
            )


if __name__ == "__main__":
    main()
