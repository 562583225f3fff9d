"""The relay's minter: exclusions, own host, honeypot, idempotency check."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, settings_from_mapping
from relay.links import TrackingLinks, host_excluded
from tracking.claims import TrackingClaims
from tracking.tokens import TokenKeys, new_send_id

KEYS = TokenKeys(["secret-123"], ["p"])
SEND_ID = new_send_id()


def links(**kwargs: object) -> TrackingLinks:
    return TrackingLinks(tokens=KEYS.project("p"), base_url="https://t.example.net", send_id=SEND_ID, **kwargs)  # type: ignore[arg-type]


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


@pytest.mark.parametrize("destination", ["https://example.org/a", 'https://example.org/?q="x"&u=%C3%A9#f'])
def test_click_url_seals_exactly_the_destination(destination: str) -> None:
    url = links().click_url(destination)
    assert url is not None and url.startswith("https://t.example.net/c/")
    assert KEYS.verify(url.removeprefix("https://t.example.net/c/"), "click") == TrackingClaims("click", "p", SEND_ID, destination)


def test_links_to_any_of_the_projects_tracking_domains_are_not_wrapped() -> None:
    minter = TrackingLinks(tokens=KEYS.project("p"), base_url="https://click.shop.example", send_id=SEND_ID,
                           own_hosts=frozenset({"click.shop.example", "t.shop.example"}))
    assert minter.click_url("https://click.shop.example/c/anything") is None
    assert minter.click_url("https://T.shop.example/o/x.gif") is None
    tracked = minter.click_url("https://shop.example/")
    assert tracked is not None and tracked.startswith("https://click.shop.example/c/") and minter.is_tracking_url(tracked)
    assert minter.is_tracking_url(minter.pixel_url()) and not minter.is_tracking_url("https://click.shop.example/o/x.gif")


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
