"""Benchmark the hosted area: push the benchmark image into passthrough
(HOSTED_REPOSITORIES) and into the CNCF registry (Debian's docker-registry) with
`skopeo copy oci:… docker://…`, then pull it back out of each (`docker://… dir:…`), in
one run, both with htpasswd users, on the same disk. Prints the two goals (push within
1.3 x the registry's time, pull at least as fast) and writes the figures as JSON under
benchmarks/out/. See docs/benchmarks.md, "The hosted area".

    .venv/bin/python -m benchmarks.hosted [--repeat 5] [--profile]
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.client
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/hosted.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.image import BenchImage, load_or_build
from benchmarks.measure import (
    BenchmarkError,
    MemoryWatch,
    Timed,
    Transfer,
    cpu_seconds,
    machine_line,
    median,
    run_timed,
    tree,
    wait_for_workers,
)
from benchmarks.run import (
    MB,
    OCI_MANIFEST,
    SKOPEO,
    Goal,
    add_common_arguments,
    code_version,
    log,
    machine,
)
from tests.support.procs import LOOPBACK
from tests.support.registry import RegistryServer, _htpasswd_line
from tests.support.server import PassthroughServer

#: Under HOSTED_REPOSITORIES=team/* on passthrough; the same name on the registry.
REPOSITORY = "team/bench"
HOSTED_PATTERN = "team/*"
USER = "bench"
PUSH_GOAL = 1.3
PULL_GOAL = 1.0
#: The two servers, by the name the results use.
SERVERS = ("passthrough", "cncf")


class HostedServer(PassthroughServer):
    """passthrough whose PUBLIC_URL (the token realm clients are sent to) is its own
    address: the port is only known once `start` has picked it."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["PUBLIC_URL"] = f"http://{LOOPBACK}:{self.port}"
        return env


class Target:
    """One server of a round with an empty store: passthrough or the CNCF registry."""

    def __init__(
        self,
        name: str,
        host: str,
        pid: int,
        stop: Callable[[], None],
        log_text: Callable[[], str],
    ) -> None:
        self.name = name
        self.host = host
        self.pid = pid
        self.stop = stop
        self.log_text = log_text

    def pids(self) -> list[int]:
        return tree(self.pid)


