"""
The upstream client against an in-memory registry: authentication, token
caching and sharing, redirects, and error mapping.
"""

import json
import os
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from tls import TestCA
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import URI, HTTPConnectionPool, ResponseDone
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from cargobay.config import RegistryConfig, UpstreamAuth
from cargobay.errors import RegistryError, manifest_unknown
from cargobay.upstream import (
    GatheringTLSProtocol,
    RegistryTLSPolicy,
    Upstream,
    UpstreamEndpoints,
    UpstreamError,
    _TLSEndpoint,
    discard_body,
    map_status,
    read_body,
)
from fakes import FakeRegistry, answering, bearer_protected, make_upstream, token_handler

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


def test_tokens_kept_are_bounded_and_the_expired_go_first(monkeypatch):
    # One token per repository scope: a Docker Hub mirror kept every one it
    # ever fetched.
    import cargobay.upstream

    monkeypatch.setattr(cargobay.upstream, "MAX_CACHED_TOKENS", 5)
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T1", expires_in=60))
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T1", lambda r: b"ok"))
    clock = Clock()
    upstream = make_upstream(registry, clock)
    for i in range(4):
        result_of(upstream.request("GET", f"/v2/old{i}/manifests/x", f"repository:old{i}:pull"))
    clock.advance(120)
    result_of(upstream.request("GET", "/v2/a/manifests/x", "repository:a:pull"))
    result_of(upstream.request("GET", "/v2/b/manifests/x", "repository:b:pull"))
    assert sorted(upstream._tokens) == ["repository:a:pull", "repository:b:pull"]
    for i in range(10):
        result_of(upstream.request("GET", f"/v2/n{i}/manifests/x", f"repository:n{i}:pull"))
    assert len(upstream._tokens) == 5 and "repository:n9:pull" in upstream._tokens


def _raw_upstream(protocol: type[Protocol], read_timeout: float = 60.0) -> tuple[Any, Upstream]:
    """A real TCP registry on 127.0.0.1 that speaks C{protocol}, and an L{Upstream} of it."""
    port = global_reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    return port, Upstream(RegistryConfig(id="raw", url=url, read_timeout=read_timeout), global_reactor)


@defer.inlineCallbacks
def _stop(port: Any, upstream: Upstream) -> Any:
    yield upstream.close()
    yield port.stopListening()


@defer.inlineCallbacks
def _until(done: Any, tries: int = 100) -> Any:
    """Wait (a reactor turn of 20 ms at a time) until C{done()}, or give up."""
    for _ in range(tries):
        if done():
            return
        yield deferLater(global_reactor, 0.02)


class _NoAnswer(Protocol):
    """Takes a request and says nothing (a black-holed registry)."""

    def dataReceived(self, data: bytes) -> None:
        pass


class _Answer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


@pytest_twisted.inlineCallbacks
def test_an_upstream_that_does_not_answer_in_time_is_a_504_and_unreachable_until_it_answers():
    # treq's timeout came wrapped in a ResponseNeverReceived: reported as a
    # 502 "failed: ResponseNeverReceived", counted as a network error.
    port, upstream = _raw_upstream(_NoAnswer, read_timeout=0.2)
    try:
        assert not upstream.unreachable
        with pytest.raises(UpstreamError) as caught:
            yield upstream.request("GET", "/v2/", SCOPE)
        assert caught.value.error.status == 504 and "timed out" in caught.value.error.message
        assert upstream.unreachable
        port.factory.protocol = _Answer
        yield upstream.close()
        response = yield upstream.request("GET", "/v2/", SCOPE)
        assert response.code == 200
        yield read_body(response)
        assert not upstream.unreachable
    finally:
        yield _stop(port, upstream)


