"""The tracker's HTTP protocol: uvicorn's httptools one, with a bounded request head, answering hits itself.

Pixels and redirects are nearly all the tracker's traffic. Through ASGI each one costs a request
scope, a response cycle, a task and two `send` messages — more CPU than verifying, spooling and
answering the hit together (bench case `tracker`: bare Starlette answers ~24 k/s on 2 cores; a
bare httptools protocol answered the same bytes ~4× as fast on the same machine). So `HitProtocol`
answers a GET or HEAD on `/o/<token>` or `/c/<token>` from the parser's callbacks: it asks the
tracker for the answer (`Hits.respond`), and writes it once the hit is durable in the spool or the
answer budget has passed, whichever comes first. Every other request — and a hit pipelined behind an answer still waiting, one with a body,
a percent-encoded token, one on a connection whose client is not reading its answers, or any
request while the access log is on — goes to uvicorn and the app, whose routes give the same
answer (tests/test_app.py compares them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Protocol

import httptools
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from monitoring.http import access_log
from tracker.edge import HARDENING, MAX_REQUEST_HEAD_BYTES, HitRequest, request_refusal

log = logging.getLogger("inflight.tracker")

HIT_KINDS = {b"/o/": "open", b"/c/": "click"}
BODY_HEADERS = (b"content-length", b"transfer-encoding")
SERVER_ERROR = Response("Internal Server Error", status_code=500, media_type="text/plain")  # and the connection closed


class Hits(Protocol):
    """What answers hits (the Tracker)."""

    budget: float  # seconds an answer waits at most for its hit to be durable

    def respond(self, kind: str, token: str, request: HitRequest) -> tuple[Response, asyncio.Future[None] | None]:
        """The answer to a `kind` hit on `token`, and the spool's future of its record (None: nothing recorded)."""

    def answered_late(self) -> None:
        """An answer went out before its hit was durable: the disk is slower than the budget."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head larger than MAX_REQUEST_HEAD_BYTES as it arrives.

    httptools (C) answers the tracker's hits several times faster than h11 (bench/, `make bench`),
    but unlike h11's max_incomplete_event_size it bounds neither the URL nor a header while they
    stream in; counting the bytes received while the head is incomplete restores that bound
    (two reads beyond it at most): 400 and close, as uvicorn answers any request it cannot parse.
    """

    _reading_head = False
    _head_bytes = 0
    _began = False  # a request began in the data being parsed: what came before it in that read is not its head

    def on_message_begin(self) -> None:
        self._reading_head, self._head_bytes, self._began = True, 0, True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._began = False
        super().data_received(data)
        # A read in which the head began is not counted: it may hold pipelined requests before it.
        if self._reading_head and not self._began and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self.send_400_response("Request head too large.")


class HitCycle:
    """Stands in for uvicorn's RequestResponseCycle while a hit's answer waits for its record."""

    __slots__ = ("disconnected", "head_only", "keep_alive", "response_complete")

    def __init__(self, *, keep_alive: bool, head_only: bool) -> None:
        self.keep_alive = keep_alive  # uvicorn's shutdown() clears it: close once answered
        self.head_only = head_only
        self.response_complete = False
        self.disconnected = False


class HitProtocol(BoundedHttpToolsProtocol):
    """Answers hits without ASGI; `hits` is set by `hit_protocol` on a subclass made per tracker."""

    hits: Hits

    def on_headers_complete(self) -> None:
        self._reading_head = False  # answered here or not, the head is complete
        if not self._answer_hit():
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not isinstance(self.cycle, HitCycle):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not isinstance(self.cycle, HitCycle):
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if isinstance(cycle, HitCycle):
            cycle.disconnected = True
            self.cycle = None  # type: ignore[assignment]  # uvicorn would wake the (absent) body reader
        super().connection_lost(exc)

    def _answer_hit(self) -> bool:
        """Answer the request here when it is a plain hit; False leaves it to uvicorn and the app."""
        parser = self.parser
        method = parser.get_method()
        if (method not in (b"GET", b"HEAD") or self.root_path or parser.should_upgrade()
                or (self.cycle is not None and not self.cycle.response_complete)
                or self.flow.write_paused  # a client not reading: uvicorn's task waits for it, and stops reading
                or access_log.isEnabledFor(logging.INFO)):
            return False
        url = httptools.parse_url(self.url)
        path: bytes = url.path
        kind = HIT_KINDS.get(path[:3])
        token = path[3:]
        # As the routes `/o/{token}` and `/c/{token}` match: one non-empty path segment.
        if kind is None or not token or b"/" in token or b"%" in token:
            return False
        if any(name in BODY_HEADERS for name, _ in self.headers):
            return False
        scope = {"method": method.decode("ascii"), "headers": self.headers, "client": self.client,
                 "raw_path": path, "query_string": url.query or b""}
        if request_refusal(scope) is not None:  # type: ignore[arg-type]
            return False
        cycle = HitCycle(keep_alive=parser.get_http_version() != "1.0" and parser.should_keep_alive(),
                         head_only=method == b"HEAD")
        self.cycle = cycle  # type: ignore[assignment]
        try:
            response, durable = self.hits.respond(kind, token.decode("ascii"), HitRequest(scope))  # type: ignore[arg-type]
        except Exception:
            log.exception("hit-answer-failed kind=%s", kind)
            response, durable, cycle.keep_alive = SERVER_ERROR, None, False
        if durable is None:
            self._write(cycle, response)
        else:
            late = self.loop.call_later(self.hits.budget, self._answer_late, cycle, response)
            durable.add_done_callback(functools.partial(self._durable, cycle, response, late))
        return True

    def _durable(self, cycle: HitCycle, response: Response, late: asyncio.TimerHandle, durable: asyncio.Future[None]) -> None:
        late.cancel()
        if not durable.cancelled():
            durable.exception()  # an OSError: the spool logged it, and the hit reaches the store from memory
        self._write(cycle, response)

    def _answer_late(self, cycle: HitCycle, response: Response) -> None:
        if not cycle.response_complete:
            self.hits.answered_late()
            self._write(cycle, response)

    def _write(self, cycle: HitCycle, response: Response) -> None:
        """Write `response` as uvicorn would (its default headers first, `connection: close` when not kept alive)."""
        if cycle.response_complete:
            return
        cycle.response_complete = True
        if cycle.disconnected:
            return
        content: list[bytes | memoryview] = [STATUS_LINE[response.status_code]]
        for name, value in (*self.server_state.default_headers, *response.raw_headers, *HARDENING):
            content += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        if not cycle.head_only:
            content.append(response.body)
        self.transport.write(b"".join(content))
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def hit_protocol(hits: Hits) -> type[HitProtocol]:
    """The protocol class uvicorn instantiates per connection, answering with `hits`."""
    return type("TrackerHitProtocol", (HitProtocol,), {"hits": hits})
