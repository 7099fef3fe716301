"""segformer: SegFormer semantic segmentation, checkpoint-compatible with Transformers.

>>> from segformer import SegformerConfig, SegformerForSemanticSegmentation
>>> model = SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=150))
"""

from .config import VARIANTS, SegformerConfig
from .hub import CheckpointError, HubError, ShapeMismatchError
from .modeling import (
    BaseModelOutput,
    SegformerDecodeHead,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegFormerImageClassifierOutput,
    SegformerModel,
    SegformerPreTrainedModel,
    SemanticSegmenterOutput,
)
from .processing import SegformerBatch, SegformerFeatureExtractor, SegformerImageProcessor

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "BaseModelOutput",
    "CheckpointError",
    "HubError",
    "ShapeMismatchError",
    "SegFormerImageClassifierOutput",
    "SegformerBatch",
    "SegformerFeatureExtractor",
    "SegformerImageProcessor",
    "SegformerConfig",
    "SegformerDecodeHead",
    "SegformerForImageClassification",
    "SegformerForSemanticSegmentation",
    "SegformerModel",
    "SegformerPreTrainedModel",
    "SemanticSegmenterOutput",
]
