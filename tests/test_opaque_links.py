"""Tracking links end to end: nothing personal readable in a delivered URL, altered tokens refused,
legacy tokens while enabled, routing by Host to each project's own tracking domains, lines kept whole."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from store.model import Sends
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.test_flow import events, html_message, html_of, send, tracked_urls
from tests.test_store import opened
from tracker.sends import SendDirectory
from tracking.claims import TrackedSend, TrackingClaims
from tracking.legacy import LegacyTokens, claims_to_dict
from tracking.tokens import new_send_id

RECIPIENT = "jane.doe@recipient.example"
MESSAGE_ID = "opaque-check-7f3a@app.example"
CAMPAIGN = "spring-sale-2026"
URL = re.compile(r"https?://[^\s\"'<>]+")
AUTH = {"Authorization": f"Bearer {PROJECT_SECRET}"}


def decodings(url: str) -> list[bytes]:
    """The URL and every base64 (standard or URL-safe, any alignment) or hex reading of it and of its parts."""
    texts = {url, unquote(url)}
    for text in list(texts):
        texts.update(re.split(r"[/?&=.#:;,+]", text))
        texts.add(urlsplit(text).path)
    out = [text.encode() for text in texts]
    for text in texts:
        letters = re.sub(r"[^A-Za-z0-9+/_-]", "", text)
        for offset in range(4):
            chunk = letters[offset:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            for alphabet in (chunk, chunk.replace("-", "+").replace("_", "/")):
                with contextlib.suppress(binascii.Error):
                    out.append(base64.b64decode(alphabet))
        for offset in range(2):
            digits = re.sub(r"[^0-9a-fA-F]", "", text)[offset:]
            out.append(bytes.fromhex(digits[: len(digits) - len(digits) % 2]))
    return out


def test_no_url_in_a_delivered_copy_tells_the_recipient_message_id_campaign_or_project(tmp_path: Path, sink: Sink) -> None:
    project = {"id": "acme-newsletters", "secret": PROJECT_SECRET, "honeypot_link": True}
    with RunningService(make_settings(tmp_path, sink.url, projects=[project])) as service:
        message = html_message({"X-Inflight-Campaign": CAMPAIGN, "Message-ID": f"<{MESSAGE_ID}>"}, to=RECIPIENT,
                               html='<html><body><a href="https://example.com/a">a</a> <a href="https://example.com/b?x=1">b</a>'
                                    "</body></html>")
        send(service.smtp_port, message, [RECIPIENT], user="acme-newsletters")
        [copy] = sink.messages
        urls = URL.findall(html_of(copy.data).replace("&amp;", "&"))
        assert len(urls) == 4  # two links, the trap link, the pixel
        secrets = [RECIPIENT, "jane.doe", MESSAGE_ID, "opaque-check", CAMPAIGN, "acme-newsletters"]
        for url in urls:
            for decoded in decodings(url):
                for secret in secrets:
                    assert secret.encode() not in decoded.lower(), (url, secret)
        # ... and yet the tracker knows who it was.
        assert httpx.get(service.http_base + urlsplit(urls[0]).path, headers={"User-Agent": "Mozilla/5.0"}).status_code == 302
        [event] = httpx.get(f"{service.http_base}/v1/events", params={"name": "email.click"}, headers=AUTH).json()["events"]
        assert (event["recipient"], event["message_id"], event["campaign"]) == (RECIPIENT, MESSAGE_ID, CAMPAIGN)


def test_a_real_token_altered_in_any_byte_is_404(tmp_path: Path, sink: Sink) -> None:
    with RunningService(make_settings(tmp_path, sink.url)) as service:
        send(service.smtp_port, html_message())
        click_url, pixel_url = tracked_urls(sink.messages[0].data)
        with httpx.Client(base_url=service.http_base) as client:
            for url, prefix, suffix in ((click_url, "/c/", ""), (pixel_url, "/o/", ".gif")):
                token = urlsplit(url).path.removeprefix(prefix).removesuffix(suffix)
                raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
                assert client.get(prefix + token + suffix).status_code in (200, 302)
                for index in range(len(raw)):
                    altered = bytearray(raw)
                    altered[index] ^= 0x01
                    forged = base64.urlsafe_b64encode(bytes(altered)).rstrip(b"=").decode()
                    response = client.get(prefix + forged + suffix)
                    assert response.status_code == 404 and "location" not in response.headers, (prefix, index)


def legacy_click(link: str, secret: str = "test-secret-1", project: str = PROJECT) -> str:
    send = TrackedSend(project=project, message_id="old@app.example", contact="old@x.example", recipient="old@x.example",
                       sent_at=1_700_000_000, campaign="old-campaign")
    return LegacyTokens([secret]).sign(claims_to_dict(TrackingClaims("click", project, link=link, send=send)))


@pytest.mark.parametrize("enabled", [True, False])
def test_legacy_tokens_work_while_enabled_and_404_after(tmp_path: Path, sink: Sink, enabled: bool) -> None:
    settings = make_settings(tmp_path, sink.url, tracker={"legacy_tokens": enabled})
    with RunningService(settings) as service:
        response = httpx.get(f"{service.http_base}/c/{legacy_click('https://example.com/old')}")
        if enabled:
            assert response.status_code == 302 and response.headers["location"] == "https://example.com/old"
            [click] = events(service, name="email.click")
            assert (click["message_id"], click["recipient"], click["campaign"]) == ("old@app.example", "old@x.example",
                                                                                    "old-campaign")
        else:
            assert response.status_code == 404 and "location" not in response.headers
            assert events(service) == []


DOMAINS_PROJECTS = [
    {"id": "a", "secret": "secret-of-a", "tracking_domains": ["click.a.test", "t.a.test"], "tracking_scheme": "http"},
    {"id": "b", "secret": "secret-of-b", "tracking_domains": ["click.b.test"], "tracking_scheme": "http"},
    {"id": "c", "secret": "secret-of-c"},
]


def mailed_urls(service: RunningService, sink: Sink, project: str, base: str) -> tuple[str, str]:
    """(click path, pixel path) of a message sent as `project`; its URLs must start with `base`."""
    send(service.smtp_port, html_message(), user=project, password=f"secret-of-{project}")
    urls = URL.findall(html_of(sink.messages[-1].data).replace("&amp;", "&"))
    tracked = [u for u in urls if u.startswith(base)]
    assert len(tracked) == 2, urls
    return urlsplit(tracked[0]).path, urlsplit(tracked[1]).path


def test_host_routing_each_domain_serves_its_project_only(tmp_path: Path, sink: Sink) -> None:
    with RunningService(make_settings(tmp_path, sink.url, projects=DOMAINS_PROJECTS)) as service:
        a_click, a_pixel = mailed_urls(service, sink, "a", "http://click.a.test/")
        c_click, _ = mailed_urls(service, sink, "c", "http://127.0.0.1:1/")

        def status(path: str, host: str, **headers: str) -> int:
            return httpx.get(service.http_base + path, headers={"Host": host, **headers}).status_code

        assert status(a_click, "click.a.test") == 302 and status(a_pixel, "click.a.test") == 200
        assert status(a_click, "T.A.test:8443") == 302  # every domain of the project, any case, any port
        assert status(a_click, "127.0.0.1") == 302  # public_url's host serves every project (mail minted before domains)
        assert status(a_click, "click.b.test") == 404 and status(a_pixel, "click.b.test") == 404
        assert status(c_click, "click.a.test") == 404 and status(c_click, "127.0.0.1:8080") == 302
        assert status(a_click, "unknown.test") == 404 and status(a_click, "") == 404
        # Behind the reverse proxy (127.0.0.1 is a trusted proxy here): X-Forwarded-Host is the Host.
        assert status(a_click, "127.0.0.1", **{"X-Forwarded-Host": "click.a.test"}) == 302
        assert status(a_click, "127.0.0.1", **{"X-Forwarded-Host": "click.b.test"}) == 404
        # From a peer that is no trusted proxy, X-Forwarded-Host is ignored.
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport) as untrusted:
            forged = untrusted.get(service.http_base + a_click, headers={"Host": "click.b.test", "X-Forwarded-Host": "click.a.test"})
            assert forged.status_code == 404
        clicks = [e for e in events_of(service, "a") if e["name"] == "email.click"]
        assert len(clicks) == 4 and {e["recipient"] for e in clicks} == {"a@example.com"}
        # The `ask` endpoint of on-demand TLS: certificates only for configured tracking hosts.
        asks = {d: httpx.get(f"{service.http_base}/tls/allowed", params={"domain": d}).status_code
                for d in ("click.a.test", "t.a.test", "click.b.test", "127.0.0.1", "evil.test", "")}
        assert asks == {"click.a.test": 200, "t.a.test": 200, "click.b.test": 200, "127.0.0.1": 200, "evil.test": 404, "": 404}


def events_of(service: RunningService, project: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{service.http_base}/v1/events", headers={"Authorization": f"Bearer secret-of-{project}"})
    return response.json()["events"]


def test_links_to_the_projects_own_tracking_domains_are_not_tracked(tmp_path: Path, sink: Sink) -> None:
    html = ('<html><body><a href="http://t.a.test/c/x">mine</a> <a href="https://click.a.test/page">mine too</a> '
            '<a href="https://example.com/">other</a></body></html>')
    with RunningService(make_settings(tmp_path, sink.url, projects=DOMAINS_PROJECTS)) as service:
        send(service.smtp_port, html_message(html=html), user="a", password="secret-of-a")
        body = html_of(sink.messages[0].data)
        assert 'href="http://t.a.test/c/x"' in body and 'href="https://click.a.test/page"' in body
        assert "https://example.com/" not in body and body.count("http://click.a.test/c/") == 1


def test_a_7bit_line_with_five_links_stays_whole(tmp_path: Path, sink: Sink) -> None:
    project = {"id": PROJECT, "secret": PROJECT_SECRET, "tracking_domains": ["click.shopexample.example"]}  # 25 characters
    links = [f"https://shop.example.com/spring/sale?a={n}" for n in range(5)]
    assert {len(link) for link in links} == {40}
    line = " ".join(f'<a href="{link}">item {n}</a>' for n, link in enumerate(links))
    raw = ("From: app@example.com\r\nTo: a@example.com\r\nSubject: lines\r\nMessage-ID: <lines@app.example>\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
           f"<html><body>\r\n{line}\r\n</body></html>\r\n").encode()
    with RunningService(make_settings(tmp_path, sink.url, projects=[project])) as service:
        send(service.smtp_port, raw)
    body = sink.messages[0].data.split(b"\r\n\r\n", 1)[1]
    lines = body.split(b"\r\n")
    assert len(lines) == 4  # as sent: <html><body>, the links, the pixel + </body></html>, "" -- no break added
    [rewritten] = [entry for entry in lines if entry.count(b"https://click.shopexample.example/c/") == 5]
    assert len(rewritten) < 998 and b"shop.example.com" not in rewritten
    assert all(len(entry) < 998 for entry in lines)


async def sent(store: Sends, project: str, send_id: bytes) -> TrackedSend | None:
    return (await store.tracked_sends([(project, send_id)])).get((project, send_id))


def test_forget_and_retention_delete_the_stored_sends(store_url: str) -> None:
    async def main() -> None:
        async with opened(store_url) as store:
            now = int(datetime.now(UTC).timestamp())
            rows = [(new_send_id(), TrackedSend(project=p, message_id=f"m{p}{n}", contact=who, recipient=who.upper(),
                                                sent_at=now - age, campaign="k"))
                    for p in ("p", "q") for n, (who, age) in enumerate([("a@x.example", 0), ("b@x.example", 0),
                                                                       ("c@x.example", 86400 * 10)])]
            await store.record_sends(rows)
            everything = await store.tracked_sends([(send.project, send_id) for send_id, send in rows] + [("p", b"x" * 12)])
            assert everything == {(send.project, send_id): send for send_id, send in rows}
            assert await sent(store, "p", rows[0][0]) == rows[0][1]
            assert await sent(store, "q", rows[0][0]) is None  # ids are per project
            await store.forget("A@X.example", project="p")
            assert await sent(store, "p", rows[0][0]) is None and await sent(store, "q", rows[3][0]) is not None
            await store.forget("b@x.example")
            assert await sent(store, "p", rows[1][0]) is None and await sent(store, "q", rows[4][0]) is None
            await store.purge("p", datetime.now(UTC) - timedelta(days=5))
            assert await sent(store, "p", rows[2][0]) is None and await sent(store, "q", rows[5][0]) is not None
            await store.record_sends([(rows[3][0], replace(rows[3][1], campaign="other"))])  # an id is written once
            assert await sent(store, "q", rows[3][0]) == rows[3][1]

    asyncio.run(main())


def test_send_directory_resolves_a_batch_with_one_read_and_legacy_claims_as_they_are(store_url: str) -> None:
    async def main() -> None:
        async with opened(store_url) as store:
            known = (new_send_id(), TrackedSend(project="p", message_id="m", contact="c", recipient="c@x.example", sent_at=1))
            await store.record_sends([known])
            legacy = TrackedSend(project="p", message_id="old", contact="o", recipient="o@x.example", sent_at=2)
            claims = [TrackingClaims("open", "p", known[0]), TrackingClaims("click", "p", new_send_id(), "https://x.example/"),
                      TrackingClaims("open", "p", send=legacy), TrackingClaims("click", "q", known[0], "https://x.example/")]
            directory = SendDirectory(store)
            assert await directory.sends_of(claims) == [known[1], None, legacy, None]
            await store.purge("p", datetime.now(UTC) + timedelta(days=1))  # a row read once is cached
            assert await directory.sends_of(claims[:1]) == [known[1]]
            assert await SendDirectory(store).sends_of(claims[:1]) == [None]

    asyncio.run(main())
