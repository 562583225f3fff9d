"""The tracker: serves the open pixel and the click redirects, records events, exposes the events API."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Scope

from config.settings import ApiAccess, ProjectSettings, Settings
from config.tracking import ModeRefused, TrackingSettings
from monitoring.http import AccessLog, health_response, metrics_response
from monitoring.metrics import HITS, STORE_SECONDS
from store.model import EVENT_NAMES, MAX_LIMIT, EventQuery, EventStore, StatsQuery, rfc3339
from store.spool import Handler, Spool
from tracker.agents import Hit
from tracker.dashboard.app import Dashboard
from tracker.dead_letters import DeadLetterRoutes
from tracker.edge import HardenedResponses, HitRequest
from tracker.feedback import FeedbackRoutes
from tracker.recorder import HitRecorder, Recording
from tracker.shapes import event_json, stats_json
from tracker.spooled import SpooledHit
from tracker.suppressions import SuppressionRoutes
from tracking.claims import TrackingClaims
from tracking.legacy import LegacyTokens
from tracking.tokens import TokenKeys, TokenVerifier
from tracking.urls import redirect_location

log = logging.getLogger("inflight.tracker")

# The smallest transparent GIF (1×1, one transparent palette entry): 43 bytes.
PIXEL_GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
NO_CACHE = {
    # Every fetch must reach us, or the second open is never seen; proxies must not share it.
    "Cache-Control": "no-store, no-cache, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
NOT_FOUND = Response("Not Found", status_code=404, media_type="text/plain")
# Built once: a Response holds no per-request state, and the pixel's bytes and headers never change.
PIXEL = Response(PIXEL_GIF, media_type="image/gif", headers=NO_CACHE)
HONEYPOT = Response(b"", media_type="text/html", headers={**NO_CACHE, "X-Robots-Tag": "noindex"})
_REDIRECT_HEADERS = Response(status_code=302, headers=NO_CACHE).raw_headers  # with content-length: 0


class Redirect(Response):
    """A 302 to `location` with the hit's headers, as Response(status_code=302, headers=...) would answer it.

    Every click answers one: Response.__init__ renders a body and builds every header again (~5 µs, a
    tenth of what the answering process spends a hit: bench case `tracker`); here only Location is new.
    """

    def __init__(self, location: str) -> None:
        self.status_code = 302
        self.background = None
        self.body = b""
        self.raw_headers = [*_REDIRECT_HEADERS, (b"location", location.encode("latin-1"))]


UNAUTHORIZED = JSONResponse({"error": "missing or invalid bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
SETTLE_SECONDS = 1.0  # the events API waits at most this for hits answered before it to reach the store
SLOW_LOG_SECONDS = 10.0  # at most one spool-slow line per this many seconds


class TrustedProxies:
    """X-Forwarded-For is believed only from these peers: TLS usually ends at a reverse proxy."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        # Parsing an address costs more than the rest of recording a hit, and peers repeat (the
        # proxy itself, big mail providers' fetchers); bounded, since X-Forwarded-For is client input.
        self._trusted = functools.lru_cache(maxsize=4096)(self._is_trusted)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def contains(self, address: str) -> bool:
        return self._trusted(address)

    def client_ip(self, request: HitRequest) -> str | None:
        """The nearest address that is not a trusted proxy, walking X-Forwarded-For from the right."""
        peer = request.peer
        if peer is None or not self._trusted(peer):
            return peer
        forwarded = [a.strip() for a in (request.header(b"x-forwarded-for") or "").split(",") if a.strip()]
        for address in reversed(forwarded):
            if not self._trusted(address):
                return address
        return forwarded[0] if forwarded else peer

    def host(self, request: HitRequest) -> str:
        """The Host the client asked for (lower case, no port): X-Forwarded-Host's last value from a trusted proxy."""
        host = request.header(b"host") or ""
        peer = request.peer
        if peer is not None and self._trusted(peer):
            host = (request.header(b"x-forwarded-host") or host).rpartition(",")[2].strip() or host
        return host_name(host)


