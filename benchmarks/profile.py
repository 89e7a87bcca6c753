"""Where the server's time goes: py-spy samples every gunicorn process during one
download, and each sample is put in a category (inflate, hashing, disk, socket, ...)
by the source line it was on; plus single-thread costs of each stage on this machine."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.image import BenchImage
from benchmarks.measure import Transfer

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000

#: Frames where a thread waits: py-spy counts them when a thread is runnable anyway.
IDLE = re.compile(
    r"^(_worker \(concurrent/futures/thread\.py|\w*Selector\.select |Condition\.wait |"
    r"Event\.wait |Arbiter\.(sleep|wait_for_signals) |ThreadWorker\.wait_for_and_dispatch)"
)

#: (category, test on "function (file:line)" and the line's source text), first match wins.
CATEGORIES: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    # py-spy takes a thread in a short sleep (a poll loop's) for a running one.
    ("sleep (polling)", lambda frame, code: "time.sleep(" in code),
    ("gzip inflate", lambda frame, code: "decompress(" in code),
    ("sha256", lambda frame, code: ".update(" in code and "passthrough/" in frame),
    ("disk write (cache files)", lambda frame, code: "passthrough/" in frame and ".write(" in code),
    (
        "disk read (pread, hash pass)",
        lambda frame, code: "passthrough/" in frame and ("pread" in code or ".read(" in code),
    ),
    # A blob from local disk goes out by sendfile(2) (socket.py's loop around it).
    ("socket send (sendfile)", lambda frame, code: "sendfile(" in code),
    (
        "socket send (gunicorn)",
        lambda frame, code: "gunicorn/util.py" in frame or "sendall" in code,
    ),
    (
        "socket receive (urllib3)",
        lambda frame, code: (
            "socket.py" in frame or "urllib3/" in frame or "http/client.py" in frame
        ),
    ),
    ("tar stream (python)", lambda frame, code: "tarstream.py" in frame),
    # An upload's body, read by gunicorn's parser off the socket (benchmarks/hosted.py).
    ("request body read (gunicorn http)", lambda frame, code: "gunicorn/http/" in frame),
    (
        "gunicorn / flask",
        lambda frame, code: "gunicorn/" in frame or "werkzeug/" in frame or "flask/" in frame,
    ),
)


def py_spy() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


_source_cache: dict[str, list[str]] = {}


def source_line(frame: str, root: Path = REPO_ROOT) -> str:
    """The code of a frame "function (path:line)", when the file is found (the service's
    own files under `root`, the checkout the server ran from)."""
    match = re.search(r"\(([^()]+):(\d+)\)$", frame)
    if not match:
        return ""
    name, number = match[1], int(match[2])
    key = f"{root}:{name}"
    if key not in _source_cache:
        lines: list[str] = []
        for base in (root, *map(Path, sys.path)):
            path = base / name
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()
                break
        _source_cache[key] = lines
    lines = _source_cache[key]
    return lines[number - 1].strip() if 0 < number <= len(lines) else ""


def categorize(frame: str, root: Path = REPO_ROOT) -> str:
    code = source_line(frame, root)
    for category, test in CATEGORIES:
        if test(frame, code):
            return category
    return "other python"


def analyse(raw: Path, rate: int, root: Path = REPO_ROOT) -> dict[str, Any]:
    """Active samples by category, by thread kind and by source line."""
    categories: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    per_thread: dict[str, Counter[str]] = {}
    active = idle = 0
    for text in raw.read_text().splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        python = [f for f in frames if ".py:" in f]
        leaf = python[-1] if python else frames[-1]
        if IDLE.match(leaf):
            idle += count
            continue
        active += count
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        kind = re.sub(r"^thread \(\w+\)(: )?", "", thread) or "unnamed"
        # gunicorn's request threads are ThreadPoolExecutor-<n>_<m>; the layer pool's
        # threads (layer_0, layer_1, ...) keep their numbers: layer_0 fetches layer 1.
        kind = re.sub(r"^ThreadPoolExecutor-\d+_\d+$", "request threads", kind)
        threads[kind] += count
        category = categorize(leaf, root)
        categories[category] += count
        per_thread.setdefault(kind, Counter())[category] += count
        lines[f"{leaf}  {source_line(leaf, root)[:60]}"] += count
    return {
        "rate": rate,
        "active_samples": active,
        "idle_samples": idle,
        "active_thread_seconds": active / rate,
        "by_category": dict(categories.most_common()),
        "by_thread": dict(threads.most_common()),
        "by_thread_category": {k: dict(v.most_common()) for k, v in per_thread.items()},
        "top_lines": dict(lines.most_common(15)),
    }


def profile_download(
    master_pid: int,
    action: Callable[[], Transfer],
    output: Path,
    *,
    rate: int = 200,
    root: Path = REPO_ROOT,
) -> dict[str, Any]:
    """Run `action` (a download) with py-spy recording the gunicorn master and its
    workers; the raw stacks are kept in `output`.txt."""
    raw = output.with_suffix(".txt")
    raw.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(master_pid),
            "--subprocesses",
            "--threads",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(2.0)  # py-spy attaches to the master, then finds the workers
        if spy.poll() is not None:
            assert spy.stderr is not None
            raise RuntimeError(f"py-spy stopped: {spy.stderr.read().decode(errors='replace')}")
        transfer = action()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)
        if spy.stderr is not None:
            spy.stderr.close()
    found = analyse(raw, rate, root)
    found["download_seconds"] = transfer.seconds
    found["raw"] = str(raw)
    return found


def stage_costs(image: BenchImage) -> dict[str, float]:
    """Single-thread seconds per stage over the whole image, blobs read from the page
    cache: what each step of the cold path costs at least on this machine."""
    isal: Any
    try:
        from isal import isal_zlib as isal
    except ImportError:  # pragma: no cover
        isal = None
    blobs = [
        image.layout / "blobs" / "sha256" / layer.digest.split(":")[1] for layer in image.layers
    ]
    costs: dict[str, float] = {}

    def timed(name: str, work: Callable[[], None]) -> None:
        start = time.perf_counter()
        work()
        costs[name] = time.perf_counter() - start

    def read_all() -> None:
        for blob in blobs:
            with blob.open("rb") as f:
                while f.read(1 << 20):
                    pass

    def inflate(module: Any, hash_out: bool) -> Callable[[], None]:
        def work() -> None:
            for blob in blobs:
                decoder = module.decompressobj(31)
                digest = hashlib.sha256()
                with blob.open("rb") as f:
                    while chunk := f.read(1 << 20):
                        out = decoder.decompress(chunk, 4 << 20)
                        while True:
                            if hash_out:
                                digest.update(out)
                            if not decoder.unconsumed_tail:
                                break
                            out = decoder.decompress(decoder.unconsumed_tail, 4 << 20)

        return work

    def sha_blobs() -> None:
        for blob in blobs:
            digest = hashlib.sha256()
            with blob.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)

    timed("read blobs (page cache)", read_all)
    timed("sha256 of the blobs", sha_blobs)
    if isal is not None:
        timed("inflate, isal", inflate(isal, False))
        timed("inflate + sha256 of the tar, isal", inflate(isal, True))
    timed("inflate, zlib", inflate(zlib, False))
    costs["sha256 of the tar (derived)"] = costs.get(
        "inflate + sha256 of the tar, isal", float("nan")
    ) - costs.get("inflate, isal", float("nan"))
    return costs


def describe(profiles: dict[str, Any], phases: tuple[str, ...] = ("cold", "warm")) -> str:
    lines = ["where the server's time goes (py-spy, active samples of every worker thread):"]
    for phase in phases:
        found = profiles.get(phase)
        if not found:
            continue
        total = found["active_samples"] or 1
        lines.append(
            f"  {phase}: download {found['download_seconds']:.2f} s under the profiler, "
            f"{found['active_thread_seconds']:.2f} thread-seconds busy"
        )
        for name, count in found["by_category"].items():
            lines.append(f"    {count / total:6.1%}  {count / found['rate']:6.2f} s  {name}")
        lines.append("    by thread (thread-seconds; the main categories):")
        for name, count in found["by_thread"].items():
            top = found["by_thread_category"].get(name, {})
            parts = ", ".join(f"{c} {n / found['rate']:.2f}" for c, n in list(top.items())[:4])
            lines.append(f"      {name:<16}{count / found['rate']:6.2f} s  ({parts})")
    costs = profiles.get("stage_costs")
    if costs:
        lines.append("single-thread cost of each stage over the whole image:")
        for name, seconds in costs.items():
            lines.append(f"    {seconds:6.2f} s  {name}")
    return "\n".join(lines)
