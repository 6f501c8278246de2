"""Who may read and who may act: a read token (optional) and an admin token.

Tokens are compared with :func:`hmac.compare_digest` on their SHA-256 digests (constant time,
whatever the lengths). An API user sends one as ``Authorization: Bearer <token>``. The page
trades the read token once for a session cookie (``POST /api/v1/session``): HttpOnly,
``SameSite=Strict``, signed with a key that lives only in this process and expiring after
:data:`SESSION_TTL_S`; the browser then sends it with every read, download links included, so
no token ever sits in a URL. A ``?token=`` query parameter is refused. The cookie only reads:
admin actions always need the admin token in the header. No admin token configured: every
admin action is refused (403). No read token configured: reading is open.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from fastapi import Request

from fedrot_server.dashboard.errors import ApiError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fedrot-dashboard"'}
SESSION_COOKIE = "fedrot_session"
SESSION_TTL_S = 12 * 3600.0
QUERY_TOKEN = "token"


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


@dataclass(frozen=True)
class SessionSigner:
    """Makes and checks session cookie values ``<expiry>.<hmac>`` under a per-process key."""

    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def _mac(self, expires: str) -> str:
        return hmac.new(self.key, f"read|{expires}".encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float, ttl_s: float = SESSION_TTL_S) -> str:
        expires = str(int(now + ttl_s))
        return f"{expires}.{self._mac(expires)}"

    def valid(self, value: str, now: float) -> bool:
        expires, _, mac = value.partition(".")
        if not expires.isascii() or not expires.isdigit() or len(expires) > 12:
            return False
        return hmac.compare_digest(mac, self._mac(expires)) and now < int(expires)


def bearer_token(request: Request) -> str | None:
    """The bearer token of ``request``'s Authorization header (None: no header); 401 when the
    header is malformed or a token comes in the query string instead."""
    if QUERY_TOKEN in request.query_params:
        raise ApiError(401, "unauthenticated", "a token in the URL is not accepted: send "
                       "'Authorization: Bearer <token>', or sign in on the page (a session "
                       "cookie)", CHALLENGE)  # fmt: skip
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated", "authorization must be 'Bearer <token>'",
                       CHALLENGE)  # fmt: skip
    return token.strip()


@dataclass(frozen=True)
class Guard:
    """Checks requests against the configured read and admin tokens and session cookies."""

    read: Secret | None
    admin: Secret | None
    sessions: SessionSigner = field(default_factory=SessionSigner)

    @classmethod
    def of(cls, read_token: str | None, admin_token: str | None) -> Guard:
        return cls(Secret.of(read_token), Secret.of(admin_token))

    @property
    def read_required(self) -> bool:
        return self.read is not None

    @property
    def admin_enabled(self) -> bool:
        return self.admin is not None

    def reads(self, token: str) -> bool:
        """Whether ``token`` may read (the read token, or the admin token)."""
        if self.read is not None and self.read.matches(token):
            return True
        return self.admin is not None and self.admin.matches(token)

    def has_session(self, request: Request, now: float) -> bool:
        value = request.cookies.get(SESSION_COOKIE)
        return value is not None and self.sessions.valid(value, now)

    def check_read(self, request: Request, now: float) -> None:
        """Pass when reading is open, or the read (or admin) token is presented, or a valid
        session cookie."""
        token = bearer_token(request)
        if self.read is None:
            return
        if token is None:
            if self.has_session(request, now):
                return
            raise ApiError(401, "unauthenticated", "this dashboard needs a read token", CHALLENGE)
        if not self.reads(token):
            raise ApiError(403, "forbidden", "wrong token")

    def check_admin(self, request: Request) -> None:
        """Pass only with the admin token in the header; 403 when none is configured."""
        if self.admin is None:
            raise ApiError(403, "forbidden", "admin actions are disabled: set admin_token "
                           "(FEDROT_SERVER_ADMIN_TOKEN)")  # fmt: skip
        token = bearer_token(request)
        if token is None:
            raise ApiError(401, "unauthenticated", "admin actions need the admin token", CHALLENGE)
        if not self.admin.matches(token):
            raise ApiError(403, "forbidden", "wrong admin token")
