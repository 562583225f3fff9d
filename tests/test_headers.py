from __future__ import annotations

from relay.headers import decoded_header, split_message
from relay.hints import strip_hints

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
