"""Settings: one frozen object built once from TOML plus environment, then passed down.

Every key is validated at start and unknown keys are errors, because a typo in a relay's
config (say `alow_plaintext_auth`) silently falling back to a default is how mail goes
astray. Each problem names its key and the fix; all problems are reported at once.

`INFLIGHT_<SECTION>_<KEY>` overrides a scalar of a section (e.g. `INFLIGHT_UPSTREAM_URL`);
list keys take a comma-separated value.

A secret key (a field with `SECRET` metadata) can instead be read from a file: `<key>_file`
(and `INFLIGHT_<SECTION>_<KEY>_FILE`), so secrets can live in mounted files (Docker/Kubernetes
secrets) rather than in the config. Secret values never appear in a repr or a config error.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import enum
import functools
import ipaddress
import os
import re
import socket
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from config.dkim_keys import load_key
from store.sqlite import sqlite_path

DEFAULT_CONFIG = "config/dev.toml"
# INFLIGHT_* variables that are not config overrides: the config path, and the test suite's and the
# bench's switches (README, Tests; INFLIGHT_TEST_* and INFLIGHT_BENCH_* are theirs). Any other
# INFLIGHT_* variable must name a key, so a typo is an error as in TOML.
NON_CONFIG_VARIABLES = frozenset({"INFLIGHT_CONFIG", "INFLIGHT_REQUIRE_PG", "INFLIGHT_CORPUS", "INFLIGHT_NETDATA"})
NON_CONFIG_PREFIXES = ("INFLIGHT_TEST_", "INFLIGHT_BENCH_")
_T = typing.TypeVar("_T")


class TrackingMode(StrEnum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    MARKETING_ONLY = "MARKETING_ONLY"


class SuppressionMode(StrEnum):
    """What the relay does with a recipient on the project's suppression list."""

    REFUSE = "refuse"  # 550 5.1.1 at RCPT, naming the reason; the other recipients go
    OFF = "off"  # the list is kept but not enforced


class IpMode(StrEnum):
    """How much of a client address the store keeps (tracker/privacy.py says why)."""

    FULL = "full"
    TRUNCATED = "truncated"
    NONE = "none"


# The machine classes a network list can name (tracker/netdata.py reads the lists).
NETWORK_CLASSES = ("apple_mpp", "image_proxy", "scanner")

# Field metadata of a secret: readable from `<key>_file`, left out of repr and error messages.
SECRET = {"secret": True}
STORE_URL_PREFIXES = ("sqlite:///", "postgresql://", "postgres://")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem, naming the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# What a message in flight may cost in memory per byte of its size (received or sent, the larger): the budget
# relay.max_inflight_bytes is counted in (README "Memory").
MEMORY_PER_MESSAGE_BYTE = 3


