"""The benchmark sweep: quality, error to the reference, NFE and time for every solver x schedule x NFE x variant.

Samples are made in blocks of ``batch`` consecutive sample indices. Sample i of seed s starts from the
noise of (s, i) alone (:func:`steindiff.noise.initial_noise`) and block b draws its Hutchinson
probes from (s, b), so every block is the same computation whatever process runs it: under
``torchrun`` rank r takes blocks r, r + W, r + 2W, ...; the per-sample features are gathered in block
order and scored once, so W processes give the single-process numbers. The batch-statistic
correction (variant "batch") uses the block as its batch: the batch size is part of that method,
and changing it changes the Stein samples (never the vanilla ones).

err_ref is the mean distance of the final samples to the RK4 reference solution of the probability
flow ODE from the same noise (:mod:`steindiff.diagnostics.reference`), on the first ``reference_samples`` samples
of each seed. It is computed once per seed and shared by every cell.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from steindiff.bench.distributed import Shard, gather
from steindiff.bench.quality import QualityMetric
from steindiff.correction.rule import STEIN_VARIANTS, VANILLA, ProbeProducts, SteinConfig, stein_config
from steindiff.denoisers import Denoiser, prepare_for_device
from steindiff.diagnostics.reference import flow_map
from steindiff.limits import Limits
from steindiff.noise import derived_seeds, initial_noise
from steindiff.records import DiagnosticsConfig, RunResult
from steindiff.sampling import sample, takes_functorch
from steindiff.schedules import SCHEDULES, make_sigmas
from steindiff.solvers import get_solver

__all__ = ["VARIANTS", "BenchConfig", "CellResult", "as_records", "run_bench", "summarise"]

#: "vanilla" and the named settings of the correction
VARIANTS = (VANILLA, *STEIN_VARIANTS)
BLOCK_STREAM = 3


@dataclass(frozen=True)
class BenchConfig:
    """One sweep: the cells are solvers x schedules x nfe x variants, each repeated for every seed."""

    model: str
    solvers: tuple[str, ...] = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun")
    schedules: tuple[str, ...] = ("karras", "logsnr")
    nfe: tuple[int, ...] = (3, 4, 5, 6, 8, 10, 20)
    variants: tuple[str, ...] = ("vanilla", "stein", "stein-cap1")
    samples: int = 2000
    seeds: tuple[int, ...] = (0, 1, 2)
    batch: int = 64
    probes: int = SteinConfig.probes
    products: ProbeProducts = "vjp"
    reference_samples: int = 64
    reference_log_step: float | None = None

    def __post_init__(self) -> None:
        for solver in self.solvers:
            get_solver(solver)
        for schedule in self.schedules:
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        for variant in self.variants:
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        for nfe in self.nfe:
            if not 1 <= nfe <= Limits.max_nfe:
                raise ValueError(f"nfe must be between 1 and {Limits.max_nfe}, got {nfe}")
        if not all((self.solvers, self.schedules, self.nfe, self.variants, self.seeds)):
            raise ValueError("solvers, schedules, nfe, variants and seeds must each name at least one value")
        if self.samples < 2 or self.batch < 1 or self.reference_samples < 0:
            raise ValueError("need samples >= 2, batch >= 1 and reference_samples >= 0")
        if self.reference_log_step is not None and not self.reference_log_step > 0:
            raise ValueError(f"reference_log_step must be > 0, got {self.reference_log_step}")
        if any(not 0 <= seed < 2**63 for seed in self.seeds):
            raise ValueError("seeds must be between 0 and 2**63 - 1")
        SteinConfig(probes=self.probes, products=self.products)  # validates the probe settings

    @property
    def blocks(self) -> int:
        return math.ceil(self.samples / self.batch)


@dataclass
class CellResult:
    """One cell for one seed: the model's quality scores, err_ref, NFE, divergence and time."""

    solver: str
    schedule: str
    nfe: int
    variant: str
    seed: int
    samples: int
    nfe_realised: int
    scores: dict[str, float]
    err_ref: float | None
    nonfinite: int
    gamma_raw_max: float | None
    wall_s: float
    #: of the steps where the rule ran (over all blocks), the share whose applied gamma was not 1: where the
    #: Stein coefficient changed the solver's step (None: vanilla, or a sweep made before this was recorded)
    gamma_moved: float | None = None

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """Which cell and seed this is: what a resumed sweep looks up to skip it."""
        return (self.solver, self.schedule, self.nfe, self.variant, self.seed)


