"""
The blob cache on disk.

Knows files and nothing about HTTP.  Layout under the cache directory::

    blobs/<registry id>/<algorithm>/<first two hex>/<hex>-<size>
    tmp/<random>                       (downloads in progress)

A file exists under C{blobs/} only once its content was verified against its
digest and fsynced: the name is reached by an atomic rename.  The size is part
of the name so that a file damaged on disk (truncated, grown) is noticed when it
is opened, also after a restart.  Last use is the file's mtime (updated at most
once a minute per entry), so least-recently-used order survives restarts.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from cargobay.reference import Digest, registry_directory, registry_id_of

log = Logger()

#: How often (seconds) a cache hit updates the entry's mtime on disk.
TOUCH_INTERVAL = 60.0
#: A hit on a file not checked against its digest for this long (or since
#: start-up) puts it first in the scrub's next run: a file damaged in place
#: is served until then, not until the scrub comes round to it (hours, in
#: a large cache).
RECHECK_SERVED_AFTER = 3600.0
#: Files waiting for such a check, at most (the rest wait for their turn).
MAX_RECHECK_QUEUE = 4096
#: Entries removed per reactor turn while evicting.
EVICTION_BATCH = 256
#: With direct writes, the file is written in whole blocks of this size at
#: offsets of its multiples (what O_DIRECT asks of every Linux filesystem
#: that has it); the last, partial block waits in memory for the next bytes.
DIRECT_BLOCK = 4096
#: Direct writes go out from buffers of this size: one transparent huge
#: page, where the kernel gives one (see L{_DirectBuffers}).
DIRECT_BUFFER = 2 * 1024 * 1024
#: Direct-write buffers kept for the next downloads once their own ended.
DIRECT_BUFFERS_KEPT = 8


class _DirectBuffers:
    """
    The buffers direct writes go out from, reused from one download to the
    next.  Each is private anonymous memory of one huge page's size, asked
    to be a transparent huge page (Linux places mappings of that size on a
    huge-page boundary): the kernel then pins one page per write rather
    than one per 4 KiB, and the disk gets one segment rather than hundreds.
    On this VM's virtio disk, 1 GiB of 1 MiB direct writes took 0.027 CPU-s
    from a huge page against 0.073 from small ones (shared memory, as
    Python's anonymous mmap is by default, never gets huge pages).
    """

    def __init__(self) -> None:
        self._kept: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        try:
            return self._kept.pop()
        except IndexError:
            pass
        buffer = mmap.mmap(-1, DIRECT_BUFFER, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buffer.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # no transparent huge pages here: small pages it is
        return buffer

    def give_back(self, buffer: mmap.mmap) -> None:
        """
        C{buffer} is free for another download: nothing reads or writes it
        any more (views of it may still exist, unused).
        """
        # (list.append and pop are atomic: writing threads give back too.)
        if len(self._kept) < DIRECT_BUFFERS_KEPT:
            self._kept.append(buffer)
            return
        try:
            buffer.close()
        except BufferError:
            pass  # views of it remain: it goes once they do


_direct_buffers = _DirectBuffers()


@dataclass(frozen=True)
class BlobKey:
    registry_id: str
    digest: Digest

    def relative_dir(self) -> str:
        return os.path.join(
            "blobs", registry_directory(self.registry_id), self.digest.algorithm, self.digest.encoded[:2]
        )


@dataclass
class Entry:
    key: BlobKey
    path: str
    size: int
    last_used: float
    readers: int = 0
    touched: float = 0.0
    #: When the scrubber last checked the file against its digest (0: never
    #: since start-up; entries written by this process count as checked).
    verified_at: float = 0.0


@dataclass
class CacheStats:
    evictions: int = 0
    write_errors: int = 0


class BlobStore(Protocol):
    """
    What the blob service needs from a store of verified blobs: the narrow
    interface a shared backend (an S3-compatible object store for several
    cargobay nodes) would implement beside the local disk.
    """

    max_size_bytes: int
    stats: CacheStats

    def lookup(self, key: BlobKey) -> Entry | None:
        """The entry of a cached blob, or None."""

    def open_entry(self, key: BlobKey) -> tuple[Entry, IO[bytes]] | None:
        """A readable, whole, verified blob, or None; call release() after."""

    def release(self, entry: Entry) -> None:
        """The reader of an entry is done with it."""

    def begin(self, key: BlobKey, size: int | None = None) -> BlobWriter | None:
        """A writer whose commit() makes a verified entry, or None to stream uncached."""

    def size_limit(self) -> int:
        """What the cache may hold now (C{max_size_bytes}, or less on a disk short of room)."""


class BlobWriter:
    """
    A temporary file that becomes a cache entry on L{commit}.

    With C{direct}, the file is written with C{O_DIRECT} where the filesystem
    allows it: the bytes go from one reused buffer to the disk rather than
    being copied into fresh page-cache pages, which costs several times the
    CPU of the copy itself on a virtual machine whose memory the host lends
    lazily (see the README's "How the cache works").  L{sync_raw} reads it
    back into the page cache once the clients have their bytes.
    """

    def __init__(
        self, cache: BlobCache, key: BlobKey, path: str, fileobj: IO[bytes], direct: bool = False
    ) -> None:
        self._cache = cache
        self.key = key
        self.path = path
        self._file: IO[bytes] | None = fileobj
        self._fd = fileobj.fileno()
        self.size = 0
        #: The blob's size, when the upstream said.
        self.expected: int | None = None
        #: Where the next bytes go in the file.
        self._end = 0
        #: The O_DIRECT descriptor, and its buffer: C{_held} bytes at its start
        #: belong at C{_end} but are not yet in the file (less than a block).
        self._direct_fd: int | None = None
        self._buffer: mmap.mmap | None = None
        self._held = 0
        #: Where the part of the file written past the page cache ends.
        self._direct_end = 0
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                pass  # the filesystem has no O_DIRECT (tmpfs before Linux 6.6): the page cache it is

    def write_raw(self, data: bytes | memoryview) -> int:
        """
        Write to the file and nothing else (no bookkeeping), so that a worker
        thread may call it; the reactor then calls L{wrote} or L{failed} with
        what it returns: how many more bytes the file now holds.  That is
        all of C{data} but with direct writes, which keep a last partial
        block back until more comes or L{flush_raw}.
        Unbuffered: followers of a download read this file through their
        own descriptors and must see every byte counted so far.
        """
        if self._direct_fd is not None:
            return self._write_direct(data)
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self._end)
            view = view[written:]
            self._end += written
        return len(data)

    def _write_direct(self, data: bytes | memoryview) -> int:
        if self._buffer is None:
            self._buffer = _direct_buffers.take()
        added = 0
        with memoryview(self._buffer) as view, memoryview(data) as rest:
            while rest:
                # Behind what the buffer holds back, as much as it takes; out
                # in whole blocks, and the last partial block stays for what
                # comes next.
                held = self._held
                total = held + min(len(rest), len(view) - held)
                view[held:total] = rest[: total - held]
                rest = rest[total - held :]
                whole = total - total % DIRECT_BLOCK
                if not self._pwrite_direct(view, whole):
                    pending = view[:total].tobytes() + rest.tobytes()
                    break
                added += whole
                self._held = total - whole
                view[: self._held] = view[whole:total]
            else:
                return added
        return added + self._without_direct(pending)

    def _without_direct(self, pending: bytes) -> int:
        """
        The filesystem took O_DIRECT at open but not for writing: C{pending}
        (what was held back included) and all that follows go through the
        page cache.
        """
        self._held = 0
        self._stop_direct()
        return self.write_raw(pending)

    @property
    def direct(self) -> bool:
        """Whether the file is still written with C{O_DIRECT}."""
        return self._direct_fd is not None

    def write_block(self, block: memoryview, start: int, end: int, fresh: bool) -> int:
        """
        L{write_raw} of C{block[start:end]}, where C{block} is a buffer of
        whole blocks received into so that C{start} is where the file's end
        falls in a block: the bytes go to the disk from there, not copied
        first.  What the file's last partial block holds goes in front of
        them: it is in C{block} already (the bytes before C{start} came
        through this same buffer) unless C{fresh}, when it is put there.
        """
        held = self._held
        if self._direct_fd is None or start % DIRECT_BLOCK != held:
            return self.write_raw(block[start:end])
        if self._buffer is None:
            self._buffer = _direct_buffers.take()
        first = start - held
        if fresh and held:
            block[first:start] = self._buffer[:held]
        whole = end - end % DIRECT_BLOCK
        added = 0
        if whole > first:
            if not self._pwrite_direct(block[first:whole], whole - first):
                return self._without_direct(block[first:end].tobytes())
            added, first = whole - first, whole
        # The last partial block, as every direct write keeps it.
        self._held = end - first
        self._buffer[: self._held] = block[first:end]
        return added

    def _pwrite_direct(self, view: memoryview, length: int) -> bool:
        """
        Write C{view[:length]} (whole blocks) at the file's end; False if the
        filesystem refuses direct writes (before any of these bytes went).
        """
        done = 0
        while done < length:
            try:
                written = os.pwrite(self._direct_fd, view[done:length], self._end)  # type: ignore[arg-type]
            except OSError as e:
                if e.errno != errno.EINVAL or done:
                    raise
                return False
            if written % DIRECT_BLOCK:
                raise OSError(errno.EIO, f"a direct write of {self.path} stopped mid-block")
            done += written
            self._end += written
            self._direct_end = self._end
        return True

    def flush_raw(self) -> int:
        """
        Write what direct writes kept back (the body has ended) and go on
        without O_DIRECT; returns how many more bytes the file now holds.
        """
        held = self._held
        if held:
            assert self._buffer is not None
            self._held = 0
            tail = self._buffer[:held]
            self._stop_direct()
            return self.write_raw(tail)
        self._stop_direct()
        return 0

    def drop_held(self) -> int:
        """Forget what direct writes kept back; returns how many bytes that was."""
        held, self._held = self._held, 0
        return held

    def _stop_direct(self) -> None:
        fd, self._direct_fd = self._direct_fd, None
        buffer, self._buffer = self._buffer, None
        if fd is not None:
            os.close(fd)
        if buffer is not None:
            _direct_buffers.give_back(buffer)

    def length(self) -> int | None:
        """How long the file is now; None once it is committed or aborted."""
        if self._file is None:
            return None
        try:
            return os.fstat(self._fd).st_size
        except OSError:
            return None

    def resume_at(self, offset: int) -> None:
        """
        Go on writing at C{offset}: what the file holds before it is kept
        (and must be part of what gets verified), anything after is dropped.
        """
        os.ftruncate(self._fd, offset)
        self._end = self.size = offset
        self._held = 0
        if offset % DIRECT_BLOCK:
            self._stop_direct()  # direct writes start on a block: this one goes through the page cache

    def sync_raw(self) -> None:
        """
        fsync, from a worker thread: it can take a while.  What direct writes
        put past the page cache is then read back into it, so that the next
        pull of the blob finds it in memory: the clients of this download
        have their bytes already, and the first touch of fresh pages, the
        cost direct writes kept off their path, is paid here instead.
        """
        os.fsync(self._fd)
        if self._direct_end:
            chunk = bytearray(1 << 20)
            read = 0
            with open(self.path, "rb", buffering=0) as f:
                while read < self._direct_end and (got := f.readinto(chunk)):
                    read += got

    def wrote(self, count: int) -> None:
        self.size += count

    def failed(self, error: OSError) -> None:
        self.abort()
        self._cache.note_write_error(error, self.expected or self.size)

    def commit(self, synced: bool = False) -> Entry | None:
        """
        Make the file a cache entry: fsync it (unless L{sync_raw} did) and
        rename it into place.  Its content must already have been verified.
        Returns L{None} (and leaves nothing behind) when the disk refuses.
        """
        assert self._file is not None
        fileobj, self._file = self._file, None
        self._stop_direct()
        try:
            if not synced:
                os.fsync(fileobj.fileno())
            fileobj.close()
            return self._cache._adopt(self.key, self.path, self.size)
        except OSError as e:
            fileobj.close()
            _unlink(self.path)
            self._cache.note_write_error(e)
            return None

    def abort(self) -> None:
        if self._file is not None:
            fileobj, self._file = self._file, None
            self._stop_direct()
            try:
                fileobj.close()
            except OSError:
                pass
            _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class BlobCache:
    def __init__(
        self,
        directory: str,
        max_size_bytes: int,
        max_age_seconds: float,
        clock: Any,
        direct_writes: bool = False,
    ) -> None:
        self.directory = os.path.abspath(directory)
        #: Whether downloads write their files with O_DIRECT (see L{BlobWriter}).
        self.direct_writes = direct_writes
        self.max_size_bytes = max_size_bytes
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._entries: dict[BlobKey, Entry] = {}
        self.total_size = 0
        self.stats = CacheStats()
        self._write_error_logged = False
        self._evicting: Deferred[None] | None = None
        self._scrubbing = False
        #: Whether a hit puts its file first in the scrub's next run
        #: (L{RECHECK_SERVED_AFTER}); off with the scrub.
        self.recheck_served = True
        #: Served files waiting for that check.
        self._to_recheck: dict[BlobKey, None] = {}
        #: Set when an eviction was asked for while one ran: it runs again.
        self._evict_again = False
        #: Bytes a download that met a full disk wanted: the next eviction
        #: makes that much room.
        self._room_wanted = 0
        #: Called with each evicted entry (metrics).
        self.on_evict: Callable[[Entry], None] | None = None
        # One step of background work (an eviction batch, a scrub chunk) per
        # reactor turn, so requests are served in between.
        self._cooperator = task.Cooperator(
            terminationPredicateFactory=lambda: lambda: True,
            scheduler=lambda work: clock.callLater(0, work),
        )

    # -- start-up ----------------------------------------------------------

    def open(self) -> None:
        """
        Create the directories, remove leftovers of interrupted downloads and
        index what is on disk.  Problems are logged: an unusable cache
        directory makes cargobay stream without caching, not fail.
        """
        tmp = os.path.join(self.directory, "tmp")
        try:
            os.makedirs(tmp, exist_ok=True)
            os.makedirs(os.path.join(self.directory, "blobs"), exist_ok=True)
        except OSError as e:
            # Nothing new can be cached; what is there is still served and
            # evicted (a tmp/ that is a file left blobs/ unindexed).
            self.note_write_error(e)
        for name in _listdir(tmp):
            _unlink(os.path.join(tmp, name))
        for entry in self._scan():
            if entry.key in self._entries:
                # Two files for one blob (put there by hand): one is kept,
                # and counted once.
                log.warn("removing a second cache file of {digest}: {path}", digest=str(entry.key.digest), path=entry.path)
                _unlink(entry.path)
                continue
            self._entries[entry.key] = entry
            self.total_size += entry.size
        log.info(
            "cache {directory}: {count} blobs, {size} bytes",
            directory=self.directory,
            count=len(self._entries),
            size=self.total_size,
        )
        self._warn_of_the_earlier_cache()
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return
        if stat.f_blocks * stat.f_frsize < self.max_size_bytes:
            log.warn(
                "cache.max_size_bytes ({limit}) is more than the size of the filesystem under {directory} "
                "({size}): the cache keeps a tenth of it free instead",
                limit=self.max_size_bytes,
                directory=self.directory,
                size=stat.f_blocks * stat.f_frsize,
            )

    def _warn_of_the_earlier_cache(self) -> None:
        """
        The earlier implementation kept its blobs as C{blobs/sh/sha256_<hex>}
        and their index in C{metadata/} (sled).  Unverified and keyed by no
        registry, they are not used here; nor are they counted against
        C{max_size_bytes} or evicted: say so, with the room they take.
        """
        old_blobs = os.path.join(self.directory, "blobs", "sh")
        files = [os.path.join(old_blobs, name) for name in _listdir(old_blobs) if name.startswith("sha256_")]
        metadata = os.path.join(self.directory, "metadata")
        if os.path.isdir(metadata):
            files += [os.path.join(top, name) for top, _, names in os.walk(metadata) for name in names]
        if not files:
            return
        size = 0
        for path in files:
            try:
                size += os.lstat(path).st_size
            except OSError:
                pass
        log.warn(
            "cache {directory} also holds the earlier implementation's cache ({count} files, {size} bytes in "
            "metadata/ and blobs/sh/sha256_*): cargobay does not use it, evict it or count it in "
            "cache.max_size_bytes; remove it to have the room back",
            directory=self.directory, count=len(files), size=size,
        )

    def _scan(self) -> Iterator[Entry]:
        root = os.path.join(self.directory, "blobs")
        for name in _listdir(root):
            registry_id = registry_id_of(name)
            if registry_id is None:
                continue  # (the earlier implementation's blobs/sh/sha256_*: see _warn_of_the_earlier_cache)
            for algorithm in _listdir(os.path.join(root, name)):
                for fan in _listdir(os.path.join(root, name, algorithm)):
                    directory = os.path.join(root, name, algorithm, fan)
                    try:
                        items = list(os.scandir(directory))
                    except OSError as e:
                        # A stray file where a directory belongs (or one we
                        # may not read) is no reason not to start.
                        log.warn("skipping {path} in the cache: {error}", path=directory, error=e)
                        continue
                    for item in items:
                        entry = self._entry_from_file(registry_id, algorithm, item)
                        if entry is None:
                            log.warn("removing unexpected file {path} from the cache", path=item.path)
                            _unlink(item.path)
                        else:
                            yield entry

    def _entry_from_file(self, registry_id: str, algorithm: str, item: os.DirEntry[str]) -> Entry | None:
        encoded, _, size_text = item.name.partition("-")
        try:
            digest = Digest.parse(f"{algorithm}:{encoded}")
            size = int(size_text)
            stat = item.stat()
        except (ValueError, OSError):
            return None
        # Only the name cargobay writes, where it writes it (int() takes
        # "-1_0" or " 10" too, and the same blob could sit in a second
        # fan-out directory): else one blob would be counted twice.
        canonical = f"{digest.encoded}-{size}"
        if item.name != canonical or os.path.basename(os.path.dirname(item.path)) != digest.encoded[:2]:
            return None
        if stat.st_size != size:
            return None
        return Entry(BlobKey(registry_id, digest), item.path, size, stat.st_mtime)

    def writable(self) -> bool:
        """
        Whether a download can be cached right now: a file created in
        C{tmp/}, and C{blobs/} a directory that it can be moved into.
        """
        probe = os.path.join(self.directory, "tmp", f"probe-{secrets.token_hex(4)}")
        for attempt in range(2):
            try:
                with open(probe, "xb"):
                    pass
                os.unlink(probe)
                blobs = os.path.join(self.directory, "blobs")
                return os.path.isdir(blobs) and os.access(blobs, os.W_OK | os.X_OK)
            except FileNotFoundError:
                if attempt or not self._recreate():
                    return False
            except OSError:
                return False
        return False

    def _recreate(self) -> bool:
        """
        The cache's directories are gone (someone removed them): make them
        again, and forget the entries whose files went with them.  Returns
        whether it could.
        """
        try:
            os.makedirs(os.path.join(self.directory, "tmp"), exist_ok=True)
            os.makedirs(os.path.join(self.directory, "blobs"), exist_ok=True)
        except OSError:
            return False
        gone = [entry for entry in self._entries.values() if not os.path.exists(entry.path)]
        for entry in gone:
            self._forget(entry)
        log.warn(
            "the cache directory {directory} was removed; made it again ({count} cached blobs went with it)",
            directory=self.directory,
            count=len(gone),
        )
        return True

    # -- reading -----------------------------------------------------------

    def keys(self) -> list[BlobKey]:
        """The keys of every cached blob."""
        return list(self._entries)

    def lookup(self, key: BlobKey) -> Entry | None:
        return self._entries.get(key)

    def open_entry(self, key: BlobKey) -> tuple[Entry, IO[bytes]] | None:
        """
        Open a cached blob for reading, checking that the file is still whole.
        The caller must call L{release} when done.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            fileobj = open(entry.path, "rb")
        except FileNotFoundError:
            self._forget(entry)
            return None
        except OSError as e:
            # Out of descriptors, say: the entry is still good (and counted).
            log.warn("cannot open cached blob {digest}: {error}", digest=str(key.digest), error=e)
            return None
        if os.fstat(fileobj.fileno()).st_size != entry.size:
            fileobj.close()
            log.warn("cached blob {digest} is damaged on disk; fetching it again", digest=str(key.digest))
            self._remove(entry)
            return None
        entry.readers += 1
        now = self._clock.seconds()
        entry.last_used = now
        # (Checked "in the future": while the clock ran ahead; due now.)
        if self.recheck_served and not 0 <= now - entry.verified_at <= RECHECK_SERVED_AFTER:
            if entry.key not in self._to_recheck and len(self._to_recheck) < MAX_RECHECK_QUEUE:
                self._to_recheck[entry.key] = None
        # (Well within the age limit: a file's time is its last use after a
        # restart.)
        touch_every = min(TOUCH_INTERVAL, self.max_age_seconds / 8) if self.max_age_seconds > 0 else TOUCH_INTERVAL
        if now - entry.touched > touch_every:
            entry.touched = now
            try:
                os.utime(entry.path, (now, now))
            except OSError:
                pass
        return entry, fileobj

    def release(self, entry: Entry) -> None:
        entry.readers -= 1

    # -- writing -----------------------------------------------------------

    def begin(self, key: BlobKey, size: int | None = None) -> BlobWriter | None:
        """
        Start writing a new entry; L{None} when the cache directory is not
        usable, or a blob of C{size} could never fit on its filesystem, even
        with every entry gone (the caller then streams without caching: it
        made the cache evict everything and still fail, at every pull).
        """
        if size is not None and size > self.size_limit():
            log.info(
                "not caching {digest}: {size} bytes is more than the cache's filesystem can hold",
                digest=str(key.digest), size=size,
            )
            return None
        path = os.path.join(self.directory, "tmp", secrets.token_hex(12))
        try:
            try:
                fileobj = open(path, "xb", buffering=0)
            except FileNotFoundError:
                if not self._recreate():
                    raise
                fileobj = open(path, "xb", buffering=0)
        except OSError as e:
            self.note_write_error(e)
            return None
        return BlobWriter(self, key, path, fileobj, self.direct_writes)

    def _adopt(self, key: BlobKey, temp_path: str, size: int) -> Entry | None:
        if size > self.max_size_bytes:
            # The limit was lowered (a reload) while it downloaded: as an
            # entry it would have every other evicted, and then itself.
            log.info("not caching {digest}: {size} bytes is more than max_size_bytes now",
                     digest=str(key.digest), size=size)
            _unlink(temp_path)
            return None
        directory = os.path.join(self.directory, key.relative_dir())
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{key.digest.encoded}-{size}")
        os.replace(temp_path, path)
        now = self._clock.seconds()
        previous = self._entries.get(key)
        if previous is not None:
            self.total_size -= previous.size
        entry = Entry(key, path, size, now, touched=now, verified_at=now)
        self._entries[key] = entry
        self.total_size += size
        self._write_error_logged = False
        if self.total_size > self.size_limit():
            self.evict()
        return entry

    def size_limit(self) -> int:
        """
        What the cache may hold now: C{max_size_bytes}, or less when its
        filesystem is short of room (a disk smaller than the limit, or
        filled by others), so that a tenth of it (up to 1 GiB) stays free
        for the downloads under way.  Else a full disk, with nothing ever
        over the limit, stopped caching new blobs for good.
        """
        limit = self.max_size_bytes
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return limit
        reserve = min(stat.f_blocks * stat.f_frsize // 10, 1 << 30)
        return max(0, min(limit, self.total_size + stat.f_bavail * stat.f_frsize - reserve))

    def note_write_error(self, error: OSError, wanted: int = 0) -> None:
        """
        Log a disk problem once (not once per chunk or per request) until a
        write succeeds again.  A full disk has the least recently used
        entries make room for C{wanted} bytes (a download that did not fit).
        """
        self.stats.write_errors += 1
        if error.errno in (errno.ENOSPC, errno.EDQUOT) and wanted <= self.size_limit():
            # (Room that evicting every entry would not make is not asked for.)
            self._room_wanted = max(self._room_wanted, wanted)
            self.evict()
        if not self._write_error_logged:
            self._write_error_logged = True
            reason = errno.errorcode.get(error.errno or 0, "") or type(error).__name__
            log.error(
                "cache directory {directory} is not writable ({reason}: {error}); "
                "serving without caching",
                directory=self.directory,
                reason=reason,
                error=str(error),
            )

    # -- scrubbing ---------------------------------------------------------

    def scrub(self, budget_bytes: int) -> Deferred[int]:
        """
        Re-verify cached files against their digests, reading at most about
        C{budget_bytes}, one chunk per reactor turn: the files served since
        they were last checked first (see L{RECHECK_SERVED_AFTER}), then the
        least recently verified.  A file that no longer matches is removed
        (it will be fetched again).  Fires with the number of damaged files
        found.  While one runs, another is not started (fires with 0): a
        disk slower than the budget would pile them up, each over the same
        files.
        """
        if self._scrubbing:
            return succeed(0)
        chunk = 1024 * 1024
        self._to_recheck = {key: None for key in self._to_recheck if key in self._entries}
        served = [self._entries[key] for key in self._to_recheck]
        rest = sorted((e for e in self._entries.values() if e.key not in self._to_recheck), key=lambda e: e.verified_at)
        ordered = served + rest
        damaged = [0]

        def work() -> Iterator[None]:
            remaining = budget_bytes
            for entry in ordered:
                if remaining <= 0:
                    return
                self._to_recheck.pop(entry.key, None)
                if self._entries.get(entry.key) is not entry:
                    continue
                hasher = entry.key.digest.hasher()
                try:
                    with open(entry.path, "rb") as f:
                        while True:
                            data = f.read(chunk)
                            if not data:
                                break
                            hasher.update(data)
                            remaining -= len(data)
                            yield None
                except FileNotFoundError:
                    self._forget(entry)  # gone from under us: nothing to check
                    continue
                except OSError as e:
                    # Not what the file holds (out of descriptors, a
                    # permission): only a whole read that differs removes it.
                    log.warn(
                        "cannot re-check cached blob {digest} ({error}); the check stops until its next run",
                        digest=str(entry.key.digest), error=str(e),
                    )
                    return
                if self._entries.get(entry.key) is not entry:
                    continue
                if hasher.hexdigest() != entry.key.digest.encoded:
                    damaged[0] += 1
                    log.warn(
                        "cached blob {digest} no longer matches its digest; removing it",
                        digest=str(entry.key.digest),
                    )
                    self._remove(entry)
                else:
                    entry.verified_at = self._clock.seconds()

        def done(result: object) -> object:
            self._scrubbing = False
            return result

        self._scrubbing = True
        d = self._cooperator.cooperate(work()).whenDone()
        return d.addBoth(done).addCallback(lambda _: damaged[0])  # type: ignore[no-any-return]

    # -- eviction ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.total_size -= entry.size

    def _remove(self, entry: Entry) -> None:
        self._forget(entry)
        _unlink(entry.path)

    def candidates(self) -> list[Entry]:
        """
        The entries to evict now, oldest use first: every entry unused for
        longer than the age limit, then as many of the least recently used as it
        takes to get under the size limit.  Entries being read are skipped.
        """
        now = self._clock.seconds()
        limit = self.size_limit()
        if self._room_wanted:
            limit, self._room_wanted = min(limit, self.total_size - self._room_wanted), 0
        ordered = sorted(self._entries.values(), key=lambda e: e.last_used)
        chosen: list[Entry] = []
        remaining = self.total_size
        for entry in ordered:
            if entry.readers > 0:
                continue
            too_old = self.max_age_seconds > 0 and now - entry.last_used > self.max_age_seconds
            if too_old or remaining > limit:
                chosen.append(entry)
                remaining -= entry.size
            else:
                break
        return chosen

    def evict(self) -> Deferred[None]:
        """
        Remove what L{candidates} picks, a batch per reactor turn so a large
        cache never blocks the reactor for long.  Only one eviction runs at once.
        """
        if self._evicting is not None:
            # What was added since it chose is for another round.
            self._evict_again = True
            return self._evicting
        self._evict_again = False
        chosen = self.candidates()
        removed = 0

        def remove_all() -> Iterator[None]:
            nonlocal removed
            for index, entry in enumerate(chosen):
                # (One that a client began to read meanwhile stays.)
                if entry.readers == 0 and self._entries.get(entry.key) is entry:
                    self._remove(entry)
                    removed += 1
                    self.stats.evictions += 1
                    if self.on_evict is not None:
                        self.on_evict(entry)
                if index % EVICTION_BATCH == EVICTION_BATCH - 1:
                    yield None

        def done(result: object) -> object:
            self._evicting = None
            if removed:
                log.info("evicted {count} blobs; cache now {size} bytes", count=removed, size=self.total_size)
            if self._evict_again:
                self.evict().addErrback(lambda f: log.failure("eviction failed", f))
            return result

        d: Deferred[None] = self._cooperator.cooperate(remove_all()).whenDone()  # type: ignore[assignment]
        self._evicting = d
        d.addBoth(done)
        return d


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
