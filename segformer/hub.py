"""Finding files of a pretrained model: a local directory, or a Hugging Face hub id through its cache.

Hub access goes through ``huggingface_hub`` and so honours its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
``revision`` and ``HF_HUB_OFFLINE=1``. Nothing here talks to the network when the files are cached.
"""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(ValueError, OSError):
    """A checkpoint, config or preprocessing file that cannot be found or read (one clear line). An OSError, as
    Transformers raises for the same problems (``except OSError`` works as with Transformers), and a
    ValueError, as this package raised it before."""


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in name


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    required: bool = True,
) -> Path | None:
    """Return the local path of ``filename`` inside a model directory or hub repo.

    ``name_or_path`` is a directory (used as is) or a hub id such as ``nvidia/mit-b0`` (looked up in the
    huggingface_hub cache, downloaded when online). Returns None for a missing optional file
    (``required=False``); raises :class:`CheckpointError` with a one-line reason otherwise.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        if required:
            raise CheckpointError(f"{path}: no {filename} in this directory")
        return None
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory, found a file")
    name = str(name_or_path)
    if not _looks_like_hub_id(name) or os.path.isabs(name) or name.startswith((".", "~")):
        raise CheckpointError(f"{name}: no such directory (and not a hub id like 'nvidia/mit-b0')")
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{name}: loading hub ids needs huggingface_hub (pip install huggingface_hub)") from exc
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                name,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
            )
        )
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        if not required and _repo_cached(name, revision, cache_dir):
            return None
        raise CheckpointError(
            f"{name}: {filename} is not in the local hub cache and the hub cannot be reached "
            "(hub ids need network or a populated cache; pass a local directory made by save_pretrained instead)"
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"{name}: the hub repo has no {filename}") from None
        return None
    except Exception as exc:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors, ...
        raise CheckpointError(f"{name}: cannot get {filename} from the hub: {first_line(exc)}") from None


def _repo_cached(name: str, revision: str | None, cache_dir: str | os.PathLike | None) -> bool:
    """Whether some snapshot of the repo is in the cache (so a missing optional file is really absent)."""
    try:
        import huggingface_hub

        huggingface_hub.snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=True,
            allow_patterns=["config.json"],
        )
        return True
    except Exception:
        return False
