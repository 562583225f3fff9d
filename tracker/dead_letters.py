"""Webhook deliveries given up after `retry_hours`, over the API: listed, and replayed on demand
(`GET /v1/webhooks/dead-letters`, `POST /v1/webhooks/dead-letters/{id}/replay`). They are kept as long
as the project's events: the store's retention and erasure delete them with their events."""

from __future__ import annotations

import time
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from config.settings import ProjectSettings
from store.model import MAX_LIMIT, DeadLetters


class DeadLetterRoutes:
    def __init__(self, store: DeadLetters) -> None:
        self.store = store

    async def list(self, request: Request, project: ProjectSettings) -> Response:
        limit = request.query_params.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            return JSONResponse({"error": f"limit: expected an integer from 1 to {MAX_LIMIT}"}, status_code=422)
        letters = await self.store.dead_letters(project.id, limit=int(limit))
        return JSONResponse({"dead_letters": [asdict(letter) for letter in letters]})

    async def replay(self, request: Request, project: ProjectSettings) -> Response:
        """Back into the outbox with the same webhook-id, due now and with a fresh `retry_hours`."""
        dead_id = request.path_params["id"]
        if not dead_id.isdigit() or not await self.store.replay_dead_letter(project.id, int(dead_id), now=time.time()):
            return JSONResponse({"error": "no such dead letter in this project"}, status_code=404)
        return JSONResponse({"replayed": int(dead_id)}, status_code=202)
