"""``GET /metrics``: Prometheus text format, no authentication (scrapers do not carry keys; the
figures are aggregates without job ids or tenant names). Off with ``DARE_METRICS_ENABLED=false``."""
from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api import metrics
from service.api.deps import CtxDep

router = APIRouter(tags=["operations"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {CONTENT_TYPE_LATEST: {}}}})
def get_metrics(ctx: CtxDep) -> Response:
    # A registry per scrape: it only binds the collectors to this app's database.
    body = generate_latest(metrics.registry_for(ctx.factory))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
