"""One accepted SMTP transaction → headers read, tracking decided, copies instrumented, relayed upstream.

The SMTP handler is a thin translator; everything a message goes through lives here, and every
outcome is one SMTP reply plus one structured log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from config.dkim_keys import DkimError, load_key
from config.settings import ProjectSettings, Settings, TrackingEngine, TrackingMode
from config.tracking import TrackingSettings
from monitoring.metrics import FAIL_OPENS, MESSAGES, STORE_SECONDS, TRACKED, timed
from relay import replies
from relay.copies import HeldMessage, InlineCopies, Rendered, ScratchDirectory, discard, discard_when_done, render_copies
from relay.dkim import DkimSigner
from relay.headers import SplitMessage, decoded_header, split_message
from relay.hints import AppHints, Refusal, read_hints, strip_hints
from relay.links import TrackingLinks
from relay.policy import Decision, decide
from relay.senders import from_allowed
from relay.upstream import INLINE_BYTES, DataBody, RecipientResult, Results, Upstream
from store.model import Delivered, DeliveryClaim, EventStore, NewEvent, ProviderCopy, now_rfc3339
from store.spool import Handler, Spool, event_body, event_from_body
from tracking.claims import TrackedSend
from tracking.tokens import TokenKeys, new_send_id

log = logging.getLogger("inflight.relay")
T = TypeVar("T")
Writes = list[tuple[str, "asyncio.Future[None]"]]  # spool records of one attempt not yet known durable: (kind, done)
CLAIM_MARGIN_SECONDS = 60  # a ledger claim outlives send_timeout_seconds by this much
SENDING_ELSEWHERE = RecipientResult(451, "4.4.0 another attempt of this message is being sent now; retry later")
# How long a message waits for the store before the relay step (its project's mode, the ledger
# claim) goes on without it, and how long the messages after a failure go without the store: a
# store that is locked or away must not hold every message (README: Spool).
STORE_WAIT_SECONDS = 2.0
STORE_AWAY_SECONDS = 10.0
# How long a message waits for recipients another node's attempt is sending before it answers 451, and
# its first pause between looks at the ledger (doubling to 0.2 s).
BUSY_WAIT_SECONDS = 1.0
BUSY_POLL_SECONDS = 0.02


class StoreAway(Exception):
    """A store call failed or timed out, now or within STORE_AWAY_SECONDS."""


@dataclass(frozen=True)
class LedgerRows:
    """Recipients of a message the upstream accepted, on their way to the store's ledger through the spool."""

    project: str
    message_id: str
    recipients: list[str]
    expires_at: float  # epoch seconds: the TTL counts from the delivery, not from when the store took it

    @staticmethod
    def key(body: dict[str, Any]) -> str:
        return ledger_key(body["project"], body["message_id"])


@dataclass(frozen=True)
class BouncedAddress:
    """A recipient the upstream refused for good with an addressing status: suppressed through the spool."""

    project: str
    recipient: str
    detail: str


def ledger_key(project: str, message_id: str) -> str:
    return f"{project}\0{message_id}"


def decode_events(body: list[dict[str, Any]]) -> list[NewEvent]:
    return [event_from_body(fields) for fields in body]


def decode_sends(body: list[list[Any]]) -> list[tuple[bytes, TrackedSend]]:
    return [(bytes.fromhex(send_id), TrackedSend(**fields)) for send_id, fields in body]


@dataclass(frozen=True)
class Copy:
    """One upstream transaction: the whole message to several recipients, or one tracked copy."""

    recipients: list[str]
    data: bytes
    # A pixel went out in it (or the provider adds one): what `tracked` means on events and in stats. A tracked
    # send whose HTML could not be instrumented (none, or it failed) goes without one, and is not counted opened.
    pixel: bool
    # Send rows to journal with this copy's ledger row: those its batch's tokens name, with the batch's first copy.
    sends: list[tuple[bytes, TrackedSend]] = field(default_factory=list)
    # Known to be CRLF throughout, so the upstream need not scan it: a copy rendered from a message that is
    # (rendering inserts no other line ending), counted once per message instead of once per copy.
    crlf: bool = False


