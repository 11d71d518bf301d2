"""
The cache on a disk far slower than the upstream (tests/slowdisk.py: a real
FUSE filesystem whose writes go at 16 MB/s), with the real twistd, the CNCF
registry as upstream and curl as the client:

- a lone client leaves the slow disk behind, gets the whole verified blob at
  the upstream's pace, and the blob reaches the cache by a second download
  of only the part the disk had not written (Range);
- with ``client_waits_for_disk`` it waits for the disk and the upstream
  sends the blob once;
- clients that come together share one download, at the disk's pace.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cargobay.blobs import STORE_BACKLOG
from peers import Registry, Twistd, free_port, push_blob, wait_until
from proxy import ALL, Proxy, write_config
from slowdisk import SlowDisk, available

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
DISK_RATE = 16 * 1000 * 1000
SIZE = 48 * MiB  # three seconds of this disk


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("slowdisk-upstream")).start()
    yield registry
    registry.stop()


@pytest.fixture
def slow_disk(tmp_path) -> Iterator[SlowDisk]:
    why = available()
    if why is not None:
        reason = f"cannot mount a slow disk: {why} (make test installs libfuse2 and fusepy)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    with SlowDisk(tmp_path, DISK_RATE) as disk:
        yield disk


def start(tmp: Path, disk: SlowDisk, upstream: Registry, extra: str = "") -> Proxy:
    """cargobay with its cache on the slow disk (its config and log are not)."""
    port = free_port()
    cache = disk.mountpoint / "cache"
    config = write_config(
        tmp / "config.toml", port, cache, [{"id": "up", "url": upstream.url}], [("big", "up", "library/big")], extra
    )
    process = Twistd(config_path=config, log_path=tmp / "cargobay.log").start()
    process.wait_listening(port)
    return Proxy(process, port, cache)


def curl(proxy: Proxy, digest: str) -> tuple[int, int, str, float]:
    """GET the blob with curl: status, bytes, their sha256 and seconds."""
    done = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code} %{time_total}", "-H", f"Authorization: Bearer {ALL}",
         f"{proxy.url}/v2/big/blobs/{digest}"],
        capture_output=True, check=True, timeout=120,
    )
    body, _, trailer = done.stdout.rpartition(b"\n")
    status, seconds = trailer.decode().split()
    return int(status), len(body), "sha256:" + hashlib.sha256(body).hexdigest(), float(seconds)


def left_behind(proxy: Proxy) -> float:
    body = urllib.request.urlopen(f"{proxy.url}/metrics").read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "cargobay_cache_disk_left_behind_total":
                return sample.value
    return 0.0


def blob_gets(upstream: Registry, digest: str) -> int:
    return upstream.count_requests("GET", f"/blobs/{digest}")


def test_a_lone_client_leaves_a_slow_disk_behind_and_the_blob_is_cached_after(upstream, slow_disk, tmp_path):
    digest = push_blob(upstream, "library/big", SIZE)
    proxy = start(tmp_path, slow_disk, upstream)
    try:
        status, size, got, seconds = curl(proxy, digest)
        assert (status, size, got) == (200, SIZE, digest)
        # The cache file was left behind, once, and the client was done
        # before the disk could have written the blob (three seconds).
        # (This failed once in a full CI=true run on a fresh machine, never
        # alone or under CPU load: the message keeps what would explain it.)
        assert left_behind(proxy) == 1, (
            f"not left behind; the client took {seconds:.2f} s; the upstream's log: "
            f"{[(e.method, e.status, e.size) for e in upstream.access_log() if digest in e.uri]}; "
            f"cargobay's log:\n{proxy.process.log_text()[-3000:]}"
        )
        final_name = digest.split(":")[1] + f"-{SIZE}"
        assert not any(p.name == final_name for p in proxy.cached_blob_files())
        # The second download brings the blob into the cache, whole.
        cached = proxy.cached_blob(digest, timeout=60)
        assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == digest
        assert wait_until(lambda: blob_gets(upstream, digest) == 2, timeout=10)
        assert not proxy.temp_files()
        # The second download asked only for what the disk had not written:
        # the upstream sent the blob once, plus the part the disk missed.
        first, second = [e for e in upstream.access_log() if e.method == "GET" and digest in e.uri]
        assert first.status == 200 and first.size == SIZE
        assert second.status == 206 and 0 < second.size < SIZE
        # And it is served from there, with no third download.
        status, size, got, _ = curl(proxy, digest)
        assert (status, size, got) == (200, SIZE, digest)
        assert blob_gets(upstream, digest) == 2
    finally:
        proxy.process.stop()


def test_a_client_told_to_wait_for_the_disk_gets_the_blob_from_one_download(upstream, slow_disk, tmp_path):
    digest = push_blob(upstream, "library/big", SIZE)
    proxy = start(tmp_path, slow_disk, upstream, "client_waits_for_disk = true")
    try:
        status, size, got, seconds = curl(proxy, digest)
        assert (status, size, got) == (200, SIZE, digest)
        # (Its last bytes go once the body is hashed: the disk may still have
        # up to STORE_BACKLOG to write then.)
        assert seconds >= (SIZE - STORE_BACKLOG) / DISK_RATE * 0.9, "the client did not wait for the disk"
        assert left_behind(proxy) == 0
        proxy.cached_blob(digest, timeout=60)
        assert blob_gets(upstream, digest) == 1
    finally:
        proxy.process.stop()


@pytest.mark.parametrize("waits_for_disk", [True, False])
def test_a_stop_just_after_a_pull_waits_for_its_cache_file(upstream, slow_disk, tmp_path, waits_for_disk):
    # The client has its last bytes once the body is hashed, while the disk
    # may still have megabytes to write (or, left behind, the rest of the
    # blob is still to be fetched into the file): a graceful stop right then
    # (nothing busy) threw the file away.
    digest = push_blob(upstream, "library/big", SIZE)
    proxy = start(tmp_path, slow_disk, upstream, "client_waits_for_disk = true" if waits_for_disk else "")
    try:
        status, size, got, _ = curl(proxy, digest)
        assert (status, size, got) == (200, SIZE, digest)
    finally:
        proxy.process.stop()
    log = proxy.process.log_text()
    assert ("the cache's disk fell behind upstream" in log) is not waits_for_disk
    assert [p.name for p in proxy.cached_blob_files()] == [digest.split(":")[1] + f"-{SIZE}"]
    assert "not cached" not in log


def test_clients_that_come_together_share_one_download_on_a_slow_disk(upstream, slow_disk, tmp_path):
    digest = push_blob(upstream, "library/big", SIZE)
    proxy = start(tmp_path, slow_disk, upstream)
    clients = 6
    results: list[tuple[int, int, str, float] | BaseException] = []
    barrier = threading.Barrier(clients)

    def pull() -> None:
        barrier.wait(timeout=30)
        try:
            results.append(curl(proxy, digest))
        except BaseException as e:  # reported below
            results.append(e)

    try:
        threads = [threading.Thread(target=pull) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for result in results:
            assert not isinstance(result, BaseException), result
            assert result[:3] == (200, SIZE, digest)
        assert len(results) == clients
        # They came within the quarter second a lone client is kept at the
        # disk's pace, so the disk stayed in step and the upstream sent the
        # blob once.
        assert left_behind(proxy) == 0
        proxy.cached_blob(digest, timeout=60)
        assert blob_gets(upstream, digest) == 1
    finally:
        proxy.process.stop()
