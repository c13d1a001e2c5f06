"""System routes: /health (models and KV pool, 503 until loaded), /ping (no model access), /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from engine.server.deps import HostDep, WorkerDep
from engine.server.metrics import metrics_json, prometheus_text
from engine.server.schemas import ERROR_RESPONSES, HealthResponse, MetricsResponse, PingResponse

router = APIRouter(tags=["system"])


def without_home(text: str | None) -> str | None:
    """``text`` with the user's home folder written as ``~``: local paths say who the user is."""
    home = str(Path.home())
    return text.replace(home, "~") if text and len(home) > 1 else text


@router.get("/ping", response_model=PingResponse, summary="Liveness check",
            responses={401: ERROR_RESPONSES[401]})
async def ping() -> PingResponse:
    """Answers without touching the models (and without an API key)."""
    return PingResponse()


@router.get("/health", response_model=HealthResponse, summary="Models, device and KV pool",
            responses={503: {"model": HealthResponse, "description": "Models are loading or failed; see reason."},
                       401: ERROR_RESPONSES[401]})
async def health(host: HostDep):
    """200 with model names, device, dtype and KV pool stats while models serve; 503 (with the reason) before."""
    worker = host.worker
    reason = without_home(host.reason)  # a failed load's message may quote the folder the user typed
    if worker is None:
        body = HealthResponse(status=host.state if host.state != "ready" else "loading", reason=reason)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    info = worker.engine.info()
    kv = metrics_json(worker.snapshot())["kv"]
    return HealthResponse(status="ok", reason=reason, target=info["target"], draft=info["draft"],
                          has_draft=info["has_draft"], eagle=info["eagle"], draft_methods=info["draft_methods"],
                          device=info["device"], device_name=info["device_name"],
                          dtype=info["dtype"],
                          max_context=info["max_context"], kv=kv)


@router.get("/metrics", response_model=MetricsResponse, summary="Engine metrics (JSON or Prometheus)",
            responses={**ERROR_RESPONSES, 200: {"description": "JSON by default; Prometheus text exposition with "
                                                "format=prometheus.",
                                                "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request, worker: WorkerDep,
                  format: Annotated[Literal["json", "prometheus"], Query(
                      description="json (default) or prometheus (text exposition, helix:* names)")] = "json"):
    """Requests served / running / waiting, tokens generated, speculative stats, tokens/s over the last
    minute, KV blocks. Prometheus names: helix:spec_decode_num_drafts_total, helix:kv_cache_usage_perc, ..."""
    if format == "prometheus":
        return Response(prometheus_text(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
    return metrics_json(worker.snapshot())
