"""Agreement suite: JAX's own derivatives of jax.numpy, jax.nn and jax.lax functions pass the check,
and the same functions behind a ``custom_vjp`` with a perturbed backward are caught.

Every function runs as one model with three copies of its input (three blocks per argument):

- ``input[0]``: the function as JAX differentiates it: must pass;
- ``input[1]``: a ``custom_vjp`` whose backward flips the sign of every cotangent: must fail;
- ``input[2]``: a ``custom_vjp`` whose backward multiplies one entry of the first argument's
  cotangent by 1.001 (the smallest entry at least 1% of the largest, so the bug matters):
  must fail in that block only, with exactly that entry named.

The three copies touch disjoint outputs, so each block's verdict is that of its variant
alone; sharing one model per function keeps the compile count (the cost on a CPU) low.
Inputs are random but kept away from kinks and singularities.

Beyond first order (``order=2``, ``forward=True``), every function is also checked against
``jax.test_util.check_grads(order=2, modes=("fwd", "rev"))``: both pass JAX's own
derivatives, and both reject the function behind a ``custom_vjp`` whose backward is exact in
value but wrong in its own derivative (`with_second_order_bug`), with the exceptions listed
in `CONTRACT_DISAGREEMENTS`, each with its reason.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
lax = pytest.importorskip("jax.lax")

from jax.test_util import check_grads  # noqa: E402

from gradcheck import Report, check_gradients  # noqa: E402

Maker = Callable[[np.random.Generator], tuple[np.ndarray, ...]]


def normal(*shape: int) -> Maker:
    return lambda rng: (rng.normal(size=shape),)


def uniform(lo: float, hi: float, *shape: int) -> Maker:
    return lambda rng: (rng.uniform(lo, hi, size=shape),)


def away_from_zero(*shape: int) -> Maker:
    return lambda rng: (rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.3, 2.0, size=shape),)


def pair(a: Maker, b: Maker) -> Maker:
    return lambda rng: (*a(rng), *b(rng))


def spd(x: Any) -> Any:
    """A well-conditioned symmetric positive definite matrix built from ``x``."""
    return x @ x.T + x.shape[0] * jnp.eye(x.shape[0])


def conv(x: Any, w: Any) -> Any:
    return lax.conv_general_dilated(x, w, window_strides=(1,), padding="SAME")


def scan_product(x: Any) -> Any:
    def step(carry: Any, v: Any) -> Any:
        carry = carry * jnp.tanh(v) + v
        return carry, carry

    return lax.scan(step, jnp.zeros(x.shape[1:]), x)[1]


def fori_power(x: Any) -> Any:
    return lax.fori_loop(0, 3, lambda i, v: jnp.sin(v) * x + 0.1 * i, x)


def cond_branch(x: Any) -> Any:
    return lax.cond(jnp.sum(x) > 0, jnp.sin, jnp.cos, x) + lax.cond(
        jnp.sum(x) <= 0, jnp.sin, jnp.exp, x
    )


def sum_pool(x: Any) -> Any:
    return lax.reduce_window(x, 0.0, lax.add, (2, 2), (1, 1), "VALID")


# (name, function, input maker); every function returns one array
FUNCTIONS: list[tuple[str, Callable[..., Any], Maker]] = [
    # jax.numpy: elementwise
    ("jnp.sin", jnp.sin, normal(3, 4)),
    ("jnp.tan", jnp.tan, uniform(-1.0, 1.0, 3, 4)),
    ("jnp.exp", jnp.exp, normal(3, 4)),
    ("jnp.log", jnp.log, uniform(0.5, 3.0, 3, 4)),
    ("jnp.log1p", jnp.log1p, uniform(0.0, 2.0, 3, 4)),
    ("jnp.sqrt", jnp.sqrt, uniform(0.5, 3.0, 3, 4)),
    ("jnp.tanh", jnp.tanh, normal(3, 4)),
    ("jnp.arctan", jnp.arctan, normal(3, 4)),
    ("jnp.arccos", jnp.arccos, uniform(-0.8, 0.8, 3, 4)),
    ("jnp.abs", jnp.abs, away_from_zero(3, 4)),
    # jax.numpy: two arguments
    ("jnp.arctan2", jnp.arctan2, pair(normal(3, 4), away_from_zero(3, 4))),
    ("jnp.hypot", jnp.hypot, pair(away_from_zero(3, 4), normal(3, 4))),
    ("jnp.power", jnp.power, pair(uniform(0.5, 2.0, 3, 4), normal(3, 4))),
    ("jnp.matmul", jnp.matmul, pair(normal(3, 4), normal(4, 2))),
    ("jnp.einsum", lambda a, b: jnp.einsum("ij,kj->ik", a, b), pair(normal(3, 4), normal(2, 4))),
    ("jnp.kron", jnp.kron, pair(normal(2, 2), normal(2, 3))),
    # jax.numpy: reductions and reshaping
    ("jnp.prod", lambda x: jnp.prod(x, axis=1), uniform(0.5, 1.5, 3, 4)),
    ("jnp.cumsum", lambda x: jnp.cumsum(x, axis=1), normal(3, 4)),
    ("jnp.cumprod", lambda x: jnp.cumprod(x, axis=1), uniform(0.5, 1.5, 3, 4)),
    ("jnp.var", lambda x: jnp.var(x, axis=0), normal(3, 4)),
    ("jnp.linalg.norm", lambda x: jnp.linalg.norm(x, axis=1), normal(3, 4)),
    ("jnp.sort", lambda x: jnp.sort(x, axis=1), normal(3, 4)),
    ("jnp.max", lambda x: jnp.max(x, axis=0), normal(3, 4)),
    (
        "jnp.take",
        lambda x: jnp.take(x, jnp.array([3, 0, 7, 7, 11, 5, 1, 2, 4, 6, 8, 9, 10])),
        normal(3, 4),
    ),
    ("jnp.where", lambda x: jnp.where(x > 0, x**3, jnp.sin(x)), away_from_zero(3, 4)),
    ("jnp.flip.T", lambda x: jnp.flip(x, axis=0).T * jnp.arange(1.0, 4.0), normal(3, 4)),
    # jax.numpy.linalg
    ("jnp.linalg.inv", lambda x: jnp.linalg.inv(spd(x)), normal(4, 4)),
    ("jnp.linalg.det", lambda x: jnp.linalg.det(x + 4 * jnp.eye(4)), normal(4, 4)),
    ("jnp.linalg.slogdet", lambda x: jnp.linalg.slogdet(spd(x))[1], normal(4, 4)),
    (
        "jnp.linalg.solve",
        lambda a, b: jnp.linalg.solve(spd(a), b),
        pair(normal(4, 4), normal(4, 2)),
    ),
    ("jnp.linalg.cholesky", lambda x: jnp.linalg.cholesky(spd(x)), normal(4, 4)),
    ("jnp.linalg.eigvalsh", lambda x: jnp.linalg.eigvalsh(x + x.T), normal(4, 4)),
    ("jnp.linalg.svdvals", lambda x: jnp.linalg.svd(x, compute_uv=False), normal(4, 3)),
    ("jnp.linalg.qr", lambda x: jnp.linalg.qr(x)[1], normal(4, 3)),
    # jax.nn
    ("jax.nn.sigmoid", jax.nn.sigmoid, normal(3, 4)),
    ("jax.nn.softplus", jax.nn.softplus, normal(3, 4)),
    ("jax.nn.gelu", jax.nn.gelu, normal(3, 4)),
    ("jax.nn.elu", jax.nn.elu, away_from_zero(3, 4)),
    ("jax.nn.relu", jax.nn.relu, away_from_zero(3, 4)),
    ("jax.nn.softmax", jax.nn.softmax, normal(3, 4)),
    ("jax.nn.log_softmax", jax.nn.log_softmax, normal(3, 4)),
    ("jax.nn.logsumexp", lambda x: jax.nn.logsumexp(x, axis=1), normal(3, 4)),
    ("jax.nn.standardize", jax.nn.standardize, normal(3, 4)),
    ("jax.nn.glu", jax.nn.glu, normal(3, 4)),
    ("jax.nn.squareplus", jax.nn.squareplus, normal(3, 4)),
    # jax.lax
    ("lax.rsqrt", lax.rsqrt, uniform(0.5, 3.0, 3, 4)),
    ("lax.erf", lax.erf, normal(3, 4)),
    ("lax.erf_inv", lax.erf_inv, uniform(-0.8, 0.8, 3, 4)),
    ("lax.lgamma", lax.lgamma, uniform(0.5, 4.0, 3, 4)),
    ("lax.pow", lax.pow, pair(uniform(0.5, 2.0, 3, 4), normal(3, 4))),
    (
        "lax.dot_general",
        lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ()))),
        pair(normal(3, 4), normal(4, 2)),
    ),
    ("lax.conv_general_dilated", conv, pair(normal(2, 3, 6), normal(4, 3, 3))),
    ("lax.reduce_window", sum_pool, normal(4, 4)),
    ("lax.cumlogsumexp", lambda x: lax.cumlogsumexp(x, axis=1), normal(3, 4)),
    ("lax.pad", lambda x: lax.pad(x, 0.5, ((1, 0, 1), (0, 2, 0))) ** 2, normal(3, 4)),
    ("lax.dynamic_slice", lambda x: lax.dynamic_slice(x, (1, 1), (2, 3)) * x[0, 0], normal(3, 4)),
    (
        "lax.dynamic_update_slice",
        lambda x: lax.dynamic_update_slice(x, jnp.sin(x[:2, :2]), (1, 2)),
        normal(3, 4),
    ),
    ("lax.scan", scan_product, normal(3, 4)),
    ("lax.fori_loop", fori_power, normal(3, 4)),
    ("lax.cond", cond_branch, normal(3, 4)),
    (
        "lax.associative_scan",
        lambda x: lax.associative_scan(jnp.multiply, x, axis=1),
        uniform(0.5, 1.5, 3, 4),
    ),
    ("lax.top_k", lambda x: lax.top_k(x, 2)[0], normal(3, 4)),
]


def with_perturbed_vjp(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """``fn`` behind a ``custom_vjp`` whose backward is JAX's own, perturbed."""

    @jax.custom_vjp
    def wrapped(*args: Any) -> Any:
        return fn(*args)

    def fwd(*args: Any) -> Any:
        return fn(*args), args

    def bwd(args: Any, ct: Any) -> Any:
        grads = list(jax.vjp(fn, *args)[1](ct))
        if kind == "sign_flip":
            return tuple(-g for g in grads)
        flat = grads[0].ravel()
        mag = jnp.abs(flat)
        index = jnp.argmin(jnp.where(mag >= 1e-2 * jnp.max(mag), mag, jnp.inf))
        grads[0] = flat.at[index].multiply(1.001).reshape(grads[0].shape)
        return tuple(grads)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def three_variants(fn: Callable[..., Any]) -> tuple[Callable[[Any, Any], Any], dict[str, Any]]:
    sign = with_perturbed_vjp(fn, "sign_flip")
    one_entry = with_perturbed_vjp(fn, "one_entry")

    def apply_fn(params: Any, x: Any) -> Any:
        return fn(*x[0]), sign(*x[1]), one_entry(*x[2])

    return apply_fn, {}


