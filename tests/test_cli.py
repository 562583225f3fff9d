"""The CLI as an operator uses it: a real `inflight serve` process, the README walk-through, the compose file."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx

from inflight.cli import build_parser
from tests.conftest import free_port
from tests.processes import ROOT, Inflight, answers
from tests.test_store import opened, sent


def test_compose_file_uses_real_cli_verbs() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    verbs = re.findall(r'command: \["(\S+?)", "--config"', compose)
    assert sorted(verbs) == ["relay", "tracker"]
    for verb in verbs:
        build_parser().parse_args([verb, "--config", "x.toml"])  # exits on an unknown verb


def test_serve_process_walkthrough_with_outbox(tmp_path: Path) -> None:
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "inflight.toml"
    config.write_text(f"""
[relay]
listen = "127.0.0.1:{smtp_port}"
allow_plaintext_auth = true
workers = 1
[tracker]
listen = "127.0.0.1:{http_port}"
workers = 1
public_url = "http://127.0.0.1:{http_port}"
secrets = ["walkthrough-secret"]
[store]
url = "sqlite:///{tmp_path}/inflight.db"
[upstream]
url = "outbox:///{tmp_path}/outbox"
[[projects]]
id = "demo"
secret = "demo-secret"
""")
    serve = Inflight("serve", config, tmp_path / "serve.log")
    try:
        serve.start(ready=lambda started: answers(f"{started.http_base}/healthz"))
        message = (b"From: app@example.com\r\nTo: a@example.com\r\nSubject: hi\r\n"
                   b"X-Inflight-Template-Type: MARKETING\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: text/html; charset=utf-8\r\n\r\n"
                   b'<p><a href="https://example.com/x?a=1&amp;b=2">x</a></p>\r\n')
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            client.login("demo", "demo-secret")
            client.sendmail("app@example.com", ["a@example.com"], message)
        [eml] = list((tmp_path / "outbox").glob("*.eml"))
        body = str(email.message_from_bytes(eml.read_bytes(), policy=email.policy.default).get_content())
        click_url = re.search(r'href="([^"]+/c/[^"]+)"', body).group(1)  # type: ignore[union-attr]
        pixel_url = re.search(r'src="([^"]+/o/[^"]+)"', body).group(1)  # type: ignore[union-attr]
        assert httpx.get(pixel_url).status_code == 200
        redirect = httpx.get(click_url, follow_redirects=False)
        assert redirect.status_code == 302 and redirect.headers["location"] == "https://example.com/x?a=1&b=2"
        names = [e["name"] for e in httpx.get(f"http://127.0.0.1:{http_port}/v1/events",
                                              headers={"Authorization": "Bearer demo-secret"}).json()["events"]]
        assert names == ["email.click", "email.open", "email.sent"]
    finally:
        code = serve.stop(15) if serve.process is not None else None
    output = serve.output()
    assert code == 0, output
    assert "demo-secret" not in output and "walkthrough-secret" not in output
    assert "outcome=queued project=demo" in output  # the one line per message an operator reads
    assert "login_data is deprecated" not in output  # aiosmtpd's own noise on every AUTH


def test_contacts_forget_erases_the_contact_and_its_pending_webhooks(tmp_path: Path) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f"""
[store]
url = "sqlite:///{tmp_path}/inflight.db"
[[projects]]
id = "p"
secret = "demo-secret"
webhook_url = "http://127.0.0.1:9/hooks"
webhook_secret = "0123456789abcdef"
""")

    async def seed() -> None:
        async with opened(tmp_path / "inflight.db", webhook_projects=("p",)) as store:
            await store.record([sent("m1", "gone@example.com"), sent("m2", "kept@example.com"),
                                replace(sent("m3", "crm-42"), recipient="Gone@Example.com")])

    asyncio.run(seed())
    forget = subprocess.run([sys.executable, "-m", "inflight.cli", "contacts", "forget", "GONE@example.com",
                             "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert forget.returncode == 0, forget.stderr
    assert forget.stdout.strip() == ("forgot GONE@example.com: 2 event(s), 2 pending webhook(s) deleted; "
                                     "later events from mail already delivered will not be recorded")
    with sqlite3.connect(tmp_path / "inflight.db") as db:
        assert db.execute("SELECT contact FROM events").fetchall() == [("kept@example.com",)]
        assert db.execute("SELECT count(*) FROM webhook_outbox").fetchone() == (1,)
    # secure_delete + checkpoint: the address is gone from the file's bytes, not just from the table.
    for path in tmp_path.glob("inflight.db*"):
        assert b"gone@example.com" not in path.read_bytes().lower(), path.name


def test_contacts_forget_refuses_an_unknown_project(tmp_path: Path) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/x.db"\n[[projects]]\nid = "p"\nsecret = "demo-secret"\n')
    forget = subprocess.run([sys.executable, "-m", "inflight.cli", "contacts", "forget", "a@example.com",
                             "--project", "nope", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert forget.returncode == 2 and "no project 'nope'" in forget.stderr


def test_suppressions_list_add_remove(tmp_path: Path) -> None:
    config = tmp_path / "inflight.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/x.db"\n[[projects]]\nid = "p"\nsecret = "demo-secret"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "inflight.cli", "suppressions", *args, "--config", str(config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)

    assert cli("add", "p", "Someone@Example.com").stdout.strip() == "added: Someone@Example.com"
    assert cli("add", "p", "someone@example.com").stdout.strip() == "already suppressed: someone@example.com"
    listed = cli("list", "p").stdout.strip().split("\t")
    assert (listed[0], listed[1], listed[3]) == ("someone@example.com", "manual", "added with the CLI")
    assert cli("remove", "p", "someone@example.com").returncode == 0
    missing = cli("remove", "p", "someone@example.com")
    assert missing.returncode == 1 and missing.stdout.strip() == "not suppressed: someone@example.com"
    assert cli("list", "p").stdout == ""
    unknown = cli("list", "nope")
    assert unknown.returncode == 2 and "unknown project 'nope'" in unknown.stderr
    assert cli("add", "p").returncode == 2 and cli("list", "p", "x@example.com").returncode == 2
