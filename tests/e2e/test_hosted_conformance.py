"""The OCI Distribution conformance workflows against a hosted repository, step by step.

This follows opencontainers/distribution-spec's conformance suite as it was before its
redesign (conformance/0{1..4}_*_test.go and setup.go): the four workflows Pull, Push,
Content Discovery and Content Management, each context and each ``Specify`` in the
suite's order, named as the suite names them, with the suite's test data made the way
its setup.go makes it (16 random configs, the same gzip layer, manifests with a ``data``
field and an unknown field, the referrers' A/B/C artifacts and the index artifact). A
failing step says which one: ``Push / Blob Upload Chunked / Retry previous blob chunk
should return 416: ...``. Where the suite accepts several answers (201 or 202 for a
monolithic POST) the assertions here pin the one passthrough gives.

The real Go suite is not run here: it needs a Go toolchain and its modules (ginkgo,
gomega, reggie), which the test machines cannot fetch. docs/conformance.md records a run
of it by hand (v1.0.1 and v1.1.1, built offline) and how to repeat it.

The workflows run on both stores, CACHE_DIR and S3 (SeaweedFS). Each gets a repository
of its own under ``conformance/`` (the suite's OCI_NAMESPACE), so they run in any order;
the server authenticates the suite's user with Basic credentials (OCI_USERNAME and
OCI_PASSWORD) against passthrough's htpasswd users.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import secrets
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.e2e.hosted import OCI_INDEX, OCI_MANIFEST, OCTET, Hosted, error_codes, hosted_server
from tests.support.fixtures_matrix import s3_env
from tests.support.helpers import digest as digest_of
from tests.support.seaweed import SeaweedS3

pytestmark = pytest.mark.rig

# setup.go's layerBase64String: a small gzipped tar.
LAYER_BASE64 = (
    "H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
    "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6YRBumSzOlGtjkd+qD"
    "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA"
)
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
ANNOTATION = "org.opencontainers.conformance.test"
ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "MANIFEST_UNVERIFIED",
    "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID", "TAG_INVALID", "UNAUTHORIZED", "DENIED",
    "UNSUPPORTED",
}  # fmt: skip
NUM_WORKFLOWS = 16  # setup.go: 1 << 4, the bit after the four workflows


def go_json(document: Any) -> bytes:
    """json.MarshalIndent(v, "", "\\t"), as setup.go serializes every document."""
    return json.dumps(document, indent="\t", separators=(",", ": ")).encode()


def go_bytes(data: bytes) -> str:
    """A Go []byte in JSON: base64."""
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Blob:
    content: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.content)

    @property
    def length(self) -> str:
        return str(len(self.content))


def descriptor(media_type: str, content: bytes, **extra: Any) -> dict[str, Any]:
    # newUnspecifiedField has no omitempty in image.go: a nil []byte is null.
    return {
        "mediaType": media_type,
        "digest": digest_of(content),
        "size": len(content),
        **extra,
        "newUnspecifiedField": extra.get("newUnspecifiedField"),
    }


class SuiteData:
    """setup.go's init(), for one run."""

    def __init__(self) -> None:
        letters = string.digits + string.ascii_uppercase + string.ascii_lowercase + "-"
        self.configs: list[Blob] = []
        for _ in range(NUM_WORKFLOWS):
            config = {
                "author": "".join(secrets.choice(letters) for _ in range(16)),
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
            }
            self.configs.append(Blob(go_json(config)))
        self.layer = Blob(base64.b64decode(LAYER_BASE64))
        layers = [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", self.layer.content)]
        self.manifests: list[Blob] = []
        for config_blob in self.configs:
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(
                    "application/vnd.oci.image.config.v1+json",
                    config_blob.content,
                    data=go_bytes(config_blob.content),
                    newUnspecifiedField=go_bytes(b"hello world"),
                ),
                "layers": layers,
            }
            self.manifests.append(Blob(go_json(manifest)))
        # No mediaType in the document: the Content-Type says what it is.
        self.empty_layer_manifest = Blob(
            go_json(
                {
                    "schemaVersion": 2,
                    "config": descriptor(
                        "application/vnd.oci.image.config.v1+json",
                        self.configs[1].content,
                        data=go_bytes(self.configs[1].content),
                        newUnspecifiedField=go_bytes(b"hello world"),
                    ),
                    "layers": [],
                }
            )
        )
        self.nonexistent_manifest = ".INVALID_MANIFEST_NAME"
        self.invalid_manifest = b"blablabla"
        seed = random.Random(secrets.randbits(64))
        self.blob_a = Blob(seed.randbytes(42))
        self.blob_b = Blob(seed.randbytes(42))
        half = len(self.blob_b.content) // 2 + 1
        self.chunk1, self.chunk2 = self.blob_b.content[:half], self.blob_b.content[half:]
        self.chunk1_range = f"0-{len(self.chunk1) - 1}"
        self.chunk2_range = f"{len(self.chunk1)}-{len(self.blob_b.content) - 1}"
        self.empty_json = Blob(b"{}")
        self.ref_blob_a = Blob(b"NHL Peanut Butter on my NHL bagel")
        self.ref_blob_b = Blob(b"NBA Strawberry Jam on my NBA croissant")
        self.type_a = "application/vnd.nhl.peanut.butter.bagel"
        self.type_b = "application/vnd.nba.strawberry.jam.croissant"
        self.type_index = "application/vnd.food.stand"
        self.annotations: dict[str, str] = {}
        empty = descriptor("application/vnd.oci.empty.v1+json", b"{}")

        def subject(of: Blob) -> dict[str, Any]:
            return descriptor(OCI_MANIFEST, of.content)

        def artifact(
            name: str | None, config: dict[str, Any], layer: dict[str, Any], of: Blob, **more: Any
        ) -> Blob:
            document: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, **more}
            document.update(config=config, layers=[layer], subject=subject(of))
            if name is not None:
                document["annotations"] = {ANNOTATION: name}
            made = Blob(go_json(document))
            if name is not None:
                self.annotations[made.digest] = name
            return made

        m4 = self.manifests[4]
        self.refs_a_config = artifact(
            "test config a", descriptor(self.type_a, self.ref_blob_a.content), empty, m4
        )
        self.refs_b_config = artifact(
            "test config b", descriptor(self.type_b, self.ref_blob_b.content), empty, m4
        )
        self.refs_a_layer = artifact(
            "test layer a", empty, descriptor(self.type_a, self.ref_blob_a.content), m4,
            artifactType=self.type_a,
        )  # fmt: skip
        self.refs_b_layer = artifact(
            "test layer b", empty, descriptor(self.type_b, self.ref_blob_b.content), m4,
            artifactType=self.type_b,
        )  # fmt: skip
        # C's subject, manifests[3], is never pushed in this workflow.
        self.refs_c_layer = artifact(
            None, empty, descriptor(self.type_b, self.ref_blob_b.content), self.manifests[3],
            artifactType=self.type_b,
        )  # fmt: skip
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": self.type_index,
            "manifests": [
                descriptor(OCI_MANIFEST, self.refs_a_config.content),
                descriptor(OCI_MANIFEST, self.refs_a_layer.content),
            ],
            "subject": subject(m4),
            "annotations": {ANNOTATION: "test index"},
        }
        self.refs_index = Blob(go_json(index))
        self.annotations[self.refs_index.digest] = "test index"
        self.dummy_digest = digest_of(b"hello world")


