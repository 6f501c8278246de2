"""Instruction data: prompt/completion, chat and Alpaca rows, in the shapes TRL trains on.

Users bring JSONL, CSV/TSV or a saved Hugging Face dataset (read by
:func:`fedrot_client.data.read_rows`) in one of these shapes, decided by the first row:

- ``{"prompt": ..., "completion": ...}``: strings; the loss falls on the completion only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the tokenizer's
  chat template; the last message must be the assistant's, and the loss falls on it only
  (TRL's conversational prompt/completion shape: earlier turns are the prompt).
- ``{"instruction": ..., "input": ..., "output": ...}``: Alpaca (``input`` may be empty or
  missing), rendered with Alpaca's prompt; the loss falls on ``output``.
- ``{"text": ...}``: plain text, the loss on every token (continued pre-training).

TRL's ``SFTTrainer`` appends the EOS token to each completion and truncates a sequence longer
than ``max_length`` tokens at its end (the prompt is kept; a completion cut short loses its
tail, and one with no token left is skipped by the loss). Held-out rows become
:class:`~fedrot_client.generation.InstructionExample` (a rendered prompt and its reference
answer) for generation-based evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fedrot_client.data import read_rows
from fedrot_client.errors import DataError
from fedrot_client.generation import InstructionExample

logger = logging.getLogger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ROLES = frozenset({"system", "user", "assistant"})


class Shape(StrEnum):
    """The shape of an instruction dataset's rows."""

    PROMPT_COMPLETION = "prompt-completion"
    CHAT = "chat"
    ALPACA = "alpaca"
    TEXT = "text"


SHAPE_FIELDS: Mapping[Shape, tuple[str, ...]] = {
    Shape.PROMPT_COMPLETION: ("prompt", "completion"),
    Shape.CHAT: ("messages",),
    Shape.ALPACA: ("instruction", "output"),
    Shape.TEXT: ("text",),
}


@dataclass(frozen=True)
class InstructionData:
    """Rows in TRL's shapes: ``{"prompt", "completion"}`` (strings, or message lists for chat)
    or ``{"text"}``; ``source`` names the file."""

    rows: tuple[dict[str, object], ...]
    shape: Shape
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Iterable[int]) -> InstructionData:
        """The rows at ``indices``, in that order."""
        return InstructionData(tuple(self.rows[int(i)] for i in indices), self.shape, self.source)

    def to_dataset(self):  # noqa: ANN201 - a datasets.Dataset (imported lazily)
        """A ``datasets.Dataset`` for ``SFTTrainer``."""
        from datasets import Dataset

        return Dataset.from_list(list(self.rows))

    @property
    def is_chat(self) -> bool:
        return self.shape is Shape.CHAT


def shape_of(where: str, row: Mapping[str, object]) -> Shape:
    """The shape whose fields ``row`` holds; :class:`DataError` naming them otherwise."""
    for shape, fields in SHAPE_FIELDS.items():
        if all(field in row for field in fields):
            return shape
    expected = "; ".join(" + ".join(fields) for fields in SHAPE_FIELDS.values())
    raise DataError(f"{where}: fields {sorted(row)} fit no instruction shape (expected {expected})")


def is_instruction_data(path: str | Path, split: str | None = None) -> bool:
    """Whether the first row is prompt/completion, chat or Alpaca (not plain text)."""
    for where, row in read_rows(Path(path), split):
        try:
            return shape_of(where, row) is not Shape.TEXT
        except DataError:
            return False
    return False


def load_instructions(path: str | Path, *, split: str | None = None) -> InstructionData:
    """Read and convert every row; the first row decides the shape, and a row of another
    shape, an empty prompt or answer, or a bad chat raises :class:`DataError` naming it."""
    path = Path(path)
    data = instruction_data(read_rows(path, split), str(path))
    logger.info("loaded %s %s examples from %s", len(data), data.shape, path)
    return data


def instruction_data(rows: Iterable[tuple[str, Mapping[str, object]]], source: str) -> InstructionData:
    """``(where, row)`` pairs (as :func:`~fedrot_client.data.read_rows` yields them) converted
    to TRL's shapes; the first row decides the shape (:func:`load_instructions`' rules)."""
    converted: list[dict[str, object]] = []
    shape: Shape | None = None
    for where, row in rows:
        shape = shape or shape_of(where, row)
        converted.append(trl_row(where, row, shape))
    if shape is None:
        raise DataError(f"{source}: no examples")
    return InstructionData(tuple(converted), shape, source)


def trl_row(where: str, row: Mapping[str, object], shape: Shape) -> dict[str, object]:
    """One row in TRL's shape (see the module docstring)."""
    if shape is Shape.TEXT:
        return {"text": _text(where, row, "text")}
    if shape is Shape.PROMPT_COMPLETION:
        return {"prompt": _text(where, row, "prompt", allow_empty=True),
                "completion": _text(where, row, "completion")}  # fmt: skip
    if shape is Shape.ALPACA:
        instruction = _text(where, row, "instruction")
        context = row.get("input") or ""
        if not isinstance(context, str):
            raise DataError(f"{where}: field 'input' must be text, got {type(context).__name__}")
        template = ALPACA_PROMPT_WITH_INPUT if context.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=context)
        return {"prompt": prompt, "completion": _text(where, row, "output")}
    messages = _messages(where, row.get("messages"))
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _text(where: str, row: Mapping[str, object], field: str, allow_empty: bool = False) -> str:
    value = row.get(field)
    if field not in row or value is None:
        raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _messages(where: str, value: object) -> list[dict[str, str]]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least two messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {index} needs a text 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {index} has role {role!r}, not one of "
                            f"{sorted(ROLES)}")  # fmt: skip
        messages.append({"role": str(role), "content": str(message["content"])})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer, not "
                        f"{messages[-1]['role']!r}")  # fmt: skip
    return messages


def read_chat_template(path: Path | None) -> str | None:
    """The Jinja text of a ``--chat-template FILE`` (None without one); a one-line
    :class:`DataError` when the file cannot be read."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"--chat-template {path}: cannot read ({exc.strerror or exc})") from None


def use_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None,
                      source: str) -> None:  # fmt: skip
    """Set ``template`` on ``tokenizer`` when given; :class:`DataError` when chat data meets a
    tokenizer with no chat template and none is given."""
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.chat_template is None:
        raise DataError(f"{source}: chat data needs a chat template and the tokenizer has none: "
                        "give one (a Jinja file) with --chat-template")  # fmt: skip


def evaluation_examples(
    data: InstructionData, tokenizer: PreTrainedTokenizerBase
) -> list[InstructionExample]:
    """Held-out rows as rendered prompts and reference answers (chat prompts through the chat
    template with the generation prompt); plain-text rows have no answer to check."""
    if data.shape is Shape.TEXT:
        raise DataError(f"{data.source}: plain-text rows have no answers to evaluate; use "
                        "prompt/completion, chat or Alpaca rows")  # fmt: skip
    examples = []
    for row in data.rows:
        prompt, completion = row["prompt"], row["completion"]
        if data.is_chat:
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                   add_generation_prompt=True)  # fmt: skip
            completion = completion[0]["content"]  # type: ignore[index]
        examples.append(InstructionExample(str(prompt), str(completion)))
    return examples
