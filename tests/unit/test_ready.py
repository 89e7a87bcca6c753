"""GET /ready and GET /ca.crt through the app factory; the upstreams are real HTTP
servers on loopback (and a port nobody listens on)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from passthrough import create_app, tls
from passthrough.web import health
from tests.support.procs import BackgroundHTTPServer, free_port

SENTINEL = "s3cr3t-Sentinel-value"


class StubRegistry:
    """Answers GET /v2/ with ``status`` and counts the requests (and what they carried)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.server = BackgroundHTTPServer(_Handler, self, name=f"stub-{status}").start()

    @property
    def url(self) -> str:
        return self.server.url

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        owner: StubRegistry = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.requests.append((self.path, self.headers.get("Authorization")))
        body = b"{}"
        self.send_response(owner.status)
        if owner.status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="stub"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def stubs() -> Any:
    made: dict[int, StubRegistry] = {}

    def make(status: int) -> StubRegistry:
        made[status] = StubRegistry(status)
        return made[status]

    yield make
    for stub in made.values():
        stub.server.stop()


def app_with(tmp_path: Path, **env: str) -> Flask:
    config = {"ENV_FILE": "/nonexistent", "TEMP_DIR": str(tmp_path), **env}
    if not env.get("CACHE_DIR") and "STORE" not in env:
        config["STORE"] = "off"  # no store unless the test names one
    app = create_app(config)
    app.config["TESTING"] = True
    return app


def get_ready(app: Flask) -> tuple[int, dict[str, Any]]:
    response = app.test_client().get("/ready")
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    return response.status_code, json.loads(response.get_data(as_text=True))


def expire(app: Flask) -> None:
    """The next /ready checks again, and waits for it (as the first probe does), instead
    of giving the last answer while a background round refreshes it."""
    app.extensions["passthrough.ready"].report = {}


def test_ready_without_a_store_is_ready_and_reports_the_upstreams(
    tmp_path: Path, stubs: Any
) -> None:
    default, hub = stubs(200), stubs(401)
    broken = stubs(500)
    dead = f"http://127.0.0.1:{free_port()}"
    app = app_with(
        tmp_path,
        REGISTRY_URL=default.url,
        UPSTREAMS=f"hub={hub.url},broken={broken.url},dead={dead}",
        CACHE_DIR="",
        STORE="off",
    )
    status, report = get_ready(app)
    assert status == 200
    assert report["status"] == "ready"
    assert report["store"]["ok"] is True and report["store"]["backend"] == "none"
    assert report["store"]["detail"]
    by_name = {u["name"]: u for u in report["upstreams"]}
    assert [u["name"] for u in report["upstreams"]] == ["default", "hub", "broken", "dead"]
    assert by_name["default"] == {
        "name": "default", "url": default.url, "ok": True, "status": 200, "detail": "reachable"
    }  # fmt: skip
    assert by_name["hub"]["ok"] is True and by_name["hub"]["status"] == 401, "401 is reachable"
    assert by_name["broken"]["ok"] is False and by_name["broken"]["status"] == 500
    assert by_name["dead"]["ok"] is False and by_name["dead"]["status"] is None
    assert "cannot connect" in by_name["dead"]["detail"]
    assert default.requests == [("/v2/", None)]


def test_ready_with_a_writable_filesystem_store_then_a_broken_one(
    tmp_path: Path, stubs: Any
) -> None:
    cache = tmp_path / "cache"
    app = app_with(tmp_path, REGISTRY_URL=stubs(200).url, CACHE_DIR=str(cache))
    status, report = get_ready(app)
    assert status == 200 and report["status"] == "ready"
    assert report["store"]["backend"] == "filesystem" and report["store"]["ok"] is True
    assert not [p for p in (cache / "tmp").iterdir()], "the probe file is removed"
    # The store's staging area is gone (a volume unmounted, a directory removed).
    shutil.rmtree(cache / "tmp")
    expire(app)
    status, report = get_ready(app)
    assert status == 503 and report["status"] == "unready"
    assert report["store"] == {
        "ok": False,
        "backend": "filesystem",
        "detail": report["store"]["detail"],
    }
    assert "cannot write" in report["store"]["detail"]
    # /health stays a liveness probe: the process serves.
    assert app.test_client().get("/health").status_code == 200


