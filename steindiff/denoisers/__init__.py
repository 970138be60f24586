"""Denoisers in EDM coordinates: the protocol, exact models and the model registry."""

from .base import CountingDenoiser, Denoiser, ExactDenoiser
from .empirical import EmpiricalDenoiser, load_digits8, load_mnist
from .gmm import GMM_PRESETS, GaussianMixture, gmm_preset
from .registry import MODELS, ModelInfo, load_model

__all__ = [
    "GMM_PRESETS",
    "MODELS",
    "CountingDenoiser",
    "Denoiser",
    "EmpiricalDenoiser",
    "ExactDenoiser",
    "GaussianMixture",
    "ModelInfo",
    "gmm_preset",
    "load_digits8",
    "load_mnist",
    "load_model",
]