class Workflow:
    """The suite's client (reggie) for one workflow: requests on `/v2/<name>/...` with
    the suite's user, and the context/step names for failures."""

    def __init__(self, hosted: Hosted, title: str, name: str) -> None:
        self.hosted = hosted
        self.title = title
        self.name = name
        self.http = hosted.session("alice")
        self.http.headers["User-Agent"] = "distribution-spec-conformance-tests"
        self.section = ""
        self.steps: list[str] = []

    def request(
        self,
        method: str,
        path: str,
        *,
        name: str | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> requests.Response:
        path = path.replace("<name>", name or self.name)
        url = path if "://" in path else self.hosted.url(path)
        return self.http.request(
            method, url, params=params, headers=headers, data=body, timeout=60,
            allow_redirects=False,
        )  # fmt: skip

    def relative(self, response: requests.Response) -> str:
        """reggie's GetRelativeLocation: the Location's path and query."""
        location = response.headers.get("Location", "")
        assert location, f"no Location in the {response.status_code} answer"
        parts = urlsplit(location)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    @contextlib.contextmanager
    def context(self, name: str) -> Iterator[None]:
        self.section = name
        yield

    @contextlib.contextmanager
    def specify(self, text: str) -> Iterator[None]:
        where = f"{self.title} / {self.section} / {text}"
        self.steps.append(where)
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc

    # -- the setup steps every workflow shares ------------------------------------------

    def populate_blob(self, blob: Blob) -> None:
        started = self.request("POST", "/v2/<name>/blobs/uploads/")
        assert started.status_code == 202, started.text
        resp = self.request(
            "PUT",
            self.relative(started),
            params={"digest": blob.digest},
            headers={"Content-Type": OCTET, "Content-Length": blob.length},
            body=blob.content,
        )
        assert 200 <= resp.status_code < 300, resp.text

    def put_manifest(
        self, reference: str, blob: Blob, media_type: str = OCI_MANIFEST
    ) -> requests.Response:
        return self.request(
            "PUT",
            f"/v2/<name>/manifests/{reference}",
            headers={"Content-Type": media_type},
            body=blob.content,
        )

    def delete_ok(self, path: str, *, not_found: bool = False) -> None:
        resp = self.request("DELETE", path)
        allowed = {405} | ({404} if not_found else set())
        assert 200 <= resp.status_code < 300 or resp.status_code in allowed, (
            f"{resp.status_code} {resp.text}"
        )


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def hosted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hosted]:
    """The hosted server on either store: CACHE_DIR, or a bucket of the rig's SeaweedFS
    (the S3 upload sessions, a multipart upload each)."""
    root = tmp_path_factory.mktemp(f"conformance-{request.param}")
    if request.param == "filesystem":
        with hosted_server(root) as server:
            yield server
        return
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    seaweed.ensure_running()
    bucket = seaweed.create_bucket()
    try:
        with hosted_server(root, extra=s3_env(seaweed, bucket)) as server:
            yield server
    finally:
        seaweed.ensure_running()
        seaweed.delete_bucket(bucket)


