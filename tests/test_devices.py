"""The device contract: every device this machine has (the CPU always; CUDA and Apple's MPS where present) gives the
CPU's guarantees: fp32 outputs within the promise of Transformers' on the same device, inference in every mode and
train-mode gradients equal to a float64 reference on the CPU up to derived rounding, training in every precision
the device runs natively, checkpoints that move between devices, and one-line errors for a device the machine
lacks. On a CPU-only machine the CPU case runs (the same code paths a GPU takes, except the
kernels); on a GPU machine the same tests run on it too.

fp32 on CUDA means fp32: the tests turn TF32 off (PyTorch's default lets cuDNN's convolutions round their inputs
to 10 mantissa bits), as a user comparing outputs must; the fixture restores the previous flags.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import U32, cross_entropy_tol, fp32_tol, randomize_, reductions, rel_err, short_run, tiny_config

from segformer import SegformerConfig, SegformerForSemanticSegmentation
from segformer.data import write_synthetic_dataset
from segformer.inference import InferenceOptions, effective_amp, infer, predict_labels
from segformer.pretrained import canonical_keys
from segformer.train import train


def _devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


DEVICES = _devices()


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for matmuls and cuDNN convolutions while inside (a no-op for the CPU and MPS)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    with exact_fp32():
        yield torch.device(request.param)


def test_this_machine_lists_its_accelerators():
    """The parametrisation is what torch reports: a GPU that torch sees is never left out of the contract."""
    assert DEVICES[0] == "cpu"
    assert ("cuda" in DEVICES) == torch.cuda.is_available()


def test_outputs_match_transformers_on_the_same_device(device):
    """The promise (fp32, relative error <= 1e-5) on each device, against Transformers on that device, and the
    fast path (CPU-only parts included) against the plain modules."""
    transformers = pytest.importorskip("transformers", reason="the oracle needs the dev extra (transformers)")
    config = SegformerConfig.from_variant("b0", num_labels=13)
    hf_config = transformers.SegformerConfig(
        **{k: v for k, v in config.to_dict().items() if k not in ("model_type", "use_layer_norm_eps")}
    )
    theirs = randomize_(transformers.SegformerForSemanticSegmentation(hf_config), seed=3).eval()
    ours = SegformerForSemanticSegmentation(config)
    info = ours.load_checkpoint_state(canonical_keys(theirs.state_dict()))
    assert not (info.missing_keys or info.unexpected_keys or info.mismatched_keys)
    theirs, ours = theirs.to(device), ours.to(device).eval()
    x = torch.randn(2, 3, 67, 93).to(device)
    with torch.no_grad():
        ref = theirs(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
        ours.fast_path = False
        plain = ours(x).logits
    assert got.logits.device.type == device.type
    assert rel_err(got.logits.cpu(), ref.logits.cpu()) <= 1e-5  # the README's promise, as stated
    assert rel_err(plain.cpu(), ref.logits.cpu()) <= 1e-5
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert rel_err(a.cpu(), b.cpu()) <= 1e-5


def _tiny_pair() -> tuple[SegformerForSemanticSegmentation, SegformerForSemanticSegmentation]:
    """The same random tiny model in float64 (the reference) and in float32, both on the CPU."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=5)), seed=11).eval()
    reference = SegformerForSemanticSegmentation(tiny_config(num_labels=5)).double().eval()
    reference.load_state_dict(model.state_dict())
    return reference, model


MODES = {
    "whole": InferenceOptions(),
    "slide": InferenceOptions(mode="slide", crop_size=(48, 48), stride=(32, 32)),
    "scales+flip": InferenceOptions(scales=[0.75, 1.25], flip=True),
}


