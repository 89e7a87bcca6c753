"""GET /metrics: the Prometheus exposition of every gunicorn worker's samples (or this
process's, without PROMETHEUS_MULTIPROC_DIR); see :mod:`passthrough.observe.metrics`."""

from __future__ import annotations

from flask import Blueprint, Response

from passthrough.observe import metrics

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
