"""The tracking decision as one table: every mode × template type × campaign type × override."""

from __future__ import annotations

import itertools

import pytest

from relay.policy import Send, TemplateType, TrackingMode, decide

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
