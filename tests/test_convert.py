"""Conversion of original NVlabs/mmseg SegFormer checkpoints (segformer.convert, `segformer convert`).

The original files are built here from our own models with the original key layout written out by hand
(1-based stage indices, fused kv as [k; v], an unused conv_seg), so conversion can be checked end to end:
the converted directory must give exactly the outputs of the model the weights came from.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import randomize_, run_cli, tiny_config

from segformer import (
    SegformerConfig,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
)
from segformer.convert import ConversionError, convert_checkpoint, infer_config, load_original_checkpoint
from segformer.labels import ADE20K_CLASSES, CITYSCAPES_CLASSES

HEADS = [1, 2, 3, 4]  # the tiny config's heads: not visible in the weights, so passed explicitly


def original_encoder(state: dict[str, torch.Tensor], config: SegformerConfig, src: str, dst: str) -> dict:
    """Our encoder tensors (under ``src``) in the original layout (under ``dst``)."""
    out = {}
    for i in range(config.num_encoder_blocks):
        s, o = f"{src}encoder.", f"{dst}"
        for t in ("weight", "bias"):
            out[f"{o}patch_embed{i + 1}.proj.{t}"] = state[f"{s}patch_embeddings.{i}.proj.{t}"]
            out[f"{o}patch_embed{i + 1}.norm.{t}"] = state[f"{s}patch_embeddings.{i}.layer_norm.{t}"]
            out[f"{o}norm{i + 1}.{t}"] = state[f"{s}layer_norm.{i}.{t}"]
            for j in range(config.depths[i]):
                b, ob = f"{s}block.{i}.{j}.", f"{o}block{i + 1}.{j}."
                a = b + "attention.self."
                out[ob + f"norm1.{t}"] = state[b + f"layer_norm_1.{t}"]
                out[ob + f"norm2.{t}"] = state[b + f"layer_norm_2.{t}"]
                out[ob + f"attn.q.{t}"] = state[a + f"query.{t}"]
                out[ob + f"attn.kv.{t}"] = torch.cat([state[a + f"key.{t}"], state[a + f"value.{t}"]])
                out[ob + f"attn.proj.{t}"] = state[b + f"attention.output.dense.{t}"]
                if config.sr_ratios[i] > 1:
                    out[ob + f"attn.sr.{t}"] = state[a + f"sr.{t}"]
                    out[ob + f"attn.norm.{t}"] = state[a + f"layer_norm.{t}"]
                out[ob + f"mlp.fc1.{t}"] = state[b + f"mlp.dense1.{t}"]
                out[ob + f"mlp.dwconv.dwconv.{t}"] = state[b + f"mlp.dwconv.dwconv.{t}"]
                out[ob + f"mlp.fc2.{t}"] = state[b + f"mlp.dense2.{t}"]
    return out


def original_segmentation(model: SegformerForSemanticSegmentation) -> dict[str, torch.Tensor]:
    state, config = model.state_dict(), model.config
    out = original_encoder(state, config, "segformer.", "backbone.")
    for i in range(config.num_encoder_blocks):
        for t in ("weight", "bias"):
            out[f"decode_head.linear_c{i + 1}.proj.{t}"] = state[f"decode_head.linear_c.{i}.proj.{t}"]
    out["decode_head.linear_fuse.conv.weight"] = state["decode_head.linear_fuse.weight"]
    for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        out[f"decode_head.linear_fuse.bn.{t}"] = state[f"decode_head.batch_norm.{t}"]
    out["decode_head.linear_pred.weight"] = state["decode_head.classifier.weight"]
    out["decode_head.linear_pred.bias"] = state["decode_head.classifier.bias"]
    # mmseg's BaseDecodeHead always builds conv_seg; SegFormer's head never uses it.
    out["decode_head.conv_seg.weight"] = torch.randn(config.num_labels, config.decoder_hidden_size, 1, 1)
    out["decode_head.conv_seg.bias"] = torch.randn(config.num_labels)
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture
def seg_model() -> SegformerForSemanticSegmentation:
    return randomize_(SegformerForSemanticSegmentation(tiny_config(depths=[1, 2, 1, 1]))).eval()


def save_original(path, state, meta=None) -> None:
    torch.save({"meta": meta or {}, "state_dict": state}, path)


def test_segmentation_checkpoint_converts_to_the_same_model(tmp_path, seg_model):
    classes = tuple(f"class {i} " for i in range(5))  # mmseg names may carry spaces (ADE20K's "bed ")
    save_original(tmp_path / "orig.pth", original_segmentation(seg_model), {"CLASSES": classes, "config": "x"})

    result = convert_checkpoint(tmp_path / "orig.pth", tmp_path / "out", num_attention_heads=HEADS)

    assert result.architecture == "SegformerForSemanticSegmentation"
    assert result.variant is None and result.dropped_keys == [
        "decode_head.conv_seg.weight",
        "decode_head.conv_seg.bias",
    ]
    loaded, info = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert loaded.config.depths == [1, 2, 1, 1] and loaded.config.hidden_sizes == [8, 16, 24, 32]
    assert loaded.config.decoder_hidden_size == 16 and loaded.config.num_attention_heads == HEADS
    assert loaded.config.id2label == {i: f"class {i}" for i in range(5)}
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, seg_model(x).logits)
    for key, value in seg_model.state_dict().items():  # every tensor, kv halves included, landed in place
        assert torch.equal(loaded.state_dict()[key], value), key


def test_original_eps_option(tmp_path, seg_model):
    save_original(tmp_path / "orig.pth", original_segmentation(seg_model))
    convert_checkpoint(tmp_path / "orig.pth", tmp_path / "out", num_attention_heads=HEADS, original_eps=True)
    loaded = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert loaded.config.use_layer_norm_eps and loaded.config.layer_norm_eps == 1e-6
    assert loaded.segformer.encoder.block[0][0].layer_norm_1.eps == 1e-6


def test_imagenet_backbone_converts_to_a_classifier_and_a_segmentation_base(tmp_path):
    model = randomize_(SegformerForImageClassification(tiny_config(num_labels=7))).eval()
    state = original_encoder(model.state_dict(), model.config, "segformer.", "")  # mit_b*.pth: no prefix
    state["head.weight"], state["head.bias"] = model.classifier.weight.clone(), model.classifier.bias.clone()
    torch.save(state, tmp_path / "mit_tiny.pth")

    result = convert_checkpoint(tmp_path / "mit_tiny.pth", tmp_path / "out", num_attention_heads=HEADS)

    assert result.architecture == "SegformerForImageClassification" and result.config.num_labels == 7
    loaded = SegformerForImageClassification.from_pretrained(tmp_path / "out")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    seg, info = SegformerForSemanticSegmentation.from_pretrained(
        tmp_path / "out", num_labels=3, output_loading_info=True
    )
    assert info["missing_keys"] and all(k.startswith("decode_head.") for k in info["missing_keys"])
    assert torch.equal(seg.segformer.encoder.block[3][0].attention.self.value.weight,
                       model.segformer.encoder.block[3][0].attention.self.value.weight)  # fmt: skip


def test_a_headless_imagenet_backbone_converts_to_an_encoder(tmp_path):
    """A mit_b*.pth with its ``head`` removed (as kept for backbone-only use) failed on its first key, "unknown
    key 'block1.0.attn.proj.bias'": its keys were given the classifier's prefix (audit). It is a SegformerModel."""
    model = randomize_(SegformerModel(tiny_config())).eval()
    torch.save(original_encoder(model.state_dict(), model.config, "", ""), tmp_path / "mit_nohead.pth")
    result = convert_checkpoint(tmp_path / "mit_nohead.pth", tmp_path / "out", num_attention_heads=HEADS)
    assert result.architecture == "SegformerModel"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(SegformerModel.from_pretrained(tmp_path / "out")(x).last_hidden_state,
                           model(x).last_hidden_state)  # fmt: skip


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_a_variant_missing_a_block_or_its_sequence_reduction_is_refused(tmp_path, variant):
    """Depths and sr ratios are read from which keys exist: a b0 file without block4.1, or without stage 1's
    attn.sr layers, converted into "a custom MiT" that computes something else (audit). With a variant's widths
    and other depths or ratios, the conversion now stops, naming the difference and both ways on."""
    state = original_segmentation(SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, num_labels=5)))
    last = SegformerConfig.from_variant(variant).depths[3] - 1
    no_block = {k: v for k, v in state.items() if not k.startswith(f"backbone.block4.{last}.")}
    save_original(tmp_path / "no_block.pth", no_block)
    shown = str([*SegformerConfig.from_variant(variant).depths[:3], last]).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConversionError, match=rf"widths are MiT-{variant}'s but the weights give depths {shown}"):
        convert_checkpoint(tmp_path / "no_block.pth", tmp_path / "o1")
    reduction = (".attn.sr.", ".attn.norm.")
    no_sr = {
        k: v for k, v in state.items() if not (k.startswith("backbone.block1.") and any(r in k for r in reduction))
    }
    save_original(tmp_path / "no_sr.pth", no_sr)
    with pytest.raises(ConversionError, match=rf"sr_ratios \[1, 4, 2, 1\] \(MiT-{variant}: \[8, 4, 2, 1\]\)"):
        convert_checkpoint(tmp_path / "no_sr.pth", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    save_original(tmp_path / "whole.pth", state)
    assert convert_checkpoint(tmp_path / "whole.pth", tmp_path / "o3").variant == variant


def test_bare_backbone_prefix_converts_to_an_encoder(tmp_path):
    model = randomize_(SegformerModel(tiny_config())).eval()
    torch.save(
        {"state_dict": original_encoder(model.state_dict(), model.config, "", "backbone.")},
        tmp_path / "e.pth",
    )
    result = convert_checkpoint(tmp_path / "e.pth", tmp_path / "out", num_attention_heads=HEADS)
    assert result.architecture == "SegformerModel"
    loaded = SegformerModel.from_pretrained(tmp_path / "out")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize(
    ("variant", "labels", "dataset", "first"),
    [("b0", 150, None, "wall"), ("b2", 19, None, "road"), ("b0", 19, "cityscapes", "road")],
)
def test_variant_and_labels_inferred_from_shapes(variant, labels, dataset, first):
    model = SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, num_labels=labels))
    state = original_segmentation(model)
    config, matched = infer_config(state, dataset=dataset)
    assert matched == variant
    assert config.depths == SegformerConfig.from_variant(variant).depths
    assert config.decoder_hidden_size == SegformerConfig.from_variant(variant).decoder_hidden_size
    assert config.num_attention_heads == [1, 2, 5, 8] and config.sr_ratios == [8, 4, 2, 1]
    assert config.num_labels == labels and config.id2label[0] == first
    names = ADE20K_CLASSES if labels == 150 else CITYSCAPES_CLASSES
    assert tuple(config.id2label.values()) == names


