"""Request-body size limit (an ASGI middleware) and the optional API key (a FastAPI dependency)."""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable

from fastapi import Depends, HTTPException
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Answer 413 to a request whose body exceeds `max_bytes`: at once when Content-Length says so,
    else as soon as the bytes read pass the limit (chunked uploads do not declare a length)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body exceeds the limit of {self.max_bytes} bytes "
                                  f"({self.max_bytes / 2**20:.1f} MB, --max-upload-mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._too_large().detail}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # FastAPI re-raises HTTPExceptions from body reading as they are
            return message

        await self.app(scope, limited, send)


def api_key_dependency(api_key: str | None) -> Callable[..., Awaitable[None]]:
    """A dependency that, when `api_key` is set, requires it as `Authorization: Bearer KEY` or
    `X-API-Key: KEY` (401 otherwise). Declared through FastAPI's security classes so /docs offers it."""
    expected = api_key.encode() if api_key else None
    bearer = HTTPBearer(auto_error=False, description="the server's API key, when it has one")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key, when it has one")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                    key: str | None = Depends(header)) -> None:
        if expected is None:
            return
        given = key if key is not None else (credentials.credentials if credentials is not None else None)
        # compare_digest takes time independent of where the strings differ: no timing oracle on the key
        if given is None or not hmac.compare_digest(given.encode(), expected):
            reason = "missing API key" if given is None else "wrong API key"
            raise HTTPException(401, f"{reason}: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check
