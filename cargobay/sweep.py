"""
What the cache keeps besides blobs, swept when it goes unused.

The blob cache's limits cover blobs; manifests, tag resolutions and tag
lists are small, but a mirror of a whole registry meets new ones every day,
and would keep them all.  Each is removed once unused (its file's
modification time, which the store moves on when it is used) for longer
than the cache's age limit.  A digest's repository links go once neither a
blob nor a manifest of that digest is cached: links for the layers a
manifest names are made before the layers are pulled, and many never are.
The temporary files of writes cut short (a crash) go after an hour.

The sweep runs on the reactor a batch of files at a time, every few
minutes, from the cache's maintenance timer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cargobay.cache import BlobCache, BlobKey
from cargobay.links import RepositoryLinks
from cargobay.manifest_store import ManifestStore, file_mtime, list_directory
from cargobay.reference import Digest, InvalidDigest, registry_id_of

log = Logger()

#: Files looked at per reactor turn.
BATCH = 500
#: How long a temporary file of an interrupted write is left.
STRAY_AFTER = 3600.0
#: The longest between two sweeps.
SWEEP_EVERY = 600.0
#: How long links of a digest that is not cached are kept (a download in
#: progress, the layers of a manifest just pulled), at most.
LINK_GRACE = 3600.0


class MetadataSweeper:
    def __init__(self, cache: BlobCache, store: ManifestStore, links: RepositoryLinks, links_directory: str, clock: Any) -> None:
        self._cache = cache
        self._store = store
        self._links = links
        self._links_directory = links_directory
        self._clock = clock
        #: Whether a blob is being downloaded (its links stay).
        self.downloading: Callable[[BlobKey], bool] = lambda key: False
        self._running: Deferred[None] | None = None
        self._last: float | None = None
        #: What the last sweep removed (for tests and the log).
        self.removed = 0

    @property
    def max_age(self) -> float:
        return self._cache.max_age_seconds

    def _every(self) -> float:
        return min(SWEEP_EVERY, self.max_age / 4) if self.max_age > 0 else SWEEP_EVERY

    def maybe_run(self) -> Deferred[None] | None:
        """Sweep if the last sweep is long enough ago (and none runs)."""
        now = self._clock.seconds()
        if self._running is not None or (self._last is not None and now - self._last < self._every()):
            return None
        return self.run()

    def run(self) -> Deferred[None]:
        if self._running is not None:
            return self._running
        now = self._last = self._clock.seconds()
        self.removed = 0

        def done(result: object) -> object:
            self._running = None
            if self.removed:
                log.info("swept {count} unused manifests, tags and links from the cache", count=self.removed)
            return result

        d: Deferred[None] = task.cooperate(self._work(now)).whenDone()  # type: ignore[assignment]
        self._running = d
        d.addBoth(done)
        return d

    def _work(self, now: float) -> Iterator[None]:
        store_root = self._store.directory
        looked = 0
        for kind in ("manifests", "tags", "taglists", "referrers"):
            for found in _files(os.path.join(store_root, kind), prune=kind != "manifests"):
                looked += 1
                if looked % BATCH == 0:
                    yield None
                if found is None:
                    continue
                path, mtime = found
                if path.endswith(".tmp"):
                    if now - mtime > STRAY_AFTER:
                        self._remove(path)
                elif self.max_age > 0 and now - mtime > self.max_age and file_mtime(path) == mtime:
                    self._remove(path)
                    if kind == "manifests":
                        self._forget_links_of(path)
        # A write of registries.json that a crash cut short leaves its temp file beside it.
        for name in list_directory(store_root):
            if name.startswith("registries.json.") and name.endswith(".tmp"):
                path = os.path.join(store_root, name)
                if now - file_mtime(path) > STRAY_AFTER:
                    self._remove(path)
        grace = min(LINK_GRACE, self.max_age) if self.max_age > 0 else LINK_GRACE
        for registry_id, digest, directory in _link_directories(self._links_directory):
            looked += 1
            if looked % BATCH == 0:
                yield None
            if now - file_mtime(directory) <= grace:
                continue
            key = BlobKey(registry_id, digest)
            if self._cache.lookup(key) is not None or self._store.has(registry_id, digest) or self.downloading(key):
                continue
            self._links.forget(registry_id, digest)
            self.removed += 1

    def _remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            return
        self._store.forget_file(path)
        self.removed += 1

    def _forget_links_of(self, path: str) -> None:
        """A manifest went: so do the links of its digest (not of what it references)."""
        name, algorithm, encoded = path.split(os.sep)[-3:]
        registry_id = registry_id_of(name)
        try:
            digest = Digest.parse(f"{algorithm}:{encoded}")
        except InvalidDigest:
            return
        if registry_id is None:
            return
        if self._cache.lookup(BlobKey(registry_id, digest)) is None:
            self._links.forget(registry_id, digest)


def _files(root: str, prune: bool) -> Iterator[tuple[str, float] | None]:
    """
    (path, modification time) of every file below C{root}, and L{None} for
    each directory looked at (so that the caller may pause in a directory of
    no files); with C{prune}, directories found empty are removed (but
    C{root}).  Directories are read lazily: a large one is not read whole
    in one reactor turn.
    """
    stack = [root]
    visited: list[str] = []
    while stack:
        directory = stack.pop()
        visited.append(directory)
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            yield entry.path, entry.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
        except OSError:
            continue
        yield None
    if prune:
        for directory in reversed(visited[1:]):
            try:
                os.rmdir(directory)
            except OSError:
                pass
            yield None


def _link_directories(root: str) -> Iterator[tuple[str, Digest, str]]:
    """(registry id, digest, directory) of every digest that has links."""
    for name in list_directory(root):
        registry_id = registry_id_of(name)
        if registry_id is None:
            continue
        for algorithm in list_directory(os.path.join(root, name)):
            for fan in list_directory(os.path.join(root, name, algorithm)):
                for encoded in list_directory(os.path.join(root, name, algorithm, fan)):
                    try:
                        digest = Digest.parse(f"{algorithm}:{encoded}")
                    except InvalidDigest:
                        continue
                    yield registry_id, digest, os.path.join(root, name, algorithm, fan, encoded)
