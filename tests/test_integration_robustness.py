"""
Robustness of the real `twistd -n cargobay` process in front of the real CNCF
registry:

- client faults: clients that disconnect mid-blob (cold and warm), a client
  that reads very slowly, slowloris connections that never finish their
  request, a huge header and a huge URL.  Each gets an error response or a
  closed connection, never a 500 and never a crash; meanwhile other clients
  keep being served byte-identical images, and afterwards the proxy's open
  file descriptors return to their baseline and its memory stays bounded;
- the process: ``kill -9`` during eight concurrent cold downloads, then a
  restart on the same cache directory leaves only whole, verified files;
- authorization: the exact status of every route x method x kind of token.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.client
import json
import os
import random
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest

from cargobay.tokens import mint_token
from peers import (
    OCI_MANIFEST,
    Registry,
    Twistd,
    build_oci_layout,
    fd_kinds,
    need,
    push_blob,
    skopeo_push,
    wait_until,
)
from proxy import ALL, SECRET, Proxy, start_proxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
#: Open descriptors the proxy may hold above its baseline once a fault is over
#: (a pooled upstream connection or two).
FD_SLACK = 5
#: Growth of the proxy's resident memory allowed during and after a fault.
RSS_SLACK_KIB = 60 * 1024


# ---------------------------------------------------------------------------
# the proxy process seen from /proc
# ---------------------------------------------------------------------------


def fd_count(proxy: Proxy) -> int:
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


def rss_kib(proxy: Proxy) -> int:
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def describe_fds(proxy: Proxy) -> str:
    """What the proxy's descriptors are, for assertion messages."""
    kinds = fd_kinds(proxy.process.pid, proxy.port)
    return ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))


# ---------------------------------------------------------------------------
# raw HTTP from the client side
# ---------------------------------------------------------------------------


def blob_request(name: str, digest: str, token: str | None = ALL) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /v2/{name}/blobs/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n".encode()


