"""GET /health: 200 while the process can serve (liveness and readiness probes)."""

from __future__ import annotations

from flask import Blueprint, Response

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    return Response("ok\n", mimetype="text/plain", headers={"Cache-Control": "no-store"})
