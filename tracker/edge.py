"""What every tracker request meets first: the size limits and the security headers, and what a hit reads
of its request — the same whether HitProtocol (tracker/protocol.py) or the Starlette routes answer it.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tracking.tokens import MAX_TOKEN_CHARS

# On every answer: no MIME sniffing, and a redirect never tells the destination which token
# (so which contact) sent the reader there.
HARDENING = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
MAX_TARGET_CHARS = MAX_TOKEN_CHARS + 64  # path + query of the longest URL we mint, with room
MAX_REQUEST_HEAD_BYTES = 16 * 1024  # request line + headers; bounded while arriving too (tracker.protocol)
MAX_BODY_BYTES = 64 * 1024  # the only bodies are small JSON API requests


class HardenedResponses:
    """ASGI middleware: security headers on every response; an overlong URL (414), header block (431)
    or body (413; a body must declare its length) is refused before routing, so hostile input costs
    no token verification, store work or memory."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in HARDENING if h[0] not in names)]
            await send(message)

        refusal = request_refusal(scope)
        if refusal is not None:
            await Response(refusal[1], status_code=refusal[0], media_type="text/plain")(scope, receive, send_hardened)
            return
        await self.app(scope, receive, send_hardened)


def request_refusal(scope: Scope) -> tuple[int, str] | None:
    """(status, reason) when the request is larger than the tracker ever needs, else None."""
    if len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") > MAX_TARGET_CHARS:
        return 414, "URI Too Long"
    headers = scope.get("headers", [])
    if sum(len(name) + len(value) + 4 for name, value in headers) > MAX_REQUEST_HEAD_BYTES:
        return 431, "Request Header Fields Too Large"
    if scope.get("method") in ("POST", "PUT", "PATCH"):
        length = next((value for name, value in headers if name.lower() == b"content-length"), None)
        if length is None or not length.isdigit():
            return 411, "Length Required"
        if int(length) > MAX_BODY_BYTES:
            return 413, "Content Too Large"
    return None


class HitRequest:
    """What a hit's answer and its record read from the request, in one pass over its headers: the
    first value of each (as Starlette's `Request.headers.get`), the peer's address and the method."""

    __slots__ = ("_headers", "method", "peer")

    def __init__(self, scope: Scope) -> None:
        self._headers: dict[bytes, bytes] = dict(reversed(scope["headers"]))  # the first of a repeated header wins
        client = scope.get("client")
        self.peer: str | None = client[0] if client else None
        self.method: str = scope["method"]

    def header(self, name: bytes) -> str | None:
        """The value of header `name` (lower case), or None."""
        value = self._headers.get(name)
        return value.decode("latin-1") if value is not None else None
