"""WHATWG URL serialisation of links as written in mail: what a browser requests, and so the redirect's Location."""

from __future__ import annotations

import pytest

from tracking.urls import UnserialisableUrl, browser_url, redirect_location


@pytest.mark.parametrize(("link", "expected"), [
    ("https://ex.test/ü/", "https://ex.test/%C3%BC/"),
    ("https://例え.jp/パス", "https://xn--r8jz45g.jp/%E3%83%91%E3%82%B9"),
    ("https://例え。jp/", "https://xn--r8jz45g.jp/"),  # UTS #46 maps the ideographic full stop to '.'
    ("https://Bücher.Example/", "https://xn--bcher-kva.example/"),  # mapped to lower case first
    ("https://ex%C3%BC.test/ü", "https://xn--ex-yka.test/%C3%BC"),  # a percent-encoded host is decoded
    ("https://ex.test/spring sale/", "https://ex.test/spring%20sale/"),
    ("https://ex.test/ü?q=ü x&r='1'#ü ü", "https://ex.test/%C3%BC?q=%C3%BC%20x&r=%271%27#%C3%BC%20%C3%BC"),
    ("https://ex.test/ü/{a}|`b`", "https://ex.test/%C3%BC/%7Ba%7D|%60b%60"),  # the path percent-encode set
    ("HTTPS://Ex.Test:443/ä/../b/./c", "https://ex.test/b/c"),  # default port dropped, dot segments resolved
    ("https://ex.test:08080/ü", "https://ex.test:8080/%C3%BC"),
    ("https://ex.test\\ü\\x", "https://ex.test/%C3%BC/x"),  # '\\' is '/' in http(s) URLs
    ("https://usér:pä@ex.test/", "https://us%C3%A9r:p%C3%A4@ex.test/"),
    ("  https://ex.test/\tü\n ", "https://ex.test/%C3%BC"),  # edges stripped, tab and newline removed
    ("https://ex.test/a b?", "https://ex.test/a%20b?"),  # an empty query stays
    ("https:///ü", "https://xn--tda/"),  # the authority starts after any number of slashes
])
def test_links_beyond_ascii_serialise_as_browsers_do(link: str, expected: str) -> None:
    assert browser_url(link) == expected
    assert redirect_location(link) == expected


@pytest.mark.parametrize("link", [
    "https://example.com/x?a=1&b=2", "https://EXAMPLE.com", "https://example.com/a|b/{c}?q=<x>&s='t'#frag",
])
def test_visible_ascii_links_are_their_own_location(link: str) -> None:
    assert browser_url(link) == link == redirect_location(link)


def test_a_link_is_its_own_location_exactly_when_all_visible_ascii_but_backslash() -> None:
    for code in range(0x180):  # the shortcut for the common link must agree with serialising it
        link = f"https://e.com/a{chr(code)}b"
        assert (browser_url(link) == link) is (0x21 <= code <= 0x7E and code != 0x5C), hex(code)


@pytest.mark.parametrize(("link", "why"), [
    ("https://☃.example/snow", "not an internationalised domain name"),
    ("https://a\u200db.test/ü", "not an internationalised domain name"),
    ("https://-ü.test/", "not an internationalised domain name"),
    ("https://ex%FF.test/ü", "not UTF-8"),
    ("https://ex ü.test/", "not an internationalised domain name"),
    ("https://ex.test /ü", "no host may have"),
    ("https://:80/ü", "no host may have"),
    ("https://ex.test:99999/ü", "port"),
    ("https://ex.test:8a/ü", "port"),
    ("https://[::1/ü", "IPv6"),
    ("ftp://ex.test/ü", "http(s)"),
    ("https://ex.test/\udcff", "not text"),
])
def test_links_without_a_serialisation_say_why(link: str, why: str) -> None:
    with pytest.raises(UnserialisableUrl, match=why if why != "http(s)" else r"http\(s\)"):
        browser_url(link)
    assert redirect_location(link) is None


@pytest.mark.parametrize("link", ["http://[::1]A", "http://a:99999/", "http://[zz]/", "javascript:x"])
def test_no_location_clients_would_refuse(link: str) -> None:
    assert redirect_location(link) is None


@pytest.mark.parametrize("link", ["http://例え.jp-", "http://例え.jp;", "http://例え.-jp/"])
def test_every_label_of_an_internationalised_host_is_checked(link: str) -> None:
    # Clients validate a host with punycode in it as a whole (httpx refuses to follow `xn--r8jz45g.jp-`).
    with pytest.raises(UnserialisableUrl, match="not an internationalised domain name"):
        browser_url(link)
