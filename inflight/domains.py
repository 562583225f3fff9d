"""`inflight domains check`: is each tracking domain ready to carry links?

A link on a domain that does not resolve to the tracker, or whose certificate is wrong, is a
click that never reaches its page; mail clients also flag such links. So before a project's
first mail, each of its `tracking_domains` is checked the way a reader's browser will meet it:
DNS (A/AAAA, through any CNAME, reaching the tracker's public address), HTTPS with a
certificate valid for the name, and the tracker's /healthz answering through that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

from config.settings import Settings


class CannotResolve(Exception):
    """The name has no address we could learn (no such name, no answer, no resolver)."""


@dataclass(frozen=True)
class Resolved:
    addresses: tuple[str, ...]
    canonical: str | None = None  # the name at the end of the CNAME chain, when the domain is an alias


class Resolver(Protocol):
    async def resolve(self, name: str) -> Resolved: ...


class DnsResolver:
    """dnspython's resolver: the system's, or one nameserver given as HOST[:PORT] (a staging resolver, a test's)."""

    def __init__(self, nameserver: str | None = None, *, timeout: float = 5.0) -> None:
        self._nameserver = nameserver
        self._timeout = timeout

    def _resolver(self) -> dns.asyncresolver.Resolver:
        try:
            resolver = dns.asyncresolver.Resolver(configure=self._nameserver is None)
        except dns.resolver.NoResolverConfiguration:
            raise CannotResolve("no resolver configured on this machine (/etc/resolv.conf); pass --resolver") from None
        if self._nameserver is not None:
            host, _, port = self._nameserver.rpartition(":") if self._nameserver.count(":") == 1 else (self._nameserver, "", "")
            resolver.nameservers = [host]
            resolver.port = int(port or 53)
        resolver.lifetime = self._timeout
        return resolver

    async def resolve(self, name: str) -> Resolved:
        try:
            return Resolved((str(ipaddress.ip_address(name)),))
        except ValueError:
            pass
        resolver = self._resolver()
        addresses: list[str] = []
        canonical: str | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(name, rdtype)
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.NXDOMAIN:
                raise CannotResolve("no such name (NXDOMAIN)") from None
            except dns.exception.Timeout:
                raise CannotResolve(f"no answer from the resolver within {self._timeout:g} s (offline?)") from None
            except dns.resolver.NoNameservers:
                raise CannotResolve("the resolver failed (SERVFAIL)") from None
            addresses.extend(str(record) for record in answer)
            if answer.canonical_name.to_text(omit_final_dot=True).lower() != name.lower():
                canonical = answer.canonical_name.to_text(omit_final_dot=True)
        if not addresses:
            raise CannotResolve("no A or AAAA record")
        return Resolved(tuple(addresses), canonical)


@dataclass(frozen=True)
class Finding:
    ok: bool
    project: str
    domain: str
    check: str  # dns | https | healthz
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'missing':<8} {self.project} {self.domain} {self.check}: {self.detail}"


@dataclass(frozen=True)
class Tracker:
    """Where tracking domains must lead: the tracker's public addresses, and the name to alias."""

    addresses: frozenset[str]
    origin: str  # where the addresses come from, for the report
    public_host: str


async def tracker_address(settings: Settings, resolver: Resolver) -> Tracker:
    """tracker.public_addresses, else what tracker.public_url's host resolves to (empty when it does not)."""
    host = settings.public_host
    if settings.tracker.public_addresses:
        return Tracker(frozenset(settings.tracker.public_addresses), "tracker.public_addresses", host)
    try:
        resolved = await resolver.resolve(host)
    except CannotResolve:
        return Tracker(frozenset(), f"tracker.public_url's host {host}, which does not resolve", host)
    return Tracker(frozenset(resolved.addresses), f"tracker.public_url's host {host}", host)


async def check_domain(
    project: str, domain: str, tracker: Tracker, resolver: Resolver, *, port: int, context: ssl.SSLContext, timeout: float
) -> list[Finding]:
    found = [await _check_dns(project, domain, tracker, resolver)]
    target = sorted(tracker.addresses)[0] if tracker.addresses else None
    if target is None:
        fix = "set tracker.public_addresses to the reverse proxy's public IPs"
        return [*found, Finding(False, project, domain, "https", f"not checked: the tracker's address is unknown; fix: {fix}")]
    found.extend(await _check_https(project, domain, target, port=port, context=context, timeout=timeout))
    return found


