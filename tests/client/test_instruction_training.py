"""The simulator's instruction round (``train_instructions``): TRL's SFTTrainer on the tiny Llama,
only the round's factors move, seeded, the global random state kept, a one-line error when
truncation leaves no answer, a non-finite loss refused."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedrot.adapters import Factor
from fedrot_client.errors import DataError, TrainingDiverged
from fedrot_client.instruction_training import train_instructions
from fedrot_client.instructions import InstructionData, Shape
from fedrot_client.lora import LoraSpec, attach_lora, export_adapter, load_adapter
from fedrot_client.models import ModelSpec, TaskKind, load_base_model
from fedrot_client.training import TrainConfig

ROWS = tuple({"prompt": f"Colour {i}? ", "completion": ("red", "blue", "green")[i % 3]}
             for i in range(12))  # fmt: skip
DATA = InstructionData(ROWS, Shape.PROMPT_COMPLETION, "colours.jsonl")


@pytest.fixture(scope="module")
def tiny():
    base = load_base_model(ModelSpec("tiny-llama", TaskKind.CAUSAL_LM))
    model = attach_lora(base, LoraSpec(r=2, alpha=4.0, dropout=0.0,
                                       target_modules=("q_proj", "v_proj")), 0)  # fmt: skip
    with torch.no_grad():  # B = 0 would leave A's gradient at zero
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.1)
    return model, base.tokenizer, export_adapter(model)


def config(**changes: object) -> TrainConfig:
    values = {"steps": 3, "batch_size": 4, "lr": 0.05, "optimizer": "adamw", "max_length": 64,
              "seed": 7, "num_threads": 1, "progress": False}  # fmt: skip
    return TrainConfig(**{**values, **changes})


def factor_keys(tensors, factor: Factor) -> list[str]:
    return [k for k in tensors if f".lora_{factor}." in k]


def test_only_the_rounds_factor_moves_and_the_upload_holds_it(tiny) -> None:
    model, tokenizer, start = tiny
    load_adapter(model, start)
    result = train_instructions(model, tokenizer, DATA, frozenset({Factor.B}), config())
    after = export_adapter(model)
    assert result.steps == 3 and result.num_samples == 12 and result.mean_loss > 0.0
    assert set(result.tensors) == set(factor_keys(start, Factor.B))
    assert all(torch.equal(after[k], start[k]) for k in factor_keys(start, Factor.A))
    assert any(not torch.equal(after[k], start[k]) for k in factor_keys(start, Factor.B))
    assert all(torch.equal(result.tensors[k], after[k]) for k in result.tensors)


def test_a_round_is_reproducible_from_its_seed(tiny) -> None:
    model, tokenizer, start = tiny
    runs = []
    for seed in (7, 7, 8):
        load_adapter(model, start)
        runs.append(train_instructions(model, tokenizer, DATA, frozenset({Factor.A, Factor.B}),
                                       config(seed=seed)).tensors)  # fmt: skip
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_no_answer_token_within_max_length_is_one_line_data_error(tiny) -> None:
    model, tokenizer, start = tiny
    load_adapter(model, start)
    long = InstructionData(tuple({"prompt": "x" * 80, "completion": "red"} for _ in range(4)),
                           Shape.PROMPT_COMPLETION, "long.jsonl")  # fmt: skip
    with pytest.raises(DataError, match=r"long\.jsonl: no example keeps an answer token within "
                                        r"max_length = 16 tokens"):  # fmt: skip
        train_instructions(model, tokenizer, long, frozenset({Factor.B}), config(max_length=16))


def test_the_global_random_state_is_left_as_it_was(tiny) -> None:
    model, tokenizer, start = tiny

    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    def seeded() -> None:
        random.seed(5)
        np.random.seed(5)
        torch.manual_seed(5)

    seeded()
    expected = draws()
    seeded()
    load_adapter(model, start)
    train_instructions(model, tokenizer, DATA, frozenset({Factor.B}), config())
    assert draws() == expected


def test_a_non_finite_loss_is_training_diverged(tiny) -> None:
    model, tokenizer, start = tiny
    broken = dict(start)
    key = factor_keys(start, Factor.B)[0]
    broken[key] = torch.full_like(start[key], float("nan"))
    load_adapter(model, broken)
    with pytest.raises(TrainingDiverged, match="training loss is nan"):
        train_instructions(model, tokenizer, DATA, frozenset({Factor.A}), config())
