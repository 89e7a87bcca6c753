"""The door as a new user meets it, end to end under real gunicorn against the rig's
registry: the one start-up summary of the settings in force (never a secret in it nor
anywhere in the log), and the chart's Grafana dashboard and alert rules over the
metrics a real server exposes after a few requests (and `promtool check rules`)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dashboards import RULES, dashboard_queries, metric_names, rule_queries
from tests.support.helpers import wait_until
from tests.support.images import File as TarFile
from tests.support.images import build_image, make_layer, push_image, tar_layer
from tests.support.procs import LOOPBACK, free_port
from tests.support.registry import PUSHER, RegistryServer
from tests.support.server import PassthroughServer, scrubbed_environment

pytestmark = pytest.mark.rig

SECRET = "door-Sentinel-" + secrets.token_hex(8)
#: A layer larger than loopback's socket buffers: its download holds the one slot.
BIG_LAYER = 48 << 20


def pushed(registry: RegistryServer, size: int) -> str:
    """A fresh repository with one image (a layer of ``size`` random bytes); its name."""
    name = f"door/app{secrets.token_hex(4)}"
    data = os.urandom(size)
    layer = make_layer(tar_layer([TarFile("data.bin", data)]))
    push_image(registry.url, name, "v1", build_image([layer]), auth=PUSHER_AUTH)
    return name


PUSHER_AUTH = (PUSHER.username, PUSHER.password)


@pytest.fixture(scope="module")
def door(registry_anon: RegistryServer, door_root: Path) -> Iterator[PassthroughServer]:
    env = {
        "REGISTRY_URL": registry_anon.url,
        "CACHE_DIR": str(door_root / "store"),
        "CACHE_MAX_BYTES": "1G",
        # Credentials the registry never asks for: they must show nowhere all the same.
        "REGISTRY_USERNAME": "door-puller",
        "REGISTRY_PASSWORD": SECRET,
        "TOKEN_SECRET": SECRET,
        # One transfer at a time and a short header deadline: the fleet's metrics happen.
        "MAX_TRANSFERS": "1",
        "HEADER_TIMEOUT": "1",
    }
    with PassthroughServer(env, tmp_root=door_root) as server:
        yield server


@pytest.fixture(scope="module")
def door_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("door")


def test_the_start_up_log_has_one_summary_and_no_secret(door: PassthroughServer) -> None:
    log = door.log_text()
    assert log.count("passthrough settings in force:") == 1
    store = Path(door.overrides["CACHE_DIR"])
    assert f"store: filesystem {store}, 1 GiB" in log
    assert f"registry: {door.overrides['REGISTRY_URL']}" in log
    assert "hosted: none" in log and "tls: off" in log and "/v2: on" in log
    assert SECRET not in log


def test_the_dashboard_and_rules_name_only_exposed_metrics(
    door: PassthroughServer, registry_anon: RegistryServer
) -> None:
    small, big = pushed(registry_anon, 4096), pushed(registry_anon, BIG_LAYER)
    tar = f"{door.url}/docker/{small.replace('/', '__')}_v1.tar"
    assert requests.get(tar, timeout=60).status_code == 200
    assert requests.get(tar, timeout=60).status_code == 200  # a cache hit
    assert requests.get(f"{door.url}/docker/door__nothing_v1.tar", timeout=60).status_code == 404
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    assert requests.get(f"{door.url}/v2/{small}/manifests/v1", headers=accept, timeout=60).ok
    assert requests.get(f"{door.url}/v2/door/nothing/manifests/v1", timeout=60).status_code == 404
    _hold_the_one_slot_while_another_is_refused(door, f"/docker/{big.replace('/', '__')}_v1.tar")
    _stall_a_connection(door)
    wanted = metric_names(dashboard_queries() + rule_queries())
    wait_until(lambda: not wanted - exposed(door), 30, "every series the dashboard names")
    assert SECRET not in door.log_text()


def _hold_the_one_slot_while_another_is_refused(door: PassthroughServer, path: str) -> None:
    """A download held open (read no further than its first chunk) while a second is
    refused; then read to its end, which shows it held the slot all along."""
    with requests.get(f"{door.url}{path}", stream=True, timeout=120) as holding:
        assert holding.status_code == 200
        # Keep the iterator: one dropped mid-body (`next(holding.iter_content(...))`)
        # is finalized at once, and urllib3 then closes the connection; the server's
        # next write fails, the download ends and its slot may be free before the refusal.
        chunks = holding.iter_content(1 << 16)
        received = len(next(chunks))
        refused = requests.get(f"{door.url}{path}", timeout=60)
        assert refused.status_code == 503, refused.text[:500]
        received += sum(len(chunk) for chunk in chunks)
    assert received > BIG_LAYER, "the held download came whole"


def _stall_a_connection(door: PassthroughServer) -> None:
    """A connection that never sends its request: dropped after HEADER_TIMEOUT."""
    with socket.create_connection((LOOPBACK, door.port), timeout=10) as stalled:
        stalled.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        time.sleep(1.5)


def exposed(door: PassthroughServer) -> set[str]:
    """The sample names /metrics serves now (``_total``, ``_bucket`` included)."""
    text = requests.get(f"{door.url}/metrics", timeout=30).text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_promtool_passes_the_rule_file() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout


# -- the README's "Try the whole door", run as written -----------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
RUN_MARKER = "<!-- the block below is run as written by tests/e2e/test_door.py"


def readme_blocks() -> tuple[str, str]:
    """The section's setup block (apt-get, a copy from Docker Hub: checked, not run) and
    the door's block (run)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Try the whole door") :]
    setup = section.split("```sh\n", 1)[1].split("```", 1)[0]
    door = section[section.index(RUN_MARKER) :].split("```sh\n", 1)[1].split("```", 1)[0]
    return setup, door


