"""
The registry routes in memory: a StubTreq client against the Klein app, whose
upstream is a FakeRegistry.  Fast checks of routing, validation, auth and the
blob cache logic; the same behaviour is shown against real peers in
test_integration_*.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import jwt
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.web._newclient import ResponseNeverReceived

from cargobay.auth import Authenticator
from cargobay.blobs import BlobService
from cargobay.cache import BlobCache, BlobKey
from cargobay.config import parse_config
from cargobay.errors import RegistryError
from cargobay.links import RepositoryLinks
from cargobay.manifest_store import ManifestStore
from cargobay.manifests import ManifestService
from cargobay.reference import Digest
from cargobay.routes import RegistryApp
from cargobay.tokens import TokenVerifier, mint_token
from cargobay.upstream import UpstreamError
from fakes import FakeRegistry, make_upstream

SECRET = "route-test-secret-route-test-secret-xx"
CONFIG = f"""
[auth]
jwt_secret = "{SECRET}"
[[registries]]
id = "up"
url = "http://upstream.test"
[[repositories]]
name = "alpine"
registry_id = "up"
upstream_name = "library/alpine"
[[repositories]]
name = "mycompany/app"
registry_id = "up"
upstream_name = "team/application"
[[repositories]]
name = "library/busybox"
registry_id = "up"
upstream_name = "library/busybox"
"""
BLOB = os.urandom(300_000)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


class World:
    def __init__(self, tmp_path) -> None:
        self.clock = Clock()
        self.upstream_registry = FakeRegistry()
        self._tmp_path = tmp_path
        self.restart()

    def restart(self) -> None:
        """A new process on the same cache (and the same upstream)."""
        tmp_path = self._tmp_path
        config = parse_config(CONFIG)
        self.cache = BlobCache(str(tmp_path / "cache"), 10**9, 3600, self.clock)
        self.cache.open()
        upstream = make_upstream(self.upstream_registry, self.clock)
        auth = Authenticator(TokenVerifier([SECRET]), SECRET, "cargobay", None)
        self.store = ManifestStore(str(tmp_path / "cache"), self.clock)
        self.links = RepositoryLinks(str(tmp_path / "cache" / "links"))
        manifests = ManifestService(self.store, self.clock, tag_ttl=60, links=self.links)
        self.upstream = upstream
        self.blobs = BlobService(self.cache, self.clock, links=self.links)
        self.app = RegistryApp(config, auth, {"up": upstream}, self.blobs, manifests)
        self.client = StubTreq(self.app.resource())

    def send(self, path, token=None, headers=None):
        """A GET under way: the list it returns gets the response once it comes."""
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        answered = []
        self.client.request("GET", "http://proxy.test" + path, headers=headers).addBoth(answered.append)
        self.client.flush()
        return answered

    def wait(self, seconds):
        """Let C{seconds} pass, and what is due by then happen."""
        self.clock.advance(seconds)
        self.client.flush()

    def body_of(self, response):
        body = []
        self.client.content(response).addBoth(body.append)
        self.client.flush()
        return body[0]

    def hold(self, method, prefix):
        """From now on the upstream answers none of these requests until the test does (L{answer}): the list of them."""
        from twisted.web.server import NOT_DONE_YET

        held = []
        self.upstream_registry.on(method, prefix, lambda request: held.append(request) or NOT_DONE_YET)
        return held

    def cached_tag_due_with_a_silent_check(self):
        """
        alpine:latest cached, its TTL past, and the upstream holding every
        manifest HEAD (see L{hold}): the tag's path, and the held HEADs.
        """
        path = "/v2/alpine/manifests/latest"
        assert self.get(path, ALL)[1] == MANIFEST
        held = self.hold("HEAD", "/v2/library/alpine/manifests/")
        self.clock.advance(61)  # past the tag's TTL
        return path, held

    def answer(self, request, body=b""):
        """The upstream answers a held request now, and what follows from it happens."""
        if body:
            request.write(body)
        request.finish()
        self.upstream._http._agent._agent.flush()
        self.client.flush()

    def get(self, path, token=None, method="GET", headers=None):
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        d = self.client.request(method, "http://proxy.test" + path, headers=headers)
        self.client.flush()
        results = []
        d.addBoth(results.append)
        self.client.flush()
        response = results[0]
        if hasattr(response, "raiseException"):
            response.raiseException()
        return response, self.body_of(response)


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)

    def manifest(request):
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
        request.setHeader(b"Docker-Content-Digest", MANIFEST_DIGEST.encode())
        return MANIFEST

    w.upstream_registry.on("GET", "/v2/library/alpine/manifests/", manifest)
    w.upstream_registry.on("GET", "/v2/library/alpine/blobs/", lambda r: BLOB)
    return w


ALL = mint_token(SECRET, "tester")
ALPINE_ONLY = mint_token(SECRET, "tester", ["alpine"])


def error_code(body):
    return json.loads(body)["errors"][0]["code"]


def test_version_check_needs_a_token(world):
    response, body = world.get("/v2/")
    assert response.code == 401
    challenge = response.headers.getRawHeaders("www-authenticate")[0]
    assert challenge.startswith('Bearer realm="http://proxy.test/token"')
    assert error_code(body) == "UNAUTHORIZED"
    assert response.headers.getRawHeaders("docker-distribution-api-version") == ["registry/2.0"]
    response, body = world.get("/v2/", ALL)
    assert response.code == 200 and body == b"{}"


def test_invalid_token_is_told_apart(world):
    response, _ = world.get("/v2/", "garbage")
    assert response.code == 401
    assert 'error="invalid_token"' in response.headers.getRawHeaders("www-authenticate")[0]


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/v2/alpine/manifests/latest", "/v2/alpine/blobs/uploads/", "/v2/", "/v2/x/y"])
def test_writes_are_refused_whatever_the_path(world, method, path):
    response, body = world.get(path, ALL, method=method)
    assert response.code == 403
    assert error_code(body) == "DENIED"


def test_wrong_repository_is_denied(world):
    response, body = world.get("/v2/mycompany/app/tags/list", ALPINE_ONLY)
    assert response.code == 403 and error_code(body) == "DENIED"
    assert world.upstream_registry.seen == []


@pytest.mark.parametrize(
    "path, status, code",
    [
        ("/v2/unmapped/manifests/latest", 404, "NAME_UNKNOWN"),
        ("/v2/Alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/../etc/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/alpine%2f..%2fx/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/%80/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/alpine/manifests/%0A", 400, "NAME_INVALID"),
        ("/v2/alpine%00/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/alpine/manifests/%ff%fe", 400, "NAME_INVALID"),
        ("/v2/alpine/manifests/.bad", 400, "MANIFEST_INVALID"),
        ("/v2/alpine/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/sha256:" + "z" * 64, 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/alpine/tags/list?n=-1", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/alpine/tags/list?n=%B2", 400, "PAGINATION_NUMBER_INVALID"),  # "²" passes str.isdigit()
        ("/v2/alpine/tags/list?last=%01", 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/alpine/tags/list?last=" + "x" * 1025, 400, "PAGINATION_NUMBER_INVALID"),
        ("/v2/alpine/unknown/thing", 404, "UNSUPPORTED"),
        ("/elsewhere", 404, "UNSUPPORTED"),
    ],
)
def test_bad_requests_get_oci_errors(world, path, status, code):
    response, body = world.get(path, ALL)
    assert (response.code, error_code(body)) == (status, code)
    assert world.upstream_registry.seen == []


def test_manifest_is_passed_through_byte_for_byte(world):
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 200
    assert body == MANIFEST
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.image.manifest.v1+json"]
    # No Accept from the client: every current type is asked for, never schema 1.
    accept = world.upstream_registry.seen[0].headers["accept"][0]
    assert "application/vnd.oci.image.index.v1+json" in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept
    assert "v1+prettyjws" not in accept


def test_a_manifest_the_client_holds_is_answered_304(world):
    for reference in ("latest", MANIFEST_DIGEST):
        path = f"/v2/alpine/manifests/{reference}"
        # (Unquoted too, as distribution takes it for manifests.)
        for held in (f'"{MANIFEST_DIGEST}"', f'"other", W/"{MANIFEST_DIGEST}"', "*", MANIFEST_DIGEST):
            response, body = world.get(path, ALL, headers={"If-None-Match": held})
            assert response.code == 304 and body == b"", (reference, held)
            assert response.headers.getRawHeaders("etag") == [f'"{MANIFEST_DIGEST}"']
            assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
        response, body = world.get(path, ALL, headers={"If-None-Match": '"sha256:other"'})
        assert response.code == 200 and body == MANIFEST


def test_manifest_that_does_not_match_its_digest_is_refused(world):
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: MANIFEST + b" ")
    response, body = world.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", ALL)
    assert response.code == 502
    assert error_code(body) == "UNAVAILABLE"


def test_client_accept_is_forwarded(world):
    world.get("/v2/alpine/manifests/latest", ALL, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert world.upstream_registry.seen[0].headers["accept"] == ["application/vnd.oci.image.manifest.v1+json"]


def test_manifest_head_is_a_head_upstream(world):
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _manifest_head)
    response, _ = world.get("/v2/alpine/manifests/latest", ALL, method="HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    assert response.headers.getRawHeaders("content-length") == [str(len(MANIFEST))]
    assert [s.method for s in world.upstream_registry.seen] == ["HEAD"]


def test_a_manifest_head_upstream_without_a_length_is_answered_with_one(world):
    # containerd takes a HEAD's Content-Length for the manifest's size: a
    # HEAD answered without one made it GET the manifest anyway.  Without a
    # length upstream, cargobay GETs it once, keeps it, and answers with its
    # size; the GET that follows is a hit.
    def head(request):
        _manifest_head(request)
        request.responseHeaders.removeHeader(b"content-length")
        return b""

    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", head)
    path = "/v2/alpine/manifests/latest"
    response, _ = world.get(path, ALL, method="HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    assert response.headers.getRawHeaders("content-length") == [str(len(MANIFEST))]
    assert [s.method for s in world.upstream_registry.seen] == ["HEAD", "GET"]
    response, body = world.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", ALL)
    assert response.code == 200 and body == MANIFEST
    assert [s.method for s in world.upstream_registry.seen] == ["HEAD", "GET"]


def test_tag_list_is_rewritten_to_the_local_name(world):
    def tags(request):
        request.setHeader(b"Link", b'</v2/team/application/tags/list?last=b&n=2>; rel="next"')
        return json.dumps({"name": "team/application", "tags": ["a", "b"]}).encode()

    world.upstream_registry.on("GET", "/v2/team/application/tags/list", tags)
    response, body = world.get("/v2/mycompany/app/tags/list?n=2", ALL)
    assert json.loads(body) == {"name": "mycompany/app", "tags": ["a", "b"]}
    assert response.headers.getRawHeaders("link") == ['</v2/mycompany/app/tags/list?last=b&n=2>; rel="next"']
    assert world.upstream_registry.seen[0].url.endswith("/v2/team/application/tags/list?n=2")


def test_blob_miss_then_hit(world):
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALPINE_ONLY)
    assert response.code == 200 and body == BLOB
    assert response.headers.getRawHeaders("docker-content-digest") == [BLOB_DIGEST]
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALPINE_ONLY)
    assert response.code == 200 and body == BLOB
    assert response.headers.getRawHeaders("x-cache") == ["HIT"]
    assert len(world.upstream_registry.requests("/blobs/")) == 1


def test_a_range_of_a_blob_not_cached_yet_is_answered_206_and_the_blob_cached(world):
    path = f"/v2/alpine/blobs/{BLOB_DIGEST}"
    response, body = world.get(path, ALL, headers={"Range": "bytes=100000-"})
    assert response.code == 206 and body == BLOB[100_000:]
    assert response.headers.getRawHeaders("content-range") == [f"bytes 100000-{len(BLOB) - 1}/{len(BLOB)}"]
    assert response.headers.getRawHeaders("etag") == [f'"{BLOB_DIGEST}"']
    response, body = world.get(path, ALL, headers={"Range": "bytes=0-9"})
    assert response.code == 206 and body == BLOB[:10]
    assert response.headers.getRawHeaders("x-cache") == ["HIT"]
    assert len(world.upstream_registry.requests("/blobs/")) == 1


def test_a_range_of_a_blob_too_big_for_the_cache_gets_the_whole_blob(world):
    world.cache.max_size_bytes = len(BLOB) - 1
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL, headers={"Range": "bytes=100000-"})
    assert response.code == 200 and body == BLOB
    assert len(world.cache) == 0 and world.blobs.in_flight() == 0


def test_a_blob_streamed_from_upstream_says_it_takes_ranges(world):
    response, _ = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.headers.getRawHeaders("x-cache") == ["MISS"]
    assert response.headers.getRawHeaders("etag") == [f'"{BLOB_DIGEST}"']
    assert response.headers.getRawHeaders("accept-ranges") == ["bytes"]
    assert len(world.cache) == 1


def test_a_blob_left_behind_by_a_slow_disk_is_fetched_again_into_the_cache(world):
    # What the service does once a lone client was served past a slow disk
    # (see test_blobs.py): a download with no client, into the cache.
    key = BlobKey("up", Digest.parse(BLOB_DIGEST))
    world.blobs._refill(key, world.upstream, "library/alpine", key.digest)
    world.client.flush()
    assert len(world.upstream_registry.requests("/blobs/")) == 1
    assert world.cache.lookup(key) is not None
    # Not again while it is cached.
    world.blobs._refill(key, world.upstream, "library/alpine", key.digest)
    world.client.flush()
    assert len(world.upstream_registry.requests("/blobs/")) == 1
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 200 and body == BLOB
    assert response.headers.getRawHeaders("x-cache") == ["HIT"]


KEY = BlobKey("up", Digest.parse(BLOB_DIGEST))


def refill_onto(world, held, answer=None):
    """
    The service's refill of a cache file a download left behind holding
    ``held``, with the upstream answering by ``answer`` (by default the whole
    blob, Range ignored); returns the kept writer.
    """
    writer = world.cache.begin(KEY)
    writer.write_raw(held)
    writer.wrote(len(held))
    if answer is not None:
        world.upstream_registry.on("GET", "/v2/library/alpine/blobs/", answer)
    world.blobs._refill(KEY, world.upstream, "library/alpine", KEY.digest, succeed(writer))
    world.client.flush()
    return writer


def assert_nothing_cached(world, writer):
    assert world.cache.lookup(KEY) is None
    assert not os.path.exists(writer.path)


def ranged(body, start=None, total=None, end=None):
    """
    An upstream that answers Range requests with a 206 of
    ``body[start:end + 1]`` (by default from where it was asked, to the end).
    """

    def answer(request):
        asked = request.getHeader(b"range")
        if asked is None:
            return body
        first = int(asked.decode().split("=")[1].rstrip("-")) if start is None else start
        last = len(body) - 1 if end is None else end
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", f"bytes {first}-{last}/{total or len(body)}".encode())
        part = body[first:last + 1]
        request.setHeader(b"Content-Length", str(len(part)).encode())
        return part

    return answer


@pytest.mark.parametrize("total", [None, "*"])  # "*": a total the upstream does not know
def test_a_refill_asks_only_for_what_the_file_left_behind_lacks(world, total):
    refill_onto(world, BLOB[:100_000], ranged(BLOB, total=total))
    [get] = world.upstream_registry.requests("/blobs/")
    assert get.headers.get("range") == ["bytes=100000-"]
    entry = world.cache.lookup(KEY)
    assert entry is not None and entry.size == len(BLOB)
    with open(entry.path, "rb") as f:
        assert f.read() == BLOB
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert body == BLOB and response.headers.getRawHeaders("x-cache") == ["HIT"]


def test_a_refill_from_an_upstream_that_ignores_range_starts_the_file_over(world):
    refill_onto(world, BLOB[:100_000])
    entry = world.cache.lookup(KEY)
    assert entry is not None and entry.size == len(BLOB)
    with open(entry.path, "rb") as f:
        assert f.read() == BLOB


@pytest.mark.parametrize("answer", [
    {"start": 99_999},  # not where we asked
    {"total": len(BLOB) + 1},  # a different blob
    {"total": "*", "end": 199_999},  # of unknown total, and short of the blob's end
])
def test_a_refill_given_some_other_range_caches_nothing_of_it_and_fetches_the_whole_blob_once(world, answer):
    # (Without the whole blob once, every pull downloaded it, left the slow
    # disk behind, and refilled in vain.)
    writer = refill_onto(world, BLOB[:100_000], ranged(BLOB, **answer))
    assert_nothing_cached(world, writer)
    world.wait(0)
    assert_whole_blob_fetched_once_more(world)


def test_a_refill_onto_a_file_with_wrong_bytes_caches_nothing_of_it_and_fetches_the_whole_blob_once(world):
    # The prefix is hashed from the file itself: a file that does not hold
    # the blob's first bytes can never become the entry.
    writer = refill_onto(world, bytes([BLOB[0] ^ 1]) + BLOB[1:100_000], ranged(BLOB))
    assert_nothing_cached(world, writer)
    world.wait(0)
    assert_whole_blob_fetched_once_more(world)


def assert_whole_blob_fetched_once_more(world):
    gets = world.upstream_registry.requests("/blobs/")
    assert [g.headers.get("range") for g in gets][-1] is None and len(gets) == 2
    entry = world.cache.lookup(KEY)
    assert entry is not None
    with open(entry.path, "rb") as f:
        assert f.read() == BLOB


@pytest.mark.parametrize("answer", [
    {"start": 99_999},
    {"total": len(BLOB) + 1},
])
def test_a_refill_s_whole_blob_is_fetched_only_once(world, answer):
    # An upstream whose whole blob is not right either: two GETs, then no more.
    wrong = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
    refill_onto(world, BLOB[:100_000], ranged(wrong, **answer))
    for _ in range(3):
        world.wait(0)
    assert len(world.upstream_registry.requests("/blobs/")) == 2
    assert world.cache.lookup(KEY) is None


def test_a_refill_whose_upstream_cannot_be_reached_leaves_no_file(world, monkeypatch):
    unreachable = UpstreamError(RegistryError(502, "UNKNOWN", "connection refused"))
    asked = []
    monkeypatch.setattr(world.upstream, "request", lambda *args, **kwargs: asked.append(args) or fail(unreachable))
    assert_nothing_cached(world, refill_onto(world, BLOB[:100_000]))
    world.wait(0)
    assert world.blobs.in_flight() == 0 and len(asked) == 1  # (no whole blob: the upstream is down)


def test_a_refill_of_a_blob_too_big_for_the_cache_leaves_no_file(world):
    world.cache.max_size_bytes = len(BLOB) - 1
    assert_nothing_cached(world, refill_onto(world, BLOB[:100_000], ranged(BLOB)))
    world.wait(0)
    assert world.cache.lookup(KEY) is None


def test_blob_with_wrong_content_is_never_cached(world):
    # The last byte changed (a fixed byte would be no change once in 256 runs).
    world.upstream_registry.on("GET", "/v2/library/alpine/blobs/", lambda r: BLOB[:-1] + bytes([BLOB[-1] ^ 1]))
    # None of it was sent (the last bytes wait for the digest): an error the
    # client can read, not a cut connection.
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 502
    assert json.loads(body)["errors"][0]["message"] == "upstream registry 'up' sent content that does not match the digest"
    assert response.headers.getRawHeaders("docker-content-digest") is None
    assert len(world.cache) == 0
    assert os.listdir(os.path.join(world.cache.directory, "tmp")) == []


def test_a_cached_blob_is_served_under_another_name_only_once_the_upstream_shows_it_there(world):
    # One copy per registry and digest, but a token for one repository must
    # not read another's blobs by digest: the upstream is asked (a HEAD).
    world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    for method in ("GET", "HEAD"):
        response, body = world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALL, method=method)
        assert response.code == 404 and body != BLOB, method
    asked = world.upstream_registry.requests("/v2/team/application/blobs/")
    assert [s.method for s in asked] == ["HEAD", "HEAD"]
    world.upstream_registry.on("HEAD", "/v2/team/application/blobs/", lambda request: b"")
    for _ in range(2):
        response, body = world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALL)
        assert response.code == 200 and body == BLOB
    # Asked once; the body came from the cache.
    assert [s.method for s in world.upstream_registry.requests("/v2/team/application/blobs/")] == ["HEAD"] * 3
    assert len(world.upstream_registry.requests("/library/alpine/blobs/")) == 1
    response, _ = world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALPINE_ONLY)
    assert response.code == 403


def test_a_cached_manifest_is_served_by_digest_under_another_name_only_once_the_upstream_shows_it_there(world):
    assert world.get("/v2/alpine/manifests/latest", ALL)[1] == MANIFEST
    path = f"/v2/mycompany/app/manifests/{MANIFEST_DIGEST}"
    response, body = world.get(path, ALL)
    assert response.code == 404 and error_code(body) == "MANIFEST_UNKNOWN"

    def head(request):
        request.setHeader(b"Docker-Content-Digest", MANIFEST_DIGEST.encode())
        return b""

    world.upstream_registry.on("HEAD", "/v2/team/application/manifests/", head)
    assert world.get(path, ALL)[1] == MANIFEST
    assert world.get(path, ALL)[1] == MANIFEST
    asked = world.upstream_registry.requests("/v2/team/application/manifests/")
    assert [s.method for s in asked] == ["HEAD", "HEAD"]  # the refused one, then one confirmation


def manifest_naming_the_blob():
    """A manifest whose config is BLOB, and an upstream handler serving it."""
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"digest": BLOB_DIGEST, "size": len(BLOB)}, "layers": [],
    }).encode()

    def get_manifest(request):
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
        return manifest

    return manifest, get_manifest


def index_naming(manifest_digest, size):
    """An OCI index naming one linux/amd64 manifest, and an upstream handler serving it."""
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": str(manifest_digest), "size": size,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()

    def get_index(request):
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
        return index

    return index, get_index


def test_an_index_proves_nothing_of_the_manifests_it_names(world):
    # A registry may take an index naming manifests it does not hold in that
    # repository (distribution 3's sparse indexes): one pushed under another
    # name made a manifest cached for alpine, and then its blobs, servable
    # under that name with no upstream asked.
    world.upstream_registry.on("GET", "/v2/library/alpine/blobs/", lambda r: BLOB)
    image, get_image = manifest_naming_the_blob()
    image_digest = "sha256:" + hashlib.sha256(image).hexdigest()
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", get_image)
    assert world.get("/v2/alpine/manifests/latest", ALL)[1] == image
    assert world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)[1] == BLOB
    _, get_index = index_naming(image_digest, len(image))
    world.upstream_registry.on("GET", "/v2/team/application/manifests/evil", get_index)
    world.upstream_registry.on("HEAD", "/v2/team/application/manifests/sha256:", _failing(404))
    assert world.get("/v2/mycompany/app/manifests/evil", ALL)[0].code == 200
    world.upstream_registry.seen.clear()
    response, _ = world.get(f"/v2/mycompany/app/manifests/{image_digest}", ALL)
    assert response.code == 404
    assert [seen.method for seen in world.upstream_registry.seen] == ["HEAD"]
    assert world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALL)[0].code == 404
    # Nor when the upstream fails or refuses: a client that takes no index
    # was handed the index's linux/amd64 manifest, alpine's, from the cache.
    narrow = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for status in (503, 429, 403, 401):
        world.upstream_registry.on("GET", "/v2/team/application/manifests/evil", _failing(status))
        world.wait(61)  # (the tag is due for a check)
        response, body = world.get("/v2/mycompany/app/manifests/evil", ALL, headers=narrow)
        assert response.code != 200 and body != image, status


@pytest.mark.parametrize("status", [503, 429, 403, 401])
def test_an_index_s_manifest_shown_under_its_name_is_served_to_a_narrow_client_while_the_upstream_fails(world, status):
    image, get_image = manifest_naming_the_blob()
    image_digest = "sha256:" + hashlib.sha256(image).hexdigest()
    _, get_index = index_naming(image_digest, len(image))
    world.upstream_registry.on("GET", "/v2/team/application/manifests/multi", get_index)
    world.upstream_registry.on("GET", f"/v2/team/application/manifests/{image_digest}", get_image)
    assert world.get("/v2/mycompany/app/manifests/multi", ALL)[0].code == 200
    assert world.get(f"/v2/mycompany/app/manifests/{image_digest}", ALL)[1] == image  # (as docker does)
    world.upstream_registry.on("GET", "/v2/team/application/manifests/multi", _failing(status))
    world.wait(61)  # (the tag is due for a check)
    response, body = world.get("/v2/mycompany/app/manifests/multi", ALL,
                               headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert (response.code, body) == (200, image) and response.headers.getRawHeaders("warning")


def test_a_large_index_goes_out_whole_a_piece_at_a_time(world):
    # Written whole, every connection held a copy of what its client had not
    # taken yet: 100 clients that read nothing of a 3.5 MB manifest, 330 MiB.
    entries = [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + hashlib.sha256(b"%d" % i).hexdigest(), "size": 1000 + i,
                "platform": {"os": "linux", "architecture": f"arch{i}"}} for i in range(4000)]
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    assert len(index) > 512 * 1024

    def get_index(request):
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
        return index

    world.upstream_registry.on("GET", "/v2/team/application/manifests/big", get_index)
    written: list = []
    for _ in range(2):  # from the upstream, then from the cache
        response, body = world.get("/v2/mycompany/app/manifests/big", ALL)
        assert (response.code, body) == (200, index)
    from cargobay import routes

    original = routes._PieceSender._send

    def counted(self):
        written.append(self)
        return original(self)

    routes._PieceSender._send = counted
    try:
        assert world.get("/v2/mycompany/app/manifests/big", ALL)[1] == index
    finally:
        routes._PieceSender._send = original
    assert len(written) == 1  # (sent by a sender of pieces)


class _SlowClient:
    """A request whose transport is full after every write: it pauses its producer at once."""

    def __init__(self):
        self.written, self.producer, self.unregistered = [], None, 0

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def unregisterProducer(self):
        self.unregistered += 1

    def write(self, data):
        self.written.append(data)
        self.producer.pauseProducing()


def test_a_body_sent_a_piece_at_a_time_waits_for_its_client_and_stops_with_it():
    from cargobay.routes import STREAM_PIECE, _PieceSender

    body = os.urandom(5 * STREAM_PIECE + 123)
    client = _SlowClient()
    sender = _PieceSender(client, body)
    ended = []
    sender.done.addBoth(ended.append)
    assert len(client.written) == 1 and not ended  # one piece, then paused
    for _ in range(10):
        client.producer.resumeProducing()
    assert b"".join(client.written) == body and ended == [None] and client.unregistered == 1
    # A client that leaves: nothing more is written, and Klein's cancel ends it.
    client = _SlowClient()
    sender = _PieceSender(client, body)
    sender.stopProducing()
    client.producer.resumeProducing()
    assert len(client.written) == 1 and client.unregistered == 0
    sender.done.cancel()
    assert sender.done.called


def test_upgrading_a_cache_links_an_index_but_not_the_manifests_it_names(world):
    # A cache from before links were kept: what its tags resolve to is linked
    # to their names at start, an index's manifests not (it may name another
    # repository's); they stay servable as legacy while the upstream is down.
    from cargobay.manifest_store import Manifest

    image, _ = manifest_naming_the_blob()
    image_digest = Digest.parse("sha256:" + hashlib.sha256(image).hexdigest())
    index, _ = index_naming(image_digest, len(image))
    index_digest = Digest.parse("sha256:" + hashlib.sha256(index).hexdigest())
    world.store.put("up", Manifest(image, "application/vnd.oci.image.manifest.v1+json", image_digest))
    world.store.put("up", Manifest(index, "application/vnd.oci.image.index.v1+json", index_digest))
    world.store.set_tag("up", "team/application", "evil", index_digest, "application/vnd.oci.image.index.v1+json")
    service = ManifestService(world.store, world.clock, links=world.links)
    assert service.link_stored_tags() == 1
    assert world.links.known("up", "team/application", index_digest)
    assert not world.links.known("up", "team/application", image_digest)


def test_the_blobs_a_manifest_names_need_no_confirmation_under_its_name(world):
    # A registry takes a manifest only once what it references is in the
    # repository: a pull of an image whose layers another name cached asks
    # the upstream nothing more about them.
    world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    manifest, get_manifest = manifest_naming_the_blob()

    world.upstream_registry.on("GET", "/v2/team/application/manifests/", get_manifest)
    assert world.get("/v2/mycompany/app/manifests/v1", ALL)[1] == manifest
    response, body = world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 200 and body == BLOB
    assert world.upstream_registry.requests("/v2/team/application/blobs/") == []


def test_conditional_requests_for_blobs_not_cached(world):
    path = f"/v2/alpine/blobs/{BLOB_DIGEST}"
    world.upstream_registry.on("HEAD", "/v2/library/alpine/blobs/", lambda r: BLOB)
    response, body = world.get(path, ALL, method="HEAD")
    assert response.code == 200 and response.headers.getRawHeaders("etag") == [f'"{BLOB_DIGEST}"']
    assert response.headers.getRawHeaders("accept-ranges") == ["bytes"]
    # A client that holds the blob: the upstream is asked whether it still
    # has it, and nothing is downloaded.
    response, body = world.get(path, ALL, headers={"If-None-Match": f'"{BLOB_DIGEST}"'})
    assert response.code == 304 and body == b""
    assert [s.method for s in world.upstream_registry.requests("/blobs/")] == ["HEAD", "HEAD"]
    # A Range whose If-Range names another representation: the whole blob.
    response, body = world.get(path, ALL, headers={"Range": "bytes=10-19", "If-Range": '"sha256:other"'})
    assert response.code == 200 and body == BLOB


def test_ranges_and_conditional_requests_on_hits(world):
    path = f"/v2/alpine/blobs/{BLOB_DIGEST}"
    world.get(path, ALL)
    response, body = world.get(path, ALL, headers={"Range": "bytes=10-19"})
    assert response.code == 206 and body == BLOB[10:20]
    assert response.headers.getRawHeaders("content-range") == [f"bytes 10-19/{len(BLOB)}"]
    response, body = world.get(path, ALL, headers={"Range": "bytes=-5"})
    assert response.code == 206 and body == BLOB[-5:]
    response, body = world.get(path, ALL, headers={"Range": "BYTES=10-19"})  # units are case-insensitive
    assert response.code == 206 and body == BLOB[10:20]
    response, _ = world.get(path, ALL, headers={"Range": f"bytes={len(BLOB)}-"})
    assert response.code == 416
    response, body = world.get(path, ALL, headers={"If-None-Match": f'"{BLOB_DIGEST}"'})
    assert response.code == 304 and body == b""
    for weak_or_any in (f'"other", W/"{BLOB_DIGEST}"', "*"):
        response, body = world.get(path, ALL, headers={"If-None-Match": weak_or_any})
        assert response.code == 304 and body == b"", weak_or_any
    response, body = world.get(path, ALL, headers={"If-None-Match": '"sha256:other"'})
    assert response.code == 200 and body == BLOB
    response, body = world.get(path, ALL, method="HEAD", headers={"Range": "bytes=10-19"})
    assert response.code == 200 and response.headers.getRawHeaders("content-length") == [str(len(BLOB))]
    # If-Range: the part only of the representation named, else all of it.
    for if_range, code, expected in (
        (f'"{BLOB_DIGEST}"', 206, BLOB[10:20]), ('"sha256:other"', 200, BLOB), (f'W/"{BLOB_DIGEST}"', 200, BLOB),
        ("Fri, 27 Nov 2026 21:00:00 GMT", 200, BLOB),
    ):
        response, body = world.get(path, ALL, headers={"Range": "bytes=10-19", "If-Range": if_range})
        assert (response.code, body) == (code, expected), if_range
    response, body = world.get(path, ALL, method="HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-length") == [str(len(BLOB))]
    assert len(world.upstream_registry.seen) == 1


@pytest.mark.parametrize("header", ["bytes=" + "9" * 5000 + "-", "bytes=-" + "1" * 5000, "bytes=0-" + "1" * 5000])
def test_a_range_of_huge_numbers_is_ignored_and_pins_nothing(world, header):
    # int() refuses numbers of over 4,300 digits: that was a 500, and the
    # cache entry stayed open and unevictable for good.
    path = f"/v2/alpine/blobs/{BLOB_DIGEST}"
    world.get(path, ALL)
    [entry] = world.cache._entries.values()
    for _ in range(3):
        response, body = world.get(path, ALL, headers={"Range": header})
        assert (response.code, body) == (200, BLOB)
    assert entry.readers == 0


def test_blob_unknown_upstream(world):
    world.upstream_registry.handlers.clear()
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 404 and error_code(body) == "BLOB_UNKNOWN"


def _basic(user, password):
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_token_endpoint_trades_basic_credentials_for_a_scoped_token(world):
    response, body = world.get(
        "/token?service=cargobay&scope=repository:alpine:pull,push&scope=repository:mycompany/app:pull",
        headers={"Authorization": _basic("anyone", ALPINE_ONLY)},
    )
    assert response.code == 200
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"]
    grant = TokenVerifier([SECRET]).verify(answer["token"])
    # Only what was asked for and allowed: alpine, not mycompany/app.
    assert grant.repositories == ("alpine",)
    response, _ = world.get("/v2/mycompany/app/tags/list", answer["token"])
    assert response.code == 403


def test_token_endpoint_refuses_bad_credentials(world):
    response, body = world.get("/token?service=cargobay", headers={"Authorization": _basic("x", "nope")})
    assert response.code == 401 and error_code(body) == "UNAUTHORIZED"
    # It asks for what it takes, Basic credentials (a Bearer challenge whose
    # realm is the token endpoint itself would send a client round).
    for headers in ({"Authorization": _basic("x", "nope")}, {}):
        response, _ = world.get("/token?service=cargobay&scope=repository:alpine:pull", headers=headers)
        assert response.headers.getRawHeaders("www-authenticate")[0].startswith("Basic realm="), headers


def test_basic_credentials_on_registry_requests(world):
    response, _ = world.get("/v2/", headers={"Authorization": _basic("anyone", ALL)})
    assert response.code == 200


def test_healthz_needs_no_token(world):
    response, body = world.get("/healthz")
    assert response.code == 200 and body == b"ok\n"


def _manifest_head(request):
    request.setHeader(b"Docker-Content-Digest", MANIFEST_DIGEST.encode())
    request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
    request.setHeader(b"Content-Length", str(len(MANIFEST)).encode())
    return b""


def _failing(code):
    def handler(request):
        request.setResponseCode(code)
        return b""

    return handler


def test_tag_is_served_from_cache_within_ttl_then_revalidated_with_head(world):
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _manifest_head)
    path = "/v2/alpine/manifests/latest"
    assert world.get(path, ALL)[1] == MANIFEST
    response, body = world.get(path, ALL)
    assert body == MANIFEST
    assert [s.method for s in world.upstream_registry.seen] == ["GET"]
    world.clock.advance(61)
    response, body = world.get(path, ALL)
    assert body == MANIFEST
    assert [s.method for s in world.upstream_registry.seen] == ["GET", "HEAD"]
    # By digest: immutable, never asked upstream again.
    assert world.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", ALL)[1] == MANIFEST
    assert len(world.upstream_registry.seen) == 2


@pytest.mark.parametrize("code", [500, 503, 429])
def test_tag_served_stale_when_upstream_fails(world, code):
    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    world.upstream_registry.on("HEAD", "/v2/", _failing(code))
    world.upstream_registry.on("GET", "/v2/", _failing(code))
    world.clock.advance(3600)
    response, body = world.get(path, ALL)
    assert response.code == 200 and body == MANIFEST
    assert response.headers.getRawHeaders("warning")
    response, _ = world.get(path, ALL, method="HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]


def test_tag_deleted_upstream_is_not_served_from_cache(world):
    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    world.upstream_registry.on("HEAD", "/v2/", _failing(404))
    world.upstream_registry.on("GET", "/v2/", _failing(404))
    world.clock.advance(3600)
    response, body = world.get(path, ALL)
    assert response.code == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, _ = world.get(path, ALL)
    assert response.code == 502


MOVED = MANIFEST.replace(b"2", b"2 ")
MOVED_DIGEST = "sha256:" + hashlib.sha256(MOVED).hexdigest()


def _head_of_moved_tag(request):
    request.setHeader(b"Docker-Content-Digest", MOVED_DIGEST.encode())
    request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
    request.setHeader(b"Content-Length", str(len(MOVED)).encode())
    return b""


def test_tag_moved_upstream_is_fetched_again(world):
    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    moved, moved_digest = MOVED, MOVED_DIGEST
    world.upstream_registry.on("HEAD", "/v2/", _head_of_moved_tag)
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: moved)
    world.clock.advance(61)
    response, body = world.get(path, ALL)
    assert body == moved
    assert response.headers.getRawHeaders("docker-content-digest") == [moved_digest]


def test_a_head_that_finds_the_tag_moved_keeps_the_cached_manifest_as_the_fallback(world):
    # Docker's pull begins with a HEAD of the tag: the tag pointed at a
    # manifest never fetched, and the pull that had worked failed once the
    # upstream went down.
    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    moved, moved_digest, head = MOVED, MOVED_DIGEST, _head_of_moved_tag
    world.upstream_registry.on("HEAD", "/v2/", head)
    world.clock.advance(61)
    response, _ = world.get(path, ALL, method="HEAD")
    assert response.headers.getRawHeaders("docker-content-digest") == [moved_digest]
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    response, body = world.get(path, ALL)
    assert response.code == 200 and body == MANIFEST and response.headers.getRawHeaders("warning")
    # Back up: the moved tag is fetched (not the fallback served as fresh).
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("HEAD", "/v2/", head)
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: moved)
    response, body = world.get(path, ALL)
    assert body == moved


@pytest.mark.parametrize("restart", [False, True])
def test_a_tag_moved_by_a_head_follows_once_the_new_manifest_comes_by_digest(world, restart):
    # containerd and docker resolve with a HEAD, then GET the digest: the
    # tag kept the old manifest, and an outage then served it (v1 after v2
    # had been pulled).
    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    world.upstream_registry.on("HEAD", "/v2/", _head_of_moved_tag)
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: MOVED)
    world.clock.advance(61)
    response, _ = world.get(path, ALL, method="HEAD")
    assert response.headers.getRawHeaders("docker-content-digest") == [MOVED_DIGEST]
    response, body = world.get(f"/v2/alpine/manifests/{MOVED_DIGEST}", ALL)
    assert body == MOVED
    if restart:
        world.restart()
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    seen = len(world.upstream_registry.seen)
    response, body = world.get(path, ALL)
    assert response.code == 200 and body == MOVED
    # (Within the tag's time to live from the HEAD that saw it move.)
    assert len(world.upstream_registry.seen) == seen


def test_a_media_type_with_parameters_is_cached_as_its_type(world):
    # quay.io sends "; charset=utf-8": the tag was stored with it, never
    # matched a client's Accept, and went upstream on every pull (502 offline).
    def manifest(request):
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json; charset=utf-8")
        request.setHeader(b"Docker-Content-Digest", MANIFEST_DIGEST.encode())
        return b"" if request.method == b"HEAD" else MANIFEST

    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", manifest)
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", manifest)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}
    path = "/v2/alpine/manifests/latest"
    asked = []
    for method in ("HEAD", "GET", "GET", "HEAD"):
        response, _ = world.get(path, ALL, method=method, headers=accept)
        assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.image.manifest.v1+json"]
        asked.append(len(world.upstream_registry.seen))
    assert asked[1] == asked[2] == asked[3]  # once the manifest is here, from the cache
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    world.clock.advance(61)
    response, body = world.get(path, ALL, headers=accept)
    assert response.code == 200 and body == MANIFEST and response.headers.getRawHeaders("warning")


def test_a_tag_confirmed_while_the_clock_ran_ahead_is_revalidated(world):
    # Its age was negative, so fresh, until the clock caught up (days).
    path = "/v2/alpine/manifests/latest"
    world.clock.advance(40 * 86400)
    world.get(path, ALL)
    world.clock.advance(-30 * 86400)
    world.upstream_registry.on("HEAD", "/v2/", _head_of_moved_tag)
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: MOVED)
    response, body = world.get(path, ALL)
    assert body == MOVED


def test_cached_manifest_is_not_served_to_a_client_that_does_not_accept_its_type(world):
    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    world.get(path, ALL, headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert [s.method for s in world.upstream_registry.seen][:2] == ["GET", "GET"]


DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CHILD = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_V2, "layers": []}).encode()
CHILD_DIGEST = "sha256:" + hashlib.sha256(CHILD).hexdigest()
LIST = json.dumps(
    {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": [{"mediaType": DOCKER_V2, "digest": CHILD_DIGEST, "size": len(CHILD)}]}
).encode()
LIST_DIGEST = "sha256:" + hashlib.sha256(LIST).hexdigest()


def _negotiating(request):
    """An upstream tag on a manifest list, answered as registries do: with the
    amd64 manifest to a client that does not accept lists."""
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept") or [])
    body, media_type = (LIST, DOCKER_LIST) if DOCKER_LIST.encode() in accept else (CHILD, DOCKER_V2)
    request.setHeader(b"Content-Type", media_type.encode())
    request.setHeader(b"Docker-Content-Digest", ("sha256:" + hashlib.sha256(body).hexdigest()).encode())
    return b"" if request.method == b"HEAD" else body


@pytest.mark.parametrize("narrow", [DOCKER_V2, f"{DOCKER_V2}, */*"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_narrow_accept_does_not_decide_what_a_tag_resolves_to_for_everyone(world, method, narrow):
    # (A registry does not take */* for a list: it looks for the list's type.)
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", _negotiating)
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _negotiating)
    path = "/v2/alpine/manifests/latest"
    response, _ = world.get(path, ALL, method=method, headers={"Accept": narrow})
    assert response.headers.getRawHeaders("docker-content-digest") == [CHILD_DIGEST]
    response, body = world.get(path, ALL, headers={"Accept": f"{DOCKER_LIST}, {DOCKER_V2}, */*"})
    assert response.headers.getRawHeaders("docker-content-digest") == [LIST_DIGEST]
    assert body == LIST
    # What is stored is the list: served from the cache, the upstream down too.
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    response, body = world.get(path, ALL)
    assert body == LIST
    world.clock.advance(3600)
    response, body = world.get(path, ALL)
    assert body == LIST and response.headers.getRawHeaders("warning")


def test_a_narrow_accept_answered_404_leaves_the_tag_cached(world):
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", _negotiating)
    path = "/v2/alpine/manifests/latest"
    assert world.get(path, ALL)[1] == LIST
    world.clock.advance(61)
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(404))
    world.upstream_registry.on("HEAD", "/v2/", _failing(404))
    response, _ = world.get(path, ALL, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert response.code == 404
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    response, body = world.get(path, ALL)
    assert response.code == 200 and body == LIST


def test_a_narrow_client_s_single_manifest_is_remembered_when_the_tag_points_at_it(world):
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _manifest_head)
    path = "/v2/alpine/manifests/latest"
    response, body = world.get(path, ALL, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert body == MANIFEST
    assert [s.method for s in world.upstream_registry.seen] == ["GET", "HEAD"]
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    world.clock.advance(3600)
    response, body = world.get(path, ALL, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert response.code == 200 and body == MANIFEST


def test_tag_list_paginated_locally_when_upstream_ignores_n(world):
    world.upstream_registry.on(
        "GET", "/v2/library/alpine/tags/list", lambda r: json.dumps({"name": "library/alpine", "tags": ["c", "a", "d", "b"]}).encode()
    )
    response, body = world.get("/v2/alpine/tags/list?n=2", ALL)
    assert json.loads(body)["tags"] == ["a", "b"]
    assert response.headers.getRawHeaders("link") == ['</v2/alpine/tags/list?last=b&n=2>; rel="next"']
    response, body = world.get("/v2/alpine/tags/list?n=2&last=b", ALL)
    assert json.loads(body)["tags"] == ["c", "d"]
    assert response.headers.getRawHeaders("link") is None
    # Once it showed that it ignores n, the upstream's list is paginated
    # here even for a "last" that is no tag of it (deleted between pages).
    response, body = world.get("/v2/alpine/tags/list?n=100&last=bb", ALL)
    assert json.loads(body)["tags"] == ["c", "d"]
    # A mirror request's next page names the same registry.
    world.upstream_registry.on(
        "GET", "/v2/library/busybox/tags/list", lambda r: json.dumps({"name": "library/busybox", "tags": ["c", "a", "d", "b"]}).encode()
    )
    response, body = world.get("/v2/library/busybox/tags/list?n=2&ns=upstream.test", ALL)
    assert json.loads(body)["tags"] == ["a", "b"]
    assert response.headers.getRawHeaders("link") == [
        '</v2/library/busybox/tags/list?last=b&n=2&ns=upstream.test>; rel="next"'
    ]


def test_tag_list_pages_of_an_upstream_that_pages_itself(world):
    # Quay pages with a cursor of its own and ECR's "last" is an opaque
    # token: both go back to the upstream as its Link named them.  Its pages
    # are in its own order (case-insensitive here): the last page, with no
    # Link, is not filtered again by byte order.
    pages = {
        "": (["B", "a"], "</v2/library/alpine/tags/list?n=2&next_page=gAAA%3D%3D>; rel=\"next\""),
        "next_page=gAAA==": (["c", "D"], "</v2/library/alpine/tags/list?n=2&last=abc%3D%3D>; rel=\"next\""),
        "last=abc==": (["e"], None),
    }

    def page(request):
        args = {k.decode(): v[0].decode() for k, v in request.args.items() if k != b"n"}
        tags, link = pages["&".join(f"{k}={v}" for k, v in sorted(args.items()))]
        if link:
            request.setHeader(b"Link", link.encode())
        return json.dumps({"name": "library/alpine", "tags": tags}).encode()

    world.upstream_registry.on("GET", "/v2/library/alpine/tags/list", page)
    path, seen = "/v2/alpine/tags/list?n=2", []
    while path:
        response, body = world.get(path, ALL)
        assert response.code == 200, body
        seen.append(json.loads(body)["tags"])
        link = response.headers.getRawHeaders("link")
        path = link[0][1 : link[0].index(">")] if link else None
        assert len(seen) < 5
    assert seen == [["B", "a"], ["D", "c"], ["e"]]


def test_realm_honours_forwarded_headers_only_from_trusted_proxies(tmp_path):
    from twisted.web.test.requesthelper import DummyRequest

    verifier = TokenVerifier([SECRET])
    trusting = Authenticator(verifier, SECRET, "cargobay", None, trusted_proxies=("10.0.0.0/8",))

    def request_from(peer, headers):
        from twisted.internet.address import IPv4Address

        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 1234)
        request.isSecure = lambda: False
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name, [value])
        return request

    forwarded = {"host": "internal:5000", "x-forwarded-proto": "https", "x-forwarded-host": "cache.example.com"}
    assert trusting.realm(request_from("10.1.2.3", forwarded)) == "https://cache.example.com/token"
    assert trusting.realm(request_from("192.0.2.1", forwarded)) == "http://internal:5000/token"
    # A Host header that would break out of the challenge's quotes is not echoed.
    hostile = request_from("192.0.2.1", {"host": 'x", realm="http://evil'})
    assert "evil" not in trusting.realm(hostile)
    configured = Authenticator(verifier, SECRET, "cargobay", "https://public.example.com")
    assert configured.realm(request_from("10.1.2.3", forwarded)) == "https://public.example.com/token"


def test_token_endpoint_oauth2_post_and_refresh(world):
    from urllib.parse import urlencode

    form = urlencode({"grant_type": "password", "username": "ci", "password": ALPINE_ONLY,
                      "scope": "repository:alpine:pull repository:mycompany/app:pull", "service": "cargobay",
                      "client_id": "containerd"})
    d = world.client.post("http://proxy.test/token", data=form.encode(),
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    world.client.flush()
    results = []
    d.addCallback(world.client.json_content).addBoth(results.append)
    world.client.flush()
    answer = results[0]
    grant = TokenVerifier([SECRET]).verify(answer["access_token"])
    assert grant.repositories == ("alpine",)
    form = urlencode({"grant_type": "refresh_token", "refresh_token": answer["refresh_token"],
                      "scope": "repository:alpine:pull", "service": "cargobay"})
    d = world.client.post("http://proxy.test/token", data=form.encode(),
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    world.client.flush()
    results = []
    d.addBoth(results.append)
    world.client.flush()
    assert results[0].code == 200


def test_tag_resolved_by_head_then_digest_is_served_when_upstream_fails(world):
    # Docker's pattern: HEAD the tag, then GET the manifest by digest.
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _manifest_head)
    response, _ = world.get("/v2/alpine/manifests/latest", ALL, method="HEAD")
    assert response.code == 200
    response, body = world.get(f"/v2/alpine/manifests/{MANIFEST_DIGEST}", ALL)
    assert body == MANIFEST
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.clock.advance(3600)
    response, _ = world.get("/v2/alpine/manifests/latest", ALL, method="HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 200 and body == MANIFEST


def test_token_endpoint_offline_token_gives_a_refresh_token(world):
    response, body = world.get(
        "/token?service=cargobay&offline_token=true&client_id=docker&account=ci",
        headers={"Authorization": _basic("ci", ALPINE_ONLY)},
    )
    answer = json.loads(body)
    assert response.code == 200 and answer["refresh_token"] != ALPINE_ONLY
    assert TokenVerifier([SECRET]).verify(answer["refresh_token"]).repositories == ("alpine",)
    response, body = world.get("/token?service=cargobay", headers={"Authorization": _basic("ci", ALPINE_ONLY)})
    assert "refresh_token" not in json.loads(body)


@pytest.mark.parametrize("lifetime", [None, 30 * 86400])
def test_a_refresh_token_lasts_as_long_as_the_jwt_it_was_traded_for(world, lifetime):
    # docker login keeps it instead of the password: capped at a day, every
    # pull failed after that, the user's JWT still good.
    token = mint_token(SECRET, "ci", ["alpine"], lifetime)
    response, body = world.get(
        "/token?service=cargobay&offline_token=true&client_id=docker", headers={"Authorization": _basic("ci", token)}
    )
    refresh = jwt.decode(json.loads(body)["refresh_token"], SECRET, algorithms=["HS256"])
    original = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert refresh.get("exp") == original.get("exp")


@pytest.mark.parametrize("kind", ["float", "numeric string"])
def test_tokens_traded_at_the_token_endpoint_never_outlive_a_non_integer_exp(world, kind):
    # PyJWT takes an "exp" of 1.7e9 + 20.5 or "1700000020": such a 20-second
    # token was traded for a day-long refresh token.
    now = time.time()
    exp = now + 20.5 if kind == "float" else str(int(now) + 20)
    token = jwt.encode({"sub": "ci", "exp": exp, "access": {"type": "repositories", "repos": ["alpine"]}},
                       SECRET, algorithm="HS256")
    response, body = world.get("/token?service=cargobay&offline_token=true&scope=repository:alpine:pull",
                               headers={"Authorization": _basic("ci", token)})
    answer = json.loads(body)
    assert response.code == 200
    for key in ("refresh_token", "token"):
        claims = jwt.decode(answer[key], SECRET, algorithms=["HS256"])
        assert claims["exp"] <= float(exp), key
    assert answer["expires_in"] <= 21


def test_a_token_in_its_leeway_cannot_be_traded_for_one_that_outlives_it(world):
    # Past its exp but within the verifier's minute of leeway, a token was
    # traded for one expiring a second later, with a minute of leeway of its
    # own: traded again every minute, a one-second token never ran out.
    now = int(time.time())
    token = mint_token(SECRET, "ci", ["alpine"], 1, now=now - 31)
    response, body = world.get(
        "/token?service=cargobay&offline_token=true&client_id=docker&scope=repository:alpine:pull",
        headers={"Authorization": _basic("ci", token)},
    )
    answer = json.loads(body)
    assert response.code == 200, body
    for key in ("token", "refresh_token"):
        claims = jwt.decode(answer[key], SECRET, algorithms=["HS256"], options={"verify_exp": False})
        assert claims["exp"] <= now - 30, key
    assert answer["expires_in"] == 0
    # Traded once more, the result is no younger either.
    response, body = world.get("/token?service=cargobay&scope=repository:alpine:pull",
                               headers={"Authorization": _basic("ci", answer["refresh_token"])})
    claims = jwt.decode(json.loads(body)["token"], SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["exp"] <= now - 30


@pytest.mark.parametrize("n", ["2147483648", "9" * 40, "000000000000000000005"])
def test_a_huge_page_size_asks_for_everything(world, n):
    # n=2^31 was refused as "not a non-negative integer".
    world.upstream_registry.on(
        "GET", "/v2/library/alpine/tags/list", lambda r: json.dumps({"name": "library/alpine", "tags": ["b", "a"]}).encode()
    )
    response, body = world.get(f"/v2/alpine/tags/list?n={n}", ALL)
    assert response.code == 200, body
    wanted = 5 if n.startswith("0") else 999_999_999
    assert json.loads(body)["tags"] == ["a", "b"]
    assert f"n={wanted}" in world.upstream_registry.seen[-1].url


def test_tag_list_served_from_the_last_full_list_when_upstream_fails(world):
    world.upstream_registry.on(
        "GET", "/v2/library/alpine/tags/list", lambda r: json.dumps({"name": "library/alpine", "tags": ["b", "a", "c"]}).encode()
    )
    assert json.loads(world.get("/v2/alpine/tags/list", ALL)[1])["tags"] == ["a", "b", "c"]
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get("/v2/alpine/tags/list", ALL)
    assert response.code == 200 and json.loads(body) == {"name": "alpine", "tags": ["a", "b", "c"]}
    assert response.headers.getRawHeaders("warning")
    response, body = world.get("/v2/alpine/tags/list?n=2", ALL)
    assert json.loads(body)["tags"] == ["a", "b"]
    # Gone upstream (404): not served from the cache any more.
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(404))
    assert world.get("/v2/alpine/tags/list", ALL)[0].code == 404
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    assert world.get("/v2/alpine/tags/list", ALL)[0].code == 502


def test_made_up_methods_count_as_one_label(world):
    # Anyone may send any method (it gets a 405 before the token is read): the
    # request counter must not grow a label set per made-up name.
    from cargobay.metrics import Metrics

    metrics = world.app.metrics = Metrics()
    for i in range(30):
        response, _ = world.get("/v2/", None, method=f"XQZ{i}")
        assert response.code == 405
    assert world.get("/v2/", ALL)[0].code == 200
    rendered = metrics.render().decode()
    methods = set(re.findall(r'cargobay_http_requests_total\{[^}]*method="([^"]*)"', rendered))
    assert methods == {"other", "GET"}, rendered


def _no_content_type(body):
    def handler(request):
        request.defaultContentType = None
        return body
    return handler


def test_upstream_header_text_that_cannot_be_passed_on_is_dropped(world):
    # Upstream text outside latin-1 cannot go into a response header: it was a
    # 500, and for a manifest cached before the header failed, a 500 for good.
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json\u2603"}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", _no_content_type(body))
    for _ in range(2):  # from the upstream, then from the cache
        response, got = world.get(f"/v2/alpine/manifests/{digest}", ALL)
        assert (response.code, got) == (200, body)
        assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.image.manifest.v1+json"]

    def tags(request):
        request.setHeader(b"Link", '</v2/library/alpine/tags/list?last=b&n=2>; rel="next"; title="\u2603"'.encode())
        return json.dumps({"name": "library/alpine", "tags": ["a", "b", "c"]}).encode()

    world.upstream_registry.on("GET", "/v2/library/alpine/tags/list", tags)
    response, got = world.get("/v2/alpine/tags/list?n=2", ALL)
    assert response.code == 200 and json.loads(got)["tags"] == ["a", "b"]
    assert response.headers.getRawHeaders("link") == ['</v2/alpine/tags/list?last=b&n=2>; rel="next"']

    def referrers(request):
        request.setHeader(b"Content-Type", "application/vnd.oci.image.index.v1+json\u2603".encode())
        request.setHeader(b"OCI-Filters-Applied", "artifactType\u2603".encode())
        return b'{"schemaVersion": 2, "manifests": []}'

    world.upstream_registry.on("GET", f"/v2/library/alpine/referrers/{digest}", referrers)
    response, got = world.get(f"/v2/alpine/referrers/{digest}", ALL)
    assert response.code == 200 and json.loads(got)["manifests"] == []
    assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.image.index.v1+json"]
    assert response.headers.getRawHeaders("oci-filters-applied") is None


def test_referrers_that_the_upstream_pages_are_paged_through_the_proxy(world):
    # It answered page 1 with no Link, and page 1 again for ?page=2 (every
    # parameter but artifactType was dropped): later referrers were lost.
    def entry(n):
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{n:064x}",
                "size": 10, "artifactType": "application/example"}

    def index(entries):
        return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": entries}).encode()

    asked = []

    def referrers(request):
        asked.append(request.uri.decode())
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
        if request.args.get(b"page") == [b"2"]:
            return index([entry(2)])
        request.setHeader(b"Link", f'</v2/library/alpine/referrers/{MANIFEST_DIGEST}?page=2>; rel="next"'.encode())
        return index([entry(1)])

    world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", referrers)
    response, body = world.get(f"/v2/alpine/referrers/{MANIFEST_DIGEST}", ALL)
    assert json.loads(body)["manifests"] == [entry(1)]
    [link] = response.headers.getRawHeaders("link")
    assert link == f'</v2/alpine/referrers/{MANIFEST_DIGEST}?page=2>; rel="next"'
    response, body = world.get(link[1:link.index(">")], ALL)
    assert json.loads(body)["manifests"] == [entry(2)] and response.headers.getRawHeaders("link") is None
    assert asked[-1] == f"/v2/library/alpine/referrers/{MANIFEST_DIGEST}?page=2"
    # A first page with a next one is not a whole answer: nothing of it is
    # served as the referrers while the upstream fails.
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get(f"/v2/alpine/referrers/{MANIFEST_DIGEST}", ALL)
    assert response.code == 404 and error_code(body) == "MANIFEST_UNKNOWN"


def test_referrers_are_served_as_last_seen_while_the_upstream_fails(world):
    signature = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": BLOB_DIGEST, "size": 10,
                 "artifactType": "application/example"}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [signature]}).encode()

    def referrers(request):
        request.setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
        if request.args.get(b"artifactType"):
            request.setHeader(b"OCI-Filters-Applied", b"artifactType")
        return index

    seen = f"/v2/alpine/referrers/{MANIFEST_DIGEST}"
    never = f"/v2/alpine/referrers/{BLOB_DIGEST}"
    world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", referrers)
    for path in (seen, seen + "?artifactType=application%2Fexample"):
        response, body = world.get(path, ALL)
        assert (response.code, body) == (200, index)
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get(seen, ALL)
    assert (response.code, body) == (200, index) and response.headers.getRawHeaders("warning")
    assert response.headers.getRawHeaders("oci-filters-applied") is None
    response, body = world.get(seen + "?artifactType=application%2Fexample", ALL)
    assert response.headers.getRawHeaders("oci-filters-applied") == ["artifactType"]
    # None remembered: a 404, on which clients look for the fallback tag.
    response, body = world.get(never, ALL)
    assert response.code == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    # The upstream says none (a 404, or an empty index): nothing stale is
    # served after that, and nothing is kept for an empty one.
    for none in (_failing(404), lambda r: b'{"schemaVersion": 2, "manifests": []}'):
        world.upstream_registry.handlers.clear()
        world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", referrers)
        world.get(seen, ALL)
        world.upstream_registry.handlers.clear()
        world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", none)
        world.get(seen, ALL)
        world.upstream_registry.handlers.clear()
        world.upstream_registry.on("GET", "/v2/", _failing(503))
        assert world.get(seen, ALL)[0].code == 404
    for empty in range(5):
        world.upstream_registry.handlers.clear()
        world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", lambda r: b'{"schemaVersion": 2, "manifests": []}')
        world.get(f"/v2/alpine/referrers/sha256:{empty:064x}", ALL)
    from pathlib import Path

    kept = list((Path(world.store.directory) / "referrers").rglob("*.json"))
    assert len(kept) == 1  # the artifactType answer


def test_a_cached_blob_that_cannot_be_read_cuts_its_response_and_pins_nothing(world, monkeypatch):
    # A read error (EIO from a failing disk) on a hit was a 500 with a stack
    # trace, and the entry stayed marked as being read: never evicted.
    import cargobay.blobs

    path = f"/v2/alpine/blobs/{BLOB_DIGEST}"
    world.get(path, ALL)
    [entry] = world.cache._entries.values()

    def failing(fd, count, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cargobay.blobs.os, "pread", failing)
    with pytest.raises(ResponseNeverReceived):  # cut, as a client sees a failing disk
        world.get(path, ALL)
    assert entry.readers == 0
    monkeypatch.undo()
    assert world.get(path, ALL)[1] == BLOB


def test_a_layer_whose_link_was_swept_is_served_under_a_name_whose_manifest_names_it(world, tmp_path):
    # A client skipped a layer it had; an hour later the sweep forgot the
    # layer's link (nothing cached), and the layer then came under another
    # name: the manifest's memo still said it was linked here, so with the
    # upstream down the layer was a 502 under the first name.
    from cargobay.sweep import MetadataSweeper

    manifest, get_manifest = manifest_naming_the_blob()
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", get_manifest)
    world.upstream_registry.on("GET", "/v2/team/application/manifests/", get_manifest)
    world.upstream_registry.on("GET", "/v2/team/application/blobs/", lambda r: BLOB)
    assert world.get("/v2/alpine/manifests/v1", ALL)[1] == manifest
    world.clock.advance(2 * 3600)
    sweeper = MetadataSweeper(world.cache, world.store, world.links, world.links._directory, world.clock)
    for root, directories, _ in os.walk(world.links._directory):
        for directory in directories:
            os.utime(os.path.join(root, directory), (0, 0))
    for _ in sweeper._work(world.clock.seconds()):
        pass
    assert not world.links.known("up", "library/alpine", Digest.parse(BLOB_DIGEST))
    assert world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALL)[1] == BLOB
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    assert world.get("/v2/alpine/manifests/v1", ALL)[1] == manifest
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 200 and body == BLOB


def test_after_an_eviction_a_pull_by_tag_links_again_what_it_needs(world):
    # Evicting a blob forgets its links; a later hit on a manifest naming it
    # must link it again (a memo said it had), or the pull fails with the
    # upstream down though everything is cached.
    world.cache.on_evict = lambda entry: world.links.forget(entry.key.registry_id, entry.key.digest)
    manifest, get_manifest = manifest_naming_the_blob()

    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", get_manifest)
    world.upstream_registry.on("GET", "/v2/team/application/manifests/", get_manifest)
    world.upstream_registry.on("GET", "/v2/team/application/blobs/", lambda r: BLOB)
    # alpine pulls: manifest, then its blob.
    assert world.get("/v2/alpine/manifests/v1", ALL)[1] == manifest
    assert world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)[1] == BLOB
    # The blob ages out of the cache.
    world.clock.advance(3601)
    world.cache.evict()
    for _ in range(5):
        world.clock.advance(0.1)
    assert len(world.cache) == 0
    # mycompany/app (same base layer) pulls: the blob is back in the cache.
    assert world.get("/v2/mycompany/app/manifests/v1", ALL)[1] == manifest
    assert world.get(f"/v2/mycompany/app/blobs/{BLOB_DIGEST}", ALL)[1] == BLOB
    # The upstream goes down; alpine pulls again.
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("HEAD", "/v2/", _failing(503))
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get("/v2/alpine/manifests/v1", ALL)
    assert response.code == 200 and body == manifest  # stale, from the cache
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 200 and body == BLOB


# -- upstreams that misbehave in small ways ---------------------------------


def _basic_401(request):
    request.setResponseCode(401)
    request.setHeader(b"WWW-Authenticate", b'Basic realm="x"')
    return b'{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}'


def test_manifest_get_upstream_401_basic_without_creds(world):
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _basic_401)
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 403 and error_code(body) == "DENIED"


def test_blob_head_upstream_401_basic_without_creds(world):
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("HEAD", "/v2/", _basic_401)
    response, body = world.get("/v2/alpine/blobs/sha256:" + "a" * 64, ALL, method="HEAD")
    assert response.code == 403


def test_blob_get_upstream_401_basic_without_creds(world):
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _basic_401)
    response, body = world.get("/v2/alpine/blobs/sha256:" + "a" * 64, ALL)
    assert response.code == 403 and error_code(body) == "DENIED"


def test_tags_upstream_401_bearer_without_realm(world):
    def h(request):
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Bearer service="x"')
        return b"{}"
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", h)
    response, body = world.get("/v2/alpine/tags/list", ALL)
    assert response.code == 403 and error_code(body) == "DENIED"


def test_cached_tag_is_served_stale_when_the_upstream_starts_answering_401(world):
    path = "/v2/alpine/manifests/latest"
    assert world.get(path, ALL)[0].code == 200
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _basic_401)
    world.upstream_registry.on("HEAD", "/v2/", _basic_401)
    world.clock.advance(3600)
    response, body = world.get(path, ALL)
    assert response.code == 200  # stale, as for a 403 or a 503


@pytest.mark.parametrize("location", [b"http://cdn.test:99999/x", b"http://[::1/x", b"http://cdn.test:port/x"])
def test_blob_redirect_to_an_unparseable_location(world, location):
    def redirect(request):
        request.setResponseCode(307)
        request.setHeader(b"Location", location)
        return b""

    world.upstream_registry.on("GET", "/v2/library/alpine/blobs/", redirect)
    response, body = world.get(f"/v2/alpine/blobs/{BLOB_DIGEST}", ALL)
    assert response.code == 502 and error_code(body) == "UNAVAILABLE"


@pytest.mark.parametrize("realm", ["http://[::1/token", "http://auth.test:99999/token"])
def test_token_realm_that_cannot_be_parsed(world, realm):
    def challenge(request):
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", f'Bearer realm="{realm}",service="s"'.encode())
        return b"{}"

    world.upstream_registry.on("GET", "/v2/", challenge)
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 502 and error_code(body) == "UNAVAILABLE"


def test_a_client_that_joined_another_names_download_is_not_given_its_404(world):
    # A token for any repository could make another's pulls fail: ask for
    # their digest under its own name, and whoever joined that download got
    # its 404, though their own repository has the blob.
    from twisted.web.server import NOT_DONE_YET

    manifest, get_manifest = manifest_naming_the_blob()

    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/team/application/manifests/", get_manifest)
    world.upstream_registry.on("GET", "/v2/team/application/blobs/", lambda r: BLOB)
    pending = []

    def slow_404(request):  # library/alpine has no such blob; the answer takes a while
        pending.append(request)
        return NOT_DONE_YET

    world.upstream_registry.on("GET", "/v2/library/alpine/blobs/", slow_404)
    # The owner's client resolves its image: the blob is linked under its name.
    assert world.get("/v2/mycompany/app/manifests/v1", ALL)[1] == manifest

    # Mallory (alpine only) asks for that digest under alpine...
    client = world.client
    d_mallory = client.request("GET", f"http://proxy.test/v2/alpine/blobs/{BLOB_DIGEST}",
                               headers={"Authorization": f"Bearer {ALPINE_ONLY}"})
    client.flush()
    assert len(pending) == 1
    # ... and the owner pulls the blob meanwhile.
    d_owner = client.request("GET", f"http://proxy.test/v2/mycompany/app/blobs/{BLOB_DIGEST}",
                             headers={"Authorization": f"Bearer {ALL}"})
    client.flush()
    request = pending[0]
    request.setResponseCode(404)
    request.write(b'{"errors":[{"code":"BLOB_UNKNOWN","message":"x"}]}')
    request.finish()
    world.upstream._http._agent._agent.flush()
    client.flush()
    world.upstream._http._agent._agent.flush()
    client.flush()
    results = []
    d_owner.addBoth(results.append)
    client.flush()
    m = []
    d_mallory.addBoth(m.append)
    client.flush()
    response = results[0]
    body = []
    client.content(response).addBoth(body.append)
    client.flush()
    assert response.code == 200 and body[0] == BLOB


def test_a_reload_leaves_metrics_where_they_were_until_a_restart(world):
    # A reload that moved /metrics to a listener of its own (or changed its
    # path) took it off the main one, while the new listener waits for a
    # restart: no /metrics anywhere, though the log said "at the next restart".
    from cargobay.metrics import Metrics

    world.app.metrics = Metrics()
    world.app.metrics_config = parse_config(CONFIG).metrics
    moved = parse_config(CONFIG + '\n[metrics]\nlisten = "tcp:9999"\npath = "/elsewhere"\nrequire_auth = true\n')
    world.app.reconfigure(moved, world.app.authenticator, world.app.upstreams)
    response, body = world.get("/metrics")
    assert response.code == 200 and b"cargobay_http_requests_total" in body


def test_metrics_answer_reads_only(world):
    from cargobay.metrics import Metrics

    world.app.metrics = Metrics()
    world.app.metrics_config = parse_config(CONFIG).metrics
    for method in ("POST", "OPTIONS", "TRACE"):
        response, body = world.get("/metrics", method=method)
        assert response.code == 405 and response.headers.getRawHeaders("allow") == ["GET, HEAD"], method
        assert b"cargobay_" not in body
    response, body = world.get("/metrics")
    assert response.code == 200 and b"cargobay_http_requests_total" in body


def test_an_upstream_answer_that_is_not_a_manifest_is_neither_served_nor_cached(world):
    metadata = b'{"AccessKeyId": "INTERNAL-ONLY", "Secret": "x"}'
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: metadata)
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 502 and b"INTERNAL-ONLY" not in body
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 502 and b"INTERNAL-ONLY" not in body
    world.upstream_registry.handlers.clear()
    world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", lambda r: metadata)
    response, body = world.get(f"/v2/alpine/referrers/{MANIFEST_DIGEST}", ALL)
    assert response.code == 502 and b"INTERNAL-ONLY" not in body


def test_a_manifest_is_never_served_as_html(world):
    def html(request):
        request.setHeader(b"Content-Type", b"text/html")
        return MANIFEST

    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", html)
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", html)
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert body == MANIFEST
    assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.image.manifest.v1+json"]
    response, _ = world.get("/v2/alpine/manifests/other", ALL, method="HEAD")
    assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.image.manifest.v1+json"]
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]


def test_what_was_cached_before_types_were_checked_is_served_as_a_manifest_or_not_at_all(world, tmp_path):
    # Stored by an earlier version: one with the upstream's text/html, one
    # that is not a manifest at all (a metadata document it was sent to).
    from cargobay.manifest_store import ManifestStore

    directory = os.path.join(world.store.directory, "manifests", "up", "sha256")
    os.makedirs(directory, exist_ok=True)
    metadata = b'{"AccessKeyId": "INTERNAL-ONLY"}'
    for media_type, content in ((b"text/html", MANIFEST), (b"application/json", metadata)):
        with open(os.path.join(directory, hashlib.sha256(content).hexdigest()), "wb") as f:
            f.write(media_type + b"\n" + content)
    store = ManifestStore(world.store.directory, world.clock)
    served = store.get("up", Digest.parse(MANIFEST_DIGEST))
    assert served is not None and served.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert store.get("up", Digest.parse("sha256:" + hashlib.sha256(metadata).hexdigest())) is None


def test_json_nested_too_deep_from_the_upstream_is_a_502_not_a_500(world):
    deep = b"[" * 100_000 + b"]" * 100_000
    world.upstream_registry.on("GET", "/v2/library/alpine/", lambda r: deep)
    for path in ("/v2/alpine/manifests/latest", "/v2/alpine/tags/list", f"/v2/alpine/referrers/{MANIFEST_DIGEST}"):
        response, _ = world.get(path, ALL)
        assert response.code == 502, path


def test_an_artifact_manifest_of_the_oci_drafts_has_no_schema_version_and_is_served(world):
    artifact = json.dumps({"mediaType": "application/vnd.oci.artifact.manifest.v1+json", "artifactType": "x", "blobs": []}).encode()
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: artifact)
    response, body = world.get("/v2/alpine/manifests/sig", ALL)
    assert response.code == 200 and body == artifact
    assert response.headers.getRawHeaders("content-type") == ["application/vnd.oci.artifact.manifest.v1+json"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_clients_asking_for_a_manifest_at_once_share_one_upstream_request(world, method):
    # 20 pulls of a cold tag made 20 upstream GETs (each one counts against
    # Docker Hub's pull limit).
    from twisted.web.server import NOT_DONE_YET

    pending = []

    def slow(request):
        pending.append(request)
        return NOT_DONE_YET

    world.upstream_registry.handlers.clear()
    world.upstream_registry.on(method, "/v2/library/alpine/manifests/", slow)
    client = world.client
    asked = [client.request(method, "http://proxy.test/v2/alpine/manifests/latest",
                            headers={"Authorization": f"Bearer {ALL}"}) for _ in range(5)]
    client.flush()
    assert len(pending) == 1
    request = pending[0]
    request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
    request.setHeader(b"Docker-Content-Digest", MANIFEST_DIGEST.encode())
    request.setHeader(b"Content-Length", str(len(MANIFEST)).encode())
    request.write(MANIFEST if method == "GET" else b"")
    request.finish()
    world.upstream._http._agent._agent.flush()
    client.flush()
    answers = []
    for d in asked:
        d.addCallback(client.content).addBoth(answers.append)
    client.flush()
    assert answers == [MANIFEST if method == "GET" else b""] * 5
    assert len(world.upstream_registry.seen) == 1


def test_clients_asking_for_a_tag_list_at_once_share_one_upstream_request(world, monkeypatch):
    # A big repository's list was fetched and parsed once per client: 30 at
    # once held 130 MB.
    from twisted.internet.defer import Deferred
    from twisted.web.http_headers import Headers

    from cargobay.manifests import ManifestService

    asked = []

    def request(method, path, scope, headers=None, **kwargs):
        d = Deferred()
        asked.append(d)
        return d

    monkeypatch.setattr(world.upstream, "request", request)
    service = ManifestService(world.store, world.clock, links=world.links)
    answers = []
    for _ in range(3):
        service.tags(world.upstream, "alpine", "library/alpine", None, None).addBoth(answers.append)
    assert len(asked) == 1 and answers == []

    class Response:
        code = 200
        headers = Headers({})

    monkeypatch.setattr(world.upstream, "read_body", lambda response: succeed(b'{"tags": ["b", "a"]}'))
    asked[0].callback(Response())
    assert [json.loads(body)["tags"] for body, _, _ in answers] == [["a", "b"]] * 3
    # The next client asks again.
    service.tags(world.upstream, "alpine", "library/alpine", None, None)
    assert len(asked) == 2


def test_an_absolute_target_is_taken_only_when_it_names_this_server():
    from twisted.internet.address import IPv4Address
    from twisted.web.test.requesthelper import DummyRequest

    from cargobay.routes import _absolute_to_us

    def absolute(uri):
        request = DummyRequest([b""])
        request.uri = request.path = uri
        request.getHost = lambda: IPv4Address("TCP", "10.0.0.5", 5000)
        request.requestHeaders.setRawHeaders(b"host", [b"whatever"])
        return request

    public = "https://cache.example.com"
    for uri in (b"http://10.0.0.5:5000/v2/a/tags/list?n=1", b"https://cache.example.com/v2/a/tags/list?n=1",
                b"http://LOCALHOST:5000/v2/a/tags/list?n=1"):
        request = absolute(uri)
        assert _absolute_to_us(request, public)
        assert (request.path, request.uri) == (b"/v2/a/tags/list", b"/v2/a/tags/list?n=1")
        assert request.postpath == [b"v2", b"a", b"tags", b"list"]
        assert request.getHeader(b"host") == uri.split(b"/")[2]
    for uri in (b"http://10.0.0.5/v2/", b"http://cache.example.com/v2/", b"http://other:5000/v2/",
                b"ftp://10.0.0.5:5000/v2/", b"http://10.0.0.5:99999/v2/", b"http:///v2/", b"http://[::zz]/v2/",
                b"http://[::1/v2/"):
        request = absolute(uri)
        assert not _absolute_to_us(request, public)
        assert request.path == uri


@pytest.mark.parametrize("path", ["/v2/alpine/referrers/sha256:zz", "/v2/alpine/blobs/sha256:zz",
                                  "/v2/alpine/manifests/latest", "/v2/alpine/tags/list", f"/v2/alpine/blobs/{BLOB_DIGEST}"])
def test_every_registry_request_releases_its_upstream_when_it_ends(world, path):
    # A bad digest in a referrers request left the upstream "in use" for
    # good: a reload that points its id elsewhere then never forgot what
    # requests under way on the old URL wrote.
    for method in ("GET", "GET", "HEAD"):  # (cold, then from the cache)
        world.get(path, ALL, method=method)
        world.clock.advance(1)
        assert world.upstream._uses == 0, method


def test_the_catalog_lists_the_mapped_repositories_a_token_may_pull(world):
    response, body = world.get("/v2/_catalog", ALL)
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body) == {"repositories": ["alpine", "library/busybox", "mycompany/app"]}
    response, body = world.get("/v2/_catalog", ALPINE_ONLY)
    assert json.loads(body) == {"repositories": ["alpine"]}
    response, body = world.get("/v2/_catalog?n=2", ALL)
    assert json.loads(body) == {"repositories": ["alpine", "library/busybox"]}
    assert response.headers.getRawHeaders("link") == ['</v2/_catalog?last=library%2Fbusybox&n=2>; rel="next"']
    response, body = world.get("/v2/_catalog?n=2&last=library%2Fbusybox", ALL)
    assert json.loads(body) == {"repositories": ["mycompany/app"]} and not response.headers.hasHeader("link")
    response, body = world.get("/v2/_catalog?n=x", ALL)
    assert response.code == 400 and error_code(body) == "PAGINATION_NUMBER_INVALID"
    assert world.upstream_registry.seen == []
    # Without a token: a challenge for the catalog's scope, as distribution's.
    response, body = world.get("/v2/_catalog")
    assert response.code == 401
    assert 'scope="registry:catalog:*"' in response.headers.getRawHeaders("www-authenticate")[0]


def test_a_mirrors_catalog_lists_what_a_pull_with_its_ns_reaches(world):
    # ?ns= was ignored: every mapped name was listed for any registry.
    response, body = world.get("/v2/_catalog?ns=upstream.test", ALL)
    assert response.code == 200 and json.loads(body) == {"repositories": ["library/busybox"]}
    response, body = world.get("/v2/_catalog?ns=elsewhere.test", ALL)
    assert response.code == 200 and json.loads(body) == {"repositories": []}
    response, body = world.get("/v2/_catalog?ns=upstream.test&n=0", ALL)
    assert json.loads(body) == {"repositories": []}
    response, body = world.get("/v2/_catalog?ns=UPSTREAM.test&n=1&last=alpine", ALL)
    assert json.loads(body) == {"repositories": ["library/busybox"]} and not response.headers.hasHeader("link")
    response, body = world.get("/v2/_catalog?ns=upstream.test", ALPINE_ONLY)
    assert json.loads(body) == {"repositories": []}


def test_a_token_for_the_catalog_scope_carries_what_the_credential_may_pull(world):
    # (Asked for without a scope, as podman search does, the same.)
    for query in ("&scope=registry:catalog:*", ""):
        for credential, expected in ((ALPINE_ONLY, ("alpine",)), (ALL, None)):
            response, body = world.get("/token?service=cargobay" + query,
                                       headers={"Authorization": _basic("anyone", credential)})
            assert response.code == 200
            assert TokenVerifier([SECRET]).verify(json.loads(body)["token"]).repositories == expected
    # A scope the credential does not cover still gets nothing more.
    response, body = world.get("/token?service=cargobay&scope=repository:mycompany/app:pull",
                               headers={"Authorization": _basic("anyone", ALPINE_ONLY)})
    assert TokenVerifier([SECRET]).verify(json.loads(body)["token"]).repositories == ()


@pytest.mark.parametrize("length", ["²".encode(), b"9" * 5000, b"9" * 30, b"-5", str(5 * 1024 * 1024).encode()])
def test_a_manifest_head_length_that_is_no_manifest_size_is_not_believed(world, length):
    # "²" (a digit to str.isdigit, not to int) and 5,000 digits were a 500,
    # the first GET of a tag asked for with a narrow Accept too, and, the tag
    # cached, every GET after its TTL; 30 digits went to the client as the
    # manifest's size.
    def head(request):
        _manifest_head(request)
        request.responseHeaders.setRawHeaders(b"content-length", [length])
        return b""

    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", head)
    path = "/v2/alpine/manifests/latest"
    response, _ = world.get(path, ALL, method="HEAD")
    assert response.code == 200
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    # Not believed, the length is learnt from a GET of the manifest.
    assert response.headers.getRawHeaders("content-length") == [str(len(MANIFEST))]
    response, body = world.get(path, ALL, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert response.code == 200 and body == MANIFEST
    world.clock.advance(3600)  # the tag is revalidated with a HEAD
    response, body = world.get(path, ALL)
    assert response.code == 200 and body == MANIFEST


def test_a_tag_list_keeps_only_what_are_tags(world):
    # A lone surrogate in an upstream's list (valid JSON) was a 500 once
    # cargobay paged the list itself: it cannot go in a next page's link.
    def tags(request):
        return b'{"name": "team/application", "tags": ["\\ud800", "\\ud801", "a", "", "b\\nc", "../..", "' + b"x" * 300 + b'", 7, "b"]}'

    world.upstream_registry.on("GET", "/v2/team/application/tags/list", tags)
    for query in ("?n=1", "?n=2", "?n=1&last=a", ""):
        response, body = world.get("/v2/mycompany/app/tags/list" + query, ALL)
        assert response.code == 200, (query, body)
    assert json.loads(world.get("/v2/mycompany/app/tags/list", ALL)[1])["tags"] == ["a", "b"]
    response, body = world.get("/v2/mycompany/app/tags/list?n=1", ALL)
    assert json.loads(body)["tags"] == ["a"]
    assert response.headers.getRawHeaders("link") == ['</v2/mycompany/app/tags/list?last=a&n=1>; rel="next"']


@pytest.mark.parametrize("link, expected", [
    # Only the next page's link-value, rewritten (the rest was copied as it came,
    # another repository's next page included).
    (b'</v2/team/application/tags/list?last=0>; rel="prev", </v2/other/tags/list?n=1&last=a>; rel="next"', None),
    (b'</v2/team/application/tags/list?last=0>; rel="prev", </v2/team/application/tags/list?n=1&last=a>; rel="next"',
     '</v2/mycompany/app/tags/list?n=1&last=a>; rel="next"'),
    (b'<https://upstream.test/v2/team/application/tags/list?n=1&last=a>; rel=next',
     '</v2/mycompany/app/tags/list?n=1&last=a>; rel="next"'),
    # Dot segments, which clients resolve to another local repository.
    (b'</v2/team/application/../../../y/tags/list?n=1>; rel="next"', None),
    (b'</v2/team/application/%2e%2e/x/tags/list?n=1>; rel="next"', None),
    # A cursor cargobay would refuse when the client follows the link.
    (b'</v2/team/application/tags/list?n=1&last=%FF%FE>; rel="next"', None),
    (b'</v2/team/application/tags/list?n=1&last=a%0Ab>; rel="next"', None),
    (b'</v2/team/application/tags/list?n=1&last=a>; rel="prev"', None),
])
def test_only_the_next_page_of_the_same_listing_is_linked(world, link, expected):
    def tags(request):
        request.setHeader(b"Link", link)
        return json.dumps({"name": "team/application", "tags": ["a"]}).encode()

    world.upstream_registry.on("GET", "/v2/team/application/tags/list", tags)
    response, body = world.get("/v2/mycompany/app/tags/list?n=1", ALL)
    assert response.code == 200
    assert response.headers.getRawHeaders("link") == (None if expected is None else [expected])
    if expected is not None:
        target = expected[1:expected.index(">")]
        assert world.get(target, ALL)[0].code == 200  # and it is one cargobay takes


def _negotiating_with_q(request):
    # A registry that honours q=0 ("not acceptable", RFC 9110 12.4.2).
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept") or [])
    takes_index = DOCKER_LIST.encode() in accept and (DOCKER_LIST + ";q=0").encode() not in accept
    body, media_type = (LIST, DOCKER_LIST) if takes_index else (CHILD, DOCKER_V2)
    request.setHeader(b"Content-Type", media_type.encode())
    request.setHeader(b"Docker-Content-Digest", ("sha256:" + hashlib.sha256(body).hexdigest()).encode())
    return b"" if request.method == b"HEAD" else body


def test_a_media_type_the_client_refuses_with_q_0_is_not_served_from_the_cache(world):
    # q-values were dropped with the other parameters: "index;q=0" read as
    # accepting the index, which the cache then handed out.
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", _negotiating_with_q)
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _negotiating_with_q)
    _, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert body == LIST
    refusing = f"{DOCKER_LIST};q=0, {DOCKER_V2}"
    response, body = world.get("/v2/alpine/manifests/latest", ALL, headers={"Accept": refusing})
    assert response.headers.getRawHeaders("content-type") == [DOCKER_V2]
    assert body == CHILD


def test_the_next_page_link_of_an_upstream_under_a_path_prefix_is_kept(world):
    # Its Link names the page under its prefix: it was dropped, and the
    # client took the first page for the whole list (and so did the cache).
    prefixed = make_upstream(world.upstream_registry, world.clock, url="http://upstream.test/prefix")
    world.app.upstreams = {"up": prefixed}

    def tags(request):
        request.setHeader(b"Link", b'</prefix/v2/team/application/tags/list?last=b&n=2>; rel="next"')
        return json.dumps({"name": "team/application", "tags": ["a", "b"]}).encode()

    world.upstream_registry.on("GET", "/prefix/v2/team/application/tags/list", tags)
    response, body = world.get("/v2/mycompany/app/tags/list", ALL)
    assert json.loads(body)["tags"] == ["a", "b"]
    assert response.headers.getRawHeaders("link") == ['</v2/mycompany/app/tags/list?last=b&n=2>; rel="next"']
    assert world.store.tag_list("up", "team/application") is None  # a page is not the whole list


def test_an_artifact_type_that_is_not_printable_ascii_is_refused(world):
    # Its bytes, read as latin-1, went upstream encoded twice.
    response, body = world.get(f"/v2/alpine/referrers/sha256:{'a' * 64}?artifactType=application/x%C3%A9", ALL)
    assert response.code == 400 and b"invalid artifactType" in body
    assert not world.upstream_registry.requests("/referrers/")


def test_a_slow_upstream_does_not_hold_a_pull_of_a_cached_tag_past_the_revalidate_wait(world):
    # It was held for the upstream's read timeout (60 s by default): a
    # pull that already succeeded answered a minute late.
    path, held = world.cached_tag_due_with_a_silent_check()
    answered = world.send(path, ALL)
    world.wait(4.9)
    assert answered == [] and len(held) == 1
    world.wait(0.2)
    [response] = answered
    assert response.code == 200 and world.body_of(response) == MANIFEST and response.headers.getRawHeaders("warning")
    # The check went on: its late answer confirms the tag for the next pull.
    _manifest_head(held[0])
    world.answer(held[0])
    asked = len(world.upstream_registry.seen)
    assert world.get(path, ALL)[1] == MANIFEST
    assert len(world.upstream_registry.seen) == asked


def test_a_tag_a_late_check_finds_gone_is_not_served_again(world):
    path, held = world.cached_tag_due_with_a_silent_check()
    answered = world.send(path, ALL)
    world.wait(5.1)
    assert answered[0].code == 200
    held[0].setResponseCode(404)
    world.answer(held[0])
    # Gone upstream: not the fallback when the upstream then fails.
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _failing(503))
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", _failing(503))
    response, body = world.get(path, ALL)
    assert response.code != 200 and body != MANIFEST


def test_a_late_check_never_takes_a_tag_back_from_a_newer_answer(world):
    # Two clients with different Accept headers each send a HEAD: the slow
    # one sent before the tag moved must not confirm the old manifest after
    # the quick one has followed the move.
    path, held = world.cached_tag_due_with_a_silent_check()
    answered = world.send(path, ALL)
    world.wait(5.1)
    assert answered[0].code == 200 and len(held) == 1
    # The tag moves; another client's check finds it at once.
    world.upstream_registry.on("HEAD", "/v2/", _head_of_moved_tag)
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", lambda r: MOVED)
    response, body = world.get(path, ALL, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert body == MOVED
    # The first check answers now, with what the tag was when it was asked.
    _manifest_head(held[0])
    world.answer(held[0])
    assert str(world.store.tag("up", "library/alpine", "latest").digest) == MOVED_DIGEST
    response, body = world.get(path, ALL)
    assert body == MOVED


def test_a_pull_that_joins_a_check_under_way_waits_only_what_is_left_of_the_wait(world):
    # Against a silent upstream every pull joined the one HEAD and waited
    # a whole revalidate_wait of its own, for as long as the HEAD lasted.
    path, held = world.cached_tag_due_with_a_silent_check()
    first = world.send(path, ALL)
    world.wait(4)
    second = world.send(path, ALL)
    world.wait(1.1)
    assert first and second and len(held) == 1  # one HEAD; both answered from the cache 5 s after it went
    third = world.send(path, ALL)
    world.wait(0)
    assert third and third[0].code == 200 and len(held) == 1  # past the wait: at once


def test_a_slow_upstream_does_not_hold_a_tag_list_past_the_revalidate_wait(world):
    # (skopeo list-tags, renovate-like tools: they waited the read timeout.)
    world.upstream_registry.on(
        "GET", "/v2/library/alpine/tags/list", lambda r: json.dumps({"name": "library/alpine", "tags": ["b", "a"]}).encode()
    )
    assert json.loads(world.get("/v2/alpine/tags/list", ALL)[1])["tags"] == ["a", "b"]
    held = world.hold("GET", "/v2/library/alpine/tags/list")
    answered = world.send("/v2/alpine/tags/list", ALL)
    world.wait(4.9)
    assert answered == [] and len(held) == 1
    world.wait(0.2)
    [response] = answered
    assert response.code == 200 and response.headers.getRawHeaders("warning")
    assert json.loads(world.body_of(response))["tags"] == ["a", "b"]
    # Its late answer is the list the next request falls back on.
    world.answer(held[0], json.dumps({"name": "library/alpine", "tags": ["a", "b", "c"]}).encode())
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get("/v2/alpine/tags/list", ALL)
    assert json.loads(body)["tags"] == ["a", "b", "c"] and response.headers.getRawHeaders("warning")


def test_a_slow_upstream_does_not_hold_remembered_referrers_past_the_revalidate_wait(world):
    # (Admission controllers that verify signatures ask on every pod start.)
    def index_of(*digests):
        return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": 10} for d in digests
        ]}).encode()

    path = f"/v2/alpine/referrers/{MANIFEST_DIGEST}"
    world.upstream_registry.on("GET", "/v2/library/alpine/referrers/", lambda r: index_of(BLOB_DIGEST))
    assert world.get(path, ALL)[1] == index_of(BLOB_DIGEST)
    held = world.hold("GET", "/v2/library/alpine/referrers/")
    answered = world.send(path, ALL)
    world.wait(4.9)
    assert answered == [] and len(held) == 1
    world.wait(0.2)
    [response] = answered
    assert response.code == 200 and world.body_of(response) == index_of(BLOB_DIGEST)
    assert response.headers.getRawHeaders("warning")
    # Its late answer is what the next request falls back on.
    held[0].setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
    world.answer(held[0], index_of(BLOB_DIGEST, MANIFEST_DIGEST))
    world.upstream_registry.on("GET", "/v2/", _failing(503))
    response, body = world.get(path, ALL)
    assert body == index_of(BLOB_DIGEST, MANIFEST_DIGEST) and response.headers.getRawHeaders("warning")


def _manifest_heads(world):
    return sum(1 for s in world.upstream_registry.seen if s.method == "HEAD")


def test_an_in_time_check_reconfirms_a_tag_confirmed_while_the_clock_ran_ahead(world):
    # A confirmation "in the future" (made while the clock ran ahead) is no
    # newer answer: the check replaces it, else every pull costs a HEAD until
    # the clock catches up (here 30 days).
    world.clock.advance(40 * 86400)
    world.get("/v2/alpine/manifests/latest", ALL)
    world.clock.advance(-30 * 86400)
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _manifest_head)
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 200 and body == MANIFEST
    heads = _manifest_heads(world)
    assert heads >= 1
    assert world.store.tag("up", "library/alpine", "latest").confirmed_at == world.clock.seconds()
    world.clock.advance(1)
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 200 and _manifest_heads(world) == heads  # fresh now: no second HEAD


def test_an_in_time_404_drops_a_tag_confirmed_while_the_clock_ran_ahead(world):
    # Else it is served stale once the upstream fails: a tag gone upstream comes back.
    world.clock.advance(40 * 86400)
    world.get("/v2/alpine/manifests/latest", ALL)
    world.clock.advance(-30 * 86400)
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _failing(404))
    response, _ = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code == 404
    assert world.store.tag("up", "library/alpine", "latest") is None
    world.upstream_registry.on("HEAD", "/v2/library/alpine/manifests/", _failing(503))
    world.upstream_registry.on("GET", "/v2/library/alpine/manifests/", _failing(503))
    response, body = world.get("/v2/alpine/manifests/latest", ALL)
    assert response.code != 200 and body != MANIFEST


def test_a_slow_cursor_page_of_a_tag_list_is_not_answered_with_the_first_page(world):
    # The kept list, paged here by n and last, would be another page than the
    # one the upstream's own cursor names (Quay's next_page, ECR's opaque
    # last), with a Link such an upstream does not take: it is waited for.
    whole = ["B", "a", "c", "D", "e"]

    def listing(request):
        if b"n" in request.args:
            request.setHeader(b"Link", b'</v2/library/alpine/tags/list?n=2&next_page=gAAA%3D%3D>; rel="next"')
            return json.dumps({"name": "library/alpine", "tags": whole[:2]}).encode()
        return json.dumps({"name": "library/alpine", "tags": whole}).encode()

    world.upstream_registry.on("GET", "/v2/library/alpine/tags/list", listing)
    world.get("/v2/alpine/tags/list", ALL)  # the whole list, remembered
    response, body = world.get("/v2/alpine/tags/list?n=2", ALL)
    assert json.loads(body)["tags"] == ["B", "a"]
    link = response.headers.getRawHeaders("link")[0]
    page2 = link[1 : link.index(">")]
    assert "next_page=" in page2
    held = world.hold("GET", "/v2/library/alpine/tags/list")
    answered = world.send(page2, ALL)
    world.wait(6)  # slow, not failing: it answers after 6 s
    world.answer(held[0], json.dumps({"name": "library/alpine", "tags": ["c", "D"]}).encode())
    [response] = answered
    assert json.loads(world.body_of(response))["tags"] == ["D", "c"]  # page 2, not the kept list's start


def test_upstream_slow_is_said_once_per_registry_every_ten_seconds_with_the_count(world):
    # Every pull of a busy proxy said it, until the upstream's read timeout.
    from twisted.logger import formatEvent, globalLogPublisher

    path = "/v2/alpine/manifests/latest"
    world.get(path, ALL)
    world.hold("HEAD", "/v2/library/alpine/manifests/")
    world.clock.advance(61)
    said: list[str] = []

    def heard(event):
        text = formatEvent(event)
        if "upstream slow" in text:
            said.append(text)

    globalLogPublisher.addObserver(heard)
    try:
        pulls = []
        for wait in (5.1, 1, 1, 10):
            pulls.append(world.send(path, ALL))
            world.wait(wait)
    finally:
        globalLogPublisher.removeObserver(heard)
    assert [response.code for [response] in pulls] == [200, 200, 200, 200]
    assert len(said) == 2 and "more such" not in said[0]
    assert said[1].endswith("; 2 more such answers since the last time this was said"), said[1]
