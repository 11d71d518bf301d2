"""
The C{twistd cargobay} plugin: options, and the service tree that runs the proxy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from cryptography.exceptions import UnsupportedAlgorithm
from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool
from twisted.web import http, resource, server
from zope.interface import implementer

from cargobay import healthcheck
from cargobay.auth import Authenticator
from cargobay.blobs import SEND_THREADS, BlobService, when_counted
from cargobay.cache import BlobCache, Entry
from cargobay.config import Config, ConfigError, load_config, resolve_config_path
from cargobay.errors import RegistryError, denied
from cargobay.links import RepositoryLinks
from cargobay.logs import field_value, make_observer, printable
from cargobay.manifest_store import ManifestStore
from cargobay.manifests import ManifestService
from cargobay.metrics import Metrics
from cargobay.outbound import ProxySettings
from cargobay.routes import WRITE_METHODS, RegistryApp
from cargobay.sweep import MetadataSweeper
from cargobay.tokens import mint_token
from cargobay.upstream import Upstream, ca_file_fingerprint

log = Logger()
access = Logger(namespace="cargobay.access")

#: The most a request line, or all of a request's headers, may take.
MAX_HEADERS_SIZE = 64 * 1024
#: How often a shutdown looks whether the requests under way have ended.
DRAIN_CHECK_EVERY = 0.05


def fail(message: str) -> None:
    """
    Stop before anything listens, with one line on stderr and a non-zero exit.
    """
    sys.stderr.write(f"cargobay: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


class Options(usage.Options):
    synopsis = "[--config FILE | --dev]"
    longdesc = (
        "Run the cargobay pull-through registry cache. The config file is --config, "
        "else $CONFIG_PATH, else config.toml."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML config file."],
    ]
    optFlags = [
        ["dev", None, "Start on the embedded development config when no config file exists."],
    ]

    def parseOptions(self, options: Any = None) -> None:
        # A mistake is one line on stderr, as a bad config is (twistd would
        # print the whole usage on stdout, then the error).
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            fail(f"{e} (see twistd cargobay --help)")

    def postOptions(self) -> None:
        # A SIGHUP from here until the service starts (reading the config,
        # the cache's scan: seconds) would end the process: kept for then.
        self.early_sighup = HeldSighup()
        path = resolve_config_path(self["config"])
        try:
            self.config = load_config(path, allow_embedded_default=bool(self["dev"]))
        except ConfigError as e:
            fail(str(e))
        from twisted.internet import reactor

        listeners = [("server.listen", self.config.server.endpoint)]
        if self.config.metrics.enabled and self.config.metrics.listen:
            listeners.append(("metrics.listen", self.config.metrics.listen))
        for key, description in listeners:
            problem = check_tls_files(description, time.time()).problem
            if problem is not None:
                fail(f"{key}: {problem}")
            try:
                # Parses the description (and loads TLS files) without listening.
                endpoints.serverFromString(reactor, description)
            except Exception as e:
                fail(f"{key}: {description!r} is not a usable endpoint ({e})")


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """What is wrong with a TLS listener's files, said in words (None: nothing)."""

    #: They cannot be used (unreadable, no PEM key or certificate, a passphrase).
    problem: str | None = None
    #: The certificate has expired.
    expired: str | None = None
    #: The certificate is not valid yet.
    early: str | None = None


