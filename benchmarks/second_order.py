"""Second order (issue 17): our check of ``H u`` against ``torch.autograd.gradgradcheck``.

On a tanh MLP ``[d, h, h, 10]`` (MSE, batch 64, float64, one thread) whose hidden layer is a
custom ``autograd.Function`` (``PlantedLinear``) whose backward is itself a custom Function
(``PlantedLinearGrad``) with a hand-written backward, in one run:

* T_fb: one forward+backward of the model (median), the unit of the costs at 1e6;
* at ~1e3 and ~1e4 parameters: the wall time of ``torch.autograd.gradgradcheck`` on the
  parameters as inputs (``torch.func.functional_call``) against our full second-order check
  (``check_gradients(..., mode="full", order=2)``): its "second order" section alone, and the
  whole call (first order included). Median over ``--repeats`` calls (gradgradcheck at 1e4:
  once). What each checks differs: gradgradcheck compares the whole Hessian (and the
  derivative with respect to the upstream gradient) with finite differences of the backward;
  we compare every entry of one Hessian-vector product ``H u`` with finite differences of
  ``u . g`` (``u`` fixed random), as issue 17 specifies;
* at ~1e6: our fast second-order check in T_fb (the section and the whole call), on the
  correct model (a false alarm counts) and with one entry of the double backward's weight
  term off by 1% (``PlantedLinearGrad``'s ``d_W[index] *= 1.01``, a random index per
  planting): how often the "second order" section fails in the planted block.

Run: python benchmarks/second_order.py [--sizes 1e3,1e4] [--big 1e6] [--plantings 5]
     [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scale import median_time, torch_linear_layers, widths  # (benchmarks/ is the script's folder)

from gradcheck import check_gradients

BATCH = 64
SETTLE = 0.15  # seconds of forward+backward calls before T_fb is measured


class Planted:
    """Where the double backward's bug is: ``index`` into the hidden weight, ``factor``."""

    index: tuple[int, int] = (0, 0)
    factor: float = 1.0


class PlantedLinearGrad(torch.autograd.Function):
    """``(g, x, W) -> (g @ W, g.T @ x, g.sum(0))``, with a hand-written backward whose
    weight term ``d_W = g.T @ ggx`` is multiplied by ``Planted.factor`` at ``Planted.index``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> Any:
        return g @ w, g.T @ x, g.sum(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(*inputs)
        ctx.index, ctx.factor = Planted.index, Planted.factor

    @staticmethod
    def backward(ctx: Any, ggx: torch.Tensor, ggw: torch.Tensor, ggb: torch.Tensor) -> Any:
        g, x, w = ctx.saved_tensors
        d_g = ggx @ w.T + x @ ggw.T + ggb
        d_x = g @ ggw
        d_w = g.T @ ggx
        if ctx.factor != 1.0:
            scale = torch.ones_like(d_w)
            scale[ctx.index] = ctx.factor
            d_w = d_w * scale
        return d_g, d_x, d_w


class PlantedLinear(torch.autograd.Function):
    """``x @ W.T + b`` whose backward is `PlantedLinearGrad`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x @ w.T + b

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, w = ctx.saved_tensors
        gx, gw, gb = PlantedLinearGrad.apply(g, x, w)
        return gx, gw, gb