def host_name(host: str) -> str:
    """`Example.com:8080` → `example.com`; `[::1]:80` → `::1`."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    name, colon, port = host.rpartition(":")
    return (name if colon and port.isdigit() else host).lower().rstrip(".")


class Tracker:
    """Answers hits from the verified token alone: the hit goes to the spool, the spool to the store.

    `spool` must be opened after the Tracker registered its hits with it (the Service does).
    `recorder` stores what the spool delivers: in this process (the default) or in one of its own
    (RecorderProcess, `[tracker] store_process`); its owner opens and closes it.
    """

    def __init__(
        self, *, settings: Settings, store: EventStore, keys: TokenKeys, spool: Spool,
        clock: Callable[[], float] = time.time, recorder: Recording | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.recorder = recorder or HitRecorder(settings, store)
        # No decode here: the journal's bytes go to the recorder as they are, which reads them where it stores them.
        spool.register("hit", Handler(deliver=self._store_hits, gather=True))
        self.budget = settings.tracker.answer_budget_ms / 1000
        self._slow_logged = 0.0
        legacy = LegacyTokens(settings.tracker.secrets) if settings.tracker.legacy_tokens else None
        self.tokens = TokenVerifier(keys, legacy)
        # Host -> the projects whose tokens it serves: a project's own domains serve it alone;
        # public_url's host every project (mail minted before a project had a domain of its own).
        self.hosts: dict[str, frozenset[str] | None] = {settings.public_host: None}
        for project in settings.projects:
            self.hosts.update(dict.fromkeys(project.tracking_hosts, frozenset({project.id})))
        self.proxies = TrustedProxies(settings.tracker.trusted_proxies)
        self.tracking = TrackingSettings(settings, store)
        # Bearer tokens: each project's secret (full access, as before api_keys) and its API keys.
        self._tokens = {p.secret: (p, ApiAccess.ADMIN) for p in settings.projects}
        self._tokens.update({k.key: (p, k.access) for p in settings.projects for k in p.api_keys})
        self.clock = clock  # event times; a test replays hours of traffic by setting it
        self.feedback = FeedbackRoutes(settings, store)
        self.suppressions = SuppressionRoutes(store)
        self.dead_letters = DeadLetterRoutes(store)
        self._metrics_readers = TrustedProxies(settings.tracker.metrics_allow)
        # Every hit counts in these: labelled once, not per hit (labels() takes a lock and checks its arguments).
        self._store_seconds = STORE_SECONDS.labels("record_engagement")
        self._hits: dict[tuple[str, str], Counter] = {}

    async def _store_hits(self, payloads: list[bytes]) -> None:
        """The spool's delivery of hits: stored by the recorder, then what it left to this process done here."""
        recorded = await self.recorder.record(payloads)
        for body in recorded.deferred:
            self.spool.append("hit", body)
        for payload, reason in recorded.unreadable:
            self.spool.set_aside(payload, "hit", reason)
        if recorded.store_seconds is not None:
            self._store_seconds.observe(recorded.store_seconds)
        for labels, count in recorded.hits.items():
            counter = self._hits.get(labels)
            if counter is None:
                counter = self._hits[labels] = HITS.labels(*labels)
            counter.inc(count)
        if recorded.webhooks_queued:
            self.store.outbox_added.set()
        if recorded.only_waiting:
            await asyncio.sleep(1.0)  # only hits waiting for their copy: do not spin on them

    async def settled(self) -> None:
        """Wait (at most SETTLE_SECONDS) until the hits this process answered are stored: a reader of
        events or figures sees the hits that were answered before it asked."""
        await self.spool.settled(SETTLE_SECONDS)

    def _claims(self, request: HitRequest, token: str, kind: str) -> TrackingClaims | None:
        """The claims of a `kind` token minted for a project this Host serves; None for any other token or Host."""
        host = self.proxies.host(request)
        if host not in self.hosts:
            return None
        return self.tokens.verify(token, kind, self.hosts[host])

    def _hit(self, request: HitRequest, claims: TrackingClaims) -> Hit:
        """What the verdict needs from the request; `sent_at` comes with the send (`_event`)."""
        header = request.header
        return Hit(
            kind="open" if claims.kind == "open" else "click",
            at=self.clock(),
            ip=self.proxies.client_ip(request),
            user_agent=header(b"user-agent"),
            method=request.method,
            purpose=header(b"sec-purpose") or header(b"purpose") or header(b"x-moz"),
            link=claims.link,
            honeypot=claims.honeypot,
        )

    def _spool(self, request: HitRequest, claims: TrackingClaims) -> asyncio.Future[None]:
        """Spool the hit; the future resolves once it is durable. Who the copy went to (the send its token
        names) is read from the store when the spool delivers it, so the answer never waits on the store."""
        return self.spool.append("hit", SpooledHit.body(claims, self._hit(request, claims)))

    def answered_late(self) -> None:
        """The disk is slower than the budget: the answer went out first; the hit is written and stored all the same."""
        if time.monotonic() - self._slow_logged > SLOW_LOG_SECONDS:
            self._slow_logged = time.monotonic()
            log.warning("spool-slow answered before the hit was durable budget_ms=%d depth=%d",
                        self.settings.tracker.answer_budget_ms, self.spool.depth())

    def respond(self, kind: str, token: str, request: HitRequest) -> tuple[Response, asyncio.Future[None] | None]:
        """The answer to a `kind` ("open": the pixel, "click": a redirect) hit on `token`, and the future of
        its record in the spool (None when nothing is recorded): the answer goes out once the record is
        durable or after the answer budget. Called by HitProtocol, and by the Starlette routes (`answer`)."""
        if kind == "open":
            claims = self._claims(request, token.removesuffix(".gif"), "open")
            if claims is None:
                return NOT_FOUND, None
            return PIXEL, self._spool(request, claims)
        claims = self._claims(request, token, "click")
        if claims is not None and claims.honeypot:
            # The invisible trap link goes nowhere; only machines follow it.
            return HONEYPOT, self._spool(request, claims)
        location = redirect_location(claims.link) if claims is not None and claims.link is not None else None
        if claims is None or location is None:
            return NOT_FOUND, None  # only signed http(s) destinations are ever redirected to: no open redirect
        # The signed link as a browser requests it: byte for byte when it is visible ASCII, else its WHATWG
        # serialisation (the event keeps the link as written). RedirectResponse would re-quote it.
        return Redirect(location), self._spool(request, claims)

    async def answer(self, kind: str, token: str, scope: Scope) -> Response:
        """`respond` for the Starlette routes: the hits HitProtocol leaves to the app."""
        response, durable = self.respond(kind, token, HitRequest(scope))
        if durable is not None:
            try:
                async with asyncio.timeout(self.budget):
                    await durable
            except TimeoutError:
                self.answered_late()
            except OSError:
                pass  # the spool logged it; the hit still goes to the store from memory
        return response

    async def pixel(self, request: Request) -> Response:
        return await self.answer("open", request.path_params["token"], request.scope)

    async def click(self, request: Request) -> Response:
        return await self.answer("click", request.path_params["token"], request.scope)

    def _project(self, request: Request, *, admin: bool = False) -> ProjectSettings | Response:
        """The project the bearer token belongs to, or the 401/403 answer to give instead."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return UNAUTHORIZED
        found = None
        for secret, caller in self._tokens.items():  # every one compared, in constant time
            if hmac.compare_digest(secret.encode(), token.strip().encode()):
                found = caller
        if found is None:
            return UNAUTHORIZED
        project, access = found
        if admin and access is not ApiAccess.ADMIN:
            return JSONResponse({"error": "this API key is read-only (access = \"read\"); changes need an admin key"},
                                status_code=403)
        return project

    def authenticated(
        self, handler: Callable[[Request, ProjectSettings], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint that runs `handler` for the project whose secret or API key is the bearer token,
        else 401; a change (any method but GET) needs an admin token, else 403."""

        async def endpoint(request: Request) -> Response:
            project = self._project(request, admin=request.method != "GET")
            if isinstance(project, Response):
                return project
            return await handler(request, project)

        return endpoint

    async def events(self, request: Request) -> Response:
        project = self._project(request)
        if isinstance(project, Response):
            return project
        query = parse_event_query(project.id, request.query_params)
        if isinstance(query, list):
            return JSONResponse({"error": "; ".join(query)}, status_code=422)
        await self.settled()
        rows = await self.store.events(dataclasses.replace(query, limit=query.limit + 1))
        page = [event_json(row) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        return JSONResponse({"events": page, "next": event_cursor(page[-1]) if more else None})

    async def tracking_settings(self, request: Request) -> Response:
        """GET or PUT /v1/settings/tracking: the project's mode, changed for the next message relayed."""
        project = self._project(request, admin=request.method != "GET")
        if isinstance(project, Response):
            return project
        if request.method == "GET":
            return JSONResponse(await self.tracking.view(project))
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or set(body) != {"mode"}:
            return JSONResponse({"error": 'body: expected a JSON object {"mode": "..."}; the other settings are '
                                          "set in the configuration file"}, status_code=422)
        try:
            return JSONResponse(await self.tracking.change(project, body["mode"], by="api"))
        except ModeRefused as refused:
            return JSONResponse({"error": str(refused), **refused.detail}, status_code=refused.status)

    async def stats(self, request: Request) -> Response:
        project = self._project(request)
        if isinstance(project, Response):
            return project
        params = request.query_params
        since = parse_since(params.get("since"))
        if isinstance(since, list):
            return JSONResponse({"error": "; ".join(since)}, status_code=422)
        query = StatsQuery(project=project.id, campaign=params.get("campaign"), template=params.get("template"), since=since)
        await self.settled()
        return JSONResponse(stats_json(query, await self.store.stats(query)))

    async def tls_allowed(self, request: Request) -> Response:
        """200 only for a configured tracking host: the `ask` endpoint of a proxy's on-demand TLS
        (Caddy), so certificates are obtained for our domains and for no name a stranger points here."""
        return Response(status_code=200 if host_name(request.query_params.get("domain", "")) in self.hosts else 404)
    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics, to the addresses in tracker.metrics_allow only (404 to others, as for any unknown path)."""
        peer = request.client.host if request.client else ""
        if not self._metrics_readers.contains(peer):
            return NOT_FOUND
        return await metrics_response(self.store)

    async def health(self, request: Request) -> Response:
        return await health_response(self.store)


def parse_since(since: str | None) -> str | list[str] | None:
    """`since` normalised to the stored form, or the problem with it."""
    if since is None:
        return None
    try:
        moment = datetime.fromisoformat(since)
    except ValueError:
        return ["since: expected an RFC 3339 timestamp such as 2026-01-31T00:00:00Z"]
    # Stored times are UTC with microseconds; normalise so string order is time order.
    return rfc3339(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


def event_cursor(event: Mapping[str, Any]) -> str:
    """The `next` of a page of events: where the following page starts (opaque to clients, no personal data)."""
    return base64.urlsafe_b64encode(f"{event['at']}|{event['id']}".encode()).decode().rstrip("=")


def parse_cursor(cursor: str) -> tuple[str, int] | None:
    try:
        at, _, event_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition("|")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (at, int(event_id)) if event_id.isdigit() and at else None


def parse_event_query(project: str, params: Mapping[str, str]) -> EventQuery | list[str]:
    """The filters of GET /v1/events, or the list of problems with them."""
    problems = []
    before = None
    if "cursor" in params:
        before = parse_cursor(params["cursor"])
        if before is None:
            problems.append("cursor: not a cursor from this API; pass the `next` of the previous page unchanged")
    limit = params.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        problems.append(f"limit: expected an integer from 1 to {MAX_LIMIT}")
    name = params.get("name")
    if name is not None and name not in EVENT_NAMES:
        problems.append(f"name: expected one of {', '.join(EVENT_NAMES)}")
    since = parse_since(params.get("since"))
    if isinstance(since, list):
        problems.extend(since)
    if problems or isinstance(since, list):
        return problems
    return EventQuery(
        project=project,
        contact=params.get("contact"),
        name=name,
        campaign=params.get("campaign"),
        message_id=params.get("message_id"),
        since=since,
        limit=int(limit),
        before=before,
    )


def create_app(tracker: Tracker, *, manage_store: bool = False, dashboard: bool = False) -> ASGIApp:
    """Build the ASGI app. With manage_store, the app opens and closes the store and the spool in its lifespan;
    with dashboard, the dashboard is served under /dashboard."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_store:
            await tracker.store.open()
            await tracker.spool.open()
        try:
            yield
        finally:
            if manage_store:
                await tracker.spool.close()
                await tracker.store.close()

    routes: list[BaseRoute] = [
        Route("/o/{token}", tracker.pixel, methods=["GET", "HEAD"]),
        Route("/c/{token}", tracker.click, methods=["GET", "HEAD"]),
        Route("/v1/events", tracker.events, methods=["GET"]),
        Route("/v1/settings/tracking", tracker.tracking_settings, methods=["GET", "PUT"]),
        Route("/v1/stats", tracker.stats, methods=["GET"]),
        Route("/healthz", tracker.health, methods=["GET"]),
        Route("/tls/allowed", tracker.tls_allowed, methods=["GET"]),
        Route("/v1/feedback/ses", tracker.feedback.ses, methods=["POST"]),
        Route("/v1/feedback", tracker.authenticated(tracker.feedback.bridged), methods=["POST"]),
        Route("/v1/suppressions", tracker.authenticated(tracker.suppressions.list), methods=["GET"]),
        Route("/v1/suppressions", tracker.authenticated(tracker.suppressions.add), methods=["POST"]),
        Route("/v1/suppressions/{address}", tracker.authenticated(tracker.suppressions.remove), methods=["DELETE"]),
        Route("/v1/webhooks/dead-letters", tracker.authenticated(tracker.dead_letters.list), methods=["GET"]),
        Route("/v1/webhooks/dead-letters/{id}/replay", tracker.authenticated(tracker.dead_letters.replay), methods=["POST"]),
        Route("/metrics", tracker.metrics, methods=["GET"]),
    ]
    if dashboard:
        routes += Dashboard(tracker.settings, tracker.store, settled=tracker.settled).routes()
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(HardenedResponses), Middleware(AccessLog)])
    # Starlette answers `/c/<token>/` with a 307 to an absolute URL built from the Host header:
    # a redirect we did not sign. Every path is exact; anything else is 404.
    app.router.redirect_slashes = False
    return app


def dashboard_app(tracker: Tracker) -> Starlette:
    """The dashboard alone, for `[dashboard] listen` (a port of its own, e.g. kept off the public tracker)."""
    app = Starlette(routes=Dashboard(tracker.settings, tracker.store, settled=tracker.settled).routes(),
                    middleware=[Middleware(HardenedResponses), Middleware(AccessLog)])
    app.router.redirect_slashes = False
    return app