def check_tls_files(description: str, now: float) -> TLSFiles:
    """
    For an C{ssl:} listener: what is wrong with its key and certificate
    files, naming the file (before OpenSSL's error list).  A key with a
    passphrase is refused here: OpenSSL would ask for it on the terminal,
    if any, and every request would wait for an answer.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        args, kwargs = endpoints._parse(description)
        if not args or args[0] != "ssl":
            return TLSFiles()
        # (As Twisted reads them: by name, or in order after the port.)
        given = inspect.signature(endpoints._parseSSL).bind(None, *args[1:], **kwargs)
    except Exception:  # (serverFromString says)
        return TLSFiles()
    given.apply_defaults()
    key_path = given.arguments["privateKey"]
    cert_path = given.arguments["certKey"] or key_path
    try:
        with open(key_path, "rb") as f:
            key_pem = f.read()
        with open(cert_path, "rb") as f:
            cert_pem = key_pem if cert_path == key_path else f.read()
    except OSError as e:
        return TLSFiles(f"cannot read TLS file {e.filename!r} ({e.strerror})")
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return TLSFiles(f"privateKey {key_path!r} is encrypted with a passphrase; cargobay takes an unencrypted key")
    except (ValueError, UnsupportedAlgorithm):
        return TLSFiles(f"privateKey {key_path!r} holds no PEM private key cargobay can use")
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        return TLSFiles(f"certKey {cert_path!r} holds no PEM certificate")
    if leaf.not_valid_after_utc.timestamp() < now:
        return TLSFiles(expired=f"the certificate in {cert_path!r} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc.timestamp() > now:
        return TLSFiles(early=f"the certificate in {cert_path!r} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return TLSFiles()


@implementer(IOpenSSLContextFactory)
class ReloadableTLS:
    """
    A TLS listener's context factory whose certificate can be replaced:
    each new connection asks for the context anew (Twisted's TLS layer
    calls C{getContext} per connection), so a renewed certificate is served
    from the next handshake on while connections already open keep theirs.
    """

    def __init__(self, current: Any) -> None:
        self.current = current

    def getContext(self) -> Any:
        return self.current.getContext()


#: How plain HTTP begins: a method (upper case) and a space.
_REQUEST_LINE = re.compile(rb"[A-Z]{3,10} ")


class _PlainHTTPGuardProtocol(ProtocolWrapper):
    """
    The first bytes on a TLS port: a TLS record goes on to the TLS layer;
    an HTTP request line is answered 400 naming the mistake (as nginx does),
    and the connection closed.
    """

    _first: bytes | None = b""

    def dataReceived(self, data: bytes) -> None:
        if self._first is not None:
            data = self._first + data
            if data[:1] != b"\x16" and len(data) < 11 and b" " not in data:
                self._first = data  # (a method and its space, before deciding)
                return
            self._first = None
            if _REQUEST_LINE.match(data) and self.transport is not None:
                transport = self.transport
                error = RegistryError(400, "UNSUPPORTED", "plain HTTP sent to an HTTPS port: use https://")
                method, _, rest = data.partition(b" ")
                answer_unparsed(transport, 400, "plain HTTP on an HTTPS port", error,
                                method=method, path=rest.split(b" ", 1)[0][:300])
                transport.loseConnection()
                return
        super().dataReceived(data)


class PlainHTTPGuard(WrappingFactory):
    protocol = _PlainHTTPGuardProtocol


class Listener(internet.StreamServerEndpointService):
    """
    A listening endpoint that, when it cannot listen (the port is taken, the
    address is not this host's, the socket's directory is missing), stops
    the start with one line rather than a traceback.  A TLS one re-reads its
    key and certificate files on L{reload_tls}.
    """

    def __init__(self, key: str, description: str, factory: Any, reactor: Any) -> None:
        endpoint = endpoints.serverFromString(reactor, description)
        super().__init__(endpoint, factory)
        self._key = key
        self._description = description
        self._reactor = reactor
        self._raiseSynchronously = True
        self._tls: ReloadableTLS | None = None
        if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
            self._tls = ReloadableTLS(endpoint._sslContextFactory)
            # TCP, then TLS by hand: plain HTTP sent to it is answered, not
            # cut without a word (ctr said "EOF", hiding a missing CA).
            self.endpoint = endpoints.TCP4ServerEndpoint(
                reactor, endpoint._port, endpoint._backlog, endpoint._interface
            )
            self.factory = PlainHTTPGuard(TLSMemoryBIOFactory(self._tls, False, factory))
            files = check_tls_files(description, time.time())
            if files.expired or files.early:
                log.error("{key}: {problem}: clients will refuse it", key=key, problem=files.expired or files.early)

    def reload_tls(self) -> None:
        """
        Read the key, certificate and chain files again (a renewed
        certificate, replaced in place) and serve them to new connections;
        files that do not make a working pair are logged and the ones in use stay.
        """
        if self._tls is None:
            return
        files = check_tls_files(self._description, time.time())
        if files.problem or files.expired:
            log.error("reload: {key}: keeping the TLS certificate in use: {problem}", key=self._key,
                      problem=files.problem or files.expired)
            return
        if files.early:
            # (A clock a little behind the issuer's: taken.)
            log.error("reload: {key}: {problem}: clients will refuse it until then", key=self._key, problem=files.early)
        try:
            fresh = endpoints.serverFromString(self._reactor, self._description)._sslContextFactory
            fresh.getContext()  # the key must match the certificate
        except Exception as e:
            log.error(
                "reload: {key}: keeping the TLS certificate in use, the files do not make a usable one ({problem})",
                key=self._key, problem=str(e) or type(e).__name__,
            )
            return
        self._tls.current = fresh
        log.info("reload: {key}: TLS key and certificate files re-read", key=self._key)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            fail(f"{self._key}: cannot listen on {self._description!r} ({e})")


class RegistryChannel(http.HTTPChannel):
    """
    HTTP/1.1 that refuses a TLS handshake on a plain-HTTP port at once.

    docker, podman and skopeo try HTTPS first on an insecure registry and
    fall back to HTTP when the handshake fails; a server that just waits for
    a request line makes each of them sit out a 10 s handshake timeout.
    """

    _first_bytes = True
    #: When the headers arriving must be in by, if some are.
    _header_deadline: Any = None
    #: Between a request's headers and the end of its body.
    _in_body = False
    #: Room for a JWT that names a few hundred repositories, sent as Basic
    #: credentials (a third longer); Twisted's default is 16 KiB for both.
    MAX_LENGTH = MAX_HEADERS_SIZE
    totalHeadersSize = MAX_HEADERS_SIZE

    def connectionMade(self) -> None:
        site = cast(ProxySite, self.factory)
        site.open_connections += 1
        self._counted = True
        if site.open_connections > site.max_connections:
            site.refused_connections += 1
            if self.transport is not None:
                answer_unparsed(self.transport, 503, "over server.max_connections", headers="Retry-After: 1\r\n")
                self.transport.loseConnection()
            return
        site.channels.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self._end_header_deadline()
        if getattr(self, "_counted", False):
            self._counted = False
            site = cast(ProxySite, self.factory)
            site.open_connections -= 1
            site.channels.discard(self)
        super().connectionLost(reason)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if cast(ProxySite, self.factory).draining:
            # Shutting down: this answer is the connection's last.
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    @property
    def busy(self) -> bool:
        """A request has begun on it (its line at least) and not ended."""
        return bool(self.requests)

    def close_when_idle(self) -> None:
        """Close now if idle, else once the request under way has ended."""
        self.persistent = False
        if not self.busy and self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._first_bytes:
            self._first_bytes = False
            if data[:1] == b"\x16" and self.transport is not None:  # a TLS record: handshake
                answer_unparsed(self.transport, 400, "a TLS handshake on a plain-HTTP port")
                self.transport.loseConnection()
                return
        if not self._handlingRequest and not self._in_body and self._header_deadline is None:
            # A client trickling a request's headers a byte at a time resets
            # the idle timeout forever, and one that stops halfway holds the
            # connection as long: the whole header block has a deadline.
            site = cast(ProxySite, self.factory)
            self._header_deadline = site.reactor.callLater(site.header_timeout, self._headers_too_slow)
        super().dataReceived(data)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport is not None:
            site = cast(ProxySite, self.factory)
            error = RegistryError(408, "UNSUPPORTED", f"request headers not in after {site.header_timeout:g} s")
            answer_unparsed(self.transport, 408, "request headers too slow", error)
            transport = cast(Any, self.transport)
            transport.loseConnection()
            # A client that does not read the answer either is cut.
            site.reactor.callLater(2.0, _abort_if_open, transport)

    def _end_header_deadline(self) -> None:
        if self._header_deadline is not None:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            self._header_deadline = None

    def allHeadersReceived(self) -> None:
        self._end_header_deadline()
        self._in_body = True  # what comes next is the request's body, if any
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._in_body = False
        super().allContentReceived()

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:  # type: ignore[attr-defined]
            self._too_large()
            return
        if getattr(self, "_HTTPChannel__first_line", False):
            self._request_line = line
        super().lineReceived(line)

    #: The request line under way, for the access line of one refused unparsed.
    _request_line = b""

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        What Twisted's parser refuses (a malformed request line or header,
        an unknown HTTP version, conflicting lengths, too many header
        fields) gets an OCI error and an access line, not a bare 400.
        """
        if self.transport is not None:
            method, _, rest = self._request_line.partition(b" ")
            path = rest.rpartition(b" ")[0] or rest
            if self._receivedHeaderCount > self.maxHeaders:
                status, message = 431, f"more than {self.maxHeaders} request header fields"
            else:
                status, message = 400, "malformed HTTP request"
            error = RegistryError(status, "UNSUPPORTED", message)
            answer_unparsed(self.transport, status, message, error, method[:16] or b"-", path or b"-")
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_large()

    def _too_large(self) -> None:
        """Say why, where Twisted would answer a bare 400 or just close."""
        if getattr(self, "_HTTPChannel__first_line", False):
            status, what = 414, "request line"
        else:
            status, what = 431, "request headers"
        if self.transport is not None:
            error = RegistryError(status, "UNSUPPORTED", f"{what} over {self.totalHeadersSize} bytes")
            answer_unparsed(self.transport, status, f"{what} too long", error)
        self.loseConnection()

    def _send100Continue(self) -> None:
        if self.requests and getattr(self.requests[-1], "body_refused", False):
            return  # answered already
        token = getattr(self, "_path", b"").split(b"?")[0] == b"/token"
        if self.requests and getattr(self, "_command", None) in WRITE_METHODS and not token:
            # A push waiting to be told to send its body: told no at once,
            # rather than to go on and then refused.
            cast(ProxyRequest, self.requests[-1])._refuse_body()
            return
        super()._send100Continue()  # type: ignore[misc]


