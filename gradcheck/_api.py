"""``check_gradients`` / ``assert_gradients``: pick an adapter, build the problem, run the core."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ._check import run_check
from ._dispatch import select_adapter
from ._options import CheckOptions, Mode, Wrt, check_wrt
from ._problem import check_container
from ._report import Report
from ._select import adapter_wrt, select_blocks


def check_gradients(
    model: Any,
    x: Any = None,
    y: Any = None,
    *,
    loss: Any = None,
    wrt: Wrt | str | Sequence[str] = "all",
    mode: Mode = "auto",
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_evals: int | None = None,
    nondet_tol: float | None = None,
) -> Report:
    """Check a model's analytical gradients against numerical derivatives.

    Args:
        model: a ``torch.nn.Module``; a JAX ``(apply_fn, params)`` pair, an
            Equinox module or a Flax module with its variables; a plain function of
            torch tensors or of JAX arrays (routed by the arrays in ``x``); or a NumPy
            model: an object with ``params``, ``forward(x)``, ``backward(dout)`` and
            ``grads`` (or numpy-ml's ``parameters``/``gradients``), a cs231n-style model
            with ``loss(X, y) -> (loss, grads)``, a ``(forward, backward)`` pair of layer
            functions, or a loss function returning ``(loss, dx)`` (see the NumPy guide).
        x: the input (an array, or a tuple/dict of arrays). Float inputs are
            checked too unless ``wrt="params"``, as blocks ``input``,
            ``input[1]``, ``input['key']``; integer inputs pass through. A torch
            model receives a tuple as positional and a dict as keyword arguments
            (wrap a dict meant as one argument: ``x=(d,)``). A NumPy model receives a
            tuple as positional arguments when its ``forward`` takes several (a
            layer-function pair always does); JAX models receive the container as
            their one input.
        y: the target. ``None`` reduces the output to ``sum(out * r)`` with a
            fixed random ``r``, which checks the whole vector-Jacobian product.
        loss: a callable ``loss(out, y)``, a name (``"mse"``, ``"half_sse"``,
            ``"cross_entropy"``, ``"categorical_crossentropy"``, ``"bce"``,
            ``"bce_with_logits"``; the formulas are in the API reference, "Named
            losses"), or for NumPy a ``(loss, loss_grad)`` pair. Default: ``"mse"`` when
            ``y`` is given.
        wrt: check ``"all"`` blocks, only ``"params"`` or only ``"inputs"``; or the
            blocks named (``"fc1.weight"``), or matching a pattern (``"*.bias"``,
            ``"layers.0.*"``), or a list of any of these. The blocks left out keep
            their values, and the report names them. A name that matches no block is an
            error listing the blocks.
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
        nondet_tol: the backward is called twice at the starting point, and the
            two gradients may differ by this much, relative to each block's largest
            gradient (atomics in a GPU kernel make a backward vary a little). Not
            given: checked in full mode only (one gradient more than its 2 evaluations
            an entry), within the block's ``atol`` floor; given (0 for bit for bit):
            checked in every mode. A block over it fails as not deterministic.

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
    options = CheckOptions(
        mode=mode, seed=seed, rtol=rtol, atol=atol, max_evals=max_evals, nondet_tol=nondet_tol
    )
    check_container(x, "x")
    check_container(y, "y")
    blocks = check_wrt(wrt)
    adapter = select_adapter(model, x)
    problem = adapter.build_problem(model, x, y, loss=loss, wrt=adapter_wrt(blocks), seed=seed)
    return run_check(select_blocks(problem, blocks), options, started)


def assert_gradients(model: Any, x: Any = None, y: Any = None, **options: Any) -> Report:
    """`check_gradients`, raising `GradientCheckError` unless the check passes."""
    return check_gradients(model, x, y, **options).raise_if_failed()
