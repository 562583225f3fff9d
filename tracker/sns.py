"""Amazon SNS message authentication: what makes a POST to /v1/feedback/ses believable.

SNS signs every message it delivers over HTTP(S) with the private key of a certificate it
serves from its own hosts; the receiver rebuilds the string SNS signed (a fixed list of
fields per message type, "Name\\nValue\\n" each, in that order), fetches the certificate at
`SigningCertURL` and checks the signature: RSA PKCS#1 v1.5 over SHA1 (`SignatureVersion` 1)
or SHA256 (2). AWS, "Verifying the signatures of Amazon SNS messages".

Refused before any network work: a certificate URL not on SNS's hosts (else anyone could sign
with a certificate of their own), a topic we were not told to trust, a message older than an
hour (a captured one replayed later).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

log = logging.getLogger("inflight.feedback")

MAX_AGE_SECONDS = 3600
MAX_CERTIFICATES = 16  # SNS rotates its certificate rarely; a few URLs at most are ever seen
_SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}


class Refused(Exception):
    """The message is not believed; the text says why (logged, never sent back in detail)."""


class ConfirmationFailed(Exception):
    """SNS's SubscribeURL could not be visited; SNS retries the confirmation later."""


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signed: each signed field present, as "Name\\nValue\\n", in AWS's order."""
    fields = _SIGNED_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise Refused(f"unknown message type {str(message.get('Type'))[:40]!r}")
    parts = []
    for name in fields:
        if name == "Subject" and message.get(name) is None:
            continue  # the only optional signed field
        value = message.get(name)
        if not isinstance(value, str):
            raise Refused(f"field {name} missing")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


class SnsVerifier:
    """Checks SNS messages; each certificate is fetched once and kept (its public key)."""

    def __init__(self, *, cert_url_pattern: str, topic_arns: tuple[str, ...], timeout_seconds: float = 10.0) -> None:
        self.cert_url = re.compile(cert_url_pattern)
        self.topic_arns = frozenset(topic_arns)
        self.timeout_seconds = timeout_seconds
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetching = asyncio.Lock()  # one fetch at a time: a burst of first messages costs one GET

    def trusted_url(self, url: object) -> bool:
        return isinstance(url, str) and self.cert_url.match(url) is not None

    async def verify(self, message: Mapping[str, Any], *, now: float | None = None) -> None:
        """Return when `message` is authentic, fresh and from a trusted topic; else raise Refused."""
        if message.get("TopicArn") not in self.topic_arns:
            raise Refused(f"topic not in feedback.ses_topic_arns: {str(message.get('TopicArn'))[:200]!r}")
        version = str(message.get("SignatureVersion"))
        if version not in _HASHES:
            raise Refused(f"unsupported SignatureVersion {version[:10]!r}")
        signed = string_to_sign(message)
        try:
            signature = base64.b64decode(str(message.get("Signature") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise Refused("signature is not base64") from None
        if not signature:
            raise Refused("unsigned")
        url = message.get("SigningCertURL")
        if not self.trusted_url(url):
            raise Refused(f"SigningCertURL does not match feedback.ses_cert_url_pattern: {str(url)[:200]!r}")
        try:
            sent = datetime.fromisoformat(str(message.get("Timestamp")).replace("Z", "+00:00"))
        except ValueError:
            raise Refused("Timestamp is not ISO 8601") from None
        age = (time.time() if now is None else now) - sent.replace(tzinfo=sent.tzinfo or UTC).timestamp()
        if abs(age) > MAX_AGE_SECONDS:
            raise Refused(f"stale: signed {age:.0f} s ago")
        key = await self._key(str(url))
        try:
            key.verify(signature, signed, padding.PKCS1v15(), _HASHES[version]())
        except InvalidSignature:
            raise Refused("bad signature") from None

    async def _key(self, url: str) -> rsa.RSAPublicKey:
        if (key := self._keys.get(url)) is not None:
            return key
        async with self._fetching:
            if (key := self._keys.get(url)) is not None:
                return key
            try:
                async with httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False) as client:
                    response = await client.get(url)
                response.raise_for_status()
                certificate = x509.load_pem_x509_certificate(response.content)
            except (httpx.HTTPError, ValueError) as exc:
                raise Refused(f"certificate unavailable: {type(exc).__name__}") from None
            if not certificate.not_valid_before_utc <= datetime.now(UTC) <= certificate.not_valid_after_utc:
                raise Refused("certificate expired or not yet valid")
            public_key = certificate.public_key()
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise Refused("certificate key is not RSA")
            if len(self._keys) >= MAX_CERTIFICATES:
                self._keys.pop(next(iter(self._keys)))
            self._keys[url] = public_key
            log.info("sns-certificate-fetched url=%r", url)
            return public_key

    async def confirm_subscription(self, message: Mapping[str, Any]) -> None:
        """Visit SubscribeURL (only on SNS's hosts, the certificate rule): SNS then starts delivering."""
        url = message.get("SubscribeURL")
        if not self.trusted_url(url):
            raise Refused(f"SubscribeURL does not match feedback.ses_cert_url_pattern: {str(url)[:200]!r}")
        try:
            async with httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False) as client:
                response = await client.get(str(url))
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ConfirmationFailed(type(exc).__name__) from None
        log.info("sns-subscription-confirmed topic=%r", message.get("TopicArn"))
