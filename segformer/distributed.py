"""Tiny rank-aware helpers over ``torch.distributed``; every one of them also works in a single process.

A run started by ``torchrun`` has RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT) in its
environment; :func:`init_distributed` reads them and joins the process group (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .pretrained import select_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on this node and the
    device it should use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun and pick this process's device.

    ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; a string forces one
    ("cpu" runs a multi-process job on gloo even on a GPU machine; "cuda" means ``cuda:LOCAL_RANK``). A device
    this machine lacks, or more processes than CUDA devices, is a one-line ValueError. Without torchrun this
    returns rank 0 of 1.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = select_device(device)  # one line for a device this machine lacks
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank} (LOCAL_RANK) would use cuda:{local_rank}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes per machine "
                "(torchrun --nproc-per-node) or pass --device cpu"
            )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """nccl only reduces CUDA tensors; gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (a no-op in one process). Returns the sum on ``tensor``'s device."""
    if not is_distributed():
        return tensor
    t = tensor.to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes. Returns the mean on ``tensor``'s device."""
    return all_reduce_sum(tensor) / get_world_size() if is_distributed() else tensor


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (so that every rank takes the same branch at the same step)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """``flag`` as decided by rank ``src`` (so that every rank takes the same branch, e.g. to stop together)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src)
    return bool(t.item())


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Set every process's buffers of ``module`` (BatchNorm's running statistics) to rank ``src``'s. Without
    SyncBatchNorm each process's statistics follow its own batches after the step (DDP sends rank 0's only at the
    next forward), so an evaluation shared by the ranks scored a mixture of models, not the one rank 0 saves."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        t = buffer.detach().to(_comm_device())
        dist.broadcast(t, src)
        buffer.data.copy_(t.to(buffer.device))


E = TypeVar("E", bound=BaseException)
_EVERY_RANK = "raised_on_every_rank"


def raised_on_every_rank(exc: E) -> E:
    """Mark ``exc`` as an error every rank raises alike, from what the ranks share (the options, an all-reduced
    value, the main rank's verdict): rank 0 reports it, the other ranks end silently (see
    :func:`reported_by_rank_zero`). Returns ``exc``."""
    setattr(exc, _EVERY_RANK, True)
    return exc


@contextlib.contextmanager
def every_rank_raises(*types: type[BaseException]) -> Iterator[None]:
    """Mark an error of ``types`` raised in this block with :func:`raised_on_every_rank`: for a block whose
    errors only depend on what every rank shares."""
    try:
        yield
    except types as exc:
        raised_on_every_rank(exc)
        raise


class AnotherRankRefused(ValueError):
    """What a rank raises when another rank's checks refused the run while its own passed."""


@contextlib.contextmanager
def errors_agreed(*types: type[BaseException]) -> Iterator[None]:
    """A block of checks every rank runs on what it reads itself (the output folder, the data folder: alike on
    every rank as a rule, though not by construction): rank 0's error, where it has one, is raised on every rank
    and reported by rank 0 alone (:func:`raised_on_every_rank`); an error of other ranks alone is reported by
    those ranks, rank 0 saying that another process refused the run. The block must hold no collective of its
    own (a rank that raised would skip it). An exception not of ``types`` leaves at once on the rank that raised
    it, without the agreement: the other ranks wait in it until torchrun, seeing a worker fail, stops them (so
    ``types`` names every error a check is expected to raise). In one process: the block as it is."""
    error: BaseException | None = None
    try:
        yield
    except types as exc:
        if not is_distributed():
            raise
        error = exc
    if not is_distributed():
        return
    here = error is not None
    if broadcast_flag(here):  # (rank 0's verdict)
        raise raised_on_every_rank(error or AnotherRankRefused("rank 0 refused the run"))
    if any_rank(here):
        if error is not None:
            raise error  # (this rank's own: it reports it)
        other = AnotherRankRefused("another process of the run refused it (its error is printed above)")
        raise other if get_rank() == 0 else raised_on_every_rank(other)


def reported_by_rank_zero(exc: BaseException) -> bool:
    """True on a rank other than 0 of a launched run (RANK set, so also after the process group is gone) for an
    error marked by :func:`raised_on_every_rank`: rank 0 raised the same one and reports it, so this rank need
    not print it again. False in one process, on rank 0 and for any other error (each rank reports its own)."""
    return bool(getattr(exc, _EVERY_RANK, False)) and launched_rank_not_zero()


def launched_rank_not_zero() -> bool:
    """Whether this process is a rank other than 0 of a launched run of more than one process (from the
    environment, so also after the process group is gone)."""
    return launched_by_torchrun() and int(os.environ["RANK"]) != 0 and int(os.environ["WORLD_SIZE"]) > 1


def wait_for_rank_zero(timeout: float = 30.0) -> None:
    """On a rank that ends silently because rank 0 reports its error (:func:`reported_by_rank_zero`): under
    torchrun, which stops every worker as soon as one of them ends with an error, wait (at most ``timeout``
    seconds) to be stopped once rank 0 has printed it and ended, so that the launcher neither cuts rank 0's
    report short nor names this silent rank as the failure's root cause. Under any other launcher, return."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        time.sleep(timeout)


@contextlib.contextmanager
def warnings_from_rank_zero() -> Iterator[None]:
    """Within this block, on a rank other than 0 of a launched run, the package's warnings (the ``segformer``
    logger below ERROR: a precision that falls back to float32, weights newly initialised) are not printed: every
    rank would print the same line. Errors still are. In one process, and on rank 0, nothing changes."""
    log = logging.getLogger("segformer")
    level = log.level
    if launched_rank_not_zero():
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all processes, differentiable: every process gets the same sum, so the gradient
    of each process's input is the sum of every process's output gradient. (torch.distributed.nn.functional's
    all_reduce is deprecated and warns at each call.)"""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all processes), on any device.

    torch.nn.SyncBatchNorm only runs on GPUs; this one uses a differentiable all_reduce (gloo on CPU, nccl on
    CUDA), so N processes normalise exactly as one process with the whole batch would (to float rounding),
    gradients included. Outside training or a process group it is a plain BatchNorm2d; its state-dict keys
    are BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.ndim)]
        xf = x.float()
        # Two passes (mean, then the squared deviations) for the numerical stability of the variance.
        count = torch.tensor([x.numel() // x.shape[1]], device=x.device, dtype=torch.float32)
        sums = all_reduce(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n  # (C,)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        centred = xf - mean.view(shape)
        # The biased variance, as BatchNorm normalises with it; the running estimate below takes the unbiased one.
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d in ``module`` (in place where nested) by a SyncBatchNorm holding the same
        parameters and buffers. Returns the converted module."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.to(device=module.weight.device if module.affine else None)
            new.load_state_dict(module.state_dict())
            if module.affine:
                new.weight, new.bias = module.weight, module.bias  # keep the very Parameters
            new.train(module.training)
            return new
        for name, child in module.named_children():
            converted = cls.convert(child)
            if converted is not child:
                setattr(module, name, converted)
        return module


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, however deeply nested; any other module as is."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


__all__ = [
    "AnotherRankRefused",
    "DistInfo",
    "SyncBatchNorm",
    "all_gather_objects",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "launched_rank_not_zero",
    "broadcast_flag",
    "cleanup",
    "errors_agreed",
    "every_rank_raises",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "launched_by_torchrun",
    "raised_on_every_rank",
    "reported_by_rank_zero",
    "unwrap_model",
    "wait_for_rank_zero",
]
