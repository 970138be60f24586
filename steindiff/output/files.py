"""Result files that a failure cannot half-write: paths checked before the work, files replaced whole.

Every file is written to a temporary file in its own folder, flushed and fsynced, then renamed over the
target with ``os.replace`` (atomic on POSIX), so a reader finds the old file or the new one, never a part
of one. On any failure, a full disk or an interrupt included, the temporary files are removed and the old
files are left as they were. The checks run before hours of sampling, so a bad path costs seconds.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = ["WriteError", "append_line", "check_file", "check_folder", "write_file", "write_files"]


class WriteError(Exception):
    """A result file cannot be written; the message names the path and the reason on one line."""


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its parents that exists (the folder a new file or folder would go in)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _probe(folder: Path, what: str) -> None:
    """Create, write one byte to and remove a file in ``folder``: a read-only, full or virtual folder refuses."""
    probe = folder / f".steindiff-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise WriteError(f"{what}: cannot create files in {folder} ({_reason(err)})") from None
    try:
        os.write(fd, b"\0")
    except OSError as err:
        raise WriteError(f"{what}: cannot write in {folder} ({_reason(err)})") from None
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def check_file(path: str | Path, option: str) -> None:
    """Fail now, not after the run, if ``path`` cannot be written as a file (``option`` names it to the user)."""
    path = Path(os.path.abspath(path))
    what = f"{option} {path}"
    if path.is_dir():
        raise WriteError(f"{what}: is a folder, not a file name")
    if path.exists() and not path.is_file():
        raise WriteError(f"{what}: not a regular file")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise WriteError(f"{what}: {folder} is a file, not a folder")
    _probe(folder, what)


def check_folder(path: str | Path, option: str) -> None:
    """Fail now, not after the run, if files cannot be written in the folder ``path`` (made if missing)."""
    path = Path(os.path.abspath(path))
    what = f"{option} {path}"
    folder = _nearest_existing(path)
    if not folder.is_dir():
        raise WriteError(f"{what}: {folder} is a file, not a folder")
    _probe(folder, what)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable; a file system that cannot sync a folder still has the files."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_files(files: Mapping[str | Path, bytes | str]) -> None:
    """Write every file (str as UTF-8) in full, or none of them: all are staged and synced before any replaces
    its target. Raises :class:`WriteError` and removes what it staged if any write fails."""
    staged: list[tuple[Path, Path]] = []
    target = Path()
    try:
        for name, data in files.items():
            target = Path(os.path.realpath(name))  # through a symlink, so the link stays a link
            content = data.encode() if isinstance(data, str) else bytes(data)
            mode = None  # a new file's: 0o666 less the umask
            if target.exists():
                if not target.is_file():
                    raise WriteError(f"cannot write {target}: not a regular file")
                mode = stat.S_IMODE(target.stat().st_mode)  # a replaced file keeps its permissions
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            staged.append((temporary, target))
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                _write_all(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
        while staged:
            temporary, target = staged[0]
            os.replace(temporary, target)
            staged.pop(0)
    except OSError as err:
        raise WriteError(f"cannot write {target}: {_reason(err)}") from None
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    for folder in dict.fromkeys(Path(os.path.realpath(name)).parent for name in files):
        _fsync_folder(folder)


def write_file(path: str | Path, data: bytes | str) -> None:
    """Write one file in full or not at all (see :func:`write_files`)."""
    write_files({path: data})


def append_line(path: str | Path, line: str) -> None:
    """Append one line and sync it, so that what was appended survives a crash; a failed append is cut off
    again, leaving the file as it was."""
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {_reason(err)}") from None
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    except OSError as err:
        raise WriteError(f"cannot write {path}: {_reason(err)}") from None
    finally:
        os.close(fd)
