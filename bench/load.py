"""
A load test of cargobay (not part of the pytest suite): many concurrent
clients for a fixed time against the real ``twistd -n cargobay`` in front of
a real CNCF registry, everything on 127.0.0.1.

Each client holds a keep-alive HTTP/1.1 connection (asyncio, raw sockets) and
loops until the deadline over a mix of requests: manifests by tag and by
digest, tag lists, cached blobs and uncached blobs (a pusher uploads fresh
blobs to the upstream during the run; the first request for each is a miss,
the others join the download or hit the cache). Every answer is checked: the
status, the manifest's exact bytes, the tag list, the blob's sha256.

    .venv/bin/python bench/load.py [--clients 200] [--seconds 60] [--procs 2]

Reports total requests, errors (a correct run has none), throughput, p50/p99
latency (overall and per kind), cargobay's peak RSS and most open descriptors
(sampled every second), and the CPU used by cargobay and by the clients, so
that one can see which side was the limit. Exit status 1 when there were
errors. See bench/README.md ("Load test").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(1, str(REPO_ROOT))

from peers import OCI_MANIFEST, Registry, Twistd, build_oci_layout, fd_kinds, free_port, skopeo_push  # noqa: E402
from proxy import ALL, Proxy, write_config  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
IMAGE = "load/image"
BLOBS = "load/blobs"
REPOSITORIES = [(IMAGE, "up", IMAGE), (BLOBS, "up", BLOBS)]
TAGS = [f"v{i}" for i in range(12)]
#: Request kinds and their weights in the mix.
MIX = {
    "manifest-tag": 20,
    "manifest-digest": 20,
    "tags": 15,
    "blob-cached": 35,
    "blob-uncached": 10,
}
REQUEST_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------
# the upstream: an image, tags, blobs; fresh blobs pushed during the run
# ---------------------------------------------------------------------------


def push_blob(port: int, name: str, data: bytes) -> str:
    """A monolithic upload through the registry's API; the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/v2/{name}/blobs/uploads/")
        response = conn.getresponse()
        response.read()
        if response.status != 202:
            raise RuntimeError(f"upload start answered {response.status}")
        target = urllib.parse.urlsplit(response.getheader("Location") or "")
        path = target.path + "?" + (target.query + "&" if target.query else "") + f"digest={digest}"
        conn.request("PUT", path, body=data, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"upload answered {response.status}")
    finally:
        conn.close()
    return digest


