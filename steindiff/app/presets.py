"""The lesson presets: each a claim in one sentence and the settings that show it (data only).

Each preset names its model, batch and seed, so that it shows what it claims wherever the form stood;
tests/test_presets.py runs each as the app does and checks its claim on the run's record. The measurements
behind each are in docs/lesson.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    """A lesson: what it shows, and the settings that show it (the others keep what the form shows)."""

    claim: str
    settings: dict[str, Any]


_HEUN = {"model": "mnist", "batch": 16, "seed": 0, "solver": "heun", "schedule": "karras", "nfe": 5, "stein_on": True}
_RING = {"model": "gmm-ring", "batch": 2000, "seed": 0, "schedule": "karras", "stein_on": True}
PRESETS: dict[str, Preset] = {
    "first lesson: 3-step Heun on mnist": Preset(
        "Three Heun steps leave the digits speckled; the safeguarded correction (sc-lookahead) halves FD-MNIST.",
        {**_HEUN, "rule": "sc-lookahead"},
    ),
    "the trap: 4 NFE on the exact ring": Preset(
        "With 4 network evaluations DPM-Solver++(2M) grows an error several times more than the true flow does "
        "(shaded), and ends far from the exact solution.",
        {**_RING, "solver": "dpmpp_2m", "nfe": 4, "rule": "sc-lookahead"},
    ),
    "converged: the same solver at 32 NFE": Preset(
        "With 32 network evaluations the same solver grows errors as the true flow does, within 1.5x at every "
        "state, and lands near the exact solution.",
        {**_RING, "solver": "dpmpp_2m", "nfe": 32, "rule": "sc-lookahead"},
    ),
    "Stein rescues 3-step Heun (literal rule, mnist)": Preset(
        "On the same 3-step Heun run the paper's literal rule cuts FD-MNIST by more than half.",
        {**_HEUN, "rule": "stein"},
    ),
    "the literal rule blows up": Preset(
        "At 10 network evaluations the paper's literal rule proposes gamma in the thousands and throws the "
        "particles far off the ring.",
        {**_RING, "solver": "dpmpp_2m", "nfe": 10, "rule": "stein"},
    ),
    "the safeguarded rule, same run": Preset(
        "The safeguards keep the same run from blowing up: its error stays within twice vanilla's.",
        {**_RING, "solver": "dpmpp_2m", "nfe": 10, "rule": "sc-lookahead"},
    ),
    "what the coefficient adds: the corrector alone vs sc-lookahead": Preset(
        "Both sides step with the look-ahead corrector; they part only from the step where the coefficient leaves 1.",
        {**_RING, "model": "gmm-aniso", "solver": "dpmpp_3m+lookahead", "nfe": 10, "rule": "sc-lookahead"},
    ),
}
