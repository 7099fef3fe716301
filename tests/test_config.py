"""SegformerConfig: documented defaults, variants, validation and config.json round trips."""

from __future__ import annotations

import json

import pytest

from segformer import VARIANTS, SegformerConfig


def test_defaults_are_those_of_the_docs_page():
    c = SegformerConfig()
    assert (c.num_channels, c.num_encoder_blocks) == (3, 4)
    assert c.depths == [2, 2, 2, 2] and c.sr_ratios == [8, 4, 2, 1] and c.hidden_sizes == [32, 64, 160, 256]
    assert c.patch_sizes == [7, 3, 3, 3] and c.strides == [4, 2, 2, 2] and c.num_attention_heads == [1, 2, 5, 8]
    assert c.mlp_ratios == [4, 4, 4, 4] and c.hidden_act == "gelu"
    assert (c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.classifier_dropout_prob) == (
        0.0,
        0.0,
        0.1,
    )
    assert (c.initializer_range, c.drop_path_rate, c.layer_norm_eps) == (0.02, 0.1, 1e-6)
    assert (c.decoder_hidden_size, c.is_encoder_decoder, c.semantic_loss_ignore_index) == (256, False, 255)
    assert (
        c.num_labels == 2 and c.id2label == {0: "LABEL_0", 1: "LABEL_1"} and c.label2id == {"LABEL_0": 0, "LABEL_1": 1}
    )
    assert c.reshape_last_stage and c.return_dict and not c.output_hidden_states and not c.output_attentions
    assert c.problem_type is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant):
    c = SegformerConfig.from_variant(variant, num_labels=150)
    assert c.depths == VARIANTS[variant]["depths"] and c.num_labels == 150
    assert SegformerConfig.from_variant(f"mit-{variant}").hidden_sizes == VARIANTS[variant]["hidden_sizes"]


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'b9'"):
        SegformerConfig.from_variant("b9")


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(depths=[1, 1, 1]), "depths"),
        (dict(sr_ratios=[8, 4, 2]), "sr_ratios"),  # (longer lists are cut to num_encoder_blocks, as in Transformers)
        (dict(hidden_sizes=[32, 64, 161, 256]), r"hidden_sizes\[2\]=161"),
        (dict(num_attention_heads=[1, 2, 5, 0]), "num_attention_heads"),
        (dict(hidden_sizes=[32, -64, 160, 256]), "hidden_sizes"),
        (dict(decoder_hidden_size=0), "decoder_hidden_size"),
        (dict(hidden_act="gelu_bogus"), "hidden_act"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(num_encoder_blocks=0), "num_encoder_blocks"),
        (dict(num_labels=-1), "num_labels"),
        (dict(num_labels=3, id2label={0: "a", 1: "b"}), "num_labels=3 disagrees"),
        (dict(problem_type="ranking"), "problem_type"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        SegformerConfig(**changes)


def test_labels_from_id2label_with_string_keys():
    c = SegformerConfig(id2label={"0": "wall", "1": "floor", "2": "sky"})
    assert c.num_labels == 3 and c.id2label[2] == "sky" and c.label2id == {"wall": 0, "floor": 1, "sky": 2}
    c.num_labels = 5
    assert c.id2label[4] == "LABEL_4"


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    data = SegformerConfig.from_variant("b1", num_labels=3).to_dict()
    data.update(image_size=224, downsampling_rates=[1, 4, 8, 16], torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(data))
    c = SegformerConfig.from_pretrained(tmp_path)
    assert c.image_size == 224 and c.downsampling_rates == [1, 4, 8, 16]
    c.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["image_size"] == 224 and again["model_type"] == "segformer"
    assert again["dtype"] == "float32" and "torch_dtype" not in again  # the older key, read and written as 5.x does
    assert again["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert SegformerConfig.from_json_file(tmp_path / "again" / "config.json") == c


def test_overrides_reset_labels(tmp_path):
    SegformerConfig(id2label={0: "a", 1: "b"}).save_pretrained(tmp_path)
    assert SegformerConfig.from_pretrained(tmp_path, num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert SegformerConfig.from_pretrained(tmp_path, id2label={0: "x"}).label2id == {"x": 0}
    assert SegformerConfig.from_pretrained(tmp_path, drop_path_rate=0.0).drop_path_rate == 0.0


def test_bad_config_files_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        SegformerConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer", "depths": [1, 1]}))
    with pytest.raises(ValueError, match=r"config\.json: depths has 2 entries"):
        SegformerConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        SegformerConfig.from_pretrained(tmp_path)


def test_num_hidden_layers_is_num_encoder_blocks_as_in_transformers():
    """Transformers maps ``num_hidden_layers`` to ``num_encoder_blocks`` (its attribute_map), which generic code
    reads; ours had no such attribute (audit)."""
    c = SegformerConfig(num_hidden_layers=3)
    assert c.num_encoder_blocks == c.num_hidden_layers == 3 and c.depths == [2, 2, 2]
    c.num_hidden_layers = 2
    assert c.num_encoder_blocks == 2 and "num_hidden_layers" not in c.to_dict()


@pytest.mark.oracle
def test_num_hidden_layers_reads_as_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    for kwargs in ({}, {"num_hidden_layers": 3}, {"num_encoder_blocks": 2, "depths": [1, 1]}):
        ours, theirs = SegformerConfig(**kwargs), transformers.SegformerConfig(**kwargs)
        assert (
            ours.num_hidden_layers == theirs.num_hidden_layers == ours.num_encoder_blocks == theirs.num_encoder_blocks
        )
