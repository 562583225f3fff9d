"""How often a client may try: AUTH failure back-off and per-project sending rates.

Both tables live in memory, are bounded (an attacker spraying addresses or usernames cannot
grow them without limit) and take the clock as a parameter so tests need no sleeping.

Several relay nodes share them through the store (`ThrottleSync`): each node decides from its
own tables, at once and without a trip to the store (aiosmtpd's AUTH callback cannot wait),
and every SYNC_SECONDS it stores what it saw (AUTH failures and successes, rate-limited sends)
and applies what the other nodes saw. A node is therefore at most about one sync interval
(plus the store's round trip) behind the others: an attacker moving between nodes gets at most
one interval's worth of extra tries, and a project's burst can pass its limit by what the
other nodes let through in that interval. The clock is wall time, so events compare across nodes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from store.model import ThrottleEvent, Throttles

log = logging.getLogger("inflight.throttle")

MAX_TRACKED_KEYS = 65_536
MAX_BACKOFF_SECONDS = 3600.0
KNOWN_GOOD_SECONDS = 86_400.0  # an app that sends daily stays exempt from its username's lock
SYNC_SECONDS = 1.0  # how often a node shares its throttle events and applies the others'
MAX_OUTGOING = 10_000  # events kept for the next sync while the store cannot be reached
RESHARE_GOOD_SECONDS = 3600.0  # a known-good address is told to the other nodes again after this


class _Outgoing(list[ThrottleEvent]):
    """Events waiting for the next sync; bounded, the oldest dropped (they still count here)."""

    def share(self, event: ThrottleEvent) -> None:
        self.append(event)
        if len(self) > MAX_OUTGOING:
            del self[: len(self) - MAX_OUTGOING]

    def drain(self) -> list[ThrottleEvent]:
        events = self[:]
        self.clear()
        return events


def client_key(peer: object) -> str:
    """The address one client controls: the IP, or its /64 for IPv6 (one host usually owns a whole /64)."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped or address) if address.version == 6 else str(address)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class _BoundedTable(OrderedDict[str, _Failures]):
    def touch(self, key: str) -> _Failures:
        entry = self.get(key)
        if entry is None:
            entry = self[key] = _Failures()
            while len(self) > MAX_TRACKED_KEYS:
                self.popitem(last=False)
        self.move_to_end(key)
        return entry


