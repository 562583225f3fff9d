"""Who a project may send as: its `sender_domains`, checked on MAIL FROM and on the From header.

Plunk only sends from verified domains; a relay that signs with DKIM must not let one project
send as another's domain. An empty list means any domain (nothing to enforce).
"""

from __future__ import annotations

from collections.abc import Sequence
from email.errors import HeaderParseError
from email.policy import default as default_policy

from relay.headers import SplitMessage


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def domain_allowed(address: str, domains: Sequence[str]) -> bool:
    """Exact domain match, case-insensitive: a subdomain must be listed itself (it is another domain)."""
    if not domains:
        return True
    domain = domain_of(address)
    return bool(domain) and "@" in address and domain in {d.lower().rstrip(".") for d in domains}


def from_addresses(message: SplitMessage) -> list[str] | None:
    """Every address of every From field, or None when a From field does not parse cleanly.

    The strict RFC 5322 parser of `email.headerregistry`, not `getaddresses`: display names that
    look like addresses (`"a@ok.example" <b@evil.example>`) must never be mistaken for the sender.
    """
    addresses: list[str] = []
    for raw in message.fields:
        if raw.name.lower() != "from":
            continue
        try:
            header = default_policy.header_factory("From", raw.value)
        except (HeaderParseError, IndexError, ValueError):
            return None
        if header.defects:
            return None
        for address in header.addresses:  # type: ignore[attr-defined]
            if not address.domain:
                return None
            addresses.append(address.addr_spec)
    return addresses


def from_allowed(message: SplitMessage, domains: Sequence[str]) -> bool:
    """Exactly one From field, every address in it in an allowed domain (always true without a list)."""
    if not domains:
        return True
    count = sum(1 for f in message.fields if f.name.lower() == "from")
    addresses = from_addresses(message)
    return count == 1 and bool(addresses) and all(domain_allowed(a, domains) for a in addresses or [])
