"""
The registry's HTTP surface (Klein): the OCI pull API, the token endpoint,
and read-only refusals.  Knows HTTP; hands the work to the manifest and blob
services and the upstream clients.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, cast
from urllib.parse import parse_qsl, unquote_to_bytes, urlencode, urlsplit

from klein import Klein
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from cargobay.auth import Authenticator
from cargobay.blobs import BlobService, abort_request, none_match, when_counted
from cargobay.config import Config
from cargobay.errors import (
    RegistryError,
    denied,
    digest_invalid,
    manifest_invalid,
    name_invalid,
    name_unknown,
    pagination_invalid,
)
from cargobay.logs import field_value
from cargobay.manifests import ManifestService, accept_headers, paginate, valid_media_type
from cargobay.mapping import Mapper, Resolved
from cargobay.metrics import Metrics
from cargobay.reference import Digest, InvalidDigest, is_valid_name, is_valid_tag
from cargobay.tokens import Grant
from cargobay.upstream import Upstream

log = Logger()
audit = Logger(namespace="cargobay.audit")

_ROUTE_LABELS = {"manifests": "manifest", "blobs": "blob", "tags": "tags", "referrers": "referrers"}
WRITE_METHODS = (b"POST", b"PUT", b"PATCH", b"DELETE")
STALE_WARNING = b'110 cargobay "Response is stale: upstream unavailable"'
READ_METHODS = (b"GET", b"HEAD")
#: Methods the request counter names; any other counts as "other", so that
#: made-up methods cannot grow the metrics without end.
_METHOD_LABELS = frozenset((*READ_METHODS, *WRITE_METHODS, b"OPTIONS"))
#: A page size: ASCII digits only (str.isdigit() also takes "²").
_COUNT = re.compile(r"[0-9]+")
#: A larger C{n} asks for everything: it is taken as this.
MAX_COUNT = 999_999_999
#: Longest request path considered; longer ones cannot hold a valid name.
MAX_PATH = 2048
API_VERSION = (b"Docker-Distribution-API-Version", b"registry/2.0")


@dataclass(frozen=True)
class Target:
    """
    What a registry request is about, once parsed and validated.
    """

    kind: str  # "manifests", "blobs", "tags", "referrers"
    name: str
    argument: str  # reference, digest, or "" for tags


#: The catalog's path, and the scope a token for it names (distribution's).
CATALOG = "/v2/_catalog"
CATALOG_SCOPE = "registry:catalog:*"


def _count(request: Request) -> int | None:
    """A listing's C{n}: how many entries at most."""
    n_values = _args(request).get(b"n")
    if not n_values:
        return None
    text = n_values[0].decode("utf-8", "replace")
    if not _COUNT.fullmatch(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise pagination_invalid(f"n must be a non-negative integer, got {shown!r}")
    return MAX_COUNT if len(text.lstrip("0")) > len(str(MAX_COUNT)) else min(int(text), MAX_COUNT)


def parse_target(path: str) -> Target | None:
    """
    Split C{/v2/<name>/<kind>/<argument>}.  Names contain slashes, so the
    route is recognised from the end.  Returns L{None} for an unknown route.
    """
    if not path.startswith("/v2/"):
        return None
    parts = path[len("/v2/") :].split("/")
    if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
        return Target("tags", "/".join(parts[:-2]), "")
    if len(parts) >= 3 and parts[-2] in ("manifests", "blobs", "referrers"):
        return Target(parts[-2], "/".join(parts[:-2]), parts[-1])
    return None


class RegistryApp:
    app = Klein()

    def __init__(
        self,
        config: Config,
        authenticator: Authenticator,
        upstreams: dict[str, Upstream],
        blobs: BlobService,
        manifests: ManifestService,
        metrics: Metrics | None = None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.metrics = metrics
        #: As started: a reload changes the listeners only at the next
        #: restart, so /metrics stays where (and as) it was.
        self.metrics_config = config.metrics
        self._ready = ready
        self.authenticator = authenticator
        self.upstreams = upstreams
        self.blobs = blobs
        self.manifests = manifests
        self.mapper = Mapper(config)

    def reconfigure(self, config: Config, authenticator: Authenticator, upstreams: dict[str, Upstream]) -> None:
        """
        Switch to a reloaded config.  Requests in progress keep the objects
        they already hold.
        """
        self.config = config
        self.authenticator = authenticator
        self.upstreams = upstreams
        self.mapper = Mapper(config)

    def resource(self) -> Any:
        return _PathGuard(self.app.resource(), lambda: self.config.server.public_url)

    # -- routes ------------------------------------------------------------

    @app.route("/v2", branch=True, strict_slashes=False)
    def registry(self, request: Request) -> Any:
        request.setHeader(*API_VERSION)
        self._observe(request, "base")
        method = request.method
        if method in WRITE_METHODS:
            raise denied("cargobay is a read-only pull-through cache: pushes and deletes are refused")
        raw_path = request.path
        if len(raw_path) > MAX_PATH:
            raise name_invalid(raw_path[:100].decode("latin-1"))
        # As distribution does: "sha256%3A..." is "sha256:...".  (No name or
        # reference holds a "%", and _PathGuard let only UTF-8 through.)
        path = unquote_to_bytes(raw_path).decode("latin-1")
        target = parse_target(path) if path not in ("/v2", "/v2/") else None
        allowed = (b"GET",) if target is not None and target.kind in ("tags", "referrers") else READ_METHODS
        if method not in allowed:
            raise _not_allowed(allowed)
        scope = f"repository:{target.name}:pull" if target is not None and is_valid_name(target.name) else None
        if path == CATALOG:
            scope = CATALOG_SCOPE
        grant = self.authenticator.authenticate(request, scope)
        request.grant = grant  # type: ignore[attr-defined]
        if path in ("/v2", "/v2/"):
            return _json(request, b"{}")
        if path == CATALOG:
            request.route_label = "catalog"  # type: ignore[attr-defined]
            return self._catalog(request, grant)
        if target is None:
            raise RegistryError(404, "UNSUPPORTED", "no such registry endpoint", {"path": path[:200]})
        if not is_valid_name(target.name):
            raise name_invalid(target.name)
        self.authenticator.authorize(request, grant, target.name)
        ns_values = _args(request).get(b"ns")
        ns = ns_values[0].decode("latin-1") if ns_values else None
        mapping = self.mapper.resolve(target.name, ns)
        if mapping is None:
            raise name_unknown(target.name)
        if not is_valid_name(mapping.upstream_name):
            raise name_invalid(target.name)
        upstream = self.upstreams[mapping.registry_id]
        head = method == b"HEAD"
        request.route_label = _ROUTE_LABELS[target.kind]  # type: ignore[attr-defined]
        if target.kind in ("blobs", "referrers"):
            digest = _digest(target.argument)  # (a bad one answers here: before use())
        if target.kind == "blobs":
            self._audit_when_done(request, grant, mapping, str(digest))
        # While it runs, what it learns of names is this upstream's (a reload
        # that points the registry's id elsewhere waits for it to forget).
        upstream.use()
        if target.kind == "manifests":
            answered = maybeDeferred(self._manifest, request, grant, mapping, upstream, target.argument, head)
        elif target.kind == "blobs":
            answered = maybeDeferred(self.blobs.serve, request, upstream, mapping.upstream_name, digest, head)
        elif target.kind == "tags":
            answered = maybeDeferred(self._tags, request, mapping, upstream, ns)
        else:
            answered = maybeDeferred(self._referrers, request, mapping, upstream, digest, ns)

        def done(result: object) -> object:
            upstream.release()
            return result

        return answered.addBoth(done)

    @app.route("/token", methods=["GET", "POST"])
    def token(self, request: Request) -> Any:
        """
        The Docker token endpoint: Basic credentials (password = the user's
        JWT) on GET, or the OAuth2 password / refresh_token grant on POST.
        """
        _exact_method(request, b"/token")
        request.setHeader(*API_VERSION)
        self._observe(request, "token")
        if request.method == b"POST":
            pairs = parse_qsl(cast(IO[bytes], request.content).read(65536).decode("utf-8", "replace"))
            form = dict(pairs)
            grant_type = form.get("grant_type")
            if grant_type == "password":
                secret = form.get("password", "")
            elif grant_type == "refresh_token":
                secret = form.get("refresh_token", "")
            else:
                raise RegistryError(400, "UNSUPPORTED", "unsupported grant_type")
            with _basic_challenge(self.authenticator.service):
                grant = self.authenticator.verify(request, secret)
            request.grant = grant  # type: ignore[attr-defined]
            # Every scope field counts, as every scope parameter does on GET.
            scopes = [value for key, value in pairs if key == "scope"]
            answer = self.authenticator.issue(grant, scopes)
            answer["refresh_token"] = self.authenticator.refresh_token(grant)
        else:
            with _basic_challenge(self.authenticator.service):
                grant = self.authenticator.authenticate(request)
            request.grant = grant  # type: ignore[attr-defined]
            scopes = [v.decode("utf-8", "replace") for v in _args(request).get(b"scope", [])]
            answer = self.authenticator.issue(grant, scopes)
            if _args(request).get(b"offline_token", [b""])[0].lower() == b"true":
                # docker login asks for one to keep instead of the password.
                answer["refresh_token"] = self.authenticator.refresh_token(grant)
        request.setHeader(b"Cache-Control", b"no-store")
        return _json(request, json.dumps(answer).encode())

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> Any:
        """
        The process is up (no auth: for orchestrators' probes).
        """
        _exact_method(request, b"/healthz")
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok\n"

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: Request) -> Any:
        """
        Ready to serve: the config is loaded (it is, or we would not run) and
        the cache directory is writable.
        """
        _exact_method(request, b"/readyz")
        request.setHeader(b"Content-Type", b"text/plain")
        if not self._ready():
            request.setResponseCode(503)
            return b"cache directory not writable\n"
        return b"ok\n"

    @app.route("/", branch=True)
    def elsewhere(self, request: Request) -> Any:
        metrics_config = self.metrics_config
        if (
            self.metrics is not None
            and metrics_config.enabled
            and metrics_config.listen is None
            and request.path == metrics_config.path.encode()
        ):
            return self.render_metrics(request)
        request.setHeader(*API_VERSION)
        allowed = _ALLOWED.get(request.path)
        if allowed is not None:
            raise _not_allowed(allowed)
        raise RegistryError(404, "UNSUPPORTED", "not a registry endpoint")

    @app.handle_errors(RegistryError)  # type: ignore[arg-type]
    def registry_error(self, request: Request, failure: Failure) -> Any:
        error: RegistryError = failure.value  # type: ignore[assignment]
        if request.startedWriting:  # type: ignore[attr-defined]
            abort_request(request)
            return b""
        return _answer_error(request, error)

    @app.handle_errors(HTTPException)  # type: ignore[arg-type]
    def routing_error(self, request: Request, failure: Failure) -> Any:
        # Werkzeug's own answers (no route matched, method not allowed) as
        # OCI errors.
        code = getattr(failure.value, "code", 404) or 404
        if code == 405:
            return _answer_error(request, _not_allowed(_ALLOWED.get(request.path, READ_METHODS)))
        request.setResponseCode(code)
        request.setHeader(*API_VERSION)
        return _json(request, RegistryError(code, "UNSUPPORTED", "not a registry endpoint").body())

    @app.handle_errors(Exception)  # type: ignore[arg-type]
    def unexpected_error(self, request: Request, failure: Failure) -> Any:
        log.failure("unexpected error answering {path}", failure, path=request.path[:200])
        if request.startedWriting:  # type: ignore[attr-defined]
            abort_request(request)
            return b""
        request.setResponseCode(500)
        request.setHeader(*API_VERSION)
        body = RegistryError(500, "UNKNOWN", "internal error").body()
        return _json(request, body)

    def render_metrics(self, request: Request) -> bytes:
        """/metrics, here or on a listener of its own."""
        assert self.metrics is not None
        if request.method not in READ_METHODS:
            return _answer_error(request, _not_allowed(READ_METHODS))
        if self.metrics_config.require_auth:
            try:
                self.authenticator.authenticate(request)
            except RegistryError as error:
                return _answer_error(request, error)
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()

    def _observe(self, request: Request, route: str) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        request.route_label = route  # type: ignore[attr-defined]

        def done(result: object) -> None:
            label = getattr(request, "route_label", route)
            method = request.method if request.method in _METHOD_LABELS else b"other"
            metrics.requests.inc(1, label, method.decode("ascii"), str(request.code))
            if label in ("manifest", "blob") and request.method == b"GET":
                status = getattr(request, "cache_status", None)
                source = "cache" if status in ("hit", "revalidated", "stale") else "upstream"
                when_counted(request, lambda: metrics.bytes_served.inc(request.sentLength, source))

        request.notifyFinish().addBoth(done)

    # -- handlers ----------------------------------------------------------

    @inlineCallbacks
    def _manifest(
        self,
        request: Request,
        grant: Grant,
        mapping: Resolved,
        upstream: Upstream,
        reference: str,
        head: bool,
    ) -> Any:
        if ":" in reference:
            reference = str(_digest(reference))
        elif not is_valid_tag(reference):
            raise manifest_invalid(f"invalid tag {reference[:150]!r}")
        self._audit_when_done(request, grant, mapping, reference)
        accept = accept_headers(request)
        answer = yield self.manifests.get(upstream, mapping.upstream_name, reference, accept, head)
        request.cache_status = answer.source  # type: ignore[attr-defined]
        if self.metrics is not None:
            self.metrics.cache_lookups.inc(1, "manifest", "miss" if answer.source == "miss" else "hit")
        if answer.source == "stale":
            request.setHeader(b"Warning", STALE_WARNING)
        media_type = valid_media_type(answer.media_type)
        if media_type:
            request.setHeader(b"Content-Type", media_type.encode("ascii"))
        request.setHeader(b"Docker-Content-Digest", str(answer.digest).encode())
        etag = f'"{answer.digest}"'
        request.setHeader(b"ETag", etag.encode())
        if none_match(request, etag, unquoted=True):
            request.setResponseCode(304)
            request.finish()
            return None
        if answer.length is not None:
            request.setHeader(b"Content-Length", str(answer.length).encode())
        if head or answer.content is None:
            request.finish()
            return None
        return _body(request, answer.content)

    def _catalog(self, request: Request, grant: Grant) -> bytes:
        """
        The repositories this token may pull, of those the config names one
        by one (a pattern's, C{hub/*}, are any name): lexical order, C{n}
        and C{last} as for tag lists.  With a mirror's C{?ns=}, those that
        name that registry's repository of the same name (what a pull with
        that C{ns} would reach).
        """
        args = _args(request)
        ns_values = args.get(b"ns")
        ns = ns_values[0].decode("latin-1") if ns_values else None
        names = [
            name for name in self.mapper.names()
            if grant.allows(name) and (not ns or self.mapper.resolve(name, ns) is not None)
        ]
        last_values = args.get(b"last")
        last = last_values[0].decode("latin-1") if last_values else None
        page, link = paginate(names, _count(request), last, CATALOG)
        _set_link(request, link, ns)
        return _json(request, json.dumps({"repositories": page}).encode())

    @inlineCallbacks
    def _tags(self, request: Request, mapping: Resolved, upstream: Upstream, ns: str | None) -> Any:
        n = _count(request)
        # "last" is a tag for most registries and an opaque cursor for some
        # (ECR); others (Quay) page with parameters of their own, which their
        # Link hands out: all of them go back to the upstream as they came.
        last = None
        cursor = []
        for key, text in _cursor(request, skip=(b"n", b"ns")):
            if key == "last":
                last = text if last is None else last
            else:
                cursor.append((key, text))
        body, link, stale = yield self.manifests.tags(
            upstream, mapping.local_name, mapping.upstream_name, n, last, cursor
        )
        if stale:
            request.setHeader(b"Warning", STALE_WARNING)
        _set_link(request, link, ns)
        return _json(request, body)

    @inlineCallbacks
    def _referrers(
        self, request: Request, mapping: Resolved, upstream: Upstream, digest: Digest, ns: str | None
    ) -> Any:
        artifact_values = _args(request).get(b"artifactType")
        artifact_type = artifact_values[0].decode("latin-1") if artifact_values else None
        if artifact_type is not None and (
            len(artifact_type) > 255 or not all(" " < c <= "~" for c in artifact_type)
        ):
            # (A media type is printable ASCII: anything else went upstream
            # encoded twice, its bytes read as latin-1 here.)
            raise RegistryError(400, "UNSUPPORTED", "invalid artifactType")
        # A registry that pages its referrers hands out the next page's
        # parameters in its Link: they go back to it as they came.
        cursor = _cursor(request, skip=(b"artifactType", b"ns"))
        body, content_type, filters, link, stale = yield self.manifests.referrers(
            upstream, mapping.local_name, mapping.upstream_name, digest, artifact_type, cursor
        )
        if stale:
            request.setHeader(b"Warning", STALE_WARNING)
        request.setHeader(b"Content-Type", content_type.encode("latin-1"))
        if filters:
            request.setHeader(b"OCI-Filters-Applied", filters.encode("latin-1"))
        _set_link(request, link, ns)
        request.setHeader(b"Content-Length", str(len(body)).encode())
        return _body(request, body)

    def _audit_when_done(
        self, request: Request, grant: Grant, mapping: Resolved, reference: str
    ) -> None:
        def record(result: object) -> object:
            when_counted(request, lambda: write(result))
            return None

        def write(result: object) -> None:
            audit.info(
                "pull subject={subject} repository={name} upstream={registry}/{upstream_name} "
                "reference={reference} status={status} bytes={sent} cache={cache} complete={complete}",
                subject=field_value(grant.subject, 200),
                name=mapping.local_name,
                registry=mapping.registry_id,
                upstream_name=mapping.upstream_name,
                reference=reference,
                status=request.code,  # type: ignore[attr-defined]
                sent=getattr(request, "sentLength", 0),
                cache=getattr(request, "cache_status", "-"),
                complete=not isinstance(result, Failure),
            )

        request.notifyFinish().addBoth(record)


class _PathGuard(resource.Resource):
    """
    Answers requests whose path Klein cannot decode (percent-encoded bytes
    that are not UTF-8) with an OCI error, before Klein turns them into an
    HTML page and a logged traceback.
    """

    isLeaf = True

    def __init__(self, inner: resource.Resource, public_url: Callable[[], str | None] = lambda: None) -> None:
        super().__init__()
        self._inner = inner
        self._public_url = public_url

    def render(self, request: Request) -> Any:
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1 or (not hosts and request.clientproto == b"HTTP/1.1"):
            # RFC 9112 3.2: an HTTP/1.1 request without Host is a 400, and any
            # with more than one (the token realm is built from it).
            request.setResponseCode(400)
            request.setHeader(*API_VERSION)
            return _json(request, RegistryError(400, "UNSUPPORTED", "not exactly one Host header").body())
        if hosts and not hosts[0].isascii():
            # No host name or address is anything but ASCII (Klein would log
            # a traceback decoding it, and answer an HTML page).
            request.setResponseCode(400)
            request.setHeader(*API_VERSION)
            return _json(request, RegistryError(400, "UNSUPPORTED", "a Host header that is not ASCII").body())
        if len(request.requestHeaders.getRawHeaders(b"authorization") or []) > 1:
            # One credential per request: a front proxy that checks the
            # first of two would let the second in.
            request.setResponseCode(400)
            request.setHeader(*API_VERSION)
            return _json(request, RegistryError(400, "UNSUPPORTED", "more than one Authorization header").body())
        if not request.path.startswith(b"/") and not _absolute_to_us(request, self._public_url()):
            # The absolute form is for forward proxies: served as a path
            # here, http://other-registry/v2/library/alpine/... would get
            # this proxy's library/alpine, quietly another image.
            request.setResponseCode(400)
            request.setHeader(*API_VERSION)
            message = "cargobay is a registry, not a forward proxy: the request target must be a path"
            return _json(request, RegistryError(400, "UNSUPPORTED", message).body())
        if not request.getHeader(b"host") and not hasattr(request.getHost(), "host"):
            # HTTP/1.0 without Host on a UNIX socket: Klein would ask the
            # listening address for a host name it does not have.
            request.requestHeaders.setRawHeaders(b"host", [b"localhost"])
        try:
            decoded = unquote_to_bytes(request.path).decode("utf-8")
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
                # Werkzeug's routes never match these; no name holds them.
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "control character")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(*API_VERSION)
            return _json(request, name_invalid(request.path[:100].decode("latin-1")).body())
        return self._inner.render(request)


