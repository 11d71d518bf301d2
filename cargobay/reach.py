"""
Where a registry may send cargobay: the hosts its redirects (blob downloads
from a CDN or a presigned URL) and its token realm name are connected to
only at addresses no more internal than the registry's own.

A registry on the internet that redirects a download to 169.254.169.254 (a
cloud's metadata service), to 127.0.0.1 or to a private network would have
cargobay fetch that service and stream it to the client: only the digest of
the whole body is checked, at its end.  So an address on a loopback,
link-local or private network is taken only when the registry itself was
reached at one of the same kind (an on-premise registry that redirects to
its object store on the same network, a registry on localhost in
development).  Names are checked as they resolve, before any connection,
so that a name that resolves to an internal address is refused as an
internal address is.  Through an outbound proxy the proxy resolves and
connects, and decides.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import error as netError
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

PUBLIC, PRIVATE, LOOPBACK, LINK_LOCAL = "public", "private", "loopback", "link-local"


class InternalAddressRefused(netError.ConnectError):
    """A registry sent cargobay to an address more internal than its own."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "internal address refused"


def kind_of(host: str) -> str:
    """What kind of network an IP address is on."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:  # (0.0.0.0 reaches this host)
        return LOOPBACK
    if ip.is_link_local:
        return LINK_LOCAL
    if ip.is_global:
        return PUBLIC
    return PRIVATE


class Reach:
    """
    The kinds of address one registry was reached at, and so where its
    redirects and token realm may go.
    """

    def __init__(self) -> None:
        self.registry_kinds: set[str] = set()

    def seen(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if host is not None:
            self.registry_kinds.add(kind_of(host))

    def allows(self, address: IAddress) -> bool:
        host = getattr(address, "host", None)
        if host is None:
            return False
        kind = kind_of(host)
        return kind == PUBLIC or kind in self.registry_kinds

    def registry_endpoint(self, reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        """
        To the registry itself: the address it was reached at is noted (not
        every address its name resolves to: one name with an internal
        address beside its public one would open the inside).
        """
        return _Noting(HostnameEndpoint(reactor, host, port, timeout=timeout), self)

    def elsewhere_endpoint(
        self, reactor: Any, host: str, port: int, timeout: float, registry: str
    ) -> IStreamClientEndpoint:
        """To a host the registry sent us to: only at addresses it allows."""
        refused: list[IAddress] = []
        endpoint = HostnameEndpoint(_Resolving(reactor, self.allows, refused), host, port, timeout=timeout)
        return _Guarded(endpoint, refused, host, registry)


@implementer(IReactorPluggableNameResolver)
class _Resolving:
    """A reactor whose name resolution keeps only the addresses C{keep} takes."""

    def __init__(self, reactor: Any, keep: Any, refused: list[IAddress]) -> None:
        self._reactor = reactor
        self.nameResolver = _Filter(reactor.nameResolver, keep, refused)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IHostnameResolver)
class _Filter:
    def __init__(self, resolver: IHostnameResolver, keep: Any, refused: list[IAddress]) -> None:
        self._resolver = resolver
        self._keep = keep
        self._refused = refused

    def resolveHostName(
        self, resolutionReceiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
        addressTypes: Any = None, transportSemantics: str = "TCP",
    ) -> IHostResolution:
        keep, refused = self._keep, self._refused

        @implementer(IResolutionReceiver)
        class Receiver:
            @staticmethod
            def resolutionBegan(resolution: IHostResolution) -> None:
                resolutionReceiver.resolutionBegan(resolution)

            @staticmethod
            def addressResolved(address: IAddress) -> None:
                if keep(address):
                    resolutionReceiver.addressResolved(address)
                else:
                    refused.append(address)

            @staticmethod
            def resolutionComplete() -> None:
                resolutionReceiver.resolutionComplete()

        return self._resolver.resolveHostName(Receiver(), hostName, portNumber, addressTypes, transportSemantics)


@implementer(IStreamClientEndpoint)
class _Noting:
    """Notes the kind of address each connection reached."""

    def __init__(self, endpoint: IStreamClientEndpoint, reach: Reach) -> None:
        self._endpoint = endpoint
        self._reach = reach

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        def connected(protocol: Any) -> Any:
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                self._reach.seen(transport.getPeer())
            return protocol

        return self._endpoint.connect(protocolFactory).addCallback(connected)


@implementer(IStreamClientEndpoint)
class _Guarded:
    """Says why, when every address of the host was refused."""

    def __init__(self, endpoint: IStreamClientEndpoint, refused: list[IAddress], host: str, registry: str) -> None:
        self._endpoint = endpoint
        self._refused = refused
        self._host = host
        self._registry = registry

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        del self._refused[:]

        def failed(failure: Failure) -> Failure:
            if self._refused and failure.check(netError.DNSLookupError):
                address = getattr(self._refused[0], "host", "?")
                kind = kind_of(address)
                log.warn(
                    "upstream {registry} sent cargobay to {host} ({address}, a {kind} address) but was not "
                    "reached at a {kind} address itself: refused",
                    registry=self._registry, host=self._host, address=address, kind=kind,
                )
                return Failure(InternalAddressRefused(string=f"sent cargobay to a {kind} address ({self._host}): refused"))
            return failure

        return self._endpoint.connect(protocolFactory).addErrback(failed)
