"""Data: segmentation data sets on disk (folder, ADE20K, Cityscapes), paired transforms, synthetic data."""

from .build import build_dataset, detect_kind
from .datasets import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    DatasetReport,
    SegmentationDataset,
    check_dataset,
)
from .synthetic import write_synthetic_dataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetReport",
    "SegmentationDataset",
    "build_dataset",
    "check_dataset",
    "detect_kind",
    "eval_transform",
    "train_transform",
    "write_synthetic_dataset",
]
