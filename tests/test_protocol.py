"""HitProtocol (tracker/protocol.py) on a real socket: which requests it answers itself, when, and how.

The app behind it answers every request 418, so each answer shows who gave it. Whether a hit's
answer is the same as the Starlette routes' is tests/test_app.py's concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from inflight.service import bind, http_config
from tracker.edge import HitRequest


async def teapot(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await Response("app", status_code=418)(scope, receive, send)


class Hits:
    """Answers every hit with a redirect once the test resolves its future (or the budget passes)."""

    def __init__(self, budget: float = 5.0, *, fail: bool = False, forged: bool = False) -> None:
        self.budget = budget
        self.fail = fail
        self.forged = forged  # every token forged: 404 at once, nothing recorded
        self.pending: list[asyncio.Future[None]] = []
        self.seen: list[tuple[str, str, str | None, str]] = []  # kind, token, user agent, method
        self.late = 0

    def respond(self, kind: str, token: str, request: HitRequest) -> tuple[Response, asyncio.Future[None] | None]:
        if self.fail:
            raise RuntimeError("a bug")
        if self.forged:
            return Response("Not Found", status_code=404), None
        self.seen.append((kind, token, request.header(b"user-agent"), request.method))
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(durable)
        return Response(status_code=302, headers={"Location": f"https://example.com/{token}"}), durable

    def answered_late(self) -> None:
        self.late += 1


@asynccontextmanager
async def serving(hits: Hits, servers: list[uvicorn.Server] | None = None) -> AsyncIterator[int]:
    sock = bind("127.0.0.1:0")
    server = uvicorn.Server(http_config(teapot, hits=hits))
    if servers is not None:
        servers.append(server)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    length = 0 if head_only else int(headers.get("content-length", "0"))
    return int(lines[0].split()[1]), headers, await reader.readexactly(length)


async def pending(hits: Hits, count: int) -> None:
    """Until the protocol has asked for `count` hits in all."""
    while len(hits.pending) < count:
        await asyncio.sleep(0.01)


async def durable_hit(hits: Hits, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                      *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send a hit, make it durable as soon as the protocol asks for it, and read its answer."""
    writer.write(request)
    await pending(hits, len(hits.pending) + 1)
    hits.pending[-1].set_result(None)
    return await read_answer(reader, head_only=head_only)


def run(scenario: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20))  # type: ignore[arg-type]


