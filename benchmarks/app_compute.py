"""Compute time of the app's /run without the server: sampling, diagnostics and scores, as the app runs them.

    python benchmarks/app_compute.py [--device cuda|cpu] [--repeats 5]

For machines without gradio (the lent GPU machines): the cases and settings of app_roundtrip.py, through
the same ``steindiff.app.settings.Settings.experiment``, timed around ``run_experiment``. The round trip adds
the figures, the images and the HTTP exchange; app_roundtrip.py measures all of it where gradio runs.
Each model runs where the app runs it (``model_device``: a 2-D model on the CPU) unless --device is given.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from steindiff.app.settings import LIMITS, Settings
from steindiff.experiment import ModelCatalog, run_experiment

BASE = {**Settings.defaults(), "solver": "dpmpp_2m", "schedule": "karras", "nfe": 5, "seed": 0}
CASES = {
    "mnist, NFE 5, batch 16": {"model": "mnist", "batch": 16},
    "gmm-ring, NFE 5, 2,000 particles": {"model": "gmm-ring", "batch": 2000},
}


def call_plans(
    settings: dict[str, Any], repeats: int, seed_offset: int = 0
) -> dict[str, list[tuple[dict[str, Any] | None, dict[str, Any]]]]:
    """For each kind of call, ``repeats`` pairs (an untimed call that sets it up or None, the timed call).

    After a warm-up call with seed 0: the same settings again (everything cached), a new grid for the same
    noise (the Karras grid's call first, then the logSNR grid's: the reference solution is reused, its
    states on the new grid take no network call on its 3M lattice), and a new seed (the reference is
    solved anew). ``seed_offset`` moves the
    seeds those calls draw, so that plans for two clients of one server share no seed.
    """
    if not (repeats >= 1 and seed_offset >= 0 and seed_offset + repeats <= 1000):
        raise ValueError(
            f"the seeds must stay apart: repeats >= 1 and seed_offset + repeats <= 1000, got {repeats}, {seed_offset}"
        )
    return {
        "same seed, reference cached": [(None, settings)] * repeats,
        "same seed, schedule changed": [
            ({**settings, "seed": seed}, {**settings, "seed": seed, "schedule": "logsnr"})
            for seed in range(2000 + seed_offset, 2000 + seed_offset + repeats)
        ],
        "new seed each call": [
            (None, {**settings, "seed": seed}) for seed in range(1000 + seed_offset, 1000 + seed_offset + repeats)
        ],
    }


def report(name: str, label: str, times: list[float]) -> None:
    print(
        f"{name}, {label}: median {statistics.median(times):.3f} s "
        f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} calls)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", help="run every case here (default: where the app runs each model)")
    args = parser.parse_args()
    if not 1 <= args.repeats <= 1000:
        parser.error("--repeats must be 1-1000: the calls draw their seeds from ranges of 1000")
    catalog = ModelCatalog()
    print(f"torch threads: {torch.get_num_threads()}; rule: {BASE['rule']}")

    def run(call: dict[str, Any]) -> str:
        """One run; the device it ran on."""
        experiment = Settings.from_values(**call).experiment(catalog, device=args.device)
        run_experiment(experiment, catalog, LIMITS)
        if experiment.device.startswith("cuda"):
            torch.cuda.synchronize()
        return experiment.device

    for name, case in CASES.items():
        settings = {**BASE, **case}
        device = run(settings)  # warm-up
        where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
        print(f"{name}: {where}")
        for label, plan in call_plans(settings, args.repeats).items():
            times = []
            for setup, call in plan:
                if setup is not None:
                    run(setup)
                start = time.perf_counter()
                run(call)
                times.append(time.perf_counter() - start)
            report(name, label, times)


if __name__ == "__main__":
    main()
