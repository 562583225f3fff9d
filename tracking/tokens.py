"""Opaque tracking tokens: sealed with AES-SIV, short, bound to a project and to a kind.

Whoever sees a link (a forwarded mail, a proxy or server log, a Referer) must read neither the
recipient, the Message-ID, the campaign nor the project from it. So a token is encrypted and
authenticated, and carries as little as it can (every link of every copy pays for each byte,
and base64 turns 3 bytes into 4 characters):

    token     = base64url(version | key id | SIV (16) | ciphertext)
    plaintext = send id (12 random bytes, the copy's row in the store's `sends`) [+ destination]

- AES-SIV (RFC 5297) is deterministic and misuse resistant: no nonce to carry (a 24-byte one
  costs 32 characters). Plaintexts never repeat (a random send id per copy), so two equal
  tokens only ever mean the same link in the same copy.
- One key per project, derived from a tracker secret: the Host names the project, so the
  token need not, and a token minted for one project fails on another's domain.
- Version, key id and kind (`o` pixel, `c` click) are associated data: none can be altered, and
  a pixel token is no click token.
- The key id is a byte of a hash of the key: it tells which secret (and project) sealed the
  token, so keys rotate (the first secret mints, every secret opens) and the shared host
  finds the project's key without trying each project.
- The destination is in the click token, so the redirect and the pixel answer without the store;
  who the copy went to is read from the store once, when the event is recorded.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
from collections.abc import Collection, Iterable, Sequence
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tracking.claims import TrackingClaims
from tracking.legacy import LegacyTokens, claims_from_dict

VERSION = 1
SEND_ID_BYTES = 12  # 96 random bits: no two copies ever share one
SIV_BYTES = 16
# Bytes every token carries besides a click's destination: version, key id, SIV, send id.
OVERHEAD_BYTES = 2 + SIV_BYTES + SEND_ID_BYTES
MAX_TOKEN_CHARS = 8192  # longer than any URL we mint; bounds work on hostile input
_KIND_BYTES = {"open": b"o", "click": b"c"}
_KEY_SALT = b"inflight tracking token v1"
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")

# Visible ASCII except backslash, one or more: the relay checks every link of every copy against it.
_VISIBLE_ASCII = re.compile(r"[\x21-\x5b\x5d-\x7e]+")


def is_redirectable(link: str) -> bool:
    """A link the tracker may answer with `Location: <link>` byte for byte.

    An absolute http(s) URL with a host, in visible ASCII with no backslash: browsers read a
    backslash as `/` in http URLs while Python's parser does not, so such a link could name one host to
    us and another to the browser. The minter leaves any other link untracked, and the tracker
    refuses it even if it was sealed, so no input ever redirects elsewhere.
    """
    if len(link) > MAX_TOKEN_CHARS or not _VISIBLE_ASCII.fullmatch(link):
        return False
    try:
        parts = urlsplit(link)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host) and link[len(parts.scheme):].startswith("://")


def new_send_id() -> bytes:
    return os.urandom(SEND_ID_BYTES)


def _encode(data: bytes) -> str:
    # binascii and a translation, not base64.urlsafe_b64encode's two Python calls: once per link of every copy.
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def _decode(token: str) -> bytes | None:
    """The bytes of a base64url token without padding, or None unless `token` is their one spelling."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        data = binascii.a2b_base64(token.encode("ascii").translate(_TO_STANDARD) + b"==")
    except (UnicodeEncodeError, binascii.Error):
        return None
    # Re-encoding must give the token back: the decoder skips characters outside the alphabet
    # and the last character can hide unused bits, so altering any character invalidates a token.
    return data if _encode(data) == token else None


def derive_key(secret: str, project: str) -> bytes:
    """The project's AES-SIV key (two AES-128 keys) from one tracker secret: HKDF-SHA256, info = project id."""
    return HKDF(algorithm=SHA256(), length=32, salt=_KEY_SALT, info=project.encode("utf-8")).derive(secret.encode("utf-8"))


