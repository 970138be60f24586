"""Test environment: one torch thread, no network, no telemetry (set before torch is imported)."""

import os

for key, value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():
    os.environ[key] = value

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The app over the registry, launched on loopback for this module; yields its URL."""
    import app
    from steindiff.experiment import ModelCatalog

    demo = app.make_app(ModelCatalog())
    url = app.launch(demo, port=free_port(), block=False)
    yield url
    demo.close()
