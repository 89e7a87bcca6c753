"""What the benchmark measures with: a client that reads bodies at full speed (1 MiB
`readinto`, nothing kept), a sampler of the server processes' memory, CPU time from
/proc, and child processes timed with their rusage."""

from __future__ import annotations

import hashlib
import http.client
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHUNK = 1 << 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchmarkError(RuntimeError):
    pass


@dataclass
class Transfer:
    """One HTTP download as the client saw it."""

    status: int
    size: int
    #: From the request being sent to the first body byte.
    ttfb: float
    #: From the request being sent to the last body byte.
    seconds: float
    headers: dict[str, str]
    sha256: str | None = None
    #: From the request being sent until 1 MiB of body had arrived: past the metadata
    #: entries, into the first layer.
    first_mib: float = 0.0
    #: The longest wait between two reads (a layer not ready yet, a hash pass).
    longest_gap: float = 0.0

    @property
    def throughput(self) -> float:
        return self.size / self.seconds if self.seconds else 0.0


def download(
    url: str,
    *,
    hash_body: bool = False,
    headers: Mapping[str, str] | None = None,
    timeout: float = 900.0,
) -> Transfer:
    """GET `url` and read the whole body into one reused 1 MiB buffer. The connection is
    made before the clock starts; chunked bodies are decoded by http.client."""
    parts = urlsplit(url)
    if parts.hostname is None:
        raise ValueError(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.connect()
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        start = time.perf_counter()
        conn.request("GET", target, headers={"Accept-Encoding": "identity", **(headers or {})})
        response = conn.getresponse()
        if response.status not in (200, 206):
            body = response.read(2000).decode(errors="replace")
            raise BenchmarkError(f"GET {url}: {response.status} {body.strip()}")
        digest = hashlib.sha256() if hash_body else None
        first = response.read1(CHUNK)
        ttfb = time.perf_counter() - start
        size = len(first)
        if digest is not None:
            digest.update(first)
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        first_mib = ttfb if size >= CHUNK else 0.0
        longest_gap = 0.0
        last = time.perf_counter()
        while count := response.readinto(view):
            now = time.perf_counter()
            longest_gap = max(longest_gap, now - last)
            last = now
            size += count
            if not first_mib and size >= CHUNK:
                first_mib = now - start
            if digest is not None:
                digest.update(view[:count])
        seconds = time.perf_counter() - start
        return Transfer(
            status=response.status,
            size=size,
            ttfb=ttfb,
            seconds=seconds,
            headers={k.lower(): v for k, v in response.getheaders()},
            sha256=digest.hexdigest() if digest is not None else None,
            first_mib=first_mib,
            longest_gap=longest_gap,
        )
    finally:
        conn.close()


# --- processes --------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found = [pid]
    for child in children(pid):
        found.extend(tree(child))
    return found


def wait_for_workers(pid: int, workers: int, cleanup: Callable[[], object]) -> None:
    """Wait until gunicorn master ``pid`` has all its ``workers`` (/health answers with
    one up); ``cleanup`` stops it when they do not come within 30 s."""
    deadline = time.monotonic() + 30
    while len(tree(pid)) < 1 + workers:
        if time.monotonic() > deadline:
            cleanup()
            raise BenchmarkError("the gunicorn workers did not all start")
        time.sleep(0.05)


def _status_kib(pid: int, *fields: str) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in fields:
                values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of live processes."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


@dataclass
class MemoryWatch:
    """Samples VmRSS of a process tree every `interval` seconds in a thread and keeps
    each process's peak; VmHWM (the kernel's own high-water mark, exact between
    samples) is read at every sample too."""

    root: int
    interval: float = 0.05
    #: pid -> peak bytes (the larger of sampled VmRSS and VmHWM).
    peaks: dict[int, int] = field(default_factory=dict)
    #: The largest sum of VmRSS over the tree at one sample.
    peak_total: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        total = 0
        for pid in tree(self.root):
            values = _status_kib(pid, "VmRSS", "VmHWM")
            if not values:
                continue
            rss = values.get("VmRSS", 0) * 1024
            peak = max(rss, values.get("VmHWM", 0) * 1024)
            self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
            total += rss
        self.peak_total = max(self.peak_total, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryWatch:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


@dataclass
class Timed:
    """A child process run to completion: wall time, CPU time and peak RSS (rusage)."""

    seconds: float
    cpu_seconds: float
    max_rss: int
    stderr: str


def run_timed(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> Timed:
    with open(os.devnull, "wb") as devnull:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=devnull,
            stderr=subprocess.PIPE,
            env=None if env is None else dict(env),
        )
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stderr.close()
    if proc.returncode != 0:
        raise BenchmarkError(f"{argv[0]} exited {proc.returncode}: {stderr.strip()[-2000:]}")
    return Timed(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, stderr)


def machine_line(result: Mapping[str, Any]) -> str:
    """The report's line on the machine: CPUs and the load average at the start of the
    run and, when recorded, at its end (a noisy machine shows there)."""
    machine = result["machine"]
    line = f"machine: {machine['cpus']} x {machine['cpu']}, load at start " + " ".join(
        f"{x:.2f}" for x in machine["load_average_at_start"]
    )
    if "load_average_at_end" in result:
        line += ", at end " + " ".join(f"{x:.2f}" for x in result["load_average_at_end"])
    return line


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