def _absolute_to_us(request: Request, public_url: str | None) -> bool:
    """
    Whether an absolute-form request target names this server (its public
    URL, or the address and port the client reached): RFC 9112 3.2.2 has a
    server take those, with the target's authority in place of Host.  If
    so, the request becomes the origin form of the same target.
    """
    try:
        target = urlsplit(request.uri.decode("latin-1"))
        if target.scheme not in ("http", "https") or not target.hostname:
            return False
        port = target.port or (443 if target.scheme == "https" else 80)
    except ValueError:  # a port out of range, a bracketed host that is no address
        return False
    ours = {(str(getattr(request.getHost(), "host", "")), getattr(request.getHost(), "port", None))}
    ours |= {(name, getattr(request.getHost(), "port", None)) for name in ("localhost", socket.gethostname().lower())}
    if public_url:
        public = urlsplit(public_url)
        if public.hostname:
            ours.add((public.hostname, public.port or (443 if public.scheme == "https" else 80)))
    if (target.hostname, port) not in ours:
        return False
    path = (target.path or "/").encode("latin-1")
    request.path = path
    request.postpath = [unquote_to_bytes(part) for part in path[1:].split(b"/")]
    request.uri = path + (b"?" + target.query.encode("latin-1") if target.query else b"")
    request.requestHeaders.setRawHeaders(b"host", [target.netloc.encode("latin-1")])
    return True


