"""Where the dashboard's errors meet HTTP: one exception type and the JSON handlers.

Every error response is ``{"error": <short>, "detail": <what exactly>}`` with its status:
404 unknown run, round or adapter; 401 no or malformed credentials; 403 wrong token or admin
actions disabled; 409 an action not possible now; 422 bad input.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedrot_server.errors import NotFoundError, StoreError, WrongStateError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: ``status`` (an HTTP code), a short ``error`` and a ``detail``."""

    def __init__(self, status: int, error: str, detail: Any = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def not_found(detail: str) -> ApiError:
    return ApiError(404, "not found", detail)


def error_response(status: int, error: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Answer every error as JSON ``{"error", "detail"}`` with the right status."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")}
                    for e in exc.errors()]  # fmt: skip
        return error_response(422, "invalid request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase.lower()
        return error_response(exc.status_code, phrase, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(NotFoundError)
    async def _missing(request: Request, exc: NotFoundError) -> JSONResponse:
        return error_response(404, "not found", str(exc))

    @app.exception_handler(WrongStateError)
    async def _conflict(request: Request, exc: WrongStateError) -> JSONResponse:
        return error_response(409, "not possible now", str(exc))

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:
        logger.error("state read failed on %s", request.url.path, exc_info=exc)
        return error_response(503, "state unavailable", str(exc))
