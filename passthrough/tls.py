"""TLS_SELF_SIGNED: a private CA and a server certificate made at start-up.

docker and containerd refuse a registry over plain HTTP unless it is on loopback or
listed as insecure, so the /v2 API wants HTTPS even on a lab network. With
TLS_SELF_SIGNED=true the gunicorn master (gunicorn.conf.py, ``on_starting``) calls
:func:`make_self_signed` before it opens the listening socket: an EC P-256 CA and a
server certificate it signs, with a subjectAltName for every TLS_NAMES entry (IP
addresses as IP SANs, names as DNS SANs). Clients trust the CA, never the server
certificate itself: the CA is printed to the log and served at ``/ca.crt``.

The files live in TLS_DIR, or else in a private directory under TMPDIR keyed by the uid
(``passthrough-tls-<uid>``, mode 0700: another local user must not plant a key there).
A CA found there is reused while it has more than :data:`RENEW_BEFORE` left, so a
restart keeps the trust clients were given; the server certificate is made anew at
every start, for the names configured now. Keys are written 0600.

Nothing here runs at import time; only config and errors are imported.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from passthrough.config import ConfigError

#: The master tells its workers where the CA is (for /ca.crt) in this variable; it is
#: set by gunicorn.conf.py before any worker is forked, never by the operator.
CA_FILE_ENV = "PASSTHROUGH_TLS_CA_FILE"

CA_VALIDITY = datetime.timedelta(days=5 * 365)
SERVER_VALIDITY = datetime.timedelta(days=365)
#: A CA with less than this left is replaced rather than reused.
RENEW_BEFORE = datetime.timedelta(days=30)
#: Clocks of clients drift: certificates are valid from a little before now.
BACKDATE = datetime.timedelta(minutes=5)

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"


@dataclass(frozen=True)
class SelfSignedFiles:
    """Where :func:`make_self_signed` put its files."""

    directory: Path
    ca_cert: Path
    cert: Path
    key: Path

    def ca_pem(self) -> str:
        return self.ca_cert.read_text(encoding="ascii")


def default_directory() -> Path:
    """``$TMPDIR/passthrough-tls-<uid>``: private to this user, one per uid so two
    services under different users never share (or fight over) a CA."""
    return Path(tempfile.gettempdir()) / f"passthrough-tls-{os.getuid()}"


def private_directory(directory: Path, variable: str = "TLS_DIR") -> None:
    """Create ``directory`` 0700, or accept an existing one only when this user owns
    it and no one else may enter it (a shared TMPDIR is writable by everyone).
    ``variable`` is the setting a :class:`ConfigError` names."""
    shown = f"{variable} {str(directory)!r}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise ConfigError(f"{shown} cannot be created: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{shown} is not a directory")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{shown} belongs to another user")
    if info.st_mode & 0o077:
        try:
            directory.chmod(0o700)
        except OSError as exc:
            raise ConfigError(
                f"{shown} is open to other users and cannot be made private: {exc.strerror}"
            ) from None


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data`` at ``mode`` (the mode is set before a
    byte is written, so a key is never readable by others, not even for a moment)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(part, mode)  # the umask may have taken bits off
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject_alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """An IPAddress SAN for each address, a DNSName for each name (clients match an IP
    only against IP SANs, so ``127.0.0.1`` as a DNS name would never verify)."""
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _load_ca(
    directory: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA already in ``directory``, when it is whole, ours and not near its end."""
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT_NAME).read_bytes())
        key = serialization.load_pem_private_key(
            (directory / CA_KEY_NAME).read_bytes(), password=None
        )
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return None
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return None
    return cert, key


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only (ECDSA keys encipher nothing); a CA's also sign certificates and
    revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A serial in the name, so two CAs made on one host are told apart by clients that
    # cache trust by subject.
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "passthrough"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"passthrough local CA {serial % 10**8:08d}"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        # path_length=0: this CA signs server certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _server_cert(
    names: tuple[str, ...],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_self_signed(
    names: Iterable[str],
    directory: str | os.PathLike[str] | None = None,
    *,
    now: datetime.datetime | None = None,
) -> SelfSignedFiles:
    """Write (or reuse) the CA and write a fresh server certificate for ``names`` into
    ``directory`` (default :func:`default_directory`). Raises :class:`ConfigError`
    naming TLS_DIR or TLS_NAMES when that cannot be done."""
    chosen = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not chosen:
        raise ConfigError("TLS_NAMES is empty: the certificate needs at least one name")
    where = Path(directory) if directory is not None else default_directory()
    private_directory(where)
    moment = now or datetime.datetime.now(datetime.UTC)
    found = _load_ca(where, moment)
    try:
        if found is None:
            ca, ca_key = _new_ca(moment)
            # The key first: a CA certificate without its key is never reused.
            write_atomically(where / CA_KEY_NAME, _key_pem(ca_key), 0o600)
            write_atomically(where / CA_CERT_NAME, _cert_pem(ca), 0o644)
        else:
            ca, ca_key = found
        cert, key = _server_cert(chosen, ca, ca_key, moment)
        write_atomically(where / KEY_NAME, _key_pem(key), 0o600)
        # The chain: a client that was given only the CA still gets the whole path.
        write_atomically(where / CERT_NAME, _cert_pem(cert) + _cert_pem(ca), 0o644)
    except OSError as exc:
        raise ConfigError(f"TLS_DIR {str(where)!r} cannot be written: {exc.strerror}") from None
    return SelfSignedFiles(where, where / CA_CERT_NAME, where / CERT_NAME, where / KEY_NAME)


def trust_instructions(files: SelfSignedFiles, names: Iterable[str], port: int | None) -> str:
    """One paragraph for the log: how docker and containerd are told to trust the CA."""
    hosts = [f"{n}:{port}" if port else n for n in names]
    shown = hosts[0] if hosts else "<host>:<port>"
    return (
        f"TLS: serving a certificate for {', '.join(names)} signed by the CA below "
        f"({files.ca_cert}; also served at GET /ca.crt). To trust it: docker: save it as "
        f"/etc/docker/certs.d/{shown}/ca.crt (one directory per host:port a client uses: "
        f'{", ".join(hosts)}); containerd: ca = "/etc/containerd/certs.d/{shown}/ca.crt" '
        f"in /etc/containerd/certs.d/{shown}/hosts.toml; curl: --cacert ca.crt."
    )
