"""from_pretrained / save_pretrained: layouts, hub cache offline, prefixes, label changes and clear errors."""

from __future__ import annotations

import argparse
import json
import os
import re
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
    with pytest.raises(CheckpointError, match=r"model: weights without config\.json; pass config="):
        SegformerForSemanticSegmentation.from_pretrained(path)
    (path / "model.safetensors").unlink()  # an empty folder: no config.json, and nothing else either
    with pytest.raises(CheckpointError, match=r"no config\.json in this directory"):
        SegformerForSemanticSegmentation.from_pretrained(path)


def test_a_file_that_is_no_checkpoint_is_named_as_such(saved, tmp_path):
    """A config.json or a data set's labels.json given as the model read as 'weights without config.json' (audit)."""
    _, path = saved
    (tmp_path / "labels.json").write_text('{"0": "a"}')
    for name in (path / "config.json", tmp_path / "labels.json"):
        with pytest.raises(CheckpointError, match=r"\.json: not a checkpoint: expected a model directory or a weights"):
            SegformerForSemanticSegmentation.from_pretrained(name)
    assert SegformerForSemanticSegmentation.from_pretrained(path / "model.safetensors").config.num_labels == 4


def test_corrupt_safetensors(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        SegformerForSemanticSegmentation.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(path)


def test_a_damaged_pickle_says_what_the_safe_unpickler_found(saved, tmp_path):
    """A damaged pytorch_model.bin repeated torch's advice to re-run with weights_only=False, which this package
    never does (and which could not read a damaged file either: audit): the unpickler's own reason instead."""
    import shutil

    _, path = saved
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    reason = r"not a readable PyTorch checkpoint \(damaged or not a PyTorch file: "
    with pytest.raises(CheckpointError, match=reason) as e:
        SegformerForSemanticSegmentation.from_pretrained(bad, weights_only=False)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


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


def test_a_killed_saves_hidden_folder_goes_with_the_next_save_once_it_is_old(saved):
    """A save killed outright leaves its hidden folder of new files (it stayed for good): the next save removes
    one over ten minutes old and leaves a younger one (another process may be saving into the folder now)."""
    import time

    model, path = saved
    old, young = path / ".segformer-save-killed.tmp", path / ".segformer-save-now.tmp"
    for folder in (old, young):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a checkpoint")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    model.save_pretrained(path)
    assert not old.exists() and young.is_dir()
    assert sorted(p.name for p in path.iterdir()) == [young.name, "config.json", "model.safetensors"]


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
try:
    SegformerForSemanticSegmentation.from_pretrained("acme/config-only")
except CheckpointError as e:
    print("weights", e)
try:
    SegformerForSemanticSegmentation.from_pretrained("acme/tiny-seg", revision="v2")
except CheckpointError as e:
    print("uncached revision", e)
try:
    SegformerForSemanticSegmentation.from_pretrained("acme/lora")
except CheckpointError as e:
    print("adapter", e)
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
    populate_hub_cache(cache, "acme/config-only", {"config.json": (path / "config.json").read_bytes()})
    adapter = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b""}
    populate_hub_cache(cache, "acme/lora", adapter)  # (an adapter as pushed to the hub: no config.json)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "labels 4 training False" in out.stdout and "config 4" in out.stdout and "revision 6" in out.stdout
    assert "error acme/not-cached: config.json is not in the local hub cache" in out.stdout
    assert "pass a local directory" in out.stdout
    assert "weights acme/config-only: no weights file (model.safetensors or " in out.stdout
    assert "is in the local hub cache and the hub cannot be reached" in out.stdout
    # a revision that is not cached is named (it read as if the repo were missing: audit)
    assert "uncached revision acme/tiny-seg: config.json at revision 'v2' is not in the local hub cache" in out.stdout
    # an adapter's repo is named as one, as an adapter folder is (it said config.json is not cached: review)
    assert "adapter acme/lora: a PEFT adapter (adapter_config.json), not a whole model" in out.stdout


UNREACHABLE_SCRIPT = """
import time
from segformer import SegformerForSemanticSegmentation, CheckpointError
for name in ("nomodel", "acme/not-cached", "acme/tiny-seg"):
    start = time.monotonic()
    try:
        model = SegformerForSemanticSegmentation.from_pretrained(name)
        print(name, "loaded", model.config.num_labels, flush=True)
    except CheckpointError as e:
        print(name, "error", e, flush=True)
    print(name, "seconds", round(time.monotonic() - start), flush=True)
"""