class ProjectKey:
    """One project's key from one secret; seals and opens that project's tokens."""

    __slots__ = ("_header", "_siv", "key", "kid", "project")

    def __init__(self, project: str, key: bytes) -> None:
        self.project = project
        self.key = key
        self.kid = hashlib.sha256(b"inflight key id" + key).digest()[0]
        self._header = bytes((VERSION, self.kid))
        self._siv = AESSIV(key)

    def __reduce__(self) -> tuple[type[ProjectKey], tuple[str, bytes]]:
        return ProjectKey, (self.project, self.key)  # the cipher does not pickle; worker processes rebuild it

    def seal(self, kind: str, plaintext: bytes) -> str:
        return _encode(self._header + self._siv.encrypt(plaintext, [self._header + _KIND_BYTES[kind]]))

    def open(self, kind: str, token: bytes) -> bytes | None:
        """The plaintext of a decoded token sealed by this key for `kind`, else None."""
        try:
            return self._siv.decrypt(token[2:], [token[:2] + _KIND_BYTES[kind]])
        except InvalidTag:
            return None


def claims_of(key: ProjectKey, kind: str, token: bytes) -> TrackingClaims | None:
    """The claims of a decoded token if `key` sealed it for `kind`."""
    plaintext = key.open(kind, token)
    if plaintext is None or len(plaintext) < SEND_ID_BYTES:
        return None
    send_id, link = plaintext[:SEND_ID_BYTES], plaintext[SEND_ID_BYTES:]
    if kind == "open":
        return TrackingClaims("open", key.project, send_id) if not link else None
    if not link:
        return TrackingClaims("click", key.project, send_id, honeypot=True)  # the trap link has no destination
    try:
        return TrackingClaims("click", key.project, send_id, link.decode("utf-8"))
    except UnicodeDecodeError:
        return None


class ProjectTokens:
    """What the relay needs for one project: its keys, the first (tracker.secrets[0]) mints, all open."""

    def __init__(self, keys: Sequence[ProjectKey]) -> None:
        if not keys:
            raise ValueError("ProjectTokens needs at least one key")
        self.keys = tuple(keys)
        self.project = self.keys[0].project

    def click(self, send_id: bytes, link: str | None) -> str:
        """A click token with the destination sealed inside; None: the trap link, which goes nowhere."""
        return self.keys[0].seal("click", send_id + (link or "").encode("utf-8", "surrogatepass"))

    def pixel(self, send_id: bytes) -> str:
        return self.keys[0].seal("open", send_id)

    def verify(self, token: str, kind: str) -> TrackingClaims | None:
        data = _decode(token)
        if data is None or len(data) < OVERHEAD_BYTES or data[0] != VERSION:
            return None
        return next((c for key in self.keys if key.kid == data[1] and (c := claims_of(key, kind, data))), None)


class TokenKeys:
    """Every configured project's keys, derived once from `tracker.secrets`."""

    def __init__(self, secrets: Sequence[str], projects: Iterable[str]) -> None:
        if not secrets:
            raise ValueError("TokenKeys needs at least one secret (tracker.secrets)")
        self._projects = {p: ProjectTokens([ProjectKey(p, derive_key(s, p)) for s in secrets]) for p in projects}
        self._by_kid: dict[int, list[ProjectKey]] = {}
        for tokens in self._projects.values():
            for key in tokens.keys:
                self._by_kid.setdefault(key.kid, []).append(key)

    def project(self, project: str) -> ProjectTokens:
        try:
            return self._projects[project]
        except KeyError:
            raise ValueError(f"no keys for project {project!r}: it is not configured") from None

    def verify(self, token: str, kind: str, projects: Collection[str] | None = None) -> TrackingClaims | None:
        """The claims of an opaque token sealed for `kind` by one of `projects` (None: any project), else None."""
        data = _decode(token)
        if data is None or len(data) < OVERHEAD_BYTES or data[0] != VERSION:
            return None
        for key in self._by_kid.get(data[1], ()):  # usually one key; a shared key id byte costs one more try
            if projects is None or key.project in projects:
                claims = claims_of(key, kind, data)
                if claims is not None:
                    return claims
        return None


class TokenVerifier:
    """The tracker's check of a token: opaque for the Host's projects; legacy ones too while enabled."""

    def __init__(self, keys: TokenKeys, legacy: LegacyTokens | None) -> None:
        self.keys = keys
        self.legacy = legacy

    def verify(self, token: str, kind: str, projects: Collection[str] | None = None) -> TrackingClaims | None:
        """Claims for a `kind` token valid for one of `projects` (None: any), else None. Never raises."""
        if "." not in token:  # base64url has no dot; a legacy token always holds one
            return self.keys.verify(token, kind, projects)
        if self.legacy is None or len(token) > MAX_TOKEN_CHARS:
            return None
        data = self.legacy.verify(token)
        claims = claims_from_dict(data) if data is not None else None
        if claims is None or claims.kind != kind or (projects is not None and claims.project not in projects):
            return None
        return claims
