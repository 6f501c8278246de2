#!/usr/bin/env python3
"""``fedrot-secrets-init``: make a federation's tokens the first time, reuse them afterwards.

    fedrot-secrets-init init [--dir DIR] [--client NAME[=PATH]]... [--extra-clients A,B]
                             [--owner UID:GID]
    fedrot-secrets-init show [--dir DIR] [NAME]...

``init`` keeps in ``DIR`` (default ``$FEDROT_SECRETS_DIR``, else ``/run/fedrot-secrets``):

- ``tokens``: one ``name=token`` line per client named by ``--client`` and ``--extra-clients``,
  and no other (the server's ``FEDROT_SERVER_TOKENS_FILE``; a name left out is revoked by the
  server at its next start);
- ``admin-token`` and ``dashboard-read-token``: the token on one line
  (``FEDROT_SERVER_ADMIN_TOKEN_FILE``, ``FEDROT_SERVER_DASHBOARD_READ_TOKEN_FILE``);

and, for each ``--client NAME=PATH``, that client's own token in ``PATH`` (its
``FEDROT_CLIENT_TOKEN_FILE``), so a client container can be given its own token and nothing else.

A usable token already there is kept (16 or more characters, no spaces, not a ``change-me...``
placeholder); a missing or unusable one is replaced by ``secrets.token_urlsafe(32)``. A file is
rewritten only when its text changes, atomically, mode 0400; run as root, ``--owner`` makes the
files that user's (the images run as 10001). ``init`` never prints a token; ``show`` prints the
named ones (default: the admin and dashboard read tokens), one ``name: token`` line each.
Standard library only: the images run it, and so can any Python 3.11 on a workstation.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = "/run/fedrot-secrets"
TOKENS, ADMIN, READ = "tokens", "admin-token", "dashboard-read-token"
SINGLE_TOKENS = (ADMIN, READ)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PLACEHOLDER_PREFIX = "change-me"  # fedrot_server.checks refuses these too
MIN_TOKEN_CHARS = 16
EXIT_OK, EXIT_ERROR = 0, 2
SHOW_HINT = (
    "show the admin and dashboard read tokens with `fedrot-secrets-init show` "
    "(compose: docker compose run --rm secrets-init fedrot-secrets-init show)"
)


class SecretsError(Exception):
    """A bad argument or an unreadable file; the message names it."""


@dataclass(frozen=True)
class ClientSpec:
    """A client to hold a token: its name, and where its own copy goes (None: nowhere)."""

    name: str
    path: Path | None = None


def usable(token: str) -> bool:
    """A token the server accepts: 16+ characters, no spaces, not a published placeholder."""
    return (
        len(token) >= MIN_TOKEN_CHARS
        and not any(c.isspace() for c in token)
        and not token.startswith(PLACEHOLDER_PREFIX)
    )


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_tokens(path: Path) -> dict[str, str]:
    """``name=token`` lines of ``path`` ({} when it does not exist); comments skipped."""
    if not path.exists():
        return {}
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, token = text.partition("=")
        if not sep:
            raise SecretsError(f"{path}:{number}: expected name=token")
        tokens[name.strip()] = token.strip()
    return tokens


def read_single(path: Path) -> str | None:
    """The first line of ``path``, or None when it does not exist."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    return lines[0].strip() if lines else ""


def parse_client(text: str) -> ClientSpec:
    """argparse type of ``--client``: ``NAME`` or ``NAME=PATH``."""
    name, sep, path = text.partition("=")
    check_name(name)
    if sep and not path:
        raise argparse.ArgumentTypeError(f"--client {text!r}: empty PATH")
    return ClientSpec(name, Path(path) if path else None)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name in (TOKENS, *SINGLE_TOKENS):
        raise argparse.ArgumentTypeError(
            f"client name {name!r}: letters, digits, '.', '_' or '-', not starting with "
            f"a punctuation mark, and not {TOKENS!r}, {ADMIN!r} or {READ!r}"
        )
    return name


def parse_owner(text: str) -> tuple[int, int]:
    """argparse type of ``--owner``: ``UID:GID`` (numbers)."""
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"--owner must be UID:GID (numbers), got {text!r}")
    return int(uid), int(gid)