class AuthThrottle:
    """Counts failed AUTHs per client address and per username; past a limit, refuses for a while.

    The refusal period starts at `backoff` seconds and doubles with every further failure (at most
    an hour); failures are forgotten `window` seconds after the last one or the end of its
    refusal. A username lock would let anyone lock a project out, so addresses that authenticated
    as that username within the last day are exempt from it: the app's own servers keep sending
    while an attacker elsewhere is refused.
    """

    def __init__(self, *, per_ip: int, per_user: int, backoff: float, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.per_ip = per_ip
        self.per_user = per_user
        self.backoff = backoff
        self.window = window
        self.clock = clock
        self._ips = _BoundedTable()
        self._users = _BoundedTable()
        self._known_good: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.outgoing = _Outgoing()

    def _current(self, table: _BoundedTable, key: str, now: float) -> _Failures | None:
        entry = table.get(key)
        if entry is not None and now - max(entry.last, entry.blocked_until) > self.window:
            del table[key]
            return None
        return entry

    def _known(self, client: str, user: str, now: float) -> bool:
        seen = self._known_good.get((client, user))
        return seen is not None and now - seen <= KNOWN_GOOD_SECONDS

    def retry_after(self, client: str, user: str) -> float:
        """Seconds this attempt must wait, 0 when it may go ahead."""
        now = self.clock()
        waits = [0.0]
        ip = self._current(self._ips, client, now)
        if ip is not None:
            waits.append(ip.blocked_until - now)
        named = self._current(self._users, user, now)
        if named is not None and not self._known(client, user, now):
            waits.append(named.blocked_until - now)
        return max(waits)

    def failed(self, client: str, user: str) -> tuple[int, int]:
        """Record a failure; return the failure counts (address, username) now in force."""
        now = self.clock()
        self.outgoing.share(ThrottleEvent(kind="auth_failed", key=client, username=user, at=now))
        return self._failed(client, user, now)

    def _failed(self, client: str, user: str, now: float) -> tuple[int, int]:
        counts = []
        for table, key, limit in ((self._ips, client, self.per_ip), (self._users, user, self.per_user)):
            entry = self._current(table, key, now) or table.touch(key)
            table.move_to_end(key)
            entry.count += 1
            entry.last = max(entry.last, now)  # another node's failure may be older than ours
            if entry.count >= limit:
                blocked = now + min(self.backoff * 2 ** (entry.count - limit), MAX_BACKOFF_SECONDS)
                entry.blocked_until = max(entry.blocked_until, blocked)
            counts.append(entry.count)
        return counts[0], counts[1]

    def succeeded(self, client: str, user: str) -> None:
        """A correct password clears the address's failures and marks it good for this username."""
        now = self.clock()
        seen = self._known_good.get((client, user))
        if seen is None or now - seen > RESHARE_GOOD_SECONDS:  # not once per AUTH: an app logs in all day
            self.outgoing.share(ThrottleEvent(kind="auth_ok", key=client, username=user, at=now))
        self._succeeded(client, user, now)

    def _succeeded(self, client: str, user: str, now: float) -> None:
        self._ips.pop(client, None)
        self._known_good[(client, user)] = max(now, self._known_good.get((client, user), now))
        self._known_good.move_to_end((client, user))
        while len(self._known_good) > MAX_TRACKED_KEYS:
            self._known_good.popitem(last=False)

    def apply(self, event: ThrottleEvent) -> None:
        """Count what another node saw."""
        if event.kind == "auth_failed":
            self._failed(event.key, event.username, event.at)
        elif event.kind == "auth_ok":
            self._succeeded(event.key, event.username, event.at)


class RateLimiter:
    """A token bucket per key: `per_minute` messages, refilled evenly, bursts up to `per_minute`."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)
        self.outgoing = _Outgoing()

    def _tokens(self, key: str, per_minute: int, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(per_minute), now))
        return min(float(per_minute), tokens + (now - at) * per_minute / 60.0)

    def retry_after(self, key: str, per_minute: int) -> float:
        """Seconds until one message may go, 0 when it may go now (per_minute 0 = unlimited)."""
        if per_minute <= 0:
            return 0.0
        return max(0.0, (1.0 - self._tokens(key, per_minute, self.clock())) * 60.0 / per_minute)

    def acquire(self, key: str, per_minute: int) -> float:
        """Take one message's token; return 0 when taken, else the seconds to wait (nothing taken)."""
        wait = self.retry_after(key, per_minute)
        if wait == 0.0 and per_minute > 0:
            now = self.clock()
            self._take(key, per_minute, now)
            self.outgoing.share(ThrottleEvent(kind="sent", key=key, per_minute=per_minute, at=now))
        return wait

    def _take(self, key: str, per_minute: int, now: float) -> None:
        # Another node's send may be older than this bucket's time: refill up to the later of the two.
        moment = max(now, self._buckets.get(key, (0.0, now))[1])
        tokens = self._tokens(key, per_minute, moment) - 1.0
        self._buckets[key] = (max(tokens, -float(per_minute)), moment)  # other nodes' sends wait at most two minutes

    def apply(self, event: ThrottleEvent) -> None:
        """Count a send another node let through."""
        if event.kind == "sent" and event.per_minute > 0:
            self._take(event.key, event.per_minute, event.at)


class ThrottleSync:
    """Shares one relay node's throttle events through the store, every SYNC_SECONDS."""

    def __init__(self, store: Throttles, auth: AuthThrottle, rates: RateLimiter, *, interval: float = SYNC_SECONDS) -> None:
        self.store = store
        self.auth = auth
        self.rates = rates
        self.interval = interval

    async def sync_once(self) -> int:
        """Store this node's events, apply the others'; how many were applied."""
        auth, rates = self.auth.outgoing.drain(), self.rates.outgoing.drain()
        try:
            received = await self.store.share_throttle_events(auth + rates)
        except BaseException:
            self.auth.outgoing[:0], self.rates.outgoing[:0] = auth, rates  # tried again at the next sync
            raise
        for event in received:
            (self.rates if event.kind == "sent" else self.auth).apply(event)
        return len(received)

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception as exc:
                log.warning("throttle-sync-failed (this node decides alone until it is back): %s", type(exc).__name__)
            await asyncio.sleep(self.interval)
