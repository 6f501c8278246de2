"""``make demo-llm``: federated instruction tuning of SmolLM2-135M on loopback.

Three ``fedrot-client`` daemons instruction-tune SmolLM2-135M-Instruct (LoRA on every linear
layer) on a WordNet reverse dictionary ("Which word is defined as: <definition>?" -> the word,
as chats), with FedRot-LoRA (lambda = 0.4); the server aggregates each round and scores the
global adapter on held-out definitions: greedy generation, exact match of the word, and
completion perplexity. Before the federation starts, the script scores the base model the same
way (zero-shot). One table row per round; ``<out>/summary.json`` at the end.

    python scripts/demo_llm.py [--out .demo-llm] [--rounds 3] [--local-steps 4] ...
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from demo import CLIENTS, Child, _fmt, dashboard_url, follow_rounds, guarded, start, stop_all
from demo import wait_for_port

from fedrot_client.wordnet import ShardOptions, read_synsets, write_shards

HEADER = (f"{'round':>5}  {'reports':>7}  {'train loss':>10}  {'exact match':>11}  "
          f"{'perplexity':>10}  {'agg. error':>10}  {'elapsed':>7}")  # fmt: skip


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".demo-llm"),
                        help="working folder (emptied first): data, logs, server state")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--min-learning-rate", type=float, default=5e-4,
                        help="cosine across rounds down to this")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--strategy", default="fedrot")
    parser.add_argument("--alignment-strength", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0, help="data split and run seed")
    parser.add_argument("--per-client", type=int, default=400, help="examples per client")
    parser.add_argument("--eval-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="label-Dirichlet alpha")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="skip scoring the base model first (it is the same for every run)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="give up after (s)")
    return parser.parse_args(argv)  # fmt: skip


def server_config(out: Path, args: argparse.Namespace) -> Path:
    config = {
        "state_dir": str(out / "server"),
        "rounds": args.rounds,
        "min_clients": len(CLIENTS),
        "tokens_file": str(out / "tokens.txt"),
        "seed": args.seed,
        "model": {"name": "smollm2", "task": "causal-lm"},
        "lora": {"rank": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0,
                 "target_modules": ["all-linear"]},
        "strategy": {"name": args.strategy, "alignment_strength": args.alignment_strength},
        "training": {"local_steps": args.local_steps, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "optimizer": "adamw",
                     "max_length": args.max_length, "round_lr_schedule": "cosine",
                     "min_learning_rate": args.min_learning_rate, "max_grad_norm": 1.0},
        "evaluation": {"data": str(out / "data" / "eval.jsonl"), "batch_size": 16,
                       "max_new_tokens": args.max_new_tokens, "extractor": "exact"},
        "round_deadline_s": 900.0,
        "linger_s": 5.0,
        "device": "cpu",
    }  # fmt: skip
    path = out / "server.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def zero_shot(out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The base model (the round-0 adapter is the identity: B = 0) scored like the rounds."""
    import torch

    from fedrot_client.answers import extractor_named
    from fedrot_client.generation import evaluate_generation
    from fedrot_client.instructions import evaluation_examples, load_instructions
    from fedrot_client.models import ModelSpec, TaskKind, load_base_model

    torch.set_num_threads(2)
    base = load_base_model(ModelSpec("smollm2", TaskKind.CAUSAL_LM))
    examples = evaluation_examples(load_instructions(out / "data" / "eval.jsonl"), base.tokenizer)
    result = evaluate_generation(base.model, base.tokenizer, examples,
                                 extractor=extractor_named("exact"),
                                 max_new_tokens=args.max_new_tokens, batch_size=16,
                                 max_length=args.max_length)  # fmt: skip
    return result.to_dict()


def start_clients(out: Path, port: int, tokens: dict[str, str]) -> list[Child]:
    children = []
    for index, name in enumerate(CLIENTS):
        env = {**os.environ, "FEDROT_CLIENT_TOKEN": tokens[name]}
        command = [sys.executable, "-m", "fedrot_client.main",
                   "--server", f"127.0.0.1:{port}",
                   "--data", str(out / "data" / f"client-{index}.jsonl"),
                   "--state-dir", str(out / "clients" / name),
                   "--num-threads", "1", "--device", "cpu"]  # fmt: skip
        children.append(start(name, command, out / "logs" / f"{name}.log", env))
    return children


