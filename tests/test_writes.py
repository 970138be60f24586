"""Nothing lost: output paths checked before the run, files written whole or not at all, and a sweep that
saves each cell as it finishes and resumes from them after an interrupt."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import steindiff.cli as cli
import steindiff.output.files as files
from steindiff.bench.report import CELLS_FILE, SWEEP_FILE
from steindiff.cli import main
from steindiff.output.files import WriteError, append_line, check_file, check_folder, write_file, write_files

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ["sample", "--model", "gmm-ring", "--nfe", "3", "--batch", "8", "--no-lipschitz", "--no-reference"]
#: a sweep of 8 cells on an exact 2-D model that runs in seconds (most of a cell's time is the SW2 score)
BENCH = [
    "bench",
    "--model",
    "gmm-ring",
    "--solvers",
    "dpmpp_2m",
    "--schedules",
    "karras",
    "--nfe",
    "3,5",
    "--variants",
    "vanilla,stein",
    "--samples",
    "64",
    "--seeds",
    "0,1",
    "--batch",
    "16",
    "--probes",
    "1",
    "--reference-samples",
    "16",
    "--reference-log-step",
    "0.1",
    "--device",
    "cpu",
]
CELLS = 8


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _full_disk_after(monkeypatch, nbytes: int) -> None:
    """Every write through the helper gets ``nbytes`` bytes onto the disk, then fails as a full disk does."""

    def write_all(fd, data):
        os.write(fd, bytes(data[:nbytes]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", write_all)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("steindiff: error:"), err
    return err


def test_write_replaces_the_file_whole_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "deeper" / "out.json"
    write_file(target, "first")
    assert target.read_text() == "first" and target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    target.chmod(0o640)
    write_file(target, b"second")
    assert target.read_bytes() == b"second" and target.stat().st_mode & 0o777 == 0o640
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_file(link, "through the link")
    assert link.is_symlink() and target.read_text() == "through the link"
    assert _leftovers(target.parent) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_full_disk_leaves_every_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    old = {tmp_path / "a.json": "old a", tmp_path / "b.csv": "old b"}
    write_files(old)
    _full_disk_after(monkeypatch, 3)
    with pytest.raises(WriteError, match="No space left on device"):
        write_files({tmp_path / "a.json": "new a, longer", tmp_path / "b.csv": "new b, longer"})
    assert {p: p.read_text() for p in old} == old
    assert _leftovers(tmp_path) == []


def test_an_interrupt_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(fd, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_file(tmp_path / "out.json", "x")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_append_is_cut_off(tmp_path, monkeypatch):
    lines = tmp_path / "cells.jsonl"
    append_line(lines, '{"a": 1}')
    _full_disk_after(monkeypatch, 4)
    with pytest.raises(WriteError, match="No space left"):
        append_line(lines, '{"b": 2}')
    assert lines.read_text() == '{"a": 1}\n'


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/proc/x.json", "cannot create files in /proc"),
        ("{tmp}/file.txt/x.json", "file.txt is a file, not a folder"),
        ("{tmp}/file.txt/deeper/x.json", "file.txt is a file, not a folder"),
        ("{tmp}", "is a folder, not a file name"),
        ("/dev/full", "not a regular file"),
    ],
)
def test_unwritable_files_are_named_before_the_run(tmp_path, name, message):
    (tmp_path / "file.txt").write_text("a file")
    with pytest.raises(WriteError, match=message):
        check_file(name.format(tmp=tmp_path), "--out")
    check_file(tmp_path / "new" / "out.json", "--out")
    check_folder(tmp_path / "new" / "sweep", "--out")
    with pytest.raises(WriteError, match="is a file, not a folder"):
        check_folder(tmp_path / "file.txt", "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the checks leave nothing behind


@pytest.mark.parametrize("option", ["--out", "--grid"])
@pytest.mark.parametrize("name", ["/proc/x.json", "{tmp}/file.txt/x.json", "{tmp}", "/dev/full"])
def test_sample_refuses_an_unwritable_output_before_computing(tmp_path, monkeypatch, capsys, option, name):
    (tmp_path / "file.txt").write_text("a file")

    def never(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "run_experiment", never)
    model = ["--model", "mnist"] if option == "--grid" else []
    with pytest.raises(SystemExit) as exit_info:
        main([*SAMPLE, *model, option, name.format(tmp=tmp_path)])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and printed.err.startswith(f"steindiff: error: {option} ")


def test_sample_with_a_full_disk_keeps_the_old_result_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.json"
    out.write_text("an earlier result")
    _full_disk_after(monkeypatch, 10)
    with pytest.raises(SystemExit) as exit_info:
        main([*SAMPLE, "--out", str(out)])
    assert exit_info.value.code == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert out.read_text() == "an earlier result" and _leftovers(tmp_path) == []


def test_sample_interrupted_names_the_file_it_left(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.json"
    out.write_text("an earlier result")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_experiment", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main([*SAMPLE, "--out", str(out)])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err == f"steindiff: interrupted: nothing written; {out} left as an earlier run wrote it\n"


@pytest.mark.slow
def test_sample_into_proc_fails_fast_in_one_line():
    """The check runs before any sampling: what is left is the interpreter's start and torch's import."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "steindiff", "sample", "--model", "gmm-ring", "--out", "/proc/x.json"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "steindiff: error: --out /proc/x.json: cannot create files in /proc (No such file or directory)"
    ]


