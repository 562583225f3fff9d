from __future__ import annotations

import re

import pytest

from relay.rewrite import decode_attribute, link_destination, plan_html, rewrite_html

T0 = "https://track.test/c/r1/0?v=1&amp;s=ab"  # first tracked URL of DeterministicMinter, escaped for HTML
T1 = "https://track.test/c/r1/1?v=1&amp;s=ab"
PIXEL = re.compile(
    r'<img src="https://track\.test/o/r1\.gif\?v=1&amp;s=cd" width="1" height="1" alt="" border="0" style="[^"]*" aria-hidden="true" />'
)
HONEYPOT = (
    '<a href="https://track.test/h/r1" aria-hidden="true" tabindex="-1" '
    'style="display:none;mso-hide:all;font-size:0;line-height:0;max-height:0;overflow:hidden"></a>'
)


def without_markup(html: str) -> str:
    return PIXEL.sub("", html.replace(HONEYPOT, ""))


def test_links_are_tracked_and_everything_else_is_byte_identical(minter):
    html = '<P Class=x><A  title="t"\n HREF="https://example.com/a?x=1&amp;y=2#frag" id=1>A</A> <!-- note --> <area shape=rect href=\'http://example.com/b\'></P>'
    result = rewrite_html(html, minter)
    assert without_markup(result.html) == html.replace("https://example.com/a?x=1&amp;y=2#frag", T0).replace(
        "http://example.com/b", T1.replace("&amp;", "&amp;")
    )
    assert minter.destinations == ["https://example.com/a?x=1&y=2#frag", "http://example.com/b"]
    assert result.links == 2


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ('href="https://e.com/"', f'href="{T0}"'),
        ("href='https://e.com/'", f"href='{T0}'"),
        ("href=https://e.com/", "href=https://track.test/c/r1/0?v&#61;1&amp;s&#61;ab"),
    ],
)
def test_quote_style_is_kept_and_value_escaped_for_it(minter, attribute, expected):
    assert without_markup(rewrite_html(f"<a {attribute}>x</a>", minter).html) == f"<a {expected}>x</a>"


def test_new_value_escapes_quotes_of_its_style(make_minter):
    class QuotingMinter(make_minter):  # type: ignore[misc,valid-type]
        def click_url(self, destination: str) -> str | None:
            return "https://track.test/c/'q'\"d\"&"

    html = rewrite_html("<a href=\"https://e.com/\"></a><a href='https://e.com/'></a>", QuotingMinter()).html
    assert html.startswith(
        "<a href=\"https://track.test/c/'q'&quot;d&quot;&amp;\"></a><a href='https://track.test/c/&#39;q&#39;\"d\"&amp;'></a>"
    )


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("https://e.com/?a=1&amp;b=2", "https://e.com/?a=1&b=2"),
        ("https://e.com/&#47;&#x2F;&#X2f;", "https://e.com////"),
        ("https://e.com/?a=1&copy=2", "https://e.com/?a=1&copy=2"),  # historical rule: not a reference before '='
        ("https://e.com/?a=1&copyx", "https://e.com/?a=1&copyx"),  # nor before an alphanumeric
        ("https://e.com/?a=1&copy;=2", "https://e.com/?a=1©=2"),  # with ';' it always is
        ("https://e.com/&copy-x", "https://e.com/©-x"),  # legacy name without ';' followed by other text
        ("https://e.com/&notit;", "https://e.com/&notit;"),  # longest legacy prefix "not" followed by 'i'
        ("https://e.com/&unknown;", "https://e.com/&unknown;"),
        ("https://e.com/&#128;&#0;&#x110000;&#xD800;", "https://e.com/€\ufffd\ufffd\ufffd"),  # C1 as windows-1252
        ("https://e.com/&#", "https://e.com/&#"),
        ("https://e.com/&AMP;&lt", "https://e.com/&<"),
    ],
)
def test_attribute_values_decode_as_a_browser_does(raw, decoded):
    assert decode_attribute(raw) == decoded
    assert plan_html(f"<a href='{raw}'>x</a>").slots[0].destination == decoded  # the scanner's inlined decoding


