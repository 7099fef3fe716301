"""A trained checkpoint is complete: Transformers' pipeline and AutoImageProcessor load it, the evaluation
protocol travels with it, and its model card says how it was trained and how well it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_pil_processor, randomize_, tiny_config
from PIL import Image

from segformer import SegformerForSemanticSegmentation, SegformerImageProcessor
from segformer.inference import InferenceOptions
from segformer.run_files import (
    load_inference_options,
    save_inference_options,
    save_preprocessor,
    write_model_card,
)


@pytest.fixture
def checkpoint(tmp_path):
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=3, id2label={0: "a", 1: "b", 2: "c"})))
    model.save_pretrained(tmp_path)
    save_preprocessor(tmp_path, size=(64, 64))
    options = InferenceOptions(mode="slide", crop_size=(64, 64), stride=(48, 48))
    save_inference_options(tmp_path, options)
    metrics = {"mIoU": 0.5, "aAcc": 0.8, "mAcc": 0.6, "IoU": {"a": 0.7, "b": 0.3, "c": None}}
    write_model_card(tmp_path, model_name="tiny", base_model=None, dataset="my-folder", metrics=metrics,
                     hyperparameters={"lr": 6e-4, "steps": 10}, options=options, step=10)  # fmt: skip
    return tmp_path, options


def test_inference_protocol_round_trips(checkpoint, tmp_path):
    path, options = checkpoint
    assert load_inference_options(path) == options
    assert load_inference_options(tmp_path / "nowhere") is None
    (path / "inference_config.json").write_text('{"mode": "tiles"}')
    with pytest.raises(ValueError, match="inference_config.json: not a valid inference config .*mode must be"):
        load_inference_options(path)


def test_model_card_has_metadata_metrics_and_recipe(checkpoint):
    card = (checkpoint[0] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: segformer\n")
    assert '  - "my-folder"' in card and "value: 0.5000" in card and "mean_iou" in card
    assert "| mIoU | 50.00 |" in card and "| b | 30.00 |" in card and "| c | n/a |" in card
    assert "| lr | `0.0006` |" in card and '"mode": "slide"' in card


@pytest.mark.oracle
def test_transformers_pipeline_and_auto_processor_load_it(checkpoint):
    transformers = pytest.importorskip("transformers", reason="the oracle tests need the dev extra (transformers)")
    hf_pil_processor(transformers)  # (skips where this Transformers builds no image processor, so no pipeline)
    path, _ = checkpoint
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    assert processor.size == {"height": 64, "width": 64}
    segmenter = transformers.pipeline("image-segmentation", model=str(path), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8))
    results = segmenter(image)
    assert results and {r["label"] for r in results} <= {"a", "b", "c"}
    assert all(r["mask"].size == (70, 50) for r in results)


@pytest.mark.oracle
def test_transformers_pipeline_takes_our_model_object_with_our_processor(checkpoint):
    """Transformers' pipeline turns model outputs that are not its own ModelOutput class into plain dicts, which its
    own processor's post-processing cannot read (``outputs.logits``: audit); ours reads them, so our model object
    runs in the pipeline with our processor (README), and segments as the pipeline does on the checkpoint's path."""
    transformers = pytest.importorskip("transformers", reason="the oracle tests need the dev extra (transformers)")
    hf_pil_processor(transformers)
    path, _ = checkpoint
    model, processor = (
        SegformerForSemanticSegmentation.from_pretrained(path),
        SegformerImageProcessor.from_pretrained(path),
    )
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), np.uint8))
    ours = transformers.pipeline("image-segmentation", model=model, image_processor=processor, device="cpu")(image)
    with torch.no_grad():
        direct = model(**processor(image, return_tensors="pt"))
    labels = processor.post_process_semantic_segmentation(direct, target_sizes=[(50, 70)])[0].numpy()
    assert {r["label"] for r in ours} == {model.config.id2label[int(k)] for k in np.unique(labels)}
    for r in ours:  # (the pipeline's masks are our own post-processing's, exactly)
        k = model.config.label2id[r["label"]]
        assert np.array_equal(np.asarray(r["mask"]) > 0, labels == k)
    theirs = transformers.pipeline("image-segmentation", model=str(path), device="cpu")(image)
    agree = sum(int(((np.asarray(a["mask"]) > 0) & (np.asarray(b["mask"]) > 0)).sum())
                for a in ours for b in theirs if a["label"] == b["label"])  # fmt: skip
    assert agree >= 0.99 * 50 * 70  # (logits within 1e-5 of Transformers': only near-ties may flip)
