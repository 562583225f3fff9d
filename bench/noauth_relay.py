"""The relay for Postfix's smtp-source, which cannot AUTH: inflight's handler and pipeline, AUTH off.

Everything after AUTH is the product's own code, built by the product's own constructors
(RelayHandler, Pipeline, the configured upstream and store, uvloop); only aiosmtpd's
`auth_required` is off and the session is bound to one project. Bench use only, on loopback:
an SMTP listener without AUTH is an open relay.

    python -m bench.noauth_relay --config relay.toml --project on
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

from config.settings import Settings, load_settings
from inflight.cli import configure_logging
from inflight.service import bind
from relay.pipeline import Pipeline
from relay.server import RelayHandler
from relay.upstream import upstream_from_url
from tracker.store import SqliteEventStore
from tracker.tokens import TokenSigner


class ProjectBoundHandler(RelayHandler):
    """Every session counts as authenticated for one project, as AUTH would have made it."""

    def __init__(self, settings: Settings, pipeline: Pipeline, project: str) -> None:
        super().__init__(settings, pipeline)
        self.project = project

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        session.authenticated = True
        session.auth_data = self.project  # type: ignore[assignment]  # aiosmtpd types it None until AUTH sets it
        return await super().handle_DATA(server, session, envelope)


async def serve(settings: Settings, project: str) -> None:
    store = SqliteEventStore.from_url(settings.store.url)
    await store.open()
    pipeline = Pipeline(settings=settings, upstream=upstream_from_url(settings.upstream.url), store=store,
                        signer=TokenSigner(settings.tracker.secrets))
    handler = ProjectBoundHandler(settings, pipeline, project)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=settings.relay.max_message_bytes, hostname=settings.relay.hostname,
                     ident="inflight", auth_required=False, loop=loop),
        sock=bind(settings.relay.listen),
    )
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    server.close()
    await server.wait_closed()
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--project", required=True, help="the project every session is bound to")
    args = parser.parse_args()
    settings = load_settings(args.config)
    if settings.project(args.project) is None:
        parser.error(f"no project {args.project!r} in {args.config}")
    configure_logging()  # as `inflight relay`: its line per message is part of what a message costs
    uvloop.run(serve(settings, args.project))


if __name__ == "__main__":
    main()
