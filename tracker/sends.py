"""Who a tracked copy went to, looked up by the send id its opaque tokens carry.

The tokens name a copy, not a person (tracking/tokens.py), so recording an open or a click reads
the copy's row from the store; the answer to the hit never needs it. Hits of one copy come in
bursts (a scanner, then the pixel and a click of one reading), so rows are cached briefly: for
at most CACHE_SECONDS, so that `inflight contacts forget` (another process) takes effect soon.
Hits recorded together are looked up together: one store trip per batch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from store.model import Sends
from tracking.claims import TrackedSend, TrackingClaims

CACHED_SENDS = 16_384  # a few MB
CACHE_SECONDS = 300.0


class SendDirectory:
    def __init__(self, store: Sends, *, size: int = CACHED_SENDS) -> None:
        self._store = store
        self._size = size
        self._cache: OrderedDict[tuple[str, bytes], tuple[float, TrackedSend]] = OrderedDict()

    async def sends_of(self, claims: Sequence[TrackingClaims]) -> list[TrackedSend | None]:
        """The copy behind each of `claims` (None when the store has no row for it: past retention, forgotten),
        with one store read for all those not cached."""
        now = time.monotonic()
        found: dict[tuple[str, bytes], TrackedSend] = {}
        missing: list[tuple[str, bytes]] = []
        for claim in claims:
            if claim.send is None and claim.send_id is not None:  # a legacy token carries its send
                key = (claim.project, claim.send_id)
                cached = self._cache.get(key)
                if cached is not None and now - cached[0] < CACHE_SECONDS:
                    found[key] = cached[1]
                else:
                    missing.append(key)
        if missing:
            stored = await self._store.tracked_sends(sorted(set(missing)))
            for key in missing:
                self._cache.pop(key, None)  # an unknown id is not cached: hostile ids cost no memory
            for key, send in stored.items():
                found[key] = send
                self._cache[key] = (now, send)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return [claim.send if claim.send is not None or claim.send_id is None else found.get((claim.project, claim.send_id))
                for claim in claims]
