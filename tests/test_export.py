"""ONNX export (segformer.export, `segformer export`) checked against onnxruntime."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import U32, fp32_tol, randomize_, reductions, rel_err, run_cli, tiny_config

from segformer import SegformerForSemanticSegmentation
from segformer.cli import build_parser
from segformer.export import FP16_TOLERANCE, check_folded_head, export_onnx


@pytest.fixture(scope="module")
def model() -> SegformerForSemanticSegmentation:
    torch.manual_seed(0)
    return randomize_(SegformerForSemanticSegmentation(tiny_config(depths=[1, 2, 1, 1]))).eval()


# onnxruntime is the oracle here (the dev / onnx extras); imported where used, so that `-m "not oracle"` collects
# this file without it.
pytestmark = pytest.mark.oracle

U16 = 2.0**-11  # fp16 unit roundoff


def tol(model, x: torch.Tensor, unit: float = U32) -> float:
    """Two implementations (onnxruntime's kernels and ours), each within fp32_tol of exact; fp16 graphs have
    fp16's unit roundoff in place of fp32's."""
    return 2 * fp32_tol(reductions(model, x)) * unit / U32


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])


def test_dynamic_export_matches_pytorch_at_other_sizes_and_batch_2(tmp_path, model):
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, size=(64, 96))
    import onnx

    assert report.verified == "numeric" and report.max_rel_diff <= tol(model, torch.zeros(2, 3, 64, 96))
    assert report.verify_shape[0] == 2 and report.verify_shape[2:] != (64, 96)
    assert "max relative difference" in report.summary()
    for shape in [(2, 3, 64, 96), (2, 3, 97, 61)]:  # the export size, and an odd one of another aspect
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x).logits
        out = run_onnx(path, x)
        assert out.shape == ref.shape and rel_err(out, ref) <= tol(model, x)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "height", "width"]
    # the class axis is the model's label count, not a symbol (consumers size their buffers from it)
    out_dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", model.config.num_labels, "logits_height", "logits_width"]
    check_folded_head(path, 16)  # raises if the unfolded fuse conv were in the graph
    assert model.fast_path and not model.training  # the caller's model is left as it was


def test_unfolded_head_is_detected(tmp_path, model):
    model.fast_path = False  # the plain head: a (D, 4D, 1, 1) fuse conv over the 4D-channel concatenation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer notes
            torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(tmp_path / "plain.onnx"), dynamo=False,
                              input_names=["pixel_values"], output_names=["logits"])  # fmt: skip
    finally:
        model.fast_path = True
    with pytest.raises(RuntimeError, match="not the folded one"):
        check_folded_head(tmp_path / "plain.onnx", 16)


def test_static_export_and_old_opset(tmp_path, model):
    import onnx

    report = export_onnx(model, tmp_path / "s.onnx", size=(64, 64), dynamic=False, opset=13)
    assert report.verified == "numeric" and report.verify_shape == (1, 3, 64, 64)
    assert report.max_rel_diff <= tol(model, torch.zeros(1, 3, 64, 64))
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]


def test_fp16_export_keeps_layernorm_and_softmax_in_fp32(tmp_path, model):
    path = tmp_path / "h.onnx"
    import onnx

    report = export_onnx(model, path, size=(64, 64), fp16=True)
    # onnxruntime's CPU provider runs the fp16 graph in fp16
    assert report.verified == "numeric" and report.max_rel_diff <= FP16_TOLERANCE
    assert report.max_rel_diff <= tol(model, torch.zeros(2, 3, 64, 64), U16)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    weights = [t for t in graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    norms = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert {n.op_type for n in norms} == {"LayerNormalization", "Softmax"}
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    x = torch.randn(1, 3, 80, 72)
    with torch.no_grad():
        assert rel_err(run_onnx(path, x), model(x).logits) <= tol(model, x, U16)  # float32 in and out


def test_the_verification_limit_is_the_fp32_bound_of_the_model_at_its_size(tmp_path, model):
    """The limit was 1e-4 for every model: above the error model's bound for two fp32 evaluations of a tiny model
    (several times), below it for b5 (audit). It is that bound now, counted for the model at the verification's
    size: twice fp32_tol, each evaluation within it."""
    from segformer.export import fp32_limit

    report = export_onnx(model, tmp_path / "m.onnx", size=(64, 96))
    _, c, h, w = report.verify_shape
    assert report.tolerance == 2 * fp32_tol(reductions(model, torch.zeros(1, c, h, w)))
    assert report.max_rel_diff <= report.tolerance and f"(limit {report.tolerance:.1e})" in report.summary()
    deeper = randomize_(SegformerForSemanticSegmentation(tiny_config(depths=[2, 4, 2, 2]))).eval()
    assert fp32_limit(deeper, report.verify_shape) > report.tolerance  # (more reductions in series)
    assert export_onnx(model, tmp_path / "s.onnx", size=(64, 96), tolerance=0.5).tolerance == 0.5
    assert export_onnx(model, tmp_path / "n.onnx", size=(64, 96), verify=False).tolerance is None
    with pytest.raises(ValueError, match="tolerance must be a positive number, got -1"):
        export_onnx(model, tmp_path / "x.onnx", size=(64, 64), tolerance=-1)


def test_failed_verification_is_loud_and_writes_nothing(tmp_path, model):
    with pytest.raises(RuntimeError, match="failed verification: max relative difference"):
        export_onnx(model, tmp_path / "x.onnx", size=(64, 64), tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="too small"):
        export_onnx(model, tmp_path / "x.onnx", size=(16, 16))
    with pytest.raises(ValueError, match="no such directory"):
        export_onnx(model, tmp_path / "nowhere" / "x.onnx", size=(64, 64))


@pytest.mark.slow
def test_cli_export(tmp_path, model, capsys):
    model.save_pretrained(tmp_path / "model")
    cmd = [sys.executable, "-m", "segformer", "export"]
    args = [str(tmp_path / "model"), "--onnx", str(tmp_path / "m.onnx"), "--size", "64", "64"]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "max relative difference" in done.stdout
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert rel_err(run_onnx(tmp_path / "m.onnx", x), model(x).logits) <= tol(model, x)

    code, _, err = run_cli(capsys, "export", tmp_path / "nope", "--onnx", tmp_path / "n.onnx")
    assert code == 2 and err.startswith("segformer export: error: ")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "n.onnx").exists()
    # --tolerance: the limit a user sets (the default is the model's fp32 bound); a value it misses fails
    args = [tmp_path / "model", "--onnx", tmp_path / "t.onnx", "--size", "64", "64"]
    code, out, err = run_cli(capsys, "export", *args, "--tolerance", "0.25")
    assert code == 0 and "(limit 2.5e-01)" in out, err
    code, _, err = run_cli(capsys, "export", *args, "--tolerance", "1e-15")
    assert code == 2 and "exceeds 1.0e-15" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "m", "--onnx", "x.onnx", "--tolerance", "0"])
    code, _, err = run_cli(capsys, "export", *args, "--tolerance", "0.25", "--no-verify")  # (ignored: review audit)
    assert code == 2 and "--tolerance sets the comparison's limit, and --no-verify skips" in err, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_exports_as_float32(tmp_path, model, dtype):
    """A float16 / bfloat16 checkpoint gives the fp32 graph (its weights upcast), verified against them upcast;
    it failed on the trace input's dtype."""
    half = copy.deepcopy(model).to(dtype)
    report = export_onnx(half, tmp_path / "m.onnx", size=(64, 64))
    assert report.verified == "numeric" and report.max_rel_diff <= report.tolerance
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = copy.deepcopy(half).float()(x).logits
    assert rel_err(run_onnx(tmp_path / "m.onnx", x), reference) <= tol(model, x)


def test_an_opset_beyond_the_exporter_is_one_line(tmp_path, model, capsys):
    """Past the exporter's highest opset it printed its whole graph (~460 lines) before its error."""
    from segformer.export import MAX_OPSET

    for opset in (MAX_OPSET + 1, 12):  # (12: the exporter has no unflatten below 13, and dumped its graph too)
        with pytest.raises(ValueError, match=rf"from 13 to {MAX_OPSET} \(this torch's exporter\), got {opset}$"):
            export_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_refuses_a_classification_checkpoint(tmp_path, capsys, caplog):
    """One line: the refusal, without the loader's "newly initialised ... train the model before use" first."""
    from segformer import SegformerForImageClassification

    SegformerForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "cls")
    with caplog.at_level("WARNING", logger="segformer"):
        code, _, err = run_cli(capsys, "export", tmp_path / "cls", "--onnx", tmp_path / "c.onnx", "--size", "64", "64")
    assert code == 2 and "not a segmentation checkpoint (SegformerForImageClassification" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c.onnx").exists()
    assert not [m for m in caplog.messages if "newly initialised" in m], caplog.messages


