"""UPSTREAM_CA_FILE: the bundle (requests' public CAs kept, the operator's added, written
private), the file refused at start-up with one line naming the variable, and the
adapter verifying with it: a real HTTPS server on loopback whose certificate a CA made
here signed, reached by the registry client and by the /ready probe, with and without
the bundle."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from passthrough.config import ConfigError, load_settings, read_ca_file
from passthrough.errors import UpstreamCertificateError
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.tls import SelfSignedFiles, make_self_signed
from passthrough.upstream import trust
from passthrough.upstream.auth import TokenCache
from passthrough.upstream.client import RegistryClient, RetryPolicy, Timeouts
from passthrough.upstream.netguard import HostPolicy
from passthrough.upstream.probe import probe_registry
from passthrough.upstream.target import AuthKind, Target
from tests.support.procs import LOOPBACK


class _V2(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


class TLSRegistry:
    """GET /v2/ over HTTPS on loopback with ``files``' certificate (its chain: the
    server's certificate and the CA)."""

    def __init__(self, files: SelfSignedFiles) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key)
        self.server = ThreadingHTTPServer((LOOPBACK, 0), _V2)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SelfSignedFiles:
    return make_self_signed([LOOPBACK], tmp_path_factory.mktemp("ca") / "tls")


@pytest.fixture(scope="module")
def registry(ca: SelfSignedFiles) -> Iterator[TLSRegistry]:
    server = TLSRegistry(ca)
    yield server
    server.stop()


@pytest.fixture
def bundle(ca: SelfSignedFiles, tmp_path: Path) -> Path:
    return trust.ca_bundle(str(ca.ca_cert), tmp_path / "bundle")


def certificates(text: str) -> int:
    return text.count("-----BEGIN CERTIFICATE-----")


# --- the bundle ----------------------------------------------------------------------------


def test_the_bundle_keeps_the_public_cas_and_adds_the_operators(
    ca: SelfSignedFiles, bundle: Path
) -> None:
    public = Path(DEFAULT_CA_BUNDLE_PATH).read_text()
    text = bundle.read_text()
    # certifi's bundle, as requests names it, whole and first; then the operator's CA.
    assert text.startswith(public)
    assert ca.ca_pem().strip() in text[len(public) :]
    assert certificates(text) == certificates(public) + 1
    assert certificates(public) > 50
    # OpenSSL loads all of it: the public CAs and the private one.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(bundle))
    assert context.cert_store_stats()["x509_ca"] == certificates(text)


def test_the_bundle_is_private_and_written_once(
    ca: SelfSignedFiles, bundle: Path, tmp_path: Path
) -> None:
    assert bundle.stat().st_mode & 0o777 == 0o600
    assert bundle.parent.stat().st_mode & 0o777 == 0o700
    again = trust.ca_bundle(str(ca.ca_cert), tmp_path / "bundle")
    assert again == bundle
    # Another CA: another file (named by its content), the first one left alone.
    other = make_self_signed(["other.test"], tmp_path / "other")
    second = trust.ca_bundle(str(other.ca_cert), tmp_path / "bundle")
    assert second != bundle and bundle.is_file()
    assert other.ca_pem().strip() in second.read_text()
    assert other.ca_pem().strip() not in bundle.read_text()


def test_only_certificates_of_the_file_go_into_the_bundle(
    ca: SelfSignedFiles, tmp_path: Path
) -> None:
    """A file holding a key too (a careless copy of a whole TLS directory): the key is
    never copied into the bundle."""
    mixed = tmp_path / "mixed.pem"
    mixed.write_text("# corp CA\n" + ca.ca_pem() + (ca.directory / "ca.key").read_text())
    assert "PRIVATE KEY" not in read_ca_file(str(mixed))
    assert "PRIVATE KEY" not in trust.ca_bundle(str(mixed), tmp_path / "b").read_text()


# --- refused at start-up ---------------------------------------------------------------------


