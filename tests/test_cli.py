"""The CLI as an operator uses it: a real `inflight serve` process, the README walk-through, the compose file."""

from __future__ import annotations

import email
import email.policy
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inflight.cli import build_parser
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


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
[tracker]
listen = "127.0.0.1:{http_port}"
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
    process = subprocess.Popen([sys.executable, "-m", "inflight.cli", "serve", "--config", str(config)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "serve did not come up"
            time.sleep(0.1)
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
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
    assert process.returncode == 0, output
    assert "demo-secret" not in output and "walkthrough-secret" not in output
