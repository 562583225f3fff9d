"""Settings → Tracking at runtime: a project's current mode, read per message and changed without a restart.

Precedence: a project's `tracking` in TOML is its initial mode. Once the mode is changed (the
settings API or `inflight settings tracking`), the value in the store wins, across restarts and
over later TOML edits, until it is changed again. Every change passes the availability rule that
the TOML value passes at load (`UpstreamSettings.unavailable`), so no route leads to a mode the
upstream cannot honour.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from config.settings import ProjectSettings, Settings, TrackingMode
from store import open_store
from store.model import EventStore

log = logging.getLogger("inflight.settings")

MODE_CHOICES = tuple(mode.value for mode in TrackingMode)


class ModeRefused(Exception):
    """A mode change that cannot be made: `status` 422 (not a mode) or 409 (not available with this upstream)."""

    def __init__(self, message: str, *, status: int, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class TrackingSettings:
    """The store-backed view of each project's tracking settings; holds no state, so every reader sees the latest write."""

    def __init__(self, settings: Settings, store: EventStore) -> None:
        self.settings = settings
        self.store = store

    @classmethod
    @asynccontextmanager
    async def opened(cls, settings: Settings) -> AsyncIterator[TrackingSettings]:
        """For a one-off command (the CLI): the configured store, open only for the duration."""
        store = open_store(settings.store.url)
        await store.open()
        try:
            yield cls(settings, store)
        finally:
            await store.close()

    async def mode(self, project: ProjectSettings) -> TrackingMode:
        """The mode in force now. Raises ValueError when the store holds something that is not a mode."""
        stored = await self.store.tracking_mode(project.id)
        return project.tracking if stored is None else TrackingMode(stored)

    async def view(self, project: ProjectSettings) -> dict[str, Any]:
        """The body of GET /v1/settings/tracking (and what the CLI twin prints)."""
        upstream = self.settings.upstream
        return {
            "mode": (await self.mode(project)).value,
            "available_modes": [mode.value for mode in upstream.available_modes],
            "allow_tracking_override": project.allow_tracking_override,
            "engine": upstream.tracking_engine.value,
        }

    async def change(self, project: ProjectSettings, value: object, *, by: str) -> dict[str, Any]:
        """Validate and store a new mode; the next message relayed for the project uses it."""
        if not isinstance(value, str) or value not in MODE_CHOICES:
            raise ModeRefused(f"mode: expected one of {', '.join(MODE_CHOICES)}, got {value!r}",
                              status=422, detail={"allowed": list(MODE_CHOICES)})
        mode = TrackingMode(value)
        unavailable = self.settings.upstream.unavailable(mode)
        if unavailable is not None:
            raise ModeRefused(f"project {project.id!r}: {unavailable}", status=409,
                              detail={"missing": self.settings.upstream.missing_for(mode)})
        previous = await self.store.tracking_mode(project.id) or project.tracking.value
        await self.store.set_tracking_mode(project.id, mode.value)
        log.info("tracking-mode-changed project=%s mode=%s previous=%s by=%s", project.id, mode.value, previous, by)
        return await self.view(project)

    async def reset(self, project: ProjectSettings, *, by: str) -> dict[str, Any]:
        """Forget the mode stored at runtime: the project follows `tracking` in the TOML again."""
        previous = await self.store.tracking_mode(project.id)
        await self.store.set_tracking_mode(project.id, None)
        log.info("tracking-mode-reset project=%s mode=%s previous=%s by=%s", project.id, project.tracking.value,
                 previous or project.tracking.value, by)
        return await self.view(project)

    async def overrides(self) -> list[str]:
        """Projects whose stored mode differs from the TOML value: legal, but a TOML edit then changes nothing."""
        notes = []
        for project in self.settings.projects:
            stored = await self.store.tracking_mode(project.id)
            if stored is not None and stored != project.tracking.value:
                notes.append(f"project {project.id!r}: tracking mode {stored} was set at runtime and wins over "
                             f"tracking = {project.tracking.value!r} in the TOML; `inflight settings tracking "
                             f"{project.id} --reset` returns to the TOML value")
        return notes

    async def problems(self) -> list[str]:
        """Stored modes this configuration cannot honour (the upstream changed since): start and check-config refuse them."""
        problems = []
        for project in self.settings.projects:
            stored = await self.store.tracking_mode(project.id)
            if stored is None:
                continue
            fix = f"change it with `inflight settings tracking {project.id} MODE`"
            if stored not in MODE_CHOICES:
                problems.append(f"project {project.id!r}: stored tracking mode {stored!r} is not one of "
                                f"{', '.join(MODE_CHOICES)}; {fix}")
                continue
            unavailable = self.settings.upstream.unavailable(TrackingMode(stored))
            if unavailable is not None:
                problems.append(f"project {project.id!r}: stored tracking mode (set at runtime, it wins over the TOML "
                                f"value): {unavailable}; or {fix}")
        return problems
