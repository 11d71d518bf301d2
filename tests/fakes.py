"""
In-memory stand-ins for fast unit tests: a programmable upstream registry
served through treq's RequestTraversalAgent.  Integration tests use the real
CNCF registry instead (see peers.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from treq.testing import RequestTraversalAgent
from twisted.web.resource import Resource

from cargobay.cache import BlobCache, BlobKey
from cargobay.config import RegistryConfig, UpstreamAuth
from cargobay.metrics import Metrics
from cargobay.reference import Digest
from cargobay.upstream import Upstream


@dataclass
class Seen:
    method: str
    url: str
    headers: dict[str, list[str]]

    @property
    def authorization(self) -> str | None:
        values = self.headers.get("authorization")
        return values[0] if values else None


Handler = Callable[[object], bytes]


class FakeRegistry(Resource):
    """
    Every request is recorded, then answered by the first handler whose
    (method, path prefix) matches.  Handlers get the twisted Request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.handlers: list[tuple[str, str, Handler]] = []

    def on(self, method: str, prefix: str, handler: Handler) -> None:
        self.handlers.insert(0, (method, prefix, handler))

    def render(self, request):  # type: ignore[no-untyped-def]
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        url = request.uri.decode()
        host = (request.getHeader(b"host") or b"").decode()
        self.seen.append(Seen(request.method.decode(), f"{host}{url}", headers))
        for method, prefix, handler in self.handlers:
            if request.method.decode() == method and request.path.decode().startswith(prefix):
                return handler(request)
        request.setResponseCode(404)
        return b'{"errors":[{"code":"NAME_UNKNOWN","message":"x"}]}'

    def requests(self, path_prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if path_prefix in s.url]


def answering(status: int, **headers: bytes) -> Handler:
    """A handler that answers C{status} with C{headers} (Retry_After is Retry-After) and no body."""

    def handler(request):  # type: ignore[no-untyped-def]
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name.replace("_", "-").encode(), value)
        return b""

    return handler


def bearer_protected(registry: FakeRegistry, realm: str, valid: str, body: Handler) -> Handler:
    def handler(request):  # type: ignore[no-untyped-def]
        if request.getHeader(b"authorization") != f"Bearer {valid}".encode():
            request.setResponseCode(401)
            request.setHeader(
                b"WWW-Authenticate",
                f'Bearer realm="{realm}",service="fake",scope="repository:x:pull"'.encode(),
            )
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}'
        return body(request)

    return handler


def token_handler(token: str, expires_in: int = 300, user: str | None = None, password: str | None = None) -> Handler:
    def handler(request):  # type: ignore[no-untyped-def]
        if user is not None:
            expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if request.getHeader(b"authorization") != expected.encode():
                request.setResponseCode(401)
                return b"{}"
        return json.dumps({"token": token, "expires_in": expires_in}).encode()

    return handler


def make_upstream(
    registry: FakeRegistry,
    reactor: object,
    url: str = "http://upstream.test",
    auth: UpstreamAuth | None = None,
    read_timeout: float = 30.0,
    metrics: Metrics | None = None,
) -> Upstream:
    config = RegistryConfig(id="up", url=url, auth=auth, read_timeout=read_timeout)
    return Upstream(config, reactor, agent=RequestTraversalAgent(registry), metrics=metrics)


@dataclass
class Recorder:
    calls: list[str] = field(default_factory=list)


def cache_by_hand(cache: BlobCache, data: bytes, registry: str = "up") -> BlobKey:
    """Make C{data} an entry of C{cache}, as a finished download would; returns its key."""
    key = BlobKey(registry, Digest("sha256", hashlib.sha256(data).hexdigest()))
    writer = cache.begin(key)
    assert writer is not None
    writer.write_raw(data)
    writer.wrote(len(data))
    assert writer.commit() is not None
    return key
