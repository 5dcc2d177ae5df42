"""Atomic file writes: a crash or a Ctrl-C never leaves a half-written file at the destination.

Every writer in the project goes through :func:`atomic_write`: the data goes to a temporary file in
the destination's folder, is flushed and fsync'ed, and only then renamed over the destination (an
atomic step on POSIX and Windows). On any error the temporary file is removed and the destination is
left exactly as it was; an ``OSError`` (disk full, I/O error, folder removed meanwhile) becomes a
:class:`~igc_convert.errors.FileFormatError` naming the destination, so the CLI reports it in one line.
Only a hard kill (SIGKILL, power loss) mid-write can leave the hidden temporary file
``.NAME.XXXXXXXX.tmp`` behind; the destination is never partial.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import FileFormatError


def _umask_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if ``path`` cannot be written: a missing or read-only folder, or one
    that takes no new file (tried for real, :func:`_probe`)."""
    path = _destination(path)
    folder = path.parent if str(path.parent) else Path(".")
    reason = _probe(folder)
    if reason:
        raise FileFormatError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not take new files ({reason})")
    return path


def _destination(path: str | os.PathLike) -> Path:
    """``path`` as a file to write, checked without touching the disk (the writers' own temporary file
    is their probe)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileFormatError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise FileFormatError(f"cannot write {str(path)!r}: folder {str(folder)!r} is not writable")
    if path.is_dir():
        raise FileFormatError(f"cannot write {str(path)!r}: it is a folder")
    return path


def _probe(folder: Path) -> str:
    """Why ``folder`` takes no new entry ("" when it does), found by making a temporary file there and
    removing it at once: permission bits do not tell for root, nor for read-only or pseudo file systems."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    _discard(probe)
    return ""


def check_creatable_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """Fail early, before any work, if the folder ``path`` cannot be created, or written to when it exists
    (its nearest existing folder is tried for real, :func:`_probe`); ``path`` is not created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileFormatError(f"cannot use {str(path)!r} as the {what}: it is not a folder")
    parent = path
    while not parent.exists():
        parent = parent.absolute().parent
    reason = _probe(parent) if parent.is_dir() else f"{str(parent)!r} is not a folder"
    if reason:
        action = "write to" if parent == path else "create"
        raise FileFormatError(f"cannot {action} the {what} {str(path)!r}: {reason}")
    return path


def make_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """``mkdir -p path``; an ``OSError`` becomes a :class:`FileFormatError` naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileFormatError(f"cannot create the {what} {str(path)!r}: {err.strerror or err}") from err
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    Example::

        with atomic_write("report.json", "w") as f:
            json.dump(report, f)
    """
    path = _destination(path)
    fd, tmp = _mkstemp(path, ".tmp")
    try:
        f = os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        _discard(tmp)
        raise
    with _replacing(path, tmp), f:
        os.chmod(tmp, _umask_mode())
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Like :func:`atomic_write` for writers that want a file *name* (``torch.onnx.export``, savefig).

    Yields a temporary path in the destination's folder; it is renamed over ``path`` on success and
    removed on failure.
    """
    path = _destination(path)
    fd, tmp = _mkstemp(path, f".tmp{suffix}")
    os.close(fd)
    with _replacing(path, tmp):
        yield Path(tmp)
        # after the writer: it may have replaced the file (safetensors' save_file leaves it 0600)
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def _replacing(path: Path, tmp: str) -> Iterator[None]:
    """Rename ``tmp`` over ``path`` when the block succeeds; remove it when anything fails."""
    try:
        yield
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise FileFormatError(f"cannot write {str(path)!r}: {err}") from err
    except BaseException:
        _discard(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left next to it; return what was removed.

    Only names this module makes for ``path`` (``.NAME.<random>.tmp…``) are touched. Call it when no
    other process is writing ``path`` (a run that owns its checkpoint folder, at start).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        if p.is_file():
            _discard(str(p))
            removed.append(p)
    return sorted(removed)


def _mkstemp(path: Path, suffix: str) -> tuple[int, str]:
    """A temporary file next to ``path`` (same file system, so the final rename is atomic)."""
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:  # the folder vanished or filled up since check_writable
        raise FileFormatError(f"cannot write {str(path)!r}: {err}") from err


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
