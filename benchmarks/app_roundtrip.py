"""Round-trip time of the app's /run endpoint: `python app.py` started as users start it, called with gradio_client.

    python benchmarks/app_roundtrip.py [--repeats 5]

Cases (both samplers, diagnostics on): `mnist`, NFE 5, batch 16, Lipschitz on 4 samples (target: 3 s on
the 2-core CPU, 0.5 s on a GPU); `gmm-ring`, NFE 5, 2,000 particles (target: 1 s). Prints the median and
the spread of the round trips (the output files downloaded: 7 for `mnist`, 1 for `gmm-ring`) after one
warm-up call, for the calls of ``app_compute.call_plans``: the same seed again (everything cached), the
same seed on a new grid (the reference solution reused), a new seed (the reference solved). Two clients
take turns, call by call, on seeds of their own: gradio_client as made by default, which downloads each
file with a new connection whose TLS context loads the system's certificates (about 20 ms on the 2-core
CPU) even for plain http, and one made with ``ssl_verify=False``, which for an http URL changes only
that: no TLS is spoken on either. A browser fetches the files over kept-alive connections and builds no
such context. The server is its own process, with torch's default threads unless OMP_NUM_THREADS is set;
a client in the server's process would compete with it for the interpreter lock. Before the calls it
prints the share of a core the idle server uses (Linux) and the time of the server's first request, the
form's defaults (which `python app.py` runs once before it serves, unless given --no-warm-up). Not a test:
the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from app_compute import BASE, CASES, call_plans, report  # the same cases and calls, without the server
from gradio_client import Client

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _connect(url: str, server: subprocess.Popen, timeout_s: float = 300) -> Client:
    """A client once the server answers (it loads torch and gradio first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with status {server.returncode} before serving")
        try:
            return Client(url, verbose=False)
        except Exception:  # not up yet: connection refused, or an incomplete config
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU time a process has used so far (Linux: /proc; None elsewhere)."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: the state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15


def _idle_share(pid: int, seconds: float = 5.0) -> str:
    """The share of a core the process uses over ``seconds`` with nothing asked of it."""
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    after = _cpu_seconds(pid)
    if before is None or after is None:
        return "not measured (no /proc)"
    return f"{100 * (after - before) / seconds:.1f}% of a core over {seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="calls a case and client (at most 500)")
    args = parser.parse_args()
    if not 1 <= args.repeats <= 500:
        parser.error("--repeats must be 1-500: two clients draw their seeds from ranges of 1000")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        client = _connect(url, server)
        threads = os.environ.get("OMP_NUM_THREADS", f"torch's default ({os.cpu_count()} cores)")
        print(f"server: python app.py, torch threads: {threads}")
        print(f"server idle: {_idle_share(server.pid)}")
        start = time.perf_counter()
        client.predict(**BASE, api_name="/run")  # what a first visitor's Run sends
        print(f"the server's first request, the form's defaults: {time.perf_counter() - start:.3f} s")
        clients = {
            "gradio_client's defaults": client,
            "no TLS context (ssl_verify=False)": Client(url, verbose=False, ssl_verify=False),
        }
        for name, case in CASES.items():
            settings = {**BASE, **case}
            for each in clients.values():  # warm-up: model load, first-call overheads, the client's connection
                each.predict(**settings, api_name="/run")
            plans = [call_plans(settings, args.repeats, seed_offset=args.repeats * i) for i in range(len(clients))]
            for label in plans[0]:
                times: dict[str, list[float]] = {kind: [] for kind in clients}
                for calls in zip(*(plan[label] for plan in plans), strict=True):
                    for (kind, each), (setup, call) in zip(clients.items(), calls, strict=True):
                        if setup is not None:
                            each.predict(**setup, api_name="/run")
                        start = time.perf_counter()
                        each.predict(**call, api_name="/run")
                        times[kind].append(time.perf_counter() - start)
                for kind, measured in times.items():
                    report(name, f"{label}, {kind}", measured)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
