"""The dashboard's pages: projects, Settings → Tracking, campaign/template reports, events, webhooks.

Server-rendered with Jinja2 (autoescaped), charts drawn as SVG here, one small stylesheet of our
own, no JavaScript. Every page needs a session; every POST a CSRF token; changes need an admin
account (`inflight users add --admin`). A project-bound account sees that project only.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from config.settings import ProjectSettings, Settings, TrackingMode
from config.tracking import ModeRefused, TrackingSettings
from store.model import EVENT_NAMES, DashboardSession, DashboardUser, EventQuery, EventStore, StatsQuery, rfc3339
from tracker.dashboard.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    LoginBackoff,
    new_token,
    password_matches,
    same_token,
    token_hash,
    wait_text,
)
from tracker.dashboard.charts import Series, line_chart
from tracker.shapes import event_json, stats_json

PREFIX = "/dashboard"
AGENTS = ("human", "image_proxy", "apple_mpp", "scanner", "prefetch")
PAGE_SIZE = 50
CSV_LIMIT = 100_000
SECURITY_HEADERS = {
    # Our own stylesheet and inline SVG only: nothing from elsewhere, no scripts, no framing.
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class Viewer:
    """The signed-in account and its session, as every page needs them."""

    def __init__(self, user: DashboardUser, session: DashboardSession) -> None:
        self.user = user
        self.csrf = session.csrf

    def may_see(self, project: str) -> bool:
        return self.user.project is None or self.user.project == project


Page = Callable[[Request, Viewer], Awaitable[Response]]


class Dashboard:
    def __init__(self, settings: Settings, store: EventStore, *, settled: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        # Awaited before each page is read: the tracker answers a hit before storing it, and a page should
        # show the hits answered before it was asked for, as /v1/stats does.
        self.settled = settled
        self.tracking = TrackingSettings(settings, store)
        self.clock = clock
        # An account gets 3 free failures, an address 10 (several people may share one NAT).
        self.by_user, self.by_ip = LoginBackoff(free_failures=3), LoginBackoff(free_failures=10)
        self.templates = Environment(loader=PackageLoader("tracker.dashboard", "templates"),
                                     autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
        self.secure_cookies = settings.tracker.public_url.startswith("https://")

    # --- plumbing ----------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        pages: list[tuple[str, Page, list[str]]] = [
            ("/", self.projects, ["GET"]),
            ("/p/{project}/settings", self.settings_page, ["GET", "POST"]),
            ("/p/{project}/report", self.report, ["GET"]),
            ("/p/{project}/events", self.events, ["GET"]),
            ("/p/{project}/events.csv", self.events_csv, ["GET"]),
            ("/p/{project}/webhooks", self.webhooks, ["GET"]),
            ("/p/{project}/webhooks/{outbox_id:int}/retry", self.retry_webhook, ["POST"]),
            ("/p/{project}/webhooks/dead/{dead_id:int}/replay", self.replay_dead_letter, ["POST"]),
            ("/logout", self.logout, ["POST"]),
        ]
        inner: list[BaseRoute] = [Route(path, self._guarded(page), methods=methods) for path, page, methods in pages]
        inner += [Route("/login", self.login, methods=["GET", "POST"]),
                  Mount("/static", StaticFiles(directory=Path(__file__).parent / "static"))]
        return [Route(PREFIX, lambda request: RedirectResponse(f"{PREFIX}/", 303)), Mount(PREFIX, routes=inner)]

    def _render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(prefix=PREFIX, **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def _cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="strict",
                            secure=self.secure_cookies)

    async def _viewer(self, request: Request) -> Viewer | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        session = await self.store.session(token_hash(token), now=self.clock())
        user = await self.store.user(session.email) if session else None
        return Viewer(user, session) if user is not None and session is not None else None

    def _guarded(self, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            viewer = await self._viewer(request)
            if viewer is None:
                return RedirectResponse(f"{PREFIX}/login", 303)
            if request.method == "POST":
                form = await _form(request)
                if not same_token(viewer.csrf, form.get("csrf")):
                    return self._render("error.html", 403, viewer=viewer, message="The form expired or came from elsewhere "
                                        "(CSRF check failed). Reload the page and try again.")
                request.state.form = form
            else:
                await self.settled()
            project_id = request.path_params.get("project")
            if project_id is not None and (self.settings.project(project_id) is None or not viewer.may_see(project_id)):
                return self._render("error.html", 404, viewer=viewer, message="No such project.")
            return await page(request, viewer)

        return endpoint

    def _project(self, request: Request) -> ProjectSettings:
        project = self.settings.project(request.path_params["project"])
        assert project is not None  # checked by _guarded
        return project

    def _since(self, days: int) -> str:
        start = datetime.fromtimestamp(self.clock(), UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return rfc3339(start - timedelta(days=days - 1))

    # --- sign-in -----------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        peer = request.client.host if request.client else "?"
        if request.method == "GET":
            token = new_token()
            response = self._render("login.html", csrf=token, error=None)
            self._cookie(response, LOGIN_COOKIE, token, 3600)
            return response
        form = await _form(request)
        email = form.get("email", "").strip().lower()
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not same_token(expected, form.get("csrf")):
            return self._render("login.html", 403, csrf=expected, error="The form expired; reload the page.")
        wait = max(self.by_ip.retry_after(peer), self.by_user.retry_after(email))
        if wait > 0:
            return self._render("login.html", 429, csrf=expected, error=f"Too many failed sign-ins; try again in {wait_text(wait)}.")
        user = await self.store.user(email)
        if not password_matches(user, form.get("password", "")) or user is None:
            self.by_ip.failed(peer)
            self.by_user.failed(email)
            return self._render("login.html", 401, csrf=expected, error="Wrong email or password.")
        self.by_user.succeeded(email)
        token = new_token()
        await self.store.create_session(token_hash(token), DashboardSession(user.email, new_token()),
                                        expires=self.clock() + SESSION_SECONDS)
        signed_in = RedirectResponse(f"{PREFIX}/", 303)
        self._cookie(signed_in, SESSION_COOKIE, token, SESSION_SECONDS)
        signed_in.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return signed_in

    async def logout(self, request: Request, viewer: Viewer) -> Response:
        await self.store.delete_session(token_hash(request.cookies.get(SESSION_COOKIE, "")))
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # --- pages -------------------------------------------------------------------------

    async def projects(self, request: Request, viewer: Viewer) -> Response:
        since = self._since(7)
        rows = []
        for project in self.settings.projects:
            if not viewer.may_see(project.id):
                continue
            stats = stats_json(StatsQuery(project.id, since=since), await self.store.stats(StatsQuery(project.id, since=since)))
            rows.append({"project": project, "mode": (await self.tracking.mode(project)).value, "stats": stats})
        return self._render("projects.html", viewer=viewer, rows=rows, engine=self.settings.upstream.tracking_engine.value)

    async def settings_page(self, request: Request, viewer: Viewer) -> Response:
        project = self._project(request)
        message, error = None, None
        if request.method == "POST":
            if not viewer.user.admin:
                return self._render("error.html", 403, viewer=viewer, message="This account is read-only.")
            form = request.state.form
            try:
                if form.get("reset"):
                    await self.tracking.reset(project, by=f"dashboard:{viewer.user.email}")
                    message = f"Back to the TOML value, {project.tracking.value}."
                else:
                    await self.tracking.change(project, form.get("mode"), by=f"dashboard:{viewer.user.email}")
                    message = f"Tracking mode is now {form.get('mode')}; the next message follows it."
            except ModeRefused as refused:
                error = str(refused)
        upstream = self.settings.upstream
        stored = await self.store.tracking_mode(project.id)
        modes = [{"mode": mode.value, "why_not": upstream.unavailable(mode)} for mode in TrackingMode]
        return self._render("settings.html", 409 if error and "needs" in error else 200, viewer=viewer, project=project,
                            mode=(await self.tracking.mode(project)).value, stored=stored, modes=modes,
                            engine=upstream.tracking_engine.value, message=message, error=error)

    async def report(self, request: Request, viewer: Viewer) -> Response:
        project = self._project(request)
        params = request.query_params
        days = min(max(int(params["days"]) if params.get("days", "").isdigit() else 14, 1), 366)
        since = self._since(days)
        query = StatsQuery(project.id, campaign=params.get("campaign") or None, template=params.get("template") or None, since=since)
        stats = stats_json(query, await self.store.stats(query))
        by_day = {row.day: row for row in await self.store.daily(query)}
        start = datetime.fromisoformat(since.removesuffix("Z"))
        day_names = [(start + timedelta(days=i)).strftime("%Y-%m-%d") for i in range(days)]
        rows = [by_day.get(day) for day in day_names]

        def values(kind: str, count: str) -> list[int]:
            return [getattr(getattr(row, kind), count) if row is not None else 0 for row in rows]

        delivered = [row.delivered if row is not None else 0 for row in rows]
        charts = {"delivered": line_chart("Delivered per day", day_names, [Series("delivered", delivered, "s1")])}
        for kind in ("opens", "clicks"):
            charts[kind] = line_chart(f"{kind.capitalize()} per day", day_names, [
                Series(f"{count.replace('_', ' ')} {kind}", values(kind, count), style)
                for count, style in (("unique", "s1"), ("total", "s2"), ("unique_human", "s3"), ("total_human", "s4"))
            ])
        agents = await self.store.agent_counts(query)
        return self._render("report.html", viewer=viewer, project=project, query=query, days=days, stats=stats,
                            charts={k: Markup(v) for k, v in charts.items()}, agents=agents, agent_names=AGENTS)

    def _event_query(self, project: str, params: Any, limit: int) -> EventQuery | str:
        name = params.get("type") or None
        if name is not None and name not in EVENT_NAMES:
            return f"type: one of {', '.join(EVENT_NAMES)}"
        agent = params.get("agent") or None
        if agent is not None and agent not in AGENTS:
            return f"agent: one of {', '.join(AGENTS)}"
        bounds = {}
        for key in ("since", "until"):
            text = params.get(key) or ""
            if text:
                try:
                    moment = datetime.fromisoformat(text)
                except ValueError:
                    return f"{key}: a date such as 2026-03-01 or 2026-03-01T10:00"
                bounds[key] = rfc3339(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
        before = None
        if params.get("before_at") and params.get("before_id", "").isdigit():
            before = (params["before_at"], int(params["before_id"]))
        return EventQuery(project=project, name=name, contact=params.get("contact") or None,
                          campaign=params.get("campaign") or None, agent=agent, since=bounds.get("since"),
                          until=bounds.get("until"), limit=limit, before=before)

    async def events(self, request: Request, viewer: Viewer) -> Response:
        project = self._project(request)
        params = request.query_params
        query = self._event_query(project.id, params, PAGE_SIZE + 1)
        if isinstance(query, str):
            return self._render("events.html", 422, viewer=viewer, project=project, events=[], error=query, params=params,
                                next_url=None, csv_url=None, names=EVENT_NAMES, agents=AGENTS)
        rows = await self.store.events(query)
        events = [event_json(row) for row in rows[:PAGE_SIZE]]
        filters = {k: v for k, v in params.items() if k not in ("before_at", "before_id") and v}
        next_url = None
        if len(rows) > PAGE_SIZE:
            last = events[-1]
            next_url = f"?{urlencode({**filters, 'before_at': last['at'], 'before_id': last['id']})}"
        return self._render("events.html", viewer=viewer, project=project, events=events, error=None, params=params,
                            next_url=next_url, csv_url=f"events.csv?{urlencode(filters)}", names=EVENT_NAMES, agents=AGENTS)

    async def events_csv(self, request: Request, viewer: Viewer) -> Response:
        project = self._project(request)
        query = self._event_query(project.id, request.query_params, CSV_LIMIT)
        if isinstance(query, str):
            return Response(query, status_code=422, media_type="text/plain")
        columns = ["id", "at", "name", "contact", "recipient", "message_id", "campaign", "template", "link", "agent",
                   "agent_reason", "tracked", "reason", "ip", "user_agent"]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in await self.store.events(query):
            event = event_json(row)
            writer.writerow([_csv_cell(event.get(column)) for column in columns])
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{project.id}-events.csv"'})

    async def webhooks(self, request: Request, viewer: Viewer) -> Response:
        project = self._project(request)
        rows = await self.store.webhook_rows(project.id, 200)
        now = self.clock()
        for row in rows:
            row["age"] = int(now - row["created"])
        dead = await self.store.dead_letters(project.id, limit=200)
        return self._render("webhooks.html", viewer=viewer, project=project, rows=rows, dead=dead, now=now,
                            configured=bool(project.webhook_url), retry_hours=self.settings.webhooks.retry_hours)

    async def retry_webhook(self, request: Request, viewer: Viewer) -> Response:
        project = self._project(request)
        if not viewer.user.admin:
            return self._render("error.html", 403, viewer=viewer, message="This account is read-only.")
        await self.store.retry_webhook_now(project.id, request.path_params["outbox_id"], now=self.clock())
        return RedirectResponse(f"{PREFIX}/p/{project.id}/webhooks", 303)

    async def replay_dead_letter(self, request: Request, viewer: Viewer) -> Response:
        """A given-up delivery back to the outbox, due now, with its webhook-id (as POST /v1/webhooks/dead-letters/ID/replay)."""
        project = self._project(request)
        if not viewer.user.admin:
            return self._render("error.html", 403, viewer=viewer, message="This account is read-only.")
        await self.store.replay_dead_letter(project.id, request.path_params["dead_id"], now=self.clock())
        return RedirectResponse(f"{PREFIX}/p/{project.id}/webhooks", 303)


def _csv_cell(value: Any) -> str:
    """A cell a spreadsheet will not run: a leading = + - @ is quoted with an apostrophe (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form (the only kind our pages send), last value per field."""
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[-1] for key, values in fields.items()}
