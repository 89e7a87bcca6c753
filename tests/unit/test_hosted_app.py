"""The hosted area through Flask's test client on a real filesystem store: uploads
(monolithic, streamed, chunked, mount), manifests, tags, catalog, referrers, deletes, and
the spec's codes for bad input. Access control is tested apart (authentication off here:
the settings are built by hand)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from passthrough import create_app
from passthrough.config import load_settings
from tests.support.helpers import digest

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    settings = load_settings({"CACHE_DIR": str(tmp_path / "cache")}, env_file="/nonexistent")
    settings = replace(settings, hosted_repositories=("team/*", "apps/**"))
    return create_app({"SETTINGS": settings}).test_client()


def codes(response: Any) -> list[str]:
    return [e["code"] for e in json.loads(response.data)["errors"]]


def push_blob(client: FlaskClient, name: str, data: bytes) -> str:
    response = client.post(f"/v2/{name}/blobs/uploads/?digest={digest(data)}", data=data)
    assert response.status_code == 201, response.data
    assert response.headers["Docker-Content-Digest"] == digest(data)
    return digest(data)


def manifest_for(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": digest(config), "size": len(config)},
        "layers": [
            {"mediaType": LAYER_TYPE, "digest": digest(layer), "size": len(layer)}
            for layer in layers
        ],
        **extra,
    }
    return json.dumps(document).encode()


def push_image(client: FlaskClient, name: str, tag: str, marker: bytes = b"x") -> bytes:
    config, layer = b'{"marker": "' + marker + b'"}', b"layer-" + marker
    push_blob(client, name, config)
    push_blob(client, name, layer)
    body = manifest_for(config, [layer])
    response = client.put(
        f"/v2/{name}/manifests/{tag}", data=body, headers={"Content-Type": MANIFEST_TYPE}
    )
    assert response.status_code == 201, response.data
    assert response.headers["Docker-Content-Digest"] == digest(body)
    return body


def test_monolithic_push_and_pull(client: FlaskClient) -> None:
    body = push_image(client, "team/app", "1.0")
    got = client.get("/v2/team/app/manifests/1.0")
    assert got.status_code == 200 and got.data == body
    assert got.headers["Content-Type"] == MANIFEST_TYPE
    assert got.headers["Docker-Content-Digest"] == digest(body)
    head = client.head(f"/v2/team/app/manifests/{digest(body)}")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(body))
    layer = client.get(f"/v2/team/app/blobs/{digest(b'layer-x')}")
    assert layer.data == b"layer-x"
    ranged = client.get(f"/v2/team/app/blobs/{digest(b'layer-x')}", headers={"Range": "bytes=2-4"})
    assert ranged.status_code == 206 and ranged.data == b"yer"


def test_streamed_and_chunked_uploads(client: FlaskClient) -> None:
    data = bytes(range(256)) * 1000
    started = client.post("/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["Location"]
    assert started.headers["Range"] == "0-0" and started.headers["Docker-Upload-UUID"]
    first = client.patch(
        location, data=data[:1000], headers={"Content-Range": "0-999", "Content-Length": "1000"}
    )
    assert first.status_code == 202 and first.headers["Range"] == "0-999"
    # Out of order: 416, and the session is as it was.
    wrong = client.patch(location, data=data[2000:3000], headers={"Content-Range": "2000-2999"})
    assert wrong.status_code == 416 and codes(wrong) == ["BLOB_UPLOAD_INVALID"]
    status = client.get(location)
    assert status.status_code == 204 and status.headers["Range"] == "0-999"
    streamed = client.patch(location, data=data[1000:200_000])
    assert streamed.headers["Range"] == f"0-{200_000 - 1}"
    done = client.put(f"{location}?digest={digest(data)}", data=data[200_000:])
    assert done.status_code == 201, done.data
    assert client.get(f"/v2/team/app/blobs/{digest(data)}").data == data
    # A chunk after the session was closed.
    late = client.patch(location, data=b"more")
    assert late.status_code == 404 and codes(late) == ["BLOB_UPLOAD_UNKNOWN"]


def test_a_wrong_digest_commits_nothing(client: FlaskClient) -> None:
    response = client.post(f"/v2/team/app/blobs/uploads/?digest={digest(b'other')}", data=b"data")
    assert response.status_code == 400 and codes(response) == ["DIGEST_INVALID"]
    assert client.head(f"/v2/team/app/blobs/{digest(b'other')}").status_code == 404
    assert client.head(f"/v2/team/app/blobs/{digest(b'data')}").status_code == 404


def test_a_truncated_chunk_is_refused(client: FlaskClient) -> None:
    location = client.post("/v2/team/app/blobs/uploads/").headers["Location"]
    response = client.patch(
        location, data=b"abc", headers={"Content-Range": "0-9", "Content-Length": "3"}
    )
    assert response.status_code == 416
    assert client.get(location).headers["Range"] == "0-0"


def test_cancel(client: FlaskClient) -> None:
    location = client.post("/v2/team/app/blobs/uploads/").headers["Location"]
    assert client.delete(location).status_code == 204
    assert client.get(location).status_code == 404


def test_mount_from_a_repository_holding_the_blob(client: FlaskClient) -> None:
    blob = push_blob(client, "team/one", b"shared")
    mounted = client.post(f"/v2/team/two/blobs/uploads/?mount={blob}&from=team/one")
    assert mounted.status_code == 201 and mounted.headers["Location"].endswith(blob)
    assert client.get(f"/v2/team/two/blobs/{blob}").data == b"shared"
    # From a repository without it: a new session instead.
    fallback = client.post(f"/v2/team/two/blobs/uploads/?mount={digest(b'n')}&from=team/one")
    assert fallback.status_code == 202


def test_a_manifest_needs_its_blobs(client: FlaskClient) -> None:
    body = manifest_for(b"{}", [b"missing"])
    response = client.put(
        "/v2/team/app/manifests/1", data=body, headers={"Content-Type": MANIFEST_TYPE}
    )
    assert response.status_code == 400 and codes(response) == ["MANIFEST_BLOB_UNKNOWN"]
    # A blob in another repository does not count: it must be in this one.
    push_blob(client, "team/other", b"{}")
    push_blob(client, "team/other", b"missing")
    response = client.put("/v2/team/app/manifests/1", data=body)
    assert codes(response) == ["MANIFEST_BLOB_UNKNOWN"]


@pytest.mark.parametrize(
    ("body", "reference", "code"),
    [
        (b"not json", "1", "MANIFEST_INVALID"),
        (b'{"schemaVersion": 1}', "1", "MANIFEST_INVALID"),
        (b'{"schemaVersion": 2, "mediaType": "' + MANIFEST_TYPE.encode() + b'"}', "1",
         "MANIFEST_INVALID"),
        (b"{}", "sha256:" + "0" * 64, "DIGEST_INVALID"),
    ],
)
def test_bad_manifests(client: FlaskClient, body: bytes, reference: str, code: str) -> None:
    response = client.put(f"/v2/team/app/manifests/{reference}", data=body)
    assert response.status_code == 400 and codes(response) == [code]


def test_a_ten_megabyte_manifest_is_refused(client: FlaskClient) -> None:
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * (10 << 20) + b'"}'
    response = client.put("/v2/team/app/manifests/big", data=body)
    assert response.status_code == 413 and codes(response) == ["SIZE_INVALID"]


def test_pushes_to_names_that_are_not_hosted_are_denied(client: FlaskClient) -> None:
    response = client.post("/v2/library/nginx/blobs/uploads/")
    assert response.status_code == 403 and codes(response) == ["DENIED"]
    assert "team/*" in json.loads(response.data)["errors"][0]["message"]
    bad = client.post("/v2/Team/App/blobs/uploads/")
    assert bad.status_code == 400 and codes(bad) == ["NAME_INVALID"]


def test_a_hosted_name_is_never_proxied(client: FlaskClient) -> None:
    response = client.get("/v2/team/absent/manifests/latest")
    assert response.status_code == 404 and codes(response) == ["MANIFEST_UNKNOWN"]


def test_tags_catalog_and_pagination(client: FlaskClient) -> None:
    for tag in ("b", "a", "c"):
        push_image(client, "team/app", tag)
    push_image(client, "apps/x/y", "1")
    tags = json.loads(client.get("/v2/team/app/tags/list").data)
    assert tags == {"name": "team/app", "tags": ["a", "b", "c"]}
    first = client.get("/v2/team/app/tags/list?n=2")
    assert json.loads(first.data)["tags"] == ["a", "b"]
    assert first.headers["Link"] == '</v2/team/app/tags/list?n=2&last=b>; rel="next"'
    rest = client.get("/v2/team/app/tags/list?n=2&last=b")
    assert json.loads(rest.data)["tags"] == ["c"] and "Link" not in rest.headers
    catalog = json.loads(client.get("/v2/_catalog").data)
    assert catalog == {"repositories": ["apps/x/y", "team/app"]}
    assert client.get("/v2/team/none/tags/list").status_code == 404


def test_referrers_and_subject(client: FlaskClient) -> None:
    subject = push_image(client, "team/app", "1.0")
    push_blob(client, "team/app", b"{}")
    push_blob(client, "team/app", b"sbom")
    artifact = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": digest(b"{}"), "size": 2},
            "layers": [{"mediaType": "application/spdx+json", "digest": digest(b"sbom"),
                        "size": 4}],
            "subject": {"mediaType": MANIFEST_TYPE, "digest": digest(subject),
                        "size": len(subject)},
        }
    ).encode()
    pushed = client.put(
        f"/v2/team/app/manifests/{digest(artifact)}", data=artifact,
        headers={"Content-Type": MANIFEST_TYPE},
    )
    assert pushed.status_code == 201 and pushed.headers["OCI-Subject"] == digest(subject)
    listed = json.loads(client.get(f"/v2/team/app/referrers/{digest(subject)}").data)
    assert [m["digest"] for m in listed["manifests"]] == [digest(artifact)]
    assert listed["manifests"][0]["artifactType"] == "application/spdx+json"
    filtered = client.get(
        f"/v2/team/app/referrers/{digest(subject)}?artifactType=application/other"
    )
    assert json.loads(filtered.data)["manifests"] == []
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"


def test_deletes(client: FlaskClient) -> None:
    body = push_image(client, "team/app", "1.0")
    client.put("/v2/team/app/manifests/2.0", data=body, headers={"Content-Type": MANIFEST_TYPE})
    assert client.delete("/v2/team/app/manifests/2.0").status_code == 202
    assert client.get("/v2/team/app/manifests/2.0").status_code == 404
    assert client.get("/v2/team/app/manifests/1.0").status_code == 200
    assert client.delete(f"/v2/team/app/manifests/{digest(body)}").status_code == 202
    assert client.get(f"/v2/team/app/manifests/{digest(body)}").status_code == 404
    assert client.get("/v2/team/app/manifests/1.0").status_code == 404
    layer = digest(b"layer-x")
    assert client.delete(f"/v2/team/app/blobs/{layer}").status_code == 202
    assert client.head(f"/v2/team/app/blobs/{layer}").status_code == 404


def test_the_tar_routes_read_hosted_repositories_from_the_store(client: FlaskClient) -> None:
    import gzip
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    layer_tar = buffer.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
        }
    ).encode()
    push_blob(client, "team/app", config)
    push_blob(client, "team/app", layer)
    body = manifest_for(config, [layer])
    client.put("/v2/team/app/manifests/1.0", data=body, headers={"Content-Type": MANIFEST_TYPE})
    for url in ("/docker/team__app_1.0.tar", "/ref/team/app:1.0.tar"):
        response = client.get(url)
        assert response.status_code == 200, response.data
        with tarfile.open(fileobj=io.BytesIO(response.data)) as archive:
            manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
            assert manifest[0]["RepoTags"] == ["localhost/team/app:1.0"]
            layer_name = manifest[0]["Layers"][0]
            assert archive.extractfile(layer_name).read() == layer_tar  # type: ignore[union-attr]
    missing = client.get("/docker/team__absent_1.0.tar")
    assert missing.status_code == 404


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in metric for k, v in labels.items()):
            if metric.split("{")[0] == name:
                return float(value)
    return 0.0


def test_pushes_are_counted(client: FlaskClient) -> None:
    before = client.get("/metrics").data.decode()
    push_image(client, "team/app", "m", marker=b"metrics")
    client.post(f"/v2/team/app/blobs/uploads/?digest={digest(b'no')}", data=b"yes")
    after = client.get("/metrics").data.decode()

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("passthrough_uploads_total", outcome="committed") == 2
    assert delta("passthrough_uploads_total", outcome="failed") == 1
    assert delta("passthrough_push_bytes_total") >= len(b'{"marker": "metrics"}') + 3
    assert delta("passthrough_v2_errors_total", code="DIGEST_INVALID") == 1
    assert delta("passthrough_v2_requests_total", operation="manifest_push") == 1


def test_reading_an_invalid_tag_of_a_hosted_name_is_a_404(client: FlaskClient) -> None:
    # The conformance suite's "nonexistent manifest" is ".INVALID_MANIFEST_NAME".
    for method in ("GET", "HEAD"):
        response = client.open("/v2/team/app/manifests/.INVALID_MANIFEST_NAME", method=method)
        assert response.status_code == 404
    assert codes(client.get("/v2/team/app/manifests/.bad")) == ["MANIFEST_UNKNOWN"]
    # A push with such a tag is still the spec's TAG_INVALID.
    pushed = client.put("/v2/team/app/manifests/.bad", data=b"{}")
    assert pushed.status_code == 400 and codes(pushed) == ["TAG_INVALID"]
