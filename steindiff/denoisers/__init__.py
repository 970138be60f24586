"""Denoisers in EDM coordinates: the protocol, exact models and the model registry."""

from .base import Cond, CountingDenoiser, Denoiser, ExactDenoiser, ModelKind, model_kind, prepare_for_device
from .empirical import EmpiricalDenoiser, load_digits8, load_mnist
from .gmm import GMM_PRESETS, ConditionalGaussianMixture, GaussianMixture, conditional_ring, gmm_preset
from .networks import PreconditionedDenoiser
from .registry import ASSETS, DEFAULT_IMAGE_MODEL, MODELS, ModelInfo, load_model
from .weights import WeightsError, load_denoiser, save_denoiser

__all__ = [
    "ASSETS",
    "DEFAULT_IMAGE_MODEL",
    "GMM_PRESETS",
    "MODELS",
    "Cond",
    "ConditionalGaussianMixture",
    "CountingDenoiser",
    "Denoiser",
    "EmpiricalDenoiser",
    "ExactDenoiser",
    "GaussianMixture",
    "ModelInfo",
    "ModelKind",
    "PreconditionedDenoiser",
    "WeightsError",
    "conditional_ring",
    "gmm_preset",
    "load_denoiser",
    "load_digits8",
    "load_mnist",
    "load_model",
    "model_kind",
    "prepare_for_device",
    "save_denoiser",
]
