"""Benchmark a fleet at once: N slow clients download the same image at the same time
(issue 18: a few hundred routers running `copy http://…/x.tar flash:` in one window,
Kubernetes nodes pulling the same blobs through /v2), against the CNCF registry
(Debian's docker-registry) serving the same blob to the same clients in the same run.

Each client is a socket with a small receive buffer (SO_RCVBUF) that reads at a set
rate, so the server really holds it for size/rate seconds; all of them are driven by
one asyncio loop (the client is not the bottleneck: hundreds of paced sockets, not
hundreds of threads). Every body is hashed and compared with the expected digest.
Beside the load, a prober asks GET /health (and /ready, /metrics) on passthrough's probe
port (HEALTH_BIND, where the chart's kubelet probes go) on a new connection
every 0.5 s, as a kubelet does.

Scenarios: `cncf` (the peer, a blob GET), `v2-warm` and `v2-cold` (passthrough's /v2
blob route), `tar-warm` and `tar-cold` (the tar route, /ref/<repo>:<tag>.tar). Reported
per N: first-byte p50/p99/max, whole (verified), refused (503), failed, wall time
against the ideal (size/rate), server CPU seconds per GB sent, peak RSS summed over
the server's processes, and the probes' latency.

    .venv/bin/python -m benchmarks.fleet [--clients 100,500,1000] [--rate 500000]
        [--size-mb 8] [--scenarios cncf,v2-warm,tar-warm,v2-cold,tar-cold]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/fleet.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import BenchmarkError, MemoryWatch, cpu_seconds, tree
from benchmarks.run import MB, OUT, code_version, log, machine
from passthrough.capacity import threads_per_worker
from passthrough.config import load_server_settings, read_variable
from tests.support.procs import LOOPBACK, free_port
from tests.support.registry import (
    RegistryServer,
    push_image,
    registry_session,
)
from tests.support.server import PassthroughServer

REPOSITORY = "bench/fleet"
SCENARIOS = ("cncf", "v2-warm", "tar-warm", "v2-cold", "tar-cold")
READ_SIZE = 64 << 10
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 20.0
PROBED = ("/health", "/ready", "/metrics")


# --- the clients ------------------------------------------------------------------------


@dataclass
class ClientResult:
    status: int = 0
    size: int = 0
    #: From connect to the first body byte (None: no body byte arrived).
    first_byte: float | None = None
    seconds: float = 0.0
    #: "sha256:<hex>" of the body received.
    digest: str = ""
    error: str = ""

    def whole(self, expected: str) -> bool:
        return self.status == 200 and not self.error and self.digest == expected


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


class Pacer:
    """Sleeps so that `total` bytes are not read faster than `rate` bytes/s."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()

    async def wait(self, total: int) -> None:
        due = self.start + total / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Body:
    """Reads a body paced at `rate`, hashing it: Content-Length, chunked, or to EOF."""

    def __init__(
        self, reader: asyncio.StreamReader, rate: float, result: ClientResult, started: float
    ) -> None:
        self.reader = reader
        self.pacer = Pacer(rate)
        self.result = result
        self.started = started
        self.digest = hashlib.sha256()

    async def read(self, headers: dict[str, str]) -> str:
        if "chunked" in headers.get("transfer-encoding", ""):
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await self.exactly(size)
                await self.reader.readexactly(2)
        else:
            length = headers.get("content-length")
            await self.exactly(int(length) if length is not None else None)
        return f"sha256:{self.digest.hexdigest()}"

    async def exactly(self, remaining: int | None) -> None:
        """`remaining` bytes (None: up to EOF)."""
        while remaining is None or remaining > 0:
            want = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
            chunk = await self.reader.read(want)
            if not chunk:
                if remaining is not None:
                    raise BenchmarkError(f"cut after {self.result.size} bytes")
                return
            if self.result.first_byte is None:
                self.result.first_byte = time.monotonic() - self.started
            self.digest.update(chunk)
            self.result.size += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
            await self.pacer.wait(self.result.size)


