"""A private Docker engine (containerd + dockerd) for loading and running test images.

Runs Debian's /usr/sbin/dockerd with the vfs driver, no bridge, no iptables, on
a unix socket in its own temp directory, against a containerd started here with
its own root/state/socket, so it never touches (or picks up) a system
dockerd/containerd. Both are stopped by pid (SIGTERM, wait, SIGKILL), also at
interpreter exit, and everything under the temp directory is unmounted and
removed.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar

__all__ = ["CONTAINERD", "CTR", "DOCKERD", "DOCKER_CLI", "RUNC", "DockerEngine",
           "DockerEngineError"]

DOCKERD = "/usr/sbin/dockerd"
CONTAINERD = "/usr/bin/containerd"
# /usr/local/bin/docker is a newer client earlier on PATH; the rig pins the
# Debian client that matches the 20.10 daemon.
DOCKER_CLI = "/usr/bin/docker"
# containerd's own client, from the same docker.io package; it talks to our containerd.
CTR = "/usr/bin/ctr"
# The OCI runtime, named by path for dockerd here and for podman in loaders.py, never
# left to a lookup: Debian's podman depends on "crun | runc" and prefers crun when apt
# picked it, and crun refuses this rig's hosts, which mount cgroups in hybrid mode (v1
# controllers + an empty v2 tree): "crun: cgroups in hybrid mode not supported, drop
# all controllers from cgroupv2". runc runs there and is always installed (docker.io
# depends on it).
RUNC = "/usr/bin/runc"
# dockerd reserves the name "runc" for its PATH lookup; ours is this path.
_RUNTIME_NAME = "pt-runc"


class DockerEngineError(RuntimeError):
    pass


class _Proc:
    """One child process with its log file, stopped by pid."""

    _live: ClassVar[set[_Proc]] = set()

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self._log_file: IO[bytes] = log.open("ab")
        # Own session: a Ctrl-C to pytest's group must not kill the daemon before
        # the fixture has removed its containers.
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        self.pid = self.popen.pid
        _Proc._live.add(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        _Proc._live.discard(self)
        self._log_file.close()
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@atexit.register
def _stop_all() -> None:
    for proc in sorted(_Proc._live, key=lambda p: -p.pid):
        proc.stop(timeout=10)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _shim_pids(containerd_sock: Path) -> list[int]:
    """containerd shims serving our containerd; they outlive it when reparented."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and str(containerd_sock).encode() in argv:
            pids.append(int(entry.name))
    return pids