def _bench(out: Path, *extra: str) -> list[str]:
    return [*BENCH, "--out", str(out), *extra]


def _timeless_csv(folder: Path) -> list[dict]:
    """results.csv less the cells' wall times, which no two runs share."""
    with (folder / "results.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(handle)]


def _timeless_json(folder: Path) -> dict:
    document = json.loads((folder / "results.json").read_text())
    return {
        part: [{k: v for k, v in row.items() if k != "wall_s"} for row in document[part]]
        for part in ("per_seed", "summary")
    }


@pytest.fixture
def unscored(monkeypatch):
    """Sweeps without the quality metric, whose scoring is most of a 2-D cell's time: err_ref is still there."""
    monkeypatch.setattr(cli, "quality_metric", lambda model, denoiser: None)


def _timeless(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if k != "wall_s"}


def _interrupt_after(monkeypatch, cells: int) -> None:
    """bench's sweep raises KeyboardInterrupt, as Ctrl-C does, once ``cells`` cells are saved."""
    real = cli.run_bench

    def run_bench(*args, on_cell, **kwargs):
        def save(cell):
            on_cell(cell)
            if len(saved := [cell, *getattr(save, "saved", [])]) == cells:
                raise KeyboardInterrupt
            save.saved = saved

        return real(*args, on_cell=save, **kwargs)

    monkeypatch.setattr(cli, "run_bench", run_bench)


@pytest.mark.slow
def test_an_interrupted_bench_keeps_its_cells_and_resumes_to_the_uninterrupted_results(
    tmp_path, monkeypatch, capsys, unscored
):
    assert main(_bench(tmp_path / "whole")) == 0
    capsys.readouterr()
    earlier = tmp_path / "resumed"
    earlier.mkdir()
    (earlier / "results.csv").write_text("an earlier sweep's table")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert main(_bench(earlier)) == 130
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (
        f"steindiff: interrupted: 3 of {CELLS} cells saved in {earlier / CELLS_FILE}; "
        "run the same command again to resume (--fresh starts over)"
    )
    assert (earlier / CELLS_FILE).read_text().count("\n") == 3
    assert json.loads((earlier / SWEEP_FILE).read_text())["state"] == "incomplete"
    assert (earlier / "results.csv").read_text() == "an earlier sweep's table"  # replaced only when the sweep is done
    ran = []
    real = cli.run_bench
    monkeypatch.setattr(cli, "run_bench", lambda *a, **k: ran.append(len(k["done"])) or real(*a, **k))
    assert main(_bench(earlier)) == 0
    assert ran == [3] and f"resuming: 3 of {CELLS} cells saved in {earlier}" in capsys.readouterr().err
    assert _timeless_csv(earlier) == _timeless_csv(tmp_path / "whole")
    assert _timeless_json(earlier) == _timeless_json(tmp_path / "whole")
    assert json.loads((earlier / SWEEP_FILE).read_text())["state"] == "complete"
    assert (earlier / CELLS_FILE).read_text().count("\n") == CELLS


def test_bench_refuses_a_folder_of_another_sweep_naming_the_difference(tmp_path, capsys, monkeypatch, unscored):
    _interrupt_after(monkeypatch, 1)
    assert main(_bench(tmp_path, "--samples", "32")) == 130
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main(_bench(tmp_path, "--seeds", "0,1,2"))
    assert exit_info.value.code == 2
    err = _one_error_line(capsys)
    assert "samples: 64 in this command, 32 in the folder" in err and "seeds: 0,1,2 in this command, 0,1 in" in err
    assert "--fresh" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main(_bench(tmp_path, "--samples", "32", "--fresh")) == 130  # starts over: one new cell, not two
    assert (tmp_path / CELLS_FILE).read_text().count("\n") == 1


def test_a_cell_cut_short_by_a_crash_is_dropped_and_run_again(tmp_path, capsys, monkeypatch, unscored):
    _interrupt_after(monkeypatch, 2)
    assert main(_bench(tmp_path, "--nfe", "3", "--seeds", "0")) == 130
    cells = tmp_path / CELLS_FILE
    first, second = cells.read_text().splitlines()
    cells.write_text(f"{first}\n{second[:40]}")  # the second line half-written when the machine stopped
    _interrupt_after(monkeypatch, 1)
    assert main(_bench(tmp_path, "--nfe", "3", "--seeds", "0")) == 130
    assert [_timeless(line) for line in cells.read_text().splitlines()] == [_timeless(first), _timeless(second)]
    cells.write_text(f"{first}\nnot a cell\n{second}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_bench(tmp_path, "--nfe", "3", "--seeds", "0"))
    assert exit_info.value.code == 2 and "line 2 is not a saved cell" in _one_error_line(capsys)


def test_bench_with_a_full_disk_keeps_the_old_results_and_says_so_in_one_line(tmp_path, capsys, monkeypatch, unscored):
    bench = _bench(tmp_path, "--solvers", "heun", "--nfe", "3", "--seeds", "0", "--variants", "vanilla")
    assert main(bench) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _full_disk_after(monkeypatch, 10)
    with pytest.raises(SystemExit) as exit_info:
        main([*bench, "--fresh"])
    assert exit_info.value.code == 2 and "No space left on device" in _one_error_line(capsys)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: v for k, v in after.items() if k.startswith("results") or k == "metric.png"} == {
        k: v for k, v in before.items() if k.startswith("results") or k == "metric.png"
    }
    assert _leftovers(tmp_path) == []


def test_bench_refuses_an_unwritable_folder_before_loading_anything(tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("a file")
    monkeypatch.setattr(cli, "distributed", None)  # anything past the check would fail on this
    for out in ("/proc/sweep", str(tmp_path / "file.txt"), str(tmp_path / "file.txt" / "sweep")):
        with pytest.raises(SystemExit) as exit_info:
            main(_bench(Path(out)))
        assert exit_info.value.code == 2 and f"--out {out}" in _one_error_line(capsys)


def test_bench_help_describes_resuming_and_fresh(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Running the same command again resumes" in text and "--fresh" in text and "cells.jsonl" in text


def _wait_for_cells(path: Path, count: int, process: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} cells were not saved in time (exit status {process.poll()})")


@pytest.mark.slow
def test_bench_killed_by_sigint_and_rerun_gives_the_uninterrupted_results(tmp_path):
    """A real Ctrl-C: the process is sent SIGINT after two cells are saved, then the same command is rerun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "steindiff", *BENCH, "--out"]
    whole = subprocess.run([*command, str(tmp_path / "whole")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "resumed"
    process = subprocess.Popen(
        [*command, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_cells(out / CELLS_FILE, 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    saved = (out / CELLS_FILE).read_text().count("\n")
    assert 2 <= saved < CELLS and not (out / "results.csv").exists()
    assert err.splitlines()[-1].startswith(f"steindiff: interrupted: {saved} of {CELLS} cells saved in ")
    rerun = subprocess.run([*command, str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {saved} of {CELLS} cells" in rerun.stderr
    assert _timeless_csv(out) == _timeless_csv(tmp_path / "whole")
    assert _timeless_json(out) == _timeless_json(tmp_path / "whole")


@pytest.mark.slow
def test_a_sweep_resumed_under_torchrun_gives_the_single_process_results(tmp_path):
    """Two torchrun processes finish a sweep that one process began: rank 0 reads the saved cells and every
    rank skips them, and the results are the uninterrupted single-process ones."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arguments = ["-m", "steindiff", *BENCH, "--out"]
    whole = subprocess.run(
        [sys.executable, *arguments, str(tmp_path / "whole")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(tmp_path / "whole" / SWEEP_FILE, out / SWEEP_FILE)
    lines = (tmp_path / "whole" / CELLS_FILE).read_text().splitlines(keepends=True)
    (out / CELLS_FILE).write_text("".join(lines[:2] + lines[5:6]))  # some of each seed's cells
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, *arguments, str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["facts"]["processes"] == 2
    assert _timeless_csv(out) == _timeless_csv(tmp_path / "whole")
    assert _timeless_json(out) == _timeless_json(tmp_path / "whole")
