"""Plain value checks shared by the settings and the read-only dashboard, which must not import
torch (the settings do, through the strategy names)."""

from __future__ import annotations


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; port 0 asks the OS for a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen must be host:port with port 0..65535, got {value!r}")
    return host, int(port)


# The placeholder tokens of the published examples (.env.example: change-me-...): anyone can read
# them, so a server never accepts one.
PLACEHOLDER_PREFIX = "change-me"


def check_secret(token: str) -> str:
    """Any token (a client's, the admin's, the dashboard's): at least 16 characters, no spaces,
    not a published placeholder. The message never shows the token."""
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError("must be >= 16 characters without spaces")
    if token.lower().startswith(PLACEHOLDER_PREFIX):
        raise ValueError(
            f"is a published placeholder ({PLACEHOLDER_PREFIX}...): generate one, e.g. "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return token


def check_dashboard_token(token: str) -> str:
    """An admin or dashboard read token."""
    return check_secret(token)


def read_secret_file(path: str, setting: str) -> str:
    """The token on the first line of ``path`` (the file form of a token setting)."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"{setting} {path}: {exc.strerror}") from exc
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"{setting} {path}: empty")
    return token
