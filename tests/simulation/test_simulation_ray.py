"""The Ray backend on a local one-CPU Ray instance gives the in-process backend's results."""

from __future__ import annotations

import pytest
import torch

from fedrot_client.simulation import run_simulation
from simulation_fixtures import tiny_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_backend_matches_in_process(local_ray, federation):
    in_process = run_simulation(tiny_config(rounds=2), federation)
    on_ray = run_simulation(tiny_config(rounds=2, backend="ray"), federation)
    for key, tensor in in_process.final_adapter.items():
        torch.testing.assert_close(on_ray.final_adapter[key], tensor, rtol=1e-5, atol=1e-6)
    for a, b in zip(in_process.rounds, on_ray.rounds, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.eval_accuracy == b.eval_accuracy
        assert a.relative_aggregation_error == pytest.approx(b.relative_aggregation_error,
                                                             rel=1e-4)  # fmt: skip
