"""The store's feedback aggregates (store.model Suppressions, ProviderIds, ForgottenContacts,
DeadLetters): one contract, run against every backend by the `store_url` fixture."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from store import open_store
from store.model import (
    EventQuery,
    EventStore,
    NewEvent,
    ProviderCopy,
    forgotten_key,
    is_forgotten,
    now_rfc3339,
    rfc3339,
)

T = TypeVar("T")


def run(url: str, scenario: Callable[[EventStore], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        store = open_store(url, **kwargs)
        await store.open()
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_suppressions_are_per_project_case_insensitive_and_keep_the_first_reason(store_url: str) -> None:
    async def scenario(store: EventStore) -> None:
        assert await store.suppress("p", "A@Example.com", reason="bounce", detail="smtp; 550 5.1.1") is True
        assert await store.suppress("p", "a@example.com", reason="complaint", detail="abuse") is False
        assert await store.suppress("q", "a@example.com", reason="manual", detail="cli") is True
        [entry] = await store.suppressions("p")
        assert (entry.project, entry.address, entry.reason, entry.detail) == ("p", "a@example.com", "bounce", "smtp; 550 5.1.1")
        found = await store.suppressed("p", ["A@EXAMPLE.COM", "b@example.com"])
        assert list(found) == ["a@example.com"]
        assert await store.suppressed("p", []) == {}
        assert await store.unsuppress("p", "A@example.com") is True
        assert await store.unsuppress("p", "a@example.com") is False
        assert await store.suppressions("p") == [] and len(await store.suppressions("q")) == 1

    run(store_url, scenario)


def test_provider_ids_find_every_recipient_of_a_copy(store_url: str) -> None:
    async def scenario(store: EventStore) -> None:
        await store.record_provider_ids([("ses-1", ProviderCopy("p", "m1@x", "A@example.com")),
                                         ("ses-1", ProviderCopy("p", "m1@x", "b@example.com")),
                                         ("ses-2", ProviderCopy("q", "m2@x", "c@example.com"))])
        await store.record_provider_ids([("ses-3", ProviderCopy("p", "m3@x", "d@example.com"))])
        await store.record_provider_ids([])
        assert sorted(await store.provider_copies("ses-1"), key=lambda c: c.recipient) == [
            ProviderCopy("p", "m1@x", "a@example.com"), ProviderCopy("p", "m1@x", "b@example.com")]
        assert await store.provider_copies("ses-2") == [ProviderCopy("q", "m2@x", "c@example.com")]
        assert await store.provider_copies("ses-3") == [ProviderCopy("p", "m3@x", "d@example.com")]
        assert await store.provider_copies("unknown") == []

    run(store_url, scenario)


def test_forgotten_contacts_are_kept_as_hashes_only(store_url: str) -> None:
    async def scenario(store: EventStore) -> set[tuple[str, str]]:
        await store.record_provider_ids([("ses-1", ProviderCopy("p", "m1@x", "gone@example.com")),
                                         ("ses-1", ProviderCopy("p", "m1@x", "kept@example.com"))])
        await store.remember_forgotten("Gone@Example.com", project=None)
        await store.remember_forgotten("other@example.com", project="p")
        assert [c.recipient for c in await store.provider_copies("ses-1")] == ["kept@example.com"]
        return await store.forgotten_keys()

    keys = run(store_url, scenario)
    assert keys == {(forgotten_key("gone@example.com"), ""), (forgotten_key("other@example.com"), "p")}
    assert is_forgotten(keys, "any", "GONE@example.com") and is_forgotten(keys, "p", "x", "other@example.com")
    assert not is_forgotten(keys, "q", "other@example.com") and not is_forgotten(keys, "p", "kept@example.com")


def test_dead_letters_are_buried_listed_and_replayed_once(store_url: str) -> None:
    async def scenario(store: EventStore) -> None:
        event = NewEvent(name="email.sent", project="p", contact="a@example.com", recipient="a@example.com",
                         message_id="m1@x", at=now_rfc3339())
        await store.record([event])
        [job] = await store.claim_webhooks(now=10**10, lease=30, limit=10)
        await store.bury_webhook(job.outbox_id, error="HTTP 503", now=1000.0)
        assert await store.pending_webhooks() == 0
        [letter] = await store.dead_letters("p", limit=10)
        assert (letter.project, letter.key, letter.attempts, letter.last_error, letter.buried) == (
            "p", job.key, job.attempts + 1, "HTTP 503", 1000.0)
        assert await store.dead_letters("q", limit=10) == []
        assert await store.replay_dead_letter("q", letter.id, now=2000.0) is False  # another project's
        assert await store.replay_dead_letter("p", letter.id, now=2000.0) is True
        assert await store.replay_dead_letter("p", letter.id, now=2000.0) is False
        [again] = await store.claim_webhooks(now=2000.0, lease=30, limit=10)
        assert (again.key, again.attempts, again.created, again.event["id"]) == (job.key, 0, 2000.0, job.event["id"])
        assert await store.dead_letters("p", limit=10) == []

    run(store_url, scenario, webhook_projects=("p",))


def test_dead_letters_go_with_retention_and_erasure(store_url: str) -> None:
    """Retention deletes the dead letters of the events it deletes and those buried for events recorded
    before its cut-off, whatever their event's time; erasing a contact deletes the dead letters of its events."""
    now = datetime.now(UTC)

    def event(project: str, contact: str, at: datetime) -> NewEvent:
        return NewEvent(name="email.sent", project=project, contact=contact, recipient=contact, message_id=f"{contact}@x",
                        at=rfc3339(at))

    async def scenario(store: EventStore) -> list[list[tuple[str, str]]]:
        await store.record([event("p", "old@example.com", now - timedelta(days=40)), event("p", "new@example.com", now),
                            event("q", "later@example.com", now + timedelta(days=2))])
        for job in await store.claim_webhooks(now=10**10, lease=30, limit=10):
            await store.bury_webhook(job.outbox_id, error="HTTP 503", now=time.time())

        async def letters() -> list[tuple[str, str]]:
            found = [letter for project in ("p", "q") for letter in await store.dead_letters(project, limit=10)]
            contacts = {e["id"]: e["contact"] for project in ("p", "q") for e in await store.events(EventQuery(project=project))}
            return sorted((letter.project, contacts.get(letter.event_id, "(gone)")) for letter in found)

        seen = [await letters()]
        assert await store.purge("p", now - timedelta(days=30)) == 1
        seen.append(await letters())
        assert await store.purge("q", now + timedelta(days=1)) == 0  # the event is later than the cut-off, its dead letter not
        seen.append(await letters())
        await store.forget("new@example.com")
        seen.append(await letters())
        return seen

    before, after_p, after_q, after_forget = run(store_url, scenario, webhook_projects=("p", "q"))
    assert before == [("p", "new@example.com"), ("p", "old@example.com"), ("q", "later@example.com")]
    assert after_p == [("p", "new@example.com"), ("q", "later@example.com")]
    assert after_q == [("p", "new@example.com")]
    assert after_forget == []