@pytest.mark.output
def test_an_exported_file_runs_as_the_model_with_its_metadata(tmp_path, capsys, monkeypatch):
    """An export carried no metadata, and a file `segformer export` wrote could not be given as the model
    (`--backend onnxruntime` exported its own copy into the cache: notes). The file now holds the config, the
    preprocessing, and the checkpoint's protocol and label rules; predict, eval and SegformerPredictor run it as
    they run the checkpoint on onnxruntime, and files they cannot run are refused in one line naming them."""
    import json

    import numpy as np
    import onnx
    from PIL import Image

    from segformer.data.synthetic import CLASSES
    from segformer.export import read_metadata
    from segformer.images import IMAGENET_MEAN
    from segformer.inference import InferenceOptions
    from segformer.predict import SegformerPredictor
    from segformer.run_files import save_inference_options

    monkeypatch.setenv("SEGFORMER_CACHE", str(tmp_path / "cache"))
    ckpt, path = tmp_path / "ckpt", tmp_path / "m.onnx"
    net = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=len(CLASSES)))).eval()
    net.save_pretrained(ckpt)
    save_inference_options(ckpt, InferenceOptions(mode="whole"))
    colours = {str(k): [40 * k, 20, 30] for k in range(len(CLASSES))}
    (ckpt / "labels.json").write_text(json.dumps({"id2label": list(CLASSES), "palette": colours}))
    code, _, err = run_cli(capsys, "export", "--model", ckpt, "--onnx", path, "--size", "64", "64")
    assert code == 0, err

    meta = read_metadata(path)
    assert json.loads(meta["segformer.config"])["id2label"] == {str(k): v for k, v in net.config.id2label.items()}
    assert InferenceOptions.from_dict(json.loads(meta["segformer.inference"])) == InferenceOptions(mode="whole")
    assert json.loads(meta["segformer.input"])["image_mean"] == list(IMAGENET_MEAN)
    assert meta["segformer.axes"] == "dynamic" and "argmax" in meta["segformer.output"]

    from_file = SegformerPredictor(str(path))
    from_ckpt = SegformerPredictor(str(ckpt), backend="onnxruntime")
    assert from_file.backend == "onnxruntime" and from_file.device.type == "cpu"
    assert from_file.options == from_ckpt.options == InferenceOptions(mode="whole")
    assert from_file.palette.tolist() == from_ckpt.palette.tolist() == list(colours.values())
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), np.uint8))
    assert np.array_equal(from_file.predict(image).labels, from_ckpt.predict(image).labels)

    # the command line: predict's label map in the data's colours; eval's metrics as the checkpoint's
    image.save(tmp_path / "a.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "a.png", "--model", path, "--output", tmp_path / "out",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    written = Image.open(tmp_path / "out" / "a.png")
    assert written.getpalette()[: 3 * len(CLASSES)] == [c for k in range(len(CLASSES)) for c in colours[str(k)]]
    data = tmp_path / "data"
    assert run_cli(capsys, "synth", data, "--train", "1", "--val", "2", "--size", "48")[0] == 0
    results = []
    for model, flags in ((path, ()), (ckpt, ("--backend", "onnxruntime", "--device", "cpu"))):
        code, _, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--json", tmp_path / "r.json", *flags)
        assert code == 0, err
        results.append(json.loads((tmp_path / "r.json").read_text()))
        assert results[-1].pop("model") == str(model)  # (the rest is alike: metrics, protocol, label rules)
    assert results[0] == results[1]

    # what cannot run is one line naming the file
    static = tmp_path / "static.onnx"
    export_onnx(net, static, size=(64, 64), dynamic=False)
    foreign = onnx.load(str(path))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    (tmp_path / "text.onnx").write_text("not a model")
    for name, flags, message in (
        ("static.onnx", (), "exported with --static (64x64 only)"),
        ("foreign.onnx", (), "no segformer metadata"),
        ("text.onnx", (), "not an ONNX file"),
        ("m.onnx", ("--compile",), "an ONNX file runs on onnxruntime as it is: compile (--compile) does not apply"),
        ("m.onnx", ("--dtype", "int8"), "dtype int8 (--dtype) does not apply to it"),
        ("missing.onnx", (), "no such ONNX file"),
    ):
        code, _, err = run_cli(capsys, "predict", tmp_path / "a.png", "--model", tmp_path / name, "--output",
                               tmp_path / "o2", "--no-progress", *flags)  # fmt: skip
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)