@pytest.mark.slow
def test_an_unreachable_hub_costs_its_retries_once_and_a_bare_name_is_a_missing_folder(saved, tmp_path):
    """Without network (and without HF_HUB_OFFLINE) a mistyped local folder (`--model nomodel`) was looked up on
    the hub twice (config.json, then adapter_config.json), each paying huggingface_hub's ~23 s of retries, then
    'not in the local hub cache' without 'no such directory' (audit). A bare name is a missing folder now, and a
    hub id pays one round of retries: the look-ups after it use the cache alone. A real refused connection (a
    closed port on 127.0.0.1) stands for the missing network; a host name that does not resolve is not asked at
    all."""
    import socket

    _, path = saved
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "acme/tiny-seg", {p.name: p.read_bytes() for p in path.iterdir()})
    with socket.socket() as s:  # (a port nothing listens on: bound, then closed)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()  # (a proxy in the environment would skip the host-name probe)
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and not k.lower().endswith("_proxy")}  # fmt: skip
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    env |= {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    out = subprocess.run([sys.executable, "-c", UNREACHABLE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " seconds " not in line)
    seconds = {n: int(v) for n, _, v in (line.split(" ") for line in out.stdout.splitlines() if " seconds " in line)}
    assert lines["nomodel"] == "error nomodel: no such directory (and not a hub id like 'nvidia/mit-b0')", out.stdout
    assert seconds["nomodel"] < 5, out.stdout  # (no hub look-up at all)
    assert lines["acme/not-cached"].startswith("error acme/not-cached: config.json is not in the local hub cache and "
                                               "the hub cannot be reached"), out.stdout  # fmt: skip
    assert out.stderr.count("[Retry 1/") == 1, out.stderr[-3000:]  # one round of retries (not its adapter's too)
    assert lines["acme/tiny-seg"] == "loaded 4", out.stdout + out.stderr[-3000:]  # from the cache
    assert seconds["acme/tiny-seg"] < 5, out.stdout  # (the hub failed a moment ago: not asked again)
    # a hub whose name does not resolve (no network at all): not asked, no round of retries (.invalid never resolves)
    env["HF_ENDPOINT"] = "https://hub.invalid"
    out = subprocess.run([sys.executable, "-c", UNREACHABLE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and "Retry" not in out.stderr, out.stderr[-3000:]
    assert "loaded 4" in out.stdout and "error acme/not-cached: config.json is not in the local hub cache" in out.stdout
    assert all(int(line.rsplit(" ", 1)[1]) < 5 for line in out.stdout.splitlines() if " seconds " in line), out.stdout


def test_the_host_name_probe_leaves_proxied_hubs_to_their_proxy(monkeypatch):
    """The probe that spares a machine without network huggingface_hub's retries looked the hub's name up itself
    even where a proxy resolves it (http_proxy for an http endpoint, a proxies= argument, the system's settings),
    so such users were told the hub cannot be reached (review audit). A real lookup of a name that never resolves
    (.invalid): unreachable without a proxy, left to the proxy with one."""
    import huggingface_hub.constants

    from segformer import hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://hub.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for key in [
        k for k in os.environ if k.lower().endswith("_proxy") or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ]:
        monkeypatch.delenv(key)

    def fresh() -> None:  # (the probe's answers hold for a minute)
        monkeypatch.setattr(hub, "_unreachable_since", None)
        monkeypatch.setattr(hub, "_resolved_at", None)

    fresh()
    assert hub.hub_unreachable() is True
    fresh()
    assert hub.hub_unreachable({"http": "http://proxy.example:3128"}) is False
    fresh()
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert hub.hub_unreachable() is False


def test_atomic_write_errors_name_the_file_not_the_temporary_name(tmp_path):
    """A folder that cannot take the file (here: a file in its place) is one error naming the target; the
    temporary name beside it once made the message ('[Errno 2] ... .x.onnx.8twwep6f.tmp')."""
    from segformer.fileio import atomic_write_text

    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "taken" / "x.json", "{}")
    assert str(info.value) == f"{tmp_path / 'taken' / 'x.json'}: cannot write there (Not a directory)"
    assert info.value.errno is not None and ".tmp" not in str(info.value)


# ------------------------------------------------------------------- Transformers' loader arguments (config)
LOADER_ARGS = dict(
    force_download=False, proxies=None, trust_remote_code=True, resume_download=None, user_agent="x",
    local_files_only=True, revision=None, cache_dir=None, token=None, subfolder="", _from_auto=True,
    _from_pipeline=None, _commit_hash=None, use_auth_token=None,
)  # fmt: skip


def test_config_loader_arguments_are_consumed_never_stored(saved, tmp_path):
    from segformer import SegformerConfig

    _, path = saved
    config = SegformerConfig.from_pretrained(path, **LOADER_ARGS)
    assert not set(LOADER_ARGS) & set(config.to_dict()), set(LOADER_ARGS) & set(config.to_dict())
    config.save_pretrained(tmp_path / "again")
    assert not set(LOADER_ARGS) & set(json.loads((tmp_path / "again" / "config.json").read_text()))
    # A config.json an older version polluted with them is cleaned on load (and so on the next save).
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "force_download": False, "proxies": None}))
    assert "force_download" not in SegformerConfig.from_pretrained(path).to_dict()
    with pytest.raises(ValueError, match="gguf_file: GGUF checkpoints are not supported"):
        SegformerConfig.from_pretrained(path, gguf_file="x.gguf")