def test_an_expired_answer_is_given_at_once_while_it_is_refreshed(
    tmp_path: Path, stubs: Any
) -> None:
    cache = tmp_path / "cache"
    app = app_with(tmp_path, REGISTRY_URL=stubs(200).url, CACHE_DIR=str(cache))
    assert get_ready(app)[0] == 200
    shutil.rmtree(cache / "tmp")
    app.extensions["passthrough.ready"].expires = 0.0
    assert get_ready(app)[0] == 200, "the last answer, at once"
    deadline = time.monotonic() + 10
    while get_ready(app)[0] != 503:
        assert time.monotonic() < deadline, "the background round refreshed it"
        time.sleep(0.05)


def test_an_upstream_down_does_not_make_the_replica_unready(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app = app_with(tmp_path, REGISTRY_URL=dead, CACHE_DIR=str(tmp_path / "cache"))
    status, report = get_ready(app)
    assert status == 200 and report["status"] == "ready"
    assert report["upstreams"][0]["ok"] is False


def test_a_probe_storm_costs_one_round_of_checks(tmp_path: Path, stubs: Any) -> None:
    default = stubs(200)
    app = app_with(tmp_path, REGISTRY_URL=default.url, CACHE_DIR="")
    results: list[int] = []

    def probe() -> None:
        results.append(app.test_client().get("/ready").status_code)

    threads = [threading.Thread(target=probe) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 16
    assert default.count() == 1
    expire(app)
    get_ready(app)
    assert default.count() == 2


def test_ready_goes_through_the_outbound_policy(tmp_path: Path, stubs: Any) -> None:
    default = stubs(200)
    app = app_with(
        tmp_path,
        REGISTRY_URL=default.url,
        # A cloud metadata address: refused before any connection, trusted or not.
        UPSTREAMS="meta=http://169.254.169.254",
        REGISTRY_ALLOWLIST="ghcr.io",
        CACHE_DIR="",
    )
    _, report = get_ready(app)
    by_name = {u["name"]: u for u in report["upstreams"]}
    assert by_name["default"]["ok"] is True, "REGISTRY_URL's host is always allowed"
    assert by_name["meta"]["ok"] is False and by_name["meta"]["status"] is None
    assert "link-local" in by_name["meta"]["detail"]


def test_ready_never_sends_or_shows_credentials(tmp_path: Path, stubs: Any) -> None:
    default = stubs(401)
    app = app_with(
        tmp_path,
        REGISTRY_URL=default.url,
        REGISTRY_USERNAME="puller",
        REGISTRY_PASSWORD=SENTINEL,
        CACHE_DIR="",
    )
    response = app.test_client().get("/ready")
    assert SENTINEL not in response.get_data(as_text=True)
    assert "puller" not in response.get_data(as_text=True)
    assert default.requests == [("/v2/", None)]


def test_a_check_that_overruns_counts_as_failed(
    tmp_path: Path, stubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def stuck(url: str, policy: object) -> None:
        release.wait(10)

    monkeypatch.setattr(health, "probe_registry", stuck)
    monkeypatch.setattr(health, "READY_DEADLINE", 0.05)
    app = app_with(tmp_path, REGISTRY_URL=stubs(200).url, CACHE_DIR="")
    try:
        status, report = get_ready(app)
    finally:
        release.set()
    assert status == 200
    assert report["upstreams"][0]["ok"] is False
    assert "no answer within" in report["upstreams"][0]["detail"]


# --- GET /ca.crt ----------------------------------------------------------------------


def test_ca_is_404_without_self_signed_tls(tmp_path: Path) -> None:
    response = app_with(tmp_path, CACHE_DIR="").test_client().get("/ca.crt")
    assert response.status_code == 404
    text = response.get_data(as_text=True)
    assert "TLS_SELF_SIGNED is off" in text and text.count("\n") == 1


def test_ca_is_served_with_self_signed_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tls.make_self_signed(["localhost"], tmp_path / "tls")
    monkeypatch.setenv(tls.CA_FILE_ENV, str(files.ca_cert))
    app = app_with(tmp_path, TLS_SELF_SIGNED="true", CACHE_DIR="")
    response = app.test_client().get("/ca.crt")
    assert response.status_code == 200
    assert response.mimetype == "application/x-pem-file"
    assert response.get_data(as_text=True) == files.ca_pem()
    assert "PRIVATE KEY" not in response.get_data(as_text=True)


def test_ca_is_404_when_the_master_made_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(tls.CA_FILE_ENV, raising=False)
    app = app_with(tmp_path, TLS_SELF_SIGNED="true", CACHE_DIR="")
    response = app.test_client().get("/ca.crt")
    assert response.status_code == 404
    assert "gunicorn" in response.get_data(as_text=True)
