"""Federated instruction tuning through a real server: three fedrot-client daemons train a tiny
causal LM on chat data with TRL (LoRA on all-linear, cosine learning rate across rounds), the
server scores every round's adapter by greedy generation (exact match) and completion
perplexity, and its published adapters load offline with AutoPeftModelForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import AutoPeftModelForCausalLM

from fedrot_server.run_settings import (
    EvaluationSettings,
    LoraSettings,
    ModelSettings,
    StrategySettings,
    TrainingSettings,
)
from harness import CLIENT_NAMES, Clients, ServerThread, tiny_settings

pytestmark = pytest.mark.slow

COLOURS = ("red", "blue", "green", "pink", "gold", "grey")


def chats(path: Path, offset: int, count: int) -> Path:
    """Chats that ask for a colour by its number; the answer is the colour."""
    rows = []
    for k in range(count):
        index = (offset + k) % len(COLOURS)
        rows.append({"messages": [{"role": "user", "content": f"colour {index}?"},
                                  {"role": "assistant", "content": COLOURS[index]}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_instruction_tuning_with_generation_based_evaluation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shards = [chats(data / f"client-{i}.jsonl", 2 * i, 12) for i in range(3)]
    evaluation = chats(data / "eval.jsonl", 0, 6)
    settings = tiny_settings(
        tmp_path / "server",
        model=ModelSettings(name="tiny-llama", task="causal-lm"),
        lora=LoraSettings(rank=2, alpha=4.0, dropout=0.0, target_modules=["all-linear"]),
        strategy=StrategySettings(name="fedrot", alignment_strength=0.4),
        training=TrainingSettings(local_steps=3, batch_size=4, learning_rate=0.02,
                                  min_learning_rate=0.005, round_lr_schedule="cosine",
                                  optimizer="adamw", max_length=128, max_grad_norm=1.0),
        evaluation=EvaluationSettings(data=evaluation, max_new_tokens=4, extractor="exact"),
        rounds=2,
    )  # fmt: skip
    server = ServerThread(settings)
    clients = Clients(tmp_path / "clients")
    try:
        for name, shard in zip(CLIENT_NAMES, shards, strict=True):
            clients.start(name, server.address, shard)
        codes = {client.name: client.wait() for client in clients.started}
        logs = {client.name: client.log() for client in clients.started}
        assert codes == dict.fromkeys(CLIENT_NAMES, 0), logs
        server.wait_finished()
        for round_index in (0, 1):
            summary = server.report(round_index)["summary"]
            assert sorted(summary["reporters"]) == sorted(CLIENT_NAMES)
            evaluation_metrics = summary["evaluation"]
            assert 0.0 <= evaluation_metrics["exact_match"] <= 1.0
            assert evaluation_metrics["perplexity"] > 1.0 and evaluation_metrics["num_samples"] == 6
        for log in logs.values():
            assert "round 1: update accepted" in log
        adapter = server.run_dir / "rounds" / "1" / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["target_modules"] == "all-linear"
        model = AutoPeftModelForCausalLM.from_pretrained(adapter)  # offline, from the folder
        assert sum(name.endswith("lora_A") for name, _ in model.named_modules()) == 14
    finally:
        clients.stop()
        server.stop()
