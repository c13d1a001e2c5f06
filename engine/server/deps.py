"""Dependencies the routes share, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from engine.host import EngineHost
from engine.worker import EngineWorker


def get_host(request: Request) -> EngineHost:
    return request.app.state.host


def get_worker(host: Annotated[EngineHost, Depends(get_host)]) -> EngineWorker:
    """The serving worker, or 503 (EngineStopped) while models are loading or failed."""
    return host.require_worker()


HostDep = Annotated[EngineHost, Depends(get_host)]
WorkerDep = Annotated[EngineWorker, Depends(get_worker)]
