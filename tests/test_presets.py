"""Each lesson preset is a claim: run it as the app does (its model, seed and batch) and check the claim on the
run's record. The measurements are in docs/lesson.md."""

import pytest

from steindiff.app.presets import PRESETS
from steindiff.app.session import Session
from steindiff.app.settings import Settings
from steindiff.experiment import ModelCatalog


@pytest.fixture(scope="module")
def runs():
    """Each preset's run, made once, as the page's Run makes it from the form's defaults and the preset."""
    session = Session(ModelCatalog())
    cache = {}

    def run(name: str):
        if name not in cache:
            cache[name] = session.run({**Settings.defaults(), **PRESETS[name].settings}).shown.result
        return cache[name]

    return run


def _ratios(result) -> list[float]:
    """Vanilla's amplification over the true flow's, at every state where both were measured."""
    trace = result.comparison.vanilla.trace
    pairs = [(r.amplification_median, r.flow_amplification_median) for r in trace]
    return [a / f for a, f in pairs if a is not None and f is not None]


def test_the_defaults_are_the_first_lesson():
    first = next(iter(PRESETS.values()))
    assert {**Settings.defaults(), **first.settings} == Settings.defaults()


def test_the_trap(runs):
    """(a) A few-step run amplifies errors at least 3x more than the true flow at some state, and ends at least
    5x farther from the exact solution than the same solver at 32 NFE."""
    trap, converged = runs("the trap: 4 NFE on the exact ring"), runs("converged: the same solver at 32 NFE")
    assert converged.experiment.solver == trap.experiment.solver and converged.experiment.nfe >= 20
    assert max(_ratios(trap)) >= 3, _ratios(trap)
    assert trap.comparison.vanilla.final_err_ref >= 5 * converged.comparison.vanilla.final_err_ref


def test_a_converged_run(runs):
    """(b) At 32 NFE the solver's amplification stays within 1.5x of the flow's at every state."""
    ratios = _ratios(runs("converged: the same solver at 32 NFE"))
    assert len(ratios) == 32 and all(1 / 1.5 <= r <= 1.5 for r in ratios), ratios


@pytest.mark.slow
def test_stein_rescues_three_step_heun(runs):
    """(c) The literal rule's digits score FD-MNIST at most half of vanilla's."""
    scores = runs("Stein rescues 3-step Heun (literal rule, mnist)").scores
    assert 2 * scores["stein"]["fd_mnist"] <= scores["vanilla"]["fd_mnist"], scores


@pytest.mark.slow
def test_the_first_lesson_halves_fd_mnist(runs):
    """The defaults: the safeguarded rule's digits score FD-MNIST well under vanilla's (at most two thirds)."""
    scores = runs("first lesson: 3-step Heun on mnist").scores
    assert 1.5 * scores["stein"]["fd_mnist"] <= scores["vanilla"]["fd_mnist"], scores


def test_the_literal_rule_blows_up_and_the_table_says_so(runs):
    """(d) Raw gamma above 100, the final error at least 100x vanilla's, and 'blew up' in the table."""
    from steindiff.app.summary import summary_markdown

    result = runs("the literal rule blows up")
    stein, vanilla = result.comparison.stein, result.comparison.vanilla
    assert max(r.value("gamma_raw") for r in stein.trace if r.value("gamma_raw") is not None) > 100
    assert stein.final_err_ref >= 100 * vanilla.final_err_ref
    rows = {line.split(" | ")[0].strip("| "): line for line in summary_markdown(result).splitlines()}
    assert "blew up" in rows["stein"] and "blew up" not in rows["vanilla"]


def test_the_safeguarded_rule_on_the_same_run_does_not(runs):
    result = runs("the safeguarded rule, same run")
    assert result.comparison.stein.final_err_ref <= 2 * result.comparison.vanilla.final_err_ref


def test_the_coefficient_is_all_that_parts_the_corrector_alone_from_sc_lookahead(runs):
    """(e) Both sides step with the look-ahead corrector: their states agree exactly up to the first step whose
    coefficient left 1, and differ after it."""
    result = runs("what the coefficient adds: the corrector alone vs sc-lookahead")
    vanilla, stein = result.comparison.vanilla, result.comparison.stein
    moved = [r.step for r in stein.trace if r.value("gamma_raw") is not None and r.value("gamma") != 1]
    assert moved, "the coefficient never left 1"
    first = moved[0]
    for k in range(first + 1):  # x_0 .. x_first: before the step that moved
        assert bool((vanilla.states[k] == stein.states[k]).all()), k
    assert not bool((vanilla.states[first + 1] == stein.states[first + 1]).all())
