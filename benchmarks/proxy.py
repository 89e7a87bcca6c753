"""Benchmark the /v2 pull-through proxy beside the peer a user would pick, the CNCF
registry in proxy mode (Debian's docker-registry with `proxy: remoteurl:`), in one run,
on the benchmark image: cold and warm pulls against a pull straight from the upstream,
upstream GETs per blob under eight concurrent cold pulls, and the peak RSS of a server
process while a 750 MB blob goes through. Prints a table and writes the figures as JSON
under benchmarks/out/. See docs/benchmarks.md, "The /v2 proxy".

    .venv/bin/python -m benchmarks.proxy [--repeat 5] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/proxy.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.counter import CountingFront
from benchmarks.image import load_or_build
from benchmarks.measure import (
    BenchmarkError,
    MemoryWatch,
    Timed,
    Transfer,
    cpu_seconds,
    download,
    machine_line,
    median,
    run_timed,
    tree,
    wait_for_workers,
)
from benchmarks.run import MB, OUT, Bench, add_common_arguments, code_version, log, machine
from tests.support.registry import (
    MEDIA_OCI_MANIFEST,
    RegistryServer,
    push_blob,
    push_manifest,
    registry_session,
)
from tests.support.server import PassthroughServer

REPOSITORY = "bench/image"
TAG = "latest"
BIG_REPOSITORY = "bench/big"
BIG_BYTES = 750 * MB
QUICK_BIG_BYTES = 64 * MB
QUICK_DIRS = ("/usr/lib/python3.11",)
CONCURRENCY = 8
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

PROXIES = ("cncf", "passthrough")


@dataclass(frozen=True)
class Goal:
    name: str
    value: float
    limit: float
    at_most: bool
    unit: str = "x"
    strict: bool = False

    @property
    def met(self) -> bool:
        if self.at_most:
            return self.value < self.limit if self.strict else self.value <= self.limit
        return self.value > self.limit if self.strict else self.value >= self.limit

    def show(self, number: float) -> str:
        if self.unit == "MB":
            return f"{number / MB:.0f} MB"
        if self.unit == "count":
            return f"{number:.0f}"
        return f"{number:.3f}"

    def bound(self) -> str:
        sign = ("<" if self.strict else "<=") if self.at_most else (">" if self.strict else ">=")
        return f"{sign} {self.show(self.limit)}"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Served:
    """A running proxy: its kind, host:port, the pids whose CPU and memory count, and
    its store (CNCF: storage root; passthrough: CACHE_DIR)."""

    kind: str
    host: str
    pids: list[int]
    store: Path


class CNCFProxy(RegistryServer):
    """The peer: docker-registry in proxy mode (`proxy.remoteurl`), anonymous, with its
    filesystem storage at `storage` (beside passthrough's CACHE_DIR, on the same disk)."""

    def __init__(self, remote_url: str, storage: Path) -> None:
        super().__init__("anonymous")
        self.remote_url = remote_url
        self.storage_dir = storage
        storage.mkdir(parents=True, exist_ok=True)

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["storage"]["filesystem"]["rootdirectory"] = str(self.storage_dir)
        config["proxy"] = {"remoteurl": self.remote_url}
        return config


class ProxyBench:
    """One session: the upstream registry with the images, the counting front before
    it, and the measurements."""

    def __init__(self, args: argparse.Namespace, bench: Bench, front: CountingFront) -> None:
        self.args = args
        self.bench = bench
        self.front = front
        self.work: Path = bench.work
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.notes = bench.notes
        image = bench.image
        config = image.layout / "blobs" / "sha256" / image.config_digest.split(":", 1)[1]
        #: Every blob of the image, the config last.
        self.blobs = [Blob(layer.digest, layer.size) for layer in image.layers]
        self.blobs.append(Blob(image.config_digest, config.stat().st_size))
        self.big: list[Blob] = []
        self._serial = 0
        self._serial_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def record(self, kind: str, **values: Any) -> dict[str, Any]:
        self.runs.setdefault(kind, []).append(values)
        return values

    def fresh_dir(self, prefix: str) -> Path:
        with self._serial_lock:
            self._serial += 1
            serial = self._serial
        path = self.work / f"{prefix}-{serial}"
        path.mkdir()
        return path

    def pull(self, host: str, repository: str, blobs: Sequence[Blob]) -> Timed:
        """`skopeo copy docker://host/repository:latest dir:<tmp>`, the same command for
        every kind; the layer files are checked (skopeo has verified their digests) and
        the copy is deleted."""
        dest = self.fresh_dir("pull")
        try:
            timed = run_timed(
                self.bench.skopeo(
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    "--src-no-creds",
                    f"docker://{host}/{repository}:{TAG}",
                    f"dir:{dest}",
                )
            )
            for blob in blobs:
                path = dest / blob.digest.split(":", 1)[1]
                if not path.is_file() or path.stat().st_size != blob.size:
                    raise BenchmarkError(f"pull from {host}: {blob.digest} missing or short")
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return timed

    def upstream_counts(self, blobs: Sequence[Blob]) -> dict[str, Any]:
        """What the upstream was asked since the last reset, for `blobs`."""
        gets = self.front.blob_requests("GET")
        heads = self.front.blob_requests("HEAD")
        manifests = sum(
            count for (_, path), count in self.front.counts.items() if "/manifests/" in path
        )
        per_blob = [gets.get(blob.digest, 0) for blob in blobs]
        return {
            "blob_gets": per_blob,
            "blob_gets_max": max(per_blob),
            "blob_gets_total": sum(gets.values()),
            "blob_heads_total": sum(heads.values()),
            "manifest_requests": manifests,
        }

    @contextmanager
    def server(self, kind: str) -> Iterator[Served]:
        """A fresh `kind` proxy on an empty store."""
        store = self.fresh_dir(f"{kind}-store")
        try:
            if kind == "cncf":
                with CNCFProxy(self.front.url, store) as peer:
                    yield Served(kind, peer.host, [peer.pid], store)
            else:
                server = self.passthrough(store)
                try:
                    yield Served(kind, f"127.0.0.1:{server.port}", tree(server.pid), store)
                finally:
                    server.cleanup()
        finally:
            shutil.rmtree(store, ignore_errors=True)

    def settle(self, served: Served, blobs: Sequence[Blob]) -> float:
        """Wait until the CNCF proxy has stored every blob; returns the seconds waited.

        distribution 2.8 serves a cold blob from a second upstream GET while a goroutine
        fills its storage with the first: right after a cold pull the fill may still
        run, and a "warm" pull then reads the upstream again. Its warm pull is measured
        on the finished cache. passthrough commits a blob before the last byte goes out,
        so there is nothing to wait for (the warm pulls' upstream GETs, all 0, show it).
        """
        if served.kind != "cncf":
            return 0.0
        blob_root = served.store / "docker/registry/v2/blobs/sha256"
        start = time.monotonic()
        while True:
            done = 0
            for blob in blobs:
                hexdigest = blob.digest.split(":", 1)[1]
                data = blob_root / hexdigest[:2] / hexdigest / "data"
                with contextlib.suppress(OSError):
                    done += data.stat().st_size == blob.size
            if done == len(blobs):
                return time.monotonic() - start
            if time.monotonic() - start > 120:
                raise BenchmarkError("the CNCF proxy did not store every blob within 120 s")
            time.sleep(0.05)

    def passthrough(self, cache: Path) -> PassthroughServer:
        env = {"REGISTRY_URL": self.front.url, "CACHE_DIR": str(cache)}
        env.update(self.args.server_env)
        server = PassthroughServer(
            env,
            workers=self.args.workers,
            threads=self.args.threads,
            tmp_root=self.work,
            repo_root=self.args.repo_root,
        )
        server.start()
        wait_for_workers(server.pid, self.args.workers, server.cleanup)
        return server

    def timed_pull(
        self, served: Served, phase: str, repository: str, *, beside: str | None = None
    ) -> dict[str, Any]:
        """One pull through `served` (a proxy, or the front for a direct pull), with the
        CPU time of everyone involved and the server's peak RSS."""
        blobs = self.blobs if repository == REPOSITORY else self.big
        fill_wait = self.settle(served, blobs) if phase == "warm" else 0.0
        root = served.pids[0]
        upstream = [self.bench.registry.pid]
        self.front.reset()
        with MemoryWatch(root) as memory:
            cpu0 = cpu_seconds(tree(root))
            upstream0 = cpu_seconds(upstream)
            # This process's CPU is the counting front's relay (and the memory sampler).
            own0 = time.process_time()
            timed = self.pull(served.host, repository, blobs)
            own = time.process_time() - own0
            cpu = cpu_seconds(tree(root)) - cpu0
            upstream_cpu = cpu_seconds(upstream) - upstream0
        prefix = "" if repository == REPOSITORY else "big_"
        return self.record(
            f"{prefix}{served.kind}_{phase}",
            beside=beside,
            seconds=timed.seconds,
            skopeo_cpu=timed.cpu_seconds,
            server_cpu=cpu,
            upstream_cpu=upstream_cpu,
            front_cpu=own,
            fill_wait=fill_wait,
            peak_rss=memory.peak,
            peak_rss_total=memory.peak_total,
            **self.upstream_counts(blobs),
        )

    def direct(self) -> Served:
        # Through the counting front too: every kind takes the same path to the upstream's
        # bytes, and the front checks the direct pull's GETs.
        registry = self.bench.registry
        return Served("direct", self.front.host, [registry.pid], registry.storage_dir)

    # -- the steps -----------------------------------------------------------------------

    def push_big(self, size: int) -> None:
        """A single-layer image whose layer is `size` random (incompressible) bytes,
        pushed straight to the upstream."""
        path = self.work / "big-layer"
        digest = hashlib.sha256()
        with path.open("wb") as out:
            left = size
            while left:
                chunk = os.urandom(min(4 << 20, left))
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        layer = Blob("sha256:" + digest.hexdigest(), size)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
                "config": {},
            }
        ).encode()
        with registry_session(self.bench.registry) as session:
            if push_blob(session, BIG_REPOSITORY, path) != layer.digest:
                raise BenchmarkError("the registry took the big layer under another digest")
            config_digest = push_blob(session, BIG_REPOSITORY, config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_MANIFEST,
                "config": {
                    "mediaType": MEDIA_OCI_CONFIG,
                    "digest": config_digest,
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": MEDIA_OCI_LAYER_TAR, "digest": layer.digest, "size": size}
                ],
            }
            push_manifest(session, BIG_REPOSITORY, TAG, manifest, MEDIA_OCI_MANIFEST)
        path.unlink()
        self.big = [layer, Blob(config_digest, len(config))]

    def round(self, rep: int) -> None:
        """For each proxy, on a fresh store: a pull straight from the upstream, then a
        cold and a warm pull through the proxy. The proxies take turns to go first."""
        proxies = list(self.args.proxies)
        if rep % 2:
            proxies.reverse()
        for kind in proxies:
            with self.server(kind) as served:
                # The direct pull goes right before the proxy's (the proxy idle meanwhile):
                # the paired ratios compare pulls seconds apart, on a machine whose load
                # from other work drifts from minute to minute.
                direct = self.timed_pull(self.direct(), "pull", REPOSITORY, beside=kind)
                cold = self.timed_pull(served, "cold", REPOSITORY)
                warm = self.timed_pull(served, "warm", REPOSITORY)
            log(
                f"  {kind}: direct {direct['seconds']:.2f} s, cold {cold['seconds']:.2f} s "
                f"({cold['blob_gets_max']} GET per blob at most), warm {warm['seconds']:.2f} s"
                f" ({warm['blob_gets_total']} blob GETs)"
            )

    def concurrent(self, kind: str, count: int) -> None:
        """`count` cold pulls started together on a fresh store: upstream GETs per blob.
        A pull that fails is recorded, not fatal: under this load the peer answered a
        blob GET with 500 once (in 1 of about 20 tries), and that is a finding too."""

        def one() -> Timed | str:
            try:
                return self.pull(served.host, REPOSITORY, self.blobs)
            except BenchmarkError as exc:
                return str(exc)[-300:]

        with self.server(kind) as served:
            self.front.reset()
            with MemoryWatch(served.pids[0]) as memory:
                start = time.perf_counter()
                with ThreadPoolExecutor(count) as pool:
                    outcomes = [
                        future.result() for future in [pool.submit(one) for _ in range(count)]
                    ]
                seconds = time.perf_counter() - start
        pulls = [o for o in outcomes if isinstance(o, Timed)]
        failures = [o for o in outcomes if isinstance(o, str)]
        run = self.record(
            f"{kind}_concurrent",
            pulls=count,
            failed=len(failures),
            failures=failures,
            seconds=seconds,
            pull_seconds=[p.seconds for p in pulls],
            peak_rss=memory.peak,
            peak_rss_total=memory.peak_total,
            **self.upstream_counts(self.blobs),
        )
        log(
            f"  {kind}: {count} pulls in {seconds:.2f} s, upstream GETs per blob "
            f"{run['blob_gets']} (HEADs {run['blob_heads_total']})"
            + (f"; {len(failures)} FAILED: {failures[0]}" if failures else "")
        )

    def big_blob(self, kind: str) -> None:
        """The big image pulled cold and then warm through `kind`, memory sampled."""
        with self.server(kind) as served:
            cold = self.timed_pull(served, "cold", BIG_REPOSITORY)
            warm = self.timed_pull(served, "warm", BIG_REPOSITORY)
        log(
            f"  {kind}: cold {cold['seconds']:.2f} s, peak RSS {cold['peak_rss'] / MB:.0f} MB;"
            f" warm {warm['seconds']:.2f} s, peak RSS {warm['peak_rss'] / MB:.0f} MB"
        )

    def big_direct(self) -> None:
        run = self.timed_pull(self.direct(), "pull", BIG_REPOSITORY)
        log(f"  direct: {run['seconds']:.2f} s")

    def big_get(self, served: Served, phase: str) -> dict[str, Any]:
        """The big layer alone, one GET read at full speed by the benchmarks' client (no
        skopeo): what the server itself sustains, with its peak RSS."""
        layer = self.big[0]
        if phase == "warm":
            self.settle(served, [layer])
        self.front.reset()
        url = f"http://{served.host}/v2/{BIG_REPOSITORY}/blobs/{layer.digest}"
        with MemoryWatch(served.pids[0]) as memory:
            cpu0 = cpu_seconds(tree(served.pids[0]))
            transfer = download(url)
            cpu = cpu_seconds(tree(served.pids[0])) - cpu0
        if transfer.size != layer.size:
            raise BenchmarkError(f"GET {url}: {transfer.size} of {layer.size} bytes")
        return self.record(
            f"get_{served.kind}_{phase}",
            seconds=transfer.seconds,
            ttfb=transfer.ttfb,
            throughput=transfer.throughput,
            longest_gap=transfer.longest_gap,
            server_cpu=cpu,
            peak_rss=memory.peak,
            peak_rss_total=memory.peak_total,
            **self.upstream_counts([layer]),
        )

    def big_gets(self, kind: str) -> None:
        """A cold then a warm GET of the big layer through `kind`, on a fresh store."""
        with self.server(kind) as served:
            cold = self.big_get(served, "cold")
            warm = self.big_get(served, "warm")
        log(
            f"  {kind} GET: cold {cold['throughput'] / MB:.0f} MB/s, warm "
            f"{warm['throughput'] / MB:.0f} MB/s"
        )

    def profile(self) -> dict[str, Any]:
        """One cold and one warm pull through passthrough with py-spy recording every
        server process; then, on a fresh store, one cold GET of the big layer."""
        from benchmarks.profile import profile_download

        found: dict[str, Any] = {}
        cache = self.fresh_dir("profile-store")
        server = self.passthrough(cache)
        host = f"127.0.0.1:{server.port}"

        def action() -> Transfer:
            timed = self.pull(host, REPOSITORY, self.blobs)
            size = sum(blob.size for blob in self.blobs)
            return Transfer(status=200, size=size, ttfb=0.0, seconds=timed.seconds, headers={})

        try:
            for phase in ("cold", "warm"):
                found[phase] = profile_download(
                    server.pid,
                    action,
                    self.args.results / f"proxy-profile-{phase}",
                    rate=self.args.profile_rate,
                    root=self.args.repo_root,
                )
        finally:
            server.cleanup()
            shutil.rmtree(cache, ignore_errors=True)
        cache = self.fresh_dir("profile-store")
        server = self.passthrough(cache)
        url = f"http://127.0.0.1:{server.port}/v2/{BIG_REPOSITORY}/blobs/{self.big[0].digest}"
        try:
            found["big_get_cold"] = profile_download(
                server.pid,
                functools.partial(download, url),
                self.args.results / "proxy-profile-big-get-cold",
                rate=self.args.profile_rate,
                root=self.args.repo_root,
            )
        finally:
            server.cleanup()
            shutil.rmtree(cache, ignore_errors=True)
        return found


