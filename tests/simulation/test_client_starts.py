"""Where simulated clients start: their own LoRA init in round 0 (``--client-init independent``)
and one-round-stale updates (``--stale-fraction``), down-weighted like the server's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedrot.cli import main
from fedrot_client.simulation import engine, run_simulation
from fedrot_client.simulation.client_starts import (
    ClientInit,
    independent_adapter,
    init_seed,
    plan_starts,
    stale_participants,
)
from simulation_fixtures import tiny_config


def _broadcast() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "m.q.lora_A.weight": torch.randn(2, 16, generator=g),
        "m.q.lora_B.weight": torch.randn(8, 2, generator=g),
        "m.v.lora_A.weight": torch.randn(2, 16, generator=g),
        "m.v.lora_B.weight": torch.zeros(8, 2),
        "m.classifier.weight": torch.randn(3, 8, generator=g),
    }


def test_independent_adapter_draws_peft_like_factors_per_seed() -> None:
    broadcast = _broadcast()
    own = independent_adapter(broadcast, seed=init_seed(0, 1))
    assert set(own) == set(broadcast)
    assert own["m.classifier.weight"] is broadcast["m.classifier.weight"]
    for key in ("m.q.lora_B.weight", "m.v.lora_B.weight"):
        assert torch.count_nonzero(own[key]) == 0
    bound = 1.0 / math.sqrt(16)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(d_in), ...)
    for key in ("m.q.lora_A.weight", "m.v.lora_A.weight"):
        assert own[key].abs().max() <= bound
        assert own[key].abs().max() > 0.5 * bound
        assert not torch.equal(own[key], broadcast[key])
    again = independent_adapter(broadcast, seed=init_seed(0, 1))
    other = independent_adapter(broadcast, seed=init_seed(0, 2))
    assert torch.equal(again["m.q.lora_A.weight"], own["m.q.lora_A.weight"])
    assert not torch.equal(other["m.q.lora_A.weight"], own["m.q.lora_A.weight"])
    assert not torch.equal(own["m.q.lora_A.weight"], own["m.v.lora_A.weight"])


def test_stale_participants_are_a_seeded_share_from_round_one() -> None:
    assert stale_participants(0, 0, [0, 1, 2], 1.0) == set()
    assert stale_participants(0, 3, [0, 1, 2], 0.0) == set()
    one = stale_participants(0, 3, [0, 1, 2], 1 / 3)
    assert len(one) == 1 and one <= {0, 1, 2}
    assert stale_participants(0, 3, [0, 1, 2], 1 / 3) == one
    assert len(stale_participants(0, 3, [0, 1, 2], 0.01)) == 1  # at least one when > 0
    assert stale_participants(0, 3, [4, 7], 1.0) == {4, 7}
    picks = {frozenset(stale_participants(0, t, list(range(10)), 0.3)) for t in range(1, 9)}
    assert len(picks) > 1  # a different share each round


def test_plan_starts_sends_stale_clients_the_previous_adapter_one_round_late() -> None:
    broadcast, previous = _broadcast(), _broadcast()
    common = dict(seed=0, round_index=2, participants=[0, 1, 2], client_init=ClientInit.SHARED,
                  stale_fraction=1 / 3, broadcast=broadcast, previous=previous)  # fmt: skip
    starts = plan_starts(**common, same_factors_as_previous=True)
    stale = [s for s in starts if s.stale]
    assert len(stale) == 1 and stale[0].tensors is previous and stale[0].rounds_late == 1
    fresh = [s for s in starts if not s.stale]
    assert all(s.tensors is broadcast and s.rounds_late == 0 for s in fresh)
    # the server takes no late update across rounds that train other factors
    assert not any(s.stale for s in plan_starts(**common, same_factors_as_previous=False))


def test_plan_starts_independent_init_only_in_round_zero() -> None:
    broadcast = _broadcast()
    common = dict(seed=0, participants=[0, 1, 2], client_init=ClientInit.INDEPENDENT,
                  stale_fraction=0.0, broadcast=broadcast,
                  same_factors_as_previous=True)  # fmt: skip
    first = plan_starts(round_index=0, previous=None, **common)
    keys = [s.tensors["m.q.lora_A.weight"] for s in first]
    assert not any(torch.equal(k, broadcast["m.q.lora_A.weight"]) for k in keys)
    assert not torch.equal(keys[0], keys[1]) and not torch.equal(keys[1], keys[2])
    later = plan_starts(round_index=1, previous=broadcast, **common)
    assert all(s.tensors is broadcast for s in later)


class _Recorder:
    """Wraps the engine's backend and aggregation: per round, what each client started from
    and the weight its update was added with (keyed by client id)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.starts: list[dict[str, dict[str, torch.Tensor]]] = [{}]
        self.weights: list[dict[str, float]] = []
        make_backend, aggregate = engine._backend, engine._aggregate

        def backend(*args, **kwargs):
            inner = make_backend(*args, **kwargs)
            original = inner.train_round

            def train_round(global_tensors, trained, jobs):
                self.starts[-1].update({job.client_id: dict(global_tensors) for job in jobs})
                return original(global_tensors, trained, jobs)

            inner.train_round = train_round
            return inner

        def recorded_aggregate(strategy, reference, plan, updates):
            listed = list(updates)
            self.weights.append({client: weight for client, _, weight in listed})
            self.starts.append({})
            return aggregate(strategy, reference, plan, listed)

        monkeypatch.setattr(engine, "_backend", backend)
        monkeypatch.setattr(engine, "_aggregate", recorded_aggregate)


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(first[k], second[k]) for k in first)


