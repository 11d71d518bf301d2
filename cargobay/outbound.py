"""
Reaching upstream registries through an outbound HTTP proxy, as set in the
environment (C{HTTPS_PROXY}, C{HTTP_PROXY}, C{ALL_PROXY}, C{NO_PROXY}, in
either case), which the earlier implementation's HTTP client honoured too.

An C{https} registry is reached through a C{CONNECT} tunnel, with TLS (and
its verification against the registry's name) end to end: the proxy sees
neither credentials nor content.  A plain-C{http} one is asked through the
proxy with absolute request targets, as proxies expect for HTTP (many allow
C{CONNECT} to port 443 only).

Loopback addresses are not proxied unless C{NO_PROXY} is set: a C{NO_PROXY}
you set replaces that default.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from cargobay.errors import failure_within, is_tls_failure

#: The most of a proxy's answer to CONNECT that is read.
MAX_CONNECT_ANSWER = 16 * 1024
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


class ProxyError(netError.ConnectError):
    """The outbound proxy did not open the tunnel (its status line says why)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "outbound proxy failed"


@dataclass(frozen=True)
class OutboundProxy:
    host: str
    port: int
    #: C{Proxy-Authorization}, from the URL's user and password.
    authorization: bytes | None = None
    #: An C{https://} proxy: spoken to over TLS (verified against its name
    #: with the system's trust store, which C{SSL_CERT_FILE} can replace).
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> OutboundProxy:
        """
        C{http://} or C{https://[user:password@]host[:port]} (a bare
        C{host:port} too, as C{http}).

        @raise ValueError: naming what is wrong (never echoing a password).
        """
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"only http:// and https:// proxies are supported, not {parts.scheme}://")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError("its port is not a number") from None
        if not parts.hostname:
            raise ValueError("it names no host")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = b"Basic " + base64.b64encode(pair.encode("utf-8"))
        return cls(parts.hostname, port, authorization, parts.scheme == "https")

    def endpoint(self, reactor: Any, timeout: float) -> IStreamClientEndpoint:
        """Where to connect to reach this proxy."""
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
        return endpoint


class ProxySettings:
    """Which proxy, if any, a URL of an upstream is reached through."""

    def __init__(self, proxies: Mapping[str, OutboundProxy], no_proxy: str | None) -> None:
        self._proxies = dict(proxies)
        self._no_proxy = no_proxy

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProxySettings:
        """
        @raise ValueError: for a proxy variable that is not a usable URL.
        """
        environ = os.environ if environ is None else environ

        def variable(name: str) -> str | None:
            value = environ.get(name.lower())
            if value is None:
                value = environ.get(name.upper())
            return value.strip() if value is not None and value.strip() else None

        proxies = {}
        every = variable("all_proxy")
        for scheme in ("http", "https"):
            own = variable(f"{scheme}_proxy")
            value, name = (own, f"{scheme.upper()}_PROXY") if own is not None else (every, "ALL_PROXY")
            if value is not None:
                try:
                    proxies[scheme] = OutboundProxy.parse(value)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        no_proxy = environ.get("no_proxy", environ.get("NO_PROXY"))
        return cls(proxies, no_proxy)

    @property
    def any(self) -> bool:
        return bool(self._proxies)

    def for_uri(self, scheme: str, host: str) -> OutboundProxy | None:
        proxy = self._proxies.get(scheme)
        if proxy is None or self._bypassed(host.lower().strip("[]")):
            return None
        return proxy

    def _bypassed(self, host: str) -> bool:
        if self._no_proxy is None:
            return _is_loopback(host)
        for entry in self._no_proxy.replace(" ", ",").split(","):
            entry = entry.strip().lower()
            if not entry:
                continue
            if entry == "*":
                return True
            if "/" in entry:
                try:
                    if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            if entry.startswith("["):
                entry = entry[1:].partition("]")[0]  # "[fd00::5]:5000", as Go takes it: any port
            elif entry.count(":") == 1:
                entry = entry.split(":")[0]  # a port: any port of that host
            if _same_address(host, entry):
                return True
            # ".corp.example" and "*.corp.example" (Go's form) as "corp.example".
            entry = entry.removeprefix("*").lstrip(".")
            if host == entry or host.endswith("." + entry):
                return True
        return False


