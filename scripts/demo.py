"""``make demo``: a real federation on loopback, one server and three client daemons.

all-MiniLM-L6-v2 learns to classify WordNet glosses into their 45 lexicographer categories
with FedRot-LoRA, or your own labelled texts with ``--data FILE`` (JSONL, CSV/TSV or a saved
Hugging Face dataset; ``--text-field``, ``--label-field``, ``--labels``), split by
``fedrot split``'s code. The script writes label-skewed shards (Dirichlet alpha = 0.5) and a
held-out split, starts ``fedrot-server`` (which evaluates every round's global adapter on the
held-out split) and three ``fedrot-client`` processes, prints one table row per closed round
from the server's round reports, and says where the final adapter is. Every process it started
is stopped before it exits, also on Ctrl-C or a failure.

    python scripts/demo.py [--out .demo] [--rounds 8] [--local-steps 20] [--data FILE] ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedrot_client.data import FieldNames
from fedrot_client.shards import LABELS_FILE, SplitOptions, split_user_data
from fedrot_client.wordnet import ShardOptions, read_synsets, write_shards

CLIENTS = ("alice", "bob", "carol")
PORT_LINE = re.compile(r"serving \S+ on port (\d+)")
DASHBOARD_LINE = re.compile(r"dashboard on port (\d+)")
POLL_S = 0.5
STOP_GRACE_S = 20.0


@dataclass
class Child:
    """A started process, its log file and the lines it has written so far."""

    name: str
    process: subprocess.Popen[str]
    log_path: Path
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".demo"),
                        help="working folder (emptied first): data, logs, server state")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--strategy", default="fedrot")
    parser.add_argument("--alignment-strength", type=float, default=0.4)
    parser.add_argument("--per-client", type=int, default=1000, help="examples per client")
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.5, help="label-Dirichlet alpha")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", type=Path, default=None,
                        help="your labelled texts instead of WordNet: .jsonl, .csv/.tsv or a "
                        "saved HF dataset folder")
    parser.add_argument("--text-field", default="text", help="with --data")
    parser.add_argument("--label-field", default="label", help="with --data")
    parser.add_argument("--labels", type=Path, default=None,
                        help="with --data: JSON list of label names (default: from the data)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    return parser.parse_args(argv)  # fmt: skip


def build_data(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Shards for the clients, the held-out split and the label names: WordNet's, or
    ``--data`` split as ``fedrot split`` splits it."""
    if args.data is not None:
        options = SplitOptions(num_clients=len(CLIENTS), alpha=args.alpha, seed=0,
                               eval_size=args.eval_size, max_per_client=args.per_client)
        return split_user_data(args.data, out, options, labels_file=args.labels,
                               fields=FieldNames(args.text_field, args.label_field))
    options = ShardOptions(num_clients=len(CLIENTS), alpha=args.alpha, seed=0,
                           eval_size=args.eval_size, max_per_client=args.per_client)  # fmt: skip
    return write_shards(read_synsets(), out, options)


def label_names(data: Path) -> list[str]:
    return [str(name) for name in json.loads((data / LABELS_FILE).read_text(encoding="utf-8"))]


def data_fields(args: argparse.Namespace) -> tuple[str, str]:
    """The text and label fields of the shards (WordNet's are text and label)."""
    return (args.text_field, args.label_field) if args.data is not None else ("text", "label")