def _block_seed(seed: int, block: int) -> int:
    return derived_seeds([(seed, BLOCK_STREAM, block)])[0]


@dataclass
class _Block:
    """What one block of one cell contributes: per-sample features and errors, and its extremes."""

    index: int
    features: torch.Tensor | None
    errors: torch.Tensor
    nonfinite: int
    gamma_raw_max: float | None
    nfe: int
    gamma_moves: tuple[int, int]


def _reference_finals(
    model: Denoiser, noise: torch.Tensor, sigma_min: float, log_step: float, count: int
) -> torch.Tensor:
    """The ODE solution at sigma = 0 from the first ``count`` unit noises, started at the model's sigma_max:
    RK4 to sigma_min, then on to 1% of it and a denoising step (the integration of the published tables)."""
    if count == 0:
        return noise[:0]
    x = (model.sigma_max * noise[:count]).to(torch.float32)
    with torch.no_grad():
        return flow_map(model, flow_map(model, x, model.sigma_max, sigma_min, log_step), sigma_min, 0.0, log_step)


def _seed_inputs(
    config: BenchConfig, model: Denoiser, seed: int, mine: range, device: str, log_step: float
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per block of this rank: the unit noise of ``seed``'s samples, and the reference solutions from the first
    ``config.reference_samples`` of them."""
    noises, references = {}, {}
    for b in mine:
        first = b * config.batch
        size = min(config.batch, config.samples - first)
        # unit noise in float64: x_T = sigma_0 eps is formed per grid, as initial_noise forms it
        noises[b] = initial_noise(size, model.event_shape, 1.0, seed, torch.float64, device, first)
        count = max(0, min(size, config.reference_samples - first))
        references[b] = _reference_finals(model, noises[b], model.sigma_min, log_step, count)
    return noises, references


def run_bench(
    config: BenchConfig,
    model: Denoiser,
    metric: QualityMetric | None,
    shard: Shard,
    on_block: Callable[[], None] | None = None,
    done: Mapping[tuple, CellResult] | None = None,
    on_cell: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    """Run the sweep on this rank's share of blocks; every rank returns the full, identical results.

    ``on_block`` is called after each block this rank finishes (for a progress bar), ``on_cell`` with each cell
    once all ranks finished it (to save it). Cells in ``done`` (by :attr:`CellResult.key`, the same on every
    rank) are taken as they are, not run: every cell depends only on its own key, so a resumed sweep gives the
    uninterrupted one's results, and a seed whose cells are all done skips its reference solutions too.
    """
    device = shard.device
    prepare_for_device(model, device, takes_functorch(config.products))
    sigma_min, sigma_max = model.sigma_min, model.sigma_max
    log_step = config.reference_log_step or (0.025 if model.exact else 0.1)
    mine = range(shard.rank, config.blocks, shard.world)
    no_diagnostics = DiagnosticsConfig(lipschitz=False, reference=False)
    done = done or {}
    results = []
    for seed in config.seeds:
        noises = references = None  # made when this seed's first cell to run needs them
        for solver in config.solvers:
            spec = get_solver(solver)
            for schedule in config.schedules:
                for nfe in config.nfe:
                    sigmas = make_sigmas(schedule, spec.steps_for_nfe(nfe), sigma_min, sigma_max)
                    for variant in config.variants:
                        key = (solver, schedule, nfe, variant, seed)
                        if key in done:
                            results.append(done[key])
                            continue
                        if noises is None or references is None:
                            noises, references = _seed_inputs(config, model, seed, mine, device, log_step)
                        stein = stein_config(variant, probes=config.probes, products=config.products)
                        start = time.perf_counter()
                        blocks = []
                        for b in mine:
                            run = sample(
                                model,
                                (float(sigmas[0]) * noises[b]).to(torch.float32),
                                sigmas,
                                spec,
                                stein=stein,
                                diagnostics=no_diagnostics,
                                seed=_block_seed(seed, b),
                                keep_states=False,
                            )
                            blocks.append(_summarise_block(b, run, references[b], metric))
                            if on_block is not None:
                                on_block()
                        elapsed = time.perf_counter() - start
                        gathered = gather((blocks, elapsed), shard)
                        results.append(_cell(config, key, gathered, metric))
                        if on_cell is not None:
                            on_cell(results[-1])
    return results


def _summarise_block(index: int, run: RunResult, reference: torch.Tensor, metric: QualityMetric | None) -> _Block:
    samples = run.samples
    finite = torch.isfinite(samples.flatten(1)).all(1)
    errors = (samples[: len(reference)].double() - reference.double()).flatten(1).norm(dim=1).cpu()
    raw = [v for r in run.trace if (v := r.value("gamma_raw")) is not None and not math.isnan(v)]
    return _Block(
        index,
        metric.features(samples) if metric is not None else None,
        errors,
        int((~finite).sum()),
        max(raw) if raw else None,  # an undefined (NaN) gamma falls back to 1 and is left out
        run.nfe_total,
        run.gamma_moves,
    )


def _cell(
    config: BenchConfig, key: tuple, gathered: list[tuple[list[_Block], float]], metric: QualityMetric | None
) -> CellResult:
    solver, schedule, nfe, variant, seed = key
    blocks = sorted((b for part, _ in gathered for b in part), key=lambda b: b.index)
    errors = torch.cat([b.errors for b in blocks])
    scores = metric.score(torch.cat([b.features for b in blocks])) if metric is not None else {}
    raws = [b.gamma_raw_max for b in blocks if b.gamma_raw_max is not None]
    rule_steps, moved_steps = (sum(counts) for counts in zip(*(b.gamma_moves for b in blocks), strict=True))
    return CellResult(
        solver=solver,
        schedule=schedule,
        nfe=nfe,
        variant=variant,
        seed=seed,
        samples=config.samples,
        nfe_realised=blocks[0].nfe,
        scores=scores,
        err_ref=float(errors.mean()) if len(errors) else None,
        nonfinite=sum(b.nonfinite for b in blocks),
        gamma_raw_max=max(raws) if raws else None,
        wall_s=max(elapsed for _, elapsed in gathered),
        gamma_moved=moved_steps / rule_steps if rule_steps else None,
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (inf or NaN propagate: a diverged seed shows)."""
    if any(not math.isfinite(v) for v in values):
        bad = [v for v in values if not math.isfinite(v)]
        return (math.nan if any(math.isnan(v) for v in bad) else math.inf), math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[CellResult]) -> list[dict[str, Any]]:
    """One row per cell: mean and standard deviation over seeds of every score and of err_ref."""
    cells: dict[tuple, list[CellResult]] = {}
    for r in results:
        cells.setdefault((r.solver, r.schedule, r.nfe, r.variant), []).append(r)
    rows = []
    for (solver, schedule, nfe, variant), group in cells.items():
        row: dict[str, Any] = {
            "solver": solver,
            "schedule": schedule,
            "nfe": nfe,
            "variant": variant,
            "seeds": len(group),
            "nfe_realised": group[0].nfe_realised,
            "nonfinite": sum(r.nonfinite for r in group),
            "wall_s": sum(r.wall_s for r in group),
        }
        for name in group[0].scores:
            row[name], row[f"{name}_std"] = _mean_std([r.scores[name] for r in group])
        errs = [r.err_ref for r in group if r.err_ref is not None]
        if errs:
            row["err_ref"], row["err_ref_std"] = _mean_std(errs)
        raws = [r.gamma_raw_max for r in group if r.gamma_raw_max is not None]
        row["gamma_raw_max"] = max(raws) if raws else None
        moved = [r.gamma_moved for r in group if r.gamma_moved is not None]
        row["gamma_moved"] = statistics.fmean(moved) if moved else None
        rows.append(row)
    return rows


def as_records(results: list[CellResult]) -> list[dict[str, Any]]:
    """Per-seed rows with the scores flattened, for CSV and JSON."""
    return [{**{k: v for k, v in asdict(r).items() if k != "scores"}, **r.scores} for r in results]