def default_inflight_bytes() -> int:
    """A quarter of the machine's memory: what messages in flight may hold before new DATA waits."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 1 << 30
@functools.cache
def machine_fqdn() -> str:
    """This machine's fully qualified name: the EHLO name and Message-ID domain unless `relay.hostname` says
    otherwise (an invented name such as relay.example.com in EHLO looks like spam to upstreams and DMARC reports)."""
    return socket.getfqdn()


@dataclass(frozen=True)
class RelaySettings:
    listen: str = "127.0.0.1:2525"
    hostname: str = field(default_factory=machine_fqdn)
    tls_cert: str = ""
    tls_key: str = ""
    allow_plaintext_auth: bool = False
    max_message_bytes: int = 26_214_400
    max_recipients: int = 50
    smtps_listen: str = ""  # implicit-TLS listener (port 465 style); empty = off
    require_tls: bool = False  # no MAIL before STARTTLS on the plain listener
    auth_failures_per_ip: int = 10  # failed AUTHs from one address (IPv6: its /64) before back-off
    auth_failures_per_user: int = 20  # failed AUTHs for one username, from addresses not known good
    auth_backoff_seconds: int = 60  # first refusal period; doubles per further failure, at most 1 h
    auth_failure_window_seconds: int = 900  # failures are forgotten this long after the last one or its refusal
    # SIGTERM: stop accepting, let open transactions finish for at most this long, then exit.
    drain_timeout_seconds: float = 25.0
    # Processes that parse, rewrite and sign large messages off the event loop (see bench/cases/isolation.py).
    cpu_workers: int = 2
    # SMTP worker processes sharing the listening sockets (README "Workers"); 1 runs the relay in one process.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Bytes of messages held in memory at once, all workers together; beyond it DATA waits, then 452 4.3.1.
    max_inflight_bytes: int = field(default_factory=default_inflight_bytes)
    http_listen: str = ""  # host:port of the relay's own HTTP listener (/metrics, /healthz); empty = none


@dataclass(frozen=True)
class NetworkListSettings:
    """One `[[tracker.network_lists]]` entry: a file of CIDRs whose traffic is `agent`.

    `name` (default: the file name without extension) appears in verdict reasons and picks
    the official upstream for `inflight netdata refresh` unless `upstream` lists URLs.
    """

    agent: str
    path: str
    name: str = ""
    upstream: tuple[str, ...] = ()

    @property
    def list_name(self) -> str:
        return self.name or Path(self.path).stem


@dataclass(frozen=True)
class TrackerSettings:
    listen: str = "127.0.0.1:8080"
    public_url: str = "http://127.0.0.1:8080"
    secrets: tuple[str, ...] = field(default=("change-me",), repr=False, metadata=SECRET)
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)
    network_lists: tuple[NetworkListSettings, ...] = ()
    sent_window_seconds: float = 5.0
    # Tokens minted before opaque ones (readable HMAC-signed JSON) keep verifying while true.
    legacy_tokens: bool = True
    # Where tracking domains must point (the reverse proxy's public IPs); empty: public_url's host's.
    public_addresses: tuple[str, ...] = ()
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # HTTP worker processes (README "Workers")
    # Who may read /metrics on the public tracker port (project ids and volumes are not for everyone).
    metrics_allow: tuple[str, ...] = ("127.0.0.1", "::1")
    # A pixel or a redirect is answered within this, whatever the disk or the store do (README: Spool).
    answer_budget_ms: int = 50
    # Hits are stored by a process of their own beside each worker, off the answering event loop
    # (README: Spool); false stores them in the answering process (one process less per worker).
    store_process: bool = True


@dataclass(frozen=True)
class DashboardSettings:
    enabled: bool = True  # nobody can sign in before `inflight users add`
    listen: str = ""  # host:port of a listener of its own; empty = on the tracker, under /dashboard


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class LogSettings:
    format: LogFormat = LogFormat.TEXT  # text: key=value lines; json: one object per line
    access_log: bool = False  # the tracker logs one line per HTTP request (inflight.access)


@dataclass(frozen=True)
class StoreSettings:
    # sqlite:///path (one box) or postgresql://user:password@host:port/db (several nodes); may carry
    # a password, hence `url_file` and never logged.
    url: str = field(default="sqlite:///var/inflight.db", repr=False, metadata=SECRET)
    purge_interval_seconds: float = 3600.0  # how often events past a project's retention_days are deleted
    spool_dir: str = ""  # the local journal in front of the store (README: Spool); "" = beside the SQLite file

    @property
    def spool_path(self) -> Path:
        """`spool_dir`, else `spool/` beside the SQLite file (var/spool by default), else var/spool."""
        if self.spool_dir:
            return Path(self.spool_dir)
        if self.url.startswith("sqlite:///"):
            return sqlite_path(self.url).parent / "spool"
        return Path("var/spool")


@dataclass(frozen=True)
class WebhookSettings:
    timeout_seconds: float = 10.0  # per POST, connect to last byte
    retry_initial_seconds: float = 10.0  # first retry delay; doubles per failed attempt
    retry_max_seconds: float = 3600.0  # cap on one delay
    retry_hours: int = 72  # an event is given up this long after it was recorded (at least 24)
    poll_seconds: float = 1.0  # how often the outbox is read for rows other processes wrote
    concurrency: int = 16  # POSTs in flight per process


@dataclass(frozen=True)
class FeedbackSettings:
    """Amazon SES notifications through SNS (`POST /v1/feedback/ses`)."""

    # SNS signs with a certificate it serves from its own regional hosts; a message naming any
    # other URL is refused before anything is fetched (AWS: "Verifying the signatures of Amazon SNS messages").
    ses_cert_url_pattern: str = r"^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/"
    ses_topic_arns: tuple[str, ...] = ()  # the only topics accepted; empty = the endpoint refuses everything


class TrackingEngine(enum.StrEnum):
    """Who writes the pixel and the tracked links: inflight itself, or the provider's configuration set."""

    RELAY = "relay"
    PROVIDER = "provider"


