"""benchmarks/device_wheels.py: gradio without its page bundle, for the round trip on a lent GPU machine."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gradio
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("device_wheels", ROOT / "benchmarks" / "device_wheels.py")
device_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_wheels)

SERVE = """
import sys
import gradio
from gradio_client import Client

assert gradio.__file__.startswith(sys.argv[2]), gradio.__file__
with gradio.Blocks() as demo:
    number, double = gradio.Number(1), gradio.Number()
    number.change(lambda v: 2 * v, number, double, api_name="double")
demo.queue().launch(server_port=int(sys.argv[1]), prevent_thread_lock=True)
print("answer", Client(f"http://127.0.0.1:{sys.argv[1]}/", verbose=False).predict(21, api_name="/double"))
demo.close()
"""


@pytest.mark.slow
def test_a_stripped_wheel_loses_the_front_end_and_its_record_lines_and_still_installs(tmp_path):
    wheel = tmp_path / "gradio-0.1-py3-none-any.whl"
    files = {
        "gradio/__init__.py": "VERSION = 1\n",
        "gradio/templates/frontend/index.html": "<html></html>",
        "gradio/templates/frontend/assets/index.js": "x" * 1000,
        "gradio/templates/frontend/static/font.woff2": "y" * 1000,
        "gradio/templates/node/build/server.js": "z" * 1000,
        "gradio-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: gradio\nVersion: 0.1\n",
        "gradio-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "gradio-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in {**files, "gradio-0.1.dist-info/RECORD": record}.items():
            archive.writestr(name, text)

    removed = device_wheels.strip_front_end(wheel)

    kept = {"gradio/__init__.py", "gradio/templates/frontend/index.html"}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        lines = archive.read("gradio-0.1.dist-info/RECORD").decode().splitlines()
    assert kept <= names and not any(name.startswith(device_wheels.FRONT_END) for name in names)
    assert not any(line.startswith(device_wheels.FRONT_END) for line in lines) and len(lines) == 5
    assert removed > 0
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target)]
    subprocess.run([*install, str(wheel)], check=True)
    assert (target / "gradio" / "templates" / "frontend" / "index.html").is_file()
    assert not (target / "gradio" / "templates" / "node").exists()


@pytest.mark.slow
def test_gradio_without_its_front_end_still_serves_its_api(tmp_path):
    """The installed gradio, less what the wheel loses, launches and answers gradio_client."""
    installed = Path(gradio.__file__).parent
    site = installed.parent

    def front_end(folder: str, names: list[str]) -> list[str]:
        inside = Path(folder).relative_to(site).as_posix()
        return [n for n in names if f"{inside}/{n}/".startswith(device_wheels.FRONT_END)]

    stripped = tmp_path / "gradio"
    shutil.copytree(installed, stripped, ignore=front_end)
    assert (stripped / "templates" / "frontend" / "index.html").is_file()
    assert not (stripped / "templates" / "frontend" / "assets").exists()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    port = str(free_port())
    served = subprocess.run(
        [sys.executable, "-c", SERVE, port, str(stripped)], env=env, capture_output=True, text=True, timeout=120
    )
    assert served.returncode == 0, served.stderr[-2000:]
    assert "answer 42" in served.stdout