class _SlowRepository(Protocol):
    """Answers the base endpoint at once and nothing else (one slow repository)."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"GET /v2/ "):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


@pytest_twisted.inlineCallbacks
def test_one_slow_repository_or_a_client_that_leaves_does_not_make_the_registry_unreachable():
    port, upstream = _raw_upstream(_SlowRepository, read_timeout=0.3)
    try:
        # A request its caller gives up on (its client left): not a timeout.
        asked = upstream.request("GET", "/v2/slow/manifests/x", SCOPE)
        global_reactor.callLater(0.05, asked.cancel)
        with pytest.raises(defer.CancelledError):
            yield asked
        assert not upstream.unreachable
        # A real timeout marks it, until the base endpoint answers the check.
        with pytest.raises(UpstreamError) as caught:
            yield upstream.request("GET", "/v2/slow/manifests/x", SCOPE)
        assert caught.value.error.status == 504
        yield _until(lambda: not upstream.unreachable)
        assert not upstream.unreachable
    finally:
        yield _stop(port, upstream)


class _ChallengeTo(Protocol):
    """A registry that answers every request at once with a Bearer challenge naming C{realm}."""

    realm = ""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n"
            b'WWW-Authenticate: Bearer realm="%s",service="s"\r\n\r\n{}' % self.realm.encode()
        )


class _TokenAnswer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"token":"T"}')


@pytest_twisted.inlineCallbacks
def test_a_token_service_that_does_not_answer_is_counted_and_makes_the_registry_unreachable():
    # The registry's quick 401 said it was reachable: every request that
    # needed a token (a tag's revalidation, say) waited the read timeout
    # before the cache answered it, and no upstream error was counted.
    from cargobay.metrics import Metrics

    token_port = global_reactor.listenTCP(0, Factory.forProtocol(_NoAnswer), interface="127.0.0.1")
    _ChallengeTo.realm = f"http://127.0.0.1:{token_port.getHost().port}/token"
    registry_port = global_reactor.listenTCP(0, Factory.forProtocol(_ChallengeTo), interface="127.0.0.1")
    metrics = Metrics()
    config = RegistryConfig(id="hub", url=f"http://127.0.0.1:{registry_port.getHost().port}", read_timeout=0.2)
    upstream = Upstream(config, global_reactor, metrics=metrics)
    try:
        with pytest.raises(UpstreamError) as caught:
            yield upstream.request("HEAD", "/v2/library/alpine/manifests/latest", SCOPE)
        assert caught.value.error.status == 504
        assert "token service at 127.0.0.1" in caught.value.error.message
        assert metrics.upstream_errors.value("hub", "timeout") == 1
        assert upstream.unreachable
        # The registry's own answers do not end it (its /v2/ check says 401 at once)...
        for _ in range(10):
            yield deferLater(global_reactor, 0.02)
        assert upstream.unreachable
        # ...a token fetched does.
        token_port.factory.protocol = _TokenAnswer
        response = yield upstream.request("HEAD", "/v2/library/alpine/manifests/latest", SCOPE)
        assert response.code == 401  # (this registry refuses even the token)
        yield read_body(response)
        assert not upstream.unreachable
    finally:
        yield upstream.close()
        yield registry_port.stopListening()
        yield token_port.stopListening()


class _Canned(Protocol):
    """Answers each request with the factory's C{answer}; its connections in C{factory.conns}."""

    def connectionMade(self) -> None:
        self.factory.conns.append(self)
        self.open = True
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.buffer = b""
            self.transport.write(self.factory.answer)

    def connectionLost(self, reason: Failure = None) -> None:
        self.open = False


