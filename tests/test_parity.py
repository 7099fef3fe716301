"""Transformers parity, round two (issue 12): torch.export / jit.trace, push_to_hub, loading errors and options, the
small model API, config serialisation and the image processor's remaining surface.

Tests marked ``oracle`` run the same user code on Transformers (a test-only dependency, imported lazily) and assert
the same behaviour; the others state the behaviour on its own where Transformers cannot run it here.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import torch
from conftest import U32, fp32_tol, hf_pil_processor, randomize_, reductions, rel_err, tiny_config
from PIL import Image

import segformer
from segformer import (
    CheckpointError,
    SegformerConfig,
    SegformerFeatureExtractor,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    SegformerModel,
)
from segformer.hub import HubError

TASK_MODELS = [SegformerModel, SegformerForSemanticSegmentation, SegformerForImageClassification]
TINY_KWARGS = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
                   decoder_hidden_size=16, num_labels=4)  # fmt: skip
# Keys of Transformers' config dicts that are not the model's: the version stamp of the library that wrote it.
VERSION_STAMPS = {"transformers_version"}
OURS_ONLY = {"use_layer_norm_eps"}  # our option for the original code's LayerNorm eps; Transformers has none


def hf():
    transformers = pytest.importorskip("transformers", reason="the oracle tests need the dev extra (transformers)")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_model(cls_name: str, **config):
    transformers = hf()
    return getattr(transformers, cls_name)(transformers.SegformerConfig(**{**TINY_KWARGS, **config}))


def same_outputs_tol(model, x) -> float:
    # each of two fp32 runs of the same computation lies within fp32_tol of the exact result: 2x between them
    return 2 * fp32_tol(reductions(model, x))


# ------------------------------------------------------------------------------- (2) torch.export, jit.trace
@pytest.mark.parametrize("cls", TASK_MODELS, ids=lambda c: c.__name__)
def test_torch_export_returns_our_outputs_and_matches_eager(cls, tmp_path):
    model = randomize_(cls(tiny_config(num_labels=4))).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        eager = model(x)
    program = torch.export.export(model, (x,))
    out = program.module()(x)
    assert type(out) is type(eager) and list(out.keys()) == list(eager.keys())
    key = list(eager.keys())[0]
    assert rel_err(out[key], eager[key]) <= same_outputs_tol(model, x)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()(x)
    assert type(loaded) is type(eager) and torch.equal(loaded[key], out[key])  # the same graph, the same kernels


@pytest.mark.parametrize("cls", TASK_MODELS, ids=lambda c: c.__name__)
def test_jit_trace_strict_false_returns_a_dict(cls):
    model = randomize_(cls(tiny_config(num_labels=4))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # traced first, as a model fresh from from_pretrained is: nothing cached yet
        traced = torch.jit.trace(model, x, strict=False)
        out = traced(x)
        eager = model(x)
    assert isinstance(out, dict) and list(out) == list(eager.keys())
    for key in out:
        assert rel_err(out[key], eager[key]) <= same_outputs_tol(model, x)


def test_outputs_are_pytree_nodes_with_all_fields():
    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), output_hidden_states=True)
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 1 + 4  # logits and the four hidden states
    doubled = torch.utils._pytree.tree_map(lambda t: t * 2, out)
    assert type(doubled) is type(out) and torch.equal(doubled.hidden_states[2], out.hidden_states[2] * 2)
    assert torch.utils._pytree.tree_unflatten(leaves, spec).keys() == out.keys()


@pytest.mark.oracle
@pytest.mark.slow  # three more exports, of Transformers' models (~50 s on 2 cores)
@pytest.mark.parametrize(
    "name", ["SegformerModel", "SegformerForSemanticSegmentation", "SegformerForImageClassification"]
)
def test_export_and_trace_same_user_code_as_transformers(name):
    x = torch.randn(1, 3, 64, 64)
    ours = getattr(segformer, name)(SegformerConfig(**TINY_KWARGS)).eval()
    theirs = hf_model(name).eval()
    exported = [torch.export.export(m, (x,)).module()(x) for m in (ours, theirs)]
    assert type(exported[0]).__name__ == type(exported[1]).__name__ and exported[0].keys() == exported[1].keys()
    models = [ours, theirs]
    with torch.no_grad():
        traced = [torch.jit.trace(ours, x, strict=False)(x)]
        try:
            traced.append(torch.jit.trace(theirs, x, strict=False)(x))
        except RuntimeError as exc:  # Transformers 5.17's classifier output (an ImageClassifierOutput) does not trace
            assert "can be output from traced functions" in str(exc), exc
            models = [ours]
    assert type(traced[0]) is dict and all(type(t) is dict and t.keys() == traced[0].keys() for t in traced)
    for model in models:  # and neither traces with the default strict=True (a dict output)
        with pytest.raises(RuntimeError, match="dict at the output"):
            torch.jit.trace(model, x)


# ----------------------------------------------------------------------------------------- (3) push_to_hub
class FakeHub:
    """A real HTTP server on 127.0.0.1 answering the hub endpoints an upload uses (create repo, create branch,
    validate a model card's YAML, preupload, commit); it records each request and keeps every commit's files."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        self.repos: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode() if self.command != "HEAD" else b""
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self) -> None:  # file lookups (an existing model card): there are no files here
                hub.requests.append(("HEAD", self.path, self.headers.get("authorization")))
                self.reply(404, {}, {"X-Error-Code": "EntryNotFound"})

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, self.headers.get("authorization")))
                self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urlsplit(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.requests.append(("POST", self.path, self.headers.get("authorization")))
                base = f"http://127.0.0.1:{hub.port}"
                if path == "/api/repos/create":
                    request = json.loads(body)
                    hub.repos.append(request)
                    owner = request["organization"] or "me"  # no namespace: the token's user
                    return self.reply(200, {"url": f"{base}/{owner}/{request['name']}"})
                if path == "/api/validate-yaml":
                    return self.reply(200, {})
                rest = path.removeprefix("/api/models/")
                if "/branch/" in rest:
                    hub.branches.append(tuple(rest.split("/branch/")))
                    return self.reply(200, {})
                if "/preupload/" in rest:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self.reply(200, {"files": modes})
                if "/commit/" in rest:
                    repo, revision = rest.split("/commit/")
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    files = {
                        item["value"]["path"]: base64.b64decode(item["value"]["content"])
                        for item in lines
                        if item["key"] == "file"
                    }
                    pr = query.get("create_pr") == ["1"]
                    hub.commits.append(dict(repo=repo, revision=revision, create_pr=pr, files=files, **header))
                    oid = f"{len(hub.commits):040x}"
                    pr_url = f"{base}/{repo}/discussions/{len(hub.commits)}" if pr else None
                    return self.reply(200, {"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid,
                                            "pullRequestUrl": pr_url})  # fmt: skip
                self.reply(404, {"error": f"the fake hub has no POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    hub = FakeHub()
    # HF_ENDPOINT as huggingface_hub reads it at import: the API calls go to the local server
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.close()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_push_to_hub_uploads_exactly_what_save_pretrained_writes(fake_hub, tmp_path):
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)))
    model.save_pretrained(tmp_path / "local")
    info = model.push_to_hub("acme/tiny", token="hf_fake", private=True, commit_description="first")
    assert info.commit_url == f"{fake_hub.url}/acme/tiny/commit/{1:040x}" and info.pr_url is None
    assert fake_hub.repos == [{"name": "tiny", "organization": "acme", "visibility": "private"}]
    [commit] = fake_hub.commits
    assert commit["files"] == folder_files(tmp_path / "local")  # byte for byte, nothing else
    assert (commit["repo"], commit["revision"], commit["create_pr"]) == ("acme/tiny", "main", False)
    assert (commit["summary"], commit["description"]) == ("Upload SegformerForSemanticSegmentation", "first")
    assert {auth for method, _, auth in fake_hub.requests if method == "POST"} == {"Bearer hf_fake"}