@pytest.fixture
def data() -> SuiteData:
    return SuiteData()


def workflow(hosted: Hosted, title: str) -> Workflow:
    return Workflow(
        hosted, title, f"conformance/{title.lower().replace(' ', '-')}-{secrets.token_hex(4)}"
    )


def tags_of(resp: requests.Response) -> list[str]:
    tags: list[str] = json.loads(resp.content).get("tags") or []
    return tags


def test_pull(hosted: Hosted, data: SuiteData) -> None:
    flow = workflow(hosted, "Pull")
    tag = ""
    with flow.context("Setup"):
        for config in data.configs[:2]:
            with flow.specify("Populate registry with test blob"):
                flow.populate_blob(config)
        with flow.specify("Populate registry with test layer"):
            flow.populate_blob(data.layer)
        with flow.specify("Populate registry with test manifest"):
            tag = "tagtest0"
            resp = flow.put_manifest(tag, data.manifests[0])
            assert 200 <= resp.status_code < 300, resp.text
        with flow.specify("Populate registry with test manifest"):
            resp = flow.put_manifest(data.manifests[1].digest, data.manifests[1])
            assert 200 <= resp.status_code < 300, resp.text

    with flow.context("Pull blobs"):
        with flow.specify("HEAD request to nonexistent blob should result in 404 response"):
            resp = flow.request("HEAD", f"/v2/<name>/blobs/{data.dummy_digest}")
            assert resp.status_code == 404
        with flow.specify("HEAD request to existing blob should yield 200"):
            resp = flow.request("HEAD", f"/v2/<name>/blobs/{data.configs[0].digest}")
            assert resp.status_code == 200
            assert resp.headers["Docker-Content-Digest"] == data.configs[0].digest
        with flow.specify("GET nonexistent blob should result in 404 response"):
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.dummy_digest}")
            assert resp.status_code == 404
        with flow.specify("GET request to existing blob URL should yield 200"):
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.configs[0].digest}")
            assert resp.status_code == 200 and resp.content == data.configs[0].content

    accept = {"Accept": OCI_MANIFEST}
    with flow.context("Pull manifests"):
        with flow.specify("HEAD request to nonexistent manifest should return 404"):
            resp = flow.request("HEAD", f"/v2/<name>/manifests/{data.nonexistent_manifest}")
            assert resp.status_code == 404
        for position in (0, 1):
            with flow.specify(
                f"HEAD request to manifest[{position}] path (digest) should yield 200 response"
            ):
                wanted = data.manifests[position].digest
                resp = flow.request("HEAD", f"/v2/<name>/manifests/{wanted}", headers=accept)
                assert resp.status_code == 200
                assert resp.headers["Docker-Content-Digest"] == wanted
        with flow.specify("HEAD request to manifest path (tag) should yield 200 response"):
            assert tag
            resp = flow.request("HEAD", f"/v2/<name>/manifests/{tag}", headers=accept)
            assert resp.status_code == 200
            assert resp.headers["Docker-Content-Digest"] == data.manifests[0].digest
        with flow.specify("GET nonexistent manifest should return 404"):
            resp = flow.request("GET", f"/v2/<name>/manifests/{data.nonexistent_manifest}")
            assert resp.status_code == 404
        for position in (0, 1):
            with flow.specify(
                f"GET request to manifest[{position}] path (digest) should yield 200 response"
            ):
                wanted = data.manifests[position].digest
                resp = flow.request("GET", f"/v2/<name>/manifests/{wanted}", headers=accept)
                assert resp.status_code == 200
                assert resp.content == data.manifests[position].content
        with flow.specify("GET request to manifest path (tag) should yield 200 response"):
            resp = flow.request("GET", f"/v2/<name>/manifests/{tag}", headers=accept)
            assert resp.status_code == 200 and resp.content == data.manifests[0].content

    with flow.context("Error codes"):
        with flow.specify("400 response body should contain OCI-conforming JSON message"):
            resp = flow.request(
                "GET",
                "/v2/<name>/manifests/sha256:totallywrong",
                headers={"Content-Type": OCI_MANIFEST},
                body=data.invalid_manifest,
            )
            assert resp.status_code in (400, 404), resp.text
            if resp.status_code == 400:
                codes = error_codes(resp)
                assert codes and codes[0] in ERROR_CODES, resp.text

    with flow.context("Teardown"):
        # deleteManifestBeforeBlobs is the suite's default.
        for position in (0, 1):
            with flow.specify(f"Delete manifest[{position}] created in setup"):
                flow.delete_ok(f"/v2/<name>/manifests/{data.manifests[position].digest}")
        for position in (0, 1):
            with flow.specify(f"Delete config[{position}] blob created in setup"):
                flow.delete_ok(f"/v2/<name>/blobs/{data.configs[position].digest}", not_found=True)
        with flow.specify("Delete layer blob created in setup"):
            flow.delete_ok(f"/v2/<name>/blobs/{data.layer.digest}", not_found=True)
    assert len(flow.steps) == 23