@pytest.mark.parametrize("mode", MODES)
def test_inference_on_the_device_equals_float64_up_to_rounding(device, mode):
    """infer's probabilities and predict_labels' labels on each device against a float64 reference on the CPU.

    Bound: each pass's logits are within fp32_tol·max|z| of exact (conftest's error model); bilinear
    resizing and averaging are convex combinations (they cannot grow it); a softmax moves by at most twice the
    largest logit change (dp_k = p_k(dz_k - sum_j p_j dz_j)), plus its own rounding (8u). Labels must agree
    wherever the reference's top two classes are further apart than twice the logit bound."""
    reference, model = _tiny_pair()
    x = torch.randn(2, 3, 70, 90)
    opts = MODES[mode]
    passes = []  # the input and max |logit| of every forward pass the reference runs (scales, flips, windows)

    def keep(module, args, kwargs, out):
        passes.append(((args or list(kwargs.values()))[0].float(), out.logits.abs().max().item()))

    hook = reference.register_forward_hook(keep, with_kwargs=True)
    exact = infer(reference, x.double(), opts)
    hook.remove()
    z_err = max(fp32_tol(reductions(model, pixels)) for pixels, _ in passes) * max(top for _, top in passes)
    model.to(device)
    got = infer(model, x.to(device), opts)
    assert got.device.type == device.type and got.dtype == torch.float32
    assert (got.cpu().double() - exact).abs().max().item() <= 2 * z_err + 8 * U32
    labels = predict_labels(model, x.to(device), opts).cpu()
    top2 = exact.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (2 * z_err + 8 * U32)
    assert clear.float().mean() > 0.9  # the comparison is about most pixels, not vacuous
    assert torch.equal(labels[clear], exact.argmax(1)[clear])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=8, num_val=2, size=64, seed=0)
    model_json = root / "tiny.json"
    tiny_config(num_labels=4).to_json_file(model_json)
    return root, model_json


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_on_the_device_in_each_precision(device, amp, synth, tmp_path):
    """Three optimiser steps and an evaluation on each device in each precision it runs natively (fp16 needs
    CUDA's gradient scaler and is refused elsewhere with one line); the run records what ran, its losses are
    finite and its checkpoint loads on the CPU. (Agreement with float64: the train-mode gradient test below.)"""
    data, model_json = synth
    out = tmp_path / "run"
    cfg = short_run(
        data,
        model_json,
        out,
        steps=3,
        warmup_steps=1,
        eval_every=3,
        device=str(device),
        amp=amp,
        dropout=0.0,
        drop_path_rate=0.0,
    )
    if amp == "fp16" and device.type != "cuda":
        with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
            train(cfg)
        return
    train(cfg)
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["device"] == str(device)
    assert stored["amp_effective"] == effective_amp(amp, device)[0]
    losses = _losses(out)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    moved = SegformerForSemanticSegmentation.from_pretrained(out / "last", device="cpu").eval()
    assert next(moved.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(moved(torch.randn(1, 3, 64, 64)).logits).all()


def test_train_mode_loss_and_gradients_on_the_device_equal_float64(device):
    """A train-mode forward and backward (BatchNorm on batch statistics) on each device against float64 on the
    CPU: the loss within the cross-entropy bound of the measured logit difference, the gradients norm-wise
    within the promise (as test_oracle's Transformers comparison, whose BatchNorm-bias shift keeps every
    pre-ReLU value clear of the kink; see there)."""
    config = tiny_config(num_labels=4, drop_path_rate=0.0, classifier_dropout_prob=0.0)
    model = randomize_(SegformerForSemanticSegmentation(config), seed=5)
    with torch.no_grad():
        bias = model.decode_head.batch_norm.bias
        bias.copy_(5.0 * torch.where(torch.arange(bias.numel()) % 2 == 0, 1.0, -1.0))
    reference = SegformerForSemanticSegmentation(config).double()
    reference.load_state_dict(model.state_dict())
    model.to(device).train(), reference.train()
    x = torch.randn(2, 3, 45, 61)
    labels = torch.randint(0, 4, (2, 45, 61))
    labels[:, :3] = 255
    ref = reference(x.double(), labels=labels)
    got = model(x.to(device), labels=labels.to(device))
    ref.loss.backward()
    got.loss.backward()
    logit_diff = (got.logits.cpu().double() - ref.logits).abs().max().item()
    assert abs(got.loss.item() - ref.loss.item()) <= cross_entropy_tol(logit_diff, ref.loss.item())
    names = sorted(n for n, _ in reference.named_parameters())
    ours, exact = dict(model.named_parameters()), dict(reference.named_parameters())
    a = torch.cat([ours[n].grad.cpu().double().flatten() for n in names])
    b = torch.cat([exact[n].grad.flatten() for n in names])
    assert ((a - b).norm() / b.norm()).item() <= 1e-5  # the promise, as in test_oracle


def test_a_device_this_machine_lacks_is_one_line(synth, tmp_path, capsys):
    """--device naming a GPU this machine lacks (cuda:N, N = its CUDA device count, lacks on every machine) is
    one line naming it, from train, eval, predict and demo alike, before any file is written (train and eval once
    gave a raw AttributeError, demo wrote its data set first)."""
    from conftest import run_cli

    data, model_json = synth
    lacking = f"cuda:{torch.cuda.device_count()}"
    model = tmp_path / "m"
    SegformerForSemanticSegmentation(tiny_config(num_labels=4)).save_pretrained(model)
    runs = {
        "train": ("train", "--data", data, "--model", model_json, "--output", tmp_path / "run", "--steps", "1"),
        "eval": ("eval", "--data", data, "--model", model, "--workers", "0"),
        "predict": ("predict", data / "images" / "val", "--model", model, "--output", tmp_path / "out"),
        "demo": ("demo", "--output", tmp_path / "demo"),
    }
    for name, argv in runs.items():
        code, _, err = run_cli(capsys, *argv, "--device", lacking)
        assert code == 2, name
        assert err.count("\n") == 1 and f"'{lacking}'" in err and "CUDA" in err, (name, err)
    assert not any((tmp_path / name).exists() for name in ("run", "out", "demo"))  # nothing started


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """Process LOCAL_RANK = the CUDA device count would need a GPU that is not there: one line that says how
    many there are and what to do; on a machine without CUDA the same process simply runs on the CPU."""
    from segformer.distributed import init_distributed

    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    if not torch.cuda.is_available():
        assert init_distributed().device == torch.device("cpu")
        return
    with pytest.raises(ValueError, match=r"LOCAL_RANK.*CUDA device\(s\).*--nproc-per-node.*--device cpu"):
        init_distributed()
    with pytest.raises(ValueError, match=r"--nproc-per-node"):
        init_distributed("cuda")