def test_push_to_a_branch_or_a_pull_request(fake_hub, tmp_path):
    config = tiny_config(num_labels=3)
    info = config.push_to_hub("acme/tiny", token="hf_fake", revision="dev", create_pr=True, commit_message="cfg")
    assert fake_hub.branches == [("acme/tiny", "dev")]  # created from main first, as Transformers does
    [commit] = fake_hub.commits
    assert (commit["revision"], commit["create_pr"], commit["summary"]) == ("dev", True, "cfg")
    assert info.pr_url == f"{fake_hub.url}/acme/tiny/discussions/1"
    config.save_pretrained(tmp_path)
    assert commit["files"] == folder_files(tmp_path) == {"config.json": (tmp_path / "config.json").read_bytes()}
    assert "visibility" not in fake_hub.repos[0]  # private=None leaves the hub's default


def test_save_pretrained_push_to_hub_for_processor_and_model(fake_hub, tmp_path):
    processor = SegformerImageProcessor(size=64, reduce_labels=True)
    files = processor.save_pretrained(tmp_path / "proc", push_to_hub=True, repo_id="acme/proc", token="hf_fake")
    assert files == [str(tmp_path / "proc" / "preprocessor_config.json")]
    model = SegformerModel(tiny_config())
    model.save_pretrained(tmp_path / "enc", push_to_hub=True, token="hf_fake")  # repo named after the folder
    proc_commit, model_commit = fake_hub.commits
    assert proc_commit["repo"] == "acme/proc" and proc_commit["summary"] == "Upload processor"
    assert proc_commit["files"] == folder_files(tmp_path / "proc")
    assert fake_hub.repos[1] == {"name": "enc", "organization": None} and model_commit["repo"] == "me/enc"
    assert model_commit["summary"] == "Upload model"
    assert model_commit["files"] == folder_files(tmp_path / "enc")
    with pytest.raises(TypeError, match="unexpected argument"):  # hub arguments without push_to_hub=True
        model.save_pretrained(tmp_path / "x", repo_id="acme/x")


