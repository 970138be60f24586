"""diffusers models as denoisers, offline: tiny random pipelines made, saved and reloaded here."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from steindiff import load_model, sample  # noqa: E402
from steindiff.denoisers import WeightsError  # noqa: E402
from steindiff.denoisers.hub import HubDenoiser, load_diffusers  # noqa: E402
from steindiff.diagnostics.jacobians import jacobian_rows, local_lipschitz  # noqa: E402
from steindiff.experiment import Experiment, ModelCatalog  # noqa: E402
from steindiff.records import DiagnosticsConfig  # noqa: E402

F64 = torch.float64


def _tiny_unet(channels: int = 3, size: int = 8, seed: int = 0) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny-ddpm"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def latent_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny-ldm"
    torch.manual_seed(1)
    vqvae = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        num_vq_embeddings=32,
        sample_size=16,
    )
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    pipe = diffusers.LDMPipeline(vqvae=vqvae, unet=_tiny_unet(seed=2), scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _vp_start(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_vp * math.sqrt(1 + sigma * sigma)  # x = x_vp / alpha


@pytest.mark.slow
def test_ddim_on_the_discrete_timesteps_reproduces_diffusers_loop(pixel_folder):
    model = load_diffusers(str(pixel_folder))
    unet = diffusers.UNet2DModel.from_pretrained(pixel_folder, subfolder="unet", use_safetensors=True)
    scheduler = diffusers.DDIMScheduler.from_pretrained(
        pixel_folder, subfolder="scheduler", set_alpha_to_one=True, clip_sample=False
    )
    scheduler.set_timesteps(6)
    x_vp = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    state = x_vp.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            state = scheduler.step(unet(state, t).sample, t, state).prev_sample
    abar = scheduler.alphas_cumprod.to(F64)
    grid = [float(((1 - abar[int(t)]) / abar[int(t)]).sqrt()) for t in scheduler.timesteps] + [0.0]
    ours = sample(model, _vp_start(x_vp, grid[0]), grid, "ddim")
    assert ours.nfe_total == 6
    assert torch.allclose(ours.samples, state, atol=2e-4), (ours.samples - state).abs().max()


def test_dpmpp_2m_reproduces_diffusers_multistep_scheduler(pixel_folder):
    model = load_diffusers(str(pixel_folder))
    unet = diffusers.UNet2DModel.from_pretrained(pixel_folder, subfolder="unet", use_safetensors=True)
    config = diffusers.DDPMScheduler.load_config(pixel_folder, subfolder="scheduler")
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config, solver_order=2, final_sigmas_type="zero")
    scheduler.set_timesteps(5)
    x_vp = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    state = x_vp.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            state = scheduler.step(unet(state, t).sample, t, state).prev_sample
    grid = scheduler.sigmas.to(F64).tolist()
    assert grid[-1] == 0.0
    ours = sample(model, _vp_start(x_vp, grid[0]), grid, "dpmpp_2m")
    assert torch.allclose(ours.samples, state, atol=2e-4), (ours.samples - state).abs().max()


def test_latent_path_reproduces_the_ldm_pipeline(latent_folder):
    model = load_diffusers(str(latent_folder))
    assert model.event_shape == (3, 8, 8) and model.autoencoder is not None
    pipe = diffusers.LDMPipeline.from_pretrained(latent_folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="np")
    expected = torch.from_numpy(images.images).permute(0, 3, 1, 2)
    x_vp = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # what the pipeline drew
    abar = pipe.scheduler.alphas_cumprod.to(F64)
    grid = [float(((1 - abar[int(t)]) / abar[int(t)]).sqrt()) for t in pipe.scheduler.timesteps] + [0.0]
    latents = sample(model, _vp_start(x_vp, grid[0]), grid, "ddim").samples
    ours = (model.decode(latents) / 2 + 0.5).clamp(0, 1)
    assert ours.shape == expected.shape == (3, 3, 16, 16)
    assert torch.allclose(ours, expected, atol=1e-3), (ours - expected).abs().max()


class _AnalyticUNet(torch.nn.Module):
    """A UNet2DModel stand-in whose output is the exact epsilon, v or x0 of the 8x8 digits at timestep t."""

    def __init__(self, truth, log_sigmas: torch.Tensor, prediction: str):
        super().__init__()
        self.truth, self.log_sigmas, self.prediction = truth, log_sigmas, prediction
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=F64))  # sets the network dtype

    def forward(self, x_vp, t):
        steps = torch.arange(len(self.log_sigmas), dtype=F64)
        t = t.to(F64)
        low = t.floor().long().clamp(0, len(steps) - 2)
        log_sigma = self.log_sigmas[low] + (t - low) * (self.log_sigmas[low + 1] - self.log_sigmas[low])
        sigma = log_sigma.exp().reshape(-1, 1, 1, 1)
        alpha = (1 + sigma**2).rsqrt()
        x = x_vp / alpha
        x0 = self.truth(x, sigma.flatten())
        eps = (x - x0) / sigma
        out = {"epsilon": eps, "v_prediction": alpha * eps - alpha * sigma * x0, "sample": x0}[self.prediction]
        return type("Output", (), {"sample": out})()


def test_epsilon_v_and_sample_parameterisations_give_the_same_denoiser():
    truth = load_model("empirical-digits")
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    log_sigmas = ((1 - abar.to(F64)) / abar.to(F64)).sqrt().log()
    gen = torch.Generator().manual_seed(4)
    for sigma in (0.05, 0.7, 3.0, 20.0):  # between the table's entries
        x = truth.sample(5, gen) + sigma * torch.randn(5, 1, 8, 8, dtype=F64, generator=gen)
        expected = truth(x, torch.tensor(sigma, dtype=F64))
        for prediction in ("epsilon", "v_prediction", "sample"):
            model = HubDenoiser(_AnalyticUNet(truth, log_sigmas, prediction), abar, prediction, (1, 8, 8))
            got = model(x, torch.tensor(sigma, dtype=F64))
            assert torch.allclose(got, expected, atol=1e-9 * max(1.0, sigma)), (prediction, sigma)
    assert model.sigma_max == pytest.approx(float(log_sigmas[-1].exp()))


def test_sigma_to_t_inverts_the_table_and_clamps(pixel_folder):
    model = load_diffusers(str(pixel_folder))
    table = model.log_sigmas.exp()
    t = model.sigma_to_t(table[[0, 10, 500, 999]])
    assert torch.allclose(t, torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=F64), atol=1e-9)
    mid = model.sigma_to_t((table[10].log() * 0.5 + table[11].log() * 0.5).exp().reshape(1))
    assert float(mid) == pytest.approx(10.5, abs=1e-9)
    assert float(model.sigma_to_t(torch.tensor([1e-6]))) == 0.0
    assert float(model.sigma_to_t(torch.tensor([1e6]))) == 999.0


@pytest.mark.slow
def test_double_vjp_lipschitz_matches_the_full_jacobian_through_attention(pixel_folder):
    model = load_diffusers(str(pixel_folder))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2.0

    def fn(z):
        return model(z, torch.tensor(2.0))

    exact = torch.linalg.matrix_norm(jacobian_rows(fn, x).double(), ord=2)  # 192 VJPs: J^T direction
    krylov = local_lipschitz(fn, x, 12, torch.Generator().manual_seed(0), mode="vjp2")  # J directions too
    assert (krylov <= exact * (1 + 1e-4)).all() and torch.allclose(krylov.double(), exact, rtol=2e-3)


def test_forward_mode_is_refused_with_a_clear_message(pixel_folder):
    catalog = ModelCatalog(diffusers_models=[f"diffusers:{pixel_folder}"])
    name = f"diffusers:{pixel_folder}"
    experiment = Experiment(model=name, nfe=3, batch=2, diagnostics=DiagnosticsConfig(jacobian_mode="jvp"))
    with pytest.raises(ValueError, match="vjp2"):
        experiment.check(catalog)
    Experiment(model=name, nfe=3, batch=2).check(catalog)


def test_half_precision_is_for_cuda_only(pixel_folder):
    with pytest.raises(ValueError, match="CUDA devices only"):
        load_diffusers(str(pixel_folder), "cpu", half=True)


def test_pickled_weights_are_refused(tmp_path):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=10)
    diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=scheduler).save_pretrained(tmp_path, safe_serialization=False)
    assert list((tmp_path / "unet").glob("*.bin"))
    with pytest.raises(WeightsError, match=r"only pickled weights .*never unpickles"):
        load_diffusers(str(tmp_path))


def test_corrupt_or_missing_parts_give_clear_errors(pixel_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pixel_folder, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"{weights.name}: not a readable safetensors file"):
        load_diffusers(str(broken))
    (broken / "model_index.json").unlink()
    with pytest.raises(WeightsError, match=r"no model_index\.json"):
        load_diffusers(str(broken))
    with pytest.raises(WeightsError, match="neither an existing folder nor a hub id"):
        load_diffusers(str(tmp_path / "nope" / "deeper"))


def test_an_uncached_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="huggingface-cli download google/ddpm-cifar10-32"):
        load_diffusers("google/ddpm-cifar10-32")


@pytest.mark.slow
def test_cli_samples_and_benches_a_latent_pipeline_offline(latent_folder, tmp_path, capsys):
    from steindiff.cli import main

    name = f"diffusers:{latent_folder}"
    grid, out = tmp_path / "grid.png", tmp_path / "run.json"
    argv = ["sample", "--model", name, "--solver", "ddim", "--nfe", "3", "--batch", "4", "--stein"]
    assert main([*argv, "--lipschitz-iters", "2", "--grid", str(grid), "--out", str(out)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    assert Image.open(grid).size[1] == 2 * (2 * (16 + 2) + 2)  # decoded 16x16 images, 2 rows, scale 2
    bench = ["bench", "--model", name, "--solvers", "ddim", "--schedules", "karras", "--nfe", "3"]
    flags = ["--variants", "vanilla,stein", "--samples", "4", "--seeds", "0", "--reference-samples", "2"]
    assert main([*bench, *flags, "--out", str(tmp_path / "bench")]) == 0
    assert "| ddim | karras | 3 |" in (tmp_path / "bench" / "results.md").read_text()
    capsys.readouterr()


@pytest.mark.slow
def test_app_serves_a_pipeline_from_its_command_line_only(latent_folder):
    from conftest import free_port
    from gradio_client import Client

    import app

    name = f"diffusers:{latent_folder}"
    demo = app.make_app(ModelCatalog(diffusers_models=[name]))
    url = app.launch(demo, port=free_port(), block=False)
    try:
        client = Client(url, verbose=False)
        settings = {"model": name, "batch": 4, "nfe": 3, "lipschitz": True}
        out = client.predict(**settings, api_name="/run")
        assert "Latent model" in out[0] and out[10]["stein"]["nfe_total"] == 3
        assert out[1] is not None  # the decoded vanilla grid
        other = {**settings, "model": "diffusers:google/ddpm-cifar10-32"}
        with pytest.raises(Exception, match="unknown model"):  # no other hub model
            client.predict(**other, api_name="/run")
        assert client.predict(**settings, api_name="/run")[10]["vanilla"]["nfe_total"] == 3
    finally:
        demo.close()


def _rewrite_unet(folder: Path, change) -> Path:
    """The folder's UNet weights passed through ``change`` (a dict of tensors to a dict of tensors)."""
    from safetensors.torch import load_file, save_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(weights)).items()}
    save_file(change(tensors), str(weights))
    return weights


