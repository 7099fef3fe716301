"""What a training run reports besides its checkpoints: progress a person can follow anywhere, metrics.jsonl,
TensorBoard, and pictures (training curves, validation samples).

Progress: on a terminal, a bar; otherwise (a file, ``nohup``, a cluster job, CI, or ``progress=False``) one
plain line every ``log_every`` steps, e.g. ``step 120/600  loss 0.4321  lr 5.82e-04  0.52 s/step  15.4 img/s
ETA 4m10s  peak 1.21 GB``. The same numbers go to ``metrics.jsonl``.

Pictures (with matplotlib, ``pip install "segformer[plot]"``; without it one line says how to get them):
``curves.png`` (training loss and validation mIoU against steps, redrawn at each evaluation) and
``val_samples/step_N.png`` (a few validation images: image | ground truth | prediction).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write, atomic_write_text
from .metrics import format_table, metrics_to_json
from .visualize import plot_text


def peak_memory_bytes(device: torch.device) -> int | None:
    """The process's peak memory so far: allocated tensor memory on CUDA / MPS, resident set size on the CPU
    (None where the system does not say: Windows has no ``resource`` module; its peak working set is read instead,
    and None if that fails too)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    try:
        import resource
    except ImportError:  # (Windows: an import at the top of the module made `segformer train` fail there)
        return _windows_peak_working_set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _windows_peak_working_set() -> int | None:
    """PeakWorkingSetSize of this process (GetProcessMemoryInfo), or None where that cannot be read."""
    import ctypes

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", ctypes.c_ulong), ("PageFaultCount", ctypes.c_ulong)] + [
            (name, ctypes.c_size_t)
            for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                         "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")
        ]  # fmt: skip

    try:
        counters = Counters()
        counters.cb = ctypes.sizeof(counters)
        kernel32, psapi = ctypes.windll.kernel32, ctypes.windll.psapi  # type: ignore[attr-defined]
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p
        handle = kernel32.GetCurrentProcess()
        if not psapi.GetProcessMemoryInfo(ctypes.c_void_p(handle), ctypes.byref(counters), counters.cb):
            return None
        return int(counters.PeakWorkingSetSize)
    except (AttributeError, OSError):  # (no windll: not Windows)
        return None


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunLog:
    """The run's reporting, from the main rank only (other ranks' calls do nothing visible):
    ``train_config.json``, ``metrics.jsonl`` (one JSON object per record; ``time`` is seconds since the log
    opened), TensorBoard scalars (when tensorboard is installed), progress on stderr, and pictures."""

    def __init__(
        self,
        output: Path,
        config: Mapping[str, Any],
        *,
        is_main: bool,
        steps: int,
        start: int,
        batch_size: int,
        device: torch.device,
        progress: bool = True,
        terminal: bool | None = None,
    ):
        from tqdm import tqdm

        self.output, self.is_main, self.steps, self.batch_size, self.device = output, is_main, steps, batch_size, device
        self.path, self.writer = output / "metrics.jsonl", None
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []
        self._plot_note_shown = False
        self.last_evaluation: tuple[int, dict[str, Any]] | None = None  # (step, metrics) read back on a resume
        if self.is_main:
            output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output / "train_config.json", json.dumps(config, indent=2) + "\n")
            for record in self._drop_records_after(start):  # a resumed run's curves start at step 0, not here
                if isinstance(record.get("loss"), (int, float)):
                    self.losses.append((record["step"], float(record["loss"])))
                if "eval/mIoU" in record:  # (the run's last evaluation, for its checkpoints' model cards)
                    self.last_evaluation = (record["step"], {k[5:]: v for k, v in record.items() if k[:5] == "eval/"})
                    if isinstance(record["eval/mIoU"], (int, float)):
                        self.evals.append((record["step"], float(record["eval/mIoU"])))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass
        terminal = sys.stderr.isatty() if terminal is None else terminal
        show_bar = progress and self.is_main and terminal
        self.lines = self.is_main and not show_bar  # plain lines where a bar cannot redraw, or is not wanted
        self.bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, disable=not show_bar)
        self.tic = self.last_tic = time.perf_counter()
        self.start = self.last_step = start

    def _drop_records_after(self, start: int) -> list[dict[str, Any]]:
        """metrics.jsonl as of step ``start``: a run resumed from its last checkpoint does again the steps logged
        after it (a crash between checkpoints), and a new run in a folder whose run never reached a checkpoint
        starts at 0; their records would otherwise appear twice, or mix two runs. A line cut short by a crash
        goes too. Returns the records kept."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        kept, records = [], []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
                kept.append(line)
                records.append(record)
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return records

    def message(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with a "step") to metrics.jsonl; its numbers also go to TensorBoard."""
        if not self.is_main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics_to_json(record)) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def step(self, step: int, loss: float, lr: float, *, write: bool) -> None:
        """One optimiser step done; with ``write``, a record (and, off a terminal, a progress line)."""
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.losses.append((step, loss))
        if not write:
            return
        now = time.perf_counter()
        per_step = (now - self.last_tic) / max(step - self.last_step, 1)
        self.last_tic, self.last_step = now, step
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "time": round(now - self.tic, 3),
            "sec_per_step": round(per_step, 4),
            "images_per_sec": round(self.batch_size / per_step, 2) if per_step > 0 else None,
            "eta_sec": round(per_step * (self.steps - step), 1),
            "peak_mem_mb": round(peak / 2**20, 1) if (peak := peak_memory_bytes(self.device)) is not None else None,
        }
        self.record(record)
        if self.lines:
            memory = f"  peak {peak / 2**30:.2f} GB" if peak is not None else ""
            self.message(
                f"step {step}/{self.steps}  loss {loss:.4f}  lr {lr:.2e}  {per_step:.2f} s/step  "
                f"{record['images_per_sec']} img/s  ETA {_duration(record['eta_sec'])}{memory}"
            )

    def evaluation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record an evaluation, print its headline, and redraw ``curves.png``."""
        keys = ("mIoU", "aAcc", "mAcc", "IoU", "num_images")  # (the image count: --max-eval-images may change)
        self.record({"step": step, **{f"eval/{k}": metrics[k] for k in keys if k in metrics}})
        self.message(f"step {step}: mIoU {100 * metrics['mIoU']:.2f}  aAcc {100 * metrics['aAcc']:.2f}")
        self.evals.append((step, float(metrics["mIoU"])))
        if self.is_main:
            self._picture("curves.png", self._draw_curves)

    def samples(self, step: int, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: np.ndarray) -> None:
        """Write ``val_samples/step_N.png``: one row per (image (H, W, 3) uint8, ground truth (H, W), prediction
        (H, W)) with the class colours of ``palette`` (ignored pixels black)."""
        if self.is_main and rows:
            self._picture(f"val_samples/step_{step}.png", lambda plt: self._draw_samples(plt, rows, palette))

    def close(self, metrics: dict[str, Any] | None = None) -> None:
        """Close the bar and TensorBoard; print the table of ``metrics`` (the last evaluation), if any."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if metrics is not None and self.is_main:
            print(format_table(metrics), file=sys.stderr)

    # ------------------------------------------------------------------------------------- pictures
    def _picture(self, name: str, draw: Callable[[Any], Any]) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only, no display
            import matplotlib.pyplot as plt
        except ImportError:
            if not self._plot_note_shown:
                self.message('note: no curves.png / val_samples (pip install "segformer[plot]" for matplotlib)')
                self._plot_note_shown = True
            return
        figure = draw(plt)
        path = self.output / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
        plt.close(figure)

    def _draw_curves(self, plt: Any) -> Any:
        figure, loss_axis = plt.subplots(figsize=(7, 4))
        if self.losses:
            steps, values = zip(*self.losses, strict=True)
            loss_axis.plot(steps, values, color="tab:blue", linewidth=0.8, alpha=0.35)
            window = max(len(values) // 50, 1)  # a running mean reads better than raw per-step losses
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            loss_axis.plot(steps[window - 1 :], smooth, color="tab:blue", label="training loss")
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("training loss", color="tab:blue")
        if self.evals:
            miou_axis = loss_axis.twinx()
            steps, values = zip(*self.evals, strict=True)
            miou_axis.plot(steps, [100 * v for v in values], "o-", color="tab:orange", label="validation mIoU")
            miou_axis.set_ylabel("validation mIoU (%)", color="tab:orange")
        loss_axis.set_title(
            f"{plot_text(self.output.name)}: step {self.losses[-1][0] if self.losses else 0}/{self.steps}"
        )
        figure.tight_layout()
        return figure

    @staticmethod
    def _draw_samples(plt: Any, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], palette: np.ndarray) -> Any:
        figure, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
        colours = np.concatenate([palette, np.zeros((256 - len(palette) % 256, 3), np.uint8)])
        for row, (image, truth, pred) in zip(axes, rows, strict=True):
            for axis, shown, title in zip(
                row,
                (image, colours[truth % 256], colours[pred % 256]),
                ("image", "ground truth", "prediction"),
                strict=True,
            ):
                axis.imshow(shown)
                axis.set_title(title)
                axis.axis("off")
        figure.tight_layout()
        return figure


__all__ = ["RunLog", "peak_memory_bytes"]
