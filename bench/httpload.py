"""HTTP load generator: a fixed number of keep-alive connections, one request in flight on each.

Requests cycle through the paths in a file (one per line). Throughput and latency are taken over
the measured window after a warm-up; status counts cover every request sent, and every request
sent is waited for, so they can be compared with what the server stored. Prints one JSON line.

Without `--rate` each connection sends its next request as soon as the answer came (the most the
server answers). With `--rate R` the connections send R requests/s in all, each on a fixed
schedule, and a request's latency counts from the moment it was due, not from when a slow answer
before it let it go (no coordinated omission): the latency a client sees at that load.

    python -m bench.httpload --port 8080 --paths paths.txt --connections 16 --seconds 3 [--rate 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import uvloop


class HttpError(Exception):
    pass


async def connection(
    port: int, requests: list[bytes], offset: int, start: float, stop: float, latencies: list[float], status: Counter[int],
    interval: float | None = None, due: float = 0.0,
) -> None:
    """One keep-alive connection; with `interval`, request n is due at `due` + n × interval."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    index = offset
    try:
        while True:
            now = time.monotonic()
            if interval is not None:
                if due > now:
                    await asyncio.sleep(due - now)
                sent, due = due, due + interval
            else:
                sent = now
            if sent >= stop:
                break
            writer.write(requests[index % len(requests)])
            index += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise HttpError(f"response without Content-Length: {head[:200]!r}")
            if length:
                await reader.readexactly(length)
            done = time.monotonic()
            status[int(head[9:12])] += 1
            if sent >= start:
                latencies.append(done - sent)
    finally:
        writer.close()


async def load(args: argparse.Namespace) -> dict[str, object]:
    host = f"127.0.0.1:{args.port}"
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {args.user_agent}\r\nAccept: */*\r\n\r\n".encode()
        for path in Path(args.paths).read_text().split()
    ]
    latencies: list[float] = []
    status: Counter[int] = Counter()
    start = time.monotonic() + args.warmup
    stop = start + args.seconds
    step = max(1, len(requests) // args.connections)
    interval = args.connections / args.rate if args.rate else None
    first = time.monotonic()
    await asyncio.gather(*(connection(args.port, requests, i * step, start, stop, latencies, status, interval,
                                      first + (interval or 0) * i / args.connections)  # spread over one interval
                           for i in range(args.connections)))
    latencies.sort()
    return {
        "rate": len(latencies) / args.seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else None,
        "status": {str(code): count for code, count in status.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--paths", required=True, help="file with one request path per line")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rate", type=float, help="requests/s over all connections, each on a schedule (default: as fast as answered)")
    parser.add_argument("--user-agent", default="Mozilla/5.0 (Windows NT 10.0; Win64; x64) bench")
    print(json.dumps(uvloop.run(load(parser.parse_args()))))


if __name__ == "__main__":
    main()
