"""Round-trip time of the app's /run endpoint, called with gradio_client against a launched server.

    python benchmarks/app_roundtrip.py [--repeats 5]

Cases (both samplers, diagnostics on): `mnist`, NFE 5, batch 16, Lipschitz on 4 samples (target: 3 s on
the 2-core CPU, 0.5 s on a GPU); `gmm-ring`, NFE 5, 2,000 particles (target: 1 s). Prints the median and
the spread of the round trips after one warm-up call, for repeated calls with the same seed (the app
reuses the cached reference solution) and with a new seed each call (the reference is computed).
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from app_compute import BASE, CASES  # the same cases, without the server
from gradio_client import Client

import app
from steindiff.experiment import ModelCatalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    demo = app.make_app(ModelCatalog())
    url = app.launch(demo, port=None, block=False)
    client = Client(url, verbose=False)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"device: {device}; torch threads: {torch.get_num_threads()}")
    for name, case in CASES.items():
        settings = {**BASE, **case}
        client.predict(*settings.values(), api_name="/run")  # warm-up: model load, first-call overheads
        for label, seeds in (("same seed, reference cached", [0] * args.repeats), ("new seed each call", None)):
            times = []
            for i in range(args.repeats):
                call = {**settings, "seed": seeds[i] if seeds else 1000 + i}  # in the order of app.SETTINGS
                start = time.perf_counter()
                client.predict(*call.values(), api_name="/run")
                times.append(time.perf_counter() - start)
            print(
                f"{name}, {label}: median {statistics.median(times):.2f} s "
                f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeats} calls)"
            )
    demo.close()


if __name__ == "__main__":
    main()
