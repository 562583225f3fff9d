"""HTTP pieces both listeners share: /metrics with the store's gauges read at scrape time, /healthz, and
the optional access log. The relay serves them on `[relay] http_listen`, the tracker on its own port."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monitoring.metrics import WEBHOOK_BACKLOG, WEBHOOK_OLDEST, exposition

access_log = logging.getLogger("inflight.access")
# A tracking token is a capability (and the events API's query may hold an address): the access
# log shows the route and the token's first characters, never the query string.
_TOKEN_PATH = re.compile(r"^/([oc])/([^/]{8})[^/]*")
# A scrape or a health probe waits this long for the store, then answers without it: a locked or
# unreachable store is what an operator needs these endpoints for (the spool gauges say the rest).
STORE_READ_SECONDS = 1.0


class ObservedStore(Protocol):
    async def ping(self) -> bool: ...
    async def webhook_backlog(self) -> tuple[int, float | None]: ...


async def metrics_response(store: ObservedStore) -> Response:
    """The store-wide gauges are read now (one indexed count), then every metric is written out."""
    try:
        count, oldest = await asyncio.wait_for(store.webhook_backlog(), STORE_READ_SECONDS)
    except Exception:  # a scrape must still answer when the store does not: the rest is the news
        logging.getLogger("inflight.metrics").exception("metrics-store-unreadable")
    else:
        WEBHOOK_BACKLOG.set(count)
        WEBHOOK_OLDEST.set(max(0.0, time.time() - oldest) if oldest is not None else 0.0)
    body, content_type = exposition()
    return Response(body, media_type=content_type)


async def health_response(store: ObservedStore) -> Response:
    try:
        ok = await asyncio.wait_for(store.ping(), STORE_READ_SECONDS)
    except TimeoutError:
        ok = False
    return JSONResponse({"ok": ok, "store": "ok" if ok else "unreachable"}, status_code=200 if ok else 503)


def monitoring_app(store: ObservedStore) -> Starlette:
    """The relay's own small HTTP listener: /metrics and /healthz, nothing else."""

    async def metrics(request: Request) -> Response:
        return await metrics_response(store)

    async def health(request: Request) -> Response:
        return await health_response(store)

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"]), Route("/healthz", health, methods=["GET"])])
    app.router.redirect_slashes = False
    return app


class AccessLog:
    """ASGI middleware: one line per request (`[log] access_log = true`); costs one level check when off."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 0, "bytes": 0}

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            path = _TOKEN_PATH.sub(r"/\1/\2…", scope.get("path", ""))
            access_log.info("access method=%s path=%s status=%d bytes=%d ms=%.1f", scope.get("method"), path,
                            status["code"], status["bytes"], (time.perf_counter() - started) * 1000)
