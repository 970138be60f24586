"""The cost of the correction: wall time per step and peak memory of vanilla vs each Stein variant.

Same model, grid, noise and batch for every case; times are medians over ``repeats`` rounds in which
the cases take turns (so drift in the machine's speed hits them alike), after one warm-up call each.
Peak memory: on CUDA the allocator's peak above what was allocated before the run; on the CPU
(Linux) the process's peak resident size during the run above its size just before it, since the
CPU allocator keeps no statistics.
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from steindiff.correction.rule import STEIN_VARIANTS, VANILLA, SteinConfig, stein_config
from steindiff.denoisers import Denoiser, load_model, prepare_for_device
from steindiff.noise import initial_noise
from steindiff.records import DiagnosticsConfig
from steindiff.sampling import sample, takes_functorch
from steindiff.schedules import make_sigmas
from steindiff.solvers import get_solver

__all__ = ["CostCase", "CostRow", "cost_cases", "markdown_table", "measure_cost"]

NO_DIAGNOSTICS = DiagnosticsConfig(lipschitz=False, reference=False)


@dataclass(frozen=True)
class CostCase:
    """One sampler configuration to time: a label and its correction (None: vanilla)."""

    label: str
    stein: SteinConfig | None


@dataclass
class CostRow:
    """Median wall time per step and peak memory of a case, and both as ratios to vanilla."""

    label: str
    time_per_step_s: float
    time_ratio: float
    peak_mb: float
    memory_ratio: float


#: how the cost table names each way of computing the probe products (SteinConfig.products)
PRODUCT_LABELS = {"vjp": "", "vjp-batched": ", batched VJPs", "fd": ", fd probes"}


def cost_cases(variants: list[str], probe_counts: list[int]) -> list[CostCase]:
    """Vanilla, then every variant at every probe count K with VJP and forward-difference probes, and
    for K > 1 also with the K VJPs batched."""
    cases = [CostCase(VANILLA, None)]
    for variant in variants:
        if variant not in STEIN_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(STEIN_VARIANTS)}")
        for k in probe_counts:
            for products, suffix in PRODUCT_LABELS.items():
                if products != "vjp-batched" or k > 1:
                    config = stein_config(variant, probes=k, products=products)
                    cases.append(CostCase(f"{variant}, K = {k}{suffix}", config))
    return cases


@dataclass(frozen=True)
class _Setup:
    model: str
    solver: str
    schedule: str
    nfe: int
    batch: int
    device: str

    def build(self) -> tuple[Denoiser, torch.Tensor, torch.Tensor]:
        model = load_model(self.model).to(self.device)
        steps = get_solver(self.solver).steps_for_nfe(self.nfe)
        sigmas = make_sigmas(self.schedule, steps, model.sigma_min, model.sigma_max)
        noise = initial_noise(self.batch, model.event_shape, float(sigmas[0]), 0, device=self.device)
        return model, sigmas, noise


def _run(setup: _Setup, model: Denoiser, sigmas: torch.Tensor, noise: torch.Tensor, case: CostCase) -> float:
    """Seconds for one sampling run (synchronised on CUDA), the model prepared as for such a run
    (``prepare_for_device``)."""
    prepare_for_device(model, setup.device, takes_functorch(case.stein.products if case.stein else None))
    start = time.perf_counter()
    sample(model, noise, sigmas, setup.solver, stein=case.stein, diagnostics=NO_DIAGNOSTICS, keep_states=False)
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize(setup.device)
    return time.perf_counter() - start


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+) kB", handle.read()).group(1))


def _cpu_peak_mb(run: Callable[[], object]) -> float:
    """Peak resident memory of ``run()`` above the resident size before it (Linux: VmHWM, reset first).

    Free heap memory is first handed back to the system (``malloc_trim``), so memory the allocator
    kept from earlier runs does not hide this run's peak.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) / 1024


def _peak_mb(setup: _Setup, model: Denoiser, sigmas: torch.Tensor, noise: torch.Tensor, case: CostCase) -> float:
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        before = torch.cuda.memory_allocated(setup.device)
        _run(setup, model, sigmas, noise, case)
        return (torch.cuda.max_memory_allocated(setup.device) - before) / 2**20
    if not Path("/proc/self/clear_refs").exists():
        return math.nan  # the CPU peak is measured through Linux's /proc only
    return _cpu_peak_mb(lambda: _run(setup, model, sigmas, noise, case))


def measure_cost(
    model: str,
    solver: str,
    schedule: str,
    nfe: int,
    batch: int,
    cases: list[CostCase],
    repeats: int = 3,
    device: str = "cpu",
) -> list[CostRow]:
    """Time and memory of every case on the same model, grid, noise and batch; the first case is the baseline."""
    if repeats < 1 or batch < 1:
        raise ValueError("repeats and batch must be >= 1")
    setup = _Setup(model, solver, schedule, nfe, batch, device)
    denoiser, sigmas, noise = setup.build()
    steps = len(sigmas) - 1
    for case in cases:  # warm-up
        _run(setup, denoiser, sigmas, noise, case)
    times: dict[str, list[float]] = {case.label: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            times[case.label].append(_run(setup, denoiser, sigmas, noise, case) / steps)
    peaks = {case.label: _peak_mb(setup, denoiser, sigmas, noise, case) for case in cases}
    base_time, base_peak = statistics.median(times[cases[0].label]), peaks[cases[0].label]
    return [
        CostRow(
            case.label,
            statistics.median(times[case.label]),
            statistics.median(times[case.label]) / base_time,
            peaks[case.label],
            peaks[case.label] / base_peak if base_peak > 0 else math.nan,
        )
        for case in cases
    ]


def markdown_table(rows: list[CostRow]) -> str:
    """The cost table: time per step, peak memory, and both as ratios to the first row."""
    lines = [
        "| sampler | time / step (ms) | time ratio | peak memory (MB) | memory ratio |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {1000 * r.time_per_step_s:.1f} | {r.time_ratio:.2f} "
            f"| {r.peak_mb:.0f} | {r.memory_ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"
