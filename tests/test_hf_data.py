"""Hugging Face `datasets` as data: save_to_disk folders, parquet folders and hub ids (offline, from the
cache), columns detected or named, and a run that trains and evaluates on one end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config
from PIL import Image

datasets = pytest.importorskip("datasets", reason="the Hugging Face datasets tests need the dev extra")

from segformer.data.build import build_dataset, detect_kind  # noqa: E402
from segformer.data.datasets import check_dataset  # noqa: E402


def _split(rng: np.random.Generator, n: int, image: str = "image", label: str = "annotation", size=(48, 64)):
    """Images whose left half is class 1 (bright) and right half class 2 (dark), with a class-0 border."""
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros(size, np.uint8)
        mask[4:-4, 4 : size[1] // 2] = 1
        mask[4:-4, size[1] // 2 : -4] = 2
        levels = np.array([128, 230, 25], np.uint8)[mask]
        pixels = np.clip(levels[..., None] + rng.integers(-20, 20, (*size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
        masks.append(Image.fromarray(mask))
    features = datasets.Features({image: datasets.Image(), label: datasets.Image()})
    return datasets.Dataset.from_dict({image: images, label: masks}, features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict({"train": _split(rng, 8), "validation": _split(rng, 3)}).save_to_disk(str(root))
    (root / "labels.json").write_text(json.dumps(["border", "bright", "dark"]))
    return root


def test_save_to_disk_folder_reads_like_a_folder_layout(saved):
    assert detect_kind(saved) == "hf"
    dataset, _ = build_dataset(saved, "val")
    assert len(dataset) == 3 and dataset.id2label == {0: "border", 1: "bright", 2: "dark"}
    pixels, labels = dataset[0]
    assert pixels.shape == (3, 48, 64) and labels.shape == (48, 64)
    assert set(labels.unique().tolist()) == {0, 1, 2} and check_dataset(dataset).ok


def test_parquet_folder_named_columns_and_numbered_classes(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "validation"):
        _split(rng, 2, image="pixel_values", label="semantic_map").to_parquet(
            str(tmp_path / f"{split}-00000-of-00001.parquet")
        )
    dataset, _ = build_dataset(tmp_path, "train")
    assert (dataset.image_column, dataset.label_column) == ("pixel_values", "semantic_map")
    assert dataset.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}  # no labels.json: numbered
    # numbered classes count up to the largest stored value that is no ignore value: 0 ignored would still be
    # class 0 (never trained or scored) unless the classes are reduced
    with pytest.raises(ValueError, match="ignore index 0 is also the class 'class_0'.*--reduce-labels"):
        build_dataset(tmp_path, "train", ignore_index=0)
    reduced, _ = build_dataset(tmp_path, "train", ignore_index=0, reduce_labels=True)
    assert reduced.id2label == {0: "class_0", 1: "class_1"}
    with pytest.raises(ValueError, match="no column 'photo' .*columns: pixel_values, semantic_map"):
        build_dataset(tmp_path, "train", image_column="photo")
    with pytest.raises(ValueError, match="no test split"):
        build_dataset(tmp_path, "test")


def test_a_folder_layout_with_a_parquet_table_inside_stays_a_folder_data_set(tmp_path):
    """One statistics table in parquet beside images/ and annotations/ made the folder an imagefolder (images and
    masks as separate rows, then a column error naming no layout: audit)."""
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for folder, array in (("images", rng.integers(0, 256, (8, 8, 3))), ("annotations", rng.integers(0, 2, (8, 8)))):
            (tmp_path / folder / split).mkdir(parents=True)
            Image.fromarray(array.astype(np.uint8)).save(tmp_path / folder / split / "a.png")
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "stats").mkdir()
    _split(rng, 1).to_parquet(str(tmp_path / "stats" / "pixels.parquet"))
    assert detect_kind(tmp_path) == "folder"
    dataset, _ = build_dataset(tmp_path, "train")
    assert len(dataset) == 1 and dataset.read(0)[1].shape == (8, 8)


def test_an_empty_mask_cell_is_named_by_its_row(tmp_path):
    """A None in an array mask column was a TypeError from inside NumPy, naming no row (audit)."""
    features = datasets.Features(
        {"image": datasets.Array3D((8, 8, 3), "uint8"), "label": datasets.Array2D((8, 8), "uint8")}
    )
    rows = {"image": [np.zeros((8, 8, 3), np.uint8)] * 2, "label": [np.ones((8, 8), np.uint8), None]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "d")
    )
    (tmp_path / "d" / "labels.json").write_text(json.dumps(["a", "b"]))
    dataset, _ = build_dataset(tmp_path / "d", "train")
    with pytest.raises(ValueError, match=r"d:train\[1\]\.label: empty \(None\)$"):
        dataset.read(1)
    assert [p.endswith("d:train[1].label: empty (None)") for p in check_dataset(dataset).problems] == [True]


def test_ade20k_as_the_hub_keeps_it_gets_its_classes_and_reduced_labels(tmp_path, capsys):
    """scene_parse_150 (annotation beside scene_category, ADE20K's hundreds of scene names) was read as 151
    numbered classes with "other" trained as class 0 (audit); it now gets ADE20K's 150 names with 0 ignored and k
    read as k - 1, as the release does, and says so. Another set with an annotation column and a few scene types
    of its own keeps its numbered classes (it was read as ADE20K without a word: review)."""
    from segformer.data.datasets import reduced_hint
    from segformer.labels import ADE20K_CLASSES

    mask = np.array([[0, 1, 2], [150, 255, 3]], np.uint8)

    def save(scenes: list[str], name: str) -> Path:
        features = datasets.Features(
            {
                "image": datasets.Image(),
                "annotation": datasets.Image(),
                "scene_category": datasets.ClassLabel(names=scenes),
            }
        )
        rows = {"image": [Image.fromarray(np.zeros((2, 3, 3), np.uint8))], "annotation": [Image.fromarray(mask)]}
        table = datasets.Dataset.from_dict({**rows, "scene_category": [1]}, features=features)
        datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    ade = save([f"scene_{i}" for i in range(300)], "ade")
    dataset, _ = build_dataset(ade, "train")
    assert dataset.id2label == dict(enumerate(ADE20K_CLASSES))
    assert dataset.read(0)[1].tolist() == [[255, 0, 1], [149, 255, 2]]
    assert "read as ADE20K's scene parsing set" in capsys.readouterr().err
    build_dataset(ade, "train")  # (another split of the same data: said once, not per split)
    assert "ADE20K" not in capsys.readouterr().err
    # a model trained on the stored values (151 classes) is told the option that reads them
    assert "--no-reduce-labels" in reduced_hint(dataset, 151) and reduced_hint(dataset, 150) is None
    # asked for: the stored values, 0 "other" and ADE20K's names after it (named without decoding every mask)
    stored, _ = build_dataset(ade, "train", reduce_labels=False)
    assert stored.num_labels == 151 and stored.read(0)[1].tolist() == mask.tolist()
    assert stored.id2label[0] == "other" and stored.id2label[1] == ADE20K_CLASSES[0] and stored.id2label[150] == (
        ADE20K_CLASSES[149])  # fmt: skip
    rooms, _ = build_dataset(save(["bathroom", "bedroom"], "rooms"), "train")
    assert rooms.num_labels == 151 and rooms.read(0)[1].tolist() == mask.tolist()
    # the set's name alone (kept through map and save_to_disk) without scene categories: e.g. its instance
    # segmentation configuration, or masks of one's own made from it
    rows = {"image": [Image.fromarray(np.zeros((2, 3, 3), np.uint8))], "annotation": [Image.fromarray(mask)]}
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    info = datasets.DatasetInfo(dataset_name="scene_parse_150", features=features)
    table = datasets.Dataset.from_dict(rows, features=features, info=info)
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "named"))
    named, _ = build_dataset(tmp_path / "named", "train")
    assert named.num_labels == 151 and named.read(0)[1].tolist() == mask.tolist()
    assert "ADE20K" not in capsys.readouterr().err


def _scene_parsing_copy(root: Path, scenes: int = 300) -> Path:
    """A small copy of scene_parse_150 as the hub keeps it: train and validation, an annotation beside a
    scene_category class label of ``scenes`` names, ADE20K's stored values (0 "other", 1..150)."""
    rng = np.random.default_rng(3)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "scene_category": datasets.ClassLabel(names=[f"scene_{i}" for i in range(scenes)]),
        }
    )

    def split(n: int):
        masks = [rng.integers(0, 151, (40, 56), dtype=np.uint8) for _ in range(n)]
        images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n)]
        rows = {"image": [Image.fromarray(a) for a in images], "annotation": [Image.fromarray(m) for m in masks]}
        return datasets.Dataset.from_dict({**rows, "scene_category": [1] * n}, features=features)

    datasets.DatasetDict({"train": split(2), "validation": split(2)}).save_to_disk(str(root))
    return root


