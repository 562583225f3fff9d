"""Events into PostgreSQL in a fixed number of round trips, whatever the batch holds.

`record` is one statement (in a transaction: three round trips): the rows, their webhook outbox rows
and the NOTIFY, and the ids of the uids stored before. Opens and clicks (`record_engagements`) are
group-committed, as on SQLite (store/group_commit.py): hits that arrive while a batch is being
written go together in the next one, one transaction of four round trips for the whole batch:

1. BEGIN (custom plans, see BEGIN) and the advisory locks of the batch's messages, in one order on
   every node (no deadlock);
2. the state, read once the locks are held: uids stored already, each message's subject, sender and
   verdict history, each message-and-contact's opens and clicks, and ids for the new rows;
3. the rows, their outbox rows, the re-labels of stored events and the NOTIFY, in one statement;
4. COMMIT.

Between 2 and 3 the batch is played in order in memory (`play`): each hit sees the counts, history
and labels the hits before it in the batch left, exactly as if each were its own transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from store.model import Judgement, NewEvent, implied_uid
from store.postgresql_retry import TRANSIENT
from store.sql import COLUMN, COLUMNS, engagement_rows

OUTBOX_CHANNEL = "inflight_outbox"
# Every write transaction plans its statements for their arguments. They read this month's partition,
# whose statistics lag its growth: a generic plan a pooled connection cached while it was small (seq
# scans) was kept until the next ANALYZE, and a batch's state read took 35-180 ms instead of 4 (bench).
BEGIN = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan;"
_TYPES = {"tracked": "boolean", "first": "boolean", "implied": "boolean", "opens": "integer", "clicks": "integer"}
_NAMES = ", ".join(COLUMNS)
_HISTORY = ("id", "name", "at", "ip", "user_agent", "link", "agent", "agent_reason")  # what a verdict reads of a hit


def _arrays(first: int) -> str:
    """unnest's arguments: one array per column from placeholder `first` on."""
    return ", ".join(f"${i}::{_TYPES.get(c, 'text')}[]" for i, c in enumerate(COLUMNS, first))


def _outbox(events: str, projects: int) -> str:
    """The outbox rows of the events of CTE `events` whose project has a webhook ($projects), created
    and due at $projects+1; and the NOTIFY when there are any (delivered at commit)."""
    return f"""o AS (
        INSERT INTO webhook_outbox (event_id, project, key, created, due)
        SELECT id, project, 'evt_' || replace(gen_random_uuid()::text, '-', ''), ${projects + 1}, ${projects + 1}
        FROM {events} WHERE project = ANY(${projects}::text[]) RETURNING 1
    ), n AS (SELECT pg_notify('{OUTBOX_CHANNEL}', '') FROM (SELECT 1 FROM o LIMIT 1) one)"""


# A stored event by its uid: one index probe per partition (LIMIT keeps the planner from turning the
# look-ups of a batch into a scan of this month's partition, which its lagging statistics made it choose).
# By uid alone: a replay may carry another time (a feedback notification delivered twice).
_STORED = "(SELECT x.id FROM events x WHERE x.uid = {uid} LIMIT 1)"

# record(): events as one array per column; an already stored uid inserts nothing and answers its id.
# Rows: (uid, id) of each row inserted and each uid stored before; (NULL, NULL) when a NOTIFY went.
# Written into the month's partition itself: routing through the parent and its ON CONFLICT
# planning over every partition cost about twice the insert (a hit ~3.4 -> ~1.7 ms).
RECORD = f"""
    WITH u AS (
        SELECT u.*, {_STORED.format(uid="u.uid")} AS stored
        FROM unnest({_arrays(1)}) WITH ORDINALITY AS u({_NAMES}, ord)
    ), e AS (
        INSERT INTO {{partition}} ({_NAMES})
        SELECT {_NAMES} FROM u WHERE stored IS NULL ORDER BY ord
        ON CONFLICT (uid, at) DO NOTHING
        RETURNING id, project, uid
    ), {_outbox('e', len(COLUMNS) + 1)}
    SELECT uid, id FROM e
    UNION ALL SELECT uid, stored FROM u WHERE stored IS NOT NULL
    UNION ALL SELECT NULL, NULL FROM n"""

