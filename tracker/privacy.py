"""What the store keeps about a person: how much of the IP address, and for how long.

IP addresses are personal data (CJEU C-582/14, Breyer). The agent verdict needs the full
address, so it reads it from the request in memory; what is stored follows the project's
`ip_mode`. /24 and /48 are the usual truncations (Google Analytics' IP anonymisation drops
the last IPv4 octet; /48 is the common end-site IPv6 allocation, RFC 6177), so the stored
value still tells a country or provider and no longer tells a household.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from config.settings import IpMode
from store.model import ForgottenContacts as ForgottenStore
from store.model import is_forgotten

log = logging.getLogger("inflight.privacy")


def stored_ip(ip: str | None, mode: IpMode) -> str | None:
    """The client address as the store may keep it; an unparsable one is kept only in full mode."""
    if ip is None or mode is IpMode.FULL:
        return ip
    if mode is IpMode.NONE:
        return None
    network = client_network(ip)
    return str(network.network_address) if network is not None else None


def client_network(ip: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The /24 (IPv4) or /48 (IPv6) a client address belongs to; None when it is not an address.

    The one definition of the truncated granularity: what `ip_mode = "truncated"` stores, and
    what the verdict compares clients by, so history comparisons work on stored events alike.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:a.b.c.d is an IPv4 client behind a dual-stack socket
    prefix = 24 if address.version == 4 else 48
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


class PurgeableStore(Protocol):
    async def purge(self, project: str, before: datetime) -> int: ...


class RetentionPurge:
    """Deletes each project's events older than its `retention_days`, at start and then every `interval`.

    Every process that runs a Service runs one; the deletes are idempotent, so two
    processes on one store only repeat each other's work.
    """

    def __init__(self, store: PurgeableStore, retention_days: Mapping[str, int], *, interval: float) -> None:
        self.store = store
        self.retention_days = {project: days for project, days in retention_days.items() if days > 0}
        self.interval = interval

    async def purge_once(self, now: datetime | None = None) -> int:
        now = now or datetime.now(UTC)
        deleted = 0
        for project, days in self.retention_days.items():
            count = await self.store.purge(project, now - timedelta(days=days))
            if count:
                log.info("retention-purge project=%s days=%d deleted=%d", project, days, count)
            deleted += count
        return deleted

    async def run(self) -> None:
        if not self.retention_days:
            return
        while True:
            try:
                await self.purge_once()
            except Exception:
                log.exception("retention-purge-failed")
            await asyncio.sleep(self.interval)


class ForgottenContacts:
    """Erased contacts as the tracker checks them on every hit: the store's hashed list, re-read
    at most every `refresh_seconds` (`inflight contacts forget` runs in another process), so a
    hit costs no store read and a later open of old mail to an erased contact records nothing."""

    def __init__(self, store: ForgottenStore, *, refresh_seconds: float = 5.0) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._keys: set[tuple[str, str]] = set()
        self._read_at = float("-inf")

    async def covers(self, project: str, *who: str) -> bool:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_seconds:
            self._read_at = now
            try:
                self._keys = await self.store.forgotten_keys()
            except Exception:
                log.exception("forgotten-contacts-unreadable (the last list read is used)")
        return bool(self._keys) and is_forgotten(self._keys, project, *who)
