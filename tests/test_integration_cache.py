"""
The cache against real peers and the real `twistd` process: hits without the
upstream, one upstream fetch for a thundering herd, eviction by size, crash
safety, a lying or failing upstream, and a full disk.  Upstream requests are
counted in the CNCF registry's own access log.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cargobay.tokens import mint_token
from evil_upstream import (
    BIG_BLOB,
    BIG_DIGEST,
    BIG_INDEX,
    BIG_INDEX_DIGEST,
    BLOB,
    DIGEST,
    MANIFEST,
    MANIFEST_DIGEST,
    REFERRERS,
    WRONG_MANIFEST_DIGEST,
)
from peers import (
    OCI_MANIFEST,
    REPO_ROOT,
    BlackHole,
    Registry,
    Twistd,
    build_oci_layout,
    free_port,
    push_blob,
    skopeo,
    skopeo_pull,
    skopeo_push,
    wait_until,
)
from proxy import ALL, SECRET, Proxy, start_proxy, write_config

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A registry of this module's own: some tests stop it."""
    registry = Registry(tmp_path_factory.mktemp("cache-upstream")).start()
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def image(upstream, tmp_path_factory):
    work = tmp_path_factory.mktemp("cache-image")
    built = build_oci_layout(work / "img", "latest", layer_sizes=[1_500_000, 700_000])
    skopeo_push(work / "img", "latest", f"{upstream.host}/library/alpine:latest")
    return built


def proxy_for(tmp: Path, upstream: Registry, extra: str = "", read_timeout: float | None = None) -> Proxy:
    registry = {"id": "up", "url": upstream.url}
    if read_timeout is not None:
        registry["read_timeout_seconds"] = read_timeout
    return start_proxy(tmp, [registry], [("alpine", "up", "library/alpine"), ("big", "up", "library/big")], extra)


def test_second_pull_is_served_without_upstream_even_when_it_is_down(upstream, image, tmp_path):
    proxy = proxy_for(tmp_path / "p", upstream)
    try:
        first = tmp_path / "first"
        skopeo_pull(f"{proxy.host}/alpine:latest", first, creds=f"t:{ALL}")
        blob_gets = upstream.wait_requests("GET", "/blobs/", 3)
        second = tmp_path / "second"
        skopeo_pull(f"{proxy.host}/alpine:latest", second, creds=f"t:{ALL}")
        assert upstream.count_requests("GET", "/blobs/") == blob_gets
        status, _, listed = proxy.request("/v2/alpine/tags/list")
        assert status == 200
        upstream.stop()
        try:
            status, headers, body = proxy.request("/v2/alpine/tags/list")
            assert status == 200 and "warning" in headers
            assert sorted(json.loads(body)["tags"]) == sorted(json.loads(listed)["tags"])
            for ref in ("alpine:latest", f"alpine@{image['manifest']}"):
                target = tmp_path / ref.replace(":", "_").replace("@", "_")
                skopeo_pull(f"{proxy.host}/{ref}", target, creds=f"t:{ALL}")
                for name in os.listdir(first):
                    assert (target / name).read_bytes() == (first / name).read_bytes()
        finally:
            upstream.start()
    finally:
        proxy.process.stop()


def test_range_if_none_match_and_head_on_cached_blobs_and_manifests(upstream, image, tmp_path):
    proxy = proxy_for(tmp_path, upstream)
    try:
        layer, other = image["layers"][0], image["layers"][1]
        # A client holding a blob not cached here: a HEAD upstream, a 304, no download.
        fetched = upstream.count_requests("GET", other)
        status, headers, body = proxy.request(f"/v2/alpine/blobs/{other}", headers={"If-None-Match": f'"{other}"'})
        assert status == 304 and body == b"" and headers["etag"] == f'"{other}"'
        time.sleep(0.5)  # let a (wrong) upstream GET reach the log, if any
        assert upstream.count_requests("GET", other) == fetched
        status, _, whole = proxy.request(f"/v2/alpine/blobs/{layer}")
        assert status == 200
        before = upstream.count_requests("GET", layer) + upstream.count_requests("HEAD", layer)
        status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}", headers={"Range": "bytes=100-199"})
        assert status == 206 and body == whole[100:200]
        assert headers["content-range"] == f"bytes 100-199/{len(whole)}"
        moved = {"Range": "bytes=100-199", "If-Range": '"sha256:' + "0" * 64 + '"'}
        status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}", headers=moved)
        assert status == 200 and body == whole
        status, headers, _ = proxy.request(f"/v2/alpine/blobs/{layer}", headers={"Range": f"bytes={len(whole)}-"})
        assert status == 416 and headers["content-range"] == f"bytes */{len(whole)}"
        status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}", headers={"If-None-Match": f'"{layer}"'})
        assert status == 304 and body == b""
        held = {"If-None-Match": f'"{image["manifest"]}"', "Accept": image["media_type"]}
        status, headers, body = proxy.request("/v2/alpine/manifests/latest", headers=held)
        assert status == 304 and body == b"" and headers["docker-content-digest"] == image["manifest"]
        status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}", method="HEAD")
        assert status == 200 and body == b""
        assert int(headers["content-length"]) == len(whole)
        assert headers["docker-content-digest"] == layer
        assert headers["etag"] == f'"{layer}"' and headers["accept-ranges"] == "bytes"
        time.sleep(0.5)  # let a (wrong) upstream request reach the log, if any
        assert upstream.count_requests("GET", layer) + upstream.count_requests("HEAD", layer) == before
    finally:
        proxy.process.stop()