class _EndlessHeaders(Protocol):
    """A status line, then header lines without end (4 MiB of them)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        for _ in range(4 * 1024 * 1024 // (len(line) * 64)):
            self.transport.write(line * 64)


def _canned(answer: bytes) -> tuple[Any, Any, Upstream]:
    port, upstream = _raw_upstream(_Canned, read_timeout=0.3)
    port.factory.answer, port.factory.conns = answer, []
    return port.factory, port, upstream


@pytest_twisted.inlineCallbacks
def test_response_headers_without_end_are_refused_past_a_bound():
    # Twisted bounds each header line (16 KiB), not their number: an
    # upstream, or a host it redirects to, filled memory until the read timeout.
    port, upstream = _raw_upstream(_EndlessHeaders, read_timeout=10)
    try:
        with pytest.raises(UpstreamError) as caught:
            yield upstream.request("GET", "/v2/a/manifests/x", SCOPE)
        assert caught.value.error.status == 502
        assert "response headers over 256 KiB" in caught.value.error.message
    finally:
        yield _stop(port, upstream)


@pytest_twisted.inlineCallbacks
def test_a_discarded_body_that_stops_coming_lets_go_of_its_connection():
    # An error (or 401) body that stalls kept its connection open for good:
    # paused until read, never pooled, never closed.
    factory, port, upstream = _canned(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\nabc")
    try:
        for _ in range(3):
            response = yield upstream.request("GET", "/v2/a/blobs/sha256:00", SCOPE)
            assert response.code == 404
            discard_body(response)
        yield _until(lambda: not any(c.open for c in factory.conns))
        assert len(factory.conns) == 3 and not any(c.open for c in factory.conns)
    finally:
        yield _stop(port, upstream)


@pytest_twisted.inlineCallbacks
def test_a_redirect_to_a_location_that_cannot_be_used_reads_its_body():
    # The 3xx body went unread: its connection stayed paused and open.
    body = b"x" * 300_000
    factory, port, upstream = _canned(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    try:
        for _ in range(3):
            with pytest.raises(UpstreamError) as caught:
                yield upstream.request("GET", "/v2/a/manifests/x", SCOPE)
            assert caught.value.error.status == 502
        yield deferLater(global_reactor, 0.5)
        # Each body read (or, this large, given up on): no connection left
        # open but one kept for reuse.
        pooled = sum(len(kept) for kept in upstream._pool._connections.values())
        assert sum(c.open for c in factory.conns) == pooled
    finally:
        yield _stop(port, upstream)


@pytest.mark.parametrize("location", [
    "http://cdnuser:CDN-SECRET@cdn.test/blob",
    "http://cdn.test:1\\@upstream.test:80/blob",
    "http://upstream.test:1\\@cdn.test/blob",
])
def test_a_redirect_to_a_url_with_credentials_or_a_backslash_is_not_followed_nor_shown(location):
    # The client's 502 showed the URL's credentials; a backslash, which
    # parsers read as different hosts, failed as the registry being down.
    registry = FakeRegistry()
    registry.on("GET", "/v2/", answering(307, Location=location.encode()))
    upstream = make_upstream(registry, Clock())
    for _ in range(2):
        with pytest.raises(UpstreamError) as caught:
            result_of(upstream.request("GET", "/v2/a/blobs/sha256:x", SCOPE, any_origin=True))
        assert caught.value.error.status == 502
        assert "SECRET" not in caught.value.error.message and "cdnuser" not in caught.value.error.message
    assert [s.url for s in registry.seen] == ["upstream.test/v2/a/blobs/sha256:x"] * 2  # (none to the target)
    assert not upstream.unreachable


@pytest_twisted.inlineCallbacks
def test_a_connection_busy_when_a_reload_closes_its_pool_is_closed_once_its_request_ends():
    # It went back to the replaced pool and stayed open for its 120 s.
    factory, port, upstream = _canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    try:
        response = yield upstream.request("GET", "/v2/", SCOPE)
        yield upstream.close()
        assert [c.open for c in factory.conns] == [True]  # busy: left alone
        assert (yield read_body(response)) == b"{}"
        yield _until(lambda: not factory.conns[0].open)
        assert not factory.conns[0].open
    finally:
        yield _stop(port, upstream)


def test_a_token_too_large_for_any_registry_is_not_kept():
    # Kept one per repository name, a token service's 1 MiB tokens grew the
    # cache without a useful bound (MAX_CACHED_TOKENS of them: ~10 GiB).
    big = "t" * (1024 * 1024 - 64)
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler(big, expires_in=86400))
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", big, lambda r: b"{}"))
    upstream = make_upstream(registry, Clock())
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert caught.value.error.status == 502 and "token over 64 KiB" in caught.value.error.message
    assert not upstream._tokens


def test_the_log_says_when_an_unreachable_upstream_answers_again_even_after_its_30_s():
    from twisted.logger import globalLogPublisher

    registry = FakeRegistry()
    registry.on("GET", "/v2/", lambda r: b"{}")
    clock = Clock()
    upstream = make_upstream(registry, clock)
    upstream._probing = True  # (no check of /v2/ here)
    upstream._unreachable(upstream.error(502, "UNAVAILABLE", "refused the connection (x)"))
    assert upstream.unreachable
    clock.advance(31)
    assert not upstream.unreachable
    said: list[str] = []
    observer = lambda event: said.append(event.get("log_format", ""))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        result_of(upstream.request("GET", "/v2/", SCOPE))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert "upstream {registry} answers again" in said


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
    response = result_of(upstream.request("GET", "/v2/a/blobs/sha256:x", SCOPE, any_origin=True))
    assert response.code == 200
    assert result_of(read_body(response)) == b"blob-bytes"
    [cdn] = [s for s in registry.seen if s.url.startswith("cdn.test")]
    assert cdn.authorization is None
    assert all("SECRET-TOKEN" not in str(v) and "Basic" not in str(v) for v in cdn.headers.values())


def test_too_many_redirects_is_an_error_not_a_loop():
    registry = FakeRegistry()

    registry.on("GET", "/v2/", answering(302, Location=b"/v2/again"))
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

    registry.on("GET", "/v2/", answering(code, Retry_After=b"17"))
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    error = map_status(upstream, response, manifest_unknown("x"))
    assert (error.status, error.code) == (status, oci_code)
    if code == 429:
        assert error.headers["Retry-After"] == "17"
    if code != 404:
        assert "'up'" in error.message


@pytest.mark.parametrize(
    "sent, kept",
    [(b"17", "17"), (b"Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"),
     ("\N{SNOWMAN} later".encode(), None), (b"soon", None), (b"1" * 11, None), (b"", None)],
)
def test_a_rate_limit_passes_on_only_a_retry_after_that_is_one(sent, kept):
    # A snowman in it was a 500 on every route (it cannot go out as latin-1).
    registry = FakeRegistry()

    registry.on("GET", "/v2/", answering(429, Retry_After=sent))
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    error = map_status(upstream, response, manifest_unknown("x"))
    assert error.status == 429 and error.headers.get("Retry-After") == kept


def test_token_service_refusing_credentials_is_denied_naming_the_registry():
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T", user="u", password="right"))
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"ok"))
    upstream = make_upstream(registry, Clock(), auth=UpstreamAuth("u", "wrong"))
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert caught.value.error.status == 403
    assert "'up'" in caught.value.error.message


def test_a_token_refused_with_a_403_is_kept():
    # A 403 is a good token, for other things (a blocked artifact): dropping
    # it cost every later request of the repository a token fetch.
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T"))

    def protected(request):
        if request.getHeader(b"authorization") != b"Bearer T":
            return bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"")(request)
        return answering(403)(request) if b"blocked" in request.uri else b"ok"

    registry.on("GET", "/v2/", protected)
    upstream = make_upstream(registry, Clock())
    codes = [result_of(upstream.request("GET", f"/v2/a/manifests/{ref}", SCOPE)).code for ref in ("x", "blocked", "y", "blocked", "z")]
    assert codes == [200, 403, 200, 403, 200]
    assert len(registry.requests("/token")) == 1


def _logged_warnings(run):
    """What C{run()} logged at warn level, formatted."""
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    said: list = []
    globalLogPublisher.addObserver(said.append)
    try:
        run()
    finally:
        globalLogPublisher.removeObserver(said.append)
    return [formatEvent(e) for e in said if e.get("log_level") == LogLevel.warn]


@pytest.mark.parametrize("refused_with", [401])
def test_a_token_the_registry_stops_taking_is_not_sent_again(refused_with):
    # Revoked, or expired before its time: refused with a 401 with no
    # challenge, it was kept as long as it had said (up to a day), and every
    # request for what the cache lacks was refused.
    registry = FakeRegistry()
    tokens = iter(["T1", "T2"])
    registry.on("GET", "/token", lambda r: json.dumps({"token": next(tokens), "expires_in": 86400}).encode())
    valid = ["T1"]

    def protected(request):
        sent = request.getHeader(b"authorization")
        if sent is None:
            return bearer_protected(registry, "http://upstream.test/token", "-", lambda r: b"")(request)
        if sent != f"Bearer {valid[0]}".encode():
            return answering(refused_with)(request)
        return b"ok"

    registry.on("GET", "/v2/", protected)
    upstream = make_upstream(registry, Clock())
    assert result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE)).code == 200
    valid[0] = "T2"
    assert result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE)).code == refused_with
    assert result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE)).code == 200
    assert [s.authorization for s in registry.requests("/v2/")] == [None, "Bearer T1", "Bearer T1", None, "Bearer T2"]


@pytest.mark.parametrize("auth, token_answer, status, said", [
    (UpstreamAuth("u", "wrong"), answering(401), 403, "refused cargobay's credentials (token service answered 401)"),
    # (It said "refused cargobay's credentials" when none were sent.)
    (None, answering(401), 403, "wants credentials, and the config gives none (token service answered 401)"),
    (None, answering(404), 502, "token service answered 404"),
    (None, lambda r: b'{"token": null}', 502, "token service answered something that is not a token"),
    # (What a header may not carry: it went out as it was.)
    (None, lambda r: b'{"token": "abc\\u0000def"}', 502, "token service answered something that is not a token"),
    (None, lambda r: b'{"token": "abc def"}', 502, "token service answered something that is not a token"),
])
def test_an_upstream_that_gives_no_token_is_warned_of_once_a_minute_and_counted(auth, token_answer, status, said):
    # The client's error was all there was: the log's access line read as a
    # client's problem, and nothing was counted.
    from cargobay.metrics import Metrics

    registry = FakeRegistry()
    registry.on("GET", "/token", token_answer)
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"ok"))
    clock, metrics = Clock(), Metrics()
    upstream = make_upstream(registry, clock, auth=auth, metrics=metrics)
    errors = []

    def pull(times):
        for _ in range(times):
            with pytest.raises(UpstreamError) as caught:
                result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
            errors.append(caught.value.error)

    assert _logged_warnings(lambda: pull(3)) == [f"upstream up {said}"]
    assert [(e.status, e.message) for e in errors] == [(status, f"upstream registry 'up' {said}")] * 3
    assert metrics.upstream_errors.value("up", "auth") == 3
    clock.advance(61)
    assert _logged_warnings(lambda: pull(1)) == [f"upstream up {said}"]


def test_a_basic_registry_refusing_the_credentials_is_warned_of_and_counted():
    from cargobay.metrics import Metrics

    registry = FakeRegistry()
    registry.on("GET", "/v2/", answering(401, WWW_Authenticate=b'Basic realm="r"'))
    metrics = Metrics()
    upstream = make_upstream(registry, Clock(), auth=UpstreamAuth("u", "wrong"), metrics=metrics)
    codes = []
    warned = _logged_warnings(lambda: codes.extend(result_of(upstream.request("GET", "/v2/a/tags/list", SCOPE)).code
                                                   for _ in range(2)))
    assert codes == [401, 401]
    assert warned == ["upstream up refused the configured credentials (answered 401)"]
    assert metrics.upstream_errors.value("up", "auth") == 2


@pytest.mark.parametrize("challenged, asked", [
    # containerd asks for what the challenge names too: a registry's own scope...
    ('scope="aws"', ["repository:library/alpine:pull", "aws"]),
    ('scope="repository:library/alpine:pull registry:catalog:*"', ["repository:library/alpine:pull", "registry:catalog:*"]),
    # ...but not the repository's other actions (a pull needs no push), nor
    # another repository's (the credentials were not given for it).
    ('scope="repository:library/alpine:pull,push"', ["repository:library/alpine:pull"]),
    ('scope="repository:team/secret:pull"', ["repository:library/alpine:pull"]),
    ("", ["repository:library/alpine:pull"]),
])
def test_the_token_is_asked_for_what_the_challenge_names_too(challenged, asked):
    from urllib.parse import parse_qs, urlsplit

    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T"))

    def protected(request):
        if request.getHeader(b"authorization") != b"Bearer T":
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", f'Bearer realm="http://upstream.test/token",{challenged}'.encode())
            return b""
        return b"ok"

    registry.on("GET", "/v2/", protected)
    upstream = make_upstream(registry, Clock())
    assert result_of(upstream.request("GET", "/v2/library/alpine/manifests/x", SCOPE)).code == 200
    assert parse_qs(urlsplit(registry.requests("/token")[0].url).query)["scope"] == asked


def test_the_credentials_of_an_https_registry_never_go_to_a_plain_http_token_realm():
    registry = FakeRegistry()
    registry.on("GET", "/token", token_handler("T", user="u", password="secret"))
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"ok"))
    upstream = make_upstream(registry, Clock(), url="https://upstream.test", auth=UpstreamAuth("u", "secret"))
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert caught.value.error.status == 502 and "plain-HTTP token realm" in caught.value.error.message
    assert not registry.requests("/token")


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


# -- TLS that hands over all it decrypted from one read at once ---------------


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.lost_after: int | None = None

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.lost_after = len(self.pieces)
        self.reason = reason


class _Talker(Protocol):
    """Sends C{body} in TLS records of at most 16 KiB, then closes TLS."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def connectionMade(self) -> None:
        self.transport.write(self.body)
        self.transport.loseConnection()


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    def __init__(self, cert_path, key_path) -> None:
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate_file(str(cert_path))
        self.context.use_privatekey_file(str(key_path))

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def _tls_pair(tmp_path, client_protocol_class, body: bytes, corrupt_at: int | None = None):
    """
    A TLS server that sends C{body} and closes, and a client of
    C{client_protocol_class} that records what it gets, over an in-memory
    pump; C{corrupt_at}: flip a bit of the byte that many bytes before the
    end of the server's output.
    """
    ca = TestCA(tmp_path)
    cert = ca.issue("upstream", ["upstream.test"])
    server_options = _ServerTLS(cert.cert_path, cert.key_path)
    client_creator = optionsForClientTLS("upstream.test", trustRoot=Certificate.loadPEM(ca.cert_path.read_bytes()))
    received = _Recorder()
    server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: _Talker(body)))
    client_factory = TLSMemoryBIOFactory(client_creator, True, Factory.forProtocol(lambda: received))
    client_factory.protocol = client_protocol_class
    address = IPv4Address("TCP", "127.0.0.1", 443)
    _, _, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(address), lambda: client_factory.buildProtocol(address), greet=False
    )
    if corrupt_at is not None:
        sent = pump.serverIO.getOutBuffer

        def corrupted() -> bytes:
            data = sent()
            if data is not None and len(data) > len(body) // 2:  # the records, not the handshake
                data = data[:-corrupt_at] + bytes([data[-corrupt_at] ^ 1]) + data[-corrupt_at + 1 :]
            return data

        pump.serverIO.getOutBuffer = corrupted
    pump.flush()
    return received