# Step 2, once the messages' locks are held (so in a snapshot holding every hit recorded before):
# $1 the uids (and implied uids) of the batch; per message $2 project, $3 message_id, $4 the earliest
# history a verdict of the batch reads (NULL: none judged); per message and contact $5, $6, $7;
# $8 how many ids to take.
STATE = f"""
    SELECT s.uids, s.ids, m.subjects, m.senders, m.histories, p.opens, p.clicks,
        (SELECT array_agg(nextval('events_id_seq')) FROM generate_series(1, $8::int)) AS fresh
    FROM (SELECT array_agg(u.uid) AS uids, array_agg(u.id) AS ids FROM (
            SELECT u.uid, {_STORED.format(uid="u.uid")} AS id FROM unnest($1::text[]) AS u(uid)) u
          WHERE u.id IS NOT NULL) s,
    (SELECT array_agg(t.subject ORDER BY m.ord) AS subjects, array_agg(t.sender ORDER BY m.ord) AS senders,
            array_agg(h.history ORDER BY m.ord) AS histories
     FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS m(project, message_id, since, ord)
     LEFT JOIN LATERAL (SELECT subject, sender FROM events WHERE project = m.project AND message_id = m.message_id
                        AND name = 'email.sent' LIMIT 1) t ON true
     LEFT JOIN LATERAL (SELECT json_agg(r ORDER BY r.at, r.id)::text AS history FROM (
            SELECT id, name, at, ip, user_agent, link, agent, agent_reason FROM events
            WHERE m.since IS NOT NULL AND project = m.project AND message_id = m.message_id
            AND name IN ('email.open', 'email.click') AND at >= m.since AND implied IS NOT TRUE) r) h ON true) m,
    (SELECT array_agg(c.opens ORDER BY p.ord) AS opens, array_agg(c.clicks ORDER BY p.ord) AS clicks
     FROM unnest($5::text[], $6::text[], $7::text[]) WITH ORDINALITY AS p(project, message_id, contact, ord)
     CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE name = 'email.open') AS opens,
                                count(*) FILTER (WHERE name = 'email.click') AS clicks
                         FROM events WHERE project = p.project AND message_id = p.message_id AND contact = p.contact
                         AND name IN ('email.open', 'email.click')) c) p"""

_LABELS = len(COLUMNS) + 4  # the first placeholder of the re-labels in WRITE
# Step 3: the rows with the ids taken in step 2 ($1), columns from $2; re-labels of stored events
# (id, agent, reason appended), a re-labelled click taking its implied open along (same message,
# contact and time). The parent table when the batch spans a month's turn.
WRITE = f"""
    WITH e AS (
        INSERT INTO {{partition}} (id, {_NAMES})
        SELECT * FROM unnest($1::bigint[], {_arrays(2)})
        RETURNING id, project, uid
    ), {_outbox('e', len(COLUMNS) + 2)},
    l AS (
        UPDATE events SET agent = x.agent, agent_reason = btrim(COALESCE(events.agent_reason, '') || ' ' || x.reason)
        FROM unnest(${_LABELS}::bigint[], ${_LABELS + 1}::text[], ${_LABELS + 2}::text[]) AS x(id, agent, reason)
        WHERE events.id = x.id
        RETURNING events.name, events.project, events.message_id, events.contact, events.at, x.agent, x.reason
    ), i AS (
        UPDATE events SET agent = l.agent, agent_reason = btrim(COALESCE(events.agent_reason, '') || ' ' || l.reason)
        FROM l WHERE l.name = 'email.click' AND events.implied
        AND (events.project, events.message_id, events.contact, events.at) = (l.project, l.message_id, l.contact, l.at)
        RETURNING 1
    )
    SELECT count(*) AS notified FROM n"""


