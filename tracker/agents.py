"""Machine or human: the `agent` verdict on every open and click.

Mail opens and clicks are polluted by machines: Apple Mail Privacy Protection fetches
every image at delivery, Gmail and Yahoo fetch them through image proxies, and security
gateways open and click every link before (or instead of) the person. Each event is
classified, recorded and flagged, never dropped:

    human        a person's client fetched it
    apple_mpp    Apple Mail Privacy Protection preloaded the pixel
    image_proxy  a webmail image proxy fetched the pixel when the person opened the mail
    scanner      a security gateway, bot or script
    prefetch     a fetch ahead of a person's action: link previews, browser prefetch,
                 Gmail's and Yahoo's fetches at delivery

Precision over recall: a person must not be labelled a machine, so every rule that can
see a real person (a Safari user on iCloud Private Relay, a click through a gateway's
browser isolation hours after delivery, a person opening a password reset two seconds
after it was sent) needs a second signal before it says machine.

`classify` is pure: no clock, no I/O besides the in-memory network lists. The tracker
passes the client's recent events of the same message (`recent`) for the patterns that
need history (proximity, honeypot) and applies `relabel` to events a later hit exposes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from crawleruseragents import CRAWLER_USER_AGENTS_DATA, is_crawler

from tracker.netdata import NetworkLists
from tracker.privacy import client_network

Agent = Literal["human", "apple_mpp", "image_proxy", "scanner", "prefetch"]
AGENTS: tuple[Agent, ...] = ("human", "apple_mpp", "image_proxy", "scanner", "prefetch")

@dataclass(frozen=True)
class Verdict:
    agent: Agent
    reason: str  # the signals that fired, space-separated `key=value` tokens


@dataclass(frozen=True)
class Hit:
    """One request to the pixel or a redirect, as the tracker saw it."""

    kind: Literal["open", "click"]
    at: float  # epoch seconds
    ip: str | None = None
    user_agent: str | None = None
    method: str = "GET"
    purpose: str | None = None  # Sec-Purpose, Purpose or X-Moz request header
    sent_at: float | None = None  # when the relay sent the message (from the signed token)
    link: str | None = None  # which link of the message, for clicks
    honeypot: bool = False


@dataclass(frozen=True)
class PriorHit:
    """An event already recorded for the same message."""

    event_id: int
    kind: Literal["open", "click"]
    at: float
    ip: str | None
    user_agent: str | None
    link: str | None
    honeypot: bool
    agent: str


@dataclass(frozen=True)
class AgentPolicy:
    # Within this many seconds of email.sent, a fetch coincides with delivery. Mautic's bot
    # filter uses 2 s after send (mautic/mautic#16263, BotRatioHelper timeFromEmailThreshold);
    # a little more covers relay-to-inbox delivery time. Timing is weight, never proof: a
    # person with the mail client open (a password reset, Apple Mail, Thunderbird, Outlook)
    # opens within 2-3 s, so an early hit is a machine only with another signal (a listed
    # network, a proxy's user agent).
    sent_window_seconds: float = 5.0
    # YahooMailProxy fetches the pixel at delivery, and retries it up to 4 times (Litmus,
    # "Why do I see a spike in Yahoo! Mail opens?", 2018): its fetches this soon after the
    # send are that delivery-time prefetch, later ones the person opening the mail.
    proxy_prefetch_seconds: float = 60.0
    # A gateway network alone is not proof: Proofpoint and Mimecast browser isolation route
    # a person's click through the vendor (shared/netdata/README.md); gateways scan at
    # delivery, so only hits this soon after sending count as the scanner. Short, because
    # a person reading at once through isolation must stay human; Safe Links time-of-click
    # checks later on are missed (a recall loss, by choice).
    gateway_window_seconds: float = 300.0
    # Scanners follow every link about a second apart (mautic/mautic#9798); a person does
    # not open `proximity_links` distinct links with every gap under `proximity_seconds`.
    proximity_seconds: float = 2.0
    proximity_links: int = 3
    # Clicks of a client around its honeypot click are the same crawl; Mautic users
    # report ±10 s as effective for 7-8 links (mautic/mautic#9798).
    honeypot_window_seconds: float = 10.0

    def __post_init__(self) -> None:
        for name in ("sent_window_seconds", "proxy_prefetch_seconds", "gateway_window_seconds", "proximity_seconds",
                     "honeypot_window_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.proximity_links < 2:
            raise ValueError(f"proximity_links must be >= 2, got {self.proximity_links}")

    @property
    def lookback_seconds(self) -> float:
        """How far back `recent` must reach for `classify` and `relabel` to see a pattern."""
        return max(self.honeypot_window_seconds, self.proximity_seconds * 32)


# --- user agents ----------------------------------------------------------------------

# Apple MPP fetches with the bare user agent "Mozilla/5.0" and nothing else, since
# 2021-09-20 (ua-parser/uap-core#509). No browser sends it; Apple Mail itself, MPP off,
# sends a full "Mozilla/5.0 (Macintosh; ...) AppleWebKit/605.1.15 (KHTML, like Gecko)".
_GENERIC_UA = "Mozilla/5.0"

# Mail-specific proxies, checked before the crawler database (which lists both under
# "social-preview"): they fetch the pixel when the person opens the message.
# - Gmail: "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com
#   GoogleImageProxy)" (Gmail image proxy, 2013; darkvisitors.com/agents/googleimageproxy).
# - Yahoo: "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html".
_MAIL_PROXY = re.compile(r"GoogleImageProxy|YahooMailProxy")
# Proxies that also fetch at delivery, before anyone opened the mail (see proxy_prefetch_seconds).
_DELIVERY_FETCHING_PROXIES = frozenset({"YahooMailProxy"})

# Gmail's delivery-time bot: when the recipient has Gmail open, Google fetches every image
# of a new message from its own networks, seconds after delivery, with one fixed, years-old
# user agent "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like
# Gecko) Chrome/42.0.2311.135 Safari/537.36 Edge/12.246 Mozilla/5.0" (SparkPost/Bird,
# "Gmail is prefetching images", 2022; GMass, "False opens in Gmail"; mautic/mautic#10245).
# The trailing second "Mozilla/5.0" is in no browser's user agent.
_GMAIL_PREFETCH = re.compile(r"Edge/12\.246 Mozilla/5\.0$")

# Apple Mail's own WebKit user agent: AppleWebKit and "(KHTML, like Gecko)", with no
# Version/ or Safari/ token (those are Safari's). From Apple's egress networks it is Mail
# loading images through Mail Privacy Protection's relay, like MPP's bare "Mozilla/5.0":
# Private Relay carries Mail's image loads only when "Protect Mail Activity" is on
# (wordtothewise.com, "Apple MPP reporting and geolocation", 2021).
_APPLE_MAIL = re.compile(r"AppleWebKit/[\d.]+ \(KHTML, like Gecko\)(?: Mobile/\w+)?$")

# Fetches a client makes ahead of handing a clicked link to the browser: Office's HEAD
# "Microsoft Office Existence Discovery" (Microsoft, "Description of the Microsoft Office
# Existence Discovery Protocol", 2008) and the OPTIONS "Microsoft Office Protocol Discovery".
_CLIENT_PREFETCH = re.compile(r"^Microsoft Office (Existence|Protocol) Discovery")

# crawler-user-agents (monperrus/crawler-user-agents, the maintained list behind many bot
# filters) tags each pattern; these fetch a link to show its preview or warm a cache for a
# person about to visit, so they are `prefetch`, everything else it knows is `scanner`.
_PREFETCH_TAGS = frozenset({"social-preview"})
_PREFETCH_PATTERNS = frozenset({"Chrome Privacy Preserving Prefetch Proxy", "CloudFlare-Prefetch"})

UaKind = Literal["missing", "generic", "mail_proxy", "prefetch", "bot", "apple_mail", "browser"]


@functools.lru_cache(maxsize=4096)
def user_agent_kind(user_agent: str | None) -> tuple[UaKind, str]:
    """`(kind, name)`: what the user agent says about the client; `name` goes in reasons.

    Cached: a campaign's traffic repeats a few hundred distinct user agents, and the
    crawler database is ~1,500 regexes.
    """
    ua = (user_agent or "").strip()
    if not ua:
        return "missing", "none"
    if ua == _GENERIC_UA:
        return "generic", "generic"
    if match := _MAIL_PROXY.search(ua):
        return "mail_proxy", match.group(0)
    if _CLIENT_PREFETCH.search(ua):
        return "prefetch", "office-discovery"
    if _GMAIL_PREFETCH.search(ua):
        return "prefetch", "gmail-prefetch"
    if not is_crawler(ua):
        return ("apple_mail", "apple-mail") if _APPLE_MAIL.search(ua) else ("browser", "")
    for pattern, name, prefetch in _crawler_patterns():
        if pattern.search(ua):
            return ("prefetch" if prefetch else "bot"), name
    return "bot", "crawler"


@functools.cache
def _crawler_patterns() -> list[tuple[re.Pattern[str], str, bool]]:
    """Each database pattern compiled once, with its reason token and prefetch flag;
    only consulted to name a user agent `is_crawler` already matched."""
    return [
        (
            re.compile(entry["pattern"]),
            _token(entry["pattern"]),
            entry["pattern"] in _PREFETCH_PATTERNS or bool(_PREFETCH_TAGS & set(entry.get("tags", ()))),
        )
        for entry in CRAWLER_USER_AGENTS_DATA
    ]


def _token(pattern: str) -> str:
    """A crawler pattern as a reason token: regex syntax dropped, no spaces."""
    return re.sub(r"[^A-Za-z0-9._-]+", "", pattern.replace(" ", "-")).strip("-._") or "crawler"


# --- history patterns -----------------------------------------------------------------


def _same_client(hit: Hit, prior: PriorHit) -> bool:
    if (hit.user_agent or "") != (prior.user_agent or ""):
        return False
    if hit.ip is None or prior.ip is None:
        return True  # the project stores no IPs: the user agent within one message decides
    return client_network(hit.ip) == client_network(prior.ip)


def _burst(hit: Hit, recent: Sequence[PriorHit], policy: AgentPolicy) -> list[PriorHit]:
    """The same client's clicks chained to `hit` with every gap <= proximity_seconds,
    when together they cover at least `proximity_links` distinct links; else []."""
    if hit.kind != "click":
        return []
    chain: list[PriorHit] = []
    edge = hit.at
    for prior in sorted(recent, key=lambda p: p.at, reverse=True):
        if prior.kind != "click" or prior.honeypot or prior.at > hit.at or not _same_client(hit, prior):
            continue
        if edge - prior.at > policy.proximity_seconds:
            break
        chain.append(prior)
        edge = prior.at
    links = {prior.link for prior in chain} | {hit.link}
    return chain if len(links) >= policy.proximity_links else []


def _after_honeypot(hit: Hit, recent: Sequence[PriorHit], policy: AgentPolicy) -> bool:
    return any(prior.honeypot and 0 <= hit.at - prior.at <= policy.honeypot_window_seconds and _same_client(hit, prior) for prior in recent)


# --- the verdict ----------------------------------------------------------------------


def classify(hit: Hit, *, networks: NetworkLists, recent: Sequence[PriorHit] = (), policy: AgentPolicy = AgentPolicy()) -> Verdict:
    """Combine the signals into one verdict; `reason` lists every signal that fired."""
    ua_kind, ua_name = user_agent_kind(hit.user_agent)
    matches = networks.lookup(hit.ip) if hit.ip else ()
    classes = {match.agent for match in matches}
    since_sent = None if hit.sent_at is None else hit.at - hit.sent_at

    reasons = [f"ua={ua_name}"] if ua_name else []
    reasons += [f"net={match.name}" for match in matches]
    if hit.method.upper() == "HEAD":
        # Browsers never navigate or load images with HEAD; Safe Links and link checkers
        # do (edalzell/laravel-passwordless-login#79, FusionAuth/fusionauth-issues#629).
        reasons.append("method=HEAD")
    prefetch_header = (hit.purpose or "").strip().lower().startswith("prefetch")
    if prefetch_header:
        # Fetch Metadata `Sec-Purpose: prefetch` (Chrome 110+, Firefox 115+), Chrome's
        # legacy `Purpose: prefetch`, Firefox's older `X-Moz: prefetch` (MDN, Sec-Purpose).
        reasons.append("purpose=prefetch")
    early = since_sent is not None and since_sent < policy.sent_window_seconds
    gateway_early = since_sent is not None and since_sent < policy.gateway_window_seconds
    proxy_early = (
        ua_kind == "mail_proxy" and ua_name in _DELIVERY_FETCHING_PROXIES and hit.kind == "open"
        and since_sent is not None and since_sent < policy.proxy_prefetch_seconds
    )
    if early or ("scanner" in classes and gateway_early) or proxy_early:
        reasons.append(f"sent+{since_sent:.1f}s")
    burst = _burst(hit, recent, policy)
    if burst:
        reasons.append(f"proximity={len({p.link for p in burst} | {hit.link})}links")
    after_honeypot = _after_honeypot(hit, recent, policy)
    if hit.honeypot:
        reasons.append("honeypot")
    elif after_honeypot:
        reasons.append("honeypot-window")

    def verdict(agent: Agent) -> Verdict:
        return Verdict(agent, " ".join(reasons))

    # Order: the most specific evidence first. A honeypot link is invisible to people.
    if hit.honeypot or after_honeypot:
        return verdict("scanner")
    if prefetch_header:
        return verdict("prefetch")
    if ua_kind == "mail_proxy":
        # On a click, a mail proxy fetches the link for the person (Yahoo fetches linked
        # pages for previews and safety), not the person themself; at delivery, a proxy
        # that prefetches has fetched for nobody yet.
        return verdict("image_proxy" if hit.kind == "open" and not proxy_early else "prefetch")
    if "apple_mpp" in classes and hit.kind == "open" and (
        ua_kind in ("generic", "apple_mail") or (early and ua_kind == "browser")
    ):
        # Apple's network plus MPP's bare user agent or Mail's own, or plus delivery timing: MPP
        # preloading. Apple's ranges alone are ordinary Private Relay users (Safari, full user
        # agent, any time), and Apple's network wins over timing: an MPP preload is no scanner.
        return verdict("apple_mpp")
    if ua_kind == "prefetch":
        return verdict("prefetch")
    if ua_kind in ("missing", "generic", "bot") or hit.method.upper() == "HEAD":
        return verdict("scanner")
    if "image_proxy" in classes:
        # Google's fetcher ranges serve no people; an open there is the Gmail proxy, a click
        # a user-triggered fetcher (Read Aloud, link previews).
        return verdict("image_proxy" if hit.kind == "open" else "prefetch")
    if ("scanner" in classes and gateway_early) or burst:
        return verdict("scanner")
    # Timing alone never makes a machine: a client's user agent from no listed network
    # within seconds of sending is a person with the mail open (`sent+` stays in the reason).
    return verdict("human")


def relabel(hit: Hit, verdict: Verdict, *, recent: Sequence[PriorHit], policy: AgentPolicy = AgentPolicy()) -> dict[int, Verdict]:
    """Events a scanner verdict on `hit` exposes after the fact: event id -> new verdict.

    A honeypot click re-labels the same client's human-labelled clicks within
    `honeypot_window_seconds` before it (later ones are caught by `classify`); a proximity
    burst re-labels its earlier, human-labelled members. Events already labelled as some
    machine keep their label.
    """
    if verdict.agent != "scanner":
        return {}
    if hit.honeypot:
        exposed = [
            prior
            for prior in recent
            if prior.kind == "click" and abs(hit.at - prior.at) <= policy.honeypot_window_seconds and _same_client(hit, prior)
        ]
        reason = "honeypot-window"
    else:
        exposed = _burst(hit, recent, policy)
        reason = "proximity"
    return {prior.event_id: Verdict("scanner", reason) for prior in exposed if prior.agent == "human"}