def test_destination_is_the_url_a_browser_follows():
    raw = " \t https://e.com/a\n/b\r\n?q=1#frag \x01"
    assert link_destination(raw) == "https://e.com/a/b?q=1#frag"
    assert plan_html(f'<a href="{raw}">x</a>').slots[0].destination == "https://e.com/a/b?q=1#frag"


def test_historical_rule_reaches_the_minter(minter):
    rewrite_html('<a href="https://e.com/?a=1&copy=2&amp;b=3">x</a>', minter)
    assert minter.destinations == ["https://e.com/?a=1&copy=2&b=3"]


@pytest.mark.parametrize(
    "href",
    [
        "mailto:a@example.com",
        "tel:+123",
        "sms:+123",
        "#top",
        "/relative/path",
        "relative.html",
        "//example.com/protocol-relative",
        "javascript:alert(1)",
        "ftp://example.com/file",
        "http://",
        "*|UNSUB|*",
        "{{action_url}}",
        "%%unsubscribe%%",
        "https://example.com/?u={{ user.id }}",
        "https://example.com/*|EMAIL|*",
        "",
    ],
)
def test_ineligible_links_are_left_alone(minter, href):
    html = f'<a href="{href}">x</a></body>'
    result = rewrite_html(html, minter)
    assert without_markup(result.html) == html
    assert minter.calls == 0


def test_link_without_value_is_not_a_link(minter):
    html = "<a href>x</a><a href=>y</a></body>"
    assert without_markup(rewrite_html(html, minter).html) == html


@pytest.mark.parametrize("opt_out", ['data-inflight-track="off"', "DATA-INFLIGHT-TRACK='OFF'", "data-inflight-track= off "])
def test_opt_out_attribute_keeps_the_link(minter, opt_out):
    html = f'<a {opt_out} href="https://e.com/">x</a><a href="https://e.com/2" data-inflight-track="on">y</a>'
    result = rewrite_html(html, minter)
    assert minter.destinations == ["https://e.com/2"]
    assert 'href="https://e.com/"' in result.html


def test_skip_urls_and_minter_refusals_stay_untouched(make_minter):
    minter = make_minter(exclude=("*.excluded.com", "excluded.org"))
    html = (
        '<a href="https://e.com/unsub?u=1">u</a><a href="https://a.Excluded.com:8443/x">e</a><a href="https://excluded.org">o</a>'
        '<a href="https://track.test/about">own</a><a href="https://e.com/">k</a>'
    )
    result = rewrite_html(html, minter, skip_urls=frozenset({"https://e.com/unsub?u=1"}))
    assert without_markup(result.html) == html.replace('"https://e.com/"', f'"{T0}"')
    assert result.links == 1


def test_vml_button_in_conditional_comment_shares_its_twins_tracked_url(minter):
    html = (
        '<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="https://e.com/buy" arcsize="10%">'
        '<v:rect href="https://e.com/buy"></v:rect></v:roundrect><![endif]-->'
        '<!--[if !mso]><!--><a href="https://e.com/buy">Buy</a><!--<![endif]-->'
    )
    result = rewrite_html(html, minter)
    assert without_markup(result.html) == html.replace("https://e.com/buy", T0)
    assert minter.destinations == ["https://e.com/buy"] and minter.calls == 1
    assert result.links == 3


def test_links_in_plain_comments_are_not_links(minter):
    html = (
        '<!-- <a href="https://e.com/a">old</a> --><!--> <a href="https://e.com/b">b</a> <!--->x<!-- a --!><a href="https://e.com/c">c</a>'
    )
    result = rewrite_html(html, minter)
    assert minter.destinations == ["https://e.com/b", "https://e.com/c"]
    assert '<a href="https://e.com/a">' in result.html


def test_unterminated_comment_hides_the_rest(minter):
    rewrite_html('<!-- <a href="https://e.com/a">', minter)
    assert minter.destinations == []


