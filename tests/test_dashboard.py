"""The dashboard over real sockets: sign-in, cookies, CSRF, back-off and scoping with an HTTP client,
then the pages in a real browser (Playwright driving Debian's chromium)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.processes import ROOT
from tests.test_flow import fetch, html_message, send, tracked_urls

PASSWORD = "correct horse battery"
CHROMIUM = "/usr/bin/chromium"
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"
MARKETING = {"X-Inflight-Template-Type": "MARKETING", "X-Inflight-Campaign": "spring"}


def add_user(config: Path, email: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inflight.cli", "users", "add", email, "--config", str(config), *flags],
                          input=PASSWORD + "\n", capture_output=True, text=True, cwd=ROOT, timeout=60)


def config_file(tmp_path: Path, sink: Sink) -> Path:
    config = tmp_path / "inflight.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/inflight.db"\n[upstream]\nurl = "{sink.url}"\n'
                      f'[[projects]]\nid = "{PROJECT}"\nsecret = "{PROJECT_SECRET}"\n'
                      f'[[projects]]\nid = "other"\nsecret = "other-secret-123"\n')
    return config


@pytest.fixture
def dashboard(tmp_path: Path, sink: Sink) -> Iterator[RunningService]:
    config = config_file(tmp_path, sink)
    for email, flags in (("admin@example.com", ["--admin"]), ("viewer@example.com", ["--project", PROJECT])):
        added = add_user(config, email, *flags)
        assert added.returncode == 0, added.stderr
    settings = make_settings(tmp_path, sink.url, tracker={"sent_window_seconds": 0},
                             projects=[{"id": PROJECT, "secret": PROJECT_SECRET},
                                       {"id": "other", "secret": "other-secret-123"}])
    with RunningService(settings) as running:
        yield running


def sign_in(client: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
    form = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
    return client.post("/dashboard/login", data={"email": email, "password": password, "csrf": csrf})


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


def test_users_add_refuses_short_passwords_and_unknown_projects(tmp_path: Path, sink: Sink) -> None:
    config = config_file(tmp_path, sink)
    short = subprocess.run([sys.executable, "-m", "inflight.cli", "users", "add", "a@example.com", "--config", str(config)],
                           input="short\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert short.returncode == 2 and "at least 12 characters" in short.stderr
    assert add_user(config, "a@example.com", "--project", "nope").returncode == 2
    done = add_user(config, "A@Example.com", "--project", PROJECT)
    assert done.returncode == 0 and done.stdout.strip() == f"saved a@example.com: project {PROJECT}, read-only"


def test_sign_in_cookies_csrf_and_back_off(dashboard: RunningService) -> None:
    with httpx.Client(base_url=dashboard.http_base) as client:
        assert client.get("/dashboard/").headers["location"] == "/dashboard/login"
        for _ in range(3):  # typos cost nothing...
            assert sign_in(client, "admin@example.com", "wrong password!").status_code == 401
        throttled = sign_in(client, "admin@example.com")  # ...then even the right password waits out the back-off
        assert throttled.status_code == 429 and "Too many failed sign-ins" in throttled.text
    with httpx.Client(base_url=dashboard.http_base) as client:
        login = client.get("/dashboard/login")
        forged = client.post("/dashboard/login", data={"email": "viewer@example.com", "password": PASSWORD, "csrf": "forged"})
        assert forged.status_code == 403
        signed_in = client.post("/dashboard/login", data={"email": "viewer@example.com", "password": PASSWORD,
                                                         "csrf": csrf_of(login)})
        cookie = signed_in.headers["set-cookie"]
        assert signed_in.status_code == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # http public_url; Secure with https (test below)
        home = client.get("/dashboard/")
        assert home.status_code == 200 and 'data-project="demo"' in home.text and 'data-project="other"' not in home.text
        assert "default-src 'none'" in home.headers["content-security-policy"]
        assert client.get("/dashboard/p/other/report").status_code == 404  # bound to its project
        settings_page = client.get(f"/dashboard/p/{PROJECT}/settings")
        no_csrf = client.post(f"/dashboard/p/{PROJECT}/settings", data={"mode": "DISABLED"})
        read_only = client.post(f"/dashboard/p/{PROJECT}/settings", data={"mode": "DISABLED", "csrf": csrf_of(settings_page)})
        assert no_csrf.status_code == 403 and read_only.status_code == 403
        assert httpx.get(f"{dashboard.http_base}/v1/settings/tracking",
                         headers={"Authorization": f"Bearer {PROJECT_SECRET}"}).json()["mode"] == "ENABLED"


def test_session_cookie_is_secure_behind_https(tmp_path: Path, sink: Sink) -> None:
    add_user(config_file(tmp_path, sink), "admin@example.com", "--admin")
    settings = make_settings(tmp_path, sink.url, tracker={"public_url": "https://t.example.com"})
    with RunningService(settings) as running, httpx.Client(base_url=running.http_base) as client:
        form = client.get("/dashboard/login")  # the proxy in front speaks https; the client here cannot
        assert "; Secure" in form.headers["set-cookie"]
        token = csrf_of(form)
        signed_in = client.post("/dashboard/login", headers={"Cookie": f"inflight_login={token}"},
                                data={"email": "admin@example.com", "password": PASSWORD, "csrf": token})
        assert signed_in.status_code == 303 and "; Secure" in signed_in.headers["set-cookie"]


def test_events_page_filters_pages_and_exports_csv(dashboard: RunningService, sink: Sink) -> None:
    for n in range(3):
        send(dashboard.smtp_port, html_message(MARKETING, to=f"r{n}@example.com"), [f"r{n}@example.com"])
    with httpx.Client(base_url=dashboard.http_base) as client:
        sign_in(client, "admin@example.com")
        page = client.get(f"/dashboard/p/{PROJECT}/events", params={"type": "email.sent", "contact": "R1@Example.com"})
        assert page.status_code == 200 and page.text.count("<td>email.sent</td>") == 1 and "r1@example.com" in page.text
        export = client.get(f"/dashboard/p/{PROJECT}/events.csv", params={"type": "email.sent"})
        assert export.headers["content-type"].startswith("text/csv")
        assert len(export.text.strip().splitlines()) == 4 and export.text.startswith("id,at,name,contact")
        assert client.get(f"/dashboard/p/{PROJECT}/events", params={"type": "email.nope"}).status_code == 422


def browser() -> Iterator[object]:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def chromium() -> Iterator[object]:
    yield from browser()


def test_in_a_browser_sign_in_flip_the_mode_and_read_the_charts(dashboard: RunningService, sink: Sink, chromium) -> None:  # type: ignore[no-untyped-def]
    page = chromium.new_page()
    base = dashboard.http_base
    page.goto(f"{base}/dashboard/")
    page.fill("input[name=email]", "admin@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    assert page.inner_text("tr[data-project=demo] td.mode") == "ENABLED"

    page.click("tr[data-project=demo] td.mode a")
    page.check("input[value=DISABLED]")
    page.click("button[name=change]")
    assert page.inner_text("#current-mode") == "DISABLED"
    send(dashboard.smtp_port, html_message(MARKETING))
    assert tracked_urls(sink.messages[-1].data) == []  # the next message follows the mode
    page.check("input[value=ENABLED]")
    page.click("button[name=change]")
    assert page.inner_text("#current-mode") == "ENABLED"
    for n in range(2):
        send(dashboard.smtp_port, html_message(MARKETING, to=f"c{n}@example.com"), [f"c{n}@example.com"])
    first, second = (tracked_urls(m.data) for m in sink.messages[-2:])
    assert first and second
    for url in [*first, *first, *second]:  # c0 opens and clicks twice, c1 once; a scanner fetches c1's pixel
        assert fetch(dashboard, url, headers={"User-Agent": BROWSER_UA}).status_code in (200, 302)
    fetch(dashboard, next(u for u in second if "/o/" in u), headers={"User-Agent": "curl/8.0"})

    page.goto(f"{base}/dashboard/p/{PROJECT}/report?campaign=spring")
    stats = httpx.get(f"{base}/v1/stats", params={"campaign": "spring"}, headers={"Authorization": f"Bearer {PROJECT_SECRET}"}).json()

    def chart_sum(chart: str, series: str) -> int:
        values = page.eval_on_selector_all(f"#{chart} g.series[data-series='{series}'] circle",
                                           "points => points.map(p => Number(p.dataset.value))")
        return sum(values)

    assert chart_sum("chart-delivered", "delivered") == stats["delivered"] == 3
    # Links come before the pixel in the HTML, so each first click also records an implied open.
    assert chart_sum("chart-opens", "total opens") == stats["opens"]["total"] == 6
    assert chart_sum("chart-opens", "total human opens") == stats["opens"]["total_human"] == 5  # not curl's
    assert chart_sum("chart-clicks", "unique clicks") == stats["clicks"]["unique"] == 2
    assert chart_sum("chart-clicks", "total clicks") == stats["clicks"]["total"] == 3
    for kind in ("opens", "clicks"):
        for count in ("unique", "total", "unique_human", "total_human"):
            assert int(page.inner_text(f"#summary tr[data-kind={kind}] td.{count}")) == stats[kind][count]
    assert page.inner_text("#sent") == str(stats["sent"])
    assert "https://example.com/x?a=1&b=2" in page.inner_text("#links")


def test_dashboard_on_a_listener_of_its_own(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, dashboard={"listen": "127.0.0.1:0"})
    with RunningService(settings) as running:
        address = running.service.dashboard_address
        assert address is not None
        assert httpx.get(f"http://127.0.0.1:{address[1]}/dashboard/login").status_code == 200
        assert httpx.get(f"{running.http_base}/dashboard/login").status_code == 404  # not on the public tracker
    off = make_settings(tmp_path, sink.url, dashboard={"enabled": False})
    with RunningService(off) as running:
        assert httpx.get(f"{running.http_base}/dashboard/login").status_code == 404


def test_webhooks_page_lists_pending_and_given_up_deliveries_and_replays(tmp_path: Path, sink: Sink) -> None:
    add_user(config_file(tmp_path, sink), "admin@example.com", "--admin")
    hook = {"id": PROJECT, "secret": PROJECT_SECRET, "webhook_url": "http://127.0.0.1:9/hooks", "webhook_secret": "0123456789abcdef"}
    settings = make_settings(tmp_path, sink.url, projects=[hook], webhooks={"retry_initial_seconds": 3600, "retry_max_seconds": 3600})
    with RunningService(settings) as running, httpx.Client(base_url=running.http_base) as client:
        send(running.smtp_port, html_message(MARKETING))
        store = running.service.store
        sign_in(client, "admin@example.com")
        page = client.get(f"/dashboard/p/{PROJECT}/webhooks")
        assert page.status_code == 200 and "<td>email.sent</td>" in page.text and "None given up." in page.text
        outbox_id = int(re.search(r"/webhooks/(\d+)/retry", page.text).group(1))  # type: ignore[union-attr]
        asyncio.run_coroutine_threadsafe(store.bury_webhook(outbox_id, error="HTTP 500", now=time.time()),
                                         running._loop).result(10)  # type: ignore[arg-type]
        page = client.get(f"/dashboard/p/{PROJECT}/webhooks")
        assert "Nothing waiting" in page.text and "HTTP 500" in page.text
        dead_id = re.search(r"/webhooks/dead/(\d+)/replay", page.text).group(1)  # type: ignore[union-attr]
        replayed = client.post(f"/dashboard/p/{PROJECT}/webhooks/dead/{dead_id}/replay", data={"csrf": csrf_of(page)})
        assert replayed.status_code == 303
        assert "<td>email.sent</td>" in client.get(f"/dashboard/p/{PROJECT}/webhooks").text  # back in the outbox