def _abort_if_open(transport: Any) -> None:
    if getattr(transport, "connected", False) and not getattr(transport, "disconnected", False):
        transport.abortConnection()


#: The most of a request's body kept: every write is refused anyway, and a
#: token request's form is small.
MAX_REQUEST_BODY = 64 * 1024
#: Reason phrases that Twisted's table lacks ("Unknown Status" otherwise).
REASONS = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}


class ProxyRequest(server.Request):
    """
    A request whose body is kept in memory, and no more than
    L{MAX_REQUEST_BODY} of it.  Twisted's own spools a larger or chunked
    body to a temporary file before anything looks at the request: anyone,
    with no token, could fill the disk with a PUT that is refused anyway.
    """

    body_refused = False
    _body_size = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No body is read into args: /token reads its form itself, and a
        # malformed multipart one got Twisted's bare 400, not an OCI error.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # type: ignore[assignment]
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body()

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_refused:
            return
        self._body_size += len(data)
        if self._body_size > MAX_REQUEST_BODY:
            self._refuse_body()
            return
        cast(io.BytesIO, self.content).write(data)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        super().setResponseCode(code, message if message is not None else REASONS.get(code))

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body_refused:
            return  # answered already, and the connection is closing
        self.received = True
        # Nothing cargobay answers is for a browser to guess the type of.
        self.responseHeaders.setRawHeaders(b"X-Content-Type-Options", [b"nosniff"])
        super().requestReceived(command, path, version)

    received = False

    def connectionLost(self, reason: Any) -> None:
        # Twisted logs a request only as it finishes: one whose client left
        # (or was cut) before that has its access line here.
        cut = self.received and not self.finished
        factory = getattr(self.channel, "factory", None) if self.channel is not None else None
        super().connectionLost(reason)
        if cut and isinstance(factory, ProxySite):
            when_counted(self, lambda: factory.log(self, cut=True))

    def _refuse_body(self) -> None:
        """Answer now, before the body, and close the connection."""
        self.body_refused = True
        self.content = io.BytesIO()  # type: ignore[assignment]
        channel = cast(Any, self.channel)
        token = getattr(channel, "_path", b"").split(b"?")[0] == b"/token"
        if getattr(channel, "_command", None) in WRITE_METHODS and not token:
            error = denied("cargobay is a read-only pull-through cache: pushes and deletes are refused")
        else:
            error = RegistryError(413, "SIZE_INVALID", f"request body over {MAX_REQUEST_BODY} bytes")
        answer_unparsed(
            channel.transport, error.status, "request body refused before it was read", error,
            getattr(channel, "_command", b"-"), getattr(channel, "_path", b"-"),
        )
        channel.loseConnection()


