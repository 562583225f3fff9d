"""Network lists: operator data naming the networks machine traffic comes from.

Each list is a file named in config and labelled with the machine class its addresses
imply (`apple_mpp`, `image_proxy`, `scanner`). The lists go stale (Apple and Google
republish theirs often), so they are data the operator refreshes (`inflight netdata
refresh`) and the tracker re-reads when a file changes, never code.

Lookups must stay fast with ~100 k CIDRs (Apple's raw egress CSV alone holds hundreds of
thousands of rows): each list is merged into sorted, disjoint integer intervals per address
family and searched with `bisect`, O(log n) per list instead of a scan.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from config.settings import NETWORK_CLASSES, NetworkListSettings, Settings

log = logging.getLogger("inflight.netdata")

# Official upstream sources, used by `refresh` for a list of this name unless its config
# gives `upstream` URLs of its own. Barracuda, Proofpoint and Mimecast publish theirs only
# as web pages, so a `security-gateways` list is kept by hand (see shared/netdata/README.md).
OFFICIAL_UPSTREAMS: dict[str, tuple[str, ...]] = {
    # Apple, "Prepare your network or web server for iCloud Private Relay"
    # (developer.apple.com/support/prepare-your-network-for-icloud-private-relay): the
    # egress ranges as an RFC 8805 geofeed CSV. Mail Privacy Protection fetches through them.
    "apple-private-relay": ("https://mask-api.icloud.com/egress-ip-ranges.csv",),
    # Google, "Google's common crawlers / user-triggered fetchers" IP range files; the Gmail
    # image proxy (GoogleImageProxy) egresses from user-triggered-fetchers-google.
    "google-fetchers": (
        "https://developers.google.com/static/crawling/ipranges/user-triggered-fetchers-google.json",
        "https://developers.google.com/static/crawling/ipranges/special-crawlers.json",
        "https://developers.google.com/static/crawling/ipranges/user-triggered-fetchers.json",
    ),
    # Microsoft 365 endpoints web service; the service wants a fresh client request id.
    "microsoft-eop": ("https://endpoints.office.com/endpoints/worldwide?clientrequestid={uuid}",),
}

# In the Microsoft 365 endpoints JSON the Exchange Online Protection mail-flow set (ID 10
# when written) is the one whose URLs are *.mail.protection.outlook.com; Safe Links and
# delivery-time detonation run there. Other sets (e.g. ID 2, client submission, or the
# Outlook on the web ranges) carry real users and are not taken.
_EOP_URL_SUFFIX = "mail.protection.outlook.com"


@dataclass(frozen=True)
class NetworkListSpec:
    """One configured list: `name` appears in verdict reasons (`net=NAME`)."""

    name: str
    agent: str
    path: Path
    upstream: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.agent not in NETWORK_CLASSES:
            raise ValueError(f"network list {self.name!r}: class must be one of {', '.join(NETWORK_CLASSES)}, not {self.agent!r}")

    @property
    def sources(self) -> tuple[str, ...]:
        return self.upstream or OFFICIAL_UPSTREAMS.get(self.name, ())


def network_specs(lists: Sequence[NetworkListSettings]) -> list[NetworkListSpec]:
    """The configured `[[tracker.network_lists]]`, validated by config.settings already."""
    return [NetworkListSpec(entry.list_name, entry.agent, Path(entry.path), entry.upstream) for entry in lists]


@dataclass(frozen=True)
class NetworkMatch:
    name: str
    agent: str


def parse_prefixes(text: str) -> list[str]:
    """The CIDR strings in a list file, in any of the formats the upstreams publish.

    Plain text (one CIDR per line, `#` comments), Apple's geofeed CSV (`cidr,country,
    region,city,` — only the first field is kept), Google's JSON (`{"prefixes": [{"ipv4Prefix":
    ...}, {"ipv6Prefix": ...}]}`) and the Microsoft 365 endpoints JSON (a list of endpoint sets;
    only the EOP mail-flow set is taken).
    """
    stripped = text.lstrip()
    if stripped.startswith("{"):
        document = json.loads(text)
        return [
            prefix.get("ipv4Prefix") or prefix.get("ipv6Prefix")
            for prefix in document.get("prefixes", [])
            if prefix.get("ipv4Prefix") or prefix.get("ipv6Prefix")
        ]
    if stripped.startswith("["):
        return [
            ip
            for endpoint_set in json.loads(text)
            if any(url.endswith(_EOP_URL_SUFFIX) for url in endpoint_set.get("urls", []))
            for ip in endpoint_set.get("ips", [])
        ]
    prefixes = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prefixes.append(line.split(",", 1)[0].strip())
    return prefixes


def cidr_interval(prefix: str) -> tuple[int, int, int]:
    """`(version, first, last)` address integers of a CIDR; host bits are ignored, as
    Apple's CSV has been seen to carry them. Raises ValueError on anything else."""
    address, slash, length = prefix.partition("/")
    ip = ipaddress.ip_address(address)
    bits = ip.max_prefixlen
    prefix_len = int(length) if slash else bits
    if not 0 <= prefix_len <= bits:
        raise ValueError(f"{prefix!r}: prefix length out of range")
    host_bits = bits - prefix_len
    first = int(ip) >> host_bits << host_bits
    return ip.version, first, first + (1 << host_bits) - 1


class IntervalTable:
    """Disjoint sorted intervals for one address family; `contains` is one bisect."""

    __slots__ = ("ends", "starts")

    def __init__(self, intervals: Sequence[tuple[int, int]]) -> None:
        starts: list[int] = []
        ends: list[int] = []
        for first, last in sorted(intervals):
            if ends and first <= ends[-1] + 1:
                ends[-1] = max(ends[-1], last)
            else:
                starts.append(first)
                ends.append(last)
        self.starts = starts
        self.ends = ends

    def contains(self, address: int) -> bool:
        index = bisect.bisect_right(self.starts, address) - 1
        return index >= 0 and address <= self.ends[index]

    def __len__(self) -> int:
        return len(self.starts)


@dataclass(frozen=True)
class LoadedList:
    spec: NetworkListSpec
    version: tuple[int, int, int] | None
    entries: int
    v4: IntervalTable
    v6: IntervalTable


def load_list(spec: NetworkListSpec) -> LoadedList:
    """Read one list file. A missing file is an empty list (a fresh install has not run
    `netdata refresh` yet; pixels must still be served); a malformed line is an error
    naming the file and line."""
    try:
        stat = spec.path.stat()
        text = spec.path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fix = "run `inflight netdata refresh`" if spec.sources else "write it by hand (it has no upstream)"
        log.warning("netdata list=%s path=%s missing: no addresses loaded; %s", spec.name, spec.path, fix)
        return LoadedList(spec, None, 0, IntervalTable(()), IntervalTable(()))
    intervals: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    prefixes = parse_prefixes(text)
    for prefix in prefixes:
        try:
            family, first, last = cidr_interval(prefix)
        except ValueError as exc:
            raise ValueError(f"{spec.path}: not a CIDR: {prefix!r} ({exc})") from None
        intervals[family].append((first, last))
    return LoadedList(spec, _file_version(stat), len(prefixes), IntervalTable(intervals[4]), IntervalTable(intervals[6]))


def _file_version(stat: os.stat_result) -> tuple[int, int, int]:
    # mtime alone can repeat within the filesystem's timestamp granularity; an atomic
    # rename always brings a new inode.
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class NetworkLists:
    """The configured lists, re-read when a file's mtime changes.

    The change check costs one `stat` per list and runs at most every `check_interval`
    seconds, inside `lookup`, so no background task or restart is needed. A file that
    became unreadable or malformed keeps its previous contents, logged, rather than
    silently turning every machine into a human.
    """

    def __init__(
        self,
        specs: Sequence[NetworkListSpec],
        *,
        check_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"network list names must be unique, got {names}")
        self._clock = clock
        self._check_interval = check_interval
        self._lists = tuple(load_list(spec) for spec in specs)
        self._checked_at = clock()

    @property
    def entries(self) -> dict[str, int]:
        """CIDR count per list name, as read from its file."""
        return {loaded.spec.name: loaded.entries for loaded in self._lists}

    def reload_if_changed(self) -> None:
        self._checked_at = self._clock()
        fresh = []
        for loaded in self._lists:
            try:
                version: tuple[int, int, int] | None = _file_version(loaded.spec.path.stat())
            except FileNotFoundError:
                version = None
            if version == loaded.version:
                fresh.append(loaded)
                continue
            try:
                fresh.append(load_list(loaded.spec))
                log.info("netdata list=%s reloaded entries=%d", loaded.spec.name, fresh[-1].entries)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                log.warning("netdata list=%s reload failed, keeping previous: %s", loaded.spec.name, exc)
                fresh.append(loaded)
        self._lists = tuple(fresh)

    def lookup(self, ip: str) -> tuple[NetworkMatch, ...]:
        """Every list containing `ip`; empty for an unparsable address."""
        if self._clock() - self._checked_at >= self._check_interval:
            self.reload_if_changed()
        parsed = _address(ip)
        if parsed is None:
            return ()
        version, value = parsed
        return tuple(
            NetworkMatch(loaded.spec.name, loaded.spec.agent)
            for loaded in self._lists
            if (loaded.v4 if version == 4 else loaded.v6).contains(value)
        )


@functools.lru_cache(maxsize=4096)  # parsing costs more than the lookup; clients repeat; bounded: client input
def _address(ip: str) -> tuple[int, int] | None:
    """(IP version, integer value) of an address, an IPv4-mapped IPv6 one as IPv4; None if unparsable."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.version, int(address)


@dataclass
class RefreshResult:
    name: str
    path: Path
    entries: int = 0
    skipped: str = ""
    error: str = ""
    sources: list[str] = field(default_factory=list)


def _download(url: str, timeout: float) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": "inflight-netdata-refresh"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode("utf-8")


def refresh(
    specs: Sequence[NetworkListSpec],
    *,
    timeout: float = 30.0,
    download: Callable[[str, float], str] = _download,
) -> list[RefreshResult]:
    """Download every list that has upstream sources and replace its file atomically.

    A list is replaced only when all its sources downloaded and parsed to at least one
    valid CIDR: a failed or empty download keeps the old file, since an empty list would
    quietly relabel machine traffic as human. The file is written as plain CIDR text with
    a header naming the sources, then renamed over the old one, so the tracker's hot
    reload never reads half a file.
    """
    results = []
    for spec in specs:
        result = RefreshResult(spec.name, spec.path)
        results.append(result)
        if not spec.sources:
            result.skipped = "no upstream source (kept by hand)"
            continue
        prefixes: list[str] = []
        try:
            for source in spec.sources:
                url = source.replace("{uuid}", str(uuid.uuid4()))
                result.sources.append(source)
                try:
                    text = download(url, timeout)
                except OSError as exc:  # urllib's message names no URL: say which one could not be fetched
                    reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or exc
                    raise OSError(f"{source}: download failed: {reason}") from None
                got = parse_prefixes(text)
                if not got:
                    raise ValueError(f"{source}: no CIDRs in the response")
                for prefix in got:
                    try:
                        cidr_interval(prefix)
                    except ValueError:
                        raise ValueError(f"{source}: not a CIDR: {prefix!r}") from None
                prefixes.extend(got)
        except (OSError, ValueError) as exc:
            result.error = str(exc)
            continue
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        header = [f"# {spec.name}: {spec.agent} networks, refreshed {stamp} by inflight netdata refresh"]
        header += [f"# source: {source}" for source in spec.sources]
        _write_atomically(spec.path, "\n".join(header + prefixes) + "\n")
        result.entries = len(prefixes)
    return results


def missing_lists(settings: Settings, config: Path) -> list[str]:
    """A warning per configured list whose file does not exist yet: every hit from those networks
    would be judged without them (a fresh install has not run `netdata refresh`)."""
    warnings = []
    for index, entry in enumerate(settings.tracker.network_lists):
        spec = network_specs([entry])[0]
        if spec.path.exists():
            continue
        fix = (f"run `inflight netdata refresh --config {config}`" if spec.sources
               else "this list has no upstream: write it by hand (one CIDR a line)")
        warnings.append(f"tracker.network_lists[{index}] ({spec.name}): {spec.path} is missing, so its "
                        f"{spec.agent} networks are not recognised; {fix}")
    return warnings


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