async def slow_client(
    port: int, path: str, *, rate: float, rcvbuf: int, timeout: float
) -> ClientResult:
    """One device: GET `path` with a small receive buffer, read at `rate`, hash it."""
    result = ClientResult()
    started = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE * 2)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
                "User-Agent: fleet-bench\r\nConnection: close\r\n\r\n".encode()
            )
            result.status, headers = await _read_head(reader)
            if result.status != 200:
                return result
            result.digest = await Body(reader, rate, result, started).read(headers)
    except (OSError, asyncio.IncompleteReadError, BenchmarkError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.monotonic() - started
        if writer is not None:
            writer.close()
        else:
            sock.close()
    return result


async def _fleet(port: int, path: str, n: int, **kwargs: Any) -> list[ClientResult]:
    return list(await asyncio.gather(*(slow_client(port, path, **kwargs) for _ in range(n))))


# --- the prober -------------------------------------------------------------------------


@dataclass
class Prober:
    """GET each of `paths` on a new connection every PROBE_INTERVAL, from a process of
    its own, as a kubelet is: a thread beside the clients' event loop would measure its
    own wait for this process's interpreter lock (a second while 500 clients connect)."""

    port: int
    paths: tuple[str, ...] = PROBED
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    _stop: Any = None
    _results: Any = None
    _process: Any = None

    def __enter__(self) -> Prober:
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe_loop, args=(self.port, self.paths, self._stop, child_end),
            name="prober", daemon=True,
        )  # fmt: skip
        self._process.start()
        child_end.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._results.poll(PROBE_TIMEOUT * len(self.paths) + 5):
            self.latencies, self.failures = self._results.recv()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for path, values in self.latencies.items():
            out[path] = {
                "p99": percentile(values, 99),
                "max": max(values),
                "over_1s": sum(v > 1 for v in values),
                "probes": len(values),
                "failed": self.failures.get(path, 0),
            }
        return out


def _probe_loop(port: int, paths: tuple[str, ...], stop: Any, results: Any) -> None:
    """The prober's process: probe until `stop`, then send (latencies, failures)."""
    latencies: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    while not stop.wait(PROBE_INTERVAL):
        for path in paths:
            seconds, ok = _probe(port, path)
            latencies.setdefault(path, []).append(seconds)
            if not ok:
                failures[path] = failures.get(path, 0) + 1
    results.send((latencies, failures))


def _probe(port: int, path: str) -> tuple[float, bool]:
    started = time.monotonic()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        ok = response.status in (200, 503) if path == "/ready" else response.status == 200
    except OSError:
        ok = False
    finally:
        conn.close()
    return time.monotonic() - started, ok


# --- servers ----------------------------------------------------------------------------


def default_server(env: dict[str, str]) -> tuple[PassthroughServer, int]:
    """passthrough on gunicorn.conf.py's own workers and threads (what a new user runs),
    not the rig's: PassthroughServer passes --workers/--threads, so they are the values
    gunicorn.conf.py would read from the same environment. Its probe port (HEALTH_BIND,
    the probe server's) on loopback too; returns the server and that port."""
    health_port = free_port()
    health_bind = f"{LOOPBACK}:{health_port}"
    server = PassthroughServer({**env, "HEALTH_BIND": health_bind})
    scrubbed = server.environment()
    settings = load_server_settings(scrubbed)
    server.workers = settings.workers
    server.threads = threads_per_worker(settings.threads, read_variable("MAX_TRANSFERS", scrubbed))
    return server, health_port


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Image:
    tag: str
    blob: str
    size: int


class FleetBench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.upstream = RegistryServer("anonymous")
        self.server: PassthroughServer | None = None
        #: Where the prober asks: the probe port (HEALTH_BIND), as a kubelet would.
        self.probe_port = 0
        self.serial = 0
        self.results: list[dict[str, Any]] = []

    def push(self) -> Image:
        """A fresh image of one incompressible layer of size_mb: cold everywhere."""
        self.serial += 1
        layer = os.urandom(int(self.args.size_mb * MB))
        tag = f"v{self.serial}"
        with registry_session(self.upstream) as session:
            pushed = push_image(session, REPOSITORY, tag, [layer])
        return Image(tag, pushed.layer_digests[0], len(layer))

    def start(self) -> None:
        self.upstream.start()
        env = {"REGISTRY_URL": self.upstream.url, "CACHE_DIR": str(self.work / "cache")}
        server, self.probe_port = default_server(env)
        self.server = server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.upstream.stop()

    def warm(self, image: Image, path: str) -> str:
        """Download `path` once from passthrough; its sha256 (what every client must get)."""
        assert self.server is not None
        results = asyncio.run(
            _fleet(self.server.port, path, 1, rate=1e12, rcvbuf=1 << 20, timeout=120)
        )
        if results[0].status != 200 or results[0].error:
            raise BenchmarkError(f"warming {path}: {results[0]}")
        return results[0].digest

    def scenario(self, name: str, n: int) -> dict[str, Any]:
        assert self.server is not None
        image = self.push()
        blob_path = f"/v2/{REPOSITORY}/blobs/{image.blob}"
        tar_path = f"/ref/{REPOSITORY}:{image.tag}.tar"
        if name == "cncf":
            port, pid, path = self.upstream.port, self.upstream.pid, blob_path
        else:
            port, pid = self.server.port, self.server.pid
            path = blob_path if name.startswith("v2") else tar_path
            if name.endswith("warm"):
                self.warm(image, path)
        pids = tree(pid)
        cpu_before = cpu_seconds(pids)
        started = time.monotonic()
        # The peer is not probed: its row's probe columns stay empty.
        probes = () if name == "cncf" else PROBED
        with MemoryWatch(pid) as memory, Prober(self.probe_port, probes) as prober:
            results = asyncio.run(
                _fleet(
                    port,
                    path,
                    n,
                    rate=self.args.rate,
                    rcvbuf=self.args.rcvbuf,
                    timeout=self.args.timeout,
                )
            )
        wall = time.monotonic() - started
        cpu = cpu_seconds(tree(pid)) - cpu_before
        # A blob is its digest; a tar is what a download at full speed gets, after.
        expected = image.blob if path == blob_path else self.warm(image, path)
        return summarize(
            name, n, results, wall, cpu, memory.peak_total, prober, self.args, expected
        )


