"""The run's summary table: NFE, final error, digit scores, how the coefficient moved, where a run diverged."""

from __future__ import annotations

import math

from steindiff.app.panels import record_values
from steindiff.bench.metrics import real_digit_fd
from steindiff.experiment import ExperimentResult
from steindiff.solvers import SOLVERS, get_solver

__all__ = ["BLOW_UP", "summary_markdown"]

#: a run whose final samples are this many times the reference solution's size (or more) has blown up
BLOW_UP = 10.0


def summary_markdown(result: ExperimentResult) -> str:
    """A short table of the outcome: NFE, final error, digit scores, gamma range, how often the applied
    gamma left 1 and where it went (a move of 1e-4 counts: the range says how far), divergence. Digit scores
    of a run with non-finite samples are marked: they score the images its NaN and infinite pixels make."""
    exp = result.experiment
    lines = [
        f"**{exp.model}**, {exp.solver}, {exp.schedule}, NFE {exp.nfe} "
        f"({len(result.comparison.sigmas) - 1} steps), batch {exp.batch}, seed {exp.seed}",
        "",
        "| run | NFE | final err_ref | FD-MNIST | gamma raw (min .. max) | gamma moved off 1 (range) | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    marked = False
    for name, run in result.runs().items():
        raw = [v for v in record_values(run, "gamma_raw") if v is not None]
        score = result.scores.get(name, {})
        ruled, moved = run.gamma_moves
        applied = [g for g in run.moved_gammas if math.isfinite(g)]
        lost = run.nonfinite_samples
        mark = " †" if score and lost else ""
        marked = marked or bool(mark)
        cells = [
            name,
            str(run.nfe_total),
            _fmt(run.final_err_ref),
            _fmt(score.get("fd_mnist")) + mark,
            f"{min(raw):.3g} .. {max(raw):.3g}" if raw else "-",
            _moves(moved, ruled, applied) if name == "stein" and ruled else "-",
            _diverged(result, name),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = _corrected_step(result) if "stein" in result.runs() else None
    if note:
        lines += ["", note]
    if any("fd_mnist" in score for score in result.scores.values()):
        mean, spread = real_digit_fd(exp.batch)
        lines += [
            "",
            f"FD-MNIST is noisy at batch {exp.batch}: {exp.batch} real MNIST digits score {mean:.0f} ± {spread:.0f} "
            "(20 random draws). Compare the two runs of one batch; a gap within that spread says little.",
        ]
    if marked:
        lines += [
            "",
            "†: scored with non-finite samples, whose NaN pixels count as background and infinite ones as ink "
            "or background: the scores measure those images, not a sampler that worked.",
        ]
    if getattr(result.model, "autoencoder", None) is not None:
        lines += [
            "",
            "Latent model: sampling, err_ref, divergences and Lipschitz constants are in latent space; "
            "the images are the autoencoder's decoding of the latents.",
        ]
    return "\n".join(lines)


def _diverged(result: ExperimentResult, name: str) -> str:
    """Where run ``name`` turned non-finite, or that it blew up: its final samples :data:`BLOW_UP` times the
    reference solution's size or more (median sample norms, on the reference's samples); "-" otherwise."""
    run = result.runs()[name]
    if run.first_nonfinite_step is not None:
        return f"step {run.first_nonfinite_step + 1} ({run.nonfinite_samples} of {len(run.samples)} samples)"
    reference = result.comparison.reference
    if reference is None:
        return "-"
    truth = reference[-1].flatten(1).norm(dim=1).median()
    size = float(run.samples[: len(reference[-1])].flatten(1).norm(dim=1).median() / truth)
    return f"blew up: samples {size:.3g}x the reference's size" if size >= BLOW_UP else "-"


def _corrected_step(result: ExperimentResult) -> str | None:
    """Where the corrected run's step is not simply the solver's combined with gamma: the look-ahead
    corrector's (which moves it even at gamma = 1), or the solver's own at every step (gamma never left 1)."""
    solver, stein = result.experiment.solver, result.experiment.stein
    if stein is not None and stein.lookahead and not get_solver(solver).looks_ahead:
        alone = f"{solver}+lookahead"
        return (
            "The corrected run steps with the look-ahead corrector (the next step's network call, no extra NFE; "
            "none at the last step), then the Stein coefficient: its steps differ from vanilla's even where "
            "gamma stays 1." + (f" The solver `{alone}` is the corrector alone." if alone in SOLVERS else "")
        )
    if result.comparison.stein.gamma_moves[1] == 0:
        return "The applied gamma stayed 1 at every step: the corrected run is vanilla's, step for step."
    return None


def _moves(moved: int, ruled: int, applied: list[float]) -> str:
    """'3 of 5 steps (0.27 .. 1.04)': the steps whose applied gamma left 1, and the range it went to (a single
    value where both ends read the same), each end with the digits that tell it from 1: 1.002, not 1."""
    if not applied:
        return f"{moved} of {ruled} steps"
    ends = dict.fromkeys([_off_one(min(applied)), _off_one(max(applied))])
    return f"{moved} of {ruled} steps ({' .. '.join(ends)})"


def _off_one(gamma: float) -> str:
    """``gamma`` (not 1) to 3 significant digits, or as many more as tell it from 1."""
    return next(text for digits in range(3, 18) if (text := f"{gamma:.{digits}g}") != "1")


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"
