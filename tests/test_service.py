"""The tracker's HTTP server settings: httptools, with a bound on a request head while it arrives."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inflight.service import http_config
from tests.conftest import RunningService, Sink, make_settings
from tracker.edge import MAX_REQUEST_HEAD_BYTES
from tracker.protocol import BoundedHttpToolsProtocol


@pytest.fixture
def service(tmp_path: Path, sink: Sink) -> Iterator[RunningService]:
    with RunningService(make_settings(tmp_path, sink.url)) as running:
        yield running


def stream_head(port: int, head_bytes: int, *, finish: bool) -> tuple[bytes, int]:
    """Send a request head in 1 KB pieces (like a slow client); stop early when the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: tracker.test\r\nX-Pad: ")
        sent = 0
        while sent < head_bytes:
            if select.select([sock], [], [], 0.002)[0]:
                break  # answered (and closed) before the head was complete
            sock.sendall(b"a" * 1024)
            sent += 1024
        else:
            if finish:
                sock.sendall(b"\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}") and b"Request head too large." not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, sent


def test_the_tracker_runs_on_httptools() -> None:
    assert http_config(lambda *a: None).http is BoundedHttpToolsProtocol  # type: ignore[arg-type]


def test_a_growing_request_head_is_refused_while_it_arrives(service: RunningService) -> None:
    answer, sent = stream_head(service.service.tracker_address[1], 1_000_000, finish=False)  # type: ignore[index]
    assert answer.startswith(b"HTTP/1.1 400") and b"connection: close" in answer
    assert sent < MAX_REQUEST_HEAD_BYTES + 64 * 1024  # refused near the bound, not after a megabyte
    assert httpx.get(f"{service.http_base}/healthz").status_code == 200  # the server stays up


def test_a_large_head_within_the_bound_is_served(service: RunningService) -> None:
    answer, _ = stream_head(service.service.tracker_address[1], MAX_REQUEST_HEAD_BYTES // 2, finish=True)  # type: ignore[index]
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
