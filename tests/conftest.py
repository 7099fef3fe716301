"""Shared test helpers: tiny configs, seeded random weights, relative error."""

from __future__ import annotations

import os

import pytest
import torch

from segformer import SegformerConfig

# Under pytest-xdist every worker is a process of its own; one thread each keeps 2 cores busy, not thrashing.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
            decoder_hidden_size=16)  # fmt: skip


def tiny_config(**changes) -> SegformerConfig:
    """A SegFormer small enough for fast tests, with every code path of the real ones (sr ratios 8,4,2,1)."""
    return SegformerConfig(**{**TINY, "num_labels": 5, **changes})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight, bias, norm and BatchNorm statistic a random, non-trivial value (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("bias", "running_mean")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.ndim == 1:
                t.copy_(1 + torch.randn(t.shape, generator=gen) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / (t[0].numel() ** 0.5))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def tiny() -> SegformerConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it in this worker."""
    torch.manual_seed(0)
