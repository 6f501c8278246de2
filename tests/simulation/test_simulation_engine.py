"""run_simulation on a tiny BERT: end to end, reproducible, FedRot(lambda = 0) = FedIT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrot_client.simulation import SimulationConfig, partition_dataset, run_simulation
from fedrot_client.simulation.command import simulate_to
from fedrot_client.simulation.engine import sample_clients
from fedrot_client.simulation.records import CSV_COLUMNS
from simulation_fixtures import text_pool, tiny_config, tiny_federation


def _comparable(result) -> list[dict]:
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.rounds]


def test_simulate_writes_json_csv_png(tmp_path, federation):
    result = simulate_to(tmp_path, tiny_config(rounds=3), federation)
    assert [r.round_index for r in result.rounds] == [0, 1, 2]
    content = json.loads((tmp_path / "metrics.json").read_text())
    assert content["config"]["strategy"] == "fedrot"
    assert content["summary"]["best_accuracy"] == max(r.eval_accuracy for r in result.rounds)
    assert len(content["rounds"]) == 3
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == list(CSV_COLUMNS) and len(rows) == 4
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    aligned = [r.aligned for r in result.rounds]
    assert aligned == [None, "A", "B"]  # the alternating schedule
    assert result.rounds[0].rotation_distance is None
    assert result.rounds[1].rotation_distance is not None
    assert all(r.relative_aggregation_error is not None for r in result.rounds)
    assert result.rounds[-1].train_loss < result.rounds[0].train_loss * 1.5


def test_same_seed_same_metrics_other_seed_differs(federation):
    first = run_simulation(tiny_config(), federation)
    second = run_simulation(tiny_config(), federation)
    assert _comparable(first) == _comparable(second)
    for key, tensor in first.final_adapter.items():
        assert torch.equal(tensor, second.final_adapter[key]), key
    other = run_simulation(tiny_config(seed=1), federation)
    assert _comparable(other) != _comparable(first)


def test_fedrot_with_lambda_zero_equals_fedit(federation):
    fedrot = run_simulation(tiny_config(strategy="fedrot", lam=0.0, rounds=3), federation)
    fedit = run_simulation(tiny_config(strategy="fedit", rounds=3), federation)
    for key, tensor in fedit.final_adapter.items():
        torch.testing.assert_close(fedrot.final_adapter[key], tensor, rtol=1e-5, atol=1e-6)
    for a, b in zip(fedrot.rounds, fedit.rounds, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert a.eval_loss == pytest.approx(b.eval_loss, rel=1e-5)
    # Hard alignment does change the aggregate.
    hard = run_simulation(tiny_config(strategy="fedrot", lam=1.0, rounds=3), federation)
    differences = [not torch.allclose(hard.final_adapter[k], t, atol=1e-6)
                   for k, t in fedit.final_adapter.items()]  # fmt: skip
    assert any(differences)


@pytest.mark.parametrize("strategy, trained", [("ffa", {"B"}), ("rolora", {"B", "A"}),
                                               ("flexlora", {"AB"})])  # fmt: skip
def test_baselines_run_with_their_plans(federation, strategy, trained):
    result = run_simulation(tiny_config(strategy=strategy), federation)
    assert {r.trained for r in result.rounds} == trained
    assert all(r.aligned is None for r in result.rounds)


def test_ffa_keeps_a_at_its_initialisation(federation):
    initial = run_simulation(tiny_config(strategy="ffa", rounds=1), federation).final_adapter
    later = run_simulation(tiny_config(strategy="ffa", rounds=2), federation).final_adapter
    a_keys = [k for k in initial if k.endswith("lora_A.weight")]
    assert a_keys
    for key in a_keys:
        assert torch.equal(initial[key], later[key]), key


def test_client_fraction_samples_seeded_subsets():
    config = tiny_config(num_clients=3, client_fraction=0.34)
    picks = [sample_clients(config, t) for t in range(6)]
    assert all(len(p) == 1 for p in picks)
    assert picks == [sample_clients(config, t) for t in range(6)]
    assert len({p[0] for p in picks}) > 1
    result = run_simulation(config, tiny_federation())
    assert [r.participants for r in result.rounds] == [1, 1]


def test_dirichlet_partition_is_reproducible():
    pool, labels = text_pool()
    split = [partition_dataset(pool, labels, 3, alpha=0.3, seed=s, eval_size=15,
                               per_client=None, num_groups=3) for s in (4, 4, 5)]  # fmt: skip
    assert split[0] == split[1]
    assert split[0] != split[2]
    sizes = sum(len(c) for c in split[0].clients) + len(split[0].evaluation)
    assert sizes == len(pool)
    assert 0.0 < split[0].skew < 1.0
    skewed = partition_dataset(pool, labels, 3, alpha=0.05, seed=4, eval_size=15,
                               per_client=None, num_groups=3)  # fmt: skip
    iid = partition_dataset(pool, labels, 3, alpha=100.0, seed=4, eval_size=15,
                            per_client=None, num_groups=3)  # fmt: skip
    assert skewed.skew > iid.skew


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lambda"):
        tiny_config(lam=1.5)
    with pytest.raises(ValueError, match="client_fraction"):
        tiny_config(client_fraction=0.0)
    with pytest.raises(ValueError, match="fedex"):
        tiny_config(strategy="fedex")
    with pytest.raises(ValueError, match="client datasets"):
        run_simulation(tiny_config(num_clients=4), tiny_federation(3))
    assert isinstance(tiny_config(), SimulationConfig)
    assert np.isfinite(tiny_config().lr)