def test_errors_name_the_problem(tmp_path, seg_model):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="notes.pth: not a PyTorch checkpoint"):
        convert_checkpoint(text, tmp_path / "o1")
    with pytest.raises(ConversionError, match="no such file"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "o1")

    good = original_segmentation(seg_model)
    save_original(tmp_path / "extra.pth", {**good, "backbone.block1.0.attn.rel_pos": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"unknown key 'backbone\.block1\.0\.attn\.rel_pos'"):
        convert_checkpoint(tmp_path / "extra.pth", tmp_path / "o2", num_attention_heads=HEADS)

    bad = dict(good)
    bad["backbone.block2.1.attn.kv.weight"] = bad["backbone.block2.1.attn.kv.weight"][:, :-1]
    save_original(tmp_path / "shape.pth", bad)
    with pytest.raises(ConversionError, match=r"shape conflict at 'backbone\.block2\.1\.attn\.kv\.weight'"):
        convert_checkpoint(tmp_path / "shape.pth", tmp_path / "o3", num_attention_heads=HEADS)

    save_original(tmp_path / "good.pth", good)
    with pytest.raises(ConversionError, match=r"'backbone\.patch_embed1\.proj\.weight'.*\(8, 3, 7, 7\)"):
        convert_checkpoint(tmp_path / "good.pth", tmp_path / "o4", variant="b0")
    head_first = dict(sorted(good.items(), key=lambda item: not item[0].startswith("decode_head")))
    save_original(tmp_path / "head_first.pth", head_first)  # (the file's order blamed the head's fuse: audit)
    with pytest.raises(ConversionError, match=r"'backbone\.patch_embed1\.proj\.weight'.*\(8, 3, 7, 7\)"):
        convert_checkpoint(tmp_path / "head_first.pth", tmp_path / "o4", variant="b0")
    with pytest.raises(ConversionError, match="linear_pred.weight: holds 5 classes but num_labels=6"):
        convert_checkpoint(tmp_path / "good.pth", tmp_path / "o5", num_labels=6, num_attention_heads=HEADS)
    with pytest.raises(ConversionError, match="--num-heads"):
        convert_checkpoint(tmp_path / "good.pth", tmp_path / "o6")  # widths 8..32 are no MiT: heads unknown
    missing = {k: v for k, v in good.items() if not k.startswith("backbone.norm3.")}
    save_original(tmp_path / "missing_norm.pth", missing)
    with pytest.raises(
        ConversionError,
        match=r"missing 'backbone\.norm3\.weight' and 1 more \(as segformer\.encoder\."
        r"layer_norm\.2\.weight in",
    ):  # fmt: skip  (the file's name: it was ours alone, audit)
        convert_checkpoint(tmp_path / "missing_norm.pth", tmp_path / "o7", num_attention_heads=HEADS)
    with pytest.raises(ConversionError, match=r"num_attention_heads \[1, 2, 5\] \(CLI: --num-heads\) has 3 entries"):
        convert_checkpoint(tmp_path / "good.pth", tmp_path / "o8", num_attention_heads=[1, 2, 5])  # (it blamed
        # the checkpoint's shapes: audit)
    # sequence-reduction layers missing: refused with --num-heads too (a custom width needs it, which skipped the
    # variant check: stage 1 without its reduction converted as sr_ratios [1, 4, 2, 1], audit)
    for gone, where in (
        ("backbone.block1.0.attn.", r"stage 1 has no sequence-reduction layer but stage 2 reduces"),
        ("backbone.block2.1.attn.", r"block2\.1\.attn\.sr\.weight: missing while other blocks"),
    ):
        cut = {k: v for k, v in good.items() if not k.startswith((gone + "sr.", gone + "norm."))}
        save_original(tmp_path / "no_sr.pth", cut)
        with pytest.raises(ConversionError, match=where):
            convert_checkpoint(tmp_path / "no_sr.pth", tmp_path / "o9", num_attention_heads=HEADS)
    # what no original is (audit): a save_pretrained folder, its safetensors, a torch.save archive cut short
    seg_model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ConversionError, match=r"saved: a folder; convert reads an original \.pth file"):
        convert_checkpoint(tmp_path / "saved", tmp_path / "o8")
    with pytest.raises(ConversionError, match=r"model\.safetensors: a safetensors file, .*needs no conversion"):
        convert_checkpoint(tmp_path / "saved" / "model.safetensors", tmp_path / "o8")
    whole = (tmp_path / "good.pth").read_bytes()
    for cut in (100, len(whole) // 4, len(whole) // 2, len(whole) - 10):  # (cut in the archive's header or directory)
        (tmp_path / "cut.pth").write_bytes(whole[:cut])
        with pytest.raises(
            ConversionError,
            match=r"cut\.pth: not a PyTorch checkpoint \(a damaged or truncated "
            r"torch\.save archive: [^\n]+\)$",
        ):  # fmt: skip  (torch's RuntimeError lacked it: audit)
            convert_checkpoint(tmp_path / "cut.pth", tmp_path / "o8")
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"):
        assert not (tmp_path / name).exists()  # nothing is written for a failed conversion


# (a key, what replaces its tensor or None to drop it, the one line that must name it) — the audit's damaged files:
# these raised IndexError / ZeroDivisionError (a traceback from the CLI), named nothing, or blamed another key.
DAMAGED = [
    (
        "backbone.patch_embed1.proj.weight",
        torch.tensor(1.0),
        r"proj\.weight: a 0-d tensor of shape \(\) where the original .* a 4-d one",
    ),
    (
        "backbone.block1.0.mlp.fc1.weight",
        torch.zeros(32),
        r"fc1\.weight: a 1-d tensor of shape \(32,\) .* a 2-d one",
    ),
    (
        "backbone.block1.0.attn.sr.weight",
        torch.zeros(0, 8, 8, 8),
        r"sr\.weight: an empty tensor of shape \(0, 8, 8, 8\)",
    ),
    (
        "backbone.norm1.weight",
        torch.ones(8, dtype=torch.complex64),
        r"norm1\.weight: a tensor of dtype complex64",
    ),
    (
        "backbone.norm1.weight",
        torch.ones(8, dtype=torch.long),
        r"norm1\.weight: a tensor of dtype int64",
    ),
    (
        "decode_head.linear_pred.weight",
        None,
        r"missing 'decode_head\.linear_pred\.weight' \(the file holds its '.*pred\.bias'\)",
    ),
    (
        "backbone.patch_embed4.proj.weight",
        None,
        r"missing 'backbone\.patch_embed4\.proj\.weight'",
    ),
    (
        "backbone.block1.x.norm1.weight",
        torch.ones(8),
        r"unknown key 'backbone\.block1\.x\.norm1\.weight': block index 'x' is not",
    ),
]


@pytest.mark.parametrize(("key", "tensor", "says"), DAMAGED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(DAMAGED)])
def test_a_damaged_tensor_is_named_in_one_line(tmp_path, seg_model, key, tensor, says):
    state = original_segmentation(seg_model)
    if tensor is None:
        del state[key]
    else:
        state[key] = tensor
    save_original(tmp_path / "damaged.pth", state)
    with pytest.raises(ConversionError, match=says) as caught:
        convert_checkpoint(tmp_path / "damaged.pth", tmp_path / "out", num_attention_heads=HEADS)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_num_heads_must_give_one_count_per_stage(tmp_path, seg_model):
    save_original(tmp_path / "orig.pth", original_segmentation(seg_model))
    for heads in ([1, 2, 3], [1, 2, 3, 4, 99]):  # (the fifth was dropped without a word: audit)
        with pytest.raises(ConversionError, match=rf"has {len(heads)} entries for the checkpoint's 4 stages"):
            convert_checkpoint(tmp_path / "orig.pth", tmp_path / "out", num_attention_heads=heads)


