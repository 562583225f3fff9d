from __future__ import annotations

import pytest

from relay.headers import split_message
from relay.senders import domain_allowed, from_addresses, from_allowed

DOMAINS = ("example.com",)


def headers(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()


@pytest.mark.parametrize(("address", "allowed"), [
    ("a@example.com", True), ("a@EXAMPLE.com", True), ("a@example.com.", True),
    ("a@sub.example.com", False), ("a@example.com.evil", False), ("a@notexample.com", False),
    ("example.com", False), ("a@", False),
])
def test_envelope_domain(address: str, allowed: bool) -> None:
    assert domain_allowed(address, DOMAINS) is allowed
    assert domain_allowed(address, ()) is True


@pytest.mark.parametrize(("lines", "allowed"), [
    (["From: App <app@example.com>"], True),
    (["From: =?utf-8?q?App?= <app@example.com>"], True),
    (["From: app@evil.example"], False),
    (['From: "app@example.com" <app@evil.example>'], False),  # a display name is not the sender
    (["From: app@example.com <app@evil.example>"], False),  # ambiguous: clients disagree, so refused
    (["From: app@evil.example (app@example.com)"], False),
    (["From: app@example.com, app@evil.example"], False),
    (["From: app@example.com", "From: app@evil.example"], False),  # two From fields
    (["From: undisclosed:;"], False),
    (["From: <app@example.com"], False),
    (["To: a@example.com"], False),  # no From at all
])
def test_from_header(lines: list[str], allowed: bool) -> None:
    message = split_message(headers(*lines))
    assert from_allowed(message, DOMAINS) is allowed
    assert from_allowed(message, ()) is True


def test_from_addresses_reads_folded_fields() -> None:
    message = split_message(headers("From: App\r\n <app@example.com>", "Subject: x"))
    assert from_addresses(message) == ["app@example.com"]