def verdicts(name: str, fn: Callable[..., Any], maker: Maker) -> dict[str, Any]:
    args = maker(np.random.default_rng(abs(hash(name)) % 2**32))
    x = (args, tuple(a.copy() for a in args), tuple(a.copy() for a in args))
    report: Report = check_gradients(three_variants(fn), x, mode="full")
    n = len(args)
    failed = {b.name for b in report.failed_blocks}
    clean = {f"input[0][{i}]" for i in range(n)}
    flipped = {f"input[1][{i}]" for i in range(n)}
    scaled = report.block("input[2][0]")
    worst = scaled.worst[0] if scaled.worst else None
    return {
        "report": report,
        "passes": not (failed & clean),
        "sign_caught": flipped <= failed,
        "entry_caught": (
            scaled.mismatches == 1
            and worst is not None
            and abs(worst.analytic / worst.numeric - 1.001) < 1e-5
            and not (failed - flipped - {"input[2][0]"})
        ),
    }


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {name: verdicts(name, fn, maker) for name, fn, maker in FUNCTIONS}


def test_suite_is_large_enough() -> None:
    assert len(FUNCTIONS) >= 40
    assert len({name for name, _, _ in FUNCTIONS}) == len(FUNCTIONS)


@pytest.mark.slow
def test_jax_derivatives_pass_and_perturbed_backwards_are_caught(
    results: dict[str, dict[str, Any]],
) -> None:
    total = len(results)
    passes = [n for n, r in results.items() if r["passes"]]
    sign = [n for n, r in results.items() if r["sign_caught"]]
    entry = [n for n, r in results.items() if r["entry_caught"]]
    print(
        f"\njax agreement: {total} functions; exact derivatives pass: {len(passes)}/{total}; "
        f"sign-flipped backward caught: {len(sign)}/{total}; "
        f"one entry x1.001 caught and localised: {len(entry)}/{total}"
    )
    problems = {
        name: str(r["report"])
        for name, r in results.items()
        if not (r["passes"] and r["sign_caught"] and r["entry_caught"])
    }
    assert not problems, "\n\n".join(f"{name}:\n{text}" for name, text in problems.items())
    assert len(passes) == len(sign) == len(entry) == total >= 40


