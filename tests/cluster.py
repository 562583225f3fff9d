"""Several inflight nodes on one store, as real processes: the topology of docker-compose.yml.

`Cluster` starts `inflight relay` and `inflight tracker` through the CLI, each in its own process,
all from one configuration file whose listeners are on port 0: every node reads its real port
from its own "listening on" log line, so parallel test runs never race for a port. Nodes are
killed with real signals (SIGKILL, SIGTERM). `LossyLink` is a TCP hop between the app and a
relay that loses the relay's reply to one DATA, the fault an app retries after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import PROJECT, PROJECT_SECRET, free_port
from tests.upstreams import LoopbackServer

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(rb"(relay|tracker) listening on [0-9.]+:(\d+)")
START_SECONDS = 30.0  # two cores shared by the whole suite: imports alone can take seconds


def cluster_config(path: Path, *, store_url: str, upstream_url: str, webhook_url: str | None = None,
                   tracking: str = "ENABLED", extra: str = "") -> Path:
    """One TOML file for every node: listeners on port 0, one store, one upstream, one project. A node is
    one process (`workers = 1`): the nodes here are the processes; two nodes' workers would only add load."""
    hooks = f'webhook_url = "{webhook_url}"\nwebhook_secret = "receiver-secret-0123456789"\n' if webhook_url else ""
    path.write_text(f"""
[relay]
listen = "127.0.0.1:0"
hostname = "relay.test"
allow_plaintext_auth = true
drain_timeout_seconds = 5
workers = 1
[tracker]
listen = "127.0.0.1:0"
workers = 1
public_url = "http://127.0.0.1:1"
secrets = ["test-secret-1"]
[store]
url = "{store_url}"
[upstream]
url = "{upstream_url}"
connect_timeout_seconds = 1
data_timeout_seconds = 10
[webhooks]
timeout_seconds = 2
retry_initial_seconds = 0.1
retry_max_seconds = 0.5
poll_seconds = 0.1
[[projects]]
id = "{PROJECT}"
secret = "{PROJECT_SECRET}"
tracking = "{tracking}"
{hooks}{extra}""")
    return path


class Node:
    """One `inflight relay` or `inflight tracker` process; `port` is its SMTP or HTTP port once started."""

    def __init__(self, verb: str, config: Path, log: Path) -> None:
        self.verb = verb
        self.config = config
        self.log = log
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        offset = self.log.stat().st_size if self.log.exists() else 0  # a restart appends to the same log
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "inflight.cli", self.verb, "--config", str(self.config)],
                                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            for found in LISTENING.finditer(self.log.read_bytes()[offset:]):
                if found.group(1).decode() == self.verb:
                    self.port = int(found.group(2))
                    return self
            assert self.process.poll() is None, f"{self.verb} exited:\n{self.output()}"
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"{self.verb} did not listen within {START_SECONDS:g} s:\n{self.output()}")

    @property
    def smtp_port(self) -> int:  # the names RunningService has, so tests/test_flow.py's helpers take a Node
        return self.port

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash or the OOM killer does."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait for the drain; the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)


@dataclass
class Cluster:
    config: Path
    relays: list[Node] = field(default_factory=list)
    trackers: list[Node] = field(default_factory=list)

    def nodes(self) -> list[Node]:
        return self.relays + self.trackers


@contextlib.contextmanager
def cluster(directory: Path, config: Path, *, relays: int = 2, trackers: int = 2) -> Iterator[Cluster]:
    """`relays` relay and `trackers` tracker processes on `config`; every one stopped (SIGTERM) afterwards."""
    running = Cluster(config)
    try:
        for index in range(relays):
            running.relays.append(Node("relay", config, directory / f"relay-{index}.log").start())
        for index in range(trackers):
            running.trackers.append(Node("tracker", config, directory / f"tracker-{index}.log").start())
        yield running
    finally:
        problems = []
        for node in running.nodes():
            if node.process is not None and node.process.poll() is None and node.stop() != 0:
                problems.append(f"{node.verb} exited {node.process.returncode}:\n{node.output()[-3000:]}")
        assert not problems, "\n".join(problems)


class PrivatePostgres:
    """A PostgreSQL server of one test's own (initdb and pg_ctl into a temporary directory, on a free
    port), so the test may stop and start it: the shared server on 5432 serves every other engineer
    and test, and restarting it would break them. Run as the `postgres` user when we are root (the
    server refuses to run as root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.directory = Path(tempfile.mkdtemp(prefix="inflight-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, user="postgres")
            self._as_owner = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self._as_owner, str(self.bindir / program), *args], capture_output=True, text=True,
                              timeout=120, cwd=self.directory)
        assert done.returncode == 0, f"{program} failed:\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        """A fast shutdown, as a restart does: sessions are ended, open transactions rolled back."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are (Debian keeps them out of PATH), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class LossyLink(LoopbackServer):
    """A TCP hop in front of a relay that can lose the relay's reply to a DATA, as a cut connection does.

    Armed with `lose_next_reply()`, it passes the app's message through, then closes the app's side
    as soon as the final dot went by, while it keeps the relay's side open until the relay answered
    (the answer goes nowhere). The relay thus finishes the transaction as it would if the network
    had dropped its reply, and the app is left with a connection lost after its dot: it retries.
    """

    def __init__(self, relay_port: int) -> None:
        super().__init__()
        self.relay_port = relay_port
        self.lost_replies: list[bytes] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._armed = threading.Event()

    def lose_next_reply(self) -> None:
        self._armed.set()

    async def _session(self, app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter) -> None:
        # Held here: once the app's side is closed, asyncio keeps this task only through weak
        # references, and the garbage collector would end it before the relay's reply comes.
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
        relay_reader, relay_writer = await asyncio.open_connection("127.0.0.1", self.relay_port)
        dot_passed = asyncio.Event()

        async def upstream() -> None:  # app -> relay, watching for the end of DATA
            tail = b""
            while data := await app_reader.read(65536):
                tail = (tail + data)[-5:]
                if self._armed.is_set() and tail == b"\r\n.\r\n":  # decided before the relay can answer
                    self._armed.clear()
                    dot_passed.set()
                    app_writer.close()
                relay_writer.write(data)
                await relay_writer.drain()
                if dot_passed.is_set():
                    return

        async def downstream() -> None:  # relay -> app, until the lost reply
            while data := await relay_reader.read(65536):
                if dot_passed.is_set():
                    self.lost_replies.append(data)
                    return
                with contextlib.suppress(ConnectionError):  # the app's side may be cut meanwhile
                    app_writer.write(data)
                    await app_writer.drain()

        try:
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        finally:
            app_writer.close()
            relay_writer.close()