def test_ade20k_as_the_hub_keeps_it_trains_and_evaluates_as_ade20k(tmp_path, capsys):
    """scene_parse_150 is ADE20K: it trains with the paper's ADE20K recipe and is evaluated with its aligned
    2048x512 protocol, as the release's folder is (it took own data's: whole images at their own size, so a hub
    checkpoint evaluated on it was not comparable to the published mIoU: audit). A checkpoint's own protocol, the
    flags, --no-reduce-labels (not read as ADE20K then) and a set of a few scene types of its own keep theirs."""
    from segformer import SegformerForSemanticSegmentation
    from segformer.data.build import protocol_kind

    ade = _scene_parsing_copy(tmp_path / "ade")
    assert protocol_kind(ade, "hf") == "ade20k" and protocol_kind(ade, "folder") == "folder"
    assert protocol_kind(ade, "hf", reduce_labels=False) == "hf"  # (the stored values: numbered classes)
    assert protocol_kind(_scene_parsing_copy(tmp_path / "rooms", scenes=3), "hf") == "hf"
    assert protocol_kind(tmp_path / "missing", "hf") == "hf"  # (building it says why)
    hub = tmp_path / "hub"  # a checkpoint as the hub keeps it: no inference_config.json
    SegformerForSemanticSegmentation(tiny_config(num_labels=150)).save_pretrained(hub)

    def evaluated(*flags) -> tuple[dict, dict, str]:
        report = tmp_path / "e.json"
        code, _, err = run_cli(capsys, "eval", "--data", ade, "--model", hub, "--workers", "0", "--json", report,
                               *flags)  # fmt: skip
        assert code == 0, err[-2000:]
        saved = json.loads(report.read_text())
        return saved["inference"], saved["protocol"], err

    options, origin, err = evaluated()
    assert (options["mode"], options["short_side"], options["long_side"]) == ("aligned", 512, 2048), options
    assert origin == {"from": "data", "kind": "ade20k", "flags": False}, origin
    assert f"segformer eval: {ade} is ADE20K: evaluating with its protocol (aligned 512" in err, err
    options, origin, err = evaluated("--mode", "whole")
    assert options["mode"] == "whole" and origin["flags"] is True and "is ADE20K: evaluating" not in err
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", ade, "--model", hub, "--output", run, "--steps", "1",
                           "--batch-size", "2", "--crop", "32", "32", "--workers", "0", "--check-data", "headers",
                           "--no-progress")  # fmt: skip
    assert code == 0, err[-2000:]
    recipe = json.loads((run / "train_config.json").read_text())
    assert recipe["scale"] == [2048, 512] and recipe["ratio_range"] == [0.5, 2.0] and recipe["warmup_steps"] == 1500
    assert "scale (2048, 512) (the paper's recipe)" in err, err[-2000:]
    stored = json.loads((run / "last" / "inference_config.json").read_text())
    assert stored["mode"] == "aligned", stored
    # the run's own stored protocol is the one its checkpoint is evaluated with
    (run / "last" / "inference_config.json").write_text(json.dumps({**stored, "mode": "whole"}))
    report = tmp_path / "last.json"
    code, out, err = run_cli(capsys, "eval", "--data", ade, "--model", run / "last", "--workers", "0", "--json", report)
    assert code == 0 and "whole" in out and "is ADE20K" not in err, err[-2000:]
    assert json.loads(report.read_text())["protocol"] == {"from": "checkpoint", "flags": False}


