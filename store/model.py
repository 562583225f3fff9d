"""What the store holds, whatever the backend: events and the queries over them.

The relay writes `email.sent`, the tracker opens and clicks; both go through these types, so
neither side imports the other and every backend (store/sqlite.py, store/postgresql.py)
answers the same contract.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from tracking.claims import TrackedSend

# Agents whose opens count in human-only stats. A Gmail/Yahoo image-proxy fetch happens
# when the person opens the message (Google fetches images on open, not on delivery:
# "Images are only loaded when you open a message", Gmail proxy announcement, 2013), so it
# is a human open seen through a proxy; it stays labelled `image_proxy` so the operator
# can still tell it carries no client IP or user agent.
HUMAN_OPEN_AGENTS: frozenset[str] = frozenset({"human", "image_proxy"})

EVENT_NAMES = ("email.sent", "email.open", "email.click", "email.bounce", "email.delivery", "email.complaint")
MAX_LIMIT = 1000


def rfc3339(moment: datetime) -> str:
    """UTC with microseconds and a Z: sorts lexicographically in the same order as time."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:26] + "Z"  # isoformat: C-fast, same text


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


@dataclass(frozen=True)
class NewEvent:
    name: str
    project: str
    contact: str
    recipient: str
    message_id: str
    at: str
    campaign: str | None = None
    template: str | None = None
    template_type: str | None = None
    campaign_type: str | None = None
    subject: str | None = None
    sender: str | None = None  # the From header; `from` in the API
    link: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    tracked: bool | None = None
    reason: str | None = None
    agent: str | None = None  # opens and clicks: human | apple_mpp | image_proxy | scanner | prefetch
    agent_reason: str | None = None  # the signals behind `agent` (tracker/agents.py)
    # Set by the store when it records an open or a click (record_engagements), never by callers:
    # they are counts over the events already stored, exact only inside the write transaction.
    opens: int | None = None
    clicks: int | None = None
    first: bool | None = None
    implied: bool | None = None
    # Made by the caller, once per event: recording an event whose uid is already stored stores,
    # counts and queues nothing again and returns the ids stored the first time, so a caller that
    # lost the answer (a spool replay, a retry through another node) may simply record it again.
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)


def implied_uid(uid: str) -> str:
    """The uid of the implied open a first click records: derived, so a replayed click finds it too."""
    return hashlib.blake2b(uid.encode(), digest_size=16, person=b"implied-open").hexdigest()


@dataclass(frozen=True)
class EventQuery:
    project: str
    contact: str | None = None  # matched as contact_forms(contact): the domain of an address in any case
    name: str | None = None
    campaign: str | None = None
    message_id: str | None = None
    since: str | None = None
    limit: int = 100
    before: tuple[str, int] | None = None  # (at, id) of the last event of the previous page: newer ones are skipped
    agent: str | None = None  # opens and clicks with this verdict
    until: str | None = None  # events before this time (RFC 3339, stored form)


def contact_forms(contact: str) -> tuple[str, ...]:
    """The stored contacts a query for `contact` matches: as given, with the domain lower-cased, all lower-cased.

    Domains are case-insensitive (RFC 5321 §2.4) and recipients are stored lower-cased, so
    `B@Example.com` finds `b@example.com`. A local part is case-sensitive in principle; a contact id
    set with X-Inflight-Contact matches as given or lower-cased, never folded the other way.
    """
    local, at, domain = contact.rpartition("@")
    forms = [contact, f"{local}@{domain.lower()}" if at else contact, contact.lower()]
    return tuple(dict.fromkeys(forms))


@dataclass(frozen=True)
class StatsQuery:
    project: str
    campaign: str | None = None
    template: str | None = None
    since: str | None = None


# A stored event: `id` and the columns of NewEvent, as the backend holds them (booleans may be
# 0/1). The tracker's API layer (tracker/shapes.py) turns it into the public JSON.
StoredEvent = dict[str, Any]