def server_config(out: Path, args: argparse.Namespace) -> Path:
    """The server's settings file (the tokens go in a separate file)."""
    labels = label_names(out / "data")
    text_field, label_field = data_fields(args)
    config = {
        "state_dir": str(out / "server"),
        "rounds": args.rounds,
        "min_clients": len(CLIENTS),
        "tokens_file": str(out / "tokens.txt"),
        "model": {"name": args.model, "labels": labels},
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["query", "value"]},
        "strategy": {"name": args.strategy, "alignment_strength": args.alignment_strength},
        "training": {"local_steps": args.local_steps, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "optimizer": args.optimizer,
                     "max_length": args.max_length},
        "evaluation": {"data": str(out / "data" / "eval.jsonl"),
                       "text_field": text_field, "label_field": label_field},
        "round_deadline_s": 300.0,
        "linger_s": 5.0,
        "device": "cpu",
    }  # fmt: skip
    path = out / "server.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def start(name: str, command: list[str], log_path: Path, env: dict[str, str]) -> Child:
    """Start ``command``; a thread copies its output to ``log_path`` and keeps the lines."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)  # fmt: skip
    child = Child(name, process, log_path)
    child.pump = threading.Thread(target=_pump, args=(child,), daemon=True)
    child.pump.start()
    return child


def _pump(child: Child) -> None:
    stream: IO[str] | None = child.process.stdout
    assert stream is not None
    with child.log_path.open("w") as log:
        for line in stream:
            log.write(line)
            log.flush()
            child.lines.append(line)


def wait_for_port(server: Child, deadline: float) -> int:
    """The port the server bound (it logs it), waiting until ``deadline``."""
    seen = 0
    while time.monotonic() < deadline:
        for line in server.lines[seen:]:
            found = PORT_LINE.search(line)
            if found:
                return int(found.group(1))
        seen = len(server.lines)
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited ({server.process.returncode}); see "
                               f"{server.log_path}")  # fmt: skip
        time.sleep(POLL_S)
    raise TimeoutError(f"the server did not report its port; see {server.log_path}")


def dashboard_url(server: Child) -> str:
    """The dashboard's address (the server logs its port before the gRPC one)."""
    for line in server.lines:
        found = DASHBOARD_LINE.search(line)
        if found:
            return f"http://127.0.0.1:{found.group(1)}/"
    return "not started"


def start_clients(out: Path, port: int, tokens: dict[str, str],
                  fields: tuple[str, str] = ("text", "label")) -> list[Child]:  # fmt: skip
    children = []
    for index, name in enumerate(CLIENTS):
        env = {**os.environ, "FEDROT_CLIENT_TOKEN": tokens[name]}
        command = [
            sys.executable, "-m", "fedrot_client.main",
            "--server", f"127.0.0.1:{port}",
            "--data", str(out / "data" / f"client-{index}.jsonl"),
            "--labels", str(out / "data" / "labels.json"),
            "--state-dir", str(out / "clients" / name),
            "--num-threads", "1",
            "--device", "cpu",
            "--text-field", fields[0],
            "--label-field", fields[1],
        ]  # fmt: skip
        children.append(start(name, command, out / "logs" / f"{name}.log", env))
    return children


def read_reports(run_root: Path) -> dict[int, dict[str, Any]]:
    """Round index -> report.json of every round the server closed so far."""
    reports = {}
    for path in run_root.glob("runs/*/rounds/*/report.json"):
        try:
            reports[int(path.parent.name)] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue  # being written; read it on the next poll
    return reports


HEADER = (f"{'round':>5}  {'reports':>7}  {'train loss':>10}  {'held-out acc':>12}  "
          f"{'agg. error':>10}  {'relative':>9}  {'elapsed':>7}")  # fmt: skip


def table_row(report: dict[str, Any], elapsed: float) -> str:
    summary = report["summary"]
    loss = summary.get("client_metrics", {}).get("train_loss")
    accuracy = summary.get("evaluation", {}).get("accuracy")
    error, relative = summary.get("aggregation_error"), summary.get("relative_aggregation_error")
    reports = f"{len(summary['reporters'])}/{len(summary['participants'])}"
    return (f"{summary['round']:>5}  {reports:>7}  {_fmt(loss, '.4f'):>10}  "
            f"{_fmt(accuracy and 100 * accuracy, '.1f', '%'):>12}  {_fmt(error, '.3e'):>10}  "
            f"{_fmt(relative, '.2e'):>9}  {elapsed:>6.0f}s")  # fmt: skip


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def follow_rounds(out: Path, children: list[Child], rounds: int, started: float,
                  deadline: float, *, header: str = HEADER,
                  row: Callable[[dict[str, Any], float], str] = table_row,
                  ) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Print each round's row as it closes; return when every process has exited."""
    printed: dict[int, dict[str, Any]] = {}
    print(header, flush=True)
    while any(c.process.poll() is None for c in children):
        for index, report in sorted(read_reports(out / "server").items()):
            # A row once the round's held-out scores are in (they come while the next trains).
            if index not in printed and not report["summary"].get("evaluating"):
                printed[index] = report
                print(row(report, time.monotonic() - started), flush=True)
        failed = [c for c in children if c.process.poll() not in (None, 0)]
        if failed:
            first = failed[0]
            raise RuntimeError(f"{first.name} exited with status {first.process.returncode}; "
                               f"see {first.log_path}")  # fmt: skip
        if time.monotonic() > deadline:
            raise TimeoutError(f"the federation did not finish {rounds} rounds in time")
        time.sleep(POLL_S)
    for index, report in sorted(read_reports(out / "server").items()):
        if index not in printed:
            printed[index] = report
            print(row(report, time.monotonic() - started), flush=True)
    return printed


