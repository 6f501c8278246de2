"""The production model seams, built on ``fedrot_client`` (transformers + peft).

Imported lazily by the entry point only: the rest of the server (and its tests) never loads
transformers. :func:`load_initial_model` is the default :data:`~fedrot_server.runs.spec.Initializer`;
:class:`HeldOutEvaluator` the default :data:`~fedrot_server.runs.spec.Evaluator` when
``evaluation.data`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedrot.adapters import Adapter
from fedrot_server.errors import SettingsError
from fedrot_server.run_settings import EvaluationSettings
from fedrot_server.runs.spec import InitialModel, RunSpec

logger = logging.getLogger(__name__)


def _client_specs(spec: RunSpec) -> tuple[Any, Any]:
    from fedrot_client.lora import LoraSpec
    from fedrot_client.models import ModelSpec

    model = ModelSpec(name=spec.model.name, task=spec.model.task,
                      num_labels=spec.model.num_labels, seed=spec.model.seed,
                      label_names=tuple(spec.model.labels))  # fmt: skip
    lora = LoraSpec(r=spec.lora.rank, alpha=spec.lora.alpha, dropout=spec.lora.dropout,
                    target_modules=tuple(spec.lora.target_modules),
                    modules_to_save=tuple(spec.lora.modules_to_save) or None)  # fmt: skip
    return model, lora


def load_initial_model(spec: RunSpec) -> InitialModel:
    """The base model's PEFT initialisation (A from ``spec.seed``, B zeros, the head) and its
    fingerprint, exactly as a client computes them."""
    from fedrot_client.errors import ModelError
    from fedrot_client.lora import attach_lora, export_adapter
    from fedrot_client.models import base_model_folder, load_base_model

    model_spec, lora_spec = _client_specs(spec)
    try:
        base = load_base_model(model_spec)
    except ModelError as exc:
        raise SettingsError(f"model: {exc}") from None
    folder = base_model_folder(model_spec, base.fingerprint, load=lambda: base)  # before LoRA
    try:
        model = attach_lora(base, lora_spec, spec.seed)
    except ValueError as exc:  # peft: no module matches the targets
        raise SettingsError(f"lora.target_modules = {list(spec.lora.target_modules)}: "
                            f"{str(exc).splitlines()[0]}") from None  # fmt: skip
    return InitialModel(Adapter.from_state_dict(export_adapter(model)), base.fingerprint,
                        str(folder))


class HeldOutEvaluator:
    """Evaluates a global adapter on the held-out data.

    Every row is read and checked on construction, that is at the server's start (a bad file,
    row, field or label is a one-line :class:`SettingsError` naming the file, line and field);
    the rows are kept, and the model is built on first use.

    Classification: accuracy and loss. Causal LM on instruction data (prompt/completion, chat,
    Alpaca): greedy generation of at most ``max_new_tokens`` per prompt, the ``exact_match`` of
    the extracted answer (``extractor``), and completion-only ``perplexity``. Causal LM on plain
    text: perplexity.
    """

    def __init__(self, spec: RunSpec, settings: EvaluationSettings) -> None:
        if settings.data is None:
            raise ValueError("evaluation.data is not set")
        self._spec = spec
        self._settings = settings
        self._generative, self._data = _read_held_out(spec, settings, settings.data)
        self._state: tuple[Any, Callable[[Any], Mapping[str, float]]] | None = None

    def _build(self) -> tuple[Any, Callable[[Any], Mapping[str, float]]]:
        from fedrot_client.lora import attach_lora
        from fedrot_client.models import load_base_model

        model_spec, lora_spec = _client_specs(self._spec)
        base = load_base_model(model_spec)
        model = attach_lora(base, lora_spec, self._spec.seed)
        if self._generative:
            return model, self._generation(base.tokenizer)
        return model, self._likelihood(base.tokenizer)

    def _generation(self, tokenizer: Any) -> Callable[[Any], Mapping[str, float]]:
        from fedrot_client.answers import extractor_named
        from fedrot_client.generation import evaluate_generation
        from fedrot_client.instructions import evaluation_examples

        s = self._settings
        examples = evaluation_examples(self._data, tokenizer)
        extractor = extractor_named(s.extractor)
        max_length = self._spec.training.max_length

        def run(model: Any) -> Mapping[str, float]:
            result = evaluate_generation(model, tokenizer, examples, extractor=extractor,
                                         max_new_tokens=s.max_new_tokens,
                                         batch_size=s.batch_size, max_length=max_length)
            return result.to_dict()

        return run

    def _likelihood(self, tokenizer: Any) -> Callable[[Any], Mapping[str, float]]:
        from fedrot_client.evaluation import evaluate

        s, dataset = self._settings, self._data
        max_length = self._spec.training.max_length

        def run(model: Any) -> Mapping[str, float]:
            result = evaluate(model, tokenizer, dataset, batch_size=s.batch_size,
                              max_length=max_length)
            return {k: float(v) for k, v in result.to_dict().items() if v is not None}

        return run

    def __call__(self, adapter: Adapter) -> Mapping[str, float]:
        from fedrot_client.lora import load_adapter

        if self._state is None:
            self._state = self._build()
        model, run = self._state
        load_adapter(model, adapter.to_state_dict())
        return {key: float(value) for key, value in run(model).items()}


def _read_held_out(spec: RunSpec, settings: EvaluationSettings, path: Path) -> tuple[bool, Any]:
    """``(generative, rows)``: instruction data for a causal LM (an ``InstructionData``), else a
    ``TextDataset`` (with label ids for classification). Every row is checked; the first bad
    one is a :class:`SettingsError` naming the file, the line and the field."""
    from fedrot_client.data import FieldNames, LabelVocabulary, load_dataset
    from fedrot_client.errors import DataError
    from fedrot_client.instructions import is_instruction_data, load_instructions

    s, classification = settings, spec.model.task == "classification"
    try:
        if not classification and is_instruction_data(path, s.split):
            return True, load_instructions(path, split=s.split)
        vocabulary = None
        if classification:  # the run's class names (model.labels), else its ids
            names = tuple(spec.model.labels)
            vocabulary = (LabelVocabulary(names) if names
                          else LabelVocabulary.of_size(spec.model.num_labels))  # fmt: skip
        fields = FieldNames(text=s.text_field, label=s.label_field if classification else None)
        return False, load_dataset(path, vocabulary=vocabulary, fields=fields, split=s.split)
    except DataError as exc:
        raise SettingsError(f"evaluation.data {exc}") from None
    except OSError as exc:
        raise SettingsError(f"evaluation.data {path}: {exc.strerror or exc}") from None