def test_config_return_unused_kwargs(saved):
    from segformer import SegformerConfig

    _, path = saved
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "image_size": 224}))
    config, unused = SegformerConfig.from_pretrained(
        path, return_unused_kwargs=True, foo=1, drop_path_rate=0.0, image_size=64, force_download=False
    )
    assert unused == {"foo": 1}  # a loader argument is consumed, not "unused"
    assert config.drop_path_rate == 0.0 and config.image_size == 64 and "foo" not in config.to_dict()
    assert "return_unused_kwargs" not in config.to_dict()
    # Without it an unknown kwarg is kept as an extra field, as the constructor keeps it.
    assert SegformerConfig.from_pretrained(path, foo=1).to_dict()["foo"] == 1
    config, unused = SegformerConfig.from_dict(data, return_unused_kwargs=True, bar=2)
    assert unused == {"bar": 2} and isinstance(config, SegformerConfig)


@pytest.mark.oracle
def test_config_return_unused_kwargs_as_transformers(saved):
    transformers = pytest.importorskip("transformers")
    from segformer import SegformerConfig

    _, path = saved
    kwargs = dict(return_unused_kwargs=True, foo=1, drop_path_rate=0.0, force_download=False, trust_remote_code=True)
    theirs, their_unused = transformers.SegformerConfig.from_pretrained(path, **kwargs)
    ours, our_unused = SegformerConfig.from_pretrained(path, **kwargs)
    assert our_unused == their_unused == {"foo": 1}
    assert ours.drop_path_rate == theirs.drop_path_rate == 0.0


# ------------------------------------------------------------------------ unreadable config.json: an OSError
@pytest.mark.parametrize(
    "text, why", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, found a JSON list")]
)
def test_unreadable_config_is_an_oserror(saved, text, why):
    from segformer import SegformerConfig

    _, path = saved
    (path / "config.json").write_text(text)
    for load in (SegformerConfig.from_pretrained, SegformerForSemanticSegmentation.from_pretrained):
        with pytest.raises(OSError, match=f"config.json: {why}") as info:
            load(path)
        assert isinstance(info.value, (CheckpointError, ValueError)) and "\n" not in str(info.value)


def test_from_json_file_of_a_missing_file_is_an_oserror(tmp_path):
    from segformer import SegformerConfig

    with pytest.raises(OSError, match=r"nope\.json: no such file") as info:
        SegformerConfig.from_json_file(tmp_path / "nope.json")
    assert isinstance(info.value, CheckpointError)
    with pytest.raises(OSError, match=r": cannot read it \("):  # a directory
        SegformerConfig.from_json_file(tmp_path)


def test_cli_still_prints_one_line_for_an_unreadable_config(saved, capsys):
    from segformer.cli import run_command

    _, path = saved
    (path / "config.json").write_text("[]")
    code = run_command(lambda args: SegformerForSemanticSegmentation.from_pretrained(path), None, name="segformer x")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "config.json: expected a JSON object" in err