class HostedBench:
    """One session: the image in an OCI layout, an htpasswd user both servers know, and
    the measurements."""

    def __init__(self, args: argparse.Namespace, image: BenchImage, work: Path) -> None:
        self.args = args
        self.image = image
        self.work = work
        self.policy = work / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        # A fresh password per run: it is on skopeo's command line (--dest-creds) and in
        # no result file.
        self.password = secrets.token_urlsafe(18)
        self.htpasswd = work / "htpasswd"
        self.htpasswd.write_text(_htpasswd_line(USER, self.password))
        self.token_secret = secrets.token_urlsafe(32)
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []
        self.digests: dict[str, str] = {}

    # -- plumbing ------------------------------------------------------------------------

    def record(self, kind: str, **values: Any) -> None:
        self.runs.setdefault(kind, []).append(values)

    def skopeo(self, *args: str) -> list[str]:
        return [SKOPEO, "--policy", str(self.policy), *args]

    @property
    def creds(self) -> str:
        return f"{USER}:{self.password}"

    def passthrough(self, store: Path) -> Target:
        env = {
            "CACHE_DIR": str(store),
            "HOSTED_REPOSITORIES": HOSTED_PATTERN,
            "HTPASSWD_FILE": str(self.htpasswd),
            "TOKEN_SECRET": self.token_secret,
        }
        env.update(self.args.server_env)
        server = HostedServer(
            env,
            workers=self.args.workers,
            threads=self.args.threads,
            tmp_root=self.work,
            repo_root=self.args.repo_root,
        )
        server.start()
        wait_for_workers(server.pid, self.args.workers, server.cleanup)
        return Target(
            "passthrough", f"{LOOPBACK}:{server.port}", server.pid, server.cleanup, server.log_text
        )

    def cncf(self, store: Path) -> Target:
        registry = RegistryServer("basic", users={USER: self.password})
        # Its storage beside passthrough's CACHE_DIR (the same disk), not in its own
        # temp dir under /tmp.
        store.mkdir(parents=True)
        registry.storage_dir = store
        registry.start()
        return Target("cncf", registry.host, registry.pid, registry.stop, registry.log_text)

    def start(self, name: str, store: Path) -> Target:
        return self.passthrough(store) if name == "passthrough" else self.cncf(store)

    def reference(self, target: Target, tag: str) -> str:
        return f"docker://{target.host}/{REPOSITORY}:{tag}"

    def timed(self, target: Target, argv: list[str]) -> tuple[Timed, float, int]:
        """Run a skopeo copy against `target`: its result, the server's CPU seconds
        meanwhile and the largest server process's peak RSS."""
        with MemoryWatch(target.pid) as memory:
            pids = target.pids()
            cpu0 = cpu_seconds(pids)
            timed = run_timed(argv)
            cpu = cpu_seconds(pids) - cpu0
        return timed, cpu, memory.peak

    # -- the steps -----------------------------------------------------------------------

    def push(self, target: Target, tag: str) -> None:
        source = f"oci:{self.image.layout}:{self.image.tag}"
        argv = self.skopeo(
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            self.creds,
            source,
            self.reference(target, tag),
        )
        timed, cpu, peak = self.timed(target, argv)
        digest = self.check_manifest(target, tag)
        self.record(
            f"{target.name}_push",
            seconds=timed.seconds,
            bytes=self.image.gzip_bytes,
            throughput=self.image.gzip_bytes / timed.seconds,
            server_cpu=cpu,
            skopeo_cpu=timed.cpu_seconds,
            skopeo_max_rss=timed.max_rss,
            peak_rss=peak,
            manifest_digest=digest,
        )

    def check_manifest(self, target: Target, tag: str) -> str:
        """The pushed manifest is there, and both servers hold the same one."""
        host, port = target.host.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        basic = base64.b64encode(self.creds.encode()).decode()
        try:
            conn.request(
                "HEAD",
                f"/v2/{REPOSITORY}/manifests/{tag}",
                headers={"Accept": OCI_MANIFEST, "Authorization": f"Basic {basic}"},
            )
            answer = conn.getresponse()
            answer.read()
        finally:
            conn.close()
        digest = answer.getheader("Docker-Content-Digest") or ""
        if answer.status != 200:
            raise BenchmarkError(f"{target.name}: no pushed manifest: HTTP {answer.status}")
        self.digests.setdefault(target.name, digest)
        if digest != self.image.manifest_digest and not self.notes:
            self.notes.append(f"skopeo rewrote the manifest on push: {digest}")
        if len(set(self.digests.values())) > 1:
            raise BenchmarkError(f"the servers hold different manifests: {self.digests}")
        return digest

    def pull(self, target: Target, tag: str) -> None:
        dest = self.work / f"pull-{target.name}"
        shutil.rmtree(dest, ignore_errors=True)
        argv = self.skopeo(
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--src-creds",
            self.creds,
            self.reference(target, tag),
            f"dir:{dest}",
        )
        try:
            timed, cpu, peak = self.timed(target, argv)
            self.check_pulled(target, dest)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        self.record(
            f"{target.name}_pull",
            seconds=timed.seconds,
            bytes=self.image.gzip_bytes,
            throughput=self.image.gzip_bytes / timed.seconds,
            server_cpu=cpu,
            skopeo_cpu=timed.cpu_seconds,
            skopeo_max_rss=timed.max_rss,
            peak_rss=peak,
        )

    def check_pulled(self, target: Target, dest: Path) -> None:
        """Every layer and the config came back whole (skopeo checked their digests on
        the way in; the dir: transport names each blob file by its digest)."""
        wanted = {layer.digest: layer.size for layer in self.image.layers}
        wanted[self.image.config_digest] = -1
        for digest, size in wanted.items():
            path = dest / digest.split(":", 1)[1]
            if not path.is_file():
                raise BenchmarkError(f"{target.name}: the pull has no {digest}")
            if size >= 0 and path.stat().st_size != size:
                raise BenchmarkError(f"{target.name}: {digest} is {path.stat().st_size} bytes")

    def round(self, number: int) -> None:
        """Fresh, empty stores on both servers (so every blob is really uploaded: skopeo
        skips a blob its HEAD finds), both pushes, then both pulls; the order alternates
        from round to round so that neither always goes first."""
        order = SERVERS if number % 2 == 0 else SERVERS[::-1]
        tag = f"r{number}"
        targets: dict[str, Target] = {}
        try:
            for name in order:
                targets[name] = self.start(name, self.work / f"{name}-store-{number}")
            for name in order:
                self.push(targets[name], tag)
                log(f"  {name} push: {self.runs[f'{name}_push'][-1]['seconds']:.2f} s")
            for name in order:
                self.pull(targets[name], tag)
                log(f"  {name} pull: {self.runs[f'{name}_pull'][-1]['seconds']:.2f} s")
            self.keep_log_if_slow(number, targets["passthrough"])
        finally:
            for target in targets.values():
                target.stop()
            for name in order:
                shutil.rmtree(self.work / f"{name}-store-{number}", ignore_errors=True)

    def keep_log_if_slow(self, number: int, target: Target) -> None:
        """A round where passthrough took over twice the registry's time keeps the
        server's log (the access log has every request's duration) for a look at what
        it waited for: on a shared machine such a round is usually another process's
        minute, not passthrough's."""
        for step in ("push", "pull"):
            ours = self.runs[f"passthrough_{step}"][-1]["seconds"]
            theirs = self.runs[f"cncf_{step}"][-1]["seconds"]
            if ours > 2 * theirs:
                path = self.args.results / f"hosted-slow-round-{number + 1}.log"
                path.write_text(target.log_text())
                self.notes.append(
                    f"round {number + 1}: passthrough {step} {ours:.2f} s against "
                    f"{theirs:.2f} s; its log: {path}"
                )

    def profile(self) -> dict[str, Any]:
        """One push and one pull into a fresh passthrough with py-spy recording every
        server process."""
        from benchmarks.profile import profile_download

        store = self.work / "profile-store"
        target = self.passthrough(store)
        found: dict[str, Any] = {}

        def action(step: Callable[[Target, str], None], kind: str) -> Transfer:
            step(target, "profile")
            run = self.runs[kind].pop()
            return Transfer(200, run["bytes"], 0.0, run["seconds"], {})

        try:
            for phase, step in (("push", self.push), ("pull", self.pull)):
                found[phase] = profile_download(
                    target.pid,
                    functools.partial(action, step, f"passthrough_{phase}"),
                    self.args.results / f"profile-hosted-{phase}",
                    rate=self.args.profile_rate,
                    root=self.args.repo_root,
                )
        finally:
            target.stop()
            shutil.rmtree(store, ignore_errors=True)
        return found