def test_push_offline_fails_with_one_line_naming_the_repo(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for obj in (SegformerModel(tiny_config()), tiny_config(), SegformerImageProcessor()):
        with pytest.raises(HubError) as caught:
            obj.push_to_hub("acme/tiny")
        message = str(caught.value)
        assert "\n" not in message and message.startswith("acme/tiny: ") and "HF_HUB_OFFLINE" in message
    assert [r for r in fake_hub.requests if r[0] == "POST"] == []  # nothing was sent


def test_push_refused_by_the_hub_is_one_line(fake_hub, monkeypatch):
    fake_hub.close()  # nobody listens there any more
    with pytest.raises(HubError, match=r"^acme/tiny: push to the hub failed: [^\n]+$"):
        SegformerModel(tiny_config()).push_to_hub("acme/tiny", token="hf_fake")


HF_PUSH = """
import transformers
transformers.logging.set_verbosity_error()
config = transformers.SegformerConfig(**{kwargs})
model = transformers.SegformerForSemanticSegmentation(config)
print(model.push_to_hub("acme/tiny", token="hf_fake", private=True, revision="dev", create_pr=True).pr_url)
transformers.SegformerConfig(**{kwargs}).push_to_hub("acme/cfg", token="hf_fake")  # (its save wrote into config)
transformers.SegformerImageProcessor(size={{"height": 64, "width": 64}}).push_to_hub("acme/proc", token="hf_fake")
"""


@pytest.mark.oracle
@pytest.mark.slow
def test_push_to_hub_sends_what_transformers_sends(fake_hub, tmp_path):
    hf_pil_processor(hf())  # (its script pushes an image processor: skips where Transformers builds none)
    # Transformers' push_to_hub in a process of its own, its HF_ENDPOINT set to the fake hub
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0"}
    code = HF_PUSH.format(kwargs=TINY_KWARGS)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = (fake_hub.repos, fake_hub.branches, fake_hub.commits)
    fake_hub.repos, fake_hub.branches, fake_hub.commits = [], [], []
    model = SegformerForSemanticSegmentation(SegformerConfig(**TINY_KWARGS))
    model.push_to_hub("acme/tiny", token="hf_fake", private=True, revision="dev", create_pr=True)
    SegformerConfig(**TINY_KWARGS).push_to_hub("acme/cfg", token="hf_fake")
    SegformerImageProcessor(size=64).push_to_hub("acme/proc", token="hf_fake")
    assert fake_hub.repos == theirs[0] and fake_hub.branches == theirs[1]
    assert len(fake_hub.commits) == len(theirs[2]) == 3
    for ours, other in zip(fake_hub.commits, theirs[2], strict=True):
        same = ("repo", "revision", "create_pr", "summary", "description")
        assert {k: ours[k] for k in same} == {k: other[k] for k in same}
        # Transformers adds its default model card (README.md); we upload only what save_pretrained writes
        assert set(ours["files"]) == set(other["files"]) - {"README.md"}
        for name in (n for n in ours["files"] if n.endswith(".json")):  # and the same JSON in them
            assert comparable(json.loads(ours["files"][name])) == comparable(json.loads(other["files"][name])), name


# ---------------------------------------------------------------------------------- (6) loading errors
@pytest.fixture
def saved(tmp_path):
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4))).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_size_mismatch_is_a_runtime_error_naming_key_and_shapes(saved):
    _, path = saved
    with pytest.raises(RuntimeError, match=r"decode_head\.classifier\.weight: checkpoint \(4, 16, 1, 1\) vs model "
                                           r"\(7, 16, 1, 1\)") as caught:  # fmt: skip
        SegformerForSemanticSegmentation.from_pretrained(path, num_labels=7)
    assert isinstance(caught.value, CheckpointError) and "\n" not in str(caught.value)


