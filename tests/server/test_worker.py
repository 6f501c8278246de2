"""The AggregationWorker contract, run against every device this machine has (CPU always,
CUDA when present): same numbers as the core, bad uploads change nothing, work off the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from fedrot.adapters import AdapterSchema, Factor
from fedrot.errors import CodecError, SchemaError
from fedrot.strategies import StrategyConfig, build_strategy
from fedrot_server.errors import SettingsError, WrongStateError
from fedrot_server.runs.worker import AggregationWorker, ThreadedWorker, resolve_device
from wire import adapter_of, assert_same, core_aggregate, encode_update, local_update, synthetic_adapter

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
]  # fmt: skip


def make_worker(name: str, device: str, reference) -> AggregationWorker:  # noqa: ANN001
    strategy = build_strategy(name, StrategyConfig(lam=0.4, align_first="A", seed=0))
    return ThreadedWorker(strategy, AdapterSchema.of(reference), device=device)


def tolerance(device: str) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-7} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("strategy", "round_index"), [("fedrot", 1), ("fedrot", 2), ("fedit", 0), ("ffa", 0), ("rolora", 1)])
def test_worker_matches_the_core(device: str, strategy: str, round_index: int) -> None:
    initial = synthetic_adapter(seed=3)
    reference = initial.with_factors_from(local_update(initial, {Factor.B}, seed=9))
    plan = build_strategy(strategy).plan(round_index)
    uploads = [(f"c{i}", encode_update(local_update(reference, plan.trained, seed=i)), 1 + i)
               for i in range(3)]  # fmt: skip

    async def scenario():  # noqa: ANN202
        worker = make_worker(strategy, device, reference)
        try:
            await worker.begin_round(reference, plan)
            for client, payload, weight in uploads:
                report = await worker.add_update(client, payload, weight)
                assert report.client_id == client and report.weight == weight
            return await worker.finish_round({"round": str(round_index + 1)})
        finally:
            await worker.close()

    finished = asyncio.run(scenario())
    expected = core_aggregate(strategy, round_index, reference, uploads)
    got = finished.result.adapter
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in got.to_state_dict().values())
    for key, tensor in expected.to_state_dict().items():
        torch.testing.assert_close(got.to_state_dict()[key], tensor, **tolerance(device), msg=key)
    assert adapter_of(finished.encoded.payload).to_state_dict().keys() == expected.to_state_dict().keys()
    assert finished.result.report.num_clients == 3


@pytest.mark.parametrize("device", DEVICES)
def test_bad_uploads_raise_and_leave_the_round_unchanged(device: str) -> None:
    reference = synthetic_adapter(seed=4)
    plan = build_strategy("fedrot").plan(1)
    good = encode_update(local_update(reference, plan.trained, seed=1))
    nan = local_update(reference, plan.trained, seed=2)
    next(iter(nan.values())).view(-1)[0] = float("nan")
    partial = {k: v for k, v in local_update(reference, plan.trained, seed=3).items() if "lora_A" not in k}

    async def scenario():  # noqa: ANN202
        worker = make_worker("fedrot", device, reference)
        try:
            with pytest.raises(WrongStateError):
                await worker.add_update("early", good, 1.0)
            await worker.begin_round(reference, plan)
            with pytest.raises(SchemaError):
                await worker.add_update("nan", encode_update(nan), 1.0)
            with pytest.raises(SchemaError):
                await worker.add_update("partial", encode_update(partial), 1.0)
            with pytest.raises(CodecError):
                await worker.add_update("junk", b"\x00" * 64, 1.0)
            await worker.add_update("good", good, 2.0)
            return await worker.finish_round({})
        finally:
            await worker.close()

    finished = asyncio.run(scenario())
    expected = core_aggregate("fedrot", 1, reference, [("good", good, 2.0)])
    for key, tensor in expected.to_state_dict().items():
        torch.testing.assert_close(finished.result.adapter.to_state_dict()[key], tensor,
                                   **tolerance(device))  # fmt: skip


def test_configured_value_limit_refuses_larger_values() -> None:
    reference = synthetic_adapter(seed=5)
    plan = build_strategy("fedrot").plan(1)
    update = local_update(reference, plan.trained, seed=1)
    key = next(iter(update))
    update[key].view(-1)[0] = 50.0
    payload = encode_update(update)
    strategy = build_strategy("fedrot", StrategyConfig(lam=0.4, seed=0))

    async def scenario(max_abs: float) -> None:
        worker = ThreadedWorker(strategy, AdapterSchema.of(reference), max_abs=max_abs)
        try:
            await worker.begin_round(reference, plan)
            await worker.add_update("c", payload, 1.0)
        finally:
            await worker.close()

    asyncio.run(scenario(100.0))
    with pytest.raises(SchemaError, match=f"{key}.*limit 10"):
        asyncio.run(scenario(10.0))


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_work_runs_on_the_worker_thread(device: str) -> None:
    async def scenario() -> tuple[str, torch.device]:
        worker = make_worker("fedit", device, synthetic_adapter())
        try:
            return await worker.run(lambda: threading.current_thread().name), worker.device
        finally:
            await worker.close()

    name, worker_device = asyncio.run(scenario())
    assert name.startswith("fedrot-aggregation") and name != threading.main_thread().name
    assert worker_device.type == device


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="cuda"):
            resolve_device("cuda")


def test_a_tracked_round_keeps_its_clients_factors_in_the_scratch_folder(
    tmp_path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """The worker hands its scratch folder (the server's state folder) to the error tracker,
    whose files are unlinked at once: nothing is left behind."""
    import fedrot.factor_spill

    folders = []
    make_file = fedrot.factor_spill.tempfile.TemporaryFile

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        folders.append(kwargs.get("dir"))
        return make_file(*args, **kwargs)

    monkeypatch.setattr(fedrot.factor_spill.tempfile, "TemporaryFile", recorded)
    initial = synthetic_adapter(seed=3)
    plan = build_strategy("fedrot").plan(1)
    strategy = build_strategy("fedrot", StrategyConfig(lam=0.4))

    async def scenario():  # noqa: ANN202
        worker = ThreadedWorker(strategy, AdapterSchema.of(initial), scratch=tmp_path)
        try:
            await worker.begin_round(initial, plan)
            for i in range(2):
                payload = encode_update(local_update(initial, plan.trained, seed=i))
                await worker.add_update(f"c{i}", payload, 1.0)
            return await worker.finish_round({"round": "2"})
        finally:
            await worker.close()

    finished = asyncio.run(scenario())
    assert finished.result.report.aggregation_error is not None
    assert folders and all(folder == tmp_path for folder in folders)
    assert list(tmp_path.iterdir()) == []
