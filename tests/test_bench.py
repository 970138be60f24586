"""The benchmark: per-sample seeds, sharding over torchrun processes, metrics, files, and the cost table."""

import csv
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from steindiff.bench.cost import cost_cases, measure_cost
from steindiff.bench.distributed import Shard
from steindiff.bench.metrics import load_classifier, score_digits
from steindiff.bench.quality import DigitQuality, PointQuality, quality_metric, sliced_wasserstein
from steindiff.bench.report import markdown_table, metric_figure, verdicts, write_outputs
from steindiff.bench.sweep import BenchConfig, run_bench, summarise
from steindiff.cli import main
from steindiff.correction.divergence import divergence
from steindiff.denoisers import load_model
from steindiff.noise import initial_noise

ALONE = Shard(0, 1, "cpu")
ROOT = Path(__file__).resolve().parent.parent


def _ring_config(**changes) -> BenchConfig:
    base = {
        "model": "gmm-ring",
        "solvers": ("dpmpp_2m", "heun"),
        "schedules": ("karras",),
        "nfe": (3, 9),
        "variants": ("vanilla", "stein"),
        "samples": 96,
        "seeds": (0, 1),
        "batch": 32,
        "probes": 2,
        "reference_samples": 40,
    }
    return BenchConfig(**{**base, **changes})


#: the facts of a sweep folder written by a test
FACTS = {"machine": "test", "processes": 1, "wall time": "1 s", "command": "bench"}


def _results_page():
    """benchmarks/results.py as a module."""
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "benchmarks" / "results.py")
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)
    return page


def _run(config: BenchConfig):
    model = load_model(config.model)
    return run_bench(config, model, quality_metric(config.model, model), ALONE)


def test_sliced_wasserstein_is_zero_on_itself_and_grows_with_a_shift():
    points = load_model("gmm-ring").sample(4000, torch.Generator().manual_seed(0))
    other = load_model("gmm-ring").sample(4000, torch.Generator().manual_seed(1))
    assert sliced_wasserstein(points, points) < 1e-12
    same_law = sliced_wasserstein(other, points)
    shifted = [sliced_wasserstein(other + torch.tensor([s, 0.0], dtype=torch.float64), points) for s in (0.5, 2.0)]
    assert same_law < 0.1 < shifted[0] < shifted[1]
    assert abs(shifted[1] - 2.0 * math.sqrt(0.5)) < 0.1  # a shift by s moves each projection by s cos(theta)
    bad = other.clone()
    bad[3, 1] = math.nan
    assert sliced_wasserstein(bad, points) == math.inf


def test_metrics_pick_the_truth_of_each_model():
    assert isinstance(quality_metric("mnist", load_model("mnist")), DigitQuality)
    trained = quality_metric("mlp-moons", load_model("mlp-moons"))
    exact = quality_metric("gmm-moons", load_model("gmm-moons"))
    assert isinstance(trained, PointQuality) and torch.equal(trained.truth, exact.truth)
    assert quality_metric("empirical-digits", load_model("empirical-digits")) is None


def test_digit_metric_from_features_equals_the_direct_score():
    samples = torch.rand(40, 1, 28, 28) * 2 - 1
    metric = DigitQuality(load_classifier())
    direct = score_digits(samples, metric.classifier)
    halves = torch.cat([metric.features(samples[:13]), metric.features(samples[13:])])
    scores = metric.score(halves)
    assert scores["fd_mnist"] == pytest.approx(direct.fd, rel=1e-6)  # float32 convs over other batches
    assert scores["confidence"] == pytest.approx(direct.confidence, rel=1e-6)


def test_batched_probes_give_the_loop_estimate():
    model = load_model("mnist")
    x = initial_noise(3, model.event_shape, 2.0, 0).requires_grad_(True)
    t = 0.5 * x + model(x, torch.full((3,), 2.0))
    loop = divergence(t, x, "rademacher", 3, torch.Generator().manual_seed(5), 0.5)
    batched = divergence(t, x, "rademacher", 3, torch.Generator().manual_seed(5), 0.5, batched=True)
    assert torch.allclose(loop.per_sample, batched.per_sample, rtol=1e-5, atol=1e-3)
    assert batched.batch_se == pytest.approx(loop.batch_se, rel=1e-4)