# --------------------------------------------------------------------------- beyond first order
# The same functions against ``jax.test_util.check_grads(order=2, modes=("fwd", "rev"))``: on
# JAX's own derivatives both pass the second-order and forward-mode checks; behind a
# ``custom_vjp`` whose backward is right in value but wrong in its own derivative (visible
# at second order only), both reject it, and our second-order section names the block.


def with_second_order_bug(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind a ``custom_vjp`` whose backward is JAX's own times
    ``1 + 0.01 * sum(x - stop_gradient(x))`` (``x`` the first argument): 1 in value, so the
    gradient is exact, but differentiating the backward adds ``0.01 g 1^T`` to the first
    argument's rows of the Hessian."""

    @jax.custom_vjp
    def wrapped(*args: Any) -> Any:
        return fn(*args)

    def fwd(*args: Any) -> Any:
        return fn(*args), args

    def bwd(args: Any, ct: Any) -> Any:
        grads = list(jax.vjp(fn, *args)[1](ct))
        first = args[0]
        grads[0] = grads[0] * (1.0 + 0.01 * jnp.sum(first - lax.stop_gradient(first)))
        return tuple(grads)

    wrapped.defvjp(fwd, bwd)
    return wrapped


#: (function, variant) -> why our verdict and check_grads' differ (checked: the test fails if
#: they agree, or if the mutant does not really change the second derivative). None at these
#: inputs. check_grads checks one random projection per mode, so at other inputs it can miss
#: the mutant (seen for jnp.sqrt, lax.cumlogsumexp and jax.nn.standardize with inputs drawn
#: from other seeds), while our full-mode check of every entry of H u caught it at all of them.
CONTRACT_DISAGREEMENTS: dict[tuple[str, str], str] = {}


def _check_grads_passes(fn: Callable[..., Any], args: tuple[Any, ...], modes: Any) -> bool:
    """Whether ``check_grads(fn, args, order=2, modes=modes)`` passes (float64)."""
    with jax.enable_x64(True):
        try:
            check_grads(fn, tuple(jnp.asarray(a) for a in args), order=2, modes=modes)
        except AssertionError:
            return False
    return True


def _hvp_moved(fn: Callable[..., Any], buggy: Callable[..., Any], args: tuple[Any, ...]) -> float:
    """How far the mutant moves ``H u`` (relative to its largest entry), for the loss
    ``sum(fn(*args) * r)`` and random ``u``, ``r``: the oracle that the mutant is a real bug."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        xs = [jnp.asarray(a) for a in args]
        r = jnp.asarray(rng.standard_normal(np.shape(fn(*xs))))
        us = [jnp.asarray(rng.standard_normal(np.shape(a))) for a in args]

        def hvp(f: Callable[..., Any]) -> np.ndarray:
            grad = jax.grad(lambda *v: jnp.sum(f(*v) * r), argnums=tuple(range(len(xs))))

            def u_dot_g(*v: Any) -> Any:
                return sum(jnp.vdot(u, g) for u, g in zip(us, grad(*v), strict=True))

            parts = jax.grad(u_dot_g, argnums=tuple(range(len(xs))))(*xs)
            return np.concatenate([np.ravel(p) for p in parts])

        exact, moved = hvp(fn), hvp(buggy)
    # (relative to the larger of the two: a piecewise-linear function's exact H u is 0)
    return float(np.max(np.abs(moved - exact)) / max(np.max(np.abs(exact)), np.max(np.abs(moved))))


def _own_passed(report: Report) -> bool:
    """A section's own verdict (a report's ``passed`` covers its sections too)."""
    return report.problem is None and all(b.passed for b in report.blocks)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fn", "maker"), FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_second_order_and_forward_mode_agree_with_check_grads(
    name: str, fn: Callable[..., Any], maker: Maker
) -> None:
    args = maker(np.random.default_rng(zlib.crc32(name.encode())))  # the same in every run
    blocks = {f"input[{i}]" for i in range(len(args))}

    # JAX's own derivatives: check_grads passes both modes at order 2, and so do we
    assert _check_grads_passes(fn, args, ("fwd", "rev"))
    report = check_gradients(fn, tuple(args), mode="full", order=2, forward=True)
    for contract in ("first order", "second order", "forward mode"):
        section = report.section(contract)
        assert _own_passed(section) and section.not_checked is None, str(report)
        assert {b.name for b in section.blocks} == blocks

    # a backward right in value, wrong in its derivative
    buggy = with_second_order_bug(fn)
    moved = _hvp_moved(fn, buggy, args)
    assert moved > 1e-6, moved  # a real second-order bug (round-off: about 1e-14)
    report = check_gradients(buggy, tuple(args), mode="full", order=2)
    assert _own_passed(report), str(report)  # first order cannot see it
    second = report.section("second order")
    assert {b.name for b in second.blocks if not b.passed} == {"input[0]"}, str(report)
    anchor_caught = not _check_grads_passes(buggy, args, ("rev",))
    if (name, "second_order_bug") in CONTRACT_DISAGREEMENTS:
        assert not anchor_caught  # the listed disagreement still holds
    else:
        assert anchor_caught