def answer_unparsed(
    transport: Any, status: int, why: str, error: RegistryError | None = None,
    method: bytes = b"-", path: bytes = b"-", headers: str = "",
) -> None:
    """
    Answer before a request is whole (its body, headers or line refused, or
    the connection itself), with C{error}'s body if given, and write the
    access line that no L{server.Request} will: the connection closes after.
    """
    body = error.body() if error is not None else b""
    reason = (REASONS.get(status) or http.RESPONSES[status]).decode("ascii")
    kind = "Content-Type: application/json\r\n" if body else ""
    transport.write(
        f"HTTP/1.1 {status} {reason}\r\n{kind}{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        .encode("ascii") + body
    )
    client = transport.getPeer()
    access.info(
        "{client} {method} {path} {status} 0 subject=- agent=- ({why})",
        client=getattr(client, "host", "-"),
        method=printable(method.decode("latin-1"), 10),
        path=printable(path.decode("latin-1")),
        status=status,
        why=why,
    )


def until_none_left(
    reactor: Any, left: Callable[[], int], deadline: float, cut_short: Callable[[], bool], cut: Callable[[int], None]
) -> Deferred[None]:
    """
    Fires once C{left()} is 0, asked every L{DRAIN_CHECK_EVERY} seconds; or
    at C{deadline}, or once C{cut_short()}, after C{cut} was told how many
    were left.
    """
    done: Deferred[None] = Deferred()

    def check() -> None:
        count = left()
        if count and (reactor.seconds() >= deadline or cut_short()):
            cut(count)
        elif count:
            reactor.callLater(DRAIN_CHECK_EVERY, check)
            return
        done.callback(None)

    check()
    return done


class ProxySite(server.Site):
    # Tracebacks never reach clients.
    displayTracebacks = False
    open_connections = 0
    refused_connections = 0
    max_connections = 10_000
    header_timeout = 30.0
    #: Set once shutdown begins: every answer from then on is its connection's last.
    draining = False
    #: Set by a second SIGTERM or SIGINT: the requests under way are cut now.
    cut_short = False
    # Plain HTTP/1.1 channels (no HTTP/2 negotiation wrapper).
    protocol = RegistryChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The client connections open (those over max_connections aside).
        self.channels: set[RegistryChannel] = set()

    def drain(self, grace: float) -> Deferred[None]:
        """
        Close idle connections, and each busy one once its request has
        ended; fires when none is left busy, or after C{grace} seconds.
        """
        self.draining = True
        for channel in list(self.channels):
            channel.close_when_idle()

        def busy() -> int:
            return sum(1 for channel in self.channels if channel.busy)

        def cut(count: int) -> None:
            log.warn(
                "shutting down with {count} requests still under way {why}; their connections are cut",
                count=count,
                why="at a second signal" if self.cut_short else f"after server.shutdown_grace_seconds ({grace:g} s)",
            )

        return until_none_left(self.reactor, busy, self.reactor.seconds() + grace, lambda: self.cut_short, cut)

    def log(self, request: http.Request, cut: bool = False) -> None:
        """
        One access log line per request, naming the token's subject (never
        the token itself); C{cut}: the connection was lost before it ended.
        """
        grant = getattr(request, "grant", None)
        client = request.getClientAddress()
        access.info(
            "{client} {method} {path} {status} {bytes} subject={subject} agent={agent}"
            + (" (cut: the connection was lost before the response ended)" if cut else ""),
            client=getattr(client, "host", "-"),
            method=printable(request.method.decode("latin-1"), 10),
            path=printable(request.uri.decode("latin-1")),
            # (Cut before any answer went: nginx's 499, "client closed request".)
            status=request.code if not cut or request.startedWriting else 499,
            bytes=request.sentLength,
            subject=field_value(grant.subject, 200) if grant is not None else "-",
            agent=printable((request.getHeader(b"user-agent") or b"-").decode("latin-1"), 120),
        )


class MetricsResource(resource.Resource):
    """
    /metrics, /healthz and /readyz on a listener of their own.
    """

    isLeaf = True

    def __init__(self, app: RegistryApp) -> None:
        super().__init__()
        self._app = app

    def render_GET(self, request: server.Request) -> bytes:
        if request.path == b"/healthz":
            return b"ok\n"
        if request.path == b"/readyz":
            if not self._app._ready():
                request.setResponseCode(503)
                return b"cache directory not writable\n"
            return b"ok\n"
        if request.path == self._app.metrics_config.path.encode() or request.path == b"/metrics":
            # As on the main listener, require_auth included.
            return self._app.render_metrics(request)
        request.setResponseCode(404)
        return b"not found\n"


class CalendarClock:
    """
    The reactor, telling calendar time: for what is stored and compared
    with file times, while what it schedules keeps the reactor's clock.
    """

    def __init__(self, reactor: Any) -> None:
        self.callLater = reactor.callLater

    @staticmethod
    def seconds() -> float:
        return time.time()


def _monotonic_timers(reactor: Any) -> None:
    """
    Have the reactor time its calls on the monotonic clock: on the calendar
    clock, an NTP step or a virtual machine's resume moves every timeout at
    once.  Forward, stall and idle timeouts fire on healthy downloads and
    connections; backward, a stalled upstream is waited for, and the cache
    left unevicted, for as long as the step.  Calls already scheduled are
    moved onto the new clock, due after the same delay.
    """
    if not hasattr(reactor, "getDelayedCalls") or getattr(reactor, "seconds", None) is time.monotonic:
        return
    calendar = reactor.seconds
    reactor.seconds = time.monotonic
    for call in reactor.getDelayedCalls():
        left = call.getTime() - calendar()
        call.seconds = time.monotonic
        call.reset(max(left, 0.0))