@dataclass(frozen=True)
class WebhookJob:
    """One claimed outbox row: the event to POST and how often it was tried already."""

    outbox_id: int
    key: str  # the idempotency key: the same on every attempt
    attempts: int
    created: float  # epoch seconds the event was recorded
    event: StoredEvent


# A verdict's decision: the hit's (agent, reason) and the earlier events it exposes, id -> (agent, reason).
Decision = tuple[str, str, dict[int, tuple[str, str]]]


@dataclass(frozen=True)
class Judgement:
    """How to label a hit from its message's recent hits, inside the transaction that stores it.

    Made there rather than before queueing the write, the verdict sees every hit stored before
    its own (two hits of one message arriving together see each other), and reading the history,
    labelling, counting, inserting and re-labelling cost no extra trip to the store.
    """

    since: str  # the history read: opens and clicks of the message at or after this time
    decide: Callable[[list[Mapping[str, Any]]], Decision]  # runs in the store's thread: pure, quick


@dataclass(frozen=True)
class EngagementCounts:
    """Opens or clicks of a selection: every hit, and one per message and contact (unique);
    the `_human` pair counts only agents in HUMAN_OPEN_AGENTS (or none recorded)."""

    unique: int
    total: int
    unique_human: int
    total_human: int


@dataclass(frozen=True)
class LinkCounts:
    link: str
    unique: int
    total: int
    unique_human: int
    total_human: int


@dataclass(frozen=True)
class StatsCounts:
    """What `stats` counts; the tracker's API turns it into its response (rates included)."""

    sent: int  # distinct messages
    delivered: int  # email.sent events: one per recipient
    tracked: int  # of those, the ones carrying a pixel or tracked links
    opens: EngagementCounts
    clicks: EngagementCounts
    links: list[LinkCounts]  # clicks per link, most clicked first


@dataclass(frozen=True)
class DailyCounts:
    """One UTC day of a selection, for the dashboard's charts: the counts of `stats`, per day."""

    day: str  # YYYY-MM-DD
    delivered: int
    opens: EngagementCounts
    clicks: EngagementCounts


@dataclass(frozen=True)
class DashboardUser:
    email: str  # lower-cased
    password_hash: str  # argon2id, never the password
    project: str | None  # None: every project
    admin: bool  # may change settings and retry webhooks; otherwise read-only


@dataclass(frozen=True)
class DashboardSession:
    email: str
    csrf: str  # the token every form of this session must carry


class Reports(Protocol):
    """What the dashboard reads beyond the API: counts per day and per agent, the webhook queue."""

    async def daily(self, query: StatsQuery) -> list[DailyCounts]: ...
    async def agent_counts(self, query: StatsQuery) -> dict[str, dict[str, int]]: ...  # event name -> agent -> count
    async def webhook_rows(self, project: str, limit: int) -> list[dict[str, Any]]: ...
    async def retry_webhook_now(self, project: str, outbox_id: int, *, now: float) -> bool: ...


class Accounts(Protocol):
    """Dashboard accounts and their sessions; a session is stored by the hash of its cookie."""

    async def save_user(self, user: DashboardUser) -> None: ...
    async def user(self, email: str) -> DashboardUser | None: ...
    async def create_session(self, token_hash: str, session: DashboardSession, *, expires: float) -> None: ...
    async def session(self, token_hash: str, *, now: float) -> DashboardSession | None: ...
    async def delete_session(self, token_hash: str) -> None: ...


