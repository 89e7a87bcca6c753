"""Benchmark the S3 store: a warm tar download from passthrough with STORE=s3 (SeaweedFS
on loopback) against the same warm download with the filesystem store (CACHE_DIR), and
against SeaweedFS serving the same objects raw. Prints a table and writes the figures as
JSON under benchmarks/out/. See docs/benchmarks.md, "The S3 store".

    .venv/bin/python -m benchmarks.store [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/store.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image import load_or_build
from benchmarks.measure import (
    BenchmarkError,
    MemoryWatch,
    Transfer,
    cpu_seconds,
    download,
    machine_line,
    median,
    tree,
    wait_for_workers,
)
from benchmarks.run import (
    MB,
    Bench,
    add_common_arguments,
    code_version,
    log,
    machine,
)
from tests.support.registry import RegistryServer
from tests.support.seaweed import SeaweedS3
from tests.support.server import PassthroughServer

BUCKET = "passthrough-bench"


class StoreBench:
    """One session: the registry holding the image (through run.py's Bench), a SeaweedFS
    with one bucket, a filesystem cache dir, and the measurements."""

    def __init__(self, bench: Bench, seaweed: SeaweedS3, bucket: str, prefix: str) -> None:
        self.bench = bench
        self.args = bench.args
        self.seaweed = seaweed
        self.bucket = bucket
        self.prefix = prefix
        self.s3 = seaweed.client()
        self.cache = bench.work / "fs-cache"
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.objects: dict[str, list[dict[str, Any]]] = {}

    # -- plumbing ------------------------------------------------------------------------

    def record(self, kind: str, **values: Any) -> None:
        self.runs.setdefault(kind, []).append(values)

    def store_env(self, store: str) -> dict[str, str]:
        if store == "fs":
            return {"CACHE_DIR": str(self.cache)}
        return {
            "STORE": "s3",
            "S3_BUCKET": self.bucket,
            "S3_PREFIX": self.prefix,
            "S3_ENDPOINT_URL": self.seaweed.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.seaweed.access_key,
            "AWS_SECRET_ACCESS_KEY": self.seaweed.secret_key,
            "AWS_REGION": self.seaweed.region,
        }

    def server(self, store: str) -> PassthroughServer:
        env: dict[str, str] = {"REGISTRY_URL": self.bench.registry.url}
        env.update(self.store_env(store))
        env.update(self.args.server_env)
        server = PassthroughServer(
            env,
            workers=self.args.workers,
            threads=self.args.threads,
            tmp_root=self.bench.work,
            repo_root=self.args.repo_root,
        )
        server.start()
        wait_for_workers(server.pid, self.args.workers, server.cleanup)
        return server

    def list_objects(self, under: str) -> list[dict[str, Any]]:
        found = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + under):
            for item in page.get("Contents", []):
                found.append({"key": item["Key"], "size": int(item["Size"])})
        return sorted(found, key=lambda item: str(item["key"]))

    # -- the steps -----------------------------------------------------------------------

    def download_round(self, store: str, phase: str) -> Transfer:
        """A fresh server on `store`: one `GET /docker/<file>.tar`, with the server's
        (and SeaweedFS's) CPU time and peak RSS."""
        server = self.server(store)
        weed = tree(self.seaweed.pid)
        try:
            with MemoryWatch(server.pid) as memory, MemoryWatch(self.seaweed.pid) as weed_mem:
                pids = tree(server.pid)
                cpu0 = cpu_seconds(pids)
                weed0 = cpu_seconds(weed)
                reg0 = cpu_seconds([self.bench.registry.pid])
                transfer = download(self.bench.url(server))
                cpu = cpu_seconds(pids) - cpu0
                weed_cpu = cpu_seconds(weed) - weed0
                reg = cpu_seconds([self.bench.registry.pid]) - reg0
        finally:
            server.cleanup()
        self.bench.check_size(transfer, f"{store} {phase} download")
        if phase == "warm" and transfer.headers.get("content-length") != str(transfer.size):
            raise BenchmarkError(f"the {store} warm download has no exact Content-Length")
        self.record(
            f"{store}_{phase}",
            seconds=transfer.seconds,
            ttfb=transfer.ttfb,
            first_mib=transfer.first_mib,
            longest_gap=transfer.longest_gap,
            bytes=transfer.size,
            throughput=transfer.throughput,
            server_cpu=cpu,
            seaweed_cpu=weed_cpu,
            registry_cpu=reg,
            peak_rss=memory.peak,
            peak_rss_total=memory.peak_total,
            seaweed_peak_rss=weed_mem.peak,
        )
        return transfer

    def raw_round(self, kind: str) -> None:
        """Every object the S3 store committed under `kind` (layers/ or blobs/), GET
        straight from SeaweedFS by a presigned URL with the same client, body discarded;
        bytes / summed seconds. The URLs are signed before the clock starts."""
        objects = self.objects[kind]
        urls = [
            self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": item["key"]}, ExpiresIn=3600
            )
            for item in objects
        ]
        weed = tree(self.seaweed.pid)
        total = 0
        seconds = 0.0
        with MemoryWatch(self.seaweed.pid) as weed_mem:
            weed0 = cpu_seconds(weed)
            for item, url in zip(objects, urls, strict=True):
                transfer = download(url)
                if transfer.size != item["size"]:
                    raise BenchmarkError(f"{item['key']}: {transfer.size} of {item['size']} bytes")
                total += transfer.size
                seconds += transfer.seconds
            weed_cpu = cpu_seconds(weed) - weed0
        self.record(
            f"raw_{kind}",
            bytes=total,
            seconds=seconds,
            throughput=total / seconds,
            objects=len(objects),
            seaweed_cpu=weed_cpu,
            seaweed_peak_rss=weed_mem.peak,
        )

    def check_objects(self) -> None:
        """After the cold S3 download: layers/ must hold exactly the image's layer tars."""
        image = self.bench.image
        self.objects = {kind: self.list_objects(f"{kind}/") for kind in ("layers", "blobs")}
        layers = self.objects["layers"]
        want = {layer.diff_id.split(":", 1)[1]: layer.tar_size for layer in image.layers}
        have = {str(item["key"]).rsplit("/", 1)[1]: item["size"] for item in layers}
        if have != want:
            raise BenchmarkError(f"layers/ in the bucket: {have}, expected {want}")
        if not self.objects["blobs"]:
            raise BenchmarkError("blobs/ in the bucket is empty")

    def verify(self) -> dict[str, Any]:
        """Untimed: a warm archive from each store hashed (sha256); they must match."""
        found: dict[str, Any] = {}
        for store in ("fs", "s3"):
            server = self.server(store)
            try:
                transfer = download(self.bench.url(server), hash_body=True)
            finally:
                server.cleanup()
            found[f"{store}_sha256"] = transfer.sha256
            found[f"{store}_bytes"] = transfer.size
        found["match"] = found["fs_sha256"] == found["s3_sha256"]
        if not found["match"]:
            raise BenchmarkError(f"the fs and s3 warm archives differ: {found}")
        if shutil.which("curl"):
            biggest = max(self.objects["layers"], key=lambda item: int(item["size"]))
            url = self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": biggest["key"]}, ExpiresIn=3600
            )
            found["client_vs_curl_biggest_layer_object"] = self.bench.client_vs_curl(url)
        return found


