"""The store contract on both backends (SQLite file, PostgreSQL database): exact counters, implied opens,
stats, outbox, retention, idempotency; then SQLite's own: old files, checkpoints, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.throttle import AuthThrottle, RateLimiter, ThrottleSync
from store import open_store
from store.model import Decision, Delivered, EventQuery, EventStore, Judgement, NewEvent, StatsQuery, now_rfc3339, rfc3339
from store.sqlite import CHECKPOINT_SECONDS, SqliteEventStore
from tracker.shapes import event_json, stats_json

AT = "2026-03-01T10:00:00.000000Z"


def sent(message: str, contact: str, campaign: str = "c1", tracked: bool = True) -> NewEvent:
    return NewEvent(name="email.sent", project="p", contact=contact, recipient=contact, message_id=message, at=AT,
                    campaign=campaign, template="t1", subject=f"Subject {message}", sender="App <app@example.com>",
                    tracked=tracked)


def hit(name: str, message: str, contact: str, link: str | None = None, campaign: str = "c1", at: str = AT) -> NewEvent:
    return NewEvent(name=name, project="p", contact=contact, recipient=contact, message_id=message, at=at,
                    campaign=campaign, template="t1", link=link, tracked=True)


async def engage(store: EventStore, event: NewEvent, judgement: Judgement | None = None) -> list[int]:
    """One hit recorded alone: the ids it stored."""
    (ids,) = await store.record_engagements([(event, judgement)])
    return ids


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


async def public(store: EventStore, query: EventQuery) -> list[dict]:
    """Stored events in the API's shape, as the events endpoint answers them."""
    return [event_json(row) for row in await store.events(query)]


async def stats(store: EventStore, query: StatsQuery) -> dict:
    return stats_json(query, await store.stats(query))


def _query() -> EventQuery:
    return EventQuery(project="p", limit=1000)


@asynccontextmanager
async def opened(where: str | Path, *, webhook_projects: tuple[str, ...] = ()) -> AsyncIterator[EventStore]:
    """An open store (a URL, or a SQLite file), always closed: aiosqlite's worker thread is not a
    daemon and would keep pytest alive, and a pool left open holds its connections."""
    store = open_store(where if isinstance(where, str) else f"sqlite:///{where}", webhook_projects=webhook_projects)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def test_counters_are_exact_across_two_connections_recording_at_once(store_url: str) -> None:
    """Two stores on one file behave like two tracker processes: BEGIN IMMEDIATE serialises them."""

    async def scenario() -> list[dict]:
        async with opened(store_url) as first, opened(store_url) as second:
            await first.record([sent("m1", "a@x.test")])
            await asyncio.gather(*(engage(store, hit("email.open", "m1", "a@x.test"))
                                   for _ in range(25) for store in (first, second)))
            return await public(first, _query())

    opens = [e for e in run(scenario()) if e["name"] == "email.open"]
    assert sorted(e["opens"] for e in opens) == list(range(1, 51))
    assert [e["opens"] for e in opens if e["first"]] == [1]
    assert all(e["subject"] == "Subject m1" and e["from"] == "App <app@example.com>" for e in opens)
    assert all(e["implied"] is False and "clicks" not in e for e in opens)


def test_first_click_without_open_records_an_implied_open_once(store_url: str) -> None:
    async def scenario() -> list[dict]:
        async with opened(store_url) as store:
            await store.record([sent("m1", "a@x.test")])
            await engage(store, hit("email.click", "m1", "a@x.test", "https://x.test/1"))
            await engage(store, hit("email.click", "m1", "a@x.test", "https://x.test/2"))
            await engage(store, hit("email.open", "m1", "a@x.test"))
            found = await public(store, _query())
        return list(reversed(found))  # oldest first

    sent_event, implied, click1, click2, real_open = run(scenario())
    assert implied["name"] == "email.open" and implied["implied"] is True
    assert (implied["opens"], implied["first"], implied["link"]) == (1, True, None)
    assert (click1["clicks"], click1["first"], click2["clicks"], click2["first"]) == (1, True, 2, False)
    assert click2["link"] == "https://x.test/2" and "opens" not in click1 and "implied" not in click1
    assert (real_open["opens"], real_open["first"], real_open["implied"]) == (2, False, False)
    assert "opens" not in sent_event and "first" not in sent_event


