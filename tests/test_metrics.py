"""Confusion-matrix metrics against matrices and values computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from segformer.metrics import (
    ConfusionMatrix,
    compute_metrics,
    confusion_matrix,
    format_table,
    metrics_to_json,
)


def test_confusion_matrix_counts_by_hand_and_skips_ignore():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    # valid pixels: (0→0) (0→1) (1→1) (1→1) (2→2) (2→0); the two 255 pixels are not counted at all
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert torch.equal(confusion_matrix(pred, target, 3), expected)


def test_metrics_of_a_hand_computed_matrix():
    conf = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = compute_metrics(conf, ["a", "b", "c"])
    # IoU = TP / (TP + FP + FN): a 1/(1+1+1), b 2/(2+1+0), c 1/(1+0+1)
    assert m["IoU"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(4 / 6)
    assert m["Acc"] == pytest.approx({"a": 1 / 2, "b": 1.0, "c": 1 / 2})
    assert m["mAcc"] == pytest.approx(2 / 3)
    assert m["num_pixels"] == 6


def test_absent_class_is_nan_and_left_out_of_the_means():
    # class 2 appears neither in the targets nor in the predictions; class 1 is predicted but never true
    conf = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    m = compute_metrics(conf)
    assert m["IoU"]["2"] is None  # 0 / 0
    assert m["IoU"]["1"] == 0.0  # a false positive class counts, with IoU 0
    assert m["mIoU"] == pytest.approx((3 / 4 + 0.0) / 2)
    assert m["Acc"]["1"] is None and m["mAcc"] == pytest.approx(3 / 4)
    text = json.dumps(metrics_to_json(m))  # null, never NaN, in JSON
    assert "NaN" not in text and json.loads(text)["IoU"]["2"] is None
    table = format_table(m)
    assert "n/a" in table and table.endswith("(mIoU over the 2 of 3 classes present in the targets or predictions)")
    assert "mIoU over" not in format_table(compute_metrics(torch.tensor([[3, 1], [0, 2]])))  # (all present)


def test_classes_that_share_a_name_keep_their_own_entries():
    """Two classes named alike in labels.json: the second's IoU replaced the first's in the table, the JSON and
    the report, under one name, while the mIoU still averaged both (audit)."""
    m = compute_metrics(torch.tensor([[1, 1, 0], [0, 2, 0], [0, 1, 1]]), ["x", "other", "other"])
    assert list(m["IoU"]) == ["x", "other (1)", "other (2)"]
    assert m["IoU"]["other (1)"] == pytest.approx(2 / 4) and m["IoU"]["other (2)"] == pytest.approx(1 / 2)
    assert m["mIoU"] == pytest.approx(sum(m["IoU"].values()) / 3)


def test_all_pixels_ignored_gives_nan_metrics():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    m = cm.compute()
    assert m["num_pixels"] == 0 and math.isnan(m["mIoU"]) and math.isnan(m["aAcc"])
    assert metrics_to_json(m)["mIoU"] is None


def test_accumulation_equals_one_matrix_of_the_whole_set():
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (2, 5, 7), generator=gen) for _ in range(3)]
    targets = [torch.randint(0, 4, (2, 5, 7), generator=gen) for _ in range(3)]
    cm = ConfusionMatrix(4)
    for p, t in zip(preds, targets):
        cm.update(p, t)
    cm.reduce()  # a no-op outside a process group
    whole = confusion_matrix(torch.cat(preds), torch.cat(targets), 4)
    assert torch.equal(cm.mat, whole) and int(cm.mat.sum()) == 3 * 2 * 5 * 7


def test_out_of_range_labels_are_an_error():
    with pytest.raises(ValueError, match="target holds class 7"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, 255]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3)


def test_a_one_label_model_is_evaluated_on_two_classes(tmp_path, capsys):
    """A sigmoid model (num_labels=1) predicts class 1 where its probability is above 0.5; evaluate scores it
    on a two-class data set (as mmseg does), the same numbers as a hand count of those predictions; on any other
    class count it says what it needs."""
    import numpy as np
    from conftest import run_cli, tiny_config
    from PIL import Image

    from segformer import SegformerForSemanticSegmentation
    from segformer.data import build_dataset
    from segformer.evaluate import evaluate

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(3):
            (tmp_path / "d" / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / f"d/images/{split}/{i}.png"
            )
            mask = (rng.random((40, 48)) < 0.5).astype(np.uint8)
            mask[:4] = 255
            Image.fromarray(mask).save(tmp_path / "d" / "annotations" / split / f"{i}.png")
    (tmp_path / "d" / "labels.json").write_text(json.dumps(["background", "foreground"]))
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=1)).eval()
    val, _ = build_dataset(tmp_path / "d", "val")
    seen = []
    metrics = evaluate(model, val, on_image=lambda i, pred, labels: seen.append((pred.clone(), labels.clone())))
    assert all(set(pred.unique().tolist()) <= {0, 1} for pred, _ in seen)
    by_hand = ConfusionMatrix(2, 255)
    for pred, labels in seen:
        by_hand.update(pred[None], labels[None])
    expected = by_hand.compute(val.id2label)
    assert metrics["IoU"] == expected["IoU"] and metrics["mIoU"] == expected["mIoU"]
    model.save_pretrained(tmp_path / "m")
    code, out, err = run_cli(
        capsys, "eval", "--data", tmp_path / "d", "--model", tmp_path / "m", "--json", tmp_path / "r.json"
    )
    assert code == 0, err
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["mIoU"] == pytest.approx(expected["mIoU"])
    assert saved["amp"] == "none" and "amp_fallback_reason" not in saved  # what it was computed in (audit)
    code, out, err = run_cli(capsys, "eval", "--data", tmp_path / "d", "--model", tmp_path / "m", "--json",
                             tmp_path / "r.json", "--amp", "fp16")  # fmt: skip
    saved = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and saved["amp"] == "none" and saved["amp_fallback_reason"].startswith("float16 on cpu: ")
    # the protocol is printed and saved; --no-flip turns off the flip the checkpoint's inference_config.json asks for
    (tmp_path / "m" / "inference_config.json").write_text('{"mode": "whole", "flip": true}')
    for extra, words, flip in (([], "images, whole, flip\n", True), (["--no-flip"], "images, whole\n", False)):
        code, out, err = run_cli(capsys, "eval", "--data", tmp_path / "d", "--model", tmp_path / "m", "--json",
                                 tmp_path / "r.json", *extra)  # fmt: skip
        assert code == 0 and words in out, out
        assert json.loads((tmp_path / "r.json").read_text())["inference"]["flip"] is flip
    (tmp_path / "d" / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    three, _ = build_dataset(tmp_path / "d", "val")
    with pytest.raises(ValueError, match="one label .* has 3 classes; a one-label model is evaluated on two"):
        evaluate(model, three)
