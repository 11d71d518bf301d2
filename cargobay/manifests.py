"""
Manifests, tag lists and referrers: small JSON documents passed through from
the upstream byte for byte, with their digests checked.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from cargobay.errors import RegistryError, manifest_unknown, name_unknown
from cargobay.links import RepositoryLinks, referenced_digests, upstream_unavailable
from cargobay.logs import Throttle
from cargobay.manifest_store import (
    Manifest,
    ManifestStore,
    TagResolution,
    manifest_digest,
    manifest_document,
    manifest_matches,
    manifest_media_type,
    media_type_of,
    valid_media_type,
)
from cargobay.reference import Digest, InvalidDigest, is_valid_tag
from cargobay.upstream import SMALL_BODY_LIMIT, Upstream, discard_body, map_status, pull_scope, shared

log = Logger()

#: What to ask for when a client sends no Accept header: every current
#: manifest type, so that the upstream never down-converts to schema 1.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)



def accept_headers(request: Request) -> list[str]:
    values = request.requestHeaders.getRawHeaders(b"accept") or []
    accepted = [v.decode("latin-1") for v in values if v.strip()]
    if not accepted or _offered(accepted) <= {"*/*", ""}:
        # Anything will do: what is cached (a schema 1 manifest too), or
        # from the upstream the current types first.
        return [", ".join((*MANIFEST_MEDIA_TYPES, "*/*"))]
    return accepted


def _named(upstream_name: str, reference: str) -> str:
    """C{name:tag} or C{name@digest}, for the log."""
    return f"{upstream_name}{'@' if ':' in reference else ':'}{reference}"


def _bad_upstream(upstream: Upstream, message: str) -> RegistryError:
    return upstream.error(502, "UNAVAILABLE", message)


@inlineCallbacks
def _get_body(
    upstream: Upstream,
    path: str,
    upstream_name: str,
    not_found: RegistryError,
    what: str,
    headers: dict[str, list[str]] | None = None,
) -> Any:
    """GET a small document (C{what}) from the upstream.  Fires with (response, body)."""
    response = yield upstream.request("GET", path, pull_scope(upstream_name), headers=headers)
    if response.code != 200:
        discard_body(response)
        raise map_status(upstream, response, not_found)
    try:
        body = yield upstream.read_body(response)
    except Exception as e:
        raise _bad_upstream(upstream, f"failed while sending {what} ({type(e).__name__})") from None
    return response, body


@dataclass(frozen=True)
class ManifestAnswer:
    media_type: str
    digest: Digest
    length: int | None
    #: The bytes, for GET; None for HEAD.
    content: bytes | None
    #: "hit" (from the cache, fresh), "revalidated" (cache, confirmed upstream),
    #: "miss" (from upstream) or "stale" (cache, upstream failing).
    source: str


def acceptable(media_type: str, accept: list[str]) -> bool:
    """
    Whether a client's Accept headers admit C{media_type}.  As for a
    registry, an index must be named: "v2, */*" gets one platform's
    manifest (a bare "*/*" names them all, L{accept_headers}).
    """
    offered = _offered(accept)
    media_type = essence(media_type)
    return media_type in offered or ("*/*" in offered and media_type not in INDEX_MEDIA_TYPES)


def essence(media_type: str) -> str:
    """A media type without its parameters (quay.io adds "; charset=utf-8")."""
    return media_type.split(";", 1)[0].strip()


def _offered(accept: list[str]) -> set[str]:
    """
    The media types in Accept headers, without their parameters, but for
    those the client refuses with C{q=0}.
    """
    offered = set()
    for header in accept:
        for item in header.split(","):
            media_type, *parameters = item.split(";")
            if not any(_refused(parameter) for parameter in parameters):
                offered.add(media_type.strip())
    return offered


def _refused(parameter: str) -> bool:
    """Whether an Accept parameter is a quality of zero (q=0, q=0.000)."""
    name, _, value = parameter.partition("=")
    if name.strip().lower() != "q":
        return False
    try:
        return float(value.strip()) == 0
    except ValueError:
        return False


#: Manifests that stand for several others (one per platform): a registry
#: answers a client that does not accept them with one of those others.
INDEX_MEDIA_TYPES = frozenset(
    ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
)


def accepts_every_type(accept: list[str]) -> bool:
    """
    Whether the upstream's answer to C{accept} is what a tag really points
    at: a narrower Accept may have the upstream pick a platform's manifest
    from an index, or answer 404.
    """
    # Named, each: a registry does not take */* for an index (distribution
    # looks for the list's own type), so "v2, */*" gets one platform's.
    offered = _offered(accept)
    return all(media_type in offered for media_type in MANIFEST_MEDIA_TYPES)


def widened(accept: list[str]) -> list[str]:
    """C{accept} and every current manifest type."""
    return [*accept, ", ".join(MANIFEST_MEDIA_TYPES)]


#: Seconds between two "upstream slow" warnings about one registry.
SLOW_SAID_EVERY = 10.0
#: Manifests remembered as having their references linked.
LINKED_MEMORY = 20_000
#: The most references of one manifest linked to its name (an image has at
#: most a few hundred layers; each link is a file).
MAX_LINKED_REFERENCES = 1000


def _worth_serving_stale(error: RegistryError) -> bool:
    # Down, rate limited, refusing us or failing; but a 404 means the tag or
    # manifest is really gone and must not be served from the cache.
    return error.status != 404


class ManifestService:
    def __init__(
        self, store: ManifestStore, clock: Any, tag_ttl: float = 60.0, links: RepositoryLinks | None = None,
        revalidate_wait: float = 5.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self.tag_ttl = tag_ttl
        #: How long a pull of a cached tag past its TTL waits for the
        #: upstream's HEAD before the cache answers (the HEAD goes on).
        self.revalidate_wait = revalidate_wait
        #: Which names the upstream has shown each cached digest under.
        self.links = links if links is not None else RepositoryLinks(None)
        #: Manifests whose references are linked under a name (this process).
        self._linked: OrderedDict[tuple[str, str, Digest], None] = OrderedDict()
        self._linked_generation = self.links.generation
        #: Tag lists being fetched, and who waits for each.
        self._tag_lists: dict[Any, list[Deferred[Any]]] = {}
        #: Manifest GETs and HEADs under way, and who waits for each.
        self._asking: dict[Any, list[Deferred[Any]]] = {}
        #: When each tag check (a HEAD) under way was sent.
        self._checks_sent: dict[Any, float] = {}
        #: "upstream slow", per registry.
        self._slow_said = Throttle(SLOW_SAID_EVERY)

    def _link(self, registry_id: str, upstream_name: str, manifest: Manifest) -> None:
        """The upstream has shown C{manifest} under this name: and what it references."""
        key = (registry_id, upstream_name, manifest.digest)
        if self._linked_generation != self.links.generation:
            self._linked.clear()  # links were forgotten (an eviction)
            self._linked_generation = self.links.generation
        if key in self._linked:  # a hit's hot path: no JSON parsing
            self._linked.move_to_end(key)
            return
        # (A manifest naming more than any image has is linked in part: the
        # rest is confirmed with the upstream when it is asked for.  An
        # index's manifests are confirmed so too, the first time each is
        # asked for under this name from the cache: an upstream may hold an
        # index naming manifests it does not have here.)
        references = referenced_digests(manifest.content, children=False)[:MAX_LINKED_REFERENCES]
        self.links.add(registry_id, upstream_name, [manifest.digest, *references])
        self._linked[key] = None
        if len(self._linked) > LINKED_MEMORY:
            self._linked.popitem(last=False)

    def mark_stored_legacy(self) -> None:
        """Mark every manifest on disk as cached before links were kept."""
        for registry_id, digest in self._store.manifests_on_disk():
            self.links.mark_legacy(registry_id, digest)

    def link_stored_tags(self) -> int:
        """
        Link what the tags kept on disk resolve to (and what those manifests
        reference) under their names: for a cache written before links were
        kept, so that its pulls by digest keep working with the upstream
        down.  An index's manifests are not: it may name what its repository
        does not hold (they are served as cached before links were kept, see
        L{mark_stored_legacy}).  Returns how many tags it read.
        """
        store, count = self._store, 0
        for registry_id, upstream_name, tag in store.tags_on_disk():
            resolution = store.tag(registry_id, upstream_name, tag)
            manifest = store.get(registry_id, resolution.digest) if resolution is not None else None
            if manifest is None:
                continue
            count += 1
            self._link(registry_id, upstream_name, manifest)
        return count

    @inlineCallbacks
    def get(
        self,
        upstream: Upstream,
        upstream_name: str,
        reference: str,
        accept: list[str],
        head: bool,
    ) -> Any:
        """
        Answer a manifest GET or HEAD from the cache when it can, from the
        upstream otherwise, and from the cache again when the upstream fails.
        Fires with a L{ManifestAnswer}.
        """
        store = self._store
        registry_id = upstream.registry.id
        if ":" in reference:
            cached = store.get(registry_id, Digest.parse(reference))
            if cached is not None:
                if not self.links.known(registry_id, upstream_name, cached.digest):
                    # Cached for another name: served under this one once the
                    # upstream confirms (a HEAD) that it has it here too.
                    try:
                        yield self.head(upstream, upstream_name, str(cached.digest), widened(accept))
                    except RegistryError as error:
                        if not (upstream_unavailable(error) and self.links.legacy(registry_id, cached.digest)):
                            raise
                        _log_stale(upstream, upstream_name, reference, error)
                        return _answer(cached, head, "stale")
                self._link(registry_id, upstream_name, cached)
                return _answer(cached, head, "hit")
            # A digest names its content: whatever the Accept, it is what the
            # cache would serve (distribution answers a narrow one 404).
            answer = yield self._from_upstream(upstream, upstream_name, reference, widened(accept), head)
            return answer
        resolution = store.tag(registry_id, upstream_name, reference)
        cached = None
        if resolution is not None and acceptable(resolution.media_type, accept):
            cached = store.get(registry_id, resolution.digest)
        if cached is not None and resolution is not None:
            # The tag is this name's: what it resolves to is too.
            self._link(registry_id, upstream_name, cached)
            age = self._clock.seconds() - resolution.confirmed_at
            # (A confirmation "in the future" was made while the clock ran
            # ahead: due now, not fresh until the clock catches up.)
            if 0 <= age < self.tag_ttl:
                return _answer(cached, head, "hit")
            if upstream.unreachable:
                return _answer(cached, head, "stale")
            try:
                # Revalidate with a HEAD: it does not count against Docker
                # Hub's pull limit, and usually the tag has not moved.  It
                # accepts every type, as the answer stored was asked with.
                current = yield self._revalidate(upstream, upstream_name, reference, accept, cached)
            except RegistryError as error:
                if not _worth_serving_stale(error):
                    raise  # (the tag is dropped)
                _log_stale(upstream, upstream_name, reference, error)
                return _answer(cached, head, "stale")
            if current is None:
                self._log_slow(upstream, upstream_name, reference)
                return _answer(cached, head, "stale")
            if current[1] == str(cached.digest):
                return _answer(cached, head, "revalidated")  # (the tag is confirmed)
        every_type = accepts_every_type(accept)
        if cached is None and resolution is not None and upstream.unreachable:
            picked = self._platform_pick(registry_id, upstream_name, resolution, accept, unavailable=True)
            if picked is not None:
                return _answer(picked, head, "stale")
        try:
            answer = yield self._from_upstream(upstream, upstream_name, reference, accept, head)
        except RegistryError as error:
            if not _worth_serving_stale(error):
                if every_type:  # (else the 404 may be the narrow Accept's)
                    store.drop_tag(registry_id, upstream_name, reference)
                raise
            if cached is None and resolution is not None:
                cached = self._platform_pick(
                    registry_id, upstream_name, resolution, accept, unavailable=upstream_unavailable(error)
                )
            if cached is None:
                raise
            _log_stale(upstream, upstream_name, reference, error)
            return _answer(cached, head, "stale")
        # Docker resolves a tag with a HEAD and then GETs the digest: remember
        # the resolution from either, so that the tag keeps working when the
        # upstream is down (the manifest itself is stored by digest).  Only
        # what the tag really points at: one client's narrow Accept must not
        # decide what every other client gets for it.
        if not answer.media_type or not (
            every_type
            or essence(answer.media_type) in INDEX_MEDIA_TYPES
            or (yield self._points_at(upstream, upstream_name, reference, answer.digest))
        ):
            return answer
        if (
            answer.content is None
            and resolution is not None
            and resolution.digest != answer.digest
            and store.get(registry_id, answer.digest) is None
            and store.get(registry_id, resolution.digest) is not None
        ):
            # A HEAD showed that the tag moved, to a manifest not here yet:
            # what is here stays the tag's fallback while the upstream is
            # down, until a GET brings the new one (by tag, or by digest).
            store.moved_tag(registry_id, upstream_name, reference, answer.digest, answer.media_type)
        else:
            store.set_tag(registry_id, upstream_name, reference, answer.digest, answer.media_type)
        return answer

    def _platform_pick(
        self, registry_id: str, upstream_name: str, resolution: TagResolution, accept: list[str], unavailable: bool
    ) -> Manifest | None:
        """
        For a client that takes no index, what a registry answers it for a
        tag that points at one, from the cache: the index's linux/amd64
        manifest (distribution's and Docker Hub's default platform), if the
        client takes its type, it is cached, and the upstream showed it under
        this name.  (An index may name manifests its repository does not
        hold: another repository's, cached for that one.  What was cached
        before links were kept is taken, as by digest, while the upstream is
        C{unavailable}.)
        """
        if essence(resolution.media_type) not in INDEX_MEDIA_TYPES:
            return None
        index = self._store.get(registry_id, resolution.digest)
        document = manifest_document(index.content) if index is not None else None
        entries = document.get("manifests") if document is not None else None
        for entry in entries if isinstance(entries, list) else []:
            platform = entry.get("platform") if isinstance(entry, dict) else None
            if not isinstance(platform, dict) or (platform.get("os"), platform.get("architecture")) != ("linux", "amd64"):
                continue
            try:
                digest = Digest.parse(str(entry.get("digest")))
            except InvalidDigest:
                return None
            if not (
                self.links.known(registry_id, upstream_name, digest)
                or (unavailable and self.links.legacy(registry_id, digest))
            ):
                return None
            picked = self._store.get(registry_id, digest)
            return picked if picked is not None and acceptable(picked.media_type, accept) else None
        return None

    @inlineCallbacks
    def _points_at(self, upstream: Upstream, upstream_name: str, tag: str, digest: Digest) -> Any:
        """
        Whether the upstream says (to a HEAD accepting every type) that
        C{tag} points at C{digest}, rather than at an index of which a
        narrow Accept got one manifest.
        """
        try:
            _, current, _ = yield self.head(upstream, upstream_name, tag, widened([]))
        except RegistryError:
            return False
        return current == str(digest)

    @inlineCallbacks
    def _from_upstream(
        self, upstream: Upstream, upstream_name: str, reference: str, accept: list[str], head: bool
    ) -> Any:
        if head:
            media_type, digest, length = yield self.head(upstream, upstream_name, reference, accept)
            try:
                if not media_type or not length:
                    raise InvalidDigest("no manifest type or size")
                parsed = Digest.parse(digest or "")
            except InvalidDigest:
                # Without a digest, a manifest's type or its size from a HEAD
                # we cannot answer one (containerd takes a HEAD's length for
                # the manifest's): GET it, and keep it.
                manifest = yield self.fetch(upstream, upstream_name, reference, accept)
                self._store.put(upstream.registry.id, manifest)
                self._link(upstream.registry.id, upstream_name, manifest)
                return _answer(manifest, True, "miss")
            self.links.add(upstream.registry.id, upstream_name, [parsed])
            return ManifestAnswer(media_type, parsed, length, None, "miss")
        manifest = yield self.fetch(upstream, upstream_name, reference, accept)
        self._store.put(upstream.registry.id, manifest)
        self._link(upstream.registry.id, upstream_name, manifest)
        return _answer(manifest, False, "miss")

    def fetch(self, upstream: Upstream, upstream_name: str, reference: str, accept: list[str]) -> Deferred[Any]:
        """
        GET a manifest from upstream, verified against the digest asked for (or
        the one the upstream announces).  Fires with a L{Manifest}.  Clients
        asking for the same at once share one request (on Docker Hub, each
        GET counts against the pull limit).
        """
        key = ("GET", upstream, upstream_name, reference, tuple(accept))
        return shared(self._asking, key, lambda: self._fetch(upstream, upstream_name, reference, accept))

    def _revalidate(
        self, upstream: Upstream, upstream_name: str, reference: str, accept: list[str], cached: Manifest
    ) -> Deferred[Any]:
        """
        The upstream's HEAD of a cached tag past its TTL, or None after
        C{revalidate_wait} (L{_within_wait}).  What it finds counts, late
        too: unless something newer decided the tag since it was sent, it
        confirms the tag or (a 404) drops it.
        """
        registry_id = upstream.registry.id
        every_type = widened(accept)
        key = _head_key(upstream, upstream_name, reference, every_type)
        sent_at = self._sent_at(self._asking, key)

        def settle(result: object) -> object:
            tag = self._store.tag(registry_id, upstream_name, reference)
            # (A newer answer, another client's check that followed a move or
            # a GET, stands: this one tells of the tag when it was sent.  One
            # "in the future" was made while the clock ran ahead: not newer.)
            decided = max(tag.confirmed_at, tag.moved_at) if tag is not None else 0.0
            newer = sent_at < decided <= self._clock.seconds()
            ours = tag is not None and tag.digest == cached.digest and not newer
            if isinstance(result, Failure):
                if ours and result.check(RegistryError) and not _worth_serving_stale(cast(RegistryError, result.value)):
                    self._store.drop_tag(registry_id, upstream_name, reference)  # gone upstream
            elif ours and cast(tuple, result)[1] == str(cached.digest):
                self._store.set_tag(registry_id, upstream_name, reference, cached.digest, cached.media_type)
            return result

        asked = self.head(upstream, upstream_name, reference, every_type).addBoth(settle)
        return self._within_wait(asked, key, sent_at, f"{upstream_name}:{reference}")

    def _log_slow(self, upstream: Upstream, upstream_name: str, reference: str) -> None:
        """
        Say that the cache answered for a slow upstream: once per registry
        every L{SLOW_SAID_EVERY} seconds, with how many more since (a busy
        proxy would say it for every pull until the upstream's read timeout).
        """
        registry_id = upstream.registry.id
        more = self._slow_said.due(registry_id, self._clock.seconds())
        if more is None:
            return
        log.warn(
            "serving {registry}/{name}:{reference} from the cache: upstream slow (no answer within {seconds:g} s;"
            " the request goes on for the next one){more}",
            registry=registry_id, name=upstream_name, reference=reference, seconds=self.revalidate_wait,
            more=f"; {more} more such answers since the last time this was said" if more else "",
        )

    def _sent_at(self, pending: dict[Any, list[Deferred[Any]]], key: Any) -> float:
        """When the shared request under C{key} was sent: now, unless one is under way."""
        now = self._clock.seconds()
        if key not in pending:
            self._checks_sent[key] = now
        return self._checks_sent.get(key, now)

    def _forget_sent(self, result: object, key: Any, sent_at: float) -> object:
        """The shared request under C{key} sent at C{sent_at} has ended (passes C{result} on)."""
        if self._checks_sent.get(key) == sent_at:
            del self._checks_sent[key]
        return result

    def _within_wait(self, asked: Deferred[Any], key: Any, sent_at: float, what: str) -> Deferred[Any]:
        """
        What C{asked} (a request shared under C{key}, sent at C{sent_at})
        gives, or None once C{revalidate_wait} has passed since it was sent
        (those that join it wait only what is left): what the cache holds
        answers then, rather than after a slow upstream's read timeout.  The
        request goes on; its callbacks added before still see what it gives.
        """
        answer: Deferred[Any] = Deferred()

        def waited_enough() -> None:
            if not answer.called:
                answer.callback(None)

        timer = self._clock.callLater(max(0.0, self.revalidate_wait - (self._clock.seconds() - sent_at)), waited_enough)

        def landed(result: object) -> None:
            self._forget_sent(None, key, sent_at)
            if timer.active():
                timer.cancel()
            if not answer.called:
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
            elif isinstance(result, Failure) and not result.check(RegistryError):
                log.failure("late answer about {what}", result, what=what)

        asked.addBoth(landed)
        return answer

    def head(self, upstream: Upstream, upstream_name: str, reference: str, accept: list[str]) -> Deferred[Any]:
        """
        HEAD a manifest upstream (a HEAD, never a GET: it does not count
        against Docker Hub's pull limit).  Fires with (media type, digest,
        length).  Clients asking for the same at once share one request.
        """
        key = _head_key(upstream, upstream_name, reference, accept)
        return shared(self._asking, key, lambda: self._head(upstream, upstream_name, reference, accept))

    @inlineCallbacks
    def _fetch(self, upstream: Upstream, upstream_name: str, reference: str, accept: list[str]) -> Any:
        response, content = yield _get_body(
            upstream, f"/v2/{upstream_name}/manifests/{reference}", upstream_name,
            manifest_unknown(reference), "a manifest", {"Accept": accept},
        )
        media_type = valid_media_type(essence((response.headers.getRawHeaders("content-type") or [""])[0]))
        announced = (response.headers.getRawHeaders("docker-content-digest") or [None])[0]
        if ":" in reference:
            expected = Digest.parse(reference)
        elif announced:
            try:
                expected = Digest.parse(announced)
            except InvalidDigest:
                raise upstream.bad_content(_named(upstream_name, reference), "announced an invalid manifest digest") from None
        else:
            expected = manifest_digest(content)
        if not manifest_matches(expected, content):
            raise upstream.bad_content(_named(upstream_name, reference), f"sent a manifest that does not match {expected}")
        document = manifest_document(content)
        if document is None:
            raise upstream.bad_content(_named(upstream_name, reference), "sent something that is not a manifest")
        if media_type is None or not manifest_media_type(media_type):
            media_type = media_type_of(document)
        return Manifest(content, media_type, expected)

    @inlineCallbacks
    def _head(self, upstream: Upstream, upstream_name: str, reference: str, accept: list[str]) -> Any:
        response = yield upstream.request(
            "HEAD",
            f"/v2/{upstream_name}/manifests/{reference}",
            pull_scope(upstream_name),
            headers={"Accept": accept},
        )
        discard_body(response)
        if response.code != 200:
            raise map_status(upstream, response, manifest_unknown(reference))
        media_type = valid_media_type(essence((response.headers.getRawHeaders("content-type") or [""])[0])) or ""
        if not manifest_media_type(media_type):
            media_type = ""
        digest = (response.headers.getRawHeaders("docker-content-digest") or [None])[0]
        if ":" in reference:
            digest = reference
        # ASCII digits only ("²" is a digit to str.isdigit, not to int), and
        # no more than a manifest may take: else the length is unknown.
        length = (response.headers.getRawHeaders("content-length") or [""])[0]
        size = int(length) if _LENGTH.fullmatch(length) else None
        return media_type, digest, size if size is not None and size <= SMALL_BODY_LIMIT else None

    @inlineCallbacks
    def tags(
        self,
        upstream: Upstream,
        local_name: str,
        upstream_name: str,
        n: int | None,
        last: str | None,
        cursor: Sequence[tuple[str, str]] = (),
    ) -> Any:
        """
        The upstream's tag list with the names rewritten to the local name,
        in lexical order; the whole list as last seen when the upstream
        fails.  C{cursor} is the other query parameters of a page the
        upstream's own C{Link} named.  Fires with (JSON bytes, Link header
        or None, stale).
        """
        query = []
        if n is not None:
            query.append(("n", str(n)))
        if last is not None:
            query.append(("last", last))
        query.extend(cursor)
        path = f"/v2/{upstream_name}/tags/list"
        if query:
            path += "?" + urlencode(query)
        registry_id = upstream.registry.id

        def stale(remembered: list[str]) -> tuple[bytes, str | None, bool]:
            # The whole list as last seen, paginated here.
            tags, link = paginate(remembered, n, last, local_name)
            return json.dumps({"name": local_name, "tags": tags}).encode(), link, True

        remembered = self._store.tag_list(registry_id, upstream_name) if upstream.unreachable else None
        if remembered is not None:
            return stale(remembered)
        # Waited for no longer than revalidate_wait when a whole list is kept
        # to answer with meanwhile; not a page the upstream's own cursor names
        # (or of an upstream that pages itself): the kept list, paged here,
        # would be another page.
        may_wait = not cursor and upstream.pages_tags is not True and self._store.has_tag_list(registry_id, upstream_name)
        key = _tag_list_key(registry_id, path, local_name)
        sent_at = self._sent_at(self._tag_lists, key)

        def settle(result: object) -> object:
            # (Late too: the list the next request falls back on.)
            if isinstance(result, Failure):
                if result.check(RegistryError) and not _worth_serving_stale(cast(RegistryError, result.value)):
                    self._store.drop_tag_list(registry_id, upstream_name)
            elif cast(tuple, result)[1] is None and not query:
                self._store.set_tag_list(registry_id, upstream_name, cast(tuple, result)[0])
            return result

        asked = self._tag_list(upstream, upstream_name, path, local_name).addBoth(settle)
        try:
            if may_wait:
                got = yield self._within_wait(asked, key, sent_at, f"{upstream_name} tags/list")
            else:
                asked.addBoth(self._forget_sent, key, sent_at)
                got = yield asked
        except RegistryError as error:
            if not _worth_serving_stale(error):
                raise
            remembered = self._store.tag_list(registry_id, upstream_name)
            if remembered is None:
                raise
            _log_stale(upstream, upstream_name, "tags/list", error)
            return stale(remembered)
        if got is None:
            remembered = self._store.tag_list(registry_id, upstream_name)
            if remembered is None:  # (evicted meanwhile)
                raise upstream.error(504, "UNAVAILABLE", f"sent no tag list within {self.revalidate_wait:g} s")
            self._log_slow(upstream, upstream_name, "tags/list")
            return stale(remembered)
        tags, raw_link = got
        link = rewrite_link(raw_link, upstream_name, local_name, prefix=upstream.path_prefix)
        if raw_link is not None:
            upstream.pages_tags = True
        elif (n is not None and len(tags) > n) or (last is not None and last in tags):
            # Its whole list, n and last ignored (distribution 2.x): paginated
            # here from now on.  (A last page in an order of its own, with no
            # Link, is passed on whole: filtering it by "last" would drop tags.)
            upstream.pages_tags = False
        if link is None and upstream.pages_tags is False:
            tags, link = paginate(tags, n, last, local_name)
        else:
            tags = sorted(tags)
        rewritten = json.dumps({"name": local_name, "tags": tags}).encode()
        return rewritten, link, False

    def _tag_list(self, upstream: Upstream, upstream_name: str, path: str, local_name: str) -> Deferred[Any]:
        """
        The upstream's tags at C{path} and its C{Link} header: one request
        for all who ask at once (a big repository's list parsed once, not
        once per client).
        """
        return shared(
            self._tag_lists,
            _tag_list_key(upstream.registry.id, path, local_name),
            lambda: self._fetch_tag_list(upstream, upstream_name, path, local_name),
        )

    @inlineCallbacks
    def _fetch_tag_list(self, upstream: Upstream, upstream_name: str, path: str, local_name: str) -> Any:
        response, body = yield _get_body(upstream, path, upstream_name, name_unknown(local_name), "a tag list")
        try:
            document = json.loads(body)
            tags = document.get("tags") or []
            if not isinstance(tags, list):
                raise ValueError
        except (ValueError, AttributeError, RecursionError):
            raise upstream.bad_content(f"{upstream_name} tags/list", "sent a tag list that is not JSON") from None
        # Only what could be pulled by that tag: a string that is no tag (a
        # lone surrogate, say) could not even be put in a next page's link.
        return [t for t in tags if isinstance(t, str) and is_valid_tag(t)], header_text(
            (response.headers.getRawHeaders("link") or [None])[0]
        )

    @inlineCallbacks
    def referrers(
        self,
        upstream: Upstream,
        local_name: str,
        upstream_name: str,
        digest: Digest,
        artifact_type: str | None,
        cursor: Sequence[tuple[str, str]] = (),
    ) -> Any:
        """
        The upstream's referrers index, passed through, with its C{Link} to
        the next page (C{cursor}: the other query parameters of a page that
        C{Link} named); its last answer when it fails, and a 404 when it
        fails with none remembered (a client then looks for the referrers'
        fallback tag, served from the cache too).  Only a whole answer, one
        page with no next, is remembered.  Fires with (body, content type,
        OCI-Filters-Applied or None, Link or None, stale).
        """
        store, registry_id = self._store, upstream.registry.id
        path = f"/v2/{upstream_name}/referrers/{digest}"
        query = [("artifactType", artifact_type)] if artifact_type else []
        query.extend(cursor)
        if query:
            path += "?" + urlencode(query)
        not_found = manifest_unknown(str(digest))
        remembered = None if cursor else store.referrers(registry_id, upstream_name, digest, artifact_type)
        if upstream.unreachable and remembered is not None:
            return (*remembered, None, True)

        def answered(got: tuple[Any, bytes]) -> tuple[bytes, str, str | None, str | None, bool]:
            response, body = got
            document = manifest_document(body)
            if document is None:
                raise _Unusable.of(
                    upstream.bad_content(f"{upstream_name} referrers/{digest}", "sent referrers that are not an image index")
                )
            content_type = valid_media_type((response.headers.getRawHeaders("content-type") or [""])[0])
            filters = header_text((response.headers.getRawHeaders("oci-filters-applied") or [None])[0])
            raw_link = header_text((response.headers.getRawHeaders("link") or [None])[0])
            link = rewrite_link(raw_link, upstream_name, local_name, f"referrers/{digest}", upstream.path_prefix)
            if content_type is None or not manifest_media_type(content_type):
                content_type = "application/vnd.oci.image.index.v1+json"
            if cursor:
                pass  # a later page: what is remembered is the first, whole
            elif document.get("manifests") and raw_link is None:
                # (None is remembered as none: a 404 tells a client as much, and
                # any digest and artifactType may be asked about.)
                store.set_referrers(registry_id, upstream_name, digest, artifact_type, (body, content_type, filters))
            else:
                store.drop_referrers(registry_id, upstream_name, digest, artifact_type)
            return body, content_type, filters, link, False

        def failed(failure: Failure) -> Failure:
            if not cursor and failure.check(RegistryError) and not _worth_serving_stale(cast(RegistryError, failure.value)):
                store.drop_referrers(registry_id, upstream_name, digest, artifact_type)
            return failure

        # (Late too: what it finds is what the next request falls back on.)
        asked = _get_body(upstream, path, upstream_name, not_found, "referrers").addCallbacks(answered, failed)
        try:
            if remembered is None:
                got = yield asked
            else:
                got = yield self._within_wait(asked, object(), self._clock.seconds(), f"{upstream_name} referrers/{digest}")
        except _Unusable:
            raise  # it answered, wrongly: its error, not the cache's copy
        except RegistryError as error:
            if not _worth_serving_stale(error) or cursor:
                raise
            _log_stale(upstream, upstream_name, f"referrers/{digest}", error)
            if remembered is None:
                raise not_found from None
            return (*remembered, None, True)
        if got is None:
            self._log_slow(upstream, upstream_name, f"referrers/{digest}")
            return (*cast(tuple, remembered), None, True)
        return got


class _Unusable(RegistryError):
    """An upstream answer that came but cannot be used: the client gets its error, not the cache's copy."""

    @classmethod
    def of(cls, error: RegistryError) -> _Unusable:
        return cls(error.status, error.code, error.message, error.detail, error.headers)


