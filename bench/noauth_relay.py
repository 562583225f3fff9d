"""The relay for Postfix's smtp-source, which cannot AUTH: inflight's handler and pipeline, AUTH off.

Everything after AUTH is the product's own code, built by the product's own constructors
(RelaySMTP with its command limits, RelayHandler, Pipeline, the configured upstream and store,
uvloop); only `auth_required` is off and every session is bound to one project. Bench use only, on loopback:
an SMTP listener without AUTH is an open relay.

    python -m bench.noauth_relay --config relay.toml --project on
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from pathlib import Path

import uvloop
from aiosmtpd.smtp import SMTP, Session

from config.settings import ProjectSettings, Settings, load_settings
from inflight.service import Listeners
from inflight.supervisor import Slot, Supervisor, plan_slots
from monitoring.logs import configure_logging
from relay.accept import SharedAcceptor
from relay.pipeline import Pipeline
from relay.server import COMMAND_LIMITS, RelayHandler, RelaySMTP
from relay.sessions import Sessions
from relay.throttle import RateLimiter
from relay.upstream import upstream_from_settings
from relay.workers import cpu_pool
from store import migrate_store, open_store
from store.spool import Spool
from tracking.tokens import TokenKeys


class ProjectBoundHandler(RelayHandler):
    """Every session counts as the one project, as AUTH would have made it."""

    def __init__(self, settings: Settings, pipeline: Pipeline, project: ProjectSettings) -> None:
        super().__init__(settings, pipeline, RateLimiter())
        self.project = project

    def _project(self, session: Session) -> ProjectSettings | None:
        return self.project


async def serve(settings: Settings, project: ProjectSettings, sock: socket.socket) -> None:
    store = open_store(settings.store.url)
    await store.open()
    workers = cpu_pool(settings.relay.cpu_workers)
    upstream = upstream_from_settings(settings.upstream, local_hostname=settings.relay.hostname, executor=workers)
    spool = Spool(settings.store.spool_path, store_url=settings.store.url)
    pipeline = Pipeline(settings=settings, upstream=upstream, store=store,
                        keys=TokenKeys(settings.tracker.secrets, [project.id]), spool=spool, executor=workers)
    await spool.open()
    handler = ProjectBoundHandler(settings, pipeline, project)
    loop = asyncio.get_running_loop()
    sessions = Sessions()

    def protocol() -> SMTP:
        return sessions.track(RelaySMTP(handler, require_tls=False, data_size_limit=settings.relay.max_message_bytes,
                                        hostname=settings.relay.hostname, ident="inflight", auth_required=False,
                                        command_call_limit=COMMAND_LIMITS, loop=loop))

    # As `inflight relay` accepts: each worker its share of the shared socket (relay/accept.py).
    server: asyncio.Server | SharedAcceptor = (
        SharedAcceptor(sock, protocol, sessions=lambda: len(sessions.live())) if settings.relay.workers > 1
        else await loop.create_server(protocol, sock=sock))
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    server.close()
    await server.wait_closed()
    await spool.close()
    await upstream.close()
    workers.shutdown(cancel_futures=True)
    pipeline.close()
    await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--project", required=True, help="the project every session is bound to")
    args = parser.parse_args()
    settings = load_settings(args.config)
    project = settings.project(args.project)
    if project is None:
        parser.error(f"no project {args.project!r} in {args.config}")
    configure_logging()  # as `inflight relay`: its line per message is part of what a message costs
    listeners = Listeners.bind(settings, relay=True, tracker=False)

    def worker(slot: Slot, inherited: Listeners) -> int:
        assert inherited.relay is not None
        uvloop.run(serve(settings, project, inherited.relay))
        return 0

    slots = plan_slots(settings, relay=True, tracker=False)
    if len(slots) == 1:  # `[relay] workers` processes, as `inflight relay` runs them
        return worker(slots[0], listeners)
    def prepare() -> int:  # the schema once, before the workers open the store
        asyncio.run(migrate_store(settings.store.url))
        return 0

    return Supervisor(settings, listeners, slots, worker=worker, prepare=prepare).run()


if __name__ == "__main__":
    raise SystemExit(main())
