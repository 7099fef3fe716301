"""Statistics of a data set's masks: class pixel counts and the class weights derived from them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .datasets import ClassTally, SegmentationDataset, distinct_counts


def class_tally(dataset: SegmentationDataset, *, num_threads: int = 8) -> ClassTally:
    """What the masks of ``dataset`` hold (labelled pixels per class, ignored pixels, masks ignored throughout):
    the :class:`ClassTally` a full data check counts, for a run that did not make one. Reads every mask once."""
    tally = ClassTally(np.zeros(dataset.num_labels, np.int64))

    def count(index: int) -> None:
        tally.add(*distinct_counts(dataset.read_mask(index)))

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        list(pool.map(count, range(len(dataset))))
    return tally


def class_pixel_counts(dataset: SegmentationDataset, *, num_threads: int = 8) -> np.ndarray:
    """(K,) int64: how many labelled pixels of each class the masks of ``dataset`` hold (ignored pixels and
    values outside 0..K-1 are not counted). Reads every mask once."""
    return class_tally(dataset, num_threads=num_threads).pixels


def median_frequency_weights(counts: np.ndarray, *, max_weight: float = 10.0) -> np.ndarray:
    """(K,) float loss weights by median-frequency balancing (Eigen & Fergus, 2015): w_c = median(f) / f_c,
    f_c = the share of labelled pixels of class c. Rare classes weigh more, common ones less; a class that
    never occurs gets 1 (it never enters the loss), and weights are capped at ``max_weight`` so that a
    handful of pixels cannot dominate a batch."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return np.ones_like(counts)
    freq = counts / counts.sum()
    weights = np.ones_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
    return np.minimum(weights, max_weight)


__all__ = ["class_pixel_counts", "class_tally", "median_frequency_weights"]
