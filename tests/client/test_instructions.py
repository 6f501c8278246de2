"""Instruction data: the shapes, their TRL rows, the errors, the chat template, and the loss
mask TRL's SFTTrainer builds from them (prompt tokens carry the ignore label)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedrot_client.errors import DataError
from fedrot_client.instructions import (
    ALPACA_PROMPT,
    Shape,
    evaluation_examples,
    is_instruction_data,
    load_instructions,
    use_chat_template,
)
from fedrot_client.tinybert import build_tokenizer as bert_tokenizer
from fedrot_client.tinyllama import build_tokenizer as llama_tokenizer

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}  # fmt: skip


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_each_shape_becomes_trl_rows(tmp_path: Path) -> None:
    pc = load_instructions(write(tmp_path / "pc.jsonl", [{"prompt": "1+1=", "completion": "2"}]))
    assert pc.shape is Shape.PROMPT_COMPLETION and pc.rows == ({"prompt": "1+1=",
                                                                "completion": "2"},)
    chat = load_instructions(write(tmp_path / "chat.jsonl", [CHAT]))
    assert chat.shape is Shape.CHAT
    assert chat.rows[0]["prompt"] == CHAT["messages"][:2]
    assert chat.rows[0]["completion"] == CHAT["messages"][2:]
    alpaca = load_instructions(write(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "hi"}]))  # fmt: skip
    assert alpaca.shape is Shape.ALPACA
    assert "### Input:\n2 and 3" in alpaca.rows[0]["prompt"]
    assert alpaca.rows[1] == {"prompt": ALPACA_PROMPT.format(instruction="Say hi."),
                              "completion": "hi"}  # fmt: skip
    text = load_instructions(write(tmp_path / "text.jsonl", [{"text": "plain"}]))
    assert text.shape is Shape.TEXT and not is_instruction_data(tmp_path / "text.jsonl")
    assert is_instruction_data(tmp_path / "chat.jsonl")


def test_csv_rows_are_read_too(tmp_path: Path) -> None:
    path = tmp_path / "pc.csv"
    path.write_text("prompt,completion\nQ: one?,1\nQ: two?,2\n")
    assert [row["completion"] for row in load_instructions(path).rows] == ["1", "2"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "x"}, "fit no instruction shape"),
        ({"prompt": "x"}, "missing field 'completion'"),
        ({"prompt": "x", "completion": ""}, "'completion' is empty"),
        ({"prompt": "x", "completion": 3}, "must be text"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "at least two messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         "must be the assistant's"),
        ({"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "role 'robot'"),
    ],
)
def test_a_bad_row_is_named(tmp_path: Path, row: dict, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "fine"}, row]
                 if "prompt" in row else [row])  # fmt: skip
    with pytest.raises(DataError, match=message) as raised:
        load_instructions(path)
    assert "bad.jsonl:" in str(raised.value)


def test_chat_data_needs_a_chat_template() -> None:
    tokenizer = bert_tokenizer()
    with pytest.raises(DataError, match="needs a chat template.*--chat-template"):
        use_chat_template(tokenizer, None, "chat.jsonl")
    use_chat_template(tokenizer, "{% for m in messages %}{{ m['content'] }}{% endfor %}", "x")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_held_out_chats_render_with_the_generation_prompt(tmp_path: Path) -> None:
    data = load_instructions(write(tmp_path / "chat.jsonl", [CHAT]))
    (example,) = evaluation_examples(data, llama_tokenizer())
    assert example.prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n2+2?<|im_end|>" in example.prompt and example.reference == "4"


def first_batch(rows: list[dict], tmp_path: Path):
    """The first training batch TRL's SFTTrainer builds for ``rows`` on the tiny Llama."""
    from trl import SFTConfig, SFTTrainer

    from fedrot_client.lora import LoraSpec, attach_lora
    from fedrot_client.models import ModelSpec, TaskKind, load_base_model

    base = load_base_model(ModelSpec("tiny-llama", TaskKind.CAUSAL_LM))
    model = attach_lora(base, LoraSpec(r=2, alpha=4.0, dropout=0.0,
                                       target_modules=("q_proj", "v_proj")), 0)  # fmt: skip
    data = load_instructions(write(tmp_path / "rows.jsonl", rows))
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(rows),
                     max_length=128, report_to="none", bf16=False)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.to_dataset(),
                         processing_class=base.tokenizer)  # fmt: skip
    return next(iter(trainer.get_train_dataloader())), base.tokenizer


def test_prompt_tokens_carry_the_ignore_label_and_eos_is_learned(tmp_path: Path) -> None:
    batch, tokenizer = first_batch([{"prompt": "What is 2+3? ", "completion": "5"}], tmp_path)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    prompt = len(tokenizer("What is 2+3? ", add_special_tokens=False)["input_ids"])
    kept = labels != -100
    assert not kept[:prompt].any()  # the prompt is never a target
    targets = tokenizer.decode(ids[kept])
    assert targets == "5" + tokenizer.eos_token  # the answer, then EOS
    assert torch.equal(ids[kept], labels[kept])


def test_a_chat_is_learned_on_the_assistant_answer_only(tmp_path: Path) -> None:
    batch, tokenizer = first_batch([CHAT], tmp_path)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    learned = tokenizer.decode(ids[labels != -100])
    assert learned.startswith("4") and "2+2?" not in learned and "Be brief" not in learned
