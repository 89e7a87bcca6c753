"""compose.yaml and .env.example: loaded with PyYAML and checked against what the image
and gunicorn.conf.py promise."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy import (
    ALIASES,
    ENV_VARS,
    REPO,
    S3_SECRET_VARS,
    SECRET_VARS,
    V2_SECRET_VARS,
    env_vars_read_by_app,
    graceful_timeout_default,
    is_dockerignored,
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
IMAGE_UID = 10001  # the Dockerfile's USER
_ASSIGNMENT = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


def compose_seconds(value: str | int) -> float:
    """A compose duration ("135s", "2m15s") in seconds."""
    if isinstance(value, int):
        return float(value)
    assert re.fullmatch(r"(?:\d+(?:\.\d+)?(?:h|m|s|ms|us))+", value), f"bad duration {value!r}"
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    svc = compose["services"]["passthrough"]
    assert isinstance(svc, dict)
    return svc


def env_example() -> list[tuple[str, str, list[str]]]:
    """(name, value, comment lines just above) for each assignment, commented or not."""
    entries: list[tuple[str, str, list[str]]] = []
    comments: list[str] = []
    for raw in (REPO / ".env.example").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        match = _ASSIGNMENT.match(line)
        if match:
            entries.append((match[1], match[2], comments))
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("# "))
        else:
            comments = []
    return entries


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> "tmpfs" or the volume source, for every writable mount. A tmpfs
    counts only when the image's non-root user can write to it (mode=1777 or its uid)."""
    result: dict[str, str] = {}
    for entry in service.get("tmpfs", []):
        path, _, options = entry.partition(":")
        if {"mode=1777", "mode=01777", f"uid={IMAGE_UID}"} & set(options.split(",")):
            result[path] = "tmpfs"
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if not entry.get("read_only"):
                result[entry["target"]] = str(entry.get("source", entry["type"]))
        else:
            source, target, *mode = entry.split(":")
            if mode != ["ro"]:
                result[target] = source
    return result


def test_duration_parser() -> None:
    assert compose_seconds("135s") == 135
    assert compose_seconds("2m15s") == 135
    assert compose_seconds("1h") == 3600
    with pytest.raises(AssertionError):
        compose_seconds("135")


def test_service_builds_and_names_the_image(service: dict[str, Any]) -> None:
    build = service["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / context / dockerfile).is_file()
    assert service["image"], "an image name so `docker compose push` and tags work"


def test_publishes_container_port_8080(service: dict[str, Any]) -> None:
    targets = set()
    for port in service["ports"]:
        if isinstance(port, dict):
            targets.add(str(port["target"]))
        else:
            targets.add(str(port).split("/")[0].rsplit(":", 1)[-1])
    assert "8080" in targets


def test_env_file_is_optional(service: dict[str, Any]) -> None:
    env_files = service["env_file"]
    assert {"path": ".env", "required": False} in env_files
    assert (REPO / ".env.example").is_file()


def test_healthcheck_runs_passthrough_healthcheck(service: dict[str, Any]) -> None:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "passthrough", "healthcheck"]
    assert compose_seconds(service["healthcheck"]["timeout"]) < compose_seconds(
        service["healthcheck"]["interval"]
    )


def test_read_only_root_with_writable_temp_and_cache(
    compose: dict[str, Any], service: dict[str, Any]
) -> None:
    assert service["read_only"] is True
    writable = mounts(service)
    env = service["environment"]
    assert writable.get("/tmp") == "tmpfs"
    for name in ("TEMP_DIR", "CACHE_DIR"):
        assert env[name] in writable, f"{name}={env[name]} is not a tmpfs or volume"
    named = {src for src in writable.values() if src != "tmpfs" and not src.startswith((".", "/"))}
    assert named <= set(compose.get("volumes") or {}), "named volumes are declared"


def test_stop_grace_period_outlasts_gunicorn_graceful_timeout(service: dict[str, Any]) -> None:
    assert compose_seconds(service["stop_grace_period"]) > graceful_timeout_default()