class Runtime:
    """
    Everything the running proxy is made of, built from a config; L{reload}
    swaps in a new config without dropping connections or the cache.
    """

    def __init__(self, config: Config, config_path: str | None, reactor: Any, wall_clock: Any = None) -> None:
        self.config = config
        #: The file the config comes from (None: the embedded development one).
        self.config_path = config_path
        self._reactor = reactor
        #: What stored times (blobs' last use, manifests' and tags' ages, the
        #: sweep's) are measured on: calendar time, as file times are.  The
        #: reactor's clock, which times out stalls, may be monotonic.
        wall = CalendarClock(reactor) if wall_clock is None else wall_clock
        try:
            #: Read once: the environment does not change under a process.
            self.proxies = ProxySettings.from_environment()
        except ValueError as e:
            fail(f"outbound proxy: {e}")
        self.metrics = metrics = Metrics()
        self.cache = cache = BlobCache(
            config.cache.directory,
            config.cache.max_size_bytes,
            config.cache.max_age_seconds,
            wall,
            config.cache.direct_writes,
        )
        cache.recheck_served = config.cache.scrub_bytes_per_interval > 0
        cache.open()
        links_directory = os.path.join(config.cache.directory, "links")
        # Until the upgrade below has run to its end, this file says so: a
        # process stopped midway (its first link made links/) goes on with it.
        unfinished = os.path.join(links_directory, UPGRADING)
        upgrading = not os.path.isdir(links_directory) or os.path.exists(unfinished)
        if upgrading:
            try:
                os.makedirs(links_directory, exist_ok=True)
                open(unfinished, "ab").close()
            except OSError:
                pass
        self.links = links = RepositoryLinks(links_directory)

        def evicted(entry: Entry) -> None:
            metrics.evictions.inc()
            links.forget(entry.key.registry_id, entry.key.digest)

        cache.on_evict = evicted
        self.store = store = ManifestStore(config.cache.directory, wall)
        store.touch_every = _touch_every(config.cache.max_age_seconds)
        self.manifests = ManifestService(
            store, wall, config.cache.tag_ttl_seconds, links, config.cache.revalidate_wait_seconds
        )
        self.sweeper = MetadataSweeper(cache, store, links, links_directory, wall)
        self._notice_moved_registries(config)
        if upgrading:
            # A cache from before links were kept: what its tags resolve to
            # is linked to their names, and the rest stays servable while the
            # upstream cannot confirm it.
            for key in cache.keys():
                links.mark_legacy(key.registry_id, key.digest)
            self.manifests.mark_stored_legacy()
            linked = self.manifests.link_stored_tags()
            log.info("linked the manifests of {count} cached tags to their repositories", count=linked)
            try:
                os.unlink(unfinished)
            except OSError:
                pass
        # Hashing and writing downloads to disk happen on these threads.
        self.disk_threads = ThreadPool(minthreads=1, maxthreads=4, name="cargobay-disk")
        reactor.callWhenRunning(self.disk_threads.start)
        reactor.addSystemEventTrigger("during", "shutdown", self.disk_threads.stop)

        # Blob bodies go from cache files to clients' sockets on these, so
        # that many clients are served by every core, not the reactor's alone.
        self.send_threads = ThreadPool(minthreads=1, maxthreads=max(2, len(os.sched_getaffinity(0))), name="cargobay-send")
        reactor.callWhenRunning(self.send_threads.start)
        reactor.addSystemEventTrigger("during", "shutdown", self.send_threads.stop)

        def run_in_thread(function: Any, *args: Any) -> Any:
            return deferToThreadPool(reactor, self.disk_threads, function, *args)

        def send_in_thread(function: Any, *args: Any) -> Any:
            return deferToThreadPool(reactor, self.send_threads, function, *args)

        self.blobs = blobs = BlobService(
            cache,
            reactor,
            metrics,
            run_in_thread,
            reactor.callFromThread,
            config.cache.client_waits_for_disk,
            config.cache.leave_disk_after_seconds,
            send_in_thread if SEND_THREADS else None,
            links,
            config.server.send_timeout,
        )
        self.sweeper.downloading = blobs.downloading
        metrics.gauge("cargobay_cache_size_bytes", "Bytes of blobs in the cache.", lambda: cache.total_size)
        metrics.gauge("cargobay_cache_entries", "Blobs in the cache.", lambda: len(cache))
        metrics.gauge(
            "cargobay_cache_max_size_bytes", "The cache's size limit.", lambda: cache.max_size_bytes
        )
        metrics.counter(
            "cargobay_cache_write_errors_total",
            "Cache writes that failed (a file not created, written or moved into place): the blob was served "
            "without being cached.",
            lambda: cache.stats.write_errors,
        )
        metrics.gauge(
            "cargobay_upstream_fetches_in_flight", "Blob downloads from upstream in progress.", blobs.in_flight
        )
        self.app = RegistryApp(
            config,
            Authenticator.from_config(config.auth, config.server),
            self._upstreams(config, {}),
            blobs,
            self.manifests,
            metrics,
            cache.writable,
        )

    def _notice_moved_registries(self, config: Config, running: dict[str, Upstream] | None = None) -> None:
        """
        A registry id whose URL changed (in the config, since the cache last
        saw it) names another registry: what the old one showed under names
        (tags, links, tag lists, referrers) is forgotten, so that nothing it
        held is served under a name until the new registry shows it there.
        The URLs seen are kept in the cache's C{registries.json}.
        """
        seen = self.store.registry_urls()
        moved = {r.id: r.url for r in config.registries if seen.get(r.id, r.url) != r.url}
        for registry_id, url in moved.items():
            log.warn(
                "registry {id} now points at {url} (was {before}): what the cache holds of it is served "
                "under a name again once the new registry shows it there",
                id=registry_id, url=url, before=seen[registry_id],
            )
            self._forget_names_of(registry_id)
            old_upstream = (running or {}).get(registry_id)
            if old_upstream is not None:
                # What requests under way on the old one write under names
                # goes too, once they end.
                old_upstream.retire(partial(self._forget_names_of, registry_id))
        urls = {**seen, **{r.id: r.url for r in config.registries}}
        if urls != seen:
            self.store.set_registry_urls(urls)

    def _forget_names_of(self, registry_id: str) -> None:
        self.links.forget_registry(registry_id)
        self.store.forget_names(registry_id)

    def _upstreams(self, config: Config, previous: dict[str, Upstream]) -> dict[str, Upstream]:
        upstreams = {}
        for registry in config.registries:
            existing = previous.get(registry.id)
            if (
                existing is not None
                and existing.registry == registry
                and existing.ca_fingerprint == ca_file_fingerprint(registry.ca_file)
            ):
                # Unchanged (its CA file too, renewed in place or not): keep
                # its cached tokens and connections.
                upstreams[registry.id] = existing
            else:
                upstreams[registry.id] = Upstream(registry, self._reactor, metrics=self.metrics, proxies=self.proxies)
        return upstreams

    def reload(self) -> bool:
        """
        Re-read the config file.  A bad file is logged and the running config
        stays.  Returns whether the new config was applied.
        """
        if self.config_path is None:
            log.warn("reload: running on the embedded development config; nothing to re-read")
            return False
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: {problem}", problem=str(e))
            return False
        old = self.config
        previous = self.app.upstreams
        try:
            # Everything new is built before anything changes: a file that
            # fails here leaves the running config whole.
            upstreams = self._upstreams(config, previous)
            authenticator = Authenticator.from_config(config.auth, config.server)
        except Exception as e:
            log.error("reload refused, keeping the running config: {problem}", problem=f"{type(e).__name__}: {e}")
            return False
        for label, section, fields in RESTART_ONLY:
            if _settings(old, section, fields) != _settings(config, section, fields):
                log.warn("reload: {what} changed; it takes effect at the next restart", what=label)
        self.cache.max_size_bytes = config.cache.max_size_bytes
        self.cache.max_age_seconds = config.cache.max_age_seconds
        if (config.cache.max_size_bytes, config.cache.max_age_seconds) != (
            old.cache.max_size_bytes, old.cache.max_age_seconds
        ):
            self.cache.evict()  # now, not at the next timer run
        self.store.touch_every = _touch_every(config.cache.max_age_seconds)
        self.manifests.tag_ttl = config.cache.tag_ttl_seconds
        self.manifests.revalidate_wait = config.cache.revalidate_wait_seconds
        if (config.auth.jwt_secret, config.auth.previous_jwt_secrets) != (
            old.auth.jwt_secret, old.auth.previous_jwt_secrets
        ):
            _warn_of_a_weak_secret(config)
        _warn_of_config(config)
        # What waits for a restart runs as it was, and is compared with that
        # at the next reload: the store and links are the running directory's.
        config = _with_restart_only_settings_of(old, config)
        self._notice_moved_registries(config, previous)
        self.blobs.client_waits_for_disk = config.cache.client_waits_for_disk
        self.blobs.leave_disk_after = config.cache.leave_disk_after_seconds
        self.blobs.send_timeout = config.server.send_timeout
        self.cache.direct_writes = config.cache.direct_writes
        self.app.reconfigure(config, authenticator, upstreams)
        for registry_id, upstream in previous.items():
            if upstreams.get(registry_id) is not upstream:
                upstream.close()
        self.config = config
        log.info(
            "reloaded {source}: {count} repositories, {registries} registries",
            source=config.source,
            count=len(config.repositories),
            registries=len(config.registries),
        )
        return True


