"""Storing hits: the spool's journal records of answered hits turned into open and click events.

This is the tracker's work that needs the store (who the copy went to, the message's recent hits
for the verdict, the insert), kept apart from answering so that it can run in a process of its
own (tracker/recorder_process.py, `[tracker] store_process`): the answering process then spends
its event loop on answers alone. A batch goes in as the journal's own bytes and comes back as a
`Recorded`: what the answering process still has to do (spool again, set aside, count), so the
same code runs inline and in the other process.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from config.settings import IpMode, Settings
from store.model import Decision, EventStore, Judgement, NewEvent, rfc3339
from store.spool import decode_record
from tracker.agents import AgentPolicy, Hit, PriorHit, classify, relabel
from tracker.netdata import NetworkLists, network_specs
from tracker.privacy import ForgottenContacts, stored_ip
from tracker.sends import SendDirectory
from tracker.spooled import SpooledHit
from tracking.claims import TrackedSend, TrackingClaims

log = logging.getLogger("inflight.tracker")

SEND_WAIT_SECONDS = 60.0  # how long a hit waits for its copy's row to reach the store


@dataclass
class Recorded:
    """What storing a batch leaves to the answering process."""

    deferred: list[dict[str, Any]] = field(default_factory=list)  # hits whose copy is not in the store yet: spool again
    unreadable: list[tuple[bytes, str]] = field(default_factory=list)  # payloads no version of a hit reads, and why
    hits: Counter[tuple[str, str]] = field(default_factory=Counter)  # stored hits by (kind, agent verdict)
    store_seconds: float | None = None  # the batch's record_engagements call (None: nothing to store)
    webhooks_queued: bool = False  # the store queued webhook deliveries another process must be woken for
    only_waiting: bool = False  # every hit of the batch waits for its copy: the next try should not come at once


class Recording(Protocol):
    """Where hits are stored: this process (HitRecorder) or a process of its own (RecorderProcess)."""

    async def record(self, payloads: list[bytes]) -> Recorded: ...


def prior_hit(row: Mapping[str, Any]) -> PriorHit:
    """A stored open/click as history for the next verdict. A honeypot click is recognised
    by its `honeypot` reason token, which classify() always writes for one."""
    return PriorHit(
        event_id=row["id"],
        kind="open" if row["name"] == "email.open" else "click",
        at=datetime.fromisoformat(row["at"]).timestamp(),
        ip=row["ip"],
        user_agent=row["user_agent"],
        link=row["link"],
        honeypot="honeypot" in (row["agent_reason"] or "").split(),
        agent=row["agent"] or "human",
    )


class HitRecorder:
    """Stores spooled hits on `store`, each with its verdict, made in the store's write transaction."""

    def __init__(self, settings: Settings, store: EventStore) -> None:
        self.store = store
        self.sends = SendDirectory(store)
        self.forgotten = ForgottenContacts(store)
        self.networks = NetworkLists(network_specs(settings.tracker.network_lists))
        self.policy = AgentPolicy(sent_window_seconds=settings.tracker.sent_window_seconds)
        self._ip_modes = {p.id: p.ip_mode for p in settings.projects}

    async def record(self, payloads: list[bytes]) -> Recorded:
        """Store the hits of these journal records (concurrent ones share the store's commits).

        A copy the store has no row for may still be on its way (a relay's spool, after an outage):
        the hit is spooled again and retried for SEND_WAIT_SECONDS, then left unrecorded (its copy was
        purged or forgotten; the person got the pixel or the page all the same).
        """
        outcome, spooled = Recorded(), []
        for payload in payloads:
            try:
                spooled.append(SpooledHit.decode(decode_record(payload)[1]))
            except (TypeError, KeyError, ValueError, IndexError) as exc:
                outcome.unreadable.append((payload, f"{type(exc).__name__}: {exc}"))
        sends = await self.sends.sends_of([item.claims for item in spooled])  # one store trip for the batch
        now = time.time()
        batch: list[tuple[NewEvent, Judgement | None]] = []
        verdicts: list[tuple[str, list[str]]] = []
        for item, send in zip(spooled, sends, strict=True):
            if send is None:
                if item.missing_since is None or now - item.missing_since < SEND_WAIT_SECONDS:
                    outcome.deferred.append(item.deferred(now))
                else:
                    log.info("hit-unrecorded project=%s kind=%s reason=unknown-send", item.claims.project, item.claims.kind)
                continue
            if await self.forgotten.covers(send.project, send.recipient, send.contact):
                continue  # an erased contact: a legacy token still carries the address; answered, not recorded
            hit = Hit(**{**vars(item.hit), "sent_at": send.sent_at})  # dataclasses.replace: several times this
            agents: list[str] = []  # the verdict's agent, appended when the store judges the hit
            batch.append((self._event(item.claims, send, hit, item.uid), self._judgement(hit, agents)))
            verdicts.append((hit.kind, agents))
        if batch:  # one call for the batch: the store group-commits its hits without a task each
            started = time.perf_counter()
            await self.store.record_engagements(batch)
            outcome.store_seconds = time.perf_counter() - started
        for kind, agents in verdicts:
            outcome.hits[(kind, agents[-1] if agents else "none")] += 1
        outcome.only_waiting = len(outcome.deferred) == len(payloads)
        return outcome

    def _event(self, claims: TrackingClaims, send: TrackedSend, hit: Hit, uid: str) -> NewEvent:
        """The open or click event of a hit on `send`, the copy its token names (`uid`: made at the answer, so replays match)."""
        return NewEvent(
            uid=uid,
            name=f"email.{claims.kind}",
            project=send.project,
            contact=send.contact,
            recipient=send.recipient,
            message_id=send.message_id,
            at=rfc3339(datetime.fromtimestamp(hit.at, UTC)),
            campaign=send.campaign,
            template=send.template,
            template_type=send.template_type,
            campaign_type=send.campaign_type,
            link=claims.link,
            # The verdict saw the full address; the store keeps what the project's ip_mode allows, and
            # a project no longer configured has no ip_mode to honour: keep nothing rather than everything.
            ip=stored_ip(hit.ip, self._ip_modes.get(send.project, IpMode.NONE)),
            user_agent=hit.user_agent,
            tracked=True,
        )

    def _judgement(self, hit: Hit, agents: list[str]) -> Judgement:
        """The verdict on `hit` and the earlier events of its message that it exposes, made by the
        store from the message's recent hits in the transaction that records it (its agent appended to `agents`)."""

        def decide(rows: list[Mapping[str, Any]]) -> Decision:
            recent = [prior_hit(row) for row in rows]
            verdict = classify(hit, networks=self.networks, recent=recent, policy=self.policy)
            agents.append(verdict.agent)
            exposed = relabel(hit, verdict, recent=recent, policy=self.policy)
            return verdict.agent, verdict.reason, {event_id: (v.agent, v.reason) for event_id, v in exposed.items()}

        return Judgement(rfc3339(datetime.fromtimestamp(hit.at - self.policy.lookback_seconds, UTC)), decide)