def write_secret(path: Path, text: str, owner: tuple[int, int] | None) -> bool:
    """Write ``text`` to ``path`` (mode 0400, atomically) unless it holds it already.
    True when the file was written."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.chmod(scratch, 0o400)
        if owner is not None and os.geteuid() == 0:
            os.chown(scratch, *owner)
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return True


def kept_or_new(token: str | None) -> tuple[str, str]:
    """``(token, what happened)``: the old token when usable, else a new one."""
    if token is not None and usable(token):
        return token, "kept"
    return new_token(), "generated" if token is None else "replaced (unusable)"


def initialise(
    folder: Path, clients: Sequence[ClientSpec], owner: tuple[int, int] | None
) -> list[str]:
    """Make or reuse every secret in ``folder`` (see the module docstring); one report line
    per secret, none showing a token."""
    names = [client.name for client in clients]
    if len(set(names)) < len(names):
        raise SecretsError(f"a client is named twice: {names}")
    if not names:
        raise SecretsError("no clients: give --client NAME (the server needs at least one)")
    old = read_tokens(folder / TOKENS)
    tokens: dict[str, str] = {}
    report = []
    for name in names:
        tokens[name], what = kept_or_new(old.get(name))
        report.append(f"{name}: token {what}")
    report += [f"{name}: removed (the server revokes it)" for name in old if name not in tokens]
    if len(set(tokens.values())) < len(tokens):  # a token copied between names by hand
        raise SecretsError(f"{folder / TOKENS}: two clients share a token; remove one of them")
    write_secret(folder / TOKENS, "".join(f"{n}={t}\n" for n, t in tokens.items()), owner)
    for name in SINGLE_TOKENS:
        token, what = kept_or_new(read_single(folder / name))
        write_secret(folder / name, token + "\n", owner)
        report.append(f"{name}: {what}")
    for client in clients:
        if client.path is not None:
            write_secret(client.path, tokens[client.name] + "\n", owner)
    return report


def show(folder: Path, names: Sequence[str]) -> list[str]:
    """``name: token`` lines of the named secrets (a client name, ``admin-token`` or
    ``dashboard-read-token``)."""
    tokens = read_tokens(folder / TOKENS)
    lines = []
    for name in names or SINGLE_TOKENS:
        token = read_single(folder / name) if name in SINGLE_TOKENS else tokens.get(name)
        if token is None:
            known = ", ".join([*SINGLE_TOKENS, *tokens]) or "nothing (run init first)"
            raise SecretsError(f"{folder}: no secret {name!r}; it holds {known}")
        lines.append(f"{name}: {token}")
    return lines


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrot-secrets-init",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    default_dir = Path(os.environ.get("FEDROT_SECRETS_DIR", DEFAULT_DIR))
    init = commands.add_parser("init", help="make the missing tokens, keep the others")
    init.add_argument("--dir", type=Path, default=default_dir, help=f"default {default_dir}")
    init.add_argument("--client", type=parse_client, action="append", default=[],
                      metavar="NAME[=PATH]", help="a client; PATH gets its own token")  # fmt: skip
    init.add_argument("--extra-clients", default="", metavar="A,B",
                      help="more client names, comma-separated (blank: none)")  # fmt: skip
    init.add_argument("--owner", type=parse_owner, help="UID:GID of the files (when root)")
    show_parser = commands.add_parser("show", help="print tokens (default: admin and read)")
    show_parser.add_argument("--dir", type=Path, default=default_dir, help=f"default {default_dir}")
    show_parser.add_argument("names", nargs="*", metavar="NAME")
    return parser.parse_args(argv)


def extra_clients(text: str) -> list[ClientSpec]:
    """The ``--extra-clients`` list: names separated by commas or spaces; blanks ignored."""
    try:
        return [ClientSpec(check_name(n)) for n in re.split(r"[,\s]+", text) if n]
    except argparse.ArgumentTypeError as exc:
        raise SecretsError(f"--extra-clients: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "show":
            print("\n".join(show(args.dir, args.names)))
            return EXIT_OK
        clients = [*args.client, *extra_clients(args.extra_clients)]
        for line in initialise(args.dir, clients, args.owner):
            print(f"fedrot-secrets-init: {args.dir}: {line}")
    except (SecretsError, OSError) as exc:
        print(f"fedrot-secrets-init: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"fedrot-secrets-init: {SHOW_HINT}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