def put_manifest(port: int, name: str, tag: str, body: bytes, media_type: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("PUT", f"/v2/{name}/manifests/{tag}", body=body, headers={"Content-Type": media_type})
        response = conn.getresponse()
        response.read()
        if response.status != 201:
            raise RuntimeError(f"manifest PUT answered {response.status}")
    finally:
        conn.close()


class Pusher(threading.Thread):
    """Pushes a fresh blob to the upstream every ``interval`` seconds until stopped."""

    def __init__(self, port: int, size: int, interval: float, shared: Any) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.size = size
        self.interval = interval
        self.shared = shared
        self.pushed = 0
        self.errors: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                digest = push_blob(self.port, BLOBS, os.urandom(self.size))
                self.shared.append(digest)
                self.pushed += 1
            except Exception as e:
                self.errors.append(repr(e))
            self.stop_event.wait(max(0.0, self.interval - (time.monotonic() - started)))


# ---------------------------------------------------------------------------
# the clients (in worker processes, asyncio, raw keep-alive connections)
# ---------------------------------------------------------------------------


class Failed(Exception):
    pass


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if head_only:
        return status, headers, b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, headers, b"".join(parts)
    length = headers.get("content-length")
    if length is None:
        raise Failed(f"response {status} without Content-Length or chunked encoding")
    return status, headers, await reader.readexactly(int(length))


class Client:
    def __init__(self, port: int, plan: dict[str, Any], shared: Any, deadline: float, seed: int) -> None:
        self.port = port
        self.plan = plan
        self.shared = shared
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.kinds = list(MIX)
        self.weights = [MIX[k] for k in self.kinds]
        self.fresh: list[str] = []
        self.fresh_at = 0.0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=4 * MiB)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    def pick(self) -> tuple[str, str, Any]:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        plan = self.plan
        if kind == "manifest-tag":
            return kind, f"/v2/{IMAGE}/manifests/{self.rng.choice(TAGS)}", plan["manifest_bytes"]
        if kind == "manifest-digest":
            return kind, f"/v2/{IMAGE}/manifests/{plan['manifest']}", plan["manifest_bytes"]
        if kind == "tags":
            return kind, f"/v2/{IMAGE}/tags/list", None
        if kind == "blob-uncached":
            # The newest pushed blobs: the first client asking misses, the
            # next ones join the download or hit.
            now = time.monotonic()
            if now - self.fresh_at > 0.5:
                self.fresh = list(self.shared[-8:])  # one round trip to the manager
                self.fresh_at = now
            if self.fresh:
                digest = self.rng.choice(self.fresh)
                return kind, f"/v2/{BLOBS}/blobs/{digest}", digest
            kind = "blob-cached"
        digest = self.rng.choice(plan["cached_blobs"])
        return kind, f"/v2/{BLOBS}/blobs/{digest}", digest

    def check(self, kind: str, expected: Any, status: int, headers: dict[str, str], body: bytes) -> None:
        if status != 200:
            raise Failed(f"{kind}: status {status}: {body[:200]!r}")
        if kind.startswith("manifest"):
            if body != expected:
                raise Failed(f"{kind}: other bytes ({len(body)})")
        elif kind == "tags":
            listed = json.loads(body)
            if listed.get("name") != IMAGE or set(listed.get("tags") or []) != set(TAGS):
                raise Failed(f"tags: {body[:200]!r}")
        elif "sha256:" + hashlib.sha256(body).hexdigest() != expected:
            raise Failed(f"{kind}: body does not match {expected} ({len(body)} bytes)")

    async def run(self, stats: dict[str, Any]) -> None:
        request_tail = (
            f" HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAuthorization: Bearer {self.plan['token']}\r\n"
            f"Accept: {OCI_MANIFEST}\r\nUser-Agent: cargobay-load\r\n\r\n"
        ).encode()
        while time.monotonic() < self.deadline:
            kind, path, expected = self.pick()
            started = time.perf_counter()
            try:
                if self.writer is None:
                    await self.connect()
                assert self.reader is not None and self.writer is not None
                self.writer.write(b"GET " + path.encode() + request_tail)
                status, headers, body = await asyncio.wait_for(read_response(self.reader), REQUEST_TIMEOUT)
                self.check(kind, expected, status, headers, body)
                if headers.get("connection", "").lower() == "close":
                    self.close()
            except (TimeoutError, Failed, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                stats["errors"] += 1
                if len(stats["error_samples"]) < 10:
                    stats["error_samples"].append(f"{kind} {path[:90]}: {type(e).__name__}: {str(e)[:200]}")
                self.close()
                continue
            elapsed = time.perf_counter() - started
            stats["latencies"][kind].append(elapsed)
            stats["bytes"] += len(body)
            if kind.startswith("blob"):
                stats["x_cache"][headers.get("x-cache", "-")] += 1
        self.close()


async def _lag_monitor(stats: dict[str, Any], deadline: float) -> None:
    """How late a 10 ms timer fires: the client's own event loop saturation."""
    while time.monotonic() < deadline:
        before = time.perf_counter()
        await asyncio.sleep(0.01)
        stats["loop_lag"].append(time.perf_counter() - before - 0.01)


async def _worker_main(port: int, plan: dict[str, Any], shared: Any, clients: int, deadline: float, seed: int) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "latencies": defaultdict(list), "errors": 0, "error_samples": [], "bytes": 0,
        "x_cache": Counter(), "loop_lag": [],
    }
    tasks = [Client(port, plan, shared, deadline, seed * 100_000 + i).run(stats) for i in range(clients)]
    await asyncio.gather(_lag_monitor(stats, deadline), *tasks)
    return stats


def worker(port: int, plan: dict[str, Any], shared: Any, clients: int, start_at: float, seconds: float,
           seed: int, results: Any) -> None:
    # Start together: wall clock, as monotonic clocks are not shared between processes.
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.monotonic() + seconds
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    stats = asyncio.run(_worker_main(port, plan, shared, clients, deadline, seed))
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_seconds"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    stats["latencies"] = dict(stats["latencies"])
    stats["x_cache"] = dict(stats["x_cache"])
    results.put(stats)