def test_a_hit_is_answered_by_the_protocol_once_durable_and_not_before() -> None:
    async def scenario() -> None:
        hits = Hits()
        async with serving(hits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c/tok1?x=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: Mail/1\r\n\r\n")
            await pending(hits, 1)
            answer = asyncio.ensure_future(read_answer(reader))
            await asyncio.sleep(0.2)
            assert not answer.done()  # the hit is not durable yet
            hits.pending[0].set_result(None)
            status, headers, body = await answer
            assert (status, headers["location"], body) == (302, "https://example.com/tok1", b"")
            assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
            assert "date" in headers and "connection" not in headers
            assert hits.seen == [("click", "tok1", "Mail/1", "GET")]
            # Kept alive: the next hit on the same connection, a HEAD on the pixel path.
            status, headers, body = await durable_hit(hits, reader, writer, b"HEAD /o/tok2.gif HTTP/1.1\r\nHost: t\r\n\r\n",
                                                      head_only=True)
            assert (status, body) == (302, b"") and hits.seen[1] == ("open", "tok2.gif", None, "HEAD")
            writer.close()

    run(scenario)


def test_past_the_budget_the_answer_goes_out_and_is_counted_late() -> None:
    async def scenario() -> None:
        hits = Hits(budget=0.05)
        async with serving(hits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c/slow HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await read_answer(reader)
            assert status == 302 and hits.late == 1
            hits.pending[0].set_exception(OSError("disk full"))  # written later, or not at all: answered once
            assert (await durable_hit(hits, reader, writer, b"GET /c/next HTTP/1.1\r\nHost: t\r\n\r\n"))[0] == 302
            assert hits.late == 1
            writer.close()

    run(scenario)


def test_requests_that_are_not_plain_hits_go_to_the_app() -> None:
    requests = [b"POST /c/tok HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
                b"GET /c/tok HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab",
                b"GET /c/a/b HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /c/ HTTP/1.1\r\nHost: t\r\n\r\n",
                b"GET /c/%41 HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /x/tok HTTP/1.1\r\nHost: t\r\n\r\n",
                b"GET /o/" + b"t" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"]

    async def scenario() -> None:
        hits = Hits()
        async with serving(hits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for request in requests:
                writer.write(request)
                assert (await read_answer(reader))[0] == 418, request[:40]
            access = logging.getLogger("inflight.access")
            level = access.level
            access.setLevel(logging.INFO)  # the access log sees every request: through the app
            try:
                writer.write(b"GET /c/tok HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await read_answer(reader))[0] == 418
            finally:
                access.setLevel(level)
            assert hits.seen == []
            writer.close()

    run(scenario)


def test_a_request_pipelined_behind_a_waiting_hit_is_answered_after_it() -> None:
    async def scenario() -> None:
        hits = Hits()
        async with serving(hits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c/first HTTP/1.1\r\nHost: t\r\n\r\nGET /c/second HTTP/1.1\r\nHost: t\r\n\r\n")
            await pending(hits, 1)
            await asyncio.sleep(0.1)
            hits.pending[0].set_result(None)
            first, second = await read_answer(reader), await read_answer(reader)
            assert first[1]["location"] == "https://example.com/first"
            assert second[0] == 418  # behind an answer in progress: uvicorn's pipeline, the app
            writer.close()

    run(scenario)


def test_http_1_0_and_connection_close_are_answered_then_closed() -> None:
    async def scenario() -> None:
        hits = Hits(budget=0.01)
        async with serving(hits) as port:
            for request in (b"GET /c/a HTTP/1.0\r\n\r\n", b"GET /c/b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status, headers, _ = await read_answer(reader)
                assert (status, headers["connection"]) == (302, "close")
                assert await reader.read() == b""  # closed by the server
                writer.close()

    run(scenario)


def test_a_failing_answer_is_a_500_and_a_closed_connection_and_the_server_goes_on() -> None:
    async def scenario() -> None:
        hits = Hits(fail=True)
        async with serving(hits) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c/tok HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await read_answer(reader)
            assert (status, headers["connection"], body) == (500, "close", b"Internal Server Error")
            assert await reader.read() == b""
            hits.fail = False
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await durable_hit(hits, reader, writer, b"GET /c/tok HTTP/1.1\r\nHost: t\r\n\r\n"))[0] == 302
            writer.close()

    run(scenario)


def test_a_client_gone_before_its_answer_costs_nothing() -> None:
    async def scenario() -> None:
        hits = Hits()
        async with serving(hits) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c/gone HTTP/1.1\r\nHost: t\r\n\r\n")
            await pending(hits, 1)
            writer.close()
            await asyncio.sleep(0.1)
            hits.pending[0].set_result(None)  # answered to nobody
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await durable_hit(hits, reader, writer, b"GET /c/here HTTP/1.1\r\nHost: t\r\n\r\n"))[0] == 302
            writer.close()

    run(scenario)


def test_small_requests_pipelined_by_the_thousand_are_all_served_and_their_answers_not_piled_up() -> None:
    """Many requests in one read are not one overlong request head (no 400), and answers the client does
    not read wait in the socket, not in the server's memory: once the transport's buffer is full, the
    protocol leaves requests to uvicorn, which waits for the client and stops reading."""
    async def scenario() -> None:
        servers: list[uvicorn.Server] = []
        async with serving(Hits(forged=True), servers) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /c/forged HTTP/1.1\r\nHost: t\r\n\r\n" * 100_000)  # 4 MB; their answers ~15 MB
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), 2)
            (connection,) = servers[0].server_state.connections  # still open
            assert connection.transport.get_write_buffer_size() < 1024 * 1024  # type: ignore[attr-defined]
            assert {(await read_answer(reader))[0] for _ in range(5_000)} == {404}
            writer.transport.abort()

    run(scenario)