#: The other routes, by the methods they answer (any other gets a 405).
_ALLOWED = {b"/token": (b"GET", b"POST"), b"/healthz": READ_METHODS, b"/readyz": READ_METHODS}


def _exact_method(request: Request, path: bytes) -> None:
    """
    Methods are case-sensitive (RFC 9110): Werkzeug's routing matched
    C{get} to a C{GET} route.
    """
    if request.method not in _ALLOWED[path]:
        raise _not_allowed(_ALLOWED[path])


def _not_allowed(methods: tuple[bytes, ...]) -> RegistryError:
    allow = ", ".join(m.decode("ascii") for m in methods)
    return RegistryError(405, "UNSUPPORTED", "method not allowed", headers={"Allow": allow})


@contextmanager
def _basic_challenge(realm: str) -> Iterator[None]:
    """
    The token endpoint takes a user's JWT as Basic credentials (or OAuth2's
    password): it challenges for those, not for a Bearer token, which a
    client would come back to this same endpoint to get.
    """
    try:
        yield
    except RegistryError as error:
        if error.status == 401:
            error.headers["WWW-Authenticate"] = f'Basic realm="{realm}"'
        raise


def _cursor(request: Request, skip: tuple[bytes, ...]) -> list[tuple[str, str]]:
    """The query parameters but C{skip}, to go back to the upstream as they came."""
    cursor = []
    for key, values in _args(request).items():
        if key in skip:
            continue
        for value in values:
            text = value.decode("latin-1")
            if len(key) > 64 or len(text) > 1024 or not all(" " <= c <= "~" for c in text):
                raise _bad_page(f"unusable query parameter {key[:64].decode('latin-1')!r}")
            cursor.append((key.decode("latin-1"), text))
    if len(cursor) > 9:
        raise _bad_page("too many query parameters")
    return cursor


