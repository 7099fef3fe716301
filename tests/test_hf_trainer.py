"""Our models under Transformers' real ``Trainer`` (accelerate, a real ``datasets`` object, the docs' processor
transform): training with gradient accumulation, evaluate / predict, checkpoints that load with
``segformer.integrations.SaveConfigCallback`` and resume, and the message for a weights-only folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import U32, cross_entropy_tol, fp32_tol, reductions, rel_err, tiny_config

datasets = pytest.importorskip("datasets", reason="the Trainer tests need the dev extra")
transformers = pytest.importorskip("transformers", reason="the Trainer tests need the dev extra")
pytest.importorskip("accelerate", reason="Transformers' Trainer needs accelerate (the dev extra)")

from PIL import Image  # noqa: E402

from segformer import (  # noqa: E402
    CheckpointError,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
)
from segformer.integrations import SaveConfigCallback  # noqa: E402

# No dropout or drop path: two runs over the same samples compute the same gradients.
QUIET = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0}
QUIET["classifier_dropout_prob"] = 0.0


def _images(n: int, seed: int = 0, same: bool = False) -> datasets.Dataset:
    """n 48×64 photos with masks of 3 classes, as PIL images in a datasets.Dataset (the docs' data shape)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        r = np.random.default_rng(seed) if same else rng
        mask = r.integers(0, 3, (6, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        pixels = (np.array([40, 130, 220], np.uint8)[mask][..., None] + r.integers(0, 30, (48, 64, 3))).astype(np.uint8)
        images.append(Image.fromarray(pixels))
        masks.append(Image.fromarray(mask))
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "annotation": masks}, features=features)


def _transformed(ds: datasets.Dataset, processor: SegformerImageProcessor) -> datasets.Dataset:
    """The docs' recipe: the processor as the dataset's transform, batch by batch."""

    def transform(batch):
        inputs = processor(batch["image"], batch["annotation"], return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "labels": inputs["labels"]}

    return ds.with_transform(transform)


def _args(out, **changes) -> transformers.TrainingArguments:
    values = dict(
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,  # (the transform needs the image columns)
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.TrainingArguments(str(out), **{**values, **changes})


@pytest.fixture
def processor() -> SegformerImageProcessor:
    return SegformerImageProcessor(size={"height": 64, "width": 64})


def test_gradient_accumulation_averages_the_micro_batches(tmp_path, processor):
    """Two micro-batches of the same two samples with accumulation 2 must step like one micro-batch: the
    Trainer divides each micro-batch's loss by the accumulation steps (our forward takes no **kwargs, so it
    gets no num_items_in_batch to scale by). A summed gradient would step twice as far."""
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    reference = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    reference.load_state_dict(model.state_dict())
    data = _images(4, same=True)
    sgd = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)  # (no clipping)
    args = _args(tmp_path, gradient_accumulation_steps=2, **sgd)
    transformers.Trainer(model=model, args=args, train_dataset=_transformed(data, processor)).train()

    # the plain loop: one micro-batch of two of the (identical) samples, one SGD step
    pair = data.select([0, 1])
    batch = processor(pair["image"], pair["annotation"], return_tensors="pt")
    reference.train()
    reference(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    moved = [(a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters(), strict=True)]
    start = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    lengths = reductions(start.train(), batch["pixel_values"], backward=True)
    top_grad = max(p.grad.abs().max().item() for p in reference.parameters())
    top_weight = max(p.abs().max().item() for p in reference.parameters())
    # lr x two fp32 gradients, each within fp32_tol of the largest; and each side's step rounds once (u |p|)
    bound = sgd["learning_rate"] * 2 * fp32_tol(lengths) * top_grad + 2 * U32 * top_weight
    assert max(moved) <= bound, (max(moved), bound)
    # and the step was not a no-op (the comparison above would pass trivially)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), start.state_dict().values()))


def test_evaluate_and_predict_match_the_model(tmp_path, processor):
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    data = _images(3, seed=2)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), eval_dataset=_transformed(data, processor))
    metrics = trainer.evaluate()
    predictions = trainer.predict(_transformed(data, processor))
    model.eval()
    batch = processor([r["image"] for r in data], [r["annotation"] for r in data], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        pixels, labels = batch["pixel_values"], batch["labels"]
        per_batch = [model(pixel_values=pixels[i : i + 2], labels=labels[i : i + 2]).loss for i in (0, 2)]
    logits = predictions.predictions[0] if isinstance(predictions.predictions, tuple) else predictions.predictions
    assert logits.shape == (3, 3, 16, 16)
    # batches of 2 + 1 against one of 3 (other GEMM blockings): two fp32 passes, each within fp32_tol of its depth
    tol = 2 * fp32_tol(reductions(model, pixels))
    assert rel_err(torch.from_numpy(logits), out.logits) <= tol
    # Trainer's eval loss: the mean of the batches' losses, weighted by their sizes (2 and 1), from the logits of two
    # fp32 passes (tol); each side's mean of [l0, l0, l1] rounds 3 more times (2 additions, 1 division)
    expected = ((per_batch[0] * 2 + per_batch[1]) / 3).item()
    bound = cross_entropy_tol(tol * out.logits.abs().max().item(), expected) + 2 * 3 * U32 * expected
    assert abs(metrics["eval_loss"] - expected) <= bound


def test_checkpoints_load_and_resume_with_the_callback(tmp_path, processor):
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    data = _transformed(_images(4, seed=3), processor)
    args = _args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1)
    callbacks = [SaveConfigCallback(processor)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-2"
    assert len(json.loads((folder / "config.json").read_text())["id2label"]) == 3
    assert (folder / "preprocessor_config.json").is_file()
    loaded = SegformerForSemanticSegmentation.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert SegformerImageProcessor.from_pretrained(folder).size == {"height": 64, "width": 64}
    trainer.save_model()  # the final weights into output_dir, beside the config written at the end of training
    final = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "run")
    for name, tensor in model.state_dict().items():
        assert torch.equal(final.state_dict()[name], tensor), name

    # resume from checkpoint-1 to step 2: Trainer reads our config.json and state and reaches the same weights
    resumed = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    args = _args(tmp_path / "run", max_steps=2, save_strategy="no")
    again = transformers.Trainer(model=resumed, args=args, train_dataset=data, callbacks=[SaveConfigCallback()])
    again.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert again.state.global_step == 2
    for name, tensor in model.state_dict().items():
        # the checkpoint holds the weights, optimizer, scheduler and RNG states bit for bit, and step 2 runs the same
        # batch through the same kernels: bitwise the same weights
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_a_weights_only_checkpoint_names_the_fix(tmp_path, processor):
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3))
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_transformed(_images(2), processor))
    trainer.train()
    folder = tmp_path / "run" / "checkpoint-1"
    assert (folder / "model.safetensors").is_file() and not (folder / "config.json").exists()
    with pytest.raises(CheckpointError, match=r"checkpoint-1: weights without config\.json; pass config="):
        SegformerForSemanticSegmentation.from_pretrained(folder)
    loaded = SegformerForSemanticSegmentation.from_pretrained(folder, config=model.config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_the_callback_ignores_other_events_and_refuses_a_model_without_config(tmp_path):
    callback = SaveConfigCallback()
    assert callback.on_step_end(None, None, None) is None and callback.on_some_future_event() is None
    with pytest.raises(AttributeError):
        callback.missing  # noqa: B018
    (tmp_path / "checkpoint-3").mkdir()

    class Args:
        output_dir, should_save = str(tmp_path), True

    class State:
        global_step = 3

    with pytest.raises(TypeError, match="has no config to save"):
        callback.on_save(Args(), State(), None, model=torch.nn.Linear(2, 2))
    Args.should_save = False  # a process that does not save writes nothing
    callback.on_save(Args(), State(), None, model=torch.nn.Linear(2, 2))


def test_the_callback_finds_the_config_inside_wrappers(tmp_path, processor):
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3))
    wrapped = torch.nn.DataParallel(torch.compile(model, backend="eager"))
    (tmp_path / "checkpoint-7").mkdir()

    class Args:
        output_dir, should_save = str(tmp_path), True

    class State:
        global_step = 7

    SaveConfigCallback(processor).on_save(Args(), State(), None, model=wrapped)
    assert len(json.loads((tmp_path / "checkpoint-7" / "config.json").read_text())["id2label"]) == 3
    assert (tmp_path / "checkpoint-7" / "preprocessor_config.json").is_file()
