"""Shared fixtures: a real upstream SMTP sink, and the real service running on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from config.settings import Settings, settings_from_mapping
from inflight.service import Service

if TYPE_CHECKING:
    from tests.cluster import PrivatePostgres

PROJECT = "demo"
PROJECT_SECRET = "demo-secret"
# Bad-input tally (tests/test_smtp_input.py), printed at the end of the run for the record.
INPUT_TALLY: Counter[str] = Counter()
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_netdata() -> Path:
    """The dated network lists in `<repo>/../shared/netdata` (INFLIGHT_NETDATA overrides);
    tests needing them skip when the copy is absent, since it is not part of the repo."""
    path = Path(os.environ.get("INFLIGHT_NETDATA") or SHARED / "netdata")
    if not (path / "apple-private-relay.txt").is_file():
        pytest.skip(f"shared network lists not found at {path} (set INFLIGHT_NETDATA)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Delivered:
    mail_from: str
    recipients: list[str]
    data: bytes


@dataclass
class SinkHandler:
    """An upstream MTA that stores what it accepts; `data_reply` makes it refuse DATA instead."""

    messages: list[Delivered] = field(default_factory=list)
    data_reply: str | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        self.messages.append(Delivered(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""))
        return "250 2.0.0 Ok: queued"


@dataclass
class Sink:
    handler: SinkHandler
    port: int

    @property
    def messages(self) -> list[Delivered]:
        return self.handler.messages

    @property
    def url(self) -> str:
        return f"smtp+insecure://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client that trusts only this self-signed certificate (and checks the host name)."""
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A real self-signed certificate for 127.0.0.1 and localhost, made once per test run."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@contextlib.contextmanager
def running_sink(handler: SinkHandler) -> Iterator[Sink]:
    """An upstream on a free loopback port for the block, answering with `handler`."""
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield Sink(handler, controller.port)
    finally:
        controller.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    with running_sink(SinkHandler()) as running:
        yield running


# --- PostgreSQL: the store of several nodes -------------------------------------------------------

