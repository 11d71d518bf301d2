"""
The client side: requests to one upstream registry.

L{Upstream} knows the network and nothing else.  It authenticates the way
registries ask to be authenticated (anonymous, Basic, or the Bearer token
dance from a C{WWW-Authenticate} challenge), caches tokens per scope until they
expire, shares one token fetch between concurrent requests, retries once on
401, and follows redirects itself so that the registry's credentials never
reach another host (Docker Hub and S3-backed registries redirect blobs to a CDN
or a presigned URL).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import ipaddress
import json
import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy
from typing import Any, cast
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from cryptography import x509
from OpenSSL import SSL
from OpenSSL import crypto as OpenSSLCrypto
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.internet import error as netError
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web import client as webclient
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from cargobay.challenge import Challenge, find_challenge
from cargobay.config import RegistryConfig
from cargobay.errors import RegistryError, failure_within, is_tls_failure
from cargobay.logs import Throttle
from cargobay.metrics import Metrics
from cargobay.outbound import OutboundAgent, ProxyError, ProxySettings, TunnelEndpoint
from cargobay.reach import InternalAddressRefused, Reach

log = Logger()
# One "Starting factory" line per upstream connection is noise.
webclient._HTTP11ClientFactory.noisy = False

#: Small bodies (errors, token responses, manifests) are read into memory up to
#: this size; distribution itself refuses manifests over 4 MiB.
SMALL_BODY_LIMIT = 4 * 1024 * 1024
#: Bytes of status line and headers an upstream response may have.
MAX_RESPONSE_HEAD = 256 * 1024
#: Characters of an upstream token kept (one per repository, up to
#: L{MAX_CACHED_TOKENS}); no registry takes a header anywhere near this.
MAX_UPSTREAM_TOKEN = 64 * 1024
#: The longest an upstream's token is kept, whatever its expires_in says.
MAX_TOKEN_LIFETIME = 24 * 3600.0
MAX_REDIRECTS = 5
REDIRECT_CODES = (301, 302, 303, 307, 308)
#: A token is refreshed this long before the upstream says it expires.
TOKEN_EXPIRY_MARGIN = 10.0
DEFAULT_TOKEN_LIFETIME = 60.0
#: How often one kind of authentication failure of a registry is warned of.
AUTH_WARNING_EVERY = 60.0
#: What an upstream token may hold: visible ASCII (it goes into a header).
_TOKEN_CHARACTERS = re.compile(r"[!-~]+")
#: Upstream tokens kept (one per repository scope).
MAX_CACHED_TOKENS = 10_000
#: After the upstream could not be reached (no connection, no answer in
#: time), how long what the cache holds is served without asking it first:
#: a black-holed upstream would otherwise hold every pull for its timeout.
UNREACHABLE_FOR = 30.0
#: How long the check of a registry that just failed a request waits.
PROBE_TIMEOUT = 5.0


class UpstreamError(RegistryError):
    """
    The upstream could not be reached or misbehaved: the OCI error the client
    should get, raised from the network layer.
    """

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.status, error.code, error.message, error.detail, error.headers)
        self.error = error


class BodyTooLarge(Exception):
    pass


class _LimitedCollector(Protocol):
    def __init__(
        self, limit: int, finished: Deferred[bytes], clock: IReactorTime | None = None, idle: float | None = None
    ) -> None:
        self._limit = limit
        self._finished = finished
        self._chunks: list[bytes] = []
        self._size = 0
        self._failed = False
        #: Given both, a body that stops coming for C{idle} seconds fails:
        #: treq's timeout covers the headers only.
        self._clock = clock
        self._idle = idle
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self._clock is not None and self._idle is not None:
            self._timer = self._clock.callLater(self._idle, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        if self._failed:
            return
        self._failed = True
        self._chunks = []
        cast(IPushProducer, self.transport).stopProducing()
        self._finished.errback(defer.TimeoutError(f"no body bytes for {self._idle:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(cast(float, self._idle))
        self._size += len(data)
        if self._size > self._limit:
            self._failed = True
            self._chunks = []
            self._stop_timer()
            cast(IPushProducer, self.transport).stopProducing()
            self._finished.errback(BodyTooLarge(f"body larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(netError.ConnectionDone())) -> None:
        self._stop_timer()
        if self._failed:
            return
        if reason.check(webclient.ResponseDone, webclient.PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def read_body(
    response: IResponse, limit: int = SMALL_BODY_LIMIT, clock: IReactorTime | None = None, idle: float | None = None
) -> Deferred[bytes]:
    """
    Read a whole (small) response body, giving up past C{limit} bytes (and,
    given a clock, after C{idle} seconds without a byte).
    """
    finished: Deferred[bytes] = Deferred()
    response.deliverBody(_LimitedCollector(limit, finished, clock, idle))
    return finished


def discard_body(response: IResponse) -> None:
    """
    Throw a response body away, without keeping a large one in memory, and
    giving up on one that stops coming for the registry's read timeout (its
    connection, paused until the body is read, would stay open for good).
    Once only: a response whose body is already going somewhere is left
    alone.
    """
    if getattr(response, "_cargobay_discarded", False):
        return
    response._cargobay_discarded = True  # type: ignore[attr-defined]
    clock, idle = getattr(response, "_cargobay_idle", (None, None))
    d = read_body(response, 64 * 1024, clock, idle)
    d.addErrback(lambda _: None)


class ResponseHeadTooLarge(Exception):
    """An upstream sent more than L{MAX_RESPONSE_HEAD} bytes before a body."""


class _BoundedResponseParser(_newclient.HTTPClientParser):
    """
    Twisted's HTTP client parser, bounding the status line and headers of a
    response: it takes lines of up to 16 KiB, but any number of them, and
    an upstream (or a host it redirects to) sending header lines without
    end filled memory until the read timeout.
    """

    _head_size = 0

    def lineReceived(self, line: bytes) -> None:
        if self.state in (_newclient.STATUS, _newclient.HEADER):
            self._head_size += len(line) + 1
            if self._head_size > MAX_RESPONSE_HEAD:
                raise ResponseHeadTooLarge(f"response headers over {MAX_RESPONSE_HEAD // 1024} KiB")
        super().lineReceived(line)


# HTTP11ClientProtocol makes its parsers from this module global.
_newclient.HTTPClientParser = _BoundedResponseParser  # type: ignore[misc]


@implementer(IPolicyForHTTPS)
class RegistryTLSPolicy:
    """
    Verify the registry's own host against its configured CA file (if any),
    every other host (CDNs, storage and token services it sends cargobay
    to) against the platform's trust store and that CA file: a private
    registry's token service or storage often has a host name of its own,
    signed by the same CA (Docker and containerd trust a registry's CA for
    them too).
    """

    def __init__(self, hostname: str, ca_file: str | None) -> None:
        self._hostname = hostname
        self._default = webclient.BrowserLikePolicyForHTTPS()
        self._trust: Any = None
        self._with_platform: Any = None
        #: What the CA file held when it was read (see L{ca_file_fingerprint}).
        self.ca_fingerprint: bytes | None = None
        if ca_file is not None:
            with open(ca_file, "rb") as f:
                pem = f.read()
            self.ca_fingerprint = hashlib.sha256(pem).digest()
            # Every certificate in it: while a CA is rotated, the file holds
            # the old one and the new one.
            certificates = _pem_certificates(pem)
            self._trust = trustRootFromCertificates([Certificate(cert) for cert in certificates])
            self._with_platform = _PlatformAnd(certificates)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        host = hostname.decode("ascii")
        if self._trust is not None:
            return optionsForClientTLS(host, trustRoot=self._trust if host == self._hostname else self._with_platform)
        return self._default.creatorForNetloc(hostname, port)


@implementer(IOpenSSLTrustRoot)
class _PlatformAnd:
    """The platform's trust store (as Twisted's C{platformTrust}), and these CA certificates."""

    def __init__(self, certificates: list[Any]) -> None:
        self._certificates = certificates

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for certificate in self._certificates:
            try:
                store.add_cert(certificate)
            except OpenSSLCrypto.Error:  # (already there, with an older OpenSSL)
                pass


def _pem_certificates(pem: bytes) -> list[Any]:
    """The certificates of a PEM file, as pyOpenSSL's X509."""
    return [OpenSSLCrypto.X509.from_cryptography(cert) for cert in x509.load_pem_x509_certificates(pem)]