def test_a_verdict_sees_the_hits_stored_before_it_in_its_batch_and_relabels_them(store_url: str) -> None:
    """Three opens queued at once go in one transaction; each verdict reads the history as stored so
    far, and a re-label it asks for is applied to the earlier event."""
    histories: list[list[int]] = []

    def decide(rows: list) -> Decision:  # type: ignore[type-arg]
        ids = [row["id"] for row in rows]
        histories.append(ids)
        return "scanner", f"seen={len(ids)}", {event_id: ("scanner", "proximity") for event_id in ids[-1:]}

    async def scenario() -> tuple[list[list[int]], list[dict]]:
        async with opened(store_url) as store:
            judged = Judgement(since="2026-03-01T00:00:00.000000Z", decide=decide)
            ids = await asyncio.gather(*(engage(store, hit("email.open", "m1", "a"), judged) for _ in range(3)))
            return ids, list(reversed(await public(store, _query())))

    ids, events = run(scenario())
    first, second, _ = sorted(i for (i,) in ids)  # in the order the verdicts ran
    assert histories == [[], [first], [first, second]]
    assert [(e["agent"], e["agent_reason"]) for e in events] == [
        ("scanner", "seen=0 proximity"), ("scanner", "seen=1 proximity"), ("scanner", "seen=2")]


def test_hits_recorded_together_store_what_they_store_one_by_one(store_url: str) -> None:
    """A burst of mixed hits (clicks with implied opens, several messages and contacts, a replayed uid,
    verdicts re-labelling earlier hits and a click's implied open) recorded at once, as one group commit,
    stores the same rows, counters, labels and ids per caller as the same hits recorded one after another."""

    def decide(rows: list) -> Decision:  # type: ignore[type-arg]
        clicks = [row["id"] for row in rows if row["name"] == "email.click"]
        return "scanner", f"seen={len(rows)}", {event_id: ("prefetch", f"after={len(rows)}") for event_id in clicks[-1:]}

    def burst(project: str) -> list[NewEvent]:
        made = []
        for index, (name, message, contact) in enumerate([
                ("email.click", "m1", "a"), ("email.open", "m1", "a"), ("email.click", "m1", "a"), ("email.open", "m2", "b"),
                ("email.click", "m2", "c"), ("email.click", "m1", "a"), ("email.open", "m2", "b"), ("email.open", "m1", "d")]):
            link = f"https://x.test/{index}" if name == "email.click" else None
            made.append(replace(hit(name, message, contact, link, at=f"2026-03-01T10:00:{index:02d}.000000Z"),
                                project=project, uid=f"{project}{index:031d}"))
        return [*made[:4], made[2], *made[4:]]  # the third hit twice: a replay inside the burst

    async def scenario() -> tuple[list[list[int]], list[list[int]], list[dict], list[dict]]:
        async with opened(store_url) as store:
            judged = Judgement(since="2026-03-01T00:00:00.000000Z", decide=decide)
            for project in ("p", "q", "r"):
                await store.record([replace(sent(m, c), project=project) for m, c in (("m1", "a"), ("m2", "b"), ("m2", "c"))])
            alone = [await engage(store, event, judged) for event in burst("p")]
            together = await asyncio.gather(*(engage(store, event, judged) for event in burst("q")))
            batched = await store.record_engagements([(event, judged) for event in burst("r")])
            return (alone, list(together), batched, *[await public(store, EventQuery(project=p, limit=100)) for p in "pqr"])

    alone, together, batched, one_by_one, at_once, as_batch = run(scenario())
    assert alone[2] == alone[4] and together[2] == together[4] and batched[2] == batched[4]  # a replay: the first ids
    assert [len(ids) for ids in batched] == [len(ids) for ids in together] == [len(ids) for ids in alone] == [2, 1, 1, 1, 1, 2, 1, 1, 1]

    def comparable(events: list[dict], ids: list[list[int]]) -> list[dict]:
        order = {event_id: place for place, event_id in enumerate(sorted({i for call in ids for i in call}))}
        return [{**{k: v for k, v in e.items() if k not in ("id", "project")}, "place": order.get(e["id"])} for e in events]

    assert comparable(at_once, together) == comparable(as_batch, batched) == comparable(one_by_one, alone)
    labelled = [(e["name"], e.get("implied"), e["agent"]) for e in one_by_one if e["agent"] == "prefetch"]
    assert ("email.open", True, "prefetch") in labelled and ("email.click", None, "prefetch") in labelled


