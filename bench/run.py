"""`make bench`: run every case in bench/cases, print one table, write bench/results/latest.json.

Each case module exposes `run(quick: bool) -> list[dict]`; a row holds case, variant, unit,
median, min, max, and (against a baseline measured in the same run) baseline, ratio, budget.
Absolute figures drift on shared machines; the ratios are what to read.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import platform
import sys
from pathlib import Path

import bench.cases

RESULTS = Path(__file__).parent / "results" / "latest.json"


def machine_info() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}


def format_table(rows: list[dict]) -> str:
    header = f"{'case':<12} {'variant':<42} {'median':>10} {'min':>10} {'max':>10} {'unit':<6} {'ratio':>7}  budget"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else ""
        lines.append(
            f"{row['case']:<12} {row['variant']:<42} {row['median']:>10.3f} {row['min']:>10.3f} "
            f"{row['max']:>10.3f} {row['unit']:<6} {ratio:>7}  {row.get('budget') or ''}"
        )
    return "\n".join(lines)


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    selected = set(filter(None, os.environ.get("BENCH_CASES", "").split(",")))
    rows: list[dict] = []
    for module_info in pkgutil.iter_modules(bench.cases.__path__):
        if selected and module_info.name not in selected:
            continue
        module = importlib.import_module(f"bench.cases.{module_info.name}")
        rows.extend(module.run(quick))
    print(format_table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine_info(), "quick": quick, "rows": rows}, indent=2))
    print(f"\nwritten: {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
