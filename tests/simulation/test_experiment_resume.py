"""scripts/experiments.py resumes a grid: a finished run of the same settings is kept; a run of
another budget (a quick one) or an unfinished one is run again."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments.py"


def load_experiments() -> Any:
    spec = importlib.util.spec_from_file_location("fedrot_experiments_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


experiments = load_experiments()
CONFIG = {"rounds": 16, "lr": 0.4, "model": {"name": "minilm", "seed": 0}, "client_basis": "shared"}


def write_run(folder: Path, config: dict, summary: dict | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"config": config, "summary": summary}))
    return folder


def test_a_finished_run_of_the_same_settings_is_kept(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run", CONFIG, {"best": 0.3})
    assert experiments.finished(folder, CONFIG)
    older = {k: v for k, v in CONFIG.items() if k != "client_basis"}  # recorded before it existed
    assert experiments.finished(write_run(tmp_path / "older", older, {"best": 0.3}), CONFIG)


def test_another_budget_or_an_unfinished_run_is_run_again(tmp_path: Path) -> None:
    quick = write_run(tmp_path / "quick", {**CONFIG, "rounds": 4}, {"best": 0.1})
    assert not experiments.finished(quick, CONFIG)
    other_seed = write_run(tmp_path / "seed", {**CONFIG, "model": {"name": "minilm", "seed": 1}},
                           {"best": 0.1})  # fmt: skip
    assert not experiments.finished(other_seed, CONFIG)
    assert not experiments.finished(write_run(tmp_path / "cut", CONFIG, None), CONFIG)
    assert not experiments.finished(tmp_path / "absent", CONFIG)
