"""DKIM signing with real generated keys, verified by dkimpy's verifier against a DNS stub."""

from __future__ import annotations

import base64
import logging
import re
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from config.dkim_keys import ED25519, RSA, DkimError, load_key, signature
from config.settings import ConfigError
from relay.dkim import DkimSigner
from relay.headers import split_message
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.test_corpus import CORPUS, FILES, wrap

SELECTOR = "s2026"


@dataclass(frozen=True)
class KeyFiles:
    """Private keys in every form an operator may hold, and the DNS TXT records that publish them."""

    rsa_pkcs1: Path
    rsa_pkcs8: Path
    ed25519_pem: Path
    ed25519_seed: Path
    rsa_txt: bytes
    ed25519_txt: bytes


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    directory = tmp_path_factory.mktemp("dkim")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = KeyFiles(
        directory / "rsa1.pem", directory / "rsa8.pem", directory / "ed.pem", directory / "ed.key",
        b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)),
        b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)),
    )
    none = serialization.NoEncryption()
    files.rsa_pkcs1.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.TraditionalOpenSSL, none))
    files.rsa_pkcs8.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none))
    files.ed25519_pem.write_bytes(ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none))
    files.ed25519_seed.write_bytes(base64.b64encode(ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, none)) + b"\n")  # dknewkey's format
    return files


def dns(records: dict[str, bytes]) -> Callable[..., bytes | None]:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip("."))
    return lookup


def verified(data: bytes, records: dict[str, bytes]) -> bool:
    """dkimpy's verdict on the topmost signature (False on any validation error)."""
    return bool(dkim.verify(data, dnsfunc=dns(records)))


MESSAGE = (b"From: App <app@example.com>\r\nTo: a@example.com\r\nSubject: Hello\r\n"
           b"Message-ID: <m1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHi there.\r\n")


@pytest.mark.parametrize(("form", "algorithm"), [("rsa_pkcs1", RSA), ("rsa_pkcs8", RSA),
                                                 ("ed25519_pem", ED25519), ("ed25519_seed", ED25519)])
def test_every_key_form_signs_verifiably(keys: KeyFiles, form: str, algorithm: bytes) -> None:
    key = load_key("Example.com", SELECTOR, str(getattr(keys, form)))
    assert key.algorithm == algorithm and key.domain == "example.com"
    signed = DkimSigner([key]).sign(MESSAGE)
    assert signed.startswith(b"DKIM-Signature: v=1; a=" + algorithm) and signed.endswith(MESSAGE)
    txt = keys.rsa_txt if algorithm == RSA else keys.ed25519_txt
    assert verified(signed, {f"{SELECTOR}._domainkey.example.com": txt})
    tampered = signed.replace(b"Hi there.", b"Hi there!")
    assert not verified(tampered, {f"{SELECTOR}._domainkey.example.com": txt})


def test_existing_signature_for_our_domain_is_replaced_others_kept(keys: KeyFiles) -> None:
    signer = DkimSigner([load_key("example.com", SELECTOR, str(keys.ed25519_pem))])
    app_signed = (b"DKIM-Signature: v=1; a=rsa-sha256; d=Example.COM; s=app; b=AAAA\r\n"
                  b"DKIM-Signature: v=1; a=rsa-sha256; d=esp.example; s=x; b=BBBB\r\n" + MESSAGE)
    assert signer.foreign_signatures(split_message(app_signed)) == ["esp.example"]
    signed = signer.sign(app_signed)
    fields = [f for f in split_message(signed).fields if f.name.lower() == "dkim-signature"]
    assert len(fields) == 2 and b"d=esp.example" in fields[1].raw and b"d=Example.COM" not in signed
    assert verified(signed, {f"{SELECTOR}._domainkey.example.com": keys.ed25519_txt})


def test_key_choice_follows_the_from_domain(keys: KeyFiles) -> None:
    signer = DkimSigner([load_key("example.com", SELECTOR, str(keys.ed25519_seed))])
    sub = MESSAGE.replace(b"app@example.com", b"app@news.example.com")
    assert b" d=example.com;" in signer.sign(sub)  # parent domain: still aligned for DMARC (relaxed)
    other = MESSAGE.replace(b"app@example.com", b"app@example.org")
    assert signer.sign(other) == other  # no key for that domain: untouched
    lookalike = MESSAGE.replace(b"app@example.com", b"app@notexample.com")
    assert signer.sign(lookalike) == lookalike