def ca_file_fingerprint(ca_file: str | None) -> bytes | None:
    """
    A hash of what a registry's CA file holds now (None without one, or
    when it cannot be read): a reload re-reads a file renewed in place.
    """
    if ca_file is None:
        return None
    try:
        with open(ca_file, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except OSError:
        return None


class GatheringTLSProtocol(TLSMemoryBIOProtocol):
    """
    TLS that hands its application every byte decrypted from one read of the
    socket at once, rather than one call per TLS record.  A record holds at
    most 16 KiB, and Twisted passes each through the HTTP client's parser,
    five layers of Python, before it reaches a blob's pipe; a 1 MiB read is
    64 records.  From an HTTPS upstream the reactor's thread is what limits a
    download, and this takes about a tenth off its time per byte.

    This is Twisted's own loop with the records of one read joined; as a
    subclass must, it uses the attributes of L{TLSMemoryBIOProtocol}.
    """

    def _flushReceiveBIO(self) -> None:
        pieces: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                pieces.append(self._tlsConnection.recv(2**15))
            except SSL.WantReadError:
                # Nothing more until the socket gives more.
                break
            except SSL.ZeroReturnError:
                # The peer closed TLS: what came before its close goes first.
                self._deliver(pieces)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                self._deliver(pieces)
                self._tlsShutdownFinished(failure)
        self._deliver(pieces)
        # Reading may have produced something to send (a handshake message).
        self._flushSendBIO()

    def _deliver(self, pieces: list[bytes]) -> None:
        if not pieces:
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        if not self._aborted:
            ProtocolWrapper.dataReceived(self, data)


class _GatheringTLSFactory(TLSMemoryBIOFactory):
    protocol = GatheringTLSProtocol


@implementer(IStreamClientEndpoint)
class _TLSEndpoint:
    """C{wrapClientTLS}, with L{GatheringTLSProtocol}."""

    def __init__(self, creator: Any, wrapped: IStreamClientEndpoint) -> None:
        self._creator = creator
        self._wrapped = wrapped

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        connected: Deferred[Any] = self._wrapped.connect(_GatheringTLSFactory(self._creator, True, factory))
        return connected.addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    An L{Agent}'s endpoints, as its standard ones (TCP, with TLS under
    C{https}) but for L{GatheringTLSProtocol}.
    """

    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float, proxies: ProxySettings | None = None,
        registry_url: str | None = None, registry_id: str = "",
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._proxies = proxies if proxies is not None else ProxySettings({}, None)
        #: Hosts other than the registry's own are connected to only at
        #: addresses it allows (see L{cargobay.reach}).
        self._registry = origin(registry_url) if registry_url is not None else None
        self._registry_id = registry_id
        self.reach = Reach()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        where = (uri.scheme.decode("ascii"), host.lower(), uri.port)
        if self._registry is None:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
        elif where == self._registry:
            endpoint = self.reach.registry_endpoint(self._reactor, host, uri.port, self._connect_timeout)
        else:
            endpoint = self.reach.elsewhere_endpoint(
                self._reactor, host, uri.port, self._connect_timeout, self._registry_id
            )
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            proxy = self._proxies.for_uri("https", host)
            if proxy is not None:
                # TLS end to end, through the proxy's tunnel.
                endpoint = TunnelEndpoint(self._reactor, proxy, host, uri.port, self._connect_timeout)
            return _TLSEndpoint(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")


#: An IPv6 address literal host, as treq is given it (see L{_for_treq}).
_V6_NAME = re.compile(rb"//v6-([0-9a-f]{32})\.ipv6-literal\.invalid(?=[:/?#]|$)")


def _for_treq(url: str) -> str:
    """
    C{url} with an IPv6 address literal for a host (C{http://[fd00::5]:5000})
    put as a name of its own, which L{_AsSent} turns back: treq's URL
    handling puts every host through IDNA, which refuses the colons.
    Twisted's agent under it takes the literal as it is.
    """
    parts = urlsplit(url)
    if not parts.netloc.startswith("["):
        return url
    try:
        packed = ipaddress.IPv6Address(parts.hostname or "").packed
        port = parts.port
    except ValueError:
        return url
    netloc = f"v6-{packed.hex()}.ipv6-literal.invalid" + ("" if port is None else f":{port}")
    return urlunsplit(parts._replace(netloc=netloc))


def _literal_back(uri: bytes) -> bytes:
    return _V6_NAME.sub(lambda m: b"//[" + str(ipaddress.IPv6Address(bytes.fromhex(m[1].decode()))).encode() + b"]",
                        uri, count=1)


class _Client(HTTPClient):
    """treq's client, taking an IPv6 address literal for a host."""

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred[Any]:  # type: ignore[override]
        return super().request(method, _for_treq(url) if isinstance(url, str) else url, **kwargs)


@implementer(IAgent)
class _AsSent:
    """
    The agent under treq's client: bodies come as the upstream sent them.
    Registries send blobs and manifests unencoded, and a digest is of those
    bytes; treq's client would ask for gzip and inflate what came without a
    bound (a body of kilobytes can inflate to gigabytes).  A body that comes
    encoded anyway is taken as it is, and fails its digest.
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        if headers is not None:
            headers = headers.copy()
            headers.removeHeader(b"accept-encoding")
        uri = _literal_back(uri)
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(_undecoded)


def _undecoded(response: IResponse) -> IResponse:
    response.headers.removeHeader(b"content-encoding")
    return response


def pull_scope(upstream_name: str) -> str:
    return f"repository:{upstream_name}:pull"


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), port)


@dataclass
class _CachedToken:
    token: str
    expires_at: float


class Upstream:
    """
    Requests to one configured upstream registry.
    """

    def __init__(
        self,
        registry: RegistryConfig,
        reactor: Any,
        agent: IAgent | None = None,
        pool: webclient.HTTPConnectionPool | None = None,
        metrics: Metrics | None = None,
        proxies: ProxySettings | None = None,
    ) -> None:
        self.registry = registry
        self._metrics = metrics
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        #: Its own: a connection verified against one registry's CA must
        #: not serve another registry (or a reloaded one) on the same host.
        self._pool = pool
        #: What the registry's CA file held when this was built.
        self.ca_fingerprint = ca_file_fingerprint(registry.ca_file) if agent is not None else None
        if agent is None:
            if pool is None:
                pool = self._pool = webclient.HTTPConnectionPool(reactor, persistent=True)
                pool.maxPersistentPerHost = 32
                pool.cachedConnectionTimeout = 120
            settings = proxies if proxies is not None else ProxySettings({}, None)
            policy = RegistryTLSPolicy(registry.hostname, registry.ca_file)
            self.ca_fingerprint = policy.ca_fingerprint
            endpoints = UpstreamEndpoints(
                reactor, policy, registry.connect_timeout, settings,
                registry.url, registry.id,
            )
            agent = webclient.Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
            if settings.any:
                agent = OutboundAgent(reactor, agent, settings, pool, registry.connect_timeout)
        # treq's client asks every upstream for gzip, which it would inflate
        # without a bound, and keeps and sends back cookies: neither here.
        self._http = _Client(_AsSent(agent), cookiejar=IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))
        self._tokens: dict[str, _CachedToken] = {}
        #: Authentication failures warned of, by what failed.
        self._auth_warned = Throttle(AUTH_WARNING_EVERY)
        self._pending_tokens: dict[str, list[Deferred[Any]]] = {}
        # Set once the registry answered with a Basic challenge: send the
        # credentials up front from then on instead of paying a 401 each time.
        self._basic = False
        self._unreachable_until = 0.0
        #: The same, for the token service a registry sends cargobay to
        #: (another host, often): the registry's own quick 401 says nothing
        #: of it, so only a token fetched, or the time running out, ends this.
        self._token_service_down_until = 0.0
        self._probing = False
        #: Requests (to clients and to the registry) under way; see L{retire}.
        self._uses = 0
        self._when_unused: list[Callable[[], object]] = []
        #: Whether the registry pages tag lists itself (n, last): None until
        #: one of its answers shows it.
        self.pages_tags: bool | None = None

    # -- public API --------------------------------------------------------

    def close(self) -> Deferred[None]:
        """
        Close the idle connections kept for reuse (when a reload replaced
        us), and those busy now once their requests end, rather than keep
        them for C{cachedConnectionTimeout}.
        """
        if self._pool is None:
            return defer.succeed(None)
        self._pool.cachedConnectionTimeout = 0
        return self._pool.closeCachedConnections()

    def url_for(self, path: str) -> str:
        return self.registry.url + path

    @property
    def path_prefix(self) -> str:
        """The path of the registry's URL ("" for most), under which its /v2/ is."""
        return urlsplit(self.registry.url).path.rstrip("/")

    @property
    def unreachable(self) -> bool:
        """
        Whether the upstream could not be reached lately (L{UNREACHABLE_FOR}):
        what the cache holds is then served without asking it.  Requests
        the cache cannot answer still go to it, and the first that gets an
        answer ends this.
        """
        # (Never for longer than that, should the clock be set back.)
        now = self._clock.seconds()
        return any(0 < until - now <= UNREACHABLE_FOR for until in (self._unreachable_until, self._token_service_down_until))

    def _token_service_unreachable(self, error: RegistryError) -> None:
        if not 0 < self._token_service_down_until - self._clock.seconds() <= UNREACHABLE_FOR:
            log.warn(
                "upstream {registry}'s token service {message}: for {seconds:.0f} s what the cache holds is "
                "served without asking the registry",
                registry=self.registry.id, message=error.message.split(" ", 3)[-1], seconds=UNREACHABLE_FOR,
            )
        self._token_service_down_until = self._clock.seconds() + UNREACHABLE_FOR

    def _unreachable(self, error: RegistryError) -> None:
        if not self.unreachable:
            log.warn(
                "upstream {registry} {message}: for {seconds:.0f} s what the cache holds is served without asking it",
                registry=self.registry.id, message=error.message.split(" ", 3)[-1], seconds=UNREACHABLE_FOR,
            )
        self._unreachable_until = self._clock.seconds() + UNREACHABLE_FOR
        if not self._probing:
            # One slow repository is not a registry that is down: if the
            # registry answers its base endpoint at once, it is reachable.
            self._probing = True
            probe = self._http.request(
                "GET", self.registry.url + "/v2/", allow_redirects=False, unbuffered=True,
                timeout=min(PROBE_TIMEOUT, self.registry.read_timeout),
            )

            def answered(response: IResponse) -> None:
                discard_body(response)
                self._reached()

            def done(_: object) -> None:
                self._probing = False

            probe.addCallbacks(answered, lambda _: None).addBoth(done)

    def _reached(self) -> None:
        if self._unreachable_until:
            # (Also when its 30 s ran out before: the log says it came back.)
            log.info("upstream {registry} answers again", registry=self.registry.id)
            self._unreachable_until = 0.0

    def read_body(self, response: IResponse, limit: int = SMALL_BODY_LIMIT) -> Deferred[bytes]:
        """L{read_body}, giving up when the body stops for the read timeout."""
        return read_body(response, limit, self._clock, self.registry.read_timeout)

    def request(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, list[str]] | None = None,
        follow_redirects: bool = True,
        any_origin: bool = False,
    ) -> Deferred[Any]:
        """
        Send C{method} to C{path} (below the registry's URL), authenticating for
        C{scope} (C{repository:NAME:pull}).  Fires with the final
        L{IResponse}; its body has not been read.

        Redirects are followed within the registry's origin, to any HTTPS
        URL, and to anywhere with C{any_origin}: only for blobs, whose bytes
        are checked against their digest.  A manifest, tag list or referrers
        index from any plain-HTTP URL the upstream points at would let it
        have the proxy fetch what it can reach inside (the cloud's metadata
        service, say) for a client; over HTTPS the target must prove to be
        the host named.  (registry.k8s.io redirects manifests to another
        host, over HTTPS.)

        @raise UpstreamError: when the upstream cannot be reached or times out,
            or answers something unusable (a redirect or token realm that is
            not a URL, say).
        """

        def unusable(failure: Failure) -> Failure:
            if failure.check(RegistryError, defer.CancelledError):
                return failure
            log.warn("upstream {registry} {method} {path}: {error!r}", registry=self.registry.id,
                     method=method, path=path, error=failure.value)
            raise UpstreamError(self.error(502, "UNAVAILABLE", f"failed: {failure.type.__name__}"))

        self.use()

        def used(result: object) -> object:
            # (After the caller's own first steps with the answer: a blob's
            # link is written as its response comes.)
            self._clock.callLater(0, self.release)
            return result

        return (
            self._request(method, path, scope, headers, follow_redirects, any_origin)
            .addBoth(used).addErrback(unusable)
        )

    def use(self) -> None:
        """Something that may write what this registry shows under names is under way."""
        self._uses += 1

    def release(self) -> None:
        self._uses -= 1
        if self._uses == 0 and self._when_unused:
            waiting, self._when_unused = self._when_unused, []
            for then in waiting:
                then()

    def retire(self, then: Callable[[], object]) -> None:
        """
        A reload pointed this registry's id at another URL: call C{then}
        once nothing begun here is left to write under the id's names
        (at once if nothing is).
        """
        if self._uses == 0:
            then()
        else:
            self._when_unused.append(then)

    @inlineCallbacks
    def _request(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, list[str]] | None,
        follow_redirects: bool,
        any_origin: bool,
    ) -> Any:
        url = self.url_for(path)
        sent_with = self._authorization_for(url, scope)
        response = yield self._send(method, url, scope, headers)
        if response.code == 401:
            challenges = response.headers.getRawHeaders("www-authenticate", [])
            discard_body(response)
            now_with = self._authorization_for(url, scope)
            if now_with is not None and now_with != sent_with:
                # Another request got a token (or found Basic) meanwhile.
                retry = True
            else:
                retry = yield self._answer_challenge(challenges, scope)
            if retry:
                response = yield self._send(method, url, scope, headers)
        if response.code == 401:
            self._refused(scope, response)
        redirects = 0
        while follow_redirects and response.code in REDIRECT_CODES:
            location = response.headers.getRawHeaders("location", [None])[0]
            if not location or redirects >= MAX_REDIRECTS:
                break
            try:
                target = urljoin(url, location)
                target_origin = origin(target)
                if "\\" in target or "@" in urlsplit(target).netloc:
                    # Credentials of its own (shown back in an error), or a
                    # backslash, which parsers read as different hosts.
                    raise ValueError("a redirect to a URL with user information or a backslash")
            except ValueError:
                discard_body(response)  # (unread, it would hold its connection)
                raise
            if not any_origin and target_origin != origin(self.registry.url) and target_origin[0] != "https":
                log.warn("upstream {registry} {method} {path}: not following a redirect to another host over plain HTTP",
                         registry=self.registry.id, method=method, path=path)
                break
            discard_body(response)
            redirects += 1
            url = target
            # Only a POST may turn into a GET on a 301/302/303; a HEAD stays one.
            if method in ("GET", "HEAD") or response.code in (307, 308):
                next_method = method
            else:
                next_method = "GET"
            response = yield self._send(next_method, url, scope, headers)
        return response

    # -- authentication ----------------------------------------------------

    def _authorization_for(self, url: str, scope: str) -> str | None:
        # Credentials go only to the registry's own origin: never to a CDN or
        # presigned-URL host it redirects to.
        if origin(url) != origin(self.registry.url):
            return None
        cached = self._tokens.get(scope)
        if cached is not None:
            if cached.expires_at > self._clock.seconds():
                return f"Bearer {cached.token}"
            del self._tokens[scope]
        if self._basic and self.registry.auth is not None:
            return self._basic_header()
        return None

    def _refused(self, scope: str, response: IResponse) -> None:
        """
        The registry refused what was sent with a 401 (even after a
        challenge was answered, or with none to answer): a token of its is
        not sent again (revoked, or expired before its time: it was kept as
        long as it said, up to a day, and every request for what the cache
        lacks was refused), and credentials it refuses are worth a warning.
        (A 403 is a token that is good, for other things.)
        """
        sent = getattr(response, "_cargobay_authorization", None)
        cached = self._tokens.get(scope)
        if cached is not None and sent == f"Bearer {cached.token}":
            del self._tokens[scope]
        if sent is not None and sent.startswith("Basic "):
            self._auth_failed(f"refused the configured credentials (answered {response.code})")

    def _auth_failed(self, what: str, counted: bool = False) -> None:
        """
        Tell the operator (a warning, once a minute per kind of failure, and
        C{cargobay_upstream_errors_total{kind="auth"}}, unless C{counted}
        as a 5xx already) that the registry or its token service refused
        cargobay's credentials or failed to give a token: the client's 403
        or 502 alone reads as a client's problem.
        """
        if self._metrics is not None and not counted:
            self._metrics.upstream_errors.inc(1, self.registry.id, "auth")
        if self._auth_warned.due(what, self._clock.seconds()) is not None:
            log.warn("upstream {registry} {what}", registry=self.registry.id, what=what)

    def _basic_header(self) -> str:
        assert self.registry.auth is not None
        pair = f"{self.registry.auth.username}:{self.registry.auth.password}"
        return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")

    @inlineCallbacks
    def _answer_challenge(self, challenges: list[str], scope: str) -> Any:
        """
        Work out how to answer a 401, fetching a token if need be.  Fires with
        C{True} when a retry may succeed.
        """
        bearer = find_challenge(challenges, "bearer")
        if bearer is not None and bearer.realm:
            yield self._token(scope, bearer)
            return True
        if find_challenge(challenges, "basic") is not None and self.registry.auth is not None:
            self._basic = True
            return True
        return False

    def _token(self, scope: str, challenge: Challenge) -> Deferred[str]:
        return shared(self._pending_tokens, scope, lambda: self._fetch_token(scope, challenge))

    @inlineCallbacks
    def _fetch_token(self, scope: str, challenge: Challenge) -> Any:
        realm = challenge.realm
        assert realm is not None
        if urlsplit(realm).scheme not in ("http", "https"):
            raise UpstreamError(self.error(502, "UNAVAILABLE", f"gave an unusable token realm {realm!r}"))
        if (
            self.registry.auth is not None
            and urlsplit(realm).scheme == "http"
            and urlsplit(self.registry.url).scheme == "https"
        ):
            # Its credentials, asked for over HTTPS, would go out in clear.
            raise UpstreamError(
                self.error(502, "UNAVAILABLE", "names a plain-HTTP token realm; the credentials in the config are not sent there")
            )
        query = []
        if challenge.service:
            query.append(("service", challenge.service))
        query.append(("scope", scope))
        # What else the challenge names (containerd asks for it too): a
        # registry's own scope, not a repository's (this one's other
        # actions, push; another's, which the credentials were not given for).
        for named in (challenge.scope or "").split():
            if not named.startswith("repository:") and ("scope", named) not in query:
                query.append(("scope", named))
        headers = Headers()
        if self.registry.auth is not None:
            headers.setRawHeaders("authorization", [self._basic_header()])
        target = realm + ("&" if "?" in realm else "?") + urlencode(query)
        if self._metrics is not None:
            self._metrics.token_fetches.inc(1, self.registry.id)
        try:
            response = yield self._http.request(
                "GET",
                target,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
                timeout=self.registry.read_timeout,
            )
            body = yield read_body(response, 1024 * 1024, self._clock, self.registry.read_timeout)
        except Exception as e:
            failure = Failure(e)
            error = self._network_error(failure, f"token service at {urlsplit(target).netloc}")
            if self._metrics is not None:
                self._metrics.upstream_errors.inc(1, self.registry.id, "timeout" if error.status == 504 else "network")
            if error.status != 503 and not is_tls_failure(failure):
                # Every request that needs a token would wait for it as long.
                self._token_service_unreachable(error)
            raise UpstreamError(error) from None
        if response.code >= 500 or response.code == 429:
            if self._metrics is not None:
                self._metrics.upstream_errors.inc(1, self.registry.id, "status")
        if response.code in (401, 403):
            if self.registry.auth is not None:
                what = f"refused cargobay's credentials (token service answered {response.code})"
            else:
                what = f"wants credentials, and the config gives none (token service answered {response.code})"
            self._auth_failed(what)
            raise UpstreamError(self.error(403, "DENIED", what))
        if response.code != 200:
            what = f"token service answered {response.code}"
            self._auth_failed(what, counted=response.code >= 500 or response.code == 429)
            raise UpstreamError(self.error(502, "UNAVAILABLE", what))
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
            # (What a header may carry: a NUL or a space in it went out as it was.)
            if not isinstance(token, str) or not token or not _TOKEN_CHARACTERS.fullmatch(token):
                raise ValueError("no token")
            if len(token) > MAX_UPSTREAM_TOKEN:
                raise UpstreamError(self.error(
                    502, "UNAVAILABLE", f"token service answered a token over {MAX_UPSTREAM_TOKEN // 1024} KiB"
                ))
            lifetime = document.get("expires_in", DEFAULT_TOKEN_LIFETIME)
            # (NaN, which JSON parsing takes, passes no comparison: such a
            # token was never used; a 400-digit integer overflowed a float.)
            if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime < math.inf:
                lifetime = DEFAULT_TOKEN_LIFETIME
            lifetime = float(min(lifetime, MAX_TOKEN_LIFETIME))
        except (ValueError, AttributeError, RecursionError):
            what = "token service answered something that is not a token"
            self._auth_failed(what)
            raise UpstreamError(self.error(502, "UNAVAILABLE", what)) from None
        now = self._clock.seconds()
        expires_at = now + max(lifetime - TOKEN_EXPIRY_MARGIN, lifetime / 2)
        if len(self._tokens) >= MAX_CACHED_TOKENS:
            # One per repository name: a mirror of Docker Hub sees many.
            # The expired go first; if none has, the oldest.
            for stale in [s for s, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[stale]
            while len(self._tokens) >= MAX_CACHED_TOKENS:
                del self._tokens[next(iter(self._tokens))]
        self._tokens[scope] = _CachedToken(token, expires_at)
        if self._token_service_down_until:
            log.info("upstream {registry}'s token service answers again", registry=self.registry.id)
            self._token_service_down_until = 0.0
        log.debug("fetched a token for {registry} {scope}", registry=self.registry.id, scope=scope)
        return token

    # -- sending -----------------------------------------------------------

    @inlineCallbacks
    def _send(
        self,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, list[str]] | None,
    ) -> Any:
        outgoing = Headers({k: list(v) for k, v in (headers or {}).items()})
        outgoing.setRawHeaders("user-agent", ["cargobay"])
        authorization = self._authorization_for(url, scope)
        if authorization is not None:
            outgoing.setRawHeaders("authorization", [authorization])
        started = self._clock.seconds()
        try:
            response = yield self._http.request(
                method,
                url,
                headers=outgoing,
                allow_redirects=False,
                unbuffered=True,
                timeout=self.registry.read_timeout,
            )
        except Exception as e:
            failure = Failure(e)
            if (
                failure_within(failure, defer.CancelledError) is not None
                and self._clock.seconds() - started < self.registry.read_timeout * 0.99
            ):
                # Not our timeout: the caller gave up (its client left).  That
                # says nothing of the upstream.
                raise defer.CancelledError() from None
            error = self._network_error(failure, url)
            if self._metrics is not None:
                kind = "timeout" if error.status == 504 else "network"
                self._metrics.upstream_errors.inc(1, self.registry.id, kind)
            # (A registry failing TLS answers, only not as it should; a CDN
            # it redirects to is not the registry.)
            # (Nor is a 503: cargobay out of descriptors.)
            # (Nor is a URL that cannot be used: the registry was not asked.)
            if (
                error.status != 503
                and not is_tls_failure(failure)
                and not failure.check(ValueError, UnicodeError)
                and origin(url) == origin(self.registry.url)
            ):
                self._unreachable(error)
            raise UpstreamError(error) from None
        # (What discard_body gives a body that stops coming.)
        response._cargobay_idle = (self._clock, self.registry.read_timeout)
        response._cargobay_authorization = authorization
        if origin(url) == origin(self.registry.url):
            self._reached()
        if self._metrics is not None:
            self._metrics.upstream_latency.observe(self._clock.seconds() - started, self.registry.id)
            if response.code >= 500 or response.code == 429:
                self._metrics.upstream_errors.inc(1, self.registry.id, "status")
        return response

    def bad_content(self, what: str, message: str) -> RegistryError:
        """
        The upstream answered, with something wrong (not what the digest
        says, not JSON, not a manifest): the operator hears of it (a warning,
        C{cargobay_upstream_errors_total{kind="content"}}), the client gets
        a 502 naming the registry.
        """
        log.warn("upstream {registry} {what} {message}; nothing cached",
                 registry=self.registry.id, what=what, message=message)
        if self._metrics is not None:
            self._metrics.upstream_errors.inc(1, self.registry.id, "content")
        return self.error(502, "UNAVAILABLE", message)

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> RegistryError:
        """An OCI error naming this registry, for the client."""
        return RegistryError(
            status,
            code,
            f"upstream registry {self.registry.id!r} {message}",
            {"registry": self.registry.id},
            headers,
        )

    def _network_error(self, failure: Failure, what: str) -> RegistryError:
        # (Never what comes before an "@": credentials.)
        host = urlsplit(what).netloc.rpartition("@")[2] if "://" in what else what
        if failure_within(failure, defer.CancelledError, netError.TimeoutError, defer.TimeoutError):
            return self.error(504, "UNAVAILABLE", f"timed out ({host})")
        if _out_of_descriptors(failure):
            return self.error(
                503, "UNAVAILABLE", "could not be asked: cargobay is out of open files (raise its limit)",
                headers={"Retry-After": "1"},
            )
        too_large = failure_within(failure, ResponseHeadTooLarge)
        if too_large is not None:
            return self.error(502, "UNAVAILABLE", f"sent {too_large.value} ({host})")
        refused = failure_within(failure, InternalAddressRefused)
        if refused is not None:
            return self.error(502, "UNAVAILABLE", str(refused.value))
        proxy = failure_within(failure, ProxyError)
        if proxy is not None:
            return self.error(502, "UNAVAILABLE", f"could not be reached: {proxy.value} ({host})")
        if failure.check(netError.DNSLookupError):
            return self.error(502, "UNAVAILABLE", f"host not found ({host})")
        if failure.check(netError.ConnectionRefusedError):
            return self.error(502, "UNAVAILABLE", f"refused the connection ({host})")
        if failure.check(netError.ConnectError):
            return self.error(502, "UNAVAILABLE", f"is unreachable ({host})")
        if is_tls_failure(failure):
            return self.error(502, "UNAVAILABLE", f"failed TLS verification ({host})")
        if failure.check(UnicodeError):
            # (treq's URLs take no IPv6 address literal, in a redirect, say.)
            return self.error(502, "UNAVAILABLE", f"sent cargobay to a URL it cannot use ({host})")
        return self.error(502, "UNAVAILABLE", f"failed: {failure.type.__name__} ({host})")




