import json
import os
import subprocess
import sys

import pytest
import torch

from steindiff.cli import main

EXAMPLE = [
    "sample",
    "--model",
    "gmm-ring",
    "--solver",
    "dpmpp_2m",
    "--schedule",
    "karras",
    "--nfe",
    "5",
    "--batch",
    "512",
    "--seed",
    "0",
    "--stein",
]
REQUIRED = {"sigma", "sigma_next", "gamma_raw", "gamma", "s_xu", "s_uu", "s_div", "lipschitz_max", "err_ref", "nfe"}


@pytest.mark.slow
def test_the_readme_example_runs_as_a_module(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "steindiff", *EXAMPLE, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["config"]["stein"]["trust_region"] and data["config"]["stein"]["noise_level"] == "cap"  # the default
    for run in ("vanilla", "stein"):
        assert data[run]["nfe_total"] == 5
        assert len(data[run]["trace"]) == 5
        assert all(set(step) >= REQUIRED for step in data[run]["trace"])
        assert data[run]["final"]["err_ref"] is not None
    assert "stein: nfe_total=5" in proc.stdout


def test_capped_run_records_what_the_correction_did(tmp_path, capsys):
    out = tmp_path / "capped.json"
    assert (
        main([*EXAMPLE, "--batch", "128", "--rule", "custom", "--gamma-max", "1", "--no-lipschitz", "--out", str(out)])
        == 0
    )
    data = json.loads(out.read_text())
    gammas = [step["gamma"] for step in data["stein"]["trace"]]
    raw = [step["gamma_raw"] for step in data["stein"]["trace"]]
    assert all(0.1 <= g <= 1 for g in gammas)
    assert raw[0] > 1 and gammas[0] == 1  # the rule asked for more than the cap allowed
    assert all(step["lipschitz_max"] is None for step in data["stein"]["trace"])


@pytest.mark.slow
def test_lipschitz_batch_changes_the_grouping_not_the_estimates(tmp_path, capsys):
    traces = []
    for size in ("4", "64"):
        out = tmp_path / f"lipschitz-{size}.json"
        args = [*EXAMPLE, "--batch", "64", "--lipschitz-samples", "4", "--lipschitz-batch", size, "--out", str(out)]
        assert main(args) == 0
        data = json.loads(out.read_text())
        assert data["config"]["diagnostics"]["lipschitz_batch"] == int(size)
        traces.append([step for run in ("vanilla", "stein") for step in data[run]["trace"]])
    for alone, together in zip(*traces, strict=True):
        for name in ("lipschitz_max", "lipschitz_flow_max"):
            assert alone[name] is not None and together[name] == pytest.approx(alone[name], rel=1e-4)
    with pytest.raises(SystemExit):
        main([*EXAMPLE, "--lipschitz-batch", "0"])


def test_vanilla_only_without_stein(capsys):
    assert main(["sample", "--model", "gmm-aniso", "--solver", "heun", "--nfe", "5", "--batch", "16"]) == 0
    printed = capsys.readouterr().out
    assert "vanilla: nfe_total=5" in printed and "stein:" not in printed


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--nfe", "0"], "--nfe"),
        (["--nfe", "100000"], "--nfe"),
        (["--batch", "-4"], "--batch"),
        (["--solver", "rk45"], "unknown solver 'rk45'"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--schedule", "cosine"], "unknown schedule 'cosine'"),
        (
            ["--rule", "custom", "--gamma-min", "2", "--gamma-max", "1"],
            "gamma_min (2.0) must not exceed gamma_max (1.0)",
        ),
        (["--rule", "custom", "--gamma-min", "nan"], "NaN"),
        (["--rule", "magic"], "--rule"),
        (["--coords", "vp"], "EDM coordinates"),
        (["--probes", "0"], "--probes"),
        (["--sigma-min", "5", "--sigma-max", "1"], "sigma_min (5.0) exceeds sigma_max (1.0)"),
        (["--device", "cuda:7"], "CUDA"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(extra, needle, capsys):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", "gmm-ring", "--batch", "8", "--no-lipschitz", *extra])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("steindiff: error:")
    assert needle in err


def test_mnist_grid_and_digit_scores(tmp_path, capsys):
    out, grid = tmp_path / "mnist.json", tmp_path / "grid.png"
    args = [
        "sample",
        "--model",
        "mnist",
        "--solver",
        "heun",
        "--nfe",
        "5",
        "--batch",
        "8",
        "--stein",
        "--rule",
        "custom",
        "--gamma-max",
        "1",
        "--probes",
        "1",
        "--products",
        "fd",
        "--no-lipschitz",
        "--no-reference",
        "--grid",
        str(grid),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["config"]["stein"]["products"] == "fd"
    for run in ("vanilla", "stein"):
        assert data[run]["final"]["fd_mnist"] > 0 and "confidence" not in data[run]["final"]
        assert f"FD-MNIST={data[run]['final']['fd_mnist']:.4g}" in printed  # on the console too
        assert sum(data[run]["final"]["classes"]) == 8
    from PIL import Image

    width, height = Image.open(grid).size
    assert width > 2 * height  # vanilla and Stein side by side


def test_grid_needs_an_image_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--model", "gmm-ring", "--batch", "8", "--no-lipschitz", "--grid", str(tmp_path / "g.png")])
    assert "--grid needs an image model" in capsys.readouterr().err