@pytest.mark.parametrize("element", ["style", "script", "title", "textarea", "xmp", "noframes", "noembed", "iframe", "STYLE", "TiTlE"])
def test_raw_text_elements_contain_no_links(minter, element):
    html = f'<{element} type="x"><a href="https://e.com/in">x</a></{element} ><a href="https://e.com/out">y</a>'
    rewrite_html(html, minter)
    assert minter.destinations == ["https://e.com/out"]


def test_tags_named_like_special_ones_are_ordinary(minter):
    # The scanner skips tags by their first letters before it asks whether a name is special: names that share
    # letters with a, area, title, textarea, style, script, iframe, noembed, plaintext, xmp or v: are skipped whole.
    names = ["abbr", "areas", "ti", "tit", "te", "sty", "sc", "if", "iframes", "no", "pl", "plain", "xm", "v", "vx", "b", "P", "TD"]
    html = "".join(f'<{name} title="<a href=https://e.com/no{i}>">x</{name}>' for i, name in enumerate(names))
    rewrite_html(html + '<a href="https://e.com/yes">y</a>', minter)
    assert minter.destinations == ["https://e.com/yes"]


def test_link_after_unclosed_raw_text_is_not_a_link_but_after_a_closed_one_is(minter):
    rewrite_html('<title>t</title><style>a{}</style ><a href="https://e.com/1">1</a><script>x<a href="https://e.com/no">', minter)
    rewrite_html('<a href="https://e.com/2">2</a><PlainText><a href="https://e.com/no"></plaintext><a href="https://e.com/no">', minter)
    assert minter.destinations == ["https://e.com/1", "https://e.com/2"]


def test_css_urls_images_link_and_base_are_not_links(minter):
    html = (
        '<link href="https://e.com/css"><base href="https://e.com/"><img src="https://e.com/i.png">'
        '<td style="background:url(https://e.com/bg.png)" background="https://e.com/bg2.png">'
    )
    assert without_markup(rewrite_html(html, minter).html) == html
    assert minter.calls == 0


def test_markup_inside_attribute_values_is_not_a_tag(minter):
    html = """<img alt='<a href="https://e.com/no">'><div title=a"<a href=https://e.com/no2>"></div><a href="https://e.com/yes">y</a>"""
    rewrite_html(html, minter)
    assert minter.destinations == ["https://e.com/yes"]


def test_first_of_duplicate_attributes_counts(minter):
    html = '<a href="https://e.com/first" href="https://e.com/second">x</a>'
    assert without_markup(rewrite_html(html, minter).html) == f'<a href="{T0}" href="https://e.com/second">x</a>'


def test_unusual_but_valid_tag_syntax(minter):
    html = '<a/href="https://e.com/1"><a x="1"href="https://e.com/2"><a href = "https://e.com/3" /><a\thref\n=\nhttps://e.com/4>'
    rewrite_html(html, minter)
    assert minter.destinations == [f"https://e.com/{i}" for i in range(1, 5)]


def test_unterminated_tag_at_end_of_input_is_dropped(minter):
    rewrite_html('<p>text</p><a href="https://e.com/x"', minter)
    rewrite_html('<a title="never closed><a href="https://e.com/y">', minter)
    assert minter.destinations == []


def test_uppercase_scheme_is_tracked_as_written(minter):
    rewrite_html('<a href="HTTPS://E.COM/Path">x</a>', minter)
    assert minter.destinations == ["HTTPS://E.COM/Path"]


def test_undecodable_bytes_leave_the_link_alone(minter):
    rewrite_html('<a href="https://e.com/\udce9">x</a>', minter)
    assert minter.destinations == []


def test_pixel_goes_before_the_last_body_end_tag(minter):
    html = "<html><body><p>a</p></BODY><!-- </body> --><script>'</body>'</script></Body ></html>\n"
    result = rewrite_html(html, minter).html
    (pixel,) = PIXEL.finditer(result)
    assert result[pixel.end() :] == "</Body ></html>\n"
    assert result[: pixel.start()] == html[: html.index("</Body >")] + HONEYPOT