def summarize(
    name: str,
    n: int,
    results: list[ClientResult],
    wall: float,
    cpu: float,
    rss: int,
    prober: Prober,
    args: argparse.Namespace,
    expected: str,
) -> dict[str, Any]:
    firsts = [r.first_byte for r in results if r.first_byte is not None]
    sent = sum(r.size for r in results)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error[:80]] = errors.get(r.error[:80], 0) + 1
    return {
        "scenario": name,
        "clients": n,
        "first_byte_p50": statistics.median(firsts) if firsts else float("nan"),
        "first_byte_p99": percentile(firsts, 99),
        "first_byte_max": max(firsts, default=float("nan")),
        "whole": sum(r.whole(expected) for r in results),
        "refused": sum(r.status == 503 for r in results),
        "failed": sum(r.status != 503 and not r.whole(expected) for r in results),
        "errors": errors,
        "wall": wall,
        "ideal": args.size_mb * MB / args.rate,
        "cpu_per_gb": cpu / (sent / 1e9) if sent else float("nan"),
        "peak_rss_mb": rss / MB,
        "probes": prober.summary(),
        "expected": expected,
    }


def report(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':<9} {'N':>5} {'fb p50':>7} {'fb p99':>7} {'fb max':>7} {'whole':>6} "
        f"{'refused':>7} {'failed':>6} {'wall':>6} {'ideal':>6} {'cpu/GB':>7} {'RSS MB':>7} "
        f"{'health p99/max':>15} {'ready max':>9} {'metrics max':>11}"
    )
    lines = [head]
    for r in rows:
        probes = r["probes"]
        health = probes.get("/health", {})
        lines.append(
            f"{r['scenario']:<9} {r['clients']:>5} {r['first_byte_p50']:>7.2f} "
            f"{r['first_byte_p99']:>7.2f} {r['first_byte_max']:>7.2f} {r['whole']:>6} "
            f"{r['refused']:>7} {r['failed']:>6} {r['wall']:>6.1f} {r['ideal']:>6.1f} "
            f"{r['cpu_per_gb']:>7.2f} {r['peak_rss_mb']:>7.0f} "
            f"{health.get('p99', float('nan')):>7.2f}/{health.get('max', float('nan')):<7.2f} "
            f"{probes.get('/ready', {}).get('max', float('nan')):>9.2f} "
            f"{probes.get('/metrics', {}).get('max', float('nan')):>11.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,500,1000", help="comma-separated N")
    parser.add_argument("--rate", type=float, default=500_000, help="bytes/s per client")
    parser.add_argument("--rcvbuf", type=int, default=64 << 10, help="SO_RCVBUF per client")
    parser.add_argument("--size-mb", type=float, default=8.0, help="the image's one layer")
    parser.add_argument("--timeout", type=float, default=600.0, help="per client, seconds")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    counts = [int(n) for n in args.clients.split(",")]
    # Each client is a socket, and the servers started here inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < max(counts) * 2 + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(counts) * 2 + 1024), hard))
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        bench = FleetBench(args, Path(tmp))
        try:
            bench.start()
            rows = []
            for n in counts:
                for name in scenarios:
                    log(f"{name}: {n} clients at {args.rate / 1e6:.2f} MB/s")
                    row = bench.scenario(name, n)
                    log(
                        f"  whole {row['whole']}/{n}, refused {row['refused']}, "
                        f"first byte p99 {row['first_byte_p99']:.2f} s, wall {row['wall']:.1f} s"
                    )
                    rows.append(row)
        finally:
            bench.stop()
    print(report(rows))
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "code": code_version(Path(__file__).resolve().parents[1]),
        "args": vars(args),
        "rows": rows,
    }
    out = OUT / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
