"""from_pretrained / save_pretrained: layouts, hub cache offline, prefixes, label changes and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import randomize_, tiny_config

from segformer import (
    CheckpointError,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
)
from segformer.pretrained import load_state_dict


@pytest.fixture
def saved(tmp_path):
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4))).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_layout_and_round_trip(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["SegformerForSemanticSegmentation"] and config["model_type"] == "segformer"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(model.state_dict())
    loaded = SegformerForSemanticSegmentation.from_pretrained(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_state_dict_keys_are_the_canonical_names():
    keys = set(SegformerForSemanticSegmentation(tiny_config()).state_dict())
    for key in [
        "segformer.encoder.patch_embeddings.0.proj.weight",
        "segformer.encoder.patch_embeddings.3.layer_norm.bias",
        "segformer.encoder.block.0.0.layer_norm_1.weight",
        "segformer.encoder.block.0.0.attention.self.query.weight",
        "segformer.encoder.block.0.0.attention.self.sr.weight",
        "segformer.encoder.block.2.0.attention.self.layer_norm.bias",
        "segformer.encoder.block.1.0.attention.output.dense.bias",
        "segformer.encoder.block.3.0.mlp.dwconv.dwconv.weight",
        "segformer.encoder.block.3.0.mlp.dense2.bias",
        "segformer.encoder.layer_norm.3.weight",
        "decode_head.linear_c.2.proj.weight",
        "decode_head.linear_fuse.weight",
        "decode_head.batch_norm.num_batches_tracked",
        "decode_head.classifier.bias",
    ]:
        assert key in keys, key
    assert not any(".sr." in k for k in keys if k.startswith("segformer.encoder.block.3."))  # sr_ratio 1


def test_base_checkpoint_into_task_model_and_back(tmp_path, caplog):
    base = randomize_(SegformerModel(tiny_config(num_labels=4)))
    base.save_pretrained(tmp_path / "base")
    with caplog.at_level("WARNING", logger="segformer"):
        task, info = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "base", output_loading_info=True)
    head_keys = [k for k in task.state_dict() if k.startswith("decode_head.") and "num_batches" not in k]
    assert sorted(info["missing_keys"]) == sorted(head_keys)
    assert "newly initialised" in caplog.text and "decode_head.linear_c.0.proj.weight" in caplog.text
    assert torch.equal(task.segformer.encoder.block[0][0].mlp.dense1.weight, base.encoder.block[0][0].mlp.dense1.weight)
    task.save_pretrained(tmp_path / "task")
    again, info = SegformerModel.from_pretrained(tmp_path / "task", output_loading_info=True)
    assert info["missing_keys"] == set() and all(k.startswith("decode_head.") for k in info["unexpected_keys"])
    assert isinstance(info["unexpected_keys"], set) and info["error_msgs"] == []  # Transformers' format
    classifier, info = SegformerForImageClassification.from_pretrained(tmp_path / "task", output_loading_info=True)
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}


def test_new_label_set_needs_the_opt_in(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"decode_head\.classifier\.weight: checkpoint \(4, 16, 1, 1\) vs model "
                                              r"\(7, 16, 1, 1\).*ignore_mismatched_sizes=True"):  # fmt: skip
        SegformerForSemanticSegmentation.from_pretrained(path, num_labels=7)
    model, info = SegformerForSemanticSegmentation.from_pretrained(
        path, id2label={i: f"c{i}" for i in range(7)}, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert model.config.num_labels == 7 and model.config.label2id["c6"] == 6
    assert sorted(k for k, _, _ in info["mismatched_keys"]) == [
        "decode_head.classifier.bias",
        "decode_head.classifier.weight",
    ]
    assert model.decode_head.classifier.bias.abs().max() == 0  # re-initialised, not left random


def test_dtype_and_device(saved):
    _, path = saved
    model = SegformerForSemanticSegmentation.from_pretrained(path, torch_dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    model.save_pretrained(path.parent / "bf16")
    assert json.loads((path.parent / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    auto = SegformerForSemanticSegmentation.from_pretrained(path.parent / "bf16", torch_dtype="auto")
    assert auto.dtype == torch.bfloat16
    assert SegformerForSemanticSegmentation.from_pretrained(path, dtype="float64").dtype == torch.float64
    with pytest.raises(ValueError, match="not a torch dtype"):
        SegformerForSemanticSegmentation.from_pretrained(path, torch_dtype="float77")


def test_attention_implementations(saved):
    _, path = saved
    assert not SegformerForSemanticSegmentation.from_pretrained(path, attn_implementation="eager").fast_path
    assert SegformerForSemanticSegmentation.from_pretrained(path, attn_implementation="sdpa").fast_path
    with pytest.raises(ValueError, match="does not support flash_attention_2; use 'sdpa'"):
        SegformerForSemanticSegmentation.from_pretrained(path, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation 'xformers'"):
        SegformerForSemanticSegmentation.from_pretrained(path, attn_implementation="xformers")


def test_transformers_v5_in_memory_names_are_understood(saved):
    model, path = saved
    from segformer.pretrained import _V5_RENAMES  # noqa: F401  (the table under test)

    renamed = {}
    for key, value in model.state_dict().items():
        key = (key.replace("encoder.block.", "stages.").replace("layer_norm_1", "layernorm_before")
               .replace("layer_norm_2", "layernorm_after").replace("attention.self.query", "attention.q_proj")
               .replace("attention.self.key", "attention.k_proj").replace("attention.self.value", "attention.v_proj")
               .replace("attention.output.dense", "attention.o_proj").replace("mlp.dense1", "mlp.fc1")
               .replace("mlp.dense2", "mlp.fc2").replace("decode_head.linear_c", "decode_head.linear_projections")
               .replace("attention.self.sr", "attention.sequence_reduction.sequence_reduction")
               .replace("attention.self.layer_norm", "attention.sequence_reduction.layer_norm"))  # fmt: skip
        renamed[key] = value
    import re

    renamed = {re.sub(r"stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k): v for k, v in renamed.items()}
    renamed = {
        re.sub(r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings.", k): v for k, v in renamed.items()
    }
    renamed = {re.sub(r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm.", k): v for k, v in renamed.items()}
    torch.save(renamed, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    loaded = SegformerForSemanticSegmentation.from_pretrained(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------ clear errors
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        SegformerForSemanticSegmentation.from_pretrained(tmp_path / "nope")
    with pytest.raises(OSError, match="no such directory"):  # what Transformers raises, and callers catch
        SegformerForSemanticSegmentation.from_pretrained(tmp_path / "nope")


def test_directory_without_weights(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found \(model\.safetensors or"):
        SegformerForSemanticSegmentation.from_pretrained(path)


def test_directory_without_config(saved):
    _, path = saved
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json in this directory"):
        SegformerForSemanticSegmentation.from_pretrained(path)


def test_corrupt_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        SegformerForSemanticSegmentation.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(path)


def test_config_with_bad_fields(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["num_attention_heads"] = [3, 2, 3, 4]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json: hidden_sizes\[0\]=8 is not divisible by num_attention_heads\[0\]=3"
    ):
        SegformerForSemanticSegmentation.from_pretrained(path)


def test_unknown_argument_and_original_layout(saved, tmp_path):
    _, path = saved
    with pytest.raises(TypeError, match="unknown argument"):
        SegformerForSemanticSegmentation.from_pretrained(path, num_lables=3)
    torch.save({"state_dict": {"backbone.patch_embed1.proj.weight": torch.zeros(1)}}, tmp_path / "pytorch_model.bin")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="segformer convert"):
        SegformerForSemanticSegmentation.from_pretrained(tmp_path)


def test_save_is_atomic_and_replaces_stale_weights(saved):
    model, path = saved
    model.save_pretrained(path, max_shard_size="20KB")
    names = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert not [n for n in names if n.endswith(".tmp")]
    model.save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------------------ hub ids, offline
def populate_hub_cache(cache, repo_id: str, files: dict[str, bytes], commit: str = "0" * 40, ref: str = "main") -> None:
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


HUB_SCRIPT = """
import sys, torch
from segformer import SegformerForSemanticSegmentation, SegformerConfig, CheckpointError
model = SegformerForSemanticSegmentation.from_pretrained("acme/tiny-seg")
print("labels", model.config.num_labels, "training", model.training)
print("config", SegformerConfig.from_pretrained("acme/tiny-seg").num_labels)
print("revision", SegformerForSemanticSegmentation.from_pretrained("acme/tiny-seg", revision="v1").config.num_labels)
try:
    SegformerForSemanticSegmentation.from_pretrained("acme/not-cached")
