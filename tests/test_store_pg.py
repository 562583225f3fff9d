"""What only the PostgreSQL backend has: migrations under a lock, monthly partitions, NOTIFY, owner
liveness of ledger claims, and the whole service (relay, tracker, webhooks) on a postgresql:// store."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from inflight.cli import main as cli
from store import open_store
from store.model import DashboardUser, EventQuery, StatsQuery
from store.postgresql import PostgresEventStore, migrations, partition_name
from tests.cluster import PrivatePostgres
from tests.conftest import PROJECT_SECRET, RunningService, Sink, make_settings
from tests.test_flow import fetch, html_message, send, tracked_urls
from tests.test_store import opened, sent


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


async def fetchval(url: str, sql: str, *args: object) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


def test_nodes_starting_together_apply_each_migration_once(pg_url: str) -> None:
    async def scenario() -> tuple[object, object]:
        stores = [open_store(pg_url) for _ in range(4)]
        await asyncio.gather(*(store.open() for store in stores))
        await asyncio.gather(*(store.close() for store in stores))
        return (await fetchval(pg_url, "SELECT count(*) FROM schema_migrations"),
                await fetchval(pg_url, "SELECT count(DISTINCT version) FROM schema_migrations"))

    assert run(scenario()) == (len(migrations()), len(migrations()))


def test_migrate_command_applies_then_finds_nothing_to_do(pg_url: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "inflight.toml"
    config.write_text(f'[store]\nurl_file = "{tmp_path / "store.url"}"\n'
                      '[[projects]]\nid = "p"\nsecret = "secret-123"\n')
    (tmp_path / "store.url").write_text(pg_url + "\n")
    assert cli(["migrate", "--config", str(config)]) == 0
    assert cli(["migrate", "--config", str(config)]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == f"migrated: {', '.join(name for _, name in migrations())}"
    assert second == "store schema up to date"


def test_partitions_are_made_ahead_and_for_an_unseen_month(pg_url: str) -> None:
    this_month = datetime.now(UTC).strftime("%Y-%m")

    async def scenario() -> tuple[object, object, list[str]]:
        async with opened(pg_url) as store:
            await store.record([replace(sent("m1", "a"), at="2031-05-02T00:00:00.000000Z")])
            found = [e["message_id"] for e in await store.events(EventQuery(project="p"))]
        return (await fetchval(pg_url, "SELECT to_regclass($1)::text", partition_name(this_month)),
                await fetchval(pg_url, "SELECT to_regclass($1)::text", partition_name("2031-05")), found)

    ahead, unseen, found = run(scenario())
    assert (ahead, unseen, found) == (partition_name(this_month), partition_name("2031-05"), ["m1"])


def test_retention_drops_a_month_only_its_project_holds_and_deletes_rows_elsewhere(pg_url: str) -> None:
    january, february = "2025-01-15T00:00:00.000000Z", "2025-02-15T00:00:00.000000Z"

    async def scenario() -> tuple[int, object, list[tuple[str, str]], int]:
        async with opened(pg_url, webhook_projects=("p",)) as store:
            await store.record([replace(sent("jan1", "a"), at=january), replace(sent("jan2", "b"), at=january),
                                replace(sent("feb", "a"), at=february),
                                replace(sent("feb-q", "a"), at=february, project="q"),
                                replace(sent("mar", "a"), at="2025-03-20T00:00:00.000000Z")])
            deleted = await store.purge("p", datetime(2025, 3, 10, tzinfo=UTC))
            left = [(e["project"], e["message_id"]) for q in ("p", "q") for e in await store.events(EventQuery(project=q))]
            pending = await store.pending_webhooks()
        return deleted, await fetchval(pg_url, "SELECT to_regclass($1)::text", partition_name("2025-01")), left, pending

    deleted, january_partition, left, pending = run(scenario())
    assert deleted == 3 and january_partition is None  # january dropped whole; february by rows (q lives there)
    assert left == [("p", "mar"), ("q", "feb-q")]
    assert pending == 1  # the webhooks of the dropped and deleted events went with them


def test_a_notify_wakes_another_nodes_webhook_worker(pg_url: str) -> None:
    async def scenario() -> bool:
        async with opened(pg_url, webhook_projects=("p",)) as one, opened(pg_url, webhook_projects=("p",)) as two:
            two.outbox_added.clear()
            await one.record([sent("m1", "a")])
            await asyncio.wait_for(two.outbox_added.wait(), timeout=5)
            return two.outbox_added.is_set()

    assert run(scenario())


def test_the_claims_of_a_process_that_is_gone_are_free_at_once(pg_url: str) -> None:
    """A relay killed mid-send: its session (and the advisory lock naming it) ends with it, so a retry
    through another node claims at once instead of waiting for the lease."""

    async def scenario() -> None:
        async with opened(pg_url) as survivor:
            dying = PostgresEventStore(pg_url)
            await dying.open()
            assert (await dying.claim_deliveries("p", "m@x", ["a@x.test"], lease_seconds=600)).claimed == {"a@x.test"}
            assert (await survivor.claim_deliveries("p", "m@x", ["a@x.test"], lease_seconds=600)).busy == {"a@x.test"}
            await dying.close()
            assert (await survivor.claim_deliveries("p", "m@x", ["a@x.test"], lease_seconds=600)).claimed == {"a@x.test"}

    run(scenario())


def test_the_service_runs_on_a_postgresql_store(pg_url: str, tmp_path: Path, sink: Sink) -> None:
    """Relay, tracker, events and stats APIs and the runtime tracking mode through `inflight serve`'s Service."""
    settings = make_settings(tmp_path, sink.url, store={"url": pg_url})
    with RunningService(settings) as service:
        send(service.smtp_port, html_message({"X-Inflight-Campaign": "spring"}))
        click_url, pixel_url = tracked_urls(sink.messages[0].data)
        assert fetch(service, pixel_url).status_code == 200
        assert fetch(service, click_url).status_code == 302
        with httpx.Client(base_url=service.http_base, headers={"Authorization": f"Bearer {PROJECT_SECRET}"}) as api:
            names = [e["name"] for e in api.get("/v1/events").json()["events"]]
            stats = api.get("/v1/stats", params={"campaign": "spring"}).json()
            assert api.put("/v1/settings/tracking", json={"mode": "DISABLED"}).status_code == 200
            assert api.get("/healthz").status_code == 200
        send(service.smtp_port, html_message())
    assert names == ["email.click", "email.open", "email.sent"]
    assert (stats["sent"], stats["opens"]["unique"], stats["clicks"]["total"]) == (1, 1, 1)
    assert tracked_urls(sink.messages[1].data) == []  # the next message follows the mode stored in PostgreSQL


