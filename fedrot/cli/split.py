"""``fedrot split``: a dataset divided into client shards, with the server settings that match.

::

    fedrot split DATA --clients N --alpha A [--per-client K] [--eval-size M] [--seed S] \\
        [--text-field F] [--label-field F] [--labels labels.json] [--task causal-lm] \\
        [--model minilm] --out DIR

Reads DATA (JSONL, CSV/TSV or a saved Hugging Face dataset) and checks every row as a client
daemon would; holds out ``--eval-size`` rows (drawn before the split), divides the rest by a
label-Dirichlet(``alpha``) draw (each shard capped at ``--per-client``), and writes under DIR:
``client-<i>.jsonl``, ``eval.jsonl``, ``labels.json``, ``manifest.json``, ``server.toml``
(model, label count, held-out evaluation and tokens file filled in), ``tokens.txt`` (the
server's ``name=token`` lines, fresh random tokens) and ``tokens/client-<i>.token`` (each
client's own). Prints the commands that start the server and each client.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrot.cli.files import InputError, write_file

SERVER_CONFIG = "server.toml"
SERVER_TOKENS = "tokens.txt"
TOKENS_DIR = "tokens"
DEFAULT_SERVER = "127.0.0.1:50051"
TOKEN_BYTES = 24


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``split`` on the top-level subparsers."""
    parser = commands.add_parser("split", help="split a dataset into client shards",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("data", type=Path, help=".jsonl, .csv/.tsv or a saved HF dataset folder")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--alpha", type=float, required=True,
                        help="label-Dirichlet concentration: small is skewed, large near IID")
    parser.add_argument("--per-client", type=int, default=None,
                        help="cap on a client's rows (default: no cap)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="held-out rows for the server's evaluation (0: none; default: a "
                        "tenth of the rows, at most 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label",
                        help="classification: the label; causal LM: divides the split if present")
    parser.add_argument("--labels", type=Path, default=None,
                        help="JSON list of label names in id order (default: read off the data)")
    parser.add_argument("--task", choices=["classification", "causal-lm"],
                        default="classification")
    parser.add_argument("--model", default="minilm",
                        help="server.toml's model.name: a registry name or a folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the files")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from fedrot_client.data import FieldNames  # numpy, the data readers: only here
    from fedrot_client.shards import SplitOptions, split_user_data

    _check_numbers(args)
    out = args.out.resolve()
    options = SplitOptions(num_clients=args.clients, alpha=args.alpha, seed=args.seed,
                           eval_size=args.eval_size, max_per_client=args.per_client)  # fmt: skip
    classification = args.task == "classification"
    try:
        manifest = split_user_data(args.data, out, options, classification=classification,
                                   fields=FieldNames(args.text_field, args.label_field),
                                   labels_file=args.labels)  # fmt: skip
    except ValueError as exc:  # DataError included: names file:line and field
        raise InputError(str(exc)) from exc
    except OSError as exc:
        raise InputError(f"{out}: cannot write: {exc.strerror or exc}") from exc
    names = [f"client-{i}" for i in range(args.clients)]
    tokens = write_tokens(out, names)
    labels = _read_labels(out) if manifest["num_labels"] else None
    settings = server_settings(out, args, manifest, labels)
    write_file(out / SERVER_CONFIG, render_toml(settings).encode())
    print(describe(out, manifest, names, tokens, args))
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    if args.clients < 1:
        raise InputError(f"--clients must be >= 1, got {args.clients}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise InputError(f"--alpha must be a positive number, got {args.alpha}")
    if args.per_client is not None and args.per_client < 1:
        raise InputError(f"--per-client must be >= 1, got {args.per_client}")
    if args.eval_size is not None and args.eval_size < 0:
        raise InputError(f"--eval-size must be >= 0, got {args.eval_size}")


def _read_labels(out: Path) -> list[str]:
    return [str(name) for name in json.loads((out / "labels.json").read_text(encoding="utf-8"))]


def write_tokens(out: Path, names: Sequence[str]) -> dict[str, Path]:
    """Fresh random tokens: the server's ``tokens.txt`` (``name=token`` lines) and one file per
    client under ``tokens/`` (its first line is the token), all readable by the owner only."""
    tokens = {name: secrets.token_urlsafe(TOKEN_BYTES) for name in names}
    (out / TOKENS_DIR).mkdir(exist_ok=True)
    _write_private(out / SERVER_TOKENS, "".join(f"{n}={t}\n" for n, t in tokens.items()))
    files = {}
    for name, token in tokens.items():
        files[name] = out / TOKENS_DIR / f"{name}.token"
        _write_private(files[name], token + "\n")
    return files


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def server_settings(
    out: Path, args: argparse.Namespace, manifest: Mapping[str, Any], labels: list[str] | None
) -> dict[str, Any]:
    """The ``fedrot-server`` settings that match the split (absolute paths)."""
    model: dict[str, Any] = {"name": args.model, "task": args.task}
    if args.task == "classification":  # the run's class names; num_labels follows from them
        model["labels"] = list(labels or ())
    settings: dict[str, Any] = {
        "state_dir": str(out / "server-state"),
        "min_clients": args.clients,
        "tokens_file": str(out / SERVER_TOKENS),
        "model": model,
    }
    if args.task == "causal-lm":  # the default query/value are BERT's names
        settings["lora"] = {"target_modules": ["all-linear"]}
    if "eval.jsonl" in manifest["counts"]:
        evaluation: dict[str, Any] = {"data": str(out / "eval.jsonl"),
                                      "text_field": args.text_field}  # fmt: skip
        if args.task == "classification":
            evaluation["label_field"] = args.label_field
        settings["evaluation"] = evaluation
    return settings


def render_toml(settings: Mapping[str, Any]) -> str:
    """``settings`` (top-level values, then one level of tables of str, int, float, bool and
    lists of them) as TOML; checked by reading it back."""
    header = ("# fedrot-server settings written by `fedrot split` to match its shards.\n"
              "# Edit rounds, lora.*, strategy.* and training.* to taste (README: Configuration);\n"
              "# listen on another address than 127.0.0.1 for clients on other machines.\n")
    lines = [f"{key} = {_value(v)}" for key, v in settings.items() if not isinstance(v, Mapping)]
    for name, table in settings.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{name}]", *(f"{key} = {_value(v)}" for key, v in table.items())]
    text = header + "\n".join(lines) + "\n"
    if tomllib.loads(text) != json.loads(json.dumps(settings)):
        raise RuntimeError("server.toml does not read back as written")
    return text


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        items = [_value(v) for v in value]
        if len(items) <= 4:
            return "[" + ", ".join(items) + "]"
        return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def describe(out: Path, manifest: Mapping[str, Any], names: Sequence[str],
             tokens: Mapping[str, Path], args: argparse.Namespace) -> str:  # fmt: skip
    """What was written, and the commands that start the federation."""
    counts = manifest["counts"]
    sizes = ", ".join(str(counts[f"{name}.jsonl"]) for name in names)
    held_out = counts.get("eval.jsonl", 0)
    labels = f"{manifest['num_labels']} labels, " if manifest["num_labels"] else ""
    lines = [
        f"wrote {len(names)} client shards to {out} ({sizes} rows; {labels}label skew "
        f"{manifest['label_skew']:.2f}), {held_out} held-out rows, {SERVER_CONFIG}, "
        f"{SERVER_TOKENS} and one token file per client",
        "",
        "start the server:",
        "  " + shlex.join(["fedrot-server", "--config", str(out / SERVER_CONFIG)]),
        "",
        "start each client (on another machine: copy its shard, labels.json and its token file",
        "there, the token over a private channel, and give --server the server's host:port):",
    ]
    for name in names:
        lines.append("  " + shlex.join(_client_command(out, name, tokens[name], manifest, args)))
    return "\n".join(lines)


def _client_command(out: Path, name: str, token_file: Path, manifest: Mapping[str, Any],
                    args: argparse.Namespace) -> list[str]:  # fmt: skip
    command = ["fedrot-client", "--server", DEFAULT_SERVER, "--token-file", str(token_file),
               "--data", str(out / f"{name}.jsonl")]  # fmt: skip
    if manifest["num_labels"] and args.task == "classification":
        command += ["--labels", str(out / "labels.json")]
    if args.text_field != "text":
        command += ["--text-field", args.text_field]
    if args.label_field != "label" and args.task == "classification":
        command += ["--label-field", args.label_field]
    return [*command, "--state-dir", f"{name}-state"]