class DockerEngine:
    """dockerd + containerd of our own. Use as a context manager or start()/stop().

    `host` is the DOCKER_HOST value (unix://...); `env` is an environment for the
    docker CLI; `docker(...)` runs /usr/bin/docker against this engine.
    """

    def __init__(self, base_dir: Path | None = None, *, start_timeout: float = 60.0,
                 registry_mirrors: Sequence[str] = ()) -> None:
        # Short path: unix socket paths (plus containerd's ".ttrpc" suffix) must
        # stay under 108 bytes, which pytest's tmp_path can exceed.
        self.base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="pt-dockerd-"))
        self.start_timeout = start_timeout
        # dockerd reads its mirrors only at start; they apply to docker.io names alone
        # (`docker pull acc/plain:1.0`), so other tests' pulls never meet them.
        self.registry_mirrors = tuple(registry_mirrors)
        self.containerd_sock = self.base / "ctd" / "containerd.sock"
        self.socket = self.base / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.data_root = self.base / "data"
        self.exec_root = self.base / "exec"
        self.client_config = self.base / "client"
        self.startup_seconds: float | None = None
        self._containerd: _Proc | None = None
        self._dockerd: _Proc | None = None

    # -- public ----------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DOCKER_HOST"] = self.host
        # An empty client config: never the user's credential helpers or contexts.
        env["DOCKER_CONFIG"] = str(self.client_config)
        env.pop("DOCKER_CONTEXT", None)
        env.pop("DOCKER_TLS_VERIFY", None)
        return env

    @property
    def dockerd_argv(self) -> list[str]:
        return [
            DOCKERD,
            f"--containerd={self.containerd_sock}",
            f"--config-file={self.base / 'daemon.json'}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
            "--shutdown-timeout=5",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.base / 'docker.pid'}",
            f"--host={self.host}",
            f"--add-runtime={_RUNTIME_NAME}={RUNC}",
            f"--default-runtime={_RUNTIME_NAME}",
            *(f"--registry-mirror={url}" for url in self.registry_mirrors),
        ]

    def start(self) -> DockerEngine:
        for tool in (DOCKERD, CONTAINERD, DOCKER_CLI, RUNC):
            if not os.access(tool, os.X_OK):
                raise DockerEngineError(f"{tool} is missing (apt-get install docker.io)")
        began = time.monotonic()
        # stop() is idempotent; at exit it also removes containers and the data root.
        atexit.register(self.stop)
        for d in (self.base / "ctd", self.data_root, self.exec_root, self.client_config):
            d.mkdir(parents=True, exist_ok=True)
        (self.client_config / "config.json").write_text("{}")
        # An explicit (empty) daemon.json: never /etc/docker/daemon.json.
        (self.base / "daemon.json").write_text("{}")
        ctd_config = self.base / "ctd" / "config.toml"
        ctd_config.write_text(self._containerd_toml())
        try:
            self._containerd = _Proc([CONTAINERD, "--config", str(ctd_config)],
                                     self.base / "containerd.log")
            self._wait(lambda: self.containerd_sock.is_socket(), self._containerd,
                       "containerd socket")
            self._dockerd = _Proc(self.dockerd_argv, self.base / "dockerd.log")
            self._wait(self._answers, self._dockerd, "docker info")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def docker(self, *args: str, check: bool = True, timeout: float = 300.0,
               input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([DOCKER_CLI, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, input=None if input is None
                              else input.decode())
        if check and proc.returncode != 0:
            raise DockerEngineError(
                f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def ctr(self, namespace: str, *args: str, check: bool = True, timeout: float = 300.0
            ) -> subprocess.CompletedProcess[str]:
        """`ctr --address <our containerd> -n <namespace> ...`; dockerd's own namespace is
        "moby", so tests use namespaces of their own."""
        if not os.access(CTR, os.X_OK):
            raise DockerEngineError(f"{CTR} is missing (apt-get install docker.io)")
        env = dict(os.environ)
        # A proxy from the environment would swallow the loopback registries.
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                     "all_proxy"):
            env.pop(name, None)
        proc = subprocess.run([CTR, "--address", str(self.containerd_sock), "-n", namespace,
                               *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise DockerEngineError(
                f"ctr -n {namespace} {' '.join(args)} exited {proc.returncode}: "
                f"{proc.stderr.strip()}\n{proc.stdout.strip()[-2000:]}")
        return proc

    def info(self) -> dict[str, object]:
        return dict(json.loads(self.docker("info", "--format", "{{json .}}").stdout))

    def stop(self) -> None:
        """Remove containers, stop dockerd then containerd by pid, unmount, delete."""
        if self._dockerd is not None:
            if self._dockerd.alive():
                # Kill containers first: dockerd would otherwise wait out each
                # container's stop timeout on SIGTERM.
                try:
                    ids = self.docker("ps", "-aq", timeout=30).stdout.split()
                    if ids:
                        self.docker("rm", "-f", *ids, timeout=60, check=False)
                except (DockerEngineError, subprocess.TimeoutExpired):
                    pass
            self._dockerd.stop(timeout=30)
            self._dockerd = None
        if self._containerd is not None:
            self._containerd.stop(timeout=20)
            self._containerd = None
        for pid in _shim_pids(self.containerd_sock):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._cleanup()

    def __enter__(self) -> DockerEngine:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def logs(self, lines: int = 50) -> str:
        parts = []
        for name in ("containerd.log", "dockerd.log"):
            path = self.base / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(parts)

    # -- private ---------------------------------------------------------------

    def _containerd_toml(self) -> str:
        ctd = self.base / "ctd"
        return "\n".join([
            "version = 2",
            f'root = "{ctd / "root"}"',
            f'state = "{ctd / "state"}"',
            # The CRI plugin is for kubelets; it would also try to set up CNI.
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.containerd_sock}"',
            "[ttrpc]",
            '  address = ""',
            "[debug]",
            '  address = ""',
            "[metrics]",
            '  address = ""',
            # Default is /opt/containerd: keep even that inside our directory.
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{ctd / "opt"}"',
            "",
        ])

    def _answers(self) -> bool:
        try:
            proc = subprocess.run([DOCKER_CLI, "info", "--format", "{{.ServerVersion}}"],
                                  env=self.env, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def _wait(self, ready: Callable[[], bool], proc: _Proc, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not proc.alive():
                raise DockerEngineError(
                    f"{proc.argv[0]} exited {proc.popen.returncode} before {what}:\n"
                    f"{proc.tail()}")
            time.sleep(0.05)
        raise DockerEngineError(f"no {what} after {self.start_timeout}s:\n{proc.tail()}")

    def _cleanup(self) -> None:
        if not self.base.exists():
            return
        for point in _mounts_under(self.base):
            # Lazy: a mount still busy (netns, shm) must not block deletion.
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        left = _mounts_under(self.base)
        if left:
            raise DockerEngineError(f"still mounted, not deleting {self.base}: {left}")
        shutil.rmtree(self.base, ignore_errors=True)
