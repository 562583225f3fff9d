"""The suppression list over the API: `GET/POST /v1/suppressions`, `DELETE /v1/suppressions/{address}`.

The same list as `inflight suppressions` and the one the relay enforces at RCPT; permanent
bounces and complaints add to it by themselves (tracker/feedback.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from config.settings import ProjectSettings
from store.model import Suppressions, address_key


class SuppressionRoutes:
    def __init__(self, store: Suppressions) -> None:
        self.store = store

    async def list(self, request: Request, project: ProjectSettings) -> Response:
        entries = [{k: v for k, v in asdict(s).items() if k != "project"} for s in await self.store.suppressions(project.id)]
        return JSONResponse({"project": project.id, "mode": project.suppression.value, "suppressions": entries})

    async def add(self, request: Request, project: ProjectSettings) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        address = body.get("address") if isinstance(body, dict) else None
        detail = body.get("detail", "added over the API") if isinstance(body, dict) else None
        if not isinstance(address, str) or "@" not in address or not isinstance(detail, str) or set(body) - {"address", "detail"}:
            return JSONResponse({"error": 'body: expected {"address": "someone@example.com", "detail": "optional note"}'},
                                status_code=422)
        added = await self.store.suppress(project.id, address, reason="manual", detail=detail)
        return JSONResponse({"address": address_key(address), "added": added}, status_code=201 if added else 200)

    async def remove(self, request: Request, project: ProjectSettings) -> Response:
        address = request.path_params["address"]
        if not await self.store.unsuppress(project.id, address):
            return JSONResponse({"error": "address is not on this project's suppression list"}, status_code=404)
        return Response(status_code=204)