def _same_address(host: str, entry: str) -> bool:
    """Whether both are IP addresses, and the same one however written (fd00:0::5 is fd00::5)."""
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(entry)
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Tunnel(Protocol):
    """
    Asks the proxy for a C{CONNECT} tunnel, then carries the protocol of the
    connection through it (the TLS of the upstream's, under C{https}).
    """

    def __init__(self, target: bytes, authorization: bytes | None, factory: IProtocolFactory,
                 opened: Deferred[Any], name: str = "") -> None:
        self._name = name
        self._target = target
        self._authorization = authorization
        self._factory = factory
        self._opened: Deferred[Any] | None = opened
        self._answer = b""
        self._inner: Any = None

    @property
    def _transport(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        lines = [b"CONNECT " + self._target + b" HTTP/1.1", b"Host: " + self._target]
        if self._authorization is not None:
            lines.append(b"Proxy-Authorization: " + self._authorization)
        self._transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._answer) > MAX_CONNECT_ANSWER:
                self._refused("sent an endless answer to CONNECT")
            return
        head, rest = self._answer[:end], self._answer[end + 4 :]
        self._answer = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
            self._refused(f"answered CONNECT with {status_line[:100]!r}")
            return
        inner = self._factory.buildProtocol(self._transport.getPeer())
        if inner is None:
            self._refused("had its tunnel refused by the connection's own factory")
            return
        self._inner = inner
        inner.makeConnection(self._transport)
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.callback(inner)
        if rest and self._inner is not None:
            self._inner.dataReceived(rest)

    def give_up(self) -> None:
        """The connection's user gave up waiting (it fails the wait itself)."""
        self._opened = None
        self._transport.abortConnection()

    def _refused(self, why: str) -> None:
        opened, self._opened = self._opened, None
        self._transport.abortConnection()
        if opened is not None:
            opened.errback(Failure(ProxyError(string=f"outbound proxy {why}")))

    def connectionLost(self, reason: Failure = netError.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self._inner is not None:
            self._inner.connectionLost(reason)
            return
        opened, self._opened = self._opened, None
        if opened is not None:
            why = "closed the connection before the tunnel opened"
            if is_tls_failure(reason):
                why = f"{self._name} failed TLS verification"
            opened.errback(Failure(ProxyError(string=f"outbound proxy {why}")))


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """An endpoint to C{host:port} through a C{CONNECT} tunnel of C{proxy}."""

    def __init__(self, reactor: Any, proxy: OutboundProxy, host: str, port: int, timeout: float) -> None:
        self._proxy_endpoint = proxy.endpoint(reactor, timeout)
        self._proxy_name = f"{proxy.host}:{proxy.port}"
        self._authorization = proxy.authorization
        self._target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        connecting: Deferred[Any] | None = None
        tunnel: list[_Tunnel] = []

        def cancel(d: Deferred[Any]) -> None:
            if tunnel and tunnel[0].transport is not None:
                tunnel[0].give_up()
            elif connecting is not None:
                connecting.cancel()

        opened: Deferred[Any] = Deferred(cancel)

        def build() -> _Tunnel:
            protocol = _Tunnel(self._target.encode("ascii"), self._authorization, factory, opened, self._proxy_name)
            tunnel.append(protocol)
            return protocol

        def failed(failure: Failure) -> None:
            if not opened.called:
                opened.errback(_blame_the_proxy(failure, self._proxy_name))

        tunnels = Factory.forProtocol(build)  # type: ignore[arg-type]
        tunnels.noisy = False
        connecting = self._proxy_endpoint.connect(tunnels)
        connecting.addErrback(failed)
        return opened


@implementer(IAgent)
class OutboundAgent:
    """
    The agent of an upstream: C{direct} for what is not proxied (and for
    C{https} through a proxy, whose tunnel the endpoints make), plain
    C{http} through a proxy with absolute request targets.
    """

    def __init__(self, reactor: Any, direct: IAgent, settings: ProxySettings,
                 pool: webclient.HTTPConnectionPool | None, timeout: float) -> None:
        self._reactor = reactor
        self._direct = direct
        self._settings = settings
        self._pool = pool
        self._timeout = timeout
        self._forwarding: dict[OutboundProxy, webclient.ProxyAgent] = {}

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[Any]:
        parsed = URI.fromBytes(uri)
        proxy = None
        if parsed.scheme == b"http":
            proxy = self._settings.for_uri("http", parsed.host.decode("ascii", "replace"))
        if proxy is None:
            return self._direct.request(method, uri, headers, bodyProducer)
        agent = self._forwarding.get(proxy)
        if agent is None:
            endpoint = proxy.endpoint(self._reactor, self._timeout)
            agent = self._forwarding[proxy] = webclient.ProxyAgent(endpoint, self._reactor, self._pool)
        headers = headers.copy() if headers is not None else Headers()
        if proxy.authorization is not None:
            headers.setRawHeaders(b"proxy-authorization", [proxy.authorization])
        name = f"{proxy.host}:{proxy.port}"
        return agent.request(method, uri, headers, bodyProducer).addErrback(_blame_the_proxy, name)


def _blame_the_proxy(failure: Failure, name: str) -> Failure:
    """A connection that failed on the way to the proxy is the proxy's failure, not the registry's."""
    if failure.check(ProxyError, CancelledError):
        return failure
    if is_tls_failure(failure):
        # (Only the proxy's TLS comes here: a registry's is inside a tunnel.)
        return Failure(ProxyError(string=f"outbound proxy {name} failed TLS verification"))
    found = failure_within(failure, netError.ConnectError, netError.DNSLookupError)
    if found is None:
        return failure
    reason = found.value.__class__.__name__
    if found.check(netError.ConnectionRefusedError):
        reason = "refused the connection"
    elif found.check(netError.DNSLookupError):
        reason = "was not found"
    elif found.check(netError.TimeoutError):
        reason = "did not answer in time"
    return Failure(ProxyError(string=f"outbound proxy {name} {reason}"))
