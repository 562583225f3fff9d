"""Instrument a message: route HTML links through tracked URLs and add the open pixel.

Interim implementation for the spine (stdlib re-serialisation); the byte-exact walker
replaces it. The interface — plan once per message, render once per recipient — is fixed.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from typing import Literal, Protocol

from relay.rewrite import rewrite_html


class LinkMinter(Protocol):
    def click_url(self, destination: str) -> str | None: ...
    def pixel_url(self) -> str: ...
    def honeypot_url(self) -> str | None: ...
    def is_tracking_url(self, url: str) -> bool: ...


@dataclass(frozen=True)
class Instrumented:
    data: bytes
    outcome: Literal["instrumented", "untouched", "failed"]
    reason: str
    links: int


class InstrumentationPlan:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def render(self, minter: LinkMinter) -> Instrumented:
        try:
            message = email.message_from_bytes(self.raw, policy=email.policy.SMTP)
            links = 0
            changed = False
            for part in message.walk():
                if part.get_content_type() != "text/html" or part.get_content_disposition() == "attachment":
                    continue
                result = rewrite_html(part.get_content(), minter)
                links += result.links
                cte = part.get("Content-Transfer-Encoding", "7bit").lower()
                part.set_content(result.html, subtype="html", charset=part.get_content_charset() or "utf-8",
                                 cte="quoted-printable" if cte == "7bit" else cte)
                changed = True
        except Exception as exc:
            return Instrumented(self.raw, "failed", f"{type(exc).__name__}: {exc}", 0)
        if not changed:
            return Instrumented(self.raw, "untouched", "no html part", 0)
        return Instrumented(message.as_bytes(), "instrumented", "instrumented", links)


def plan_instrumentation(raw: bytes) -> InstrumentationPlan:
    return InstrumentationPlan(raw)


def instrument_message(raw: bytes, minter: LinkMinter) -> Instrumented:
    return plan_instrumentation(raw).render(minter)