#: What a reload does not apply (the log says so): the label the log
#: names, the config's section, and its fields there (None: all of it).
RESTART_ONLY: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("server listen endpoint", "server", ("bind_address", "port", "listen")),
    ("server.max_connections", "server", ("max_connections",)),
    ("server.idle_timeout_seconds", "server", ("idle_timeout",)),
    ("server.header_timeout_seconds", "server", ("header_timeout",)),
    ("cache.directory", "cache", ("directory",)),
    ("cache.eviction_interval_seconds", "cache", ("eviction_interval_seconds",)),
    ("cache.scrub_bytes_per_interval", "cache", ("scrub_bytes_per_interval",)),
    ("metrics", "metrics", None),
    ("logging", "logging", None),
)


def _settings(config: Config, section: str, fields: tuple[str, ...] | None) -> object:
    table = getattr(config, section)
    return table if fields is None else tuple(getattr(table, name) for name in fields)


def _with_restart_only_settings_of(running: Config, new: Config) -> Config:
    """C{new}, with the settings of L{RESTART_ONLY} as C{running} has them."""
    for _, section, fields in RESTART_ONLY:
        kept = getattr(running, section)
        if fields is not None:
            kept = dataclasses.replace(getattr(new, section), **{name: getattr(kept, name) for name in fields})
        new = dataclasses.replace(new, **{section: kept})
    return new