def test_a_class_id_column_is_no_mask(tmp_path):
    """An image classification set's integer label column is reported per row as not a mask, naming the option
    that picks the mask column (it crashed inside the data check)."""
    images = [Image.fromarray(np.zeros((40, 48, 3), np.uint8))] * 2
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 2]}, features=features)
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "classes"))
    (tmp_path / "classes" / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    dataset, _ = build_dataset(tmp_path / "classes", "train")
    problems = check_dataset(dataset).problems
    assert len(problems) == 2 and all("not a mask" in p and "--label-column" in p for p in problems)


def test_jpeg_masks_are_refused_as_in_the_folder_layout(tmp_path):
    """Masks stored as JPEG (their compression makes class ids that are not there at every border) were read,
    and only rows where an artefact fell outside the classes were reported (audit): every such row is named."""
    import io

    def jpeg(array: np.ndarray) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG")
        return {"bytes": buffer.getvalue(), "path": None}

    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 2
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    rows = {"image": [Image.fromarray(np.zeros((40, 48, 3), np.uint8))] * 2, "annotation": [jpeg(mask)] * 2}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "jpeg")
    )
    (tmp_path / "jpeg" / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    dataset, _ = build_dataset(tmp_path / "jpeg", "train")
    problems = check_dataset(dataset).problems
    assert len(problems) == 2 and all("a JPEG mask" in p for p in problems), problems


def test_array_columns_follow_the_pixel_rules_of_the_one_input_layer(tmp_path):
    """Image and mask columns of arrays (features List(...(Value(dtype)))) were read with np.asarray(dtype=uint8):
    float images in [0, 1] became black, uint16 wrapped, bool became 0/1, (H, W) and (3, H, W) failed later with
    messages naming no row, and float masks were truncated (255.5 counted as a class). They now read as the
    predictor reads the same arrays (segformer.images.array_to_rgb), and masks must hold whole numbers."""
    from segformer.images import array_to_rgb

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (2, 24, 32, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (2, 24, 32), dtype=np.uint8)
    forms = {
        "float01": rgb.astype(np.float32) / 255,
        "uint16": rgb.astype(np.uint16) * 257,
        "bool": rgb > 127,
        "gray": rgb[..., 0],
        "chw": rgb.transpose(0, 3, 1, 2).copy(),
    }
    for name, images in forms.items():
        data = datasets.Dataset.from_dict({"image": list(images), "mask": list(mask[..., None])})  # (H, W, 1) masks
        datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / name))
        dataset, _ = build_dataset(tmp_path / name, "train")
        assert check_dataset(dataset).ok, name
        for i in range(2):
            image, ids = dataset.read(i)
            expected = array_to_rgb(images[i])  # what the predictor makes of the same array
            assert np.array_equal(image, expected) and np.array_equal(ids, mask[i]), name
    assert np.array_equal(array_to_rgb(forms["float01"][0]), rgb[0]) and np.array_equal(dataset.read(0)[0], rgb[0])
    halves = datasets.Dataset.from_dict({"image": list(rgb), "mask": list(mask.astype(np.float32) + 0.5)})
    datasets.DatasetDict({"train": halves}).save_to_disk(str(tmp_path / "halves"))
    with pytest.raises(ValueError, match=r"train\[0\]\.mask: label values must be whole numbers, got non-integer"):
        build_dataset(tmp_path / "halves", "train")


