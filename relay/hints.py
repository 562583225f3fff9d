"""The X-Inflight-* headers: what the app tells the relay about a send, read then removed."""

from __future__ import annotations

from dataclasses import dataclass

from relay import replies
from relay.headers import SplitMessage, decoded_header
from relay.policy import Send, TemplateType

PREFIX = "x-inflight-"
TYPE_CHOICES = " | ".join(TemplateType.__members__)


class Refusal(Exception):
    """The message is refused with this SMTP reply, before any 250."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class AppHints:
    send: Send
    project: str | None = None
    campaign: str | None = None
    template: str | None = None
    contact: str | None = None


def _template_type(message: SplitMessage, name: str) -> TemplateType | None:
    value = message.get(name)
    if value is None:
        return None
    try:
        return TemplateType(value.strip().upper())
    except ValueError:
        raise Refusal(replies.invalid_header(name, TYPE_CHOICES)) from None


def _override(message: SplitMessage) -> bool | None:
    value = message.get("X-Inflight-Tracking")
    if value is None:
        return None
    choice = {"on": True, "off": False}.get(value.strip().lower())
    if choice is None:
        raise Refusal(replies.invalid_header("X-Inflight-Tracking", "on | off"))
    return choice


def _optional(message: SplitMessage, name: str) -> str | None:
    """A free-text id, decoded as Subject is: apps' mail libraries RFC 2047-encode non-ASCII values."""
    value = decoded_header(message.get(name))
    return value.strip() or None if value is not None else None


def read_hints(message: SplitMessage) -> AppHints:
    """Parse and validate every X-Inflight-* header; raise Refusal naming a bad one."""
    send = Send(
        template_type=_template_type(message, "X-Inflight-Template-Type"),
        campaign_type=_template_type(message, "X-Inflight-Campaign-Type"),
        override=_override(message),
    )
    return AppHints(
        send=send,
        project=_optional(message, "X-Inflight-Project"),
        campaign=_optional(message, "X-Inflight-Campaign"),
        template=_optional(message, "X-Inflight-Template"),
        contact=_optional(message, "X-Inflight-Contact"),
    )


def strip_hints(message: SplitMessage) -> SplitMessage:
    return message.without(lambda name: name.startswith(PREFIX))
