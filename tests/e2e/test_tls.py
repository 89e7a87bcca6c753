"""TLS and /ready under real gunicorn: TLS_SELF_SIGNED (the CA in the log and at
/ca.crt, the certificate verified against it for each TLS_NAMES entry), an operator's
own certificate (TLS_CERT_FILE/TLS_KEY_FILE, made here with the openssl command), and
/ready over the real stores (the filesystem, and SeaweedFS as S3, killed and started)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import urllib3

from tests.support.fixtures_matrix import s3_env
from tests.support.procs import LOOPBACK, StartupError, free_port
from tests.support.seaweed import SeaweedS3
from tests.support.server import PassthroughServer, scrubbed_environment

ServerFactory = Callable[..., PassthroughServer]


def handshake_as(server: PassthroughServer, name: str, context: ssl.SSLContext) -> str:
    """Connect to 127.0.0.1:<port> and verify the certificate as ``name`` (SNI and the
    name check), as a client that reached the service under that name would."""
    with socket.create_connection((LOOPBACK, server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            return str(tls.version())


def test_self_signed_certificate_verifies_against_the_ca_it_serves(
    passthrough_server: ServerFactory, tmp_path: Path
) -> None:
    server = passthrough_server({"TLS_SELF_SIGNED": "true", "TLS_NAMES": "registry.test,127.0.0.1"})
    assert server.url.startswith("https://127.0.0.1:")
    # A client that does not trust the CA yet refuses the server...
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.url}/health", timeout=10)
    # ...fetches the CA once without verifying (curl -k, or from the log)...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        fetched = requests.get(f"{server.url}/ca.crt", timeout=10, verify=False)  # noqa: S501
    assert fetched.status_code == 200
    assert fetched.headers["Content-Type"] == "application/x-pem-file"
    pem = fetched.text
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY" not in pem
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(pem)
    # ...and from then on verifies the server with it alone.
    health = requests.get(f"{server.url}/health", timeout=10, verify=str(ca_file))
    assert (health.status_code, health.text) == (200, "ok\n")
    ready = requests.get(f"{server.url}/ready", timeout=10, verify=str(ca_file))
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    context = ssl.create_default_context(cafile=str(ca_file))
    assert handshake_as(server, "registry.test", context).startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake_as(server, "elsewhere.test", context)
    # The CA is the one the master made, and the log shows it with how to trust it.
    assert server.ca_file is not None and server.ca_file.read_text() == pem
    log = server.log_text()
    assert pem.strip() in log
    assert f"/etc/docker/certs.d/registry.test:{server.port}/ca.crt" in log
    assert "hosts.toml" in log
    assert log.count("-----BEGIN CERTIFICATE-----") == 1, "logged once, by the master"
    assert "PRIVATE KEY" not in log
    # Plain HTTP on the TLS port gets nowhere.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{LOOPBACK}:{server.port}/health", timeout=10)
    # The container's health command follows TLS_SELF_SIGNED to https.
    assert container_healthcheck(server.port, {"TLS_SELF_SIGNED": "true"}).returncode == 0
    plain = container_healthcheck(server.port, {})
    assert plain.returncode == 1 and "unhealthy" in plain.stderr


def container_healthcheck(port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`passthrough healthcheck` as the image's HEALTHCHECK runs it (no --url), on PORT:
    the rig's server listens on its --bind alone, so HEALTH_BIND (the probe port the
    image's check takes by default) is off here."""
    command = Path(sys.executable).with_name("passthrough")
    environment = {**scrubbed_environment(), "PORT": str(port), "HEALTH_BIND": "off", **env}
    return subprocess.run(
        [str(command), "healthcheck"], env=environment, capture_output=True, text=True, timeout=30
    )


