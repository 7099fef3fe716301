"""Inference backends (segformer.backends): onnxruntime and AOT-compiled models below the inference modes, and the
artefact cache they share."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import U32, fp32_tol, randomize_, reductions, rel_err, run_cli, tiny_config
from PIL import Image

from segformer import SegformerForSemanticSegmentation
from segformer.backends import (
    STALE_AFTER,
    CompiledModel,
    OnnxRuntimeModel,
    cache_root,
    cached_entry,
    onnxruntime_model,
    runtime_model,
    sweep_abandoned,
    weights_digest,
)
from segformer.inference import infer

EXPORT_SIZE = (64, 64)  # a small trace keeps each export (and its verification) to a second or two


@pytest.fixture(scope="module")
def model() -> SegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return randomize_(SegformerForSemanticSegmentation(tiny_config(depths=[1, 2, 1, 1]))).eval()


@pytest.fixture(scope="module")
def ort(model, tmp_path_factory) -> OnnxRuntimeModel:
    pytest.importorskip("onnxruntime")
    return onnxruntime_model(model, export_size=EXPORT_SIZE, cache_dir=tmp_path_factory.mktemp("cache"))


def logits_tol(model, x: torch.Tensor) -> float:
    """Two implementations of the same graph (onnxruntime's kernels and PyTorch's), each within fp32_tol of the
    exact logits relative to the largest one."""
    return 2 * fp32_tol(reductions(model, x))


def probs_tol(model, inputs: list[torch.Tensor]) -> float:
    """|Δ probability| of infer() when every pass's logits move by at most logits_tol x their largest value L:
    resizing is a convex combination (it cannot grow the error), softmax passes at most half of a logit change
    (the rows of its Jacobian have an L1 norm <= 1/2), averaging passes keeps the bound; plus both sides' own
    rounding of the resize and softmax (a few u of L, 8u taken)."""
    with torch.no_grad():
        largest = max(model(x).logits.abs().max().item() for x in inputs)
    return max(0.5 * logits_tol(model, x) * largest for x in inputs) + 8 * U32 * largest


# ----------------------------------------------------------------------------------------------- onnxruntime
def test_onnxruntime_logits_match_pytorch_at_any_batch_and_size(model, ort):
    assert isinstance(ort, OnnxRuntimeModel) and ort.config is model.config
    for shape in [(1, 3, 64, 64), (2, 3, 97, 61), (3, 3, 40, 130)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x).logits
        out = ort(x)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) <= logits_tol(model, x)


@pytest.mark.parametrize(
    "options",
    [dict(mode="whole"),
     dict(mode="slide", crop_size=(48, 48), stride=(32, 40)),
     dict(mode="aligned", short_side=64, long_side=96),
     dict(mode="whole", scales=[0.75, 1.0, 1.25], flip=True)],
    ids=["whole", "slide", "aligned", "multiscale-flip"],
)  # fmt: skip
def test_every_inference_mode_runs_unchanged_on_onnxruntime(model, ort, options):
    x = torch.randn(2, 3, 75, 101)
    ref = infer(model, x, **options)
    got = infer(ort, x, **options)
    assert got.shape == ref.shape == (2, 5, 75, 101)
    # the passes' inputs: the largest logits any of them gives bounds the error (see probs_tol)
    scales = options.get("scales") or [1.0]
    passes = [torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear") for s in scales]
    assert (got - ref).abs().max().item() <= probs_tol(model, passes + [x])


def test_second_use_is_a_cache_hit_and_new_weights_a_new_entry(model, ort):
    path, stat = ort.path, ort.path.stat()
    root = path.parents[2]
    start = time.perf_counter()
    again = onnxruntime_model(model, export_size=EXPORT_SIZE, cache_dir=root)
    assert not ort.from_cache and again.from_cache  # built by the fixture, reused here
    assert again.path == path and path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino
    assert time.perf_counter() - start < 60  # a reload; an export would verify at another size too
    changed = randomize_(SegformerForSemanticSegmentation(tiny_config(depths=[1, 2, 1, 1]))).eval()
    with torch.no_grad():
        changed.decode_head.classifier.bias[0] += 1e-3  # one weight, slightly
    other = onnxruntime_model(changed, export_size=EXPORT_SIZE, cache_dir=root)
    assert not other.from_cache and other.path.parent != path.parent
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(other(x), changed(x).logits) <= logits_tol(changed, x)
    # other export options are other entries too
    assert onnxruntime_model(model, export_size=(96, 64), cache_dir=root).path.parent not in (path.parent,)
    entries = sorted(p.name for p in (root / "onnx").iterdir())
    assert len(entries) == 3 and not any(name.startswith(".") for name in entries)  # no temporary left over


@pytest.mark.output
def test_a_damaged_cache_file_is_detected_and_rebuilt(model, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    first = onnxruntime_model(model, export_size=EXPORT_SIZE, cache_dir=tmp_path)
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: a file onnxruntime may still load, with wrong weights
    first.path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="segformer"):
        rebuilt = onnxruntime_model(model, export_size=EXPORT_SIZE, cache_dir=tmp_path)
    assert not rebuilt.from_cache and rebuilt.path == first.path
    assert any(
        "is damaged (model.onnx does not match its SHA-256); rebuilding" in r.getMessage() for r in caplog.records
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(rebuilt(x), model(x).logits) <= logits_tol(model, x)
    rebuilt.path.unlink()  # a missing file too
    again = onnxruntime_model(model, export_size=EXPORT_SIZE, cache_dir=tmp_path)
    assert not again.from_cache
    manifest = again.path.parent / "manifest.json"
    for files in ([], {}):  # a manifest that parses but lists nothing to check: damaged too, not trusted
        manifest.write_text(json.dumps({"files": files}))
        assert not onnxruntime_model(model, export_size=EXPORT_SIZE, cache_dir=tmp_path).from_cache


def test_racing_builders_publish_one_complete_entry(tmp_path):
    """Threads stand in for processes: the entry is published by a rename, whichever thread runs it."""
    barrier = threading.Barrier(2)
    results = []

    def build(tmp):
        (tmp / "a.bin").write_bytes(threading.current_thread().name.encode() * 1000)
        barrier.wait(timeout=30)  # both have built before either publishes
        return {"builder": threading.current_thread().name}

    def worker():
        results.append(cached_entry(tmp_path / "entry", build))

    threads = [threading.Thread(target=worker, name=f"builder{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r[0] for r in results] == [tmp_path / "entry"] * 2
    assert os.listdir(tmp_path) == ["entry"]  # the loser's temporary folder is gone
    manifest = json.loads((tmp_path / "entry" / "manifest.json").read_text())
    assert (tmp_path / "entry" / "a.bin").read_bytes() == manifest["builder"].encode() * 1000
    assert cached_entry(tmp_path / "entry", build) == (tmp_path / "entry", True)


# A process that starts building a cache entry and never finishes: it waits in its build until killed.
_STUCK_BUILD = """
import os, sys, time
from pathlib import Path
from segformer.backends import cached_entry