def _refused_in_one_line(folder, pattern) -> str:
    with pytest.raises(WeightsError, match=pattern) as info:
        load_diffusers(str(folder))
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_weights_that_do_not_fit_the_config_are_refused_naming_the_file(pixel_folder, tmp_path):
    """diffusers would initialise what is missing at random and only warn; every sample came out non-finite."""
    renamed = tmp_path / "renamed"
    shutil.copytree(pixel_folder, renamed)
    weights = _rewrite_unet(
        renamed, lambda t: {("spare.weight" if k == "conv_in.weight" else k): v for k, v in t.items()}
    )
    _refused_in_one_line(
        renamed, f"{weights}: the weights do not fit unet/config.json: 1 missing .*conv_in.weight.*, 1 unexpected"
    )
    reshaped = tmp_path / "reshaped"
    shutil.copytree(pixel_folder, reshaped)
    weights = _rewrite_unet(reshaped, lambda t: {**t, "conv_in.weight": t["conv_in.weight"].flatten()})
    _refused_in_one_line(reshaped, f"{weights}: could not load the unet .*size mismatch")
    foreign = tmp_path / "foreign"
    shutil.copytree(pixel_folder, foreign)
    weights = _rewrite_unet(foreign, lambda t: {"foo.weight": torch.zeros(3)})
    _refused_in_one_line(foreign, f"{weights}: holds 3 numbers, but unet/config.json describes a UNet2DModel of")


