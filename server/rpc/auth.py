"""Who is calling: the bearer token in the call metadata, checked against the hashed store."""

from __future__ import annotations

from collections.abc import Iterable

from fedrot_server.errors import PermissionDeniedError, UnauthenticatedError
from fedrot_server.storage.store import SqliteStore

AUTHORIZATION = "authorization"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The token of ``authorization: Bearer <token>``; UnauthenticatedError when absent."""
    for key, value in metadata:
        if key.lower() != AUTHORIZATION:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
        return token.strip()
    raise UnauthenticatedError("missing authorization metadata ('Bearer <token>')")


class TokenAuthenticator:
    """Maps a call's bearer token to its client name (tokens are stored as SHA-256 only)."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def client_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        found = self._store.client_for_token(bearer_token(metadata or ()))
        if found is None:
            raise UnauthenticatedError("unknown token")
        name, revoked = found
        if revoked:
            raise PermissionDeniedError(f"client {name!r} is revoked")
        return name
