"""FD-MNIST and confidence of the shipped `mnist` model: vanilla vs Stein, 1,000 samples a cell.

    python benchmarks/mnist_quality.py [--samples 1000] [--probes 2] [--grid assets/mnist-samples.png]

Heun at 35 NFE (the model card's quality figure), then DPM-Solver++(2M), Karras, NFE 3, 5 and 10:
vanilla, the literal rule (gamma_max = inf) and gamma_max = 1. Stein statistics are batch means over
generation batches of 250 (Rademacher probes, gamma_min = 0.1, EDM coordinates). Seed 0.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from steindiff import SteinConfig, get_solver, initial_noise, load_model, make_sigmas, sample
from steindiff.images import image_grid, save_png
from steindiff.metrics import load_classifier, score_digits

GENERATION_BATCH = 250


def generate(model, solver: str, nfe: int, count: int, stein: SteinConfig | None) -> tuple[torch.Tensor, int, float]:
    """``count`` samples in generation batches, per-sample seeds 0..count-1; returns samples, NFE, seconds."""
    sigmas = make_sigmas("karras", get_solver(solver).steps_for_nfe(nfe))
    out, nfe_total, start = [], 0, time.perf_counter()
    for first in range(0, count, GENERATION_BATCH):
        n = min(GENERATION_BATCH, count - first)
        x = initial_noise(n, model.event_shape, float(sigmas[0]), seed=0, first_index=first)
        run = sample(model, x, sigmas, solver, stein=stein, keep_states=False, seed=first)
        out.append(run.samples.detach())
        nfe_total = run.nfe_total
    return torch.cat(out), nfe_total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--grid", type=Path, help="write a PNG of 64 Heun-35 samples here")
    args = parser.parse_args()
    model, classifier = load_model("mnist"), load_classifier()
    print(f"torch threads: {torch.get_num_threads()}, samples a cell: {args.samples}")
    samples, nfe, seconds = generate(model, "heun", 35, args.samples, None)
    scores = score_digits(samples, classifier)
    print(
        f"heun NFE {nfe}: FD-MNIST {scores.fd:.2f}, confidence {scores.confidence:.3f}, classes "
        f"{scores.class_counts} ({seconds:.0f} s)"
    )
    if args.grid is not None:
        save_png(args.grid, image_grid(samples[:64], columns=8, scale=2))
    variants = {
        "vanilla": None,
        "Stein literal": SteinConfig(probes=args.probes),
        "Stein gamma_max=1": SteinConfig(probes=args.probes, gamma_max=1.0),
    }
    print(
        "| NFE | " + " | ".join(f"FD {v}" for v in variants) + " | " + " | ".join(f"conf. {v}" for v in variants) + " |"
    )
    print("|---" * (1 + 2 * len(variants)) + "|")
    for nfe in (3, 5, 10):
        fds, confs = [], []
        for stein in variants.values():
            samples, _, _ = generate(model, "dpmpp_2m", nfe, args.samples, stein)
            s = score_digits(samples, classifier)
            fds.append(f"{s.fd:.4g}")
            confs.append(f"{s.confidence:.3f}")
        print(f"| {nfe} | " + " | ".join(fds) + " | " + " | ".join(confs) + " |", flush=True)


if __name__ == "__main__":
    main()