class Lifecycle(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...


class Events(Protocol):
    """Events and their engagement counters: exact however many nodes record at once."""

    async def record(self, events: list[NewEvent]) -> list[int]: ...
    async def record_engagements(self, batch: list[tuple[NewEvent, Judgement | None]]) -> list[list[int]]: ...
    async def events(self, query: EventQuery) -> list[StoredEvent]: ...
    async def stats(self, query: StatsQuery) -> StatsCounts: ...


class TrackingModes(Protocol):
    """Settings -> Tracking changed at runtime: read per message, so a change made on any node
    applies to the next message on every node."""

    async def tracking_mode(self, project: str) -> str | None: ...
    async def set_tracking_mode(self, project: str, mode: str | None) -> None: ...


class WebhookOutbox(Protocol):
    """Rows written with their events; claimed under a lease, so any node delivers and a dead
    node's rows come back to another. `outbox_added` is set when rows may be due (this
    process queued some, or another node announced some)."""

    outbox_added: asyncio.Event

    async def claim_webhooks(self, *, now: float, lease: float, limit: int) -> list[WebhookJob]: ...
    async def finish_webhook(self, outbox_id: int) -> None: ...
    async def retry_webhook(self, outbox_id: int, *, due: float, error: str) -> None: ...
    async def pending_webhooks(self) -> int: ...
    async def webhook_backlog(self) -> tuple[int, float | None]: ...  # (rows waiting, oldest `created`)


@dataclass(frozen=True)
class Delivered:
    """Recipients of a message the upstream accepted: ledger rows until `expires_at` (epoch seconds)."""

    project: str
    message_id: str
    recipients: list[str]
    expires_at: int


@dataclass(frozen=True)
class DeliveryClaim:
    """What one attempt at a message may do with each recipient (lower-cased)."""

    claimed: set[str]  # this attempt sends them: no other attempt sent or is sending them
    delivered: set[str]  # the upstream accepted them already: not again
    busy: set[str]  # another attempt (on any node) is sending them now: try again later


class DeliveryLedger(Protocol):
    """Which recipients of a message the upstream accepted already (the idempotency ledger).

    `claim_deliveries` is the atomic step: one row per recipient, inserted unless a live row
    exists, so two attempts of one message on two nodes never both send a recipient. A claim is
    a lease (`lease_seconds`): an attempt that dies leaves it to expire; `record_delivered` turns
    it into a delivery, `release_deliveries` gives back the ones the upstream did not accept.
    Each call is one transaction (one round trip where the backend allows): the relay makes a claim
    per message, and records the deliveries of many messages at once (its spool's batches).
    """

    async def delivered_recipients(self, project: str, message_id: str, recipients: list[str]) -> set[str]: ...
    async def claim_deliveries(self, project: str, message_id: str, recipients: list[str], *,
                               lease_seconds: int) -> DeliveryClaim: ...
    async def release_deliveries(self, project: str, message_id: str, recipients: list[str]) -> None: ...
    async def record_delivered(self, rows: list[Delivered]) -> None: ...
    async def purge_deliveries(self) -> int: ...


class Sends(Protocol):
    """Who each tracked copy went to, under the random send id its opaque tokens carry (tracking/tokens.py):
    written by the relay before the copy goes, read by the tracker when it records the copy's events,
    deleted with them (retention, erasure)."""

    async def record_sends(self, sends: list[tuple[bytes, TrackedSend]]) -> None: ...
    async def tracked_sends(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], TrackedSend]: ...

@dataclass(frozen=True)
class ThrottleEvent:
    """One thing a relay node saw that every node's throttles must count (relay/throttle.py)."""

    kind: str  # auth_failed | auth_ok | sent
    key: str  # the client address for auth_*, the project for sent
    username: str = ""  # auth_*
    per_minute: int = 0  # sent: the project's limit
    at: float = 0.0  # wall-clock seconds: comparable across nodes


class Throttles(Protocol):
    """Per-project rate limits and AUTH back-off shared by the relay nodes, as events."""

    async def share_throttle_events(self, events: list[ThrottleEvent]) -> list[ThrottleEvent]:
        """Store this node's events; answer the other nodes' events not answered before."""
        ...


class Erasure(Protocol):
    """Retention and the right to erasure."""

    async def purge(self, project: str, before: datetime) -> int: ...
    async def forget(self, address: str, *, project: str | None = None) -> tuple[int, int]: ...