def test_serve_and_export_take_the_model_either_way(tmp_path, capsys):
    """serve and export took the model only positionally, train/eval/predict only as --model (notes)."""
    code, _, err = run_cli(capsys, "export", "a", "--model", "b", "--onnx", tmp_path / "x.onnx")
    assert code == 2 and "the model is given twice (a and --model b)" in err, err
    code, _, err = run_cli(capsys, "export", "--onnx", tmp_path / "x.onnx")
    assert code == 2 and "the model is required: MODEL or --model MODEL" in err, err
    code, _, err = run_cli(capsys, "serve", "a", "--model", "b")
    assert code == 2 and "the model is given twice" in err, err


@pytest.mark.output
def test_onnx_files_as_models_where_the_audit_broke_them(tmp_path, capsys):
    """Audit of the ONNX-file models: a checkpoint folder named x.onnx was taken for a file; a damaged labels.json
    was copied into the metadata (every command then refused the file); --onnx out.txt wrote a file no command
    takes; --backend pytorch and a dtype were ignored or refused by machine; from_pretrained(FILE.onnx) asked for a
    config.json; metadata naming another class count ran; the reduced-labels flag was not carried; an fp16 export
    was reported as float32."""
    import json

    import onnx

    from segformer.hub import CheckpointError
    from segformer.predict import SegformerPredictor, load_model
    from segformer.run_files import preprocessor_json, stored_reduce_labels
    from segformer.serve import model_dtype

    net = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=3))).eval()
    folder = tmp_path / "ckpt.onnx"  # (a checkpoint folder may have any name)
    net.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(preprocessor_json(size=None, reduce_labels=True))
    (folder / "labels.json").write_text('{"id2label": ["a", "b", "c"], "reduce_labels": tru}')
    path = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "export", folder, "--onnx", path, "--size", "64", "64")
    assert code == 2 and "labels.json: not readable JSON" in err and not path.exists(), err
    (folder / "labels.json").write_text(json.dumps({"id2label": ["a", "b", "c"], "reduce_labels": True}))
    code, _, err = run_cli(capsys, "export", folder, "--onnx", tmp_path / "m.txt", "--size", "64", "64")
    assert code == 2 and "--onnx" in err and "give the file a .onnx name" in err, err
    assert run_cli(capsys, "export", folder, "--onnx", path, "--size", "64", "64")[0] == 0
    assert stored_reduce_labels(path) is True and stored_reduce_labels(folder) is True
    assert isinstance(SegformerPredictor(str(folder), device="cpu").model, SegformerForSemanticSegmentation)

    for kwargs, message in (({"backend": "pytorch"}, r"backend pytorch \(--backend\) does not apply to it"),
                            ({"dtype": "bfloat16"}, "runs in the precision it was exported in")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SegformerPredictor(str(path), **kwargs)
    with pytest.raises(CheckpointError, match="an ONNX file, not a checkpoint"):
        SegformerForSemanticSegmentation.from_pretrained(path)
    code, _, err = run_cli(capsys, "eval", "--data", tmp_path, "--model", path, "--backend", "pytorch")
    assert code == 2 and "as it is: --backend pytorch does not apply to it" in err, err

    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "segformer.config":
            entry.value = json.dumps({**json.loads(entry.value), "id2label": {"0": "a", "1": "b"}})
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    with pytest.raises(ValueError, match="its graph has 3 outputs but its segformer.config metadata 2 classes"):
        load_model(str(tmp_path / "edited.onnx"))

    half = tmp_path / "half.onnx"
    export_onnx(net, half, size=(64, 64), fp16=True, verify=False)
    assert model_dtype(SegformerPredictor(str(half))) == "float16"
    assert model_dtype(SegformerPredictor(str(path))) == "float32"


@pytest.mark.output
def test_serve_audit_points_on_onnx_models_and_colours(tmp_path, capsys):
    """Serve audit: `--model A --model B` served B without a word; an empty .onnx file was "another tool's export";
    a labels.json palette naming some classes could give an unnamed class the colour of a named one; the refusals
    of an ONNX file named library keywords, not the flags given."""
    import json

    from segformer.predict import SegformerPredictor
    from segformer.run_files import stored_palette
    from segformer.visualize import palette_for

    code, _, err = run_cli(capsys, "export", "--model", "a", "--model", "b", "--onnx", tmp_path / "x.onnx")
    assert code == 2 and "--model given twice (a and b); give it once" in err, err
    (tmp_path / "empty.onnx").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "a.png", "--model", tmp_path / "empty.onnx", "-o",
                           tmp_path / "o")  # fmt: skip
    assert code == 2 and f"{tmp_path / 'empty.onnx'}: an empty file, not an ONNX model" in err, err

    net = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=3))).eval()
    net.save_pretrained(tmp_path / "ckpt")
    default = palette_for(3)
    clash = [int(c) for c in default[1]]  # (class 0 takes class 1's own colour; class 1 is given none)
    (tmp_path / "ckpt" / "labels.json").write_text(json.dumps({"id2label": ["a", "b", "c"], "palette": {"0": clash}}))
    colours = stored_palette(tmp_path / "ckpt", default)
    assert colours[0].tolist() == clash and len({tuple(c) for c in colours.tolist()}) == 3
    assert colours[2].tolist() == default[2].tolist()  # (no clash: kept)

    path = tmp_path / "m.onnx"
    export_onnx(net, path, size=(64, 64))
    with pytest.raises(ValueError, match=r"compile \(--compile\), dtype int8 \(--dtype\) does not apply to it"):
        SegformerPredictor(str(path), compile=True, dtype="int8")
    with pytest.raises(ValueError, match=r"dtype float16 \(--dtype\) does not apply to it"):
        SegformerPredictor(str(path), dtype="float16")
    assert SegformerPredictor(str(path), dtype="float32").backend == "onnxruntime"