def build(tmp):
    (tmp / "half.bin").write_bytes(b"half")
    Path(sys.argv[2] + ".part").write_text(str(tmp))
    os.replace(sys.argv[2] + ".part", sys.argv[2])  # whole or absent: the parent polls for it, then kills
    time.sleep(600)

cached_entry(Path(sys.argv[1]), build)
"""


@pytest.mark.output
def test_a_killed_build_is_swept_and_a_live_one_is_not(tmp_path):
    """SIGKILL midway leaves a temporary folder; the next build in that cache folder removes it, while the
    folder of a build still running (a thread of this process) stays and that build completes."""
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", _STUCK_BUILD, str(cache / "killed"), str(ready)],
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), child.stderr.read() if child.poll() is not None else "the child never built"
    finally:
        child.kill()
        child.wait(timeout=30)  # reaped: its pid is gone, not a zombie
    abandoned = Path(ready.read_text())
    assert abandoned.parent == cache and abandoned.name.startswith(".killed.") and (abandoned / "half.bin").is_file()

    started, release, live, results = threading.Event(), threading.Event(), [], []

    def slow_build(tmp):
        live.append(tmp)
        started.set()
        release.wait(timeout=60)
        (tmp / "a.bin").write_bytes(b"live")
        return {}

    def quick_build(tmp):
        (tmp / "b.bin").write_bytes(b"other")
        return {}

    builder = threading.Thread(target=lambda: results.append(cached_entry(cache / "live", slow_build)))
    builder.start()
    try:
        assert started.wait(timeout=30)
        assert cached_entry(cache / "other", quick_build) == (cache / "other", False)
        assert not abandoned.exists()  # its owner is dead
        assert live[0].is_dir()  # its owner is running
    finally:
        release.set()
        builder.join(timeout=60)
    assert results == [(cache / "live", False)] and (cache / "live" / "a.bin").read_bytes() == b"live"
    assert sorted(os.listdir(cache)) == ["live", "other"]


def test_other_hosts_and_old_versions_temporary_folders_go_after_a_day(tmp_path):
    """Whether another host's builder lives cannot be told: its folder is kept for STALE_AFTER (a day), as are
    the owner-less folders of older versions; anything else in the cache folder is never touched."""
    other_host = tmp_path / ".k1.123@elsewhere.ns4026531836.ab_c9.tmp"
    old_version = tmp_path / ".k2.x7z_q2.tmp"
    other_trash = tmp_path / ".k3.55@elsewhere.12345678.trash"
    unrelated = [tmp_path / ".k4", tmp_path / "entry", tmp_path / "k5.tmp"]
    for folder in (other_host, old_version, other_trash, *unrelated):
        folder.mkdir()
    assert sweep_abandoned(tmp_path) == []  # fresh: their builders may be running
    day_old = time.time() - STALE_AFTER - 60
    for folder in (other_host, old_version, other_trash, *unrelated):
        os.utime(folder, (day_old, day_old))
    assert sorted(sweep_abandoned(tmp_path)) == sorted([other_host, old_version, other_trash])
    assert sorted(os.listdir(tmp_path)) == [".k4", "entry", "k5.tmp"]
    assert sweep_abandoned(tmp_path / "missing") == []


def test_cache_root_follows_segformer_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SEGFORMER_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("SEGFORMER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "segformer"


def test_a_cache_that_cannot_be_written_is_one_line_naming_it_and_the_way_out(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OSError) as caught:
        cached_entry(tmp_path / "afile" / "onnx" / "entry", lambda tmp: {})
    assert str(caught.value).startswith(f"segformer cache {tmp_path / 'afile' / 'onnx'}: cannot write there (")
    assert str(caught.value).endswith("set $SEGFORMER_CACHE to a writable folder")


def test_missing_onnxruntime_is_one_line_with_the_install_hint(model, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is absent
    with pytest.raises(RuntimeError) as info:
        runtime_model(model, "onnxruntime", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "pip install 'segformer[onnx]'" in message
    model.save_pretrained(tmp_path / "m")
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "x.png", "--model", tmp_path / "m", "--output",
                           tmp_path / "out", "--backend", "onnxruntime", "--no-progress")  # fmt: skip
    assert code == 2 and err.strip().splitlines() == [f"segformer predict: error: {message}"]


def test_bad_combinations_name_the_argument(model, tmp_path, capsys):
    with pytest.raises(ValueError, match="backend must be one of pytorch, onnxruntime"):
        runtime_model(model, "tensorrt")
    with pytest.raises(ValueError, match="compile applies to the pytorch backend"):
        runtime_model(model, "onnxruntime", compile=True)
    with pytest.raises(ValueError, match="dtype bfloat16: the onnxruntime backend runs float32 or float16"):
        runtime_model(SegformerForSemanticSegmentation(tiny_config()).to(torch.bfloat16), "onnxruntime")


def test_predictor_and_evaluate_take_the_backend(model, tmp_path, monkeypatch):
    from segformer.data import build_dataset, write_synthetic_dataset
    from segformer.evaluate import evaluate
    from segformer.predict import SegformerPredictor

    monkeypatch.setenv("SEGFORMER_CACHE", str(tmp_path / "cache"))
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    eager = SegformerPredictor(model, device="cpu", mode="whole").predict(image, return_probs=True)
    fast = SegformerPredictor(model, mode="whole", backend="onnxruntime")  # device auto: the CPU
    assert isinstance(fast.model, OnnxRuntimeModel) and fast.device.type == "cpu"
    assert fast.model.path.is_relative_to(tmp_path / "cache" / "onnx")
    result = fast.predict(image, return_probs=True)
    x = fast.preprocess(Image.fromarray(image))[None]  # (1, 3, 70, 90) as both predictors ran it
    assert np.abs(result.probs - eager.probs).max() <= probs_tol(model, [x])
    data = write_synthetic_dataset(tmp_path / "data", num_train=1, num_val=3, size=64, seed=0)
    val, _ = build_dataset(data, "val")
    four = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=val.num_labels)), seed=1).eval()
    ref = evaluate(four, val, mode="whole")
    got = evaluate(four, val, mode="whole", backend="onnxruntime")
    # an argmax flips only at a near tie within probs_tol: at most a pixel or two among 3 x 4096
    assert got["num_images"] == 3 and got["aAcc"] == pytest.approx(ref["aAcc"], abs=2 / (3 * 4096))
    with pytest.raises(ValueError, match="amp 'bf16' .*needs the eager pytorch backend"):
        evaluate(four, val, amp="bf16", backend="onnxruntime")


def test_cli_rejects_compile_with_onnxruntime_in_one_line(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "x.png", "--output", tmp_path / "out", "--backend",
                           "onnxruntime", "--compile")  # fmt: skip
    assert code == 2 and err.strip() == (
        "segformer predict: error: --compile applies to --backend pytorch; onnxruntime optimises its graph itself"
    )


def test_cli_backend_choices_match_the_library():
    from segformer import backends
    from segformer.commands import BACKENDS

    assert BACKENDS == backends.BACKENDS


# ----------------------------------------------------------------------------------------------- compile
def test_a_copied_checkpoint_keeps_its_cache_key(model, tmp_path):
    """The key covers what the model computes: a checkpoint saved, copied, loaded from another folder (its config
    then has a path, a dtype and an architecture name) reuses the artefacts; other class names do not."""
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a, b = (SegformerForSemanticSegmentation.from_pretrained(tmp_path / d) for d in ("a", "b"))
    assert weights_digest(a) == weights_digest(b) == weights_digest(model)
    b.config.id2label = {**b.config.id2label, 0: "renamed"}
    assert weights_digest(b) != weights_digest(a)


@pytest.mark.slow
def test_compile_once_per_shape_across_processes_and_match_eager(model, tmp_path):
    """predict --compile in a first process compiles once for two images of one shape; a second process and this
    one load that package without compiling; its probabilities match eager's within two implementations' error
    and its labels agree with eager's except at near ties. (One compilation serves the whole test: ~40 s each.)"""
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    cache = tmp_path / "cache"
    # the key holds the thread count: the processes run with this one's
    env = {**os.environ, "SEGFORMER_CACHE": str(cache), "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def run(out: str, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "segformer", "predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                "--model", str(tmp_path / "m"), "--mode", "whole", "--device", "cpu", "--output",
                str(tmp_path / out), "--no-progress", *extra]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr
        return done

    first = run("one", "--compile")
    assert first.stderr.count("compiling for input shape (1, 3, 64, 64)") == 1  # two images, one shape
    packages = list((cache / "compiled").glob("*/model.pt2"))
    assert len(packages) == 1
    mtime = packages[0].stat().st_mtime_ns
    second = run("two", "--compile")
    assert "compiling" not in second.stderr and packages[0].stat().st_mtime_ns == mtime
    run("eager")
    for name in ("a", "b"):
        one, two, eager = (np.asarray(Image.open(tmp_path / d / f"{name}.png")) for d in ("one", "two", "eager"))
        assert np.array_equal(one, two)  # the same package, the same kernels
        # eager and compiled kernels round differently: labels agree except at near ties
        assert (one == eager).mean() >= 0.99
    # this process: the same key (weights, shape, threads, target), no compilation
    x = torch.randn(1, 3, 64, 64)
    compiled = runtime_model(model, compile=True, cache_dir=cache)
    assert isinstance(compiled, CompiledModel) and next(compiled.parameters()) is next(model.parameters())
    got = infer(compiled, x, mode="whole")
    assert compiled.cache_hits == [(1, 3, 64, 64)] and compiled.compiled_shapes == []
    assert compiled.package_folder(x) / "model.pt2" == packages[0]
    assert not model.training  # infer() restored the wrapper's eval mode, not a training mode
    assert (got - infer(model, x, mode="whole")).abs().max().item() <= probs_tol(model, [x])
    assert packages[0].stat().st_mtime_ns == mtime


