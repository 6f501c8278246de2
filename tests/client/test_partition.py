"""Label-Dirichlet partition: a partition, deterministic per seed, skewed as alpha falls."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedrot_client.partition import (
    dirichlet_partition,
    label_histograms,
    label_skew,
    split_federated,
)


def class_labels(n: int = 3000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 400),
    classes=st.integers(1, 8),
    clients=st.integers(1, 6),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**31),
)
def test_every_index_is_used_exactly_once(n, classes, clients, alpha, seed) -> None:
    labels = class_labels(n, classes, seed)
    try:
        shards = dirichlet_partition(labels, clients, alpha, seed, min_size=1)
    except ValueError as refused:  # extreme skew on few examples: see the test below
        assert "draws" in str(refused)
        assume(False)  # not counted; hypothesis fails the test should most examples be refused
    assert len(shards) == clients
    merged = np.concatenate(shards)
    assert np.array_equal(np.sort(merged), np.arange(n))
    assert all(np.all(np.diff(s) > 0) for s in shards)
    assert all(s.dtype == np.int64 and len(s) >= 1 for s in shards)


def test_a_split_no_draw_can_give_every_client_data_is_refused_by_name() -> None:
    """One class of 20 examples, Dirichlet(0.0625) over 5 clients: nearly all the mass falls on
    one client, so no draw in MAX_ATTEMPTS gives every client an example (hypothesis found it)."""
    with pytest.raises(ValueError, match=r"no Dirichlet\(alpha=0\.0625\) split of 20 examples "
                                         r"gave all 5 clients at least 1 examples in 1000 draws"):
        dirichlet_partition(np.zeros(20, dtype=np.int64), 5, 0.0625, seed=0)


def test_deterministic_per_seed_and_seed_matters() -> None:
    labels = class_labels()
    first = dirichlet_partition(labels, 5, 0.5, seed=7)
    second = dirichlet_partition(labels, 5, 0.5, seed=7)
    other = dirichlet_partition(labels, 5, 0.5, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_skew_grows_as_alpha_falls() -> None:
    labels = class_labels()
    skews = [
        np.mean([label_skew(labels, dirichlet_partition(labels, 5, alpha, seed), 10)
                 for seed in range(5)])
        for alpha in (100.0, 1.0, 0.1)
    ]  # fmt: skip
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_min_size_is_respected_or_refused() -> None:
    labels = class_labels(200, 4)
    shards = dirichlet_partition(labels, 4, 0.1, seed=1, min_size=20)
    assert min(len(s) for s in shards) >= 20
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(labels, 4, 0.5, min_size=51)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 4, 0.0)


def test_histograms() -> None:
    labels = np.array([0, 1, 1, 2])
    counts = label_histograms(labels, [np.array([0, 1]), np.array([2, 3])], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_split_federated_disjoint_capped_and_deterministic() -> None:
    labels = class_labels(2000)
    split = split_federated(labels, 3, alpha=0.5, seed=2, eval_size=300, max_per_client=250)
    again = split_federated(labels, 3, alpha=0.5, seed=2, eval_size=300, max_per_client=250)
    parts = [split.evaluation, *split.clients]
    assert len(split.evaluation) == 300
    assert all(len(c) <= 250 for c in split.clients)
    merged = np.concatenate(parts)
    assert len(np.unique(merged)) == len(merged)  # no overlap
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.evaluation, *again.clients]))
    uncapped = split_federated(labels, 3, alpha=0.5, seed=2, eval_size=300)
    assert sum(len(c) for c in uncapped.clients) == 1700


def test_clients_are_served_alike_when_classes_are_small() -> None:
    # 3000 classes of one example each and nearly equal shares: a split that floors cumulative
    # shares gives every example to the last client; multinomial counts give each about 1/3.
    labels = np.arange(3000)
    sizes = [len(s) for s in dirichlet_partition(labels, 3, 1000.0, seed=0)]
    assert sum(sizes) == 3000
    assert all(900 <= size <= 1100 for size in sizes), sizes


def test_expected_shard_size_is_the_same_for_every_client() -> None:
    # Symmetric Dirichlet shares: every client's mean size over seeds is n / N. With two
    # examples per class, flooring starves the first client (about 1/6 of the examples instead
    # of 1/4) and feeds the last.
    labels = np.repeat(np.arange(200), 2)
    sizes = np.array([[len(s) for s in dirichlet_partition(labels, 4, 1.0, seed)]
                      for seed in range(40)])  # fmt: skip
    mean_share = sizes.mean(axis=0) / len(labels)
    assert np.allclose(mean_share, 0.25, atol=0.02), mean_share
