"""Regenerate docs/results.md: each model's sweep, the cost table, and a headline computed from them.

    python benchmarks/results.py                       # the full sweep of the benchmark issue, every model
    python benchmarks/results.py --models mnist --samples 256 --nfe 3,5,10 --probes 2 --processes 2
    python benchmarks/results.py --models '' --skip-cost --merge mnist runs/mnist-heun-karras runs/mnist-ddim-karras ...

--merge MODEL FOLDER... joins sweeps of one model run as separate bench calls (one per solver and schedule,
say, on a machine lent for minutes: benchmarks/gpu_session.sh) into docs/results/MODEL/ (or the folder that
--merge-into names there), as one sweep; a folder made by an earlier merge can be one of the FOLDERs.

A model's sweep is `python -m steindiff bench` (under `torchrun` with --processes > 1) into
docs/results/<model>/; the cost table is `python -m steindiff cost` into docs/results/cost.md. The page
is then assembled from every model folder present, each with its own settings, machine and command,
so a sweep smaller than the issue's full one is labelled as reduced.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from steindiff.bench.report import headline, verdicts, write_outputs  # noqa: E402
from steindiff.bench.sweep import VARIANTS, BenchConfig, CellResult  # noqa: E402
from steindiff.correction.rule import (  # noqa: E402
    SteinConfig,
    stein_config,
)
from steindiff.solvers import get_solver  # noqa: E402

DEFAULT_MODELS = "mnist,mlp-ring,mlp-aniso,mlp-moons"
FULL = {
    "solvers": ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"],
    "schedules": ["karras", "logsnr"],
    "nfe": [3, 4, 5, 6, 8, 10, 20],
    "variants": list(VARIANTS),
    "seeds": [0, 1, 2],
}
FULL_SAMPLES = 2000
COST = ["cost", "--model=mnist", "--nfe=5", "--batch=64", "--variants=stein,stein-cap1", "--probes=1,5", "--repeats=3"]


def _run(command: list[str]) -> str:
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "steindiff"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*torchrun, "-m", "steindiff"]


def _run_of(solver: str, variant: str) -> SteinConfig | None:
    """The correction ``variant`` applies on ``solver``, less a look-ahead corrector the solver already has
    (so on UniPC and Heun `sc-lookahead` and `stein-safe` are one run)."""
    config = stein_config(variant, probes=1)
    return replace(config, lookahead=False) if config and get_solver(solver).looks_ahead else config


def missing_variants(summary: list[dict], variants: list[str]) -> dict[tuple[str, str], list[str]]:
    """For each (solver, schedule) of the full sweep whose cells lack some of ``variants``: those variants
    whose run no variant held for it makes."""
    held = {(row["solver"], row["schedule"], _run_of(row["solver"], row["variant"])) for row in summary}
    pieces = itertools.product(FULL["solvers"], FULL["schedules"])
    lacking = {piece: [v for v in variants if (*piece, _run_of(piece[0], v)) not in held] for piece in pieces}
    return {piece: missing for piece, missing in lacking.items() if missing}


def _scope(config: dict, summary: list[dict]) -> str:
    """'full sweep', or what falls short of the issue's full sweep: NFEs, seeds, cells and samples."""
    short = [f"{k} {config[k]}" for k in ("nfe", "seeds") if not set(FULL[k]) <= set(config[k])]
    for (solver, schedule), missing in missing_variants(summary, FULL["variants"]).items():
        if len(missing) == len(FULL["variants"]):
            short.append(f"no {solver} on {schedule}")
        else:
            short.append(f"{solver} on {schedule} without {', '.join(missing)}")
    if config["samples"] < FULL_SAMPLES:
        short.append(f"fewer than {FULL_SAMPLES} samples a cell and seed")
    return "full sweep" if not short else "REDUCED sweep: " + "; ".join(short)


def model_section(folder: Path) -> str:
    """A model's part of the page, from the files its sweep wrote."""
    document = json.loads((folder / "results.json").read_text())
    config, facts, summary = document["config"], document["facts"], document["summary"]
    text = (folder / "results.md").read_text()
    metric = headline(summary)
    title = config["model"] if folder.name == config["model"] else f"{config['model']} ({folder.name})"
    return (
        f"## {title}\n\n"
        f"{_scope(config, summary)}. {config['samples']} samples a cell and seed, seeds {config['seeds']}, batch "
        f"{config['batch']} (also the Stein batch), K = {config['probes']} probes, err_ref on the first "
        f"{min(config['reference_samples'], config['samples'])} samples of each seed. "
        f"{facts['machine']}, {facts['processes']} process(es), {facts['wall time']}.\n\n"
        f"    {facts['command']}\n\n"
        + "\n".join(verdicts(summary, metric))
        + f"\n\n![{metric} vs NFE](results/{folder.name}/metric.png)\n\n"
        + text[text.index("| solver") :]
    )


