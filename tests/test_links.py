"""The relay's minter: exclusions, own host, honeypot, idempotency check."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, settings_from_mapping
from relay.links import TrackingLinks, host_excluded
from tracking.tokens import TokenSigner, TrackedSend, TrackingClaims, claims_to_dict

SEND = TrackedSend(project="p", message_id="m@x", contact="c@x", recipient="c@x", sent_at=1)


def links(**kwargs: object) -> TrackingLinks:
    return TrackingLinks(signer=TokenSigner(["secret-123"]), public_url="https://t.example.net", send=SEND, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("host", "excluded"), [
    ("example.com", True), ("EXAMPLE.com", True), ("www.example.com", False), ("shop.example.org", True),
    ("a.b.example.org", True), ("example.org", False), ("notexample.org", False), ("other.net", False),
])
def test_exclusion_patterns(host: str, excluded: bool) -> None:
    assert host_excluded(host.lower(), ("example.com", "*.example.org")) is excluded


def test_excluded_hosts_and_own_host_are_not_tracked_ports_ignored() -> None:
    minter = links(exclude_click_domains=("Example.COM", "*.cdn.test"))
    assert minter.click_url("https://example.com:8443/a") is None
    assert minter.click_url("http://img.cdn.test/x") is None
    assert minter.click_url("https://T.example.net/anything") is None
    assert minter.click_url("http://[broken/") is None
    tracked = minter.click_url("https://example.org/a")
    assert tracked is not None and minter.is_tracking_url(tracked)
    assert not minter.is_tracking_url("https://t.example.net/c/forged.token")


@pytest.mark.parametrize("send", [
    SEND, TrackedSend(project="p", message_id="m@x", contact="Ç@x", recipient="c@x", sent_at=1, campaign='a"b\\c',
                      template="t", template_type="MARKETING", campaign_type="BROADCAST"),
])
@pytest.mark.parametrize("destination", ["https://example.org/a", 'https://example.org/?q="x"&u=%C3%A9#f'])
def test_click_token_is_exactly_the_signed_claims(send: TrackedSend, destination: str) -> None:
    # The minter encodes each copy's claims once and appends the link: the token must not differ in a byte.
    signer = TokenSigner(["secret-123"])
    url = TrackingLinks(signer=signer, public_url="https://t.example.net", send=send).click_url(destination)
    assert url == "https://t.example.net/c/" + signer.sign(claims_to_dict(TrackingClaims("click", send, destination)))


def test_honeypot_only_when_enabled() -> None:
    assert links().honeypot_url() is None
    assert links(honeypot=True).honeypot_url() is not None


def test_exclusion_config_is_validated() -> None:
    project = {"id": "p", "secret": "secret-123"}
    ok = settings_from_mapping({"projects": [{**project, "exclude_click_domains": ["example.com", "*.example.org"]}]}, {})
    assert ok.projects[0].exclude_click_domains == ("example.com", "*.example.org")
    with pytest.raises(ConfigError) as error:
        settings_from_mapping({"projects": [{**project, "exclude_click_domains": ["https://example.com/x"]}]}, {})
    assert error.value.problems[0].startswith("projects[0].exclude_click_domains: 'https://example.com/x' is not a host")
