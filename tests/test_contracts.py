"""The contracts beyond the first-order gradient, in the core (`gradcheck._contracts`), on
problems built by hand with exact derivatives (the oracle): second order, forward mode and the
batched backward, each a section of the report judged by the one set of rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradcheck import check_flat
from gradcheck._problem import Block, FlatProblem, Unavailable
from gradcheck._select import select_blocks
from gradcheck.errors import InvalidOptionError

# f(t) = sum(sin(t) * t**2) + (t0 * t1)**2 ... in closed form, per entry and across entries
A = Block("a", (3,), 0)
B = Block("b", (2, 2), 3)
THETA0 = np.array([0.3, -1.2, 0.7, 1.1, -0.4, 0.9, 0.2])


def loss(t: np.ndarray) -> float:
    return float(np.sum(np.sin(t) * t**2) + 0.5 * np.sum(t) ** 2)


def gradient(t: np.ndarray) -> np.ndarray:
    return np.cos(t) * t**2 + 2 * t * np.sin(t) + np.sum(t)


def hessian(t: np.ndarray) -> np.ndarray:
    diag = -np.sin(t) * t**2 + 4 * t * np.cos(t) + 2 * np.sin(t)
    return np.diag(diag) + np.ones((t.size, t.size))


def make(
    *,
    wrong_hvp: int | None = None,
    wrong_jvp: int | None = None,
    mix_batch: bool | str = False,
    second: bool = True,
    forward: bool = True,
    batched: bool = True,
    no_forward: bool = False,
    no_second: bool = False,
) -> FlatProblem:
    def second_order(u: np.ndarray) -> FlatProblem:
        if no_second:
            raise Unavailable("`Cube` is marked once_differentiable")

        def hvp(t: np.ndarray) -> np.ndarray:
            out = hessian(t) @ u
            if wrong_hvp is not None:
                out[wrong_hvp] *= 1.01
            return out

        return FlatProblem(
            theta0=THETA0,
            loss=lambda t: float(u @ gradient(t)),
            gradient=hvp,
            blocks=(A, B),
        )

    def jvp(t: np.ndarray, v: np.ndarray) -> np.ndarray:
        if no_forward:
            raise Unavailable("no forward-mode rule: `Cube` has no jvp")
        g = gradient(t)
        if wrong_jvp is not None:
            g = g.copy()
            g[wrong_jvp] *= 1.01
        return v @ g

    def gradient_batch(thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.array([loss(t) for t in thetas])
        out = np.stack([gradient(t) for t in thetas])
        if mix_batch == "values":
            return np.roll(values, 1), out
        return values, (np.roll(out, 1, axis=0) if mix_batch else out)

    return FlatProblem(
        theta0=THETA0,
        loss=loss,
        gradient=gradient,
        blocks=(A, B),
        second_order=second_order if second else None,
        jvp=jvp if forward else None,
        gradient_batch=gradient_batch if batched else None,
    )


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_hooks_pass_every_section(mode: str, seed: int) -> None:
    report = check_flat(make(), mode=mode, seed=seed, order=2, forward=True, batched=True)
    assert report.passed, str(report)
    assert [s.contract for s in report.sections] == [
        "second order",
        "forward mode",
        "batched backward",
    ]
    for section in report.sections:
        names = [b.name for b in section.blocks]
        assert names == (
            ["loss", "a", "b"] if section.contract == "batched backward" else ["a", "b"]
        )
        assert all(b.checked for b in section.blocks)


def test_no_extra_contract_asked_gives_todays_report() -> None:
    report = check_flat(make(wrong_hvp=0, wrong_jvp=0, mix_batch=True))
    assert report.passed and report.sections == ()
    assert "==" not in str(report)


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("entry, block", [(1, "a"), (5, "b")])
def test_a_wrong_second_derivative_fails_its_section_and_block(
    mode: str, entry: int, block: str
) -> None:
    report = check_flat(make(wrong_hvp=entry), mode=mode, order=2)
    assert not report.passed
    assert report.section("first order").blocks == report.blocks
    assert all(b.passed for b in report.blocks)  # the gradient itself is right
    second = report.section("second order")
    assert [b.name for b in second.failed_blocks] == [block]
    text = str(report)
    assert text.startswith("gradient check FAILED: first order passed; second order FAILED")
    assert "== second order ==" in text and f"`{block}`" in text.split("== second order ==")[1]


def test_full_mode_names_the_wrong_forward_mode_entry() -> None:
    report = check_flat(make(wrong_jvp=4), mode="full", forward=True)
    section = report.section("forward mode")
    assert not report.passed and [b.name for b in section.failed_blocks] == ["b"]
    assert [e.index for e in section.block("b").worst] == [(0, 1)]  # entry 4 = b[0, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_mode_finds_the_block_of_a_wrong_tangent(seed: int) -> None:
    report = check_flat(make(wrong_jvp=2), mode="fast", forward=True, seed=seed)
    section = report.section("forward mode")
    assert [b.name for b in section.failed_blocks] == ["a"]
    assert section.block("a").unit == "directions"
    assert "forward mode disagrees with reverse mode" in (section.block("a").diagnosis or "")
    assert [e.index for e in section.block("a").worst] == [(2,)]  # named, and confirmed
    assert section.block("a").localized == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_batching_rule_that_mixes_the_points_fails_every_block(seed: int) -> None:
    report = check_flat(make(mix_batch=True), batched=True, seed=seed)
    section = report.section("batched backward")
    assert not report.passed and {b.name for b in section.failed_blocks} == {"a", "b"}
    assert "mixes the points of a batch" in (section.block("a").diagnosis or "")
    assert section.block("loss").passed and section.block("loss").kind == "output"


def test_a_forward_batching_rule_that_mixes_the_values_fails_the_loss_block() -> None:
    section = check_flat(make(mix_batch="values"), batched=True).section("batched backward")
    assert [b.name for b in section.failed_blocks] == ["loss"]
    assert "the loss under vmap differs" in (section.block("loss").diagnosis or "")


def test_a_model_without_a_forward_rule_is_not_checked_and_does_not_fail() -> None:
    report = check_flat(make(no_forward=True), forward=True)
    section = report.section("forward mode")
    assert report.passed and section.not_checked == "no forward-mode rule: `Cube` has no jvp"
    assert section.blocks == ()
    assert "forward mode not checked" in str(report).splitlines()[0]


def test_a_backward_that_cannot_be_differentiated_fails_the_second_order() -> None:
    report = check_flat(make(no_second=True), order=2)
    section = report.section("second order")
    assert not report.passed and section.problem is not None
    assert "once_differentiable" in section.problem
    assert "second order FAILED" in str(report).splitlines()[0]


def test_a_problem_without_hooks_says_each_contract_is_not_checked() -> None:
    report = check_flat(
        make(second=False, forward=False, batched=False), order=2, forward=True, batched=True
    )
    assert report.passed
    assert all(s.not_checked and "offers no" in s.not_checked for s in report.sections)


def test_sections_are_in_the_json() -> None:
    report = check_flat(make(wrong_hvp=0), order=2, forward=True)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["contract"] == "first order"
    assert [s["contract"] for s in data["sections"]] == ["second order", "forward mode"]
    assert data["sections"][0]["passed"] is False and data["sections"][1]["passed"] is True


def test_wrt_by_name_restricts_every_contract() -> None:
    problem = select_blocks(make(wrong_hvp=0, wrong_jvp=0, mix_batch=False), ("b",))
    report = check_flat(problem, order=2, forward=True, mode="full")
    assert report.passed, str(report)  # the wrong entries are in `a`, left out
    assert [b.name for s in report.sections for b in s.blocks] == ["b", "b"]
    caught = check_flat(
        select_blocks(make(wrong_hvp=5, wrong_jvp=6), ("b",)), order=2, forward=True
    )
    assert [s.passed for s in caught.sections] == [False, False]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"order": 3}, "order must be 1 or 2; got 3"),
        ({"order": True}, "order must be 1 or 2; got True"),
        ({"forward": "yes"}, "forward must be True or False; got 'yes'"),
        ({"batched": 1}, "batched must be True or False; got 1"),
    ],
)
def test_bad_contract_options_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(InvalidOptionError) as info:
        check_flat(make(), **options)
    assert str(info.value) == message


def test_the_numpy_adapter_has_first_order_only() -> None:
    from gradcheck import check_gradients

    def forward(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, tuple]:
        return x @ w, (x, w)

    def backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray]:
        x, w = cache
        return dout @ w.T, x.T @ dout

    rng = np.random.default_rng(0)
    report = check_gradients(
        (forward, backward), (rng.standard_normal((2, 3)), rng.standard_normal((3, 2))), order=2
    )
    assert report.passed
    assert "NumPy models have first order only" in (
        report.section("second order").not_checked or ""
    )
