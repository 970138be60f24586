import pytest
import torch
from safetensors.torch import load_file

from steindiff.train import TrainConfig, train


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    config = dict(batch=32, warmup=5, log_every=5, checkpoint_every=10)
    train("mlp-ring", TrainConfig(steps=20, **config), tmp_path / "straight", export=tmp_path / "a.safetensors")
    train("mlp-ring", TrainConfig(steps=10, **config), tmp_path / "split")
    train(
        "mlp-ring", TrainConfig(steps=20, **config), tmp_path / "split", export=tmp_path / "b.safetensors", resume=True
    )
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((tmp_path / "split" / "loss.jsonl").read_text().splitlines()) == 4


def test_resume_refuses_other_settings_and_unknown_models(tmp_path):
    train("mlp-ring", TrainConfig(steps=2, batch=8, checkpoint_every=2), tmp_path / "run")
    with pytest.raises(ValueError, match="other settings"):
        train("mlp-ring", TrainConfig(steps=4, batch=16), tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="no training recipe for 'cifar'"):
        train("cifar", TrainConfig(steps=1), tmp_path / "other")