@pytest.mark.parametrize("protocol_class", [TLSMemoryBIOProtocol, GatheringTLSProtocol])
def test_what_one_read_decrypts_reaches_the_application_at_once(tmp_path, protocol_class):
    body = os.urandom(40 * 16384)
    received = _tls_pair(tmp_path, protocol_class, body)
    assert b"".join(received.pieces) == body
    if protocol_class is TLSMemoryBIOProtocol:
        assert len(received.pieces) >= 40  # Twisted's: a call per record
    else:
        assert len(received.pieces) <= 2  # all that came in one read (the pump's)
    # The peer's close comes after everything it sent.
    assert received.lost_after == len(received.pieces)


def test_upstream_endpoints_are_tcp_and_gathering_tls():
    endpoints = UpstreamEndpoints(global_reactor, RegistryTLSPolicy("upstream.test", None), 3.0)
    plain = endpoints.endpointForURI(URI.fromBytes(b"http://upstream.test:5000/v2/"))
    assert isinstance(plain, HostnameEndpoint)
    tls = endpoints.endpointForURI(URI.fromBytes(b"https://upstream.test/v2/"))
    assert isinstance(tls, _TLSEndpoint) and isinstance(tls._wrapped, HostnameEndpoint)
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://upstream.test/v2/"))


