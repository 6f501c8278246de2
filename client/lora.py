"""LoRA on a base model with PEFT: attach, choose trainable factors, export and load adapters.

Adapter tensors travel as a flat ``{key: tensor}`` dict in PEFT's state-dict naming (what
``peft.get_peft_model_state_dict`` returns and ``adapter_model.safetensors`` holds):
``<module>.lora_A.weight`` ``(r, d_in)``, ``<module>.lora_B.weight`` ``(d_out, r)`` and the task
head's keys (for BERT ``base_model.model.classifier.weight`` ``(num_labels, hidden)`` and
``.bias`` ``(num_labels,)``), all float32 on the CPU. :class:`fedrot.adapters.Adapter` reads
the same dict.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft import set_peft_model_state_dict
from torch import Tensor

from fedrot.codec import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, encode_adapter
from fedrot.adapters import BOTH_FACTORS, LORA_A_SUFFIX, LORA_B_SUFFIX, Factor
from fedrot.errors import SchemaError
from fedrot_client.models import BaseModel, ModelSpec, TaskKind, load_base_model

logger = logging.getLogger(__name__)

PEFT_TASK_TYPES: Mapping[TaskKind, str] = {
    TaskKind.CLASSIFICATION: "SEQ_CLS",
    TaskKind.CAUSAL_LM: "CAUSAL_LM",
}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters of a run (the paper's NLU setting is the default).

    ``modules_to_save=None`` means the base model's task head for classification and nothing
    for causal LM.
    """

    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")

    @property
    def rank(self) -> int:
        """The LoRA rank (``r``)."""
        return self.r


ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head


def peft_target_modules(names: tuple[str, ...]) -> str | list[str]:
    """PEFT's ``target_modules``: the shorthand ``"all-linear"`` must be a string, not a list."""
    return ALL_LINEAR if list(names) == [ALL_LINEAR] else sorted(names)


def peft_adapter_config(
    lora_spec: LoraSpec,
    base_model_name: str,
    task_type: str,
    modules_to_save: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """The ``adapter_config.json`` content PEFT reads back (plain JSON types, no peft import).

    ``task_type`` is PEFT's name (``"SEQ_CLS"``, ``"CAUSAL_LM"``); ``modules_to_save``
    overrides ``lora_spec.modules_to_save``. Keys PEFT does not find take its defaults.
    """
    saved = modules_to_save if modules_to_save is not None else lora_spec.modules_to_save
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name,
        "r": lora_spec.r,
        "lora_alpha": lora_spec.alpha,
        "lora_dropout": lora_spec.dropout,
        "target_modules": peft_target_modules(lora_spec.target_modules),
        "modules_to_save": list(saved) if saved else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def lora_config(base: BaseModel, lora_spec: LoraSpec) -> LoraConfig:
    """The PEFT ``LoraConfig`` for ``base``: its head is saved whole for classification."""
    saved = lora_spec.modules_to_save
    if saved is None:
        saved = base.head_modules
    fields = peft_adapter_config(
        lora_spec, base.spec.name, PEFT_TASK_TYPES[base.spec.task], modules_to_save=saved
    )
    fields.pop("peft_type")
    fields.pop("base_model_name_or_path")  # PEFT takes it from the model
    fields["inference_mode"] = False
    return LoraConfig(**fields)


def attach_lora(base: BaseModel, lora_spec: LoraSpec, seed: int) -> PeftModel:
    """Wrap ``base.model`` in place (it is consumed); LoRA A init is seeded, B starts at zero."""
    config = lora_config(base, lora_spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base.model, config)
    model.eval()
    return model


def set_trainable_factors(model: PeftModel, trained: frozenset[Factor]) -> list[str]:
    """Make only the ``trained`` LoRA factors and the saved head trainable; returns their names.

    Every other parameter (the base weights, the frozen factor) gets ``requires_grad=False``.
    """
    names = []
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            wanted = Factor.A in trained
        elif ".lora_B." in name:
            wanted = Factor.B in trained
        else:
            wanted = ".modules_to_save." in name
        parameter.requires_grad_(wanted)
        if wanted:
            names.append(name)
    return names


def export_adapter(
    model: PeftModel, factors: frozenset[Factor] = BOTH_FACTORS, *, with_extra: bool = True
) -> dict[str, Tensor]:
    """Detached float32 CPU copies of the adapter tensors, in PEFT keys.

    ``factors`` picks which LoRA factors come out; ``with_extra`` adds the head keys.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        if key.endswith(LORA_A_SUFFIX):
            keep = Factor.A in factors
        elif key.endswith(LORA_B_SUFFIX):
            keep = Factor.B in factors
        else:
            keep = with_extra
        if keep:
            out[key] = tensor.detach().to(device="cpu", dtype=torch.float32).clone()
    return out


def load_adapter(model: PeftModel, tensors: Mapping[str, Tensor], *, strict: bool = True) -> None:
    """Copy adapter tensors (PEFT keys, as :func:`export_adapter` gives) into ``model``.

    With ``strict`` every adapter key must be given; otherwise the keys left out keep their
    values (a partial load, e.g. only the trained factors). Raises :class:`SchemaError` naming the
    key for an unknown key, a missing one, or a shape that differs.
    """
    current = get_peft_model_state_dict(model)
    expected = {key: tuple(t.shape) for key, t in current.items()}
    for key, tensor in tensors.items():
        if key not in expected:
            raise SchemaError(f"unexpected adapter key {key}", key=key)
        if tuple(tensor.shape) != expected[key]:
            raise SchemaError(
                f"adapter key {key}: shape {tuple(tensor.shape)}, expected {expected[key]}",
                key=key,
            )
    missing = sorted(set(expected) - set(tensors))
    if strict and missing:
        raise SchemaError(f"missing adapter key {missing[0]} ({len(missing)} missing)",
                          key=missing[0])  # fmt: skip
    # PEFT wants every key: the ones not given keep their current values.
    result = set_peft_model_state_dict(model, {**current, **tensors})
    if result.unexpected_keys:
        raise SchemaError(f"PEFT did not use key {result.unexpected_keys[0]}",
                          key=result.unexpected_keys[0])  # fmt: skip


def initial_adapter(model_spec: ModelSpec, lora_spec: LoraSpec, seed: int) -> dict[str, Tensor]:
    """The round-0 global adapter: PEFT's init (A Kaiming-uniform from ``seed``, B zeros) and
    the base model's head (seeded by ``model_spec.seed``). Equal arguments give equal tensors.
    """
    model = attach_lora(load_base_model(model_spec), lora_spec, seed)
    return export_adapter(model)


def save_peft_directory(
    directory: str | Path, tensors: Mapping[str, Tensor], config: Mapping[str, object]
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``PeftModel``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    data = encode_adapter({key: t.detach() for key, t in tensors.items()}, {"format": "pt"})
    (folder / ADAPTER_WEIGHTS_FILE).write_bytes(data)
    logger.info("saved PEFT adapter (%s tensors) to %s", len(tensors), folder)
    return folder


def task_of(model: PeftModel) -> TaskKind:
    """The task a LoRA model was attached for (from its PEFT config's ``task_type``)."""
    task_type = model.peft_config[model.active_adapter].task_type
    name = getattr(task_type, "value", task_type)
    for task, peft_name in PEFT_TASK_TYPES.items():
        if name == peft_name:
            return task
    raise ValueError(f"unsupported PEFT task type {name!r}")