# ---------------------------------------------------------------------------
# watching cargobay
# ---------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """cargobay's RSS and open descriptors, every second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss_kib: list[int] = []
        self.fds: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.rss_kib.append(proc_status_kib(self.pid, "VmRSS"))
                self.fds.append(len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                pass
            self.stop_event.wait(1.0)


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def setup(work: Path, cached_count: int, cached_size: int) -> tuple[Registry, Proxy, dict[str, Any]]:
    upstream = Registry(work / "upstream").start()
    layout = build_oci_layout(work / "layout", "latest", layer_sizes=[2 * MiB, 512 * KiB])
    skopeo_push(work / "layout", "latest", f"{upstream.host}/{IMAGE}:latest")
    conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=60)
    conn.request("GET", f"/v2/{IMAGE}/manifests/latest", headers={"Accept": OCI_MANIFEST})
    response = conn.getresponse()
    manifest_bytes = response.read()
    conn.close()
    for tag in TAGS:
        put_manifest(upstream.port, IMAGE, tag, manifest_bytes, OCI_MANIFEST)
    # The tag "latest" was pushed by skopeo; the tag list is TAGS + latest.
    TAGS.append("latest")
    cached = [push_blob(upstream.port, BLOBS, os.urandom(cached_size)) for _ in range(cached_count)]
    port = free_port()
    config = write_config(work / "config.toml", port, work / "cache", [{"id": "up", "url": upstream.url}], REPOSITORIES)
    process = Twistd(config_path=config, log_path=work / "cargobay.log").start()
    try:
        process.wait_listening(port)
    except BaseException:
        process.stop()
        upstream.stop()
        raise
    proxy = Proxy(process, port, work / "cache")
    for digest in cached:
        status, _, body = proxy.request(f"/v2/{BLOBS}/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    status, _, body = proxy.request(f"/v2/{IMAGE}/manifests/{layout['manifest']}", headers={"Accept": OCI_MANIFEST})
    assert status == 200 and body == manifest_bytes, status
    plan = {"manifest": layout["manifest"], "manifest_bytes": manifest_bytes, "cached_blobs": cached, "token": ALL}
    return upstream, proxy, plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (connections), default 200")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the run, default 60")
    parser.add_argument("--procs", type=int, default=2, help="client processes the clients are spread over, default 2")
    parser.add_argument("--cached-blobs", type=int, default=16, help="blobs cached before the run, default 16")
    parser.add_argument("--cached-kib", type=int, default=256, help="size of each cached blob in KiB, default 256")
    parser.add_argument("--fresh-kib", type=int, default=1024, help="size of each blob pushed during the run, default 1024")
    parser.add_argument("--push-interval", type=float, default=0.5, help="seconds between fresh blobs, default 0.5")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cargobay-load-"))
    upstream: Registry | None = None
    proxy: Proxy | None = None
    pusher: Pusher | None = None
    sampler: Sampler | None = None
    manager = multiprocessing.Manager()
    try:
        log(f"starting the CNCF registry and cargobay in {work}")
        upstream, proxy, plan = setup(work, args.cached_blobs, args.cached_kib * KiB)
        pid = proxy.process.pid
        assert pid is not None
        fds_before = fd_kinds(pid, proxy.port)
        shared = manager.list()
        pusher = Pusher(upstream.port, args.fresh_kib * KiB, args.push_interval, shared)
        sampler = Sampler(pid)
        results = manager.Queue()
        procs = max(1, min(args.procs, args.clients))
        share = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
        start_at = time.time() + 1.0
        workers = [
            multiprocessing.Process(
                target=worker, args=(proxy.port, plan, shared, n, start_at, args.seconds, i + 1, results),
                daemon=True,
            )
            for i, n in enumerate(share)
        ]
        log(f"{args.clients} clients in {procs} processes for {args.seconds:g} s against cargobay on port {proxy.port}")
        for process in workers:
            process.start()
        time.sleep(max(0.0, start_at - time.time()))
        pusher.start()
        sampler.start()
        cpu_before = proc_cpu_seconds(pid)
        upstream_pid = upstream.process.pid if upstream.process is not None else None
        upstream_cpu_before = proc_cpu_seconds(upstream_pid) if upstream_pid else 0.0
        busy_before, total_before = machine_busy_seconds()
        wall_before = time.monotonic()
        collected = []
        for _ in workers:
            collected.append(results.get(timeout=args.seconds + REQUEST_TIMEOUT + 60))
        wall = time.monotonic() - wall_before
        cargobay_cpu = proc_cpu_seconds(pid) - cpu_before
        upstream_cpu = (proc_cpu_seconds(upstream_pid) - upstream_cpu_before) if upstream_pid else 0.0
        busy_after, total_after = machine_busy_seconds()
        for process in workers:
            process.join(timeout=30)
        pusher.stop_event.set()
        sampler.stop_event.set()
        pusher.join(timeout=60)
        sampler.join(timeout=5)
        peak_hwm = proc_status_kib(pid, "VmHWM")
        alive = proxy.process.returncode is None
        # Every client connection is closed now: cargobay must close its side
        # (idle upstream connections stay pooled for a while, by design).
        settle = time.monotonic() + 15
        fds_after = fd_kinds(pid, proxy.port)
        while fds_after["client"] and time.monotonic() < settle:
            time.sleep(0.2)
            fds_after = fd_kinds(pid, proxy.port)

        latencies: dict[str, list[float]] = defaultdict(list)
        errors = 0
        samples: list[str] = []
        x_cache: Counter[str] = Counter()
        body_bytes = 0
        client_cpu = 0.0
        lag: list[float] = []
        for stats in collected:
            for kind, values in stats["latencies"].items():
                latencies[kind].extend(values)
            errors += stats["errors"]
            samples.extend(stats["error_samples"])
            x_cache.update(stats["x_cache"])
            body_bytes += stats["bytes"]
            client_cpu += stats["cpu_seconds"]
            lag.extend(stats["loop_lag"])
        every = [v for values in latencies.values() for v in values]
        total = len(every) + errors
        report = {
            "clients": args.clients,
            "seconds": round(wall, 1),
            "client_processes": procs,
            "requests": total,
            "ok": len(every),
            "errors": errors,
            "error_samples": samples[:10],
            "throughput_rps": round(total / wall, 1),
            "body_mib_per_s": round(body_bytes / MiB / wall, 1),
            "p50_ms": round(percentile(every, 0.50) * 1000, 2),
            "p99_ms": round(percentile(every, 0.99) * 1000, 2),
            "max_ms": round(max(every) * 1000, 2) if every else None,
            "by_kind": {
                kind: {
                    "requests": len(values),
                    "p50_ms": round(percentile(values, 0.50) * 1000, 2),
                    "p99_ms": round(percentile(values, 0.99) * 1000, 2),
                }
                for kind, values in sorted(latencies.items())
            },
            "blob_x_cache": dict(x_cache),
            "fresh_blobs_pushed": pusher.pushed,
            "pusher_errors": pusher.errors[:5],
            "cargobay_peak_rss_mib": round(max([*sampler.rss_kib, 0]) / 1024, 1),
            "cargobay_vmhwm_mib": round(peak_hwm / 1024, 1),
            "cargobay_max_open_fds": max([*sampler.fds, 0]),
            "cargobay_fds_before": dict(fds_before),
            "cargobay_fds_after": dict(fds_after),
            "cargobay_cpu_percent": round(100 * cargobay_cpu / wall, 1),
            "clients_cpu_percent": round(100 * client_cpu / wall, 1),
            "upstream_cpu_percent": round(100 * upstream_cpu / wall, 1),
            "machine_busy_percent": round(100 * (busy_after - busy_before) / max(1e-9, total_after - total_before), 1),
            "client_loop_lag_p99_ms": round(percentile(lag, 0.99) * 1000, 2),
            "cargobay_alive": alive,
            "cpu_cores": os.cpu_count(),
        }
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        leaked = fds_after["client"] > 0
        return 0 if errors == 0 and alive and not pusher.errors and not leaked else 1
    finally:
        if pusher is not None:
            pusher.stop_event.set()
        if sampler is not None:
            sampler.stop_event.set()
        if proxy is not None:
            proxy.process.stop()
        if upstream is not None:
            upstream.stop()
        manager.shutdown()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def fmt_kinds(kinds: dict[str, int]) -> str:
    return f"{sum(kinds.values())} (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"


