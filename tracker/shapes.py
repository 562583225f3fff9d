"""The public JSON of events and stats, shared by the events API, the stats API and webhooks.

The store returns rows and counts (store/model.py); their public shape is the API's business,
so every backend answers the same and the shape changes in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from store.model import EngagementCounts, StatsCounts, StatsQuery

_BOOLEANS = ("tracked", "first", "implied")
# Counters belong to the event they count; a sent event has neither, an open no `clicks`.
_ENGAGEMENT = {"email.open": ("opens", "first", "implied"), "email.click": ("clicks", "first")}


def event_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row in the public shape shared by the events API and webhooks."""
    event = dict(row)
    event["from"] = event.pop("sender")
    event.pop("uid", None)  # the caller's retry key, not part of the public event
    applicable = _ENGAGEMENT.get(event["name"], ())
    for key in ("opens", "clicks", "first", "implied"):
        value = event.pop(key)
        if key in applicable:
            event[key] = value
    for key in _BOOLEANS:
        if event.get(key) is not None:
            event[key] = bool(event[key])
    return event


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def stats_json(query: StatsQuery, counts: StatsCounts) -> dict[str, Any]:
    """The /v1/stats response: the counts, and rates over tracked sends (None when nothing was tracked)."""

    def engagement(kind: EngagementCounts) -> dict[str, Any]:
        return {
            "unique": kind.unique,
            "total": kind.total,
            "unique_human": kind.unique_human,
            "total_human": kind.total_human,
            "rate": _rate(kind.unique, counts.tracked),
            "rate_human": _rate(kind.unique_human, counts.tracked),
        }

    return {
        "project": query.project,
        "campaign": query.campaign,
        "template": query.template,
        "since": query.since,
        "sent": counts.sent,
        "delivered": counts.delivered,
        "tracked": counts.tracked,
        "opens": engagement(counts.opens),
        "clicks": engagement(counts.clicks),
        "links": [
            {"link": link.link, "unique": link.unique, "total": link.total,
             "unique_human": link.unique_human, "total_human": link.total_human}
            for link in counts.links
        ],
    }
