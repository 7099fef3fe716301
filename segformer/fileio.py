"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
        if isinstance(exc, OSError) and exc.strerror and str(path) not in str(exc):  # (a full disk: name the file)
            error = type(exc)(f"{path}: cannot write it ({exc.strerror})")
            error.errno = exc.errno
            raise error from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
