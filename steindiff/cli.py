"""Command line: ``python -m steindiff sample ...`` runs vanilla and corrected samplers and writes JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, get_args

import torch
from tqdm import tqdm

from steindiff.bench import distributed
from steindiff.bench.cost import cost_cases, measure_cost
from steindiff.bench.cost import markdown_table as cost_table
from steindiff.bench.metrics import train_classifier
from steindiff.bench.quality import quality_metric
from steindiff.bench.report import open_sweep, write_outputs
from steindiff.bench.sweep import VARIANTS, BenchConfig, run_bench
from steindiff.correction.rule import (
    CUSTOM_VARIANT,
    DEFAULT_VARIANT,
    PROBE_PRODUCTS,
    STEIN_VARIANTS,
    Coords,
    GammaVariant,
    ProbeKind,
    SteinConfig,
    stein_config,
)
from steindiff.denoisers import MODELS
from steindiff.diagnostics.jacobians import JacobianMode
from steindiff.experiment import Experiment, ModelCatalog, check_device, run_experiment
from steindiff.images import image_grid, png_bytes, side_by_side
from steindiff.limits import Limits
from steindiff.output.files import WriteError, check_file, check_folder, write_files
from steindiff.records import DiagnosticsConfig
from steindiff.schedules import SCHEDULES
from steindiff.solvers import SOLVERS, SolverOptions
from steindiff.train import TrainConfig, train

PRODUCTS_HELP = "each probe by a VJP (the paper), all K VJPs in one backward, or a forward difference"
BENCH_HELP = """The sweep: quality, err_ref, NFE and time per solver x schedule x NFE x variant, for every seed.