@pytest.mark.oracle
def test_mismatch_error_type_and_loading_info_match_transformers(saved):
    transformers = hf()
    _, path = saved
    for cls in (SegformerForSemanticSegmentation, transformers.SegformerForSemanticSegmentation):
        with pytest.raises(RuntimeError):
            cls.from_pretrained(path, num_labels=7)
    _, ours = SegformerForSemanticSegmentation.from_pretrained(
        path, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True
    )
    _, theirs = transformers.SegformerForSemanticSegmentation.from_pretrained(
        path, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert ours == theirs  # sets of keys, (key, checkpoint shape, model shape) and error_msgs


@pytest.mark.oracle
def test_meta_device(saved):
    transformers = hf()
    _, path = saved
    pairs = [
        (SegformerForSemanticSegmentation, SegformerConfig),
        (transformers.SegformerForSemanticSegmentation, transformers.SegformerConfig),
    ]
    for cls, config_cls in pairs:
        with torch.device("meta"):
            with pytest.raises(RuntimeError):  # from_pretrained loads weights, which meta tensors cannot hold
                cls.from_pretrained(path)
            built = cls(config_cls(**TINY_KWARGS))
        assert built.decode_head.classifier.weight.is_meta  # a model without weights is built there
    with pytest.raises(RuntimeError, match="meta device"):
        SegformerForSemanticSegmentation.from_pretrained(path, device_map="meta")


def test_device_map_and_low_cpu_mem_usage_on_cpu(saved):
    model, path = saved
    # Transformers needs the accelerate package for any device_map; here "cpu" and "auto" work without it
    for kwargs in (dict(device_map="cpu"), dict(device_map="auto"), dict(low_cpu_mem_usage=True)):
        loaded = SegformerForSemanticSegmentation.from_pretrained(path, **kwargs)
        assert loaded.device.type == ("cuda" if torch.cuda.is_available() and kwargs.get("device_map") == "auto"
                                      else "cpu")  # fmt: skip
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key].cpu(), value), key


# ------------------------------------------------------------------------------------- (8) the model API
def test_from_pretrained_none_config_state_dict_and_subfolder(saved, tmp_path):
    model, path = saved
    x = torch.randn(1, 3, 64, 64)
    rebuilt = SegformerForSemanticSegmentation.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert not rebuilt.training and rebuilt.name_or_path == ""
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, model(x).logits)
    with pytest.raises(ValueError, match=r"needs both config= and state_dict="):
        SegformerForSemanticSegmentation.from_pretrained(None, config=model.config)
    model.save_pretrained(tmp_path / "repo" / "segmentation")
    nested = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "repo", subfolder="segmentation")
    assert nested.name_or_path == str(tmp_path / "repo") == nested.config.name_or_path
    with torch.no_grad():
        assert torch.equal(nested(x).logits, model(x).logits)
    with pytest.raises(CheckpointError, match="no subfolder 'other'"):
        SegformerForSemanticSegmentation.from_pretrained(tmp_path / "repo", subfolder="other")
    assert SegformerForSemanticSegmentation.from_pretrained(path).name_or_path == str(path)


@pytest.mark.oracle
def test_state_dict_subfolder_and_name_or_path_as_transformers(saved, tmp_path):
    transformers = hf()
    model, path = saved
    theirs = transformers.SegformerForSemanticSegmentation.from_pretrained(
        None, config=transformers.SegformerConfig.from_pretrained(path), state_dict=model.state_dict()
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(theirs(x).logits, model(x).logits) <= same_outputs_tol(model, x)
    model.save_pretrained(tmp_path / "repo" / "sub")
    ours = SegformerForSemanticSegmentation.from_pretrained(str(tmp_path / "repo"), subfolder="sub")
    theirs = transformers.SegformerForSemanticSegmentation.from_pretrained(str(tmp_path / "repo"), subfolder="sub")
    assert ours.name_or_path == theirs.name_or_path and ours.config.name_or_path == theirs.config._name_or_path


def test_gradient_checkpointing_kwargs_and_flags():
    config = tiny_config(drop_path_rate=0.0, classifier_dropout_prob=0.0)
    model = randomize_(SegformerForSemanticSegmentation(config)).train()
    x, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    model(x, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert SegformerForSemanticSegmentation.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    for kwargs in ({"use_reentrant": True}, {"use_reentrant": False, "preserve_rng_state": False}, None):
        model.zero_grad()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert model.is_gradient_checkpointing and model.is_activation_checkpointing
        model(x, labels=labels).loss.backward()
        for name, param in model.named_parameters():  # recomputation repeats the same kernels: the same grads
            assert torch.equal(param.grad, plain[name]), name
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="checkpoint takes no bogus"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"bogus": 1})
    assert not model.is_gradient_checkpointing  # a bad call changes nothing


