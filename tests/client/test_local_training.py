"""Local training: only planned factors move, the loss falls, runs are reproducible."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedrot.adapters import Adapter, Factor
from fedrot_client.data import TextDataset
from fedrot_client.evaluation import evaluate
from fedrot_client.lora import LoraSpec, attach_lora, export_adapter, load_adapter
from fedrot_client.models import ModelSpec, TaskKind, load_base_model
from fedrot_client.tinybert import build_tokenizer
from fedrot_client.training import TrainConfig, train_locally

FAST = TrainConfig(steps=4, batch_size=8, lr=0.05, progress=False)


def nonzero_b(model) -> None:
    """Give every B a small random value, so that gradients reach A too."""
    generator = torch.Generator().manual_seed(11)
    tensors = export_adapter(model, frozenset({Factor.B}), with_extra=False)
    load_adapter(model, {k: 0.1 * torch.randn(v.shape, generator=generator)
                         for k, v in tensors.items()}, strict=False)  # fmt: skip


@pytest.mark.parametrize("trained", [frozenset({Factor.B}), frozenset({Factor.A})])
def test_only_the_planned_factor_changes(tiny_model, sentiment, trained) -> None:
    model, tokenizer = tiny_model()
    nonzero_b(model)
    before = Adapter.from_state_dict(export_adapter(model))
    result = train_locally(model, tokenizer, sentiment, trained, FAST)
    after = Adapter.from_state_dict(export_adapter(model))
    frozen = ({Factor.A, Factor.B} - trained).pop()
    moved = next(iter(trained))
    for module, pair in before.lora.items():
        assert torch.equal(after.lora[module].factor(frozen), pair.factor(frozen)), module
        assert not torch.equal(after.lora[module].factor(moved), pair.factor(moved)), module
    for key, tensor in before.extra.items():
        assert not torch.equal(after.extra[key], tensor), key  # the head always trains
    expected_keys = {moved.key(m) for m in before.lora} | set(before.extra)
    assert set(result.tensors) == expected_keys
    assert result.trained == trained
    assert all(torch.equal(result.tensors[k], export_adapter(model)[k]) for k in expected_keys)


def test_ffa_from_peft_init_leaves_a_unchanged(tiny_model, sentiment) -> None:
    model, tokenizer = tiny_model()
    before = export_adapter(model)
    train_locally(model, tokenizer, sentiment, frozenset({Factor.B}), FAST)
    after = export_adapter(model)
    a_keys = [k for k in before if k.endswith(".lora_A.weight")]
    b_keys = [k for k in before if k.endswith(".lora_B.weight")]
    assert all(torch.equal(before[k], after[k]) for k in a_keys)
    assert any(not torch.equal(before[k], after[k]) for k in b_keys)


def test_loss_decreases_on_a_learnable_task(tiny_model, sentiment) -> None:
    model, tokenizer = tiny_model()
    start = evaluate(model, tokenizer, sentiment)
    config = TrainConfig(steps=30, batch_size=8, lr=0.05, progress=False)
    first = train_locally(model, tokenizer, sentiment, frozenset({Factor.A, Factor.B}), config)
    end = evaluate(model, tokenizer, sentiment)
    second = train_locally(model, tokenizer, sentiment, frozenset({Factor.A, Factor.B}), config)
    assert end.loss < 0.75 * start.loss
    assert second.mean_loss < first.mean_loss
    assert end.accuracy == 1.0
    assert first.steps == 30 and first.num_samples == 240


def test_training_is_reproducible_and_restores_the_rng(tiny_model, sentiment) -> None:
    config = TrainConfig(steps=3, batch_size=4, lr=0.05, optimizer="adamw", progress=False)
    results = []
    for _ in range(2):
        model, tokenizer = tiny_model()
        torch.manual_seed(99)
        results.append(train_locally(model, tokenizer, sentiment, frozenset(Factor), config))
        drawn_after_training = torch.rand(3)
        torch.manual_seed(99)
        assert torch.equal(drawn_after_training, torch.rand(3))  # global RNG left as it was
    first, second = results
    assert first.mean_loss == second.mean_loss
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)


def test_epochs_count_every_example(tiny_model, sentiment) -> None:
    model, tokenizer = tiny_model()
    config = TrainConfig(steps=None, epochs=2, batch_size=5, progress=False)
    result = train_locally(model, tokenizer, sentiment, frozenset(Factor), config)
    assert result.num_samples == 2 * len(sentiment)
    assert result.steps == 2 * math.ceil(len(sentiment) / 5)


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="exactly one of steps"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError):
        TrainConfig(optimizer="lion")


def test_evaluation_accuracy_matches_argmax(tiny_model, sentiment) -> None:
    model, tokenizer = tiny_model()
    nonzero_b(model)
    result = evaluate(model, tokenizer, sentiment, batch_size=5)
    batch = tokenizer(list(sentiment.texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    labels = torch.tensor(sentiment.labels)
    assert result.accuracy == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity is None and result.num_samples == len(sentiment)


@pytest.fixture
def tiny_llama_folder(tmp_path: Path) -> Path:
    """A 1-layer random Llama and the character tokenizer, saved as a local checkpoint."""
    config = LlamaConfig(vocab_size=141, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    build_tokenizer().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_causal_lm_training_lowers_perplexity(tiny_llama_folder: Path) -> None:
    base = load_base_model(ModelSpec(str(tiny_llama_folder), task=TaskKind.CAUSAL_LM))
    assert base.head_modules == ()
    lora = LoraSpec(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "v_proj"))
    model = attach_lora(base, lora, seed=0)
    data = TextDataset(("cat: a small feline", "dog: a loyal canine") * 4)
    start = evaluate(model, base.tokenizer, data)
    config = TrainConfig(steps=15, batch_size=4, lr=0.05, optimizer="adamw", progress=False)
    result = train_locally(model, base.tokenizer, data, frozenset(Factor), config)
    end = evaluate(model, base.tokenizer, data)
    assert end.perplexity == pytest.approx(math.exp(end.loss))
    assert end.accuracy is None
    assert end.perplexity < start.perplexity
    assert all(".lora_" in k for k in result.tensors)  # no head for a causal LM
