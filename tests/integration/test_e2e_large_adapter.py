"""An adapter larger than gRPC's 4 MiB message limit crosses the wire both ways, intact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fedrot_server.run_settings import ModelSettings
from harness import client_shards, tiny_settings

MIB = 1024 * 1024
# A 40000-class head on the width-32 tiny BERT: (40000, 32) float32 weights, 5.1 MB.
NUM_LABELS = 40_000


def test_an_adapter_over_4_mib_is_downloaded_and_uploaded_in_chunks(
    start_server, clients, tmp_path: Path
) -> None:
    shard = client_shards(tmp_path / "data", sizes=(8,))[0]
    model = ModelSettings(name="tiny-bert", num_labels=NUM_LABELS, seed=0)
    settings = tiny_settings(tmp_path / "server", rounds=1, min_clients=1, model=model)
    server = start_server(settings, evaluate=False)
    client = clients.start("alice", server.address, shard)
    assert client.wait() == 0, client.log()
    server.wait_finished()

    summary = server.report(0)["summary"]
    assert summary["bytes_out"] > 4 * MIB  # the round-0 adapter went down in chunks
    assert summary["bytes_in"] > 4 * MIB  # and the update came back up in chunks
    rounds = server.run_dir / "rounds" / "0"
    upload = load_file(str(rounds / "uploads" / "alice.safetensors"))
    final = load_file(str(rounds / "adapter" / "adapter_model.safetensors"))
    # One client in an unaligned round: the global adapter is its update (to rounding).
    assert upload.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(final[key], upload[key], rtol=1e-6, atol=1e-7, msg=key)
    head = next(key for key in final if key.endswith("classifier.weight"))
    assert final[head].shape == (NUM_LABELS, 32)