Each cell (one seed of one solver x schedule x NFE x variant) is saved in --out as it finishes (cells.jsonl,
with the sweep's settings in sweep.json). Running the same command again resumes: saved cells are skipped and
the results are those of an uninterrupted sweep. A folder holding a sweep with other settings is refused;
--fresh discards its saved cells and starts over. Ctrl-C stops with every finished cell saved (exit 130)."""
#: exit status after an interrupt (128 + SIGINT), as a shell reports it
INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"steindiff: error: {message}\n")


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError("NaN is not allowed")
    return value


def _positive(text: str) -> float:
    value = _real(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="steindiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("sample", help="vanilla vs Stein-corrected sampling from the same noise")
    run.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}, or diffusers:<hub id or folder>")
    run.add_argument("--solver", default="dpmpp_2m", help=f"one of: {', '.join(SOLVERS)}")
    run.add_argument("--schedule", default="karras", help=f"one of: {', '.join(SCHEDULES)}")
    run.add_argument(
        "--nfe", type=_int_in(1, Limits.max_nfe), default=5, help="network evaluations (Heun: 2 a step, 1 last)"
    )
    run.add_argument("--batch", type=_int_in(1, Limits.max_batch), default=512)
    run.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    run.add_argument("--sigma-min", type=_positive, help="default: the model's")
    run.add_argument("--sigma-max", type=_positive, help="default: the model's")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    run.add_argument("--half", action="store_true", help="diffusers models on CUDA: the network in float16")
    solver = run.add_argument_group("solver options")
    solver.add_argument("--no-lower-order-final", action="store_true", help="keep full order on the last steps")
    solver.add_argument("--unipc-order", type=_int_in(1, 3), default=2)
    solver.add_argument("--unipc-variant", choices=("bh1", "bh2"), default="bh2")
    solver.add_argument("--no-unipc-corrector", action="store_true")
    stein = run.add_argument_group("Stein correction")
    stein.add_argument("--stein", action="store_true", help="also run the corrected sampler")
    stein.add_argument(
        "--rule",
        choices=(*STEIN_VARIANTS, CUSTOM_VARIANT),
        default=DEFAULT_VARIANT,
        help="a named variant (stein = the paper's literal rule), or custom: --gamma-min/--gamma-max alone",
    )
    stein.add_argument("--gamma-min", type=_real, default=SteinConfig.gamma_min, help="custom rule only")
    stein.add_argument("--gamma-max", type=_real, default=SteinConfig.gamma_max, help="custom: inf = literal")
    stein.add_argument("--probes", type=_int_in(1, Limits.max_probes), default=SteinConfig.probes)
    stein.add_argument("--probe", choices=get_args(ProbeKind), default=SteinConfig.probe)
    stein.add_argument("--products", choices=PROBE_PRODUCTS, default=SteinConfig.products, help=PRODUCTS_HELP)
    stein.add_argument("--coords", choices=get_args(Coords), default=SteinConfig.coords)
    stein.add_argument("--variant", choices=get_args(GammaVariant), default=SteinConfig.variant)
    diag = run.add_argument_group("diagnostics")
    diag.add_argument("--no-lipschitz", action="store_true", help="skip the Lipschitz estimates")
    diag.add_argument("--lipschitz-samples", type=_int_in(1, Limits.max_lipschitz_samples), default=8)
    diag.add_argument("--lipschitz-iters", type=_int_in(1, 1000), default=20)
    diag.add_argument(
        "--lipschitz-batch",
        type=_int_in(1, 1 << 20),
        default=64,
        help="the most samples one batched Lipschitz estimate takes (every step's maps at once; memory grows with it)",
    )
    diag.add_argument("--no-reference", action="store_true", help="skip the reference trajectory and err_ref")
    diag.add_argument(
        "--reference-samples",
        type=_int_in(1, Limits.max_batch),
        help="err_ref on the first N samples (images: 64, 2-D: all)",
    )
    diag.add_argument(
        "--jacobian-mode", choices=get_args(JacobianMode), default="vjp2", help="J v by forward mode, double VJP or fd"
    )
    run.add_argument("--out", type=Path, help="write the JSON result here (default: stdout summary only)")
    run.add_argument("--grid", type=Path, help="image models: PNG of up to 64 final samples, vanilla | stein")
    run.add_argument("--no-score", action="store_true", help="skip FD-MNIST for digit models")

    fit = commands.add_parser("train", help="train a model with the EDM loss (mnist, mlp-ring, ...)")
    fit.add_argument("--model", required=True, help="mnist, or mlp-<preset> for a 2-D mixture preset")
    fit.add_argument("--steps", type=_int_in(1, 10**7), default=TrainConfig.steps)
    fit.add_argument("--batch", type=_int_in(1, 65536), default=TrainConfig.batch)
    fit.add_argument("--lr", type=_positive, default=TrainConfig.lr)
    fit.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=TrainConfig.seed)
    fit.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, loss log")
    fit.add_argument("--export", type=Path, help="write the EMA weights here (safetensors)")
    fit.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    fit.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    bench = commands.add_parser(
        "bench",
        help="the sweep: quality, err_ref, NFE and time per solver x NFE x variant (resumable)",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}, or diffusers:<hub id or folder>")
    bench.add_argument("--solvers", type=_names, default=BenchConfig.solvers, help="comma-separated")
    bench.add_argument("--schedules", type=_names, default=BenchConfig.schedules, help="comma-separated")
    bench.add_argument("--nfe", type=_ints, default=BenchConfig.nfe, help="comma-separated, e.g. 3,4,5,6,8,10,20")
    bench.add_argument(
        "--variants", type=_names, default=BenchConfig.variants, help=f"comma-separated from: {', '.join(VARIANTS)}"
    )
    bench.add_argument("--samples", type=_int_in(2, 10**7), default=BenchConfig.samples, help="per cell and seed")
    bench.add_argument("--seeds", type=_ints, default=BenchConfig.seeds, help="comma-separated")
    bench.add_argument(
        "--batch", type=_int_in(1, Limits.max_batch), default=BenchConfig.batch, help="also the Stein batch"
    )
    bench.add_argument("--probes", type=_int_in(1, Limits.max_probes), default=BenchConfig.probes)
    bench.add_argument("--products", choices=PROBE_PRODUCTS, default=BenchConfig.products, help=PRODUCTS_HELP)
    bench.add_argument(
        "--reference-samples", type=_int_in(0, 10**7), default=BenchConfig.reference_samples, help="err_ref on these"
    )
    bench.add_argument(
        "--reference-log-step", type=_positive, help="RK4 step in log sigma (default: 0.025 exact, 0.1 networks)"
    )
    bench.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for results.{json,csv,md} and metric.png, and the saved cells a rerun resumes from",
    )
    bench.add_argument(
        "--fresh", action="store_true", help="discard the cells saved in --out by an earlier run and start over"
    )
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--half", action="store_true", help="diffusers models on CUDA: the network in float16")

    cost = commands.add_parser("cost", help="time per step and peak memory of vanilla vs the Stein variants")
    cost.add_argument("--model", default="mnist", help=f"one of: {', '.join(MODELS)}")
    cost.add_argument("--solver", default="dpmpp_2m")
    cost.add_argument("--schedule", default="karras")
    cost.add_argument("--nfe", type=_int_in(1, Limits.max_nfe), default=5)
    cost.add_argument("--batch", type=_int_in(1, Limits.max_batch), default=64)
    cost.add_argument("--variants", type=_names, default=("stein",), help="comma-separated Stein variants")
    cost.add_argument("--probes", type=_ints, default=(1, 5), help="comma-separated probe counts K")
    cost.add_argument("--repeats", type=_int_in(1, 1000), default=3)
    cost.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    clf = commands.add_parser("train-classifier", help="train the FD-MNIST classifier and its reference statistics")
    clf.add_argument("--epochs", type=_int_in(1, 1000), default=15)
    clf.add_argument("--seed", type=_int_in(0, 2**63 - 1), default=0)
    return parser


def experiment_from_args(args: argparse.Namespace, catalog: ModelCatalog) -> Experiment:
    """The :class:`Experiment` described by ``sample``'s arguments (settings validated on construction)."""
    image = catalog.kind(args.model) == "image"
    stein = stein_config(  # validated even without --stein: a bad setting is an error either way
        args.rule,
        gamma_min=args.gamma_min,
        gamma_max=args.gamma_max,
        probes=args.probes,
        probe=args.probe,
        products=args.products,
        coords=args.coords,
        variant=args.variant,
    )
    return Experiment(
        model=args.model,
        solver=args.solver,
        schedule=args.schedule,
        nfe=args.nfe,
        batch=args.batch,
        seed=args.seed,
        stein=stein if args.stein else None,
        options=SolverOptions(
            lower_order_final=not args.no_lower_order_final,
            unipc_order=args.unipc_order,
            unipc_variant=args.unipc_variant,
            unipc_corrector=not args.no_unipc_corrector,
        ),
        diagnostics=DiagnosticsConfig(
            lipschitz=not args.no_lipschitz,
            lipschitz_samples=args.lipschitz_samples,
            lipschitz_iters=args.lipschitz_iters,
            lipschitz_batch=args.lipschitz_batch,
            reference=not args.no_reference,
            reference_samples=args.reference_samples or (64 if image else None),
            jacobian_mode=args.jacobian_mode,
        ),
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        device=args.device,
        dtype=args.dtype,
        score=not args.no_score,
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output path that cannot be written now, before the run, rather than lose the run after it."""
    if args.command == "sample":
        for option in ("out", "grid"):
            if getattr(args, option) is not None:
                check_file(getattr(args, option), f"--{option}")
        if args.out is not None and args.grid is not None and args.out.resolve() == args.grid.resolve():
            raise ValueError("--out and --grid name the same file")
    elif args.command == "bench":
        check_folder(args.out, "--out")
    elif args.command == "train":
        check_folder(args.out, "--out")
        if args.export is not None:
            check_file(args.export, "--export")


def run_sample(args: argparse.Namespace) -> tuple[dict, bytes | None]:
    """Run the comparison described by parsed arguments: the JSON, and the grid's PNG if asked (written by the
    caller with the JSON, once both exist)."""
    catalog = ModelCatalog(any_diffusers=True, half=args.half)
    experiment = experiment_from_args(args, catalog)
    if args.grid is not None and catalog.kind(args.model) != "image":
        raise ValueError("--grid needs an image model")
    result = run_experiment(experiment, catalog)
    grid = None
    if args.grid is not None:
        grids = [image_grid(result.model.decode(run.samples[:64]), scale=2) for run in result.runs().values()]
        grid = png_bytes(side_by_side(grids))
    return result.to_json(), grid


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_summary(out: dict) -> None:
    """A per-step table of what the correction did, and the final errors."""
    runs = [name for name in ("vanilla", "stein") if name in out]
    cfg = out["config"]
    print(
        f"{cfg['model']} {cfg['solver']} {cfg['schedule']} steps={cfg['steps']} batch={cfg['batch']} seed={cfg['seed']}"
    )
    columns = ("run", "k", "sigma", "->", "nfe", "gamma_raw", "gamma", "L_max", "err_ref")
    widths = (-8, 2, 8, 8, 3, 10, 8, 7, 9)
    print(" ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for name in runs:
        for r in out[name]["trace"]:
            print(
                f"{name:8} {r['step']:>2} {r['sigma']:>8.4g} {r['sigma_next']:>8.4g} {r['nfe']:>3} "
                f"{_fmt(r['gamma_raw']):>10} {_fmt(r['gamma']):>8} {_fmt(r['lipschitz_max']):>7} "
                f"{_fmt(r['err_ref']):>9}"
            )
    for name in runs:
        final = out[name]["final"]
        fd = f" FD-MNIST={_fmt(final['fd_mnist'])}" if "fd_mnist" in final else ""
        print(
            f"{name}: nfe_total={out[name]['nfe_total']} final err_ref={_fmt(final['err_ref'])}{fd} "
            f"non-finite samples={final['nonfinite_samples']}"
        )


def run_train(args: argparse.Namespace) -> int:
    """Train (or resume) and report where the weights went."""
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    trained = train(args.model, config, args.out, export=args.export, device=args.device, resume=args.resume)
    print(json.dumps(trained.info, indent=1))
    if args.export is not None:
        print(f"wrote {args.export}")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    """The sweep, sharded over torchrun's processes when started under it; rank 0 writes the files."""
    config = BenchConfig(
        model=args.model,
        solvers=args.solvers,
        schedules=args.schedules,
        nfe=args.nfe,
        variants=args.variants,
        samples=args.samples,
        seeds=args.seeds,
        batch=args.batch,
        probes=args.probes,
        products=args.products,
        reference_samples=args.reference_samples,
        reference_log_step=args.reference_log_step,
    )
    catalog = ModelCatalog(any_diffusers=True, half=args.half)
    if not catalog.accepts(args.model):
        raise ValueError(f"unknown model {args.model!r}; choose from {', '.join(catalog.names())}")
    check_device(args.device)
    shard = distributed.start(args.device)
    folder = None
    cells = len(config.seeds) * len(config.solvers) * len(config.schedules) * len(config.nfe) * len(config.variants)
    start = math.nan  # the sweep's start, once the model is loaded
    try:
        opened: tuple[dict, str] = ({}, "")
        if shard.is_main:  # rank 0 alone reads and writes the folder; every rank skips the cells it holds
            try:
                settings = {"device": torch.device(args.device).type, "half": args.half}
                folder = open_sweep(args.out, config, settings, fresh=args.fresh)
                opened = (dict(folder.done), "")
            except (ValueError, WriteError) as err:
                opened = ({}, str(err))
        done, problem = distributed.gather(opened, shard)[0]
        if problem:
            raise ValueError(problem)
        if done and shard.is_main:
            print(f"resuming: {len(done)} of {cells} cells saved in {args.out} (--fresh starts over)", file=sys.stderr)
        model = catalog.get(args.model, shard.device)
        metric = quality_metric(args.model, model)
        per_rank = len(range(shard.rank, config.blocks, shard.world))
        bar = tqdm(
            total=cells * per_rank, initial=len(done) * per_rank, desc=f"bench {args.model}", disable=not shard.is_main
        )
        with bar:
            start = time.perf_counter()
            save = folder.save if folder is not None else None
            results = run_bench(config, model, metric, shard, on_block=bar.update, done=done, on_cell=save)
        if folder is not None:
            launcher = (
                "python -m steindiff " if shard.world == 1 else f"torchrun --nproc_per_node={shard.world} -m steindiff "
            )
            seconds = time.perf_counter() - start
            facts = {
                "machine": machine_description(shard),
                "processes": shard.world,
                "wall time": f"{folder.earlier_s + seconds:.0f} s",
                "command": launcher + " ".join(args.argv),
            }
            paths = write_outputs(config, results, args.out, facts)
            folder.close("complete", seconds)
            print(paths["results.md"].read_text())
            print("wrote " + ", ".join(str(p) for p in paths.values()))
    except KeyboardInterrupt:
        if folder is not None:
            with contextlib.suppress(WriteError):
                folder.close("incomplete", 0.0 if math.isnan(start) else time.perf_counter() - start)
            print(
                f"steindiff: interrupted: {len(folder.done)} of {cells} cells saved in {folder.cells_path}; "
                "run the same command again to resume (--fresh starts over)",
                file=sys.stderr,
            )
        return INTERRUPTED
    finally:
        distributed.stop(shard)
    return 0


def run_cost(args: argparse.Namespace) -> int:
    """Print the cost table."""
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose from {', '.join(MODELS)}")
    check_device(args.device)
    rows = measure_cost(
        args.model,
        args.solver,
        args.schedule,
        args.nfe,
        args.batch,
        cost_cases(list(args.variants), list(args.probes)),
        args.repeats,
        args.device,
    )
    print(
        f"{args.model}, {args.solver}, {args.schedule}, NFE {args.nfe}, batch {args.batch}; "
        f"{machine_description(distributed.Shard(0, 1, args.device))}, {torch.get_num_threads()} torch threads\n"
    )
    print(cost_table(rows))
    return 0


def machine_description(shard: distributed.Shard) -> str:
    """The device in words, for the record beside every figure."""
    if shard.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(shard.device)} x {shard.world}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_outputs(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "bench":
            return run_bench_command(args)
        if args.command == "cost":
            return run_cost(args)
        if args.command == "train-classifier":
            print(json.dumps(train_classifier(epochs=args.epochs, seed=args.seed), indent=1))
            return 0
        out, grid = run_sample(args)
        print_summary(out)
        files = {args.out: json.dumps(out, indent=1, allow_nan=False)} if args.out is not None else {}
        if grid is not None:
            files[args.grid] = grid
        write_files(files)
    except (ValueError, WriteError) as err:
        parser.exit(2, f"steindiff: error: {err}\n")
    except KeyboardInterrupt:
        if args.command != "sample":
            parser.exit(INTERRUPTED, "steindiff: interrupted\n")
        kept = [str(p) for p in (args.out, args.grid) if p is not None and p.exists()]
        left = f"; {', '.join(kept)} left as an earlier run wrote {'them' if len(kept) > 1 else 'it'}" if kept else ""
        parser.exit(INTERRUPTED, f"steindiff: interrupted: nothing written{left}\n")
    for path in files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