def shared(pending: dict[Any, list[Deferred[Any]]], key: Any, start: Callable[[], Deferred[Any]]) -> Deferred[Any]:
    """
    The result of C{start()}, one call for all who ask for C{key} while it
    runs (C{pending} holds who waits for what).
    """
    d: Deferred[Any] = Deferred()
    waiting = pending.get(key)
    if waiting is not None:
        waiting.append(d)
        return d
    pending[key] = [d]

    def settle(result: object) -> None:
        for each in pending.pop(key, []):
            if isinstance(result, Failure):
                each.errback(result)
            else:
                each.callback(result)

    start().addBoth(settle)
    return d


def map_status(upstream: Upstream, response: IResponse, not_found: RegistryError) -> RegistryError:
    """
    The error a client gets for an upstream answer that is not a success.
    """
    code = response.code
    if code == 404:
        return not_found
    if code in (401, 403):
        return upstream.error(
            403, "DENIED",
            f"refused access (answered {code}): the repository may not exist there, or the credentials "
            "in the config may not reach it"
        )
    if code == 429:
        headers = {}
        retry_after = _retry_after(response.headers.getRawHeaders("retry-after", [None])[0])
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return upstream.error(429, "TOOMANYREQUESTS", "is rate limiting requests", headers)
    if code in REDIRECT_CODES:
        return upstream.error(502, "UNAVAILABLE", f"redirected too often, to another host or without a location ({code})")
    if code == 504:
        return upstream.error(504, "UNAVAILABLE", "timed out (answered 504)")
    return upstream.error(502, "UNAVAILABLE", f"answered {code}")


def _out_of_descriptors(failure: Failure) -> bool:
    """Whether a connection failed for want of file descriptors here (not the upstream's doing)."""
    found = failure_within(failure, netError.ConnectError, netError.DNSLookupError)
    if found is None:
        return False
    if getattr(found.value, "osError", None) in (errno.EMFILE, errno.ENFILE):
        return True
    # A name's lookup that failed for want of one says only that it found
    # nothing (getaddrinfo's EAI_SYSTEM): ask whether one can be had now.
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError as e:
        return e.errno in (errno.EMFILE, errno.ENFILE)
    return False


def _retry_after(value: str | None) -> str | None:
    """An upstream's Retry-After, if it is one (seconds, or an HTTP date); else dropped."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return value
    if len(value) <= 64 and value.isascii() and value.isprintable():
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return value
    return None