def test_container_drops_privileges(service: dict[str, Any]) -> None:
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert not service.get("privileged")
    assert "user" not in service or service["user"] != "root"


def test_only_passthrough_starts_by_default(compose: dict[str, Any]) -> None:
    others = {name: svc for name, svc in compose["services"].items() if name != "passthrough"}
    for name, svc in others.items():
        assert svc.get("profiles"), f"service {name} runs only behind a profile"
    images = [str(svc.get("image", "")) for svc in others.values()]
    assert all(image == "registry:2" for image in images if image.startswith("registry:"))


def test_env_example_documents_every_variable() -> None:
    entries = env_example()
    names = [name for name, _, _ in entries]
    assert len(names) == len(set(names)), "each variable once"
    missing = set(ENV_VARS) - set(names)
    assert not missing, f".env.example lacks {sorted(missing)}"
    undocumented = [name for name, _, comments in entries if not comments]
    assert not undocumented, f"no comment above {undocumented}"


def test_env_example_covers_what_the_code_reads() -> None:
    names = {name for name, _, _ in env_example()}
    read = env_vars_read_by_app()
    assert {"REGISTRY_URL", "GRACEFUL_TIMEOUT"} <= read, "the scan finds the code's variables"
    documented = names | {alias for alias, target in ALIASES.items() if target in names}
    missing = read - documented
    assert not missing, f"the code reads {sorted(missing)}: document them in .env.example"
    example = (REPO / ".env.example").read_text(encoding="utf-8")
    for alias in ALIASES:
        assert alias in example, f"the alias {alias} is mentioned"


def test_env_example_holds_no_credentials() -> None:
    for name, value, _ in env_example():
        if name in (*SECRET_VARS, *S3_SECRET_VARS, *V2_SECRET_VARS):
            assert value == "", f"{name} has an example value; leave it empty"
        if name == "REDIS_URL":
            assert "@" not in value, "the example Redis URL holds no password"


def test_env_file_stays_out_of_image_and_git() -> None:
    assert is_dockerignored(".env")
    gitignore = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert ".env" in gitignore


# --- the "s3" profile: passthrough on a shared store (SeaweedFS + Redis) -------------

S3_PROFILE = "s3"


@pytest.fixture(scope="module")
def s3_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if S3_PROFILE in (svc.get("profiles") or [])
    }


def by_image(services: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith(prefix)}


