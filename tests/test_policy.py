"""The tracking decision as one table (every mode × template type × campaign type × override), then through SMTP."""

from __future__ import annotations

import email.policy
import itertools
import re
from pathlib import Path

import pytest

from config.settings import TrackingMode
from relay.policy import Send, TemplateType, decide
from tests.conftest import PROJECT, PROJECT_SECRET, RunningService, Sink, make_settings
from tests.test_flow import events, html_message, send, tracked_urls

TYPES = [None, *TemplateType]
OVERRIDES = [None, True, False]


def expected(mode: TrackingMode, template: TemplateType | None, campaign: TemplateType | None,
             override: bool | None, allow_override: bool) -> bool:
    """The rules restated independently from shared/seed-tracking.md and plunk-reference.md."""
    if override is False or (override is True and allow_override):
        return bool(override)
    if mode == TrackingMode.ENABLED:
        return True
    if mode == TrackingMode.DISABLED:
        return False
    transactional = TemplateType.TRANSACTIONAL in (template, campaign) or (template is None and campaign is None)
    return not transactional


CASES = list(itertools.product(TrackingMode, TYPES, TYPES, OVERRIDES, [True, False]))


@pytest.mark.parametrize(("mode", "template", "campaign", "override", "allow_override"), CASES)
def test_decision_table(mode: TrackingMode, template: TemplateType | None, campaign: TemplateType | None,
                        override: bool | None, allow_override: bool) -> None:
    decision = decide(mode, Send(template, campaign, override), allow_override=allow_override)
    assert decision.tracked is expected(mode, template, campaign, override, allow_override)
    assert f"mode={mode.value}" in decision.reason


def test_table_covers_every_combination() -> None:
    assert len(CASES) == 3 * 4 * 4 * 3 * 2


def test_reason_names_what_decided() -> None:
    decision = decide(TrackingMode.MARKETING_ONLY, Send(template_type=TemplateType.TRANSACTIONAL))
    assert decision.describe() == "tracked=false mode=MARKETING_ONLY template_type=TRANSACTIONAL"
    refused = decide(TrackingMode.DISABLED, Send(override=True), allow_override=False)
    assert not refused.tracked and "override=on-refused" in refused.reason


# Through SMTP: what the upstream receives for each mode and engine.

TRACKING_SET, QUIET_SET = "inflight-tracking", "inflight-no-tracking"
SENDS: list[tuple[dict[str, str], TemplateType | None, TemplateType | None, bool | None]] = [
    ({}, None, None, None),
    ({"X-Inflight-Template-Type": "TRANSACTIONAL"}, TemplateType.TRANSACTIONAL, None, None),
    ({"X-Inflight-Template-Type": "MARKETING"}, TemplateType.MARKETING, None, None),
    ({"X-Inflight-Campaign-Type": "HEADLESS"}, None, TemplateType.HEADLESS, None),
    ({"X-Inflight-Template-Type": "MARKETING", "X-Inflight-Tracking": "off"}, TemplateType.MARKETING, None, False),
    ({"X-Inflight-Tracking": "on"}, None, None, True),
]


def configuration_sets(data: bytes) -> list[bytes]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return re.findall(rb"(?im)^x-ses-configuration-set: *(.*?)\r?$", head)


def body(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("engine", ["relay", "provider"])
@pytest.mark.parametrize("mode", list(TrackingMode))
def test_upstream_message_per_mode_and_engine(tmp_path: Path, sink: Sink, engine: str, mode: TrackingMode) -> None:
    settings = make_settings(
        tmp_path, sink.url,
        upstream={"tracking_engine": engine, "configuration_set": TRACKING_SET, "no_tracking_configuration_set": QUIET_SET},
        projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": mode.value}],
    )
    with RunningService(settings) as service:
        originals = []
        for headers, *_ in SENDS:
            # The app's own choice of configuration set, in another case, must not survive.
            original = html_message({**headers, "x-ses-configuration-set": "app-choice"}).as_bytes(policy=email.policy.SMTP)
            originals.append(original)
            send(service.smtp_port, original)
        assert len(sink.messages) == len(SENDS)
        sent = {e["message_id"]: e for e in events(service)}
        for (_, template, campaign, override), original, delivered in zip(SENDS, originals, sink.messages, strict=True):
            tracked = expected(mode, template, campaign, override, allow_override=True)
            assert configuration_sets(delivered.data) == [(TRACKING_SET if tracked else QUIET_SET).encode()]
            if tracked and engine == "relay":
                assert len(tracked_urls(delivered.data)) == 2  # link and pixel: all or nothing
            else:
                assert body(delivered.data) == body(original)  # never rewritten
            [event] = [e for e in sent.values() if e["message_id"] in delivered.data.decode()]
            assert event["tracked"] is tracked
            assert f"mode={mode.value}" in event["reason"]
            assert ("engine=provider" in event["reason"]) is (engine == "provider")


def test_refused_override_is_visible_in_events(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, projects=[
        {"id": PROJECT, "secret": PROJECT_SECRET, "tracking": "DISABLED", "allow_tracking_override": False}])
    with RunningService(settings) as service:
        original = html_message({"X-Inflight-Tracking": "on", "X-Inflight-Template-Type": "MARKETING"})
        send(service.smtp_port, original)
        [delivered] = sink.messages
        assert tracked_urls(delivered.data) == []
        [event] = events(service)
        assert event["tracked"] is False
        assert event["reason"] == "mode=DISABLED template_type=MARKETING override=on-refused"


def test_app_configuration_set_passes_through_when_the_relay_has_none(tmp_path: Path, sink: Sink) -> None:
    """With no configuration sets configured the header is the app's business (see README)."""
    with RunningService(make_settings(tmp_path, sink.url)) as service:
        send(service.smtp_port, html_message({"X-SES-Configuration-Set": "app-choice"}))
        assert configuration_sets(sink.messages[0].data) == [b"app-choice"]


def test_only_the_no_tracking_set_still_replaces_the_app_header(tmp_path: Path, sink: Sink) -> None:
    settings = make_settings(tmp_path, sink.url, upstream={"no_tracking_configuration_set": QUIET_SET})
    with RunningService(settings) as service:
        send(service.smtp_port, html_message({"X-SES-CONFIGURATION-SET": "app-choice"}))  # tracked by the relay
        send(service.smtp_port, html_message({"X-Inflight-Tracking": "off", "x-ses-configuration-set": "app-choice"}))
        tracked, untracked = sink.messages
        assert configuration_sets(tracked.data) == [] and len(tracked_urls(tracked.data)) == 2
        assert configuration_sets(untracked.data) == [QUIET_SET.encode()]
