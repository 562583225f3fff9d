"""`inflight` commands as real processes, and waiting for what they do: the one harness of the tests.

`write_config` writes the tests' configuration (tests/conftest.py config_mapping) as the TOML file a
process reads. `Inflight` starts `inflight <verb> --config FILE` in a process group of its own (so a
SIGKILL takes its worker processes with it), its output in a log file, and is ready once the log says
the verb's listener is up (the port is read from that line, so a configuration may listen on port 0).
`wait_for` polls for what the processes do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

from tests.conftest import config_mapping

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 30.0  # two cores shared by the whole suite: imports alone can take seconds
LISTENING = re.compile(rb"(relay|tracker) listening on [0-9.]+:(\d+)")
T = TypeVar("T")


def write_config(path: Path, upstream_url: str, **sections: Any) -> Path:
    """config_mapping(`path`'s folder, `upstream_url`, `sections`) as a TOML file at `path`."""
    lines = []
    for name, value in config_mapping(path.parent, upstream_url, **sections).items():
        for table in value if isinstance(value, list) else [value]:  # arrays of tables, or one table
            lines.append(f"[[{name}]]" if isinstance(value, list) else f"[{name}]")
            lines += [f"{key} = {json.dumps(item)}" for key, item in table.items()]  # JSON strings, lists, booleans are TOML
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(condition: Callable[[], T], *, seconds: float = 20.0, what: str = "condition", every: float = 0.02) -> T:
    """Call `condition` until it answers something true, and return that; fail after `seconds` with
    `what` and the last answer."""
    deadline = time.monotonic() + seconds
    while not (answer := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds:g} s (last: {answer!r:.500})"
        time.sleep(every)
    return answer


def answers(url: str) -> bool:
    """Whether GET `url` answers 200 now (a readiness check: /healthz)."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


class Inflight:
    """One `inflight <verb> --config FILE` process; `smtp_port` and `http_port` are where its relay and
    tracker listen once started (read from its log, so the configuration may give port 0)."""

    def __init__(self, verb: str, config: Path, log: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.verb = verb
        self.config = config
        self.log = log
        self.env = dict(env) if env is not None else None
        self.smtp_port = self.http_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "inflight.cli", self.verb, "--config", str(self.config)]

    def start(self, ready: Callable[[Self], bool] | None = None) -> Self:
        """Start it and wait until the verb's listener is up (`serve`: the tracker's, the last to start)
        and `ready` (when given) says so too. A restart appends to the same log."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        last = "tracker" if self.verb == "serve" else self.verb
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"inflight {self.verb} exited:\n{self.output()}"
            ports = {found.group(1): int(found.group(2)) for found in LISTENING.finditer(self.log.read_bytes()[offset:])}
            self.smtp_port = ports.get(b"relay", self.smtp_port)
            self.http_port = ports.get(b"tracker", self.http_port)
            if last.encode() in ports and (ready is None or ready(self)):
                return self
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"inflight {self.verb} was not ready within {START_SECONDS:g} s:\n{self.output()}")

    def run(self, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run it to its end (a start meant to fail), its output captured."""
        return subprocess.run(self.command(), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    @property
    def port(self) -> int:
        """The verb's own port: SMTP for `relay`, HTTP for `tracker` and `serve`."""
        return self.smtp_port if self.verb == "relay" else self.http_port

    @property
    def http_base(self) -> str:  # smtp_port and http_base: RunningService's names, so tests/test_flow.py's helpers take one
        return f"http://127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> set[int]:
        """The pids of its worker processes."""
        assert self.process is not None
        pid = self.process.pid
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}

    def kill(self) -> None:
        """SIGKILL to it and its workers at once (its process group): no drain, no cleanup, as a crash or
        the OOM killer does."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait for the drain (SIGKILL after `timeout`); the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)