def test_calls_wait_for_the_database_to_come_back(pg_url: str) -> None:
    """Every connection cut at once, as a restart does: the next calls reconnect and succeed, a hit
    is counted once, and the session (LISTEN, ledger owner) comes back by itself."""
    from tests.test_store import engage, hit

    async def scenario() -> tuple[list[int], list[int], str | None]:
        async with opened(pg_url, webhook_projects=("p",)) as store:
            await store.record([sent("m1", "a")])
            first = await engage(store, hit("email.open", "m1", "a"))
            await store.set_tracking_mode("p", "DISABLED")
            cut = await fetchval(pg_url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            assert cut >= 2  # the pool's and the session's
            second = await engage(store, hit("email.open", "m1", "a"))
            opens = [e["opens"] for e in await store.events(EventQuery(project="p", name="email.open"))]
            mode = await store.tracking_mode("p")
            store.outbox_added.clear()
            await asyncio.wait_for(store.outbox_added.wait(), timeout=10)  # the session reconnected and says so
        return first + second, sorted(opens), mode

    ids, opens, mode = run(scenario())
    assert len(set(ids)) == 2 and opens == [1, 2] and mode == "DISABLED"


def test_feedback_and_dashboard_calls_wait_for_a_restarted_database(private_postgres: PrivatePostgres) -> None:
    """The server stopped (`pg_ctl stop -m fast`) and started 2 s later: the suppression, dead-letter,
    provider-id and dashboard calls made while it is down wait for it and answer, as the event store's do."""
    async def scenario() -> tuple[bool, list[str], object, object, object]:
        async with opened(private_postgres.url) as store:
            await store.suppress("p", "a@example.com", reason="bounce", detail="550")  # the pool's connections are up
            private_postgres.stop()

            def start_later() -> None:
                time.sleep(2)
                private_postgres.start()

            restart = asyncio.create_task(asyncio.to_thread(start_later))
            added, letters, daily, user = await asyncio.gather(
                store.suppress("p", "b@example.com", reason="complaint", detail="abuse"),
                store.dead_letters("p", limit=10),
                store.daily(StatsQuery(project="p")),
                store.save_user(DashboardUser("ops@example.com", "hash", None, True)))
            await restart
            found = await store.suppressed("p", ["a@example.com", "b@example.com"])
            return added, sorted(found), letters, daily, (user, await store.user("ops@example.com"))

    added, found, letters, daily, (saved, user) = run(scenario())
    assert added is True and found == ["a@example.com", "b@example.com"]
    assert letters == [] and daily == [] and saved is None
    assert user == DashboardUser("ops@example.com", "hash", None, True)
