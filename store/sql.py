"""What both backends' SQL shares: query filters, the stats query, and how a hit becomes rows.

The backends differ in placeholders (`?` or `$n`), in how one message to one contact is made a
single distinct value, and in how they serialise writers; everything else is written once here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from store.model import (
    HUMAN_OPEN_AGENTS,
    DailyCounts,
    Delivered,
    EngagementCounts,
    EventQuery,
    LinkCounts,
    NewEvent,
    StatsCounts,
    StatsQuery,
    ThrottleEvent,
    contact_forms,
)

COLUMNS = tuple(NewEvent.__dataclass_fields__)
COLUMN = {name: index for index, name in enumerate(COLUMNS)}  # a column's place in an insert row
# A row of `sends` after (project, send_id), in TrackedSend's field order.
SEND_COLUMNS = ("message_id", "contact", "recipient", "sent_at", "campaign", "template", "template_type", "campaign_type")

# Human-only stats count the agents tracker/agents.py says a person is behind (a Gmail or Yahoo
# proxy fetches when the person opens the mail); NULL (no verdict recorded) counts as human.
HUMAN = f"(agent IS NULL OR agent IN ({', '.join(repr(a) for a in sorted(HUMAN_OPEN_AGENTS))}))"


def filters(query: EventQuery | StatsQuery, columns: tuple[str, ...], mark: Callable[[int], str]) -> tuple[str, list[Any]]:
    """The WHERE clause for a query's project, its given column filters and `since`; `mark(n)` writes
    the n-th placeholder (1-based)."""
    where = [f"project = {mark(1)}"]
    args: list[Any] = [query.project]

    def placeholder(value: Any) -> str:
        args.append(value)
        return mark(len(args))

    for column in columns:
        value = getattr(query, column)
        if value is None:
            continue
        if column == "contact":  # an address's domain in any case (contact_forms)
            where.append(f"contact IN ({', '.join(placeholder(form) for form in contact_forms(value))})")
        else:
            where.append(f"{column} = {placeholder(value)}")
    if query.since is not None:
        where.append(f"at >= {placeholder(query.since)}")
    if isinstance(query, EventQuery):
        if query.until is not None:
            where.append(f"at < {placeholder(query.until)}")
        if query.before is not None:  # keyset pagination: the index order, no OFFSET scan
            where.append(f"(at, id) < ({placeholder(query.before[0])}, {placeholder(query.before[1])})")
    return " AND ".join(where), args


def stats_sql(condition: str, pair: str) -> tuple[str, str]:
    """The totals and per-link queries; `pair` is one message to one contact as one value (the unit of "unique")."""
    totals = f"""
        SELECT
            count(DISTINCT message_id) FILTER (WHERE name = 'email.sent') AS sent,
            count(*) FILTER (WHERE name = 'email.sent') AS delivered,
            count(*) FILTER (WHERE name = 'email.sent' AND tracked) AS tracked,
            count(*) FILTER (WHERE name = 'email.open') AS opens_total,
            count(*) FILTER (WHERE name = 'email.open' AND {HUMAN}) AS opens_total_human,
            count(DISTINCT {pair}) FILTER (WHERE name = 'email.open') AS opens_unique,
            count(DISTINCT {pair}) FILTER (WHERE name = 'email.open' AND {HUMAN}) AS opens_unique_human,
            count(*) FILTER (WHERE name = 'email.click') AS clicks_total,
            count(*) FILTER (WHERE name = 'email.click' AND {HUMAN}) AS clicks_total_human,
            count(DISTINCT {pair}) FILTER (WHERE name = 'email.click') AS clicks_unique,
            count(DISTINCT {pair}) FILTER (WHERE name = 'email.click' AND {HUMAN}) AS clicks_unique_human
        FROM events WHERE {condition}"""
    links = f"""
        SELECT link,
            count(DISTINCT {pair}) AS unique_,
            count(*) AS total,
            count(DISTINCT {pair}) FILTER (WHERE {HUMAN}) AS unique_human,
            count(*) FILTER (WHERE {HUMAN}) AS total_human
        FROM events WHERE {condition} AND name = 'email.click'
        GROUP BY link"""
    return totals, links


def stats_counts(t: Any, links: Sequence[Any]) -> StatsCounts:
    """The two queries' rows (mappings by column name) as counts; links most clicked first, then by link."""

    def engagement(kind: str) -> EngagementCounts:
        return EngagementCounts(unique=t[f"{kind}_unique"], total=t[f"{kind}_total"],
                                unique_human=t[f"{kind}_unique_human"], total_human=t[f"{kind}_total_human"])

    ordered = sorted(links, key=lambda r: (-r["total"], r["link"] or ""))  # in Python: one order whatever the collation
    return StatsCounts(
        sent=t["sent"], delivered=t["delivered"], tracked=t["tracked"],
        opens=engagement("opens"), clicks=engagement("clicks"),
        links=[LinkCounts(link=r["link"], unique=r["unique_"], total=r["total"],
                          unique_human=r["unique_human"], total_human=r["total_human"]) for r in ordered],
    )


