"""scripts/regime_rounds.py: two-round runs of several strategies that share their clients'
training write the same records as separate ``run_simulation`` runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fedrot_client.simulation import run_simulation
from simulation_fixtures import chat_federation, tiny_config, tiny_instruction_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "regime_rounds.py"


def _load():
    spec = importlib.util.spec_from_file_location("fedrot_regime_rounds_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


regime_rounds = _load()
COMPARED = ("train_loss", "eval_loss", "eval_accuracy", "eval_exact_match",
            "relative_aggregation_error", "aggregation_error", "rotation_distance",
            "participants", "aligned")  # fmt: skip


CASES = {
    "plain": (tiny_config, None, {}),
    "stale-independent": (tiny_config, None, {"stale_fraction": 0.34,
                                              "client_init": "independent"}),
    "instruction": (tiny_instruction_config, chat_federation, {}),  # TRL's SFTTrainer
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_shared_uploads_equal_separate_runs(federation, tmp_path, case):
    build, data, changes = CASES[case]
    federation = federation if data is None else data()
    base = build(rounds=2, eval_every=2, **changes)
    configs = {"fedit": replace(base, strategy="fedit", lam=0.0),
               "hard": replace(base, strategy="fedrot", lam=1.0),
               "soft": replace(base, strategy="fedrot", lam=0.4)}  # fmt: skip
    assert regime_rounds.shared_keys(list(configs.values()))
    folders = {key: tmp_path / key for key in configs}
    regime_rounds.run_two_rounds(configs, federation, folders, round0_steps=base.local_steps)
    for key, config in configs.items():
        alone = run_simulation(config, federation)
        written = json.loads((folders[key] / "metrics.json").read_text())
        assert written["config"] == json.loads(json.dumps(config.to_dict()))
        for mine, theirs in zip(written["rounds"], alone.rounds, strict=True):
            for name in COMPARED:
                expected = getattr(theirs, name)
                if isinstance(expected, float):
                    expected = pytest.approx(expected, rel=1e-6)
                assert mine[name] == expected, (key, name)
        assert written["summary"]["final_accuracy"] == alone.summary()["final_accuracy"]
        assert written["summary"]["final_exact_match"] == alone.summary()["final_exact_match"]
    # lambda matters in round 1 only, where the aggregation differs
    hard, fedit = (json.loads((folders[k] / "metrics.json").read_text())["rounds"]
                   for k in ("hard", "fedit"))  # fmt: skip
    assert hard[0]["relative_aggregation_error"] == fedit[0]["relative_aggregation_error"]
    assert hard[1]["rotation_distance"] > 0 and fedit[1]["rotation_distance"] is None


def test_shared_keys_refuses_configs_that_differ_in_more_than_the_strategy():
    base = tiny_config(rounds=2)
    assert not regime_rounds.shared_keys([base, replace(base, lr=0.5, strategy="fedit")])
