"""SMTP load generator: N concurrent sessions sending one message over and over, for a fixed time.

Each session connects once, EHLO, AUTH PLAIN when given a user, then loops MAIL/RCPT×r/DATA
without pipelining (as most application mailers do) and counts the messages answered 250 in
the measured window, after a warm-up. Runs in its own process; prints one JSON line.

    python -m bench.smtpload --port 2525 --message m.eml --connections 8 --seconds 3 [--user U --password P]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop


@dataclass
class Tally:
    measured: int = 0  # answered 250 inside the measured window
    accepted: int = 0  # answered 250 at any time: what the sink must have received
    refused: dict[str, int] = field(default_factory=dict)


class SmtpError(Exception):
    pass


async def reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed by server")
        lines.append(line.decode(errors="replace").rstrip())
        if line[3:4] != b"-":
            return int(line[:3]), lines[-1]


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, expect: int) -> None:
    writer.write(line + b"\r\n")
    code, text = await reply(reader)
    if code != expect:
        raise SmtpError(f"{line.split()[0].decode()} → {text}")


async def session(args: argparse.Namespace, body: bytes, tally: Tally, start: float, stop: float, index: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    try:
        code, text = await reply(reader)
        if code != 220:
            raise SmtpError(f"greeting → {text}")
        await command(reader, writer, b"EHLO load.bench.example", 250)
        if args.user:
            token = base64.b64encode(f"\0{args.user}\0{args.password}".encode()).decode()
            await command(reader, writer, f"AUTH PLAIN {token}".encode(), 235)
        rcpts = [f"RCPT TO:<reader{index}.{n}@example.net>".encode() for n in range(args.recipients)]
        while time.monotonic() < stop:
            await command(reader, writer, b"MAIL FROM:<news@shop.example.com>", 250)
            for rcpt in rcpts:
                await command(reader, writer, rcpt, 250)
            await command(reader, writer, b"DATA", 354)
            writer.write(body)
            code, text = await reply(reader)
            if code == 250:
                tally.accepted += 1
                if start <= time.monotonic() <= stop:
                    tally.measured += 1
            else:
                tally.refused[text] = tally.refused.get(text, 0) + 1
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()


async def load(args: argparse.Namespace) -> dict[str, object]:
    raw = Path(args.message).read_bytes()
    body = raw.replace(b"\r\n.", b"\r\n..")  # dot-stuffing (RFC 5321 §4.5.2)
    body += b"" if body.endswith(b"\r\n") else b"\r\n"
    body += b".\r\n"
    tally = Tally()
    start = time.monotonic() + args.warmup
    stop = start + args.seconds
    await asyncio.gather(*(session(args, body, tally, start, stop, i) for i in range(args.connections)))
    return {
        "rate": tally.measured / args.seconds,
        "measured": tally.measured,
        "accepted": tally.accepted,
        "refused": tally.refused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", required=True, help="raw message file (CRLF line endings)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds sent before the window opens")
    parser.add_argument("--user")
    parser.add_argument("--password")
    print(json.dumps(uvloop.run(load(parser.parse_args()))))


if __name__ == "__main__":
    main()
