"""
What real registries and clients do that a proxy must not get wrong, against
the real CNCF registry (with schema 1 enabled) and the real `twistd -n
cargobay`:

- content negotiation: a client that accepts only single manifests gets the
  registry's pick from a manifest list, and that pick must not become what
  the tag means for every later client;
- legacy images stored as signed schema 1, whose digest covers the payload
  without its signatures;
- Range requests on blobs not yet cached;
- request bodies: every write is refused before its body, which is never
  spooled to disk;
- tokens as the earlier implementation's tool made them ("exp": null).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers import Registry, build_oci_layout, need, skopeo, skopeo_push
from proxy import ALL, Proxy, seed_token, start_proxy

pytestmark = pytest.mark.integration

V2 = "application/vnd.docker.distribution.manifest.v2+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: What docker, containerd and skopeo accept when they resolve a tag.
CLIENT_ACCEPT = ", ".join([V2, LIST, "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need("docker-registry")
    need("skopeo")
    work = tmp_path_factory.mktemp("compat")
    upstream = Registry(work / "up", extra_config={"compatibility": {"schema1": {"enabled": True}}}).start()
    proxy = None
    try:
        build_oci_layout(work / "index", "latest", platforms=[("linux", "amd64"), ("linux", "arm64")])
        for tag in ("get", "head", "cold"):
            skopeo_push(work / "index", "latest", f"{upstream.host}/library/multi:{tag}", all_platforms=True, docker_v2s2=True)
        single = build_oci_layout(work / "single", "latest", layer_sizes=[4_000_000])
        skopeo_push(work / "single", "latest", f"{upstream.host}/library/alpine:latest")
        small = build_oci_layout(work / "small", "latest")
        skopeo_push(work / "small", "latest", f"{upstream.host}/library/small:latest")
        skopeo_push(work / "small", "latest", f"{upstream.host}/library/small:v2s2", docker_v2s2=True)
        build_oci_layout(work / "old", "old")
        skopeo("copy", "--dest-tls-verify=false", "--format", "v2s1", f"oci:{work / 'old'}:old",
               f"docker://{upstream.host}/library/legacy:old")
        proxy = start_proxy(
            work / "proxy",
            [{"id": "up", "url": upstream.url}],
            [("multi", "up", "library/multi"), ("alpine", "up", "library/alpine"), ("legacy", "up", "library/legacy"),
             ("small", "up", "library/small")],
        )
        yield {"upstream": upstream, "proxy": proxy, "single": single, "small": small}
    finally:
        if proxy is not None:
            proxy.process.stop()
        upstream.stop()


def _upstream_get(upstream: Registry, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=30)
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_client_that_accepts_no_lists_does_not_change_what_a_tag_means_for_others(world, method, tmp_path):
    proxy, upstream = world["proxy"], world["upstream"]
    tag = method.lower()
    path = f"/v2/library/multi/manifests/{tag}"
    _, direct, _ = _upstream_get(upstream, path, {"Accept": CLIENT_ACCEPT})
    assert direct["content-type"] == LIST
    # As the upstream does for it, the narrow client gets one platform's manifest.
    status, narrow, _ = proxy.request(f"/v2/multi/manifests/{tag}", method=method, headers={"Accept": V2})
    assert status == 200 and narrow["content-type"] == V2
    status, through, _ = proxy.request(f"/v2/multi/manifests/{tag}", headers={"Accept": CLIENT_ACCEPT})
    assert (through["content-type"], through["docker-content-digest"]) == (LIST, direct["docker-content-digest"])
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"--creds=u:{ALL}", f"docker://{proxy.host}/multi:{tag}").stdout
    assert json.loads(raw)["mediaType"] == LIST


def test_the_same_request_gets_the_same_manifest_cached_or_not(world):
    proxy = world["proxy"]
    for path, accept in (
        # An index must be named: "v2, */*" gets one platform's, as from the registry.
        ("/v2/multi/manifests/cold", f"{V2}, */*"),
        # "*/*" with a q-value is "*/*": the current type, not schema 1.
        ("/v2/small/manifests/v2s2", "*/*;q=0.8"),
    ):
        status, cold, _ = proxy.request(path, headers={"Accept": accept})
        assert status == 200 and cold["content-type"] == V2, (path, cold)
        proxy.request(path, headers={"Accept": CLIENT_ACCEPT})  # a wide client caches the tag
        status, warm, _ = proxy.request(path, headers={"Accept": accept})
        assert status == 200 and warm["docker-content-digest"] == cold["docker-content-digest"], path
    # A digest names its content: an OCI manifest by digest, asked with a
    # narrow Accept, is served before it is cached as after (the registry
    # itself answers that Accept 404).
    digest = world["small"]["manifest"]
    for _ in range(2):
        status, headers, body = proxy.request(f"/v2/small/manifests/{digest}", headers={"Accept": V2})
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_a_client_that_accepts_no_lists_is_served_its_platform_from_the_cache_while_the_upstream_is_down(tmp_path):
    # It got a 502, though the manifest the registry picks for it (the
    # index's linux/amd64 one) was cached.
    upstream = Registry(tmp_path / "up").start()
    try:
        build_oci_layout(tmp_path / "index", "latest", platforms=[("linux", "arm64"), ("linux", "amd64")])
        skopeo_push(tmp_path / "index", "latest", f"{upstream.host}/library/multi:latest", all_platforms=True,
                    docker_v2s2=True)
        proxy = start_proxy(tmp_path / "p", [{"id": "up", "url": upstream.url}], [("multi", "up", "library/multi")])
        try:
            _, picked, _ = _upstream_get(upstream, "/v2/library/multi/manifests/latest", {"Accept": V2})
            # A wide client resolves the tag and fetches the amd64 manifest, as docker does.
            assert proxy.request("/v2/multi/manifests/latest", headers={"Accept": CLIENT_ACCEPT})[0] == 200
            status, _, _ = proxy.request(f"/v2/multi/manifests/{picked['docker-content-digest']}",
                                         headers={"Accept": CLIENT_ACCEPT})
            assert status == 200
            upstream.stop()
            for _ in range(2):
                status, headers, _ = proxy.request("/v2/multi/manifests/latest", headers={"Accept": V2})
                assert status == 200 and headers["docker-content-digest"] == picked["docker-content-digest"]
                assert headers["content-type"] == V2 and "warning" in headers
        finally:
            proxy.process.stop()
    finally:
        upstream.stop()


def test_a_legacy_image_stored_as_signed_schema_1_is_pulled_through(world, tmp_path):
    proxy, upstream = world["proxy"], world["upstream"]
    skopeo("copy", "--src-tls-verify=false", f"docker://{upstream.host}/library/legacy:old", f"dir:{tmp_path / 'direct'}")
    skopeo("copy", "--src-tls-verify=false", f"--src-creds=u:{ALL}", f"docker://{proxy.host}/legacy:old",
           f"dir:{tmp_path / 'through'}")
    # (The registry signs a schema 1 manifest afresh for each GET: the
    # signatures differ, the payload and its digest do not.)
    through = json.loads((tmp_path / "through" / "manifest.json").read_bytes())
    direct_manifest = json.loads((tmp_path / "direct" / "manifest.json").read_bytes())
    assert through["schemaVersion"] == 1 and through["fsLayers"] == direct_manifest["fsLayers"]
    status, headers, body = proxy.request("/v2/legacy/manifests/old", headers={"Accept": "*/*"})
    _, direct, _ = _upstream_get(upstream, "/v2/library/legacy/manifests/old", {})
    assert status == 200 and headers["docker-content-digest"] == direct["docker-content-digest"]
    # Cached: by its digest too.
    status, _, again = proxy.request(f"/v2/legacy/manifests/{direct['docker-content-digest']}")
    assert status == 200 and again == body


def test_the_earlier_implementation_s_tokens_pull_with_a_real_client(world, tmp_path):
    # Its generate_jwt wrote "exp": null into every token; skopeo logs in
    # with it as docker does (Basic, then cargobay's /token).
    proxy = world["proxy"]
    everything = seed_token('{"sub":"user123","exp":null,"access":{"type":"all"}}')
    skopeo("copy", "--src-tls-verify=false", f"--src-creds=user123:{everything}",
           f"docker://{proxy.host}/small:latest", f"dir:{tmp_path / 'all'}")
    some = seed_token('{"sub":"user123","exp":null,"access":{"type":"repositories","repos":["small"]}}')
    skopeo("copy", "--src-tls-verify=false", f"--src-creds=user123:{some}",
           f"docker://{proxy.host}/small:latest", f"dir:{tmp_path / 'some'}")
    assert (tmp_path / "all" / "manifest.json").read_bytes() == (tmp_path / "some" / "manifest.json").read_bytes()
    status, _, body = proxy.request("/v2/alpine/manifests/latest", token=some)
    assert (status, json.loads(body)["errors"][0]["code"]) == (403, "DENIED"), body


def test_a_client_resuming_a_blob_not_cached_yet_gets_its_range(world):
    proxy, upstream = world["proxy"], world["upstream"]
    layer = world["single"]["layers"][0]
    wanted = {"Range": "bytes=3000000-"}
    status, direct, direct_body = _upstream_get(upstream, f"/v2/library/alpine/blobs/{layer}", wanted)
    assert status == 206
    status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}", headers=wanted)
    assert (status, headers["content-range"], body) == (206, direct["content-range"], direct_body)
    # The whole blob came into the cache on the way.
    proxy.cached_blob(layer)
    status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}")
    assert status == 200 and headers["x-cache"] == "HIT"
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer


def _spooled_bytes(pid: int) -> int:
    """The largest deleted (temporary) file the process holds open."""
    largest = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if "(deleted)" in os.readlink(fd):
                largest = max(largest, os.stat(fd).st_size)
        except OSError:
            pass
    return largest


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    answer = b""
    while b"\r\n\r\n" not in answer:
        piece = sock.recv(65536)
        if not piece:
            break
        answer += piece
    return answer


@pytest.mark.parametrize("path, first", [("/v2/alpine/manifests/latest", b"HTTP/1.1 403 "),
                                          ("/token", b"HTTP/1.1 100 Continue")])
def test_a_push_that_expects_100_continue_is_refused_before_its_body(world, path, first):
    # It was told "100 Continue", sent its body, and was refused after it.
    proxy: Proxy = world["proxy"]
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = _read_answer(sock)
        assert answer.startswith(first), answer[:200]
        if first.endswith(b"403 "):
            assert b"Connection: close" in answer and b'"DENIED"' in answer, answer
    finally:
        sock.close()


@pytest.mark.parametrize(
    "head, status",
    [
        (b"PUT /v2/alpine/blobs/uploads/x HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000000\r\n\r\n", b"403"),
        (b"PATCH /v2/alpine/blobs/uploads/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", b"403"),
        (b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 30000000000\r\n\r\n", b"413"),
    ],
)
def test_a_request_body_is_refused_before_it_fills_anything(world, head, status):
    """
    Every write is refused, and a token request is small: with no token at
    all, a client streaming a body must neither fill the disk (Twisted
    spools bodies to temporary files) nor hold the connection.
    """
    proxy: Proxy = world["proxy"]
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        sock.sendall(head)
        chunk = b"0" * (1 << 20)
        if b"chunked" in head:
            chunk = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except OSError:
            pass  # closed on us: as it should be
        assert _spooled_bytes(proxy.process.pid) < 1 << 20
        answer = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert b"Connection: close" in answer
    finally:
        sock.close()
    # The proxy is fine, and says so with nosniff on.
    status_code, headers, _ = proxy.request("/v2/")
    assert status_code == 200 and headers.get("x-content-type-options") == "nosniff"
