"""Opaque tokens (tracking/tokens.py) and the legacy ones still verified (tracking/legacy.py)."""

from __future__ import annotations

import base64
import hmac
import math
import pickle

import pytest

from relay.links import TrackingLinks
from tracking.claims import TrackedSend, TrackingClaims
from tracking.legacy import LegacyTokens, claims_from_dict, claims_to_dict
from tracking.tokens import OVERHEAD_BYTES, TokenKeys, TokenVerifier, new_send_id

SEND = TrackedSend(project="p", message_id="m@x", contact="c", recipient="c@x", sent_at=1, campaign="k")
LINK = "https://example.com/a?b=1#f"
KEYS = TokenKeys(["key-one-123"], ["p", "q"])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_round_trip_click_pixel_and_trap() -> None:
    tokens, send_id = KEYS.project("p"), new_send_id()
    assert KEYS.verify(tokens.click(send_id, LINK), "click") == TrackingClaims("click", "p", send_id, LINK)
    assert KEYS.verify(tokens.pixel(send_id), "open") == TrackingClaims("open", "p", send_id)
    assert KEYS.verify(tokens.click(send_id, None), "click") == TrackingClaims("click", "p", send_id, honeypot=True)


def test_kind_and_project_are_bound() -> None:
    tokens, send_id = KEYS.project("p"), new_send_id()
    assert KEYS.verify(tokens.pixel(send_id), "click") is None
    assert KEYS.verify(tokens.click(send_id, LINK), "open") is None
    assert KEYS.verify(tokens.click(send_id, LINK), "click", {"q"}) is None  # on another project's domain
    assert KEYS.verify(tokens.click(send_id, LINK), "click", {"p"}) is not None
    assert TokenKeys(["key-one-123"], ["q"]).verify(tokens.pixel(send_id), "open") is None  # project not configured


def test_nothing_is_readable_and_the_same_link_differs_per_copy() -> None:
    tokens = KEYS.project("p")
    first, second = tokens.click(new_send_id(), LINK), tokens.click(new_send_id(), LINK)
    assert first != second
    raw = unb64(first)
    assert b"example" not in raw
    assert len(raw) == OVERHEAD_BYTES + len(LINK)


def test_any_altered_byte_or_character_is_refused() -> None:
    token = KEYS.project("p").click(new_send_id(), LINK)
    raw = unb64(token)
    for index in range(len(raw)):
        for bit in range(8):
            altered = bytearray(raw)
            altered[index] ^= 1 << bit
            assert KEYS.verify(b64(bytes(altered)), "click") is None, (index, bit)
    for index in range(len(token)):
        for replacement in "AQg_-":
            if replacement != token[index]:
                assert KEYS.verify(token[:index] + replacement + token[index + 1:], "click") is None, index
    assert KEYS.verify(token + "A", "click") is None and KEYS.verify(token[:-1], "click") is None
    assert KEYS.verify(b64(raw[:-1]), "click") is None
    for junk in ("", "a.b.c", "x" * 10000, "é" * 40, token + "=", " " + token):
        assert KEYS.verify(junk, "click") is None


def test_rotation_new_key_mints_old_key_verifies() -> None:
    old, rotated, retired = TokenKeys(["old-key-1234"], ["p"]), TokenKeys(["new-key-1234", "old-key-1234"], ["p"]), \
        TokenKeys(["new-key-1234"], ["p"])
    send_id = new_send_id()
    from_old = old.project("p").pixel(send_id)
    assert rotated.verify(from_old, "open") == TrackingClaims("open", "p", send_id)
    assert retired.verify(from_old, "open") is None
    from_rotated = rotated.project("p").pixel(send_id)
    assert from_rotated != from_old and old.verify(from_rotated, "open") is None
    assert retired.verify(from_rotated, "open") is not None


def test_minting_keys_survive_pickling_for_worker_processes() -> None:
    tokens, send_id = KEYS.project("p"), new_send_id()
    copied = pickle.loads(pickle.dumps(tokens))
    assert copied.click(send_id, LINK) == tokens.click(send_id, LINK)  # AES-SIV: deterministic, no nonce


def test_legacy_tokens_verify_only_while_enabled_and_only_for_the_hosts_projects() -> None:
    legacy = LegacyTokens(["key-one-123"])
    token = legacy.sign(claims_to_dict(TrackingClaims("click", "p", link=LINK, send=SEND)))
    accepting, refusing = TokenVerifier(KEYS, legacy), TokenVerifier(KEYS, None)
    claims = accepting.verify(token, "click")
    assert claims is not None and claims.send == SEND and claims.link == LINK and claims.send_id is None
    assert accepting.verify(token, "click", {"p"}) is not None
    assert accepting.verify(token, "click", {"q"}) is None
    assert accepting.verify(token, "open") is None
    assert refusing.verify(token, "click") is None


def test_legacy_tag_is_hmac_sha256_and_any_change_is_refused() -> None:
    legacy = LegacyTokens(["new-key-1234", "old-key-1234"])
    token = legacy.sign({"k": "o"})
    payload, _, tag = token.partition(".")
    assert unb64(tag) == hmac.digest(b"new-key-1234", unb64(payload), "sha256")[:16]
    assert legacy.verify(LegacyTokens(["old-key-1234"]).sign({"k": "o"})) == {"k": "o"}
    for i in range(len(token)):
        if token[i] != ".":
            assert legacy.verify(token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]) is None, i
    assert claims_from_dict({"k": "c", "p": "p", "m": "m", "c": "c", "r": "r", "s": 1}) is None  # click without link
    assert claims_from_dict({"k": "x"}) is None


HOST = "click.shopexample.example"  # 25 characters
DESTINATION = "https://shop.example.com/spring/sale?a=1"  # 40 characters


def test_url_lengths_as_budgeted() -> None:
    assert (len(HOST), len(DESTINATION)) == (25, 40)
    links = TrackingLinks(tokens=KEYS.project("p"), base_url=f"https://{HOST}", send_id=new_send_id(), honeypot=True)
    click, pixel = links.click_url(DESTINATION), links.pixel_url()
    assert click is not None
    # The README's formula: https:// + host + /c/ + ceil(4 (30 + destination) / 3); pixel: + /o/ ... .gif
    assert len(click) == 8 + len(HOST) + 3 + math.ceil(4 * (30 + len(DESTINATION)) / 3) == 130 <= 140
    assert len(pixel) == 8 + len(HOST) + 3 + 40 + 4 == 80 <= 100
    assert len(links.honeypot_url() or "") == 8 + len(HOST) + 3 + 40


@pytest.mark.parametrize("secrets", [["one-key-123"], ["new-key-1234", "old-key-1234"]])
def test_many_projects_on_the_shared_host_each_verify(secrets: list[str]) -> None:
    keys = TokenKeys(secrets, [f"project-{n}" for n in range(300)])  # more projects than key id values
    for n in range(300):
        send_id = new_send_id()
        assert keys.verify(keys.project(f"project-{n}").pixel(send_id), "open") == TrackingClaims("open", f"project-{n}", send_id)
