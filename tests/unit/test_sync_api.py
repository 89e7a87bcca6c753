"""/api/v1/sync through Flask's test client on a filesystem store, and what is around a
run that needs no upstream: who may (401, 403), a bad or missing SYNC_FILE (400 naming
the entry, nothing started), one run per pod (409), the run reports in the store (kept,
trimmed), and the CLI's printing (a line per image, a bar on a terminal, JSON)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from passthrough import create_app
from passthrough.cli_sync import Printer
from passthrough.config import Settings, load_settings
from passthrough.services import services_of
from passthrough.store import layout
from passthrough.sync import runs as runs_module
from passthrough.sync.engine import ImageResult, Summary
from passthrough.sync.runs import RunLog
from tests.support.htpasswd import bcrypt_line

ADMIN = ("alice", "alice-pw")
NOT_ADMIN = ("bob", "bob-pw")


def settings_for(tmp_path: Path, sync_text: str | None) -> Settings:
    (tmp_path / "htpasswd").write_text(
        "".join(bcrypt_line(u, p) + "\n" for u, p in (ADMIN, NOT_ADMIN))
    )
    (tmp_path / "access.yaml").write_text(
        "groups:\n  admin: [alice]\nrules:\n  - repositories: [hosted/*]\n    pull: ['*']\n"
    )
    env = {
        "CACHE_DIR": str(tmp_path / "cache"),
        "HTPASSWD_FILE": str(tmp_path / "htpasswd"),
        "ACCESS_FILE": str(tmp_path / "access.yaml"),
        "PUBLIC_URL": "http://pt.test",
        "TOKEN_SECRET": "a unit test's token secret",
    }
    if sync_text is not None:
        (tmp_path / "sync.yaml").write_text(sync_text)
        env["SYNC_FILE"] = str(tmp_path / "sync.yaml")
    return load_settings(env, env_file="/nonexistent")


def client_for(settings: Settings) -> FlaskClient:
    return create_app({"SETTINGS": settings}).test_client()


def error_of(response: Any) -> tuple[str, str]:
    (error,) = response.get_json()["errors"]
    return error["code"], error["message"]


BAD = "images:\n  - repository: team/app\n    tags: ['1.[0']\n"
GOOD = "images:\n  - repository: team/app\n    tags: ['1.0']\n"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_admins_only(tmp_path: Path, method: str) -> None:
    client = client_for(settings_for(tmp_path, GOOD))
    anonymous = client.open("/api/v1/sync", method=method)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="passthrough admin"'
    assert error_of(anonymous)[0] == "UNAUTHORIZED"
    wrong = client.open("/api/v1/sync", method=method, auth=("alice", "nope"))
    assert wrong.status_code == 401
    refused = client.open("/api/v1/sync", method=method, auth=NOT_ADMIN)
    assert refused.status_code == 403
    assert error_of(refused) == ("DENIED", "user 'bob' is no admin of this door")


def test_a_bad_sync_file_is_a_400_naming_the_entry_and_starts_nothing(tmp_path: Path) -> None:
    client = client_for(settings_for(tmp_path, BAD))
    response = client.post("/api/v1/sync", auth=ADMIN)
    assert response.status_code == 400
    code, message = error_of(response)
    assert code == "SYNC_FILE_INVALID"
    assert message.startswith(f"{tmp_path / 'sync.yaml'}: entry 1 (team/app): bad glob '1.[0'")
    assert client.get("/api/v1/sync", auth=ADMIN).get_json() == {"runs": []}


def test_no_sync_file_is_a_400(tmp_path: Path) -> None:
    client = client_for(settings_for(tmp_path, None))
    response = client.post("/api/v1/sync", auth=ADMIN)
    assert response.status_code == 400
    assert error_of(response) == (
        "SYNC_FILE_INVALID",
        "SYNC_FILE is not set: there is nothing to sync",
    )


def test_one_run_at_a_time_per_pod(tmp_path: Path) -> None:
    client = client_for(settings_for(tmp_path, GOOD))
    store = services_of(client.application).store
    assert store is not None
    held = store.flight.try_hold(layout.SYNC_LOCK)  # a run of another worker
    assert held is not None
    try:
        response = client.post("/api/v1/sync", auth=ADMIN)
    finally:
        held.close()
    assert response.status_code == 409
    assert error_of(response) == ("SYNC_RUNNING", "a sync run is already under way on this pod")
    assert client.get("/api/v1/sync", auth=ADMIN).get_json() == {"runs": []}


def test_run_reports_are_kept_newest_first_and_trimmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(settings_for(tmp_path, GOOD))
    store = services_of(client.application).store
    assert store is not None
    monkeypatch.setattr(runs_module, "KEEP", 3)
    log = RunLog(store)
    started = []
    for number in range(5):
        run = log.start("cli")
        summary = Summary(images=number, bytes=10 * number)
        if number == 4:
            summary.failed.append("team/app:1.0: not found")
        log.finish(run, summary)
        started.append(run["id"])
    listed = client.get("/api/v1/sync", auth=ADMIN).get_json()["runs"]
    assert [r["id"] for r in listed] == sorted(started, reverse=True)[:3]
    newest = listed[0]
    assert newest["state"] == "failed" and newest["failed"] == ["team/app:1.0: not found"]
    assert (newest["images"], newest["bytes"], newest["trigger"]) == (4, 40, "cli")
    assert listed[1]["state"] == "succeeded" and listed[1]["finished"]


def test_a_running_run_shows_how_far_it_got(tmp_path: Path) -> None:
    client = client_for(settings_for(tmp_path, GOOD))
    store = services_of(client.application).store
    assert store is not None
    log = RunLog(store)
    run = log.start("api")
    log.progress(run, result("team/app:1.0"), 1, 3)
    log.progress(run, result("team/app:2.0", "not found"), 2, 3)
    (listed,) = client.get("/api/v1/sync", auth=ADMIN).get_json()["runs"]
    assert listed["state"] == "running" and listed["progress"] == "2/3"
    assert listed["images"] == 1 and listed["bytes"] == 3 << 20
    assert listed["failed"] == ["team/app:2.0: not found"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def result(name: str, error: str | None = None) -> ImageResult:
    return ImageResult(name, "sha256:" + "a" * 64, ["linux/amd64"], 2, 3 << 20, 1, error)


def test_a_line_per_image_and_a_bar_on_a_terminal() -> None:
    out, err = Terminal(), io.StringIO()
    printer = Printer(out, err, dry_run=False, as_json=False)
    printer.image(result("lab/team/app:1.0"), 1, 2)
    printer.image(result("lab/team/app:2.0", "manifest 2.0 of lab/team/app: not found"), 2, 2)
    printer.summary(Summary(images=1, blobs=2, bytes=3 << 20, present=1, failed=["x: y"]))
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        f"synced   lab/team/app:1.0 sha256:{'a' * 64} (linux/amd64): 2 blobs, 3.0 MiB "
        "fetched, 1 already stored"
    )
    assert lines[1] == "failed   lab/team/app:2.0: manifest 2.0 of lab/team/app: not found"
    assert lines[2].startswith("synced 1 images: 2 blobs, 3.0 MiB fetched, 1 already stored")
    assert "[###############...............] 1/2" in err.getvalue()
    assert "[##############################] 2/2" in err.getvalue()
    assert err.getvalue().endswith("passthrough sync: failed: x: y\n")


def test_json_lines_and_no_bar() -> None:
    out, err = Terminal(), io.StringIO()
    printer = Printer(out, err, dry_run=True, as_json=True)
    printer.image(result("app:1.0"), 1, 1)
    printer.summary(Summary(images=1))
    image, summary = (json.loads(line) for line in out.getvalue().splitlines())
    assert image["image"] == "app:1.0" and image["blobs"] == 2 and image["error"] is None
    assert summary["summary"]["images"] == 1 and summary["summary"]["failed"] == []
    assert err.getvalue() == ""
