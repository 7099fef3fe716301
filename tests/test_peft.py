"""LoRA fine-tuning with the real ``peft`` package, as PEFT's SegFormer tutorial does it: adapters on the
attention's query and value, the decode head trained in full; training moves only those; the adapted model in
eval mode (its wrapped Linears run as modules) agrees with the merged one (plain Linears, the fast path); saved
adapters load onto a fresh copy of the base."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_config

peft = pytest.importorskip("peft", reason="the PEFT tests need the dev extra")

from segformer import SegformerForSemanticSegmentation  # noqa: E402


def _lora(model: SegformerForSemanticSegmentation):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, modules_to_save=["decode_head"]
    )
    return peft.get_peft_model(model, config)


def test_lora_trains_the_adapters_and_the_head_and_merges_exactly(tmp_path):
    base = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=3)), seed=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = _lora(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "decode_head" in n for n in trainable)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the frozen encoder weights did not move (the adapters hold the change)
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" in name or "decode_head" in name:
            continue
        assert torch.equal(tensor, before[name.replace(".base_layer", "")]), name

    model.eval()
    with torch.no_grad():
        adapted = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    assert type(merged.segformer.encoder.block[0][0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        plain = merged(pixel_values=x).logits
    # fp32 rounding (2^-24) of (W + BA)x against Wx + B(Ax), reductions of <= 128 terms, 4 blocks + head: ~1e-6
    torch.testing.assert_close(plain, adapted, rtol=1e-5, atol=1e-5)

    fresh = SegformerForSemanticSegmentation(tiny_config(num_labels=3))
    fresh.load_state_dict(before)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        # the same weights and kernels: equal up to the order of the batched GEMMs (same bound as above)
        torch.testing.assert_close(loaded(pixel_values=x).logits, adapted, rtol=1e-5, atol=1e-5)