@dataclass(frozen=True)
class UpstreamSettings:
    url: str = field(default="outbox:///var/outbox", repr=False, metadata=SECRET)  # may carry the password
    tracking_engine: TrackingEngine = TrackingEngine.RELAY
    configuration_set_header: str = "X-SES-CONFIGURATION-SET"
    configuration_set: str = ""
    no_tracking_configuration_set: str = ""
    # Tried in order when the primary (and each earlier fallback) cannot be reached; never on a refusal.
    fallback_urls: tuple[str, ...] = field(default=(), repr=False, metadata=SECRET)
    pool_size: int = 4
    pool_idle_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0  # TCP + greeting + EHLO + STARTTLS + AUTH, together
    command_timeout_seconds: float = 30.0  # each of MAIL, RCPT, RSET, NOOP, DATA (the 354)
    data_timeout_seconds: float = 120.0  # message body sent through the final reply
    send_timeout_seconds: float = 180.0  # everything upstream for one app transaction, all copies and fallbacks
    ledger_ttl_hours: int = 72  # how long a delivered (message-id, recipient) is remembered against resends

    @property
    def owns_configuration_set(self) -> bool:
        """Whether the relay chooses the configuration set of every send (and drops the app's choice)."""
        return self.tracking_engine is TrackingEngine.PROVIDER or bool(self.configuration_set or self.no_tracking_configuration_set)

    def missing_for(self, mode: TrackingMode) -> str | None:
        """The upstream key that `mode` needs and that is not set, or None when the mode is available.

        Once configuration sets are in play (the provider engine, or a `configuration_set`), an
        untracked send is untracked only if it names a configuration set without tracking: without
        one the provider applies its default, which may track. Plunk hides the toggle in that case
        but still accepts the mode and tracks everything; inflight refuses the mode instead. With
        the provider engine a tracked send likewise needs the set that tracks.
        """
        sets_in_play = self.tracking_engine is TrackingEngine.PROVIDER or bool(self.configuration_set)
        if sets_in_play and mode is not TrackingMode.ENABLED and not self.no_tracking_configuration_set:
            return "upstream.no_tracking_configuration_set"
        if self.tracking_engine is TrackingEngine.PROVIDER and mode is not TrackingMode.DISABLED and not self.configuration_set:
            return "upstream.configuration_set"
        return None

    def unavailable(self, mode: TrackingMode) -> str | None:
        """Why `mode` cannot be used, naming the missing key; one wording for config load, the API and the CLI."""
        missing = self.missing_for(mode)
        if missing is None:
            return None
        when = f'tracking_engine = "{self.tracking_engine.value}"'
        if self.tracking_engine is TrackingEngine.RELAY:
            when = "upstream.configuration_set is set"
        others = f", or choose one of {', '.join(self.available_modes)}" if self.available_modes else ""
        return f"{mode.value} needs {missing} when {when}; set it{others}"

    @property
    def available_modes(self) -> tuple[TrackingMode, ...]:
        return tuple(mode for mode in TrackingMode if self.missing_for(mode) is None)


class ApiAccess(StrEnum):
    READ = "read"  # GET /v1/events, /v1/stats, /v1/settings/tracking
    ADMIN = "admin"  # and PUT /v1/settings/tracking


@dataclass(frozen=True)
class ApiKeySettings:
    """One `[[projects.api_keys]]` entry: a bearer token for the API that is not the SMTP password."""

    key: str = field(repr=False, metadata=SECRET)
    access: ApiAccess = ApiAccess.READ


@dataclass(frozen=True)
class ProjectSettings:
    id: str
    secret: str = field(repr=False, metadata=SECRET)
    tracking: TrackingMode = TrackingMode.ENABLED  # the initial mode; a runtime change in the store wins
    allow_tracking_override: bool = True  # false: `X-Inflight-Tracking: on` is ignored (off is always honoured)
    honeypot_link: bool = False
    exclude_click_domains: tuple[str, ...] = ()  # hosts whose links are never tracked: "example.com", "*.example.com"
    sender_domains: tuple[str, ...] = ()  # MAIL FROM and From must be in these domains; empty = any
    max_recipients: int = 0  # per-transaction limit for this project; 0 = relay.max_recipients
    rate_limit_per_minute: int = 0  # messages per minute; 0 = unlimited
    webhook_url: str = ""  # every event is POSTed here, signed with webhook_secret
    webhook_secret: str = field(default="", repr=False, metadata=SECRET)
    ip_mode: IpMode = IpMode.FULL
    retention_days: int = 0  # events older than this are purged; 0 keeps them
    tracking_domains: tuple[str, ...] = ()  # the first mints; all are accepted; empty: tracker.public_url
    tracking_scheme: str = "https"  # "http" only for tests and local use

    @property
    def tracking_hosts(self) -> tuple[str, ...]:
        """tracking_domains as Host headers compare: lower case, no trailing dot."""
        return tuple(domain.lower().rstrip(".") for domain in self.tracking_domains)
    suppression: SuppressionMode = SuppressionMode.REFUSE  # addresses that bounced for good or complained
    api_keys: tuple[ApiKeySettings, ...] = ()  # API bearer tokens besides the secret (read-only unless access = "admin")


