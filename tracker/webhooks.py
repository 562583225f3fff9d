"""Signed webhooks: every event POSTed to its project's `webhook_url`, at least once, from the store's outbox.

The event row and its outbox row are written in one transaction, so an event is never
recorded without its webhook; the pixel and the redirect answer as soon as that commit is
done and never wait for a receiver. This worker (one per process that runs a Service)
claims due rows with a lease, POSTs them, and deletes them on a 2xx or reschedules them
with exponential backoff until `retry_hours` after the event, then moves them to the dead
letters (listed and replayable over the API).

The signature follows Standard Webhooks (https://www.standardwebhooks.com, spec v1):
`webhook-id` (the idempotency key, identical on every retry), `webhook-timestamp` (Unix
seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 over
"{id}.{timestamp}.{body}">`. The key is the secret's UTF-8 bytes, or for a secret written
`whsec_<base64>` the decoded bytes, which is what the standard's own libraries expect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

from config.settings import ProjectSettings, WebhookSettings
from store.model import WebhookJob
from tracker.shapes import event_json

log = logging.getLogger("inflight.webhooks")

USER_AGENT = "inflight-webhooks/1"


def signing_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode("utf-8")


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def event_body(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def retry_delay(attempts: int, *, initial: float, maximum: float) -> float:
    """Seconds before the next try after `attempts` failures: doubling, capped, with 20 % jitter
    so a receiver coming back from an outage is not hit by every pending event at once."""
    return min(maximum, initial * 2 ** min(attempts - 1, 60)) * random.uniform(0.8, 1.0)


class Outbox(Protocol):
    outbox_added: asyncio.Event

    async def claim_webhooks(self, *, now: float, lease: float, limit: int) -> list[WebhookJob]: ...
    async def finish_webhook(self, outbox_id: int) -> None: ...
    async def retry_webhook(self, outbox_id: int, *, due: float, error: str) -> None: ...
    async def bury_webhook(self, outbox_id: int, *, error: str, now: float) -> None: ...


class WebhookWorker:
    def __init__(self, store: Outbox, projects: Mapping[str, ProjectSettings], settings: WebhookSettings) -> None:
        self.store = store
        self.projects = {p: s for p, s in projects.items() if s.webhook_url}
        self.settings = settings
        # A claimed row is hidden this long: twice the most one POST can take, so that only a
        # dead worker's rows come back to another one.
        self.lease = 2 * settings.timeout_seconds

    async def run(self) -> None:
        inflight: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=self.settings.concurrency)
        async with httpx.AsyncClient(timeout=self.settings.timeout_seconds, limits=limits,
                                     follow_redirects=False, headers={"User-Agent": USER_AGENT}) as client:
            try:
                while True:
                    self.store.outbox_added.clear()
                    free = self.settings.concurrency - len(inflight)
                    jobs = await self._claim(free) if free else []
                    for job in jobs:
                        task = asyncio.create_task(self.deliver(client, job))
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                    if jobs:
                        continue  # more may be due
                    waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.store.outbox_added.wait()), *inflight}
                    await asyncio.wait(waits, timeout=self.settings.poll_seconds,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for future in waits - inflight:
                        future.cancel()
            finally:
                for task in inflight:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _claim(self, limit: int) -> list[WebhookJob]:
        try:
            return await self.store.claim_webhooks(now=time.time(), lease=self.lease, limit=limit)
        except Exception:
            log.exception("webhook-claim-failed")
            await asyncio.sleep(self.settings.poll_seconds)
            return []

    async def deliver(self, client: httpx.AsyncClient, job: WebhookJob) -> None:
        """One attempt; its outcome is written back to the outbox."""
        project = self.projects.get(job.event["project"])
        if project is None:
            log.warning("webhook-dropped project=%s event=%s reason=no-webhook_url", job.event["project"], job.event["id"])
            await self.store.finish_webhook(job.outbox_id)
            return
        body = event_body(event_json(job.event))
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": job.key,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(signing_key(project.webhook_secret), job.key, timestamp, body),
        }
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                response = await client.post(project.webhook_url, content=body, headers=headers)
            error = None if response.is_success else f"HTTP {response.status_code}"
        except (httpx.HTTPError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        try:
            await self._settle(job, error)
        except Exception:
            log.exception("webhook-settle-failed event=%s", job.event["id"])  # the lease brings it back

    async def _settle(self, job: WebhookJob, error: str | None) -> None:
        event, attempts = job.event, job.attempts + 1
        if error is None:
            await self.store.finish_webhook(job.outbox_id)
            return
        now = time.time()
        if now - job.created > self.settings.retry_hours * 3600:
            # Kept as a dead letter, listed and replayable over the API (tracker/dead_letters.py).
            log.error("webhook-given-up project=%s event=%s attempts=%d error=%r dead_letter=true",
                      event["project"], event["id"], attempts, error)
            await self.store.bury_webhook(job.outbox_id, error=error, now=now)
            return
        delay = retry_delay(attempts, initial=self.settings.retry_initial_seconds, maximum=self.settings.retry_max_seconds)
        log.warning("webhook-failed project=%s event=%s attempts=%d error=%r retry_in=%.1fs",
                    event["project"], event["id"], attempts, error, delay)
        await self.store.retry_webhook(job.outbox_id, due=now + delay, error=error)
