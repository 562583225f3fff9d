import ipaddress
import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from inflight.cli import main
from tracker.netdata import (
    IntervalTable,
    NetworkLists,
    NetworkListSpec,
    NetworkMatch,
    cidr_interval,
    parse_prefixes,
    refresh,
)

APPLE_CSV = """172.224.226.0/27,GB,GB-EN,London,
172.224.226.32/31,GB,GB-EN,London,
2a02:26f7:b3c0:4000::/64,US,US-CA,Los Angeles,
"""
GOOGLE_JSON = json.dumps(
    {
        "creationTime": "2026-01-01T00:00:00.000000",
        "prefixes": [{"ipv4Prefix": "66.249.84.0/27"}, {"ipv6Prefix": "2001:4860:4801:4004::/64"}],
    }
)
MICROSOFT_JSON = json.dumps(
    [
        {"id": 2, "serviceArea": "Exchange", "urls": ["outlook.office365.com"], "ips": ["40.96.0.0/13"]},
        {
            "id": 10,
            "serviceArea": "Exchange",
            "urls": ["*.mail.protection.outlook.com"],
            "ips": ["40.107.0.0/16", "2a01:111:f400::/48"],
        },
        {"id": 46, "serviceArea": "Common", "urls": ["*.msappproxy.net"]},
    ]
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_parse_plain_text_skips_comments_and_blank_lines():
    text = "# header\n\n10.0.0.0/8\n  # indented comment\n2001:db8::/32\n"
    assert parse_prefixes(text) == ["10.0.0.0/8", "2001:db8::/32"]


def test_parse_apple_geofeed_csv_keeps_first_field():
    assert parse_prefixes(APPLE_CSV) == ["172.224.226.0/27", "172.224.226.32/31", "2a02:26f7:b3c0:4000::/64"]


def test_parse_google_json():
    assert parse_prefixes(GOOGLE_JSON) == ["66.249.84.0/27", "2001:4860:4801:4004::/64"]


def test_parse_microsoft_endpoints_takes_only_the_eop_mail_flow_set():
    assert parse_prefixes(MICROSOFT_JSON) == ["40.107.0.0/16", "2a01:111:f400::/48"]


def test_cidr_interval_masks_host_bits_and_rejects_garbage():
    assert cidr_interval("10.1.2.3/24") == (4, int(ipaddress.ip_address("10.1.2.0")), int(ipaddress.ip_address("10.1.2.255")))
    assert cidr_interval("192.0.2.7") == (4, 3221225991, 3221225991)
    for bad in ("10.0.0.0/33", "not-an-ip", "10.0.0.0/x", "2001:db8::/129"):
        with pytest.raises(ValueError):
            cidr_interval(bad)


def test_interval_table_merges_overlaps_and_checks_edges():
    table = IntervalTable([(10, 20), (15, 30), (31, 40), (50, 60)])
    assert (table.starts, table.ends) == ([10, 50], [40, 60])
    assert [table.contains(x) for x in (9, 10, 40, 41, 49, 50, 60, 61)] == [
        False,
        True,
        True,
        False,
        False,
        True,
        True,
        False,
    ]
    assert not IntervalTable([]).contains(5)


def test_lookup_reports_every_matching_list(tmp_path):
    apple = NetworkListSpec("apple", "apple_mpp", write(tmp_path / "apple.txt", APPLE_CSV))
    wide = NetworkListSpec("wide", "scanner", write(tmp_path / "wide.txt", "172.224.0.0/16\n"))
    lists = NetworkLists([apple, wide])
    assert lists.lookup("172.224.226.5") == (NetworkMatch("apple", "apple_mpp"), NetworkMatch("wide", "scanner"))
    assert lists.lookup("172.224.226.34") == (NetworkMatch("wide", "scanner"),)
    assert lists.lookup("2a02:26f7:b3c0:4000::99") == (NetworkMatch("apple", "apple_mpp"),)
    assert lists.lookup("::ffff:172.224.226.5")[0].name == "apple"  # IPv4-mapped IPv6 from dual-stack sockets
    assert lists.lookup("198.51.100.1") == ()
    assert lists.lookup("garbage") == ()
    assert lists.entries == {"apple": 3, "wide": 1}


def test_malformed_file_is_an_error_naming_file_and_entry(tmp_path):
    spec = NetworkListSpec("bad", "scanner", write(tmp_path / "bad.txt", "10.0.0.0/8\n10.0.0.0/99\n"))
    with pytest.raises(ValueError, match=r"bad\.txt.*10\.0\.0\.0/99"):
        NetworkLists([spec])


def test_spec_validation():
    with pytest.raises(ValueError, match="class must be one of"):
        NetworkListSpec("x", "human", Path("x.txt"))
    with pytest.raises(ValueError, match="unique"):
        NetworkLists([NetworkListSpec("x", "scanner", Path("a")), NetworkListSpec("x", "scanner", Path("b"))])


def test_hot_reload_after_check_interval(tmp_path):
    path = tmp_path / "list.txt"
    clock = Clock()
    lists = NetworkLists([NetworkListSpec("l", "scanner", path)], check_interval=5.0, clock=clock)
    assert lists.lookup("192.0.2.1") == ()  # missing file: empty, not an error

    write(path, "192.0.2.0/24\n")
    clock.now += 4.9
    assert lists.lookup("192.0.2.1") == ()  # not checked yet: one stat per interval, not per hit
    clock.now += 0.2
    assert lists.lookup("192.0.2.1") == (NetworkMatch("l", "scanner"),)

    os.replace(write(tmp_path / "new.txt", "198.51.100.0/24\n"), path)
    clock.now += 5
    assert lists.lookup("192.0.2.1") == ()
    assert lists.lookup("198.51.100.1") == (NetworkMatch("l", "scanner"),)


def test_broken_reload_keeps_previous_contents(tmp_path):
    path = write(tmp_path / "list.txt", "192.0.2.0/24\n")
    clock = Clock()
    lists = NetworkLists([NetworkListSpec("l", "scanner", path)], clock=clock)
    os.replace(write(tmp_path / "new.txt", "192.0.2.0/24\nnonsense\n"), path)
    clock.now += 10
    assert lists.lookup("192.0.2.1") == (NetworkMatch("l", "scanner"),)
    path.unlink()
    clock.now += 10
    assert lists.lookup("192.0.2.1") == ()  # a deleted list is deliberately empty


def test_real_lists_agree_with_a_linear_scan(shared_netdata):
    names = ["apple-private-relay", "google-fetchers", "microsoft-eop", "security-gateways"]
    agents = ["apple_mpp", "image_proxy", "scanner", "scanner"]
    specs = [NetworkListSpec(n, a, shared_netdata / f"{n}.txt") for n, a in zip(names, agents, strict=True)]
    lists = NetworkLists(specs)
    assert lists.entries["apple-private-relay"] > 10_000 and lists.entries["microsoft-eop"] >= 6
    # Reference: ipaddress's own network bounds, scanned linearly.
    networks = {
        spec.name: [
            (net.version, int(net.network_address), int(net.broadcast_address))
            for net in map(ipaddress.ip_network, parse_prefixes(spec.path.read_text()))
        ]
        for spec in specs
    }
    rng = random.Random(7)
    probes = []
    for bounds in networks.values():
        for version, first, last in rng.sample(bounds, min(25, len(bounds))):
            probes += [(version, first), (version, last), (version, first - 1), (version, last + 1)]
    probes += [(4, rng.getrandbits(32)) for _ in range(200)]
    for version, value in probes:
        address = ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
        expected = tuple(name for name, bounds in networks.items() if any(v == version and a <= value <= b for v, a, b in bounds))
        assert tuple(m.name for m in lists.lookup(str(address))) == expected, address


class Upstream:
    """A loopback HTTP server standing in for Apple, Google and Microsoft."""

    def __init__(self, routes: dict[str, tuple[int, str]]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream.requests.append(self.path)
                status, body = upstream.routes.get(self.path.split("?")[0], (404, "not found"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "Upstream":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_refresh_downloads_every_format_and_replaces_files_atomically(tmp_path):
    routes = {
        "/egress-ip-ranges.csv": (200, APPLE_CSV),
        "/fetchers-google.json": (200, GOOGLE_JSON),
        "/special.json": (200, json.dumps({"prefixes": [{"ipv4Prefix": "66.249.88.0/27"}]})),
        "/endpoints/worldwide": (200, MICROSOFT_JSON),
    }
    with Upstream(routes) as upstream:
        apple_path = write(tmp_path / "apple.txt", "203.0.113.0/24\n")
        specs = [
            NetworkListSpec("apple-private-relay", "apple_mpp", apple_path, (f"{upstream.url}/egress-ip-ranges.csv",)),
            NetworkListSpec(
                "google-fetchers",
                "image_proxy",
                tmp_path / "sub" / "google.txt",
                (f"{upstream.url}/fetchers-google.json", f"{upstream.url}/special.json"),
            ),
            NetworkListSpec(
                "microsoft-eop",
                "scanner",
                tmp_path / "eop.txt",
                (f"{upstream.url}/endpoints/worldwide?clientrequestid={{uuid}}",),
            ),
            NetworkListSpec("security-gateways", "scanner", tmp_path / "gw.txt"),
        ]
        clock = Clock()
        lists = NetworkLists(specs, clock=clock)
        inode = apple_path.stat().st_ino
        results = refresh(specs, timeout=5)

    assert [(r.name, r.entries, r.error, bool(r.skipped)) for r in results] == [
        ("apple-private-relay", 3, "", False),
        ("google-fetchers", 3, "", False),
        ("microsoft-eop", 2, "", False),
        ("security-gateways", 0, "", True),
    ]
    assert apple_path.stat().st_ino != inode  # renamed over, never rewritten in place
    text = apple_path.read_text()
    assert text.startswith("# apple-private-relay: apple_mpp networks, refreshed ")
    assert f"# source: {upstream.url}/egress-ip-ranges.csv" in text
    assert parse_prefixes(text) == ["172.224.226.0/27", "172.224.226.32/31", "2a02:26f7:b3c0:4000::/64"]
    assert parse_prefixes((tmp_path / "sub" / "google.txt").read_text()) == [
        "66.249.84.0/27",
        "2001:4860:4801:4004::/64",
        "66.249.88.0/27",
    ]
    ms_request = next(r for r in upstream.requests if r.startswith("/endpoints"))
    assert "{uuid}" not in ms_request and len(ms_request.split("clientrequestid=")[1]) == 36
    assert not list(tmp_path.glob(".*.tmp"))

    clock.now += 10  # the tracker picks refreshed files up without a restart
    assert lists.lookup("172.224.226.1")[0].name == "apple-private-relay"
    assert lists.lookup("203.0.113.1") == ()
    assert lists.lookup("40.107.3.3")[0].name == "microsoft-eop"


def test_refresh_failure_or_empty_download_keeps_the_old_file(tmp_path):
    routes = {"/empty.csv": (200, "# nothing yet\n"), "/ok.csv": (200, APPLE_CSV), "/bad.csv": (200, "1.2.3.4/40\n")}
    with Upstream(routes) as upstream:
        specs = [
            NetworkListSpec("a", "apple_mpp", write(tmp_path / "a.txt", "203.0.113.0/24\n"), (f"{upstream.url}/missing.csv",)),
            NetworkListSpec("b", "apple_mpp", write(tmp_path / "b.txt", "203.0.113.0/24\n"), (f"{upstream.url}/empty.csv",)),
            NetworkListSpec(
                "c",
                "apple_mpp",
                write(tmp_path / "c.txt", "203.0.113.0/24\n"),
                (f"{upstream.url}/ok.csv", f"{upstream.url}/bad.csv"),
            ),
        ]
        results = refresh(specs, timeout=5)
    assert "404" in results[0].error
    assert "no CIDRs" in results[1].error
    assert "1.2.3.4/40" in results[2].error
    for spec in specs:
        assert spec.path.read_text() == "203.0.113.0/24\n"


def test_cli_netdata_refresh(tmp_path, capsys):
    routes = {"/egress-ip-ranges.csv": (200, APPLE_CSV), "/special.json": (200, GOOGLE_JSON)}
    with Upstream(routes) as upstream:
        config = write(
            tmp_path / "inflight.toml",
            f"""
[tracker]
secrets = ["cli-secret-123"]
network_lists = [
  {{ agent = "apple_mpp", path = "{tmp_path}/lists/apple-private-relay.txt", upstream = ["{upstream.url}/egress-ip-ranges.csv"] }},
  {{ agent = "image_proxy", path = "{tmp_path}/lists/google.txt", upstream = ["{upstream.url}/special.json"] }},
  {{ agent = "scanner", path = "{tmp_path}/lists/gateways.txt" }},
]
[store]
url = "sqlite:///{tmp_path}/inflight.db"
[[projects]]
id = "demo"
secret = "demo-secret"
""",
        )
        assert main(["netdata", "refresh", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert f"updated apple-private-relay: 3 CIDRs -> {tmp_path}/lists/apple-private-relay.txt" in out
        assert "updated google: 2 CIDRs" in out and "skipped gateways: no upstream source" in out

        upstream.routes.pop("/special.json")
        assert main(["netdata", "refresh", "--config", str(config)]) == 1
        assert "failed  google:" in capsys.readouterr().err
    assert parse_prefixes((tmp_path / "lists" / "google.txt").read_text()) == ["66.249.84.0/27", "2001:4860:4801:4004::/64"]
