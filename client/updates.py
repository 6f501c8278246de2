"""What a client sends for a round: the trained factors and the extra tensors, checked first.

:func:`update_tensors` turns what a user hands to ``Task.submit`` (a ``PeftModel`` or a state
dict in PEFT's adapter key naming) into the tensors of the upload, and refuses, before any
byte is sent, an update the server would refuse or that breaks the round's plan:

- a factor the round keeps frozen that differs from the round's global value
  (:class:`~fedrot_client.errors.FrozenFactorError`, naming the key);
- a missing or unknown key, a wrong shape or rank, a dtype other than float32/float16/bfloat16,
  a non-finite value (the codec's validation, :class:`~fedrot.errors.SchemaError` naming the
  key).

The upload holds the round's trained factors and every extra tensor (the head), float32, CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft import PeftModel, get_peft_model_state_dict
from torch import Tensor

from fedrot.adapters import AdapterSchema, Factor
from fedrot.codec import validate_tensors
from fedrot.errors import SchemaError
from fedrot_client.errors import FrozenFactorError, UsageError

Update = PeftModel | Mapping[str, Tensor]
"""What ``Task.submit`` takes: the trained model, or its adapter state dict."""

# A module's key as nn.Module.state_dict() names it, with the adapter's name: ".lora_A.default.weight".
ADAPTER_NAMED_KEY = re.compile(r"\.lora_[AB]\.[^.]+\.weight$|\.modules_to_save\.")
ADAPTER_NAME_HINT = (
    " (keys name the adapter, e.g. '.lora_A.default.weight': pass "
    "peft.get_peft_model_state_dict(model), or the model itself)"
)


def adapter_state_dict(update: Update) -> dict[str, Tensor]:
    """The adapter tensors of ``update`` by PEFT key, detached CPU copies in their dtype."""
    if isinstance(update, PeftModel):  # in the model's own dtype (the frozen check needs it)
        return {key: tensor.detach().to("cpu").clone()
                for key, tensor in get_peft_model_state_dict(update).items()}  # fmt: skip
    if not isinstance(update, Mapping):
        raise UsageError(
            f"submit takes a peft.PeftModel or a state dict of tensors, not "
            f"{type(update).__name__}"
        )
    for key, value in update.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise UsageError(
                f"update key {key!r}: expected str -> torch.Tensor, got "
                f"{type(key).__name__} -> {type(value).__name__}"
            )
    return dict(update)


def frozen_factor_of(key: str, trained: frozenset[Factor]) -> Factor | None:
    """The factor ``key`` holds when the round keeps that factor frozen, else None."""
    for factor in Factor:
        if key.endswith(factor.suffix) and factor not in trained:
            return factor
    return None


def check_frozen_factors(
    given: Mapping[str, Tensor], reference: Mapping[str, Tensor], trained: frozenset[Factor]
) -> None:
    """Every frozen factor in ``given`` must equal its ``reference`` value (compared in the
    dtype given, so a model trained in half precision passes)."""
    for key in sorted(given):
        frozen = frozen_factor_of(key, trained)
        if frozen is None or key not in reference:
            continue
        mine = given[key].detach().to("cpu")
        if mine.shape != reference[key].shape:
            continue  # the schema check names the shape
        expected = reference[key].to(mine.dtype)
        if not torch.equal(mine, expected):
            drift = float((mine.float() - expected.float()).abs().max())
            only = "+".join(sorted(trained))
            raise FrozenFactorError(
                f"{key}: factor {frozen} is frozen this round (only {only} trains) but the "
                f"update changed it (max |change| {drift:.3g}); Task.load_into freezes it, so "
                "train only the parameters with requires_grad",
                key=key,
            )


def update_tensors(
    update: Update,
    reference: Mapping[str, Tensor],
    trained: frozenset[Factor],
    schema: AdapterSchema,
) -> dict[str, Tensor]:
    """The upload of a round that trains ``trained``, from ``update``; ``reference`` is the
    round's global adapter. Raises :class:`FrozenFactorError` or :class:`SchemaError` (naming
    the key) for an update the round cannot take."""
    given = adapter_state_dict(update)
    check_frozen_factors(given, reference, trained)
    upload = {key: t for key, t in given.items() if frozen_factor_of(key, trained) is None}
    try:
        validate_tensors(upload, schema, trained)
    except SchemaError as exc:
        hint = ADAPTER_NAME_HINT if any(ADAPTER_NAMED_KEY.search(k) for k in upload) else ""
        raise SchemaError(f"{exc}{hint}", key=exc.key) from None
    return {key: t.detach().to(device="cpu", dtype=torch.float32).clone()
            for key, t in upload.items()}  # fmt: skip
