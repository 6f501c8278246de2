"""`fedrot aggregate`: the real command on files, checked against sums computed here.

A few tests run the installed console script as a subprocess (each costs a torch import); the
error matrix runs ``fedrot.cli.main`` in-process, with one subprocess check that the real
process also ends with one line and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fedrot.cli import main
from fedrot.codec import decode_adapter, encode_adapter

Q = "base_model.model.encoder.layer.0.attention.self.query"
V = "base_model.model.encoder.layer.0.attention.self.value"
HEAD = "base_model.model.classifier.weight"
POOLER = "base_model.model.pooler.weight"
RANK, D_OUT, D_IN = 4, 6, 8

Tensors = dict[str, torch.Tensor]


def a_key(module: str) -> str:
    return f"{module}.lora_A.weight"


def b_key(module: str) -> str:
    return f"{module}.lora_B.weight"


def random_adapter(seed: int, dtype: torch.dtype = torch.float32) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for module in (Q, V):
        out[a_key(module)] = torch.randn(RANK, D_IN, generator=g).to(dtype)
        out[b_key(module)] = torch.randn(D_OUT, RANK, generator=g).to(dtype)
    out[HEAD] = torch.randn(2, D_OUT, generator=g).to(dtype)
    return out


def haar_rotation(r: int, g: torch.Generator) -> torch.Tensor:
    """A Haar-random rotation in SO(r) (QR of a Gaussian with the sign fix)."""
    q, upper = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(upper))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def weighted_mean(adapters: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    total = sum(weights)
    return {
        key: sum(w / total * a[key].double() for a, w in zip(adapters, weights)).float()
        for key in adapters[0]
    }


def save(path: Path, tensors: Tensors) -> str:
    path.write_bytes(encode_adapter(tensors))
    return str(path)


def load(path: Path) -> Tensors:
    return decode_adapter(path.read_bytes()).tensors


def fedrot_command() -> list[str]:
    script = Path(sys.executable).with_name("fedrot")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedrot.cli"]


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*fedrot_command(), "aggregate", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def run_inprocess(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``fedrot aggregate ARGS`` through ``main``; argparse errors arrive as SystemExit."""
    try:
        code = main(["aggregate", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


Aggregate = Callable[..., tuple[int, str, str]]


@pytest.fixture
def aggregate_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Aggregate:
    """``fedrot aggregate ARGS`` in-process, in ``tmp_path``: ``(status, stdout, stderr)``."""
    monkeypatch.chdir(tmp_path)
    return lambda *args: run_inprocess(capsys, *args)


@pytest.fixture
def clients(tmp_path: Path) -> list[Tensors]:
    adapters = [random_adapter(seed) for seed in range(3)]
    for i, adapter in enumerate(adapters):
        save(tmp_path / f"c{i}.safetensors", adapter)
    return adapters


# ---- the real command ------------------------------------------------------------------------


def test_fedit_writes_the_weighted_mean_and_a_report(
    tmp_path: Path, clients: list[Tensors]
) -> None:
    done = run_command(
        "--strategy", "fedit", "--out", "out.safetensors", "--report", "report.json",
        "c0.safetensors", "c1.safetensors:3", "c2.safetensors:0.5",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert len((done.stdout + done.stderr).strip().splitlines()) == 1

    out = load(tmp_path / "out.safetensors")
    expected = weighted_mean(clients, [1.0, 3.0, 0.5])
    assert out.keys() == clients[0].keys()
    for key, tensor in expected.items():
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], tensor, rtol=1e-6, atol=1e-6)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["strategy"] == "fedit"
    assert report["aggregation_error"] > 0.0
    assert report["relative_aggregation_error"] is None  # no --reference
    assert {m["module"] for m in report["modules"]} == {Q, V}
    assert [c["weight"] for c in report["inputs"]] == [1.0, 3.0, 0.5]


def rotated_clients(tmp_path: Path) -> list[str]:
    """A reference and 4 clients holding one update (reference + small step) in randomly
    rotated latent bases: ``(B R_i, R_i^T A)`` with Haar ``R_i``; returns the file names."""
    g = torch.Generator().manual_seed(7)
    reference = random_adapter(11)
    save(tmp_path / "ref.safetensors", reference)
    update = {k: t + 0.1 * torch.randn(t.shape, generator=g) for k, t in reference.items()}
    names = []
    for i in range(4):
        client = dict(update)
        for module in (Q, V):
            rotation = haar_rotation(RANK, g)
            client[a_key(module)] = rotation.T @ update[a_key(module)]
            client[b_key(module)] = update[b_key(module)] @ rotation
        names.append(save(tmp_path / f"rot{i}.safetensors", client))
    return names


def test_rotated_bases_aggregate_exactly_with_fedrot_but_not_with_fedit(tmp_path: Path) -> None:
    inputs = rotated_clients(tmp_path)
    errors = {}
    for strategy in ("fedrot", "fedit"):
        done = run_command(
            "--strategy", strategy, "--lambda", "1", "--reference", "ref.safetensors",
            "--out", f"{strategy}.safetensors", "--report", f"{strategy}.json", *inputs,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        report = json.loads((tmp_path / f"{strategy}.json").read_text())
        errors[strategy] = report["relative_aggregation_error"]
        assert report["aligned"] == ("A" if strategy == "fedrot" else None)
    assert errors["fedrot"] < 1e-4
    assert errors["fedit"] > 0.1


def test_bad_inputs_end_the_real_process_with_one_line(
    tmp_path: Path, clients: list[Tensors]
) -> None:
    poisoned = dict(clients[1])
    poisoned[b_key(V)] = poisoned[b_key(V)].clone()
    poisoned[b_key(V)][0, 0] = float("nan")
    save(tmp_path / "nan.safetensors", poisoned)
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "c0.safetensors").read_bytes()[:50])
    for args, needle in [
        (["c0.safetensors", "nan.safetensors"], f"nan.safetensors: {b_key(V)}: 1 non-finite"),
        (["torn.safetensors"], "torn.safetensors: unreadable"),
    ]:
        done = run_command("--strategy", "fedrot", "--out", "out.safetensors", *args, cwd=tmp_path)
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.startswith("fedrot: error: ")
        assert needle in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.safetensors").exists()


