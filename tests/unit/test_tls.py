"""passthrough.tls: the CA and the server certificate TLS_SELF_SIGNED makes at start-up."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from passthrough import tls
from passthrough.config import ConfigError, load_settings

NAMES = ("localhost", "127.0.0.1", "registry.lab.example", "::1", "*.mirror.example")


def load(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@pytest.fixture
def files(tmp_path: Path) -> tls.SelfSignedFiles:
    return tls.make_self_signed(NAMES, tmp_path / "tls")


def test_sans_name_every_entry_as_ip_or_dns(files: tls.SelfSignedFiles) -> None:
    server = load(files.cert)[0]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "localhost",
        "registry.lab.example",
        "*.mirror.example",
    ]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_the_ca_signs_the_server_certificate(files: tls.SelfSignedFiles) -> None:
    [ca] = load(files.ca_cert)
    server, chained_ca = load(files.cert)
    assert chained_ca == ca, "tls.crt carries the chain"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=366)
    # What a real client does: verify the chain and the name against the CA alone.
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(files.cert, files.key)
    for name in ("localhost", "127.0.0.1", "registry.lab.example", "a.mirror.example"):
        assert handshake(context, server_side, name)
    assert not handshake(context, server_side, "elsewhere.example")


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> bool:
    """A TLS handshake in memory: whether the client accepts the server as ``name``."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=name)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client_side, server_side):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError:
                return False
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        try:
            client_side.do_handshake()
            return True
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLCertVerificationError:
            return False
    raise AssertionError("the handshake did not finish")


def test_keys_and_directory_are_private(files: tls.SelfSignedFiles) -> None:
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    for key in (files.key, files.directory / tls.CA_KEY_NAME):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (files.cert, files.ca_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert not list(files.directory.glob("*.part")) and not list(files.directory.glob(".*"))


def test_keys_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = tls.make_self_signed(["localhost"], tmp_path / "tls")
    finally:
        os.umask(old)
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600


def test_a_restart_keeps_the_ca_and_renews_the_server_certificate(
    files: tls.SelfSignedFiles,
) -> None:
    ca_before, server_before = files.ca_pem(), load(files.cert)[0]
    again = tls.make_self_signed(["localhost", "10.1.2.3"], files.directory)
    assert again.ca_pem() == ca_before, "clients keep trusting the same CA"
    server = load(again.cert)[0]
    assert server.serial_number != server_before.serial_number
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    server.verify_directly_issued_by(load(again.ca_cert)[0])


def test_a_ca_near_its_end_or_without_its_key_is_replaced(files: tls.SelfSignedFiles) -> None:
    ca_before = files.ca_pem()
    late = datetime.datetime.now(datetime.UTC) + tls.CA_VALIDITY - datetime.timedelta(days=10)
    renewed = tls.make_self_signed(["localhost"], files.directory, now=late).ca_pem()
    assert renewed != ca_before
    (files.directory / tls.CA_KEY_NAME).unlink()
    rebuilt = tls.make_self_signed(["localhost"], files.directory)
    assert rebuilt.ca_pem() != renewed
    load(rebuilt.cert)[0].verify_directly_issued_by(load(rebuilt.ca_cert)[0])


def test_the_default_directory_is_private_to_the_uid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    made = tls.make_self_signed(["localhost"])
    assert made.directory == tmp_path / f"passthrough-tls-{os.getuid()}"
    assert stat.S_IMODE(made.directory.stat().st_mode) == 0o700


def test_an_open_directory_is_made_private(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    tls.make_self_signed(["localhost"], directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_unusable_directories_fail_naming_tls_dir(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"TLS_DIR .* (is not a directory|cannot)"):
        tls.make_self_signed(["localhost"], a_file)
    with pytest.raises(ConfigError, match="TLS_NAMES is empty"):
        tls.make_self_signed([" "], tmp_path / "tls")


def test_settings_read_tls_dir(tmp_path: Path) -> None:
    settings = load_settings(
        {"TLS_SELF_SIGNED": "true", "TLS_DIR": str(tmp_path), "TLS_NAMES": "a.lab, 10.0.0.1"},
        env_file="/nonexistent",
    )
    assert settings.tls_dir == str(tmp_path)
    assert settings.tls_names == ("a.lab", "10.0.0.1")
    assert load_settings({}, env_file="/nonexistent").tls_dir is None


def test_trust_instructions_name_docker_and_containerd(files: tls.SelfSignedFiles) -> None:
    text = tls.trust_instructions(files, ("registry.lab", "10.0.0.1"), 8443)
    assert "/etc/docker/certs.d/registry.lab:8443/ca.crt" in text
    assert "10.0.0.1:8443" in text
    assert "hosts.toml" in text and "/ca.crt" in text
    assert "PRIVATE" not in text