def s3_passthrough(s3_services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The profile's passthrough: the one that builds the repository's Dockerfile."""
    [svc] = [s for s in s3_services.values() if "build" in s]
    return svc


def published(svc: dict[str, Any]) -> list[str]:
    return [str(p["published"] if isinstance(p, dict) else p) for p in svc.get("ports", [])]


def seaweed_s3_port(svc: dict[str, Any]) -> int:
    command = svc["command"]
    assert command[:2] == ["server", "-s3"], "one SeaweedFS server with its S3 gateway"
    flags = dict(a.split("=", 1) for a in command if a.startswith("-") and "=" in a)
    return int(flags.get("-s3.port", 8333))


def test_s3_profile_has_seaweedfs_redis_and_a_passthrough(
    s3_services: dict[str, dict[str, Any]],
) -> None:
    assert by_image(s3_services, "chrislusf/seaweedfs:")
    assert [s["image"] for s in by_image(s3_services, "redis:").values()] == ["redis:7-alpine"]
    svc = s3_passthrough(s3_services)
    assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


def test_s3_profile_references_only_declared_objects(
    compose: dict[str, Any], s3_services: dict[str, dict[str, Any]]
) -> None:
    services = set(compose["services"])
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in s3_services.items():
        depends = svc.get("depends_on") or {}
        assert set(depends) <= services - {name}, f"{name} depends on unknown services"
        assert all(dep["condition"] in conditions for dep in depends.values())
        for config in svc.get("configs", []):
            assert config["source"] in compose["configs"]
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            assert source in compose["volumes"]
        command = svc.get("command", [])
        for arg in command if isinstance(command, list) else [command]:
            assert not re.search(r"\$(?!\{)", arg.replace("$$", "")), "escape $ as $$"


def test_s3_passthrough_uses_the_profiles_services(
    s3_services: dict[str, dict[str, Any]],
) -> None:
    svc = s3_passthrough(s3_services)
    env = svc["environment"]
    assert env["STORE"] == "s3"
    assert env["S3_BUCKET"] and env["S3_PREFIX"]
    endpoint = urlsplit(env["S3_ENDPOINT_URL"])
    seaweed = by_image(s3_services, "chrislusf/seaweedfs:")
    host = str(endpoint.hostname)
    assert endpoint.scheme == "http" and host in seaweed
    assert endpoint.port == seaweed_s3_port(seaweed[host])
    redis_url = urlsplit(env["REDIS_URL"])
    assert redis_url.scheme == "redis" and redis_url.hostname in by_image(s3_services, "redis:")
    # Started once the bucket exists and Redis answers.
    depends = svc["depends_on"]
    assert depends[str(redis_url.hostname)]["condition"] == "service_healthy"
    [init] = [n for n, s in seaweed.items() if n != host]
    assert env["S3_BUCKET"] in json.dumps(seaweed[init]["command"]), "creates S3_BUCKET"
    assert depends[init]["condition"] == "service_completed_successfully"
    assert seaweed[init]["depends_on"][host]["condition"] == "service_healthy"
    assert seaweed[host]["healthcheck"]["test"][0] == "CMD"


def test_s3_passthrough_has_no_cache_dir_and_keeps_the_hardening(
    service: dict[str, Any], s3_services: dict[str, dict[str, Any]]
) -> None:
    svc = s3_passthrough(s3_services)
    env = svc["environment"]
    assert "CACHE_DIR" not in env and not svc.get("volumes"), "the bucket is the cache"
    assert mounts(svc).get(env["TEMP_DIR"]) == "tmpfs", "temp files stay per container"
    same = ("read_only", "cap_drop", "security_opt", "healthcheck", "stop_grace_period", "tmpfs")
    for key in (*same, "env_file"):
        assert svc[key] == service[key], f"{key} differs from passthrough"
    ports = published(svc)
    assert ports and not set(ports) & set(published(service)), "its own host port"
    assert all(p.endswith(":8080") for p in ports)


def test_s3_profile_binds_its_backing_services_to_loopback(
    compose: dict[str, Any], s3_services: dict[str, dict[str, Any]]
) -> None:
    assert all(p.startswith("127.0.0.1:") for p in published(compose["services"]["registry"]))
    svc = s3_passthrough(s3_services)
    for name, other in s3_services.items():
        if other is not svc:
            for port in published(other):
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    for other in by_image(s3_services, "redis:").values():
        assert not other.get("ports"), "Redis has no password: not published at all"


def test_s3_profile_holds_only_marked_demo_keys(
    compose: dict[str, Any], service: dict[str, Any], s3_services: dict[str, dict[str, Any]]
) -> None:
    text = (REPO / "compose.yaml").read_text(encoding="utf-8")
    identities = json.loads(compose["configs"]["seaweedfs-s3"]["content"])["identities"]
    demo = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    assert demo and all("demo" in a and "demo" in s for a, s in demo), "demo keys say so"
    env = s3_passthrough(s3_services)["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) in demo
    assert "DEMO KEYS" in text
    assert "@" not in env["REDIS_URL"], "no password in the Redis URL"
    for svc in compose["services"].values():
        environment = svc.get("environment") or {}
        for name in (*SECRET_VARS, *S3_SECRET_VARS, *V2_SECRET_VARS):
            value = str(environment.get(name, ""))
            assert not value or "demo" in value, f"{name} hard-coded in compose.yaml"
    assert not set(S3_SECRET_VARS) & set(service["environment"]), "not for the default service"


# --- TLS and the /v2 API --------------------------------------------------------------


def test_tls_dir_is_a_volume_the_image_prepares(
    compose: dict[str, Any], service: dict[str, Any]
) -> None:
    env = service["environment"]
    writable = mounts(service)
    assert writable.get(env["TLS_DIR"]) in (compose.get("volumes") or {}), "a named volume"
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"mkdir -p [^\n]*{re.escape(env['TLS_DIR'])}", dockerfile)
    assert re.search(rf"chown 10001:10001 [^\n]*{re.escape(env['TLS_DIR'])}", dockerfile)
    # Not inside the cache directory: the store owns that one.
    assert env["TLS_DIR"] != env["CACHE_DIR"]


def test_compose_shows_how_to_turn_tls_and_v2_on() -> None:
    text = (REPO / "compose.yaml").read_text(encoding="utf-8")
    for name in ("TLS_SELF_SIGNED=true", "TLS_NAMES=", "TLS_CERT_FILE=", "TLS_KEY_FILE=",
                 "UPSTREAMS=", "TAG_TTL=", "PROXY_MODE=", "REGISTRY_AUTH_FILE=", "/ca.crt",
                 "certs.d"):  # fmt: skip
        assert name in text, f"compose.yaml does not show {name}"


def test_compose_shows_how_to_turn_the_hosted_area_on() -> None:
    text = (REPO / "compose.yaml").read_text(encoding="utf-8")
    shown = ("HOSTED_REPOSITORIES=", "HTPASSWD_FILE=/run/secrets/htpasswd",
             "ACCESS_FILE=/run/secrets/access.yaml", "HOSTED_ANONYMOUS_PULL=",
             "HOSTED_MANIFEST_MAX_BYTES=", "htpasswd -cB", "passthrough gc --delete")  # fmt: skip
    for name in shown:
        assert name in text, f"compose.yaml does not show {name}"
    # The commented secrets: each one the service lists is declared at the top level,
    # from a file beside compose.yaml (never inline content).
    blocks = commented_blocks(text, "secrets:")
    assert len(blocks) == 2, "the service's list and the top-level declarations"
    listed = {name for block in blocks if isinstance(block["secrets"], list)
              for name in block["secrets"]}  # fmt: skip
    [declared] = [b["secrets"] for b in blocks if isinstance(b["secrets"], dict)]
    assert {"registry-auth", "htpasswd", "access.yaml"} <= listed
    assert listed <= set(declared), "every listed secret is declared"
    assert all(entry["file"].startswith("./") for entry in declared.values())


def commented_blocks(text: str, header: str) -> list[Any]:
    """The YAML of each commented-out block in text that starts with `# <header>`: the
    header line and the commented lines below it indented deeper, uncommented."""
    blocks: list[Any] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.fullmatch(r"(\s*)# " + re.escape(header), line)
        if not match:
            continue
        prefix = match[1] + "# "
        body = [header]
        for following in lines[number + 1 :]:
            if not following.startswith(prefix + " "):
                break
            body.append(following[len(prefix) :])
        blocks.append(yaml.safe_load("\n".join(body)))
    return blocks


def test_sync_is_a_one_shot_service_on_the_servers_cache(compose: dict[str, Any]) -> None:
    sync = compose["services"]["sync"]
    server = compose["services"]["passthrough"]
    assert sync["profiles"] == ["sync"]
    assert sync["command"] == ["passthrough", "sync"]
    assert sync["restart"] == "no" and not sync.get("ports")
    assert sync["image"] == server["image"]
    assert sync["environment"]["CACHE_DIR"] == server["environment"]["CACHE_DIR"]
    assert sync["environment"]["SYNC_FILE"] == "/etc/passthrough/sync.yaml"
    assert "cache:/var/cache/passthrough" in sync["volumes"]
    assert "./sync.yaml:/etc/passthrough/sync.yaml:ro" in sync["volumes"]
    # The hardening comes with the anchor.
    assert sync["read_only"] is True and sync["cap_drop"] == ["ALL"]
