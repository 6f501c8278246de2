"""Plain value checks shared by the settings and the read-only dashboard, which must not import
torch (the settings do, through the strategy names)."""

from __future__ import annotations


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; port 0 asks the OS for a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen must be host:port with port 0..65535, got {value!r}")
    return host, int(port)


def check_dashboard_token(token: str) -> str:
    """An admin or dashboard read token: at least 16 characters, no spaces."""
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError("must be >= 16 characters without spaces")
    return token
