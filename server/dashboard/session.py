"""``/api/v1/session``: what the page may do, and the read token traded for a session cookie.

``GET`` is open (the page asks it first: must it ask for a token, are admin actions set up);
``POST`` with ``Authorization: Bearer <read or admin token>`` sets the HttpOnly cookie that
lets the browser read (downloads included) without the token in any URL; ``DELETE`` drops it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from fedrot_server.dashboard.errors import ApiError
from fedrot_server.dashboard.schemas import ErrorBody, SessionInfo
from fedrot_server.dashboard.security import CHALLENGE, SESSION_COOKIE, SESSION_TTL_S, bearer_token

PREFIX = "/api/v1"
router = APIRouter(prefix=PREFIX, tags=["session"],
                   responses={code: {"model": ErrorBody} for code in (401, 403)})  # fmt: skip


def _info(request: Request, signed_in: bool) -> SessionInfo:
    guard = request.app.state.guard
    return SessionInfo(read_token_required=guard.read_required, can_read=signed_in,
                       admin_enabled=guard.admin_enabled)  # fmt: skip


@router.get("/session", response_model=SessionInfo)
def get_session(request: Request) -> SessionInfo:
    """Whether reading needs a token, whether this browser may read now (open reading, or a
    valid session cookie) and whether admin actions are configured."""
    guard, now = request.app.state.guard, request.app.state.sources.clock()
    return _info(request, not guard.read_required or guard.has_session(request, now))


@router.post("/session", response_model=SessionInfo)
def start_session(request: Request, response: Response) -> SessionInfo:
    """Trade the read (or admin) token in the Authorization header for a session cookie
    (HttpOnly, SameSite=Strict, 12 h)."""
    guard, now = request.app.state.guard, request.app.state.sources.clock()
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "unauthenticated", "send the read token as 'Authorization: Bearer "
                       "<token>'", CHALLENGE)  # fmt: skip
    if guard.read_required and not guard.reads(token):
        raise ApiError(403, "forbidden", "wrong token")
    response.set_cookie(SESSION_COOKIE, guard.sessions.issue(now), max_age=int(SESSION_TTL_S),
                        path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")  # fmt: skip
    return _info(request, True)


@router.delete("/session", response_model=SessionInfo)
def end_session(request: Request, response: Response) -> SessionInfo:
    """Drop the session cookie."""
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return _info(request, not request.app.state.guard.read_required)