class Net(torch.nn.Module):
    def __init__(self, sizes: list[int], seed: int) -> None:
        super().__init__()
        self.layers = torch_linear_layers(sizes, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.layers):
            # the hidden layer: the custom Functions
            x = PlantedLinear.apply(x, lin.weight, lin.bias) if i == 1 else lin(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def setup(p: float, seed: int) -> dict[str, Any]:
    sizes = widths(p)
    net = Net(sizes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randn(BATCH, sizes[-1], generator=gen, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]

    def fb() -> None:
        net.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()

    def anchor() -> bool:
        params = tuple(q.detach().clone().requires_grad_(True) for q in net.parameters())

        def f(*ps: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))
            return torch.nn.functional.mse_loss(out, y)

        return bool(torch.autograd.gradgradcheck(f, params, raise_exception=False))

    def ours(mode: str) -> Any:
        return check_gradients(net, x, y, loss="mse", wrt="params", mode=mode, order=2)

    return {
        "fb": fb,
        "anchor": anchor,
        "ours": ours,
        "params": sum(q.numel() for q in net.parameters()),
        "hidden": tuple(net.layers[1].weight.shape),
        "hidden_name": "layers.1.weight",
        "sizes": sizes,
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def t_fb(env: dict[str, Any]) -> float:
    """T_fb measured now, after ``SETTLE`` seconds of forward+backward calls."""
    median_time(env["fb"], repeat=1, min_time=SETTLE)
    return median_time(env["fb"], repeat=3)


def compare(p: float, repeats: int, seed: int) -> dict[str, Any]:
    """Full second order against gradgradcheck: median wall times (seconds) and ratios."""
    env = setup(p, seed)
    Planted.index, Planted.factor = (0, 0), 1.0
    env["ours"]("full")  # warm (vmap probes)
    ours_section, ours_total, anchor = [], [], []
    anchor_repeats = repeats if env["params"] <= 2_000 else 1
    passed_ours = passed_anchor = True
    for i in range(repeats):
        dt, report = timed(lambda: env["ours"]("full"))
        ours_total.append(dt)
        ours_section.append(report.section("second order").elapsed)
        passed_ours &= report.passed
        if i < anchor_repeats:
            dt, ok = timed(env["anchor"])
            anchor.append(dt)
            passed_anchor &= ok
    row = {
        "P": env["params"],
        "sizes": env["sizes"],
        "gradgradcheck_s": statistics.median(anchor),
        "ours_second_order_s": statistics.median(ours_section),
        "ours_whole_call_s": statistics.median(ours_total),
        "ours_passed": passed_ours,
        "gradgradcheck_passed": passed_anchor,
    }
    row["ratio_section"] = row["gradgradcheck_s"] / row["ours_second_order_s"]
    row["ratio_whole_call"] = row["gradgradcheck_s"] / row["ours_whole_call_s"]
    return row


def big(p: float, plantings: int, seed: int) -> dict[str, Any]:
    """Fast second order at ~1e6: cost in T_fb, false alarms, detection of a 1% entry."""
    env = setup(p, seed)
    rng = np.random.default_rng(seed)
    Planted.index, Planted.factor = (0, 0), 1.0
    env["ours"]("fast")  # warm
    unit = t_fb(env)
    dt, report = timed(lambda: env["ours"]("fast"))
    section = report.section("second order")
    row: dict[str, Any] = {
        "P": env["params"],
        "sizes": env["sizes"],
        "T_fb_ms": 1e3 * unit,
        "correct_passed": bool(report.passed),
        "correct_second_order_T_fb": section.elapsed / unit,
        "correct_whole_call_T_fb": dt / unit,
    }
    caught, costs, whole = 0, [], []
    for _ in range(plantings):
        Planted.index = tuple(int(rng.integers(0, n)) for n in env["hidden"])
        Planted.factor = 1.01
        unit = t_fb(env)
        dt, report = timed(lambda: env["ours"]("fast"))
        section = report.section("second order")
        failed = {b.name for b in section.failed_blocks}
        caught += failed == {env["hidden_name"]}
        costs.append(section.elapsed / unit)
        whole.append(dt / unit)
    Planted.factor = 1.0
    row["caught"] = f"{caught}/{plantings}"
    row["planted_second_order_T_fb"] = statistics.median(costs) if costs else float("nan")
    row["planted_whole_call_T_fb"] = statistics.median(whole) if whole else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4")
    parser.add_argument("--big", default="1e6", help="'' to skip")
    parser.add_argument("--plantings", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for p in [float(s) for s in args.sizes.split(",") if s]:
        row = compare(p, args.repeats, args.seed)
        print(
            f"P={row['P']:>7,} {row['sizes']}: gradgradcheck {row['gradgradcheck_s']:.3f}s "
            f"(passed={row['gradgradcheck_passed']}); ours full second order "
            f"{row['ours_second_order_s']:.3f}s, whole call {row['ours_whole_call_s']:.3f}s "
            f"(passed={row['ours_passed']}); ratio {row['ratio_section']:.1f}x "
            f"(whole call {row['ratio_whole_call']:.1f}x)",
            flush=True,
        )
    if args.big:
        row = big(float(args.big), args.plantings, args.seed)
        print(
            f"P={row['P']:>9,} {row['sizes']}: T_fb {row['T_fb_ms']:.1f} ms; correct model "
            f"passed={row['correct_passed']}, fast second order "
            f"{row['correct_second_order_T_fb']:.1f} T_fb (whole call "
            f"{row['correct_whole_call_T_fb']:.1f}); one double-backward entry x1.01 caught "
            f"{row['caught']} in its block, fast second order "
            f"{row['planted_second_order_T_fb']:.1f} T_fb (whole call "
            f"{row['planted_whole_call_T_fb']:.1f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
