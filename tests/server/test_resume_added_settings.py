"""A run recorded before a setting existed resumes: it is not held to settings it never had."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedrot_server.runs.recovery import check_compatible
from fedrot_server.run_settings import TrainingSettings
from fedrot_server.settings import SettingsError

OLD_TRAINING = {"local_steps": 20, "epochs": 0, "batch_size": 16, "learning_rate": 0.02,
                "optimizer": "sgd", "weight_decay": 0.0, "max_length": 64}  # fmt: skip


def run_recorded(training: dict) -> SimpleNamespace:
    return SimpleNamespace(run_id="run-old", spec={"training": training, "rounds": 5})


def test_fields_added_to_training_since_the_run_was_recorded_are_not_held_against_it() -> None:
    current = {"training": TrainingSettings().model_dump(mode="json"), "rounds": 5}
    assert set(current["training"]) > set(OLD_TRAINING)
    check_compatible(run_recorded(OLD_TRAINING), current)  # no SettingsError


def test_a_recorded_setting_that_changed_is_still_refused_by_name() -> None:
    current = {"training": TrainingSettings(batch_size=8).model_dump(mode="json"), "rounds": 5}
    with pytest.raises(SettingsError, match="training.batch_size was 16, is now 8"):
        check_compatible(run_recorded(OLD_TRAINING), current)


def test_cosine_across_rounds_needs_a_positive_minimum() -> None:
    with pytest.raises(ValueError, match="min_learning_rate > 0"):
        TrainingSettings(round_lr_schedule="cosine")
    assert TrainingSettings(round_lr_schedule="cosine", min_learning_rate=1e-5) is not None
