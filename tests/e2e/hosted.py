"""Helpers of the hosted-area end-to-end tests: a passthrough server with
HOSTED_REPOSITORIES and real users (an htpasswd file made by Debian's `htpasswd -B`), a
requests session that talks to its /v2 as one of them, and the spec's error codes.

The server binds a second port known before it starts, its PUBLIC_URL, because the
token realm clients are sent to must be in its settings (as in test_v2_tokens.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.helpers import digest
from tests.support.procs import LOOPBACK, free_port
from tests.support.server import PassthroughServer

HTPASSWD = "/usr/bin/htpasswd"
TOKEN_SECRET = "hosted-e2e-secret-0123456789abcdef"
#: The users of every hosted server here: alice pushes, bob is a second identity.
USERS = {"alice": "alice-" + secrets.token_hex(8), "bob": "bob-" + secrets.token_hex(8)}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCTET = "application/octet-stream"


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file of bcrypt entries, made the way an operator makes one."""
    if not os.access(HTPASSWD, os.X_OK):
        raise AssertionError(f"{HTPASSWD} is missing (apt-get install apache2-utils)")
    for position, (user, password) in enumerate(users.items()):
        create = ["-c"] if position == 0 else []
        subprocess.run(
            [HTPASSWD, "-B", "-b", *create, str(path), user, password],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return path


@dataclass
class Hosted:
    """A running hosted server: `public_url` is where clients go (its PUBLIC_URL),
    `host` its host:port as docker names it, `cache` its CACHE_DIR (None on S3)."""

    server: PassthroughServer
    public_url: str
    cache: Path | None
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))

    @property
    def host(self) -> str:
        return self.public_url.removeprefix("http://")

    def session(self, user: str | None = "alice") -> requests.Session:
        """requests against /v2 with the user's Basic credentials (None: anonymous)."""
        session = requests.Session()
        session.trust_env = False
        if user is not None:
            session.auth = (user, self.users[user])
        return session

    def url(self, path: str) -> str:
        return self.public_url + path


def hosted_env(
    public_url: str,
    root: Path,
    *,
    patterns: str = "team/**,conformance/**,cross/**",
    cache: Path | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    htpasswd = write_htpasswd(root / "htpasswd", USERS)
    env = {
        "HOSTED_REPOSITORIES": patterns,
        "HTPASSWD_FILE": str(htpasswd),
        "PUBLIC_URL": public_url,
        "TOKEN_SECRET": TOKEN_SECRET,
        # No upstream is ever needed: hosted names are never proxied.
        "REGISTRY_URL": f"http://{LOOPBACK}:{free_port()}",
    }
    if cache is not None:
        env["CACHE_DIR"] = str(cache)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def hosted_server(
    root: Path,
    *,
    patterns: str = "team/**,conformance/**,cross/**",
    cache: Path | None = None,
    extra: Mapping[str, str] | None = None,
    workers: int = 1,
    threads: int = 8,
) -> Iterator[Hosted]:
    """A PassthroughServer with a hosted area (CACHE_DIR `cache`, default under `root`,
    unless `extra` chooses STORE=s3); stopped by pid after, its log tail printed."""
    public_port = free_port()
    public_url = f"http://{LOOPBACK}:{public_port}"
    root.mkdir(parents=True, exist_ok=True)
    if cache is None and (extra or {}).get("STORE") != "s3":
        cache = root / "cache"
    server = PassthroughServer(
        hosted_env(public_url, root, patterns=patterns, cache=cache, extra=extra),
        workers=workers,
        threads=threads,
        tmp_root=root,
        extra_args=("--bind", f"{LOOPBACK}:{public_port}"),
    )
    server.start()
    try:
        yield Hosted(server, public_url, cache)
    finally:
        server.stop()
        print(f"--- passthrough server {public_url} log (last 80 lines) ---")
        print("\n".join(server.log_text().splitlines()[-80:]))


def error_codes(response: requests.Response) -> list[str]:
    """The codes of the spec's JSON error body."""
    body: Any = json.loads(response.content)
    return [str(e["code"]) for e in body["errors"]]


def error_message(response: requests.Response) -> str:
    body: Any = json.loads(response.content)
    return " ".join(str(e.get("message", "")) for e in body["errors"])


def push_blob(session: requests.Session, base: str, name: str, data: bytes) -> str:
    """POST then PUT ?digest= (the spec's two-request monolithic upload)."""
    started = session.post(f"{base}/v2/{name}/blobs/uploads/", timeout=60)
    assert started.status_code == 202, started.text
    location = absolute(base, started.headers["Location"])
    done = session.put(
        location,
        params={"digest": digest(data)},
        data=data,
        headers={"Content-Type": OCTET},
        timeout=120,
    )
    assert done.status_code == 201, done.text
    return digest(data)


def absolute(base: str, location: str) -> str:
    return location if "://" in location else base + location


def image_manifest(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest(config), "size": len(config)},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": digest(layer), "size": len(layer)}
            for layer in layers
        ],
        **extra,
    }
    return json.dumps(document, indent=2).encode()