def _warn_of_config(config: Config) -> None:
    for warning in config.warnings:
        log.warn("{source}: {warning}", source=config.source, warning=warning)


def _warn_of_a_weak_secret(config: Config) -> None:
    why = config.weak_secret()
    if why is not None:
        log.warn(
            "[auth] {why}: anyone who has it can mint tokens for every repository; set a long "
            "random one (openssl rand -hex 32), and keep the old one in previous_jwt_secrets while tokens move",
            why=why,
        )


def _announce_development(config: Config) -> None:
    token = mint_token(config.auth.jwt_secret, "developer", None, 24 * 3600)
    log.warn(
        "\n" + "!" * 78 + "\n"
        "  cargobay is running on its EMBEDDED DEVELOPMENT CONFIG with a PUBLIC secret.\n"
        "  Anyone can mint tokens for it. Never expose it; write a config.toml instead\n"
        "  (see config.example.toml).\n"
        "  A token valid for 24 hours, for every repository:\n\n"
        "    {token}\n\n"
        "  Try: curl -H 'Authorization: Bearer {token}' http://{where}/v2/alpine/tags/list\n"
        + "!" * 78,
        token=token,
        where=f"{config.server.bind_address}:{config.server.port}",
    )


#: The cache directories this process holds the lock of: their lock files, open.
_LOCKED: dict[str, int] = {}


#: In links/ while the links of a cache from before they were kept are made.
UPGRADING = ".upgrading"


