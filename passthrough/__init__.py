"""passthrough: any container registry image as one ``docker save`` tar over a plain
HTTP GET, built straight from the registry's V2 API with no Docker daemon."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask

from passthrough.config import Settings, load_settings
from passthrough.observe import logs, telemetry
from passthrough.services import EXTENSION, Services

__all__ = ["create_app"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The app factory. ``config`` may hold ``SETTINGS`` (a ready :class:`Settings`),
    environment-style overrides (``{"REGISTRY_URL": ...}``) and Flask settings."""
    overrides = dict(config or {})
    settings = overrides.pop("SETTINGS", None)
    env: dict[str, str] | None = None
    if not isinstance(settings, Settings):
        env = dict(os.environ)
        env.update({k: str(v) for k, v in overrides.items() if k.isupper() and isinstance(v, str)})
        settings = load_settings(env)

    # No implicit /static route: the UI blueprint serves its own files.
    app = Flask(__name__, static_folder=None)
    app.config.update(overrides)
    # All the process's shared objects, made here and nowhere else (passthrough.services).
    app.extensions[EXTENSION] = Services.create(settings)
    logs.configure(settings.log_level, settings.log_format)
    # Under gunicorn each worker sets tracing up after the fork (gunicorn.conf.py).
    if not telemetry.is_active() and not telemetry.under_gunicorn():
        if telemetry.tracing_enabled(settings):
            telemetry.setup_tracing(settings, environ=env)
    telemetry.instrument_app(app)

    from passthrough.web import describe, downloads, errors, health, metrics, tls, token, ui, v2

    # Order matters where paths overlap: /v2/token is this service, never a repository
    # name, so the token blueprint comes before the /v2 API.
    for blueprint in (errors, health, tls, token, downloads, describe, ui, metrics, v2):
        app.register_blueprint(blueprint.bp)
    from passthrough.web import api_stub  # STUB, not to be merged: the real /api/v1 replaces it

    app.register_blueprint(api_stub.bp)
    if settings.trusted_proxies:
        from passthrough.web.clients import ClientAddress

        # Outermost, after the instrumentation wrapped the app: the span, the handlers
        # and the access log all see the client, not the ingress.
        app.wsgi_app = ClientAddress(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign,assignment]
    return app