# ------------------------------------------------------------------- Transformers' loader arguments (model)
def test_model_accepts_transformers_loader_arguments(saved):
    model, path = saved
    loaded = SegformerForSemanticSegmentation.from_pretrained(
        path, force_download=False, proxies=None, trust_remote_code=True, resume_download=None, weights_only=True
    )
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
    # weights_only=False is accepted; .bin files are still read with weights_only=True.
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    loaded = SegformerForSemanticSegmentation.from_pretrained(path, weights_only=False, use_safetensors=False)
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
    torch.save({**model.state_dict(), "args": argparse.Namespace(lr=1)}, path / "x.bin")
    with pytest.raises(
        CheckpointError, match="holds a pickled argparse.Namespace.*always loaded with weights_only=True"
    ):
        SegformerForSemanticSegmentation.from_pretrained(path / "x.bin", weights_only=False)
    with pytest.raises(TypeError, match="unknown argument"):  # still a clear TypeError for a real typo
        SegformerForSemanticSegmentation.from_pretrained(path, force_downlaod=True)


def test_force_download_and_proxies_reach_huggingface_hub(saved, monkeypatch):
    import huggingface_hub

    _, path = saved
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((filename, kwargs))
        if (path / filename).is_file():
            return str(path / filename)
        raise huggingface_hub.utils.EntryNotFoundError(f"{filename} not there")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    proxies = {"https": "http://proxy:3128"}
    SegformerForSemanticSegmentation.from_pretrained("acme/tiny-seg", force_download=True, proxies=proxies)
    assert [name for name, _ in calls] == ["config.json", "model.safetensors"]
    assert all(kw["force_download"] is True and kw["proxies"] == proxies for _, kw in calls)


def test_key_mapping(saved):
    model, path = saved
    renamed = {"old_model." + k: v for k, v in model.state_dict().items()}
    (path / "model.safetensors").unlink()
    torch.save(renamed, path / "pytorch_model.bin")
    loaded = SegformerForSemanticSegmentation.from_pretrained(path, key_mapping={r"^old_model\.": ""})
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
    with pytest.raises(ValueError, match=r"key_mapping: '\(' is not a regular expression"):
        SegformerForSemanticSegmentation.from_pretrained(path, key_mapping={"(": ""})
    with pytest.raises(TypeError, match="key_mapping must be a dict"):
        SegformerForSemanticSegmentation.from_pretrained(path, key_mapping=[("a", "b")])


def test_variant_in_a_directory_and_the_hub_cache(saved, tmp_path):
    model, path = saved
    (path / "model.safetensors").rename(path / "model.fp16.safetensors")
    loaded = SegformerForSemanticSegmentation.from_pretrained(path, variant="fp16")
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
    with pytest.raises(CheckpointError, match=r"no weights found \(model\.safetensors or"):
        SegformerForSemanticSegmentation.from_pretrained(path)
    with pytest.raises(CheckpointError, match=r"no weights found \(model\.bf16\.safetensors or model\.safetensors"
                                              r"\.index\.bf16\.json or pytorch_model\.bf16\.bin or"):  # fmt: skip
        SegformerForSemanticSegmentation.from_pretrained(path, variant="bf16")
    with pytest.raises(ValueError, match="variant must be a name such as 'fp16'"):
        SegformerForSemanticSegmentation.from_pretrained(path, variant="../x")
    # A sharded variant: the index is model.safetensors.index.fp16.json.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    sharded = tmp_path / "sharded"
    (sharded / "model.safetensors.index.json").rename(sharded / "model.safetensors.index.fp16.json")
    loaded = SegformerForSemanticSegmentation.from_pretrained(sharded, variant="fp16")
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "acme/variant", {p.name: p.read_bytes() for p in path.iterdir()})
    loaded = SegformerForSemanticSegmentation.from_pretrained(
        "acme/variant", variant="fp16", cache_dir=cache, local_files_only=True
    )
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)


