"""``check_gradients`` / ``assert_gradients``: pick an adapter, build the problem, run the core;
``check_flat``: the core on plain functions of a flat vector, or on a `FlatProblem`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from _gradcheck_options import OPTIONS

from ._contracts import run_contracts
from ._dispatch import select_adapter
from ._options import CheckOptions, Mode, Wrt, check_wrt
from ._problem import Block, FlatProblem, check_container
from ._report import Report
from ._select import adapter_wrt, select_blocks
from .errors import InvalidOptionError, ModelError, ShapeMismatchError


def _check_options(given: dict[str, Any]) -> CheckOptions:
    """The `CheckOptions` of a call whose keywords are the options of `OPTIONS` (``wrt``
    aside, which selects blocks): ``given`` is the call's ``locals()``."""
    return CheckOptions(**{o.name: given[o.name] for o in OPTIONS if o.name != "wrt"})


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
    order: int = 1,
    forward: bool = False,
    batched: bool = False,
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
            ``input[1]``, ``input['key']``; integer inputs pass through. Every
            adapter passes ``x`` by one rule: a tuple is spread over the call's
            positional parameters when it requires two or more or takes ``*args``
            (``forward(q, k, v)``, a layer-function pair), else it is the one argument
            (``forward(inputs)``, ``apply_fn(params, x)``); a tuple of one item always
            spreads; a dict is keyword arguments when its keys name the call's
            parameters, else the one argument (``x={"x": x, "mask": m}`` fills an
            optional ``mask``).
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
        order: ``1`` checks the gradient; ``2`` also the second derivative, for
            gradient penalties, MAML or Hessian-vector products: the gradient of
            ``u . g`` (``g`` the model's gradient, ``u`` a fixed random vector) by
            differentiating the backward, against numerical derivatives of ``u . g``,
            in the same mode. A backward that cannot be differentiated
            (``once_differentiable``) fails this section. torch and JAX models.
        forward: also check forward mode (torch ``Function.jvp`` and built-in
            forward-mode rules, JAX ``jax.jvp`` through ``custom_jvp``): in full mode
            against the same numerical derivatives, entry by entry; in fast mode
            along a random direction of each block, against reverse mode. A model
            without a forward-mode rule (a ``custom_vjp``, a Function without
            ``jvp``) gets a section "not checked", which does not fail the check.
        batched: also check the backward under vmap (a Function's
            ``generate_vmap_rule``/``vmap``, JAX's batching of a ``custom_vjp``):
            the gradients at three nearby points in one vmapped call must equal
            those at each point alone. A model that cannot be vmapped: "not checked".

    Returns:
        A `Report`; ``report.passed`` is the verdict and ``str(report)`` the
        readable message. Call `assert_gradients` to raise instead. With ``order=2``,
        ``forward`` or ``batched``, ``report.sections`` holds a report per extra
        contract (``report.section("second order")``), and the check passes only when
        every section does.

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
    options = _check_options(locals())
    check_container(x, "x")
    check_container(y, "y")
    blocks = check_wrt(wrt)
    adapter = select_adapter(model, x)
    problem = adapter.build_problem(model, x, y, loss=loss, wrt=adapter_wrt(blocks), seed=seed)
    return run_contracts(select_blocks(problem, blocks), options, started)


def assert_gradients(model: Any, x: Any = None, y: Any = None, **options: Any) -> Report:
    """`check_gradients`, raising `GradientCheckError` unless the check passes."""
    return check_gradients(model, x, y, **options).raise_if_failed()


def check_flat(
    loss: Callable[[np.ndarray], float] | FlatProblem,
    gradient: Callable[[np.ndarray], np.ndarray] | None = None,
    theta0: np.ndarray | Sequence[float] | None = None,
    *,
    blocks: Sequence[Block] | None = None,
    loss_batch: Callable[[np.ndarray], np.ndarray] | None = None,
    mode: Mode = "auto",
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    max_evals: int | None = None,
    nondet_tol: float | None = None,
    order: int = 1,
    forward: bool = False,
    batched: bool = False,
) -> Report:
    """Check ``gradient`` against numerical derivatives of ``loss`` at ``theta0``.

    The core on plain functions: ``loss(theta) -> float`` and
    ``gradient(theta) -> array`` of ``theta``'s shape. ``theta0`` may have any
    shape; it is checked as one block called ``theta`` unless ``blocks`` name
    slices of its flattened form. The functions receive read-only arrays (the
    checker reuses them between calls); copy one to change it.

    ``check_flat(problem)`` checks a `FlatProblem` built by hand (or by an adapter of
    your own: see "Adding an adapter" in the docs) as it is; ``order=2``, ``forward`` and
    ``batched`` check the contracts whose hooks it has (`check_gradients`).

    Example:
        >>> import numpy as np
        >>> from gradcheck import check_flat
        >>> report = check_flat(lambda t: float(np.sum(t**3)), lambda t: 3 * t**2, np.arange(4.0))
        >>> report.passed
        True
        >>> check_flat(lambda t: float(np.sum(t**3)), lambda t: 2 * t**2, np.arange(4.0)).passed
        False
    """
    opts = _check_options(locals())
    if isinstance(loss, FlatProblem):
        given = {"gradient": gradient, "theta0": theta0, "blocks": blocks}
        extra = [name for name, value in given.items() if value is not None]
        if extra or loss_batch is not None:
            raise InvalidOptionError(
                "check_flat(problem) takes the FlatProblem alone (it holds its own gradient, "
                f"theta0, blocks and loss_batch); got also {', '.join(extra) or 'loss_batch'}"
            )
        return run_contracts(loss, opts)
    if gradient is None or theta0 is None:
        raise InvalidOptionError(
            "check_flat needs loss, gradient and theta0 (or a FlatProblem alone)"
        )
    start = np.asarray(theta0)
    if start.dtype == object or not (
        np.issubdtype(start.dtype, np.floating) or np.issubdtype(start.dtype, np.integer)
    ):
        raise ShapeMismatchError(f"theta0 must be a real array; got dtype {start.dtype}")
    shape = start.shape
    flat0 = start.reshape(-1).astype(np.float64)  # a fresh copy, which the problem keeps
    flat0.setflags(write=False)

    def flat_loss(theta: np.ndarray) -> float:
        value = loss(_read_only(theta.reshape(shape)))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ModelError(f"loss must return a scalar; got {type(value).__name__}") from None

    def flat_gradient(theta: np.ndarray) -> np.ndarray:
        value = gradient(_read_only(theta.reshape(shape)))
        if value is None:
            raise ModelError(f"gradient returned None; expected an array of shape {shape}")
        grad = np.asarray(value, dtype=np.float64)
        if grad.shape != shape:
            raise ShapeMismatchError(f"gradient returned shape {grad.shape}; expected {shape}")
        return grad.reshape(-1)

    batch = None
    if loss_batch is not None:
        user_batch = loss_batch

        def batch(thetas: np.ndarray) -> np.ndarray:
            return np.asarray(
                user_batch(_read_only(thetas.reshape((-1, *shape)))), dtype=np.float64
            )

    layout = tuple(blocks) if blocks is not None else (Block("theta", tuple(shape), 0),)
    problem = FlatProblem(
        theta0=flat0,
        loss=flat_loss,
        gradient=flat_gradient,
        blocks=layout,
        loss_batch=batch,
        batching="batched" if batch is not None else "loop",
    )
    return run_contracts(problem, opts)


def _read_only(view: np.ndarray) -> np.ndarray:
    """``view`` marked read-only: the checker's points are not the user's to change."""
    view = view.view()
    view.flags.writeable = False
    return view