def test_what_was_decrypted_before_a_broken_record_reaches_the_application_first(tmp_path):
    body = os.urandom(40 * 16384)
    received = _tls_pair(tmp_path, GatheringTLSProtocol, body, corrupt_at=1000)
    got = b"".join(received.pieces)
    assert 0 < len(got) < len(body) and body.startswith(got)
    assert received.lost_after == len(received.pieces)
    assert received.reason is not None and received.reason.check(SSL.Error)


class _Body(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(None)


class _Blob(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: object) -> bytes:
        return self.body


@pytest_twisted.inlineCallbacks
def test_an_https_upstream_body_comes_in_pieces_of_more_than_one_record(tmp_path):
    # The wiring: Upstream's own Agent connects through GatheringTLSProtocol.
    ca = TestCA(tmp_path)
    cert = ca.issue("upstream", ["localhost"], ["127.0.0.1"])
    body = os.urandom(1024 * 1024)
    root = Resource()
    root.putChild(b"blob", _Blob(body))
    site = Site(root)
    port = global_reactor.listenTCP(
        0, TLSMemoryBIOFactory(_ServerTLS(cert.cert_path, cert.key_path), False, site), interface="127.0.0.1"
    )
    config = RegistryConfig(id="tls", url=f"https://127.0.0.1:{port.getHost().port}", ca_file=str(ca.cert_path))
    upstream = Upstream(config, global_reactor, pool=HTTPConnectionPool(global_reactor, persistent=False))
    try:
        response = yield upstream.request("GET", "/blob", SCOPE)
        assert response.code == 200
        received = _Body()
        response.deliverBody(received)
        yield received.done
    finally:
        yield port.stopListening()
    assert b"".join(received.pieces) == body
    assert max(len(piece) for piece in received.pieces) > 16384


@pytest_twisted.inlineCallbacks
def test_a_ca_file_of_several_certificates_trusts_each_of_them(tmp_path):
    # While a private CA is rotated, its file holds the old CA and the new:
    # only the first certificate of the file was trusted.
    old, new, other = TestCA(tmp_path / "old"), TestCA(tmp_path / "new"), TestCA(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old.cert_path.read_bytes() + b"\n" + new.cert_path.read_bytes())
    root = Resource()
    root.putChild(b"blob", _Blob(b"x"))
    site = Site(root)
    for ca, trusted in ((old, True), (new, True), (other, False)):
        cert = ca.issue("upstream", ["localhost"], ["127.0.0.1"])
        port = global_reactor.listenTCP(
            0, TLSMemoryBIOFactory(_ServerTLS(cert.cert_path, cert.key_path), False, site), interface="127.0.0.1"
        )
        config = RegistryConfig(id="tls", url=f"https://127.0.0.1:{port.getHost().port}", ca_file=str(bundle))
        upstream = Upstream(config, global_reactor, pool=HTTPConnectionPool(global_reactor, persistent=False))
        try:
            if trusted:
                response = yield upstream.request("GET", "/blob", SCOPE)
                assert (yield read_body(response)) == b"x"
            else:
                with pytest.raises(UpstreamError) as caught:
                    yield upstream.request("GET", "/blob", SCOPE)
                assert "failed TLS verification" in caught.value.error.message
        finally:
            yield port.stopListening()


def test_each_upstream_has_its_pool_and_a_reload_closes_the_replaced_ones(tmp_path):
    # Two registries on one host:port, one trusting a CA of its own: a
    # connection verified for one must never carry the other's requests.
    from cargobay.config import load_config
    from cargobay.server_tap import Runtime
    from proxy import write_config

    ca = TestCA(tmp_path / "ca")
    registries = [
        {"id": "a", "url": "https://registry.test:5000"},
        {"id": "b", "url": "https://registry.test:5000", "ca_file": ca.cert_path},
    ]
    repositories = [("x", "a", "x"), ("y", "b", "y")]
    path = write_config(tmp_path / "config.toml", 5000, tmp_path / "cache", registries, repositories)
    runtime = Runtime(load_config(str(path)), str(path), global_reactor)
    a, b = runtime.app.upstreams["a"], runtime.app.upstreams["b"]
    assert a._pool is not None and b._pool is not None and a._pool is not b._pool
    closed: list[str] = []
    a.close = lambda: closed.append("a")  # type: ignore[method-assign]
    b.close = lambda: closed.append("b")  # type: ignore[method-assign]
    registries[1]["connect_timeout_seconds"] = 3
    write_config(path, 5000, tmp_path / "cache", registries, repositories)
    assert runtime.reload()
    assert runtime.app.upstreams["a"] is a  # unchanged: kept, with its tokens and connections
    assert runtime.app.upstreams["b"] is not b
    assert closed == ["b"]


def test_head_redirected_with_302_stays_a_head():
    registry = FakeRegistry()

    def redirect(request):
        request.setResponseCode(302)
        request.setHeader(b"Location", b"http://cdn.test/presigned?sig=for-HEAD")
        return b""

    registry.on("HEAD", "/v2/", redirect)
    registry.on("GET", "/presigned", lambda r: b"x" * 100_000)
    registry.on("HEAD", "/presigned", lambda r: b"")
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("HEAD", "/v2/a/blobs/sha256:" + "a" * 64, SCOPE, any_origin=True))
    assert response.code == 200
    assert [s.method for s in registry.seen] == ["HEAD", "HEAD"]  # not a GET of the whole blob


