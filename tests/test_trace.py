from __future__ import annotations

from datetime import UTC, datetime

from relay.trace import received_header, tls_description

NOW = datetime(2026, 3, 3, 10, 0, 0, tzinfo=UTC)


def test_layout_with_tls_and_auth() -> None:
    field = received_header(helo="app.test", peer_ip="192.0.2.1", hostname="relay.example.com",
                            tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", authenticated=True,
                            recipients=["a@example.com"], now=NOW)
    assert field == (b"Received: from app.test ([192.0.2.1])\r\n"
                     b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
                     b"\tby relay.example.com (inflight) with ESMTPSA\r\n"
                     b"\tfor <a@example.com>; Tue, 03 Mar 2026 10:00:00 +0000\r\n")


def test_plain_session_several_recipients_ipv6_and_hostile_helo() -> None:
    field = received_header(helo="x) (by evil; \x01" + "a" * 100, peer_ip="2001:db8::1", hostname="r", tls=None,
                            authenticated=True, recipients=["a@x", "b@x"], now=NOW)
    first, by = field.split(b"\r\n\t")
    assert first == b"Received: from x???by?evil???" + b"a" * 50 + b" ([IPv6:2001:db8::1])"
    assert by == b"by r (inflight) with ESMTPA; Tue, 03 Mar 2026 10:00:00 +0000\r\n"


class FakeSSLObject:
    def version(self) -> str:
        return "TLSv1.2"


def test_tls_description() -> None:
    info = {"ssl_object": FakeSSLObject(), "cipher": ("ECDHE-RSA-AES128-GCM-SHA256", "TLSv1.2", 128)}
    assert tls_description(info) == "TLSv1.2 with cipher ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits)"
    assert tls_description(None) is None