def _lock_cache_directory(directory: str) -> None:
    """
    Hold C{<cache>/.lock} for as long as this process runs, or stop: two
    processes on one cache directory empty each other's downloads at start,
    count only their own entries (the disk then holds twice the limit) and
    download again what the other cached.  A directory that cannot be made
    is left to the cache, which serves uncached and says so.
    """
    import fcntl

    where = os.path.realpath(directory)
    if where in _LOCKED:
        return
    path = os.path.join(where, ".lock")
    try:
        os.makedirs(where, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        fail(f"cache.directory {directory} is in use by another cargobay process (pid {holder or 'unknown'})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKED[where] = fd


def _open_files_for(max_connections: int) -> None:
    """
    Raise the soft limit of open files (often 1024) towards the hard one, so
    that C{server.max_connections} clients fit: each holds a socket, and
    while it pulls a blob not cached yet, an upstream connection and a
    cache file too (and a sending thread's copy of its socket).  Beyond
    the limit, connections would be dropped without the 503 that
    C{max_connections} promises.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 4 * max_connections + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            if raised > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and soft < 3 * max_connections + 256:
        log.warn(
            "server.max_connections is {wanted} but this process may open only {limit} files: "
            "clients beyond about {fit} are dropped without an answer (raise the hard limit: "
            "ulimit -Hn, or LimitNOFILE= for systemd)",
            wanted=max_connections, limit=soft, fit=max(soft - 256, 0) // 3,
        )


#: glibc's mallopt(3) parameters, and what cargobay sets them to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = 32 * 1024 * 1024
MMAP_ABOVE = 4 * 1024 * 1024


def _reuse_freed_memory() -> bool:
    """
    Have glibc's malloc keep the memory blob bodies pass through for the
    next ones, rather than handing it back to the kernel and faulting fresh
    pages in for every read: each upstream read is a new buffer of up to a
    megabyte, above malloc's mmap threshold, so by default every byte of a
    download landed in a page the kernel had to clear first (on a virtual
    machine, the most expensive part of moving it).  Blocks under
    C{MMAP_ABOVE} come from the heap, and up to C{KEEP_FREED} free at its top
    stays mapped.  Returns whether the C library took both settings (not
    glibc: nothing to do).
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


def _touch_every(max_age: float) -> float:
    """How often a manifest or tag in use has that marked on disk: well within the age limit."""
    return min(3600.0, max_age / 8) if max_age > 0 else 3600.0


def _maintain(cache: BlobCache, scrub_bytes: int, sweeper: MetadataSweeper) -> None:
    # Periodic work logs its own failures: one exception would stop the timer for good.
    try:
        cache.evict().addErrback(lambda f: log.failure("eviction failed", f))
        swept = sweeper.maybe_run()
        if swept is not None:
            swept.addErrback(lambda f: log.failure("sweeping unused manifests and links failed", f))
        if scrub_bytes > 0:
            cache.scrub(scrub_bytes).addErrback(lambda f: log.failure("scrubbing failed", f))
    except Exception:
        log.failure("cache maintenance failed")


class CargobayService(service.MultiService):
    """
    The top service.  Installs cargobay's log observer (text or JSON, level
    filtered) on the application twistd puts it in, unless twistd was given
    a --logger of its own; reloads the config on SIGHUP.
    """

    def __init__(
        self, observer: ILogObserver | None, runtime: Runtime, reactor: Any, early_sighup: HeldSighup | None = None
    ) -> None:
        super().__init__()
        self._observer = observer
        self._runtime = runtime
        self._reactor = reactor
        self._previous_handler: Any = None
        self._early_sighup = early_sighup
        #: The sites whose requests under way a shutdown lets end.
        self.sites: list[ProxySite] = []
        #: Where this process says which listener answers /healthz.
        self._health_state: str | None = None

    def startService(self) -> None:
        super().startService()
        self._say_where_health_is_asked()
        previous = signal.signal(signal.SIGHUP, self._on_sighup)
        self._previous_handler = signal.SIG_DFL if isinstance(previous, HeldSighup) else previous
        if self._early_sighup is not None and self._early_sighup.asked:
            self._reactor.callLater(0, self.reload)

    def _say_where_health_is_asked(self) -> None:
        # For the image's HEALTHCHECK: the listeners run as they started
        # until a restart, whatever the config file says meanwhile.
        self._health_state = healthcheck.state_path(self._runtime.config_path)
        try:
            healthcheck.write_state(self._health_state, healthcheck.health_endpoint(self._runtime.config))
        except OSError as e:
            log.warn("cannot say where /healthz is asked in {path} ({problem}): the healthcheck reads the config",
                     path=self._health_state, problem=e.strerror or str(e))
            self._health_state = None

    def _forget_where_health_is_asked(self) -> None:
        path, self._health_state = self._health_state, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def stopService(self) -> Any:
        """
        Stop listening, then give the requests under way up to
        C{server.shutdown_grace_seconds} to end (idle connections are closed
        at once) before the reactor cuts what is left: a rolling restart
        does not break the pulls in progress.
        """
        self._forget_where_health_is_asked()
        if self._previous_handler is not None:
            # Not the default action (which ends the process) while requests
            # under way may still end: a reload is no longer worth doing.
            signal.signal(signal.SIGHUP, self._on_sighup_while_stopping)
            self._previous_handler = None
        grace = self._runtime.config.server.shutdown_grace

        def cut(signum: int, frame: Any) -> None:
            for site in self.sites:
                site.cut_short = True

        if threading.current_thread() is threading.main_thread():
            # A second Ctrl-C (or SIGTERM) does not wait for the grace to end.
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, cut)

        def drain(result: object) -> Any:
            deadline = self._reactor.seconds() + grace
            drained = DeferredList([site.drain(grace) for site in self.sites])
            return drained.addCallback(lambda _: self._downloads_ended(deadline)).addCallback(lambda _: result)

        return maybeDeferred(super().stopService).addCallback(drain)

    def _downloads_ended(self, deadline: float) -> Deferred[None]:
        """
        Fires once no blob download is under way, or at C{deadline}: a
        download whose clients are served may still be finishing its cache
        file (its last writes, fsync, rename), or filling it for the next
        pull; cut off, the file is thrown away at the next start.
        """
        def cut(count: int) -> None:
            log.warn("shutting down with {count} blob downloads still under way; not cached", count=count)

        return until_none_left(
            self._reactor, self._runtime.blobs.in_flight, deadline, lambda: any(site.cut_short for site in self.sites), cut
        )

    def _on_sighup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes: hand the work to the reactor.
        self._reactor.callFromThread(self.reload)

    def _on_sighup_while_stopping(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(log.info, "reload ignored: shutting down")

    def reload(self) -> None:
        """
        Re-read the config, and the TLS listeners' certificate files (those
        of the listeners as started: a changed C{listen} waits for a restart).
        """
        self._runtime.reload()
        for child in self:
            if isinstance(child, Listener):
                child.reload_tls()

    def setServiceParent(self, parent: Any) -> None:  # type: ignore[override]
        if (
            self._observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)


class HeldSighup:
    """
    The SIGHUP handler until the service starts: a SIGHUP is only noted,
    for a reload once it has.
    """

    def __init__(self) -> None:
        self.asked = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self)

    def __call__(self, signum: int, frame: Any) -> None:
        self.asked = True


def _log_stream(options: Options) -> Any:
    """
    Where twistd was told to log: its --logfile (or, daemonised, its default
    twistd.log), rotated as twistd's own; stdout with -n and no --logfile.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    logfile = parent.get("logfile")
    if not logfile and not parent.get("nodaemon"):
        logfile = "twistd.log"
    if not logfile or logfile == "-":
        return None
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile)  # twistd's own default rotation (1 MB)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config: Config = options.config
    config_path = None if config.source == "<embedded default>" else config.source
    early_sighup = getattr(options, "early_sighup", None)
    _lock_cache_directory(config.cache.directory)
    _monotonic_timers(reactor)
    runtime = Runtime(config, config_path, reactor)
    app, cache = runtime.app, runtime.cache
    parent = getattr(options, "parent", None)
    # With --syslog, twistd's own syslog observer (ours would write a file).
    observer = None if parent is not None and parent.get("syslog") else make_observer(
        config.logging.format, config.logging.level, _log_stream(options)
    )
    top = CargobayService(observer, runtime, reactor, early_sighup)
    site = ProxySite(app.resource(), timeout=config.server.idle_timeout)
    site.max_connections = config.server.max_connections
    site.header_timeout = config.server.header_timeout
    _open_files_for(config.server.max_connections)
    _reuse_freed_memory()
    runtime.metrics.gauge("cargobay_open_connections", "Client connections open.", lambda: site.open_connections)
    runtime.metrics.counter(
        "cargobay_refused_connections_total", "Connections refused over server.max_connections.",
        lambda: site.refused_connections,
    )
    Listener("server.listen", config.server.endpoint, site, reactor).setServiceParent(top)
    top.sites.append(site)
    if config.metrics.enabled and config.metrics.listen:
        metrics_site = ProxySite(MetricsResource(app))
        Listener("metrics.listen", config.metrics.listen, metrics_site, reactor).setServiceParent(top)
        top.sites.append(metrics_site)
    internet.TimerService(
        config.cache.eviction_interval_seconds, _maintain, cache, config.cache.scrub_bytes_per_interval, runtime.sweeper
    ).setServiceParent(top)
    log.info(
        "cargobay listening on {endpoint} with {count} repositories from {source}",
        endpoint=config.server.endpoint,
        count=len(config.repositories),
        source=config.source,
    )
    if config.uses_development_secret:
        _announce_development(config)
    else:
        _warn_of_a_weak_secret(config)
    _warn_of_config(config)
    return top