def test_the_probe_port_speaks_tls_as_the_main_port_does(
    passthrough_server: ServerFactory, tmp_path: Path
) -> None:
    """The probe server (a process of its own) serves the master's certificate: the
    container's health command, which follows TLS to https, passes on the probe port."""
    health_port = free_port()
    env = {"TLS_SELF_SIGNED": "true", "TLS_DIR": str(tmp_path / "tls"),
           "HEALTH_BIND": f"{LOOPBACK}:{health_port}"}  # fmt: skip
    server = passthrough_server(env)
    assert server.ca_file is not None
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.check_hostname = False  # the certificate names the host clients use
    with socket.create_connection((LOOPBACK, health_port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            assert tls.recv(64).startswith(b"HTTP/1.0 200")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://{LOOPBACK}:{health_port}/health", timeout=10)
    check = {"PORT": str(server.port), "HEALTH_BIND": f"{LOOPBACK}:{health_port}"}
    probed = subprocess.run(
        [str(Path(sys.executable).with_name("passthrough")), "healthcheck"],
        env={**scrubbed_environment(), **check, "TLS_SELF_SIGNED": "true"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probed.returncode == 0, probed.stderr


def test_self_signed_ca_outlives_a_restart_in_tls_dir(
    passthrough_server: ServerFactory, tmp_path: Path
) -> None:
    env = {"TLS_SELF_SIGNED": "true", "TLS_DIR": str(tmp_path / "tls")}
    first = passthrough_server(env)
    ca_before = first.ca_file.read_text() if first.ca_file else ""
    first.stop()
    second = passthrough_server(env)
    assert second.ca_file is not None and second.ca_file.read_text() == ca_before
    health = requests.get(f"{second.url}/health", timeout=10, verify=str(second.ca_file))
    assert health.status_code == 200
    assert (tmp_path / "tls" / "tls.key").stat().st_mode & 0o077 == 0


def openssl_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """An operator's certificate: an RSA CA and a server certificate for 127.0.0.1 it
    signs, by the openssl command (nothing of passthrough's own TLS code)."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    run = ["openssl"]
    subprocess.run(
        [*run, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=rig operator CA", "-keyout", ca_key, "-out", ca_cert,
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [*run, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", key, "-out", csr],
        check=True, capture_output=True,
    )  # fmt: skip
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    subprocess.run(
        [*run, "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
         "-CAcreateserial", "-days", "2", "-extfile", extensions, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return ca_cert, cert, key


def test_operator_certificate_from_tls_cert_file(
    passthrough_server: ServerFactory, tmp_path: Path
) -> None:
    ca_cert, cert, key = openssl_certificate(tmp_path)
    server = passthrough_server(
        {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}, ca_file=ca_cert
    )
    assert server.url.startswith("https://")
    health = requests.get(f"{server.url}/health", timeout=10, verify=str(ca_cert))
    assert (health.status_code, health.text) == (200, "ok\n")
    # There is no CA of ours to hand out.
    missing = requests.get(f"{server.url}/ca.crt", timeout=10, verify=str(ca_cert))
    assert missing.status_code == 404 and "TLS_SELF_SIGNED is off" in missing.text
    assert "BEGIN CERTIFICATE" not in server.log_text()
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{server.url}/health", timeout=10)
    tls_env = {"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)}
    assert container_healthcheck(server.port, tls_env).returncode == 0


def test_a_missing_key_file_stops_start_up_with_one_message(
    passthrough_server: ServerFactory, tmp_path: Path
) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text("not a certificate")
    with pytest.raises(StartupError, match="TLS_CERT_FILE and TLS_KEY_FILE must be set together"):
        passthrough_server({"TLS_CERT_FILE": str(cert)}, ca_file=cert)


# --- /ready over the real stores ------------------------------------------------------


def test_ready_on_a_filesystem_store(passthrough_server: ServerFactory, tmp_path: Path) -> None:
    server = passthrough_server({"CACHE_DIR": str(tmp_path / "cache")})
    ready = requests.get(f"{server.url}/ready", timeout=10)
    assert ready.status_code == 200
    report = ready.json()
    assert report["status"] == "ready"
    assert report["store"]["backend"] == "filesystem" and report["store"]["ok"] is True
    [default] = report["upstreams"]
    assert default["name"] == "default" and default["url"] == "https://registry-1.docker.io"


def test_ready_follows_the_s3_store(
    passthrough_server: ServerFactory, seaweed: SeaweedS3, s3_bucket: str
) -> None:
    secret = seaweed.secret_key
    # One worker: its /ready cache is the only one, so each answer below is this
    # worker's (READY_TTL apart: the test waits on the answer, not on a clock).
    server = passthrough_server({**s3_env(seaweed, s3_bucket), "REGISTRY_URL": server_less()})
    first = requests.get(f"{server.url}/ready", timeout=10)
    assert first.status_code == 200, first.text
    assert first.json()["store"]["backend"] == "s3" and first.json()["store"]["ok"] is True
    seaweed.kill()
    try:
        down = wait_for_ready_status(server, 503)
        store = down.json()["store"]
        assert store["ok"] is False and "s3 store" in store["detail"]
        assert down.json()["status"] == "unready"
        assert secret not in down.text
    finally:
        seaweed.start()
    wait_for_ready_status(server, 200)
    assert secret not in server.log_text()


def server_less() -> str:
    """An upstream nobody listens on: /ready reports it and stays ready."""
    return f"http://{LOOPBACK}:{free_port()}"


def wait_for_ready_status(server: PassthroughServer, status: int) -> requests.Response:
    """Poll /ready until it answers ``status`` (the answer is cached READY_TTL seconds)."""
    deadline = time.monotonic() + 60
    while True:
        response = requests.get(f"{server.url}/ready", timeout=10)
        if response.status_code == status or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response
        time.sleep(0.5)
