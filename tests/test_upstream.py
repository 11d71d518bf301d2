"""
The upstream client against an in-memory registry: authentication, token
caching and sharing, redirects, and error mapping.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock

from cargobay.config import UpstreamAuth
from cargobay.errors import manifest_unknown
from cargobay.upstream import UpstreamError, map_status, read_body
from fakes import FakeRegistry, bearer_protected, make_upstream, token_handler

SCOPE = "repository:library/alpine:pull"


def result_of(d):
    results = []
    d.addBoth(results.append)
    assert results, "deferred did not fire synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_anonymous_request_passes_through():
    registry = FakeRegistry()
    registry.on("GET", "/v2/library/alpine/tags/list", lambda r: b'{"tags":["a"]}')
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("GET", "/v2/library/alpine/tags/list", SCOPE))
    assert response.code == 200
    assert result_of(read_body(response)) == b'{"tags":["a"]}'
    assert registry.seen[0].authorization is None


def test_bearer_challenge_fetches_a_token_once_and_caches_it():
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T1", user="u", password="p"))
    registry.on(
        "GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T1", lambda r: b"ok")
    )
    clock = Clock()
    upstream = make_upstream(registry, clock, auth=UpstreamAuth("u", "p"))
    for _ in range(3):
        response = result_of(upstream.request("GET", "/v2/library/alpine/manifests/x", SCOPE))
        assert response.code == 200
    token_requests = registry.requests("/token")
    assert len(token_requests) == 1
    assert "scope=repository%3Alibrary%2Falpine%3Apull" in token_requests[0].url
    assert "service=fake" in token_requests[0].url
    # Only the very first request was unauthenticated.
    assert [s.authorization for s in registry.requests("/v2/")] == [None, "Bearer T1", "Bearer T1", "Bearer T1"]


def test_token_expires_and_is_fetched_again():
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T1", expires_in=60))
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T1", lambda r: b"ok"))
    clock = Clock()
    upstream = make_upstream(registry, clock)
    result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    clock.advance(120)
    result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert len(registry.requests("/token")) == 2


def test_concurrent_requests_share_one_token_fetch():
    registry = FakeRegistry()
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T1", lambda r: b"ok"))
    upstream = make_upstream(registry, Clock())
    # Hold the token fetch: answer it only after three requests wait for it.
    from twisted.internet.defer import Deferred

    gate = Deferred()
    original = upstream._fetch_token
    calls = []

    def slow_fetch(scope, challenge):
        calls.append(scope)
        return gate.addCallback(lambda _: original(scope, challenge))

    upstream._fetch_token = slow_fetch
    registry.on("GET", "/token", token_handler("T1"))
    pending = [upstream.request("GET", "/v2/a/manifests/x", SCOPE) for _ in range(3)]
    gate.callback(None)
    assert [result_of(d).code for d in pending] == [200, 200, 200]
    assert calls == [SCOPE]
    assert len(registry.requests("/token")) == 1


def test_basic_challenge_sends_credentials_and_remembers():
    registry = FakeRegistry()

    def basic(request):
        if request.getHeader(b"authorization") is None:
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="r"')
            return b""
        return b"ok"

    registry.on("GET", "/v2/", basic)
    upstream = make_upstream(registry, Clock(), auth=UpstreamAuth("u", "p"))
    assert result_of(upstream.request("GET", "/v2/a/tags/list", SCOPE)).code == 200
    assert result_of(upstream.request("GET", "/v2/a/tags/list", SCOPE)).code == 200
    assert [s.authorization is not None for s in registry.seen] == [False, True, True]


def test_credentials_are_not_sent_to_a_redirect_target():
    registry = FakeRegistry()

    def redirect(request):
        if request.getHeader(b"host") == b"upstream.test":
            request.setResponseCode(307)
            request.setHeader(b"Location", b"http://cdn.test/blob?sig=1")
            return b""
        return b"blob-bytes"

    registry.on("GET", "/token", token_handler("SECRET-TOKEN"))
    registry.on(
        "GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "SECRET-TOKEN", redirect)
    )
    registry.on("GET", "/blob", lambda r: b"blob-bytes")
    upstream = make_upstream(registry, Clock(), auth=UpstreamAuth("u", "p"))
    response = result_of(upstream.request("GET", "/v2/a/blobs/sha256:x", SCOPE))
    assert response.code == 200
    assert result_of(read_body(response)) == b"blob-bytes"
    [cdn] = [s for s in registry.seen if s.url.startswith("cdn.test")]
    assert cdn.authorization is None
    assert all("SECRET-TOKEN" not in str(v) and "Basic" not in str(v) for v in cdn.headers.values())


def test_too_many_redirects_is_an_error_not_a_loop():
    registry = FakeRegistry()

    def loop(request):
        request.setResponseCode(302)
        request.setHeader(b"Location", b"/v2/again")
        return b""

    registry.on("GET", "/v2/", loop)
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("GET", "/v2/a/blobs/x", SCOPE))
    error = map_status(upstream, response, manifest_unknown("x"))
    assert error.status == 502 and "'up'" in error.message


@pytest.mark.parametrize(
    "code, status, oci_code",
    [(404, 404, "MANIFEST_UNKNOWN"), (401, 403, "DENIED"), (403, 403, "DENIED"), (429, 429, "TOOMANYREQUESTS"),
     (500, 502, "UNAVAILABLE"), (503, 502, "UNAVAILABLE"), (504, 504, "UNAVAILABLE")],
)
def test_status_mapping(code, status, oci_code):
    registry = FakeRegistry()

    def answer(request):
        request.setResponseCode(code)
        request.setHeader(b"Retry-After", b"17")
        return b""

    registry.on("GET", "/v2/", answer)
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    error = map_status(upstream, response, manifest_unknown("x"))
    assert (error.status, error.code) == (status, oci_code)
    if code == 429:
        assert error.headers["Retry-After"] == "17"
    if code != 404:
        assert "'up'" in error.message


def test_token_service_refusing_credentials_is_denied_naming_the_registry():
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T", user="u", password="right"))
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"ok"))
    upstream = make_upstream(registry, Clock(), auth=UpstreamAuth("u", "wrong"))
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert caught.value.error.status == 403
    assert "'up'" in caught.value.error.message


@pytest.mark.parametrize("body", [b"not json", b'{"token": 5}', b"{}"])
def test_garbage_from_token_service_is_a_clean_error(body):
    registry = FakeRegistry()
    registry.on("GET", "/token", lambda r: body)
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"ok"))
    upstream = make_upstream(registry, Clock())
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert caught.value.error.status == 502


@pytest.fixture
def refused_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest_twisted.inlineCallbacks
def test_refused_connection_is_502_naming_the_upstream(refused_port):
    from cargobay.config import RegistryConfig
    from cargobay.upstream import Upstream

    upstream = Upstream(RegistryConfig(id="down", url=f"http://127.0.0.1:{refused_port}"), global_reactor)
    with pytest.raises(UpstreamError) as caught:
        yield upstream.request("GET", "/v2/", SCOPE)
    assert caught.value.error.status == 502
    assert "'down'" in caught.value.error.message and "refused" in caught.value.error.message