PG_URL = os.environ.get("INFLIGHT_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin(statement: str) -> None:
    """Run one statement on the server's maintenance database (CREATE/DROP DATABASE need no transaction)."""
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_server() -> str:
    """INFLIGHT_TEST_PG_URL when a server answers there; else skip, or fail when INFLIGHT_REQUIRE_PG=1 (CI)."""
    try:
        _pg_admin("SELECT 1")
    except Exception as exc:
        reason = f"PostgreSQL unreachable at {urlsplit(PG_URL).hostname}:{urlsplit(PG_URL).port} ({type(exc).__name__}: {exc})"
        if os.environ.get("INFLIGHT_REQUIRE_PG") == "1":
            pytest.fail(f"{reason}; INFLIGHT_REQUIRE_PG=1 requires it")
        pytest.skip(f"{reason}; set INFLIGHT_TEST_PG_URL")
    return PG_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database of its own for one test (parallel runs never meet), dropped afterwards."""
    name = f"inflight_test_{os.urandom(6).hex()}"
    _pg_admin(f"CREATE DATABASE {name}")
    try:
        yield urlsplit(pg_server)._replace(path=f"/{name}").geturl()
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the test's own (tests/cluster.py), which it may stop and start."""
    from tests.cluster import PrivatePostgres, postgres_bindir  # it imports this module

    bindir = postgres_bindir()
    if bindir is None:
        reason = "initdb and pg_ctl not found (Debian: postgresql-15)"
        if os.environ.get("INFLIGHT_REQUIRE_PG") == "1":
            pytest.fail(f"{reason}; INFLIGHT_REQUIRE_PG=1 requires them")
        pytest.skip(reason)
    server = PrivatePostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store URL of each backend in turn: every contract test runs on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/inflight.db"
    return str(request.getfixturevalue("pg_url"))


def config_mapping(tmp_path: Path, upstream_url: str, **sections: Any) -> dict[str, Any]:
    """The tests' configuration, TOML-shaped: listeners on port 0, SQLite and the spool in `tmp_path`, one
    project; `sections` merge into it (arrays of tables replace)."""
    raw: dict[str, Any] = {
        "relay": {"listen": "127.0.0.1:0", "hostname": "relay.test", "allow_plaintext_auth": True, "workers": 1},
        "tracker": {"listen": "127.0.0.1:0", "public_url": "http://127.0.0.1:1", "secrets": ["test-secret-1"],
                    "workers": 1},
        "store": {"url": f"sqlite:///{tmp_path}/inflight.db", "spool_dir": f"{tmp_path}/spool"},
        "upstream": {"url": upstream_url},
        "projects": [{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": "ENABLED"}],
    }
    for name, value in sections.items():
        raw[name] = value if isinstance(value, list) else {**raw.get(name, {}), **value}
    return raw


def make_settings(tmp_path: Path, upstream_url: str, **sections: Any) -> Settings:
    """Test settings (config_mapping) for a Service in the test's own process."""
    return settings_from_mapping(config_mapping(tmp_path, upstream_url, **sections), environ={})


class RunningService:
    """The real Service on its own event loop (uvloop, as in production) in a thread, so tests can use blocking clients."""

    def __init__(self, settings: Settings, *, relay: bool = True, tracker: bool = True) -> None:
        self.service = Service(settings, relay=relay, tracker=tracker)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: uvloop.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.service.start()
        except BaseException as exc:  # surfaced in __enter__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.service.stop()

    def __enter__(self) -> RunningService:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("service did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def smtp_port(self) -> int:
        assert self.service.relay_address is not None
        return self.service.relay_address[1]

    @property
    def smtps_port(self) -> int:
        assert self.service.smtps_address is not None
        return self.service.smtps_address[1]

    @property
    def http_base(self) -> str:
        assert self.service.tracker_address is not None
        return f"http://127.0.0.1:{self.service.tracker_address[1]}"


class DeterministicMinter:
    """A LinkMinter whose URLs can be read back: the n-th distinct destination gets `/c/<recipient>/<n>`.

    A pure-function collaborator (no clock, no keys), so rewriter tests can check which destination each tracked
    URL stands for. The query string carries '&' and '=' on purpose: escaping must handle both.
    """

    def __init__(
        self, *, recipient: str = "r1", host: str = "track.test", exclude: tuple[str, ...] = (), honeypot: bool = True
    ) -> None:
        self.recipient = recipient
        self.host = host
        self.exclude = exclude
        self.honeypot = honeypot
        self.destinations: list[str] = []
        self.calls = 0

    def click_url(self, destination: str) -> str | None:
        self.calls += 1
        host = (urlsplit(destination).hostname or "").lower()
        if host == self.host or any(
            host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])) for pattern in self.exclude
        ):
            return None
        self.destinations.append(destination)
        return f"https://{self.host}/c/{self.recipient}/{len(self.destinations) - 1}?v=1&s=ab"

    def pixel_url(self) -> str:
        return f"https://{self.host}/o/{self.recipient}.gif?v=1&s=cd"

    def honeypot_url(self) -> str | None:
        return f"https://{self.host}/h/{self.recipient}" if self.honeypot else None

    def is_tracking_url(self, url: str) -> bool:
        return re.match(rf"https://{re.escape(self.host)}/[coh]/", url) is not None

    def destination_of(self, tracked: str) -> str:
        match = re.fullmatch(rf"https://{re.escape(self.host)}/c/{re.escape(self.recipient)}/(\d+)\?v=1&s=ab", tracked)
        assert match, f"not one of our click URLs: {tracked!r}"
        return self.destinations[int(match.group(1))]


@pytest.fixture
def minter() -> DeterministicMinter:
    return DeterministicMinter()


@pytest.fixture
def make_minter() -> type[DeterministicMinter]:
    return DeterministicMinter


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if INPUT_TALLY:
        counts = " ".join(f"{key}={INPUT_TALLY[key]}" for key in
                          ("cases", "transactions", "accepted", "lost", "duplicates", "delivered_after_refusal"))
        terminalreporter.write_line(f"bad SMTP input: {counts}")
