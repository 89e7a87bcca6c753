"""Real CNCF distribution registries for the rig, and a small client to push to them.

`RegistryServer` runs /usr/bin/docker-registry on a random loopback port with its
filesystem storage in a temp dir, as "anonymous", "basic" (htpasswd) or "token"
(auth.token against a `TokenIssuer`); with ``tls=True`` it serves HTTPS (``http.tls``)
with a certificate for its address signed by a CA of its own (`ca_file`), made with
passthrough.tls's helpers: a registry behind a private CA. `registry_session` answers
Basic and Bearer challenges the way docker does; `push_blob` and `push_manifest` use
the upload API.
The rig's users, passwords and grants are defined here, once.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol
from urllib.parse import urljoin, urlsplit

import requests

from passthrough.tls import SelfSignedFiles, make_self_signed
from tests.support.helpers import digest as digest_of
from tests.support.procs import LOOPBACK, ManagedProcess, StartupError, free_port, wait_for_http
from tests.support.token_issuer import TokenIssuer

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "htpasswd"

Flavour = Literal["anonymous", "basic", "token"]

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"


# --- the rig's credentials: the one place they are spelled ------------------------------


@dataclass(frozen=True)
class Credential:
    username: str
    password: str = ""

    def __repr__(self) -> str:
        return f"Credential({self.username!r}, <password>)"


ALICE = Credential("alice", "alice-secret")
BOB = Credential("bob", "bob-secret")
# The image factory pushes with this one; it may write everywhere.
PUSHER = Credential("pusher", "pusher-secret")

BASIC_USERS: dict[str, str] = {c.username: c.password for c in (ALICE, BOB, PUSHER)}
TOKEN_USERS: dict[str, str] = {c.username: c.password for c in (ALICE, BOB, PUSHER)}

# (user or None for anonymous, repository pattern, actions) on the token registry.
# Anonymous grants apply to every user too, as on Docker Hub.
TOKEN_GRANTS: tuple[tuple[str | None, str, tuple[str, ...]], ...] = (
    (None, "public/*", ("pull",)),
    (ALICE.username, "private/*", ("pull",)),
    (ALICE.username, "alice/*", ("pull", "push")),
    (BOB.username, "bob/*", ("pull", "push")),
    (PUSHER.username, "*", ("pull", "push", "delete")),
)


# --- the registry process ---------------------------------------------------------------


def _htpasswd_line(username: str, password: str) -> str:
    if shutil.which(HTPASSWD_BINARY) is None:
        raise StartupError("htpasswd is not installed (Debian package apache2-utils)")
    # distribution 2.8 only accepts bcrypt entries, hence -B.
    out = subprocess.run(
        [HTPASSWD_BINARY, "-Bbn", username, password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip() + "\n"


class RegistryServer:
    """One docker-registry process. `url` is http://127.0.0.1:PORT, `host` 127.0.0.1:PORT."""

    def __init__(
        self,
        flavour: Flavour = "anonymous",
        *,
        users: Mapping[str, str] | None = None,
        token_issuer: TokenIssuer | None = None,
        host: str = LOOPBACK,
        tls: bool = False,
        tls_names: tuple[str, ...] = (),
    ) -> None:
        if flavour not in ("anonymous", "basic", "token"):
            raise ValueError(f"unknown registry flavour {flavour!r}")
        if flavour == "basic" and not users:
            raise ValueError("a basic registry needs users")
        if flavour == "token" and token_issuer is None:
            raise ValueError("a token registry needs a token_issuer")
        self.flavour: Flavour = flavour
        self.users = dict(users or {})
        self.token_issuer = token_issuer
        self.bind_host = host
        self.root = Path(tempfile.mkdtemp(prefix=f"rig-registry-{flavour}-"))
        self.storage_dir = self.root / "storage"
        self.storage_dir.mkdir()
        self.config_path = self.root / "config.yml"
        #: With tls: the CA and the server certificate (for the bind address and
        #: `tls_names`), made now so a test can hand the CA out before start().
        self.tls_files: SelfSignedFiles | None = None
        if tls:
            self.tls_files = make_self_signed((host, *tls_names), self.root / "tls")
        self.port = 0
        self.process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_files is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def ca_file(self) -> Path | None:
        """The CA that signed the certificate (None over plain HTTP)."""
        return None if self.tls_files is None else self.tls_files.ca_cert

    @property
    def verify(self) -> bool | str:
        """What a requests client passes as ``verify`` to reach this registry."""
        return True if self.ca_file is None else str(self.ca_file)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # Filesystem storage cannot redirect anyway; say so to keep it off.
                "redirect": {"disable": True},
                # The purger would wake up and log; uploads in tests are short.
                "maintenance": {"uploadpurging": {"enabled": False}},
                "cache": {"blobdescriptor": "inmemory"},
            },
            "http": {
                "addr": self.host,
                # A fixed secret silences the "No HTTP secret provided" warning.
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.tls_files is not None:
            config["http"]["tls"] = {
                "certificate": str(self.tls_files.cert),
                "key": str(self.tls_files.key),
            }
        if self.flavour == "basic":
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text("".join(_htpasswd_line(u, p) for u, p in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "rig-basic", "path": str(htpasswd)}}
        elif self.flavour == "token":
            issuer = self.token_issuer
            assert issuer is not None
            config["auth"] = {
                "token": {
                    "realm": issuer.realm,
                    "service": issuer.service,
                    "issuer": issuer.issuer,
                    "rootcertbundle": str(issuer.cert_path),
                }
            }
        return config

    def start(self, timeout: float = 30.0) -> RegistryServer:
        if self.process is not None:
            raise RuntimeError("registry already started")
        # free_port is racy by nature: retry on the rare port clash.
        for attempt in range(3):
            self.port = free_port(self.bind_host)
            # YAML is a superset of JSON.
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            proc = ManagedProcess(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                cwd=self.root,
                log_dir=self.root,
                name=f"registry-{self.flavour}",
            )
            if not Path(REGISTRY_BINARY).is_file():
                raise StartupError(f"{REGISTRY_BINARY} missing (Debian package docker-registry)")
            proc.start()
            try:
                context = None
                if self.ca_file is not None:
                    context = ssl.create_default_context(cafile=str(self.ca_file))
                wait_for_http(
                    f"{self.url}/v2/", timeout, ok=(200, 401), process=proc, context=context
                )
            except StartupError:
                proc.stop()
                if attempt < 2 and "address already in use" in proc.log_text():
                    continue
                raise
            self.process = proc
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def blob_path(self, digest: str) -> Path:
        """The data file of a blob in the filesystem storage (corrupt it to test digests)."""
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return (
            self.storage_dir
            / "docker/registry/v2/blobs/sha256"
            / hexdigest[:2]
            / hexdigest
            / "data"
        )

    def repository_dir(self, name: str) -> Path:
        return self.storage_dir / "docker/registry/v2/repositories" / name

    def __repr__(self) -> str:
        return f"<RegistryServer {self.flavour} {self.url}>"


# --- a client that answers challenges ---------------------------------------------------


class HasURL(Protocol):
    """Anything with a base URL: a RegistryServer, a front."""

    @property
    def url(self) -> str: ...


_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """('Bearer', {'realm': .., 'service': .., 'scope': ..}) from a WWW-Authenticate."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme, params


_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:blobs|manifests|tags)/")


def scope_for(method: str, path: str) -> str | None:
    """The scope a request needs, as the registry would name it in its challenge."""
    match = _REPO_PATH.match(path)
    if not match:
        return None
    action = "pull" if method.upper() in ("GET", "HEAD") else "pull,push"
    if method.upper() == "DELETE":
        action = "delete"
    return f"repository:{match['name']}:{action}"


class RegistrySession:
    """A requests.Session-like client of one registry (or front) that answers 401
    challenges: Basic with the given credentials, Bearer by fetching a token from the
    realm for the challenged scope (with Basic credentials if any) and caching it.

    Paths ("/v2/...") are joined to the base URL; absolute URLs (upload Locations) are
    used as they are. Bodies must be bytes or seekable files, since a challenged request
    is sent again.
    """

    def __init__(
        self, base: HasURL | str, username: str | None = None, password: str | None = None
    ) -> None:
        self.base_url = (base if isinstance(base, str) else base.url).rstrip("/")
        self.username = username
        self.password = password
        self.session = requests.Session()
        # Loopback only: no proxy from the environment, no ~/.netrc credentials.
        self.session.trust_env = False
        self._basic = False
        self._tokens: dict[str, str] = {}  # scope ("" for none) -> token
        self.token_responses: list[dict[str, Any]] = []

    # requests.Session surface ------------------------------------------------------

    def url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return urljoin(self.base_url + "/", path_or_url.lstrip("/"))

    def _basic_header(self) -> str:
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _auth_header(self, scope: str | None) -> str | None:
        if self._basic:
            return self._basic_header()
        if scope is not None:
            token = self._tokens.get(scope)
            if token is None and scope.endswith(":pull"):
                token = self._tokens.get(scope[: -len("pull")] + "pull,push")
            if token is not None:
                return "Bearer " + token
        elif "" in self._tokens:
            return "Bearer " + self._tokens[""]
        return None

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        full = self.url(url)
        scope = scope_for(method, urlsplit(full).path)
        headers = dict(kwargs.pop("headers", None) or {})
        explicit = "Authorization" in headers
        header = self._auth_header(scope)
        if header and not explicit:
            headers["Authorization"] = header
        response = self.session.request(method, full, headers=headers, **kwargs)
        challenge = response.headers.get("WWW-Authenticate")
        if response.status_code != 401 or not challenge or explicit:
            return response
        scheme, params = parse_challenge(challenge)
        scheme = scheme.lower()
        if scheme == "basic" and self.username is not None and not self._basic:
            self._basic = True
            headers["Authorization"] = self._basic_header()
        elif scheme == "bearer" and "realm" in params:
            wanted = params.get("scope") or scope or ""
            token = self.fetch_token(params["realm"], params.get("service"), wanted.split())
            if token is None:
                return response
            self._tokens[wanted] = token
            if scope is not None:
                self._tokens[scope] = token
            headers["Authorization"] = "Bearer " + token
        else:
            return response
        # A body given as a file was read by the first try.
        data = kwargs.get("data")
        seek = getattr(data, "seek", None)
        if seek is not None:
            seek(0)
        response.close()
        return self.session.request(method, full, headers=headers, **kwargs)

    def fetch_token(self, realm: str, service: str | None, scopes: list[str]) -> str | None:
        """A token from `realm` for `scopes`; None if the issuer refuses."""
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        auth = None
        if self.username is not None:
            params.append(("account", self.username))
            auth = (self.username, self.password or "")
        response = self.session.get(realm, params=params, auth=auth, timeout=30)
        if response.status_code != 200:
            return None
        body = response.json()
        self.token_responses.append(body)
        token = body.get("token") or body.get("access_token")
        return str(token) if token else None

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("allow_redirects", False)
        return self.request("HEAD", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", url, **kwargs)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistrySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def registry_session(
    registry: HasURL | str, user: str | None = None, password: str | None = None
) -> RegistrySession:
    """A client of `registry` (or a front) answering Basic/Bearer challenges as `user`."""
    return RegistrySession(registry, user, password)


# --- pushing ----------------------------------------------------------------------------


class RegistryError(RuntimeError):
    """The registry refused a push; the message carries its answer."""


def _file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _expect(response: requests.Response, statuses: Iterable[int], what: str) -> None:
    if response.status_code not in set(statuses):
        raise RegistryError(f"{what}: HTTP {response.status_code} {response.text[:500]!r}")


def push_blob(session: RegistrySession, name: str, data: bytes | Path) -> str:
    """Upload a blob (POST uploads/, then PUT ?digest=) and return its digest.

    A Path is streamed from disk, so large layers never sit in memory.
    """
    if isinstance(data, Path):
        digest, size = _file_digest(data)
    else:
        digest, size = digest_of(data), len(data)
    started = session.post(f"/v2/{name}/blobs/uploads/")
    _expect(started, (202,), f"start upload to {name}")
    location = session.url(
        urljoin(session.url(f"/v2/{name}/blobs/uploads/"), started.headers["Location"])
    )
    location += ("&" if "?" in location else "?") + f"digest={digest}"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
    body: bytes | IO[bytes]
    if isinstance(data, Path):
        with open(data, "rb") as body:
            done = session.put(location, data=body, headers=headers)
    else:
        done = session.put(location, data=data, headers=headers)
    _expect(done, (201,), f"finish upload of {digest} to {name}")
    return digest


def push_manifest(
    session: RegistrySession,
    name: str,
    reference: str,
    manifest: bytes | Mapping[str, Any],
    media_type: str | None = None,
) -> str:
    """PUT a manifest under a tag or digest; returns its digest (of the exact bytes sent)."""
    if isinstance(manifest, bytes):
        raw = manifest
        media_type = media_type or json.loads(raw).get("mediaType") or MEDIA_MANIFEST
    else:
        raw = json.dumps(manifest, indent=3).encode()
        media_type = media_type or str(manifest.get("mediaType") or MEDIA_MANIFEST)
    response = session.put(
        f"/v2/{name}/manifests/{reference}", data=raw, headers={"Content-Type": media_type}
    )
    _expect(response, (201,), f"put manifest {name}:{reference}")
    digest = digest_of(raw)
    answered = response.headers.get("Docker-Content-Digest")
    if answered and answered != digest:
        raise RegistryError(f"registry says manifest digest {answered}, we computed {digest}")
    return digest


@dataclass(frozen=True)
class PushedImage:
    name: str
    tag: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    layer_digests: tuple[str, ...]


def schema2_manifest(
    config: tuple[str, int],
    layers: Iterable[tuple[str, int]],
    *,
    layer_media_type: str = MEDIA_LAYER,
) -> dict[str, Any]:
    """A Docker schema 2 manifest for (digest, size) pairs."""
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "size": config[1], "digest": config[0]},
        "layers": [
            {"mediaType": layer_media_type, "size": size, "digest": digest}
            for digest, size in layers
        ],
    }


def push_image(
    session: RegistrySession,
    name: str,
    tag: str,
    layers: list[bytes],
    config: bytes | None = None,
) -> PushedImage:
    """Blobs, a config and a schema 2 manifest tagged `tag`. The layers are taken as
    they are (callers give gzipped tars when a loader will read them)."""
    layer_digests = [push_blob(session, name, layer) for layer in layers]
    if config is None:
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": layer_digests},
                "config": {},
            }
        ).encode()
    config_digest = push_blob(session, name, config)
    manifest = schema2_manifest(
        (config_digest, len(config)), zip(layer_digests, (len(x) for x in layers), strict=True)
    )
    raw = json.dumps(manifest, indent=3).encode()
    digest = push_manifest(session, name, tag, raw, MEDIA_MANIFEST)
    return PushedImage(name, tag, digest, raw, config_digest, config, tuple(layer_digests))