# --- the report ---------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    def m(kind: str, key: str) -> float:
        return median([run[key] for run in runs.get(kind, [])])

    def peak(kind: str, key: str) -> float:
        return float(max((run[key] for run in runs.get(kind, [])), default=0))

    s = {
        "fs_cold_seconds": m("fs_cold", "seconds"),
        "s3_cold_seconds": m("s3_cold", "seconds"),
        "fs_warm_throughput": m("fs_warm", "throughput"),
        "s3_warm_throughput": m("s3_warm", "throughput"),
        "raw_layers_throughput": m("raw_layers", "throughput"),
        "raw_blobs_throughput": m("raw_blobs", "throughput"),
        "fs_warm_seconds": m("fs_warm", "seconds"),
        "s3_warm_seconds": m("s3_warm", "seconds"),
        "fs_warm_ttfb": m("fs_warm", "ttfb"),
        "s3_warm_ttfb": m("s3_warm", "ttfb"),
        "fs_warm_server_cpu": m("fs_warm", "server_cpu"),
        "s3_warm_server_cpu": m("s3_warm", "server_cpu"),
        "s3_warm_seaweed_cpu": m("s3_warm", "seaweed_cpu"),
        "raw_layers_seaweed_cpu": m("raw_layers", "seaweed_cpu"),
        "fs_warm_peak_rss": peak("fs_warm", "peak_rss"),
        "s3_warm_peak_rss": peak("s3_warm", "peak_rss"),
        "fs_warm_peak_rss_total": peak("fs_warm", "peak_rss_total"),
        "s3_warm_peak_rss_total": peak("s3_warm", "peak_rss_total"),
        "s3_cold_peak_rss": peak("s3_cold", "peak_rss"),
        "seaweed_peak_rss": max(
            peak(kind, "seaweed_peak_rss")
            for kind in ("s3_cold", "s3_warm", "raw_layers", "raw_blobs")
        ),
    }
    s["s3_warm_over_fs_warm"] = s["s3_warm_throughput"] / s["fs_warm_throughput"]
    s["s3_warm_over_raw_layers"] = s["s3_warm_throughput"] / s["raw_layers_throughput"]
    s["s3_warm_over_raw_blobs"] = s["s3_warm_throughput"] / s["raw_blobs_throughput"]
    s["fs_warm_over_raw_layers"] = s["fs_warm_throughput"] / s["raw_layers_throughput"]
    # The same ratios round by round (the runs of one round are back to back), then the
    # median: less exposed to a slow minute on a shared machine than a ratio of medians.
    for name, top, bottom in (
        ("s3_warm_over_fs_warm_paired", "s3_warm", "fs_warm"),
        ("s3_warm_over_raw_layers_paired", "s3_warm", "raw_layers"),
        ("s3_warm_over_raw_blobs_paired", "s3_warm", "raw_blobs"),
    ):
        pairs = zip(runs.get(top, []), runs.get(bottom, []), strict=True)
        s[name] = median([a["throughput"] / b["throughput"] for a, b in pairs])
    return s


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    runs = result["runs"]
    image = result["image"]
    settings = result["settings"]
    lines = [
        f"passthrough S3 store benchmark, {result['date']}",
        machine_line(result),
        f"image: {len(image['layers'])} layers, {image['gzip_bytes'] / MB:.1f} MB gzip, "
        f"{image['tar_bytes'] / MB:.1f} MB tar; archive {result['archive_bytes'] / MB:.1f} MB",
        f"server: gunicorn {settings['workers']} workers x {settings['threads']} threads"
        + "".join(f", {k}={v}" for k, v in settings["server_env"].items())
        + f"; S3: SeaweedFS `weed server` on loopback, bucket {settings['bucket']}, "
        f"prefix {settings['prefix']!r}; median of {settings['repeat']} runs; code "
        + settings["code"]["commit"]
        + (" + local changes" if settings["code"]["passthrough_modified"] else ""),
        "",
        f"{'measurement':<46}{'median':>10}   runs",
    ]

    def row(name: str, value: float, kind: str, key: str, scale: float, digits: int) -> None:
        each = ", ".join(f"{run[key] / scale:.{digits}f}" for run in runs.get(kind, []))
        lines.append(f"{name:<46}{value / scale:>10.{digits}f}   {each}")

    row("fs store cold, total (s)", s["fs_cold_seconds"], "fs_cold", "seconds", 1, 2)
    row("s3 store cold, total (s)", s["s3_cold_seconds"], "s3_cold", "seconds", 1, 2)
    row("fs store warm (MB/s)", s["fs_warm_throughput"], "fs_warm", "throughput", MB, 0)
    row("s3 store warm (MB/s)", s["s3_warm_throughput"], "s3_warm", "throughput", MB, 0)
    row(
        "seaweed raw, layers/ objects (MB/s)",
        s["raw_layers_throughput"],
        "raw_layers",
        "throughput",
        MB,
        0,
    )
    row(
        "seaweed raw, blobs/ objects (MB/s)",
        s["raw_blobs_throughput"],
        "raw_blobs",
        "throughput",
        MB,
        0,
    )
    row("fs store warm, TTFB (s)", s["fs_warm_ttfb"], "fs_warm", "ttfb", 1, 3)
    row("s3 store warm, TTFB (s)", s["s3_warm_ttfb"], "s3_warm", "ttfb", 1, 3)
    row("server CPU, fs warm (s)", s["fs_warm_server_cpu"], "fs_warm", "server_cpu", 1, 2)
    row("server CPU, s3 warm (s)", s["s3_warm_server_cpu"], "s3_warm", "server_cpu", 1, 2)
    row("seaweed CPU, s3 warm (s)", s["s3_warm_seaweed_cpu"], "s3_warm", "seaweed_cpu", 1, 2)
    row(
        "seaweed CPU, raw layers/ (s)",
        s["raw_layers_seaweed_cpu"],
        "raw_layers",
        "seaweed_cpu",
        1,
        2,
    )
    lines.append("")
    for name, key in (
        ("peak RSS, one server process, fs warm (MB)", "fs_warm_peak_rss"),
        ("peak RSS, one server process, s3 warm (MB)", "s3_warm_peak_rss"),
        ("peak RSS, all server processes, fs warm (MB)", "fs_warm_peak_rss_total"),
        ("peak RSS, all server processes, s3 warm (MB)", "s3_warm_peak_rss_total"),
        ("peak RSS, one server process, s3 cold (MB)", "s3_cold_peak_rss"),
        ("peak RSS, weed server (MB)", "seaweed_peak_rss"),
    ):
        lines.append(f"{name:<46}{s[key] / MB:>10.0f}   (max over runs)")
    lines += ["", f"{'ratio of throughputs':<46}{'medians':>10}{'paired':>10}"]
    for name, key in (
        ("s3 store warm / fs store warm", "s3_warm_over_fs_warm"),
        ("s3 store warm / seaweed raw layers/", "s3_warm_over_raw_layers"),
        ("s3 store warm / seaweed raw blobs/", "s3_warm_over_raw_blobs"),
        ("fs store warm / seaweed raw layers/", "fs_warm_over_raw_layers"),
    ):
        paired = s.get(f"{key}_paired")
        shown = f"{paired:>10.2f}" if paired is not None else ""
        lines.append(f"{name:<46}{s[key]:>10.2f}{shown}")
    lines.append("(paired: the median of the ratios within each round)")
    verify = result["verification"]
    lines += [
        "",
        f"verification: fs and s3 warm archives {'match' if verify['match'] else 'DIFFER'}"
        f" (sha256 {str(verify['s3_sha256'])[:16]}..., {verify['s3_bytes']} bytes)",
    ]
    speeds = verify.get("client_vs_curl_biggest_layer_object")
    if speeds:
        lines.append(
            f"client check, biggest layers/ object from seaweed: python "
            f"{speeds['python_client_bytes_per_s'] / MB:.0f} MB/s, curl "
            f"{speeds['curl_bytes_per_s'] / MB:.0f} MB/s"
        )
    objects = result["objects"]
    for kind in ("layers", "blobs"):
        total = sum(item["size"] for item in objects[kind])
        lines.append(f"bucket {kind}/: {len(objects[kind])} objects, {total / MB:.1f} MB")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.store", description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeat_help="warm runs of each (median)")
    parser.add_argument("--prefix", default="bench/", help="the S3 store's S3_PREFIX")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image = load_or_build(args.out, args.dirs, rebuild=args.rebuild, log=log)
    seaweed = SeaweedS3()
    try:
        seaweed.start()
        log(f"seaweed up at {seaweed.endpoint_url} in {seaweed.startup_seconds[-1]:.1f} s")
        bucket = seaweed.create_bucket(BUCKET)
        with RegistryServer("anonymous") as registry:
            bench = Bench(args, image, registry, work)
            bench.push()
            sb = StoreBench(bench, seaweed, bucket, args.prefix)
            for store in ("fs", "s3"):
                log(f"cold {store} download (fills the store)")
                cold = sb.download_round(store, "cold")
                log(f"  {cold.seconds:.1f} s")
            sb.check_objects()
            for rep in range(args.repeat):
                log(f"round {rep + 1} of {args.repeat}")
                for store in ("fs", "s3"):
                    warm = sb.download_round(store, "warm")
                    log(f"  {store} warm: {warm.throughput / MB:.0f} MB/s")
                for kind in ("layers", "blobs"):
                    sb.raw_round(kind)
                    log(f"  raw {kind}/: {sb.runs[f'raw_{kind}'][-1]['throughput'] / MB:.0f} MB/s")
            log("verifying")
            verification = sb.verify()
    finally:
        seaweed.close()
    return {
        "image": image.to_json(),
        "archive_bytes": bench.archive_size,
        "runs": sb.runs,
        "objects": sb.objects,
        "summary": summarize(sb.runs),
        "verification": verification,
        "notes": bench.notes,
        "bucket": bucket,
        "seaweed_startup_seconds": seaweed.startup_seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: Path = args.results or args.out
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine_info = machine()
    work = Path(tempfile.mkdtemp(prefix="passthrough-bench-store-", dir=args.work_dir))
    try:
        found = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    server_env: Mapping[str, str] = dict(args.server_env)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine_info,
        "settings": {
            "workers": args.workers,
            "threads": args.threads,
            "repeat": args.repeat,
            "repo_root": str(args.repo_root),
            "server_env": server_env,
            "code": code_version(args.repo_root),
            "bucket": found.pop("bucket"),
            "prefix": args.prefix,
        },
        **found,
    }
    result["load_average_at_end"] = os.getloadavg()
    text = report(result)
    print()
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    for name in (f"store-{stamp}.json", "store-latest.json"):
        (results / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    (results / "store-report-latest.txt").write_text(text + "\n")
    print(f"\nresults: {results / f'store-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