# ---------------------------------------------------------------------------------- a single weights file
def test_a_single_weights_file(saved, tmp_path):
    model, path = saved
    elsewhere = tmp_path / "weights"
    elsewhere.mkdir()
    shutil.copy(path / "model.safetensors", elsewhere / "model.safetensors")
    torch.save(model.state_dict(), elsewhere / "weights.bin")
    for weights, config in [
        (path / "model.safetensors", None),  # config.json beside it
        (elsewhere / "model.safetensors", path),  # a directory
        (elsewhere / "model.safetensors", path / "config.json"),  # a file
        (elsewhere / "weights.bin", model.config),  # an object
    ]:
        loaded = SegformerForSemanticSegmentation.from_pretrained(weights, config=config)
        assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
        assert loaded.name_or_path == str(weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a weights file needs its config: pass config="):
        SegformerForSemanticSegmentation.from_pretrained(elsewhere / "model.safetensors")
    with pytest.raises(CheckpointError, match="use_safetensors=True but this is not a safetensors checkpoint"):
        SegformerForSemanticSegmentation.from_pretrained(elsewhere / "weights.bin", config=path, use_safetensors=True)
    (elsewhere / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a checkpoint: expected a model directory"):
        SegformerForSemanticSegmentation.from_pretrained(elsewhere / "notes.txt", config=path)
    # The index of a sharded checkpoint, its shards beside it.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    loaded = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "sharded" / "model.safetensors.index.json")
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)


def test_a_transformers_config_object_as_config(saved):
    model, path = saved

    class ForeignConfig:  # what a Transformers SegformerConfig offers: to_dict()
        def to_dict(self):
            return {**model.config.to_dict(), "transformers_version": "5.0.0"}

    loaded = SegformerForSemanticSegmentation.from_pretrained(path, config=ForeignConfig())
    assert loaded.config.num_labels == 4
    loaded = SegformerForSemanticSegmentation.from_pretrained(path, config=model.config.to_dict())  # a dict
    assert loaded.config.num_labels == 4
    with pytest.raises(TypeError, match="config= must be a SegformerConfig .* got int"):
        SegformerForSemanticSegmentation.from_pretrained(path, config=3)


@pytest.mark.oracle
def test_a_real_transformers_config_as_config(saved):
    transformers = pytest.importorskip("transformers")
    model, path = saved
    theirs = transformers.SegformerConfig.from_pretrained(path)
    loaded = SegformerForSemanticSegmentation.from_pretrained(path, config=theirs)
    assert loaded.config.to_diff_dict() == model.config.copy(dtype=torch.float32).to_diff_dict() | {
        "architectures": ["SegformerForSemanticSegmentation"]
    }


# ----------------------------------------------------------------------------- offline, weights not cached
def test_offline_weights_not_in_the_cache_says_so(saved, tmp_path):
    _, path = saved
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "acme/config-only", {"config.json": (path / "config.json").read_bytes()})
    with pytest.raises(CheckpointError, match=r"acme/config-only: no weights file \(model\.safetensors or .*\) is "
                                              r"in the local hub cache and the hub cannot be reached"):  # fmt: skip
        SegformerForSemanticSegmentation.from_pretrained("acme/config-only", cache_dir=cache, local_files_only=True)
    # Files the cache records as absent from the repo (.no_exist, from an earlier online look-up) are absent.
    no_exist = cache / "models--acme--config-only" / ".no_exist" / ("0" * 40)
    no_exist.mkdir(parents=True)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):  # fmt: skip
        (no_exist / name).touch()
    with pytest.raises(CheckpointError, match=r"acme/config-only: no weights found \(model\.safetensors or"):
        SegformerForSemanticSegmentation.from_pretrained("acme/config-only", cache_dir=cache, local_files_only=True)


# ------------------------------------------------------------------------------ a save that fails part-way
def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fail_on_call(monkeypatch, target, n):
    from segformer import pretrained

    real, calls = getattr(pretrained, target), []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrained, target, flaky)


