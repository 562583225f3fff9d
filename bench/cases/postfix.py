"""Postfix side by side: the same load through Postfix as a plain relay, and through inflight, into one smtp-sink.

Postfix's own C load generator, `smtp-source -s 8` (one connection per message), sends 50 KB and
2 KB messages (a) straight into `smtp-sink` (the floor), (b) through a private Postfix instance
started here as a plain relay on a free loopback port (`relayhost` = that sink, no rewriting,
no checks: the fastest Postfix relays), (c) through inflight with tracking off and (d) on
(`bench.noauth_relay`: smtp-source cannot AUTH; `[relay] workers` left at its default, one per
core, as deployed). Throughput is end to end: Postfix queues first, so its run ends when its log
shows every message `status=sent` to the sink; inflight answers 250 only once the sink took the
message. Each inflight row is a ratio to Postfix in the same round (budget: tracking on ≥ 1.0×).

Skipped, with the reason, where Postfix is not installed (Debian package `postfix`; the bench
installs nothing) or when not run as root (`postfix start` needs it). /work/shared/postfix-peer.md
has the facts this relies on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    Child,
    Mode,
    free_port,
    marketing_message,
    python,
    row,
    sized,
    skipped,
    transactional_message,
    write_config,
)

CASE = "postfix"
SESSIONS = 8
TOOLS = ("postfix", "postconf", "smtp-source", "smtp-sink")
MASTER_CF = Path("/usr/share/postfix/master.cf.dist")


def postfix_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def send(source: str, port: int, message: Path, count: int) -> float:
    """Seconds smtp-source takes to send `count` messages over SESSIONS parallel sessions."""
    started = time.monotonic()
    done = subprocess.run(
        [source, "-s", str(SESSIONS), "-m", str(count), "-F", str(message), "-f", "news@shop.example.com",
         "-t", "reader@example.net", f"127.0.0.1:{port}"],
        capture_output=True, timeout=300, check=False, stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise AssertionError(f"smtp-source exited {done.returncode}: {done.stderr.decode(errors='replace')[-500:]}")
    return time.monotonic() - started


class PostfixRelay:
    """A private Postfix instance (own config, queue and log under `work`) relaying everything to one sink."""

    def __init__(self, postfix: str, work: Path, port: int, sink_port: int) -> None:
        self.postfix = postfix
        self.config = work / "postfix"
        self.log = work / "postfix.log"
        self.config.mkdir()
        (work / "queue").mkdir()  # Postfix creates its queue folders in it at start
        (work / "data").mkdir()
        shutil.chown(work / "data", "postfix")  # the master's lock file lives there
        main = {
            "compatibility_level": "3.6", "myhostname": "postfix.bench.example", "mydestination": "",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "relayhost": f"[127.0.0.1]:{sink_port}",
            "mynetworks": "127.0.0.0/8", "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_tls_security_level": "none", "message_size_limit": "52428800", "maillog_file": str(self.log),
            "maillog_file_prefixes": str(work), "meta_directory": "/etc/postfix",
            "queue_directory": str(work / "queue"), "data_directory": str(work / "data"),
            "alias_maps": "", "alias_database": "", "biff": "no", "smtpd_banner": "$myhostname ESMTP",
        }
        (self.config / "main.cf").write_text("".join(f"{key} = {value}\n" for key, value in main.items()))
        services = []
        for line in MASTER_CF.read_text().splitlines():
            fields = line.split()
            if line.startswith(("#", " ", "\t")) or len(fields) < 8:
                services.append(line)
            elif fields[0] == "smtp" and fields[1] == "inet":
                services.append(f"127.0.0.1:{port} inet n - n - - smtpd")
            else:  # no chroot: the private queue directory has no copy of /etc for it
                services.append(" ".join([*fields[:4], "n", *fields[5:]]))
        (self.config / "master.cf").write_text("\n".join(services) + "\n")
        self.port = port
        self._counted = 0
        self._offset = 0

    def __enter__(self) -> PostfixRelay:
        self._postfix("start")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self._postfix("stop")
        raise RuntimeError(f"postfix did not listen on {self.port}:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self._postfix("stop")

    def _postfix(self, action: str) -> None:
        done = subprocess.run([self.postfix, "-c", str(self.config), action], capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode != 0 and action == "start":
            raise RuntimeError(f"postfix {action} exited {done.returncode}: {done.stderr[-800:]}\n{self.log_tail()}")

    def delivered(self) -> int:
        """Messages Postfix has handed to the sink so far (`status=sent` in its log)."""
        if self.log.exists():
            with self.log.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read()
            complete = chunk.rfind(b"\n") + 1
            self._counted += chunk[:complete].count(b" status=sent ")
            self._offset += complete
        return self._counted

    def wait_for(self, total: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.delivered() < total:
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix delivered {self.delivered()} of {total}:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""


def missing() -> str | None:
    absent = [tool for tool in TOOLS if postfix_tool(tool) is None]
    if absent:
        return f"Postfix not installed ({', '.join(absent)} missing; Debian package postfix)"
    if not MASTER_CF.exists():
        return f"{MASTER_CF} missing (Debian's postfix package ships it)"
    if os.geteuid() != 0:
        return "postfix start needs root"
    return None


def run(quick: bool, smoke: bool = False) -> list[dict[str, Any]]:
    reason = missing()
    if reason is not None:
        return [skipped(CASE, "smtp-source → Postfix / inflight → smtp-sink", reason)]
    source, sink, postfix = postfix_tool("smtp-source"), postfix_tool("smtp-sink"), postfix_tool("postfix")
    assert source is not None and sink is not None and postfix is not None
    mode = Mode(quick, smoke)
    rounds = mode.pick(full=3, quick=1, smoke=1)
    seconds = mode.pick(full=2.5, quick=1.0, smoke=0.2)
    size, links = mode.pick(full=(50_000, 50), quick=(50_000, 50), smoke=(5_000, 5))
    with tempfile.TemporaryDirectory(prefix="bench-postfix-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # smtp-sink runs as nobody, Postfix's daemons as postfix
        shapes = {"marketing": marketing_message(size, links), "transactional": transactional_message(2_000)}
        files = {}
        for name, data in shapes.items():
            files[name] = work / f"{name}.txt"  # smtp-source -F wants plain lines; it adds the CRLFs
            files[name].write_bytes(data.replace(b"\r\n", b"\n"))
        labels = {"marketing": f"{sized(shapes['marketing'])}/{links} links", "transactional": f"{sized(shapes['transactional'])}"}
        sink_port, postfix_port, on_port, off_port = free_port(), free_port(), free_port(), free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to keep root privileges
        configs = {
            project: write_config(work / f"{project}.toml", relay_port=port, tracker_port=free_port(),
                                  store=work / f"{project}.db", upstream=f"smtp+insecure://127.0.0.1:{sink_port}",
                                  projects={project: mode_name})
            for project, port, mode_name in (("on", on_port, "ENABLED"), ("off", off_port, "DISABLED"))
        }
        targets = {"floor": sink_port, "postfix": postfix_port, "off": off_port, "on": on_port}
        samples: dict[tuple[str, str], list[float]] = {(shape, t): [] for shape in shapes for t in targets}
        sent = dict.fromkeys(targets.values(), 0)
        with Child("smtp-sink", [sink, *user, f"127.0.0.1:{sink_port}", "1024"], sink_port, work), \
                PostfixRelay(postfix, work, postfix_port, sink_port) as relay_postfix, \
                Child("relay-on", python("bench.noauth_relay", "--config", configs["on"], "--project", "on"), on_port, work) as on, \
                Child("relay-off", python("bench.noauth_relay", "--config", configs["off"], "--project", "off"), off_port, work) as off:
            for _ in range(rounds):
                for shape in shapes:
                    for target, port in targets.items():
                        warmup = mode.pick(full=80, quick=40, smoke=8)
                        rate = warmup / send(source, port, files[shape], warmup)  # warms up and sizes the run
                        if target == "postfix":
                            relay_postfix.wait_for(sent[port] + warmup)
                        count = max(SESSIONS, int(rate * seconds))
                        started = time.monotonic()
                        send(source, port, files[shape], count)
                        sent[port] += warmup + count
                        if target == "postfix":
                            relay_postfix.wait_for(sent[port])  # end to end: until the sink has every one
                        samples[(shape, target)].append(count / (time.monotonic() - started))
            relayed = {port: relay.log_path.read_text().count("outcome=queued") for port, relay in ((on_port, on), (off_port, off))}
        for port, count in relayed.items():
            if count != sent[port]:
                raise AssertionError(f"relay on port {port} queued {count} messages, smtp-source sent {sent[port]}")

    rows = []
    for shape, label in labels.items():
        plain = (f"{label}: smtp-source → Postfix (plain relay) → smtp-sink", samples[(shape, "postfix")])
        rows.append(row(CASE, f"{label}: smtp-source → smtp-sink (floor)", "msg/s", samples[(shape, "floor")]))
        rows.append(row(CASE, plain[0], "msg/s", plain[1], note="end to end: until Postfix's log shows every status=sent"))
        rows.append(row(CASE, f"{label}: → inflight, tracking off → smtp-sink", "msg/s", samples[(shape, "off")],
                        baseline=plain))
        rows.append(row(CASE, f"{label}: → inflight, tracking on → smtp-sink", "msg/s", samples[(shape, "on")],
                        baseline=plain, min_ratio=1.0))
    return rows