@pytest.mark.oracle
def test_small_model_api_matches_transformers():
    transformers = hf()
    for name in ("SegformerModel", "SegformerForSemanticSegmentation", "SegformerForImageClassification"):
        ours = getattr(segformer, name)(SegformerConfig(**TINY_KWARGS))
        theirs = hf_model(name)
        assert ours.main_input_name == theirs.main_input_name == "pixel_values"
        assert type(ours).supports_gradient_checkpointing == type(theirs).supports_gradient_checkpointing is True
        assert type(ours.base_model).__name__ == type(theirs.base_model).__name__ == "SegformerModel"
        for model in (ours, theirs):  # some frozen parameters, so that only_trainable counts fewer
            for param_name, param in model.named_parameters():
                param.requires_grad_("patch_embeddings" not in param_name)
        assert ours.num_parameters(only_trainable=True) < ours.num_parameters()
        for only_trainable in (False, True):
            for exclude_embeddings in (False, True):
                kwargs = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
                assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
        for return_buffers in (True, False):
            assert ours.get_memory_footprint(return_buffers) == theirs.get_memory_footprint(return_buffers)
        if name == "SegformerForSemanticSegmentation":  # the decode head's BatchNorm statistics are buffers
            assert ours.get_memory_footprint() > ours.get_memory_footprint(return_buffers=False)
        ours.gradient_checkpointing_enable()
        theirs.gradient_checkpointing_enable()
        assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing is True
    assert transformers.SegformerModel.main_input_name == segformer.SegformerModel.main_input_name


@pytest.mark.oracle
def test_bf16_checkpoint_keeps_its_dtype_by_default_as_in_transformers(saved, tmp_path):
    transformers = hf()
    model, _ = saved
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for cls in (SegformerForSemanticSegmentation, transformers.SegformerForSemanticSegmentation):
        loaded = cls.from_pretrained(tmp_path / "bf16")
        assert loaded.dtype == torch.bfloat16 and loaded.config.dtype == torch.bfloat16
        assert cls.from_pretrained(tmp_path / "bf16", dtype=torch.float32).dtype == torch.float32
    # a config that says float32 wins over bf16 weights, in both
    data = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**data, "dtype": "float32"}))
    for cls in (SegformerForSemanticSegmentation, transformers.SegformerForSemanticSegmentation):
        assert cls.from_pretrained(tmp_path / "bf16").dtype == torch.float32
    # and without a dtype in the config, the weights' own
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "dtype"}))
    for cls in (SegformerForSemanticSegmentation, transformers.SegformerForSemanticSegmentation):
        assert cls.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


@pytest.mark.oracle
@pytest.mark.parametrize("labels", [torch.tensor([0, 3]), torch.tensor([[0.0, 1.0, 1.0, 0.0]] * 2)])
def test_problem_type_is_written_back_as_in_transformers(labels):
    ours = SegformerForImageClassification(SegformerConfig(**TINY_KWARGS))
    theirs = hf_model("SegformerForImageClassification")
    x = torch.randn(2, 3, 64, 64)
    assert ours.config.problem_type is None is theirs.config.problem_type
    ours(x, labels=labels), theirs(x, labels=labels)
    assert ours.config.problem_type == theirs.config.problem_type is not None
    regression = SegformerForImageClassification(SegformerConfig(**{**TINY_KWARGS, "num_labels": 1}))
    regression(x, labels=torch.tensor([0.5, 1.5]))
    assert regression.config.problem_type == "regression"


# ------------------------------------------------------------------------------------------- (9) config
def test_config_dtype_forms():
    for value in (torch.float16, "float16", "torch.float16"):
        config = SegformerConfig(dtype=value)
        assert config.dtype is torch.float16 and config.torch_dtype is torch.float16
        assert config.to_dict()["dtype"] == "float16" and json.loads(config.to_json_string())["dtype"] == "float16"
    assert SegformerConfig(torch_dtype="bfloat16").dtype is torch.bfloat16  # the older keyword
    assert SegformerConfig().dtype is None and "dtype" not in SegformerConfig().to_diff_dict()
    for bad in ("auto", "float77", "int64", 3):
        with pytest.raises(ValueError, match=r"^dtype must be a floating point torch dtype"):
            SegformerConfig(dtype=bad)
    again = SegformerConfig.from_dict(SegformerConfig(dtype=torch.bfloat16).to_dict())
    assert again.dtype is torch.bfloat16


def config_pairs():
    transformers = hf()
    cases = [
        {},
        dict(num_labels=3, drop_path_rate=0.0, image_size=224),
        # both label maps: Transformers 5.x leaves label2id None when given id2label alone (ours derives it)
        dict(id2label={0: "road", 1: "sky", 2: "car"}, label2id={"road": 0, "sky": 1, "car": 2}, return_dict=False),
        dict(output_hidden_states=True, chunk_size_feed_forward=3),
        dict(problem_type="regression", dtype="bfloat16", architectures=["SegformerForImageClassification"]),
        dict(**TINY_KWARGS, hidden_act="relu", reshape_last_stage=False, semantic_loss_ignore_index=0),
    ]
    return [(SegformerConfig(**case), transformers.SegformerConfig(**case)) for case in cases]


def comparable(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in VERSION_STAMPS | OURS_ONLY}