# --- the report ---------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    def m(kind: str, key: str) -> float:
        return median([run[key] for run in runs.get(kind, [])])

    s: dict[str, float] = {}
    for server in SERVERS:
        for step in ("push", "pull"):
            kind = f"{server}_{step}"
            s[f"{kind}_seconds"] = m(kind, "seconds")
            s[f"{kind}_server_cpu"] = m(kind, "server_cpu")
            s[f"{kind}_skopeo_cpu"] = m(kind, "skopeo_cpu")
            peaks = [run["peak_rss"] for run in runs.get(kind, [])]
            s[f"{kind}_peak_rss"] = float(max(peaks, default=0))
    for step in ("push", "pull"):
        s[f"{step}_ratio"] = s[f"passthrough_{step}_seconds"] / s[f"cncf_{step}_seconds"]
        # The same ratio round by round (one round's runs are back to back), then the
        # median: less exposed to a slow minute on a shared machine.
        pairs = zip(runs.get(f"passthrough_{step}", []), runs.get(f"cncf_{step}", []), strict=True)
        s[f"{step}_ratio_paired"] = median([a["seconds"] / b["seconds"] for a, b in pairs])
    return s


def goals(summary: dict[str, float]) -> list[Goal]:
    return [
        Goal("push time, passthrough / cncf", summary["push_ratio"], PUSH_GOAL, at_most=True),
        Goal("pull time, passthrough / cncf", summary["pull_ratio"], PULL_GOAL, at_most=True),
    ]


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    runs = result["runs"]
    image = result["image"]
    settings = result["settings"]
    lines = [
        f"passthrough hosted-area benchmark, {result['date']}",
        machine_line(result),
        f"image: {len(image['layers'])} layers, {image['gzip_bytes'] / MB:.1f} MB gzip, "
        f"pushed from an OCI layout with skopeo, pulled into dir:",
        f"passthrough: gunicorn {settings['workers']} workers x {settings['threads']} threads, "
        f"CACHE_DIR, HOSTED_REPOSITORIES={HOSTED_PATTERN}, HTPASSWD_FILE + TOKEN_SECRET"
        + "".join(f", {k}={v}" for k, v in settings["server_env"].items())
        + f"; cncf: docker-registry, htpasswd auth, filesystem storage on the same disk"
        f"; median of {settings['repeat']} rounds; code {settings['code']['commit']}"
        + (" + local changes" if settings["code"]["passthrough_modified"] else ""),
        "",
        f"{'measurement':<44}{'median':>10}   runs",
    ]

    def row(name: str, kind: str, key: str, scale: float = 1, digits: int = 2) -> None:
        value = median([run[key] for run in runs.get(kind, [])])
        each = ", ".join(f"{run[key] / scale:.{digits}f}" for run in runs.get(kind, []))
        lines.append(f"{name:<44}{value / scale:>10.{digits}f}   {each}")

    for step in ("push", "pull"):
        for server in SERVERS:
            row(f"{server} {step} (s)", f"{server}_{step}", "seconds")
        for server in SERVERS:
            row(f"{server} {step} (MB/s of gzip)", f"{server}_{step}", "throughput", MB, 0)
        for server in SERVERS:
            row(f"server CPU, {server} {step} (s)", f"{server}_{step}", "server_cpu")
        for server in SERVERS:
            row(f"skopeo CPU, {step} to/from {server} (s)", f"{server}_{step}", "skopeo_cpu")
    for server in SERVERS:
        key = max(s[f"{server}_push_peak_rss"], s[f"{server}_pull_peak_rss"])
        lines.append(f"{f'peak RSS, one {server} process (MB)':<44}{key / MB:>10.0f}")
    lines += ["", f"{'ratio of times':<44}{'medians':>10}{'paired':>10}"]
    for step in ("push", "pull"):
        lines.append(
            f"{f'{step}, passthrough / cncf':<44}{s[f'{step}_ratio']:>10.2f}"
            f"{s[f'{step}_ratio_paired']:>10.2f}"
        )
    lines.append("(paired: the median of the ratios within each round)")
    lines += ["", f"{'goal':<44}{'value':>10}{'goal':>10}   met"]
    for goal in result["goals"]:
        g = Goal(goal["name"], goal["value"], goal["limit"], goal["at_most"], goal["unit"])
        limit = ("<= " if g.at_most else ">= ") + g.show(g.limit)
        lines.append(f"{g.name:<44}{g.show(g.value):>10}{limit:>10}   {'yes' if g.met else 'NO'}")
    lines.append(f"manifest on both servers: {result['manifest_digest']}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.hosted", description=__doc__.split("\n")[0])
    add_common_arguments(parser, repeat_help="rounds of push and pull (median)")
    parser.add_argument("--profile", action="store_true", help="py-spy a push and a pull")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.results is None:
        args.results = args.out
    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    machine_info = machine()
    image = load_or_build(args.out, args.dirs, rebuild=args.rebuild, log=log)
    work = Path(tempfile.mkdtemp(prefix="passthrough-bench-hosted-", dir=args.work_dir))
    try:
        bench = HostedBench(args, image, work)
        for number in range(args.repeat):
            log(f"round {number + 1} of {args.repeat}")
            bench.round(number)
        profiles = bench.profile() if args.profile else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = summarize(bench.runs)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine_info,
        "load_average_at_end": os.getloadavg(),
        "image": image.to_json(),
        "settings": {
            "workers": args.workers,
            "threads": args.threads,
            "repeat": args.repeat,
            "repo_root": str(args.repo_root),
            "server_env": dict(args.server_env),
            "code": code_version(args.repo_root),
            "work_dir": str(args.work_dir or tempfile.gettempdir()),
        },
        "runs": bench.runs,
        "summary": summary,
        "goals": [g.__dict__ | {"met": g.met} for g in goals(summary)],
        "manifest_digest": next(iter(bench.digests.values()), ""),
        "notes": bench.notes,
    }
    if profiles is not None:
        result["profile"] = profiles
    text = report(result)
    print()
    print(text)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    for name in (f"hosted-{stamp}.json", "hosted-latest.json"):
        (results / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    (results / "hosted-report-latest.txt").write_text(text + "\n")
    if profiles:
        from benchmarks.profile import describe

        print()
        print(describe(profiles, phases=("push", "pull")))
    print(f"\nresults: {results / f'hosted-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
