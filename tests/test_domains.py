"""`inflight domains check` against a real DNS server, a real TLS reverse proxy (certificates from a CA of
our own) and the real tracker, all on loopback; and the configuration of tracking domains."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config.settings import ConfigError, settings_from_mapping
from inflight.cli import main
from tests.conftest import PROJECT_SECRET, RunningService, make_settings

# name -> records; a CNAME is followed by the server, as a recursive resolver would answer.
ZONE: dict[str, list[tuple[str, str]]] = {
    "click.a.test": [("A", "127.0.0.1")],
    "t.a.test": [("CNAME", "tracker.test")],
    "tracker.test": [("A", "127.0.0.1")],
    "click.b.test": [("CNAME", "elsewhere.test")],
    "elsewhere.test": [("A", "192.0.2.7")],
    "click.c.test": [("A", "127.0.0.1")],  # resolves, but the proxy has no certificate for it
    "click.f.test": [("A", "127.0.0.1")],  # all ready, but the running tracker's configuration lacks it
}
PROJECTS = [
    {"id": "a", "secret": "secret-of-a", "tracking_domains": ["click.a.test", "t.a.test"]},
    {"id": "b", "secret": "secret-of-b", "tracking_domains": ["click.b.test"]},
    {"id": "c", "secret": "secret-of-c", "tracking_domains": ["click.c.test", "click.d.test"]},  # d: no such name
    {"id": "e", "secret": "secret-of-e"},
]
NOT_DEPLOYED = {"id": "f", "secret": "secret-of-f", "tracking_domains": ["click.f.test"]}


class LoopbackDns:
    """A UDP DNS server on 127.0.0.1 answering from ZONE (dnspython builds the wire format)."""

    def __init__(self, zone: dict[str, list[tuple[str, str]]]) -> None:
        self.zone = zone
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True)
            if name not in self.zone:
                response.set_rcode(dns.rcode.NXDOMAIN)
            while name in self.zone:
                records = self.zone[name]
                if records[0][0] == "CNAME":
                    response.answer.append(dns.rrset.from_text(f"{name}.", 60, "IN", "CNAME", f"{records[0][1]}."))
                    name = records[0][1]
                    continue
                wanted = dns.rdatatype.to_text(question.rdtype)
                values = [value for kind, value in records if kind == wanted]
                if values:
                    response.answer.append(dns.rrset.from_text(f"{name}.", 60, "IN", wanted, *values))
                break
            self.sock.sendto(response.to_wire(), client)

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path, names: list[str]) -> Pki:
    """A CA of our own, and a certificate it signed for `names`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inflight test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = Pki(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return pki


class TlsProxy:
    """The reverse proxy in front of the tracker: TLS ends here, bytes go on to the tracker's port.

    asyncio in a thread of its own: one TLS connection must not be read and written from two threads
    (OpenSSL objects are not thread-safe), which a thread per direction would do.
    """

    def __init__(self, pki: Pki, target_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.cert, pki.key)
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        async def main() -> None:
            self.server = await asyncio.start_server(self._serve, sock=self.sock, ssl=self.context)
            started.set()
            await self.server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(main())

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pump(client_reader, writer), self._pump(reader, client_writer))

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            sink.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, LoopbackDns, TlsProxy, Pki]]:
    pki = make_pki(tmp_path, ["click.a.test", "t.a.test", "click.b.test", "click.f.test"])
    settings = make_settings(tmp_path, f"outbox:///{tmp_path}/outbox", projects=PROJECTS,
                             tracker={"public_addresses": ["127.0.0.1"]})
    dns_server = LoopbackDns(ZONE)
    config = tmp_path / "inflight.toml"
    config.write_text("\n".join([
        '[tracker]', 'public_url = "https://t.example.com"', 'secrets = ["test-secret-1"]', 'public_addresses = ["127.0.0.1"]',
        '[store]', f'url = "sqlite:///{tmp_path}/inflight.db"',
        *(f'[[projects]]\nid = "{p["id"]}"\nsecret = "{p["secret"]}"\ntracking_domains = {p.get("tracking_domains", [])!r}'
          .replace("'", '"') for p in [*PROJECTS, NOT_DEPLOYED]),
    ]))
    with RunningService(settings, relay=False) as service:
        assert service.service.tracker_address is not None
        proxy = TlsProxy(pki, service.service.tracker_address[1])
        try:
            yield config, dns_server, proxy, pki
        finally:
            proxy.close()
            dns_server.close()


def check(config: Path, *args: str) -> int:
    return main(["domains", "check", *args, "--config", str(config)])


