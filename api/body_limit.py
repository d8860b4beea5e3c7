"""Request bodies larger than `MAX_BODY_BYTES` are refused with 413 before anything parses them.

A declared Content-Length over the limit is refused without reading a byte; a body without one (chunked) is
counted as it arrives and refused once it passes the limit. Either way the answer goes out before the
application, and so authentication, has the body.

Written here rather than FastAPI's `max_body_size`: that one answers in plain text, outside the API's error
shape, and signals through exceptions that cross the request-id middleware as if they were crashes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Pure ASGI, like the request-id middleware: nothing is added to the status poll but a header scan."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body too large: at most {self.max_bytes} bytes"
        await error_response(413, message, {"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if value.strip().isdigit() and int(value) > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
                break

        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True  # whatever the application answers to the failed read is dropped
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if refused:
            await self._refuse(scope, receive, send)