def with_values(row: list[Any], **values: Any) -> list[Any]:
    """A copy of an insert row (values in COLUMNS order) with some columns set."""
    copy = row.copy()
    for name, value in values.items():
        copy[COLUMN[name]] = value
    return copy


def engagement_rows(row: list[Any], name: str, opens: int, clicks: int, implied_uid: str) -> list[list[Any]]:
    """The rows one hit stores, given the message's opens and clicks by that contact so far:
    the hit with its counters, preceded for a first click on a never-opened message by an
    implied open (images are often blocked: a click proves the message was opened)."""
    if name == "email.open":
        return [with_values(row, opens=opens + 1, first=opens == 0, implied=False)]
    rows = []
    if opens == 0:
        rows.append(with_values(row, name="email.open", link=None, opens=1, first=True, implied=True, uid=implied_uid))
    rows.append(with_values(row, clicks=clicks + 1, first=clicks == 0))
    return rows


# --- shared throttles ---------------------------------------------------------------------

THROTTLE_LAG_SECONDS = 5.0  # an event reaches the store at most this long after it happened
THROTTLE_HORIZON_SECONDS = 86_400.0  # the furthest back a throttle looks (an address known good for a day)
SENT_HORIZON_SECONDS = 120.0  # a send weighs on a token bucket for a minute at most
THROTTLE_READ_LIMIT = 50_000  # the most events one read returns (a node starting during an attack)
THROTTLE_PURGE_SECONDS = 60.0  # how often a node deletes events no throttle looks at any more


class ThrottleCursor:
    """Which other nodes' throttle events a store answered already.

    Events are read by their time, from a little before the last read (an event is stored up to
    THROTTLE_LAG_SECONDS after it happened), and the ids of that overlap are remembered so none
    is answered twice.
    """

    def __init__(self, now: float) -> None:
        self.since = now - THROTTLE_HORIZON_SECONDS
        self.seen: dict[int, float] = {}
        self.purged = now

    def read_from(self) -> float:
        return self.since - THROTTLE_LAG_SECONDS

    def fresh(self, rows: Sequence[Any], now: float) -> list[ThrottleEvent]:
        """Rows (id, kind, key, username, per_minute, at) not answered before, as events; advances the cursor."""
        events = [ThrottleEvent(kind=kind, key=key, username=username, per_minute=per_minute, at=at)
                  for event_id, kind, key, username, per_minute, at in rows if event_id not in self.seen]
        self.seen.update((row[0], row[5]) for row in rows)
        self.since = now
        self.seen = {event_id: at for event_id, at in self.seen.items() if at >= self.read_from()}
        return events

    def purge_due(self, now: float) -> bool:
        if now - self.purged < THROTTLE_PURGE_SECONDS:
            return False
        self.purged = now
        return True

def daily_sql(condition: str, pair: str) -> str:
    """Per UTC day (`at` is RFC 3339 text in both backends): delivered copies, opens and clicks, unique
    per message and contact within the day, raw and human-only; the dashboard's charts."""
    columns = ["count(*) FILTER (WHERE name = 'email.sent') AS delivered"]
    for kind in ("open", "click"):
        for human, suffix in (("", ""), (f" AND {HUMAN}", "_human")):
            columns.append(f"count(*) FILTER (WHERE name = 'email.{kind}'{human}) AS {kind}_total{suffix}")
            columns.append(f"count(DISTINCT {pair}) FILTER (WHERE name = 'email.{kind}'{human}) AS {kind}_unique{suffix}")
    return (f"SELECT substr(at, 1, 10) AS day, {', '.join(columns)} FROM events WHERE {condition} "
            "GROUP BY substr(at, 1, 10) ORDER BY day")


def daily_counts(rows: Iterable[Any]) -> list[DailyCounts]:
    def counts(row: Any, kind: str) -> EngagementCounts:
        return EngagementCounts(unique=row[f"{kind}_unique"], total=row[f"{kind}_total"],
                                unique_human=row[f"{kind}_unique_human"], total_human=row[f"{kind}_total_human"])

    return [DailyCounts(day=row["day"], delivered=row["delivered"], opens=counts(row, "open"), clicks=counts(row, "click"))
            for row in rows]


def agents_sql(condition: str) -> str:
    return (f"SELECT name, coalesce(agent, 'human') AS agent, count(*) AS n FROM events WHERE {condition} "
            "AND name IN ('email.open', 'email.click') GROUP BY name, coalesce(agent, 'human')")


def agent_counts(rows: Iterable[Any]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for row in rows:
        found.setdefault(row["name"], {})[row["agent"]] = int(row["n"])
    return found


def delivered_rows(rows: list[Delivered]) -> list[tuple[str, str, str, int]]:
    """(project, message_id, recipient lower-cased, expires_at) once per key, the latest expiry kept:
    one statement may set a row once only (PostgreSQL's ON CONFLICT)."""
    latest: dict[tuple[str, str, str], int] = {}
    for row in rows:
        for recipient in row.recipients:
            key = (row.project, row.message_id, recipient.lower())
            latest[key] = max(latest.get(key, 0), row.expires_at)
    return [(*key, expires_at) for key, expires_at in latest.items()]
