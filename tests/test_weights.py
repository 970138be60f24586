"""Nothing loaded wrong: every broken, foreign or hostile weights file is refused with one line naming it,
before anything is built from its header, and the command lines exit 2 without a traceback."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steindiff.denoisers import PreconditionedDenoiser, WeightsError, load_denoiser, load_model, save_denoiser
from steindiff.denoisers.networks import MLP, MLPConfig, UNet, UNetConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def _tiny_mlp(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = PreconditionedDenoiser(MLP(MLPConfig(width=16, depth=2, emb_dim=8)), (2,), 0.5, "t", "mlp")
    save_denoiser(model, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


def _parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()["steindiff"])
        return config, {k: handle.get_tensor(k).clone() for k in handle.keys()}  # noqa: SIM118


def _write(path: Path, config: dict | str, tensors: dict[str, torch.Tensor]) -> Path:
    meta = config if isinstance(config, str) else json.dumps(config)
    save_file(tensors, str(path), metadata={"steindiff": meta})
    return path


def _refused(path: Path, pattern: str) -> str:
    with pytest.raises(WeightsError, match=pattern) as info:
        load_denoiser(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_broken_json_metadata_is_named(tmp_path):
    config, tensors = _parts(_tiny_mlp(tmp_path))
    bad = _write(tmp_path / "bad.safetensors", json.dumps(config)[:-7], tensors)
    _refused(bad, r"bad\.safetensors: the 'steindiff' metadata is not valid JSON")
    listed = _write(tmp_path / "list.safetensors", "[1, 2]", tensors)
    _refused(listed, r"list\.safetensors: the 'steindiff' metadata is not a JSON object")


def test_a_missing_key_is_named(tmp_path):
    config, tensors = _parts(_tiny_mlp(tmp_path))
    del config["sigma_data"]
    _refused(_write(tmp_path / "bad.safetensors", config, tensors), r"bad\.safetensors: .*no 'sigma_data'")


def test_unknown_fields_are_named(tmp_path):
    config, tensors = _parts(_tiny_mlp(tmp_path))
    network = {**config["network"], "heads": 4}
    _refused(
        _write(tmp_path / "arch.safetensors", {**config, "network": network}, tensors),
        r"arch\.safetensors: unknown field 'heads' in the 'mlp' network",
    )
    _refused(
        _write(tmp_path / "top.safetensors", {**config, "schedule": "vp"}, tensors),
        r"top\.safetensors: unknown field 'schedule'",
    )
    _refused(
        _write(tmp_path / "kind.safetensors", {**config, "kind": "transformer"}, tensors),
        r"kind\.safetensors: .*'kind' .*'transformer'.*'unet' or 'mlp'",
    )


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"sigma_data": -1.0}, "'sigma_data'"),
        ({"sigma_data": math.nan}, "'sigma_data'"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, "'sigma_min'"),
        ({"sigma_max": math.inf}, "'sigma_max'"),
        ({"pad_value": "black"}, "'pad_value'"),
        ({"name": 3}, "'name'"),
        ({"event_shape": [3]}, "'event_shape'"),
        ({"event_shape": "2"}, "'event_shape'"),
        ({"info": []}, "'info'"),
        ({"network": {"dim": 2, "width": 0, "depth": 2, "emb_dim": 8}}, "'width'"),
        ({"network": {"dim": 2, "width": 16, "depth": True, "emb_dim": 8}}, "'depth'"),
        ({"network": {"dim": 2, "width": 16, "depth": 2, "emb_dim": 7}}, "'emb_dim'"),
        ({"network": {"dim": 2, "width": 16, "depth": 10**9, "emb_dim": 8}}, "'depth'"),
        ({"network": [2, 16]}, "'network'"),
    ],
)
def test_values_out_of_range_are_refused(tmp_path, change, pattern):
    config, tensors = _parts(_tiny_mlp(tmp_path))
    _refused(_write(tmp_path / "bad.safetensors", {**config, **change}, tensors), r"bad\.safetensors: .*" + pattern)


def _unet_config(**network) -> dict:
    defaults = {"channels": 8, "multipliers": [1, 2], "groups": 4, "emb_dim": 16, "attention_levels": [1]}
    return {
        "kind": "unet",
        "network": {**defaults, **network},
        "event_shape": [1, 28, 28],
        "sigma_data": 0.5,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "pad_value": -1.0,
        "name": "tiny",
    }


@pytest.mark.parametrize(
    ("network", "event_shape", "pattern"),
    [
        ({"attention_levels": [-1]}, [1, 28, 28], "'attention_levels'"),
        ({"multipliers": [1, 2.5]}, [1, 28, 28], "'multipliers'"),
        ({"multipliers": []}, [1, 28, 28], "'multipliers'"),
        ({"image_size": 30, "multipliers": [1, 2, 2]}, [1, 28, 28], "'image_size'"),
        ({}, [3, 28, 28], "'event_shape'"),
        ({}, [1, 40, 40], "'event_shape'"),
        ({"channels": 12, "groups": 8}, [1, 28, 28], "does not build"),
    ],
)
def test_unet_architectures_that_cannot_run_are_refused(tmp_path, network, event_shape, pattern):
    config = {**_unet_config(**network), "event_shape": event_shape}
    _refused(_write(tmp_path / "bad.safetensors", config, {}), r"bad\.safetensors: .*" + pattern)


def test_tensors_are_checked_against_the_header_before_any_is_read(tmp_path):
    config, tensors = _parts(_tiny_mlp(tmp_path))
    missing = {k: v for k, v in tensors.items() if k != "out.bias"}
    _refused(_write(tmp_path / "m.safetensors", config, missing), r"m\.safetensors: .*missing \['out\.bias'\]")
    extra = {**tensors, "spare": torch.zeros(1)}
    _refused(_write(tmp_path / "u.safetensors", config, extra), r"u\.safetensors: .*unexpected \['spare'\]")
    ints = {**tensors, "out.bias": torch.zeros(2, dtype=torch.int64)}
    _refused(_write(tmp_path / "i.safetensors", config, ints), r"i\.safetensors: tensor 'out\.bias' has dtype I64")


def test_a_float64_file_loads_as_the_float32_network_it_was_before(tmp_path):
    good = _tiny_mlp(tmp_path)
    config, tensors = _parts(good)
    wide = _write(tmp_path / "wide.safetensors", config, {k: v.double() for k, v in tensors.items()})
    x, s = torch.randn(5, 2), torch.tensor(0.3)
    a, b = load_denoiser(good), load_denoiser(wide)
    assert all(p.dtype == torch.float32 for p in b.network.parameters())
    assert torch.equal(a(x, s), b(x, s))


def test_a_loaded_model_owns_its_weights(tmp_path):
    """The parameters are copies, not views of the file's memory map: rewriting the file leaves them alone."""
    good = _tiny_mlp(tmp_path)
    model = load_denoiser(good)
    x, s = torch.randn(5, 2), torch.tensor(0.3)
    before = model(x, s)
    good.write_bytes(b"")  # a view of a truncated map would fault here
    assert torch.equal(model(x, s), before)
    assert not any(p.is_meta or p.requires_grad for p in model.network.parameters())


