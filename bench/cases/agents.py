"""Agent verdict costs: network lookups with ~100 k CIDRs against a linear scan, list
loading, and whole verdicts over the labelled traces.

Budgets: >= 50 k lookups/s, list load <= 3 s, >= 10 k verdicts/s.
"""

from __future__ import annotations

import ipaddress
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import Mode, row
from tracker.agents import AgentPolicy, Hit, classify
from tracker.netdata import NetworkLists, NetworkListSpec, cidr_interval

CASE = "agents"
REPO = Path(__file__).resolve().parents[2]
CIDRS = 100_000


def synthetic_cidrs(count: int, rng: random.Random) -> list[str]:
    """Half IPv4 /20-/32, half IPv6 /32-/64: Apple's egress list has that shape."""
    cidrs = []
    for _ in range(count // 2):
        length = rng.randint(20, 32)
        address = rng.getrandbits(32) >> (32 - length) << (32 - length)
        cidrs.append(f"{ipaddress.IPv4Address(address)}/{length}")
        length = rng.randint(32, 64)
        address = rng.getrandbits(128) >> (128 - length) << (128 - length)
        cidrs.append(f"{ipaddress.IPv6Address(address)}/{length}")
    return cidrs


def rounds(measure: Callable[[], float], count: int) -> list[float]:
    return [measure() for _ in range(count)]


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    mode = Mode(quick, smoke)
    rng = random.Random(20)
    cidrs = synthetic_cidrs(mode.pick(full=CIDRS, quick=CIDRS, smoke=2_000), rng)
    probes = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(mode.pick(full=5_000, quick=5_000, smoke=200))]
    probes += [cidrs[i].split("/")[0] for i in range(0, len(cidrs), 20)]  # hits as well as misses
    repeats = mode.pick(full=7, quick=3, smoke=1)

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "synthetic.txt"
        path.write_text("\n".join(cidrs) + "\n")
        spec = NetworkListSpec("synthetic", "scanner", path)

        def load() -> float:
            started = time.perf_counter()
            NetworkLists([spec])
            return time.perf_counter() - started

        loading = rounds(load, mode.pick(full=3, quick=1, smoke=1))
        lists = NetworkLists([spec], check_interval=3600)

        def bisect_rate() -> float:
            started = time.perf_counter()
            for ip in probes:
                lists.lookup(ip)
            return len(probes) / (time.perf_counter() - started)

        lookups = rounds(bisect_rate, repeats)

    # Baseline: what a plain scan over the same intervals manages.
    intervals = [cidr_interval(c) for c in cidrs]
    linear_probes = probes[: mode.pick(full=40, quick=10, smoke=2)]

    def linear_rate() -> float:
        started = time.perf_counter()
        for ip in linear_probes:
            address = ipaddress.ip_address(ip)
            value = int(address)
            any(v == address.version and first <= value <= last for v, first, last in intervals)
        return len(linear_probes) / (time.perf_counter() - started)

    linear = rounds(linear_rate, repeats)

    traces = [json.loads(line) for line in (REPO / "tests/data/agent_traces.jsonl").read_text().splitlines()]
    fixture = REPO / "tests/data/netdata"
    networks = NetworkLists(
        [
            NetworkListSpec(p.stem, agent, p)
            for p, agent in [
                (fixture / "apple-private-relay.txt", "apple_mpp"),
                (fixture / "google-fetchers.txt", "image_proxy"),
                (fixture / "microsoft-eop.txt", "scanner"),
                (fixture / "security-gateways.txt", "scanner"),
            ]
        ],
        check_interval=3600,
    )
    hits = [Hit(t["kind"], 1e9 + t["t"], t["ip"], t["ua"], t["method"], t["purpose"], 1e9, t["link"], t["honeypot"]) for t in traces]
    policy = AgentPolicy()
    for hit in hits:  # warm the user-agent cache, as a running tracker has
        classify(hit, networks=networks, policy=policy)

    def classify_rate() -> float:
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < mode.pick(full=1.0, quick=0.2, smoke=0.02):
            for hit in hits:
                classify(hit, networks=networks, policy=policy)
            count += len(hits)
        return count / (time.perf_counter() - started)

    label = f"{len(cidrs) // 1000}k-cidrs"
    return [
        row(CASE, f"lookup-{label} linear scan (baseline)", "lookups/s", linear),
        row(CASE, f"lookup-{label}", "lookups/s", lookups, baseline=(f"lookup-{label} linear scan (baseline)", linear),
            min_value=50_000),
        row(CASE, f"load-{label}", "s", loading, max_value=3),
        row(CASE, "classify-traces", "verdicts/s", rounds(classify_rate, repeats), min_value=10_000),
    ]
