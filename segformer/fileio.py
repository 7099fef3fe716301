"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the temporary name atomic_write gives a file being written beside PATH: ".NAME.XXXXXXXX.tmp" (mkstemp's 8 random
# characters); a killed process leaves it behind (segformer predict --skip-existing and a resumed training run
# sweep them: remove_killed_writes)
TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_killed_writes(folder: str | os.PathLike, older_than: float = 0.0) -> int:
    """Remove the temporary files of :func:`atomic_write` that a killed process left anywhere in ``folder`` (a
    SIGKILL gives it no chance to), those over ``older_than`` seconds old (another process writing there now keeps
    its own). Returns how many went."""
    import time

    now, removed = time.time(), 0
    for top, _, files in os.walk(folder):
        for name in files:
            path = Path(top) / name
            try:
                if TEMPORARY_NAME.fullmatch(name) and now - path.stat().st_mtime >= older_than:
                    path.unlink()
                    removed += 1
            except OSError:
                pass  # (gone meanwhile, or not ours to remove)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary name beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX and Windows, so ``path`` holds either its old content or the whole new one.
    A folder that cannot take the file is an OSError naming ``path`` (not the temporary name).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        error = type(exc)(f"{path}: cannot write there ({exc.strerror})")
        error.errno = exc.errno
        raise error from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # (a full disk, a folder in the way: the error names the file, never the temporary name)
        if isinstance(exc, OSError) and exc.strerror and (str(path) not in str(exc) or tmp in str(exc)):
            error = type(exc)(f"{path}: cannot write it ({exc.strerror})")
            error.errno = exc.errno
            raise error from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, escape_bytes: bool = False) -> None:
    """``text`` as UTF-8; a file name that is not UTF-8 (read with Python's surrogate escapes) keeps its bytes,
    so a summary names the file as it is on disk (it stopped a whole run: audit), or with ``escape_bytes`` reads
    ``\\xe9`` for the byte 0xE9 (a file that must stay valid UTF-8: a CSV table's readers refuse others)."""
    if escape_bytes:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def atomic_save_image(path: str | os.PathLike, image: Any, fmt: str, **params: Any) -> None:
    """``image.save`` (a PIL image) in ``fmt`` to ``path`` through :func:`atomic_write`, encoded in memory first:
    Pillow writing a JPEG straight to a file ignores a short write, so on a nearly full disk it left a truncated
    file and no error (which the rename then put in place); a Python file's write raises ENOSPC."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """ValueError, before any work, where :func:`atomic_write` could not put a file at ``path`` (``what``: the
    option naming it): a folder there, a parent that is missing or not a folder, or one this process cannot write
    in. (A run that would only fail at its end, after an evaluation of hours, fails at its start instead.)"""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise ValueError(f"{what} {path}: a folder is there; give a file name")
    if not parent.is_dir():
        reason = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"{what} {path}: its folder {parent} {reason}")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
        reason = "a read-only file system" if read_only else "permission denied"
        raise ValueError(f"{what} {path}: cannot write in {parent} ({reason})")