def stop_all(children: list[Child]) -> None:
    """SIGTERM every process still running, then SIGKILL what has not exited in time."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    end = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.process.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        if child.pump is not None:
            child.pump.join(5)


def describe_data(manifest: dict[str, Any], out: Path, label_field: str = "label") -> str:
    counts = manifest["counts"]
    held_out = [json.loads(line)[label_field] for line in (out / "eval.jsonl").open()]
    majority = Counter(held_out).most_common(1)[0]
    classes = len(label_names(out))
    shards = ", ".join(f"{name}: {counts[f'client-{i}.jsonl']}" for i, name in enumerate(CLIENTS))
    task = ("WordNet glosses -> 45 lexicographer categories" if manifest["source"] == "wordnet"
            else f"{manifest['source']} -> {classes} labels")  # fmt: skip
    return (f"{task}; label-Dirichlet shards ({shards}; "
            f"skew {manifest['label_skew']:.2f}), held-out {counts['eval.jsonl']} "
            f"(chance 1/{classes} = {100 / classes:.1f}%, majority class {majority[0]} = "
            f"{100 * majority[1] / len(held_out):.1f}%)")  # fmt: skip


def run_demo(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    started = time.monotonic()
    deadline = started + args.timeout
    manifest = build_data(out / "data", args)
    print(describe_data(manifest, out / "data", data_fields(args)[1]), flush=True)
    tokens = {name: secrets.token_urlsafe(24) for name in CLIENTS}
    (out / "tokens.txt").write_text("".join(f"{n}={t}\n" for n, t in tokens.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    config = server_config(out, args)
    command = [sys.executable, "-m", "fedrot_server.main", "--config", str(config),
               "--listen", "127.0.0.1:0", "--dashboard-listen", "127.0.0.1:0"]  # fmt: skip
    children = [start("server", command, out / "logs" / "server.log", env)]
    try:
        port = wait_for_port(children[0], deadline)
        print(f"fedrot-server on 127.0.0.1:{port} ({args.strategy}, {args.model}, "
              f"{args.rounds} rounds x {args.local_steps} local steps); 3 fedrot-client "
              f"daemons; logs in {out / 'logs'}", flush=True)  # fmt: skip
        print(f"dashboard: {dashboard_url(children[0])}", flush=True)
        children += start_clients(out, port, tokens, data_fields(args))
        reports = follow_rounds(out, children, args.rounds, started, deadline)
    finally:
        stop_all(children)
    return summarize(out, reports, args.rounds, time.monotonic() - started)


def summarize(out: Path, reports: dict[int, dict[str, Any]], rounds: int, seconds: float) -> int:
    if len(reports) < rounds:
        print(f"only {len(reports)} of {rounds} rounds closed; see {out / 'logs'}")
        return 1
    adapters = sorted(out.glob(f"server/runs/*/rounds/{rounds - 1}/adapter"))
    accuracy = [r["summary"].get("evaluation", {}).get("accuracy") for _, r in
                sorted(reports.items())]  # fmt: skip
    if accuracy[0] is not None and accuracy[-1] is not None:
        print(f"held-out accuracy: {100 * accuracy[0]:.1f}% after round 0 -> "
              f"{100 * accuracy[-1]:.1f}% after round {rounds - 1}")  # fmt: skip
    print(f"final adapter (PEFT folder): {adapters[-1] if adapters else 'missing'}")
    print(f"demo finished in {seconds:.0f}s")
    return 0


def guarded(run: Callable[[], int]) -> int:
    """``run()``'s status; a failure or Ctrl-C is one line on stderr (1 or 130)."""
    try:
        return run()
    except (RuntimeError, TimeoutError, ValueError) as exc:  # ValueError: bad --data
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: run_demo(args))


if __name__ == "__main__":
    raise SystemExit(main())
