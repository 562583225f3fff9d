"""Who a tracked copy went to, looked up by the send id its opaque tokens carry.

The tokens name a copy, not a person (tracking/tokens.py), so recording an open or a click reads
the copy's row from the store; the answer to the hit never waits on it. Hits of one copy come in
bursts (a scanner, then the pixel and a click of one reading), so rows are cached briefly: for
at most CACHE_SECONDS, so that `inflight contacts forget` (another process) takes effect soon.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from store.model import Sends
from tracking.claims import TrackedSend, TrackingClaims

CACHED_SENDS = 16_384  # a few MB
CACHE_SECONDS = 300.0


class SendDirectory:
    def __init__(self, store: Sends, *, size: int = CACHED_SENDS) -> None:
        self._store = store
        self._size = size
        self._cache: OrderedDict[tuple[str, bytes], tuple[float, TrackedSend]] = OrderedDict()

    async def send_of(self, claims: TrackingClaims) -> TrackedSend | None:
        """The copy behind verified claims; None when the store has no row for it (past retention, forgotten)."""
        if claims.send is not None or claims.send_id is None:
            return claims.send  # a legacy token carries its send
        key = (claims.project, claims.send_id)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        send = await self._store.tracked_send(*key)
        if send is None:  # not cached: hostile ids cost no memory
            self._cache.pop(key, None)
            return None
        self._cache[key] = (now, send)
        self._cache.move_to_end(key)
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return send
