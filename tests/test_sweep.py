"""
The sweep of what the cache keeps besides blobs: manifests, tag
resolutions, tag lists and repository links, on a real directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from twisted.internet.task import Clock

from cargobay.cache import BlobCache, BlobKey
from cargobay.links import RepositoryLinks
from cargobay.manifest_store import Manifest, ManifestStore
from cargobay.reference import Digest
from cargobay.sweep import MetadataSweeper
from fakes import cache_by_hand

DAY = 86400.0


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


class World:
    def __init__(self, tmp_path, max_age: float = DAY) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # files' times are wall-clock times
        root = str(tmp_path / "cache")
        self.cache = BlobCache(root, 10**9, max_age, self.clock)
        self.cache.open()
        self.store = ManifestStore(root, self.clock)
        self.store.touch_every = max_age / 8
        self.links_dir = os.path.join(root, "links")
        self.links = RepositoryLinks(self.links_dir)
        self.sweeper = MetadataSweeper(self.cache, self.store, self.links, self.links_dir, self.clock)

    def manifest(self, text: str) -> Manifest:
        content = json.dumps({"schemaVersion": 2, "text": text}).encode()
        manifest = Manifest(content, "application/vnd.oci.image.manifest.v1+json", digest_of(content))
        self.store.put("up", manifest)
        return manifest

    def blob(self, data: bytes) -> BlobKey:
        return cache_by_hand(self.cache, data)

    def sweep(self) -> None:
        for _ in self.sweeper._work(self.clock.seconds()):
            pass

    def age(self, path: str, seconds: float) -> None:
        then = self.clock.seconds() - seconds
        os.utime(path, (then, then))

    def files(self, kind: str) -> list[str]:
        return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(self.store.directory, kind)) for f in fs]


def test_manifests_tags_and_tag_lists_unused_for_longer_than_the_age_limit_go(tmp_path):
    world = World(tmp_path)
    old, recent = world.manifest("old"), world.manifest("recent")
    world.store.set_tag("up", "team/app", "v1", old.digest, old.media_type)
    world.store.set_tag("up", "team/app", "v2", recent.digest, recent.media_type)
    world.store.set_tag_list("up", "team/app", ["v1", "v2"])
    world.links.add("up", "team/app", [old.digest, recent.digest])
    for path in world.files("manifests") + world.files("tags") + world.files("taglists"):
        if "v2" not in path and str(recent.digest.encoded) not in path:
            world.age(path, 2 * DAY)
    world.store = world.sweeper._store = ManifestStore(world.store.directory, world.clock)  # a restart: nothing in memory
    world.sweep()
    assert world.store.get("up", old.digest) is None and world.store.get("up", recent.digest) is not None
    assert world.store.tag("up", "team/app", "v1") is None and world.store.tag("up", "team/app", "v2") is not None
    assert world.store.tag_list("up", "team/app") is None
    # The gone manifest's links went with it.
    assert not world.links.known("up", "team/app", old.digest) and world.links.known("up", "team/app", recent.digest)


def test_what_is_used_is_marked_used_and_stays(tmp_path):
    world = World(tmp_path)
    manifest = world.manifest("in use")
    world.store.set_tag("up", "team/app", "latest", manifest.digest, manifest.media_type)
    for path in world.files("manifests") + world.files("tags"):
        world.age(path, 2 * DAY)
    # Served from memory, as a busy tag is: its files' times move on anyway.
    assert world.store.tag("up", "team/app", "latest") is not None
    assert world.store.get("up", manifest.digest) is not None
    world.sweep()
    assert world.files("manifests") and world.files("tags")


def test_in_memory_entries_of_swept_files_are_forgotten(tmp_path):
    world = World(tmp_path)
    manifest = world.manifest("gone")
    world.store.set_tag("up", "team/app", "latest", manifest.digest, manifest.media_type)
    world.clock.advance(2 * DAY)  # (memory still holds both; nothing touched them)
    world.sweeper._store.touch_every = 10 * DAY
    for path in world.files("manifests") + world.files("tags"):
        world.age(path, 2 * DAY)
    world.sweep()
    assert world.store.tag("up", "team/app", "latest") is None
    assert world.store.get("up", manifest.digest) is None


def test_links_of_digests_not_cached_go_after_a_grace(tmp_path):
    world = World(tmp_path)
    cached = world.blob(b"a layer that was pulled")
    manifest = world.manifest("kept")
    never_pulled = digest_of(b"a layer nobody pulled")
    just_named = digest_of(b"a layer named a moment ago")
    coming = digest_of(b"a layer being downloaded for an hour")
    world.sweeper.downloading = lambda key: key.digest == coming
    world.links.add("up", "team/app", [cached.digest, manifest.digest, never_pulled, coming])
    for digest in (cached.digest, manifest.digest, never_pulled, coming):
        world.age(os.path.join(world.links_dir, "up", "sha256", digest.encoded[:2], digest.encoded), 2 * 3600)
    world.links.add("up", "team/app", [just_named])
    generation = world.links.generation
    world.sweep()
    links = RepositoryLinks(world.links_dir)  # from disk, not memory
    assert links.known("up", "team/app", cached.digest) and links.known("up", "team/app", manifest.digest)
    assert links.known("up", "team/app", just_named) and links.known("up", "team/app", coming)
    assert not links.known("up", "team/app", never_pulled)
    assert not world.links.known("up", "team/app", never_pulled)
    # What manifests linked is worked out again: the layer may come under
    # another name, and a manifest here still names it under this one.
    assert world.links.generation != generation


def test_leftovers_of_interrupted_writes_go_and_empty_directories_too(tmp_path):
    world = World(tmp_path)
    manifest = world.manifest("x")
    world.store.set_tag("up", "team/gone", "v1", manifest.digest, manifest.media_type)
    stray = os.path.join(world.store.directory, "tags", "up", "team", "app", "v9.json.0123456789ab.tmp")
    os.makedirs(os.path.dirname(stray))
    open(stray, "wb").close()
    world.age(stray, 2 * 3600)
    fresh = stray.replace("0123", "4567")
    open(fresh, "wb").close()
    for path in world.files("tags"):
        if path.endswith("v1.json"):
            world.age(path, 2 * DAY)
    # (And the one a write of registries.json left beside it.)
    registries = os.path.join(world.store.directory, "registries.json.0123456789ab.tmp")
    open(registries, "wb").close()
    world.age(registries, 2 * 3600)
    world.sweep()
    assert not os.path.exists(stray) and os.path.exists(fresh) and not os.path.exists(registries)
    assert not os.path.exists(os.path.join(world.store.directory, "tags", "up", "team", "gone"))
    assert world.sweeper.removed == 3


def test_no_age_limit_keeps_manifests_and_tags(tmp_path):
    world = World(tmp_path, max_age=0)
    world.store.touch_every = 3600
    manifest = world.manifest("forever")
    world.store.set_tag("up", "team/app", "v1", manifest.digest, manifest.media_type)
    for path in world.files("manifests") + world.files("tags"):
        world.age(path, 400 * DAY)
    world.sweep()
    assert len(world.files("manifests")) == 1 and len(world.files("tags")) == 1