# --- the report ---------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def m(kind: str, key: str = "seconds") -> float:
        return median([run[key] for run in runs.get(kind, [])])

    def peak(*kinds: str, key: str = "peak_rss") -> float:
        return float(
            max((run[key] for k in kinds for run in runs.get(k, [])), default=float("nan"))
        )

    def paired(top: str, bottom: str) -> float:
        tops, bottoms = runs.get(top, []), runs.get(bottom, [])
        if bottom == "direct_pull":
            # The direct pull taken just before this proxy's pulls, in the same round.
            beside = top.split("_", 1)[0]
            bottoms = [run for run in bottoms if run.get("beside") == beside]
        if len(tops) != len(bottoms):  # a kind left out (--proxies)
            return float("nan")
        return median([a["seconds"] / b["seconds"] for a, b in zip(tops, bottoms, strict=True)])

    s: dict[str, Any] = {}
    for kind in ("direct_pull", "cncf_cold", "cncf_warm", "passthrough_cold", "passthrough_warm"):
        s[f"{kind}_seconds"] = m(kind)
        s[f"{kind}_server_cpu"] = m(kind, "server_cpu")
        s[f"{kind}_blob_gets_max"] = peak(kind, key="blob_gets_max")
    for name, top, bottom in (
        ("passthrough_cold_over_direct", "passthrough_cold", "direct_pull"),
        ("passthrough_cold_over_cncf_cold", "passthrough_cold", "cncf_cold"),
        ("passthrough_warm_over_cncf_warm", "passthrough_warm", "cncf_warm"),
        ("cncf_cold_over_direct", "cncf_cold", "direct_pull"),
        ("passthrough_warm_over_direct", "passthrough_warm", "direct_pull"),
        ("cncf_warm_over_direct", "cncf_warm", "direct_pull"),
    ):
        s[name] = m(top) / m(bottom)
        s[f"{name}_paired"] = paired(top, bottom)
    for kind in PROXIES:
        concurrent = runs.get(f"{kind}_concurrent", [{}])[-1]
        s[f"{kind}_concurrent_blob_gets"] = concurrent.get("blob_gets", [])
        s[f"{kind}_concurrent_blob_gets_max"] = concurrent.get("blob_gets_max", float("nan"))
        s[f"{kind}_concurrent_seconds"] = concurrent.get("seconds", float("nan"))
        s[f"{kind}_concurrent_failed"] = concurrent.get("failed", 0)
        s["concurrency"] = concurrent.get("pulls", s.get("concurrency", CONCURRENCY))
        s[f"{kind}_big_peak_rss"] = peak(
            f"big_{kind}_cold", f"big_{kind}_warm", f"get_{kind}_cold", f"get_{kind}_warm"
        )
        for phase in ("cold", "warm"):
            s[f"{kind}_get_{phase}_throughput"] = m(f"get_{kind}_{phase}", "throughput")
            s[f"{kind}_get_{phase}_server_cpu"] = m(f"get_{kind}_{phase}", "server_cpu")
            s[f"{kind}_get_{phase}_peak_rss"] = peak(f"get_{kind}_{phase}")
        s[f"{kind}_big_cold_peak_rss"] = peak(f"big_{kind}_cold")
        s[f"{kind}_big_warm_peak_rss"] = peak(f"big_{kind}_warm")
        s[f"{kind}_big_peak_rss_total"] = peak(
            f"big_{kind}_cold", f"big_{kind}_warm", key="peak_rss_total"
        )
        s[f"{kind}_big_cold_seconds"] = m(f"big_{kind}_cold")
        s[f"{kind}_big_warm_seconds"] = m(f"big_{kind}_warm")
        s[f"{kind}_image_peak_rss"] = peak(f"{kind}_cold", f"{kind}_warm", f"{kind}_concurrent")
    s["big_direct_seconds"] = m("big_direct_pull")
    s["direct_get_throughput"] = m("get_direct_pull", "throughput")
    return s