def test_the_shipped_weights_load_as_before():
    from safetensors.torch import load_file

    from steindiff.denoisers import ASSETS

    for name in ("mnist", "mlp-ring"):
        model = load_model(name)
        stored = load_file(str(ASSETS / f"{name}.safetensors"))
        state = model.network.state_dict()
        assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in state)
        assert isinstance(model.network, UNet if name == "mnist" else MLP)


#: a UNet of about 400M parameters (1.6 GB) described in a header of a few hundred bytes, with no tensors
HOSTILE = _unet_config(channels=640, multipliers=[1, 2, 2], groups=8, emb_dim=128, attention_levels=[2])


@pytest.mark.slow
def test_a_tiny_hostile_header_costs_no_memory(tmp_path):
    hostile = _write(tmp_path / "hostile.safetensors", HOSTILE, {"w": torch.zeros(1)})
    assert hostile.stat().st_size < 1000
    script = (
        "import resource, sys\n"
        "from steindiff.denoisers.weights import WeightsError, load_denoiser\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_denoiser(sys.argv[1])\n"
        "except WeightsError as err:\n"
        "    print(err)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(hostile)], capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT
    )
    message, grew_kib = done.stdout.splitlines()
    assert "hostile.safetensors: tensors do not match the architecture" in message
    assert int(grew_kib) < 32 * 1024, f"peak memory grew by {int(grew_kib) / 1024:.0f} MiB"


def test_a_huge_architecture_is_never_allocated(tmp_path):
    """A header that asks for some 160 GB is refused at once (it is checked on the meta device)."""
    huge = _unet_config(channels=4096, multipliers=[1, 2, 4, 4], groups=32, emb_dim=1024, image_size=64)
    assert sum(p.numel() for p in _meta_unet(huge["network"]).parameters()) * 4 > 100e9
    _refused(_write(tmp_path / "huge.safetensors", huge, {}), r"huge\.safetensors: tensors do not match")


def _meta_unet(network: dict) -> UNet:
    with torch.device("meta"):
        return UNet(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in network.items()}))


def _one_line_exit_2(argv: list[str], name: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=ENV, cwd=ROOT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and name in lines[0], done.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_the_app_refuses_a_bad_model_file_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    line = _one_line_exit_2([sys.executable, "app.py", "--model", f"x={bad}", "--no-warm-up"], str(bad))
    assert line.startswith("app.py: error: ") and "Traceback" not in line


@pytest.mark.slow
def test_a_corrupt_checkpoint_on_resume_is_one_line_naming_it(tmp_path, capsys):
    from steindiff.cli import main
    from steindiff.train import TrainConfig, train

    out = tmp_path / "run"
    train("mlp-ring", TrainConfig(steps=2, batch=8), out)
    checkpoint = out / "checkpoint.safetensors"
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsError, match=r"checkpoint\.safetensors: not a readable safetensors file"):
        train("mlp-ring", TrainConfig(steps=4, batch=8), out, resume=True)
    argv = ["train", "--model", "mlp-ring", "--steps", "4", "--batch", "8", "--out", str(out), "--resume"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and str(checkpoint) in err[0], err


def test_a_checkpoint_of_another_shape_is_refused_on_resume(tmp_path):
    from steindiff.train import _restore, build_trainee

    denoiser, _ = build_trainee("mlp-ring")
    ema = MLP(MLPConfig())
    optimizer = torch.optim.Adam(denoiser.network.parameters())
    path = tmp_path / "checkpoint.safetensors"
    save_file({"rng": torch.Generator().get_state()}, str(path))
    with pytest.raises(WeightsError, match=r"checkpoint\.safetensors: .*missing"):
        _restore(path, denoiser, ema, optimizer, torch.Generator())
    (tmp_path / "absent").mkdir()
    with pytest.raises(WeightsError, match=r"absent.checkpoint\.safetensors: not found"):
        _restore(tmp_path / "absent" / "checkpoint.safetensors", denoiser, ema, optimizer, torch.Generator())
