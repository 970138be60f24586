"""The benchmark's files: per-seed CSV and JSON, a Markdown table over seeds, a PNG of the metric against NFE;
and the sweep's progress in its folder (``sweep.json``, ``cells.jsonl``), so that an interrupted sweep resumes."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from steindiff.bench.sweep import BenchConfig, CellResult, as_records, summarise
from steindiff.output.files import WriteError, append_line, write_file, write_files

__all__ = ["SweepFolder", "headline", "markdown_table", "metric_figure", "open_sweep", "verdicts", "write_outputs"]

LINESTYLES = ("-", "--", ":", "-.")


def headline(rows: Sequence[dict[str, Any]]) -> str:
    """The quantity the tables lead with: the model's quality metric, else err_ref."""
    for name in ("fd_mnist", "sw2"):
        if rows and name in rows[0]:
            return name
    return "err_ref"


def _fmt(value: Any, std: Any = None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if math.isinf(value) else "NaN"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    if isinstance(std, float) and math.isfinite(std) and std > 0:
        text += f" ± {std:.2g}"
    return text


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per solver x schedule x NFE, one column per variant: headline ± std, then err_ref."""
    metric = headline(rows)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines_by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        lines_by_key.setdefault((r["solver"], r["schedule"], r["nfe"]), {})[r["variant"]] = r
    columns = [f"{metric} {v}" for v in variants]
    if metric != "err_ref":
        columns += [f"err_ref {v}" for v in variants]
    out = [
        "| solver | schedule | NFE | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (solver, schedule, nfe), cells in lines_by_key.items():
        values = [
            _fmt(cells[v].get(metric), cells[v].get(f"{metric}_std")) + (" †" if cells[v]["nonfinite"] else "")
            if v in cells
            else ""
            for v in variants
        ]
        if metric != "err_ref":
            values += [
                _fmt(cells[v].get("err_ref"), cells[v].get("err_ref_std")) if v in cells else "" for v in variants
            ]
        realised = next(iter(cells.values()))["nfe_realised"]
        nfe_text = f"{nfe}" if realised == nfe else f"{nfe} ({realised})"
        out.append(f"| {solver} | {schedule} | {nfe_text} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


def _value(row: dict[str, Any], name: str) -> float:
    """A summary value with a diverged one (inf in memory, null in JSON) as inf."""
    value = row.get(name)
    return math.inf if value is None else float(value)


def verdicts(rows: Sequence[dict[str, Any]], metric: str | None = None) -> list[str]:
    """Per variant: in how many runs it beats or loses to vanilla (same solver, schedule, NFE) by more
    than twice the combined seed spread, the range of its ratio to vanilla, and how often its coefficient
    moved off 1 (the mean over runs of ``gamma_moved``, where recorded). A cell whose solver ran the grid of
    another cell (Heun asked for an even NFE runs the odd one below) repeats that run and is counted once."""
    metric = metric or headline(rows)
    vanilla = {(r["solver"], r["schedule"], r["nfe"]): r for r in rows if r["variant"] == "vanilla"}
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "vanilla"):
        better = worse = repeats = 0
        ratios, moved = [], []
        seen = set()
        for r in rows:
            base = vanilla.get((r["solver"], r["schedule"], r["nfe"]))
            if r["variant"] != variant or base is None:
                continue
            run = (r["solver"], r["schedule"], r["nfe_realised"])
            if run in seen:
                repeats += 1
                continue
            seen.add(run)
            if r.get("gamma_moved") is not None:
                moved.append(r["gamma_moved"])
            ours, theirs = _value(r, metric), _value(base, metric)
            stds = [_value(row, f"{metric}_std") for row in (r, base)]
            spread = 2 * math.hypot(*(s if math.isfinite(s) else 0.0 for s in stds))
            if math.isinf(ours) or math.isinf(theirs):
                ratio = 1.0 if ours == theirs else (math.inf if math.isinf(ours) else 0.0)
            else:
                ratio = ours / theirs if theirs > 0 else math.inf
            ratios.append((ratio, f"{r['solver']} {r['schedule']} NFE {r['nfe']}"))
            better += ours < theirs - spread
            worse += ours > theirs + spread
        if not ratios:
            continue
        low, high = min(ratios), max(ratios)
        seeds = min(r.get("seeds", 1) for r in rows)
        margin = "beyond twice the seed spread" if seeds > 1 else "one seed: any difference counts"
        repeated = f"; {repeats} more cell{'s repeat' if repeats > 1 else ' repeats'} one of them" if repeats else ""
        recorded = "" if len(moved) == len(ratios) else f", recorded in {len(moved)} of {len(ratios)} runs"
        lines.append(
            f"- **{variant}**: better than vanilla in {better} of {len(ratios)} runs, worse in {worse} "
            f"({margin}{repeated}); {metric} / vanilla from x{low[0]:.3g} ({low[1]}) to x{high[0]:.3g} ({high[1]})"
            + (
                f"; gamma moved off 1 at {100 * statistics.fmean(moved):.3g}% of the steps "
                f"({100 * min(moved):.3g}-{100 * max(moved):.3g}% a run{recorded})."
                if moved
                else "."
            )
        )
    return lines


def metric_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
    """Headline metric against NFE, one panel per solver, one colour per variant, one line style per schedule;
    one legend for the figure, with every variant and schedule (panels may hold different ones)."""
    metric = headline(rows)
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    legend_width = 1.5  # inches, right of the panels
    width = 3.6 * len(solvers) + legend_width
    fig, axes = plt.subplots(1, len(solvers), figsize=(width, 3.4), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, solver in zip(axes[0], solvers, strict=True):
        for vi, variant in enumerate(variants):
            for si, schedule in enumerate(schedules):
                pts = sorted(
                    (r["nfe_realised"], r.get(metric), r.get(f"{metric}_std") or 0.0)
                    for r in rows
                    if r["solver"] == solver and r["variant"] == variant and r["schedule"] == schedule
                )
                pts = [(n, m, s if math.isfinite(s) else 0.0) for n, m, s in pts if m is not None and math.isfinite(m)]
                if not pts:
                    continue
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    color=colours[vi % len(colours)],
                    linestyle=LINESTYLES[si % len(LINESTYLES)],
                    marker="o",
                    markersize=3,
                    capsize=2,
                )
        ax.set_title(solver)
        ax.set_xlabel("NFE")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (log; diverged cells omitted)")
    handles = [Line2D([], [], color=colours[i % len(colours)], marker="o", markersize=3) for i in range(len(variants))]
    handles += [Line2D([], [], color="black", linestyle=LINESTYLES[i % len(LINESTYLES)]) for i in range(len(schedules))]
    fig.legend(handles, [*variants, *schedules], loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_width / width, 1))
    return fig


def write_outputs(config: BenchConfig, results: list[CellResult], out: Path, facts: dict[str, Any]) -> dict[str, Path]:
    """Write results.json (config, facts, per-seed rows, summary), results.csv, results.md and metric.png: all
    four are made in memory and replace the old ones together, so a failure leaves the folder as it was."""
    records, rows = as_records(results), summarise(results)
    paths = {name: out / name for name in ("results.json", "results.csv", "results.md", "metric.png")}

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    document = {
        "config": asdict(config),
        "facts": facts,
        "per_seed": [{k: clean(v) for k, v in r.items()} for r in records],
        "summary": [{k: clean(v) for k, v in r.items()} for r in rows],
    }
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
    writer.writeheader()
    writer.writerows(records)
    header = (
        f"# {config.model}: {len(config.seeds)} seed(s) x {config.samples} samples a cell, "
        f"batch {config.batch}, K = {config.probes} probes\n\n"
        + "".join(f"- {k}: {v}\n" for k, v in facts.items())
        + "\nMean ± standard deviation over seeds. †: some samples were non-finite (NaN or overflow); 'diverged':\n"
        + "the metric itself is infinite. NFE (n): the solver realised n evaluations.\n\n"
    )
    figure = metric_figure(rows, f"{config.model}: {headline(rows)} vs NFE")
    plot = io.BytesIO()
    try:
        figure.savefig(plot, format="png", dpi=110)
    finally:
        plt.close(figure)
    write_files(
        {
            paths["results.json"]: json.dumps(document, indent=1) + "\n",
            paths["results.csv"]: table.getvalue(),
            paths["results.md"]: header + "\n".join(verdicts(rows)) + "\n\n" + markdown_table(rows),
            paths["metric.png"]: plot.getvalue(),
        }
    )
    return paths


#: the sweep's settings and state, checked when a command resumes into the folder
SWEEP_FILE = "sweep.json"
#: one JSON line per finished cell (one seed of one solver x schedule x NFE x variant), appended as it finishes
CELLS_FILE = "cells.jsonl"


@dataclass
class SweepFolder:
    """A sweep's --out folder while it fills: the cells saved so far, by key, and where to save the next."""

    path: Path
    settings: dict[str, Any]
    done: dict[tuple, CellResult]
    #: seconds spent on this folder by earlier, interrupted runs
    earlier_s: float

    @property
    def cells_path(self) -> Path:
        return self.path / CELLS_FILE

    def save(self, cell: CellResult) -> None:
        """Append a finished cell; non-finite floats are written as NaN/Infinity, which JSON reads back exactly."""
        append_line(self.cells_path, json.dumps(asdict(cell)))
        self.done[cell.key] = cell

    def close(self, state: str, seconds: float) -> None:
        """Record whether the sweep finished and the time spent on it (added to by a later resume)."""
        write_file(
            self.path / SWEEP_FILE,
            json.dumps({**self.settings, "state": state, "wall_s": self.earlier_s + seconds}, indent=1) + "\n",
        )


def _listed(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _differences(wanted: dict[str, Any], held: dict[str, Any]) -> list[str]:
    names = {**wanted.get("config", {}), **held.get("config", {})}
    pairs = [(k, wanted.get("config", {}).get(k), held.get("config", {}).get(k)) for k in names]
    pairs += [(k, v, held.get(k)) for k, v in wanted.items() if k != "config"]
    return [
        f"{k}: {_listed(mine)} in this command, {_listed(theirs)} in the folder"
        for k, mine, theirs in pairs
        if mine != theirs
    ]


def _read_cells(path: Path) -> dict[tuple, CellResult]:
    """The saved cells; a last line cut short by a crash is dropped (and the file rewritten without it)."""
    if not path.exists():
        return {}
    lines = path.read_text().split("\n")
    whole, last = lines[:-1], lines[-1]  # a line is whole once its newline is written
    cells = {}
    for number, line in enumerate(whole, 1):
        try:
            cell = CellResult(**json.loads(line))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: line {number} is not a saved cell ({err}); --fresh starts over") from None
        cells[cell.key] = cell
    if last:
        write_file(path, "".join(f"{line}\n" for line in whole))
    return cells


def open_sweep(out: Path, config: BenchConfig, settings: dict[str, Any], fresh: bool = False) -> SweepFolder:
    """The folder of a sweep about to run, with the cells an earlier run of the same sweep saved there (none with
    ``fresh``); a folder holding a sweep with other settings is refused, naming the difference."""
    wanted = json.loads(json.dumps({"config": asdict(config), **settings}))
    sweep, cells = out / SWEEP_FILE, out / CELLS_FILE
    done, earlier_s = {}, 0.0
    try:
        if fresh:
            cells.unlink(missing_ok=True)
        elif sweep.exists():
            try:
                held = json.loads(sweep.read_text())
                if not isinstance(held, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                raise ValueError(f"--out {out}: {SWEEP_FILE} cannot be read ({err}); --fresh starts over") from None
            differences = _differences(wanted, held)
            if differences:
                raise ValueError(
                    f"--out {out} holds a sweep with other settings ({'; '.join(differences)}): "
                    "rerun with --fresh to start it over, or choose another --out"
                )
            done, earlier_s = _read_cells(cells), float(held.get("wall_s", 0.0))
        elif cells.exists():
            raise ValueError(f"--out {out}: {CELLS_FILE} without {SWEEP_FILE}; --fresh starts over")
        folder = SweepFolder(out, wanted, done, earlier_s)
        folder.close("incomplete", 0.0)
    except OSError as err:
        raise WriteError(f"--out {out}: {err.strerror or err}") from None
    return folder
