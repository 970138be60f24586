"""The lesson presets: named changes to the form's :class:`~steindiff.app.settings.Settings` (data only)."""

from __future__ import annotations

from typing import Any

from steindiff.app.settings import DEFAULT_RULE
from steindiff.denoisers import DEFAULT_IMAGE_MODEL

__all__ = ["PRESETS"]

#: preset name -> the settings it changes (the others keep what the form shows)
PRESETS: dict[str, dict[str, Any]] = {
    "safe: 32 NFE": {"solver": "dpmpp_2m", "schedule": "karras", "nfe": 32, "stein_on": True, "rule": DEFAULT_RULE},
    "trap: 4 NFE Euler": {"solver": "ddim", "schedule": "karras", "nfe": 4, "stein_on": True, "rule": DEFAULT_RULE},
    "Stein rescues 3-step Heun (mnist, 5 NFE)": {
        "model": DEFAULT_IMAGE_MODEL,
        "batch": 16,
        "solver": "heun",
        "schedule": "karras",
        "nfe": 5,
        "stein_on": True,
        "rule": "stein",
    },
    "literal rule diverges": {"solver": "dpmpp_2m", "schedule": "karras", "nfe": 10, "stein_on": True, "rule": "stein"},
    "safeguarded rule, same run": {
        "solver": "dpmpp_2m",
        "schedule": "karras",
        "nfe": 10,
        "stein_on": True,
        "rule": DEFAULT_RULE,
    },
    "what the coefficient adds: corrector alone vs sc-lookahead": {
        "solver": "dpmpp_3m+lookahead",
        "schedule": "karras",
        "nfe": 10,
        "stein_on": True,
        "rule": "sc-lookahead",
    },
}
