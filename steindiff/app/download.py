"""A run's download: a zip of its config, summary, per-step CSV and final samples."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from steindiff.app.plots import image_views, particles_csv, steps_csv
from steindiff.experiment import ExperimentResult
from steindiff.images import save_png, side_by_side

__all__ = ["write_download"]


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