def _garbled(ca: SelfSignedFiles) -> str:
    lines = ca.ca_pem().splitlines()
    return "\n".join([lines[0], "AAAA" * 16, *lines[2:]]) + "\n"


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "cannot be read: No such file or directory"),
        ("", "holds no PEM certificate"),
        ("not a certificate\n", "holds no PEM certificate"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "no PEM certificate"),
        ("garbled", "holds a malformed certificate"),
    ],
)
def test_a_bad_file_is_refused_with_one_line_naming_the_variable(
    content: str | None, said: str, ca: SelfSignedFiles, tmp_path: Path
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(_garbled(ca) if content == "garbled" else content)
    with pytest.raises(ConfigError) as raised:
        load_settings({"UPSTREAM_CA_FILE": str(path)}, env_file="/nonexistent")
    message = str(raised.value)
    assert message.startswith(f"UPSTREAM_CA_FILE {str(path)!r} ")
    assert said in message and "\n" not in message


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^UPSTREAM_CA_FILE .* cannot be read"):
        load_settings({"UPSTREAM_CA_FILE": str(tmp_path)}, env_file="/nonexistent")


def test_a_good_file_is_taken(ca: SelfSignedFiles) -> None:
    settings = load_settings({"UPSTREAM_CA_FILE": str(ca.ca_cert)}, env_file="/nonexistent")
    assert settings.upstream_ca_file == str(ca.ca_cert)
    assert load_settings({}, env_file="/nonexistent").upstream_ca_file is None


def test_a_bundle_directory_of_another_kind_is_refused(ca: SelfSignedFiles, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^UPSTREAM_CA_FILE's bundle directory .* cannot be"):
        trust.ca_bundle(str(ca.ca_cert), blocker)


# --- verifying with it ---------------------------------------------------------------------


def client(registry: TLSRegistry, policy: HostPolicy, retry: RetryPolicy) -> RegistryClient:
    endpoint = RegistryEndpoint(registry.url, f"{LOOPBACK}:{registry.port}")
    target = Target(endpoint, "registry", AuthKind.ANONYMOUS)
    return RegistryClient(target, "app", TokenCache(), Timeouts(5, 5), policy=policy, retry=retry)


class CountingRetry(RetryPolicy):
    def __init__(self) -> None:
        super().__init__(attempts=4)
        self.waits = 0

    def wait(self, attempt: int, retry_after: float | None = None) -> bool:
        self.waits += 1
        return False


def test_without_the_bundle_the_client_names_the_refused_certificate(
    registry: TLSRegistry,
) -> None:
    retry = CountingRetry()
    with pytest.raises(UpstreamCertificateError) as raised:
        client(registry, HostPolicy(), retry).request("GET", "/v2/", what="ping")
    error = raised.value
    assert error.status == 502
    assert error.message.startswith(
        f"ping: certificate verify failed for https://{LOOPBACK}:{registry.port} ("
    )
    assert "UPSTREAM_CA_FILE" in error.message and "\n" not in error.message
    assert retry.waits == 0, "a refused certificate is not retried"


def test_with_the_bundle_the_client_and_the_probe_verify(
    registry: TLSRegistry, bundle: Path
) -> None:
    policy = HostPolicy(ca_bundle=str(bundle))
    response = client(registry, policy, CountingRetry()).request("GET", "/v2/", what="ping")
    assert response.status_code == 200
    assert probe_registry(registry.url, policy).ok
    refused = probe_registry(registry.url, HostPolicy())
    assert not refused.ok and refused.status is None
    assert refused.detail.startswith(f"certificate verify failed for https://{LOOPBACK}:")


def test_the_bundle_never_loosens_an_explicit_verify(registry: TLSRegistry, bundle: Path) -> None:
    """The adapter replaces only the default (verify=True): a request that names its own
    CA file is verified with that one (here one that does not know the server's CA)."""
    from passthrough.upstream.netguard import GuardedAdapter

    session = requests.Session()
    session.trust_env = False
    session.mount("https://", GuardedAdapter(HostPolicy(ca_bundle=str(bundle))))
    assert session.get(registry.url + "/v2/", timeout=5).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        session.get(registry.url + "/v2/", timeout=5, verify=DEFAULT_CA_BUNDLE_PATH)
    session.close()


def test_a_certificate_for_another_name_is_told_apart(tmp_path: Path, bundle: Path) -> None:
    """The CA is trusted but the certificate is for another host: the reason says so."""
    files = make_self_signed(["registry.test"], tmp_path / "other")
    elsewhere = TLSRegistry(files)
    try:
        other_bundle = trust.ca_bundle(str(files.ca_cert), tmp_path / "b")
        result = probe_registry(elsewhere.url, HostPolicy(ca_bundle=str(other_bundle)))
    finally:
        elsewhere.stop()
    assert not result.ok
    assert "certificate verify failed" in result.detail
    assert "mismatch" in result.detail.lower() or "not valid for" in result.detail


def test_a_handshake_that_is_not_a_certificate_problem_is_named_too(tmp_path: Path) -> None:
    """https to a plain-HTTP port: no certificate to blame, the handshake failed."""
    from tests.support.procs import BackgroundHTTPServer

    plain = BackgroundHTTPServer(_V2, None).start()
    try:
        result = probe_registry(f"https://{plain.address}", HostPolicy())
    finally:
        plain.stop()
    assert not result.ok
    assert result.detail.startswith(f"TLS handshake with https://{plain.address} failed")
