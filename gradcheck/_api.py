"""``check_gradients`` / ``assert_gradients``: pick an adapter, build the problem, run the core."""

from __future__ import annotations

import time
from typing import Any

from ._check import run_check
from ._dispatch import select_adapter
from ._options import CheckOptions, Mode, Wrt, check_wrt
from ._problem import check_container
from ._report import Report


def check_gradients(
    model: Any,
    x: Any = None,
    y: Any = None,
    *,
    loss: Any = None,
    wrt: Wrt = "all",
    mode: Mode = "auto",
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_evals: int | None = None,
) -> Report:
    """Check a model's analytical gradients against numerical derivatives.

    Args:
        model: a ``torch.nn.Module``; a JAX ``(apply_fn, params)`` pair, an
            Equinox module or a Flax module with its variables; a plain function of
            torch tensors or of JAX arrays (routed by the arrays in ``x``); or a NumPy
            model with ``params``, ``forward(x)``, ``backward(dout)`` and ``grads`` (see
            the NumPy guide).
        x: the input (an array, or a tuple/dict of arrays). Float inputs are
            checked too unless ``wrt="params"``, as blocks ``input``,
            ``input[1]``, ``input['key']``; integer inputs pass through. A torch
            model receives a tuple as positional and a dict as keyword arguments
            (wrap a dict meant as one argument: ``x=(d,)``); NumPy and JAX models
            receive the container as their one input.
        y: the target. ``None`` reduces the output to ``sum(out * r)`` with a
            fixed random ``r``, which checks the whole vector-Jacobian product.
        loss: a callable ``loss(out, y)``, a name (``"mse"``, ``"cross_entropy"``,
            ``"categorical_crossentropy"``, ``"bce"``, ``"bce_with_logits"``), or for
            NumPy a ``(loss, loss_grad)`` pair. Default: ``"mse"`` when ``y`` is given.
        wrt: check ``"all"`` blocks, only ``"params"`` or only ``"inputs"``.
        mode: ``"full"`` compares every entry (about 2 evaluations each);
            ``"fast"`` probes a random direction across all blocks at a cost
            independent of the size (per block only where it disagrees), then
            localises wrong entries; ``"auto"`` (default) runs full
            up to 20,000 entries and fast above. The report says which ran.
        seed: seeds every random choice (directions, the output projection, the
            RNG reset before each evaluation); the same seed gives the same report.
        rtol, atol: override the defaults of `gradcheck.TOLERANCES` for the
            precision the model is evaluated in. ``atol`` is relative to the largest
            gradient of each block.
        max_evals: a cap on loss evaluations; a check that reaches it fails and
            says so rather than passing.

    Returns:
        A `Report`; ``report.passed`` is the verdict and ``str(report)`` the
        readable message. Call `assert_gradients` to raise instead.

    When a check cannot be trusted:
        Models are evaluated on a float64 copy where the adapter can make one. A
        model that only runs in float32 is checked in float32 with looser
        tolerances (``TOLERANCES["float32"]``), and the report says so; small
        relative errors (around 1e-3) are then invisible. At points where the loss
        is not differentiable (ReLU at 0, ties in a max), one-sided derivatives
        disagree; the entry is accepted when the analytic value lies between
        them and listed as a kink. Where several kinks coincide (a
        zero-initialised ReLU layer), the convention a backward uses at the kink
        (``relu'(0) = 0``) can lie outside; the entry is then accepted when the
        analytic gradient just off the kink, on either side, matches the
        one-sided derivatives. A forward pass that stays random after the RNG is
        reset before every evaluation makes the check inconclusive (it fails).
    """
    started = time.perf_counter()  # the report's time covers the adapter's set-up too
    options = CheckOptions(mode=mode, seed=seed, rtol=rtol, atol=atol, max_evals=max_evals)
    check_container(x, "x")
    check_container(y, "y")
    adapter = select_adapter(model, x)
    problem = adapter.build_problem(model, x, y, loss=loss, wrt=check_wrt(wrt), seed=seed)
    return run_check(problem, options, started)


def assert_gradients(model: Any, x: Any = None, y: Any = None, **options: Any) -> Report:
    """`check_gradients`, raising `GradientCheckError` unless the check passes."""
    return check_gradients(model, x, y, **options).raise_if_failed()
