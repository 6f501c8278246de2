"""The model side of a :class:`~fedrot_client.federation.Federation`: the run's base model with
its LoRA attached, the base model's tokenizer, and the run's final global adapter saved as a
PEFT folder. Kept out of :mod:`fedrot_client.federation` as a mixin that ``Federation``
inherits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from peft import PeftModel, prepare_model_for_kbit_training
from transformers import PreTrainedTokenizerBase

from fedrot.adapters import BOTH_FACTORS
from fedrot.codec import decode_adapter, validate_tensors
from fedrot.errors import SchemaError
from fedrot_client.errors import Interrupted, ModelError, UsageError
from fedrot_client.lora import (
    PEFT_TASK_TYPES,
    attach_lora,
    export_adapter,
    peft_adapter_config,
    save_peft_directory,
)
from fedrot_client.messages import model_spec_of
from fedrot_client.models import (
    BaseModel,
    base_model_folder,
    check_fingerprint,
    load_base_model,
    resolve_device,
)
from fedrot_client.run_info import RunInfo
from fedrot_client.settings import ConnectionSettings
from fedrot_client.signals import raise_stopped
from fedrot_client.transport import Transport
from fedrot_proto.v1 import federation_pb2 as pb

logger = logging.getLogger(__name__)


class FederationModel:
    """A federation's model and final adapter (a mixin: it uses the federation's state below;
    every method needs the ``with`` block)."""

    _settings: ConnectionSettings
    _transport: Transport
    _stop: threading.Event
    _enrolment: pb.EnrollResponse | None
    _done: pb.DoneTask | None
    _base: BaseModel | None
    _tokenizer: PreTrainedTokenizerBase | None
    run: RunInfo
    require_open: Callable[[], None]

    # -- the model ---------------------------------------------------------------------------
    def build_model(self) -> PeftModel:
        """The run's base model (or the local ``model`` setting's copy of it, checked against
        the run's fingerprint) with the run's LoRA attached, on the configured device. LoRA's
        A starts from the run's seed, as on every client; load each round's adapter with
        ``task.load_into``. Raises :class:`~fedrot_client.errors.ModelError` on a mismatch."""
        self.require_open()
        base, self._base = self._base or self._load_base(), None
        if self._settings.load_in_4bit:
            prepare_model_for_kbit_training(base.model, use_gradient_checkpointing=False)
        model = attach_lora(base, self.run.lora, seed=self._enrolment.run.strategy.seed)
        try:
            validate_tensors(export_adapter(model), self.run.schema)
        except SchemaError as exc:
            raise ModelError(f"base model {base.spec.name!r} does not fit the run's adapter: "
                             f"{exc}") from exc  # fmt: skip
        if self._settings.load_in_4bit:
            return model  # bitsandbytes placed it on the GPU; a 4-bit model cannot move
        return model.to(resolve_device(self._settings.device))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (padding set; loads the base model if not built yet)."""
        self.require_open()
        if self._tokenizer is None:
            self._base = self._load_base()
        return self._tokenizer

    def _load_base(self) -> BaseModel:
        spec = model_spec_of(self._enrolment.run.model, self._settings.model)
        base = load_base_model(spec, load_in_4bit=self._settings.load_in_4bit)
        if self._settings.load_in_4bit:
            logger.warning("4-bit base weights cannot be compared with the run's fingerprint; "
                           "not checking %s", spec.name)  # fmt: skip
        elif self.run.fingerprint:
            check_fingerprint(base, self.run.fingerprint)
        else:
            logger.warning("the run names no base-model fingerprint; not checking %s", spec.name)
        self._tokenizer = base.tokenizer
        return base

    # -- the final adapter -------------------------------------------------------------------
    def save_final(self, directory: str | Path) -> Path:
        """Save the run's final global adapter as a PEFT folder (``adapter_config.json`` and
        ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` and
        ``AutoPeftModel...from_pretrained`` load: its ``base_model_name_or_path`` is a local
        folder of the base model (a registry model is saved once under the model cache, see
        :func:`fedrot_client.models.base_model_folder`). Call it once
        :meth:`~fedrot_client.federation.Federation.tasks` has ended. Returns the folder."""
        self.require_open()
        if self._done is None:
            raise UsageError("the run has not finished: call save_final after fed.tasks() ends")
        run = self.run
        try:
            data = self._transport.download_adapter(run.run_id, self._done.rounds_completed,
                                                    self._done.final_adapter)  # fmt: skip
        except Interrupted as exc:
            raise_stopped(self._stop, exc)
        tensors = decode_adapter(data, run.schema, BOTH_FACTORS).tensors
        spec = model_spec_of(self._enrolment.run.model, self._settings.model)
        folder = base_model_folder(spec, run.fingerprint)
        config = peft_adapter_config(run.lora, str(folder), PEFT_TASK_TYPES[run.task],
                                     modules_to_save=self._saved_modules())  # fmt: skip
        return save_peft_directory(directory, tensors, config)

    def _saved_modules(self) -> tuple[str, ...]:
        """PEFT ``modules_to_save``: the run's, else the head modules the schema's extra keys
        name (``base_model.model.classifier.weight`` -> ``classifier``)."""
        if self.run.lora.modules_to_save:
            return tuple(self.run.lora.modules_to_save)
        names = (key.removeprefix("base_model.model.").split(".")[0]
                 for key in self.run.schema.extra)  # fmt: skip
        return tuple(sorted(set(names)))