def _answer(manifest: Manifest, head: bool, source: str) -> ManifestAnswer:
    return ManifestAnswer(
        manifest.media_type,
        manifest.digest,
        len(manifest.content),
        None if head else manifest.content,
        source,
    )


def _head_key(upstream: Upstream, upstream_name: str, reference: str, accept: list[str]) -> tuple[Any, ...]:
    """What makes two manifest HEADs one request."""
    return ("HEAD", upstream, upstream_name, reference, tuple(accept))


def _tag_list_key(registry_id: str, path: str, local_name: str) -> tuple[Any, ...]:
    """What makes two tag list requests one."""
    return (registry_id, path, local_name)


def _log_stale(upstream: Upstream, upstream_name: str, reference: str, error: RegistryError) -> None:
    log.warn(
        "serving {registry}/{name}:{reference} from the cache: upstream failing ({reason})",
        registry=upstream.registry.id,
        name=upstream_name,
        reference=reference,
        reason=error.message,
    )


#: A Content-Length: ASCII digits, at most 19.
_LENGTH = re.compile(r"[0-9]{1,19}")


def paginate(tags: list[str], n: int | None, last: str | None, local_name: str) -> tuple[list[str], str | None]:
    """
    Apply C{n}/C{last} pagination ourselves when the upstream ignored it
    (CNCF distribution 2.x does for tag lists): lexical order, tags after
    C{last}, at most C{n}, and a C{Link} to the next page when there is one.
    A C{local_name} that is a path (the catalog's) is the listing's own.
    """
    path = local_name if local_name.startswith("/") else f"/v2/{local_name}/tags/list"
    ordered = sorted(tags)
    if last is not None:
        ordered = [t for t in ordered if t > last]
    if n is None or len(ordered) <= n:
        return ordered, None
    page = ordered[:n]
    if not page:
        return page, None
    query = urlencode([("last", page[-1]), ("n", str(n))])
    return page, f'<{path}?{query}>; rel="next"'


