"""``fedrot run submit RUN.toml``, ``fedrot run list``, ``fedrot run stop RUN_ID``: a standing
server's runs over its dashboard's admin API (``/api/v1/runs``).

``RUN.toml`` holds the run's settings under the server's run-setting names (``rounds = 3``,
``[lora] rank = 8``, ``[model] name = "minilm"``, ``clients = ["alice", "bob"]``, ...); paths in
it (``evaluation.data``) are read by the server. The admin token comes from ``--admin-token``,
``--admin-token-file`` (its first line) or ``FEDROT_ADMIN_TOKEN``; ``list`` also takes the
dashboard's read token there. The server's answer to a refused request (401, 403, 404, 409,
422) or an unreachable server ends the command with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fedrot.cli.files import InputError

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_ENV = "FEDROT_ADMIN_TOKEN"
URL_ENV = "FEDROT_URL"
API = "/api/v1"
TIMEOUT_S = 60.0
REFUSED = 1


class RequestFailed(Exception):
    """The server refused the request, or could not be reached (the message says which)."""


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``run`` (``submit``, ``list``, ``stop``) on the top-level subparsers."""
    parser = commands.add_parser("run", help="submit, list and stop a standing server's runs",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    submit = actions.add_parser("submit", help="queue a run; prints its id")
    submit.add_argument("settings", type=Path, help="TOML (or .json) file of the run's settings")
    actions.add_parser("list", help="every run: id, phase (queued: its place), rounds")
    stop = actions.add_parser("stop", help="cancel a queued run or stop the active one")
    stop.add_argument("run_id")
    for action in (submit, actions.choices["list"], stop):
        action.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                            help=f"the server's dashboard (default ${URL_ENV} or {DEFAULT_URL})")
        action.add_argument("--admin-token", default=None, help=f"default: ${TOKEN_ENV}")
        action.add_argument("--admin-token-file", type=Path, default=None,
                            help="file whose first line is the admin token")  # fmt: skip
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    token = admin_token(args.admin_token, args.admin_token_file)
    client = RunsClient(args.url, token)
    try:
        if args.action == "submit":
            print(client.submit(read_run_settings(args.settings)))
        elif args.action == "list":
            for line in format_runs(client.list()):
                print(line)
        else:
            print(client.stop(args.run_id))
    except RequestFailed as exc:
        print(f"fedrot run {args.action}: {exc}", file=sys.stderr)
        return REFUSED
    return 0


def admin_token(given: str | None, path: Path | None) -> str | None:
    """``given``, else the first line of ``path``, else ``$FEDROT_ADMIN_TOKEN`` (None: none)."""
    if given and path:
        raise InputError("give --admin-token or --admin-token-file, not both")
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror}") from None
        if not lines or not lines[0].strip():
            raise InputError(f"{path}: the first line holds no token")
        return lines[0].strip()
    return given or os.environ.get(TOKEN_ENV) or None


def read_run_settings(path: Path) -> dict[str, Any]:
    """The table of settings in a ``.toml`` (or ``.json``) file."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a table of run settings")
    return data


class RunsClient:
    """The admin API's run endpoints at ``url`` (the dashboard's base URL)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.base = url.rstrip("/")
        self.token = token

    def submit(self, settings: dict[str, Any]) -> str:
        return self._call("POST", "/runs", settings)["run_id"]

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/runs")

    def stop(self, run_id: str) -> str:
        answer = self._call("POST", f"/runs/{urllib.request.quote(run_id, safe='')}/stop")
        return f"{answer['run_id']}: {answer['detail']}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + API + path, data=data, method=method,
                                         headers=headers)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RequestFailed(describe_refusal(exc.code, exc.read())) from None
        except urllib.error.URLError as exc:
            raise RequestFailed(f"cannot reach {self.base}: {unreachable(exc.reason)}") from None
        except (OSError, ValueError) as exc:
            raise RequestFailed(f"no readable answer from {self.base}: {exc}") from None


def unreachable(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server's dashboard listening there?)"
    return str(getattr(reason, "strerror", None) or reason)


def describe_refusal(status: int, body: bytes) -> str:
    """One line for an error answer ``{"error", "detail"}`` (422: each bad setting)."""
    try:
        answer = json.loads(body)
        error, detail = answer.get("error", ""), answer.get("detail")
    except (ValueError, AttributeError):
        error, detail = "", body.decode(errors="replace").strip()[:200]
    if isinstance(detail, list):
        detail = "; ".join(f"{p.get('where') or 'settings'}: {p.get('problem')}"
                           if isinstance(p, dict) else str(p) for p in detail)  # fmt: skip
    hint = ""
    if status == 401:
        hint = f" (give --admin-token, --admin-token-file or ${TOKEN_ENV})"
    return f"{status} {error}: {detail}{hint}".replace("\n", " ")


def format_runs(runs: list[dict[str, Any]]) -> list[str]:
    """One line per run: id, phase (queued: ``queued #2``), rounds completed of total."""
    lines = []
    for run in runs:
        phase = run.get("phase", "?")
        if run.get("queue_position"):
            phase = f"{phase} #{run['queue_position']}"
        total = run.get("rounds_total")
        lines.append(f"{run['run_id']}  {phase:<10}  rounds {run.get('rounds_completed', 0)}/"
                     f"{'?' if total is None else total}")  # fmt: skip
    return lines