def test_the_setup_commands_flags_exist() -> None:
    setup, _ = readme_blocks()
    copy = next(line for line in setup.splitlines() if line.startswith("skopeo copy"))
    flags = [word.split("=")[0] for word in copy.split() if word.startswith("--")]
    usage = subprocess.run(["skopeo", "copy", "--help"], capture_output=True, text=True).stdout
    assert flags and all(flag in usage for flag in flags), flags
    assert "apt-get install -y docker-registry skopeo apache2-utils curl" in setup


def test_try_the_whole_door_runs_as_written(
    registry_anon: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The README's block in a fresh directory (the clone's .venv and gunicorn.conf.py
    linked in), against the rig's registry holding demo/busybox:1.0 as the setup block
    would, on a free loopback port instead of 8080 (and no probe port)."""
    root = tmp_path_factory.mktemp("try")
    repo = README.parent
    for name in (".venv", "gunicorn.conf.py"):
        (root / name).symlink_to(repo / name)
    layer = make_layer(tar_layer([TarFile("bin/hello", b"hello\n" * 100)]))
    push_image(registry_anon.url, "demo/busybox", "1.0", build_image([layer]), auth=PUSHER_AUTH)
    port = free_port()
    _, block = readme_blocks()
    script = block.replace("127.0.0.1:5000", registry_anon.host).replace(
        "127.0.0.1:8080", f"{LOOPBACK}:{port}"
    )
    env = scrubbed_environment()
    (root / "home").mkdir()
    (root / "tmp").mkdir()
    env.update(
        BIND=f"{LOOPBACK}:{port}", HEALTH_BIND="off", HOME=str(root / "home"),
        TMPDIR=str(root / "tmp"), XDG_RUNTIME_DIR=str(root / "home"),
    )  # fmt: skip
    # The block's own `kill $door` stops the server; the trap, if a command failed first.
    wrapped = "set -euo pipefail\ntrap 'kill ${door:-} 2>/dev/null; wait' EXIT\n" + script
    done = subprocess.run(
        ["bash", "-c", wrapped], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "manifest.json" in done.stdout
    assert done.stdout.startswith("ok: registry "), "check-config passed first"
    assert output.count("passthrough settings in force:") == 1, "one summary at start-up"
    store = root / "passthrough-store"
    assert "hosted: team/*" in output and f"store: filesystem {store}, 20 GiB" in output
    assert (root / "passthrough-store").is_dir()
