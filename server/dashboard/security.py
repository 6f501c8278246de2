"""Who may read and who may act: a read token (optional) and an admin token.

Tokens are compared with :func:`hmac.compare_digest` on their SHA-256 digests (constant time,
whatever the lengths). A request carries one as ``Authorization: Bearer <token>``; reads also
take ``?token=`` (for download links). No admin token configured: every admin action is
refused (403). No read token configured: reading is open.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from fedrot_server.dashboard.errors import ApiError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fedrot-dashboard"'}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Secret:
    """A token kept as its SHA-256 digest only."""

    digest: bytes

    @classmethod
    def of(cls, token: str | None) -> Secret | None:
        return cls(_digest(token)) if token else None

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(self.digest, _digest(token))


def presented_token(request: Request, *, allow_query: bool) -> str | None:
    """The bearer token of ``request`` (or its ``token`` query parameter when allowed)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthenticated", "authorization must be 'Bearer <token>'",
                           CHALLENGE)  # fmt: skip
        return token.strip()
    return request.query_params.get("token") if allow_query else None


@dataclass(frozen=True)
class Guard:
    """Checks requests against the configured read and admin tokens."""

    read: Secret | None
    admin: Secret | None

    @classmethod
    def of(cls, read_token: str | None, admin_token: str | None) -> Guard:
        return cls(Secret.of(read_token), Secret.of(admin_token))

    def check_read(self, request: Request) -> None:
        """Pass when reading is open, or the read (or admin) token is presented."""
        if self.read is None:
            return
        token = presented_token(request, allow_query=True)
        if token is None:
            raise ApiError(401, "unauthenticated", "this dashboard needs a read token", CHALLENGE)
        if not (self.read.matches(token) or (self.admin is not None and self.admin.matches(token))):
            raise ApiError(403, "forbidden", "wrong token")

    def check_admin(self, request: Request) -> None:
        """Pass only with the admin token; 403 when none is configured."""
        if self.admin is None:
            raise ApiError(403, "forbidden", "admin actions are disabled: set admin_token "
                           "(FEDROT_SERVER_ADMIN_TOKEN)")  # fmt: skip
        token = presented_token(request, allow_query=False)
        if token is None:
            raise ApiError(401, "unauthenticated", "admin actions need the admin token", CHALLENGE)
        if not self.admin.matches(token):
            raise ApiError(403, "forbidden", "wrong admin token")