def _set_link(request: Request, link: str | None, ns: str | None) -> None:
    """The next page's C{Link}: on the same registry as this page, when C{?ns=} chose it."""
    if not link:
        return
    if ns:
        end = link.find(">")
        separator = "&" if "?" in link[:end] else "?"
        link = link[:end] + separator + urlencode([("ns", ns)]) + link[end:]
    request.setHeader(b"Link", link.encode("latin-1"))


def _bad_page(reason: str) -> RegistryError:
    return RegistryError(400, "PAGINATION_NUMBER_INVALID", "invalid pagination parameter", reason)


def _args(request: Request) -> dict[bytes, list[bytes]]:
    return request.args or {}


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as e:
        raise digest_invalid(str(e)) from None


def _answer_error(request: Request, error: RegistryError) -> bytes:
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        if value.isascii() and value.isprintable():  # (never a 500 for a header)
            request.setHeader(name.encode(), value.encode("ascii"))
    request.setHeader(*API_VERSION)
    return _json(request, error.body())


def _json(request: Request, body: bytes) -> Any:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method == b"HEAD":
        return b""
    return _body(request, body)


#: A body longer than this (a large index, tag list or referrers list) goes
#: out a piece at a time as the client takes it: written whole, every
#: connection held a copy of what its client had not taken yet (100 clients
#: that read nothing of a 3.5 MB manifest: 330 MiB more).
STREAM_OVER = 256 * 1024
STREAM_PIECE = 64 * 1024


def _body(request: Request, body: bytes) -> Any:
    """C{body} for Klein to write, or a L{Deferred} that fires once it went a piece at a time."""
    if len(body) <= STREAM_OVER:
        return body
    return _PieceSender(request, body).done


@implementer(IPushProducer)
class _PieceSender:
    """Writes a body a piece at a time while its client's transport takes more."""

    def __init__(self, request: Request, body: bytes) -> None:
        self._request = request
        self._body = memoryview(body)
        self._at = 0
        self._paused = False
        self._stopped = False
        #: Fires once the body went; cancelled (Klein does) if the client leaves.
        self.done: Deferred[None] = Deferred(lambda _: None)
        request.registerProducer(self, True)
        self._send()

    def _send(self) -> None:
        while not self._paused and not self._stopped and self._at < len(self._body):
            piece = self._body[self._at : self._at + STREAM_PIECE]
            self._at += len(piece)
            self._request.write(bytes(piece))  # (may pause this, at once)
        if self._at >= len(self._body) and not self._stopped and not self.done.called:
            self._request.unregisterProducer()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._send()

    def stopProducing(self) -> None:
        self._stopped = True
