"""Compute time of the app's /run without the server: sampling, diagnostics and scores, as the app runs them.

    python benchmarks/app_compute.py [--device cuda] [--repeats 5]

For machines without gradio (the lent GPU machines): the cases and settings of app_roundtrip.py, through
the same ``steindiff.interactive.build_experiment``, timed around ``run_experiment``. The round trip adds
the figures, the images and the HTTP exchange; app_roundtrip.py measures all of it where gradio runs.
Torch's default threads (as the app has) unless OMP_NUM_THREADS is set.
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from steindiff.experiment import ModelCatalog, run_experiment
from steindiff.interactive import LIMITS, SETTINGS, build_experiment

BASE = {**dict(SETTINGS), "solver": "dpmpp_2m", "schedule": "karras", "nfe": 5}
CASES = {
    "mnist, NFE 5, batch 16": {"model": "mnist", "batch": 16},
    "gmm-ring, NFE 5, 2,000 particles": {"model": "gmm-ring", "batch": 2000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    catalog = ModelCatalog()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {device}; torch threads: {torch.get_num_threads()}; rule: {BASE['rule']}")
    for name, case in CASES.items():
        settings = {**BASE, **case}
        run_experiment(build_experiment(catalog, *settings.values(), device=args.device), catalog, LIMITS)  # warm-up
        for label, seeds in (("same seed, reference cached", [0] * args.repeats), ("new seed each call", None)):
            times = []
            for i in range(args.repeats):
                call = {**settings, "seed": seeds[i] if seeds else 1000 + i}
                start = time.perf_counter()
                run_experiment(build_experiment(catalog, *call.values(), device=args.device), catalog, LIMITS)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            print(
                f"{name}, {label}: median {statistics.median(times):.3f} s "
                f"(min {min(times):.3f}, max {max(times):.3f}, {args.repeats} calls)"
            )


if __name__ == "__main__":
    main()
