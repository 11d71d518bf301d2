"""
cargobay's benchmark against real peers (issue #5), measured side by side in
one run:

- upstream: the CNCF registry (``docker-registry``), anonymous;
- the peer: a second CNCF registry in its own pull-through mode
  (``proxy: {remoteurl: upstream}``);
- the ceiling: nginx with ``sendfile on`` serving the same blob file;
- cargobay, the real ``twistd -n cargobay`` process.

Every scenario is measured on cargobay and on the peer alternately, several
rounds, and reported as medians with the ratio cargobay / peer next to the
issue's target. The figures are for comparison inside one run only: the
machine is shared and noisy. Nothing here passes or fails.

    .venv/bin/python bench/run.py [--rounds 3] [--only warm,cold,...] [--skip-docker]

Writes ``bench/results/latest.json`` and (with matplotlib) ``latest.png``.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO_ROOT))

from dockerd import DockerdError, start_dockerd  # noqa: E402
from tls import TestCA, TLSRegistry  # noqa: E402

from peers import OCI_MANIFEST, Registry, Twistd, build_oci_layout, free_port, push_blob, skopeo_push  # noqa: E402
from proxy import ALL, Proxy, write_config  # noqa: E402

MiB = 1024 * 1024
SCENARIOS = ("warm", "cold", "cold-tls", "herd", "herd-tls", "manifest", "memory", "docker")
RESULTS_DIR = BENCH_DIR / "results"

# Local repository names equal the upstream names, so that the same path works
# on cargobay, on the CNCF proxy and on the upstream itself.
BLOB_REPO = "bench/blob"
SMALL_REPO = "bench/small"
IMAGE_REPO = "bench/image"
REPOSITORIES = [(name, "up", name) for name in (BLOB_REPO, SMALL_REPO, IMAGE_REPO)]


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------
# peers and clients
# ---------------------------------------------------------------------------


class Nginx:
    """nginx, one process, ``sendfile on``, serving ``root`` on 127.0.0.1:<free port>."""

    def __init__(self, workdir: Path, root: Path) -> None:
        self.workdir = workdir
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            raise RuntimeError("nginx is not installed")
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (w / d).mkdir(exist_ok=True)
        conf = w / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {w}/access.log;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
""")
        self._log = open(w / "stdout.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [binary, "-p", str(w), "-c", str(conf), "-e", str(w / "error.log")],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                err = (w / "error.log").read_text(errors="replace") if (w / "error.log").exists() else ""
                raise RuntimeError(f"nginx exited with {self.process.returncode}: {err[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def start_cargobay(workdir: Path, upstream_url: str, cache_settings: str = "", ca_file: Path | None = None) -> Proxy:
    """
    Like tests/proxy.py's start_proxy, but stops the process if it never
    listens.  ``cache_settings``: extra TOML lines for its [cache] table;
    ``ca_file``: the CA of an HTTPS upstream.
    """
    port = free_port()
    cache = workdir / "cache"
    upstream: dict[str, Any] = {"id": "up", "url": upstream_url}
    if ca_file is not None:
        upstream["ca_file"] = ca_file
    config = write_config(workdir / "config.toml", port, cache, [upstream], REPOSITORIES, cache_settings)
    process = Twistd(config_path=config, log_path=workdir / "cargobay.log").start()
    try:
        process.wait_listening(port)
    except BaseException:
        process.stop()
        raise
    return Proxy(process, port, cache)


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def page_cache_write_rates(directory: Path, steps: int = 6, step_mib: int = 256) -> list[float]:
    """
    MB/s of writing new data into the page cache, C{step_mib} at a time,
    into one file that is then deleted.  On a VM whose balloon reports free
    memory to the host, the first touch of a page the host took back costs
    a fault on the host: once the few recently freed pages are used up, a
    write of new data (a cache fill, a push) runs an order of magnitude
    slower, and takes that much more CPU from whatever else runs.
    """
    path = directory / "page-cache-probe"
    chunk = os.urandom(MiB)
    rates = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for step in range(steps):
            began = time.perf_counter()
            for i in range(step_mib):
                os.pwrite(fd, chunk, (step * step_mib + i) * MiB)
            rates.append(step_mib * MiB / (time.perf_counter() - began) / 1e6)
    finally:
        os.close(fd)
        path.unlink()
    return rates


def blob_file(registry: Registry, digest: str) -> Path:
    hexdigest = digest.split(":", 1)[1]
    return registry.storage_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


@dataclass
class CurlResult:
    code: int
    size: int
    speed: float  # bytes per second
    seconds: float


def curl_args(url: str, headers: dict[str, str] | None, cacert: Path | None = None) -> list[str]:
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download} %{time_total}"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    if cacert is not None:
        args += ["--cacert", str(cacert)]
    return [*args, url]


def parse_curl(out: str) -> CurlResult:
    code, size, speed, seconds = out.split()
    return CurlResult(int(code), int(float(size)), float(speed), float(seconds))


def curl(url: str, headers: dict[str, str] | None = None, expect_size: int | None = None,
         cacert: Path | None = None) -> CurlResult:
    proc = subprocess.run(curl_args(url, headers, cacert), capture_output=True, text=True, timeout=1800,
                          stdin=subprocess.DEVNULL, check=False)
    result = parse_curl(proc.stdout)
    if result.code != 200 or (expect_size is not None and result.size != expect_size):
        raise RuntimeError(f"GET {url}: status {result.code}, {result.size} bytes (wanted {expect_size})")
    return result


def by_cargobay(agent: str) -> bool:
    return agent == "cargobay"


def by_peer(agent: str) -> bool:
    """The CNCF proxy's requests: neither cargobay's nor the script's own curls."""
    return agent != "cargobay" and not agent.startswith("curl/")


def upstream_gets(upstream: Registry, digest: str, start: int,
                  who: Callable[[str], bool] | None = None) -> tuple[int, int, int]:
    """
    (GET count, bytes sent, log length) for ``digest`` in the upstream's
    access log after ``start``, only by clients whose User-Agent ``who``
    accepts: a proxy's late background GET must not count for the other.
    """
    entries = upstream.access_log()
    mine = [e for e in entries[start:] if e.method == "GET" and digest in e.uri and (who is None or who(e.agent))]
    return len(mine), sum(e.size for e in mine), len(entries)


def wait_upstream_quiet(upstream: Registry, digest: str, start: int, at_least: int,
                        quiet: float = 1.5, timeout: float = 300.0,
                        who: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """
    Wait until the upstream has logged at least ``at_least`` GETs of
    ``digest`` since ``start`` and no new one for ``quiet`` seconds (the CNCF
    proxy keeps filling its cache in the background after its client is
    served; its log line is written when a response ends).
    """
    deadline = time.monotonic() + timeout
    last = (-1, -1)
    since = time.monotonic()
    while True:
        count, sent, _ = upstream_gets(upstream, digest, start, who)
        now = time.monotonic()
        if (count, sent) != last:
            last, since = (count, sent), now
        elif count >= at_least and now - since >= quiet:
            return count, sent
        if now > deadline:
            return count, sent
        time.sleep(0.2)


LAT_RE = re.compile(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
NON2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
ERRORS_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
TOTAL_RE = re.compile(r"(\d+) requests in")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


@dataclass
class WrkResult:
    rps: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int


def wrk(url: str, headers: dict[str, str], duration: float, threads: int, connections: int) -> WrkResult:
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 120,
                          stdin=subprocess.DEVNULL, check=False)
    out = proc.stdout
    rps, lat, total = RPS_RE.search(out), LAT_RE.search(out), TOTAL_RE.search(out)
    if proc.returncode != 0 or not rps or not lat or not total:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}\n{proc.stderr}")
    non2xx = NON2XX_RE.search(out)
    errors = ERRORS_RE.search(out)
    return WrkResult(
        rps=float(rps.group(1)),
        p99_ms=float(lat.group(1)) * _UNIT_MS[lat.group(2)],
        requests=int(total.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(x) for x in errors.groups()) if errors else 0,
    )


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    scenario: str
    unit: str
    peer_name: str
    cargobay: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    #: (what, op, value): what is "ratio" (cargobay / peer), "cargobay" (its
    #: median) or "cargobay_max" (its worst round).
    target: tuple[str, str, float] | None = None
    target_text: str = ""
    note: str = ""

    def medians(self) -> tuple[float | None, float | None, float | None]:
        c, p = median(self.cargobay), median(self.peer)
        ratio = c / p if c is not None and p not in (None, 0) else None
        return c, p, ratio

    def met(self) -> bool | None:
        if self.target is None:
            return None
        what, op, value = self.target
        c, _, ratio = self.medians()
        x = {"ratio": ratio, "cargobay": c,
             "cargobay_max": max(self.cargobay) if self.cargobay else None}[what]
        if x is None:
            return None
        return {">=": x >= value, "<=": x <= value, "==": x == value}[op]

    def as_json(self) -> dict[str, Any]:
        c, p, ratio = self.medians()
        d = asdict(self)
        d.update(cargobay_median=c, peer_median=p, ratio=ratio, met=self.met())
        d["cargobay_samples"], d["peer_samples"] = d.pop("cargobay"), d.pop("peer")
        return d


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("MB/s", "req/s", "MiB", "GETs"):
        return f"{value:,.0f}" if abs(value) >= 10 or unit == "GETs" else f"{value:.1f}"
    if unit in ("s", "ms"):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    header = ["scenario", "unit", "cargobay", "peer", "peer is", "ratio c/p", "target", "met"]
    lines = [header]
    for row in rows:
        c, p, ratio = row.medians()
        met = row.met()
        lines.append([
            row.scenario, row.unit, fmt(c, row.unit), fmt(p, row.unit), row.peer_name,
            "-" if ratio is None else f"{ratio:.2f}x", row.target_text or "-",
            {True: "yes", False: "NO", None: "-"}[met],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2, 3, 5}
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                             for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def chart(rows: list[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in rows if r.medians()[2] is not None]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(shown) + 1.6))
    labels, ratios, colors = [], [], []
    for r in shown:
        labels.append(f"{r.scenario} ({r.unit}) vs {r.peer_name}")
        ratios.append(r.medians()[2])
        colors.append({True: "tab:green", False: "tab:red", None: "tab:gray"}[r.met()])
    y = list(range(len(shown)))
    # Log scale, bars from 1: 0.5x and 2x are the same length either side.
    ax.set_xscale("log")
    ax.barh(y, [r - 1.0 for r in ratios], left=1.0, color=colors)
    for i, r in enumerate(shown):
        if r.target is not None and r.target[0] == "ratio":
            ax.plot([r.target[2], r.target[2]], [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.text(ratios[i], i, f" {ratios[i]:.2f}x ", va="center", fontsize=8,
                ha="left" if ratios[i] >= 1 else "right")
    ax.axvline(1.0, color="gray", linewidth=1)
    lo, hi = min([*ratios, 0.5]), max([*ratios, 2.0])
    ax.set_xlim(lo / 2.5, hi * 2.5)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("cargobay / peer (median, log scale); black tick = target; green met, red not, grey no target")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# the benchmark
@dataclass
class Side:
    """An upstream, and the CNCF proxy and cargobay in front of it."""

    name: str
    upstream: Registry
    peer: Registry
    cargobay: Proxy
    #: The CA of an HTTPS upstream, for curl's direct GETs.
    cacert: Path | None = None


# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.blob_size = args.blob_mib * MiB
        self.stoppers: list[Callable[[], None]] = []
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.auth = {"Authorization": f"Bearer {ALL}"}
        self.cache_settings = "\n".join(args.cache_setting)
        self._tls: Side | None = None
        if args.cache_setting:
            self.notes.append(f"cargobay ran with [cache] {'; '.join(args.cache_setting)}")

    # -- lifecycle ---------------------------------------------------------

    def later(self, stop: Callable[[], None]) -> None:
        self.stoppers.append(stop)

    def stop_all(self) -> None:
        while self.stoppers:
            stop = self.stoppers.pop()
            try:
                stop()
            except BaseException as e:  # noqa: BLE001 - keep stopping the rest
                print(f"warning: stopping failed: {e!r}", file=sys.stderr)

    def order(self, rnd: int, *items: Any) -> list[Any]:
        """Alternate who goes first from one round to the next."""
        return list(items) if rnd % 2 == 0 else list(reversed(items))

    def setup(self) -> None:
        log(f"work dir {self.tmp}")
        self.upstream = Registry(self.tmp / "upstream")
        self.later(self.upstream.stop)
        self.upstream.start()
        self.peer = Registry(self.tmp / "cncf-proxy", proxy_remoteurl=self.upstream.url)
        self.later(self.peer.stop)
        self.peer.start()
        self.cargobay = start_cargobay(self.tmp / "cargobay", self.upstream.url, self.cache_settings)
        self.later(self.cargobay.process.stop)
        self.plain = Side("plain", self.upstream, self.peer, self.cargobay)
        log(f"upstream {self.upstream.url}, CNCF proxy {self.peer.url}, cargobay {self.cargobay.url}")

    def tls_side(self) -> Side:
        """
        The same upstream storage served over HTTPS by a second registry
        process (pushes still go to the plain one), with a CNCF proxy and a
        cargobay of their own in front of it, both trusting its CA; started
        on first use.
        """
        if self._tls is None:
            self._tls = self._start_tls()
        return self._tls

    def _start_tls(self) -> Side:
        ca = TestCA(self.tmp / "ca")
        upstream = TLSRegistry(self.tmp / "upstream-tls", ca, ca.issue("upstream", ["localhost"], ["127.0.0.1"]))
        upstream.storage_dir = self.upstream.storage_dir
        self.later(upstream.stop)
        upstream.start()
        peer = Registry(self.tmp / "cncf-proxy-tls", proxy_remoteurl=upstream.url,
                        env={"SSL_CERT_FILE": str(ca.cert_path)})
        self.later(peer.stop)
        peer.start()
        cargobay = start_cargobay(self.tmp / "cargobay-tls", upstream.url, self.cache_settings, ca.cert_path)
        self.later(cargobay.process.stop)
        log(f"HTTPS upstream {upstream.url}, CNCF proxy {peer.url}, cargobay {cargobay.url}")
        return Side("tls", upstream, peer, cargobay, ca.cert_path)

    def blob_path(self, digest: str) -> str:
        return f"/v2/{BLOB_REPO}/blobs/{digest}"

    def get_cargobay(self, digest: str) -> CurlResult:
        return curl(self.cargobay.url + self.blob_path(digest), self.auth, self.blob_size)

    def get_peer(self, digest: str) -> CurlResult:
        return curl(self.peer.url + self.blob_path(digest), None, self.blob_size)

    # -- 1. warm blob ------------------------------------------------------

    def warm(self) -> None:
        a = self.args
        log(f"warm: pushing a {a.blob_mib} MiB blob")
        digest = push_blob(self.upstream, BLOB_REPO, self.blob_size)
        self.warm_digest = digest
        www = self.tmp / "nginx-www"
        www.mkdir(exist_ok=True)
        try:
            os.link(blob_file(self.upstream, digest), www / "blob")
        except OSError:
            shutil.copyfile(blob_file(self.upstream, digest), www / "blob")
        nginx = Nginx(self.tmp / "nginx", www)
        self.later(nginx.stop)
        nginx.start()
        log(f"warm: nginx {nginx.url}; warming both proxies")
        self.get_cargobay(digest)
        self.get_peer(digest)
        wait_upstream_quiet(self.upstream, digest, 0, at_least=3)
        start = len(self.upstream.access_log())
        self.get_cargobay(digest)  # now a hit for both
        self.get_peer(digest)
        vs_peer = Row("warm_vs_cncf", "1 warm blob", "MB/s", "CNCF proxy",
                      target=("ratio", ">=", 1.0), target_text=">=1.0x")
        vs_nginx = Row("warm_vs_nginx", "1 warm blob", "MB/s", "nginx",
                       target=("ratio", ">=", 0.9), target_text=">=0.9x")
        nginx_samples: list[float] = []
        for rnd in range(a.rounds):
            c, p, n = [], [], []
            for _ in range(a.warm_repeats):
                for who in self.order(rnd, "cargobay", "peer", "nginx"):
                    if who == "cargobay":
                        c.append(self.get_cargobay(digest).speed / 1e6)
                    elif who == "peer":
                        p.append(self.get_peer(digest).speed / 1e6)
                    else:
                        n.append(curl(nginx.url + "/blob", None, self.blob_size).speed / 1e6)
            vs_peer.cargobay.append(median(c))
            vs_peer.peer.append(median(p))
            nginx_samples.append(median(n))
            log(f"warm round {rnd + 1}: cargobay {median(c):.0f} MB/s, CNCF proxy {median(p):.0f}, "
                f"nginx {median(n):.0f}")
        vs_nginx.cargobay = list(vs_peer.cargobay)
        vs_nginx.peer = nginx_samples
        self.rows += [vs_peer, vs_nginx]
        after = upstream_gets(self.upstream, digest, start)[0]
        if after:
            self.notes.append(f"warm: the upstream saw {after} GETs of the warm blob during the "
                              "measured rounds (should be 0)")
        if a.py_spy:
            self.profile_warm(digest)

    def profile(self, name: str, what: str, step: Callable[[], tuple[float, float]]) -> None:
        """
        Sample cargobay with py-spy (idle time excluded) while ``step`` runs
        again and again, until the steps' measured seconds reach --py-spy;
        ``step`` returns (seconds to count, MB/s). Writes
        bench/results/py-spy-NAME.txt (top frames) and .raw (collapsed stacks).
        """
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(py_spy):
            self.notes.append("py-spy: not installed (pip install py-spy into the venv)")
            return
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        raw = RESULTS_DIR / f"py-spy-{name}.raw"
        log(f"{name}: py-spy on cargobay (pid {self.cargobay.process.pid}) for {self.args.py_spy:g} s of GETs")
        spy = subprocess.Popen(
            [py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "250",
             "--pid", str(self.cargobay.process.pid), "--output", str(raw)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.later(lambda: spy.poll() is None and spy.kill())
        time.sleep(1.0)  # py-spy attaches
        spent, speeds = 0.0, []
        while spent < self.args.py_spy and spy.poll() is None:
            seconds, speed = step()
            spent += seconds
            speeds.append(speed)
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
        try:
            out, _ = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            out, _ = spy.communicate()
        if not raw.exists():
            self.notes.append(f"py-spy failed ({spy.returncode}): {(out or '').strip()[-300:]}")
            return
        text = (f"py-spy on cargobay during {what} ({len(speeds)} GETs, median {median(speeds) or 0:.0f} MB/s "
                f"while sampled)\n\n" + summarize_py_spy(raw))
        (RESULTS_DIR / f"py-spy-{name}.txt").write_text(text)
        self.extra[f"py_spy_{name}"] = text
        log(f"{name}: py-spy summary in bench/results/py-spy-{name}.txt")

    def profile_warm(self, digest: str) -> None:
        def step() -> tuple[float, float]:
            r = self.get_cargobay(digest)
            return r.seconds, r.speed / 1e6

        self.profile("warm", f"warm GETs of a {self.args.blob_mib} MiB blob", step)

    def profile_cold(self) -> None:
        def step() -> tuple[float, float]:
            r = self.get_cargobay(push_blob(self.upstream, BLOB_REPO, self.blob_size))
            return r.seconds, r.speed / 1e6

        self.profile("cold", f"cold GETs of fresh {self.args.blob_mib} MiB blobs (pushes not sampled: idle)", step)

    # -- 2. cold blob ------------------------------------------------------

    def cold(self, side: Side | None = None) -> None:
        a = self.args
        side = side or self.plain
        tls = side.cacert is not None
        key, scenario = ("cold_tls", "2b cold, HTTPS upstream") if tls else ("cold", "2 cold blob")
        vs_peer = Row(f"{key}_vs_cncf", scenario, "MB/s", "CNCF proxy",
                      target=("ratio", ">=", 1.0), target_text=">=1.0x",
                      note="the cold target with an HTTPS upstream, as real registries are" if tls else "")
        vs_direct = Row(f"{key}_vs_upstream", scenario, "MB/s", "upstream direct",
                        note="informational: the upstream served straight, no proxy")
        gets = Row(f"{key}_gets", "2b cold HTTPS upstream GETs" if tls else "2 cold upstream GETs", "GETs", "CNCF proxy",
                   note="informational: upstream GETs per cold GET, background fill included")
        sent = Row(f"{key}_bytes", "2b cold HTTPS upstream sent" if tls else "2 cold upstream sent", "MiB",
                   "CNCF proxy", note="informational: what the upstream sent per cold GET, background fill "
                                      "included (cargobay's second GET, if any, asks for the rest of the blob)")
        again = Row(f"{key}_again", "2b first GET after the fill" if tls else "2 first GET after the fill", "MB/s",
                    "CNCF proxy", note="informational: the same blob once more, once each proxy has stored it: "
                                       "cargobay wrote its file past the page cache (O_DIRECT) and read it "
                                       "back before making it an entry; the CNCF proxy's went through the "
                                       "page cache")
        cpu_get = Row(f"{key}_cpu_get", "2b cold CPU in the GET" if tls else "2 cold CPU in the GET", "CPU-s",
                      "CNCF proxy", note="informational: the proxy's CPU seconds (user + system, all threads) "
                                         "while the client's GET ran")
        cpu_all = Row(f"{key}_cpu_all", "2b cold CPU, fill included" if tls else "2 cold CPU, fill included",
                      "CPU-s", "CNCF proxy", note="informational: the proxy's CPU seconds from the GET until its "
                                                  "cache holds the blob (cargobay's read-back, the CNCF proxy's "
                                                  "second download)")
        upstream, path = side.upstream, self.blob_path
        pids = {"cargobay": side.cargobay.process.pid, "peer": side.peer.process.pid}
        digests: list[str] = []
        for rnd in range(a.rounds):
            log(f"{key} round {rnd + 1}: pushing a fresh {a.blob_mib} MiB blob")
            digest = push_blob(self.upstream, BLOB_REPO, self.blob_size)
            figures = {}
            for who in self.order(rnd, "cargobay", "peer", "upstream"):
                start = len(upstream.access_log())
                cpu = proc_cpu_seconds(pids[who]) if who in pids else 0.0
                if who == "cargobay":
                    figures[who] = curl(side.cargobay.url + path(digest), self.auth, self.blob_size).speed / 1e6
                    cpu_get.cargobay.append(proc_cpu_seconds(pids[who]) - cpu)
                    # When its disk fell behind, cargobay fills its cache in the
                    # background too: wait for that as for the CNCF proxy's.
                    side.cargobay.cached_blob(digest, timeout=300)
                    wait_upstream_quiet(upstream, digest, start, at_least=1, who=by_cargobay)
                    cpu_all.cargobay.append(proc_cpu_seconds(pids[who]) - cpu)
                    again.cargobay.append(curl(side.cargobay.url + path(digest), self.auth,
                                               self.blob_size).speed / 1e6)
                elif who == "peer":
                    figures[who] = curl(side.peer.url + path(digest), None, self.blob_size).speed / 1e6
                    cpu_get.peer.append(proc_cpu_seconds(pids[who]) - cpu)
                    # Its background cache fill competes with whatever runs next.
                    self.peer_filled(digest, side.peer)
                    wait_upstream_quiet(upstream, digest, start, at_least=2, who=by_peer)
                    cpu_all.peer.append(proc_cpu_seconds(pids[who]) - cpu)
                    again.peer.append(curl(side.peer.url + path(digest), None, self.blob_size).speed / 1e6)
                else:
                    figures[who] = curl(upstream.url + path(digest), None, self.blob_size, side.cacert).speed / 1e6
            digests.append(digest)
            vs_peer.cargobay.append(figures["cargobay"])
            vs_peer.peer.append(figures["peer"])
            vs_direct.cargobay.append(figures["cargobay"])
            vs_direct.peer.append(figures["upstream"])
            log(f"{key} round {rnd + 1}: cargobay {figures['cargobay']:.0f} MB/s, CNCF proxy "
                f"{figures['peer']:.0f}, upstream direct {figures['upstream']:.0f}")
        self.count_upstream(key, digests, gets, sent, upstream)
        self.rows += [vs_peer, vs_direct, gets, sent, cpu_get, cpu_all, again]
        if a.py_spy and not tls:
            self.profile_cold()

    # -- 3. thundering herd ------------------------------------------------

    def herd_once(self, url: str, headers: dict[str, str] | None) -> tuple[float, list[CurlResult]]:
        n = self.args.clients
        started = time.monotonic()
        procs = [subprocess.Popen(curl_args(url, headers), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  stdin=subprocess.DEVNULL, text=True) for _ in range(n)]
        try:
            outs = [p.communicate(timeout=1800)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        wall = time.monotonic() - started
        results = [parse_curl(o) for o in outs]
        bad = [r for r in results if r.code != 200 or r.size != self.blob_size]
        if bad:
            raise RuntimeError(f"herd on {url}: {len(bad)} of {n} clients failed: {bad[:3]}")
        return wall, results

    def herd(self, side: Side | None = None) -> None:
        a = self.args
        side = side or self.plain
        tls = side.cacert is not None
        key, scenario = ("herd_tls", f"3b herd x{a.clients}, HTTPS upstream") if tls else ("herd", f"3 herd x{a.clients}")
        wall = Row(f"{key}_wall", f"{scenario} wall", "s", "CNCF proxy",
                   target=("ratio", "<=", 0.5), target_text="<=0.5x",
                   note="the herd target with an HTTPS upstream, as real registries are" if tls else "")
        gets = Row(f"{key}_gets", f"{scenario} upstream GETs", "GETs", "CNCF proxy",
                   target=("cargobay_max", "==", 1), target_text="cargobay = 1")
        sent = Row(f"{key}_bytes", f"{scenario} upstream sent", "MiB", "CNCF proxy",
                   target=("cargobay_max", "<=", a.blob_mib), target_text=f"cargobay = {a.blob_mib} MiB")
        upstream = side.upstream
        digests: list[str] = []
        for rnd in range(a.rounds):
            log(f"{key} round {rnd + 1}: pushing a fresh {a.blob_mib} MiB blob")
            digest = push_blob(self.upstream, BLOB_REPO, self.blob_size)
            for who in self.order(rnd, "cargobay", "peer"):
                start = len(upstream.access_log())
                if who == "cargobay":
                    seconds, _ = self.herd_once(side.cargobay.url + self.blob_path(digest), self.auth)
                    # Its cache fill (fsync, the read-back into the page cache)
                    # ends after the clients': waited for, as the CNCF proxy's
                    # is, so that it does not run into what is measured next.
                    side.cargobay.cached_blob(digest, timeout=300)
                    count, nbytes = wait_upstream_quiet(upstream, digest, start, at_least=1, who=by_cargobay)
                    wall.cargobay.append(seconds)
                else:
                    seconds, _ = self.herd_once(side.peer.url + self.blob_path(digest), None)
                    self.peer_filled(digest, side.peer)
                    count, nbytes = wait_upstream_quiet(upstream, digest, start, at_least=2, who=by_peer)
                    wall.peer.append(seconds)
                log(f"{key} round {rnd + 1}: {who}: {seconds:.2f} s, upstream {count} GETs, "
                    f"{nbytes / MiB:.0f} MiB so far")
            digests.append(digest)
        self.count_upstream(key, digests, gets, sent, upstream)
        self.rows += [wall, gets, sent]

    def count_upstream(self, key: str, digests: list[str], gets: Row, sent: Row, upstream: Registry) -> None:
        """
        Each proxy's GETs of each round's digest and the MiB they fetched,
        counted once all is quiet over the whole log, by User-Agent: a late
        background GET belongs to the proxy that made it.
        """
        for rnd, digest in enumerate(digests, 1):
            for row_gets, row_sent, who, name in ((gets.cargobay, sent.cargobay, by_cargobay, "cargobay"),
                                                  (gets.peer, sent.peer, by_peer, "peer")):
                count, nbytes = self.gets_of(digest, who, upstream)
                row_gets.append(count)
                row_sent.append(nbytes / MiB)
                log(f"{key} round {rnd}: {name}: upstream {count} GETs, {nbytes / MiB:.0f} MiB in all")

    def peer_filled(self, digest: str, peer: Registry | None = None, timeout: float = 300.0) -> None:
        """
        Wait for the CNCF proxy's background fill of ``digest`` to be stored:
        its upstream GET is logged only when it ends, so a quiet log alone
        let the next measurement start while it still ran.
        """
        deadline = time.monotonic() + timeout
        while not blob_file(peer or self.peer, digest).exists():
            if time.monotonic() > deadline:
                log(f"the CNCF proxy has not stored {digest} after {timeout:.0f} s; going on")
                return
            time.sleep(0.1)

    def gets_of(self, digest: str, who: Callable[[str], bool], upstream: Registry | None = None) -> tuple[int, int]:
        """A proxy's GETs of ``digest`` over the whole run, once the upstream is quiet."""
        return wait_upstream_quiet(upstream or self.upstream, digest, 0, at_least=1, quiet=1.0, who=who)

    # -- 4. manifest rate --------------------------------------------------

    def manifest(self) -> None:
        a = self.args
        log("manifest: pushing a small image")
        layout = build_oci_layout(self.tmp / "small-image", "latest", layer_sizes=[4096])
        skopeo_push(self.tmp / "small-image", "latest", f"{self.upstream.host}/{SMALL_REPO}:latest")
        digest = layout["manifest"]
        accept = {"Accept": OCI_MANIFEST}
        # The config blob too: every pull fetches one, and it is as small as a manifest.
        targets = {
            "manifest by tag": ("manifest_tag", f"/v2/{SMALL_REPO}/manifests/latest", ""),
            "manifest by digest": ("manifest_digest", f"/v2/{SMALL_REPO}/manifests/{digest}", ""),
            "config blob": ("config_blob", f"/v2/{SMALL_REPO}/blobs/{layout['configs'][0]}",
                            "a cached blob of a config's size; the manifest rate's target"),
        }
        for _key, path, _note in targets.values():
            for url, headers in ((self.cargobay.url, {**accept, **self.auth}), (self.peer.url, accept)):
                for _ in range(2):
                    result = curl(url + path, headers)
                    if result.code != 200:
                        raise RuntimeError(f"warm-up {url}{path}: {result.code}")
        time.sleep(1)  # the CNCF proxy stores a blob in the background
        for what, (key, path, note) in targets.items():
            rps = Row(f"{key}_rps", f"4 {what}", "req/s", "CNCF proxy",
                      target=("ratio", ">=", 2.0), target_text=">=2.0x", note=note)
            p99 = Row(f"{key}_p99", f"4 {what} p99", "ms", "CNCF proxy",
                      target=("ratio", "<=", 1.0), target_text="<=1.0x", note=note)
            for rnd in range(a.rounds):
                for who in self.order(rnd, "cargobay", "peer"):
                    if who == "cargobay":
                        r = wrk(self.cargobay.url + path, {**accept, **self.auth}, a.wrk_duration,
                                a.wrk_threads, a.wrk_connections)
                        rps.cargobay.append(r.rps)
                        p99.cargobay.append(r.p99_ms)
                    else:
                        r = wrk(self.peer.url + path, accept, a.wrk_duration, a.wrk_threads, a.wrk_connections)
                        rps.peer.append(r.rps)
                        p99.peer.append(r.p99_ms)
                    if r.non2xx or r.socket_errors:
                        self.notes.append(f"{what}, {who}, round {rnd + 1}: {r.non2xx} non-2xx "
                                          f"and {r.socket_errors} socket errors of {r.requests} requests")
                    log(f"{what} round {rnd + 1}: {who}: {r.rps:.0f} req/s, p99 {r.p99_ms:.2f} ms"
                        + (f" ({r.non2xx} non-2xx, {r.socket_errors} socket errors)"
                           if r.non2xx or r.socket_errors else ""))
            self.rows += [rps, p99]

    # -- 5. memory ---------------------------------------------------------

    def rss_during(self, side: Side | None = None) -> None:
        side = side or self.plain
        which = "2b, 3b" if side.cacert is not None else "1-3"
        c = side.cargobay.rss_peak_kib() / 1024
        p = proc_status_kib(side.peer.process.pid, "VmHWM") if side.peer.process else None
        row = Row("rss_peak_tls" if side.cacert is not None else "rss_peak", f"5 peak RSS ({which})", "MiB",
                  "CNCF proxy", target=("cargobay", "<=", 150), target_text="cargobay <=150 MiB",
                  note=f"VmHWM of the long-running processes after scenarios {which}")
        row.cargobay.append(c)
        if p is not None:
            row.peer.append(p / 1024)
        self.rows.append(row)
        log(f"memory: peak RSS after scenarios {which}: cargobay {c:.0f} MiB, CNCF proxy "
            f"{(p or 0) / 1024:.0f} MiB")

    def memory(self) -> None:
        a = self.args
        big = a.big_blob_mib * MiB
        log(f"memory: pushing a {a.big_blob_mib} MiB blob")
        big_digest = push_blob(self.upstream, BLOB_REPO, big)
        small_digest = getattr(self, "warm_digest", None)
        if small_digest is None:
            log(f"memory: pushing a {a.blob_mib} MiB blob")
            small_digest = push_blob(self.upstream, BLOB_REPO, self.blob_size)
        row = Row("rss_big_vs_small", f"5 peak RSS {a.big_blob_mib} vs {a.blob_mib} MiB blob", "MiB",
                  f"same, {a.blob_mib} MiB", target=("ratio", "<=", 1.10), target_text="<=1.10x",
                  note="fresh cargobay per blob and round: one cold GET then one warm GET; VmHWM")
        baselines = []
        for rnd in range(a.rounds):
            for label in self.order(rnd, "big", "small"):
                digest, size = (big_digest, big) if label == "big" else (small_digest, self.blob_size)
                workdir = self.tmp / f"mem-{label}-{rnd}"
                proxy = start_cargobay(workdir, self.upstream.url, self.cache_settings)
                try:
                    proxy.request("/v2/")
                    baselines.append(proc_status_kib(proxy.process.pid or 0, "VmHWM") or 0)
                    url = proxy.url + self.blob_path(digest)
                    curl(url, self.auth, size)
                    curl(url, self.auth, size)
                    peak = proxy.rss_peak_kib() / 1024
                finally:
                    proxy.process.stop()
                    shutil.rmtree(workdir, ignore_errors=True)
                (row.cargobay if label == "big" else row.peer).append(peak)
                log(f"memory round {rnd + 1}: {size // MiB} MiB blob: peak RSS {peak:.1f} MiB")
        self.extra["rss_after_start_mib"] = median(baselines) / 1024 if baselines else None
        self.rows.append(row)

    # -- 6. docker pull ----------------------------------------------------

    def docker(self) -> None:
        a = self.args
        if a.skip_docker:
            self.notes.append("docker: skipped (--skip-docker)")
            return
        try:
            dockerd = start_dockerd(self.tmp / "dockerd", self.later)
        except (DockerdError, OSError, subprocess.TimeoutExpired) as e:
            note = f"docker: skipped, dockerd could not start: {str(e).splitlines()[0]}"
            print(note)
            self.notes.append(note)
            return
        layer = a.image_mib * MiB // 5
        log(f"docker: building and pushing a 5-layer image of {a.image_mib} MiB")
        built = build_oci_layout(self.tmp / "image", "latest", layer_sizes=[layer] * 5)
        skopeo_push(self.tmp / "image", "latest", f"{self.upstream.host}/{IMAGE_REPO}:latest")
        self.extra["docker_image_bytes"] = sum(built["layer_blob_sizes"])
        dockerd.login(self.cargobay.host, "bench", ALL)
        refs = {"cargobay": f"{self.cargobay.host}/{IMAGE_REPO}:latest",
                "upstream": f"{self.upstream.host}/{IMAGE_REPO}:latest"}

        def pull(ref: str) -> float:
            started = time.monotonic()
            dockerd.cli("pull", "-q", ref)
            seconds = time.monotonic() - started
            dockerd.cli("rmi", "-f", ref)
            return seconds

        log("docker: warm-up pulls (cargobay caches the layers)")
        for ref in refs.values():
            pull(ref)
        row = Row("docker_pull", "6 docker pull warm", "s", "upstream direct",
                  target=("ratio", "<=", 1.1), target_text="<=1.1x")
        pids = {"cargobay": self.cargobay.process.pid, "upstream": self.upstream.process.pid}
        for rnd in range(a.rounds):
            for who in self.order(rnd, "cargobay", "upstream"):
                cpu = proc_cpu_seconds(pids[who])
                seconds = pull(refs[who])
                cpu = proc_cpu_seconds(pids[who]) - cpu
                (row.cargobay if who == "cargobay" else row.peer).append(seconds)
                log(f"docker round {rnd + 1}: {who}: {seconds:.2f} s, {cpu:.2f} CPU seconds in "
                    f"{'cargobay' if who == 'cargobay' else 'the upstream'}")
        self.rows.append(row)
        warm_stalls = self.tls_stalls(dockerd)
        self.docker_cold(pull, layer)
        cold_stalls = self.tls_stalls(dockerd) - warm_stalls
        for stalls, which in ((warm_stalls, f"{1 + a.rounds} warm"), (cold_stalls, f"{a.rounds} cold")):
            if stalls:
                self.notes.append(
                    f"docker: {stalls} of the {which} pulls through cargobay waited for a TLS handshake "
                    "timeout (10 s) on cargobay's plain-HTTP port before falling back to HTTP (dockerd.log); "
                    "the CNCF registry answers a TLS hello on its plain port at once"
                )

    def tls_stalls(self, dockerd: Any) -> int:
        """
        Pulls through cargobay so far that waited for docker's TLS handshake
        timeout. Docker tries HTTPS first on 127.0.0.0/8 and falls back to
        HTTP. Go's server answers a TLS hello on a plain port at once; a
        server that waits for an HTTP line instead costs a TLS handshake
        timeout (10 s).
        """
        needle = f'https://{self.cargobay.host}/v2/\\": net/http: TLS handshake timeout'
        return sum(1 for line in dockerd.log_text().splitlines()
                   if "Error getting v2 registry" in line and needle in line)

    def docker_cold(self, pull: Callable[[str], float], layer: int) -> None:
        """
        A fresh image every round, pulled through cargobay (cold), straight
        from the upstream, and through the CNCF proxy (cold too: its cache is
        its own), in alternating order.
        """
        a = self.args
        vs_upstream = Row("docker_pull_cold", "6b docker pull cold", "s", "upstream direct",
                          note="informational: a fresh image every round; the proxy shares the 2 cores "
                               "with dockerd's extraction (its CPU seconds per pull are logged)")
        vs_peer = Row("docker_pull_cold_cncf", "6b docker pull cold", "s", "CNCF proxy",
                      note="informational: the same fresh image through the CNCF proxy")
        for rnd in range(a.rounds):
            tag = f"cold{rnd + 1}"
            log(f"docker cold round {rnd + 1}: building and pushing a fresh {a.image_mib} MiB image")
            layout = self.tmp / f"image-{tag}"
            built = build_oci_layout(layout, tag, layer_sizes=[layer] * 5)
            skopeo_push(layout, tag, f"{self.upstream.host}/{IMAGE_REPO}:{tag}")
            shutil.rmtree(layout, ignore_errors=True)
            hosts = {"cargobay": self.cargobay.host, "upstream": self.upstream.host, "peer": self.peer.host}
            seconds: dict[str, float] = {}
            pids = {"cargobay": self.cargobay.process.pid, "upstream": self.upstream.process.pid,
                    "peer": self.peer.process.pid}
            for who in self.order(rnd, "cargobay", "upstream", "peer"):
                cpu = proc_cpu_seconds(pids[who])
                seconds[who] = pull(f"{hosts[who]}/{IMAGE_REPO}:{tag}")
                # Both proxies' cache fills end before the next pull starts,
                # and their CPU seconds count with the pull's.
                for digest in built["layers"] + built["configs"]:
                    if who == "cargobay":
                        self.cargobay.cached_blob(digest, timeout=300)
                    elif who == "peer":
                        self.peer_filled(digest)
                cpu = proc_cpu_seconds(pids[who]) - cpu
                log(f"docker cold round {rnd + 1}: {who}: {seconds[who]:.2f} s, "
                    f"{cpu:.2f} CPU seconds in {'the upstream' if who == 'upstream' else 'the proxy, its cache fill included'}")
            vs_upstream.cargobay.append(seconds["cargobay"])
            vs_upstream.peer.append(seconds["upstream"])
            vs_peer.cargobay.append(seconds["cargobay"])
            vs_peer.peer.append(seconds["peer"])
        self.rows += [vs_upstream, vs_peer]

    # -- all ---------------------------------------------------------------

    def run(self, only: set[str]) -> None:
        self.probe_host("before")
        self.setup()
        if "warm" in only:
            self.warm()
        if "cold" in only:
            self.cold()
        if "cold-tls" in only:
            self.cold(self.tls_side())
        if "herd" in only:
            self.herd()
        if "herd-tls" in only:
            self.herd(self.tls_side())
        if only & {"warm", "cold", "herd"}:
            self.rss_during()
        if only & {"cold-tls", "herd-tls"}:
            self.rss_during(self.tls_side())
        if "manifest" in only:
            self.manifest()
        if "memory" in only:
            self.memory()
        if "docker" in only:
            self.docker()
        self.probe_host("after")

    def probe_host(self, when: str) -> None:
        rates = page_cache_write_rates(self.tmp)
        self.extra[f"page_cache_write_mb_s_{when}"] = [round(r) for r in rates]
        log(f"host {when} the run: new data into the page cache at "
            + ", ".join(f"{r:.0f}" for r in rates) + " MB/s (256 MiB steps)")
        if when == "after":
            first = self.extra.get("page_cache_write_mb_s_before") or rates
            self.notes.append(
                "host: writing new data into the page cache ran at "
                f"{min(first + rates):.0f}-{max(first + rates):.0f} MB/s in 256 MiB steps (before and after "
                "the run); a VM whose balloon reports free pages to its host makes a first touch "
                "slow, which a cache fill or a push within a measurement then pays for")


def summarize_py_spy(raw: Path, top: int = 25) -> str:
    """Top frames by own samples and by samples including callees, from py-spy's raw (collapsed) output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    if not samples:
        return "no samples"

    def block(title: str, counts: dict[str, int]) -> list[str]:
        lines = [title]
        for frame, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * n / samples:5.1f}%  {frame}")
        return lines

    return "\n".join([f"{samples} samples", *block("own time (leaf frames):", own), "",
                      *block("total time (frame on the stack):", total)])


def source_revision() -> str:
    """The commit cargobay ran from, with "+dirty" when cargobay/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "cargobay", "twisted"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    def first_line(args: list[str]) -> str:
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "missing"

    return {
        "docker-registry": first_line(["docker-registry", "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "curl": first_line(["curl", "--version"]),
        "dockerd": first_line(["dockerd", "--version"]),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blob-mib", type=int, default=256, help="blob size for scenarios 1-3 (MiB)")
    parser.add_argument("--big-blob-mib", type=int, default=2048, help="the big blob of the memory scenario (MiB)")
    parser.add_argument("--image-mib", type=int, default=500, help="total size of the 5-layer docker image (MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the herd")
    parser.add_argument("--warm-repeats", type=int, default=5, help="warm GETs per proxy per round (median)")
    parser.add_argument("--wrk-duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-connections", type=int, default=50)
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios among {','.join(SCENARIOS)}")
    parser.add_argument("--skip-docker", action="store_true")
    parser.add_argument("--cache-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a TOML line for cargobay's [cache] table, e.g. leave_disk_after_seconds=0 "
                             "(repeatable; the defaults otherwise)")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                        help="after the warm and the cold rounds, profile cargobay with py-spy for this many seconds of GETs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, storage)")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the work directory")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")

    # Signals unwind like Ctrl-C, so that the finally block below stops everything.
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT explicitly too: a shell starting us in the background ignores it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cargobay-bench-", dir=args.workdir))
    bench = Bench(args, tmp)
    started = datetime.now(UTC)
    revision = source_revision()
    error: BaseException | None = None
    try:
        bench.run(only)
    except KeyboardInterrupt as e:
        error = e
        print("\ninterrupted; stopping everything", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - report what was measured so far
        error = e
        import traceback

        traceback.print_exc()
    finally:
        bench.stop_all()
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = bench.rows
    if error is not None:
        bench.notes.append(f"the run stopped early: {error!r}")
    print()
    print(f"cargobay {revision} benchmark, {started:%Y-%m-%d %H:%M} UTC, {args.rounds} rounds, medians; "
          f"blob {args.blob_mib} MiB, herd {args.clients} clients, ratio = cargobay / peer")
    print(table(rows) if rows else "(nothing measured)")
    for note in bench.notes:
        print(f"note: {note}")
    if "rss_after_start_mib" in bench.extra and bench.extra["rss_after_start_mib"]:
        print(f"note: a fresh cargobay's RSS after start and one /v2/ request: "
              f"{bench.extra['rss_after_start_mib']:.0f} MiB")

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cargobay_revision": revision,
        "versions": versions(),
        "complete": error is None,
        "rows": [r.as_json() for r in rows],
        "notes": bench.notes,
        "extra": bench.extra,
        "table": table(rows) if rows else "",
    }
    # An interrupted or broken run does not replace the last complete one.
    stem = "latest" if error is None else "partial"
    json_path, png_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.png"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    title = f"cargobay vs peers, {started:%Y-%m-%d %H:%M} UTC, {args.rounds} rounds (medians)"
    if chart(rows, png_path, title):
        print(f"written: {json_path}, {png_path}")
    else:
        print(f"written: {json_path} (no chart: matplotlib is not installed or nothing to plot)")
    # Targets missed are reported, not failed; only a broken run exits non-zero.
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
