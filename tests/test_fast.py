"""Fast mode: one probe across all blocks, per block where it fails, bisection, auto mode.

Oracle: the reference MLP (correct backward) and its planted bugs at known places.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_reference import EXPECTED_BLOCKS

import gradcheck._fast
from gradcheck import Block, check_flat, check_gradients
from gradcheck.errors import NonFiniteError
from gradcheck.reference import BUGS, MLP


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 40)), rng.normal(size=(16, 3))


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_models_pass_in_fast_mode(data, activation, seed):
    x, y = data
    mlp = MLP([40, 25, 3], activation=activation, seed=seed)
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", seed=seed)
    assert report.passed, str(report)
    assert report.mode == "fast"
    # the gradient and one central difference across all blocks (two evaluations); where
    # that needs extrapolating, two more and the starting point twice (determinism)
    assert report.evaluations in (1 + 2, 1 + 2 + 2 + 2), report.evaluations


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bugs_fail_in_fast_mode_in_the_right_blocks(data, bug):
    x, y = data
    report = check_gradients(MLP([40, 25, 3], seed=5).with_bug(bug), x, y, loss="mse", mode="fast")
    assert {b.name for b in report.failed_blocks} == EXPECTED_BLOCKS[bug]


def test_a_single_wrong_entry_is_localised(data):
    x, y = data
    mlp = MLP([40, 25, 3], seed=5).with_bug("one_entry")
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", wrt="params")
    w0 = report.block("W0")
    assert w0.localized == 1
    assert w0.worst[0].index == (12, 20)
    assert w0.worst[0].analytic == pytest.approx(1.01 * w0.worst[0].numeric, rel=1e-6)
    assert "found every wrong entry" in (w0.note or "")
    assert "localisation named 1 wrong entry" in str(report)


def test_cost_does_not_grow_with_size():
    rng = np.random.default_rng(1)
    costs = []
    for width in (10, 300):
        mlp = MLP([width, width, 2], seed=0)
        x = rng.normal(size=(4, width))
        report = check_gradients(mlp, x, None, mode="fast", wrt="params")
        assert report.passed
        costs.append(report.evaluations)
    # the gradient and two evaluations along one direction across all blocks, whatever their
    # size (four more where the difference needs extrapolating: see above)
    assert all(c in (3, 7) for c in costs), costs


def test_auto_mode_switches_to_fast_for_large_models_and_says_why():
    rng = np.random.default_rng(2)
    small = check_gradients(MLP([3, 4, 2]), rng.normal(size=(2, 3)), None)
    assert small.mode == "full" and small.mode_reason.startswith("auto: ")
    big = MLP([150, 150, 2])  # 22,952 parameters
    report = check_gradients(big, rng.normal(size=(2, 150)), None, wrt="params")
    assert report.mode == "fast" and "> 20,000" in report.mode_reason
    assert report.passed


def test_fast_mode_respects_the_evaluation_budget(data):
    x, y = data
    mlp = MLP([40, 25, 3], seed=5).with_bug("one_entry")
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", max_evals=12)
    assert not report.passed and "max_evals=12" in (report.problem or "")


def _sin_problem(size: int = 200):
    """sum(sin(t)) with its exact gradient cos(t) (the oracle), and the points evaluated."""
    t0 = np.random.default_rng(3).normal(size=size)
    seen: list[np.ndarray] = []

    def loss(t):
        seen.append(np.array(t))
        return float(np.sum(np.sin(t)))

    return loss, np.cos, t0, seen


def test_a_direction_that_agrees_needs_no_loss_at_theta0():
    # the gradient and f(theta0 ± s v): the starting point (and its repeat, the determinism
    # check) is evaluated only before a verdict that fails
    loss, grad, t0, seen = _sin_problem()
    report = check_flat(loss, grad, t0, mode="fast")
    assert report.passed and report.evaluations == 3
    assert len(seen) == 2 and not any(np.array_equal(p, t0) for p in seen)


def test_a_failing_direction_evaluates_theta0_twice_before_any_verdict():
    loss, grad, t0, seen = _sin_problem()
    report = check_flat(loss, lambda t: grad(t) * 1.01, t0, mode="fast")
    assert not report.passed and report.problem is None
    at_theta0 = [k for k, p in enumerate(seen) if np.array_equal(p, t0)]
    assert len(at_theta0) == 2


@pytest.mark.parametrize("size", [50, 30_000])
def test_a_forward_that_stays_random_is_reported_in_fast_mode_not_blamed(size):
    # a drifting loss fails the first difference, and the determinism check then stops the
    # check as inconclusive: no block is blamed for the noise
    loss, grad, t0, _ = _sin_problem(size)
    calls = iter(range(10**6))

    def drifting(t):
        return loss(t) + 1e-6 * next(calls)

    report = check_flat(drifting, grad, t0, mode="fast")
    assert not report.passed
    assert report.problem is not None and "not deterministic" in report.problem
    assert all(b.checked == 0 and b.mismatches == 0 for b in report.blocks)


def test_a_loss_that_is_not_finite_anywhere_is_an_error_in_fast_mode():
    _, grad, t0, _ = _sin_problem()
    with pytest.raises(NonFiniteError, match="not finite at the starting point"):
        check_flat(lambda t: float("nan"), grad, t0, mode="fast")


def test_a_step_outside_the_domain_is_shrunk_in_fast_mode():
    # sum(sqrt(t)) on entries near 0: the default step leaves the domain, a smaller one
    # does not (oracle: the exact gradient 1 / (2 sqrt(t)))
    t0 = np.linspace(1e-7, 1.0, 100)
    values: list[float] = []

    def loss(t):
        values.append(float(np.sum(np.sqrt(t))))
        return values[-1]

    with np.errstate(invalid="ignore"):
        report = check_flat(loss, lambda t: 0.5 / np.sqrt(t), t0, mode="fast")
    assert report.passed, str(report)
    assert not all(np.isfinite(values))  # the first step did leave the domain


def _many_blocks_problem(wrong: dict[int, tuple[int, float]]):
    """40 blocks of 12 entries; a smooth loss whose gradient is scaled where ``wrong`` says.

    Oracle: the exact gradient of sum(sin(t) * w) is cos(t) * w.
    """
    rng = np.random.default_rng(7)
    t0 = rng.normal(size=480)
    w = rng.uniform(0.5, 2.0, size=480)
    blocks = [Block(f"p{k}", (3, 4), 12 * k) for k in range(40)]
    factor = np.ones(480)
    for k, (i, f) in wrong.items():
        factor[12 * k + i] = f

    def loss(t):
        return float(np.sum(np.sin(t) * w))

    def grad(t):
        return np.cos(t) * w * factor

    return loss, grad, t0, blocks


def test_many_blocks_are_narrowed_down_by_halving_not_one_by_one(monkeypatch):
    loss, grad, t0, blocks = _many_blocks_problem({})
    assert check_flat(loss, grad, t0, blocks=blocks, mode="fast").passed
    loss, grad, t0, blocks = _many_blocks_problem({17: (5, 1.01), 31: (0, -1.0)})
    report = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [b.name for b in report.failed_blocks] == ["p17", "p31"]
    assert report.block("p17").worst[0].index == (1, 1)
    assert report.block("p31").worst[0].index == (0, 0)
    assert all(b.checked == 1 for b in report.blocks)
    # the same verdicts, checking each of the 40 blocks on its own, cost more
    monkeypatch.setattr(gradcheck._fast, "SCAN_BLOCKS", 10**6)
    one_by_one = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [b.name for b in one_by_one.failed_blocks] == ["p17", "p31"]
    assert report.evaluations < one_by_one.evaluations


def test_a_small_block_beside_a_large_one_is_seen_at_its_own_resolution(monkeypatch):
    # a 10-entry block with gradients 1e-4 next to a 30,000-entry block with gradients ~1:
    # its part of the direction moves as a probe of it alone would, so one entry x1.01
    # shows. Oracle: the exact gradient cos(t) * w; without the per-block factor (every
    # entry moved by the factor of the whole vector) the same bug goes unseen.
    n_big = 30_000
    t0 = np.random.default_rng(3).normal(size=n_big + 10)
    w = np.ones(n_big + 10)
    w[n_big:] = 1e-4
    factor = np.ones(n_big + 10)
    factor[n_big + 3] = 1.01
    blocks = [Block("big", (n_big,), 0), Block("small", (10,), n_big)]

    def loss(t):
        return float(np.sum(np.sin(t) * w))

    assert check_flat(loss, lambda t: np.cos(t) * w, t0, blocks=blocks, mode="fast").passed
    bad = check_flat(loss, lambda t: np.cos(t) * w * factor, t0, blocks=blocks, mode="fast")
    assert [b.name for b in bad.failed_blocks] == ["small"]
    assert bad.block("small").worst[0].index == (3,)

    def one_factor(problem, tol):
        return [problem.size ** (-1 / 3)] * len(problem.blocks)

    monkeypatch.setattr(gradcheck._fast, "_block_factors", one_factor)
    uniform = check_flat(loss, lambda t: np.cos(t) * w * factor, t0, blocks=blocks, mode="fast")
    assert uniform.passed  # the resolution the per-block factor buys


def test_a_smooth_failure_that_localisation_cannot_confirm_is_refined_before_it_counts(
    data, monkeypatch
):
    # a plainly smooth disagreement goes to localisation unrefined; when localisation names
    # no entry, the block's difference is refined, and the block fails only if it still
    # disagrees. Oracle: the reference MLP with its planted one-entry bug in W0.
    x, y = data
    mlp = MLP([40, 25, 3], seed=5).with_bug("one_entry")
    calls = []

    def refine_spy(self, v, support, count, refine=True, defer=False):
        verdict = check(self, v, support, count, refine, defer)
        calls.append((refine, defer, verdict.provisional))
        return verdict

    check = gradcheck._fast._Line.check
    monkeypatch.setattr(gradcheck._fast._Line, "check", refine_spy)
    monkeypatch.setattr(gradcheck._fast._Probe, "one_entry", lambda self, v, failed: None)
    monkeypatch.setattr(gradcheck._fast._Probe, "localize", lambda self, v, failed: ([], False))
    report = check_gradients(mlp, x, y, loss="mse", mode="fast", wrt="params")
    assert [b.name for b in report.failed_blocks] == ["W0"]
    assert "named no single entry" in (report.block("W0").note or "")
    assert (True, True, True) in calls  # W0's probe: failed smoothly, left unrefined
    assert (True, False, False) in calls  # ... then refined, since localisation named nothing


def _one_block_problem(wrong: dict[int, float], size: int = 200_000):
    """One block of ``size`` entries; a smooth loss whose gradient is scaled where ``wrong`` says.

    Oracle: the exact gradient of sum(sin(t) * w) is cos(t) * w.
    """
    rng = np.random.default_rng(11)
    t0 = rng.normal(size=size)
    w = rng.uniform(0.5, 2.0, size=size)
    factor = np.ones(size)
    for i, f in wrong.items():
        factor[i] = f

    def loss(t):
        return float(np.sum(np.sin(t) * w))

    def grad(t):
        return np.cos(t) * w * factor

    return loss, grad, t0, [Block("w", (size,), 0)]


@pytest.mark.parametrize("where", [0, 123_457, 199_999])
def test_a_rank_weighted_probe_finds_one_wrong_entry_for_fewer_evaluations(monkeypatch, where):
    loss, grad, t0, blocks = _one_block_problem({where: 1.01})
    report = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [e.index for e in report.block("w").worst] == [(where,)]
    assert "found every wrong entry" in (report.block("w").note or "")
    # bisection alone names the same entry, spending two evaluations per bit of its position
    monkeypatch.setattr(gradcheck._fast, "PINPOINT_ABOVE", 10**9)
    bisected = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [e.index for e in bisected.block("w").worst] == [(where,)]
    assert report.evaluations + 16 <= bisected.evaluations, (
        report.evaluations,
        bisected.evaluations,
    )


def test_several_wrong_entries_make_the_weighted_window_fail_and_bisection_take_over():
    # two entries far apart with discrepancies of opposite sign: no window holds the sum,
    # so the search falls back to halving, and both are still named
    loss, grad, t0, blocks = _one_block_problem({1_000: 1.02, 150_000: 0.99})
    calls = []
    original = gradcheck._fast._Probe.pinpoint

    def spy(self, *args):
        out = original(self, *args)
        calls.append(out[2])  # whether the discrepancy behaved as one entry's
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradcheck._fast._Probe, "pinpoint", spy)
        report = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert sorted(e.index for e in report.block("w").worst) == [(1_000,), (150_000,)]
    assert "found every wrong entry along the failing direction (2)" in (
        report.block("w").note or ""
    )
    assert calls[0] is False and True in calls  # failed with both, worked for the last one


def _entry_costs(monkeypatch):
    """Evaluations spent in each `_Probe.entry` call, recorded as they happen."""
    costs: list[int] = []
    original = gradcheck._fast._Probe.entry

    def spy(self, i):
        before = self.ev.count - (2 if i in self._first else 0)  # a first pass made earlier
        out = original(self, i)
        costs.append(self.ev.count - before)
        return out

    monkeypatch.setattr(gradcheck._fast._Probe, "entry", spy)
    return costs


def test_a_wrong_entry_on_a_kink_gets_the_full_refinement(monkeypatch):
    # |t| at t = 0: the one-sided derivatives are -1 and 1; a backward that says 2 is wrong
    # (there and beside the kink), and the report shows it as a kink entry outside its
    # one-sided derivatives, after the refinement over all eight steps (16 evaluations) and
    # the backward on either side of the kink (2 more), as in full mode
    costs = _entry_costs(monkeypatch)
    rng = np.random.default_rng(3)
    t0 = rng.normal(size=64)
    t0[17] = 0.0

    def grad(t):
        g = np.sign(t)
        g[17] = 2.0
        return g

    report = check_flat(lambda t: float(np.sum(np.abs(t))), grad, t0, mode="fast")
    (entry,) = report.failed_blocks[0].worst
    assert entry.index == (17,) and entry.kink and entry.one_sided == pytest.approx((-1, 1))
    assert costs == [18]


def _blocks_problem(sizes: list[int], wrong: dict[int, float]):
    """Consecutive blocks of ``sizes``; a smooth loss whose gradient is scaled at the
    absolute indices ``wrong``. Oracle: the exact gradient of sum(sin(t) * w) is cos(t) * w.
    """
    rng = np.random.default_rng(5)
    size = sum(sizes)
    t0 = rng.normal(size=size)
    w = rng.uniform(0.5, 2.0, size=size)
    factor = np.ones(size)
    for i, f in wrong.items():
        factor[i] = f
    offsets = np.cumsum([0, *sizes[:-1]])
    blocks = [
        Block(f"b{k}", (n,), int(o)) for k, (n, o) in enumerate(zip(sizes, offsets, strict=True))
    ]

    def loss(t):
        return float(np.sum(np.sin(t) * w))

    def grad(t):
        return np.cos(t) * w * factor

    return loss, grad, t0, blocks


def test_one_wrong_entry_among_several_blocks_is_named_without_checking_each_block(monkeypatch):
    # the direction fails across all six blocks; the search runs over all of them at once, and
    # once the entry is named the direction without it agrees, so every other block passes
    sizes = [3_000, 40, 50_000, 40, 20_000, 10]
    wrong = 3_040 + 31_337  # entry 31,337 of b2
    loss, grad, t0, blocks = _blocks_problem(sizes, {wrong: 1.01})
    report = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [b.name for b in report.failed_blocks] == ["b2"]
    assert [e.index for e in report.block("b2").worst] == [(31_337,)]
    assert "found every wrong entry" in (report.block("b2").note or "")
    assert all(b.checked == 1 for b in report.blocks)
    # the same verdicts, reached by checking each block's part of the direction first
    monkeypatch.setattr(gradcheck._fast._Probe, "one_entry", lambda self, v, failed: None)
    per_block = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [b.name for b in per_block.failed_blocks] == ["b2"]
    assert [e.index for e in per_block.block("b2").worst] == [(31_337,)]
    assert report.evaluations + 8 <= per_block.evaluations, (
        report.evaluations,
        per_block.evaluations,
    )


def test_two_wrong_entries_in_different_blocks_are_each_named_in_their_block():
    # no single entry explains the direction: the search over all blocks gives up, and each
    # block is checked and searched on its own
    loss, grad, t0, blocks = _blocks_problem([3_000, 40, 50_000], {1_234: 1.02, 3_040 + 9: 0.97})
    report = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [b.name for b in report.failed_blocks] == ["b0", "b2"]
    assert [e.index for e in report.block("b0").worst] == [(1_234,)]
    assert [e.index for e in report.block("b2").worst] == [(9,)]


def test_windows_sized_from_the_noise_name_an_entry_in_fewer_evaluations(monkeypatch):
    loss, grad, t0, blocks = _one_block_problem({123_457: 1.01})
    report = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [e.index for e in report.block("w").worst] == [(123_457,)]
    # windows of n / 64 only (as if the noise were unknown) name the same entry, later
    monkeypatch.setattr(gradcheck._fast, "PINPOINT_MARGIN", math.inf)
    fixed = check_flat(loss, grad, t0, blocks=blocks, mode="fast")
    assert [e.index for e in fixed.block("w").worst] == [(123_457,)]
    assert report.evaluations + 4 <= fixed.evaluations, (report.evaluations, fixed.evaluations)


def test_a_zero_initialised_relu_layer_passes_judged_by_the_backward_beside_the_kink(
    monkeypatch,
):
    # every unit of the layer sits on its kink, and a random direction moves them all across
    # it at once: g . v (relu'(0) = 0 for every unit) can lie outside the one-sided
    # directional derivatives. As full mode does per entry, the gradient just beside the
    # kink, on either side, must then give the one-sided derivative (oracle: the reference
    # MLP, whose backward is correct). Where g . v falls between them, that settles it.
    beside: list[bool] = []
    original = gradcheck._fast._Line.beside

    def spy(self, *args):
        out = original(self, *args)
        beside.append(out)
        return out

    monkeypatch.setattr(gradcheck._fast._Line, "beside", spy)
    judged_beside = 0
    for seed in range(8):
        beside.clear()
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
        mlp = MLP([3, 40, 2], activation="relu", seed=seed)
        mlp.params["W0"][:] = 0.0
        mlp.params["b0"][:] = 0.0
        report = check_gradients(mlp, x, y, loss="mse", mode="fast")
        assert report.passed, str(report)
        assert all(beside), seed
        judged_beside += bool(beside)
    assert judged_beside >= 4  # the path this test is about, taken in most draws


def _problem(sizes, loss_batch=None):
    from gradcheck._problem import FlatProblem

    blocks, offset = [], 0
    for k, n in enumerate(sizes):
        blocks.append(Block(f"b{k}", (n,), offset))
        offset += n
    theta0 = np.random.default_rng(4).normal(size=offset) * 3.0
    return FlatProblem(
        theta0=theta0,
        loss=lambda t: float(np.sum(t)),
        gradient=lambda t: np.ones_like(t),
        blocks=blocks,
        loss_batch=loss_batch,
    )


def test_the_sums_drawn_with_a_direction_are_those_computed_directly():
    # oracle: g . v, ||g v||**2, sum |g v| and max |g| computed by NumPy over each block, a
    # run of blocks and an index array; blocks straddle the chunks the direction is drawn in
    from gradcheck._numerics import Evaluator, StartingPoint
    from gradcheck._options import TOLERANCES

    sizes = [gradcheck._fast.CHUNK + 7, 3, 2 * gradcheck._fast.CHUNK, 1, 11]
    problem = _problem(sizes)
    g = np.random.default_rng(5).normal(size=problem.size)
    ev = Evaluator(problem, None)
    line = gradcheck._fast._Line(ev, g, StartingPoint(ev), TOLERANCES["float64"])
    v = line.draw(np.random.default_rng(6))
    direct = gradcheck._fast._direction(np.random.default_rng(6), problem, line.tol)
    assert np.array_equal(v, direct)  # drawing the sums changes nothing in the direction
    blocks = problem.blocks
    supports = [b.slice for b in blocks]
    supports += [slice(blocks[1].offset, blocks[3].offset + 1), slice(0, problem.size)]
    supports += [slice(5, 900), np.array([0, 17, problem.size - 1])]
    for support in supports:
        terms = g[support] * v[support]
        expected = (terms.sum(), (terms**2).sum(), np.abs(terms).sum())
        np.testing.assert_allclose(line.sums(v, support), expected, rtol=1e-12)
        w = v.copy()  # not a drawn direction: the sums are computed directly
        np.testing.assert_allclose(line.sums(w, support), expected, rtol=1e-12)
    assert line.scales() == [float(np.abs(g[b.slice]).max()) for b in blocks]
    assert line.grad_scale == float(np.abs(g).max())


def test_rows_moved_whole_and_in_part_are_the_points_asked_for():
    # oracle: theta0 + s v computed by NumPy, for every row the loss receives, whatever the
    # order of whole-vector moves, partial moves and coordinate moves
    from gradcheck._numerics import Evaluator

    seen = []

    def loss_batch(rows):
        seen.append(rows.copy())
        return rows.sum(axis=1)

    problem = _problem([50_000, 7], loss_batch)
    theta0, n = problem.theta0, problem.size
    v = np.random.default_rng(7).normal(size=n)
    ev = Evaluator(problem, None)
    steps = np.array([1e-3, -1e-3, 2e-3, 0.5e-3])
    expected = []
    for support in (slice(0, n), slice(3, 900), None, slice(0, n)):
        ev.along(v, steps, support)
        where = slice(None) if support is None else support
        for s in steps:
            row = theta0.copy()
            row[where] += s * v[where]
            expected.append(row)
        ev.coordinates(np.array([2, n - 1]), np.array([9.0, -9.0]))
        for i, x in ((2, 9.0), (n - 1, -9.0)):
            row = theta0.copy()
            row[i] = x
            expected.append(row)
    got = [row for rows in seen for row in rows]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
