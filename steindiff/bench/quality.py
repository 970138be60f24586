"""Sample-quality metrics for the benchmark, built from per-sample features.

A metric maps samples to a (N, F) float64 feature array, one row per sample, and scores a whole
array. Rows can be computed in any process and concatenated in seed order before scoring, so a
sharded run scores exactly what a single process would.

- Digit models (1x28x28): FD-MNIST and the classifier's confidence (see :mod:`steindiff.bench.metrics`).
- 2-D models: the sliced 2-Wasserstein distance SW2 to 20,000 exact samples of the model's mixture
  (the truth of a trained MLP is its exact counterpart): over 180 fixed directions theta_j at 1 degree
  apart, SW2^2 = mean_j W2^2(<x, theta_j>, <y, theta_j>), each 1-D W2^2 computed between the two
  empirical quantile functions at 1,000 levels (i + 1/2) / 1000.
A set with a non-finite 2-D sample scores SW2 = inf; digits score non-finite pixels as background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from steindiff.bench.metrics import (
    DIGIT_SHAPE,
    LoadedClassifier,
    classify_digits,
    load_classifier,
    scores_from_features,
)
from steindiff.denoisers import MODELS, Denoiser
from steindiff.denoisers.gmm import GaussianMixture, gmm_preset

__all__ = ["DigitQuality", "PointQuality", "QualityMetric", "quality_metric", "sliced_wasserstein"]

TRUTH_SAMPLES = 20_000
TRUTH_SEED = 20_260_000
DIRECTIONS = 180
QUANTILES = 1_000


class QualityMetric(Protocol):
    """What the benchmark needs of a metric: its headline name, per-sample features, a score."""

    name: str

    def features(self, samples: torch.Tensor) -> torch.Tensor: ...

    def score(self, features: torch.Tensor) -> dict[str, float]: ...


@dataclass
class DigitQuality:
    """FD-MNIST (headline) and confidence: features are the 128 classifier features and the 10 probabilities."""

    classifier: LoadedClassifier
    name: str = "fd_mnist"

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        feats, probs = classify_digits(samples, self.classifier)
        return torch.cat([feats, probs.double()], 1)

    def score(self, features: torch.Tensor) -> dict[str, float]:
        scores = scores_from_features(features[:, :-10], features[:, -10:], self.classifier)
        return {"fd_mnist": scores.fd, "confidence": scores.confidence}


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """SW2 between two 2-D point sets, as defined in the module docstring; inf if ``a`` has a non-finite row."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    angles = torch.arange(DIRECTIONS, dtype=torch.float64) * (math.pi / DIRECTIONS)
    directions = torch.stack([angles.cos(), angles.sin()], 1)  # (J, 2)
    levels = (torch.arange(QUANTILES, dtype=torch.float64) + 0.5) / QUANTILES
    qa = torch.quantile(a.double() @ directions.T, levels, dim=0)
    qb = torch.quantile(b.double() @ directions.T, levels, dim=0)
    return float((qa - qb).pow(2).mean().sqrt())


@dataclass
class PointQuality:
    """SW2 to exact samples of a 2-D mixture: the features are the samples themselves."""

    truth: torch.Tensor
    name: str = "sw2"

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.detach().double().cpu().flatten(1)

    def score(self, features: torch.Tensor) -> dict[str, float]:
        return {"sw2": sliced_wasserstein(features, self.truth)}


def quality_metric(model_name: str, model: Denoiser) -> QualityMetric | None:
    """The metric for a model: digits, a registered 2-D model with an exact truth, or None (none known)."""
    if tuple(model.event_shape) == DIGIT_SHAPE:
        return DigitQuality(load_classifier())
    info = MODELS.get(model_name)
    truth_model = model if isinstance(model, GaussianMixture) else None
    if truth_model is None and info is not None and info.truth is not None:
        truth_model = gmm_preset(info.truth)
    if truth_model is None:
        return None
    return PointQuality(truth_model.sample(TRUTH_SAMPLES, torch.Generator().manual_seed(TRUTH_SEED)))