def test_a_dataset_in_memory_is_refused_with_the_way_to_pass_it(saved, tmp_path):
    """train(TrainConfig(data=<Dataset>)) failed inside pathlib and evaluate(model, <Dataset>) with an
    AttributeError on num_labels; both now say what they take and how to get there (save_to_disk)."""
    from segformer import SegformerForSemanticSegmentation
    from segformer.evaluate import evaluate
    from segformer.train import TrainConfig, train

    rows = datasets.load_from_disk(str(saved))
    with pytest.raises(
        TypeError, match=r"TrainConfig.data must be a path or hub id, got a DatasetDict; .*save_to_disk"
    ):
        train(TrainConfig(data=rows, model="b0", output=str(tmp_path / "run"), steps=1, device="cpu"))
    assert not (tmp_path / "run").exists()
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    with pytest.raises(TypeError, match=r"evaluate\(\) takes a SegmentationDataset, got a Dataset; .*build_dataset"):
        evaluate(model, rows["validation"])
    with pytest.raises(TypeError, match=r"build_dataset takes a path or hub id, got a Dataset; .*save_to_disk"):
        build_dataset(rows["validation"], "val")


def test_a_saved_empty_split_is_named_and_the_other_one_usable(tmp_path):
    """A DatasetDict saved with an empty validation split stopped every use of the folder, the training split's
    too, with datasets' IndexError in a traceback (audit): the empty split is named as such where it is used."""
    rng = np.random.default_rng(1)
    root = tmp_path / "emptyval"
    datasets.DatasetDict({"train": _split(rng, 4), "validation": _split(rng, 0)}).save_to_disk(str(root))
    train, _ = build_dataset(root, "train")
    assert len(train) == 4
    with pytest.raises(ValueError, match="emptyval: the val split is empty"):
        build_dataset(root, "val")


