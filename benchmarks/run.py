"""Benchmark passthrough against skopeo and the registry itself, on loopback, with an
image of real files (about 830 MB as tar, 350 MB gzip); prints the four goals and
writes the figures as JSON under benchmarks/out/. See docs/benchmarks.md.

    .venv/bin/python -m benchmarks.run [--repeat 3] [--rebuild] [--profile]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image import DEFAULT_DIRS, BenchImage, load_or_build
from benchmarks.measure import (
    BenchmarkError,
    MemoryWatch,
    Transfer,
    cpu_seconds,
    download,
    median,
    run_timed,
    tree,
)
from tests.support.registry import RegistryServer
from tests.support.server import PassthroughServer

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "benchmarks" / "out"
SKOPEO = "/usr/bin/skopeo"
REPOSITORY = "bench/image"
TAG = "latest"
FILENAME = "bench_image_latest.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MB = 1_000_000


@dataclass(frozen=True)
class Goal:
    name: str
    value: float
    limit: float
    at_most: bool
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def show(self, number: float) -> str:
        if self.unit == "MB":
            return f"{number / MB:.0f} MB"
        if self.unit == "s":
            return f"{number:.3f} s"
        return f"{number:.2f}"


def log(message: str) -> None:
    print(message, flush=True)


class Bench:
    """One benchmark session: a registry holding the image, and the measurements."""

    def __init__(
        self, args: argparse.Namespace, image: BenchImage, registry: RegistryServer, work: Path
    ) -> None:
        self.args = args
        self.image = image
        self.registry = registry
        self.work = work
        self.policy = work / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []
        self.archive_size: int | None = None

    # -- plumbing ------------------------------------------------------------------------

    def record(self, kind: str, **values: Any) -> None:
        self.runs.setdefault(kind, []).append(values)

    def skopeo(self, *args: str) -> list[str]:
        return [SKOPEO, "--policy", str(self.policy), *args]

    def server(self, cache: Path) -> PassthroughServer:
        env = {"REGISTRY_URL": self.registry.url, "CACHE_DIR": str(cache)}
        env.update(self.args.server_env)
        server = PassthroughServer(
            env,
            workers=self.args.workers,
            threads=self.args.threads,
            tmp_root=self.work,
            repo_root=self.args.repo_root,
        )
        server.start()
        # /health answers with one worker up; wait for all of them.
        deadline = time.monotonic() + 30
        while len(tree(server.pid)) < 1 + self.args.workers:
            if time.monotonic() > deadline:
                server.cleanup()
                raise BenchmarkError("the gunicorn workers did not all start")
            time.sleep(0.05)
        return server

    def url(self, server: PassthroughServer, query: str = "") -> str:
        return f"{server.url}/docker/{FILENAME}{query}"

    def check_size(self, transfer: Transfer, what: str) -> None:
        if self.archive_size is None:
            self.archive_size = transfer.size
        elif transfer.size != self.archive_size:
            raise BenchmarkError(f"{what}: {transfer.size} bytes, earlier {self.archive_size}")

    # -- the steps -----------------------------------------------------------------------

    def push(self) -> None:
        target = f"docker://{self.registry.host}/{REPOSITORY}:{TAG}"
        source = f"oci:{self.image.layout}:{self.image.tag}"
        timed = run_timed(self.skopeo("copy", "--quiet", "--dest-tls-verify=false", source, target))
        log(f"pushed to {self.registry.url} in {timed.seconds:.1f} s")
        conn = http.client.HTTPConnection(self.registry.bind_host, self.registry.port)
        conn.request("HEAD", f"/v2/{REPOSITORY}/manifests/{TAG}", headers={"Accept": OCI_MANIFEST})
        answer = conn.getresponse()
        digest = answer.getheader("Docker-Content-Digest")
        conn.close()
        if answer.status != 200:
            raise BenchmarkError(f"the pushed manifest is not there: {answer.status}")
        if digest != self.image.manifest_digest:
            self.notes.append(f"skopeo rewrote the manifest on push: {digest}")

    def registry_round(self) -> None:
        """The registry serving the same blobs: GET each, body discarded."""
        total = 0
        seconds = 0.0
        cpu0 = cpu_seconds([self.registry.pid])
        for layer in self.image.layers:
            transfer = download(f"{self.registry.url}/v2/{REPOSITORY}/blobs/{layer.digest}")
            if transfer.size != layer.size:
                raise BenchmarkError(f"blob {layer.digest}: {transfer.size} of {layer.size}")
            total += transfer.size
            seconds += transfer.seconds
        self.record(
            "registry",
            bytes=total,
            seconds=seconds,
            throughput=total / seconds,
            registry_cpu=cpu_seconds([self.registry.pid]) - cpu0,
        )

    def skopeo_round(self) -> None:
        dest = self.work / "skopeo.tar"
        dest.unlink(missing_ok=True)
        reference = f"{self.registry.host}/{REPOSITORY}:{TAG}"
        cpu0 = cpu_seconds([self.registry.pid])
        timed = run_timed(
            self.skopeo(
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--src-no-creds",
                f"docker://{reference}",
                f"docker-archive:{dest}:{reference}",
            )
        )
        size = dest.stat().st_size
        dest.unlink()
        self.record(
            "skopeo",
            seconds=timed.seconds,
            bytes=size,
            cpu=timed.cpu_seconds,
            max_rss=timed.max_rss,
            registry_cpu=cpu_seconds([self.registry.pid]) - cpu0,
        )

    def cold_round(self, cache: Path) -> None:
        """Empty cache, fresh server: the first download of the image."""
        server = self.server(cache)
        try:
            with MemoryWatch(server.pid) as memory:
                pids = tree(server.pid)
                cpu0 = cpu_seconds(pids)
                reg0 = cpu_seconds([self.registry.pid])
                transfer = download(self.url(server))
                cpu = cpu_seconds(pids) - cpu0
                reg = cpu_seconds([self.registry.pid]) - reg0
        finally:
            server.cleanup()
        self.check_size(transfer, "cold download")
        self.record(
            "cold",
            seconds=transfer.seconds,
            ttfb=transfer.ttfb,
            first_mib=transfer.first_mib,
            longest_gap=transfer.longest_gap,
            bytes=transfer.size,
            throughput=transfer.throughput,
            server_cpu=cpu,
            registry_cpu=reg,
            peak_rss=memory.peak,
            peak_rss_total=memory.peak_total,
            rss_by_pid=memory.peaks,
            content_length="content-length" in transfer.headers,
        )

    def warm_round(self, cache: Path) -> None:
        """A fresh server on the filled cache: the archive, then the gzip variant."""
        server = self.server(cache)
        try:
            with MemoryWatch(server.pid) as memory:
                pids = tree(server.pid)
                cpu0 = cpu_seconds(pids)
                transfer = download(self.url(server))
                cpu = cpu_seconds(pids) - cpu0
                gzip = download(self.url(server, "?layers=gzip"))
        finally:
            server.cleanup()
        self.check_size(transfer, "warm download")
        if transfer.headers.get("content-length") != str(transfer.size):
            raise BenchmarkError("the warm download has no exact Content-Length")
        self.record(
            "warm",
            seconds=transfer.seconds,
            ttfb=transfer.ttfb,
            first_mib=transfer.first_mib,
            longest_gap=transfer.longest_gap,
            bytes=transfer.size,
            throughput=transfer.throughput,
            server_cpu=cpu,
            peak_rss=memory.peak,
            peak_rss_total=memory.peak_total,
            rss_by_pid=memory.peaks,
        )
        self.record(
            "warm_gzip",
            seconds=gzip.seconds,
            bytes=gzip.size,
            throughput=gzip.throughput,
        )

    def verify(self) -> dict[str, Any]:
        """Untimed: cold and warm archives hashed (sha256) and compared; the client's
        speed checked against curl on the same URLs."""
        cache = self.work / "verify-cache"
        server = self.server(cache)
        try:
            cold = download(self.url(server), hash_body=True)
            warm = download(self.url(server), hash_body=True)
            check: dict[str, Any] = {
                "cold_sha256": cold.sha256,
                "warm_sha256": warm.sha256,
                "cold_bytes": cold.size,
                "warm_bytes": warm.size,
                "match": cold.sha256 == warm.sha256 and cold.size == warm.size,
            }
            if not check["match"]:
                raise BenchmarkError(f"cold and warm archives differ: {check}")
            self.check_size(cold, "verification download")
            if shutil.which("curl"):
                check["client_vs_curl"] = {
                    "passthrough_warm": self.client_vs_curl(self.url(server)),
                    "registry_biggest_blob": self.client_vs_curl(
                        f"{self.registry.url}/v2/{REPOSITORY}/blobs/"
                        + max(self.image.layers, key=lambda layer: layer.size).digest
                    ),
                }
        finally:
            server.cleanup()
            shutil.rmtree(cache, ignore_errors=True)
        return check

    def client_vs_curl(self, url: str) -> dict[str, float]:
        ours = download(url)
        result = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{time_total}",
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        size, seconds = result.stdout.split()
        return {
            "python_client_bytes_per_s": ours.throughput,
            "curl_bytes_per_s": float(size) / float(seconds),
        }

    def profile(self) -> dict[str, Any]:
        """One cold and one warm download with py-spy recording every server process,
        and the single-thread cost of each stage."""
        from benchmarks.profile import profile_download, stage_costs

        cache = self.work / "profile-cache"
        found: dict[str, Any] = {}
        try:
            for phase in ("cold", "warm"):
                server = self.server(cache)
                try:
                    found[phase] = profile_download(
                        server.pid,
                        functools.partial(download, self.url(server)),
                        self.args.results / f"profile-{phase}",
                        rate=self.args.profile_rate,
                        root=self.args.repo_root,
                    )
                finally:
                    server.cleanup()
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        found["stage_costs"] = stage_costs(self.image)
        return found


# --- the report ---------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    def m(kind: str, key: str) -> float:
        return median([run[key] for run in runs.get(kind, [])])

    peak = max(
        (run["peak_rss"] for kind in ("cold", "warm") for run in runs.get(kind, [])), default=0
    )
    return {
        "skopeo_seconds": m("skopeo", "seconds"),
        "cold_seconds": m("cold", "seconds"),
        "cold_ttfb": m("cold", "ttfb"),
        "cold_first_mib": m("cold", "first_mib"),
        "cold_longest_gap": m("cold", "longest_gap"),
        "warm_first_mib": m("warm", "first_mib"),
        "warm_longest_gap": m("warm", "longest_gap"),
        "warm_seconds": m("warm", "seconds"),
        "warm_throughput": m("warm", "throughput"),
        "warm_gzip_throughput": m("warm_gzip", "throughput"),
        "registry_throughput": m("registry", "throughput"),
        "cold_server_cpu": m("cold", "server_cpu"),
        "warm_server_cpu": m("warm", "server_cpu"),
        "skopeo_cpu": m("skopeo", "cpu"),
        "skopeo_max_rss": m("skopeo", "max_rss"),
        "peak_rss": float(peak),
        "peak_rss_total": float(
            max((r["peak_rss_total"] for k in ("cold", "warm") for r in runs.get(k, [])), default=0)
        ),
    }


def goals(summary: dict[str, float]) -> list[Goal]:
    return [
        Goal(
            "cold / skopeo time",
            summary["cold_seconds"] / summary["skopeo_seconds"],
            0.35,
            at_most=True,
        ),
        Goal("TTFB cold", summary["cold_ttfb"], 1.0, at_most=True, unit="s"),
        Goal(
            "warm / registry throughput",
            summary["warm_throughput"] / summary["registry_throughput"],
            0.5,
            at_most=False,
        ),
        Goal(
            "peak RSS of a server process", summary["peak_rss"], 200 * MB, at_most=True, unit="MB"
        ),
    ]


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) * 1024
    versions = {}
    for name, argv in {
        "skopeo": [SKOPEO, "--version"],
        "registry": ["/usr/bin/docker-registry", "--version"],
        "gunicorn": [sys.executable, "-m", "gunicorn", "--version"],
    }.items():
        try:
            versions[name] = subprocess.run(
                argv, capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except OSError:
            versions[name] = "?"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "versions": versions,
    }


def code_version(root: Path) -> dict[str, Any]:
    """The commit the server ran from, and whether passthrough/ had local changes."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
            )
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "?",
        "passthrough_modified": bool(git("status", "--porcelain", "--", "passthrough")),
    }


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    image = result["image"]
    runs = result["runs"]
    lines = [
        f"passthrough benchmark, {result['date']}",
        f"machine: {result['machine']['cpus']} x {result['machine']['cpu']}, "
        f"{result['machine']['memory_bytes'] / 2**30:.0f} GiB, kernel "
        f"{result['machine']['kernel']}, load at start "
        + " ".join(f"{x:.2f}" for x in result["machine"]["load_average_at_start"]),
        f"image: {len(image['layers'])} layers, {image['gzip_bytes'] / MB:.1f} MB gzip, "
        f"{image['tar_bytes'] / MB:.1f} MB tar; archive {result['archive_bytes'] / MB:.1f} MB "
        f"({', '.join(layer['source'] for layer in image['layers'])})",
        f"server: gunicorn {result['settings']['workers']} workers x "
        f"{result['settings']['threads']} threads"
        + "".join(f", {k}={v}" for k, v in result["settings"]["server_env"].items())
        + f"; median of {result['settings']['repeat']} runs"
        + f"; code {result['settings']['code']['commit']}"
        + (" + local changes" if result["settings"]["code"]["passthrough_modified"] else ""),
        "",
        f"{'measurement':<40}{'median':>14}   runs",
    ]

    def row(name: str, value: str, kind: str, key: str, fmt: Callable[[float], str]) -> None:
        each = ", ".join(fmt(run[key]) for run in runs.get(kind, []))
        lines.append(f"{name:<40}{value:>14}   {each}")

    secs: Callable[[float], str] = lambda v: f"{v:.2f}"  # noqa: E731
    rate: Callable[[float], str] = lambda v: f"{v / MB:.0f}"  # noqa: E731
    mem: Callable[[float], str] = lambda v: f"{v / MB:.0f}"  # noqa: E731
    row("skopeo copy -> docker-archive (s)", secs(s["skopeo_seconds"]), "skopeo", "seconds", secs)
    row("passthrough cold, total (s)", secs(s["cold_seconds"]), "cold", "seconds", secs)
    row("passthrough cold, TTFB (s)", f"{s['cold_ttfb']:.3f}", "cold", "ttfb", lambda v: f"{v:.3f}")
    row(
        "passthrough cold, first MiB (s)",
        secs(s["cold_first_mib"]),
        "cold",
        "first_mib",
        secs,
    )
    row(
        "passthrough cold, longest stall (s)",
        secs(s["cold_longest_gap"]),
        "cold",
        "longest_gap",
        secs,
    )
    row("passthrough warm, total (s)", secs(s["warm_seconds"]), "warm", "seconds", secs)
    row(
        "passthrough warm, first MiB (s)",
        secs(s["warm_first_mib"]),
        "warm",
        "first_mib",
        secs,
    )
    row("passthrough warm (MB/s)", rate(s["warm_throughput"]), "warm", "throughput", rate)
    row(
        "passthrough warm ?layers=gzip (MB/s)",
        rate(s["warm_gzip_throughput"]),
        "warm_gzip",
        "throughput",
        rate,
    )
    row(
        "registry, same blobs (MB/s)",
        rate(s["registry_throughput"]),
        "registry",
        "throughput",
        rate,
    )
    row("server CPU, cold download (s)", secs(s["cold_server_cpu"]), "cold", "server_cpu", secs)
    row("server CPU, warm download (s)", secs(s["warm_server_cpu"]), "warm", "server_cpu", secs)
    row("skopeo CPU (s)", secs(s["skopeo_cpu"]), "skopeo", "cpu", secs)
    row("peak RSS, one server process (MB)", mem(s["peak_rss"]), "cold", "peak_rss", mem)
    row("peak RSS, warm server (MB)", "", "warm", "peak_rss", mem)
    row(
        "peak RSS, all server processes (MB)",
        mem(s["peak_rss_total"]),
        "cold",
        "peak_rss_total",
        mem,
    )
    row("skopeo max RSS (MB)", mem(s["skopeo_max_rss"]), "skopeo", "max_rss", mem)
    lines += ["", f"{'goal':<40}{'value':>14}{'goal':>12}   met"]
    for goal in result["goals"]:
        g = Goal(goal["name"], goal["value"], goal["limit"], goal["at_most"], goal["unit"])
        limit = ("<= " if g.at_most else ">= ") + g.show(g.limit)
        lines.append(f"{g.name:<40}{g.show(g.value):>14}{limit:>12}   {'yes' if g.met else 'NO'}")
    verify = result.get("verification", {})
    if verify:
        lines += [
            "",
            f"verification: cold and warm archives {'match' if verify['match'] else 'DIFFER'}"
            f" (sha256 {str(verify['warm_sha256'])[:16]}..., {verify['warm_bytes']} bytes)",
        ]
        for what, speeds in verify.get("client_vs_curl", {}).items():
            lines.append(
                f"client check, {what}: python {speeds['python_client_bytes_per_s'] / MB:.0f}"
                f" MB/s, curl {speeds['curl_bytes_per_s'] / MB:.0f} MB/s"
            )
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def _assignment(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_common_arguments(parser: argparse.ArgumentParser, *, repeat_help: str) -> None:
    """The options every benchmark here takes: image, servers, where results go."""
    parser.add_argument("--repeat", type=int, default=3, help=repeat_help)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, default=16, help="threads per worker (16)")
    parser.add_argument("--rebuild", action="store_true", help="build the image again")
    parser.add_argument(
        "--dirs", nargs="+", default=list(DEFAULT_DIRS), help="one layer per directory"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="the image cache (and results)")
    parser.add_argument("--results", type=Path, default=None, help="results here, not --out")
    parser.add_argument("--work-dir", type=Path, default=None, help="where caches go (TMPDIR)")
    parser.add_argument(
        "--server-env",
        type=_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment of the servers, e.g. LAYER_CONCURRENCY=1 (repeatable)",
    )
    parser.add_argument(
        "--repo-root",
        type=Path,
        default=REPO_ROOT,
        help="run the server from another checkout (A/B experiments)",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeat_help="runs per measurement (median)")
    parser.add_argument("--profile", action="store_true", help="py-spy a cold and a warm run")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.results is None:
        args.results = out
    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine_info = machine()
    image = load_or_build(out, args.dirs, rebuild=args.rebuild, log=log)
    work = Path(tempfile.mkdtemp(prefix="passthrough-bench-", dir=args.work_dir))
    try:
        with RegistryServer("anonymous") as registry:
            bench = Bench(args, image, registry, work)
            bench.push()
            for rep in range(args.repeat):
                log(f"round {rep + 1} of {args.repeat}")
                bench.registry_round()
                bench.skopeo_round()
                cache = work / f"cache-{rep}"
                bench.cold_round(cache)
                bench.warm_round(cache)
                shutil.rmtree(cache, ignore_errors=True)
            log("verifying")
            verification = bench.verify()
            profiles = bench.profile() if args.profile else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = summarize(bench.runs)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine_info,
        "image": image.to_json(),
        "settings": {
            "workers": args.workers,
            "threads": args.threads,
            "repeat": args.repeat,
            "repo_root": str(args.repo_root),
            "server_env": dict(args.server_env),
            "code": code_version(args.repo_root),
        },
        "archive_bytes": bench.archive_size,
        "runs": bench.runs,
        "summary": summary,
        "goals": [g.__dict__ | {"met": g.met} for g in goals(summary)],
        "verification": verification,
        "notes": bench.notes,
    }
    if profiles is not None:
        result["profile"] = profiles
    text = report(result)
    print()
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    for name in (f"results-{stamp}.json", "results-latest.json"):
        (results / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    (results / "report-latest.txt").write_text(text + "\n")
    if profiles:
        from benchmarks.profile import describe

        print()
        print(describe(profiles))
    print(f"\nresults: {results / f'results-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
