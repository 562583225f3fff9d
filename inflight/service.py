"""Run the relay and/or the tracker on one event loop, sharing one store and one set of token keys.

Every Service, whichever of relay and tracker it runs, also runs the webhook worker and the
retention purge: a relay-only process delivers the webhooks of its `email.sent` events and a
tracker-only process those of its opens and clicks, and outbox leases keep two processes on
one store from POSTing the same row at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import signal
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from config.settings import ConfigError, Settings, parse_listen
from config.tracking import TrackingSettings
from monitoring.http import monitoring_app
from monitoring.metrics import SPOOL_DEPTH, SPOOL_OLDEST
from relay.accept import SharedAcceptor
from relay.pipeline import Pipeline
from relay.server import Relay
from relay.upstream import Upstream, upstream_from_settings
from relay.workers import cpu_pool, give_back_large_buffers
from store import open_store
from store.spool import Spool
from tracker.app import Tracker, create_app, dashboard_app
from tracker.privacy import RetentionPurge
from tracker.protocol import BoundedHttpToolsProtocol, Hits, hit_protocol
from tracker.recorder_process import RecorderProcess, RecordingFailed
from tracker.webhooks import WebhookWorker
from tracking.tokens import TokenKeys

log = logging.getLogger("inflight")

LEDGER_PURGE_SECONDS = 600.0
SPOOL_OBSERVE_SECONDS = 2.0


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the Service owns shutdown for relay and tracker alike."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def http_config(app: ASGIApp, *, hits: Hits | None = None, trusted_proxies: Sequence[str] | None = None) -> uvicorn.Config:
    """The tracker's uvicorn settings; the bench serves its bare baseline endpoint with the same ones.

    No access log: the tracker's events are the record of every hit. With `hits`, the protocol
    answers them itself (HitProtocol). `trusted_proxies`: the peers whose X-Forwarded-For uvicorn
    believes for the app's requests, as the tracker does for the hits it answers (uvicorn's default:
    loopback).
    """
    return uvicorn.Config(app, http=hit_protocol(hits) if hits is not None else BoundedHttpToolsProtocol, log_config=None,
                          access_log=False, lifespan="on", server_header=False,
                          forwarded_allow_ips=list(trusted_proxies) if trusted_proxies is not None else None)


class ListenError(Exception):
    """A configured address cannot be listened on; the message is the one line an operator reads."""


def bind(listen: str, key: str = "listen") -> socket.socket:
    """Bind host:port ourselves so that port 0 works and the real port can be read back.

    No SO_REUSEPORT: with it a second instance could bind the same port and take part of the
    traffic; worker processes share this one socket instead (inflight/supervisor.py).
    """
    parsed = parse_listen(listen)
    if parsed is None:
        raise ListenError(f"invalid listen address: {listen!r} ({key})")
    host, port = parsed
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
    # Nagle holds a response body behind its headers for a delayed ACK (~40 ms per keep-alive request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; never a live listener
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"address in use: {shown} ({key})") from None
        raise ListenError(f"cannot listen on {shown} ({key}): {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@dataclass
class Listeners:
    """Every socket a Service serves, bound before anything else starts (store, workers, tasks).

    Binding first means a second instance on busy ports stops before it can touch the store a
    running instance uses, and worker processes forked afterwards share these very sockets.
    """

    relay: socket.socket | None = None
    smtps: socket.socket | None = None
    tracker: socket.socket | None = None
    relay_http: socket.socket | None = None  # [relay] http_listen: /metrics and /healthz
    dashboard: socket.socket | None = None  # [dashboard] listen

    @classmethod
    def bind(cls, settings: Settings, *, relay: bool, tracker: bool) -> Listeners:
        """Bind every listener the roles need, or raise ListenError naming the first that fails (none kept open)."""
        wanted = []
        if relay:
            wanted.append(("relay", settings.relay.listen, "relay.listen"))
            if settings.relay.smtps_listen:
                wanted.append(("smtps", settings.relay.smtps_listen, "relay.smtps_listen"))
            if settings.relay.http_listen:
                wanted.append(("relay_http", settings.relay.http_listen, "relay.http_listen"))
        if tracker:
            wanted.append(("tracker", settings.tracker.listen, "tracker.listen"))
            if settings.dashboard.enabled and settings.dashboard.listen:
                wanted.append(("dashboard", settings.dashboard.listen, "dashboard.listen"))
        listeners = cls()
        try:
            for name, listen, key in wanted:
                setattr(listeners, name, bind(listen, key))
        except ListenError:
            listeners.close()
            raise
        return listeners

    def serving(self, *, relay: bool, tracker: bool) -> Listeners:
        """The listeners of these roles; the others are closed (in a worker that does not serve them)."""
        kept = Listeners(self.relay if relay else None, self.smtps if relay else None, self.tracker if tracker else None,
                         self.relay_http if relay else None, self.dashboard if tracker else None)
        for sock in self._sockets():
            if sock not in kept._sockets():
                sock.close()
        return kept

    def _sockets(self) -> list[socket.socket]:
        return [s for s in (self.relay, self.smtps, self.tracker, self.relay_http, self.dashboard) if s is not None]

    def close(self) -> None:
        for sock in self._sockets():
            sock.close()


class Service:
    """The relay and/or the tracker of one process, on listeners bound beforehand (or at start).

    `primary` marks the one process of a group of workers that also runs the store's periodic
    purges (retention, ledger): they are idempotent, but N processes would do the same deletes
    N times. The webhook worker runs in every process: outbox leases keep two from POSTing the
    same row, and each process wakes it for its own events at once.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        relay: bool = True,
        tracker: bool = True,
        listeners: Listeners | None = None,
        primary: bool = True,
    ) -> None:
        self.settings = settings
        self.run_relay = relay
        self.run_tracker = tracker
        self.listeners = listeners
        self.primary = primary
        projects = {p.id: p for p in settings.projects}
        self.store = open_store(settings.store.url,
                                               webhook_projects=settings.webhook_projects)
        self.spool = Spool(settings.store.spool_path, store_url=settings.store.url)  # one per process (README: Spool)
        self.webhooks = WebhookWorker(self.store, projects, settings.webhooks)
        self.purge = RetentionPurge(self.store, {p.id: p.retention_days for p in settings.projects},
                                    interval=settings.store.purge_interval_seconds)
        self._background: list[asyncio.Task[None]] = []
        self.keys = TokenKeys(settings.tracker.secrets, [p.id for p in settings.projects])
        self.relay_address: tuple[str, int] | None = None
        self.smtps_address: tuple[str, int] | None = None
        self.tracker_address: tuple[str, int] | None = None
        self._smtp: asyncio.Server | SharedAcceptor | None = None
        self._smtps: asyncio.Server | SharedAcceptor | None = None
        self._relay: Relay | None = None
        self._pipeline: Pipeline | None = None
        self._upstream: Upstream | None = None
        self._workers: ProcessPoolExecutor | None = None
        self._recorder: RecorderProcess | None = None
        self.relay_http_address: tuple[str, int] | None = None
        self.dashboard_address: tuple[str, int] | None = None
        self._http_servers: list[tuple[_EmbeddedUvicorn, asyncio.Task[None]]] = []

    async def start(self) -> None:
        """Listen first, then open the store and serve.

        Raises ListenError (nothing opened) when an address is taken, ConfigError when a mode stored at
        runtime is no longer available, and RecordingFailed when the tracker's recorder process cannot start.
        """
        if self.listeners is None:
            self.listeners = Listeners.bind(self.settings, relay=self.run_relay, tracker=self.run_tracker)
        listeners = self.listeners
        await self.store.open()
        problems = await TrackingSettings(self.settings, self.store).problems()
        if problems:
            await self.store.close()
            listeners.close()
            raise ConfigError(problems)
        tracker = None
        if self.run_tracker and listeners.tracker is not None:
            if self.settings.tracker.store_process:
                self._recorder = RecorderProcess(self.settings)
                try:
                    await self._recorder.start()
                except RecordingFailed:
                    await self.store.close()
                    listeners.close()
                    raise
            tracker = Tracker(settings=self.settings, store=self.store, keys=self.keys, spool=self.spool,
                              recorder=self._recorder)
        pipeline = None
        if self.run_relay and listeners.relay is not None:
            give_back_large_buffers()
            self._workers = cpu_pool(self.settings.relay.cpu_workers)
            self._upstream = upstream_from_settings(
                self.settings.upstream, local_hostname=self.settings.relay.hostname, executor=self._workers
            )
            pipeline = self._pipeline = Pipeline(settings=self.settings, upstream=self._upstream, store=self.store, keys=self.keys,
                                spool=self.spool, executor=self._workers)
        await self.spool.open()  # once relay and tracker registered what they write: it takes over those kinds
        self._background = [asyncio.create_task(self.webhooks.run()), asyncio.create_task(self._observe_spool())]
        if self.primary:
            self._background.append(asyncio.create_task(self.purge.run()))
        if pipeline is not None and listeners.relay is not None:
            relay = Relay(self.settings, pipeline)
            self.relay_address = listeners.relay.getsockname()[:2]
            self._smtp = await relay.listen(listeners.relay)
            self._relay = relay
            if self.primary:
                self._background.append(asyncio.create_task(self._purge_ledger()))
            self._background.append(asyncio.create_task(relay.throttle_sync.run()))  # each process reads the others'
            log.info("relay listening on %s:%d", *self.relay_address)
            relay_settings = self.settings.relay
            if self.primary and relay_settings.allow_plaintext_auth and not relay_settings.require_tls:
                log.warning("auth-without-tls listen=%s detail='relay.allow_plaintext_auth = true: passwords may cross the "
                            "network in clear on connections without STARTTLS; keep it to loopback or a private network'",
                            relay_settings.listen)
            if listeners.smtps is not None:
                self.smtps_address = listeners.smtps.getsockname()[:2]
                self._smtps = await relay.listen(listeners.smtps, implicit_tls=True)
                log.info("relay listening with implicit TLS on %s:%d", *self.smtps_address)
            if listeners.relay_http is not None:
                self.relay_http_address = listeners.relay_http.getsockname()[:2]
                await self._serve_http(monitoring_app(self.store), listeners.relay_http)
                log.info("relay metrics and health on http://%s:%d", *self.relay_http_address)
        if tracker is not None and listeners.tracker is not None:
            dashboard = self.settings.dashboard
            app = create_app(tracker, dashboard=dashboard.enabled and not dashboard.listen)
            self.tracker_address = listeners.tracker.getsockname()[:2]
            await self._serve_http(app, listeners.tracker, hits=tracker, trusted_proxies=self.settings.tracker.trusted_proxies)
            log.info("tracker listening on %s:%d (public_url=%s)", *self.tracker_address, self.settings.tracker.public_url)

        if tracker is not None and listeners.dashboard is not None:  # bound with the tracker's listener
            self.dashboard_address = listeners.dashboard.getsockname()[:2]
            await self._serve_http(dashboard_app(tracker), listeners.dashboard, trusted_proxies=self.settings.tracker.trusted_proxies)
            log.info("dashboard on http://%s:%d/dashboard/", *self.dashboard_address)

    async def _serve_http(self, app: ASGIApp, sock: socket.socket, *, hits: Hits | None = None,
                          trusted_proxies: Sequence[str] | None = None) -> None:
        """Serve `app` on `sock` with uvicorn (see http_config), returning once it accepts connections."""
        server = _EmbeddedUvicorn(http_config(app, hits=hits, trusted_proxies=trusted_proxies))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        self._http_servers.append((server, task))
        while not server.started:
            if task.done():
                task.result()  # re-raise the startup failure
            await asyncio.sleep(0.01)

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
        if self._pipeline is not None:
            self._pipeline.close()
        for http, serving in self._http_servers:
            http.should_exit = True
            await serving
        await self.spool.close()  # what the store does not take in time is taken over at the next start
        if self._recorder is not None:
            await self._recorder.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.store.close()

    async def _observe_spool(self) -> None:
        """The spool's depth and oldest age as gauges every few seconds: a scrape must not wait on the spool."""
        while True:
            SPOOL_DEPTH.set(self.spool.depth())
            SPOOL_OLDEST.set(self.spool.oldest_age())
            await asyncio.sleep(SPOOL_OBSERVE_SECONDS)

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
        """Serve this process until SIGINT or SIGTERM (the CLI's process: it owns the collector)."""
        await self.start()
        # What start made (modules, settings, tables, connections) lives as long as the process: kept out
        # of the collector's sight, a full collection scans only what serving made since, not ~60 k objects
        # (20–80 ms with the event loop stopped: a tracker's p99 answer time; README: Performance).
        gc.freeze()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        log.info("shutting down")
        await self.stop()
