"""`make bench`: run every case in bench/cases, print one table, write bench/results/latest.json.

The contract for a case module `bench/cases/<name>.py`:

    def run(quick: bool, smoke: bool = False) -> list[dict]: ...

- default: the full measurement; the whole `make bench` stays under 5 minutes.
- quick (`BENCH_QUICK=1`): shorter rounds, fewer sizes; the whole run under 1 minute.
- smoke (`--smoke`, used by tests/test_bench.py in CI): every code path once with tiny sizes, a
  few seconds per case, so the harness cannot rot. Figures from a smoke run mean nothing.

A case returns rows built with `bench.harness.row` (case, variant, unit, median, min, max, samples,
and, against a baseline measured in the same run, baseline, ratio, budget, met) or
`bench.harness.skipped` (with the reason) when something it needs is absent. A case raises when
the product misbehaves under load (a lost message, an event not stored): a fast wrong answer is
not a result. Servers and load generators run in separate processes (`bench.harness.Child`).
Absolute figures drift on shared machines; the ratios are what to read.

    python -m bench.run [--quick] [--smoke] [--cases relay,tracker] [--output PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import bench.cases

RESULTS = Path(__file__).parent / "results" / "latest.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    """What the figures depend on: cores, interpreter, event loop and HTTP parser of the servers."""
    uvloop, httptools = _version("uvloop"), _version("httptools")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "event_loop": f"uvloop {uvloop}" if uvloop else "asyncio",
        "http_parser": f"httptools {httptools}" if httptools else f"h11 {_version('h11')}",
        "uvicorn": _version("uvicorn"),
        "aiosmtpd": _version("aiosmtpd"),
        "commit": commit,
    }


def collect(*, quick: bool, smoke: bool, selected: set[str] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for module_info in pkgutil.iter_modules(bench.cases.__path__):
        if selected and module_info.name not in selected:
            continue
        module = importlib.import_module(f"bench.cases.{module_info.name}")
        started = time.monotonic()
        case_rows = module.run(quick, smoke=smoke)
        print(f"case {module_info.name}: {len(case_rows)} row(s) in {time.monotonic() - started:.1f} s", flush=True)
        rows.extend(case_rows)
    return rows


def _figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_table(rows: list[dict[str, Any]]) -> str:
    case_width = max([len(r["case"]) for r in rows] + [4])
    variant_width = max([len(r["variant"]) for r in rows] + [7])
    header = (f"{'case':<{case_width}} {'variant':<{variant_width}} {'median':>8} {'min':>8} {'max':>8} {'unit':<6} "
              f"{'ratio':>6}  budget")
    lines = [header, "-" * (len(header) + 20)]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else ""
        verdict = {True: " ok", False: " MISSED", None: ""}[r.get("met")]
        budget = f"{r.get('budget') or ''}{verdict}"
        lines.append(
            f"{r['case']:<{case_width}} {r['variant']:<{variant_width}} {_figure(r['median']):>8} {_figure(r['min']):>8} "
            f"{_figure(r['max']):>8} {r['unit']:<6} {ratio:>6}  {budget}"
        )
        details = [f"vs {r['baseline']}" if r.get("baseline") else "", r.get("note") or ""]
        if any(details):
            lines.append(f"{'':<{case_width}} {'':<{variant_width}}   ({'; '.join(d for d in details if d)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description="inflight's performance harness")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                        help="short rounds, whole run under a minute (also BENCH_QUICK=1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness, not the speed")
    parser.add_argument("--cases", default=os.environ.get("BENCH_CASES", ""),
                        help="comma-separated case names (also BENCH_CASES); default: all")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    machine = machine_info()
    print(" ".join(f"{key}={value}" for key, value in machine.items()), flush=True)
    rows = collect(quick=args.quick, smoke=args.smoke, selected=set(filter(None, args.cases.split(","))))
    elapsed = time.monotonic() - started
    print()
    print(format_table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "quick": args.quick, "smoke": args.smoke, "seconds": round(elapsed, 1), "rows": rows}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\n{len(rows)} rows in {elapsed:.0f} s; written: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