def goals(s: Mapping[str, Any]) -> list[Goal]:
    return [
        Goal(
            "cold passthrough / direct (time)", s["passthrough_cold_over_direct_paired"], 1.2, True
        ),
        Goal(
            "cold passthrough / cold CNCF proxy",
            s["passthrough_cold_over_cncf_cold_paired"],
            1.0,
            True,
            strict=True,
        ),
        Goal(
            "warm passthrough / warm CNCF proxy",
            s["passthrough_warm_over_cncf_warm_paired"],
            1.0,
            True,
        ),
        Goal(
            f"upstream GETs per blob, {s['concurrency']} concurrent",
            # A failed pull fails the goal: fewer pulls would ask fewer times.
            float(s["passthrough_concurrent_blob_gets_max"])
            if not s["passthrough_concurrent_failed"]
            else float("nan"),
            1,
            True,
            unit="count",
        ),
        Goal(
            "peak RSS of a server process, big blob",
            s["passthrough_big_peak_rss"],
            200 * MB,
            True,
            unit="MB",
        ),
    ]


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    runs = result["runs"]
    image = result["image"]
    settings = result["settings"]
    lines = [
        f"passthrough /v2 proxy benchmark, {result['date']}",
        machine_line(result),
        f"image: {len(image['layers'])} layers, {image['gzip_bytes'] / MB:.1f} MB gzip; "
        f"big blob {result['big_blob_bytes'] / MB:.0f} MB random",
        f"passthrough: gunicorn {settings['workers']} workers x {settings['threads']} threads"
        + "".join(f", {k}={v}" for k, v in settings["server_env"].items())
        + f", code {settings['code']['commit']}"
        + (" + local changes" if settings["code"]["passthrough_modified"] else "")
        + f"; peer: {result['machine']['versions'].get('registry', '?')} with proxy.remoteurl",
        f"every pull: skopeo copy docker://... dir:...; median of {settings['repeat']} rounds",
        "",
        f"{'measurement':<44}{'median':>10}   runs",
    ]

    def row(name: str, kind: str, key: str = "seconds", scale: float = 1, digits: int = 2) -> None:
        values = [run[key] for run in runs.get(kind, [])]
        each = ", ".join(f"{v / scale:.{digits}f}" for v in values)
        lines.append(f"{name:<44}{median(values) / scale:>10.{digits}f}   {each}")

    row("pull straight from the upstream (s)", "direct_pull")
    row("CNCF proxy, cold (s)", "cncf_cold")
    row("passthrough, cold (s)", "passthrough_cold")
    row("CNCF proxy, warm (s)", "cncf_warm")
    row("passthrough, warm (s)", "passthrough_warm")
    row("CNCF proxy warm: wait for its fill (s)", "cncf_warm", "fill_wait")
    row("server CPU, CNCF proxy cold (s)", "cncf_cold", "server_cpu")
    row("server CPU, passthrough cold (s)", "passthrough_cold", "server_cpu")
    row("server CPU, CNCF proxy warm (s)", "cncf_warm", "server_cpu")
    row("server CPU, passthrough warm (s)", "passthrough_warm", "server_cpu")
    for kind, label in (
        ("direct_pull", "direct"),
        ("cncf_cold", "CNCF cold"),
        ("passthrough_cold", "passthrough cold"),
        ("cncf_warm", "CNCF warm"),
        ("passthrough_warm", "passthrough warm"),
    ):
        row(f"skopeo CPU, {label} (s)", kind, "skopeo_cpu")
    row("upstream registry CPU, direct (s)", "direct_pull", "upstream_cpu")
    row("upstream registry CPU, CNCF cold (s)", "cncf_cold", "upstream_cpu")
    row("upstream registry CPU, passthrough cold (s)", "passthrough_cold", "upstream_cpu")
    row("counting front CPU, direct (s)", "direct_pull", "front_cpu")
    row("counting front CPU, CNCF cold (s)", "cncf_cold", "front_cpu")
    row("counting front CPU, passthrough cold (s)", "passthrough_cold", "front_cpu")
    row("upstream GETs per blob, CNCF cold (max)", "cncf_cold", "blob_gets_max", 1, 0)
    row("upstream GETs per blob, passthrough cold", "passthrough_cold", "blob_gets_max", 1, 0)
    row("upstream blob GETs, CNCF warm", "cncf_warm", "blob_gets_total", 1, 0)
    row("upstream blob GETs, passthrough warm", "passthrough_warm", "blob_gets_total", 1, 0)
    row("upstream blob HEADs, CNCF cold", "cncf_cold", "blob_heads_total", 1, 0)
    row("upstream blob HEADs, passthrough cold", "passthrough_cold", "blob_heads_total", 1, 0)

    lines += ["", f"{'ratio of pull times':<44}{'medians':>10}{'paired':>10}"]
    for name, key in (
        ("passthrough cold / direct", "passthrough_cold_over_direct"),
        ("CNCF proxy cold / direct", "cncf_cold_over_direct"),
        ("passthrough cold / CNCF proxy cold", "passthrough_cold_over_cncf_cold"),
        ("passthrough warm / CNCF proxy warm", "passthrough_warm_over_cncf_warm"),
        ("passthrough warm / direct", "passthrough_warm_over_direct"),
        ("CNCF proxy warm / direct", "cncf_warm_over_direct"),
    ):
        lines.append(f"{name:<44}{s[key]:>10.2f}{s[key + '_paired']:>10.2f}")
    lines.append("(paired: the median of the ratios within each round)")

    lines += ["", f"{s['concurrency']} concurrent cold pulls on a fresh store:"]
    for kind, label in (("cncf", "CNCF proxy"), ("passthrough", "passthrough")):
        run = runs.get(f"{kind}_concurrent", [None])[-1]
        if run is None:
            continue
        lines.append(
            f"  {label:<12} upstream GETs per blob {run['blob_gets']} (total "
            f"{run['blob_gets_total']}, HEADs {run['blob_heads_total']}), all done in "
            f"{run['seconds']:.2f} s, peak RSS {run['peak_rss'] / MB:.0f} MB"
            + (f"; {run['failed']} pulls FAILED: {run['failures'][0]}" if run["failed"] else "")
        )

    lines += [
        "",
        f"big blob ({result['big_blob_bytes'] / MB:.0f} MB), one pull each: "
        f"direct {s['big_direct_seconds']:.2f} s",
    ]
    for kind, label in (("cncf", "CNCF proxy"), ("passthrough", "passthrough")):
        lines.append(
            f"  {label:<12} cold {s[f'{kind}_big_cold_seconds']:.2f} s, peak RSS "
            f"{s[f'{kind}_big_cold_peak_rss'] / MB:.0f} MB; warm "
            f"{s[f'{kind}_big_warm_seconds']:.2f} s, peak RSS "
            f"{s[f'{kind}_big_warm_peak_rss'] / MB:.0f} MB; all its processes "
            f"{s[f'{kind}_big_peak_rss_total'] / MB:.0f} MB"
        )

    lines.append(
        f"one GET of the big layer, read at full speed: direct "
        f"{s['direct_get_throughput'] / MB:.0f} MB/s"
    )
    for kind, label in (("cncf", "CNCF proxy"), ("passthrough", "passthrough")):
        lines.append(
            f"  {label:<12} cold {s[f'{kind}_get_cold_throughput'] / MB:.0f} MB/s (server CPU "
            f"{s[f'{kind}_get_cold_server_cpu']:.2f} s, peak RSS "
            f"{s[f'{kind}_get_cold_peak_rss'] / MB:.0f} MB); warm "
            f"{s[f'{kind}_get_warm_throughput'] / MB:.0f} MB/s (server CPU "
            f"{s[f'{kind}_get_warm_server_cpu']:.2f} s, peak RSS "
            f"{s[f'{kind}_get_warm_peak_rss'] / MB:.0f} MB)"
        )

    lines += ["", f"{'goal':<44}{'value':>10}{'goal':>10}   met"]
    for goal in result["goals"]:
        g = Goal(
            goal["name"],
            goal["value"],
            goal["limit"],
            goal["at_most"],
            goal["unit"],
            goal["strict"],
        )
        lines.append(
            f"{g.name:<44}{g.show(g.value):>10}{g.bound():>10}   {'yes' if g.met else 'NO'}"
        )
    lines.append("(time ratios: paired medians)")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.proxy", description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeat_help="rounds of cold and warm pulls (median)")
    parser.set_defaults(repeat=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: one round, a one-layer image (its own cache), a 64 MB big blob",
    )
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="concurrent pulls (8)")
    parser.add_argument("--big-mb", type=int, default=None, help="size of the big blob (750 MB)")
    parser.add_argument(
        "--proxies",
        nargs="+",
        choices=PROXIES,
        default=list(PROXIES),
        help="the proxies to measure (both; one alone leaves its ratios as nan)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy a cold and a warm pull")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
        if args.dirs == parser.get_default("dirs"):
            args.dirs = list(QUICK_DIRS)
        if args.out == OUT:
            # The quick image has its own cache: the full one stays built.
            args.out = OUT / "quick"
    args.big_bytes = (
        args.big_mb * MB if args.big_mb else QUICK_BIG_BYTES if args.quick else BIG_BYTES
    )
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image = load_or_build(args.out, args.dirs, rebuild=args.rebuild, log=log)
    with RegistryServer("anonymous") as registry:
        bench = Bench(args, image, registry, work)
        bench.push()
        with CountingFront(registry.bind_host, registry.port) as front:
            pb = ProxyBench(args, bench, front)
            log(f"pushing a {args.big_bytes / MB:.0f} MB random blob as {BIG_REPOSITORY}")
            pb.push_big(args.big_bytes)
            for rep in range(args.repeat):
                log(f"round {rep + 1} of {args.repeat}")
                pb.round(rep)
            log(f"{args.concurrency} concurrent cold pulls")
            for kind in args.proxies:
                pb.concurrent(kind, args.concurrency)
            log("big blob")
            pb.big_direct()
            for kind in args.proxies:
                pb.big_blob(kind)
            direct = pb.big_get(pb.direct(), "pull")
            log(f"  direct GET: {direct['throughput'] / MB:.0f} MB/s")
            for kind in args.proxies:
                pb.big_gets(kind)
            profiles = pb.profile() if args.profile else None
    found: dict[str, Any] = {
        "image": image.to_json(),
        "big_blob_bytes": args.big_bytes,
        "runs": pb.runs,
        "notes": pb.notes,
    }
    if profiles is not None:
        found["profile"] = profiles
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.results is None:
        args.results = args.out
    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine_info = machine()
    work = Path(tempfile.mkdtemp(prefix="passthrough-bench-proxy-", dir=args.work_dir))
    try:
        found = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(found["runs"])
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine_info,
        "load_average_at_end": os.getloadavg(),
        "settings": {
            "workers": args.workers,
            "threads": args.threads,
            "repeat": args.repeat,
            "quick": args.quick,
            "concurrency": args.concurrency,
            "repo_root": str(args.repo_root),
            "server_env": dict(args.server_env),
            "code": code_version(args.repo_root),
        },
        **found,
        "summary": summary,
        "goals": [g.__dict__ | {"met": g.met} for g in goals(summary)],
    }
    text = report(result)
    print()
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    for name in (f"proxy-{stamp}.json", "proxy-latest.json"):
        (results / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    (results / "proxy-report-latest.txt").write_text(text + "\n")
    if "profile" in found:
        from benchmarks.profile import describe

        profiles = found["profile"]
        print()
        print(describe({"cold": profiles["cold"], "warm": profiles["warm"]}))
        # describe() knows the phases "cold" and "warm" only.
        big = describe({"cold": profiles["big_get_cold"]}).splitlines()[1:]
        print("\n".join(["  one GET of the big layer, cold:" + big[0].split(":", 1)[1], *big[1:]]))
    print(f"\nresults: {results / f'proxy-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
