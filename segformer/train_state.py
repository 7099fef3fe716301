"""What an exact resume needs: the training stream as a fixed function of (seed, position), the RNG states of
every rank, and checkpoint folders written as a whole.

The training stream: epoch e visits the images in the order of a permutation seeded by (seed, e), and the
augmentation of the sample at position g is seeded by (seed, g). A resumed run restarts the stream at step ×
global batch and restores the python / numpy / torch RNG states of every rank, so it continues exactly. Under
DDP rank r takes consecutive blocks of the stream, so N processes see the same global batches as one.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .fileio import atomic_write, atomic_write_text

TRAINING_STATE = "training_state.pt"


class StreamSampler(torch.utils.data.Sampler):
    """An endless stream of ``(index, augmentation seed)`` pairs for one rank, starting at global position
    ``start``. Epoch e visits the data set in a permutation seeded by (seed, e); position g's augmentation
    is seeded by (seed, g). Rank r takes blocks of ``block`` consecutive positions: r, r + world, …, so N ranks
    with micro-batch ``block`` cover exactly the positions one process with batch N × block would."""

    def __init__(self, size: int, *, seed: int, block: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.size, self.seed, self.block = size, seed, block
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.start + self.rank * self.block
        epoch, perm = -1, np.arange(0)
        while True:
            for pos in range(g, g + self.block):
                e = pos // self.size
                if e != epoch:
                    epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.size)
                # the augmentation seed is a pure function of (seed, position)
                aug_seed = int(np.random.default_rng([self.seed, 1 << 20, pos]).integers(2**62))
                yield int(perm[pos % self.size]), aug_seed
            g += self.block * self.world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states, in types torch.load(weights_only=True) reads."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def python_state_to_tuple(state: Any) -> Any:
    """random.setstate wants tuples; a state that went through torch.save/load may hold lists."""
    return tuple(python_state_to_tuple(s) for s in state) if isinstance(state, (list, tuple)) else state


def save_checkpoint(directory: Path, model: nn.Module, files: dict[str, Any]) -> None:
    """Write ``directory`` as a whole: save_pretrained + ``files`` (name → object for torch.save, or str for
    text) into a temporary sibling, then swap it in. A crash leaves either the old folder or, between the two
    renames, ``.NAME.old`` (which :func:`find_resume_dir` falls back on)."""
    tmp, old = directory.parent / f".{directory.name}.tmp", directory.parent / f".{directory.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for name, obj in files.items():
            if isinstance(obj, str):
                atomic_write_text(tmp / name, obj)
            else:
                atomic_write(tmp / name, lambda t, o=obj: torch.save(o, t))
    except BaseException:  # (Ctrl-C, SIGTERM, a full disk: no half-written folder is left behind)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def restore_swapped(run: Path, name: str) -> bool:
    """Put ``run/.NAME.old`` back as ``run/NAME`` where a crash between :func:`save_checkpoint`'s two renames
    left only it (a resumed run would otherwise never see its best checkpoint again). Returns whether it did."""
    folder, old = run / name, run / f".{name}.old"
    if folder.exists() or not old.is_dir():
        return False
    os.replace(old, folder)
    return True


def find_resume_dir(output: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: None, ``resume`` itself, or for "auto" ``output/last`` (or the
    ``.last.old`` left by a crash during a checkpoint swap) when it exists."""
    if resume is None:
        return None
    if resume == "auto":
        for candidate in (output / "last", output / ".last.old"):
            if (candidate / TRAINING_STATE).is_file():
                return candidate
        return None
    path = Path(resume)
    if not path.exists():
        raise ValueError(f"--resume {path}: no such folder (resume from a run's last/ folder, or --resume auto)")
    if not (path / TRAINING_STATE).is_file():
        raise ValueError(f"{path}: no {TRAINING_STATE} here (resume from a run's last/ folder, or --resume auto)")
    return path


class StopRequests:
    """SIGINT and SIGTERM while a run trains ask it to stop at the end of the current step, with a checkpoint (an
    interrupted run lost every step since its last periodic save, up to --save-every; and a Ctrl-C that Python
    raised inside a garbage-collector callback was swallowed, the run going on to its end: audit). The same
    signal again stops at once, as before; another one does not (torchrun's agent turns a Ctrl-C into SIGTERM for
    its workers, and allows them 30 s). At the stop the signal takes its course: the handler installed before
    (Python's KeyboardInterrupt, the command line's Terminated) or the default action. Installed from the main
    thread only (elsewhere the signals act as before); a signal that was ignored stays ignored.

    ``with StopRequests(announce) as stop:`` ... ``stop.signum`` (None until asked) ... ``stop.take_its_course()``.
    """

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce  # (under torchrun: rank 0 alone says it)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # the handlers found, kept after they are put back
        self._installed = False

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(signum)
                if previous not in (signal.SIG_IGN, None):
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == self.signum:  # the same signal again: at once
            self.take_its_course()
        if self.signum is None:
            self.signum = signum
            if self.announce:  # (os.write: print could re-enter a write to stderr the signal interrupted)
                name = signal.Signals(signum).name
                line = f"segformer train: {name}: stopping after this step, with a checkpoint ({name} again: at once)"
                with contextlib.suppress(OSError, ValueError):
                    os.write(sys.stderr.fileno(), f"{line}\n".encode(errors="replace"))

    def take_its_course(self) -> None:
        """Let the signal asked for do what it would have done without this handler: the handler installed before
        (KeyboardInterrupt, Terminated; a library caller's own, which may only note it and return: then so does
        this) or the default action, which ends the process."""
        assert self.signum is not None
        if self.signum not in self._previous:  # (never installed here, a thread: another process was signalled)
            name = signal.Signals(self.signum).name
            raise RuntimeError(f"another process of the run was stopped by {name}; this one stops with it")
        previous = self._previous[self.signum]
        self.__exit__()
        if callable(previous):
            previous(self.signum, None)
        else:
            signal.raise_signal(self.signum)


__all__ = [
    "TRAINING_STATE",
    "StopRequests",
    "StreamSampler",
    "find_resume_dir",
    "python_state_to_tuple",
    "restore_swapped",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
