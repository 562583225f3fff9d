"""A hit as the tracker spools it: what the answer knew (the verified claims, the request), nothing the store knows.

The copy an opaque token names is looked up in the store only when the spool delivers the hit
(README: Spool), so the answer never waits on it; the event's uid is made at the answer, so a
replayed hit is stored once.
"""

from __future__ import annotations

import itertools
import os
import secrets
from dataclasses import dataclass
from typing import Any

from tracker.agents import Hit
from tracking.claims import TrackedSend, TrackingClaims


class _Uids:
    """Event uids as uuid4().hex spells them (32 hex digits), without a getrandom call per hit: 16 random
    digits per process (drawn again in a forked worker: no getpid call per hit), then a counter.
    Unique while no two processes draw the same 64 random bits."""

    def __init__(self) -> None:
        self.draw()
        os.register_at_fork(after_in_child=self.draw)

    def draw(self) -> None:
        self._prefix, self._counter = secrets.token_hex(8), itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_uid = _Uids()


@dataclass(frozen=True)
class SpooledHit:
    claims: TrackingClaims
    hit: Hit  # sent_at unset: it comes with the copy, from the store
    uid: str
    missing_since: float | None  # when the store first had no row for the copy (it may still be on its way)

    @staticmethod
    def body(claims: TrackingClaims, hit: Hit) -> dict[str, Any]:
        """The journal body of a new hit."""
        # vars(), not asdict(): no deep copy on the hot path (the copies' fields are plain values).
        send = vars(claims.send) if claims.send is not None else None
        send_id = claims.send_id.hex() if claims.send_id is not None else None
        return {"claims": {**vars(claims), "send_id": send_id, "send": send}, "hit": vars(hit), "uid": new_uid()}

    @staticmethod
    def decode(body: dict[str, Any]) -> SpooledHit:
        fields = dict(body["claims"])
        send_id, send = fields.pop("send_id"), fields.pop("send")
        claims = TrackingClaims(**fields, send_id=bytes.fromhex(send_id) if send_id is not None else None,
                                send=TrackedSend(**send) if send is not None else None)
        return SpooledHit(claims, Hit(**body["hit"]), body["uid"], body.get("missing_since"))

    def deferred(self, now: float) -> dict[str, Any]:
        """The body to spool again while the copy's row is not in the store yet."""
        body = SpooledHit.body(self.claims, self.hit)
        return {**body, "uid": self.uid, "missing_since": self.missing_since or now}