@pytest.mark.oracle
def test_config_serialisation_matches_transformers(tmp_path):
    for ours, theirs in config_pairs():
        assert comparable(ours.to_dict()) == comparable(theirs.to_dict())
        assert comparable(ours.to_diff_dict()) == comparable(theirs.to_diff_dict())
        for use_diff in (True, False):
            a, b = json.loads(ours.to_json_string(use_diff=use_diff)), json.loads(theirs.to_json_string(use_diff))
            assert comparable(a) == comparable(b)
        assert comparable(json.loads(ours.to_json_string())) == comparable(json.loads(theirs.to_json_string()))
        ours.to_json_file(tmp_path / "ours.json")
        theirs.to_json_file(tmp_path / "theirs.json")
        assert comparable(json.loads((tmp_path / "ours.json").read_text())) == comparable(
            json.loads((tmp_path / "theirs.json").read_text())
        )
        assert ours.use_return_dict == theirs.use_return_dict
        assert OURS_ONLY <= set(ours.to_diff_dict())  # ours always writes its extra option


@pytest.mark.oracle
def test_config_update_matches_transformers():
    changes = {"drop_path_rate": 0.3, "decoder_hidden_size": 64, "new_key": [1, 2], "problem_type": "regression"}
    text = "hidden_act=relu,reshape_last_stage=false,semantic_loss_ignore_index=7,initializer_range=0.5"
    for ours, theirs in config_pairs():
        ours.update(changes)
        theirs.update(changes)
        ours.update_from_string(text)
        theirs.update_from_string(text)
        assert comparable(ours.to_dict()) == comparable(theirs.to_dict())
        assert ours.new_key == theirs.new_key == [1, 2]
        for bad in ("bogus=1", "drop_path_rate=abc", "decoder_hidden_size=3.5", "reshape_last_stage=maybe",
                    "depths=[1,2]"):  # fmt: skip
            for config in (ours, theirs):
                with pytest.raises(ValueError):
                    config.update_from_string(bad)


def test_config_update_errors_are_one_line_and_leave_the_config_unchanged():
    config = tiny_config()
    before = config.to_dict()
    for bad, message in [
        ("bogus=1", "'bogus' is not a field"),
        ("drop_path_rate=abc", "drop_path_rate: could not convert"),
        ("reshape_last_stage=maybe", "reshape_last_stage: 'maybe' is not true or false"),
        ("depths=1", "depths: only int, float, bool and str fields"),
        ("drop_path_rate", "is not key=value"),
        ("drop_path_rate=1.5", "drop_path_rate must be a probability"),  # validated like the constructor
    ]:
        with pytest.raises(ValueError, match=message) as caught:
            config.update_from_string(bad)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"hidden_sizes\[0\]=8 is not divisible"):
        config.update({"num_attention_heads": [3, 2, 3, 4], "drop_path_rate": 0.2})
    assert config.to_dict() == before  # all or nothing
    config.update({"num_labels": 3})
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and config.label2id["LABEL_2"] == 2


def test_config_json_file_default_is_the_diff(tmp_path):
    config = tiny_config(return_dict=False)
    config.to_json_file(tmp_path / "diff.json")
    config.to_json_file(tmp_path / "full.json", use_diff=False)
    diff, full = (json.loads((tmp_path / n).read_text()) for n in ("diff.json", "full.json"))
    assert diff["return_dict"] is False and "output_attentions" not in diff and full["output_attentions"] is False
    assert SegformerConfig.from_json_file(tmp_path / "diff.json") == SegformerConfig.from_json_file(
        tmp_path / "full.json"
    )


