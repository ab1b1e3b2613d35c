"""Fast and auto mode against the anchors, P = 1e3 ... 1e6 (issue 6).

On a tanh MLP (MSE, batch 64, float64), in one run, for torch and jax:

* T_fb: one forward+backward of the model (median), the unit of every cost;
* cost of torch.autograd.gradcheck (full: measured up to 1e4, estimated above from
  its per-evaluation cost; fast_mode), jax.test_util.check_grads (warm, jit compile
  excluded), and our fast, auto (and full up to 1e4) modes, in T_fb;
* detection of a single wrong entry (x1.01 and x1.5, at a random entry of a hidden
  weight, through a custom backward) over N random plantings per size, and false
  alarms on the correct model (same code path with factor 1);
* the cost of naming the wrong entry: the whole check (fast mode, localisation included)
  and what it adds to the fast check of the correct model, both wall time of
  ``check_gradients`` in T_fb (median over the plantings where the entry was named).

Run: python benchmarks/scale.py [--sizes 1e3,1e4,1e5,1e6 | --widths 32,981,981,4] [--plantings 20]
     [--frameworks torch,jax]
Prints medians and ratios; absolute times on shared machines are noisy, so every timed
call of ours or of the anchors' fast mode is divided by T_fb measured just before it, and
starts after a garbage collection.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gradcheck import check_gradients

BATCH = 64
SETTLE = 0.15  # seconds of forward+backward calls before T_fb is measured (in_tfb)


def widths(p: float) -> list[int]:
    """A 3-layer tanh MLP [d, h, h, 10] with about p parameters."""
    target = int(p)
    for h in range(8, 5000):
        d = max(h // 2, 4)
        if d * h + h + h * h + h + h * 10 + 10 >= target:
            return [d, h, h, 10]
    raise ValueError(p)


def median_time(fn: Callable[[], Any], repeat: int = 7, min_time: float = 0.02) -> float:
    times = []
    for _ in range(repeat):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        times.append(elapsed / n)
    return statistics.median(times)


# ----------------------------------------------------------------------------- torch
def torch_linear_layers(sizes: list[int], seed: int) -> Any:
    """The benchmarks' float64 ``nn.Linear`` layers of an MLP of ``sizes``: weights normal
    over sqrt(fan-in), biases 0.1 normal, from ``seed``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    layers = torch.nn.ModuleList()
    for n_in, n_out in itertools.pairwise(sizes):
        lin = torch.nn.Linear(n_in, n_out, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(
                torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
            )
            lin.bias.copy_(0.1 * torch.randn(n_out, generator=gen, dtype=torch.float64))
        layers.append(lin)
    return layers


def torch_setup(sizes: list[int], seed: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)

    class PlantedLinear(torch.autograd.Function):
        """x @ W.T + b whose weight gradient is multiplied by ``factor`` at ``index``."""

        @staticmethod
        def forward(ctx, x, w, b, index, factor):
            ctx.save_for_backward(x, w)
            ctx.index, ctx.factor = index, factor
            return x @ w.T + b

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            gw = g.T @ x
            if ctx.factor != 1.0:
                gw = gw.clone()
                gw[ctx.index] *= ctx.factor
            return g @ w, gw, g.sum(0), None, None

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch_linear_layers(sizes, seed)
            self.index = (0, 0)
            self.factor = 1.0

        def forward(self, x):
            for i, lin in enumerate(self.layers):
                if i == 1:  # the hidden weight carries the planted bug
                    x = PlantedLinear.apply(x, lin.weight, lin.bias, self.index, self.factor)
                else:
                    x = lin(x)
                if i < len(self.layers) - 1:
                    x = torch.tanh(x)
            return x

    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randn(BATCH, sizes[-1], generator=gen, dtype=torch.float64)
    net = Net()

    def fb() -> None:
        net.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()

    names = [n for n, _ in net.named_parameters()]

    def anchor(fast: bool) -> bool:
        params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())

        def f(*ps):
            out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))
            return torch.nn.functional.mse_loss(out, y)

        return bool(torch.autograd.gradcheck(f, params, fast_mode=fast, raise_exception=False))

    hidden = net.layers[1].weight.shape

    def plant(index: tuple[int, int], factor: float) -> None:
        net.index, net.factor = index, factor

    def ours(mode: str):
        return check_gradients(net, x, y, loss="mse", wrt="params", mode=mode)

    def one_eval() -> None:
        with torch.no_grad():
            torch.nn.functional.mse_loss(net(x), y)

    return {
        "fb": fb,
        "anchor": anchor,
        "plant": plant,
        "ours": ours,
        "hidden": hidden,
        "one_eval": one_eval,
        "hidden_name": "layers.1.weight",
        "params": sum(p.numel() for p in net.parameters()),
    }