@pytest.mark.slow
def test_sweep_scores_every_cell_and_the_reference_error_falls_with_nfe():
    config = _ring_config(variants=("vanilla", "stein", "stein-safe"))
    results = _run(config)
    assert len(results) == 2 * 2 * 3 * 2  # solvers x nfe x variants x seeds
    rows = {(r["solver"], r["nfe"], r["variant"]): r for r in summarise(results)}
    for solver in config.solvers:
        coarse, fine = rows[(solver, 3, "vanilla")], rows[(solver, 9, "vanilla")]
        assert fine["err_ref"] < coarse["err_ref"] and fine["sw2"] < coarse["sw2"]
    assert rows[("heun", 9, "vanilla")]["nfe_realised"] == 9 and rows[("heun", 3, "vanilla")]["nfe_realised"] == 3
    assert rows[("dpmpp_2m", 9, "stein")]["gamma_raw_max"] > 1  # the literal rule's raw gamma, recorded
    assert rows[("dpmpp_2m", 9, "vanilla")]["gamma_raw_max"] is None
    assert rows[("dpmpp_2m", 9, "vanilla")]["gamma_moved"] is None
    assert all(r.gamma_moved == 1 for r in results if r.variant == "stein")  # the literal rule never gives 1
    # gamma_moved counts the steps the coefficient changed: a run where it stayed at 1 is vanilla's, bit for bit
    vanilla = {(r.solver, r.nfe, r.seed): r for r in results if r.variant == "vanilla"}
    safe = [r for r in results if r.variant == "stein-safe"]
    assert {r.gamma_moved == 0 for r in safe} == {True, False}
    for r in safe:
        base = vanilla[(r.solver, r.nfe, r.seed)]
        assert (r.gamma_moved == 0) == (r.scores == base.scores and r.err_ref == base.err_ref)


@pytest.mark.slow
def test_vanilla_samples_do_not_depend_on_the_batch_size():
    changes = {"variants": ("vanilla",), "seeds": (3,), "solvers": ("heun",)}
    small, large = _run(_ring_config(batch=7, **changes)), _run(_ring_config(batch=96, **changes))
    for a, b in zip(small, large, strict=True):
        assert a.scores["sw2"] == pytest.approx(b.scores["sw2"], rel=1e-6)
        assert a.err_ref == pytest.approx(b.err_ref, rel=1e-6)


def test_bad_sweeps_are_refused():
    for bad in ({"variants": ("magic",)}, {"nfe": (0,)}, {"samples": 1}, {"solvers": ("rk9",)}, {"seeds": ()}):
        with pytest.raises(ValueError):
            _ring_config(**bad)