def _current(config: dict) -> dict:
    """A bench config as this version names its fields (sweeps made before ``products`` had ``batched_probes``)."""
    config = dict(config)
    if "batched_probes" in config:
        config["products"] = "vjp-batched" if config.pop("batched_probes") else "vjp"
    return config


def merge(model: str, folders: list[Path], destination: Path) -> None:
    """One sweep folder from several of the same model and settings: union of cells (pieces may hold
    different solvers, schedules and variants), summed wall time. A cell held twice is refused."""
    documents = [json.loads((folder / "results.json").read_text()) for folder in folders]
    configs = [_current(d["config"]) for d in documents]
    if any(c["model"] != model for c in configs):
        raise SystemExit(f"--merge {model}: the folders hold other models")
    same = ("samples", "seeds", "batch", "probes", "products", "reference_samples", "nfe")
    for key in same:
        if any(c[key] != configs[0][key] for c in configs):
            raise SystemExit(f"--merge: the folders differ in {key}")
    fields = set(CellResult.__dataclass_fields__) - {"scores"}

    def cell(row: dict) -> CellResult:  # JSON holds a non-finite score as null: it comes back as NaN
        scores = {k: math.nan if v is None else v for k, v in row.items() if k not in fields}
        return CellResult(**{k: v for k, v in row.items() if k in fields}, scores=scores)

    cells = [cell(r) for d in documents for r in d["per_seed"]]
    keys = [(c.solver, c.schedule, c.nfe, c.variant, c.seed) for c in cells]
    if len(set(keys)) < len(keys):
        raise SystemExit("--merge: a cell (solver, schedule, NFE, variant, seed) is in more than one folder")
    union = {
        key: tuple(dict.fromkeys(v for c in configs for v in c[key])) for key in ("solvers", "schedules", "variants")
    }
    config = BenchConfig(**{**configs[0], **union, "seeds": tuple(configs[0]["seeds"])})
    cells.sort(key=lambda c: (config.solvers.index(c.solver), config.schedules.index(c.schedule), c.nfe))
    facts = dict(documents[0]["facts"])
    seconds = sum(float(d["facts"]["wall time"].split()[0]) for d in documents)
    commands = [c for d in documents for c in d["facts"]["command"].split("; ")]  # a merged folder holds several
    facts["machine"] = " and ".join(dict.fromkeys(d["facts"]["machine"] for d in documents))
    facts["wall time"] = f"{seconds:.0f} s in {len(commands)} bench runs"
    facts["command"] = "; ".join(commands)
    write_outputs(config, cells, destination, facts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="sweep these (comma-separated); '' for none")
    parser.add_argument("--solvers", default=",".join(FULL["solvers"]))
    parser.add_argument("--schedules", default=",".join(FULL["schedules"]))
    parser.add_argument("--variants", default=",".join(FULL["variants"]))
    parser.add_argument("--nfe", default=",".join(map(str, FULL["nfe"])))
    parser.add_argument("--samples", type=int, default=FULL_SAMPLES)
    parser.add_argument("--seeds", default=",".join(map(str, FULL["seeds"])))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1, help="torchrun processes per sweep")
    parser.add_argument("--skip-cost", action="store_true", help="keep docs/results/cost.md as it is")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--merge", nargs="+", metavar=("MODEL", "FOLDER"), help="join these sweeps of MODEL first")
    parser.add_argument("--merge-into", metavar="NAME", help="the merged sweep's folder under results/ (MODEL)")
    parser.add_argument(
        "--missing",
        type=Path,
        metavar="FOLDER",
        help="only print, a line 'SOLVER-SCHEDULE VARIANT,...' each, the pieces of the full sweep whose cells in "
        "FOLDER lack some of --variants, and those variants",
    )
    args = parser.parse_args()
    if args.missing:
        summary = json.loads((args.missing / "results.json").read_text())["summary"]
        for (solver, schedule), lacking in missing_variants(summary, args.variants.split(",")).items():
            print(f"{solver}-{schedule} {','.join(lacking)}")
        return
    results = args.out / "results"
    if args.merge:
        merge(args.merge[0], [Path(f) for f in args.merge[1:]], results / (args.merge_into or args.merge[0]))
    for model in filter(None, args.models.split(",")):
        _run(
            [
                *_launcher(args.processes),
                "bench",
                f"--model={model}",
                f"--solvers={args.solvers}",
                f"--schedules={args.schedules}",
                f"--nfe={args.nfe}",
                f"--variants={args.variants}",
                f"--samples={args.samples}",
                f"--seeds={args.seeds}",
                f"--batch={args.batch}",
                f"--probes={args.probes}",
                f"--out={os.path.relpath(results / model, ROOT)}",
            ]
        )
    if not args.skip_cost:
        results.mkdir(parents=True, exist_ok=True)
        table = _run([sys.executable, "-m", "steindiff", *COST])
        (results / "cost.md").write_text(f"    python -m steindiff {' '.join(COST)}\n\n{table}")
    folders = sorted(p.parent for p in results.glob("*/results.json"))
    cost = (results / "cost.md").read_text() if (results / "cost.md").exists() else "(not measured yet)\n"
    gpu = results / "gpu.md"  # written by hand from benchmarks/gpu_session.sh's output, when a GPU was lent
    page = (
        "# Results: vanilla vs the Stein correction\n\n"
        "Regenerated by `python benchmarks/results.py` (see its --help). Variants (README, 'Variants of the "
        "correction'): `stein` is the paper's literal rule (gamma clipped below at 0.1 only); `stein-cap1` clips "
        "gamma to [0.1, 1]; `stein-safe` keeps gamma >= 1, under the noise-level cap and the "
        "posterior-mean trust region, with the fallback to gamma = 1 when the batch estimate is noisy; "
        "`sc-noise` (SC design B) picks the gamma that puts the state at the next noise level; "
        "`sc-lookahead` (SC design A, the default) corrects with the look-ahead evaluation, under stein-safe's "
        "safeguards. "
        "Rademacher probes, EDM coordinates. err_ref: mean distance of the final samples to an RK4 reference "
        "solution of the ODE from the same noise. Mean ± standard deviation over seeds. The counts compare each "
        "variant with vanilla of the same solver, schedule and NFE. Heun realises odd NFEs only: a requested "
        "NFE 4, 6, 8, 10 or 20 runs the grid of 3, 5, 7, 9 or 19 (shown as '4 (3)'), so those cells repeat "
        "another run, and the tallies count each run once. 'gamma moved off 1': of the steps where the rule "
        "ran, the share whose applied gamma was not 1 (at the others the step was the solver's own, for "
        "`sc-lookahead` with its look-ahead corrector); pieces run before it was recorded lack it. "
        "A sweep marked REDUCED is what the "
        "machine that made it could afford; `python benchmarks/results.py` with its defaults runs the full one "
        "(over 100 CPU-hours for `mnist` on this project's 2-core machine; about 30 minutes on an H100 or an H200, "
        "of which lent machines gave us 10 and 15). `mnist (mnist-sweep)` gathers the mnist pieces run so far: "
        "about 2 minutes a solver and schedule on a GPU, on this CPU 65 minutes with the issue's three variants "
        "and 56 with `stein-safe` and `sc-lookahead` (DDIM, Karras), 57 with `sc-lookahead` alone (UniPC, each "
        "schedule: two runs side by side, one thread each), 72 (DPM-Solver++(2M) on logSNR, (3M) on Karras) and 95 "
        "(DDIM and DPM-Solver++(3M) on logSNR, with two more runs beside them for 70 of those minutes); "
        "`stein-safe` on DPM-Solver++(3M), Karras, 38 (2 threads), on DDIM, logSNR, 39, on "
        "DPM-Solver++(2M), logSNR, 38, and on DPM-Solver++(3M), logSNR, 42; "
        "`sc-noise` on DDIM, Karras, 43 (2 threads), on DDIM, logSNR, 50 (with other work beside it), on "
        "DPM-Solver++(2M), logSNR, 37, on UniPC, Karras, 37, on UniPC, logSNR, 124 (one thread, 2026-11-29's "
        "slower machine), on DPM-Solver++(3M), Karras, 134 (the same; about 8 of them paused), and on "
        "DPM-Solver++(3M), logSNR, 75 (two processes of one thread each). "
        "For UniPC and Heun `sc-lookahead` is `stein-safe`: "
        "they already correct with their look-ahead evaluation. The look-ahead corrector alone (the solvers "
        "`dpmpp_3m+lookahead` on Karras and `dpmpp_2m+lookahead` on logSNR, plain, the same settings and noise; "
        "67-70 minutes on this CPU beside the two runs above), to set beside `sc-lookahead`: "
        "`docs/quality/mnist-lookahead-alone/results.md`; `ddim+lookahead` on logSNR at NFE 5-20 (16 minutes at 2 "
        "threads): `docs/quality/mnist-lookahead-alone-ddim-logsnr/results.md`; `dpmpp_3m+lookahead` on logSNR at NFE "
        "5-20 (31 minutes at one thread): `docs/quality/mnist-lookahead-alone-dpmpp3m-logsnr/results.md`.\n\n"
        + "\n".join(model_section(folder) for folder in folders)
        + "\n## Cost of the correction (mnist, DPM-Solver++(2M), Karras, NFE 5, batch 64)\n\n"
        + cost
        + (f"\n{gpu.read_text()}" if gpu.exists() else "")
    )
    (args.out / "results.md").write_text(page)
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
