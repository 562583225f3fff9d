"""The store contract of the operations features, on both backends: accounts, sessions that expire,
counts per day and per agent, event pages and filters, the stored mode's reset, the webhook backlog."""

from __future__ import annotations

import asyncio

from store import open_store
from store.model import DashboardSession, DashboardUser, EventQuery, NewEvent, StatsQuery


def event(name: str, message: str, contact: str, at: str, agent: str | None = None) -> NewEvent:
    return NewEvent(name=name, project="p", contact=contact, recipient=contact, message_id=message, at=at,
                    campaign="c1", agent=agent, tracked=True)


def test_accounts_sessions_and_daily_counts(store_url: str) -> None:
    async def scenario() -> None:
        store = open_store(store_url)
        await store.open()
        try:
            await store.save_user(DashboardUser("a@x.com", "hash-1", None, False))
            await store.save_user(DashboardUser("a@x.com", "hash-2", "p", True))  # the same email again: updated
            assert await store.user("a@x.com") == DashboardUser("a@x.com", "hash-2", "p", True)
            assert await store.user("b@x.com") is None
            await store.create_session("h1", DashboardSession("a@x.com", "csrf-1"), expires=1000.0)
            assert await store.session("h1", now=999.0) == DashboardSession("a@x.com", "csrf-1")
            assert await store.session("h1", now=1000.0) is None  # expired
            await store.create_session("h2", DashboardSession("a@x.com", "csrf-2"), expires=5000.0)
            await store.delete_session("h2")
            assert await store.session("h2", now=0.0) is None

            day1, day2 = "2026-03-01T10:00:00.000000Z", "2026-03-02T09:00:00.000000Z"
            await store.record([
                event("email.sent", "m1", "a", day1), event("email.sent", "m2", "b", day1),
                event("email.open", "m1", "a", day1, "human"), event("email.open", "m1", "a", day1, "apple_mpp"),
                event("email.open", "m1", "a", day2, "human"), event("email.click", "m2", "b", day2, "scanner"),
            ])
            daily = await store.daily(StatsQuery("p", campaign="c1"))
            assert [d.day for d in daily] == ["2026-03-01", "2026-03-02"]
            assert [d.delivered for d in daily] == [2, 0]
            assert [(d.opens.unique, d.opens.total, d.opens.unique_human, d.opens.total_human) for d in daily] == \
                [(1, 2, 1, 1), (1, 1, 1, 1)]
            assert [(d.clicks.total, d.clicks.total_human) for d in daily] == [(0, 0), (1, 0)]
            assert await store.agent_counts(StatsQuery("p")) == {"email.open": {"human": 2, "apple_mpp": 1},
                                                                 "email.click": {"scanner": 1}}
            assert await store.daily(StatsQuery("p", since="2026-03-02T00:00:00.000000Z")) == daily[1:]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_event_filters_pages_reset_and_backlog(store_url: str) -> None:
    async def scenario() -> None:
        store = open_store(store_url, webhook_projects=["p"])
        await store.open()
        try:
            at = [f"2026-03-01T10:00:0{n}.000000Z" for n in range(5)]
            await store.record([event("email.sent", f"m{n}", "b@example.com" if n % 2 else "Crm-Id", at[n // 2 * 2])
                                for n in range(5)])
            await store.record([event("email.open", "m1", "b@example.com", at[4], "scanner")])
            ids = [e["id"] for e in await store.events(EventQuery("p", limit=10))]
            assert len(ids) == 6
            page = await store.events(EventQuery("p", limit=2))
            rest = await store.events(EventQuery("p", limit=10, before=(page[-1]["at"], page[-1]["id"])))
            assert [e["id"] for e in page + rest] == ids  # keyset pages: nothing skipped, nothing twice
            assert len(await store.events(EventQuery("p", contact="B@EXAMPLE.com"))) == 3  # addresses in any case
            assert len(await store.events(EventQuery("p", contact="CRM-ID"))) == 0  # an id: as given or lower-cased
            assert len(await store.events(EventQuery("p", contact="Crm-Id"))) == 3
            assert len(await store.events(EventQuery("p", contact="crm-id"))) == 0
            assert [e["name"] for e in await store.events(EventQuery("p", agent="scanner"))] == ["email.open"]
            assert len(await store.events(EventQuery("p", since=at[2], until=at[4]))) == 2

            await store.set_tracking_mode("p", "DISABLED")
            assert await store.tracking_mode("p") == "DISABLED"
            await store.set_tracking_mode("p", None)
            assert await store.tracking_mode("p") is None

            count, oldest = await store.webhook_backlog()
            assert count == 6 and oldest is not None
            rows = await store.webhook_rows("p", 10)
            assert len(rows) == 6 and await store.retry_webhook_now("p", rows[0]["id"], now=1.0)
            assert not await store.retry_webhook_now("other", rows[0]["id"], now=1.0)  # another project's row
        finally:
            await store.close()

    asyncio.run(scenario())
