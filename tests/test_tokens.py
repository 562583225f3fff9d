from __future__ import annotations

import base64
import hmac
import pickle

from tracking.tokens import TokenSigner, TrackedSend, TrackingClaims, claims_from_dict, claims_to_dict

SEND = TrackedSend(project="p", message_id="m@x", contact="c", recipient="c@x", sent_at=1, campaign="k")


def test_round_trip() -> None:
    signer = TokenSigner(["key-one-123"])
    claims = TrackingClaims("click", SEND, "https://example.com/a?b=1#f")
    data = signer.verify(signer.sign(claims_to_dict(claims)))
    assert data is not None and claims_from_dict(data) == claims


def test_tag_is_hmac_sha256_of_the_payload_and_survives_pickling() -> None:
    # Worker processes receive the signer pickled; the keyed HMAC it reuses must be rebuilt there, same key.
    signer = pickle.loads(pickle.dumps(TokenSigner(["new-key-1234", "old-key-1234"])))
    token = signer.sign({"k": "o"})
    payload, _, tag = token.partition(".")
    expected = hmac.digest(b"new-key-1234", base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)), "sha256")
    assert base64.urlsafe_b64decode(tag + "=" * (-len(tag) % 4)) == expected[:16]
    assert signer.verify(TokenSigner(["old-key-1234"]).sign({"k": "o"})) == {"k": "o"}


def test_any_change_is_refused() -> None:
    signer = TokenSigner(["key-one-123"])
    token = signer.sign({"k": "o"})
    for i in range(len(token)):
        if token[i] == ".":
            continue
        altered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        assert signer.verify(altered) is None, i
    assert signer.verify(token + "A") is None
    assert signer.verify("") is None and signer.verify("a.b.c") is None and signer.verify("x" * 10000) is None


def test_rotation_first_key_signs_all_keys_verify() -> None:
    old = TokenSigner(["old-key-1234"])
    rotated = TokenSigner(["new-key-1234", "old-key-1234"])
    token = old.sign({"k": "o"})
    assert rotated.verify(token) == {"k": "o"}
    assert TokenSigner(["new-key-1234"]).verify(token) is None
    assert old.verify(rotated.sign({"k": "o"})) is None


def test_claims_of_another_shape_are_rejected() -> None:
    assert claims_from_dict({"k": "c", "p": "p", "m": "m", "c": "c", "r": "r", "s": 1}) is None  # click without link
    assert claims_from_dict({"k": "x"}) is None


def test_honeypot_click_needs_no_link_and_round_trips() -> None:
    signer = TokenSigner(["key-one-123"])
    claims = TrackingClaims("click", SEND, honeypot=True)
    data = signer.verify(signer.sign(claims_to_dict(claims)))
    assert data is not None and data["h"] == 1 and claims_from_dict(data) == claims
    assert "h" not in claims_to_dict(TrackingClaims("click", SEND, "https://example.com/"))
