"""LoRA fine-tuning with the real ``peft`` package, as PEFT's SegFormer tutorial does it: adapters on the
attention's query and value, the decode head trained in full; training moves only those; the adapted model in
eval mode (its wrapped Linears run as modules) agrees with the merged one (plain Linears, the fast path); saved
adapters load onto a fresh copy of the base."""

from __future__ import annotations

import pytest
import torch
from conftest import fp32_tol, randomize_, reductions, rel_err, tiny_config

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
    # (W + BA)x against Wx + B(Ax): two fp32 passes, each within fp32_tol of the plain model's reductions plus the
    # two an adapter adds in series (A x, then B(A x); the merged pass rounds B·A into W instead)
    lora_a = [m for name, m in model.named_modules() if name.endswith("lora_A.default")]
    adapters = [k for m in lora_a for k in (m.in_features, m.out_features)]
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    assert type(merged.segformer.encoder.block[0][0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        plain = merged(pixel_values=x).logits
    assert rel_err(adapted, plain) <= 2 * fp32_tol(reductions(merged, x) + adapters)

    fresh = SegformerForSemanticSegmentation(tiny_config(num_labels=3))
    fresh.load_state_dict(before)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        # the same weights (saved and loaded bit for bit), modules and kernels on the same input: the same logits
        assert torch.equal(loaded(pixel_values=x).logits, adapted)
    # the adapter folder alone, with or without the base's config.json beside it (SaveConfigCallback writes one):
    # "weights without config.json" / "no weights found" named neither the adapter nor how to load it (audit)
    for with_config in (False, True):
        if with_config:
            fresh.config.save_pretrained(tmp_path / "adapter")
        with pytest.raises(ValueError, match=r"a PEFT adapter \(adapter_config.json\), not a whole model: .* then "
                           r"peft\.PeftModel\.from_pretrained\(base, '.*adapter'\)$"):  # fmt: skip
            SegformerForSemanticSegmentation.from_pretrained(tmp_path / "adapter")
    # in a subfolder (its config.json beside it), the loading line names it (it left it out: review)
    with pytest.raises(ValueError, match=r"from_pretrained\(base, '.*', subfolder='adapter'\)$"):
        SegformerForSemanticSegmentation.from_pretrained(tmp_path, subfolder="adapter")


QUIET = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, classifier_dropout_prob=0.0)


def _lora_grads(state, checkpointing, keep_input_grads: bool = True) -> dict[str, torch.Tensor | None]:
    base = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET))
    base.load_state_dict(state)
    if checkpointing is not None:
        base.gradient_checkpointing_enable(checkpointing)
    torch.manual_seed(1)
    model = _lora(base)  # (PEFT calls enable_input_require_grads on a model with gradient checkpointing)
    if not keep_input_grads:
        base.disable_input_require_grads()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # (zero at the start, which would leave the A matrices without gradient)
            torch.nn.init.normal_(p)
    x, y = (
        torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
        torch.zeros(2, 64, 64, dtype=torch.long),
    )
    model(pixel_values=x, labels=y).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}


def test_lora_adapters_get_gradients_under_reentrant_checkpointing():
    """A frozen encoder under reentrant gradient checkpointing: the checkpoint passes gradients only to inputs
    that require them, so the adapters inside the blocks need the patch embedding's output to require gradients.
    PEFT asks for that through enable_input_require_grads (which we lacked: the adapters then got none)."""
    state = SegformerForSemanticSegmentation(tiny_config(num_labels=3, **QUIET)).state_dict()
    plain = _lora_grads(state, None)
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values())
    reentrant = _lora_grads(state, {"use_reentrant": True})
    for name, grad in plain.items():
        # the recompute runs the same kernels on the same shapes in the same order: bitwise the same gradients
        assert torch.equal(reentrant[name], grad), name
    # the mechanism: without the hook the reentrant checkpoint leaves the adapters without gradients
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        unhooked = _lora_grads(state, {"use_reentrant": True}, keep_input_grads=False)
    assert all(g is None for g in unhooked.values())


def test_pretrained_model_helpers():
    model = SegformerForSemanticSegmentation(tiny_config())
    assert model.get_input_embeddings() is model.segformer.encoder.patch_embeddings[0]
    assert model.get_output_embeddings() is None and model.can_generate() is False
    model.tie_weights()  # nothing to tie: no error
    model.enable_input_require_grads()
    x = torch.randn(1, 3, 64, 64)
    assert model.get_input_embeddings()(x)[0].requires_grad
    model.disable_input_require_grads()
    assert not model.get_input_embeddings()(x)[0].requires_grad or any(
        p.requires_grad for p in model.get_input_embeddings().parameters()
    )
    with torch.no_grad():
        assert not model.get_input_embeddings()(x)[0].requires_grad