def connect(proxy: Proxy, rcvbuf: int | None = None, timeout: float = 30.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", proxy.port))
    return sock


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and whatever body bytes came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before the response head ended: {data[:200]!r}")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def read_at_least(sock: socket.socket, already: bytes, count: int) -> int:
    received = len(already)
    while received < count:
        piece = sock.recv(65536)
        if not piece:
            break
        received += len(piece)
    return received


def close_abruptly(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Pulled:
    status: int
    size: int
    digest: str
    headers: dict[str, str]
    seconds: float


def pull_blob(proxy: Proxy, name: str, digest: str, timeout: float = 120.0) -> Pulled:
    """A normal client: GET the whole blob, hashing it as it arrives."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        conn.request("GET", f"/v2/{name}/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
        response = conn.getresponse()
        hasher = hashlib.sha256()
        size = 0
        while True:
            piece = response.read(MiB)
            if not piece:
                break
            hasher.update(piece)
            size += len(piece)
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Pulled(response.status, size, "sha256:" + hasher.hexdigest(), headers, time.monotonic() - started)
    finally:
        conn.close()


def assert_whole(pulled: Pulled, digest: str, size: int) -> None:
    assert (pulled.status, pulled.size, pulled.digest) == (200, size, digest), pulled


# ---------------------------------------------------------------------------
# fixtures: an image and big blobs upstream, one proxy for the client faults
# ---------------------------------------------------------------------------

REPOSITORIES = [
    ("alpine", "up", "robust/alpine"),
    ("alp", "up", "robust/alpine"),
    ("alpine-x", "up", "robust/alpine"),
    ("other", "up", "robust/alpine"),
    ("big", "up", "robust/big"),
]


@dataclass
class Image:
    manifest: str
    manifest_bytes: bytes
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size


@pytest.fixture(scope="module")
def image(upstream_anon: Registry, tmp_path_factory) -> Image:
    need("skopeo")
    work = tmp_path_factory.mktemp("robust-image")
    built = build_oci_layout(work / "img", "latest", layer_sizes=[1_000_000, 300_000])
    skopeo_push(work / "img", "latest", f"{upstream_anon.host}/robust/alpine:latest")
    conn = http.client.HTTPConnection("127.0.0.1", upstream_anon.port, timeout=30)
    conn.request("GET", "/v2/robust/alpine/manifests/latest", headers={"Accept": OCI_MANIFEST})
    response = conn.getresponse()
    manifest_bytes = response.read()
    conn.close()
    assert response.status == 200
    manifest = json.loads(manifest_bytes)
    blobs = {manifest["config"]["digest"]: manifest["config"]["size"]}
    blobs.update({layer["digest"]: layer["size"] for layer in manifest["layers"]})
    return Image(built["manifest"], manifest_bytes, blobs)


@pytest.fixture(scope="module")
def proxy(upstream_anon: Registry, image: Image, tmp_path_factory) -> Iterator[Proxy]:
    proxy = start_proxy(tmp_path_factory.mktemp("robust-proxy"), [{"id": "up", "url": upstream_anon.url}], REPOSITORIES)
    # Warm: the image is cached and the upstream connection pool is in use,
    # so that baselines measured later are steady.
    threads = [threading.Thread(target=pull_image, args=(proxy, image)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pull_image(proxy, image)
    yield proxy
    proxy.process.stop()


def pull_image(proxy: Proxy, image: Image, token: str = ALL) -> None:
    """A normal pull: the manifest by tag and by digest, then every blob; byte-identical."""
    for reference in ("latest", image.manifest):
        status, headers, body = proxy.request(
            f"/v2/alpine/manifests/{reference}", token=token, headers={"Accept": OCI_MANIFEST}
        )
        assert (status, body) == (200, image.manifest_bytes), (status, body[:300])
        assert headers["docker-content-digest"] == image.manifest
    for digest, size in image.blobs.items():
        status, _, body = proxy.request(f"/v2/alpine/blobs/{digest}", token=token)
        assert status == 200 and len(body) == size, (status, len(body))
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


# ---------------------------------------------------------------------------
# "other clients keep being served, and nothing leaks"
# ---------------------------------------------------------------------------


class Bystanders:
    """
    Normal clients pulling the image in a loop in the background, and a
    sampler of the proxy's descriptors and memory.
    """

    def __init__(self, proxy: Proxy, image: Image, clients: int = 2) -> None:
        self.proxy = proxy
        self.image = image
        self.pulls = 0
        self.errors: list[str] = []
        self.max_rss_kib = 0
        self.max_fds = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._pull_loop, daemon=True) for _ in range(clients)]
        self._threads.append(threading.Thread(target=self._sample_loop, daemon=True))
        self._lock = threading.Lock()

    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pull_image(self.proxy, self.image)
                with self._lock:
                    self.pulls += 1
            except Exception as e:  # reported by stop()
                with self._lock:
                    self.errors.append(repr(e)[:500])
            self._stop.wait(0.05)

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_rss_kib = max(self.max_rss_kib, rss_kib(self.proxy))
                self.max_fds = max(self.max_fds, fd_count(self.proxy))
            except OSError:
                pass
            self._stop.wait(0.1)

    def start(self) -> Bystanders:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


_LOG_500 = re.compile(r"\[cargobay\.access#info\] \S+ \S+ \S+ 5\d\d ")


@contextmanager
def stays_healthy(proxy: Proxy, image: Image) -> Iterator[Bystanders]:
    """
    Around a fault: bystanders pull byte-identical images during it and after
    it; the process lives; no request was answered 5xx and nothing logged a
    traceback; open descriptors come back to the baseline; memory stays bounded.
    """
    assert proxy.process.returncode is None
    base_fds = min(fd_count(proxy) for _ in range(3))
    base_rss = rss_kib(proxy)
    log_offset = len(proxy.process.log_text())
    bystanders = Bystanders(proxy, image).start()
    try:
        yield bystanders
    finally:
        bystanders.stop()
    assert proxy.process.returncode is None, "the proxy died:\n" + proxy.process.log_text()[-3000:]
    assert bystanders.errors == [], bystanders.errors[:5]
    assert bystanders.pulls >= 1
    pull_image(proxy, image)
    settled = wait_until(lambda: fd_count(proxy) <= base_fds + FD_SLACK, timeout=30, interval=0.2)
    assert settled, f"{fd_count(proxy)} open descriptors, baseline {base_fds}: {describe_fds(proxy)}"
    peak = max(bystanders.max_rss_kib, rss_kib(proxy))
    assert peak < base_rss + RSS_SLACK_KIB, f"RSS {peak} KiB, baseline {base_rss} KiB"
    log = proxy.process.log_text()[log_offset:]
    assert not _LOG_500.findall(log), [line for line in log.splitlines() if _LOG_500.search(line)][:5]
    problems = [
        line for line in log.splitlines()
        if "#critical]" in line or "#error]" in line or "Traceback" in line or "Failure:" in line or "Unhandled" in line
    ]
    assert problems == [], "cargobay logged errors:\n" + "\n".join(problems[:10])


# ---------------------------------------------------------------------------
# (a) clients that disconnect mid-blob
# ---------------------------------------------------------------------------


def test_clients_disconnecting_mid_blob_cold(proxy, image, upstream_anon):
    size = 32 * MiB
    ways = ["before-response", "after-headers", "fin-after-1MiB", "rst-after-4MiB"]
    digests = {way: push_blob(upstream_anon, "robust/big", size) for way in [*ways, "with-follower"]}
    with stays_healthy(proxy, image):
        for way in ways:
            sock = connect(proxy)
            sock.sendall(blob_request("big", digests[way]))
            if way != "before-response":
                status, _, already = read_head(sock)
                assert status == 200
                if way == "fin-after-1MiB":
                    assert read_at_least(sock, already, MiB) >= MiB
                elif way == "rst-after-4MiB":
                    assert read_at_least(sock, already, 4 * MiB) >= 4 * MiB
            if way.startswith("rst"):
                close_abruptly(sock)
            else:
                sock.close()

        # A second client joined the download before the first one left: it
        # gets the whole blob all the same.
        digest = digests["with-follower"]
        primary = connect(proxy)
        primary.sendall(blob_request("big", digest))
        status, _, already = read_head(primary)
        assert status == 200 and read_at_least(primary, already, MiB) >= MiB
        result: list[Pulled] = []
        follower = threading.Thread(target=lambda: result.append(pull_blob(proxy, "big", digest)))
        follower.start()
        # And a follower that leaves too.
        quitter = connect(proxy)
        quitter.sendall(blob_request("big", digest))
        status, _, already = read_head(quitter)
        assert status == 200
        read_at_least(quitter, already, 256 * 1024)
        close_abruptly(quitter)
        time.sleep(0.3)
        close_abruptly(primary)
        follower.join(timeout=120)
        assert_whole(result[0], digest, size)

        # The downloads the clients abandoned went on into the cache: the
        # next pulls are hits, byte-identical.
        names = {d.split(":")[1] + f"-{size}" for d in digests.values()}
        assert wait_until(lambda: names <= {p.name for p in proxy.cached_blob_files()}, timeout=60), (
            sorted(names - {p.name for p in proxy.cached_blob_files()})
        )
        for digest in digests.values():
            pulled = pull_blob(proxy, "big", digest)
            assert_whole(pulled, digest, size)
            assert pulled.headers.get("x-cache") == "HIT"
        assert wait_until(lambda: proxy.temp_files() == [], timeout=30)


def test_clients_disconnecting_mid_blob_warm(proxy, image, upstream_anon):
    size = 32 * MiB
    digest = push_blob(upstream_anon, "robust/big", size)
    assert_whole(pull_blob(proxy, "big", digest), digest, size)
    rng = random.Random(7)
    with stays_healthy(proxy, image):
        normal: list[Pulled] = []
        # A normal client streams the same cached blob meanwhile.
        streamer = threading.Thread(target=lambda: normal.append(pull_blob(proxy, "big", digest)))
        streamer.start()
        for i in range(24):
            sock = connect(proxy, rcvbuf=64 * 1024)
            sock.sendall(blob_request("big", digest))
            if i % 4 != 0:
                status, _, already = read_head(sock)
                assert status == 200
                read_at_least(sock, already, rng.randrange(0, 8 * MiB))
            if i % 2:
                close_abruptly(sock)
            else:
                sock.close()
        streamer.join(timeout=120)
        assert_whole(normal[0], digest, size)
        pulled = pull_blob(proxy, "big", digest)
        assert_whole(pulled, digest, size)
        assert pulled.headers.get("x-cache") == "HIT"


# ---------------------------------------------------------------------------
# (b) a client that reads very slowly
# ---------------------------------------------------------------------------


class SlowReader(threading.Thread):
    """Reads a blob at ``rate`` bytes/s with a small receive buffer, until stopped."""

    def __init__(self, proxy: Proxy, name: str, digest: str, rate: int = 64 * 1024, rcvbuf: int = 16 * 1024) -> None:
        super().__init__(daemon=True)
        self.sock = connect(proxy, rcvbuf=rcvbuf)
        self.sock.sendall(blob_request(name, digest))
        self.rate = rate
        self.status: int | None = None
        self.received = 0
        self.error: str | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self.status, _, already = read_head(self.sock)
            self.received = len(already)
            started = time.monotonic()
            while not self.stopping.is_set():
                piece = self.sock.recv(4096)
                if not piece:
                    break
                self.received += len(piece)
                ahead = self.received / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    self.stopping.wait(ahead)
        except OSError as e:
            self.error = repr(e)

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.sock.close()


def test_very_slow_reader_does_not_hold_back_anyone(proxy, image, upstream_anon):
    size = 64 * MiB
    digest = push_blob(upstream_anon, "robust/big", size)
    with stays_healthy(proxy, image):
        # Cold: the slow client is the one whose request starts the download.
        slow = SlowReader(proxy, "big", digest)
        slow.start()
        assert wait_until(lambda: slow.received > 64 * 1024, timeout=30)
        started = time.monotonic()
        # Another client of the same blob gets it at the upstream's pace, not
        # the slow client's (64 MiB at 64 KiB/s would take 17 minutes).
        pulled = pull_blob(proxy, "big", digest)
        assert_whole(pulled, digest, size)
        assert pulled.seconds < 30, pulled.seconds
        time.sleep(max(0.0, 6 - (time.monotonic() - started)))
        assert slow.error is None and slow.status == 200
        assert slow.received < 8 * MiB, "the slow client was not slow"
        # Warm: a second slow client on the cached blob, while a normal one
        # pulls it.
        warm_slow = SlowReader(proxy, "big", digest)
        warm_slow.start()
        assert wait_until(lambda: warm_slow.received > 64 * 1024, timeout=30)
        pulled = pull_blob(proxy, "big", digest)
        assert_whole(pulled, digest, size)
        assert pulled.headers.get("x-cache") == "HIT"
        time.sleep(3)
        assert warm_slow.error is None and warm_slow.status == 200
        slow.finish()
        warm_slow.finish()
    # (stays_healthy checked that the proxy never held the blob in memory for
    # the slow clients: its RSS stayed within the slack.)


def test_slow_readers_outnumbering_the_sending_threads_hold_up_no_one(proxy, image, upstream_anon):
    # Cached blobs go out on a few sending threads (as many as cores, at
    # least two).  Slow readers, many more than that, must not occupy them:
    # a normal client of the same blob still gets all of it.
    size = 32 * MiB
    digest = push_blob(upstream_anon, "robust/big", size)
    assert_whole(pull_blob(proxy, "big", digest), digest, size)
    with stays_healthy(proxy, image):
        threads = max(2, len(os.sched_getaffinity(0)))
        slow = [SlowReader(proxy, "big", digest, rate=32 * 1024) for _ in range(3 * threads)]
        try:
            for reader in slow:
                reader.start()
            assert wait_until(lambda: all(r.received > 32 * 1024 for r in slow), timeout=30)
            for _ in range(3):
                pulled = pull_blob(proxy, "big", digest)
                assert_whole(pulled, digest, size)
                assert pulled.headers.get("x-cache") == "HIT"
            for reader in slow:
                assert reader.error is None and reader.status == 200
                assert reader.received < 8 * MiB, "a slow client was not slow"
                assert reader.is_alive(), "a slow client was cut off"
        finally:
            for reader in slow:
                reader.finish()


# ---------------------------------------------------------------------------
# (c) slowloris
# ---------------------------------------------------------------------------

SLOWLORIS_PARTS = [
    b"",  # connects and says nothing
    b"GET /v2/alpine/manifests/lat",  # part of a request line
    b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer abc",  # part of a header
    b"GET /v2/alpine/tags/list HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n",  # headers without their end
]


def test_slowloris_connections_do_not_starve_others(proxy, image):
    with stays_healthy(proxy, image) as bystanders:
        base = fd_count(proxy)
        socks = []
        try:
            for i in range(300):
                sock = connect(proxy, timeout=10)
                part = SLOWLORIS_PARTS[i % len(SLOWLORIS_PARTS)]
                if part:
                    sock.sendall(part)
                socks.append(sock)
            # The proxy holds them all open...
            assert wait_until(lambda: fd_count(proxy) >= base + 280, timeout=10), describe_fds(proxy)
            # ...and serves everyone else promptly meanwhile.
            for _ in range(3):
                started = time.monotonic()
                pull_image(proxy, image)
                assert time.monotonic() - started < 10
            pulls_before = bystanders.pulls
            time.sleep(2)
            assert bystanders.pulls > pulls_before
            # Nobody answered a request that was never finished.
            for sock in socks[:40]:
                sock.setblocking(False)
                try:
                    data = sock.recv(1024)
                except BlockingIOError:
                    data = None
                assert data is None, data
        finally:
            for sock in socks:
                sock.close()


# ---------------------------------------------------------------------------
# (d) a huge header, a huge URL
# ---------------------------------------------------------------------------


def exchange(proxy: Proxy, data: bytes, timeout: float = 15.0) -> tuple[int | None, bytes]:
    """
    Send ``data`` (the proxy may stop reading it), then read until the proxy
    closes the connection; the response's status, None for a closed
    connection without one.
    """
    sock = connect(proxy, timeout=timeout)
    received = b""
    sender_error: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except OSError as e:  # the proxy closed while we were sending
            sender_error.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
            if b"\r\n\r\n" in received:
                head = received.split(b"\r\n\r\n", 1)[0]
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length and len(received) >= len(head) + 4 + int(length.group(1)):
                    break
    except ConnectionResetError:
        pass
    finally:
        sender.join(timeout=timeout)
        sock.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    return (int(match.group(1)) if match else None), received


def _request(path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {ALL}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


HUGE = {
    "header-value-1MiB": lambda: _request("/v2/alpine/manifests/latest", [("X-Big", "a" * MiB)]),
    "headers-total-80KiB": lambda: _request("/v2/alpine/manifests/latest", [(f"X-H{i}", "b" * 1000) for i in range(80)]),
    "headers-1000": lambda: _request("/v2/alpine/manifests/latest", [(f"X-N{i}", "1") for i in range(1000)]),
    "bearer-token-15KiB": lambda: _request("/v2/", [("X-Pad", "")]).replace(ALL.encode(), b"x" * 15000),
    "path-100KiB": lambda: _request("/v2/" + "a/" * 51200 + "manifests/latest", []),
    "path-10KiB": lambda: _request("/v2/" + "a/" * 5120 + "manifests/latest", []),
    "query-100KiB": lambda: _request("/v2/alpine/tags/list?last=" + "z" * 102400, []),
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_huge_header_or_url_gets_an_error_or_a_close(proxy, image, case):
    with stays_healthy(proxy, image):
        status, received = exchange(proxy, HUGE[case]())
        # An error response or a closed connection; never a 500, never a crash.
        assert status is None or status in (400, 401, 404, 413, 414, 431), received[:500]


MALFORMED = {
    "request-line-not-utf8": (b"GET /v2/sm\xffll/tags/list HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "http-1.2": (b"GET /v2/ HTTP/1.2\r\nHost: x\r\n\r\n", 400),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "two-lengths": (b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    "length-and-chunked": (b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "negative-length": (b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "space-before-colon": (b"GET /v2/ HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "header-fields-600": (_request("/v2/", [(f"X-N{i}", "1") for i in range(600)]), 431),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_what_the_http_parser_refuses_gets_an_oci_error_and_an_access_line(proxy, case):
    # Twisted's parser answered these with a bare "400 Bad Request", no
    # body, and no access line.
    data, expected = MALFORMED[case]
    status, received = exchange(proxy, data)
    assert status == expected, received[:300]
    body = received.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED", body
    assert wait_until(lambda: re.search(rf" {expected} 0 subject=- agent=- \((malformed HTTP request|more than 500 request header fields)\)",
                                        proxy.process.log_text()), timeout=10)


# ---------------------------------------------------------------------------
# kill -9 during downloads, restart on the same cache
# ---------------------------------------------------------------------------


def test_kill_9_during_eight_cold_downloads_leaves_only_verified_files(upstream_anon, tmp_path):
    size = 50 * MiB
    digests = [push_blob(upstream_anon, "robust/big", size + i) for i in range(8)]
    sizes = {digest: size + i for i, digest in enumerate(digests)}
    proxy = start_proxy(tmp_path / "p", [{"id": "up", "url": upstream_anon.url}], REPOSITORIES)
    received = [0] * len(digests)
    socks: list[socket.socket] = []
    stop = threading.Event()

    def download(index: int) -> None:
        # Two fast clients finish before the proxy dies; six slow ones are
        # part-way through their downloads.
        rate = None if index < 2 else (2 + index) * MiB
        sock = connect(proxy)
        socks.append(sock)
        try:
            sock.sendall(blob_request("big", digests[index]))
            status, _, already = read_head(sock)
            assert status == 200
            received[index] = len(already)
            started = time.monotonic()
            while not stop.is_set():
                piece = sock.recv(256 * 1024)
                if not piece:
                    return
                received[index] += len(piece)
                if rate is not None:
                    ahead = received[index] / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass

    def fast_done_slow_started() -> bool:
        fast = all(received[i] == sizes[digests[i]] for i in (0, 1))
        return fast and all(received[i] > MiB for i in range(2, len(digests)))

    threads = [threading.Thread(target=download, args=(i,), daemon=True) for i in range(len(digests))]
    try:
        for thread in threads:
            thread.start()
        assert wait_until(fast_done_slow_started, timeout=60), received
        for i in (0, 1):
            proxy.cached_blob(digests[i])  # committed just after their responses
        assert len(proxy.temp_files()) >= 6, "the slow downloads were not in progress"
        proxy.process.kill9()
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        proxy.process.kill9()
    assert all(received[i] < sizes[digests[i]] for i in range(2, len(digests))), received

    process = Twistd(args=proxy.process.args, log_path=tmp_path / "restart.log").start()
    process.wait_listening(proxy.port)
    restarted = Proxy(process, proxy.port, proxy.cache)
    try:
        corrupt = []
        files = [p for p in (restarted.cache / "blobs").rglob("*") if p.is_file()]
        for path in files:
            encoded, _, size_text = path.name.partition("-")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != encoded or len(data) != int(size_text):
                corrupt.append(path.name)
        assert corrupt == [], corrupt
        assert list((restarted.cache / "tmp").iterdir()) == []
        cached = {p.name.split("-")[0] for p in files}
        # What was complete before the kill was verified and renamed into
        # place before its last byte went out: it survived.
        assert {d.split(":")[1] for d in digests[:2]} <= cached
        for digest in digests:
            pulled = pull_blob(restarted, "big", digest)
            assert_whole(pulled, digest, sizes[digest])
            assert pulled.headers.get("x-cache") == ("HIT" if digest.split(":")[1] in cached else "MISS")
    finally:
        process.stop()


# ---------------------------------------------------------------------------
# the authorization table
# ---------------------------------------------------------------------------

ROUTES = ["base", "manifest-tag", "manifest-digest", "blob", "tags", "referrers"]
METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"]
WRITES = {"PUT", "POST", "PATCH", "DELETE"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict) -> str:
    return _b64url(b'{"alg":"none","typ":"JWT"}') + "." + _b64url(json.dumps(claims).encode()) + "."


SCOPED = mint_token(SECRET, "scoped", ["alpine"], 3600)
#: kind -> Authorization header value (None: no header).
TOKENS: dict[str, str | None] = {
    "none": None,
    "garbage": "Bearer not-a-jwt",
    "empty-bearer": "Bearer ",
    "alg-none": "Bearer " + _unsigned({"sub": "mallory", "access": {"type": "all"}}),
    "wrong-secret": "Bearer " + mint_token("some-other-secret-some-other-secret", "mallory", None, 3600),
    "expired": "Bearer " + mint_token(SECRET, "late", None, -3600),
    # (nbf: an iat ahead of the clock is not looked at, as in the earlier implementation.)
    "not-yet-valid": "Bearer " + jwt.encode({"sub": "early", "access": {"type": "all"}, "nbf": int(time.time()) + 3600,
                                             "exp": int(time.time()) + 7200}, SECRET, "HS256"),
    "all-access": "Bearer " + ALL,
    "scoped-this-repo": "Bearer " + SCOPED,
    "scoped-other-repo": "Bearer " + mint_token(SECRET, "other", ["other"], 3600),
    "scoped-prefix-alp": "Bearer " + mint_token(SECRET, "alp", ["alp"], 3600),
    "scoped-sibling-alpine-x": "Bearer " + mint_token(SECRET, "sibling", ["alpine-x"], 3600),
    "basic-jwt-password": "Basic " + base64.b64encode(f"anyone:{SCOPED}".encode()).decode(),
    "basic-wrong-password": "Basic " + base64.b64encode(b"anyone:not-a-jwt").decode(),
}
UNAUTHENTICATED = {"none", "garbage", "empty-bearer", "alg-none", "wrong-secret", "expired", "not-yet-valid", "basic-wrong-password"}
OTHER_REPOSITORY = {"scoped-other-repo", "scoped-prefix-alp", "scoped-sibling-alpine-x"}


def expected_status(route: str, method: str, kind: str) -> int:
    if method in WRITES:
        return 403  # read-only: refused before anything else
    if method == "HEAD" and route in ("tags", "referrers"):
        # The tag list and the referrers API are GET only, whoever asks (the
        # upstream answers HEAD tags/list 405 too).
        return 405
    if kind in UNAUTHENTICATED:
        return 401
    if route == "base":
        return 200  # any valid token
    if kind in OTHER_REPOSITORY:
        return 403
    if route == "referrers":
        # distribution 2.8 has no referrers API (it answers 404): passed on,
        # so that clients fall back to the referrers tag schema.
        return 404
    return 200


def route_path(route: str, image: Image) -> str:
    blob = next(iter(image.blobs))
    return {
        "base": "/v2/",
        "manifest-tag": "/v2/alpine/manifests/latest",
        "manifest-digest": f"/v2/alpine/manifests/{image.manifest}",
        "blob": f"/v2/alpine/blobs/{blob}",
        "tags": "/v2/alpine/tags/list",
        "referrers": f"/v2/alpine/referrers/{image.manifest}",
    }[route]


@pytest.mark.parametrize("kind", list(TOKENS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("route", ROUTES)
def test_authorization_table(proxy, image, route, method, kind):
    headers = {"Accept": OCI_MANIFEST}
    if TOKENS[kind] is not None:
        headers["Authorization"] = TOKENS[kind]
    body_out = b"{}" if method in ("PUT", "POST", "PATCH") else None
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.request(method, route_path(route, image), body=body_out, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    status = response.status
    want = expected_status(route, method, kind)
    assert status == want, (status, body[:300])
    challenge = response.getheader("WWW-Authenticate") or ""
    if method != "HEAD" and status >= 400:
        errors = [e["code"] for e in json.loads(body)["errors"]]
    else:
        errors = []
    if status == 401:
        assert challenge.startswith('Bearer realm="http://'), challenge
        assert 'service="cargobay"' in challenge
        if route != "base":
            assert 'scope="repository:alpine:pull"' in challenge
        if kind != "none":
            assert 'error="invalid_token"' in challenge
        assert errors in ([], ["UNAUTHORIZED"])
    elif status == 403:
        assert errors in ([], ["DENIED"])
        if method not in WRITES:
            assert 'error="insufficient_scope"' in challenge and 'scope="repository:alpine:pull"' in challenge
    elif status == 200 and method == "GET" and route == "manifest-tag":
        assert body == image.manifest_bytes


def test_writes_never_reach_the_upstream(proxy, upstream_anon):
    # After the table: cargobay sent the upstream nothing but GET and HEAD.
    methods = collections.Counter(
        line.split('"')[1].split()[0]
        for line in upstream_anon.log_text().splitlines()
        if line.endswith('"cargobay"') and line.count('"') >= 2
    )
    assert methods and set(methods) <= {"GET", "HEAD"}, methods


@pytest.mark.parametrize("kind", ["scoped-this-repo", "scoped-other-repo", "all-access"])
def test_unknown_repository_is_no_existence_oracle(proxy, kind):
    # A token that does not cover a name gets the same 403 whether or not the
    # name is mapped; only a token covering it learns that it is unknown.
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    statuses = []
    for name in ("nosuchrepo", "alpine-x"):
        conn.request("GET", f"/v2/{name}/tags/list", headers={"Authorization": TOKENS[kind]})
        response = conn.getresponse()
        statuses.append((response.status, json.loads(response.read())["errors"][0]["code"] if response.status >= 400 else None))
    conn.close()
    if kind == "all-access":
        assert statuses == [(404, "NAME_UNKNOWN"), (200, None)]
    else:
        assert statuses == [(403, "DENIED"), (403, "DENIED")]


@pytest.mark.parametrize("hard, soft_after, warned", [(1000, 1000, True), (2500, 2500, True), (8192, 3856, False)])
def test_the_open_files_limit_is_raised_for_max_connections(upstream_anon, tmp_path, hard, soft_after, warned):
    # With a soft limit of 1024 (a common default) and max_connections at
    # 10000, connections past the limit were dropped without the 503; each
    # client pulling a cold blob holds three descriptors (its socket, the
    # upstream's, the cache file), four while a sending thread has it.
    from peers import cargobay_command, free_port
    from proxy import write_config

    port = free_port()
    config = write_config(tmp_path / "c.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}], [("alpine", "up", "library/alpine")])
    config.write_text(config.read_text().replace(f"port = {port}\n", f"port = {port}\nmax_connections = 900\n", 1))
    process = Twistd(["prlimit", f"--nofile=300:{hard}", *cargobay_command(config)], log_path=tmp_path / "l.log").start()
    try:
        process.wait_listening(port)
        limits = Path(f"/proc/{process.process.pid}/limits").read_text()
        [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(soft_after), str(hard)], line
        assert (f"may open only {hard} files" in process.log_text()) == warned
    finally:
        process.stop()


def test_trickled_headers_hit_a_deadline_and_connections_are_capped(upstream_anon, tmp_path):
    """
    A client that sends a request's headers a byte at a time cannot keep a
    connection forever, and connections over `max_connections` are refused
    with a 503 at once.
    """
    import socket as _socket

    from peers import Twistd, free_port
    from proxy import write_config

    port = free_port()
    config = write_config(tmp_path / "c.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}], [("alpine", "up", "library/alpine")])
    config.write_text(config.read_text().replace(
        f"port = {port}\n", f"port = {port}\nmax_connections = 5\nheader_timeout_seconds = 4\nidle_timeout_seconds = 120\n", 1
    ))
    process = Twistd(config_path=config, log_path=tmp_path / "cap.log").start()
    process.wait_listening(port)
    held = []
    try:
        # The cap: five open connections are served, the sixth refused.
        for _ in range(5):
            held.append(_socket.create_connection(("127.0.0.1", port)))
        extra = _socket.create_connection(("127.0.0.1", port))
        extra.settimeout(30)
        assert extra.recv(100).startswith(b"HTTP/1.1 503")
        extra.close()
        # Counted, as a counter (a running count is no gauge).
        held[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        scrape = http.client.HTTPResponse(held[0])
        scrape.begin()
        exposition = scrape.read().decode()
        assert "# TYPE cargobay_refused_connections_total counter" in exposition
        # (At least the one above: the server may not yet have seen the
        # start-up probe's connection close when the five were opened.)
        [refused] = [line for line in exposition.splitlines() if line.startswith("cargobay_refused_connections_total ")]
        assert int(refused.split()[1]) >= 1
        for sock in held:
            sock.close()
        held.clear()
        # Once the server has seen those close, connections are served again.
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.HTTPError, OSError):
                pass
            assert time.monotonic() < deadline, "connections were not released"
            time.sleep(0.2)
        # The deadline: trickle a byte every second; the proxy cuts the
        # connection once the header block has taken longer than allowed.
        sock = _socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        cut = False
        started = time.monotonic()
        import select

        answer = b""
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable:
                try:
                    while piece := sock.recv(1000):
                        answer += piece
                except OSError:
                    pass
                cut = True
                break
        sock.close()
        assert cut, f"still open after {time.monotonic() - started:.0f} s of trickled headers"
        # It was the header deadline, not an early refusal, and it says so.
        assert time.monotonic() - started >= 3
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"code": "UNSUPPORTED"' in answer or b'"code":"UNSUPPORTED"' in answer, answer
        # A request whose body comes in a segment of its own, then an idle
        # keep-alive connection past the header deadline: the next request
        # is served (the body's bytes armed the deadline, which then cut the
        # idle connection).
        sock = _socket.create_connection(("127.0.0.1", port))
        sock.settimeout(30)
        form = b"grant_type=password&username=u&password=nope"
        sock.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(form))
        time.sleep(0.3)
        sock.sendall(form)
        first = http.client.HTTPResponse(sock)
        first.begin()
        first.read()
        assert first.status == 401
        time.sleep(5)  # past header_timeout_seconds = 4, within the idle timeout
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = http.client.HTTPResponse(sock)
        second.begin()
        assert second.status == 200 and second.read() == b"ok\n"
        sock.close()
        # Half a header block and then silence meets the same deadline (it
        # held the connection until the idle timeout, here 120 s).
        sock = _socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Half: ")
        sock.settimeout(60)
        assert sock.recv(100).startswith(b"HTTP/1.1 408 ")
        sock.close()
        assert re.search(r" - - 408 0 subject=- agent=- \(request headers too slow\)", process.log_text())
    finally:
        for sock in held:
            sock.close()
        process.stop()


def unix_request(path: Path, raw: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(raw)
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_odd_hosts_and_credentials_on_a_unix_socket_get_oci_errors(upstream_anon, tmp_path):
    """
    Behind a local reverse proxy on a UNIX socket, a request whose Host
    cannot go into a challenge (or that has none, in HTTP/1.0) still gets its
    401 with a challenge, and Basic credentials that are not even ASCII get a
    401 too: never a 500.
    """
    sock = Path(f"/tmp/cargobay-{os.getpid()}-{tmp_path.name[-12:]}.sock")
    config = tmp_path / "config.toml"
    config.write_text(
        "[server]\n"
        f'listen = "unix:{sock}"\n'
        "[auth]\n"
        f'jwt_secret = "{SECRET}"\n'
        "[cache]\n"
        f'directory = "{tmp_path / "cache"}"\n'
        "max_size_bytes = 1000000000\n"
        "max_age_seconds = 3600\n"
        "[[registries]]\n"
        'id = "up"\n'
        f'url = "{upstream_anon.url}"\n'
    )
    process = Twistd(config_path=config, log_path=tmp_path / "cargobay.log").start()
    try:
        wait_until(sock.exists, timeout=30)
        for raw in (
            b"GET /v2/ HTTP/1.1\r\nHost: my_registry\r\nConnection: close\r\n\r\n",
            b"GET /v2/ HTTP/1.0\r\n\r\n",
            b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic \xe9\xe9\xe9\xe9\r\n"
            b"Connection: close\r\n\r\n",
            b"GET /token?scope=repository:alpine:pull HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Basic caf\xe9\r\nConnection: close\r\n\r\n",
        ):
            status, body = unix_request(sock, raw)
            assert status == 401, (raw, status, body[:300])
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED", body
        status, body = unix_request(
            sock, f"GET /v2/ HTTP/1.0\r\nAuthorization: Bearer {ALL}\r\n\r\n".encode()
        )
        assert status == 200, body
        assert "Traceback" not in (tmp_path / "cargobay.log").read_text()
    finally:
        process.stop()
        sock.unlink(missing_ok=True)
