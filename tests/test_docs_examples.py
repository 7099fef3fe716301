"""The examples of the Transformers SegFormer documentation page, run with our package.

The hub cannot be reached here, so each test lays a real huggingface_hub cache out in tmp_path, with
checkpoints of the published repos' shapes and random weights, and runs the example offline in a fresh
process (HF_HUB_OFFLINE=1), exactly as a user's script would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrained import populate_hub_cache

from segformer import SegformerConfig, SegformerForImageClassification, SegformerForSemanticSegmentation

LEGACY_PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "SegformerFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "reduce_labels": False,
    "resample": 2,
    "size": 512,
}


def publish(tmp_path, repo_id: str, model, preprocessor: dict) -> None:
    """Put a model and its preprocessor config into a local hub cache, as a download would have."""
    folder = tmp_path / repo_id.replace("/", "_")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    populate_hub_cache(tmp_path / "hub", repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})


def run_offline(tmp_path, script: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_model_and_classification_examples(tmp_path):
    id2label = {i: f"imagenet class {i}" for i in range(1000)}
    id2label[281] = "tabby, tabby cat"
    model = SegformerForImageClassification(SegformerConfig.from_variant("b0", id2label=id2label))
    with torch.no_grad():  # make the "cat" class win whatever the image
        model.classifier.bias[281] = 100.0
    publish(tmp_path, "nvidia/mit-b0", model, LEGACY_PREPROCESSOR)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    stdout = run_offline(
        tmp_path,
        """
from segformer import SegformerFeatureExtractor, SegformerModel, SegformerForImageClassification
import torch
from PIL import Image
image = Image.open("cat.png")
feature_extractor = SegformerFeatureExtractor.from_pretrained("nvidia/mit-b0")
model = SegformerModel.from_pretrained("nvidia/mit-b0")
inputs = feature_extractor(image, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
print(list(outputs.last_hidden_state.shape))
model = SegformerForImageClassification.from_pretrained("nvidia/mit-b0")
with torch.no_grad():
    logits = model(**inputs).logits
predicted_label = logits.argmax(-1).item()
print(model.config.id2label[predicted_label])
""",
    )
    assert stdout.splitlines() == ["[1, 256, 16, 16]", "tabby, tabby cat"]


@pytest.mark.slow
def test_semantic_segmentation_example(tmp_path):
    model = SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=150))
    publish(
        tmp_path, "nvidia/segformer-b0-finetuned-ade-512-512", model, {**LEGACY_PREPROCESSOR, "reduce_labels": True}
    )
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "im.jpg")
    stdout = run_offline(
        tmp_path,
        """
from segformer import SegformerFeatureExtractor, SegformerForSemanticSegmentation
from PIL import Image
feature_extractor = SegformerFeatureExtractor.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512")
model = SegformerForSemanticSegmentation.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512")
image = Image.open("im.jpg")
inputs = feature_extractor(images=image, return_tensors="pt")
outputs = model(**inputs)
logits = outputs.logits  # shape (batch_size, num_labels, height, width)
print(tuple(logits.shape), feature_extractor.reduce_labels)
maps = feature_extractor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
print(tuple(maps[0].shape), maps[0].dtype)
""",
    )
    assert stdout.splitlines() == ["(1, 150, 128, 128) True", "(480, 640) torch.int64"]