@pytest.mark.slow
@pytest.mark.output
def test_a_package_is_keyed_by_the_instructions_it_was_built_for(model, tmp_path):
    """A cache shared by machines of two kinds, or a run with ATEN_CPU_CAPABILITY capped, never loads a package
    built for other instructions (one built for AVX-512 would die of an illegal instruction on an AVX2 CPU)."""
    model.save_pretrained(tmp_path / "m")
    code = (
        "import sys, torch; from segformer import SegformerForSemanticSegmentation as M; "
        "from segformer.backends import CompiledModel, compile_target; "
        "m = CompiledModel(M.from_pretrained(sys.argv[1]), cache_dir=sys.argv[2]); "
        "print(m.package_folder(torch.zeros(1, 3, 64, 64)).name, compile_target(torch.device('cpu')))"
    )

    def key(**capability: str) -> tuple[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env.update(OMP_NUM_THREADS="1", **capability)
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "cache")],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        name, target = done.stdout.split()
        return name, target

    native, capped = key(), key(ATEN_CPU_CAPABILITY="default")
    assert native[1].startswith("cpu:") and ":DEFAULT:" in capped[1]
    assert (native[0] == capped[0]) == (native[1] == capped[1])
    if ":DEFAULT:" not in native[1]:  # (a CPU with vector code to lose: every x86-64 one with AVX2)
        assert native[0] != capped[0]


@pytest.mark.slow
def test_compile_without_a_compiler_says_what_to_install(tmp_path):
    """Without a working C++ toolchain (Windows outside a Developer Command Prompt, macOS without OpenMP)
    --compile ended in "CppCompileError: C++ compile error" or an InductorError naming the compiler setting,
    the remedy cut off (portability audit): one line now says what the compiler said and what to install."""
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3))
    model.save_pretrained(tmp_path / "m")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "OMP_NUM_THREADS": "1",
           "SEGFORMER_CACHE": str(tmp_path / "cache")}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "segformer", "predict", str(tmp_path / "a.png"), "--model",
                           str(tmp_path / "m"), "--output", str(tmp_path / "out"), "--compile", "--mode", "whole",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("segformer predict: error: --compile needs a working C++ compiler (No working C++ "
                           "compiler found") and line.endswith("or run without --compile"), line  # fmt: skip
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "a.png").exists()
