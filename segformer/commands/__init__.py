"""Sub-commands of the ``segformer`` program, one module each (see segformer/cli.py), and the few argument
types they share."""

from __future__ import annotations

import argparse


def scales_arg(text: str) -> list[float]:
    """argparse type for multi-scale ratios: ``0.75`` or ``0.75,1,1.25``; with ``nargs="+"`` both
    ``--scales 0.75 1 1.25`` and ``--scales 0.75,1,1.25`` work (flatten with :func:`flatten`)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.75,1,1.25, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text!r}")
    return values


def flatten(groups: list[list[float]] | None) -> list[float] | None:
    return None if groups is None else [v for group in groups for v in group]
