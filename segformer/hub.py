"""Finding files of a pretrained model: a local directory, or a Hugging Face hub id through its cache.

Hub access goes through ``huggingface_hub`` and so honours its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
``revision``, ``subfolder`` and ``HF_HUB_OFFLINE=1``. A cached file is never downloaded again (online,
huggingface_hub asks the hub whether it changed; offline it is used as is). A hub that cannot be reached costs
huggingface_hub's retries (~23 s) at the first file that is not cached, once: the process's next look-ups in the
following minute use the cache alone (a cached file before that costs one failed check, without retries); a hub
whose host name does not resolve (no network) is not asked at all.
:func:`push_folder` uploads what ``save_pretrained`` wrote (the ``push_to_hub`` of models, configs and processors).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class CheckpointError(ValueError, OSError):
    """A checkpoint, config or preprocessing file that cannot be found or read (one clear line). An OSError, as
    Transformers raises for the same problems (``except OSError`` works as with Transformers), and a
    ValueError, as this package raised it before."""


class ShapeMismatchError(CheckpointError, RuntimeError):
    """Checkpoint tensors whose shapes differ from the model's (and ``ignore_mismatched_sizes`` was not given). A
    RuntimeError, as Transformers raises for it, and a CheckpointError. ``source``: the checkpoint; ``shapes``:
    which tensors differ, as the message words it."""

    def __init__(self, message: str = "", *, source: str = "", shapes: str = "") -> None:
        super().__init__(message)
        self.source, self.shapes = source, shapes


class MissingConfigError(CheckpointError):
    """Weights without the config.json that describes them. ``where``: the weights file or folder."""

    def __init__(self, message: str = "", *, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def for_command_line(exc: CheckpointError) -> CheckpointError:
    """``exc`` worded for someone who named the checkpoint on the command line, where from_pretrained's keyword
    arguments (``config=``, ``ignore_mismatched_sizes=True``), which its message suggests, cannot be passed."""
    if isinstance(exc, MissingConfigError) and exc.where:
        return MissingConfigError(
            f"{exc.where}: weights without their config.json: put the config.json saved with them beside them "
            "(save_pretrained, segformer train and segformer convert write both)",
            where=exc.where,
        )
    if isinstance(exc, ShapeMismatchError) and exc.source:
        return ShapeMismatchError(
            f"{exc.source}: its weights do not fit the model its config.json describes ({exc.shapes}); was "
            "num_labels or a size edited there? Use the config.json saved with these weights",
            source=exc.source,
            shapes=exc.shapes,
        )
    return exc


class NotCachedError(CheckpointError):
    """A hub file that is not in the local hub cache while the hub cannot be reached (``HF_HUB_OFFLINE=1``,
    ``local_files_only=True`` or no network): whether the repo has it is unknown."""


class HubError(OSError):
    """An upload to the Hugging Face hub that cannot be done: offline mode, no network, no rights (one line)."""


def first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type's name when it has no message. An error
    a DataLoader worker re-raised ("Caught ValueError in DataLoader worker process 0." and the worker's
    traceback) is the worker's own message: the traceback's last line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        last = lines[-1].strip()
        prefix = f"{type(exc).__name__}: "
        return last[len(prefix) :] if last.startswith(prefix) else last
    return lines[0]


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name``: a bare name (a mistyped local folder, most often) is not looked up on the hub, which has no
    SegFormer repo without an owner (a look-up costs a retrying minute when the hub cannot be reached: audit)."""
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in name


_UNREACHABLE_FOR = 60.0  # seconds during which a hub that could not be reached is not asked again
_unreachable_since: float | None = None  # (time.monotonic() of the last failed look-up)
_resolved_at: float | None = None  # (time.monotonic() of the last host name that resolved)