def test_pixel_goes_at_the_end_without_body_end_tag(minter):
    result = rewrite_html("<p>fragment</p>\n", minter).html
    assert result.startswith("<p>fragment</p>\n" + HONEYPOT) and PIXEL.fullmatch(result[len("<p>fragment</p>\n" + HONEYPOT) :])


def test_honeypot_only_when_the_minter_has_one(make_minter):
    result = rewrite_html("<body></body>", make_minter(honeypot=False)).html
    assert HONEYPOT not in result and "track.test/h/" not in result and len(PIXEL.findall(result)) == 1


def test_second_pass_is_a_no_op(minter, make_minter):
    once = rewrite_html('<a href="https://e.com/">x</a></body>', minter).html
    again = rewrite_html(once, make_minter())
    assert again.already_instrumented and again.html == once and again.links == 0


def test_second_pass_on_pixel_only_html_is_a_no_op(minter, make_minter):
    once = rewrite_html("<p>no links</p>", make_minter(honeypot=False)).html
    assert rewrite_html(once, make_minter(honeypot=False)).already_instrumented


def test_each_destination_is_minted_once(minter):
    result = rewrite_html('<a href="https://e.com/">1</a><a href="https://e.com/">2</a><a href=" https://e.com/&#10;">3</a>', minter)
    assert minter.calls == 1 and result.html.count(T0) == 3 and result.links == 3


def test_nested_tag_bomb_is_scanned_without_recursion(minter):
    depth = 200_000
    html = "<div><span>" * depth + '<a href="https://e.com/deep">x</a>' + "</span></div>" * depth + "<" * 50_000 + "<?><!x>" * 1000
    result = rewrite_html(html, minter)
    assert minter.destinations == ["https://e.com/deep"] and result.links == 1


def test_plan_slots_cover_link_values_only(minter):
    html = '<a class="c" href="https://e.com/x">x</a></body>'
    plan = plan_html(html)
    link, pixel = plan.slots
    assert html[link.start : link.end] == "https://e.com/x"
    assert html[link.attribute_start : link.attribute_end] == 'href="https://e.com/x"'
    assert (pixel.start, pixel.end, pixel.destination) == (html.index("</body>"), html.index("</body>"), None)


def test_body_end_tags_inside_conditional_comments_do_not_place_the_pixel(minter):
    html = '<body><p>a</p></body><!--[if mso]><a href="https://e.com/x">x</a></body><![endif]-->'
    result = rewrite_html(html, minter).html
    assert PIXEL.search(result).end() == result.index("</body>") and minter.destinations == ["https://e.com/x"]


def test_non_ascii_links_reach_the_minter_as_written(minter):
    html = '<a href="https://ex.test/ü/">a</a><a href="https://例え.jp/パス">b</a><a href=" https://ex.test/a b ">c</a>'
    result = rewrite_html(html, minter)
    assert result.links == 3
    assert minter.destinations == ["https://ex.test/ü/", "https://例え.jp/パス", "https://ex.test/a b"]


def test_links_no_location_can_name_are_left_with_the_reason():
    plan = plan_html('<a href="https://☃.example/">a</a><a href="https://ex.test:99999/ü">b</a><a href="https://e.com/">c</a>')
    assert [slot.destination for slot in plan.slots] == ["https://e.com/", None]
    assert len(plan.untrackable) == 2
    assert "☃" in plan.untrackable[0] and "port" in plan.untrackable[1]


def test_the_pixel_slot_takes_its_place_in_document_order():
    """Slots are kept compactly (README "Memory"); the pixel goes among the links where `</body>` is."""
    html = '<a href="https://e.com/1">1</a></body><a href="https://e.com/2">2</a>'
    plan = plan_html(html)
    assert [slot.destination for slot in plan.slots] == ["https://e.com/1", None, "https://e.com/2"]
    assert [slot.start for slot in plan.slots] == sorted(slot.start for slot in plan.slots)
    assert plan.slots.offsets(attributes=False).tolist() == [at for slot in plan.slots for at in (slot.start, slot.end)]
