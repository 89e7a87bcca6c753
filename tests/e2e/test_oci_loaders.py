"""The ``?format=oci`` archive in the loaders besides docker: podman (which also runs
it) and containerd (``ctr images import`` into the rig's own containerd)."""

from __future__ import annotations

import subprocess

import requests

from tests.support.docker_engine import DockerEngine
from tests.support.images import push_image, runnable_image
from tests.support.loaders import podman_load
from tests.support.registry import RegistryServer


def test_oci_archive_loads_in_podman_and_containerd(
    registry_anon: RegistryServer, passthrough_server, docker_engine: DockerEngine, tmp_path
):
    image = runnable_image("MARKER-oci-loaders", kind="oci", extras=("duplicate", "links"))
    push_image(registry_anon.url, "oci/loaders", "v1", image)
    server = passthrough_server({"REGISTRY_URL": registry_anon.url})
    response = requests.get(f"{server.url}/docker/oci__loaders_v1.tar?format=oci", timeout=60)
    assert response.status_code == 200
    archive = tmp_path / "oci.tar"
    archive.write_bytes(response.content)

    loaded = podman_load(archive, run_marker="MARKER-oci-loaders")
    assert any("oci/loaders:v1" in name for name in loaded.names), loaded.names
    assert loaded.layers == image.diff_ids

    name = f"{registry_anon.host}/oci/loaders:v1"
    ctr = ["ctr", "--address", str(docker_engine.containerd_sock), "--namespace", "pt-oci"]
    imported = subprocess.run(
        [*ctr, "images", "import", "--no-unpack", str(archive)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    listed = subprocess.run(
        [*ctr, "images", "ls", "-q"], capture_output=True, text=True, timeout=60, check=True
    )
    assert name in listed.stdout.split(), listed.stdout
    subprocess.run([*ctr, "images", "rm", name], capture_output=True, timeout=60, check=False)