def test_stale_updates_start_from_the_previous_round_and_weigh_less(federation, monkeypatch):
    recorder = _Recorder(monkeypatch)
    config = tiny_config(strategy="fedrot", lam=1.0, rounds=3, stale_fraction=1 / 3,
                         staleness_weight=0.5)  # fmt: skip
    stale = run_simulation(config, federation)
    plain = run_simulation(tiny_config(strategy="fedrot", lam=1.0, rounds=3), federation)
    samples = config.local_steps * config.batch_size
    assert sorted(recorder.weights[0].values()) == [samples] * 3  # round 0: nobody is late
    for t in (1, 2):
        weights = recorder.weights[t]
        assert sorted(weights.values()) == [0.5 * samples, samples, samples]
        late = next(c for c, w in weights.items() if w == 0.5 * samples)
        # the late client trained from round t - 1's broadcast (an on-time start of round t - 1)
        on_time_before = next(c for c, w in recorder.weights[t - 1].items() if w == samples)
        before = recorder.starts[t - 1][on_time_before]
        assert _same(recorder.starts[t][late], before)
        on_time = [c for c in weights if c != late]
        assert all(not _same(recorder.starts[t][c], before) for c in on_time)
        assert _same(recorder.starts[t][on_time[0]], recorder.starts[t][on_time[1]])
    # the late update is aligned like the others (FedRot rotates every client's factors)
    assert stale.rounds[1].rotation_distance is not None
    assert stale.rounds[0].relative_aggregation_error == pytest.approx(
        plain.rounds[0].relative_aggregation_error)
    assert stale.rounds[2].relative_aggregation_error != pytest.approx(
        plain.rounds[2].relative_aggregation_error)


def test_independent_init_raises_the_round_zero_error_only_there(federation, monkeypatch):
    recorder = _Recorder(monkeypatch)
    config = tiny_config(strategy="fedit", lam=0.0, rounds=2, client_init="independent")
    own = run_simulation(config, federation)
    shared = run_simulation(tiny_config(strategy="fedit", lam=0.0, rounds=2), federation)
    first, second = list(recorder.starts[0].values()), list(recorder.starts[1].values())
    a_key = next(k for k in first[0] if k.endswith("lora_A.weight"))
    assert len(first) == 3
    assert not torch.equal(first[0][a_key], first[1][a_key])
    assert not torch.equal(first[1][a_key], first[2][a_key])
    assert _same(second[0], second[1]) and _same(second[1], second[2])  # round 1: the broadcast
    # the clients' A no longer match, so plain averaging loses much more of the round-0 update
    own_error, shared_error = (r.rounds[0].relative_aggregation_error for r in (own, shared))
    assert own_error > 3 * shared_error
    # FedRot never aligns round 0: it takes FedIT's round-0 merge
    fedrot = run_simulation(tiny_config(strategy="fedrot", lam=1.0, rounds=1,
                                        client_init="independent"), federation)  # fmt: skip
    assert fedrot.rounds[0].relative_aggregation_error == pytest.approx(
        own.rounds[0].relative_aggregation_error, rel=1e-5)


def test_config_rejects_bad_stale_settings() -> None:
    with pytest.raises(ValueError, match="stale_fraction"):
        tiny_config(stale_fraction=1.5)
    with pytest.raises(ValueError, match="staleness_weight"):
        tiny_config(staleness_weight=0.0)
    with pytest.raises(ValueError):
        tiny_config(client_init="own")


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(),
                    reason="Debian wordnet-base is not installed (make debian)")  # fmt: skip
def test_simulate_flags_reach_the_config(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["simulate", "--strategy", "fedit", "--clients", "3", "--client-init",
                   "independent", "--stale-fraction", "0.34", "--staleness-weight", "0.25",
                   "--out", str(out), "--no-plot", "--model", "tiny-bert", "--rounds", "2",
                   "--local-steps", "2", "--batch-size", "4", "--per-client", "12",
                   "--eval-size", "16", "--max-length", "16", "--threads", "1"])  # fmt: skip
    assert status == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["client_init"] == "independent"
    assert config["stale_fraction"] == 0.34 and config["staleness_weight"] == 0.25
    assert main(["simulate", "--stale-fraction", "2", "--out", str(tmp_path / "x")]) == 2
    assert "stale_fraction" in capsys.readouterr().err