def test_a_broken_index_or_scheduler_is_named(pixel_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pixel_folder, broken)
    (broken / "model_index.json").write_text('{"unet": ["diffusers", ')
    _refused_in_one_line(broken, r"model_index\.json: not valid JSON")
    (broken / "model_index.json").write_text((pixel_folder / "model_index.json").read_text())
    config = broken / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"epsilon"', '"x0"'))
    _refused_in_one_line(broken, r"scheduler_config\.json: unsupported prediction_type 'x0'")
    config.write_text(config.read_text().replace('"linear"', '"cubic"').replace('"x0"', '"epsilon"'))
    _refused_in_one_line(broken, r"scheduler_config\.json: the scheduler does not build")
    shutil.rmtree(broken / "scheduler")
    _refused_in_one_line(broken, r"scheduler.scheduler_config\.json: not found")


@pytest.mark.slow
def test_the_cli_refuses_mismatched_weights_in_one_line(pixel_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pixel_folder, bad)
    weights = _rewrite_unet(bad, lambda t: {k.replace("conv_out", "conv_last"): v for k, v in t.items()})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "steindiff", "sample", "--model", f"diffusers:{bad}", "--nfe", "2", "--batch", "2"]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env, cwd=root)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"steindiff: error: {weights}: the weights do not fit"), lines
    assert done.stdout == ""