def test_bad_key_files_are_refused_at_load(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    short_seed = tmp_path / "short.key"
    short_seed.write_text(base64.b64encode(b"x" * 16).decode())
    for path, fragment in ((tmp_path / "missing.pem", "cannot read"), (garbage, "not an RSA or Ed25519"),
                           (short_seed, "32 bytes")):
        with pytest.raises(ValueError, match=fragment):
            load_key("example.com", SELECTOR, str(path))


def test_config_names_a_bad_dkim_entry(tmp_path: Path, sink: Sink, keys: KeyFiles) -> None:
    with pytest.raises(ConfigError) as error:
        make_settings(tmp_path, sink.url, dkim=[{"domain": "example.com", "selector": SELECTOR,
                                                 "private_key_path": str(tmp_path / "nope.pem")},
                                                {"domain": "bad domain", "selector": SELECTOR,
                                                 "private_key_path": str(keys.rsa_pkcs8)}])
    assert any(p.startswith("dkim[0].private_key_path: cannot read") for p in error.value.problems)
    assert any(p.startswith("dkim[1].domain:") for p in error.value.problems)


def test_each_tracked_copy_is_signed_over_the_bytes_sent(tmp_path: Path, sink: Sink, keys: KeyFiles,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, sink.url, dkim=[{"domain": "example.com", "selector": SELECTOR,
                                                        "private_key_path": str(keys.rsa_pkcs8)}])
    html = (b"From: app@example.com\r\nTo: list@example.com\r\nSubject: News\r\n"
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=app; b=AAAA\r\n"
            b"DKIM-Signature: v=1; a=rsa-sha256; d=esp.example; s=x; b=BBBB\r\n"
            b"X-Inflight-Template-Type: MARKETING\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            b'<html><body><a href="https://example.com/offer">offer</a></body></html>\r\n')
    caplog.set_level(logging.WARNING)
    with RunningService(settings) as service, smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.login(PROJECT, PROJECT_SECRET)
        client.sendmail("app@example.com", ["a@example.com", "b@example.com"], html)
    records = {f"{SELECTOR}._domainkey.example.com": keys.rsa_txt}
    assert len(sink.messages) == 2
    bodies = set()
    for copy in sink.messages:
        assert copy.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=example.com;")
        assert verified(copy.data, records)
        assert b"d=example.com; s=app" not in copy.data and b"d=esp.example" in copy.data
        bodies.add(copy.data.split(b"\r\n\r\n", 1)[1])
    assert len(bodies) == 2  # each copy has its own tokens, so its own signature
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dkim-broken")]
    assert len(warnings) == 1 and "domain=esp.example" in warnings[0]


def test_untracked_mail_with_bare_line_ends_verifies_as_received(tmp_path: Path, sink: Sink, keys: KeyFiles) -> None:
    settings = make_settings(tmp_path, sink.url, dkim=[{"domain": "example.com", "selector": SELECTOR,
                                                        "private_key_path": str(keys.ed25519_seed)}],
                             projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": "DISABLED"}])
    raw = b"From: app@example.com\r\nTo: a@example.com\r\nSubject: LF\r\n\r\nbare\nline feed and lone\rcarriage\r\n"
    with RunningService(settings) as service, smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=10) as client:
        client.login(PROJECT, PROJECT_SECRET)
        client.mail("app@example.com")
        client.rcpt("a@example.com")
        client.rcpt("b@example.com")
        assert client.docmd("DATA")[0] == 354
        client.send(raw + b".\r\n")  # as is: smtplib's data() would fix the line ends itself
        assert client.getreply()[0] == 250
    [copy] = sink.messages
    assert copy.recipients == ["a@example.com", "b@example.com"]
    assert b"bare\r\nline feed and lone\r\ncarriage" in copy.data
    assert verified(copy.data, {f"{SELECTOR}._domainkey.example.com": keys.ed25519_txt})


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


@pytest.mark.parametrize("case", [
    b"From: a@example.com\r\nSubject: no body\r\n\r\n",
    b"From: a@example.com\r\nSubject: no final line end\r\n\r\nlast line",
    b"From: a@example.com\r\nSubject: blank lines at the end\r\n\r\ntext\r\n\r\n\r\n\r\n",
    b"From: a@example.com\r\nFrom: b@example.com\r\nTo: c@example.org\r\nTo: d@example.org\r\n\r\ntwo of each\r\n",
    b"FROM: a@example.com\r\nsubject:\t Folded \t over\r\n\t  three\r\n lines  \r\nX-Other: unsigned\r\n\r\nbody \t \r\n",
    b"From: a@example.com\r\nList-Unsubscribe: <https://u.example.com/1>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nx\r\n",
], ids=["empty-body", "no-final-crlf", "trailing-blank-lines", "repeated-fields", "folding-and-case", "one-click"])
@pytest.mark.parametrize("form", ["rsa_pkcs1", "ed25519_seed"])
def test_signatures_verify_with_dkimpy_on_awkward_headers_and_bodies(keys: KeyFiles, case: bytes, form: str) -> None:
    key = load_key("example.com", SELECTOR, str(getattr(keys, form)))
    signed = signature(key, case) + case
    assert verified(signed, {f"{SELECTOR}._domainkey.example.com": keys.rsa_txt if key.algorithm == RSA else keys.ed25519_txt})
    assert all(len(line) <= 78 for line in signed.split(b"\r\n\r\n", 1)[0].split(b"\r\n"))  # RFC 5322 §2.1.1


def test_an_added_from_field_breaks_the_signature(keys: KeyFiles) -> None:
    """From is signed once more than it appears (h= names it twice), so a From added in transit fails any
    verifier, not only one that (as dkimpy does) counts an extra From by itself."""
    key = load_key("example.com", SELECTOR, str(keys.ed25519_seed))
    field = signature(key, MESSAGE)
    h_tag = re.search(rb"h=([^;]*);", field.replace(b"\r\n", b""))
    assert h_tag is not None and re.split(rb"\s*:\s*", h_tag[1].strip()).count(b"from") == 2
    signed = field + MESSAGE
    records = {f"{SELECTOR}._domainkey.example.com": keys.ed25519_txt}
    assert verified(signed, records)
    # On top, where a verifier of a once-signed From would never look (it takes the last instance).
    assert not verified(b"From: evil@example.net\r\n" + signed, records)


@pytest.mark.parametrize(("data", "reason"), [
    (b"From: a@example.com\r\nnot a field\r\n\r\nbody\r\n", "no field"),
    (b"From : a@example.com\r\n\r\nbody\r\n", "no From field"),  # verifiers would not find it as `from`
    (b"From: a@example.com\r\nSubject: no blank line, no body\r\n", "no blank line"),
])
def test_a_message_that_cannot_be_signed_is_refused_with_the_reason(keys: KeyFiles, data: bytes, reason: str) -> None:
    key = load_key("example.com", SELECTOR, str(keys.ed25519_seed))
    with pytest.raises(DkimError, match=reason):
        signature(key, data)


@pytest.mark.parametrize("path", FILES or [None], ids=lambda p: p.name if p else "absent")
def test_every_corpus_message_signs_verifiably(keys: KeyFiles, path: Path | None) -> None:
    """Real-world header blocks (folding, encodings, repeated fields) through the signer, checked by dkimpy."""
    if path is None:
        pytest.skip(f"corpus not found at {CORPUS} (set INFLIGHT_CORPUS)")
    data = crlf(wrap(path.read_bytes(), "quoted-printable", None) if path.suffix == ".html" else path.read_bytes())
    if data.startswith(b"From "):
        data = data.split(b"\r\n", 1)[1]  # an mbox envelope line: the relay removes it on receipt
    header = data.split(b"\r\n\r\n", 1)[0]
    lines = header.split(b"\r\n")
    # A line that is neither a field nor a field's continuation: no verifier could read the block as we signed it.
    malformed = lines[0][:1] in (b" ", b"\t") or any(b":" not in line and line[:1] not in (b" ", b"\t") for line in lines)
    refusal = "no field" if malformed else None if re.search(rb"^from:", header, re.I | re.M) else "no From field"
    for form, txt in (("rsa_pkcs8", keys.rsa_txt), ("ed25519_pem", keys.ed25519_txt)):
        key = load_key("example.com", SELECTOR, str(getattr(keys, form)))
        if refusal is not None:
            with pytest.raises(DkimError, match=refusal):
                signature(key, data)
            continue
        assert verified(signature(key, data) + data, {f"{SELECTOR}._domainkey.example.com": txt}), form
