"""The torch adapter's contract hooks (second order, forward mode, batched backward) on the
zoo of `tests/zoo/contracts_torch.py`: directly, and through ``check_gradients(order=2,
forward=True, batched=True)``.

Oracles: the same functions written in built-in torch ops, differentiated by torch
(``torch.autograd.functional.hessian``); ``torch.autograd.gradgradcheck`` and
``torch.autograd.gradcheck(check_forward_ad=True, check_batched_grad=True)`` as anchors on
the Functions themselves.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from gradcheck.adapters.torch import build_problem  # noqa: E402
from torch import nn  # noqa: E402
from zoo import contracts_torch as zoo  # noqa: E402

from gradcheck import check_gradients  # noqa: E402
from gradcheck._check import run_check  # noqa: E402
from gradcheck._options import CheckOptions  # noqa: E402
from gradcheck._problem import FlatProblem, Unavailable, output_projection  # noqa: E402
from gradcheck.errors import GradcheckInputError  # noqa: E402

SEEDS = [0, 1, 2]
SECTION = {
    "first": "first order",
    "second": "second order",
    "forward": "forward mode",
    "batched": "batched backward",
}
# what the hooks say where a layer lacks a contract
UNAVAILABLE = {
    "second": r"^autograd\.Function OnceCube is marked @once_differentiable$",
    "forward": r"^no forward-mode rule: autograd\.Function \w+ defines no jvp$",
    "batched": (
        r"^no batching rule: autograd\.Function \w+ has (no setup_context staticmethod|"
        r"neither a vmap staticmethod nor generate_vmap_rule=True)"
    ),
}


def _ids(case: zoo.Case) -> str:
    return case.name


# --------------------------------------------------------------------------- oracle
def _oracle_loss(case: zoo.Case, x: torch.Tensor, y: Any, seed: int) -> Any:
    """The loss as a function of the flat ``theta = [w, x]`` (the adapter's block order), in
    built-in torch ops: the projection the adapter uses (``y`` None) or the MSE."""
    reference = case.spec.reference
    w_shape = case.spec.w_shape(x.shape[1])
    n_w = int(np.prod(w_shape))

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w = theta[:n_w].reshape(w_shape)
        xs = theta[n_w:].reshape(x.shape)
        out = reference(xs, w)
        if y is None:
            r = torch.from_numpy(output_projection(tuple(out.shape), seed, 0))
            return (out * r).sum()
        return ((out - y) ** 2).mean()

    return loss


def _oracle_gradient(loss: Any, theta: np.ndarray) -> np.ndarray:
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(t), t)
    return g.numpy()


def _oracle_hessian(loss: Any, theta: np.ndarray) -> np.ndarray:
    t = torch.tensor(theta, dtype=torch.float64)
    h: torch.Tensor = torch.autograd.functional.hessian(loss, t)
    return h.numpy()


def _problem(case: zoo.Case, seed: int) -> tuple[FlatProblem, Any]:
    model, x, y = zoo.build(case, seed)
    return build_problem(model, x, y, seed=seed), _oracle_loss(case, x, y, seed)


def _u(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, 17]).standard_normal(size)


def _rows(p: FlatProblem, seed: int, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng([seed, 23])
    return p.theta0 + 0.1 * rng.standard_normal((k, p.size))


def _failed(report: Any) -> frozenset[str]:
    return frozenset(b.name for b in report.failed_blocks)


def _own_verdict(report: Any) -> bool:
    """Whether one section passed by itself (`Report.passed` of the first-order report
    includes every section)."""
    return report.problem is None and all(b.passed for b in report.blocks)


def _differ(p: FlatProblem, a: np.ndarray, b: np.ndarray, rtol: float = 1e-9) -> frozenset[str]:
    """The blocks where ``a`` and ``b`` (rows of theta's layout) differ beyond round-off."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    scale = max(1.0, float(np.max(np.abs(b))))
    return frozenset(
        blk.name
        for blk in p.blocks
        if not np.allclose(a[:, blk.slice], b[:, blk.slice], rtol=rtol, atol=rtol * scale)
    )


# --------------------------------------------------------------------------- correct layers
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", zoo.CORRECT, ids=_ids)
def test_correct_layer_hooks_match_the_oracle(case: zoo.Case, seed: int) -> None:
    p, loss = _problem(case, seed)
    theta0 = np.array(p.theta0)
    grad = _oracle_gradient(loss, theta0)
    np.testing.assert_allclose(p.gradient(theta0), grad, rtol=1e-12, atol=1e-13)
    has = case.spec.has
    u = _u(seed, p.size)

    if "second" in has:
        hu = _oracle_hessian(loss, theta0) @ u
        q = p.second_order(u)
        assert q.blocks == p.blocks and np.array_equal(q.theta0, p.theta0)
        np.testing.assert_allclose(q.gradient(q.theta0), hu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(q.gradient(theta0), hu, rtol=1e-10, atol=1e-12)  # not cached
        assert q.loss(theta0) == pytest.approx(float(u @ grad), rel=1e-12, abs=1e-12)
        assert run_check(q, CheckOptions(seed=seed)).passed
    else:
        with pytest.raises(Unavailable, match=UNAVAILABLE["second"]):
            p.second_order(u)

    if "forward" in has:
        V = np.random.default_rng([seed, 5]).standard_normal((5, p.size))
        np.testing.assert_allclose(p.jvp(theta0, V), V @ grad, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(p.jvp(theta0, np.eye(p.size)), grad, rtol=1e-10, atol=1e-12)
        assert p.jvp(theta0, np.zeros((0, p.size))).shape == (0,)
    else:
        with pytest.raises(Unavailable, match=UNAVAILABLE["forward"]):
            p.jvp(theta0, np.eye(p.size)[:2])

    T = _rows(p, seed)
    if "batched" in has:
        values, grads = p.gradient_batch(T)
        expected = np.stack([_oracle_gradient(loss, t) for t in T])
        np.testing.assert_allclose(grads, expected, rtol=1e-10, atol=1e-12)
        oracle = [float(loss(torch.from_numpy(t))) for t in T]
        np.testing.assert_allclose(values, oracle, rtol=1e-12, atol=1e-12)
    else:
        with pytest.raises(Unavailable, match=UNAVAILABLE["batched"]):
            p.gradient_batch(T)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("case", zoo.CORRECT, ids=_ids)
def test_correct_layer_passes_every_section(case: zoo.Case, mode: str, seed: int) -> None:
    model, x, y = zoo.build(case, seed)
    report = check_gradients(model, x, y, seed=seed, mode=mode, order=2, forward=True, batched=True)
    sections = {s.contract: s for s in (report, *report.sections)}
    assert list(sections) == list(SECTION.values())
    for key, contract in SECTION.items():
        section = sections[contract]
        if key == "first" or key in case.spec.has:
            assert _own_verdict(section) and section.not_checked is None, str(report)
            assert section.blocks, contract
        elif key == "second":  # once_differentiable: a verdict, failed, saying why
            assert not _own_verdict(section)
            assert "OnceCube is marked @once_differentiable" in (section.problem or "")
            assert all(not b.passed for b in section.blocks)
        else:  # no forward-mode or batching rule: "not checked", not failed
            assert section.passed and not section.blocks
            assert section.not_checked is not None
            assert section.not_checked.startswith(
                "no forward-mode rule" if key == "forward" else "no batching rule"
            )
    assert report.passed == (case.layer != "once")


# --------------------------------------------------------------------------- mutants
def _hook_sections(p: FlatProblem, loss: Any, seed: int) -> dict[str, frozenset[str] | str]:
    """The blocks each contract finds wrong through the hooks alone ("unavailable" where the
    hook raises `Unavailable`): first and second order by `run_check` (full mode: the
    numerical derivatives of ``loss`` and of ``u . g``); forward mode against the oracle's
    gradient (identity directions); the batched gradient against a loop of ``gradient``."""
    out: dict[str, frozenset[str] | str] = {}
    out["first"] = _failed(run_check(p, CheckOptions(seed=seed)))
    try:
        out["second"] = _failed(
            run_check(p.second_order(_u(seed, p.size)), CheckOptions(seed=seed))
        )
    except Unavailable:
        out["second"] = "unavailable"
    theta0 = np.array(p.theta0)
    try:
        out["forward"] = _differ(p, p.jvp(theta0, np.eye(p.size)), _oracle_gradient(loss, theta0))
    except Unavailable:
        out["forward"] = "unavailable"
    T = _rows(p, seed)
    try:
        values, batched = p.gradient_batch(T)
        found = _differ(p, batched, np.stack([p.gradient(t) for t in T]))
        alone = np.array([p.loss(t) for t in T])
        if not np.allclose(values, alone, rtol=1e-12, atol=1e-12):
            found |= {"loss"}
        out["batched"] = found
    except Unavailable:
        out["batched"] = "unavailable"
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", zoo.MUTANTS, ids=_ids)
def test_mutant_caught_by_its_hook_in_its_block(case: zoo.Case, seed: int) -> None:
    p, loss = _problem(case, seed)
    found = _hook_sections(p, loss, seed)
    assert case.contract is not None
    assert found[case.contract] == case.blocks, found
    for other in (*case.spec.has, "first"):
        if other != case.contract and other not in case.also:
            assert found[other] == frozenset(), (other, found)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("case", zoo.MUTANTS, ids=_ids)
def test_mutant_caught_by_check_gradients_in_its_section(
    case: zoo.Case, mode: str, seed: int
) -> None:
    model, x, y = zoo.build(case, seed)
    options: dict[str, Any] = {"nondet_tol": 0.0} if mode == "fast" else {}
    report = check_gradients(
        model, x, y, seed=seed, mode=mode, order=2, forward=True, batched=True, **options
    )
    assert not report.passed
    assert case.contract is not None
    section = report.section(SECTION[case.contract])
    assert _failed(section) == case.blocks, str(report)
    for other in (*case.spec.has, "first"):
        if other != case.contract and other not in case.also:
            assert _own_verdict(report.section(SECTION[other])), (other, str(report))


# --------------------------------------------------------------------------- anchors
def _function_inputs(layer: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    model, x, _ = zoo.build(zoo.Case(layer, None, None, frozenset()), seed)
    w = model.w.detach().clone().requires_grad_(True)
    return x.clone().requires_grad_(True), w


# torch's own checks load forward-AD decompositions, scripted with the deprecated jit
_JIT = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(_JIT)
@pytest.mark.parametrize("layer", sorted(zoo.SPECS))
def test_torch_anchors_agree_on_the_correct_layers(layer: str) -> None:
    """gradgradcheck / gradcheck pass where we offer the contract, and fail (or cannot run)
    where the hook says Unavailable."""
    spec = zoo.SPECS[layer]
    fn = spec.factory(None).apply
    inputs = _function_inputs(layer, 0)
    assert torch.autograd.gradcheck(fn, inputs)
    second = torch.autograd.gradgradcheck(fn, inputs, raise_exception=False)
    assert second == ("second" in spec.has)
    try:
        forward = torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
    except NotImplementedError:
        forward = False
    assert forward == ("forward" in spec.has)
    if "batched" in spec.has:
        assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True)


@pytest.mark.filterwarnings(_JIT)
@pytest.mark.parametrize(
    "case", [c for c in zoo.MUTANTS if c.contract in ("second", "forward")], ids=_ids
)
def test_torch_anchors_catch_the_mutants_too(case: zoo.Case) -> None:
    """The anchors agree that the mutants are wrong (gradgradcheck also differentiates with
    respect to the upstream gradient, so it needs no MSE to see ``scale_go``)."""
    fn = case.spec.factory(case.bug).apply
    inputs = _function_inputs(case.layer, 0)
    if case.contract == "second":
        assert not torch.autograd.gradgradcheck(fn, inputs, raise_exception=False)
    else:
        assert not torch.autograd.gradcheck(
            fn, inputs, check_forward_ad=True, check_backward_ad=False, raise_exception=False
        )


# --------------------------------------------------------------------------- specific verdicts
def test_once_differentiable_is_unavailable_naming_the_function() -> None:
    case = zoo.Case("once", None, None, frozenset())
    p, _ = _problem(case, 0)
    assert run_check(p, CheckOptions()).passed  # its first order is right
    with pytest.raises(Unavailable) as info:
        p.second_order(_u(0, p.size))
    assert str(info.value) == "autograd.Function OnceCube is marked @once_differentiable"
    report = check_gradients(*zoo.build(case, 0), order=2)
    section = report.section("second order")
    assert not report.passed and not section.passed
    assert section.problem is not None and "@once_differentiable" in section.problem


def test_function_without_jvp_is_unavailable_with_its_name() -> None:
    p, _ = _problem(zoo.Case("bilinear", None, None, frozenset()), 0)
    with pytest.raises(Unavailable) as info:
        p.jvp(p.theta0, np.eye(p.size)[:3])
    assert str(info.value) == "no forward-mode rule: autograd.Function Bilinear defines no jvp"
    report = check_gradients(
        *zoo.build(zoo.Case("bilinear", None, None, frozenset()), 0), forward=True
    )
    assert report.passed
    assert report.section("forward mode").not_checked == str(info.value)


def test_function_without_vmap_support_is_unavailable_with_its_name() -> None:
    p, _ = _problem(zoo.Case("no_vmap", None, None, frozenset()), 0)
    with pytest.raises(Unavailable) as info:
        p.gradient_batch(_rows(p, 0))
    assert str(info.value) == (
        "no batching rule: autograd.Function NoVmapCube has neither a vmap staticmethod "
        "nor generate_vmap_rule=True"
    )


def test_hooks_reject_wrong_shapes() -> None:
    p, _ = _problem(zoo.CORRECT[0], 0)
    with pytest.raises(GradcheckInputError, match="u must have"):
        p.second_order(np.ones(p.size + 1))
    with pytest.raises(GradcheckInputError, match="directions must have"):
        p.jvp(p.theta0, np.ones((2, p.size - 1)))
    with pytest.raises(GradcheckInputError, match="thetas must have"):
        p.gradient_batch(np.ones((2, p.size + 2)))


# --------------------------------------------------------------------------- built-in ops
class _Net(nn.Module):
    """A small MLP with dropout in train mode (the RNG is reset before every evaluation,
    so every contract sees one dropout mask) and a loss-independent last bias."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.l1 = nn.Linear(3, 5).double()
        self.l2 = nn.Linear(5, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(torch.tanh(self.l1(x))))


@pytest.mark.parametrize("seed", SEEDS)
def test_builtin_ops_with_dropout_agree_across_contracts(seed: int) -> None:
    """Oracle: the gradient by autograd (``gradient``) for forward mode and the batched
    gradient (the same dropout mask in every evaluation); H u against numerical derivatives
    of ``u . g`` (`run_check`). With ``y`` None the last bias's gradient is constant: its
    H u block is exactly zero."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = build_problem(_Net(), x, None, seed=seed)
    g = p.gradient(np.array(p.theta0))
    np.testing.assert_allclose(p.jvp(p.theta0, np.eye(p.size)), g, rtol=1e-10, atol=1e-12)
    T = np.repeat(np.array(p.theta0)[None, :], 2, axis=0)
    values, grads = p.gradient_batch(T)
    np.testing.assert_allclose(grads, np.stack([g, g]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(values, [p.loss(p.theta0)] * 2, rtol=1e-12)
    u = _u(seed, p.size)
    q = p.second_order(u)
    hu = q.gradient(q.theta0)
    bias = next(b for b in p.blocks if b.name == "l2.bias")
    assert np.all(hu[bias.slice] == 0.0)
    assert run_check(q, CheckOptions(seed=seed)).passed
    report = check_gradients(_Net(), x, seed=seed, order=2, forward=True, batched=True)
    assert report.passed, str(report)


# --------------------------------------------------------------------------- caller's state
def _run_every_hook(p: FlatProblem) -> list[np.ndarray]:
    theta0 = np.array(p.theta0)
    q = p.second_order(_u(1, p.size))
    return [
        q.gradient(theta0),
        np.array([q.loss(theta0)]),
        p.jvp(theta0, np.eye(p.size)),
        *p.gradient_batch(_rows(p, 1)),
    ]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_caller_grad_mode_changes_nothing(context: str) -> None:
    case = zoo.CORRECT[0]  # cube: every contract
    model, x, y = zoo.build(case, 0)
    expected = _run_every_hook(build_problem(model, x, y))
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        got = _run_every_hook(build_problem(model, x, y))
        report = check_gradients(model, x, y, order=2, forward=True, batched=True)
        assert torch.is_grad_enabled() is False
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert report.passed, str(report)
    assert torch.is_grad_enabled()


def test_user_module_parameters_and_grads_untouched() -> None:
    case = zoo.MUTANTS[0]
    model, x, y = zoo.build(case, 0)
    model.w.grad = torch.full_like(model.w, 7.0)
    before = copy.deepcopy(model.state_dict())
    x_before = x.clone()
    _run_every_hook(build_problem(model, x, y))
    check_gradients(model, x, y, order=2, forward=True, batched=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(model.w.grad, torch.full_like(model.w, 7.0))
    assert model.w.requires_grad and model.training
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None
    assert torch.is_grad_enabled()


class _Checkpointed(nn.Module):
    """A re-entrant checkpoint: its gradient runs only under ``.backward()``, which builds no
    graph of itself; its CheckpointFunction has no jvp and no setup_context."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        out: torch.Tensor = checkpoint(lambda t: torch.tanh(self.lin(t)), x, use_reentrant=True)
        return out


def test_reentrant_checkpoint_gets_verdicts_not_crashes() -> None:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = build_problem(_Checkpointed(), x)
    with pytest.raises(Unavailable, match=r"^the gradient runs only under \.backward\(\)"):
        p.second_order(_u(0, p.size))
    with pytest.raises(Unavailable, match="CheckpointFunction defines no jvp"):
        p.jvp(p.theta0, np.eye(p.size)[:2])
    with pytest.raises(Unavailable, match="CheckpointFunction has no setup_context"):
        p.gradient_batch(_rows(p, 0))
    report = check_gradients(_Checkpointed(), x, order=2, forward=True, batched=True)
    assert _own_verdict(report)  # first order
    assert not _own_verdict(report.section("second order"))
    assert report.section("forward mode").not_checked is not None
    assert report.section("batched backward").not_checked is not None


@pytest.mark.parametrize(("layer", "batching"), [("cube", "vmap"), ("softplus", "loop")])
def test_second_order_values_batched_where_vmap_runs(layer: str, batching: str) -> None:
    """A check expecting many evaluations gets ``u . g`` at many rows in one vmapped call
    where the model has batching rules (equal to one row at a time), a loop otherwise; a
    check expecting few gets the problem as built."""
    p, _ = _problem(zoo.Case(layer, None, None, frozenset()), 0)
    q = p.second_order(_u(0, p.size))
    assert q.prepare is not None
    assert q.prepare(2) is q
    chosen = q.prepare(100)
    assert chosen.batching == batching and chosen.prepare is None
    assert chosen.second_order is None and chosen.jvp is None  # the hooks are the first's
    T = _rows(p, 0, k=5)
    alone = np.array([q.loss(t) for t in T])
    if batching == "vmap":
        assert chosen.loss_batch is not None
        np.testing.assert_allclose(chosen.loss_batch(T), alone, rtol=1e-12, atol=1e-12)
    else:
        assert chosen.loss_batch is None


@pytest.mark.parametrize(
    ("layer", "bug", "fails"), [("softplus", "sign_b", True), ("cube", "drop_xx", False)]
)
def test_sections_follow_wrt(layer: str, bug: str, fails: bool) -> None:
    """``wrt="w"``: the hooks see the other blocks held at their values (the core restricts
    them, ``u`` is 0 on the input). A bug in ``d2/dw2`` is still caught (softplus ``sign_b``:
    its ``H_ww`` is not 0); one in ``d2/dx2`` (cube ``drop_xx``) is outside what was asked
    (so would be cube's ``sign_wx``, in ``H_wx u_x`` with ``u_x = 0``; cube is linear in w)."""
    model, x, y = zoo.build(zoo.Case(layer, bug, None, frozenset()), 0)
    report = check_gradients(model, x, y, wrt="w", order=2, forward=True, batched=True)
    section = report.section("second order")
    assert [b.name for b in section.blocks] == ["w"]
    assert _failed(section) == (frozenset({"w"}) if fails else frozenset())
    assert report.passed == (not fails)


def test_unavailable_forward_mode_is_found_once() -> None:
    """A second call says the same without evaluating the model again."""
    calls = [0]
    fn = zoo.bilinear(None).apply

    def counted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return fn(x, w)

    model, x, _ = zoo.build(zoo.Case("bilinear", None, None, frozenset()), 0)
    model.fn = counted
    p = build_problem(model, x)
    messages = []
    for _ in range(2):
        with pytest.raises(Unavailable) as info:
            p.jvp(p.theta0, np.eye(p.size)[:2])
        messages.append(str(info.value))
        if len(messages) == 1:
            after_first = calls[0]
    assert (
        messages[0]
        == messages[1]
        == ("no forward-mode rule: autograd.Function Bilinear defines no jvp")
    )
    assert calls[0] == after_first


@pytest.mark.filterwarnings(_JIT)
@pytest.mark.parametrize("case", [c for c in zoo.MUTANTS if c.contract == "batched"], ids=_ids)
def test_torch_batched_anchor_misses_a_mixing_vmap_rule(case: zoo.Case) -> None:
    """torch's ``check_batched_grad`` vmaps the backward over upstream gradients, never the
    Function's own ``vmap`` rule: it passes the mutants that the batched section fails
    (`test_mutant_caught_by_check_gradients_in_its_section`)."""
    fn = case.spec.factory(case.bug).apply
    inputs = _function_inputs(case.layer, 0)
    assert torch.autograd.gradcheck(
        fn, inputs, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True
    )
    report = check_gradients(*zoo.build(case, 0), batched=True)
    assert _failed(report.section("batched backward")) == case.blocks
