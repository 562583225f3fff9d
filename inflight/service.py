"""Run the relay and/or the tracker on one event loop, sharing one store and one set of token keys.

Every Service, whichever of relay and tracker it runs, also runs the webhook worker and the
retention purge: a relay-only process delivers the webhooks of its `email.sent` events and a
tracker-only process those of its opens and clicks, and outbox leases keep two processes on
one store from POSTing the same row at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from config.settings import ConfigError, Settings, parse_listen
from config.tracking import TrackingSettings
from relay.pipeline import Pipeline
from relay.server import Relay
from relay.upstream import Upstream, upstream_from_settings
from relay.workers import cpu_pool
from store import open_store
from tracker.app import MAX_REQUEST_HEAD_BYTES, Tracker, create_app
from tracker.privacy import RetentionPurge
from tracker.webhooks import WebhookWorker
from tracking.tokens import TokenKeys

log = logging.getLogger("inflight")

LEDGER_PURGE_SECONDS = 600.0


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Service owns shutdown for relay and tracker alike."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head larger than MAX_REQUEST_HEAD_BYTES as it arrives.

    httptools (C) answers the tracker's hits several times faster than h11 (bench/, `make bench`),
    but unlike h11's max_incomplete_event_size it bounds neither the URL nor a header while they
    stream in; counting the bytes received while the head is incomplete restores that bound
    (one read beyond it at most): 400 and close, as uvicorn answers any request it cannot parse.
    """

    _reading_head = False
    _head_bytes = 0

    def on_message_begin(self) -> None:
        self._reading_head, self._head_bytes = True, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self.send_400_response("Request head too large.")


def http_config(app: ASGIApp) -> uvicorn.Config:
    """The tracker's uvicorn settings; the bench serves its bare baseline endpoint with the same ones.

    No access log: the tracker's events are the record of every hit.
    """
    return uvicorn.Config(app, http=BoundedHttpToolsProtocol, log_config=None, access_log=False, lifespan="on",
                          server_header=False)


def bind(listen: str) -> socket.socket:
    """Bind host:port ourselves so that port 0 works and the real port can be read back."""
    parsed = parse_listen(listen)
    if parsed is None:
        raise ValueError(f"invalid listen address {listen!r}")
    host, port = parsed
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
    # Nagle holds a response body behind its headers for a delayed ACK (~40 ms per keep-alive request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Service:
    def __init__(self, settings: Settings, *, relay: bool = True, tracker: bool = True) -> None:
        self.settings = settings
        self.run_relay = relay
        self.run_tracker = tracker
        projects = {p.id: p for p in settings.projects}
        self.store = open_store(settings.store.url,
                                               webhook_projects=[p.id for p in settings.projects if p.webhook_url])
        self.webhooks = WebhookWorker(self.store, projects, settings.webhooks)
        self.purge = RetentionPurge(self.store, {p.id: p.retention_days for p in settings.projects},
                                    interval=settings.store.purge_interval_seconds)
        self._background: list[asyncio.Task[None]] = []
        self.keys = TokenKeys(settings.tracker.secrets, [p.id for p in settings.projects])
        self.relay_address: tuple[str, int] | None = None
        self.smtps_address: tuple[str, int] | None = None
        self.tracker_address: tuple[str, int] | None = None
        self._smtp: asyncio.Server | None = None
        self._smtps: asyncio.Server | None = None
        self._relay: Relay | None = None
        self._upstream: Upstream | None = None
        self._workers: ProcessPoolExecutor | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store and listen; raise ConfigError when a mode stored at runtime is no longer available."""
        await self.store.open()
        problems = await TrackingSettings(self.settings, self.store).problems()
        if problems:
            await self.store.close()
            raise ConfigError(problems)
        self._background = [asyncio.create_task(self.webhooks.run()), asyncio.create_task(self.purge.run())]
        if self.run_relay:
            self._workers = cpu_pool(self.settings.relay.cpu_workers)
            self._upstream = upstream_from_settings(
                self.settings.upstream, local_hostname=self.settings.relay.hostname, executor=self._workers
            )
            pipeline = Pipeline(
                settings=self.settings, upstream=self._upstream, store=self.store, keys=self.keys, executor=self._workers
            )
            relay = Relay(self.settings, pipeline)
            sock = bind(self.settings.relay.listen)
            self.relay_address = sock.getsockname()[:2]
            self._smtp = await relay.listen(sock)
            self._relay = relay
            self._background.append(asyncio.create_task(self._purge_ledger()))
            self._background.append(asyncio.create_task(relay.throttle_sync.run()))
            log.info("relay listening on %s:%d", *self.relay_address)
            if self.settings.relay.smtps_listen:
                sock = bind(self.settings.relay.smtps_listen)
                self.smtps_address = sock.getsockname()[:2]
                self._smtps = await relay.listen(sock, implicit_tls=True)
                log.info("relay listening with implicit TLS on %s:%d", *self.smtps_address)
        if self.run_tracker:
            app = create_app(Tracker(settings=self.settings, store=self.store, keys=self.keys))
            sock = bind(self.settings.tracker.listen)
            self.tracker_address = sock.getsockname()[:2]
            self._http = _EmbeddedUvicorn(http_config(app))
            self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
            while not self._http.started:
                if self._http_task.done():
                    self._http_task.result()  # re-raise the startup failure
                await asyncio.sleep(0.01)
            log.info("tracker listening on %s:%d (public_url=%s)", *self.tracker_address, self.settings.tracker.public_url)

    async def stop(self) -> None:
        """Stop accepting, let SMTP transactions in flight finish (up to relay.drain_timeout_seconds), then close."""
        servers = [server for server in (self._smtp, self._smtps) if server is not None]
        for server in servers:
            server.close()
        if self._relay is not None:
            await self._relay.sessions.drain(self.settings.relay.drain_timeout_seconds)
        for server in servers:
            await server.wait_closed()
        if self._upstream is not None:
            await self._upstream.close()
        if self._workers is not None:
            await asyncio.to_thread(self._workers.shutdown, True, cancel_futures=True)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()

    async def _purge_ledger(self) -> None:
        while True:
            try:
                purged = await self.store.purge_deliveries()
                if purged:
                    log.info("ledger-purged rows=%d", purged)
            except Exception:
                log.exception("ledger-purge-failed")
            await asyncio.sleep(LEDGER_PURGE_SECONDS)

    async def run_until_signalled(self) -> None:
        await self.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("shutting down")
        await self.stop()
