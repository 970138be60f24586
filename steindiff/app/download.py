"""A run's download: a zip of its config, summary, per-step CSV and final samples."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from steindiff.app.views import image_views
from steindiff.experiment import ExperimentResult
from steindiff.images import save_png, side_by_side

__all__ = ["particles_csv", "steps_csv", "write_download"]


def write_download(result: ExperimentResult, downloads: Path, keep: int = 32) -> str:
    """A zip of the run (config and summary JSON, the per-step CSV, the final samples: PNGs of images, a CSV of
    particles) in a new folder under ``downloads``; the folders of older runs beyond the newest ``keep`` are
    deleted."""
    earlier = sorted(downloads.glob("run-*"), key=lambda p: p.stat().st_mtime_ns)
    for stale in earlier[: max(0, len(earlier) - keep + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=downloads))
    model = re.sub(r"[^\w.-]+", "_", result.experiment.model)  # hub ids and folders hold slashes and colons
    path = folder / f"steindiff-{model}-{result.experiment.solver}-nfe{result.experiment.nfe}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("run.json", json.dumps(result.to_json(), indent=1, allow_nan=False))
        archive.writestr("steps.csv", steps_csv(result))
        if result.model.kind == "image":
            final = image_views(result, len(result.comparison.sigmas) - 1, count=64)
            for name in result.runs():
                png = folder / f"{name}.png"
                save_png(png, final[f"{name}_state"])
                archive.write(png, png.name)
            save_png(folder / "side_by_side.png", side_by_side([final[f"{n}_state"] for n in result.runs()]))
            archive.write(folder / "side_by_side.png", "side_by_side.png")
        else:
            archive.writestr("particles.csv", particles_csv(result))
    return str(path)


def particles_csv(result: ExperimentResult) -> str:
    """A 2-D run's final samples as CSV (run, sample, x, y): each run's, then the reference solution's for
    its first samples; float32 written to 9 significant digits, which give it back exactly."""
    finals = {name: run.samples for name, run in result.runs().items()}
    if result.comparison.reference is not None:
        finals["reference"] = result.comparison.reference[-1]
    rows = (
        f"{name},{index},{x:.9g},{y:.9g}\n"
        for name, samples in finals.items()
        for index, (x, y) in enumerate(samples.tolist())
    )
    return "run,sample,x,y\n" + "".join(rows)


def steps_csv(result: ExperimentResult) -> str:
    """The per-step trace of every run as CSV (one row per run and step)."""
    buffer = io.StringIO()
    writer = None
    for name, run in result.runs().items():
        for record in run.trace:
            row = {"run": name, **record.as_dict()}
            if writer is None:
                writer = csv.DictWriter(buffer, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
    return buffer.getvalue()
