"""GET /metrics: the Prometheus exposition of every gunicorn worker's samples (or this
process's, without PROMETHEUS_MULTIPROC_DIR), and the pod's transfer slots in use; see
:mod:`passthrough.observe.metrics`."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from passthrough.observe import metrics
from passthrough.services import services_of

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    slots = services_of(current_app).slots
    body, content_type = metrics.render(
        {
            "passthrough_transfers_in_use": (
                "Transfer slots held now, by every worker of the pod",
                slots.in_use(),
            ),
            "passthrough_transfers_limit": ("The pod's MAX_TRANSFERS", slots.capacity),
        }
    )
    return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