def recipient_fields(project: ProjectSettings, message_id: str, hints: AppHints, recipient: str) -> dict[str, Any]:
    """What a recipient's tokens and events both carry: one definition, so they can never disagree."""
    return {
        "project": project.id,
        "message_id": message_id,
        "contact": hints.contact or recipient.lower(),
        "recipient": recipient,
        "campaign": hints.campaign,
        "template": hints.template,
        "template_type": hints.send.template_type,
        "campaign_type": hints.send.campaign_type,
    }


class Pipeline:
    def __init__(
        self, *, settings: Settings, upstream: Upstream, store: EventStore, keys: TokenKeys, spool: Spool,
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.store = store
        self.keys = keys
        # What the relay writes once the upstream accepted a message goes through the spool: a store
        # that is away then turns a delivered message into neither a 451 nor a lost row. Its kinds are
        # gathered (delivered at most every GATHER_SECONDS under load): one delivery per message kept
        # SQLite's write lock so busy that the next message's ledger claim waited 5 ms behind it
        # (bench case relay, 50 KB: 1 rcpt tracking off 580 -> 890 msg/s, 5 rcpts tracking on 180 -> 207). Another
        # node reads these ledger rows at most GATHER_SECONDS later, well inside BUSY_WAIT_SECONDS.
        self.spool = spool
        spool.register("ledger", Handler(decode=lambda body: LedgerRows(**body), deliver=self._store_ledger,
                                         key=LedgerRows.key, gather=True))
        spool.register("events", Handler(decode=decode_events, deliver=self._store_events, gather=True))
        spool.register("sends", Handler(decode=decode_sends, deliver=self._store_spooled_sends, gather=True))
        spool.register("provider_ids", Handler(decode=lambda body: body, deliver=self._store_provider_ids, gather=True))
        spool.register("suppressions", Handler(decode=lambda body: [BouncedAddress(**a) for a in body],
                                               deliver=self._store_suppressions))
        self.tracking = TrackingSettings(settings, store)
        self._modes: dict[str, TrackingMode] = {}  # the last mode read per project, for when the store is away
        self._store_away_until = 0.0  # monotonic time until which messages do not wait for the store
        self.dkim = DkimSigner([load_key(k.domain, k.selector, k.private_key_path) for k in settings.dkim])
        self.executor = executor  # CPU-heavy work on large messages; None runs it on the event loop
        # Where large messages and their copies wait as files while the pool works on them.
        self.scratch = ScratchDirectory() if executor is not None else None
        self._sending: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def close(self) -> None:
        """Remove the scratch directory; once the pool stopped, nothing in it is waited for."""
        if self.scratch is not None:
            self.scratch.close()

    async def relay(self, project: ProjectSettings, mail_from: str, recipients: list[str], raw: bytes) -> str:
        """Return the SMTP reply for this transaction; 250 only once the upstream accepted every copy."""
        started = time.monotonic()
        size = len(raw)
        if size >= INLINE_BYTES:
            # Receiving a large message ended with whole-message copies (joining the body, adding the
            # trace field) and more follow here: let other sessions run in between (bench case isolation).
            await asyncio.sleep(0)
        try:
            message = split_message(raw)
            del raw  # the body now lives in `message` alone (README "Memory")
            hints = read_hints(message)
            if hints.project is not None and hints.project != project.id:
                raise Refusal(replies.PROJECT_MISMATCH)
            if hints.contact is not None and len(recipients) > 1:
                raise Refusal(replies.invalid_header("X-Inflight-Contact", "one contact: send one message per recipient"))
            if not from_allowed(message, project.sender_domains):
                raise Refusal(replies.FROM_DOMAIN_REFUSED)
        except Refusal as refusal:
            self._log("refused", project.id, None, recipients, None, size, started, refusal.reply)
            return refusal.reply

        message, message_id = self._with_message_id(strip_hints(message))
        notes: list[str] = []
        pixels: set[str] = set()  # recipients whose copy carried a pixel
        # What this attempt journals after the upstream answered (ledger rows, provider ids, events),
        # appended without waiting and made durable together: one group fsync per message (README: Spool).
        writes: Writes = []
        async with self._one_attempt_at_a_time(project.id, message_id):
            # The project's mode and the ledger's claim are independent reads of the store: asked
            # together, a message waits for one trip to the store's thread instead of two in a row.
            claiming = asyncio.ensure_future(self._claim(project.id, message_id, recipients))
            try:
                mode = await self._mode(project)
            except Exception:
                # Guessing a mode could track a project that turned tracking off: defer instead.
                log.exception("tracking-settings-unreadable project=%s", project.id)
                with contextlib.suppress(Exception):  # a claim not given back (the store is away) expires by itself
                    await self._release(project.id, message_id, sorted((await claiming).claimed))
                self._log("deferred", project.id, message_id, recipients, None, size, started, replies.SETTINGS_UNAVAILABLE)
                return replies.SETTINGS_UNAVAILABLE
            decision = decide(mode, hints.send, allow_override=project.allow_tracking_override)
            if self.settings.upstream.tracking_engine is TrackingEngine.PROVIDER:
                decision = replace(decision, reason=f"{decision.reason} engine=provider")
            message = self._with_configuration_set(message, decision)
            data = HeldMessage(message.to_bytes())  # held, not bound: the CPU pool may take it to a file (README "Memory")
            message = replace(message, body=b"")  # events and checks read its header fields; the bytes to send are `data`
            claim = await claiming
            sent_before = claim.delivered
            pending = [r for r in recipients if r.lower() in claim.claimed]
            try:
                results = await self._send(mail_from, pending, message, data, hints, project, message_id, decision, notes,
                                           pixels, writes)
            except DkimError as exc:
                await self._release(project.id, message_id, pending)
                reply = replies.unsignable(str(exc))
                self._log("refused", project.id, message_id, recipients, decision, size, started, reply)
                return reply
            release = self._release(project.id, message_id, [r for r in pending if not results[r].accepted])
            reply, outcome = self._outcome(recipients, pending, claim, results, message, message_id, project, hints,
                                           decision, pixels, writes)
            # Inside the lock: a retry waiting for it answers `already-sent` from these rows only once
            # they are on disk. The store's release and the disk's fsync run at the same time.
            await asyncio.gather(release, self._durable(writes, message_id))
        if decision.tracked and pending and not pixels:
            decision = replace(decision, tracked=False, reason=self._sent_reason(decision, pixel=False))
        self._log(outcome, project.id, message_id, recipients, decision, size, started,
                  f"{reply} sent_before={len(sent_before)} {' '.join(notes)}".strip())
        return reply

    def _outcome(
        self,
        recipients: list[str],
        pending: list[str],
        claim: DeliveryClaim,
        results: Results,
        message: SplitMessage,
        message_id: str,
        project: ProjectSettings,
        hints: AppHints,
        decision: Decision,
        pixels: set[str],
        writes: Writes,
    ) -> tuple[str, str]:
        """The reply and outcome for what the upstream answered; its events journalled into `writes`."""
        busy = [r for r in recipients if r.lower() in claim.busy]  # another node is sending them right now
        results.update(dict.fromkeys(busy, SENDING_ELSEWHERE))
        pending += busy
        accepted = [r for r in pending if results[r].accepted]
        sent = len(recipients) - len(pending) + len(accepted)
        failed = {r: (results[r].code, results[r].text) for r in pending if not results[r].accepted}
        temporary = {r: verdict for r, verdict in failed.items() if 400 <= verdict[0] < 500}
        self._record("email.sent", accepted, message, message_id, project, hints, decision, results, pixels, writes)
        if temporary:
            # Some recipient may still get it: the app must retry; the ledger keeps the retry from resending.
            if all(results[r].unreachable for r in temporary):
                reply = replies.upstream_unavailable(results[next(iter(temporary))].text.partition("unreachable: ")[2])
            else:
                reply = replies.upstream_failures(temporary, len(recipients), temporary=True, sent=sent)
            outcome = "deferred"
        elif failed:
            self._record("email.bounce", list(failed), message, message_id, project, hints, decision, results, pixels, writes)
            self._suppress_bad_mailboxes(project.id, failed, writes)
            if sent:
                reply = replies.partially_accepted(message_id, sent, len(recipients), failed)
                outcome = "partial"
            else:
                reply = replies.upstream_failures(failed, len(recipients), temporary=False)
                outcome = "refused"
        else:
            reply = replies.accepted(message_id, len(recipients))
            outcome = "queued" if pending else "already-sent"
        return reply, outcome

    @contextlib.asynccontextmanager
    async def _one_attempt_at_a_time(self, project: str, message_id: str) -> AsyncIterator[None]:
        """An app retrying while its first attempt still runs waits for it, then sees its ledger rows."""
        key = (project, message_id)
        lock, users = self._sending.get(key, (asyncio.Lock(), 0))
        self._sending[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._sending[key]
            if users == 1:
                del self._sending[key]
            else:
                self._sending[key] = (lock, users - 1)

    async def use_store(self, call: Callable[[], Awaitable[T]]) -> T:
        """A store call waited for at most STORE_WAIT_SECONDS; after one failed, the next messages
        skip the store for STORE_AWAY_SECONDS instead of each waiting out the bound again.

        The call is shielded, not cancelled: a store write cut mid-transaction could leave the
        connection inside it. One that finishes late just finishes.
        """
        if time.monotonic() < self._store_away_until:
            raise StoreAway
        task = asyncio.ensure_future(call())
        try:
            return await asyncio.wait_for(asyncio.shield(task), STORE_WAIT_SECONDS)
        except ValueError:
            raise  # the store answered, with something unusable (a mode edited by hand): it is not away
        except Exception as exc:
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
            self._store_away_until = time.monotonic() + STORE_AWAY_SECONDS
            log.warning("store-unavailable error=%s; messages go without the store for %g s (README: Spool)",
                        type(exc).__name__, STORE_AWAY_SECONDS)
            raise StoreAway from exc

    async def _mode(self, project: ProjectSettings) -> TrackingMode:
        """The project's mode now; while the store cannot be read, the last mode read from it."""
        try:
            mode = await self.use_store(lambda: self.tracking.mode(project))
        except StoreAway:
            known = self._modes.get(project.id)
            if known is None:
                raise
            return known
        self._modes[project.id] = mode
        return mode

    async def _claim(self, project: str, message_id: str, recipients: list[str]) -> DeliveryClaim:
        """The ledger's answer for each recipient: ours to send, sent before, or being sent by another
        attempt (another relay node). The claim outlives the longest an attempt may send.

        Recipients this relay delivered whose ledger rows are still in its spool count as sent, whatever
        the store says (it may be away, or hold our own claim still): a retry never sends them twice.
        """
        spooled = {r for rows in self.spool.pending(ledger_key(project, message_id)) for r in rows.recipients}
        lease = int(self.settings.upstream.send_timeout_seconds) + CLAIM_MARGIN_SECONDS
        try:
            claim = await self.use_store(lambda: self.store.claim_deliveries(project, message_id, recipients, lease_seconds=lease))
            # Busy: another node's attempt holds them. One that has just answered its app still holds
            # them until its spool stored its ledger rows, moments later: an app retrying at once (its
            # reply was lost) gets `already-sent` after that short wait rather than a 451.
            pause, waited = BUSY_POLL_SECONDS, 0.0
            while claim.busy - spooled and waited < BUSY_WAIT_SECONDS:
                await asyncio.sleep(pause)
                waited, pause = waited + pause, min(pause * 2, 0.2)
                again = await self.use_store(functools.partial(self.store.claim_deliveries, project, message_id,
                                                               sorted(claim.busy - spooled), lease_seconds=lease))
                claim = DeliveryClaim(claimed=claim.claimed | again.claimed, delivered=claim.delivered | again.delivered,
                                      busy=again.busy | (claim.busy & spooled))
        except StoreAway:
            # Without the store's ledger, a retry of a message sent through another node could go twice;
            # refusing all mail while the store is away would be worse.
            wanted = {r.lower() for r in recipients}
            return DeliveryClaim(claimed=wanted - spooled, delivered=wanted & spooled, busy=set())
        return DeliveryClaim(claimed=claim.claimed - spooled, delivered=claim.delivered | (spooled & {r.lower() for r in recipients}),
                             busy=claim.busy - spooled)

    async def _release(self, project: str, message_id: str, recipients: list[str]) -> None:
        """Give back the claims of recipients not accepted, so the app's retry may send them at once."""
        if not recipients:
            return
        with contextlib.suppress(StoreAway):  # logged; the claims expire by themselves
            await self.use_store(lambda: self.store.release_deliveries(project, message_id, recipients))

    async def _send(
        self,
        mail_from: str,
        pending: list[str],
        message: SplitMessage,
        data: HeldMessage,
        hints: AppHints,
        project: ProjectSettings,
        message_id: str,
        decision: Decision,
        notes: list[str],
        pixels: set[str],
        writes: Writes,
    ) -> Results:
        """Every copy upstream, each accepted recipient written to the ledger before the next copy can be taken.

        A copy's send row (a tracked copy), ledger row and provider id are journalled into `writes` as
        soon as the upstream answered, and are on disk, in one group, before the upstream can take the
        next copy: its envelope goes while the disk writes, the end of its body waits (README: Spool).
        The last copy's wait for the disk is left to the caller, which adds the message's events to
        the same group.

        Raises DkimError when the first copy cannot be signed (nothing was sent).
        """
        results: Results = {}
        if not pending:
            return results
        upstream = self.settings.upstream
        try:
            async with asyncio.timeout(upstream.send_timeout_seconds):
                copies = self._copies(message, data, pending, hints, project, message_id, decision, notes)
                async with contextlib.aclosing(copies):
                    async for copy in copies:
                        # A crash after the upstream took this copy must not resend the copies before: their
                        # rows are on disk before it can (its final dot); its envelope goes meanwhile.
                        try:
                            outcome = await self.upstream.send(mail_from, copy.recipients, copy.data, ready=self._written(writes),
                                                               crlf=copy.crlf)
                        finally:  # also when cut by the send timeout: the upstream may have taken it (RFC 1047)
                            if copy.sends:
                                self._store_sends(copy.sends, writes)
                        results.update(outcome)
                        if copy.pixel:
                            pixels.update(copy.recipients)
                        self._remember(project.id, message_id, [r for r, v in outcome.items() if v.accepted], writes)
                        self._remember_provider_ids(project.id, message_id, outcome, writes)
                        if all(v.unreachable for v in outcome.values()):
                            # The remaining copies would meet the same closed door: they wait for the retry.
                            return {**dict.fromkeys(pending, next(iter(outcome.values()))), **results}
                        del copy  # sent: not held while the next copy is prepared (README "Memory")
        except DkimError as exc:
            if not results:
                raise
            # Copies are signed alike, so this cannot follow a signed one; if it ever does, say so.
            unsignable = RecipientResult(554, f"5.6.0 cannot be DKIM-signed: {exc}")
            return {**dict.fromkeys(pending, unsignable), **results}
        except TimeoutError:
            log.warning("send-timeout message_id=%s after=%ss", message_id, upstream.send_timeout_seconds)
            timed_out = RecipientResult(451, f"4.4.7 upstream did not finish within {upstream.send_timeout_seconds:g} s")
            return {**dict.fromkeys(pending, timed_out), **results}
        return results

    def _remember(self, project: str, message_id: str, recipients: list[str], writes: Writes) -> None:
        if not recipients:
            return
        expires_at = time.time() + self.settings.upstream.ledger_ttl_hours * 3600
        rows = LedgerRows(project, message_id, [r.lower() for r in recipients], expires_at)
        writes.append(("ledger", self.spool.append("ledger", vars(rows))))

    @staticmethod
    def _written(writes: Writes) -> asyncio.Future[None] | None:
        """A future done once every record in `writes` is on disk (or failed), None when they all are.
        Cancelling it cancels none of them: the caller's `_durable` still waits for them before the reply."""
        waiting = [done for _, done in writes if not done.done()]
        if not waiting:
            return None
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def one_done(_: asyncio.Future[None]) -> None:
            waiting.pop()
            if not waiting and not written.done():
                written.set_result(None)

        for done in list(waiting):
            done.add_done_callback(one_done)
        return written

    @staticmethod
    async def _durable(writes: Writes, message_id: str) -> None:
        """Wait until the records journalled into `writes` are on disk: appended in one go, they share
        one group fsync. A spool record is visible to `pending()` from its append on. Waiting is not
        cancelling: a send timeout that cuts this wait leaves the records to be waited for again."""
        if not writes:
            return
        await asyncio.wait([done for _, done in writes])
        for kind, done in writes:
            Pipeline._durable_or_logged(kind, done, message_id)
        writes.clear()

    async def _store_ledger(self, rows: list[LedgerRows]) -> None:
        """A batch of the spool's ledger rows, of many messages: one store call."""
        now = time.time()
        await self.store.record_delivered([Delivered(row.project, row.message_id, row.recipients, int(row.expires_at) + 1)
                                           for row in rows if row.expires_at > now])

    async def _store_spooled_sends(self, batches: list[list[tuple[bytes, TrackedSend]]]) -> None:
        await self.store.record_sends([send for sends in batches for send in sends])

    async def _store_provider_ids(self, copies: list[dict[str, Any]]) -> None:
        await self.store.record_provider_ids([(found, ProviderCopy(copy["project"], copy["message_id"], recipient))
                                              for copy in copies for found, recipients in copy["ids"].items()
                                              for recipient in recipients])

    async def _store_suppressions(self, batches: list[list[BouncedAddress]]) -> None:
        for address in (address for addresses in batches for address in addresses):
            await self.store.suppress(address.project, address.recipient, reason="bounce", detail=address.detail)

    async def _store_events(self, batches: list[list[NewEvent]]) -> None:
        with timed(STORE_SECONDS, "record"):
            await self.store.record([event for events in batches for event in events])

    def _suppress_bad_mailboxes(self, project: str, failed: dict[str, tuple[int, str]], writes: Writes) -> None:
        """A permanent refusal with an addressing status (5.1.x, RFC 3463: no such mailbox, bad
        domain, ...) is a permanent bounce: suppress the address. Other 5xx (content, policy) are not
        the address's fault."""
        bounced = [BouncedAddress(project, recipient, f"{code} {text}") for recipient, (code, text) in failed.items()
                   if 500 <= code < 600 and _ADDRESSING_STATUS.match(text)]
        if bounced:
            writes.append(("suppressions", self.spool.append("suppressions", [vars(address) for address in bounced])))

    def _remember_provider_ids(self, project: str, message_id: str, outcome: Results, writes: Writes) -> None:
        """Keep the upstream's own id of an accepted copy (SES: `250 Ok <id>`): its feedback names that id."""
        by_id: dict[str, list[str]] = {}
        for recipient, result in outcome.items():
            if result.accepted and (found := provider_id(result.text)) is not None:
                by_id.setdefault(found, []).append(recipient)
        if by_id:
            writes.append(("provider_ids", self.spool.append("provider_ids",
                                                             {"project": project, "message_id": message_id, "ids": by_id})))

    def _with_message_id(self, message: SplitMessage) -> tuple[SplitMessage, str]:
        """The message with a Message-ID (one is made when the app sent none), and that id."""
        message_id = (message.get("Message-ID") or "").strip().strip("<>")
        if not message_id:
            message_id = f"{uuid.uuid4().hex}@{self.settings.relay.hostname}"
            message = message.with_field("Message-ID", f"<{message_id}>")
        return message, message_id

    def _with_configuration_set(self, message: SplitMessage, decision: Decision) -> SplitMessage:
        upstream = self.settings.upstream
        if upstream.owns_configuration_set:
            # The relay alone chooses the set: an app's own header could name a set that tracks.
            header = upstream.configuration_set_header.lower()
            message = message.without(lambda name: name == header)
            configuration_set = upstream.configuration_set if decision.tracked else upstream.no_tracking_configuration_set
            if configuration_set:
                message = message.with_field(upstream.configuration_set_header, configuration_set)
        return message

    async def _copies(
        self,
        message: SplitMessage,
        held: HeldMessage,
        recipients: list[str],
        hints: AppHints,
        project: ProjectSettings,
        message_id: str,
        decision: Decision,
        notes: list[str],
    ) -> AsyncGenerator[Copy, None]:
        """Tracked mail goes as one copy per recipient, each with its own tokens; other mail as one transaction.

        Every copy is DKIM-signed last, over its final bytes. Copies are prepared in small batches
        as they are sent, so memory holds a batch, not N copies of a 25 MB message; large messages
        are parsed, rewritten and signed in the CPU pool, off the event loop.
        """
        if not decision.tracked or self.settings.upstream.tracking_engine is TrackingEngine.PROVIDER:
            # The provider's configuration set adds pixel and links when it tracks.
            notes.append("untracked" if not decision.tracked else "provider-tracks")
            data = await held.read()
            yield Copy(recipients, await self._offload(data, self.dkim.sign, data), pixel=decision.tracked)
            return
        sent_at = int(time.time())
        sends = [(new_send_id(), TrackedSend(sent_at=sent_at, **recipient_fields(project, message_id, hints, recipient)))
                 for recipient in recipients]
        tokens, base_url = self.keys.project(project.id), self.settings.tracking_base(project)
        minters = [
            TrackingLinks(
                tokens=tokens,
                base_url=base_url,
                send_id=send_id,
                own_hosts=frozenset(project.tracking_hosts),
                honeypot=project.honeypot_link,
                exclude_click_domains=project.exclude_click_domains,
            )
            for send_id, _ in sends
        ]
        batch = max(1, INLINE_BYTES // max(held.size, 1))
        pooled = self.executor is not None and held.size >= INLINE_BYTES
        if pooled:
            assert self.scratch is not None  # made with the pool
            await held.spill(self.scratch.path)  # the pool reads it there; the relay holds it no more
        crlf = held.path is None and await DataBody.scan(await held.read())
        try:
            async with contextlib.aclosing(self._tracked(held, recipients, minters, batch, sends, message, message_id, project,
                                                         notes, crlf)) as copies:
                async for copy in copies:
                    yield copy
                    del copy  # sent: not held while the next batch renders
        finally:
            held.discard()

    async def _tracked(
        self,
        held: HeldMessage,
        recipients: list[str],
        minters: list[TrackingLinks],
        batch: int,
        sends: list[tuple[bytes, TrackedSend]],
        message: SplitMessage,
        message_id: str,
        project: ProjectSettings,
        notes: list[str],
        crlf: bool,
    ) -> AsyncGenerator[Copy, None]:
        """The tracked copies, a batch rendered at a time; the message untouched when it has nothing to track."""
        inline = InlineCopies(await held.read(), minters, self.dkim) if self.executor is None or held.size < INLINE_BYTES else None
        for start in range(0, len(recipients), batch):
            batch_minters = minters[start:start + batch]
            rendered = inline.render(batch_minters) if inline is not None else await self._pooled(held, batch_minters)
            try:
                for offset, copy in enumerate(rendered):
                    result = copy.result
                    if result.outcome != "instrumented":
                        # Nothing to track in this message (no HTML, or it failed): send it as is, once.
                        if result.outcome == "failed":
                            FAIL_OPENS.labels(project.id).inc()
                            log.warning("instrument-failed message_id=%s reason=%s", message_id, result.reason)
                        notes.append(f"instrument={result.outcome} ({result.reason})")
                        data = await held.read()
                        yield Copy(recipients[start + offset:], await self._offload(data, self.dkim.sign, data), pixel=False,
                                   crlf=crlf)
                        return
                    if start + offset == 0:
                        notes.append("instrumented")
                        for why in result.untrackable:
                            log.warning("link-untracked message_id=%s reason=%r", message_id, why)
                        for domain in self.dkim.foreign_signatures(message):
                            log.warning("dkim-broken message_id=%s domain=%s detail='tracking rewrote a message the app "
                                        "signed; configure [[dkim]] for this domain or turn tracking off for these sends'",
                                        message_id, domain)
                    # Read from its file in a thread: 30 MB from the page cache would hold the event loop.
                    yield Copy([recipients[start + offset]], copy.read() if copy.path is None else await asyncio.to_thread(copy.read),
                               pixel=True, sends=sends[start:start + len(rendered)] if offset == 0 else [], crlf=crlf)
            finally:
                discard(rendered)  # the files of copies not sent (a failure or time-out cut the batch short)

    def _store_sends(self, sends: list[tuple[bytes, TrackedSend]], writes: Writes) -> None:
        """Journal the send rows a batch's tokens name (the tracker reads them when it records their hits)
        once the upstream answered its first copy, into `writes`: on disk in the group of that copy's ledger
        row, not in a group (and fsync) of their own, and before the next copy can be taken. A crash that
        loses them loses that ledger row too, so the app's retry sends the copy again with new tokens
        (README: Spool)."""
        writes.append(("sends", self.spool.append("sends", [[send_id.hex(), vars(send)] for send_id, send in sends])))

    @staticmethod
    def _durable_or_logged(kind: str, done: asyncio.Future[None], message_id: str) -> None:
        if not done.cancelled() and isinstance(done.exception(), OSError):
            # The disk refused it: logged by the spool, and the rows still reach the store from memory.
            log.warning("spool-not-durable kind=%s message_id=%s", kind, message_id)

    async def _offload(self, data: bytes, work: Callable[..., T], *args: Any) -> T:
        """Run `work` in the CPU pool when `data` is large; small messages cost a few ms, done in place."""
        if self.executor is None or len(data) < INLINE_BYTES:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    async def _pooled(self, held: HeldMessage, minters: list[TrackingLinks]) -> list[Rendered]:
        """A batch's copies from the CPU pool as files (relay/copies.py), removed even when nobody waits for them any more."""
        message = held.path or await held.read()  # the file's name when it was spilled, else the bytes (pickled)
        assert self.executor is not None and self.scratch is not None  # made with the pool
        job = self.executor.submit(render_copies, message, minters, self.dkim, directory=self.scratch.path)
        del message
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # a send time-out: the pool still finishes, and its files must go
            job.add_done_callback(discard_when_done)
            raise

    def _record(
        self,
        name: str,
        recipients: list[str],
        message: SplitMessage,
        message_id: str,
        project: ProjectSettings,
        hints: AppHints,
        decision: Decision,
        results: Results,
        pixels: set[str],
        writes: Writes,
    ) -> None:
        """`email.sent` per recipient the upstream accepted; `email.bounce` per recipient it refused for good."""
        if not recipients:
            return
        at = now_rfc3339()
        subject = decoded_header(message.get("Subject"))
        sender = decoded_header(message.get("From"))
        events = [
            NewEvent(
                name=name,
                at=at,
                **recipient_fields(project, message_id, hints, recipient),
                subject=subject,
                sender=sender,
                tracked=recipient in pixels,
                reason=self._sent_reason(decision, pixel=recipient in pixels) if name == "email.sent"
                else f"{results[recipient].code} {results[recipient].text}",
            )
            for recipient in recipients
        ]
        writes.append(("events", self.spool.append("events", [event_body(event) for event in events])))

    @staticmethod
    def _sent_reason(decision: Decision, pixel: bool) -> str:
        """The decision's reason; `pixel=none` when it said tracked but the copy had nothing to put a pixel in."""
        return f"{decision.reason} pixel=none" if decision.tracked and not pixel else decision.reason

    @staticmethod
    def _log(
        outcome: str,
        project: str,
        message_id: str | None,
        recipients: list[str],
        decision: Decision | None,
        size: int,
        started: float,
        detail: str,
    ) -> None:
        tracking = decision.describe() if decision else "tracked=false"
        MESSAGES.labels(project, outcome).inc()
        if decision is not None:
            TRACKED.labels(project, "true" if decision.tracked else "false").inc()
        log.info(
            "outcome=%s project=%s message_id=%s recipients=%d %s bytes=%d ms=%.1f detail=%r",
            outcome, project, message_id, len(recipients), tracking, size, (time.monotonic() - started) * 1000, detail,
        )


# The id an upstream gives an accepted message in its final reply: Amazon SES "Ok <id>"
# (its SMTP interface), Postfix and most MTAs "queued as <id>".
_PROVIDER_ID = re.compile(r"^(?:\d\.\d\.\d+ )?Ok:? (?=\S*\d)([\w.@<>-]{6,})$|queued as <?([\w.@-]{4,})>?", re.IGNORECASE)


_ADDRESSING_STATUS = re.compile(r"\s*5\.1\.\d{1,3}\b")


def provider_id(reply_text: str) -> str | None:
    """The upstream's id for the message in its reply to DATA, when it gives one."""
    match = _PROVIDER_ID.search(reply_text.strip())
    return (match.group(1) or match.group(2)).strip("<>") if match else None
