"""
A L{BlobService} in memory whose upstream answers are delivered by the test,
piece by piece: for what happens in the middle of a download (a disk that
fills up, a body longer than the cache).
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from cargobay.blobs import BlobService
from cargobay.cache import BlobCache, BlobKey
from cargobay.config import RegistryConfig
from cargobay.reference import Digest
from cargobay.upstream import Upstream


class Transport:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class Body:
    """An upstream response whose body the test sends piece by piece."""

    def __init__(self, code: int = 200, length: int | None = None) -> None:
        self.code = code
        self.length = length
        self.headers = Headers({})
        self.protocol: Any = None
        self.transport = Transport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


class Request(DummyRequest):
    """A client's request, as a push producer's consumer."""

    def __init__(self) -> None:
        super().__init__([b""])
        self.producer: Any = None
        self.startedWriting = False
        self.channel = None
        self.code = 200
        self.sentLength = 0

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = self.responseCode = code

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "producer already registered"
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        super().write(data)

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


class World:
    """A cache, the service, and the upstream GETs it made (C{requests})."""

    def __init__(self, tmp_path: Any, data: bytes, max_size: int = 10**9) -> None:
        self.clock = Clock()
        self.cache = BlobCache(str(tmp_path / "cache"), max_size, 3600, self.clock)
        self.cache.open()
        self.upstream = Upstream(RegistryConfig(id="up", url="http://upstream.test"), self.clock, agent=object())
        self.requests: list[SimpleNamespace] = []
        self.upstream.request = self._request  # type: ignore[method-assign]
        self.service = BlobService(self.cache, self.clock)
        self.data = data
        self.digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
        self.key = BlobKey("up", self.digest)

    def _request(
        self, method: str, path: str, scope: str, headers: Any = None, follow_redirects: bool = True, any_origin: bool = False
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append(SimpleNamespace(method=method, path=path, headers=headers, d=d))
        return d

    def get(self, range_: str | None = None) -> tuple[Request, list[Any]]:
        """A client's GET of the blob: its request, and what the service's Deferred gave."""
        request = Request()
        if range_ is not None:
            request.requestHeaders.setRawHeaders(b"range", [range_.encode()])
        outcome: list[Any] = []
        self.service.serve(request, self.upstream, "library/x", self.digest, head=False).addBoth(outcome.append)
        return request, outcome