# ----------------------------------------------------------------------------------------- (10) processor
def logits_output(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return segformer.SemanticSegmenterOutput(logits=torch.randn(2, 5, 13, 17, generator=gen))


def test_segmentation_scores():
    outputs = logits_output()
    results = SegformerImageProcessor().post_process_semantic_segmentation(
        outputs, target_sizes=[(30, 40), (13, 17)], return_segmentation_scores=True
    )
    for result, size in zip(results, [(30, 40), (13, 17)], strict=True):
        assert result.segmentation.shape == size and result.segmentation_scores.shape == (5, *size)
        assert torch.equal(result.segmentation, result.segmentation_scores.argmax(dim=0))
    plain = SegformerImageProcessor().post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    assert torch.equal(plain[1].segmentation_scores, outputs.logits[1])


@pytest.mark.oracle
def test_segmentation_scores_match_transformers():
    outputs = logits_output(1)
    theirs_processor = hf_pil_processor(hf())()  # (post-processing: one code path in every backend)
    for sizes in (None, [(30, 40), (7, 9)]):  # (Transformers fails on a tensor of sizes, which ours takes)
        ours = SegformerImageProcessor().post_process_semantic_segmentation(outputs, sizes, True)
        theirs = theirs_processor.post_process_semantic_segmentation(
            outputs, target_sizes=sizes, return_segmentation_scores=True
        )
        for a, b in zip(ours, theirs, strict=True):  # the same interpolation kernel on the same logits
            assert torch.equal(a.segmentation, b.segmentation) and torch.equal(a["segmentation_scores"],
                                                                                b["segmentation_scores"])  # fmt: skip


FOUR = dict(image_mean=[0.5, 0.4, 0.3, 0.2], image_std=[0.2, 0.3, 0.4, 0.5])
# The same 8-bit pixels normalised in another order (a table lookup here, (x / 255 - mean) / std there): a few fp32
# roundings (u each) of values up to (1 - 0.2) / 0.2 = 4; 8u of 4 taken.
FOUR_TOL = 8 * U32 * 4


@pytest.mark.oracle
def test_four_channel_images_match_transformers():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 45, 4), dtype=np.uint8)
    ours = SegformerImageProcessor(size={"height": 20, "width": 26}, **FOUR)
    theirs = hf_pil_processor(hf())(size={"height": 20, "width": 26}, **FOUR)
    try:
        theirs(image, return_tensors="np")
    except ValueError as exc:  # Transformers 5.17 infers the channel axis among 1 or 3 channels only
        if "channel dimension" not in str(exc):
            raise
        pytest.skip(f"this Transformers ({hf().__version__}) takes no four-channel images: {exc}")
    for given in (image, Image.fromarray(image, "RGBA"), torch.from_numpy(image).permute(2, 0, 1)):
        for do_resize in (True, False):
            a = ours(given, return_tensors="np", do_resize=do_resize)["pixel_values"]
            b = theirs(given, return_tensors="np", do_resize=do_resize)["pixel_values"]
            assert a.shape == b.shape and a.shape[1] == 4
            assert np.abs(a - b).max() <= FOUR_TOL


def test_four_channel_errors():
    processor = SegformerImageProcessor(**FOUR)
    with pytest.raises(ValueError, match=r"image 0: has 3 channel\(s\), but image_mean and image_std have 4"):
        processor(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="image 0: a RGB image has 3 channel"):
        processor(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="image_mean has 4 values but image_std has 3"):
        SegformerImageProcessor(image_mean=[0.5] * 4, image_std=[0.5] * 3)
    with pytest.raises(ValueError, match="three image_mean/image_std values"):
        processor(torch.zeros(4, 8, 8, dtype=torch.uint8), backend="torch")
    assert SegformerImageProcessor(image_mean=0.5, image_std=FOUR["image_std"]).image_mean == [0.5] * 4
    # with three statistics an RGBA image still becomes RGB (alpha dropped), as before
    rgb = SegformerImageProcessor(size=8)(np.zeros((8, 8, 4), np.uint8), return_tensors="np")["pixel_values"]
    assert rgb.shape == (1, 3, 8, 8)


ONE = dict(image_mean=[0.5], image_std=[0.25])
# as FOUR_TOL: a few fp32 roundings of values up to (1 - 0.5) / 0.25 = 2
ONE_TOL = 8 * U32 * 2


