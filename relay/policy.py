"""Is this send tracked? Plunk's tracking semantics as one pure decision.

The rules come from the product page (shared/seed-tracking.md) and Plunk's own code
(shared/plunk-reference.md): ENABLED tracks every send, DISABLED none, MARKETING_ONLY every
send that is not transactional. Tracking is all or nothing per send.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from config.settings import TrackingMode


class TemplateType(StrEnum):
    """Plunk uses one enum for a template's type and a campaign's type."""

    TRANSACTIONAL = "TRANSACTIONAL"
    MARKETING = "MARKETING"
    HEADLESS = "HEADLESS"


@dataclass(frozen=True)
class Send:
    """What the app told us about one send, through X-Inflight-* headers."""

    template_type: TemplateType | None = None
    campaign_type: TemplateType | None = None
    override: bool | None = None  # X-Inflight-Tracking: on | off


@dataclass(frozen=True)
class Decision:
    tracked: bool
    reason: str  # key=value words, written to the log line and the email.sent events

    def describe(self) -> str:
        return f"tracked={'true' if self.tracked else 'false'} {self.reason}"


def is_transactional(send: Send) -> bool:
    """Transactional per the page: a TRANSACTIONAL template or campaign.

    A send with neither type is treated as transactional: that is a plain `/v1/send` in Plunk,
    and the conservative reading for privacy (plunk-reference.md).
    """
    types = (send.template_type, send.campaign_type)
    if TemplateType.TRANSACTIONAL in types:
        return True
    return send.template_type is None and send.campaign_type is None


def decide(mode: TrackingMode, send: Send, *, allow_override: bool = True) -> Decision:
    """Decide tracking for one send.

    The per-email override beats the mode both ways (Plunk's `tracking: true|false`), except
    that a project with `allow_tracking_override = false` cannot be forced *into* tracking:
    an operator who chose privacy must not be overruled by an app header. Turning tracking
    off is always honoured, since it only ever removes tracking.
    """
    words = [f"mode={mode.value}"]
    if send.template_type is not None:
        words.append(f"template_type={send.template_type.value}")
    if send.campaign_type is not None:
        words.append(f"campaign_type={send.campaign_type.value}")

    if send.override is False:
        return Decision(False, " ".join([*words, "override=off"]))
    if send.override is True:
        if allow_override:
            return Decision(True, " ".join([*words, "override=on"]))
        words.append("override=on-refused")

    if mode is TrackingMode.ENABLED:
        tracked = True
    elif mode is TrackingMode.DISABLED:
        tracked = False
    else:
        tracked = not is_transactional(send)
        if send.template_type is None and send.campaign_type is None:
            words.append("untyped=transactional")
    return Decision(tracked, " ".join(words))
