"""
Manifests and tag resolutions on disk.

Manifests are stored by digest and are immutable: a file holds the media type
on its first line and the exact manifest bytes after it, and is checked against
its digest whenever it is read.  A tag resolution records which digest a tag
pointed to and when that was last confirmed upstream; it lets a tag that
resolved once keep working while the upstream is down.  Layout::

    manifests/<registry id>/<algorithm>/<hex>
    tags/<registry id>/<upstream name>/@<tag>.json
    taglists/<registry id>/<upstream name>/@list.json
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from cargobay.reference import Digest, InvalidDigest, registry_directory, registry_id_of, sha256_digest

log = Logger()


_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w!#$&^.+-]*/[A-Za-z0-9][\w!#$&^.+-]*(?:\s*;[ -~]*)?", re.ASCII)

#: Fields that only manifests and indexes have.
_MANIFEST_KEYS = frozenset(("schemaVersion", "mediaType", "config", "layers", "manifests", "blobs", "fsLayers"))


def valid_media_type(value: object) -> str | None:
    """C{value} if it is a media type we can pass on in a header, else L{None}."""
    if isinstance(value, str) and len(value) <= 255 and _MEDIA_TYPE.fullmatch(value):
        return value
    return None


def manifest_media_type(value: str | None) -> bool:
    """
    Whether C{value} may be a manifest's Content-Type: a JSON type.  Not
    whatever an upstream says (C{text/html} from the proxy's origin would
    run in a browser).
    """
    if not value:
        return False
    essence = value.split(";")[0].strip().lower()
    return essence == "application/json" or essence.endswith(("+json", "+prettyjws"))


def manifest_document(content: bytes) -> dict[str, Any] | None:
    """
    C{content} parsed, if it is a manifest or index: a JSON object with a
    manifest's fields (C{schemaVersion} but for the artifact manifests of
    OCI 1.1's drafts).  Not any JSON document from wherever the upstream
    pointed.
    """
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or not _MANIFEST_KEYS.intersection(document):
        return None
    return document


def media_type_of(document: dict[str, Any]) -> str:
    media_type = valid_media_type(document.get("mediaType"))
    if manifest_media_type(media_type):
        assert media_type is not None
        return media_type
    if document.get("schemaVersion") == 1:
        if "signatures" in document:
            return SCHEMA1_SIGNED
        return SCHEMA1
    if "manifests" in document:
        return "application/vnd.oci.image.index.v1+json"
    return "application/vnd.oci.image.manifest.v1+json"


SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
_CLOSING = re.compile(rb"\s*\}\s*")
_SIGNATURES_AT = re.compile(rb'\s*,\s*"signatures"\s*:')


def signed_payload(content: bytes) -> bytes | None:
    """
    What the digest of a signed Docker schema 1 manifest covers: the JSON
    without its signatures, as the first signature's protected header
    describes it (C{formatLength} bytes, then C{formatTail}).  None for any
    other manifest.
    """
    if b'"signatures"' not in content:
        return None
    try:
        document = json.loads(content)
        header = json.loads(_base64url(document["signatures"][0]["protected"]))
        length, tail = header["formatLength"], _base64url(header["formatTail"])
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error, RecursionError):
        return None
    if (
        document.get("schemaVersion") != 1
        or document.get("mediaType", SCHEMA1_SIGNED) not in (SCHEMA1_SIGNED, SCHEMA1)
        or type(length) is not int
        or not 0 < length <= len(content)
        # The signatures were put in at formatLength, before the closing
        # brace that formatTail holds (libtrust's pretty JWS): a tail that
        # holds more would let any body claim any payload's digest.
        or not _CLOSING.fullmatch(tail)
        or not content.endswith(tail)
        or not _SIGNATURES_AT.match(content, length)
    ):
        return None
    payload = content[:length] + tail
    try:
        same = json.loads(payload) == {k: v for k, v in document.items() if k != "signatures"}
    except (ValueError, RecursionError):
        return None
    return payload if same else None


def _base64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def manifest_matches(digest: Digest, content: bytes) -> bool:
    """Whether C{content} is the manifest C{digest} names (a signed schema 1 one too)."""
    if digest.matches(content):
        return True
    payload = signed_payload(content)
    return payload is not None and digest.matches(payload)


def manifest_digest(content: bytes) -> Digest:
    """The digest a registry gives C{content}."""
    payload = signed_payload(content)
    return sha256_digest(content if payload is None else payload)


@dataclass(frozen=True)
class Manifest:
    content: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class TagResolution:
    digest: Digest
    media_type: str
    confirmed_at: float
    #: Where a HEAD showed the tag had moved (at C{moved_at}), to a manifest
    #: not cached then: the tag's once that manifest is (a client that
    #: resolves tags with HEAD then GETs the manifest by digest).
    moved_to: Digest | None = None
    moved_type: str = ""
    moved_at: float = 0.0


#: Tag resolutions kept in memory (the rest are read from disk when used).
TAG_MEMORY = 50_000
#: Files whose last use is remembered, so as to mark it on disk at most
#: once per L{ManifestStore.touch_every}.
TOUCH_MEMORY = 50_000


class ManifestStore:
    """
    A file's modification time is its last use (marked at most once per
    C{touch_every}): L{cargobay.sweep} removes what goes unused for longer
    than the cache's age limit.
    """

    def __init__(self, directory: str, clock: Any, memory_bytes: int = 16 * 1024 * 1024) -> None:
        self.directory = os.path.abspath(directory)
        self._clock = clock
        self._tags: OrderedDict[tuple[str, str, str], TagResolution] = OrderedDict()
        #: How often a file in use has its modification time moved on.
        self.touch_every = 3600.0
        self._touched: OrderedDict[str, float] = OrderedDict()
        self._write_error_logged = False
        # Hot manifests stay in memory (verified when they were loaded), so a
        # busy tag costs neither a disk read nor a hash per request.
        self._memory: OrderedDict[tuple[str, Digest], Manifest] = OrderedDict()
        self._memory_bytes = 0
        self._memory_limit = memory_bytes

    def _remember(self, registry_id: str, manifest: Manifest) -> None:
        key = (registry_id, manifest.digest)
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = manifest
        self._memory_bytes += len(manifest.content)
        while self._memory_bytes > self._memory_limit and self._memory:
            _, evicted = self._memory.popitem(last=False)
            self._memory_bytes -= len(evicted.content)

    def _used(self, path: str) -> None:
        """Mark C{path} as just used (on disk, at most once per C{touch_every})."""
        now = self._clock.seconds()
        last = self._touched.get(path)
        if last is not None and now - last < self.touch_every:
            self._touched.move_to_end(path)
            return
        self._touched[path] = now
        self._touched.move_to_end(path)
        if len(self._touched) > TOUCH_MEMORY:
            self._touched.popitem(last=False)
        if last is not None or now - file_mtime(path) >= self.touch_every:
            try:
                os.utime(path)
            except OSError:
                pass

    def forget_file(self, path: str) -> None:
        """
        A file of this store was removed (by the sweep): forget what memory
        holds of it.
        """
        self._touched.pop(path, None)
        relative = os.path.relpath(path, self.directory).split(os.sep)
        if relative[0] == "manifests" and len(relative) == 4:
            try:
                self._memory_drop((registry_id_of(relative[1]) or "", Digest.parse(f"{relative[2]}:{relative[3]}")))
            except InvalidDigest:
                pass
        elif relative[0] == "tags" and len(relative) >= 4 and (tag := _tag_of_file(relative[-1])) is not None:
            self._tags.pop((registry_id_of(relative[1]) or "", "/".join(relative[2:-1]), tag), None)

    def _memory_drop(self, key: tuple[str, Digest]) -> None:
        manifest = self._memory.pop(key, None)
        if manifest is not None:
            self._memory_bytes -= len(manifest.content)

    # -- manifests ---------------------------------------------------------

    def has(self, registry_id: str, digest: Digest) -> bool:
        """Whether the manifest is kept (unchecked: for the sweep)."""
        return (registry_id, digest) in self._memory or os.path.exists(self._manifest_path(registry_id, digest))

    def _manifest_path(self, registry_id: str, digest: Digest) -> str:
        return os.path.join(self.directory, "manifests", registry_directory(registry_id), digest.algorithm, digest.encoded)

    def get(self, registry_id: str, digest: Digest) -> Manifest | None:
        path = self._manifest_path(registry_id, digest)
        remembered = self._memory.get((registry_id, digest))
        if remembered is not None:
            self._memory.move_to_end((registry_id, digest))
            self._used(path)
            return remembered
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        self._used(path)
        media_type_line, _, content = data.partition(b"\n")
        document = manifest_document(content)
        if not manifest_matches(digest, content) or document is None:
            log.warn("cached manifest {digest} is damaged; dropping it", digest=str(digest))
            _unlink(path)
            return None
        media_type = media_type_line.decode("utf-8", "replace")
        if not manifest_media_type(media_type):  # (cached before types were checked)
            media_type = media_type_of(document)
        manifest = Manifest(content, media_type, digest)
        self._remember(registry_id, manifest)
        return manifest

    def put(self, registry_id: str, manifest: Manifest) -> None:
        self._remember(registry_id, manifest)
        path = self._manifest_path(registry_id, manifest.digest)
        if os.path.exists(path):
            self._used(path)
            return
        header = manifest.media_type.replace("\n", "").encode("utf-8") + b"\n"
        self._write_atomically(path, header + manifest.content)

    # -- tags --------------------------------------------------------------

    def _tag_path(self, registry_id: str, upstream_name: str, tag: str) -> str:
        # "@" never occurs in a repository name: the file of tag "b" of
        # repository "a" cannot be the directory of repository "a/b.json".
        return os.path.join(self.directory, "tags", registry_directory(registry_id), upstream_name, "@" + tag + ".json")

    def _legacy_tag_path(self, registry_id: str, upstream_name: str, tag: str) -> str:
        """Where earlier versions kept a tag resolution (it could collide with a longer name's directory)."""
        return os.path.join(self.directory, "tags", registry_directory(registry_id), upstream_name, tag + ".json")

    def _read_tag_file(self, key: tuple[str, str, str]) -> bytes:
        """
        The tag's file; one a cache of an earlier version wrote under the
        old name is moved to the new one.
        """
        path = self._tag_path(*key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            legacy = self._legacy_tag_path(*key)
            with open(legacy, "rb") as f:  # a directory (a repository "<name>/<tag>.json") raises
                data = f.read()
            try:
                os.replace(legacy, path)
            except OSError:
                pass
            return data

    def tag(self, registry_id: str, upstream_name: str, tag: str) -> TagResolution | None:
        key = (registry_id, upstream_name, tag)
        path = self._tag_path(*key)
        resolution = self._tags.get(key)
        if resolution is not None:
            self._tags.move_to_end(key)
        else:
            try:
                document = json.loads(self._read_tag_file(key))
                moved_to = document.get("moved_to")
                resolution = TagResolution(
                    Digest.parse(document["digest"]),
                    str(document["media_type"]),
                    float(document["confirmed_at"]),
                    Digest.parse(moved_to) if moved_to else None,
                    str(document.get("moved_type", "")),
                    float(document.get("moved_at", 0.0)),
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidDigest):
                return None
            self._remember_tag(key, resolution)
        self._used(path)
        if resolution.moved_to is not None and self.get(registry_id, resolution.moved_to) is not None:
            resolution = TagResolution(resolution.moved_to, resolution.moved_type, resolution.moved_at)
            self._remember_tag(key, resolution)
            self._write_tag(key, resolution)
        return resolution

    def _write_tag(self, key: tuple[str, str, str], resolution: TagResolution) -> None:
        document: dict[str, object] = {
            "digest": str(resolution.digest), "media_type": resolution.media_type,
            "confirmed_at": resolution.confirmed_at,
        }
        if resolution.moved_to is not None:
            document.update(moved_to=str(resolution.moved_to), moved_type=resolution.moved_type,
                            moved_at=resolution.moved_at)
        self._write_atomically(self._tag_path(*key), json.dumps(document).encode())

    def _remember_tag(self, key: tuple[str, str, str], resolution: TagResolution) -> None:
        self._tags[key] = resolution
        self._tags.move_to_end(key)
        if len(self._tags) > TAG_MEMORY:
            self._tags.popitem(last=False)

    def manifests_on_disk(self) -> Iterator[tuple[str, Digest]]:
        """(registry id, digest) of every manifest kept on disk."""
        root = os.path.join(self.directory, "manifests")
        for name in list_directory(root):
            registry_id = registry_id_of(name)
            if registry_id is None:
                continue
            for algorithm in list_directory(os.path.join(root, name)):
                for encoded in list_directory(os.path.join(root, name, algorithm)):
                    try:
                        yield registry_id, Digest.parse(f"{algorithm}:{encoded}")
                    except InvalidDigest:
                        continue

    def tags_on_disk(self) -> Iterator[tuple[str, str, str]]:
        """(registry id, upstream name, tag) of every tag resolution kept on disk."""
        root = os.path.join(self.directory, "tags")
        for directory, _, files in os.walk(root):
            relative = os.path.relpath(directory, root).split(os.sep)
            if len(relative) < 2:
                continue
            registry_id, upstream_name = registry_id_of(relative[0]), "/".join(relative[1:])
            if registry_id is None:
                continue
            tags = {tag for name in files if (tag := _tag_of_file(name)) is not None}
            for tag in sorted(tags):
                yield registry_id, upstream_name, tag

    def set_tag(self, registry_id: str, upstream_name: str, tag: str, digest: Digest, media_type: str) -> None:
        key = (registry_id, upstream_name, tag)
        previous = self._tags.get(key)
        resolution = TagResolution(digest, media_type, self._clock.seconds())
        self._remember_tag(key, resolution)
        if (
            previous is not None and previous.digest == digest and previous.media_type == media_type
            and previous.moved_to is None
        ):
            # Only the confirmation time moved: not worth a disk write per pull.
            # After a restart the older time just makes the tag look stale sooner.
            self._used(self._tag_path(*key))
            return
        self._write_tag(key, resolution)

    def moved_tag(self, registry_id: str, upstream_name: str, tag: str, digest: Digest, media_type: str) -> None:
        """
        The upstream says C{tag} moved to C{digest}, a manifest not cached
        yet: keep what it resolves to as its fallback, due for revalidation
        at its next use, until that manifest is cached.
        """
        resolution = self.tag(registry_id, upstream_name, tag)
        if resolution is None:
            return
        key = (registry_id, upstream_name, tag)
        moved = TagResolution(
            resolution.digest, resolution.media_type, 0.0, digest, media_type, self._clock.seconds()
        )
        self._remember_tag(key, moved)
        self._write_tag(key, moved)

    def drop_tag(self, registry_id: str, upstream_name: str, tag: str) -> None:
        key = (registry_id, upstream_name, tag)
        self._tags.pop(key, None)
        _unlink(self._tag_path(*key))
        _unlink(self._legacy_tag_path(*key))

    def registry_urls(self) -> dict[str, str]:
        """The URL each registry id had when this cache last saw it."""
        try:
            with open(os.path.join(self.directory, "registries.json"), "rb") as f:
                seen = json.loads(f.read())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in seen.items() if isinstance(v, str)} if isinstance(seen, dict) else {}

    def set_registry_urls(self, urls: dict[str, str]) -> None:
        self._write_atomically(os.path.join(self.directory, "registries.json"), json.dumps(urls).encode())

    def forget_names(self, registry_id: str) -> None:
        """
        What a registry showed under names (tags, tag lists, referrers): its
        id now names another registry.  Manifests stay: a digest names its
        content, and one is served under a name only once that is shown.
        """
        for key in [key for key in self._tags if key[0] == registry_id]:
            del self._tags[key]
        for kind in ("tags", "taglists", "referrers"):
            shutil.rmtree(os.path.join(self.directory, kind, registry_directory(registry_id)), ignore_errors=True)

    # -- tag lists ---------------------------------------------------------

    def _tag_list_path(self, registry_id: str, upstream_name: str) -> str:
        # "@" never occurs in a repository name, so this cannot collide with
        # the directory of a longer name.
        return os.path.join(self.directory, "taglists", registry_directory(registry_id), upstream_name, "@list.json")

    def has_tag_list(self, registry_id: str, upstream_name: str) -> bool:
        """Whether a whole tag list is kept (without reading it)."""
        return os.path.isfile(self._tag_list_path(registry_id, upstream_name))

    def tag_list(self, registry_id: str, upstream_name: str) -> list[str] | None:
        path = self._tag_list_path(registry_id, upstream_name)
        try:
            with open(path, "rb") as f:
                tags = json.loads(f.read())
        except (OSError, ValueError):
            return None
        self._used(path)
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return None
        return tags

    def set_tag_list(self, registry_id: str, upstream_name: str, tags: list[str]) -> None:
        data = json.dumps(tags).encode()
        path = self._tag_list_path(registry_id, upstream_name)
        self._write_unless_same(path, data)

    def drop_tag_list(self, registry_id: str, upstream_name: str) -> None:
        _unlink(self._tag_list_path(registry_id, upstream_name))

    # -- referrers ---------------------------------------------------------

    def _referrers_path(self, registry_id: str, upstream_name: str, digest: Digest, artifact_type: str | None) -> str:
        name = f"@{digest.algorithm}-{digest.encoded}"
        if artifact_type is not None:
            name += "-" + sha256_digest(artifact_type.encode()).encoded[:32]
        return os.path.join(self.directory, "referrers", registry_directory(registry_id), upstream_name, name + ".json")

    def referrers(
        self, registry_id: str, upstream_name: str, digest: Digest, artifact_type: str | None
    ) -> tuple[bytes, str, str | None] | None:
        """The upstream's last referrers answer: (body, content type, filters applied)."""
        path = self._referrers_path(registry_id, upstream_name, digest, artifact_type)
        try:
            with open(path, "rb") as f:
                stored = json.loads(f.read())
            body = base64.b64decode(stored["body"], validate=True)
            content_type, filters = stored["content_type"], stored.get("filters")
        except (OSError, ValueError, KeyError, TypeError, binascii.Error):
            return None
        if not isinstance(content_type, str) or not (filters is None or isinstance(filters, str)):
            return None
        self._used(path)
        return body, content_type, filters

    def set_referrers(
        self,
        registry_id: str,
        upstream_name: str,
        digest: Digest,
        artifact_type: str | None,
        answer: tuple[bytes, str, str | None],
    ) -> None:
        body, content_type, filters = answer
        data = json.dumps(
            {"body": base64.b64encode(body).decode("ascii"), "content_type": content_type, "filters": filters}
        ).encode()
        path = self._referrers_path(registry_id, upstream_name, digest, artifact_type)
        self._write_unless_same(path, data)

    def drop_referrers(self, registry_id: str, upstream_name: str, digest: Digest, artifact_type: str | None) -> None:
        _unlink(self._referrers_path(registry_id, upstream_name, digest, artifact_type))

    # -- files -------------------------------------------------------------

    def _write_unless_same(self, path: str, data: bytes) -> None:
        """Write C{data} at C{path}, or only mark it used when it holds that already."""
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    self._used(path)
                    return
        except OSError:
            pass
        self._write_atomically(path, data)

    def _write_atomically(self, path: str, data: bytes) -> None:
        temp = f"{path}.{secrets.token_hex(6)}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
            self._write_error_logged = False
        except OSError as e:
            _unlink(temp)
            if not self._write_error_logged:
                self._write_error_logged = True
                log.error("cannot write manifest cache under {directory}: {error}", directory=self.directory, error=str(e))


def _tag_of_file(name: str) -> str | None:
    """The tag a file under tags/ is for: "@<tag>.json", or "<tag>.json" as earlier versions named it."""
    if not name.endswith(".json") or len(name) <= len(".json"):
        return None
    tag = name[: -len(".json")]
    return tag[1:] if tag.startswith("@") else tag


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def file_mtime(path: str) -> float:
    """A file's modification time; 0 when it cannot be read."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def list_directory(path: str) -> list[str]:
    """A directory's names; none when it cannot be read."""
    try:
        return os.listdir(path)
    except OSError:
        return []