@pytest.mark.oracle
def test_one_channel_images_match_transformers():
    """One-value sequences (a num_channels=1 model): one-band images keep their one channel, as in Transformers,
    and the model takes the result; a number is still "the same for every channel" of RGB."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (37, 45), dtype=np.uint8)
    ours = SegformerImageProcessor(size={"height": 20, "width": 26}, **ONE)
    theirs = hf_pil_processor(hf())(size={"height": 20, "width": 26}, **ONE)
    for given in (Image.fromarray(gray), gray[..., None], gray[None], torch.from_numpy(gray)[None]):
        for do_resize in (True, False):
            a = ours(given, return_tensors="np", do_resize=do_resize)["pixel_values"]
            b = theirs(given, return_tensors="np", do_resize=do_resize)["pixel_values"]
            assert a.shape == b.shape and a.shape[1] == 1
            assert np.abs(a - b).max() <= ONE_TOL
    assert np.array_equal(ours(gray)["pixel_values"], ours(gray[..., None])["pixel_values"])  # 2-D is one band
    model = SegformerForSemanticSegmentation(tiny_config(num_channels=1)).eval()
    with torch.no_grad():
        inputs = ours(Image.fromarray(gray), return_tensors="pt", size={"height": 32, "width": 32})
        assert model(**inputs).logits.shape[:2] == (1, model.config.num_labels)
    floats = ours(gray.astype(np.float32) / 255, do_rescale=False, return_tensors="np")["pixel_values"]
    assert floats.shape == (1, 1, 20, 26)
    with pytest.raises(ValueError, match=r"image 0: a RGB image has 3 channel\(s\), but image_mean and image_std"):
        ours(Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match=r"image 0: has 3 channel\(s\), but image_mean and image_std have 1 value"):
        ours(np.zeros((8, 8, 3), np.uint8))
    assert SegformerImageProcessor(image_mean=0.5, image_std=0.5).image_mean == [0.5] * 3
    assert SegformerImageProcessor(image_mean=0.5, image_std=[0.5]).image_mean == [0.5]


@pytest.mark.oracle
def test_processor_files_and_dicts_match_transformers(tmp_path):
    transformers = hf()
    kwargs = dict(size={"height": 40, "width": 56}, resample=3, do_reduce_labels=True, image_mean=[0.5, 0.4, 0.3])
    ours, theirs = SegformerImageProcessor(**kwargs), hf_pil_processor(transformers)(**kwargs)
    ours_files = ours.save_pretrained(tmp_path / "ours")
    theirs_files = theirs.save_pretrained(tmp_path / "theirs")
    assert [Path(f).name for f in ours_files] == [Path(f).name for f in theirs_files] == ["preprocessor_config.json"]
    assert all(isinstance(f, str) for f in ours_files + theirs_files)
    a, b = (json.loads(Path(f).read_text()) for f in (ours_files[0], theirs_files[0]))
    assert a == b
    assert json.loads(json.dumps(ours.to_dict())) == json.loads(json.dumps(theirs.to_dict(), default=list))
    assert json.loads(ours.to_json_string()) == json.loads(theirs.to_json_string())
    ours.to_json_file(tmp_path / "p.json")
    for cls in (SegformerImageProcessor, hf_pil_processor(transformers)):
        loaded = cls.from_json_file(tmp_path / "p.json")
        assert loaded.do_reduce_labels is True and loaded.resample == 3


def test_processor_json_file_round_trip_and_errors(tmp_path):
    processor = SegformerImageProcessor(size={"shortest_edge": 40}, do_normalize=False)
    processor.to_json_file(tmp_path / "p.json")
    assert SegformerImageProcessor.from_json_file(tmp_path / "p.json").to_dict() == processor.to_dict()
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"bad\.json: a preprocessor config must be a JSON object"):
        SegformerImageProcessor.from_json_file(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match=r"missing\.json: not a readable JSON preprocessor config"):
        SegformerImageProcessor.from_json_file(tmp_path / "missing.json")


@pytest.mark.oracle
def test_batch_feature_surface_matches_transformers():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(2)]
    maps = [rng.integers(0, 5, (30, 40), dtype=np.uint8) for _ in range(2)]
    ours = SegformerImageProcessor(size=32)(images, maps)
    theirs = hf_pil_processor(hf())(size={"height": 32, "width": 32})(images, maps)
    assert isinstance(ours.data, dict) and set(ours.data) == set(theirs.data) == {"pixel_values", "labels"}
    assert type(ours["pixel_values"]) is type(theirs["pixel_values"]) is list
    assert ours.convert_to_tensors("pt") is ours
    theirs.convert_to_tensors("pt")
    for key in ("pixel_values", "labels"):
        assert isinstance(ours[key], torch.Tensor) and ours[key].shape == theirs[key].shape
        assert ours[key].dtype == theirs[key].dtype
    assert np.abs(ours.pixel_values.numpy() - theirs["pixel_values"].numpy()).max() <= 8 * U32 * 2.7
    assert torch.equal(ours.labels, theirs["labels"])
    moved = ours.to(torch.float16)
    assert moved.pixel_values.dtype == torch.float16 and moved.labels.dtype == torch.int64


def test_convert_to_tensors_skips_and_refuses():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)]
    batch = SegformerImageProcessor(do_resize=False)(images)
    with pytest.raises(ValueError, match="cannot stack pixel_values of different sizes"):
        batch.convert_to_tensors("np")
    batch.convert_to_tensors("pt", skip_tensor_conversion=["pixel_values"])
    assert isinstance(batch.pixel_values, list)
    assert batch.convert_to_tensors(None).pixel_values is batch["pixel_values"]
    with pytest.raises(ValueError, match="return_tensors must be None or one of"):
        batch.convert_to_tensors("torch")


@pytest.mark.oracle
def test_feature_extractor_file_names_the_class_transformers_knows(tmp_path):
    transformers = hf()
    hf_pil_processor(transformers)  # (skips where this Transformers builds no image processor)
    SegformerFeatureExtractor(size=64, reduce_labels=True).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SegformerImageProcessor"
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert auto.do_reduce_labels is True and (auto.size.height, auto.size.width) == (64, 64)
    loaded = SegformerFeatureExtractor.from_pretrained(tmp_path)  # ours reads it back as the class asked for
    assert isinstance(loaded, SegformerFeatureExtractor) and loaded.do_reduce_labels is True
