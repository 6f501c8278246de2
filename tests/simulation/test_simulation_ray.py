"""The Ray backend on a local one-CPU Ray instance gives the in-process backend's results, on
text classification and on instruction data (TRL's SFTTrainer in the Ray worker)."""

from __future__ import annotations

import pytest
import torch

from fedrot_client.simulation import run_simulation
from simulation_fixtures import chat_federation, tiny_config, tiny_instruction_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


CASES = {"classification": (tiny_config, None), "instruction": (tiny_instruction_config,
                                                                 chat_federation)}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_ray_backend_matches_in_process(local_ray, federation, case):
    build, data = CASES[case]
    federation = federation if data is None else data()
    in_process = run_simulation(build(rounds=2), federation)
    on_ray = run_simulation(build(rounds=2, backend="ray"), federation)
    scored = "eval_exact_match" if case == "instruction" else "eval_accuracy"
    assert getattr(in_process.rounds[-1], scored) is not None
    for key, tensor in in_process.final_adapter.items():
        torch.testing.assert_close(on_ray.final_adapter[key], tensor, rtol=1e-5, atol=1e-6)
    for a, b in zip(in_process.rounds, on_ray.rounds, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.eval_accuracy == b.eval_accuracy
        assert a.eval_exact_match == b.eval_exact_match
        assert a.relative_aggregation_error == pytest.approx(b.relative_aggregation_error,
                                                             rel=1e-4)  # fmt: skip
