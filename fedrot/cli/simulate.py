"""``fedrot simulate``: a whole federation in one process, for comparing strategies.

::

    fedrot simulate --strategy fedrot --lambda 0.4 --clients 10 --alpha 0.1 --rounds 10 \\
        --local-steps 5 --batch-size 8 --lr 0.3 --seed 0 --out runs/fedrot [--backend ray] \\
        [--data train.jsonl [--eval-data test.jsonl] [--text-field F] [--label-field F] \\
         [--labels labels.json]]
    fedrot simulate --model smollm2 --task causal-lm --wordnet-task reverse-dictionary \\
        --target-modules all-linear --optimizer adamw --lr 2e-3 --out runs/sft   # or --data chats.jsonl

N virtual clients with label-Dirichlet shards (WordNet, or the user's ``--data``: JSONL,
CSV/TSV or a saved Hugging Face dataset, read like the client daemon reads it) share one base
model; each round the sampled clients run the client daemon's local training (TRL's
``SFTTrainer`` on instruction data: prompt/completion, chat or Alpaca rows) and the strategy
aggregates their uploads. Writes ``metrics.json``, ``metrics.csv`` and ``curves.png`` under
``--out``. The training code lives in ``fedrot_client.simulation`` and is imported only when the
command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedrot.strategies import StrategyName

BACKENDS = ("in-process", "ray")
CLIENT_BASES = ("shared", "haar")
CLIENT_INITS = ("shared", "independent")
WORDNET_TASKS = ("categories", "glosses", "reverse-dictionary")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on the top-level subparsers."""
    parser = commands.add_parser("simulate", help="simulate a federation in one process",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    federation = parser.add_argument_group("federation")
    federation.add_argument("--strategy", default="fedrot", choices=[str(n) for n in StrategyName])
    federation.add_argument("--lambda", dest="lam", type=float, default=0.4,
                            help="FedRot alignment strength in [0, 1]")
    federation.add_argument("--align-first", choices=["A", "B"], default="A")
    federation.add_argument("--clients", type=int, default=3)
    federation.add_argument("--client-fraction", type=float, default=1.0,
                     help="fraction of clients sampled each round")
    federation.add_argument("--rounds", type=int, default=10)
    federation.add_argument("--seed", type=int, default=0)
    federation.add_argument("--backend", choices=BACKENDS, default="in-process")
    federation.add_argument("--client-basis", choices=CLIENT_BASES, default="shared",
                            help="haar: each client reports its factors in its own random basis "
                            "(a stress test of factor averaging)")
    federation.add_argument("--client-init", choices=CLIENT_INITS, default="shared",
                            help="independent: in round 0 each client starts from LoRA factors "
                            "drawn from its own seed instead of the broadcast initial adapter")
    federation.add_argument("--stale-fraction", type=float, default=0.0,
                            help="share of each round's clients (t >= 1) whose update was trained "
                            "from the previous round's adapter (a late update)")
    federation.add_argument("--staleness-weight", type=float, default=0.5,
                            help="weight factor of a stale update (the server's staleness_weight)")
    data = parser.add_argument_group("data (WordNet unless --data)")
    data.add_argument("--data", type=Path, default=None,
                      help="your data: .jsonl, .csv/.tsv or a saved HF dataset folder")
    data.add_argument("--eval-data", type=Path, default=None,
                      help="held-out data in the same format (default: --eval-size rows of "
                      "--data, held out before the split)")
    data.add_argument("--text-field", default="text")
    data.add_argument("--label-field", default="label",
                      help="classification: the label; causal LM: divides the split if present")
    data.add_argument("--labels", type=Path, default=None,
                      help="JSON list of label names in id order (default: read off the data)")
    data.add_argument("--alpha", type=float, default=0.5, help="label-Dirichlet concentration")
    data.add_argument("--per-client", type=int, default=300, help="examples per client (cap)")
    data.add_argument("--eval-size", type=int, default=200)
    data.add_argument("--eval-every", type=int, default=1,
                      help="evaluate every k-th round (and the last)")
    data.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    data.add_argument("--wordnet-task", choices=WORDNET_TASKS, default=None,
                      help="WordNet as gloss -> category (classification; the default), "
                           "'word: gloss' texts (causal-lm; its default) or reverse-dictionary "
                           "chats, definition -> word (causal-lm instruction tuning)")
    data.add_argument("--max-new-tokens", type=int, default=32,
                      help="instruction data: the longest greedy answer scored")
    data.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                      help="chat rows: a Jinja chat template for a tokenizer without one")
    data.add_argument("--extractor", default="exact",
                      help="instruction data: how an answer is matched (exact, last-number, "
                           "gsm8k, answer-is, regex:PATTERN)")
    model = parser.add_argument_group("model and local training")
    model.add_argument("--model", default="minilm", help="registry name or folder")
    model.add_argument("--task", choices=["classification", "causal-lm"],
                       default="classification")
    model.add_argument("--num-labels", type=int, default=None,
                       help="default: 45 on WordNet, the label count of --data")
    model.add_argument("--rank", type=int, default=4)
    model.add_argument("--lora-alpha", type=float, default=8.0)
    model.add_argument("--lora-dropout", type=float, default=0.05)
    model.add_argument("--target-modules", default="query,value")
    model.add_argument("--local-steps", type=int, default=5)
    model.add_argument("--batch-size", type=int, default=8)
    model.add_argument("--lr", type=float, default=0.3)
    model.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    model.add_argument("--max-length", type=int, default=32)
    model.add_argument("--eval-batch-size", type=int, default=100)
    model.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, required=True, help="folder for the metrics files")
    parser.add_argument("--no-plot", action="store_true", help="skip curves.png")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from fedrot_client.simulation.command import run_command  # transformers: only here

    return run_command(args)
