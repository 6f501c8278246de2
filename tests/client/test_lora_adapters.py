"""Adapter export / import in PEFT keys, the seeded initial adapter, and PEFT directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

from fedrot.adapters import Adapter, AdapterSchema, Factor
from fedrot.errors import SchemaError
from fedrot_client.lora import (
    LoraSpec,
    export_adapter,
    initial_adapter,
    load_adapter,
    peft_adapter_config,
    save_peft_directory,
    set_trainable_factors,
)
from fedrot_client.models import load_base_model

MODULE = "base_model.model.bert.encoder.layer.0.attention.self.query"


def randomised(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same keys and shapes with random values (so every factor matters)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in tensors.items()}


def logits_of(model, tokenizer, texts=("good day", "bad awful day")) -> torch.Tensor:
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_export_is_peft_keyed_and_fits_the_core_adapter(tiny_model, tiny_lora) -> None:
    model, _ = tiny_model()
    tensors = export_adapter(model)
    adapter = Adapter.from_state_dict(tensors)
    schema = AdapterSchema.of(adapter)
    assert schema.rank == tiny_lora.r
    assert len(adapter.lora) == 4  # 2 layers x (query, value)
    assert adapter.lora[MODULE].A.shape == (2, 32) and adapter.lora[MODULE].B.shape == (32, 2)
    assert set(adapter.extra) == {
        "base_model.model.classifier.weight", "base_model.model.classifier.bias"
    }  # fmt: skip
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())
    assert all(torch.count_nonzero(p.B) == 0 for p in adapter.lora.values())  # PEFT init
    assert all(torch.count_nonzero(p.A) > 0 for p in adapter.lora.values())
    only_b = export_adapter(model, frozenset({Factor.B}), with_extra=False)
    assert set(only_b) == {Factor.B.key(m) for m in adapter.lora}


def test_export_matches_peft_save_pretrained_keys(tiny_model, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, _ = tiny_model()
    model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = export_adapter(model)
    assert set(saved) == set(ours)
    assert all(torch.equal(saved[k], ours[k]) for k in ours)


def test_initial_adapter_is_deterministic_per_seed(tiny_spec, tiny_lora) -> None:
    first = initial_adapter(tiny_spec, tiny_lora, seed=5)
    second = initial_adapter(tiny_spec, tiny_lora, seed=5)
    other = initial_adapter(tiny_spec, tiny_lora, seed=6)
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    a_key = Factor.A.key(MODULE)
    assert not torch.equal(first[a_key], other[a_key])


def test_round_trip_into_a_fresh_model(tiny_model) -> None:
    source, tokenizer = tiny_model(seed=1)
    load_adapter(source, randomised(export_adapter(source), seed=0))
    target, _ = tiny_model(seed=2)
    assert not torch.allclose(logits_of(source, tokenizer), logits_of(target, tokenizer))
    load_adapter(target, export_adapter(source))
    exported = export_adapter(target)
    assert all(torch.equal(exported[k], v) for k, v in export_adapter(source).items())
    assert torch.equal(logits_of(source, tokenizer), logits_of(target, tokenizer))


def test_load_adapter_rejects_bad_keys_and_shapes(tiny_model) -> None:
    model, _ = tiny_model()
    tensors = export_adapter(model)
    a_key = Factor.A.key(MODULE)
    with pytest.raises(SchemaError, match=r"shape \(3, 32\), expected \(2, 32\)") as caught:
        load_adapter(model, {**tensors, a_key: torch.zeros(3, 32)})
    assert caught.value.key == a_key
    with pytest.raises(SchemaError, match="unexpected adapter key nope"):
        load_adapter(model, {**tensors, "nope": torch.zeros(1)})
    partial = {k: v for k, v in tensors.items() if k != a_key}
    with pytest.raises(SchemaError, match="missing adapter key"):
        load_adapter(model, partial)
    load_adapter(model, {a_key: torch.ones(2, 32)}, strict=False)
    assert torch.equal(export_adapter(model)[a_key], torch.ones(2, 32))


def test_peft_model_from_pretrained_loads_a_saved_directory(
    tiny_model, tiny_spec, tiny_lora, tmp_path: Path
) -> None:
    model, tokenizer = tiny_model()
    tensors = randomised(export_adapter(model), seed=3)
    load_adapter(model, tensors)
    config = peft_adapter_config(tiny_lora, "tiny-bert", "SEQ_CLS", modules_to_save=("classifier",))
    folder = save_peft_directory(tmp_path / "global", tensors, config)
    loaded = PeftModel.from_pretrained(load_base_model(tiny_spec).model, folder)
    assert torch.allclose(logits_of(loaded, tokenizer), logits_of(model, tokenizer), atol=1e-6)
    assert not torch.allclose(
        logits_of(load_base_model(tiny_spec).model, tokenizer), logits_of(model, tokenizer)
    )


def test_adapter_config_agrees_with_lora_config() -> None:
    spec = LoraSpec(r=8, alpha=16, dropout=0.1, target_modules=("q_proj", "v_proj"))
    ours = peft_adapter_config(spec, "base", "CAUSAL_LM")
    theirs = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM").to_dict()  # fmt: skip
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_rslora"):
        assert ours[key] == theirs[key], key
    assert set(ours["target_modules"]) == set(theirs["target_modules"])
    assert ours["task_type"] == str(getattr(theirs["task_type"], "value", theirs["task_type"]))


def test_set_trainable_factors(tiny_model) -> None:
    model, _ = tiny_model()
    names = set_trainable_factors(model, frozenset({Factor.B}))
    assert names and all(".lora_B." in n or ".modules_to_save." in n for n in names)
    assert any(".modules_to_save." in n for n in names)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(".lora_A." in n for n in frozen) and "original_module" in " ".join(frozen)


def test_lora_spec_validation() -> None:
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSpec(dropout=1.0)