def print_report(r: dict[str, Any]) -> None:
    print()
    print(f"clients              {r['clients']} ({r['client_processes']} processes), {r['seconds']} s")
    print(f"requests             {r['requests']}  ok {r['ok']}  errors {r['errors']}")
    print(f"throughput           {r['throughput_rps']} req/s, {r['body_mib_per_s']} MiB/s of bodies")
    print(f"latency              p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  max {r['max_ms']} ms")
    for kind, k in r["by_kind"].items():
        print(f"  {kind:<18} {k['requests']:>8}  p50 {k['p50_ms']:>8} ms  p99 {k['p99_ms']:>8} ms")
    print(f"blob X-Cache         {r['blob_x_cache']}  (fresh blobs pushed during the run: {r['fresh_blobs_pushed']})")
    print(f"cargobay             peak RSS {r['cargobay_peak_rss_mib']} MiB (VmHWM {r['cargobay_vmhwm_mib']} MiB), "
          f"max open fds {r['cargobay_max_open_fds']}, CPU {r['cargobay_cpu_percent']}% of one core, "
          f"alive {r['cargobay_alive']}")
    print(f"cargobay fds         before the run {fmt_kinds(r['cargobay_fds_before'])}; "
          f"after it {fmt_kinds(r['cargobay_fds_after'])}")
    print(f"clients              CPU {r['clients_cpu_percent']}% of one core in total "
          f"(p99 event-loop lag {r['client_loop_lag_p99_ms']} ms)")
    print(f"upstream registry    CPU {r['upstream_cpu_percent']}% of one core")
    print(f"machine              {r['machine_busy_percent']}% busy over its {r['cpu_cores']} cores")
    if r["error_samples"]:
        print("first errors:")
        for sample in r["error_samples"]:
            print("  " + sample)
    if r["pusher_errors"]:
        print("pusher errors:", r["pusher_errors"])
    print()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