def test_a_1x1_patch_embedding_of_the_fuse_convs_shape_exports(tmp_path):
    """A stage-2 patch conv (16, 32, 1, 1) has the shape of the unfolded fuse conv of a two-stage head with D = 16:
    the folded-head check took it for that conv and refused a good model (audit), also with verify=False."""
    config = tiny_config(num_encoder_blocks=2, hidden_sizes=[32, 16], patch_sizes=[7, 1], strides=[4, 2])
    model = randomize_(SegformerForSemanticSegmentation(config)).eval()
    assert tuple(model.segformer.encoder.patch_embeddings[1].proj.weight.shape) == (16, 32, 1, 1)
    report = export_onnx(model, tmp_path / "m.onnx", size=(64, 64))
    assert report.verified == "numeric" and report.max_rel_diff <= report.tolerance and not report.note
    model.fast_path = False  # (the plain head: its fuse conv, a second weight of that shape, is still found)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(tmp_path / "plain.onnx"), dynamo=False,
                              input_names=["pixel_values"], output_names=["logits"])  # fmt: skip
    finally:
        model.fast_path = True
    with pytest.raises(RuntimeError, match="not the folded one"):
        check_folded_head(tmp_path / "plain.onnx", 16, 2, elsewhere=1)


def test_a_hooked_head_is_refused_naming_the_hook_and_sync_batchnorm_exports(tmp_path, model):
    """A forward hook on a head part (not exported, and the head then not foldable) was refused with a message
    naming the export's temporary file (audit); it names the hook now. A SyncBatchNorm (a model trained with
    --sync-bn, in memory) computes as BatchNorm2d in eval mode and exports as one."""
    handle = model.decode_head.linear_fuse.register_forward_hook(lambda *args: None)
    try:
        with pytest.raises(ValueError, match=r"cannot be exported folded \(forward hooks on decode_head.linear_fuse\)"):
            export_onnx(model, tmp_path / "h.onnx", size=(64, 64))
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    report = export_onnx(synced, tmp_path / "s.onnx", size=(64, 64))
    assert report.verified == "numeric" and report.max_rel_diff <= report.tolerance


