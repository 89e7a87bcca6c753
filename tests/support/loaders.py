"""Real image loaders that consume an archive the way users do.

docker (load + run against a DockerEngine's socket), podman (load into a
throw-away vfs store), and skopeo (inspect docker-archive:/oci-archive:, copy
from a registry into an archive). Each call fails loudly if its tool is
missing; nothing is mocked.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.support.docker_engine import DOCKER_CLI, RUNC

__all__ = [
    "PODMAN",
    "SKOPEO",
    "DockerRun",
    "LoaderError",
    "PodmanLoad",
    "docker_load",
    "docker_load_and_run",
    "docker_rmi",
    "familiar",
    "podman_load",
    "podman_pull",
    "podman_run",
    "podman_store",
    "skopeo",
    "skopeo_copy",
    "skopeo_copy_to_archive",
    "skopeo_inspect_archive",
    "skopeo_inspect_oci_archive",
]

PODMAN = "/usr/bin/podman"
SKOPEO = "/usr/bin/skopeo"


class LoaderError(RuntimeError):
    pass


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600.0,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    if not os.access(argv[0], os.X_OK):
        raise LoaderError(f"{argv[0]} is missing")
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LoaderError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                          f"{proc.stderr.strip()}\n{proc.stdout.strip()[-2000:]}")
    return proc


_scratch: Path | None = None
# Tests run loaders from several threads at once (concurrent pulls): one makes the dir.
_scratch_lock = threading.Lock()


def _scratch_dir() -> Path:
    """Per-process temp dir for the skopeo policy and an empty docker client config."""
    global _scratch
    with _scratch_lock:
        if _scratch is None:
            scratch = Path(tempfile.mkdtemp(prefix="pt-loaders-"))
            atexit.register(shutil.rmtree, scratch, True)
            (scratch / "policy.json").write_text(
                json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
            (scratch / "docker").mkdir()
            (scratch / "docker" / "config.json").write_text("{}")
            _scratch = scratch
        return _scratch


def familiar(ref: str) -> str:
    """Docker's short form of a reference: docker.io/library/x:t -> x:t."""
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/",
                   "index.docker.io/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


def _loaded(output: str) -> list[str]:
    """Names from "Loaded image: a" / "Loaded image ID: sha256:.." / "Loaded image(s): a,b"."""
    found: list[str] = []
    for line in output.splitlines():
        if line.startswith("Loaded image"):
            _, _, rest = line.partition(": ")
            found += [part.strip() for part in rest.split(",") if part.strip()]
    return found


# --- docker ------------------------------------------------------------------


@dataclass
class DockerRun:
    loaded: list[str]
    image_id: str
    repo_tags: list[str]
    layers: list[str]
    output: str
    inspect: dict[str, Any] = field(repr=False, default_factory=dict)