# ---- in-process: the rest of the contract --------------------------------------------------


def test_fedex_writes_the_residual_as_base_deltas(
    tmp_path: Path, clients: list[Tensors], aggregate_here: Aggregate
) -> None:
    code, out, err = aggregate_here(
        "--strategy", "fedex", "--out", "out.safetensors",
        "--base-deltas", "deltas.safetensors", "c0.safetensors", "c1.safetensors:2",
    )
    assert code == 0, err
    assert out.startswith("fedrot: aggregated 2 adapters with fedex")
    deltas = load(tmp_path / "deltas.safetensors")
    weights = [1 / 3, 2 / 3]
    for module in (Q, V):
        a = [c[a_key(module)].double() for c in clients[:2]]
        b = [c[b_key(module)].double() for c in clients[:2]]
        ideal = sum(w * bi @ ai for w, ai, bi in zip(weights, a, b))
        bar = sum(w * bi for w, bi in zip(weights, b)) @ sum(w * ai for w, ai in zip(weights, a))
        delta = deltas[f"{module}.base_layer.weight"]
        assert delta.shape == (D_OUT, D_IN)
        torch.testing.assert_close(delta.double(), ideal - bar, rtol=1e-5, atol=1e-5)
    for key, tensor in weighted_mean(clients[:2], [1.0, 2.0]).items():
        torch.testing.assert_close(load(tmp_path / "out.safetensors")[key], tensor)


def test_fedrot_with_lambda_zero_is_fedit(
    tmp_path: Path, clients: list[Tensors], aggregate_here: Aggregate
) -> None:
    save(tmp_path / "ref.safetensors", random_adapter(99))
    code, _, err = aggregate_here(
        "--strategy", "fedrot", "--lambda", "0", "--reference", "ref.safetensors",
        "--out", "out.safetensors", "c0.safetensors:2", "c1.safetensors", "c2.safetensors",
    )
    assert code == 0, err
    out = load(tmp_path / "out.safetensors")
    for key, tensor in weighted_mean(clients, [2.0, 1.0, 1.0]).items():
        torch.testing.assert_close(out[key], tensor, rtol=1e-5, atol=1e-6)