def test_only_blob_requests_follow_a_redirect_to_another_host_over_plain_http():
    """
    A manifest, tag list or referrers index is taken from the registry's
    own origin or over HTTPS only: else an upstream could have the proxy
    fetch any URL it can reach inside (a metadata service) and hand the body
    to a client.  registry.k8s.io sends manifests to another host over HTTPS.
    """
    registry = FakeRegistry()
    targets = {b"away": b"http://metadata.test/secret", b"k8s": b"https://artifacts.test/v2/a/manifests/k8s"}

    def redirect(request):
        request.setResponseCode(302)
        request.setHeader(b"Location", targets.get(request.path.split(b"/")[-1], b"/v2/moved"))
        return b""

    registry.on("GET", "/v2/a/", lambda r: b"artifact" if r.getHeader(b"host") == b"artifacts.test" else redirect(r))
    registry.on("GET", "/v2/moved", lambda r: b"here")
    registry.on("GET", "/secret", lambda r: b"SECRET")
    upstream = make_upstream(registry, Clock())
    response = result_of(upstream.request("GET", "/v2/a/manifests/away", SCOPE))
    assert response.code == 302
    assert not [s for s in registry.seen if s.url.startswith("metadata.test")]
    response = result_of(upstream.request("GET", "/v2/a/manifests/near", SCOPE))
    assert response.code == 200 and result_of(read_body(response)) == b"here"
    response = result_of(upstream.request("GET", "/v2/a/manifests/k8s", SCOPE))
    assert response.code == 200 and result_of(read_body(response)) == b"artifact"
    response = result_of(upstream.request("GET", "/v2/a/blobs/away", SCOPE, any_origin=True))
    assert response.code == 200 and result_of(read_body(response)) == b"SECRET"