def _docker_env(docker_host: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_HOST"] = docker_host
    env["DOCKER_CONFIG"] = str(_scratch_dir() / "docker")
    env.pop("DOCKER_CONTEXT", None)
    return env


def _docker(docker_host: str, *args: str, timeout: float = 600.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([DOCKER_CLI, *args], env=_docker_env(docker_host), timeout=timeout, check=check)


def docker_load(docker_host: str, archive: Path | str) -> list[str]:
    """`docker load -i`; returns what it printed as loaded (refs, or sha256: IDs)."""
    proc = _docker(docker_host, "load", "-i", str(archive))
    loaded = _loaded(proc.stdout)
    if not loaded:
        raise LoaderError(f"docker load printed no image: {proc.stdout!r} {proc.stderr!r}")
    return loaded


def docker_rmi(docker_host: str, *refs: str) -> None:
    if refs:
        _docker(docker_host, "rmi", "-f", *refs, check=False)


def docker_load_and_run(
    docker_host: str,
    archive: Path | str,
    expected_repo_tag: str | None = None,
    *,
    marker: str,
    remove: bool = True,
    run_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> DockerRun:
    """Load the archive, check its RepoTags, `docker run --rm --network none` it.

    The marker must be a whole line of the container's stdout. The image is
    removed afterwards (remove=False keeps it) so tests do not see each other's.
    """
    loaded = docker_load(docker_host, archive)
    inspects = json.loads(_docker(docker_host, "image", "inspect", *loaded).stdout)
    by_id: dict[str, dict[str, Any]] = {i["Id"]: i for i in inspects}
    try:
        if expected_repo_tag is not None:
            want = familiar(expected_repo_tag)
            matching = [i for i in by_id.values()
                        if want in [familiar(t) for t in i.get("RepoTags") or []]]
            if not matching:
                tags = [i.get("RepoTags") for i in by_id.values()]
                raise LoaderError(f"loaded {loaded}, RepoTags {tags}; none is {want!r}")
            image = matching[0]
        else:
            if len(by_id) != 1:
                raise LoaderError(f"archive held {len(by_id)} images ({loaded}); "
                                  "pass expected_repo_tag")
            image = next(iter(by_id.values()))
        proc = _docker(docker_host, "run", "--rm", "--network", "none", *run_args, image["Id"],
                       timeout=timeout, check=False)
        output = proc.stdout
        if proc.returncode != 0 or marker not in output.splitlines():
            raise LoaderError(f"docker run {image['Id']} exited {proc.returncode} without the "
                              f"marker line {marker!r}:\nstdout: {output!r}\n"
                              f"stderr: {proc.stderr!r}")
        return DockerRun(loaded=loaded, image_id=image["Id"],
                         repo_tags=list(image.get("RepoTags") or []),
                         layers=list(image["RootFS"]["Layers"]), output=output, inspect=image)
    finally:
        if remove:
            docker_rmi(docker_host, *by_id)


# --- podman ------------------------------------------------------------------


@dataclass
class PodmanLoad:
    names: list[str]
    image_id: str
    layers: list[str]
    inspect: dict[str, Any] = field(repr=False, default_factory=dict)


@contextlib.contextmanager
def _podman_store() -> Iterator[tuple[list[str], dict[str, str]]]:
    """A throw-away podman (argv prefix, environment): vfs storage, runc, no system
    configuration; every image in it removed and the directory deleted afterwards."""
    store = Path(tempfile.mkdtemp(prefix="pt-podman-"))
    root, runroot, tmp = store / "root", store / "run", store / "tmp"
    for d in (root, runroot, tmp):
        d.mkdir()
    conf = store / "storage.conf"
    # Our own storage.conf so /etc/containers/storage.conf (overlay options,
    # other graphroots) cannot leak in; podman still takes the flags below.
    conf.write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root}"\nrunroot = "{runroot}"\n')
    # No short-name search, mirrors or blocked registries from /etc/containers, and no
    # credentials from root's auth.json: pulls name their registry and go anonymously.
    registries = store / "registries.conf"
    registries.write_text("unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n")
    auth = store / "auth.json"
    auth.write_text("{}")
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        env.pop(name, None)
    env.update(CONTAINERS_STORAGE_CONF=str(conf), CONTAINERS_REGISTRIES_CONF=str(registries),
               REGISTRY_AUTH_FILE=str(auth), TMPDIR=str(tmp))
    # --runtime: podman's default is crun whenever apt installed crun, and crun fails
    # on hybrid-cgroup hosts; see RUNC in docker_engine.py.
    base = [PODMAN, "--root", str(root), "--runroot", str(runroot), "--tmpdir", str(tmp),
            "--runtime", RUNC, "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--log-level", "error"]
    try:
        yield base, env
    finally:
        _run([*base, "rmi", "-a", "-f"], env=env, check=False, timeout=120)
        shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def podman_store() -> Iterator[tuple[list[str], dict[str, str]]]:
    """The throw-away podman of podman_load and podman_pull, for a test that drives podman
    itself (tag, push): yields (argv prefix, environment); run commands with
    `podman_run`. Everything in it is removed afterwards."""
    with _podman_store() as found:
        yield found


def podman_run(argv: Sequence[str], env: dict[str, str], *, check: bool = True,
               timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """One command of a podman_store's podman (argv includes its prefix)."""
    return _run(argv, env=env, check=check, timeout=timeout)


def _podman_inspect_and_run(base: list[str], env: dict[str, str], names: list[str],
                            run_marker: str | None) -> PodmanLoad:
    inspect = json.loads(_run([*base, "image", "inspect", names[0]], env=env).stdout)[0]
    if run_marker is not None:
        # podman asks runc for RLIMIT_NOFILE 1048576 / NPROC 32768 (even with
        # --ulimit host); this sandbox lacks CAP_SYS_RESOURCE and refuses
        # that, so ask for limits that are always below the current ones.
        run = _run([*base, "run", "--rm", "--network", "none", "--ulimit",
                    "nofile=1024:1024", "--ulimit", "nproc=1024:1024", inspect["Id"]],
                   env=env, check=False, timeout=300)
        if run.returncode != 0 or run_marker not in run.stdout.splitlines():
            raise LoaderError(f"podman run exited {run.returncode} without "
                              f"{run_marker!r}: {run.stdout!r} {run.stderr!r}")
    return PodmanLoad(names=names, image_id=inspect["Id"],
                      layers=list(inspect["RootFS"]["Layers"]), inspect=inspect)


def podman_load(archive: Path | str, *, run_marker: str | None = None) -> PodmanLoad:
    """`podman load` into a fresh vfs store (deleted after); inspect the first image.

    names are the references podman printed (an untagged image gives its ID);
    layers are RootFS.Layers of the loaded image. With run_marker, the image is
    also run (`podman run --rm --network none`) and must print that line.
    """
    with _podman_store() as (base, env):
        proc = _run([*base, "load", "-i", str(archive)], env=env)
        names = _loaded(proc.stdout)
        if not names:
            raise LoaderError(f"podman load printed no image: {proc.stdout!r} {proc.stderr!r}")
        return _podman_inspect_and_run(base, env, names, run_marker)


def podman_pull(ref: str, *, tls_verify: bool = False, run_marker: str | None = None,
                platform: str | None = None) -> PodmanLoad:
    """`podman pull <ref>` (a fully qualified registry reference, anonymously) into a
    fresh vfs store (deleted after), then inspect it and, with run_marker, run it as
    podman_load does. names is [ref]; platform is podman's --platform (os/arch)."""
    with _podman_store() as (base, env):
        args = [*base, "pull", "--quiet", f"--tls-verify={'true' if tls_verify else 'false'}"]
        if platform is not None:
            args += ["--platform", platform]
        _run([*args, ref], env=env)
        return _podman_inspect_and_run(base, env, [ref], run_marker)


# --- skopeo ------------------------------------------------------------------


def skopeo(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run skopeo with a temp insecureAcceptAnything policy (no /etc policy needed)."""
    return _run([SKOPEO, "--policy", str(_scratch_dir() / "policy.json"), *args],
                timeout=timeout)


def skopeo_inspect_archive(
    archive: Path | str,
    *,
    transport: Literal["docker-archive", "oci-archive"] = "docker-archive",
    raw: bool = False,
    config: bool = False,
) -> dict[str, Any]:
    """`skopeo inspect [--raw|--config] docker-archive:<path>` as a dict."""
    flags = (["--raw"] if raw else []) + (["--config"] if config else [])
    proc = skopeo("inspect", *flags, f"{transport}:{archive}")
    return dict(json.loads(proc.stdout))


def skopeo_inspect_oci_archive(archive: Path | str, *, raw: bool = False,
                               config: bool = False) -> dict[str, Any]:
    return skopeo_inspect_archive(archive, transport="oci-archive", raw=raw, config=config)


def skopeo_copy(src: str, dest: str, *, src_tls_verify: bool = False,
                src_creds: tuple[str, str] | str | None = None,
                src_cert_dir: Path | str | None = None,
                platform: tuple[str, str, str | None] | None = None,
                extra_args: Sequence[str] = ()) -> None:
    """`skopeo copy` between any two transports (src credentials only)."""
    # Platform choice is a global flag, so it goes before the subcommand.
    pre: list[str] = []
    if platform is not None:
        os_, arch, variant = platform
        pre = ["--override-os", os_, "--override-arch", arch]
        if variant:
            pre += ["--override-variant", variant]
    args = ["copy", "--quiet"]
    if src.startswith("docker://"):
        args.append(f"--src-tls-verify={'true' if src_tls_verify else 'false'}")
        if src_creds is None:
            # Anonymous on purpose: never root's auth.json.
            args.append("--src-no-creds")
        else:
            creds = src_creds if isinstance(src_creds, str) else ":".join(src_creds)
            args += ["--src-creds", creds]
        if src_cert_dir is not None:
            args += ["--src-cert-dir", str(src_cert_dir)]
    skopeo(*pre, *args, *extra_args, src, dest)


def skopeo_copy_to_archive(
    src_docker_ref: str,
    dest_path: Path | str,
    tls_verify: bool = False,
    creds: tuple[str, str] | str | None = None,
    *,
    archive_ref: str | None = None,
    fmt: Literal["docker-archive", "oci-archive"] = "docker-archive",
    platform: tuple[str, str, str | None] | None = None,
    cert_dir: Path | str | None = None,
    via_dir: bool = False,
) -> Path:
    """`skopeo copy docker://<ref> docker-archive:<path>:<ref>`; returns the path.

    The archive is tagged with archive_ref, by default the source reference when it
    has a tag (a digest reference gives an untagged archive).

    skopeo 1.9 refuses OCI images with zstd layers straight into docker-archive
    ("zstd compression is not supported for docker images"); via_dir=True goes
    docker:// -> dir: (--dest-decompress) -> docker-archive: instead.
    """
    ref = src_docker_ref.removeprefix("docker://")
    if archive_ref is None and "@" not in ref:
        archive_ref = ref
    dest_path = Path(dest_path)
    # docker-archive refuses to add to an existing file.
    dest_path.unlink(missing_ok=True)
    dest = f"{fmt}:{dest_path}"
    if archive_ref:
        dest += f":{archive_ref}"
    if not via_dir:
        skopeo_copy(f"docker://{ref}", dest, src_tls_verify=tls_verify, src_creds=creds,
                    src_cert_dir=cert_dir, platform=platform)
        return dest_path
    staging = Path(tempfile.mkdtemp(prefix="pt-skopeo-dir-"))
    try:
        skopeo_copy(f"docker://{ref}", f"dir:{staging}", src_tls_verify=tls_verify,
                    src_creds=creds, src_cert_dir=cert_dir, platform=platform,
                    extra_args=["--dest-decompress"])
        skopeo_copy(f"dir:{staging}", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest_path