def hub_unreachable(proxies: dict[str, str] | None = None) -> bool:
    """Whether the hub failed a moment ago, or its host name does not resolve (no network: huggingface_hub would
    retry a name that cannot resolve for ~23 s, with ten lines of log, before the same answer: audit). Offline
    (HF_HUB_OFFLINE) and through a proxy (``proxies``, or any the environment or the system settings name:
    urllib's getproxies, the proxy's business to resolve the name) the name is not looked up; a lookup's answer
    holds for a minute."""
    global _unreachable_since, _resolved_at
    now = time.monotonic()
    if _unreachable_since is not None and now - _unreachable_since < _UNREACHABLE_FOR:
        return True
    if _resolved_at is not None and now - _resolved_at < _UNREACHABLE_FOR:
        return False
    import urllib.request

    proxied = bool(proxies) or any(v for k, v in urllib.request.getproxies().items() if k != "no")
    if proxied or _offline():
        return False
    import socket
    from urllib.parse import urlsplit

    import huggingface_hub.constants

    host = urlsplit(huggingface_hub.constants.ENDPOINT).hostname
    try:
        if host:
            socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):  # (a name that does not resolve; an IP address always does)
        _unreachable_since = now
        return True
    except OSError:
        pass
    _resolved_at = now
    return False


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    subfolder: str = "",
    force_download: bool = False,
    proxies: dict[str, str] | None = None,
    required: bool = True,
    raise_uncached: bool = False,
) -> Path | None:
    """Return the local path of ``filename`` inside a model directory or hub repo (in its ``subfolder``).

    ``name_or_path`` is a directory (used as is) or a hub id such as ``nvidia/mit-b0`` (looked up in the
    huggingface_hub cache, downloaded when online; ``force_download`` and ``proxies`` go to huggingface_hub,
    which ignores ``proxies`` from version 1.0 on: set HTTPS_PROXY there). Returns None for a missing optional file
    (``required=False``); raises :class:`CheckpointError` with a one-line reason otherwise. With
    ``raise_uncached=True`` an optional hub file that is neither cached nor known to be absent while the hub cannot
    be reached raises :class:`NotCachedError` instead of returning None.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() and subfolder:
        if not (path / subfolder).is_dir():
            raise CheckpointError(f"{path}: no subfolder {subfolder!r}")
        path = path / subfolder
    if path.is_dir():
        candidate = path / filename
        if candidate.is_file():
            return candidate
        if required:
            runs = [sub for sub in ("best", "last") if (path / sub / filename).is_file()]
            hint = f" (a training run: its checkpoints are {' and '.join(str(path / s) for s in runs)})" if runs else ""
            raise CheckpointError(f"{path}: no {filename} in this directory{hint}")
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
    shown = f"{subfolder}/{filename}" if subfolder else filename
    extra: dict[str, Any] = {} if proxies is None else {"proxies": proxies}
    # (the hub could not be reached a moment ago: the cache alone, rather than another round of retries)
    recently = not local_files_only and not force_download and hub_unreachable(proxies)
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                name,
                filename,
                subfolder=subfolder or None,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only or recently,
                token=token,
                force_download=force_download,
                **extra,
            )
        )
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        global _unreachable_since
        if not local_files_only and not recently and not _offline():  # (a connection error, after its retries)
            _unreachable_since = time.monotonic()
        if not required and _cached_as_absent(name, shown, revision, cache_dir):
            return None
        if not required and not raise_uncached and _repo_cached(name, revision, cache_dir):
            return None
        at = f" at revision {revision!r}" if revision not in (None, "main") else ""
        why = "local_files_only=True" if local_files_only else "the hub cannot be reached"
        why += " (HF_HUB_OFFLINE is set)" if _offline() and not local_files_only else ""
        raise NotCachedError(
            f"{name}: {shown}{at} is not in the local hub cache and {why} "
            "(hub ids need network or a populated cache; pass a local directory made by save_pretrained instead)"
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"{name}: the hub repo has no {shown}") from None
        return None
    except Exception as exc:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors, ...
        raise CheckpointError(f"{name}: cannot get {shown} from the hub: {first_line(exc)}") from None


def _cached_as_absent(name: str, filename: str, revision: str | None, cache_dir: str | os.PathLike | None) -> bool:
    """Whether the cache records ``filename`` as absent from the repo (a ``.no_exist`` entry of an earlier look-up)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, filename, cache_dir=cache_dir, revision=revision)
    except Exception:
        return False
    return found is not None and not isinstance(found, (str, os.PathLike))  # huggingface_hub's _CACHED_NO_EXIST


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


# ------------------------------------------------------------------------------------------------ upload
_TRUE = {"1", "on", "yes", "true"}


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def push_folder(
    repo_id: str,
    write: Callable[[Path], Iterable[str | os.PathLike]],
    *,
    commit_message: str,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create the hub repo ``repo_id`` if needed and upload, in one commit, the files that ``write(folder)`` writes
    into a fresh temporary folder (it returns their paths). Returns huggingface_hub's ``CommitInfo`` (a str: the
    commit URL; ``.pr_url`` with ``create_pr=True``).

    As Transformers' ``push_to_hub``: ``private`` applies only when the repo is created; ``revision`` is the branch
    to commit to (created from the default branch when missing); ``create_pr=True`` opens a pull request instead
    of committing. Raises :class:`HubError` with one line naming the repo when offline (``HF_HUB_OFFLINE=1``) or
    when the hub refuses.
    """
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be a hub repo name such as 'my-model' or 'org/my-model', got {repo_id!r}")
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise HubError(f"{repo_id}: pushing to the hub needs huggingface_hub (pip install huggingface_hub)") from None
    if _offline():
        raise HubError(f"{repo_id}: cannot push to the hub while HF_HUB_OFFLINE is set (unset it to upload)")
    api = huggingface_hub.HfApi()
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory(prefix="segformer-push-") as tmp:
            files = sorted(Path(f).resolve().relative_to(Path(tmp).resolve()).as_posix() for f in write(Path(tmp)))
            if revision is not None and not revision.startswith("refs/pr"):
                _ensure_branch(api, repo_id, revision, token, create_pr)
            operations = [
                huggingface_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(tmp) / name))
                for name in files
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message,
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )
    except HubError:
        raise
    except Exception as exc:  # offline mode, HTTP errors (401, 403, 404, ...), connection errors
        raise HubError(f"{repo_id}: push to the hub failed: {first_line(exc)}") from None


def _ensure_branch(api: Any, repo_id: str, branch: str, token: str | bool | None, create_pr: bool) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_branch(repo_id=repo_id, branch=branch, token=token, exist_ok=True)
    except HfHubHTTPError as exc:
        # Without write access (a pull request to someone else's repo) the branch must already exist; the commit
        # below says so if it does not.
        if not (create_pr and exc.response is not None and exc.response.status_code == 403):
            raise