#: One link-value of a C{Link} header: its target, and its parameters.
_LINK_VALUE = re.compile(r"<([^>]*)>([^,<]*)")
_REL_NEXT = re.compile(r';\s*rel\s*=\s*"?next"?(?:[\s;]|$)', re.IGNORECASE)


def rewrite_link(
    link: str | None, upstream_name: str, local_name: str, route: str = "tags/list", prefix: str = ""
) -> str | None:
    """
    The upstream's next-page C{Link} pointed at the local name, on this
    proxy (an absolute upstream URL becomes a path); None unless it is the
    next page of this very listing (C{route}, under the upstream name: no
    other repository, no dot segments) with a query cargobay takes back
    (printable ASCII, as L{cargobay.routes} asks of a cursor).  An
    upstream whose URL has a path (C{prefix}) may name the page under it.
    """
    if not link:
        return None
    values = _LINK_VALUE.findall(link)
    chosen = next((target for target, params in values if _REL_NEXT.search(params)), None)
    if chosen is None:
        if len(values) != 1 or "rel" in values[0][1].lower():
            return None
        chosen = values[0][0]  # a lone link that names no relation
    try:
        target = urlsplit(chosen)
        query = parse_qsl(target.query, keep_blank_values=True, encoding="latin-1")
    except ValueError:  # a bracketed host that is no address
        return None
    if target.path not in {f"/v2/{upstream_name}/{route}", f"{prefix}/v2/{upstream_name}/{route}"}:
        return None
    if len(query) > 11 or not all(
        len(key) <= 64 and len(value) <= 1024 and all(" " <= c <= "~" for c in key + value) for key, value in query
    ):
        return None
    path = f"/v2/{local_name}/{route}"
    if target.query:
        path += "?" + target.query
    return f'<{path}>; rel="next"'


#: A media type as a header carries it: type/subtype, then any parameters,
#: in printable ASCII (anything else cannot go into a response header).




def header_text(value: str | None) -> str | None:
    """An upstream header's value if it is printable ASCII (else L{None}: dropped)."""
    if value is not None and len(value) <= 4096 and all(" " <= c <= "~" for c in value):
        return value
    return None