# ----------------------------------------------------------------------------- jax
def jax_setup(sizes: list[int], seed: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax.test_util import check_grads

    jax.config.update("jax_enable_x64", True)  # the benchmark's own process: the anchor needs it

    state = {"index": (0, 0), "factor": 1.0}

    def make_linear(index, factor):
        @jax.custom_vjp
        def linear(x, w, b):
            return x @ w.T + b

        def fwd(x, w, b):
            return linear(x, w, b), (x, w)

        def bwd(res, g):
            x, w = res
            gw = g.T @ x
            gw = gw.at[index].multiply(factor)
            return g @ w, gw, g.sum(0)

        linear.defvjp(fwd, bwd)
        return linear

    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        params[f"l{i}"] = {
            "w": jnp.asarray(rng.normal(size=(n_out, n_in)) / n_in**0.5),
            "b": jnp.asarray(0.1 * rng.normal(size=n_out)),
        }
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(BATCH, sizes[0])))
    y = jnp.asarray(np.random.default_rng(seed + 2).normal(size=(BATCH, sizes[-1])))
    cache: dict[tuple, Callable] = {}

    def apply_fn_for(index, factor):
        key = (index, factor)
        if key not in cache:
            linear = make_linear(index, factor)

            def apply_fn(p, x):
                h = x
                n = len(p)
                for i in range(n):
                    layer = p[f"l{i}"]
                    h = (
                        linear(h, layer["w"], layer["b"])
                        if i == 1
                        else h @ layer["w"].T + layer["b"]
                    )
                    if i < n - 1:
                        h = jnp.tanh(h)
                return h

            cache.clear()
            cache[key] = apply_fn
        return cache[key]

    def current():
        return apply_fn_for(state["index"], state["factor"])

    vg = {}

    def fb() -> None:
        key = (state["index"], state["factor"])
        if key not in vg:
            vg.clear()
            f = current()
            vg[key] = jax.jit(jax.value_and_grad(lambda p: jnp.mean((f(p, x) - y) ** 2)))
        jax.block_until_ready(vg[key](params))

    jitted: dict[tuple, Callable] = {}

    def anchor(fast: bool) -> bool:
        key = (state["index"], state["factor"])
        if key not in jitted:  # one compile per planting: later calls are warm
            jitted.clear()
            f = current()
            jitted[key] = jax.jit(lambda p: jnp.mean((f(p, x) - y) ** 2))
        loss = jitted[key]
        try:
            check_grads(loss, (params,), order=1, modes=("rev",))
            return True
        except AssertionError:
            return False

    def plant(index, factor) -> None:
        state["index"], state["factor"] = index, factor

    def ours(mode: str):
        return check_gradients((current(), params), x, y, loss="mse", wrt="params", mode=mode)

    ev = {}

    def one_eval() -> None:
        key = (state["index"], state["factor"])
        if key not in ev:
            ev.clear()
            f = current()
            ev[key] = jax.jit(lambda p: jnp.mean((f(p, x) - y) ** 2))
        jax.block_until_ready(ev[key](params))

    hidden = (sizes[2], sizes[1])
    return {
        "fb": fb,
        "anchor": anchor,
        "plant": plant,
        "ours": ours,
        "hidden": hidden,
        "one_eval": one_eval,
        "hidden_name": "l1/w",
        "params": sum(int(np.prod(v.shape)) for layer in params.values() for v in layer.values()),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call of ``fn``, and its result. Garbage left by earlier calls is
    collected first: a collection of the whole heap (tens of ms with torch and jax loaded)
    otherwise falls, by the rhythm of allocations, on the same one of the modes timed in turn.
    """
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def in_tfb(env: dict[str, Any], fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median over ``repeats`` calls of ``fn``'s wall time in T_fb, each call against T_fb
    measured just before it (the machine's load drifts); with ``fn``'s last result.

    T_fb is measured only after ``SETTLE`` seconds of forward+backward calls: after a check
    of ours, a jitted JAX forward+backward runs up to twice as slow for its next ten or so
    calls (torch's does not), and a unit measured in that window flattered every ratio.
    """
    ratios, out = [], None
    for _ in range(repeats):
        median_time(env["fb"], repeat=1, min_time=SETTLE)
        local_fb = median_time(env["fb"], repeat=3)
        dt, out = timed(fn)
        ratios.append(dt / local_fb)
    return statistics.median(ratios), out


def run(
    framework: str, p: float, plantings: int, seed: int, sizes: list[int] | None = None
) -> dict[str, Any]:
    sizes = sizes or widths(p)
    env = torch_setup(sizes, seed) if framework == "torch" else jax_setup(sizes, seed)
    env["plant"]((0, 0), 1.0)
    env["fb"]()
    t_fb = median_time(env["fb"])
    row: dict[str, Any] = {"framework": framework, "P": env["params"], "T_fb_ms": 1e3 * t_fb}
    # correct model: ours, the modes interleaved so that a drift of the machine's load
    # does not fall on one of them
    modes = ("fast", "auto") + (("full",) if env["params"] <= 20_000 else ())
    for mode in modes:
        env["ours"](mode)  # warm (jit compiles, vmap probes)
    ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(7):
        for mode in modes:
            ratio, rep = in_tfb(env, lambda mode=mode: env["ours"](mode), 1)
            ratios[mode].append(ratio)
            row[f"ours_{mode}_evals"] = rep.evaluations
            alarm = row.get(f"ours_{mode}_false_alarm", False)
            row[f"ours_{mode}_false_alarm"] = alarm or not rep.passed
    for mode in modes:
        row[f"ours_{mode}_Tfb"] = statistics.median(ratios[mode])
    # anchors on the correct model
    if framework == "torch":
        env["anchor"](True)  # warm (torch's first gradcheck call pays its own set-up)
        row["anchor_fast_Tfb"], ok = in_tfb(env, lambda: env["anchor"](True), 3)
        row["anchor_fast_false_alarm"] = not ok
        if env["params"] <= 20_000:
            dt, ok = timed(lambda: env["anchor"](False))
            row["anchor_full_Tfb"] = dt / t_fb
        else:
            per_eval = median_time(env["one_eval"])
            row["anchor_full_Tfb"] = f"~{2 * env['params'] * per_eval / t_fb:.2g} (est.)"
    else:
        env["anchor"](True)  # compile
        row["anchor_warm_Tfb"], ok = in_tfb(env, lambda: env["anchor"](True), 3)
        row["anchor_false_alarm"] = not ok
    # plantings
    rng = np.random.default_rng(seed)
    for factor in (1.01, 1.5):
        caught = {"ours_fast": 0, "ours_auto": 0, "named": 0, "anchor": 0}
        loc_costs = []
        for _ in range(plantings):
            index = tuple(int(rng.integers(0, s)) for s in env["hidden"])
            env["plant"](index, factor)
            cost, rep = in_tfb(env, lambda: env["ours"]("fast"), 1)
            caught["ours_fast"] += not rep.passed
            block = rep.block(env["hidden_name"])
            if block.worst and block.worst[0].index == index:
                caught["named"] += 1
                loc_costs.append(cost)
            caught["ours_auto"] += not env["ours"]("auto").passed
            caught["anchor"] += not env["anchor"](True)
        env["plant"]((0, 0), 1.0)
        for k, v in caught.items():
            row[f"x{factor}_{k}"] = f"{v}/{plantings}"
        if loc_costs:
            row[f"x{factor}_fast+localise_Tfb"] = statistics.median(loc_costs)
            row[f"x{factor}_localise_extra_Tfb"] = (
                statistics.median(loc_costs) - row["ours_fast_Tfb"]
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    parser.add_argument("--plantings", type=int, default=20)
    parser.add_argument("--frameworks", default="torch,jax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--widths",
        default=None,
        help="layer widths of one MLP, e.g. 32,981,981,4 (instead of --sizes)",
    )
    args = parser.parse_args()
    shapes: list[tuple[float, list[int] | None]] = [(float(p), None) for p in args.sizes.split(",")]
    if args.widths:
        shapes = [(0.0, [int(w) for w in args.widths.split(",")])]
    for framework in args.frameworks.split(","):
        for p, sizes in shapes:
            row = run(framework, p, args.plantings, args.seed, sizes)
            print(
                " | ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