def test_aligning_b_also_undoes_the_rotations(tmp_path: Path, aggregate_here: Aggregate) -> None:
    inputs = rotated_clients(tmp_path)
    code, _, err = aggregate_here(
        "--strategy", "fedrot", "--lambda", "1", "--align", "b",
        "--reference", "ref.safetensors", "--out", "out.safetensors", "--report", "r.json",
        *inputs,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["aligned"] == "B"
    assert report["relative_aggregation_error"] < 1e-4
    assert len(report["clients"]) == 4 and len(report["modules"]) == 2


def test_output_keeps_the_inputs_dtype_and_paths_may_hold_colons(
    tmp_path: Path, aggregate_here: Aggregate
) -> None:
    adapters = [random_adapter(seed, torch.bfloat16) for seed in (1, 2)]
    save(tmp_path / "round:1.safetensors", adapters[0])
    save(tmp_path / "b.safetensors", adapters[1])
    code, _, err = aggregate_here(
        "--strategy", "fedrot", "--out", "out.safetensors",
        "round:1.safetensors", "b.safetensors:1e0",
    )
    assert code == 0, err
    out = decode_adapter((tmp_path / "out.safetensors").read_bytes())
    assert {t.dtype for t in out.tensors.values()} == {torch.bfloat16}
    torch.testing.assert_close(out.tensors[HEAD], weighted_mean(adapters, [1, 1])[HEAD].bfloat16())
    assert out.metadata["fedrot.strategy"] == "fedrot"


def _rank_three(good: Tensors) -> Tensors:
    """``good`` cut to rank 3 in every module: self-consistent, but not rank 4."""
    out = dict(good)
    for module in (Q, V):
        out[a_key(module)] = out[a_key(module)][:3].clone()
        out[b_key(module)] = out[b_key(module)][:, :3].clone()
    return out


QA, QB = a_key(Q), b_key(Q)
BAD = {
    "missing file": (["c0.safetensors", "gone.safetensors"], "gone.safetensors: no such file"),
    "directory": (["c0.safetensors", "."], ".: is a directory"),
    "not safetensors": (["c0.safetensors", "notes.txt"], "notes.txt: unreadable safetensors"),
    "empty file": (["empty.safetensors"], "empty.safetensors: empty adapter"),
    "rank mismatch": (
        ["c0.safetensors", "r3.safetensors"],
        f"r3.safetensors: {QA}: shape (3, 8), expected (4, 8) (rank 3, expected rank 4)",
    ),
    "extra key": (
        ["c0.safetensors", "extra.safetensors"],
        f"extra.safetensors: unexpected key {POOLER}",
    ),
    "missing key": (
        ["c0.safetensors", "nohead.safetensors"],
        f"nohead.safetensors: missing key {HEAD}",
    ),
    "lone factor": (["lone.safetensors"], f"lone.safetensors: missing key {b_key(V)}"),
    "int64 head": (
        ["c0.safetensors", "int.safetensors"],
        f"int.safetensors: {HEAD}: safetensors dtype I64",
    ),
    "inf": (["c0.safetensors", "inf.safetensors"], f"inf.safetensors: {HEAD}: 1 non-finite"),
    "reference mismatch": (
        ["--reference", "r3.safetensors", "c0.safetensors"],
        f"c0.safetensors: {QA}: shape (4, 8), expected (3, 8)",
    ),
    "zero weight": (["c0.safetensors:0"], "c0.safetensors: bad weight '0'"),
    "negative weight": (["c0.safetensors:-2"], "c0.safetensors: bad weight '-2'"),
    "nan weight": (["c0.safetensors:nan"], "c0.safetensors: bad weight 'nan'"),
    "word weight": (["c0.safetensors:heavy"], "c0.safetensors: bad weight 'heavy'"),
    "lambda above 1": (["--lambda", "1.5", "c0.safetensors"], "--lambda: must lie in [0, 1]"),
    "lambda not a number": (["--lambda", "x", "c0.safetensors"], "--lambda: not a number"),
    "unknown strategy": (
        ["--strategy", "fedavg", "c0.safetensors"],
        "argument --strategy: invalid choice: 'fedavg'",
    ),
    "bad align": (["--align", "C", "c0.safetensors"], "argument --align: invalid choice: 'C'"),
    "base deltas without fedex": (
        ["--base-deltas", "d.safetensors", "c0.safetensors"],
        "--base-deltas: only --strategy fedex",
    ),
    "no clients": ([], "the following arguments are required"),
    "overflowing fedex": (
        ["--strategy", "fedex", "--base-deltas", "d.safetensors",
         "c0.safetensors", "huge.safetensors"],  # fmt: skip
        "base_layer.weight: the inputs' values overflow float32 in the aggregation",
    ),
    "overflowing flexlora": (
        ["--strategy", "flexlora", "huge.safetensors", "c0.safetensors"],
        "fedrot: error: the inputs' values overflow float32",
    ),
    "overflowing report": (
        ["--report", "r.json", "huge.safetensors", "c0.safetensors"],
        "r.json: the inputs' values overflow float32",
    ),
    "unwritable out": (
        ["--out", "no/such/dir/out.safetensors", "c0.safetensors"],
        "no/such/dir/out.safetensors: cannot write",
    ),
}


def write_bad_files(tmp_path: Path, good: Tensors) -> None:
    """The files BAD refers to, each ``good`` with one thing wrong."""
    (tmp_path / "notes.txt").write_text("not an adapter\n" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save(tmp_path / "r3.safetensors", _rank_three(good))
    save(tmp_path / "extra.safetensors", {**good, POOLER: torch.ones(3)})
    save(tmp_path / "nohead.safetensors", {k: t for k, t in good.items() if k != HEAD})
    save(tmp_path / "lone.safetensors", {k: t for k, t in good.items() if k != b_key(V)})
    integer_head = {**good, HEAD: torch.ones(2, D_OUT, dtype=torch.int64)}
    (tmp_path / "int.safetensors").write_bytes(safetensors.torch.save(integer_head))
    save(tmp_path / "huge.safetensors", {k: t * 1e30 for k, t in good.items()})
    infinite = torch.zeros(2, D_OUT)
    infinite[1, 3] = float("inf")
    save(tmp_path / "inf.safetensors", {**good, HEAD: infinite})


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_error_line_and_status_2(
    case: str, tmp_path: Path, clients: list[Tensors], aggregate_here: Aggregate
) -> None:
    write_bad_files(tmp_path, clients[1])
    args, needle = BAD[case]
    defaults = {"--strategy": "fedit", "--out": "out.safetensors"}
    options = [x for flag, value in defaults.items() if flag not in args for x in (flag, value)]
    code, out, err = aggregate_here(*options, *args)
    assert code == 2
    assert out == ""
    assert err.startswith("fedrot: error: ")
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_gives_the_cpu_result(tmp_path: Path, aggregate_here: Aggregate) -> None:
    inputs = rotated_clients(tmp_path)
    for device in ("cpu", "cuda"):
        code, _, err = aggregate_here(
            "--strategy", "fedrot", "--device", device, "--reference", "ref.safetensors",
            "--out", f"{device}.safetensors", *inputs,
        )
        assert code == 0, err
    cpu, cuda = load(tmp_path / "cpu.safetensors"), load(tmp_path / "cuda.safetensors")
    for key, tensor in cpu.items():
        assert cuda[key].device.type == "cpu"
        torch.testing.assert_close(cuda[key], tensor, rtol=1e-4, atol=1e-5)


def test_without_a_reference_the_order_of_the_arguments_does_not_matter(
    tmp_path: Path, aggregate_here: Aggregate
) -> None:
    """The heaviest client (ties: the first path in sort order) is the alignment target."""
    inputs = rotated_clients(tmp_path)
    orders = {
        "forward": [inputs[0], f"{inputs[1]}:2", inputs[2], inputs[3]],
        "backward": [inputs[3], inputs[2], f"{inputs[1]}:2", inputs[0]],
    }
    for name, order in orders.items():
        code, _, err = aggregate_here(
            "--strategy", "fedrot", "--lambda", "1", "--out", f"{name}.safetensors", *order
        )
        assert code == 0, err
    forward = load(tmp_path / "forward.safetensors")
    backward = load(tmp_path / "backward.safetensors")
    for key, tensor in forward.items():
        torch.testing.assert_close(backward[key], tensor, rtol=1e-5, atol=1e-6)
    ties = [list(reversed(inputs)), inputs]
    for i, order in enumerate(ties):
        code, _, err = aggregate_here(
            "--strategy", "fedrot", "--lambda", "1", "--out", f"tie{i}.safetensors", *order
        )
        assert code == 0, err
    tie0, tie1 = load(tmp_path / "tie0.safetensors"), load(tmp_path / "tie1.safetensors")
    for key, tensor in tie0.items():
        torch.testing.assert_close(tie1[key], tensor, rtol=1e-5, atol=1e-6)


def test_ffa_with_a_reference_keeps_its_a_and_takes_b_only_files(
    tmp_path: Path, clients: list[Tensors], aggregate_here: Aggregate
) -> None:
    reference = random_adapter(42)
    save(tmp_path / "ref.safetensors", reference)
    b_only = {k: t for k, t in clients[2].items() if not k.endswith(".lora_A.weight")}
    save(tmp_path / "b_only.safetensors", b_only)
    code, _, err = aggregate_here(
        "--strategy", "ffa", "--reference", "ref.safetensors", "--out", "out.safetensors",
        "c0.safetensors", "c1.safetensors:2", "b_only.safetensors",
    )
    assert code == 0, err
    out = load(tmp_path / "out.safetensors")
    assert out.keys() == reference.keys()
    mean = weighted_mean(clients, [1.0, 2.0, 1.0])
    for key, tensor in out.items():
        expected = reference[key] if key.endswith(".lora_A.weight") else mean[key]
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)


def test_huge_weights_are_normalised_before_summing(
    tmp_path: Path, clients: list[Tensors], aggregate_here: Aggregate
) -> None:
    code, _, err = aggregate_here(
        "--strategy", "fedex", "--out", "out.safetensors", "--report", "r.json",
        "--base-deltas", "deltas.safetensors", "c0.safetensors:1e308", "c1.safetensors:1.5e308",
    )
    assert code == 0, err
    for key, tensor in weighted_mean(clients[:2], [1.0, 1.5]).items():
        torch.testing.assert_close(load(tmp_path / "out.safetensors")[key], tensor)
    assert all(torch.isfinite(t).all() for t in load(tmp_path / "deltas.safetensors").values())
    inputs = json.loads((tmp_path / "r.json").read_text())["inputs"]
    assert [c["normalised_weight"] for c in inputs] == pytest.approx([0.4, 0.6])
    code, _, err = aggregate_here("--strategy", "fedit", "--out", "tiny.safetensors",
                                  "c0.safetensors:1e300", "c1.safetensors:1e-30")  # fmt: skip
    assert code == 2 and "c1.safetensors: weight 1e-30 is too small next to 1e+300" in err


def test_an_existing_file_whose_name_ends_in_a_number_is_that_file(
    tmp_path: Path, clients: list[Tensors], aggregate_here: Aggregate
) -> None:
    save(tmp_path / "run:3", clients[0])
    code, _, err = aggregate_here(
        "--strategy", "fedit", "--out", "out.safetensors", "--report", "r.json",
        "run:3", "c1.safetensors",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(c["path"], c["weight"]) for c in report["inputs"]] == [
        ("run:3", 1.0), ("c1.safetensors", 1.0)]  # fmt: skip