def test_a_failed_save_leaves_the_old_checkpoint_as_it_was(saved, monkeypatch):
    old, path = saved
    old.save_pretrained(path, max_shard_size="20KB")
    before = _snapshot(path)
    assert len([n for n in before if n.endswith(".safetensors")]) >= 4
    new = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)), seed=1)
    for shard_size in ("20KB", None):  # the same shard names, or one file over the shards
        _fail_on_call(monkeypatch, "_write_weights", 3 if shard_size else 1)
        with pytest.raises(OSError, match="No space left on device"):
            new.save_pretrained(path, max_shard_size=shard_size)
        monkeypatch.undo()
        assert _snapshot(path) == before  # nothing replaced, nothing left behind (no temporaries)
        loaded = SegformerForSemanticSegmentation.from_pretrained(path)
        for key, value in old.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    new.save_pretrained(path, max_shard_size="20KB")  # and a save that succeeds replaces it
    loaded = SegformerForSemanticSegmentation.from_pretrained(path)
    assert torch.equal(loaded.decode_head.classifier.weight, new.decode_head.classifier.weight)
    assert not [p.name for p in path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_a_failed_save_into_a_new_directory_leaves_nothing(tmp_path, monkeypatch):
    model = SegformerForSemanticSegmentation(tiny_config())
    _fail_on_call(monkeypatch, "_write_weights", 1)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_crash_while_renaming_never_loads_a_mix_of_shards(saved, monkeypatch):
    old, path = saved
    old.save_pretrained(path, max_shard_size="20KB")
    new = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)), seed=1)
    _fail_on_call(monkeypatch, "_move", 2)  # the first new shard is in place, the second is not
    with pytest.raises(OSError):
        new.save_pretrained(path, max_shard_size="20KB")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no weights found"):  # loud, not old and new shards mixed
        SegformerForSemanticSegmentation.from_pretrained(path)
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")]


def test_save_pretrained_takes_transformers_distributed_and_variant_arguments(saved, tmp_path):
    """is_main_process=False writes nothing (the accelerate idiom); variant names the files as Transformers does
    and leaves the other variants' files alone, a later save of the same variant replacing its own; save_function
    writes the .bin files."""
    model, path = saved
    assert model.save_pretrained(tmp_path / "other rank", is_main_process=False) == tmp_path / "other rank"
    assert not (tmp_path / "other rank").exists()

    model.save_pretrained(path, variant="fp16", max_shard_size="20KB")
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.startswith("model.fp16-")]
    assert len(shards) > 1 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    assert {"model.safetensors", "model.safetensors.index.fp16.json", "config.json"} <= set(names)
    loaded = SegformerForSemanticSegmentation.from_pretrained(path, variant="fp16")
    assert torch.equal(loaded.decode_head.classifier.weight, model.decode_head.classifier.weight)
    model.save_pretrained(path, variant="fp16")  # one file now: the variant's shards and index go, nothing else
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.fp16.safetensors", "model.safetensors"]

    calls = []

    def save_function(obj, filename):
        calls.append(filename)
        torch.save(obj, filename)

    model.save_pretrained(tmp_path / "bin", safe_serialization=False, save_function=save_function)
    assert len(calls) == 1 and (tmp_path / "bin" / "pytorch_model.bin").is_file()
    with pytest.raises(TypeError, match="save_function must be callable"):
        model.save_pretrained(tmp_path / "bad", save_function="torch.save")
    with pytest.raises(ValueError, match="variant must be a name"):
        model.save_pretrained(tmp_path / "bad", variant="../x")
    assert not (tmp_path / "bad").exists()


@pytest.mark.oracle
def test_variant_files_are_named_and_read_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_config(num_labels=4)
    ours = randomize_(SegformerForSemanticSegmentation(config)).eval()
    ours.save_pretrained(tmp_path / "ours", variant="fp16", max_shard_size="20KB")
    theirs = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "ours", variant="fp16")
    theirs.save_pretrained(tmp_path / "theirs", variant="fp16", max_shard_size="20KB")

    # the same names (the shard counts differ: each library packs shards its own way)
    def names(folder):
        return {re.sub(r"\d{5}", "N", p.name) for p in (tmp_path / folder).iterdir() if p.name != "config.json"}

    assert names("ours") == names("theirs") == {"model.fp16-N-of-N.safetensors", "model.safetensors.index.fp16.json"}
    back = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "theirs", variant="fp16")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.oracle
def test_shard_sizes_read_as_transformers_reads_them():
    """ "50KiB" was read as 50000 bytes (binary units as decimal), shards ~7% smaller than asked (audit)."""
    from transformers.utils.hub import convert_file_size_to_int

    from segformer.pretrained import _parse_size

    for size in ("50KiB", "1GiB", "2GB", "5MB", "20KB", "3Mb", "2MiB", "10GB", 4096):
        assert _parse_size(size) == convert_file_size_to_int(size), size