async def _check_dns(project: str, domain: str, tracker: Tracker, resolver: Resolver) -> Finding:
    wanted = ", ".join(sorted(tracker.addresses)) or "the tracker's address"
    fix = (f"fix: at your DNS provider, `{domain}. CNAME {tracker.public_host}.` or A/AAAA records to {wanted} "
           f"(from {tracker.origin})")
    try:
        resolved = await resolver.resolve(domain)
    except CannotResolve as exc:
        return Finding(False, project, domain, "dns", f"cannot resolve: {exc}; {fix}")
    alias = f" via CNAME {resolved.canonical}" if resolved.canonical else ""
    elsewhere = sorted(set(resolved.addresses) - tracker.addresses)
    if elsewhere:
        return Finding(False, project, domain, "dns", f"resolves{alias} to {', '.join(elsewhere)}, not the tracker; {fix}")
    return Finding(True, project, domain, "dns", f"resolves{alias} to {', '.join(sorted(resolved.addresses))} (the tracker)")


async def _connect(address: str, port: int, domain: str, context: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(address, port, ssl=context, server_hostname=domain)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, domain: str, path: str) -> tuple[str, bytes]:
    """(status line, whole answer) of one GET on an open connection, which it closes; at most 64 KB read."""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n"
                     "User-Agent: inflight-domains-check\r\n\r\n".encode("ascii"))
        answer = b""
        try:
            while len(answer) < 65536 and (chunk := await reader.read(65536 - len(answer))):
                answer += chunk
        except (ssl.SSLEOFError, ConnectionResetError):
            if not answer:
                raise  # many servers close TLS without close_notify after answering: that is an end, not a failure
    finally:
        writer.close()
    return answer.split(b"\r\n", 1)[0].decode("latin-1"), answer


async def _check_https(
    project: str, domain: str, address: str, *, port: int, context: ssl.SSLContext, timeout: float
) -> list[Finding]:
    """A TLS handshake with the domain's name at the tracker's address; then, through it, /healthz and
    whether the tracker there serves this domain (it runs the configuration being checked)."""
    where = f"{address}:{port}"
    fix = f"fix: a TLS reverse proxy at {where} with a certificate for {domain} (README: Tracking domains)"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(address, port, domain, context)
    except ssl.SSLCertVerificationError as exc:
        return [Finding(False, project, domain, "https", f"certificate not valid for {domain} ({exc.verify_message}); {fix}")]
    except ssl.SSLError as exc:
        return [Finding(False, project, domain, "https", f"TLS handshake with {where} failed ({exc.reason}); {fix}")]
    except (OSError, TimeoutError) as exc:
        return [Finding(False, project, domain, "https", f"cannot connect to {where} ({exc or 'timeout'}); {fix}")]
    certificate = writer.get_extra_info("peercert") or {}
    found = [Finding(True, project, domain, "https", f"certificate valid for {domain} until {certificate.get('notAfter', '?')}")]
    answers: list[tuple[str, bytes]] = []
    for path in ("/healthz", f"/tls/allowed?domain={domain}"):
        try:
            async with asyncio.timeout(timeout):
                if answers:
                    reader, writer = await _connect(address, port, domain, context)
                answers.append(await _get(reader, writer, domain, path))
        except (OSError, TimeoutError) as exc:
            answers.append((f"no answer ({exc or 'timeout'})", b""))
    (health, health_answer), (routing, _) = answers
    if health.split(" ")[1:2] == ["200"] and b'"store"' in health_answer:
        found.append(Finding(True, project, domain, "healthz", f"https://{domain}/healthz answered 200 (the tracker)"))
    else:
        found.append(Finding(False, project, domain, "healthz",
                             f"https://{domain}/healthz answered {health or 'nothing'!r}, not the tracker's 200; "
                             "fix: the proxy must forward to tracker.listen and pass the Host header"))
        return found
    if routing.split(" ")[1:2] == ["200"]:
        found.append(Finding(True, project, domain, "routing", f"the tracker there serves {domain}'s links"))
    else:
        found.append(Finding(False, project, domain, "routing",
                             f"the tracker there answered {routing!r} for {domain}: it runs a configuration without this "
                             "domain, and its links would get 404; fix: deploy this configuration to it and restart it"))
    return found


async def check_domains(
    settings: Settings,
    domains: Sequence[tuple[str, str]],
    resolver: Resolver,
    *,
    port: int = 443,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> list[Finding]:
    """Every (project, domain) checked at once, so an offline machine answers within one timeout."""
    context = context or ssl.create_default_context()
    tracker = await tracker_address(settings, resolver)
    results = await asyncio.gather(*(check_domain(project, domain, tracker, resolver, port=port, context=context,
                                                  timeout=timeout) for project, domain in domains))
    return [finding for found in results for finding in found]