@pytest.mark.slow
def test_outputs_hold_every_row_and_a_plot(tmp_path):
    config = _ring_config(nfe=(3,), seeds=(0,), samples=32)
    results = _run(config)
    paths = write_outputs(config, results, tmp_path, {"machine": "test"})
    document = json.loads(paths["results.json"].read_text())
    assert len(document["per_seed"]) == len(results) == 4
    with paths["results.csv"].open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    table = paths["results.md"].read_text()
    assert "| heun | karras | 3 |" in table and "sw2 stein" in table
    assert paths["metric.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_tallies_count_a_repeated_run_once():
    """Heun asked for NFE 4 runs the NFE 3 grid: that cell repeats a run, named in the verdict, not counted."""
    rows = summarise(_run(_ring_config(nfe=(3, 4), seeds=(0,), samples=32)))
    heun = [r for r in rows if r["solver"] == "heun" and r["variant"] == "stein"]
    assert [r["nfe_realised"] for r in heun] == [3, 3] and heun[0]["sw2"] == heun[1]["sw2"]
    (line,) = verdicts(rows)
    assert " of 3 runs, " in line and "1 more cell repeats one of them" in line  # 2M at NFE 3 and 4, Heun's 3


@pytest.mark.slow
def test_the_plot_legend_names_every_variant_and_schedule_whichever_panel_holds_them():
    config = _ring_config(nfe=(3,), seeds=(0,), samples=32, schedules=("karras", "logsnr"))
    rows = [r for r in summarise(_run(config)) if not (r["solver"] == "heun" and r["variant"] == "stein")]
    figure = metric_figure(rows, "test")
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["vanilla", "stein", "karras", "logsnr"]
    first, last = figure.axes[:2]
    assert len(first.lines) > len(last.lines) > 0  # heun's panel lacks stein
    plt.close(figure)


@pytest.mark.slow
def test_sweeps_run_in_pieces_merge_into_the_whole_sweep(tmp_path):
    """benchmarks/results.py --merge: pieces by solver (and, for one solver, by variant), on two machines
    and merged in two rounds, give the summary of the sweep run at once."""
    page = _results_page()
    whole = _ring_config(nfe=(3,), seeds=(0,), samples=32, variants=("vanilla", "stein", "stein-cap1"))
    first, second = whole.solvers
    pieces = {
        first: {"solvers": (first,)},
        f"{second}-required": {"solvers": (second,), "variants": ("vanilla", "stein")},
        f"{second}-more": {"solvers": (second,), "variants": ("stein-cap1",)},  # run later, without vanilla
    }
    for name, changes in pieces.items():
        piece = dataclasses.replace(whole, **changes)
        machine = "other machine" if name.endswith("-more") else "test"
        write_outputs(piece, _run(piece), tmp_path / name, {**FACTS, "machine": machine})
    older = tmp_path / first / "results.json"  # made before `products` replaced `batched_probes`
    document = json.loads(older.read_text())
    document["config"]["batched_probes"] = document["config"].pop("products") == "vjp-batched"
    older.write_text(json.dumps(document))
    names = list(pieces)
    page.merge("gmm-ring", [tmp_path / name for name in names[:2]], tmp_path / "earlier")
    page.merge("gmm-ring", [tmp_path / "earlier", tmp_path / names[2]], tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["config"]["solvers"] == list(whole.solvers) and merged["config"]["variants"] == list(whole.variants)
    assert merged["facts"]["wall time"] == "3 s in 3 bench runs"
    assert merged["facts"]["machine"] == "test and other machine"
    assert merged["facts"]["command"] == "bench; bench; bench"

    def timeless(rows):
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]

    assert timeless(merged["summary"]) == timeless(json.loads(json.dumps(summarise(_run(whole)))))
    with pytest.raises(SystemExit, match="differ in samples"):
        other = _ring_config(nfe=(3,), seeds=(0,), samples=64, solvers=("heun",))
        write_outputs(other, _run(other), tmp_path / "other", FACTS)
        page.merge("gmm-ring", [tmp_path / first, tmp_path / "other"], tmp_path / "merged")
    with pytest.raises(SystemExit, match="more than one folder"):
        page.merge("gmm-ring", [tmp_path / first, tmp_path / first], tmp_path / "merged")


@pytest.mark.slow
def test_missing_names_each_piece_with_only_the_variants_it_lacks(tmp_path, monkeypatch, capsys):
    """benchmarks/results.py --missing, which gpu_session.sh runs pieces from: a later piece must hold only the
    variants a solver and schedule lack, as a merge refuses a cell held twice; on a solver with its own
    look-ahead corrector `stein-safe` is the run `sc-lookahead` makes, so holding one holds both."""
    page = _results_page()
    held = _ring_config(solvers=("ddim", "unipc"), nfe=(3,), seeds=(0,), samples=16, variants=("vanilla", "stein-safe"))
    write_outputs(held, _run(held), tmp_path / "sweep", FACTS)
    wanted = "stein-safe,sc-noise,sc-lookahead"
    monkeypatch.setattr(sys, "argv", ["results.py", "--missing", str(tmp_path / "sweep"), "--variants", wanted])
    page.main()
    lines = capsys.readouterr().out.splitlines()
    assert "ddim-karras sc-noise,sc-lookahead" in lines  # stein-safe is held
    assert "unipc-karras sc-noise" in lines  # stein-safe is held, and on UniPC it is sc-lookahead
    assert f"heun-logsnr {wanted}" in lines  # a piece not run at all lacks all three
    assert len(lines) == len(page.FULL["solvers"]) * len(page.FULL["schedules"])
    monkeypatch.setattr(sys, "argv", ["results.py", "--missing", str(tmp_path / "sweep"), "--variants", "vanilla"])
    page.main()
    assert "ddim-karras" not in capsys.readouterr().out


def test_the_tallies_say_how_often_gamma_moved_and_in_how_many_runs_it_was_recorded():
    """Sweeps made before gamma_moved was recorded merge with newer ones: the share is over the runs that hold it."""
    row = {"solver": "ddim", "schedule": "karras", "seeds": 1, "err_ref": 1.0, "err_ref_std": 0.0}
    three, five = {**row, "nfe": 3, "nfe_realised": 3}, {**row, "nfe": 5, "nfe_realised": 5}
    rows = [{**cell, "variant": "vanilla", "gamma_moved": None} for cell in (three, five)]
    rows += [{**three, "variant": "stein-safe", "gamma_moved": 0.25}]
    (line,) = verdicts([*rows, {**five, "variant": "stein-safe", "gamma_moved": 0.75}])
    assert line.endswith("gamma moved off 1 at 50% of the steps (25-75% a run).")
    (line,) = verdicts([*rows, {**five, "variant": "stein-safe", "gamma_moved": None}])
    assert line.endswith("gamma moved off 1 at 25% of the steps (25-25% a run, recorded in 1 of 2 runs).")
    (line,) = verdicts([*rows[:2], {**three, "variant": "stein-safe", "gamma_moved": None}])
    assert "gamma moved" not in line


def test_markdown_marks_non_finite_and_diverged_cells():
    row = {"solver": "ddim", "schedule": "karras", "nfe": 3, "nfe_realised": 3, "nonfinite": 0, "err_ref": 0.5}
    table = markdown_table(
        [
            {**row, "variant": "vanilla", "sw2": 0.25, "sw2_std": 0.01},
            {**row, "variant": "stein", "sw2": math.inf, "sw2_std": math.nan, "nonfinite": 3},
        ]
    )
    assert "0.25 ± 0.01" in table and "diverged †" in table


def test_bench_command_refuses_bad_input(tmp_path, capsys):
    bad = (["--variants", "vanilla,nope"], ["--nfe", "3,x"], ["--model", "nope"], ["--device", "tpu"])
    for extra in bad:
        argv = ["bench", "--model", "gmm-ring", "--samples", "8", "--out", str(tmp_path), *extra]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("steindiff: error:") and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_two_torchrun_processes_give_the_single_process_numbers(tmp_path):
    args = [
        "-m",
        "steindiff",
        "bench",
        "--model",
        "mnist",
        "--solvers",
        "dpmpp_2m",
        "--schedules",
        "karras",
        "--nfe",
        "2",
        "--variants",
        "vanilla,stein",
        "--samples",
        "10",
        "--seeds",
        "0,1",
        "--batch",
        "3",
        "--probes",
        "1",
        "--reference-samples",
        "4",
        "--reference-log-step",
        "0.5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for launcher, out in (([sys.executable], "one"), (torchrun, "two")):
        done = subprocess.run(
            [*launcher, *args, "--out", str(tmp_path / out)], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert two["facts"]["processes"] == 2 and one["facts"]["processes"] == 1
    for a, b in zip(one["per_seed"], two["per_seed"], strict=True):
        for key in ("fd_mnist", "confidence", "err_ref", "gamma_raw_max", "nonfinite", "nfe_realised"):
            assert a[key] == (None if b[key] is None else pytest.approx(b[key], rel=1e-9)), key


@pytest.mark.slow
def test_cost_table_compares_every_case_to_vanilla():
    cases = cost_cases(["stein", "stein-cap1"], [1, 3])
    labels = [c.label for c in cases]
    assert labels[0] == "vanilla" and len(labels) == 11  # per variant: K = 1 vjp and fd; K = 3 also batched VJPs
    assert {"stein, K = 3, batched VJPs", "stein, K = 1, fd probes", "stein-cap1, K = 3, fd probes"} <= set(labels)
    assert [c.stein.products for c in cases[1:6]] == ["vjp", "fd", "vjp", "vjp-batched", "fd"]
    rows = measure_cost("mlp-ring", "dpmpp_2m", "karras", 4, 256, cases[:3], repeats=1)
    assert rows[0].time_ratio == 1.0
    assert rows[0].memory_ratio == 1.0 or math.isnan(rows[0].memory_ratio)  # nan: vanilla needed no new memory
    assert all(r.time_per_step_s > 0 and r.peak_mb >= 0 for r in rows)
    with pytest.raises(ValueError, match="unknown variant"):
        cost_cases(["nope"], [1])
