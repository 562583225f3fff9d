from __future__ import annotations

import pytest

from relay.headers import decoded_header, split_message, without_envelope_line
from relay.hints import read_hints, strip_hints

RAW = (
    b"From: a@example.com\r\n"
    b"X-Inflight-Campaign: c1\r\n"
    b"Subject: a folded\r\n   subject line\r\n"
    b"x-inflight-template-type: MARKETING\r\n"
    b"  (folded)\r\n"
    b"DKIM-Signature: v=1;\r\n\tb=abc\r\n"
    b"\r\n"
    b"body\r\n\r\nmore\r\n"
)


def test_split_and_join_is_byte_identical() -> None:
    assert split_message(RAW).to_bytes() == RAW
    lf = RAW.replace(b"\r\n", b"\n")
    assert split_message(lf).to_bytes() == lf
    assert split_message(b"Subject: x\r\n").to_bytes() == b"Subject: x\r\n"


def test_strip_removes_only_inflight_fields_with_their_continuations() -> None:
    stripped = strip_hints(split_message(RAW)).to_bytes()
    assert stripped == (
        b"From: a@example.com\r\n"
        b"Subject: a folded\r\n   subject line\r\n"
        b"DKIM-Signature: v=1;\r\n\tb=abc\r\n"
        b"\r\n"
        b"body\r\n\r\nmore\r\n"
    )


def test_values_are_unfolded_and_case_insensitive() -> None:
    message = split_message(RAW)
    assert message.get("subject") == "a folded subject line"
    assert message.get("X-INFLIGHT-TEMPLATE-TYPE") == "MARKETING (folded)"
    assert message.get("missing") is None


def test_with_field_replaces_and_uses_the_message_line_ending() -> None:
    message = split_message(RAW.replace(b"\r\n", b"\n")).with_field("X-SES-CONFIGURATION-SET", "set-a")
    message = message.with_field("x-ses-configuration-set", "set-b")
    data = message.to_bytes()
    assert data.count(b"configuration-set") == 1 and b"x-ses-configuration-set: set-b\n\nbody" in data


def test_encoded_words_are_decoded_for_events() -> None:
    assert decoded_header("=?utf-8?q?Gr=C3=BC=C3=9Fe?=") == "Grüße"


def test_raw_utf8_values_are_read_as_utf8() -> None:
    value = split_message("Subject: Grüße\r\n\r\n".encode()).get("Subject")
    assert decoded_header(value) == "Grüße"
    assert decoded_header(split_message(b"Subject: Gr\xfc\xdfe\r\n\r\n").get("Subject")) == "Grüße"  # Latin-1 stays


def test_encoded_inflight_ids_are_decoded_like_the_subject() -> None:
    raw = (b"X-Inflight-Campaign: =?utf-8?q?caf=C3=A9?=\r\nX-Inflight-Template: =?utf-8?b?w6l0w6k=?=\r\n"
           b"X-Inflight-Contact: =?iso-8859-1?q?Zo=EB?=\r\nX-Inflight-Project: demo\r\n\r\n")
    hints = read_hints(split_message(raw))
    assert (hints.campaign, hints.template, hints.contact, hints.project) == ("café", "été", "Zoë", "demo")


@pytest.mark.parametrize(("raw", "kept"), [
    (b"From sender@example.com Fri Dec  4 09:15:02 2026\r\nFrom: a@example.com\r\n\r\nx", b"From: a@example.com\r\n\r\nx"),
    (b"From MAILER-DAEMON\nSubject: s\n\nx", b"Subject: s\n\nx"),
    (b"From : a@example.com\r\n\r\nx", None),  # obsolete syntax: a header field, kept
    (b"From: a@example.com\r\n\r\nFrom b\r\n", None),
    (b"Subject: s\r\n\r\nx", None),
    (b"From x", b""),
])
def test_a_leading_mbox_from_line_is_removed(raw: bytes, kept: bytes | None) -> None:
    assert without_envelope_line(raw) == (raw if kept is None else kept)
