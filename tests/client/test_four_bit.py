"""4-bit base weights (QLoRA): a one-line refusal without CUDA; on CUDA (with bitsandbytes) a
4-bit base model trains LoRA and exports an adapter of the run's schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedrot_client.errors import ModelError
from fedrot_client.lora import LoraSpec, attach_lora, export_adapter
from fedrot_client.models import (
    ModelSpec,
    TaskKind,
    base_model_folder,
    four_bit_options,
    load_base_model,
)

CUDA = torch.cuda.is_available()
TINY_LLAMA = ModelSpec("tiny-llama", TaskKind.CAUSAL_LM)
LORA = LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def test_four_bit_without_cuda_is_one_line() -> None:
    with pytest.raises(ModelError, match="need CUDA and this client has none") as raised:
        four_bit_options(cuda_available=False)
    assert "\n" not in str(raised.value)


@pytest.mark.skipif(CUDA, reason="the refusal is for clients without CUDA")
def test_load_in_4bit_is_refused_on_this_machine() -> None:
    with pytest.raises(ModelError, match="need CUDA"):
        load_base_model(TINY_LLAMA, load_in_4bit=True)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA or importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs CUDA and bitsandbytes (pip install 'fedrot[qlora]')")
def test_a_four_bit_base_trains_lora_with_the_runs_adapter_shapes(tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.setenv("FEDROT_MODEL_CACHE", str(tmp_path))
    plain = load_base_model(TINY_LLAMA)
    folder = base_model_folder(TINY_LLAMA, plain.fingerprint, load=lambda: plain)
    reference = export_adapter(attach_lora(load_base_model(TINY_LLAMA), LORA, 0))
    spec = ModelSpec(str(folder), TaskKind.CAUSAL_LM)
    base = load_base_model(spec, load_in_4bit=True)
    assert base.fingerprint == ""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(base.model, use_gradient_checkpointing=False)
    model = attach_lora(base, LORA, 0)
    ids = base.tokenizer(["1+1=2"], return_tensors="pt")["input_ids"].to("cuda")
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    exported = export_adapter(model)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference.items()}
