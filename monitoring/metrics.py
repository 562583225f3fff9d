"""Prometheus metrics of the relay and the tracker, one definition for every process.

Module-level, as prometheus-client intends: the relay's pipeline, the upstream pool and the
tracker's hit path each count with one call and need no object passed down to them. Labels are
bounded by the configuration (projects, upstream hosts) or by fixed vocabularies (outcomes,
agents, failure causes); never an address, a message id or a URL.

With several processes (workers, `inflight relay` + `inflight tracker`), set
PROMETHEUS_MULTIPROC_DIR to an empty directory shared by them: prometheus-client then keeps the
values in files there and every process's /metrics answers for all of them (`exposition`).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiosmtplib
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MESSAGES = Counter("inflight_messages", "SMTP transactions by outcome (queued, partial, deferred, refused, already-sent)",
                   ["project", "outcome"])
TRACKED = Counter("inflight_messages_tracked", "Relayed transactions by tracking decision", ["project", "tracked"])
FAIL_OPENS = Counter("inflight_instrumentation_fail_opens",
                     "Tracked messages relayed untouched because instrumenting them failed", ["project"])
UPSTREAM_SECONDS = Histogram("inflight_upstream_seconds", "One upstream transaction, connection included", ["upstream"],
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
UPSTREAM_FAILURES = Counter("inflight_upstream_failures", "Upstream connections that failed, by cause",
                            ["upstream", "cause"])
POOL_CONNECTIONS = Gauge("inflight_upstream_pool_connections", "Open pooled upstream connections", ["upstream", "state"],
                         multiprocess_mode="livesum")
HITS = Counter("inflight_tracker_hits", "Pixel and redirect hits recorded, by kind and agent verdict", ["kind", "agent"])
STORE_SECONDS = Histogram("inflight_store_seconds", "Store calls on the hot paths", ["operation"],
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
WEBHOOK_BACKLOG = Gauge("inflight_webhook_backlog", "Webhook deliveries waiting in the outbox", multiprocess_mode="mostrecent")
WEBHOOK_OLDEST = Gauge("inflight_webhook_oldest_seconds", "Age of the oldest webhook delivery waiting",
                       multiprocess_mode="mostrecent")
SPOOL_DEPTH = Gauge("inflight_spool_depth", "Records in the local spool not yet confirmed by the store",
                    multiprocess_mode="livesum")
SPOOL_OLDEST = Gauge("inflight_spool_oldest_seconds", "Age of the oldest record waiting in the spool", multiprocess_mode="max")
REFUSALS = Counter("inflight_smtp_refusals", "4xx/5xx SMTP replies, by code", ["code"])


@contextmanager
def timed(histogram: Histogram, *labels: str) -> Iterator[None]:
    """Observe the block's duration in `histogram` (with `labels`; none for a child already labelled)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        (histogram.labels(*labels) if labels else histogram).observe(time.perf_counter() - started)


def failure_cause(exc: BaseException) -> str:
    """Why an upstream could not be reached, in one word an operator can act on:
    refused, timeout, tls, auth, greeting, ehlo, dns or connect."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    checks: tuple[tuple[str, type[BaseException] | tuple[type[BaseException], ...]], ...] = (
        ("auth", aiosmtplib.SMTPAuthenticationError),
        ("tls", ssl.SSLError),
        ("timeout", (TimeoutError, aiosmtplib.SMTPTimeoutError)),
        ("refused", ConnectionRefusedError),
        ("greeting", aiosmtplib.SMTPConnectResponseError),
        ("ehlo", aiosmtplib.SMTPHeloError),
    )
    for cause, kinds in checks:
        if any(isinstance(link, kinds) for link in chain):
            return cause
    text = " ".join(str(link) for link in chain).lower()
    if "refused" in text:
        return "refused"
    if "tls" in text or "ssl" in text or "certificate" in text:
        return "tls"
    if "name or service not known" in text or "nodename nor servname" in text or "temporary failure in name" in text:
        return "dns"
    return "connect"


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The /metrics body and content type: this process's metrics, or every process's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