def test_counters_are_per_message_and_contact(store_url: str) -> None:
    async def scenario() -> list[dict]:
        async with opened(store_url) as store:
            for message, contact in (("m1", "a"), ("m1", "b"), ("m2", "a"), ("m1", "a")):
                await engage(store, hit("email.open", message, contact))
            found = await public(store, _query())
        return list(reversed(found))

    assert [(e["message_id"], e["contact"], e["opens"], e["first"]) for e in run(scenario())] == [
        ("m1", "a", 1, True), ("m1", "b", 1, True), ("m2", "a", 1, True), ("m1", "a", 2, False)]


def test_stats_on_a_crafted_dataset(store_url: str) -> None:
    """Two messages of campaign c1 to three contacts (and an untracked one), with machine events flagged."""
    l1, l2 = "https://x.test/1", "https://x.test/2"

    async def scenario() -> tuple[dict, dict, dict]:
        async with opened(store_url) as store:
            await store.record([sent("m1", "a"), sent("m1", "b"), sent("m2", "c"), sent("m3", "d", tracked=False),
                                sent("m9", "z", campaign="c2")])

            async def judged(event: NewEvent, agent: str | None) -> None:
                labelled = Judgement(since=AT, decide=lambda _history: (str(agent), "test", {}))
                await engage(store, event, labelled if agent is not None else None)

            await judged(hit("email.open", "m1", "a"), "apple_mpp")
            await judged(hit("email.open", "m1", "a"), None)
            await judged(hit("email.open", "m1", "a"), "human")
            await judged(hit("email.open", "m1", "b"), "scanner")
            await judged(hit("email.open", "m2", "c"), "image_proxy")
            await judged(hit("email.click", "m1", "a", l1), "human")
            await judged(hit("email.click", "m1", "a", l1), "human")
            await judged(hit("email.click", "m1", "a", l2), "scanner")
            await judged(hit("email.click", "m1", "b", l1), "scanner")
            await judged(hit("email.click", "m2", "c", l2), None)
            await judged(hit("email.click", "m9", "z", l1, campaign="c2"), "human")  # c2: implied open + click
            late = rfc3339(datetime(2026, 3, 2, tzinfo=UTC))
            await judged(hit("email.open", "m2", "c", at=late), "scanner")
            c1 = await stats(store, StatsQuery(project="p", campaign="c1"))
            whole = await stats(store, StatsQuery(project="p"))
            since = await stats(store, StatsQuery(project="p", campaign="c1", since=late))
        return c1, whole, since

    c1, whole, since = run(scenario())
    assert (c1["sent"], c1["delivered"], c1["tracked"]) == (3, 4, 3)
    assert c1["opens"] == {"unique": 3, "total": 6, "unique_human": 2, "total_human": 3,
                           "rate": 1.0, "rate_human": round(2 / 3, 4)}
    assert c1["clicks"] == {"unique": 3, "total": 5, "unique_human": 2, "total_human": 3,
                            "rate": 1.0, "rate_human": round(2 / 3, 4)}
    assert c1["links"] == [
        {"link": l1, "unique": 2, "total": 3, "unique_human": 1, "total_human": 2},
        {"link": l2, "unique": 2, "total": 2, "unique_human": 1, "total_human": 1},
    ]
    # The whole project adds c2: one more message, an implied open and a click.
    assert (whole["sent"], whole["delivered"], whole["tracked"]) == (4, 5, 4)
    assert (whole["opens"]["unique"], whole["opens"]["total"], whole["clicks"]["total"]) == (4, 7, 6)
    assert since["opens"]["total"] == 1 and since["opens"]["unique_human"] == 0 and since["sent"] == 0
    assert since["opens"]["rate"] is None  # nothing sent in the window: no rate rather than a division by zero


