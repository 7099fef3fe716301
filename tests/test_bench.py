"""bench/: the numbers the benchmarks print are about the path users run (FLOP counts of our fast path)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from segformer import SegformerConfig, SegformerForSemanticSegmentation

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_inference():
    return _bench("bench_inference")


def _model() -> SegformerForSemanticSegmentation:
    config = SegformerConfig(
        hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
        decoder_hidden_size=16, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(config).eval()


def test_flop_count_follows_the_folded_head():
    """The folded head computes the plain head's products but the fuse conv (each stage's projection folded
    with its slice of the fuse weights, then the classifier): its count is the plain count less the fuse
    conv's 2·(4D)·D·H₁W₁, exactly. A counter that installs module hooks (FlopCounterMode does) sends the model
    down its plain path, and would count the fuse conv for ours too."""
    bench = _bench_inference()
    model = _model()
    head = model.decode_head
    with torch.inference_mode():
        hidden = model.segformer(torch.randn(2, 3, 64, 96), output_hidden_states=True).hidden_states

    def count(fast: bool) -> int:
        head.fast_path = fast
        with bench._FlopCount() as counts, torch.inference_mode():
            head(hidden)
        return sum(counts.values())

    plain = count(False)
    count(True)  # the first fast forward folds the weights (a few small products, once)
    folded = count(True)
    d = head.config.decoder_hidden_size
    batch, _, h1, w1 = hidden[0].shape
    assert folded == plain - 2 * (4 * d) * d * batch * h1 * w1


def test_model_flops_ours_below_the_architecture():
    """model_flops: (architecture, ours); ours is the folded head's count plus the same encoder and attention."""
    bench = _bench_inference()
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    arch, ours = bench.model_flops(model, x)
    d = model.config.decoder_hidden_size
    fuse = 2 * (4 * d) * d * (64 // 4) * (64 // 4)
    assert arch > 0
    # the encoder's products are the same on both paths up to how its patchified convs are counted (as GEMMs or
    # convolutions: the same products), so ours is the architecture's less the fuse conv
    assert ours == arch - fuse
    assert model.fast_path  # restored


def test_bench_inference_names_what_is_wrong_with_a_case():
    check = _bench_inference().check_case
    assert check("b0:512x512:fp32:1") is None and check("train:b2:64x96:8") is None
    assert check("batch:b0:512x512:8") is None
    assert "is not VARIANT:HxW:DTYPE:BATCH" in check("b0:512x512")
    assert "is not train:VARIANT:HxW:BATCH" in check("train:b0:512x512")
    assert "unknown dtype 'fp64'" in check("b0:64x64:fp64:1")
    assert "unknown variant 'b9'" in check("b9:64x64:fp32:1")
    assert "positive integers" in check("b0:0x64:fp32:1") and "positive integers" in check("b0:64x64:fp32:-1")


def test_bench_e2e_table_columns_line_up():
    """Every column's cells end where its header ends (the first column: start at 0), on every line, for the
    longest label (cityscapes) and the widest values a row can hold, as realistic ones."""
    e2e = _bench("bench_e2e")
    times = dict(zip(e2e.WORKFLOWS, (13.1433, 3.0524, 2.4269, 2.7716, 0.9358)))  # b2 cityscapes, seconds
    rows = [
        {"name": "ade", "times": dict.fromkeys(e2e.WORKFLOWS, 0.1865), "agree": {"segformer": 1.0, "onnxruntime": 1.0}},
        {"name": "cityscapes", "times": times, "agree": {"segformer": 0.9999995, "onnxruntime": 0.0}},
    ]  # fmt: skip
    widths = e2e.table_widths([e2e.dataset_label(name) for name in e2e.DATASETS])
    lines = [e2e.table_line(list(e2e.HEADERS), widths)] + [e2e.table_line(e2e.result_cells(r), widths) for r in rows]
    assert "1000000.0" in lines[-1] and "cityscapes (2 photos, 19 cl, 1024²)" in lines[-1]
    cells = [list(re.finditer(r"\S+(?: \S+)*", line)) for line in lines]  # cells: text runs two spaces apart
    assert [[m.group() for m in c] for c in cells[:1]] == [list(e2e.HEADERS)]
    assert all(len(c) == len(e2e.HEADERS) and c[0].start() == 0 for c in cells)
    assert len({tuple(m.end() for m in c[1:]) for c in cells}) == 1, "\n".join(lines)


def test_bench_serve_refuses_fewer_requests_than_its_concurrency(monkeypatch, capsys):
    """--requests below the highest concurrency (16) is an error naming the option and the minimum, before any
    work; 16 itself is accepted (the run then gets as far as the benchmark, stopped here)."""
    serve = _bench("bench_serve")

    def started(*args, **kwargs):
        raise RuntimeError("the benchmark started")

    monkeypatch.setattr(serve, "SegformerForSemanticSegmentation", started)
    monkeypatch.setattr(serve, "start_server", started)
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--requests", "8", "--threads", str(torch.get_num_threads())])
    with pytest.raises(SystemExit) as raised:
        serve.main()
    assert raised.value.code == 2
    assert "--requests must be at least 16" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["bench_serve.py", "--requests", "16", "--threads", str(torch.get_num_threads())])
    with pytest.raises(RuntimeError, match="the benchmark started"):
        serve.main()


def test_bench_training_records_its_settings(monkeypatch, tmp_path):
    """Each results.jsonl record holds the batch size, lr and crop of its run, under the options' names."""
    training = _bench("bench_training")
    monkeypatch.setattr(training, "train_plain", lambda *args: 0.5)  # the loop itself is not what is tested
    argv = ["--only", "plain", "--datasets", "textures", "--steps", "3", "--train-images", "1", "--val-images", "1"]
    argv += ["--batch-size", "2", "--lr", "0.001", "--crop", "32", "48", "--output", str(tmp_path)]
    assert training.main(argv) == 0
    (record,) = map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    assert record["batch_size"] == 2 and record["lr"] == 0.001 and record["crop"] == [32, 48]
    assert record["steps"] == 3 and record["n_train"] == 1 and record["n_val"] == 1 and record["plain"] == 0.5


def test_bench_training_fine_tunes_a_checkpoint_with_a_new_head(tmp_path, capsys):
    """--init: the plain loop starts from the checkpoint's encoder with a head for the data set's label count
    (the checkpoint has another), at the fine-tuning lr 6e-5 unless --lr says otherwise; the record names the
    checkpoint. A folder that is not a checkpoint is refused before any work."""
    training = _bench("bench_training")
    init = tmp_path / "pretrained"
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=7)).save_pretrained(init)
    argv = ["--only", "plain", "--datasets", "textures", "--steps", "1", "--train-images", "1", "--val-images", "1"]
    argv += ["--batch-size", "1", "--crop", "32", "32", "--output", str(tmp_path / "out")]
    assert training.main([*argv, "--init", str(init)]) == 0
    (record,) = map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    assert record["init"] == str(init.resolve()) and record["lr"] == 6e-5 and 0 <= record["plain"] <= 1
    assert f"# start: the checkpoint {init.resolve()}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        training.main([*argv, "--init", str(tmp_path)])
    assert f"--init {tmp_path}: not a checkpoint folder (no config.json)" in capsys.readouterr().err