# --- delivery feedback ------------------------------------------------------------------

SUPPRESSION_REASONS = ("bounce", "complaint", "manual")
# Complaints arrive days after delivery (a person marks old mail as spam); after this long the
# Message-ID in the notification still finds the message through its email.sent event.
PROVIDER_ID_TTL_SECONDS = 30 * 24 * 3600


def address_key(address: str) -> str:
    """How an address is compared everywhere: trimmed and lower-cased (mailbox providers ignore case)."""
    return address.strip().lower()


def forgotten_key(address: str) -> str:
    """What is kept of an erased contact: a SHA-256 of its key, enough to recognise a later hit
    from mail already delivered to it, never the address itself."""
    return hashlib.sha256(address_key(address).encode("utf-8")).hexdigest()


def is_forgotten(forgotten: set[tuple[str, str]], project: str, *who: str) -> bool:
    """Whether any of `who` (recipient, contact) was erased in `project` or in every project ('')."""
    keys = {forgotten_key(w) for w in who}
    return any((key, project) in forgotten or (key, "") in forgotten for key in keys)


@dataclass(frozen=True)
class Suppression:
    """An address a project no longer sends to: why, the provider's words, and when."""

    project: str
    address: str  # address_key form
    reason: str  # one of SUPPRESSION_REASONS
    detail: str  # the bounce's diagnostic code, the complaint's feedback type, or who added it
    at: str


@dataclass(frozen=True)
class ProviderCopy:
    """One recipient of a copy the upstream accepted under its own id (SES's `250 Ok <id>`)."""

    project: str
    message_id: str
    recipient: str


@dataclass(frozen=True)
class DeadLetter:
    """A webhook delivery that was given up: the event it carried and the last error."""

    id: int
    project: str
    event_id: int
    key: str
    attempts: int
    last_error: str
    created: float  # epoch seconds the event was recorded
    buried: float  # epoch seconds it was given up


class Suppressions(Protocol):
    """Per-project addresses the relay refuses at RCPT: permanent bounces, complaints, by hand."""

    async def suppress(self, project: str, address: str, *, reason: str, detail: str) -> bool: ...
    async def unsuppress(self, project: str, address: str) -> bool: ...
    async def suppressions(self, project: str) -> list[Suppression]: ...
    async def suppressed(self, project: str, addresses: list[str]) -> dict[str, Suppression]: ...


class ProviderIds(Protocol):
    """The upstream's own id of each accepted copy, so its later feedback finds the message."""

    async def record_provider_ids(self, copies: list[tuple[str, ProviderCopy]]) -> None:
        """Each (provider id, recipient's copy) the upstream accepted, in one write however many."""
    async def provider_copies(self, provider_id: str) -> list[ProviderCopy]: ...


class ForgottenContacts(Protocol):
    """Erased contacts, kept only as forgotten_key hashes: later events from mail already delivered
    to them (an open of an old mail, the provider's feedback) are not recorded."""

    async def remember_forgotten(self, address: str, *, project: str | None) -> None: ...
    async def forgotten_keys(self) -> set[tuple[str, str]]: ...


class DeadLetters(Protocol):
    """Webhook deliveries given up after `retry_hours`: kept, listed and replayable."""

    async def bury_webhook(self, outbox_id: int, *, error: str, now: float) -> None: ...
    async def dead_letters(self, project: str, *, limit: int) -> list[DeadLetter]: ...
    async def replay_dead_letter(self, project: str, dead_letter_id: int, *, now: float) -> bool: ...


class EventStore(Lifecycle, Events, TrackingModes, WebhookOutbox, DeliveryLedger, Sends, Throttles, Erasure,
                 Suppressions, ProviderIds, ForgottenContacts, DeadLetters, Reports, Accounts, Protocol):
    """Every aggregate of one backend; code that needs only one takes that one's protocol."""