@contextlib.asynccontextmanager
async def transaction(connection: asyncpg.Connection, begin: str = BEGIN) -> AsyncIterator[None]:
    """`begin` (BEGIN and what goes with it in the same round trip), then COMMIT, or ROLLBACK on an error."""
    await connection.execute(begin)
    try:
        yield
    except BaseException:
        with contextlib.suppress(*TRANSIENT, asyncpg.PostgresError):  # a lost connection rolled back by itself
            await connection.execute("ROLLBACK")
        raise
    await connection.execute("COMMIT")


def columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Insert rows (values in COLUMNS order) as one list per column, for unnest."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in COLUMNS]


def message_lock(project: str, message_id: str) -> tuple[int, int]:
    """Two signed 32-bit keys naming one message, the same on every node."""
    digest = hashlib.blake2b(f"{project}\n{message_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:], "big", signed=True)


def lock_sql(events: Collection[NewEvent]) -> str:
    """BEGIN and the transaction advisory locks of the events' messages, one statement each in key order:
    every batch takes its locks in one global order, so two batches never wait for each other in a cycle.
    The keys are integers made here: safe to write into the SQL."""
    keys = sorted({message_lock(event.project, event.message_id) for event in events})
    return BEGIN + " ".join(f"SELECT pg_advisory_xact_lock({a}, {b});" for a, b in keys)


@dataclass
class Hit:
    """One hit handed to record_engagements, waiting in a batch."""

    event: NewEvent
    judgement: Judgement | None
    ids: list[int] = field(default_factory=list)  # set by play()


@dataclass
class Plan:
    """What step 3 writes: the new rows (each with its id last) and the re-labels of stored events."""

    rows: list[list[Any]] = field(default_factory=list)
    labels: dict[int, tuple[str, str]] = field(default_factory=dict)  # stored event id -> (agent, reasons appended)

    def write_args(self, webhook_projects: list[str], now: float) -> list[Any]:
        ids = [row[-1] for row in self.rows]
        return [ids, *columns([row[:-1] for row in self.rows]), webhook_projects, now,
                list(self.labels), [agent for agent, _ in self.labels.values()], [reason for _, reason in self.labels.values()]]


def state_args(hits: Sequence[Hit]) -> list[Any]:
    """STATE's arguments for a batch."""
    uids = list(dict.fromkeys(uid for hit in hits for uid in (hit.event.uid, implied_uid(hit.event.uid))))
    since: dict[tuple[str, str], str | None] = {}
    for hit in hits:
        key = (hit.event.project, hit.event.message_id)
        judged = hit.judgement.since if hit.judgement is not None else None
        earlier = since.get(key)
        since[key] = judged if earlier is None else min(earlier, judged) if judged is not None else earlier
    pairs = list(dict.fromkeys((hit.event.project, hit.event.message_id, hit.event.contact) for hit in hits))
    clicks = sum(hit.event.name == "email.click" for hit in hits)
    return [uids, [p for p, _ in since], [m for _, m in since], list(since.values()),
            [p for p, _, _ in pairs], [m for _, m, _ in pairs], [c for _, _, c in pairs], len(hits) + clicks]


def _append(reason: str | None, more: str) -> str:
    """What `btrim(COALESCE(reason, '') || ' ' || more)` makes of a label's reason."""
    return f"{reason or ''} {more}".strip(" ")


def play(hits: Sequence[Hit], state: Any) -> Plan:
    """Each hit of the batch in order, as its own transaction would: its counters, verdict, implied
    open and the re-labels it asks for, seeing what the hits before it in the batch left. Sets `ids`."""
    stored: dict[str, int] = dict(zip(state["uids"] or [], state["ids"] or [], strict=True))
    fresh: Iterator[int] = iter(sorted(state["fresh"] or []))
    messages = list(dict.fromkeys((hit.event.project, hit.event.message_id) for hit in hits))
    sent = {key: (subject, sender) for key, subject, sender in zip(messages, state["subjects"], state["senders"], strict=True)}
    history: dict[tuple[str, str], list[dict[str, Any]]] = {
        key: json.loads(text) if text is not None else [] for key, text in zip(messages, state["histories"], strict=True)}
    pairs = list(dict.fromkeys((hit.event.project, hit.event.message_id, hit.event.contact) for hit in hits))
    counts = {key: [opens, clicks] for key, opens, clicks in zip(pairs, state["opens"], state["clicks"], strict=True)}
    seen = {entry["id"]: entry for entries in history.values() for entry in entries}  # history by id, stored and new
    new: dict[int, list[Any]] = {}  # rows of this batch by id
    implied_of: dict[int, list[Any]] = {}  # a click of this batch -> the implied open it brought
    plan = Plan()
    for hit in hits:
        event = hit.event
        uids = (event.uid, implied_uid(event.uid))
        if uids[0] in stored or uids[1] in stored:  # recorded before (a replay): counted once, its webhook queued once
            hit.ids = sorted(stored[uid] for uid in uids if uid in stored)
            continue
        message, pair = (event.project, event.message_id), (event.project, event.message_id, event.contact)
        row = [getattr(event, column) for column in COLUMNS]
        changes: dict[int, tuple[str, str]] = {}
        if hit.judgement is not None:
            since = hit.judgement.since
            recent: list[Mapping[str, Any]] = sorted((h for h in history[message] if h["at"] >= since),
                                                     key=lambda h: (h["at"], h["id"]))
            row[COLUMN["agent"]], row[COLUMN["agent_reason"]], changes = hit.judgement.decide(recent)
        subject, sender = sent[message]
        if subject is not None or sender is not None:
            row[COLUMN["subject"]], row[COLUMN["sender"]] = subject, sender
        opens, clicks = counts[pair]
        rows = engagement_rows(row, event.name, opens, clicks, uids[1])
        hit.ids = []
        for made in rows:
            event_id = next(fresh)
            made.append(event_id)
            hit.ids.append(event_id)
            stored[made[COLUMN["uid"]]] = event_id
            new[event_id] = made
            plan.rows.append(made)
            counts[pair][made[COLUMN["name"]] == "email.click"] += 1
        if len(rows) == 2:
            implied_of[hit.ids[1]] = rows[0]
        entry = {name: rows[-1][COLUMN[name]] for name in _HISTORY if name != "id"} | {"id": hit.ids[-1]}
        history[message].append(entry)
        seen[entry["id"]] = entry
        for event_id, (agent, reason) in changes.items():
            _relabel(plan, new, implied_of, seen, event_id, agent, reason)
    return plan


def _relabel(plan: Plan, new: dict[int, list[Any]], implied_of: dict[int, list[Any]], seen: dict[int, dict[str, Any]],
             event_id: int, agent: str, reason: str) -> None:
    """A re-label a verdict asked for: in memory for a row of this batch (and its implied open),
    else queued for the stored event; the history the next verdicts read shows it either way."""
    if event_id in seen:
        seen[event_id]["agent"] = agent
        seen[event_id]["agent_reason"] = _append(seen[event_id]["agent_reason"], reason)
    targets = [new[event_id]] if event_id in new else []
    if event_id in implied_of:
        targets.append(implied_of[event_id])
    for row in targets:
        row[COLUMN["agent"]], row[COLUMN["agent_reason"]] = agent, _append(row[COLUMN["agent_reason"]], reason)
    if event_id not in new:
        earlier = plan.labels.get(event_id)
        plan.labels[event_id] = (agent, reason if earlier is None else _append(earlier[1], reason))