@dataclass(frozen=True)
class DkimSettings:
    """One `[[dkim]]` entry: the key that signs mail whose From is in `domain` (or a subdomain)."""

    domain: str
    selector: str
    private_key_path: str


@dataclass(frozen=True)
class Settings:
    relay: RelaySettings = field(default_factory=RelaySettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    log: LogSettings = field(default_factory=LogSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    projects: tuple[ProjectSettings, ...] = ()
    dkim: tuple[DkimSettings, ...] = ()

    def project(self, project_id: str) -> ProjectSettings | None:
        return next((p for p in self.projects if p.id == project_id), None)

    def tracking_base(self, project: ProjectSettings) -> str:
        """The base of the project's tracking URLs: its first tracking domain, else tracker.public_url."""
        if project.tracking_domains:
            return f"{project.tracking_scheme}://{project.tracking_hosts[0]}"
        return self.tracker.public_url.rstrip("/")

    @property
    def webhook_projects(self) -> list[str]:
        """The projects whose events queue webhook deliveries (those with a webhook_url)."""
        return [p.id for p in self.projects if p.webhook_url]

    @property
    def public_host(self) -> str:
        """tracker.public_url's host: tokens of every project are accepted there."""
        return (urlsplit(self.tracker.public_url).hostname or "").lower()


SECTIONS: dict[str, type] = {
    "relay": RelaySettings,
    "tracker": TrackerSettings,
    "store": StoreSettings,
    "upstream": UpstreamSettings,
    "webhooks": WebhookSettings,
    "feedback": FeedbackSettings,
    "log": LogSettings,
    "dashboard": DashboardSettings,
}
HOST_PATTERN = re.compile(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?")
# A plain DNS name (sender domains, DKIM domains and selectors): labels of 1-63, no edge hyphens.
DOMAIN_NAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
UPSTREAM_SCHEMES = ("outbox", "smtp", "smtps", "smtp+insecure")


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """`--config`, else `$INFLIGHT_CONFIG`, else config/dev.toml (the documented order)."""
    return Path(cli_value or environ.get("INFLIGHT_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: Path, environ: Mapping[str, str] = os.environ) -> Settings:
    """Read, override from the environment, and validate; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found (pass --config PATH or set INFLIGHT_CONFIG)"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return settings_from_mapping(raw, environ)


def settings_from_mapping(raw: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> Settings:
    problems: list[str] = []
    sections: dict[str, object] = {}
    for key in raw:
        if key not in SECTIONS and key not in ("projects", "dkim"):
            problems.append(f"{key}: unknown section (known: {', '.join([*SECTIONS, 'projects', 'dkim'])})")
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: must be a table ([{name}])")
            continue
        table = {**table, **_env_overrides(name, cls, environ, problems)}
        sections[name] = _build(cls, table, name, problems)
    problems.extend(_unknown_variables(environ))
    projects = _build_projects(raw.get("projects", []), problems)
    dkim = _build_tables(DkimSettings, raw.get("dkim", []), "dkim", problems) or ()
    if problems:
        raise ConfigError(problems)
    settings = Settings(projects=projects, dkim=dkim, **sections)  # type: ignore[arg-type]
    problems.extend(_check(settings))
    if problems:
        raise ConfigError(problems)
    return settings


def _env_overrides(section: str, cls: type, environ: Mapping[str, str], problems: list[str]) -> dict[str, object]:
    """Values from the environment; a secret's `_FILE` variable replaces the key (and vice versa)."""
    overrides: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        var = f"INFLIGHT_{section.upper()}_{f.name.upper()}"
        if var in environ:
            value = _from_env(environ[var], hints[f.name])
            if value is None:
                shown = "(secret)" if f.metadata.get("secret") else repr(environ[var])
                problems.append(f"{section}.{f.name}: {var}={shown} is not a valid {_type_name(hints[f.name])}")
            else:
                overrides[f.name] = value
                overrides[f"{f.name}_file"] = None
        if f.metadata.get("secret") and f"{var}_FILE" in environ:
            overrides[f"{f.name}_file"] = environ[f"{var}_FILE"]
            overrides[f.name] = None
    return overrides


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """INFLIGHT_* variables that override nothing: refused like an unknown TOML key, with the nearest name."""
    known = set(NON_CONFIG_VARIABLES)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            var = f"INFLIGHT_{section.upper()}_{f.name.upper()}"
            known.add(var)
            if f.metadata.get("secret"):
                known.add(f"{var}_FILE")
    problems = []
    unknown = (name for name in environ
               if name.startswith("INFLIGHT_") and name not in known and not name.startswith(NON_CONFIG_PREFIXES))
    for var in sorted(unknown):
        near = difflib.get_close_matches(var, known, n=1)
        hint = f"did you mean {near[0]}?" if near else "INFLIGHT_<SECTION>_<KEY> overrides a key of a section"
        problems.append(f"{var}: unknown environment variable ({hint})")
    return problems


def _from_env(text: str, hint: object) -> object | None:
    if hint is bool:
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if hint is int:
        return int(text) if text.strip().lstrip("-").isdigit() else None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            return None
    if typing.get_origin(hint) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _build_projects(value: object, problems: list[str]) -> tuple[ProjectSettings, ...]:
    if isinstance(value, list) and not value:
        problems.append("projects: define at least one [[projects]] with id and secret (AUTH is required)")
    return _build_tables(ProjectSettings, value, "projects", problems) or ()


def _build_tables(cls: type[_T], value: object, where: str, problems: list[str]) -> tuple[_T, ...] | None:
    """An array of tables (`[[where]]`), each built as `cls`; None when it is not one."""
    if not isinstance(value, list):
        problems.append(f"{where}: must be an array of tables ([[{where}]])")
        return None
    built = []
    for index, table in enumerate(value):
        if not isinstance(table, dict):
            problems.append(f"{where}[{index}]: must be a table")
            continue
        item = _build(cls, table, f"{where}[{index}]", problems)
        if item is not None:
            built.append(item)
    return tuple(built)


def _read_secret_files(cls: type, table: Mapping[str, object], where: str, problems: list[str]) -> dict[str, object]:
    """Replace each `<secret>_file` key by the file's content: one value, or one list item per line."""
    hints = typing.get_type_hints(cls)
    resolved = {k: v for k, v in table.items() if v is not None}  # None: removed by an environment override
    for f in dataclasses.fields(cls):
        if not f.metadata.get("secret") or f"{f.name}_file" not in resolved:
            continue
        path = resolved.pop(f"{f.name}_file")
        if f.name in resolved:
            problems.append(f"{where}.{f.name} / {where}.{f.name}_file: give one or the other")
            continue
        if not isinstance(path, str):
            problems.append(f"{where}.{f.name}_file: expected a file path")
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{where}.{f.name}_file: cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}")
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        resolved[f.name] = lines if typing.get_origin(hints[f.name]) is tuple else text.strip()
    return resolved


def _build(cls: type, table: Mapping[str, object], where: str, problems: list[str]):  # type: ignore[no-untyped-def]
    """Construct `cls` from a TOML table, type-checking each key against the dataclass field."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    ok = True
    given = set(table)
    table = _read_secret_files(cls, table, where, problems)
    for key, value in table.items():
        if key not in known:
            secrets = [f"{name}_file" for name, f in known.items() if f.metadata.get("secret")]
            problems.append(f"{where}.{key}: unknown key (known: {', '.join([*known, *secrets])})")
            ok = False
            continue
        item_cls = _table_item(hints[key])
        if item_cls is not None:
            tables: tuple[object, ...] | None = _build_tables(item_cls, value, f"{where}.{key}", problems)
            ok = ok and tables is not None
            values[key] = tables
            continue
        converted = _convert(value, hints[key])
        if converted is _INVALID:
            shown = f"a value of type {type(value).__name__}" if known[key].metadata.get("secret") else repr(value)
            problems.append(f"{where}.{key}: expected {_type_name(hints[key])}, got {shown}")
            ok = False
        else:
            values[key] = converted
    for name, f in known.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if name not in table and f"{name}_file" not in given:  # an unreadable _file was reported already
                alternative = f" (or {name}_file)" if f.metadata.get("secret") else ""
                problems.append(f"{where}.{name}: required key is missing{alternative}")
            ok = False
    return cls(**values) if ok else None


_INVALID = object()


def _table_item(hint: object) -> type | None:
    """The dataclass of a `tuple[SomeSettings, ...]` field (an array of tables), else None."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item):
            return item  # type: ignore[return-value]
    return None


def _convert(value: object, hint: object) -> object:
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _INVALID
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        return hint(value) if isinstance(value, str) and value in _choices(hint) else _INVALID
    if typing.get_origin(hint) is tuple:
        (item, _) = typing.get_args(hint)
        if not isinstance(value, list) or not all(_convert(v, item) is not _INVALID for v in value):
            return _INVALID
        return tuple(value)
    raise TypeError(f"no converter for {hint!r}")  # a programming error, not a config error


def _choices(hint: type[enum.StrEnum]) -> list[str]:
    return [member.value for member in hint]


def _type_name(hint: object) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        return "one of " + " | ".join(_choices(hint))
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))  # type: ignore[call-overload]


def parse_listen(value: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port` → (host, port); None when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        return None
    return host.strip("[]"), int(port)


def _check(s: Settings) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    problems = []
    listens = [("relay.listen", s.relay.listen), ("tracker.listen", s.tracker.listen)]
    if s.relay.http_listen:
        listens.append(("relay.http_listen", s.relay.http_listen))
    if s.dashboard.listen:
        listens.append(("dashboard.listen", s.dashboard.listen))
    if s.relay.smtps_listen:
        listens.append(("relay.smtps_listen", s.relay.smtps_listen))
        if not s.relay.tls_cert:
            problems.append("relay.smtps_listen: needs relay.tls_cert and relay.tls_key (implicit TLS)")
    for key, value in listens:
        if parse_listen(value) is None:
            problems.append(f"{key}: expected host:port (e.g. 127.0.0.1:2525), got {value!r}")
    if s.relay.require_tls and not s.relay.tls_cert:
        problems.append("relay.require_tls: needs relay.tls_cert and relay.tls_key, or nobody could send")
    if s.relay.require_tls and s.relay.allow_plaintext_auth:
        problems.append("relay.require_tls / relay.allow_plaintext_auth: contradictory; drop allow_plaintext_auth")
    for key in ("auth_failures_per_ip", "auth_failures_per_user", "auth_backoff_seconds", "auth_failure_window_seconds"):
        if getattr(s.relay, key) <= 0:
            problems.append(f"relay.{key}: must be at least 1")
    if bool(s.relay.tls_cert) != bool(s.relay.tls_key):
        problems.append("relay.tls_cert / relay.tls_key: set both (PEM paths) or neither")
    for key in ("tls_cert", "tls_key"):
        path = getattr(s.relay, key)
        if path and not Path(path).is_file():
            problems.append(f"relay.{key}: file {path!r} does not exist")
    if s.relay.max_message_bytes <= 0:
        problems.append("relay.max_message_bytes: must be a positive number of bytes")
    least = MEMORY_PER_MESSAGE_BYTE * s.relay.max_message_bytes
    if s.relay.max_inflight_bytes < least:
        problems.append(f"relay.max_inflight_bytes: must be at least {MEMORY_PER_MESSAGE_BYTE} × relay.max_message_bytes "
                        f"({least}), or the largest message allowed could never be received")
    if s.relay.max_recipients <= 0:
        problems.append("relay.max_recipients: must be at least 1")
    try:
        re.compile(s.feedback.ses_cert_url_pattern)
    except re.error as exc:
        problems.append(f"feedback.ses_cert_url_pattern: not a valid regular expression ({exc}); "
                        r"the default is ^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/")
    public = urlsplit(s.tracker.public_url)
    if public.scheme not in ("http", "https") or not public.netloc or public.query or public.fragment:
        problems.append(f"tracker.public_url: expected an http(s) base URL such as https://t.example.com, got {s.tracker.public_url!r}")
    if not s.tracker.secrets or any(len(secret) < 8 for secret in s.tracker.secrets):
        problems.append("tracker.secrets: give at least one HMAC key of 8+ characters (the first signs, all verify)")
    for address in s.tracker.public_addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            problems.append(f"tracker.public_addresses: {address!r} is not an IP address (list the reverse proxy's public IPs)")
    for key in ("trusted_proxies", "metrics_allow"):
        for network in getattr(s.tracker, key):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                problems.append(f"tracker.{key}: {network!r} is not an IP address or CIDR")
    problems.extend(_check_network_lists(s.tracker))
    if not s.store.url.startswith(STORE_URL_PREFIXES):
        scheme = urlsplit(s.store.url).scheme  # never the URL itself: it may carry a password
        problems.append("store.url: expected sqlite:///relative/path.db, sqlite:////absolute/path.db or "
                        f"postgresql://user:password@host:port/database, got scheme {scheme or 'none'!r}")
    for key, url in (("upstream.url", s.upstream.url), *(("upstream.fallback_urls", u) for u in s.upstream.fallback_urls)):
        scheme = urlsplit(url).scheme  # never the URL itself: it may carry a password
        if scheme not in UPSTREAM_SCHEMES:
            problems.append(f"{key}: scheme must be one of {', '.join(UPSTREAM_SCHEMES)}, got {scheme or 'none'!r}")
    for key in ("pool_idle_seconds", "connect_timeout_seconds", "command_timeout_seconds", "data_timeout_seconds",
                "send_timeout_seconds"):
        if getattr(s.upstream, key) <= 0:
            problems.append(f"upstream.{key}: must be a positive number of seconds")
    for section, key in (("upstream", "pool_size"), ("upstream", "ledger_ttl_hours"), ("relay", "cpu_workers"),
                         ("relay", "workers"), ("tracker", "workers")):
        if getattr(getattr(s, section), key) < 1:
            problems.append(f"{section}.{key}: must be at least 1")
    if s.tracker.answer_budget_ms < 1:
        problems.append("tracker.answer_budget_ms: must be at least 1 (milliseconds a hit may wait for the spool)")
    if s.relay.drain_timeout_seconds < 0:
        problems.append("relay.drain_timeout_seconds: must be zero or more seconds")
    seen: set[str] = set()
    claimed: dict[str, str] = {}  # tracking domain -> the project that lists it
    secrets: dict[str, tuple[int, str]] = {}
    for index, project in enumerate(s.projects):
        if project.id in seen:
            problems.append(f"projects[{index}].id: duplicate project id {project.id!r}")
        seen.add(project.id)
        if project.secret in secrets:  # the secret is what AUTH and the API tell projects apart by
            first, other = secrets[project.secret]
            problems.append(f"projects[{index}].secret: project {project.id!r} has the same secret as project {other!r} "
                            f"(projects[{first}]); give each project its own")
        secrets.setdefault(project.secret, (index, project.id))
        for number, api_key in enumerate(project.api_keys):
            where = f"projects[{index}].api_keys[{number}].key"
            if len(api_key.key) < 16:
                problems.append(f"{where}: use at least 16 characters (e.g. openssl rand -hex 24)")
            if api_key.key in secrets:
                problems.append(f"{where}: the same token as another key or secret (of project {secrets[api_key.key][1]!r}); "
                                "every token must name one project and one access")
            secrets.setdefault(api_key.key, (index, project.id))
        if not project.id:
            problems.append(f"projects[{index}].id: must not be empty")
        if len(project.secret) < 8:
            problems.append(f"projects[{index}].secret: use at least 8 characters (it is the SMTP password and API token)")
        unavailable = s.upstream.unavailable(project.tracking)
        if unavailable is not None:
            problems.append(f"projects[{index}].tracking: project {project.id!r}: {unavailable}")
        for pattern in project.exclude_click_domains:
            if not HOST_PATTERN.fullmatch(pattern):
                problems.append(f"projects[{index}].exclude_click_domains: {pattern!r} is not a host name or *.suffix "
                                "(no scheme, path or port: e.g. \"example.com\" or \"*.example.com\")")
        for domain in project.sender_domains:
            if not DOMAIN_NAME.fullmatch(domain):
                problems.append(f"projects[{index}].sender_domains: {domain!r} is not a domain name (e.g. example.com)")
        for key in ("max_recipients", "rate_limit_per_minute"):
            if getattr(project, key) < 0:
                problems.append(f"projects[{index}].{key}: must be 0 (no project limit) or more")
        problems.extend(_check_webhook(f"projects[{index}]", project))
        problems.extend(_check_tracking_domains(f"projects[{index}]", project, s.public_host, claimed))
        if project.retention_days < 0:
            problems.append(f"projects[{index}].retention_days: must be 0 (keep forever) or a number of days")
    problems.extend(_check_dkim(s.dkim))
    hooks = s.webhooks
    for key in ("timeout_seconds", "retry_initial_seconds", "retry_max_seconds", "poll_seconds"):
        if getattr(hooks, key) <= 0:
            problems.append(f"webhooks.{key}: must be a positive number of seconds")
    if hooks.retry_max_seconds < hooks.retry_initial_seconds:
        problems.append("webhooks.retry_max_seconds: must be at least webhooks.retry_initial_seconds")
    if hooks.retry_hours < 24:
        problems.append("webhooks.retry_hours: must be at least 24 (a receiver down for a day must not lose events)")
    if hooks.concurrency < 1:
        problems.append("webhooks.concurrency: must be at least 1")
    if s.store.purge_interval_seconds <= 0:
        problems.append("store.purge_interval_seconds: must be a positive number of seconds")
    return problems


def _check_webhook(where: str, project: ProjectSettings) -> list[str]:
    if not project.webhook_url:
        return [f"{where}.webhook_secret: set webhook_url too, or remove it"] if project.webhook_secret else []
    problems = []
    url = urlsplit(project.webhook_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        problems.append(f"{where}.webhook_url: expected an http(s) URL such as https://app.example.com/hooks, got {project.webhook_url!r}")
    if len(project.webhook_secret) < 16:
        problems.append(f"{where}.webhook_secret: required with webhook_url, at least 16 characters (receivers verify with it)")
    elif project.webhook_secret.startswith("whsec_"):
        try:
            base64.b64decode(project.webhook_secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            problems.append(f"{where}.webhook_secret: a whsec_ secret must be followed by base64 (Standard Webhooks)")
    return problems


def _check_tracking_domains(where: str, project: ProjectSettings, public_host: str, claimed: dict[str, str]) -> list[str]:
    """Each Host must name one project: the tracker routes tokens by it."""
    problems = []
    if project.tracking_scheme not in ("https", "http"):
        problems.append(f'{where}.tracking_scheme: expected "https" (or "http" for tests and local use), '
                        f"got {project.tracking_scheme!r}")
    for domain in project.tracking_domains:
        name = domain.lower().rstrip(".")
        if not DOMAIN_NAME.fullmatch(name):
            problems.append(f"{where}.tracking_domains: {domain!r} is not a domain name (e.g. click.shop.example; "
                            "no scheme, path or port)")
        elif name == public_host:
            problems.append(f"{where}.tracking_domains: {domain!r} is tracker.public_url's host, shared by every "
                            "project; give the project a domain of its own or remove it")
        elif name in claimed:
            problems.append(f"{where}.tracking_domains: {domain!r} is already a tracking domain of project "
                            f"{claimed[name]!r}; a domain belongs to one project")
        else:
            claimed[name] = project.id
    return problems


def _check_dkim(entries: tuple[DkimSettings, ...]) -> list[str]:
    """Each key is loaded now, so a bad key stops the relay at start instead of failing on mail."""
    problems = []
    signed: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"dkim[{index}]"
        if not DOMAIN_NAME.fullmatch(entry.domain):
            problems.append(f"{where}.domain: {entry.domain!r} is not a domain name (e.g. example.com)")
            continue
        if entry.domain.lower() in signed:
            problems.append(f"{where}.domain: {entry.domain!r} already has a key (one [[dkim]] per domain)")
        signed.add(entry.domain.lower())
        if not DOMAIN_NAME.fullmatch(entry.selector):
            problems.append(f"{where}.selector: {entry.selector!r} is not a DNS name (e.g. s2026)")
            continue
        try:
            load_key(entry.domain, entry.selector, entry.private_key_path)
        except ValueError as exc:
            problems.append(f"{where}.private_key_path: {exc}")
    return problems


def _check_network_lists(tracker: TrackerSettings) -> list[str]:
    problems = []
    if not 0 <= tracker.sent_window_seconds <= 3600:
        problems.append(f"tracker.sent_window_seconds: expected 0 to 3600 seconds, got {tracker.sent_window_seconds}")
    names: set[str] = set()
    for index, entry in enumerate(tracker.network_lists):
        where = f"tracker.network_lists[{index}]"
        if entry.agent not in NETWORK_CLASSES:
            problems.append(f"{where}.agent: expected one of {' | '.join(NETWORK_CLASSES)}, got {entry.agent!r}")
        if not entry.path:
            problems.append(f"{where}.path: give the CIDR list file (it may not exist until `inflight netdata refresh`)")
        if entry.list_name in names:
            problems.append(f"{where}.name: duplicate list name {entry.list_name!r} (set name = ... to tell them apart)")
        names.add(entry.list_name)
        for url in entry.upstream:
            if urlsplit(url).scheme not in ("http", "https"):
                problems.append(f"{where}.upstream: expected http(s) URLs, got {url!r}")
    return problems
