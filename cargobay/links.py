"""
Which upstream repositories a cached digest is known to belong to.

The cache keeps one copy of a manifest or blob per registry and digest,
whichever repository it came from.  Served as is, a token for one repository
would read another's content by digest.  The upstream registry is the judge
(as in distribution's own repository links): a digest is served under an
upstream name only once that registry has shown it there, by sending it for
that name, by a manifest of that name that references it, or by answering a
HEAD for it.  cargobay asks that HEAD the first time one name wants what
another name brought into the cache.

Links are kept as empty files, ``links/<registry>/<algorithm>/<fan>/<hex>/
<name with '/' as '+'>``, so that pulls that worked keep working after a
restart with the upstream down; a blob's links go when it is evicted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable

from twisted.logger import Logger

from cargobay.reference import Digest, registry_directory

log = Logger()

#: Digests whose known names are kept in memory (the rest are on disk).
MEMORY_DIGESTS = 20_000
#: The file that marks a digest cached before links were kept (no name
#: holds a "." at its start).
LEGACY = ".legacy"


def upstream_unavailable(error: object) -> bool:
    """An upstream answer that says nothing about a repository's content."""
    status = getattr(error, "status", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


class RepositoryLinks:
    def __init__(self, directory: str | None) -> None:
        """
        @param directory: where the links are kept; L{None} keeps them in
            memory only (tests).
        """
        self._directory = directory
        self._names: OrderedDict[tuple[str, Digest], set[str]] = OrderedDict()
        self._write_error_logged = False
        #: Moves on whenever links are forgotten: what was worked out from
        #: the links before (the references a manifest linked) must be again.
        self.generation = 0

    def _path(self, registry_id: str, digest: Digest, name: str | None = None) -> str | None:
        if self._directory is None:
            return None
        path = os.path.join(
            self._directory, registry_directory(registry_id), digest.algorithm, digest.encoded[:2], digest.encoded
        )
        return path if name is None else os.path.join(path, name.replace("/", "+"))

    def _remembered(self, registry_id: str, digest: Digest) -> set[str]:
        key = (registry_id, digest)
        names = self._names.get(key)
        if names is None:
            names = self._names[key] = set()
            if len(self._names) > MEMORY_DIGESTS:
                self._names.popitem(last=False)
        else:
            self._names.move_to_end(key)
        return names

    def known(self, registry_id: str, upstream_name: str, digest: Digest) -> bool:
        """Whether the registry has shown C{digest} under C{upstream_name}."""
        names = self._remembered(registry_id, digest)
        if upstream_name in names:
            return True
        path = self._path(registry_id, digest, upstream_name)
        if path is not None and os.path.exists(path):
            names.add(upstream_name)
            return True
        return False

    def add(self, registry_id: str, upstream_name: str, digests: Iterable[Digest]) -> None:
        """The registry has shown these digests under C{upstream_name}."""
        for digest in digests:
            names = self._remembered(registry_id, digest)
            if upstream_name in names:
                continue
            names.add(upstream_name)
            error = _touch(self._path(registry_id, digest, upstream_name))
            if error is None:
                self._write_error_logged = False  # (the next problem is logged again)
            elif not self._write_error_logged:
                # Remembered in memory still; after a restart the upstream is
                # asked again.
                self._write_error_logged = True
                log.warn("cannot record repository links in the cache: {error}", error=error)

    def mark_legacy(self, registry_id: str, digest: Digest) -> None:
        """
        C{digest} was in the cache before links were kept: while the upstream
        is unavailable (and only then), it is served under any name of its
        registry, as it was before, rather than not at all.
        """
        _touch(self._path(registry_id, digest, LEGACY))

    def legacy(self, registry_id: str, digest: Digest) -> bool:
        path = self._path(registry_id, digest, LEGACY)
        return path is not None and os.path.exists(path)

    def forget(self, registry_id: str, digest: Digest) -> None:
        """
        The digest left the cache (or never came: links of a layer nobody
        pulled): so do its links.  What was worked out from links is worked
        out again: the blob may come under another name, which links it
        only there, while a manifest cached here still references it.
        """
        self._names.pop((registry_id, digest), None)
        self.generation += 1
        path = self._path(registry_id, digest)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


    def forget_registry(self, registry_id: str) -> None:
        """Every link of a registry (its id now names another registry)."""
        for key in [key for key in self._names if key[0] == registry_id]:
            del self._names[key]
        self.generation += 1
        if self._directory is not None:
            shutil.rmtree(os.path.join(self._directory, registry_directory(registry_id)), ignore_errors=True)


def _touch(path: str | None) -> OSError | None:
    """Create an empty file (and its directory); the error, if it could not."""
    if path is None:
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        return e
    return None


def referenced_digests(content: bytes, children: bool = True) -> list[Digest]:
    """
    The digests a manifest or index names: its config, layers and child
    manifests (and a schema 1 manifest's layers).  A registry accepts a
    manifest only once those are in its repository (but for foreign layers,
    which carry C{urls}: those are left out).  Without C{children}, an
    index's manifests are left out too: a registry may take an index whose
    manifests it does not hold (distribution 3's sparse indexes), so they
    prove nothing of the repository.
    """
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):  # (JSON nested too deep for Python)
        return []
    if not isinstance(document, dict):
        return []
    texts: list[object] = []
    config = document.get("config")
    if isinstance(config, dict):
        texts.append(config.get("digest"))
    for field in ("layers", "manifests", "blobs") if children else ("layers", "blobs"):
        items = document.get(field)
        if isinstance(items, list):
            # A descriptor with "urls" (a foreign layer) is one the registry
            # does not check its repository for: anyone could name anything.
            texts += [item.get("digest") for item in items if isinstance(item, dict) and not item.get("urls")]
    layers = document.get("fsLayers")
    if isinstance(layers, list):
        texts += [item.get("blobSum") for item in layers if isinstance(item, dict)]
    digests = []
    for text in texts:
        if isinstance(text, str):
            try:
                digests.append(Digest.parse(text))
            except ValueError:
                pass
    return digests