def test_outbox_rows_are_written_with_their_events_and_leased(store_url: str) -> None:
    async def scenario() -> None:
        async with opened(store_url, webhook_projects=("p",)) as store:
            await store.record([sent("m1", "a"), replace(sent("m1", "b"), project="other")])
            await engage(store, hit("email.click", "m1", "a", "https://x.test/1"))
            assert store.outbox_added.is_set()
            assert await store.pending_webhooks() == 3  # sent(a), implied open, click; not the other project's
            jobs = await store.claim_webhooks(now=1e12, lease=60, limit=10)
            assert [job.event["name"] for job in jobs] == ["email.sent", "email.open", "email.click"]
            assert len({job.key for job in jobs}) == 3 and all(job.key.startswith("evt_") for job in jobs)
            assert await store.claim_webhooks(now=1e12 + 59, lease=60, limit=10) == []  # leased
            again = await store.claim_webhooks(now=1e12 + 61, lease=60, limit=10)  # a dead worker's rows come back
            assert [job.key for job in again] == [job.key for job in jobs]
            await store.retry_webhook(jobs[0].outbox_id, due=0, error="HTTP 503")
            [retried] = await store.claim_webhooks(now=1e12 + 62, lease=60, limit=10)
            assert (retried.key, retried.attempts) == (jobs[0].key, 1)
            for job in jobs:
                await store.finish_webhook(job.outbox_id)
            assert await store.pending_webhooks() == 0

    run(scenario())


def test_purge_deletes_old_events_of_that_project_and_their_webhooks(store_url: str) -> None:
    now = datetime(2026, 3, 10, tzinfo=UTC)
    old, recent = rfc3339(now - timedelta(days=31)), rfc3339(now - timedelta(days=29))

    async def scenario() -> None:
        async with opened(store_url, webhook_projects=("p",)) as store:
            await store.record([replace(sent("m1", "a"), at=old), replace(sent("m2", "a"), at=recent),
                                replace(sent("m3", "a"), at=old, project="q")])
            assert await store.purge("p", now - timedelta(days=30)) == 1
            assert [e["message_id"] for e in await public(store, _query())] == ["m2"]
            assert await store.pending_webhooks() == 1

    run(scenario())


def test_a_database_from_the_first_release_gains_the_new_columns(tmp_path: Path) -> None:
    """A store file written before columns were added opens, gets them, and records and reads events."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, project TEXT NOT NULL,
            contact TEXT NOT NULL, recipient TEXT NOT NULL, message_id TEXT NOT NULL, at TEXT NOT NULL,
            campaign TEXT, template TEXT, template_type TEXT, campaign_type TEXT, subject TEXT, sender TEXT,
            link TEXT, ip TEXT, user_agent TEXT, tracked INTEGER, reason TEXT);
        INSERT INTO events (name, project, contact, recipient, message_id, at)
            VALUES ('email.sent', 'p', 'c@x', 'c@x', 'm@x', '2026-01-01T00:00:00.000000Z');
    """)
    old.commit()
    old.close()

    async def run() -> list[dict]:
        store = SqliteEventStore(path)
        await store.open()
        try:
            return await public(store, EventQuery(project="p"))
        finally:
            await store.close()

    [event] = asyncio.run(run())
    assert event["name"] == "email.sent" and event["agent"] is None
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(events)")}
    assert {"agent", "agent_reason", "opens", "clicks", "first", "implied", "uid"} <= columns


def test_recording_an_event_again_by_its_uid_stores_counts_and_queues_nothing_new(store_url: str) -> None:
    """A caller that lost the answer records the same events again (a spool replay, another node, a
    notification delivered twice and timed at its arrival): it gets the ids stored the first time,
    counters stay exact and no second webhook is queued."""

    async def scenario() -> None:
        async with opened(store_url, webhook_projects=("p",)) as store:
            sends = [sent("m1", "a"), sent("m2", "a")]
            first_ids = await store.record(sends)
            again = await store.record([sends[1], sent("m3", "a"), replace(sends[0], at="2026-03-02T10:00:00.000000Z")])
            assert (again[0], again[2]) == (first_ids[1], first_ids[0]) and again[1] > max(first_ids)  # by uid, whatever its time
            click = hit("email.click", "m1", "a", "https://x.test/1")
            click_ids = await engage(store, click)  # the implied open, then the click
            replays = await asyncio.gather(*(engage(store, click) for _ in range(3)))
            assert replays == [click_ids] * 3
            opened_ = hit("email.open", "m1", "a")
            assert await engage(store, opened_) == await engage(store, opened_)
            events = await public(store, _query())
            assert len(events) == 3 + 2 + 1 and all("uid" not in e for e in events)
            assert sorted(e["opens"] for e in events if e["name"] == "email.open") == [1, 2]
            assert [e["clicks"] for e in events if e["name"] == "email.click"] == [1]
            assert await store.pending_webhooks() == 6

    run(scenario())


