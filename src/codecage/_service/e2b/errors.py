"""E2B's REST error bodies, `{"code": int, "message": str}`, from codecage's errors.

The status of a codecage error comes from `codecage._errors.WIRE` (the one table), with the
few changes E2B's clients need: a bad request is 400 there (E2B's clients know no 422), and
on a sandbox's own surface (envd) a sandbox that has ended is the 502 "... was not found"
that E2B's proxy answers, which its clients read as "the sandbox is not running".
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..._errors import CodeRejected, PolicyError, SandboxError, SandboxNotFound, wire

# What E2B's proxy says of a sandbox it does not know (the clients look for "was not found")
# and of a port nothing listens on ("port is not open").
NOT_FOUND = "The sandbox {} was not found"
PAUSED = "The sandbox {} is paused: connect to it (Sandbox.connect) to resume it"
# The surfaces on a sandbox's own ports, where an ended sandbox is the proxy's 502.
SANDBOX_SURFACES = ("envd", "interpreter")
PORT_NOT_OPEN = "The sandbox {} is running but port is not open (nothing serves port {} here)"


class E2BError(Exception):
    """An error answered as E2B answers it: the HTTP status and `{"code", "message"}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def body(status: int, message: str) -> dict[str, Any]:
    return {"code": status, "message": message}


def response(status: int, message: str) -> JSONResponse:
    return JSONResponse(body(status, message), status_code=status)


def status_of(exc: SandboxError, surface: str = "control") -> int:
    """The HTTP status E2B's clients expect for a codecage error. `surface` is "control"
    (the API) or "envd" (a sandbox's own port, where an ended sandbox is the proxy's 502)."""
    if isinstance(exc, SandboxNotFound) and surface in SANDBOX_SURFACES:
        return 502
    if isinstance(exc, (PolicyError, CodeRejected)):
        return 400
    return wire(exc).status


def message_of(exc: SandboxError, sandbox_id: str | None = None, surface: str = "control") -> str:
    if isinstance(exc, SandboxNotFound) and surface in SANDBOX_SURFACES and sandbox_id is not None:
        return f"{NOT_FOUND.format(sandbox_id)}: {exc}"
    return f"{wire(exc).name}: {exc}"


def install_handlers(app: FastAPI, surface: str) -> None:
    """Every error of a sub-app as E2B's body: ours, a malformed request (400, never 422)
    and an unknown route (404); anything unexpected is a 500 without details."""

    @app.exception_handler(E2BError)
    async def e2b_error(request: Request, exc: E2BError) -> JSONResponse:
        return response(exc.status, exc.message)

    @app.exception_handler(SandboxError)
    async def sandbox_error(request: Request, exc: SandboxError) -> JSONResponse:
        sandbox_id = request.headers.get("e2b-sandbox-id")
        return response(status_of(exc, surface), message_of(exc, sandbox_id, surface))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        from ..app import validation_text

        return response(400, "invalid request: " + validation_text(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return response(500, "internal error (details are in the server's log)")