def test_push(hosted: Hosted, data: SuiteData) -> None:
    flow = workflow(hosted, "Push")
    cross = f"cross/conformance-{secrets.token_hex(6)}"
    last: requests.Response | None = None
    prev: requests.Response | None = None
    empty_layer_ref = ""

    with flow.context("Blob Upload Streamed"):
        with flow.specify("PATCH request with blob in body should yield 202 response"):
            started = flow.request("POST", "/v2/<name>/blobs/uploads/")
            assert started.headers.get("Location")
            last = flow.request(
                "PATCH", flow.relative(started), headers={"Content-Type": OCTET},
                body=data.blob_a.content,
            )  # fmt: skip
            assert last.status_code == 202, last.text
        with flow.specify("PUT request to session URL with digest should yield 201 response"):
            assert last is not None
            # The suite sets Content-Length to the blob's length but sends no body; Go's
            # client sends the length of the body it has: 0.
            resp = flow.request(
                "PUT", flow.relative(last), params={"digest": data.blob_a.digest},
                headers={"Content-Type": OCTET},
            )  # fmt: skip
            assert resp.status_code == 201, resp.text
            assert resp.headers.get("Location")

    with flow.context("Blob Upload Monolithic"):
        with flow.specify("GET nonexistent blob should result in 404 response"):
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.dummy_digest}")
            assert resp.status_code == 404
        with flow.specify("POST request with digest and blob should yield a 201 or 202"):
            last = flow.request(
                "POST",
                "/v2/<name>/blobs/uploads/",
                params={"digest": data.configs[1].digest},
                headers={"Content-Type": OCTET, "Content-Length": data.configs[1].length},
                body=data.configs[1].content,
            )
            assert last.headers.get("Location")
            # passthrough takes the whole blob in the POST.
            assert last.status_code == 201, last.text
        with flow.specify(
            "GET request to blob URL from prior request should yield 200 or 404 based on "
            "response code"
        ):
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.configs[1].digest}")
            assert resp.status_code == 200 and resp.content == data.configs[1].content
        with flow.specify("POST request should yield a session ID"):
            last = flow.request("POST", "/v2/<name>/blobs/uploads/")
            assert last.status_code == 202
        with flow.specify("PUT upload of a blob should yield a 201 Response"):
            resp = flow.request(
                "PUT",
                flow.relative(last),
                params={"digest": data.configs[1].digest},
                headers={"Content-Type": OCTET, "Content-Length": data.configs[1].length},
                body=data.configs[1].content,
            )
            assert resp.headers.get("Location") and resp.status_code == 201, resp.text
        with flow.specify("GET request to existing blob should yield 200 response"):
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.configs[1].digest}")
            assert resp.status_code == 200
        with flow.specify("PUT upload of a layer blob should yield a 201 Response"):
            started = flow.request("POST", "/v2/<name>/blobs/uploads/")
            resp = flow.request(
                "PUT",
                flow.relative(started),
                params={"digest": data.layer.digest},
                headers={"Content-Type": OCTET, "Content-Length": data.layer.length},
                body=data.layer.content,
            )
            assert resp.headers.get("Location") and resp.status_code == 201, resp.text
        with flow.specify("GET request to existing layer should yield 200 response"):
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.layer.digest}")
            assert resp.status_code == 200 and resp.content == data.layer.content

    def chunk(location: str, body: bytes, content_range: str) -> requests.Response:
        return flow.request(
            "PATCH",
            location,
            headers={
                "Content-Type": OCTET,
                "Content-Length": str(len(body)),
                "Content-Range": content_range,
            },
            body=body,
        )

    with flow.context("Blob Upload Chunked"):
        with flow.specify("Out-of-order blob upload should return 416"):
            started = flow.request(
                "POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"}
            )
            assert started.headers.get("Location")
            # The suite rebuilds its blob when OCI-Chunk-Min-Length is above its chunks;
            # passthrough sets no minimum on the filesystem store.
            assert "OCI-Chunk-Min-Length" not in started.headers
            resp = chunk(flow.relative(started), data.chunk2, data.chunk2_range)
            assert resp.status_code == 416, resp.text
        with flow.specify("PATCH request with first chunk should return 202"):
            prev = flow.request(
                "POST", "/v2/<name>/blobs/uploads/", headers={"Content-Length": "0"}
            )
            assert prev.headers.get("Location")
            last = chunk(flow.relative(prev), data.chunk1, data.chunk1_range)
            assert last.status_code == 202, last.text
            assert last.headers["Range"] == data.chunk1_range
        with flow.specify("Retry previous blob chunk should return 416"):
            assert prev is not None
            resp = chunk(flow.relative(prev), data.chunk1, data.chunk1_range)
            assert resp.status_code == 416, resp.text
        with flow.specify("Get on stale blob upload should return 204 with a range and location"):
            last = flow.request("GET", flow.relative(prev))
            assert last.status_code == 204
            assert last.headers.get("Location")
            assert last.headers["Range"] == data.chunk1_range
        with flow.specify("PATCH request with second chunk should return 202"):
            last = chunk(flow.relative(last), data.chunk2, data.chunk2_range)
            assert last.status_code == 202, last.text
            assert last.headers["Range"] == f"0-{len(data.blob_b.content) - 1}"
            assert last.headers.get("Location")
        with flow.specify("PUT request with digest should return 201"):
            resp = flow.request(
                "PUT", flow.relative(last), params={"digest": data.blob_b.digest},
                headers={"Content-Length": "0", "Content-Type": OCTET},
            )  # fmt: skip
            assert resp.status_code == 201, resp.text
            assert resp.headers.get("Location")
            got = flow.request("GET", f"/v2/<name>/blobs/{data.blob_b.digest}")
            assert got.content == data.blob_b.content

    with flow.context("Cross-Repository Blob Mount"):
        with flow.specify(
            "Cross-mounting of a blob without the from argument should yield session id"
        ):
            resp = flow.request(
                "POST", "/v2/<name>/blobs/uploads/", name=cross,
                params={"mount": data.dummy_digest},
            )  # fmt: skip
            assert resp.status_code == 202, resp.text
            assert resp.headers.get("Location")
        with flow.specify(
            "POST request to mount another repository's blob should return 201 or 202"
        ):
            last = flow.request(
                "POST", "/v2/<name>/blobs/uploads/", name=cross,
                params={"mount": data.blob_a.digest, "from": flow.name},
            )  # fmt: skip
            # The suite's user may read its own repository: the blob is mounted.
            assert last.status_code == 201, last.text
        with flow.specify(
            "GET request to test digest within cross-mount namespace should return 200"
        ):
            assert flow.relative(last) == f"/v2/{cross}/blobs/{data.blob_a.digest}"
            resp = flow.request("GET", flow.relative(last))
            assert resp.status_code == 200 and resp.content == data.blob_a.content
        # "Cross-mounting of nonexistent blob should yield session id" runs only after a
        # 202, and the automatic-mount steps only with OCI_AUTOMATIC_CROSSMOUNT: skipped
        # by the suite here as well.

    with flow.context("Manifest Upload"):
        with flow.specify("GET nonexistent manifest should return 404"):
            resp = flow.request("GET", f"/v2/<name>/manifests/{data.nonexistent_manifest}")
            assert resp.status_code == 404
        with flow.specify("PUT should accept a manifest upload"):
            for i in range(4):
                resp = flow.put_manifest(f"test{i}", data.manifests[1])
                assert resp.headers.get("Location") and resp.status_code == 201, resp.text
        with flow.specify("Registry should accept a manifest upload with no layers"):
            resp = flow.put_manifest("emptylayer", data.empty_layer_manifest)
            # The suite only warns when this is refused; passthrough accepts it.
            assert resp.status_code == 201, resp.text
            empty_layer_ref = resp.headers["Location"]
            assert empty_layer_ref
        with flow.specify("GET request to manifest URL (digest) should yield 200 response"):
            resp = flow.request(
                "GET", f"/v2/<name>/manifests/{data.manifests[1].digest}",
                headers={"Accept": OCI_MANIFEST},
            )  # fmt: skip
            assert resp.status_code == 200 and resp.content == data.manifests[1].content

    with flow.context("Teardown"):
        with flow.specify("Delete manifest created in tests"):
            flow.delete_ok(f"/v2/<name>/manifests/{data.manifests[1].digest}")
            flow.delete_ok(f"/v2/<name>/manifests/{data.empty_layer_manifest.digest}")
        with flow.specify("Delete config blob created in tests"):
            flow.delete_ok(f"/v2/<name>/blobs/{data.configs[1].digest}", not_found=True)
        with flow.specify("Delete layer blob created in setup"):
            flow.delete_ok(f"/v2/<name>/blobs/{data.layer.digest}", not_found=True)
    assert len(flow.steps) == 26