except CheckpointError as e:
    print("error", e)
"""


@pytest.mark.slow
def test_hub_id_from_a_populated_cache_offline(saved, tmp_path):
    model, path = saved
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "acme/tiny-seg", {p.name: p.read_bytes() for p in path.iterdir()})
    older = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=6)))
    older.save_pretrained(tmp_path / "older")
    populate_hub_cache(
        cache, "acme/tiny-seg", {p.name: p.read_bytes() for p in (tmp_path / "older").iterdir()}, "1" * 40, "v1"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "labels 4 training False" in out.stdout and "config 4" in out.stdout and "revision 6" in out.stdout
    assert "error acme/not-cached: config.json is not in the local hub cache" in out.stdout
    assert "pass a local directory" in out.stdout


def test_atomic_write_errors_name_the_file_not_the_temporary_name(tmp_path):
    """A folder that cannot take the file (here: a file in its place) is one error naming the target; the
    temporary name beside it once made the message ('[Errno 2] ... .x.onnx.8twwep6f.tmp')."""
    from segformer.fileio import atomic_write_text

    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "taken" / "x.json", "{}")
    assert str(info.value) == f"{tmp_path / 'taken' / 'x.json'}: cannot write there (Not a directory)"
    assert info.value.errno is not None and ".tmp" not in str(info.value)
