"""Several inflight nodes on one store, as real processes: the topology of docker-compose.yml.

`Cluster` starts `inflight relay` and `inflight tracker` through the CLI (tests/processes.py), each
in its own process, all from one configuration file whose listeners are on port 0: every node reads
its real port from its own "listening on" log line, so parallel test runs never race for a port.
Nodes are killed with real signals (SIGKILL, SIGTERM). `LossyLink` is a TCP hop between the app and a
relay that loses the relay's reply to one DATA, the fault an app retries after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import PROJECT, PROJECT_SECRET, free_port
from tests.processes import Inflight, write_config
from tests.upstreams import LoopbackServer


def cluster_config(path: Path, *, store_url: str, upstream_url: str, webhook_url: str | None = None,
                   tracking: str = "ENABLED") -> Path:
    """One TOML file for every node: listeners on port 0, one store, one upstream, one project. A node is
    one process (`workers = 1`): the nodes here are the processes; two nodes' workers would only add load."""
    hooks = {"webhook_url": webhook_url, "webhook_secret": "receiver-secret-0123456789"} if webhook_url else {}
    return write_config(path, upstream_url, relay={"drain_timeout_seconds": 5}, store={"url": store_url},
                        upstream={"connect_timeout_seconds": 1, "data_timeout_seconds": 10},
                        webhooks={"timeout_seconds": 2, "retry_initial_seconds": 0.1, "retry_max_seconds": 0.5,
                                  "poll_seconds": 0.1},
                        projects=[{"id": PROJECT, "secret": PROJECT_SECRET, "tracking": tracking, **hooks}])


@dataclass
class Cluster:
    config: Path
    relays: list[Inflight] = field(default_factory=list)
    trackers: list[Inflight] = field(default_factory=list)

    def nodes(self) -> list[Inflight]:
        return self.relays + self.trackers


@contextlib.contextmanager
def cluster(directory: Path, config: Path, *, relays: int = 2, trackers: int = 2) -> Iterator[Cluster]:
    """`relays` relay and `trackers` tracker processes on `config`; every one stopped (SIGTERM) afterwards."""
    running = Cluster(config)
    try:
        for index in range(relays):
            running.relays.append(Inflight("relay", config, directory / f"relay-{index}.log").start())
        for index in range(trackers):
            running.trackers.append(Inflight("tracker", config, directory / f"tracker-{index}.log").start())
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