def table_row(report: dict[str, Any], elapsed: float) -> str:
    summary = report["summary"]
    loss = summary.get("client_metrics", {}).get("train_loss")
    evaluation = summary.get("evaluation", {})
    exact, perplexity = evaluation.get("exact_match"), evaluation.get("perplexity")
    reports = f"{len(summary['reporters'])}/{len(summary['participants'])}"
    return (f"{summary['round']:>5}  {reports:>7}  {_fmt(loss, '.4f'):>10}  "
            f"{_fmt(exact and 100 * exact, '.1f', '%'):>11}  {_fmt(perplexity, '.2f'):>10}  "
            f"{_fmt(summary.get('aggregation_error'), '.3e'):>10}  {elapsed:>6.0f}s")  # fmt: skip


def run_demo(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    started = time.monotonic()
    options = ShardOptions(num_clients=len(CLIENTS), alpha=args.alpha, seed=args.seed,
                           eval_size=args.eval_size, max_per_client=args.per_client,
                           reverse_dictionary=True)  # fmt: skip
    manifest = write_shards(read_synsets(), out / "data", options)
    print(f"WordNet reverse dictionary (definition -> word, chats): {manifest['counts']}",
          flush=True)
    baseline = {} if args.no_zero_shot else zero_shot(out, args)
    if baseline:
        print(f"zero-shot SmolLM2-135M-Instruct: exact match {100 * baseline['exact_match']:.1f}%, "
              f"completion perplexity {baseline['perplexity']:.2f} "
              f"({time.monotonic() - started:.0f}s)", flush=True)  # fmt: skip
    tokens = {name: secrets.token_urlsafe(24) for name in CLIENTS}
    (out / "tokens.txt").write_text("".join(f"{n}={t}\n" for n, t in tokens.items()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "fedrot_server.main", "--config",
               str(server_config(out, args)), "--listen", "127.0.0.1:0",
               "--dashboard-listen", "127.0.0.1:0"]  # fmt: skip
    children = [start("server", command, out / "logs" / "server.log", env)]
    deadline = started + args.timeout
    try:
        port = wait_for_port(children[0], deadline)
        print(f"fedrot-server on 127.0.0.1:{port} ({args.strategy} lambda "
              f"{args.alignment_strength}, {args.rounds} rounds x {args.local_steps} steps); "
              f"dashboard {dashboard_url(children[0])}; logs in {out / 'logs'}", flush=True)
        children += start_clients(out, port, tokens)
        reports = follow_rounds(out, children, args.rounds, started, deadline, header=HEADER,
                                row=table_row)  # fmt: skip
    finally:
        stop_all(children)
    return summarize(out, reports, args, baseline, time.monotonic() - started)


def summarize(out: Path, reports: dict[int, dict[str, Any]], args: argparse.Namespace,
              baseline: dict[str, float], seconds: float) -> int:  # fmt: skip
    if len(reports) < args.rounds:
        print(f"only {len(reports)} of {args.rounds} rounds closed; see {out / 'logs'}")
        return 1
    last = args.rounds - 1
    folder = next(iter(sorted(out.glob(f"server/runs/*/rounds/{last}/adapter"))), None)
    rounds = [{"round": index, **report["summary"].get("evaluation", {}),
               "train_loss": report["summary"].get("client_metrics", {}).get("train_loss"),
               "aggregation_error": report["summary"].get("aggregation_error")}
              for index, report in sorted(reports.items())]  # fmt: skip
    summary = {
        "task": "wordnet-reverse-dictionary", "model": "smollm2", "strategy": args.strategy,
        "alignment_strength": args.alignment_strength, "seed": args.seed,
        "zero_shot_exact_match": baseline.get("exact_match"),
        "zero_shot_perplexity": baseline.get("perplexity"),
        "final_exact_match": rounds[-1].get("exact_match"),
        "final_perplexity": rounds[-1].get("perplexity"),
        "final_adapter_dir": str(folder) if folder else None,
        "rounds": rounds, "seconds": round(seconds, 1),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    before = (f"{100 * baseline['exact_match']:.1f}% zero-shot -> " if baseline else "")
    print(f"exact match: {before}{100 * (summary['final_exact_match'] or 0):.1f}% after "
          f"round {last}")
    print(f"final adapter: {folder} (peft.AutoPeftModelForCausalLM.from_pretrained loads it)")
    print(f"summary: {out / 'summary.json'}; demo finished in {seconds:.0f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: run_demo(args))


if __name__ == "__main__":
    raise SystemExit(main())