def test_thundering_herd_fetches_once_and_streams_to_everyone(upstream, tmp_path):
    size = 200 * 1024**2
    digest = push_blob(upstream, "library/big", size)
    proxy = proxy_for(tmp_path, upstream)
    clients = 16
    barrier = threading.Barrier(clients)
    results: list[dict] = [{} for _ in range(clients)]
    final_name = digest.split(":")[1] + f"-{size}"

    def pull(index: int) -> None:
        result = results[index]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
            conn.request("GET", f"/v2/big/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
            response = conn.getresponse()
            result["status"] = response.status
            hasher = hashlib.sha256()
            first = response.read(1)
            hasher.update(first)
            # Everyone has a first byte before anyone reads on; while the
            # clients wait here the download cannot finish (the first client's
            # backpressure holds it), so the bytes came from a fetch in progress.
            result["cached_at_first_byte"] = any(p.name == final_name for p in proxy.cached_blob_files())
            barrier.wait(timeout=120)
            received = len(first)
            while True:
                piece = response.read(1024 * 1024)
                if not piece:
                    break
                hasher.update(piece)
                received += len(piece)
            result["received"] = received
            result["digest"] = "sha256:" + hasher.hexdigest()
            conn.close()
        except Exception as e:  # reported below
            result["error"] = repr(e)
            barrier.abort()

    try:
        threads = [threading.Thread(target=pull, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        for result in results:
            assert "error" not in result, result
            assert result["status"] == 200
            assert result["received"] == size and result["digest"] == digest
            assert result["cached_at_first_byte"] is False
        assert upstream.wait_requests("GET", f"/blobs/{digest}", 1) == 1
        time.sleep(0.5)
        assert upstream.count_requests("GET", f"/blobs/{digest}") == 1
        # Nor a HEAD per follower: a download under their own name answers
        # for them (one asked under another name would need the upstream's word).
        assert upstream.count_requests("HEAD", f"/blobs/{digest}") == 0
    finally:
        proxy.process.stop()


def test_small_max_size_keeps_the_cache_under_the_limit(upstream, tmp_path):
    sizes = 1_000_000
    digests = [push_blob(upstream, "library/big", sizes) for _ in range(5)]
    limit = 2_600_000
    port = free_port()
    config = write_config(tmp_path / "small.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream.url}], [("big", "up", "library/big")])
    config.write_text(config.read_text().replace("max_size_bytes = 20000000000", f"max_size_bytes = {limit}"))
    process = Twistd(config_path=config, log_path=tmp_path / "small.log").start()
    process.wait_listening(port)
    small = Proxy(process, port, tmp_path / "cache")
    try:
        for digest in digests:
            status, _, body = small.request(f"/v2/big/blobs/{digest}")
            assert status == 200 and len(body) == sizes

        def total() -> int:
            return sum(p.stat().st_size for p in small.cached_blob_files())

        def names() -> set[str]:
            return {p.name.split("-")[0] for p in small.cached_blob_files()}

        # The last blob becomes an entry just after its response (fsync and
        # rename come after the client has its bytes).
        wait_until(lambda: digests[-1].split(":")[1] in names(), timeout=10)
        assert wait_until(lambda: total() <= limit, timeout=10)
        assert digests[-1].split(":")[1] in names(), "the most recently used blob was evicted"
        assert digests[0].split(":")[1] not in names()
        # What the upstream showed under which name goes with the blob.
        linked = {p.name for p in (tmp_path / "cache" / "links" / "up" / "sha256").glob("*/*")}
        assert digests[-1].split(":")[1] in linked and digests[0].split(":")[1] not in linked
    finally:
        process.stop()


def test_manifests_tags_and_links_go_once_unused_for_the_age_limit(upstream, image, tmp_path):
    """
    The age limit bounds more than blobs: a mirror meets new tags every
    day, and kept every manifest, tag and link it ever saw.  (That what is
    in use stays is test_sweep.py's.)
    """
    proxy = proxy_for(tmp_path, upstream, "eviction_interval_seconds = 1")
    cache = tmp_path / "cache"

    def files(kind: str) -> list[Path]:
        return [p for p in (cache / kind).rglob("*") if p.is_file()]

    try:
        skopeo_pull(f"{proxy.host}/alpine:latest", tmp_path / "pulled", creds=f"t:{ALL}")
        proxy.cached_blob(image["layers"][0])
        assert files("manifests") and files("tags") and files("links")
        config = tmp_path / "config.toml"
        config.write_text(config.read_text().replace("max_age_seconds = 86400", "max_age_seconds = 3"))
        os.kill(proxy.process.pid, signal.SIGHUP)
        assert wait_until(lambda: not (files("manifests") or files("tags") or files("links") or files("blobs")), timeout=30), (
            files("manifests"), files("tags"), files("links"), files("blobs"))
        # And nothing is the worse for it: the next pull fetches them again.
        skopeo_pull(f"{proxy.host}/alpine:latest", tmp_path / "again", creds=f"t:{ALL}")
        assert files("manifests") and files("tags")
        assert "Traceback" not in proxy.process.log_text()
    finally:
        proxy.process.stop()


def test_kill_9_during_downloads_then_restart_is_clean(upstream, tmp_path):
    size = 300 * 1024**2
    digest = push_blob(upstream, "library/big", size)
    proxy = proxy_for(tmp_path, upstream)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    conn.request("GET", f"/v2/big/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
    response = conn.getresponse()
    response.read(4 * 1024 * 1024)
    assert wait_until(lambda: proxy.temp_files(), timeout=10)
    proxy.process.kill9()
    conn.close()
    # Restart on the same cache directory.
    process = Twistd(args=proxy.process.args, log_path=tmp_path / "restart.log").start()
    process.wait_listening(proxy.port)
    restarted = Proxy(process, proxy.port, proxy.cache)
    try:
        assert restarted.temp_files() == []
        assert not any(p.name.startswith(digest.split(":")[1]) for p in restarted.cached_blob_files())
        status, _, body = restarted.request(f"/v2/big/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
        del body
        restarted.cached_blob(digest, timeout=120)
        restarted.process.stop()
        # And again: now a hit, verified on disk.
        process = Twistd(args=proxy.process.args, log_path=tmp_path / "again.log").start()
        process.wait_listening(proxy.port)
        again = Proxy(process, proxy.port, proxy.cache)
        gets = upstream.count_requests("GET", f"/blobs/{digest}")
        status, headers, body = again.request(f"/v2/big/blobs/{digest}")
        assert status == 200 and headers.get("x-cache") == "HIT"
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        assert upstream.count_requests("GET", f"/blobs/{digest}") == gets
        for path in again.cached_blob_files():
            encoded, size_text = path.name.split("-")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == encoded
            assert path.stat().st_size == int(size_text)
        again.process.stop()
    finally:
        restarted.process.stop()
        process.stop()  # "again", if the test got that far


def test_damaged_cache_file_is_fetched_again(upstream, image, tmp_path):
    proxy = proxy_for(tmp_path, upstream)
    try:
        layer = image["layers"][0]
        status, _, good = proxy.request(f"/v2/alpine/blobs/{layer}")
        path = proxy.cached_blob(layer)
        with open(path, "r+b") as f:
            f.truncate(1000)
        status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}")
        assert status == 200 and body == good
        assert headers.get("x-cache") == "MISS"
    finally:
        proxy.process.stop()


def test_a_file_damaged_in_place_is_served_until_the_scrub_s_next_run_then_fetched_again(upstream, image, tmp_path):
    # The same size, one byte changed, while the proxy was stopped: a hit
    # checks the size only, so the first GET is served as it is (clients
    # check digests and refuse it); it had been served until the scrub,
    # 64 MiB a minute, came round to it, and now goes first in its next
    # run.  The scrub here reads one file every 2 s.
    extra = "eviction_interval_seconds = 2\nscrub_bytes_per_interval = 1"
    proxy = proxy_for(tmp_path / "p", upstream, extra)
    restarted = None
    try:
        digests = [*image["layers"], image["configs"][0]]
        good = {}
        for digest in digests:
            status, _, good[digest] = proxy.request(f"/v2/alpine/blobs/{digest}")
            assert status == 200
        paths = {digest: proxy.cached_blob(digest) for digest in digests}
        proxy.process.stop()
        for path in paths.values():
            with open(path, "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 0xFF]))
        process = Twistd(args=proxy.process.args, log_path=tmp_path / "restarted.log").start()
        process.wait_listening(proxy.port)
        restarted = Proxy(process, proxy.port, proxy.cache)
        served_damaged = []
        for digest in digests:
            status, headers, body = restarted.request(f"/v2/alpine/blobs/{digest}")
            assert status == 200
            if body != good[digest]:
                assert headers.get("x-cache") == "HIT"
                served_damaged.append(digest)
        assert served_damaged, "the scrub read every file before a GET"
        assert wait_until(lambda: not any(paths[d].exists() for d in served_damaged), timeout=30), \
            process.log_text()[-2000:]
        for digest in digests:
            status, _, body = restarted.request(f"/v2/alpine/blobs/{digest}")
            assert status == 200 and body == good[digest]
    finally:
        if restarted is not None:
            restarted.process.stop()
        proxy.process.stop()


# -- a lying or failing upstream ----------------------------------------------



@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("evil") / "evil.log"
    process = Twistd(args=[sys.executable, str(HERE / "evil_upstream.py"), str(port)], log_path=log).start()
    process.wait_listening(port)
    yield f"http://127.0.0.1:{port}"
    process.stop()


@pytest.fixture(scope="module")
def evil_proxy(evil, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evil-proxy")
    modes = ["good", "wrong", "truncate", "stall", "chunkedcut", "chunkedslow", "longer", "status429", "status500", "status503",
             "closedelimited", "closedelimitedcut", "empty", "silentbody"]
    # One registry id per mode: cached blobs are shared by every repository
    # of one registry, and every mode serves the same digest.
    proxy = start_proxy(
        tmp,
        [{"id": f"evil-{mode}", "url": evil, "read_timeout_seconds": 2} for mode in modes],
        [(mode, f"evil-{mode}", f"evil/{mode}") for mode in modes],
    )
    yield proxy
    proxy.process.stop()


def get_blob(proxy: Proxy, name: str) -> tuple[int, bytes | None, str | None]:
    """Status, body if it was read completely, and the error if it was cut."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.request("GET", f"/v2/{name}/blobs/{DIGEST}", headers={"Authorization": f"Bearer {ALL}"})
    response = conn.getresponse()
    try:
        return response.status, response.read(), None
    except (http.client.IncompleteRead, ConnectionError) as e:
        return response.status, None, type(e).__name__
    finally:
        conn.close()


def test_tag_lists_of_an_upstream_that_pages_with_cursors_of_its_own(evil, tmp_path):
    # skopeo follows each Link to the end: with the upstream's cursor lost,
    # it looped on the first page for ever.
    proxy = start_proxy(tmp_path, [{"id": "paging", "url": evil}], [("paged", "paging", "evil/cursor")])
    try:
        result = skopeo("list-tags", "--tls-verify=false", f"--creds=tester:{ALL}", f"docker://{proxy.host}/paged", timeout=60)
        assert json.loads(result.stdout)["Tags"] == ["B", "a", "D", "c", "e"]
    finally:
        proxy.process.stop()


def test_referrers_are_served_while_the_upstream_is_down(tmp_path):
    # OCI clients look for a fallback tag only on a 404: a 502 for the
    # referrers API broke signature discovery offline.
    port = free_port()
    upstream = Twistd(args=[sys.executable, str(HERE / "evil_upstream.py"), str(port)], log_path=tmp_path / "up.log")
    upstream.start().wait_listening(port)
    proxy = start_proxy(tmp_path, [{"id": "refs", "url": f"http://127.0.0.1:{port}"}], [("signed", "refs", "evil/signed")])
    try:
        subject, never = "sha256:" + "a" * 64, "sha256:" + "b" * 64
        status, headers, body = proxy.request(f"/v2/signed/referrers/{subject}")
        assert (status, body) == (200, REFERRERS) and "warning" not in headers
        upstream.stop()
        status, headers, body = proxy.request(f"/v2/signed/referrers/{subject}")
        assert (status, body) == (200, REFERRERS) and "warning" in headers
        status, _, body = proxy.request(f"/v2/signed/referrers/{never}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    finally:
        proxy.process.stop()
        upstream.stop()


def _an_address_that_is_not_loopback() -> str | None:
    """This machine's address on its network (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_a_registry_cannot_send_cargobay_to_an_address_more_internal_than_its_own(evil, tmp_path):
    # A registry's blob redirect to 169.254.169.254 (or to this host) had
    # cargobay fetch that service and stream all but the last piece of it
    # to the client (the digest is checked at the end): an SSRF.
    port = int(evil.rsplit(":", 1)[1])
    registries = [{"id": "local", "url": evil}]
    mappings = [("meta", "local", "evil/tometadata"), ("tolocal", "local", "evil/tolocal")]
    outside = _an_address_that_is_not_loopback()
    if outside is not None:
        registries.append({"id": "network", "url": f"http://{outside}:{port}"})
        mappings += [("net-meta", "network", "evil/tometadata"), ("net-local", "network", "evil/tolocal")]
    proxy = start_proxy(tmp_path, registries, mappings)
    try:
        refused = ["meta"] + (["net-meta", "net-local"] if outside is not None else [])
        for name in refused:
            for method in ("GET", "HEAD"):
                status, _, body = proxy.request(f"/v2/{name}/blobs/{DIGEST}", method=method)
                assert status == 502, (name, method, status)
                if method == "GET":
                    message = json.loads(body)["errors"][0]["message"]
                    assert "address" in message and "refused" in message, message
        log = proxy.process.log_text()
        assert "169.254.169.254" in log and "a link-local address" in log
        # A registry on this host may send us elsewhere on this host (and a
        # registry anywhere to the internet): development setups, and
        # on-premise registries whose object store is on their network.
        status, _, body = proxy.request(f"/v2/tolocal/blobs/{DIGEST}")
        assert (status, body) == (200, BLOB)
    finally:
        proxy.process.stop()


def test_good_evil_upstream_blob_is_cached(evil_proxy):
    status, body, error = get_blob(evil_proxy, "good")
    assert (status, body, error) == (200, BLOB, None)


def test_a_blob_without_content_length_reaches_joiners_with_correct_framing(evil_proxy):
    # Without a length the responses are chunked; a joiner's body must not
    # bypass that framing (the raw sendfile path is for known lengths only).
    results: dict[int, tuple[int, bytes]] = {}

    def pull(i: int) -> None:
        status, _, body = evil_proxy.request(f"/v2/chunkedslow/blobs/{DIGEST}")
        results[i] = (status, body)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(3)]
    threads[0].start()
    time.sleep(0.4)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {i: (200, BLOB) for i in range(3)}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_an_upstream_at_an_ipv6_address_literal(evil, tmp_path):
    # url = "http://[::1]:PORT" stopped start-up ("IPv6 addresses are not
    # supported"): treq puts every host through IDNA, which refuses colons.
    if not _has_ipv6_loopback():
        # A property of the machine (IPv6 switched off), not a missing peer.
        pytest.skip("this machine's loopback has no IPv6 address (::1)")
    port = int(evil.rsplit(":", 1)[1])
    proxy = start_proxy(tmp_path, [{"id": "six", "url": f"http://[::1]:{port}"}],
                        [("good", "six", "evil/good"), ("paged", "six", "evil/cursor")])
    try:
        assert get_blob(proxy, "good") == (200, BLOB, None)
        assert wait_until(proxy.cached_blob_files, timeout=30)
        status, _, body = proxy.request("/v2/paged/tags/list?n=2")
        assert status == 200 and json.loads(body)["tags"] == ["B", "a"]
        assert "Traceback" not in proxy.process.log_text()
    finally:
        proxy.process.stop()


@pytest.mark.parametrize("path", [f"/v2/tobadhost/blobs/{DIGEST}", "/v2/badrealm/manifests/latest", "/v2/badlink/tags/list"])
def test_an_upstream_url_whose_bracketed_host_is_no_address(evil, tmp_path, path):
    # A redirect, a token realm or a next page at http://[::zz]/: Python's URL
    # parsing raises where it took anything before, and no answer came back.
    proxy = start_proxy(tmp_path, [{"id": "evil", "url": evil}],
                        [(name, "evil", f"evil/{name}") for name in ("tobadhost", "badrealm", "badlink")])
    try:
        status, _, body = proxy.request(path)
        if "badlink" in path:
            assert status == 200 and json.loads(body)["tags"] == ["a"]  # the page, without the link
        else:
            assert status == 502, body
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert "Traceback" not in proxy.process.log_text()
    finally:
        proxy.process.stop()


#: Loaded first by the proxy's Python (PYTHONPATH): its calendar clock,
#: time.time, runs the number of seconds in the file away from the real one,
#: as after an NTP step or a virtual machine's resume.  The monotonic clock
#: is left alone, as such steps leave it.
STEPPED_CLOCK = """
import os, time
_path = os.environ["CARGOBAY_TEST_CLOCK_STEP"]
_calendar = time.time
_step = [-1.0, 0.0]

def _stepped():
    now = time.monotonic()
    if now - _step[0] > 0.05:
        try:
            _step[1] = float(open(_path).read() or 0)
        except (OSError, ValueError):
            pass
        _step[0] = now
    return _calendar() + _step[1]

time.time = _stepped
"""


def test_a_stalled_upstream_times_out_when_the_calendar_clock_steps_back(evil, tmp_path):
    # The reactor timed its calls on the calendar clock: an hour's step back
    # held a client on a stalled upstream (read_timeout_seconds = 2) for an
    # hour and two seconds, and every other timeout with it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STEPPED_CLOCK)
    step = tmp_path / "step"
    step.write_text("0")
    port = free_port()
    config = write_config(tmp_path / "config.toml", port, tmp_path / "cache",
                          [{"id": "evil", "url": evil, "read_timeout_seconds": 2}], [("stall", "evil", "evil/stall")])
    env = {"CARGOBAY_TEST_CLOCK_STEP": str(step),
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    process = Twistd(config_path=config, log_path=tmp_path / "cargobay.log", env=env).start()
    try:
        process.wait_listening(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", f"/v2/stall/blobs/{DIGEST}", headers={"Authorization": f"Bearer {ALL}"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.read(64 * 1024)  # the upstream has sent half, and says nothing more
        step.write_text("-3600")
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()  # cut once the upstream has been silent for 2 s, not an hour
        assert first == BLOB[: len(first)]
        conn.close()
        assert "Traceback" not in process.log_text()
    finally:
        process.stop()


@pytest.mark.parametrize("mode", ["wrong", "truncate", "stall", "chunkedcut", "longer", "closedelimited", "closedelimitedcut"])
def test_bad_bytes_never_look_complete_and_never_enter_the_cache(evil_proxy, mode):
    status, body, error = get_blob(evil_proxy, mode)
    if mode in ("longer", "closedelimited"):
        # Bytes past Content-Length are not part of the body: the blob read
        # is exactly the right one.  A body that ends with its connection
        # (no length, not chunked) is whole when its digest says so: it was
        # refused as "PotentialDataLoss".
        assert (status, body) == (200, BLOB)
    else:
        # The client sees a cut connection, never a complete-looking 200 body.
        assert body is None, (status, len(body or b""), error)
    assert wait_until(lambda: evil_proxy.temp_files() == [], timeout=30)
    digest_hex = DIGEST.split(":")[1]
    cached = [p for p in evil_proxy.cached_blob_files() if "evil" in str(p) and p.name.startswith(digest_hex)]
    for path in cached:
        assert path.read_bytes() == BLOB  # only the good mode's bytes may be there


@pytest.fixture(scope="module")
def evil_big_proxy(evil, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evil-big-proxy")
    modes = ["biggood", "bigwrong", "bigtruncate", "bigstall", "biglonger"]
    proxy = start_proxy(
        tmp,
        [{"id": f"evil-{mode}", "url": evil, "read_timeout_seconds": 2} for mode in modes],
        [(mode, f"evil-{mode}", f"evil/{mode}") for mode in modes],
        env={"CARGOBAY_LOG_LEVEL": "debug"},
    )
    yield proxy
    proxy.process.stop()


@pytest.mark.parametrize("mode", ["biggood", "bigwrong", "bigtruncate", "bigstall", "biglonger"])
def test_bad_bytes_received_into_the_cache_file_s_buffers_never_enter_the_cache(evil_big_proxy, mode):
    # A 12 MiB blob: its bulk is received straight into the buffers its
    # cache file is written from (the mode's middle byte, for "bigwrong").
    conn = http.client.HTTPConnection("127.0.0.1", evil_big_proxy.port, timeout=30)
    conn.request("GET", f"/v2/{mode}/blobs/{BIG_DIGEST}", headers={"Authorization": f"Bearer {ALL}"})
    response = conn.getresponse()
    try:
        body: bytes | None = response.read()
    except (http.client.IncompleteRead, ConnectionError):
        body = None
    conn.close()
    assert response.status == 200
    if mode in ("biggood", "biglonger"):
        assert body == BIG_BLOB
    else:
        assert body is None
    assert wait_until(lambda: evil_big_proxy.temp_files() == [], timeout=30)
    cached = [p for p in evil_big_proxy.cached_blob_files() if p.name.startswith(BIG_DIGEST.split(":")[1])]
    for path in cached:
        assert path.read_bytes() == BIG_BLOB
    log = evil_big_proxy.process.log_text()
    assert f"receiving evil-{mode} evil/{mode}@{BIG_DIGEST} into its cache file's buffers" in log
    if mode == "biggood":
        assert len(cached) == 1


@pytest.mark.parametrize("mode, status, said", [
    ("empty", 502, "upstream registry 'evil-empty' sent content that does not match the digest"),
    ("silentbody", 504, "upstream registry 'evil-silentbody' sent nothing for 2 s"),
])
def test_an_upstream_that_fails_before_any_byte_went_out_is_an_error_not_a_cut(evil_proxy, mode, status, said):
    # The client's connection was cut with no status line (and the access
    # log said 499, as for a client that left): nothing of the body had gone.
    got, headers, body = evil_proxy.request(f"/v2/{mode}/blobs/{DIGEST}")
    assert got == status, body
    assert json.loads(body)["errors"][0]["message"].startswith(said), body
    assert "docker-content-digest" not in headers
    assert wait_until(lambda: f"GET /v2/{mode}/blobs/{DIGEST} {status} " in evil_proxy.process.log_text(), timeout=10)
    assert wait_until(lambda: evil_proxy.temp_files() == [], timeout=30)


def test_clients_that_joined_a_download_that_fails_before_any_byte_get_its_error_too(evil_proxy):
    # They followed its file, and were cut with no status line when it
    # failed; only the client that caused the download had a 504.
    path = f"/v2/silentbody/blobs/{DIGEST}"
    logged_before = evil_proxy.process.log_text().count(f"GET {path} 504 ")
    answers: list[tuple[int, str] | BaseException] = []

    def pull() -> None:
        try:
            got, _, body = evil_proxy.request(path)
            answers.append((got, json.loads(body)["errors"][0]["message"]))
        except BaseException as e:  # reported below
            answers.append(e)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # (all within the 2 s the upstream is silent)
    for thread in threads:
        thread.join(timeout=60)
    said = "upstream registry 'evil-silentbody' sent nothing for 2 s"
    assert len(answers) == 4 and all(not isinstance(a, BaseException) and a[0] == 504 and a[1].startswith(said) for a in answers), answers
    assert evil_proxy.process.log_text().count(f"GET {path} 504 ") == logged_before + 4
    assert wait_until(lambda: evil_proxy.temp_files() == [], timeout=30)


def test_clients_that_read_nothing_of_a_large_manifest_do_not_each_hold_a_copy(evil, tmp_path):
    # Written whole, every connection held a copy of what its client had
    # not taken yet: 100 such clients of a 3.5 MB index took 330 MiB more.
    proxy = start_proxy(tmp_path, [{"id": "evil", "url": evil}], [("big", "evil", "evil/bigindex")])
    stalled = []
    try:
        path = "/v2/big/manifests/latest"
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        for _ in range(2):  # (the second from the cache, on the same connection)
            conn.request("GET", path, headers={"Authorization": f"Bearer {ALL}"})
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("docker-content-digest") == BIG_INDEX_DIGEST
            assert int(response.getheader("content-length")) == len(BIG_INDEX) and response.read() == BIG_INDEX
        conn.close()

        def rss_kib() -> int:
            status = Path(f"/proc/{proxy.process.pid}/status").read_text()
            return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

        before = rss_kib()
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", proxy.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\n\r\n".encode())
            stalled.append(sock)
        time.sleep(2)  # (every response under way)
        grown_mib = (rss_kib() - before) / 1024
        copies_mib = 40 * len(BIG_INDEX) / 2**20
        assert grown_mib < copies_mib / 4, (grown_mib, copies_mib)
    finally:
        for sock in stalled:
            sock.close()
        proxy.process.stop()


def _content_errors(proxy: Proxy, registry: str) -> float:
    status, _, body = proxy.request("/metrics")
    assert status == 200, body
    found = re.search(
        rf'cargobay_upstream_errors_total{{registry="{registry}",kind="content"}} ([0-9.e+]+)', body.decode()
    )
    return float(found.group(1)) if found else 0.0


def test_an_upstream_that_sends_what_its_digest_does_not_say_is_logged_and_counted(evil_proxy):
    # A manifest that did not match its digest reached the client as a 502
    # and the operator not at all (a blob's was logged, neither was counted).
    status, _, body = evil_proxy.request(f"/v2/good/manifests/{MANIFEST_DIGEST}")
    assert (status, body) == (200, MANIFEST)
    before = _content_errors(evil_proxy, "evil-wrong")
    for reference in (WRONG_MANIFEST_DIGEST, "latest"):
        status, _, body = evil_proxy.request(f"/v2/wrong/manifests/{reference}")
        assert status == 502, body
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "does not match" in error["message"], error
    assert wait_until(lambda: _content_errors(evil_proxy, "evil-wrong") == before + 2, timeout=10)
    log = evil_proxy.process.log_text()
    assert f"upstream evil-wrong evil/wrong@{WRONG_MANIFEST_DIGEST} sent a manifest that does not match" in log
    assert "upstream evil-wrong evil/wrong:latest sent a manifest that does not match" in log
    # A blob's mismatch counts the same way.
    status, body, error = get_blob(evil_proxy, "wrong")
    assert body is None, (status, error)
    assert wait_until(lambda: _content_errors(evil_proxy, "evil-wrong") == before + 3, timeout=10)
    assert _content_errors(evil_proxy, "evil-good") == 0


@pytest.mark.parametrize("mode, status, code", [("status429", 429, "TOOMANYREQUESTS"), ("status500", 502, "UNAVAILABLE"), ("status503", 502, "UNAVAILABLE")])
def test_upstream_error_statuses_are_mapped(evil_proxy, mode, status, code):
    got, headers, body = evil_proxy.request(f"/v2/{mode}/blobs/{DIGEST}")
    assert got == status
    assert json.loads(body)["errors"][0]["code"] == code
    if got == 429:
        assert headers["retry-after"] == "7"
        conn = http.client.HTTPConnection("127.0.0.1", evil_proxy.port, timeout=30)
        conn.request("GET", f"/v2/{mode}/blobs/{DIGEST}", headers={"Authorization": f"Bearer {ALL}"})
        assert conn.getresponse().reason == "Too Many Requests"
        conn.close()


# -- a full disk ----------------------------------------------------------------


@contextlib.contextmanager
def proxy_on_a_tmpfs(upstream: Registry, tmp_path: Path, size: str) -> Iterator[Proxy]:
    """The proxy, its cache on a tmpfs of C{size} (a disk that fills up)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    cache = tmp_path / "tmpfs"
    cache.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(cache)], capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr!r}")
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr!r}")
    try:
        port = free_port()
        config = write_config(tmp_path / "c.toml", port, cache, [{"id": "up", "url": upstream.url}], [("big", "up", "library/big")])
        process = Twistd(config_path=config, log_path=tmp_path / "cargobay.log").start()
        try:
            process.wait_listening(port)
            yield Proxy(process, port, cache)
        finally:
            process.stop()
    finally:
        subprocess.run(["umount", "-l", str(cache)])


def test_full_disk_still_serves_pulls_uncached(upstream, tmp_path):
    digest = push_blob(upstream, "library/big", 8 * 1024**2)
    with proxy_on_a_tmpfs(upstream, tmp_path, "2m") as proxy:
        for _ in range(3):
            status, _, body = proxy.request(f"/v2/big/blobs/{digest}")
            assert status == 200
            assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        assert proxy.temp_files() == []
        # What cannot fit is not begun (it was written until the disk refused).
        log = proxy.process.log_text()
        assert log.count("more than the cache's filesystem can hold") == 3 and "not writable" not in log, log[-3000:]


def test_a_blob_bigger_than_the_cache_s_filesystem_evicts_nothing(upstream, tmp_path):
    # Its download met the full disk and asked for room: every cached blob
    # was evicted, at every pull, and it still did not fit.
    small = [push_blob(upstream, "library/big", 2 * 1024**2) for _ in range(3)]
    big = push_blob(upstream, "library/big", 40 * 1024**2)
    with proxy_on_a_tmpfs(upstream, tmp_path, "24m") as proxy:
        for digest in small:
            assert proxy.request(f"/v2/big/blobs/{digest}")[0] == 200
            proxy.cached_blob(digest)
        for _ in range(2):
            status, _, body = proxy.request(f"/v2/big/blobs/{big}")
            assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == big
        for digest in small:
            status, headers, _ = proxy.request(f"/v2/big/blobs/{digest}")
            assert status == 200 and headers.get("x-cache") == "HIT", digest
        assert all(upstream.count_requests("GET", digest) == 1 for digest in small)
        assert "evicted" not in proxy.process.log_text()


def test_clients_of_a_download_whose_disk_fills_up_get_the_rest_from_the_upstream(upstream, tmp_path):
    # They were cut when a write failed midway (ENOSPC), and retried.
    digest = push_blob(upstream, "library/big", 40 * 1024**2)
    with proxy_on_a_tmpfs(upstream, tmp_path, "64m") as proxy:
        first = StalledClient(proxy, digest)
        second = StalledClient(proxy, digest)  # joins the download, reads the file

        # Both read nothing more: the download stops some way ahead of them.
        def settled() -> bool:
            sizes = [f.stat().st_size for f in proxy.temp_files()]
            time.sleep(0.5)
            return bool(sizes) and sizes == [f.stat().st_size for f in proxy.temp_files()]

        wait_until(settled, timeout=60)
        # The disk fills up under it.
        try:
            # (Unbuffered: a buffered file's close would flush what the full
            # disk refused again, and raise.)
            with open(proxy.cache / "filler", "wb", buffering=0) as filler:
                while True:
                    filler.write(b"\0" * 1024**2)
        except OSError:
            pass  # full
        second.read_the_rest()
        first.read_the_rest()
        log = proxy.process.log_text()
        assert log.count("asks for the rest") == 2, log[-3000:]
        assert upstream.count_requests("GET", digest) >= 3
        # The bytes of the rescues are counted too (and no more than the
        # upstream sent: the download given up was cut with some in flight).
        metrics = urllib.request.urlopen(f"{proxy.url}/metrics").read().decode()
        counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("cargobay_upstream_received_bytes_total{"))
        assert wait_until(lambda: upstream.count_requests("GET", digest, status=206) == 2, timeout=30)
        sent = [(e.status, e.size) for e in upstream.access_log() if digest in e.uri and e.method == "GET"]
        rescues = sum(size for status, size in sent if status == 206)
        assert rescues < counted <= sum(size for _, size in sent), (counted, sent)
        # The operator sees the write that failed, not only one log line.
        write_errors = [float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("cargobay_cache_write_errors_total ")]
        assert write_errors and write_errors[0] >= 1, metrics


class StalledClient:
    """
    A client that starts a blob's download, reads its first megabyte, then
    reads nothing until told to: the download is still running meanwhile.
    """

    def __init__(self, proxy: Proxy, digest: str) -> None:
        self.digest = digest
        self.connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        self.connection.request("GET", f"/v2/big/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
        self.response = self.connection.getresponse()
        self.head = self.response.read(1024 * 1024)

    def read_the_rest(self) -> None:
        """Reads on, and checks that the whole body is exactly the blob."""
        hasher = hashlib.sha256(self.head)
        while piece := self.response.read(1024 * 1024):
            hasher.update(piece)
        self.connection.close()
        assert "sha256:" + hasher.hexdigest() == self.digest


def test_a_stalled_first_client_does_not_hold_back_the_others(upstream, tmp_path):
    size = 64 * 1024**2
    digest = push_blob(upstream, "library/big", size)
    proxy = proxy_for(tmp_path, upstream)
    try:
        first = StalledClient(proxy, digest)
        # A second client joins: it must get the whole blob while the first
        # still reads nothing (the first no longer paces the download).
        status, _, body = proxy.request(f"/v2/big/blobs/{digest}")
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
        del body
        first.read_the_rest()
        assert upstream.count_requests("GET", f"/blobs/{digest}") == 1
    finally:
        proxy.process.stop()


def test_range_and_etag_requests_joining_a_download_are_answered_from_it(upstream, tmp_path):
    size = 64 * 1024**2
    digest = push_blob(upstream, "library/big", size)
    proxy = proxy_for(tmp_path, upstream)
    try:
        first = StalledClient(proxy, digest)
        head = first.head
        status, headers, body = proxy.request(f"/v2/big/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
        assert status == 206, status
        assert headers["content-range"] == f"bytes 1000-1999/{size}"
        assert body == head[1000:2000]
        status, _, body = proxy.request(f"/v2/big/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
        assert status == 304 and body == b""
        status, headers, _ = proxy.request(f"/v2/big/blobs/{digest}", headers={"Range": f"bytes={size}-"})
        assert status == 416 and headers["content-range"] == f"bytes */{size}"
        # The last bytes of the blob come only once it is all verified.
        status, _, tail = proxy.request(f"/v2/big/blobs/{digest}", headers={"Range": f"bytes={size - 10}-"})
        assert status == 206 and len(tail) == 10
        first.read_the_rest()
        assert upstream.count_requests("GET", f"/blobs/{digest}") == 1
    finally:
        proxy.process.stop()


def test_docker_pull_keeps_working_with_the_upstream_down(upstream, image, tmp_path):
    """The same as the skopeo case above, with Docker Engine: pull, stop the
    upstream, remove the image locally, pull again by tag and by digest."""
    from clients import Dockerd

    proxy = proxy_for(tmp_path / "p", upstream)
    daemon = Dockerd(tmp_path / "dockerd")
    daemon.start()
    try:
        login = daemon.login(proxy.host, "docker-user", ALL)
        assert login.returncode == 0, login.stderr
        ref = f"{proxy.host}/alpine:latest"
        first = daemon.docker("pull", ref)
        assert first.returncode == 0, first.stdout + first.stderr
        upstream.stop()
        try:
            daemon.docker("rmi", "-f", ref, check=True)
            again = daemon.docker("pull", ref)
            assert again.returncode == 0, again.stdout + again.stderr
            by_digest = daemon.docker("pull", f"{proxy.host}/alpine@{image['manifest']}")
            assert by_digest.returncode == 0, by_digest.stdout + by_digest.stderr
            image_id = daemon.docker("image", "inspect", "--format", "{{.Id}}", ref, check=True).stdout.strip()
            assert image_id == image["configs"][0]
        finally:
            upstream.start()
    finally:
        daemon.stop()
        proxy.process.stop()


def test_a_token_for_one_repository_reads_no_other_by_digest_and_links_survive_a_restart(upstream, image, tmp_path):
    """
    The cache keeps one copy of a digest per registry.  A client allowed only
    `alpine` asks for what `secret` cached, by digest: the CNCF registry says
    its library/alpine has no such thing, and so does cargobay.  The owner's
    own pulls keep working from the cache after a restart with the upstream
    down (what the upstream showed under which name is kept on disk).
    """
    work = tmp_path / "secret-image"
    secret = build_oci_layout(work, "v1", layer_sizes=[300_000])
    skopeo_push(work, "v1", f"{upstream.host}/team/secret:v1")
    repositories = [("alpine", "up", "library/alpine"), ("secret", "up", "team/secret")]
    proxy = start_proxy(tmp_path / "p", [{"id": "up", "url": upstream.url}], repositories)
    alpine_only = mint_token(SECRET, "t", ["alpine"])
    try:
        skopeo_pull(f"{proxy.host}/secret:v1", tmp_path / "owner", creds=f"t:{ALL}")
        layer = secret["layers"][0]
        proxy.cached_blob(layer)
        for path, code in ((f"/v2/alpine/manifests/{secret['manifest']}", "MANIFEST_UNKNOWN"),
                           (f"/v2/alpine/blobs/{layer}", "BLOB_UNKNOWN")):
            for method in ("GET", "HEAD"):
                status, _, body = proxy.request(path, token=alpine_only, method=method, headers={"Accept": OCI_MANIFEST})
                assert status == 404, (path, method, status, body[:200])
                if method == "GET":
                    assert json.loads(body)["errors"][0]["code"] == code
        assert upstream.count_requests("HEAD", f"/v2/library/alpine/blobs/{layer}") == 2
        proxy.process.stop()
        upstream.stop()
        try:
            process = Twistd(args=proxy.process.args, log_path=tmp_path / "restart.log").start()
            process.wait_listening(proxy.port)
            restarted = Proxy(process, proxy.port, proxy.cache)
            try:
                skopeo_pull(f"{proxy.host}/secret@{secret['manifest']}", tmp_path / "again", creds=f"t:{ALL}")
                for name in os.listdir(tmp_path / "owner"):
                    assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "owner" / name).read_bytes()
                status, _, _ = restarted.request(f"/v2/alpine/blobs/{layer}", token=alpine_only)
                assert status != 200
            finally:
                restarted.process.stop()
            # A cache from before links were kept: its tags are linked at start,
            # and what no tag names (digest-pinned pulls) is still served while
            # the upstream cannot confirm it, as before.
            # An upgrade cut short (its first link had made links/) goes on
            # at the next start: it was taken as done.
            for kept_tags, cut_short in ((True, False), (False, False), (False, True)):
                shutil.rmtree(proxy.cache / "links")
                if not kept_tags:
                    shutil.rmtree(proxy.cache / "tags", ignore_errors=True)
                if cut_short:
                    (proxy.cache / "links").mkdir()
                    (proxy.cache / "links" / ".upgrading").touch()
                process = Twistd(args=proxy.process.args, log_path=tmp_path / f"upgrade-{kept_tags}-{cut_short}.log").start()
                process.wait_listening(proxy.port)
                try:
                    target = tmp_path / f"upgraded-{kept_tags}-{cut_short}"
                    skopeo_pull(f"{proxy.host}/secret@{secret['manifest']}", target, creds=f"t:{ALL}")
                    assert sorted(os.listdir(target)) == sorted(os.listdir(tmp_path / "owner"))
                    assert not (proxy.cache / "links" / ".upgrading").exists()
                finally:
                    process.stop()
        finally:
            upstream.start()
    finally:
        proxy.process.stop()


def test_a_registry_id_of_any_text_keeps_its_cache_across_a_restart(upstream, image, tmp_path):
    # The earlier implementation took any id ("ghcr.io/acme team" was refused
    # here); ids name the cache's directories, escaped.
    registry_id = "ghcr.io/acme team"
    proxy = start_proxy(tmp_path / "p", [{"id": registry_id, "url": upstream.url}],
                        [("alpine", registry_id, "library/alpine")])
    restarted = None
    try:
        skopeo_pull(f"{proxy.host}/alpine:latest", tmp_path / "first", creds=f"t:{ALL}")
        for layer in image["layers"]:
            assert proxy.cached_blob(layer).parts[-4] == "ghcr.io%2Facme%20team"
        proxy.process.stop()
        upstream.stop()
        try:
            process = Twistd(args=proxy.process.args, log_path=tmp_path / "restart.log").start()
            restarted = Proxy(process, proxy.port, proxy.cache)
            process.wait_listening(proxy.port)
            # Upstream down: the tag, the manifest, the links and the blobs
            # are all found again under that id.
            skopeo_pull(f"{proxy.host}/alpine:latest", tmp_path / "again", creds=f"t:{ALL}")
            for name in os.listdir(tmp_path / "first"):
                assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
        finally:
            upstream.start()
    finally:
        (restarted or proxy).process.stop()


@contextlib.contextmanager
def _proxy_of_a_registry_that_falls_silent(tmp_path, read_timeout, cache_extra):
    """
    A proxy of a registry holding alpine:latest (an OCI image), the image,
    and a function that replaces the registry by a L{BlackHole} on its port
    (and returns it).
    """
    registry = Registry(tmp_path / "up").start()
    holes = []

    def fall_silent():
        registry.stop()
        holes.append(BlackHole(registry.port))
        return holes[-1]

    try:
        work = tmp_path / "img"
        built = build_oci_layout(work, "latest", layer_sizes=[1000])
        skopeo_push(work, "latest", f"{registry.host}/library/alpine:latest")
        proxy = start_proxy(
            tmp_path / "p", [{"id": "up", "url": registry.url, "read_timeout_seconds": read_timeout}],
            [("alpine", "up", "library/alpine")], cache_extra,
        )
        try:
            yield proxy, built, fall_silent
        finally:
            proxy.process.stop()
    finally:
        for hole in holes:
            hole.close()
        registry.stop()


def test_a_pull_of_a_cached_tag_waits_revalidate_wait_seconds_for_a_silent_upstream_not_its_read_timeout(tmp_path):
    # The read timeout (120 s here) is longer than the client waits (60 s):
    # only the cache answering after revalidate_wait_seconds gets it its tag.
    extra = "tag_ttl_seconds = 1\nrevalidate_wait_seconds = 2"
    with _proxy_of_a_registry_that_falls_silent(tmp_path, 120, extra) as (proxy, built, fall_silent):
        accept = {"Accept": built["media_type"]}
        assert proxy.request("/v2/alpine/manifests/latest", headers=accept)[0] == 200
        hole = fall_silent()
        time.sleep(1.5)  # the tag is due for revalidation
        status, headers, body = proxy.request("/v2/alpine/manifests/latest", headers=accept)
        assert status == 200 and headers["docker-content-digest"] == built["manifest"] and "warning" in headers
        assert hole.requests == ["HEAD /v2/library/alpine/manifests/latest HTTP/1.1"]
        assert "upstream slow (no answer within 2 s" in proxy.process.log_text()


def test_a_black_holed_upstream_holds_one_request_and_the_cache_answers_the_rest(tmp_path):
    # Every pull by tag waited the whole read timeout (60 s by default) for
    # a registry that took connections and never answered.
    with _proxy_of_a_registry_that_falls_silent(tmp_path, 2, "tag_ttl_seconds = 1") as (proxy, built, fall_silent):
        accept = {"Accept": built["media_type"]}
        status, headers, _ = proxy.request("/v2/alpine/manifests/latest", headers=accept)
        assert status == 200 and headers["docker-content-digest"] == built["manifest"]
        assert proxy.request("/v2/alpine/tags/list")[0] == 200
        hole = fall_silent()
        time.sleep(1.5)  # the tag is due for revalidation
        for _ in range(4):
            status, headers, _ = proxy.request("/v2/alpine/manifests/latest", headers=accept)
            assert status == 200 and headers["docker-content-digest"] == built["manifest"]
            assert "warning" in headers
        status, headers, body = proxy.request("/v2/alpine/tags/list")
        assert status == 200 and json.loads(body)["tags"] == ["latest"] and "warning" in headers
        # The first revalidation met the silence (and a check of the base
        # endpoint, which met it too); the rest were answered from the
        # cache without asking.
        assert [r for r in hole.requests if "/manifests/" in r or "/tags/" in r] == [
            "HEAD /v2/library/alpine/manifests/latest HTTP/1.1"
        ]
        log = proxy.process.log_text()
        assert log.count("what the cache holds is served without asking it") == 1
        assert "timed out" in log