class _Silent:
    """A response body that sends half of itself, then nothing more."""

    def __init__(self) -> None:
        self.stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class _Response:
    def __init__(self) -> None:
        self.transport = _Silent()

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        protocol.dataReceived(b'{"schemaVersion": 2,')


def test_a_small_body_that_stops_coming_fails_after_the_read_timeout():
    # treq's timeout covers the headers only: a manifest, tag list or token
    # reply that went quiet halfway left its request (and, for a token, every
    # later request for that scope) waiting for good.
    clock = Clock()
    response = _Response()
    outcome: list[object] = []
    read_body(response, 1024, clock, 2.0).addBoth(outcome.append)  # type: ignore[arg-type]
    clock.advance(1.9)
    assert outcome == []
    clock.advance(0.2)
    [failure] = outcome
    assert isinstance(failure, Failure) and failure.check(defer.TimeoutError)
    assert response.transport.stopped


class _Whole(_Response):
    def deliverBody(self, protocol: Protocol) -> None:
        super().deliverBody(protocol)
        protocol.dataReceived(b' "layers": []}')
        protocol.connectionLost(Failure(ResponseDone()))


def test_a_body_that_ends_in_time_leaves_no_timer_behind():
    clock = Clock()
    outcome: list[object] = []
    read_body(_Whole(), 1024, clock, 2.0).addBoth(outcome.append)  # type: ignore[arg-type]
    assert outcome == [b'{"schemaVersion": 2, "layers": []}']
    assert clock.getDelayedCalls() == []


class _CutShort(Protocol):
    """Answers any request with headers and half its body, then hangs up."""

    def dataReceived(self, data: bytes) -> None:
        body = json.dumps({"name": "x", "tags": ["a"] * 1000}).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        self.transport.loseConnection()


@pytest_twisted.inlineCallbacks
def test_a_tag_list_or_referrers_body_that_breaks_off_is_an_oci_error_or_the_stale_answer(tmp_path):
    # It was a 500 (not a RegistryError), and the remembered list was not used.
    from cargobay.links import RepositoryLinks
    from cargobay.manifest_store import ManifestStore
    from cargobay.manifests import ManifestService
    from cargobay.reference import Digest

    port, upstream = _raw_upstream(_CutShort)
    service = ManifestService(ManifestStore(str(tmp_path), global_reactor), global_reactor, 60, RepositoryLinks(None))
    try:
        with pytest.raises(RegistryError) as caught:
            yield service.tags(upstream, "alpine", "library/alpine", None, None)
        assert caught.value.status == 502
        # Referrers with none remembered: a 404, as if the upstream had no
        # referrers API (clients then look for the fallback tag).
        subject = Digest("sha256", "a" * 64)
        with pytest.raises(RegistryError) as caught:
            yield service.referrers(upstream, "alpine", "library/alpine", subject, None)
        assert caught.value.status == 404
        service._store.set_tag_list("raw", "library/alpine", ["a", "b"])
        body, _, stale = yield service.tags(upstream, "alpine", "library/alpine", None, None)
        assert stale and json.loads(body)["tags"] == ["a", "b"]
        service._store.set_referrers("raw", "library/alpine", subject, None, (b"{}", "application/x", None))
        body, _, _, _, stale = yield service.referrers(upstream, "alpine", "library/alpine", subject, None)
        assert stale and body == b"{}"
    finally:
        yield _stop(port, upstream)


def test_upstream_answers_are_taken_as_sent_without_gzip_or_cookies():
    # treq's client asked for gzip and inflated it without a bound (a 256 KiB
    # body became 256 MiB in memory), and sent every cookie back.
    import gzip

    bomb = gzip.compress(bytes(4 * 1024 * 1024))
    registry = FakeRegistry()

    def answer(request):
        request.setHeader(b"Content-Encoding", b"gzip")
        request.setHeader(b"Set-Cookie", b"lb=" + b"x" * 3000 + b"; Path=/")
        return bomb

    registry.on("GET", "/v2/", answer)
    upstream = make_upstream(registry, Clock())
    for _ in range(2):
        response = result_of(upstream.request("GET", "/v2/a/blobs/x", SCOPE))
        assert result_of(read_body(response, len(bomb) + 1)) == bomb
    for seen in registry.seen:
        assert "accept-encoding" not in seen.headers and "cookie" not in seen.headers


