"""What a tracking token stands for: the copy it was minted for, its kind and its link."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrackedSend:
    """Who and what one tracked copy is about: stored once per copy (the store's `sends`), named by its tokens."""

    project: str
    message_id: str
    contact: str
    recipient: str
    sent_at: int  # epoch seconds, for timing-based machine detection
    campaign: str | None = None
    template: str | None = None
    template_type: str | None = None
    campaign_type: str | None = None


@dataclass(frozen=True)
class TrackingClaims:
    """A verified token. An opaque token names its copy by `send_id` (resolved from the store when the
    event is recorded, never before the answer); a legacy token carried the copy's `send` itself."""

    kind: str  # "open" | "click"
    project: str
    send_id: bytes | None = None
    link: str | None = None
    # The invisible trap link (project honeypot_link): no destination, and a click on it
    # is a machine by construction (tracker/agents.py).
    honeypot: bool = False
    send: TrackedSend | None = None