# mmcv writes the training config into meta["config"] as Python source (Config.pretty_text), as here
META_CONFIG = """norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='MixVisionTransformer',
        embed_dims=[8, 16, 24, 32],
        num_heads=[1, 2, 3, 4],
        mlp_ratios=[4, 4, 4, 4],
        depths=[1, 2, 1, 1],
        sr_ratios=[8, 4, 2, 1],
        norm_layer=dict(type='LN', eps=1e-06)),
    decode_head=dict(type='SegFormerHead', in_channels=[8, 16, 24, 32], num_classes=5,
        decoder_params=dict(embed_dim=16), num_heads=[9, 9]))
"""


def test_the_meta_config_gives_the_heads_and_checks_the_depths(tmp_path, seg_model):
    """Head counts are not in the weights: a file whose meta config states them converts with them (MiT's default
    was used, silently wrong for a MixVisionTransformer of other heads: audit), an explicit --num-heads that
    contradicts it is refused, and blocks missing from the weights that the config counts are named."""
    from segformer.convert import _meta_backbone

    state = original_segmentation(seg_model)
    save_original(tmp_path / "orig.pth", state, {"config": META_CONFIG})
    result = convert_checkpoint(tmp_path / "orig.pth", tmp_path / "out")
    assert result.config.num_attention_heads == HEADS and result.variant is None
    loaded = SegformerForSemanticSegmentation.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, seg_model(x).logits)
    with pytest.raises(
        ConversionError, match=r"\[1, 2, 4, 4\] .* contradicts the file's meta config, .*\[1, 2, 3, 4\]"
    ):
        convert_checkpoint(tmp_path / "orig.pth", tmp_path / "o2", num_attention_heads=[1, 2, 4, 4])
    cut = {k: v for k, v in state.items() if not k.startswith("backbone.block2.1.")}
    save_original(tmp_path / "cut.pth", cut, {"config": META_CONFIG})
    with pytest.raises(
        ConversionError, match=r"meta config gives depths \[1, 2, 1, 1\] but its weights hold .*\[1, 1, 1, 1\]"
    ):
        convert_checkpoint(tmp_path / "cut.pth", tmp_path / "o3")
    # the published configs name the backbone class, which fixes MiT's heads; the head's own dict is not read
    assert _meta_backbone({"config": "model = dict(backbone=dict(type='mit_b2', style='pytorch'))"}) == {
        "num_heads": [1, 2, 5, 8]
    }
    assert _meta_backbone({"config": "model = dict(decode_head=dict(num_heads=[3]))"}) == {}
    assert _meta_backbone({"config": 3}) == {} and _meta_backbone({}) == {}