def test_weights_far_larger_than_trained_ones_are_judged_against_float64(tmp_path, model, monkeypatch):
    """Weights of 3/sqrt(fan_in) take fp32 logits further from exact than the error model's limit for trained
    weights: the audit's model was refused (8e-4 where the limit said 2e-5, onnxruntime the closer of the two to
    float64). Past the limit, the float64 logits decide: onnxruntime within twice PyTorch fp32's own distance."""
    import math

    import segformer.export as export

    config = tiny_config(num_encoder_blocks=3, depths=[2, 1, 2], hidden_sizes=[4, 8, 16], num_attention_heads=[1, 1, 2],
                         mlp_ratios=[4, 1, 3], sr_ratios=[4, 1, 2], patch_sizes=[2, 1, 4], strides=[1, 2, 2],
                         decoder_hidden_size=8, hidden_act="laplace", num_labels=1)  # fmt: skip
    large = SegformerForSemanticSegmentation(config).eval()
    gen = torch.Generator().manual_seed(5021)
    with torch.no_grad():
        for p in large.parameters():
            p.copy_(3 * torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()) if p.ndim > 1 else p)
    report = export_onnx(large, tmp_path / "large.onnx", size=(32, 32))  # (refused on the old code, here)
    if report.max_rel_diff > report.tolerance:
        assert report.note.startswith("beyond the error model's limit, as close to float64 logits as PyTorch's")
    # the rule itself, on any machine: a limit nothing meets sends every export to the float64 logits
    monkeypatch.setattr(export, "fp32_limit", lambda *args: 1e-12)
    report = export_onnx(model, tmp_path / "m.onnx", size=(64, 64))
    assert report.note.startswith("beyond the error model's limit") and "onnxruntime" in report.summary()
    monkeypatch.setattr(export, "_against_float64", lambda *args: (1e-7, 1e-3))  # (onnxruntime far worse)
    with pytest.raises(RuntimeError, match="failed verification"):
        export_onnx(model, tmp_path / "bad.onnx", size=(64, 64))
    with pytest.raises(RuntimeError, match="exceeds 1.0e-09"):  # an explicit tolerance is not arbitrated
        export_onnx(model, tmp_path / "strict.onnx", size=(64, 64), tolerance=1e-9)
    assert not (tmp_path / "bad.onnx").exists() and not (tmp_path / "strict.onnx").exists()


