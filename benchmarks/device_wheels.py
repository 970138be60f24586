"""Wheels for the app's server on a lent GPU machine, so that `/run`'s round trip can be timed there.

    python benchmarks/device_wheels.py [--dest .whl]

The lent machines run Python 3.12 from an image that lacks gradio, plotly and their web stack
(../.library/device/KINDS.md). This fetches, for CPython 3.12 on manylinux x86_64, the wheels of the
packages listed in ``MISSING`` at the versions this project's environment runs (tested here), and rewrites
gradio's wheel without its web front end (the page's scripts, styles and fonts and its server-side
renderer: 23 of its 30 MiB): the page no longer renders from it, the HTTP API that gradio_client calls still
does (tests/test_device_wheels.py). The wheels (20.5 MiB) then fit beside the working tree (34 MB) in what a
device call may carry (64 MiB). `benchmarks/gpu_session.sh`'s part `roundtrip` installs them from ``.whl``
(carry it) and runs `benchmarks/app_roundtrip.py`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: the app's server needs these and the lent machines' image does not hold them (their other needs, such
#: as numpy, pandas, pillow, httpx, jinja2 and huggingface_hub, it does)
MISSING = (
    "gradio",
    "gradio_client",
    "hf-gradio",
    "plotly",
    "fastapi",
    "opentelemetry-api",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "orjson",
    "brotli",
    "groovy",
    "pydub",
    "python-multipart",
    "safehttpx",
    "semantic-version",
    "tomlkit",
    "pytz",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: gradio's page bundle; the files directly under frontend/ stay (launch fetches index.html to check the server)
FRONT_END = ("gradio/templates/frontend/assets/", "gradio/templates/frontend/static/", "gradio/templates/node/")


def download(dest: Path) -> None:
    """The wheels of ``MISSING`` at this environment's versions, for CPython 3.12 on manylinux x86_64."""
    specs = [f"{name}=={version(name)}" for name in MISSING]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "--dest", str(dest), *specs]
    subprocess.run(command, check=True)


def strip_front_end(wheel: Path) -> int:
    """Rewrite ``wheel`` without the files under ``FRONT_END`` (and their RECORD lines); the bytes removed."""
    stripped = wheel.with_suffix(".tmp")
    removed = 0
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename.startswith(FRONT_END):
                removed += info.compress_size
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(FRONT_END)).encode()
            target.writestr(info, data)
    stripped.replace(wheel)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder for the wheels (default: .whl)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    download(args.dest)
    (gradio,) = args.dest.glob(f"gradio-{version('gradio')}-*.whl")
    removed = strip_front_end(gradio)
    total = sum(path.stat().st_size for path in args.dest.glob("*.whl"))
    print(f"{args.dest}: gradio's front end removed ({removed / 2**20:.1f} MiB), {total / 2**20:.1f} MiB of wheels")


if __name__ == "__main__":
    main()