def test_each_domain_is_reported_ok_or_missing_with_the_fix(world, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    config, dns_server, proxy, pki = world
    options = ["--resolver", dns_server.address, "--port", str(proxy.port), "--ca-file", str(pki.ca), "--timeout", "5"]
    assert check(config, "a", *options) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out] == [
        ["ok", "a", domain, check] for domain in ("click.a.test", "t.a.test") for check in ("dns:", "https:", "healthz:", "routing:")]
    assert "via CNAME tracker.test to 127.0.0.1" in out[4] and "answered 200" in out[2]

    assert check(config, *options) == 1
    lines = {tuple(line.split()[1:4]): line for line in capsys.readouterr().out.splitlines()}
    dns_b = lines[("b", "click.b.test", "dns:")]
    assert dns_b.startswith("missing") and "via CNAME elsewhere.test to 192.0.2.7, not the tracker" in dns_b
    assert "fix: at your DNS provider, `click.b.test. CNAME t.example.com.` or A/AAAA records to 127.0.0.1" in dns_b
    assert lines[("b", "click.b.test", "https:")].startswith("ok")  # the proxy is ready; only DNS is missing
    https_c = lines[("c", "click.c.test", "https:")]
    assert lines[("c", "click.c.test", "dns:")].startswith("ok") and https_c.startswith("missing")
    assert "certificate not valid for click.c.test" in https_c and "fix: a TLS reverse proxy" in https_c
    assert ("c", "click.c.test", "healthz:") not in lines
    routing_f = lines[("f", "click.f.test", "routing:")]
    assert routing_f.startswith("missing") and "deploy this configuration to it and restart it" in routing_f
    assert lines[("f", "click.f.test", "healthz:")].startswith("ok")
    assert "cannot resolve: no such name (NXDOMAIN)" in lines[("c", "click.d.test", "dns:")]
    assert not any(project == "e" for project, _, _ in lines)  # no tracking domains: nothing to check


def test_offline_every_domain_cannot_resolve(world, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    config, _, proxy, pki = world
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a resolver that never answers
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = f"127.0.0.1:{silent.getsockname()[1]}"
        assert check(config, "--resolver", resolver, "--port", str(proxy.port), "--ca-file", str(pki.ca), "--timeout", "1") == 1
    finally:
        silent.close()
    dns_lines = [line for line in capsys.readouterr().out.splitlines() if " dns: " in line]
    assert len(dns_lines) == 6 and all(line.startswith("missing") and "cannot resolve" in line for line in dns_lines)


def test_unknown_project_and_no_domains(world, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    config, *_ = world
    assert check(config, "nope") == 2
    assert check(config, "e") == 0 and "no tracking_domains configured" in capsys.readouterr().out


@pytest.mark.parametrize(("project", "problem"), [
    ({"tracking_domains": ["https://click.x.test"]}, "tracking_domains: 'https://click.x.test' is not a domain name"),
    ({"tracking_domains": ["127.0.0.1"]}, "is tracker.public_url's host"),
    ({"tracking_domains": ["click.shared.test"]}, "already a tracking domain of project 'first'"),
    ({"tracking_scheme": "ftp"}, 'tracking_scheme: expected "https"'),
])
def test_tracking_domain_config_is_validated(project: dict[str, object], problem: str) -> None:
    first = {"id": "first", "secret": "first-secret-1", "tracking_domains": ["Click.Shared.test"]}
    raw = {"tracker": {"public_url": "http://127.0.0.1:8080"}, "projects": [first, {"id": "p", "secret": PROJECT_SECRET, **project}]}
    with pytest.raises(ConfigError) as error:
        settings_from_mapping(raw, {})
    assert any(p.startswith("projects[1].") and problem in p for p in error.value.problems), error.value.problems
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"tracker": {"public_addresses": ["t.example.com"]}, "projects": [first]}, {})
    assert error.value.problems[0].startswith("tracker.public_addresses: 't.example.com' is not an IP address")


def test_tracking_base_is_the_first_domain_else_public_url() -> None:
    settings = settings_from_mapping({"tracker": {"public_url": "https://t.example.com/"}, "projects": [
        {"id": "a", "secret": "secret-of-a", "tracking_domains": ["Click.A.example.", "t.a.example"]},
        {"id": "b", "secret": "secret-of-b", "tracking_domains": ["click.b.example"], "tracking_scheme": "http"},
        {"id": "c", "secret": "secret-of-c"}]}, {})
    a, b, c = settings.projects
    assert [settings.tracking_base(p) for p in (a, b, c)] == ["https://click.a.example", "http://click.b.example",
                                                              "https://t.example.com"]
    assert a.tracking_hosts == ("click.a.example", "t.a.example") and settings.tracker.legacy_tokens is True