@pytest.mark.parametrize(
    "size, message", [((64, 64, 3), r"\(64, 64, 3\)"), ((64.7, 64), r"\(64.7, 64\)"), ("64", "'64'"), (True, "True")]
)
def test_a_bad_size_is_one_line_naming_it(tmp_path, model, size, message):
    with pytest.raises(ValueError, match=rf"size must be \(height, width\) as two positive integers .*got {message}"):
        export_onnx(model, tmp_path / "m.onnx", size=size)
    assert export_onnx(model, tmp_path / "sq.onnx", size=64, verify=False).export_size == (64, 64)


def test_metadata_of_a_one_channel_model_and_its_output_size(tmp_path):
    """The metadata said "RGB" with ImageNet's three means for any channel count, and ceil(H/4) for any stage-1
    stride (audit); onnxruntime behind predict gave a traceback for a one-channel model where PyTorch gives one line."""
    import json

    from segformer.backends import OnnxRuntimeModel
    from segformer.export import read_metadata

    config = tiny_config(num_channels=1, strides=[2, 2, 2, 2])
    model = randomize_(SegformerForSemanticSegmentation(config)).eval()
    export_onnx(model, tmp_path / "g.onnx", size=(64, 64))
    meta = read_metadata(tmp_path / "g.onnx")
    stated = json.loads(meta["segformer.input"])
    assert stated["channels"].startswith("1 ") and stated["image_mean"] is None and stated["image_std"] is None
    assert "floor((H + 6 - 7) / 2) + 1" in meta["segformer.output"]
    runner = OnnxRuntimeModel(tmp_path / "g.onnx", config)
    assert runner(torch.randn(1, 1, 37, 53)).shape[-2:] == (19, 27)  # (what the metadata's formula says)
    with pytest.raises(ValueError, match="pixel_values has 3 channels but the model expects 1"):
        runner(torch.randn(1, 3, 37, 53))