def test_content_discovery(hosted: Hosted, data: SuiteData) -> None:
    flow = workflow(hosted, "Content Discovery")
    num_tags = 4
    m4 = data.manifests[4]

    def pushed_with_subject(
        reference: str, blob: Blob, subject: str, media: str = OCI_MANIFEST
    ) -> None:
        resp = flow.put_manifest(reference, blob, media)
        assert 200 <= resp.status_code < 300, resp.text
        assert resp.headers.get("OCI-Subject") == subject

    with flow.context("Setup"):
        with flow.specify("Populate registry with test blob"):
            flow.populate_blob(data.configs[2])
        with flow.specify("Populate registry with test layer"):
            flow.populate_blob(data.layer)
        with flow.specify("Populate registry with test tags"):
            for i in range(num_tags):
                for tag in (f"test{i}", f"TEST{i}"):
                    resp = flow.put_manifest(tag, data.manifests[2])
                    assert 200 <= resp.status_code < 300, resp.text
            assert flow.request("GET", "/v2/<name>/tags/list").status_code == 200
        with flow.specify("References setup"):
            assert data.empty_json.digest == EMPTY_JSON_DIGEST
            flow.populate_blob(data.empty_json)
            # The reference blob before the image manifest is pushed: a referrer may
            # come before its subject.
            flow.populate_blob(data.ref_blob_a)
            pushed_with_subject(data.refs_a_config.digest, data.refs_a_config, m4.digest)
            pushed_with_subject(data.refs_a_layer.digest, data.refs_a_layer, m4.digest)
            pushed_with_subject(data.refs_index.digest, data.refs_index, m4.digest, OCI_INDEX)
            flow.populate_blob(data.configs[4])
            flow.populate_blob(data.layer)
            resp = flow.put_manifest("tagtest0", m4)
            assert 200 <= resp.status_code < 300, resp.text
            flow.populate_blob(data.ref_blob_b)
            pushed_with_subject(data.refs_b_config.digest, data.refs_b_config, m4.digest)
            pushed_with_subject(data.refs_b_layer.digest, data.refs_b_layer, m4.digest)
            # A referrer of a subject that is not in the repository at all.
            pushed_with_subject(
                data.refs_c_layer.digest, data.refs_c_layer, data.manifests[3].digest
            )

    with flow.context("Test content discovery endpoints (listing tags)"):
        with flow.specify(
            "GET request to list tags should yield 200 response and be in sorted order"
        ):
            resp = flow.request("GET", "/v2/<name>/tags/list")
            assert resp.status_code == 200
            tags = tags_of(resp)
            num_tags = len(tags)
            lexical = sorted(tags, key=str.lower)
            assert tags in (lexical, sorted(tags)), tags
            assert set(tags) == {f"{c}{i}" for c in ("test", "TEST") for i in range(4)} | {
                "tagtest0"
            }
        with flow.specify("GET number of tags should be limitable by `n` query parameter"):
            resp = flow.request("GET", "/v2/<name>/tags/list", params={"n": str(num_tags // 2)})
            assert resp.status_code == 200
            assert len(tags_of(resp)) == num_tags // 2
        with flow.specify("GET start of tag is set by `last` query parameter"):
            half = num_tags // 2
            resp = flow.request("GET", "/v2/<name>/tags/list", params={"n": str(half)})
            assert resp.status_code == 200
            last = tags_of(resp)[half - 1]
            resp = flow.request(
                "GET", "/v2/<name>/tags/list", params={"n": str(half), "last": last}
            )
            assert resp.status_code == 200
            rest = tags_of(resp)
            assert len(rest) <= half and last not in rest

    def referrers(subject: str, **params: str) -> list[dict[str, Any]]:
        resp = flow.request("GET", f"/v2/<name>/referrers/{subject}", params=params)
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"] == OCI_INDEX
        manifests: list[dict[str, Any]] = json.loads(resp.content)["manifests"]
        if params:
            assert resp.headers.get("OCI-Filters-Applied") == "artifactType"
        return manifests

    with flow.context("Test content discovery endpoints (listing references)"):
        with flow.specify("GET request to nonexistent blob should result in empty 200 response"):
            assert referrers(data.dummy_digest) == []
        with flow.specify("GET request to existing blob should yield 200"):
            found = referrers(m4.digest)
            assert len(found) == 5
            assert found[0]["digest"] != found[1]["digest"]
            for entry in found:
                assert entry["annotations"] == {ANNOTATION: data.annotations[entry["digest"]]}
            expected = {
                data.refs_a_config.digest, data.refs_a_layer.digest, data.refs_b_config.digest,
                data.refs_b_layer.digest, data.refs_index.digest,
            }  # fmt: skip
            assert {e["digest"] for e in found} == expected
        with flow.specify("GET request to existing blob with filter should yield 200"):
            found = referrers(m4.digest, artifactType=data.type_a)
            assert len(found) == 2
            assert {e["digest"] for e in found} == {
                data.refs_a_config.digest,
                data.refs_a_layer.digest,
            }
            for entry in found:
                assert entry["annotations"] == {ANNOTATION: data.annotations[entry["digest"]]}
                assert entry["artifactType"] == data.type_a
        with flow.specify("GET request to missing manifest should yield 200"):
            found = referrers(data.manifests[3].digest)
            assert [e["digest"] for e in found] == [data.refs_c_layer.digest]

    with flow.context("Teardown"):
        references = [
            data.refs_index.digest, data.manifests[2].digest, m4.digest,
            data.refs_a_config.digest, data.refs_a_layer.digest, data.refs_b_config.digest,
            data.refs_b_layer.digest, data.refs_c_layer.digest,
        ]  # fmt: skip
        with flow.specify("Delete created manifest & associated tags"):
            for reference in references:
                flow.delete_ok(f"/v2/<name>/manifests/{reference}", not_found=True)
            # Deleting a manifest by digest took its tags and its referrer entries along.
            resp = flow.request("GET", "/v2/<name>/tags/list")
            assert resp.status_code in (200, 404) and (
                resp.status_code == 404 or tags_of(resp) == []
            ), resp.text
            assert referrers(m4.digest) == []
        with flow.specify("Delete config blob created in tests"):
            flow.delete_ok(f"/v2/<name>/blobs/{data.configs[2].digest}", not_found=True)
        with flow.specify("Delete layer blob created in setup"):
            flow.delete_ok(f"/v2/<name>/blobs/{data.layer.digest}", not_found=True)
        with flow.specify("References teardown"):
            for blob in (data.configs[4], data.ref_blob_a, data.ref_blob_b, data.empty_json):
                flow.delete_ok(f"/v2/<name>/blobs/{blob.digest}", not_found=True)
    assert len(flow.steps) == 15


def test_content_management(hosted: Hosted, data: SuiteData) -> None:
    flow = workflow(hosted, "Content Management")
    tag_to_delete = "tagtest0"
    num_tags = 0
    blob_delete_allowed = True

    with flow.context("Setup"):
        with flow.specify("Populate registry with test config blob"):
            flow.populate_blob(data.configs[3])
        with flow.specify("Populate registry with test layer"):
            flow.populate_blob(data.layer)
        with flow.specify("Populate registry with test tag"):
            resp = flow.put_manifest(tag_to_delete, data.manifests[3])
            assert 200 <= resp.status_code < 300, resp.text
        with flow.specify("Check how many tags there are before anything gets deleted"):
            resp = flow.request("GET", "/v2/<name>/tags/list")
            assert resp.status_code == 200
            num_tags = len(tags_of(resp))
            assert num_tags == 1

    with flow.context("Manifest delete"):
        with flow.specify(
            "DELETE request to manifest tag should return 202, unless tag deletion is "
            "disallowed (400/405)"
        ):
            resp = flow.request("DELETE", f"/v2/<name>/manifests/{tag_to_delete}")
            # passthrough deletes tags.
            assert resp.status_code == 202, resp.text
        with flow.specify(
            "DELETE request to manifest (digest) should yield 202 response unless already deleted"
        ):
            resp = flow.request("DELETE", f"/v2/<name>/manifests/{data.manifests[3].digest}")
            assert resp.status_code in (202, 404), resp.text
            # The tag's deletion leaves the manifest: deleting it by digest is a 202.
            assert resp.status_code == 202
        with flow.specify(
            "GET request to deleted manifest URL should yield 404 response, unless delete is "
            "disallowed"
        ):
            resp = flow.request("GET", f"/v2/<name>/manifests/{data.manifests[3].digest}")
            assert resp.status_code == 404
        with flow.specify("GET request to tags list should reflect manifest deletion"):
            resp = flow.request("GET", "/v2/<name>/tags/list")
            assert resp.status_code in (200, 404)
            expect_tags = num_tags - 1
            if resp.status_code == 200:
                assert len(tags_of(resp)) == expect_tags
            else:
                assert expect_tags == 0

    with flow.context("Blob delete"):
        with flow.specify("DELETE request to blob URL should yield 202 response"):
            resp = flow.request("DELETE", f"/v2/<name>/blobs/{data.configs[3].digest}")
            assert resp.status_code == 202, resp.text
            resp = flow.request("DELETE", f"/v2/<name>/blobs/{data.layer.digest}")
            assert resp.status_code == 202, resp.text
            blob_delete_allowed = resp.status_code != 405
        with flow.specify("GET request to deleted blob URL should yield 404 response"):
            assert blob_delete_allowed
            resp = flow.request("GET", f"/v2/<name>/blobs/{data.configs[3].digest}")
            assert resp.status_code == 404
            assert error_codes(resp) == ["BLOB_UNKNOWN"]
    assert len(flow.steps) == 10