def test_hub_id_resolves_through_the_local_cache_offline(tmp_path):
    rng = np.random.default_rng(2)
    repo = tmp_path / "hf" / "hub" / "datasets--someone--toy-seg"
    snapshot = repo / "snapshots" / ("0" * 40) / "data"
    snapshot.mkdir(parents=True)
    for split in ("train", "validation"):
        _split(rng, 2, label="label").to_parquet(str(snapshot / f"{split}-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = (
        "from segformer.data.build import build_dataset; d, _ = build_dataset('someone/toy-seg', 'val'); "
        "print(len(d), d.label_column, d.num_labels)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "label", "3"]


def test_a_hub_id_without_network_takes_the_caches_at_once(tmp_path):
    """Without network (a hub host name that does not resolve: .invalid) and without an offline flag, a data set's
    hub id was first asked of the hub through datasets' retries (~25 s and six log lines), and a run asks twice (the
    ADE20K check before the build). Now datasets is asked offline: a set in the hub cache (a snapshot) and one only
    in datasets' own cache (as an earlier online load leaves it) load without asking the hub; an absent one says
    the hub cannot be reached, and loads once it is in the cache."""
    hf = tmp_path / "hf"
    repo = hf / "hub" / "datasets--someone--toy-seg"
    snapshot = repo / "snapshots" / ("0" * 40) / "data"
    snapshot.mkdir(parents=True)
    _split(np.random.default_rng(2), 2, label="label").to_parquet(str(snapshot / "train-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and "OFFLINE" not in k}
    env |= {"HF_HOME": str(hf), "HF_ENDPOINT": "http://hub.invalid"}
    # datasets' own cache of someone/arrow-only, laid out as its load of a hub id writes it (name___config/...)
    made = subprocess.run([sys.executable, "-c", f"""
import datasets, glob, json, os, pathlib, shutil
datasets.load_dataset("parquet", data_files={{"train": {str(snapshot / "train-00000-of-00001.parquet")!r}}})
found = glob.glob(os.path.join(datasets.config.HF_DATASETS_CACHE, "parquet", "*", "*", "*"))
[src] = [p for p in found if os.path.isdir(p)]
version, digest = pathlib.Path(src).parts[-2:]
dst = pathlib.Path(datasets.config.HF_DATASETS_CACHE, "someone___arrow-only", "default", version, digest)
shutil.copytree(src, dst)
info = json.loads((dst / "dataset_info.json").read_text())
(dst / "dataset_info.json").write_text(json.dumps({{**info, "config_name": "default", "dataset_name": "arrow-only"}}))
for f in dst.glob("parquet-*.arrow"):
    f.rename(dst / f.name.replace("parquet-", "arrow-only-"))
"""], env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    code = f"""
import shutil
from segformer.data.build import build_dataset, protocol_kind
for name in ('someone/toy-seg', 'someone/arrow-only'):
    d, _ = build_dataset(name, 'train')
    print(len(d), d.num_labels)
assert protocol_kind('someone/absent', 'hf') == 'hf'
try:
    build_dataset('someone/absent', 'train')
except ValueError as exc:
    print(exc)
shutil.copytree({str(repo)!r}, {str(hf / "hub" / "datasets--someone--absent")!r})
print(len(build_dataset('someone/absent', 'train')[0]))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[:2] == ["2 3", "2 3"], done.stdout
    assert "someone/absent: not a local folder" in lines[2] and "(the hub cannot be reached)" in lines[2], lines
    assert lines[3] == "2", done.stdout  # (cached since: it loads, no failure remembered)
    assert "thrown while requesting" not in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_trains_and_evaluates_end_to_end(saved, tmp_path, capsys):
    config = tmp_path / "tiny.json"
    tiny_config(num_labels=3).to_json_file(config)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", saved, "--model", config, "--output", out, "--steps",
                                "3", "--batch-size", "2", "--crop", "48", "48", "--workers", "0")  # fmt: skip
    assert code == 0, err[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and 0.0 <= summary["mIoU"] <= 1.0
    assert json.loads((out / "best" / "config.json").read_text())["id2label"]["2"] == "dark"
    code, stdout, err = run_cli(capsys, "eval", "--data", saved, "--model", out / "best", "--workers", "0")
    assert code == 0, err[-2000:]
    assert "bright" in stdout and "mIoU" in stdout


def test_eval_takes_reduce_labels_false_from_a_datasets_id2label_json(saved, tmp_path, capsys):
    """A Hugging Face dataset's folder may keep its classes as id2label.json (as the hub's do): its
    "reduce_labels": false wins over a checkpoint trained on reduced labels, as a folder's labels.json does, and
    the line names that file (the path was untested: audit)."""
    import shutil

    from segformer import SegformerForSemanticSegmentation
    from segformer.run_files import preprocessor_json

    data = tmp_path / "data"
    shutil.copytree(saved, data)
    (data / "labels.json").unlink()
    (data / "id2label.json").write_text(json.dumps({"id2label": ["border", "bright", "dark"], "reduce_labels": False}))
    model = tmp_path / "model"
    SegformerForSemanticSegmentation(tiny_config(num_labels=3)).save_pretrained(model)
    (model / "preprocessor_config.json").write_text(preprocessor_json(size=None, reduce_labels=True))
    report = tmp_path / "e.json"
    code, _, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--workers", "0", "--json", report)
    assert code == 0, err[-2000:]
    assert 'id2label.json says "reduce_labels": false: evaluating the stored values' in err, err
    assert json.loads(report.read_text())["labels"]["reduce_labels"] is False
    (data / "id2label.json").write_text(json.dumps(["border", "bright", "dark"]))  # (says nothing: the model's)
    code, _, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--workers", "0", "--json", report)
    assert code == 0 and "was trained on reduced labels" in err and "says" not in err, err[-2000:]
    assert json.loads(report.read_text())["labels"]["reduce_labels"] is True


def test_processor_takes_a_datasets_column_as_a_batch():
    """``processor(ds["image"], ds["annotation"])``: a datasets 4.x column is a Sequence, not a list; it is a
    batch like the list of its items (Transformers' processor refuses it)."""
    from segformer import SegformerImageProcessor

    ds = _split(np.random.default_rng(5), 3)
    processor = SegformerImageProcessor(size={"height": 32, "width": 32})
    by_column = processor(ds["image"], ds["annotation"], return_tensors="pt")
    by_list = processor(list(ds["image"]), list(ds["annotation"]), return_tensors="pt")
    assert by_column["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(by_column["pixel_values"], by_list["pixel_values"])
    assert torch.equal(by_column["labels"], by_list["labels"])


def test_a_pair_of_other_sizes_is_refused_as_it_is_read(tmp_path):
    """With --check-data off or headers, a Hugging Face row whose mask has another size than its image trained
    (batch 1) or failed in torch.stack naming no row (audit); the folder layout refuses such a pair as it reads it.
    Now so does a Hugging Face row, and a swapped width and height is put down to the EXIF turn datasets does."""
    rng = np.random.default_rng(0)
    split = _split(rng, 2)
    rows = split.to_dict()
    rows["annotation"][1] = Image.fromarray(np.zeros((64, 48), np.uint8))  # (the image is 64 wide, 48 high)
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=split.features)}).save_to_disk(str(root))
    (root / "labels.json").write_text(json.dumps(["border", "bright", "dark"]))
    dataset, _ = build_dataset(root, "train")
    dataset.read(0)
    with pytest.raises(ValueError, match=r"\[1\]: image is 64x48 but its mask is 48x64 \(the datasets library turns"):
        dataset.read(1)
    assert any("image is 64x48 but its mask is 48x64" in p for p in check_dataset(dataset).problems)


def test_a_class_only_the_validation_split_holds_asks_for_the_class_names(tmp_path):
    """Numbered classes are counted on the training split's masks; a value only validation masks hold was offered
    as an ignore index, a map or reduced labels, where the fix is to name every class (audit)."""
    rng = np.random.default_rng(2)
    val = _split(rng, 2).to_dict()
    masks = [np.array(m) for m in _split(rng, 2)["annotation"]]
    masks[1][:4] = 3  # class 3: in validation only
    root = tmp_path / "rare"
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    val = datasets.Dataset.from_dict({"image": val["image"], "annotation": [Image.fromarray(m) for m in masks]},
                                     features=features)  # fmt: skip
    datasets.DatasetDict({"train": _split(rng, 3), "validation": val}).save_to_disk(str(root))
    dataset, _ = build_dataset(root, "val")
    report = check_dataset(dataset)
    assert not report.ok
    assert any(
        "label value(s) 3 outside 0..2: the classes were numbered 0..2 from the training split's masks (no "
        "labels.json): if the value(s) are classes too, name every class in a labels.json" in p
        for p in report.problems
    ), report.problems


def test_masks_numbered_from_one_are_offered_reduce_labels(tmp_path):
    """Masks of classes 1..K without a 0 and no labels.json: the classes are numbered 0..K from the masks, and
    class_0 never occurs (it lowers mIoU as a dead class); the warning offers --reduce-labels (audit)."""
    from segformer.data.build import warn_class_coverage

    rng = np.random.default_rng(3)
    root = tmp_path / "from_one"
    split = _split(rng, 2).map(lambda row: {"annotation": Image.fromarray(np.asarray(row["annotation"]) + 1)})
    datasets.DatasetDict({"train": split}).save_to_disk(str(root))
    dataset, listing = build_dataset(root, "train")
    assert dataset.id2label == {0: "class_0", 1: "class_1", 2: "class_2", 3: "class_3"}
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert warn_class_coverage(dataset, check_dataset(dataset, listing).classes) == []
    assert (
        err.getvalue()
        .rstrip()
        .endswith(
            "class 0 'class_0' has no labelled pixel in the 2 masks; masks of classes 1..K without a 0 (ADE20K style)? "
            "pass --reduce-labels"
        )
    ), err.getvalue()
    reduced, _ = build_dataset(root, "train", reduce_labels=True)
    assert reduced.num_labels == 3 and check_dataset(reduced).ok