def test_a_pickle_torch_save_did_not_write_is_not_a_checkpoint(tmp_path, seg_model):
    """A plain pickle or bytes that open like one: not a checkpoint, in one line (it advised --unsafe-pickle, which
    runs code and then failed anyway, after torch's two-line protocol warning: audit); a torch.save file of a newer
    pickle protocol, which the weights-only reader cannot read, still gets the advice."""
    import pickle
    import warnings

    (tmp_path / "list.pth").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    (tmp_path / "bytes.pth").write_bytes(b"\x80" + bytes(range(256)) * 4)
    torch.save({"state_dict": original_segmentation(seg_model)}, tmp_path / "p4.pth", pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch's protocol warning would end the test)
        for name in ("list.pth", "bytes.pth"):
            with pytest.raises(ConversionError, match=rf"{name}: not a PyTorch checkpoint \(a pickle torch\.save did"):
                load_original_checkpoint(tmp_path / name)
        with pytest.raises(ConversionError, match="--unsafe-pickle"):
            load_original_checkpoint(tmp_path / "p4.pth")
    state, _ = load_original_checkpoint(tmp_path / "p4.pth", unsafe_pickle=True)
    assert "backbone.block2.1.attn.kv.weight" in state


class MmcvLikeObject:
    """Stands for the numpy/mmcv objects some original files keep in their meta."""


def test_a_missing_weight_is_named_as_the_file_names_it(seg_model):
    """Every original key, turned into ours and back, is itself (the error for a weight the file lacks named our key
    alone: audit); attn.kv's key and value halves both go back to attn.kv. The three layouts' prefixes."""
    from segformer.convert import _convert, _original_name

    good = original_segmentation(seg_model)
    backbone = {k.removeprefix("backbone."): v for k, v in good.items() if k.startswith("backbone.")}
    backbone |= {"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    encoder = {k: v for k, v in good.items() if k.startswith("backbone.")}
    for state, layout in ((good, "segmentation"), (backbone, "backbone"), (encoder, "encoder")):
        _, dropped, sources = _convert(state)
        assert len(sources) > 40 and dropped == (["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
                                                 if layout == "segmentation" else [])  # fmt: skip
        for ours, original in sources.items():
            assert _original_name(ours, layout) == original, (layout, ours)


def test_pickled_objects_need_an_explicit_opt_in(tmp_path, seg_model):
    save_original(tmp_path / "orig.pth", original_segmentation(seg_model), {"env": MmcvLikeObject()})
    with pytest.raises(ConversionError, match="--unsafe-pickle"):
        load_original_checkpoint(tmp_path / "orig.pth")
    state, meta = load_original_checkpoint(tmp_path / "orig.pth", unsafe_pickle=True)
    assert isinstance(meta["env"], MmcvLikeObject) and "backbone.block2.1.attn.kv.weight" in state


@pytest.mark.slow
def test_cli_converts_and_reports_errors_in_one_line(tmp_path, seg_model, capsys):
    save_original(tmp_path / "orig.pth", original_segmentation(seg_model), {"CLASSES": tuple("abcde")})
    cmd = [sys.executable, "-m", "segformer", "convert", str(tmp_path / "orig.pth"), str(tmp_path / "out")]
    done = subprocess.run([*cmd, "--num-heads", "1", "2", "3", "4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "SegformerForSemanticSegmentation" in done.stdout and "5 labels" in done.stdout
    assert SegformerConfig.from_pretrained(tmp_path / "out").id2label[4] == "e"
    assert "names" not in done.stdout
    # class names in meta that do not fit the classifier are left out, and now said so (silently: audit)
    save_original(tmp_path / "three.pth", original_segmentation(seg_model), {"CLASSES": tuple("abc")})
    code, out, _ = run_cli(
        capsys, "convert", tmp_path / "three.pth", tmp_path / "o3", "--num-heads", "1", "2", "3", "4"
    )
    assert code == 0 and out.rstrip().endswith(
        "; the checkpoint's meta names 3 classes but its classifier has 5: those names are not used (--dataset "
        "names a known set)"
    ), out
    assert SegformerConfig.from_pretrained(tmp_path / "o3").id2label[2] == "LABEL_2"

    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    code, _, err = run_cli(capsys, "convert", tmp_path / "junk.pth", tmp_path / "o")
    assert code == 2
    assert err.startswith("segformer convert: error: ") and "junk.pth" in err
    assert len(err.strip().splitlines()) == 1

    # a rerun replaces its own conversion; a folder holding another checkpoint's files is refused, untouched
    assert (
        run_cli(capsys, "convert", tmp_path / "orig.pth", tmp_path / "out", "--num-heads", "1", "2", "3", "4")[0] == 0
    )
    (tmp_path / "out" / "eval.json").write_text('{"mIoU": 0.5}')
    (tmp_path / "out" / "README.md").write_text("another model's card")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    code, _, err = run_cli(
        capsys, "convert", tmp_path / "orig.pth", tmp_path / "out", "--num-heads", "1", "2", "3", "4"
    )
    assert code == 2 and "holds files a conversion does not write (README.md, eval.json)" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
