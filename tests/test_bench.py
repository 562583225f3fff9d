"""The bench harness cannot rot: every case runs once in smoke mode (tiny sizes, real processes).

Figures from a smoke run mean nothing; what is checked is that each case starts its servers and
load generators, gets answers, passes its own correctness checks (no lost message, one stored
event per answered hit), and reports rows in the shape bench/run.py documents.
"""

from __future__ import annotations

import email
import email.policy
import json
import pkgutil
from pathlib import Path

import pytest

import bench.cases
from bench.harness import Mode, marketing_message, row, transactional_message
from bench.run import format_table, main

ROW_KEYS = {"case", "variant", "unit", "median", "min", "max", "samples", "baseline", "ratio", "budget", "met", "note"}


def test_every_case_runs_in_smoke_mode_and_reports_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "latest.json"
    assert main(["--smoke", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["smoke"] is True
    assert {"cpus", "python", "event_loop", "http_parser"} <= set(report["machine"])
    cases = {module.name for module in pkgutil.iter_modules(bench.cases.__path__)}
    assert {r["case"] for r in report["rows"]} == cases
    for r in report["rows"]:
        assert set(r) >= ROW_KEYS, r
        if r["note"].startswith("skipped"):
            continue
        assert r["min"] <= r["median"] <= r["max"], r
        assert r["median"] > 0, r
    printed = capsys.readouterr().out
    assert all(f"case {name}:" in printed for name in cases)


def test_rows_carry_ratio_and_budget_verdict() -> None:
    base = row("relay", "off", "msg/s", [100.0, 90.0, 110.0])
    on = row("relay", "on", "msg/s", [60.0, 80.0, 75.0], baseline=("off", base["samples"]), min_ratio=0.70)
    assert on["ratio"] == pytest.approx(0.75) and on["met"] is True and on["baseline"] == "off"
    slow = row("stats", "100 k", "ms", [1200.0], max_value=1000)
    assert slow["met"] is False and slow["budget"] == "<= 1000 ms"
    table = format_table([base, on, slow])
    assert "ratio >= 0.70 ok" in table and "<= 1000 ms MISSED" in table


def test_generated_messages_have_the_sizes_the_cases_name() -> None:
    assert abs(len(marketing_message(50_000, 50)) - 50_000) < 500
    parsed = email.message_from_bytes(marketing_message(50_000, 50), policy=email.policy.default)
    html = parsed.get_body(preferencelist=("html",))
    assert html is not None and str(html.get_content()).count('<a href="https://') == 50
    assert 1_500 < len(transactional_message(2_000)) < 2_500
    assert Mode(quick=True).pick(full=3, quick=2, smoke=1) == 2
    assert Mode(quick=True, smoke=True).pick(full=3, quick=2, smoke=1) == 1