# -- group commit: concurrent writers share transactions, each sees its own ids --------------------


def event(contact: str, name: str = "email.open") -> NewEvent:
    return NewEvent(name=name, project="demo", contact=contact, recipient=contact, message_id="m1@test", at=now_rfc3339())


def stored(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT id, contact FROM events ORDER BY id").fetchall()


def test_the_wal_is_copied_back_by_the_background_checkpointer(tmp_path: Path) -> None:
    """The writer never checkpoints (autocheckpoint is off): a commit CHECKPOINT_SECONDS after the last
    checkpoint, with far fewer than the 1000 WAL pages SQLite would wait for, has the store's own
    checkpointer copy the WAL into the database file, while the store stays open."""
    path = tmp_path / "e.db"

    async def scenario() -> tuple[int, int]:
        async with opened(path) as store:
            await store.record([sent("m0", "a@x.test")])  # the first commit checkpoints what opening wrote
            await asyncio.sleep(0.2)
            before = path.stat().st_size
            await store.record([sent(f"m1-{n}", "a@x.test") for n in range(100)])  # pages the file does not have
            await asyncio.sleep(0.2)
            assert path.stat().st_size == before  # within CHECKPOINT_SECONDS: still only in the WAL
            await asyncio.sleep(CHECKPOINT_SECONDS)
            await store.record([sent("m2", "a@x.test")])
            for _ in range(100):  # bounded: 5 s
                if path.stat().st_size > before:
                    break
                await asyncio.sleep(0.05)
            return before, path.stat().st_size

    before, after = run(scenario())
    assert after > before
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (102,)


def test_point_reads_answer_at_once_while_another_process_writes_and_see_each_commit(tmp_path: Path) -> None:
    """The mode and suppression reads run in place on the event loop's thread: another connection
    holding the write lock (BEGIN EXCLUSIVE, as `inflight settings` or a second relay may) must
    neither block them nor leave them reading an old snapshot once it committed."""
    path = tmp_path / "e.db"

    async def scenario() -> None:
        async with opened(path) as store:
            await store.set_tracking_mode("p", "DISABLED")
            other = sqlite3.connect(path, isolation_level=None)
            try:
                other.execute("BEGIN EXCLUSIVE")
                other.execute("UPDATE tracking_settings SET mode = 'ENABLED' WHERE project = 'p'")
                other.execute("INSERT INTO suppressions (project, address, reason, detail, at) "
                              "VALUES ('p', 'b@x.test', 'manual', '', '2026-01-01T00:00:00Z')")
                started = time.monotonic()
                assert await store.tracking_mode("p") == "DISABLED"  # the last commit, not the pending write
                assert await store.suppressed("p", ["b@x.test"]) == {}
                assert time.monotonic() - started < 0.5  # not one wait for the writer (busy_timeout: 5 s)
                other.execute("COMMIT")
                assert await store.tracking_mode("p") == "ENABLED"
                assert set(await store.suppressed("p", ["B@x.test", "c@x.test"])) == {"b@x.test"}
            finally:
                other.close()

    run(scenario())


def test_concurrent_records_are_grouped_and_each_caller_gets_its_own_ids(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def scenario() -> tuple[list[list[int]], int]:
        store = SqliteEventStore(path)
        await store.open()
        commits = 0
        commit = store.db.commit

        async def counted_commit() -> None:
            nonlocal commits
            commits += 1
            await commit()

        store.db.commit = counted_commit  # type: ignore[method-assign]
        calls = [[event(f"c{i}-{j}@example.net") for j in range(i % 3 + 1)] for i in range(40)]
        ids = await asyncio.gather(*(store.record(events) for events in calls))
        await store.close()
        return ids, commits

    ids, commits = asyncio.run(scenario())
    rows = dict(stored(path))
    assert len(rows) == sum(len(i) for i in ids) == 79
    assert commits < 40  # 40 callers, far fewer transactions
    for index, call_ids in enumerate(ids):
        assert [rows[i] for i in call_ids] == [f"c{index}-{j}@example.net" for j in range(index % 3 + 1)]


def test_a_bad_event_fails_only_its_own_caller(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def scenario() -> list[list[int] | BaseException]:
        store = SqliteEventStore(path)
        await store.open()
        bad = NewEvent(name="email.open", project="demo", contact=None, recipient="x", message_id="m", at=now_rfc3339())  # type: ignore[arg-type]
        results = await asyncio.gather(store.record([event("a@example.net")]), store.record([bad]),
                                       store.record([event("b@example.net")]), return_exceptions=True)
        await store.close()
        return results

    first, failed, last = asyncio.run(scenario())
    assert isinstance(failed, sqlite3.IntegrityError)
    assert isinstance(first, list) and isinstance(last, list)
    assert [contact for _, contact in stored(path)] == ["a@example.net", "b@example.net"]


def test_a_bad_hit_in_a_batch_fails_the_call_and_the_others_are_stored(store_url: str) -> None:
    """record_engagements raises the bad hit's error, once every hit of the batch is committed or failed."""

    async def scenario() -> tuple[BaseException | None, list[dict]]:
        async with opened(store_url) as store:
            await store.record([sent("m1", "a"), sent("m1", "b")])
            bad = replace(hit("email.open", "m1", "x"), contact=None)  # contact is NOT NULL
            try:
                await store.record_engagements([(hit("email.open", "m1", "a"), None), (bad, None), (hit("email.open", "m1", "b"), None)])
            except Exception as exc:
                return exc, await public(store, EventQuery(project="p", name="email.open", limit=100))
            return None, []

    error, opens = run(scenario())
    assert error is not None
    assert sorted(event["contact"] for event in opens) == ["a", "b"]


def test_close_waits_for_events_already_handed_over(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    async def scenario() -> None:
        store = SqliteEventStore(path)
        await store.open()
        pending = [asyncio.ensure_future(store.record([event(f"c{i}@example.net")])) for i in range(10)]
        await asyncio.sleep(0)  # handed over, not yet committed
        await store.close()
        assert all(p.done() and not p.exception() for p in pending)

    asyncio.run(scenario())
    assert len(stored(path)) == 10


def test_recording_nothing_touches_nothing(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        store = SqliteEventStore(tmp_path / "events.db")
        await store.open()
        try:
            return await store.record([])
        finally:
            await store.close()

    assert asyncio.run(scenario()) == []


@pytest.mark.parametrize("rows", [1, 1201])
def test_a_large_record_keeps_its_order_and_ids(tmp_path: Path, rows: int) -> None:
    path = tmp_path / "events.db"

    async def scenario() -> list[int]:
        store = SqliteEventStore(path)
        await store.open()
        try:
            return await store.record([event(f"c{i}@example.net") for i in range(rows)])
        finally:
            await store.close()

    ids = asyncio.run(scenario())
    assert [contact for _, contact in stored(path)] == [f"c{i}@example.net" for i in range(rows)]
    assert ids == [row_id for row_id, _ in stored(path)]


# -- the multi-node contract: two store instances (two pools, two connections) at once -------------


def test_200_hits_of_one_message_through_two_stores_count_1_to_200_once(store_url: str) -> None:
    """Two tracker nodes record hits of one message at the same instant: every count exactly once, one first."""

    async def scenario() -> list[dict]:
        async with opened(store_url) as one, opened(store_url) as two:
            await one.record([sent("m1", "a@x.test")])
            await asyncio.gather(*(engage(store, hit("email.open", "m1", "a@x.test"))
                                   for _ in range(100) for store in (one, two)))
            return await public(two, _query())

    opens = [e for e in run(scenario()) if e["name"] == "email.open"]
    assert sorted(e["opens"] for e in opens) == list(range(1, 201))
    assert sum(e["first"] for e in opens) == 1


def test_two_stores_claiming_webhooks_at_once_never_get_the_same_row(store_url: str) -> None:
    async def scenario() -> tuple[list[int], int]:
        async with opened(store_url, webhook_projects=("p",)) as one, opened(store_url, webhook_projects=("p",)) as two:
            await one.record([sent(f"m{i}", "a") for i in range(60)])
            claimed: list[int] = []
            for _ in range(12):
                batches = await asyncio.gather(*(store.claim_webhooks(now=1e12, lease=60, limit=3)
                                                 for store in (one, two, one, two)))
                claimed += [job.outbox_id for batch in batches for job in batch]
            return claimed, await one.pending_webhooks()

    claimed, pending = run(scenario())
    assert len(claimed) == len(set(claimed)) == pending == 60


def test_a_ledger_claim_from_two_stores_has_one_winner(store_url: str) -> None:
    """A message retried through another relay node while the first attempt still sends: each recipient
    is claimed by one attempt; the other sees it busy, then delivered, and a released claim is free again."""

    async def scenario() -> None:
        async with opened(store_url) as one, opened(store_url) as two:
            for round_ in range(10):
                message = f"m{round_}@x"
                claims = await asyncio.gather(one.claim_deliveries("p", message, ["A@x.test", "b@x.test"], lease_seconds=60),
                                              two.claim_deliveries("p", message, ["a@x.test", "B@x.test"], lease_seconds=60))
                winners = [claim for claim in claims if claim.claimed]
                assert len(winners) == 1 and winners[0].claimed == {"a@x.test", "b@x.test"}
                loser = claims[1] if claims[0].claimed else claims[0]
                assert loser.busy == {"a@x.test", "b@x.test"} and not loser.delivered
            await one.record_delivered([Delivered("p", "m0@x", ["a@x.test"], int(time.time()) + 3600)])
            await one.release_deliveries("p", "m0@x", ["b@x.test"])
            again = await two.claim_deliveries("p", "m0@x", ["a@x.test", "b@x.test"], lease_seconds=60)
            assert (again.claimed, again.delivered, again.busy) == ({"b@x.test"}, {"a@x.test"}, set())
            assert await two.delivered_recipients("p", "m0@x", ["A@x.test", "b@x.test"]) == {"a@x.test"}
            dead = await one.claim_deliveries("p", "dead@x", ["a@x.test"], lease_seconds=-1)  # its lease is over at once
            assert dead.claimed == {"a@x.test"}
            assert (await two.claim_deliveries("p", "dead@x", ["a@x.test"], lease_seconds=60)).claimed == {"a@x.test"}

    run(scenario())


def test_a_tracking_mode_set_through_one_store_is_read_by_the_other(store_url: str) -> None:
    async def scenario() -> None:
        async with opened(store_url) as one, opened(store_url) as two:
            assert await two.tracking_mode("p") is None
            await one.set_tracking_mode("p", "DISABLED")
            assert await two.tracking_mode("p") == "DISABLED"
            await two.set_tracking_mode("p", "ENABLED")
            assert await one.tracking_mode("p") == "ENABLED"

    run(scenario())


def test_forget_erases_a_contact_its_webhooks_and_ledger_rows(store_url: str) -> None:
    async def scenario() -> None:
        async with opened(store_url, webhook_projects=("p",)) as store:
            await store.record([sent("m1", "gone@x.test"), sent("m2", "kept@x.test")])
            await engage(store, hit("email.open", "m1", "gone@x.test"))
            await store.record_delivered([Delivered("p", "m1", ["Gone@x.test", "kept@x.test"], int(time.time()) + 3600)])
            assert await store.forget("GONE@x.test") == (2, 2)
            assert [e["contact"] for e in await public(store, _query())] == ["kept@x.test"]
            assert await store.delivered_recipients("p", "m1", ["gone@x.test", "kept@x.test"]) == {"kept@x.test"}
            assert await store.pending_webhooks() == 1

    run(scenario())


def test_throttles_are_shared_between_relay_nodes_through_the_store(store_url: str) -> None:
    """AUTH failures on node A lock the address on node B after one sync each; sends on A use B's bucket
    too; no event is applied twice, and a node's own events never come back to it."""

    def node(store: EventStore) -> ThrottleSync:
        auth = AuthThrottle(per_ip=3, per_user=100, backoff=60, window=900)
        return ThrottleSync(store, auth, RateLimiter())

    async def scenario() -> None:
        async with opened(store_url) as one, opened(store_url) as two:
            a, b = node(one), node(two)
            for _ in range(3):
                a.auth.failed("192.0.2.7", "p")
            for _ in range(3):
                assert a.rates.acquire("p", 3) == 0
            assert b.auth.retry_after("192.0.2.7", "p") == 0 and b.rates.retry_after("p", 3) == 0
            assert await a.sync_once() == 0  # stores six events, has nothing from b
            assert await b.sync_once() == 6
            assert 59 <= b.auth.retry_after("192.0.2.7", "p") <= 60
            assert b.rates.acquire("p", 3) > 0  # the bucket a emptied
            assert await b.sync_once() == 0 and await a.sync_once() == 0  # nothing twice, nothing of one's own
            b.auth.succeeded("192.0.2.8", "p")
            await b.sync_once()
            assert await a.sync_once() == 1

    run(scenario())