@pytest.mark.parametrize("how", ["connect", "lookup"])
def test_running_out_of_file_descriptors_is_not_the_upstream_being_unreachable(how, monkeypatch):
    # EMFILE on connect marked a healthy upstream unreachable for 30 s
    # (cached tags then served without asking it) and was a 502.
    import socket

    from twisted.internet import error as netError
    from twisted.web.iweb import IAgent
    from zope.interface import implementer

    @implementer(IAgent)
    class Exhausted:
        def request(self, method, uri, headers=None, bodyProducer=None):
            if how == "connect":
                return defer.fail(netError.ConnectError(24, "Too many open files"))
            # A registry by name: getaddrinfo's failure is only "not found".
            return defer.fail(netError.DNSLookupError("no results for hostname lookup: upstream.test"))

    if how == "lookup":
        def no_socket(*args, **kwargs):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(socket, "socket", no_socket)

    upstream = Upstream(RegistryConfig(id="up", url="http://upstream.test"), Clock(), agent=Exhausted())
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))
    assert caught.value.error.status == 503 and "out of open files" in caught.value.error.message
    assert not upstream.unreachable


def test_a_401_to_a_request_sent_before_a_token_came_uses_that_token():
    # Requests sent without a token, answered 401 after another request's
    # token fetch had ended, each fetched a token of their own (4 for one
    # scope among 30 requests at once).
    from twisted.web.server import NOT_DONE_YET

    registry = FakeRegistry()
    held = []
    protected = bearer_protected(registry, "http://upstream.test/token", "T", lambda r: b"ok")

    def manifests(request):
        if request.getHeader(b"x-hold") and request.getHeader(b"authorization") is None:
            held.append(request)
            return NOT_DONE_YET
        return protected(request)

    registry.on("GET", "/token", token_handler("T"))
    registry.on("GET", "/v2/", manifests)
    upstream = make_upstream(registry, Clock())
    late = upstream.request("GET", "/v2/a/manifests/x", SCOPE, headers={"x-hold": ["1"]})
    assert len(held) == 1
    result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE))  # fetches the token
    request = held[0]
    request.write(protected(request))
    request.finish()
    upstream._http._agent._agent.flush()
    assert result_of(read_body(result_of(late))) == b"ok"
    assert sum(1 for seen in registry.seen if "/token" in seen.url) == 1


def test_a_redirect_to_a_url_treq_cannot_take_says_so():
    # A host name IDNA refuses (a label of 64 letters) was "failed: InvalidCodepoint".
    registry = FakeRegistry()

    registry.on("GET", "/v2/", answering(302, Location=b"http://" + b"a" * 64 + b".example:7000/blob"))
    upstream = make_upstream(registry, Clock())
    with pytest.raises(UpstreamError) as caught:
        result_of(upstream.request("GET", "/v2/a/blobs/x", SCOPE, any_origin=True))
    assert caught.value.error.status == 502 and "a URL it cannot use" in caught.value.error.message


def test_ipv6_address_literals_pass_treq_as_names_of_their_own():
    from cargobay.upstream import _for_treq, _literal_back

    for url in ("http://[::1]:5000/v2/a/blobs/x?n=1", "https://[fd00::5]/v2/", "http://[2001:db8::1]"):
        name = _for_treq(url)
        assert "[" not in name and name.count(":") <= 2, name
        assert _literal_back(name.encode()) == url.encode()
    for url in ("https://registry-1.docker.io/v2/", "http://127.0.0.1:5000/v2/"):
        assert _for_treq(url) == url and _literal_back(url.encode()) == url.encode()


@pytest.mark.parametrize("expires_in", [b"NaN", b"Infinity", b"1" + b"0" * 400, b"1e400", b"true", b"-5"])
def test_a_token_with_an_odd_lifetime_is_used_and_kept_a_while(expires_in):
    # NaN (which JSON parsing takes) passed no comparison: the token was
    # never used, every pull fetched one and failed; 400 digits overflowed
    # a float ("failed: OverflowError").
    registry = FakeRegistry()
    registry.on("GET", "/token", lambda request: b'{"token": "T1", "expires_in": ' + expires_in + b"}")
    registry.on("GET", "/v2/", bearer_protected(registry, "http://upstream.test/token", "T1", lambda r: b"ok"))
    clock = Clock()
    upstream = make_upstream(registry, clock)
    for _ in range(2):
        assert result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE)).code == 200
    assert len(registry.requests("/token")) == 1
    clock.advance(2 * 24 * 3600)  # none is kept for more than a day
    assert result_of(upstream.request("GET", "/v2/a/manifests/x", SCOPE)).code == 200
    assert len(registry.requests("/token")) == 2
