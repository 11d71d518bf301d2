"""
Serving blobs: from the cache when it has them, otherwise streamed from the
upstream to the client and into the cache at the same time.

A miss starts one L{Fetch} per blob.  The request that started it (the
primary) receives the upstream body directly, with push-producer flow control
all the way to the upstream connection: when that client stops reading, the
proxy stops reading upstream.  Every concurrent request for the same blob joins
the fetch as a follower and tails the temporary file as it grows.  Nothing is
sent past the last byte until the digest is verified, so a client can never
see a complete body with wrong content: on any failure its connection is cut.
"""

from __future__ import annotations

import os
import queue
import re
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.internet import main, tcp
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.http import _IdentityTransferDecoder
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from cargobay.cache import DIRECT_BLOCK, BlobKey, BlobStore, BlobWriter, Entry, _direct_buffers
from cargobay.errors import RegistryError, blob_unknown
from cargobay.links import RepositoryLinks, upstream_unavailable
from cargobay.metrics import Metrics
from cargobay.reference import Digest
from cargobay.upstream import Upstream, discard_body, map_status, pull_scope

log = Logger()

#: Bytes read from a cache file per write to a client.
CHUNK_SIZE = 256 * 1024
#: Seconds a client may take nothing from a blob response before it is cut.
SEND_STALL_TIMEOUT = 120.0
#: Bytes per sendfile(2) call on plain TCP.  (A warm 256 MiB blob, in
#: interleaved runs: 2,300-2,590 MB/s in 128 KiB calls, 2,070-2,220 in
#: 512 KiB, 2,000 in 256 KiB, 1,780 in 64 KiB, 1,740-1,810 in 4 MiB.)
SENDFILE_CHUNK = 128 * 1024
#: Most bytes one hand-off to a sending thread moves before it reports back.
SEND_BATCH = 16 * 1024 * 1024
#: Milliseconds one batch may take on a sending thread before it hands the
#: client back to the reactor.
SEND_WAIT_MS = 50
#: Milliseconds a sending thread waits for a full socket to take more when
#: other batches are waiting for a thread (else it may wait out the batch).
SOCKET_WAIT_MS = 2
#: A response with no more than this many bytes left is sent from the
#: reactor's thread: for a small body, handing it to a sending thread and
#: back costs more than the sendfile(2) itself.  (A small blob that has left
#: the page cache is then read from disk on the reactor's thread, as a
#: manifest is.)
INLINE_SEND = 1024 * 1024
#: A cached blob this small is read into memory and written through the
#: transport, with its headers in one write, rather than sent by
#: sendfile(2) after the headers have gone out on their own.  (Below the
#: transport's 64 KiB buffer, so that the body and its headers fit.)
SMALL_BODY = 32 * 1024
#: Whether blob bodies go straight to plain-TCP sockets, by sendfile(2) from
#: files and write(2) from memory (CARGOBAY_SENDFILE=0 turns it off, to compare).
SENDFILE = os.environ.get("CARGOBAY_SENDFILE", "1") != "0"
#: Whether sendfile(2) runs on sending threads rather than the reactor's
#: (CARGOBAY_SEND_THREADS=0 keeps it on the reactor, to compare).
SEND_THREADS = os.environ.get("CARGOBAY_SEND_THREADS", "1") != "0"
#: Whether a file goes to a socket by pread(2) into a buffer and write(2)
#: from it rather than by sendfile(2) (CARGOBAY_SEND_COPY=0 for sendfile, to
#: compare).  On Linux 6.18, sendfile(2) to a TCP socket takes each 4 KiB
#: page of the page cache by reference, and that costs more than copying:
#: 1 GiB from the page cache to curl over loopback took 0.51-0.60 CPU-s at
#: 1,760-2,020 MB/s by sendfile in 128 KiB-4 MiB calls, and 0.28-0.29 CPU-s
#: at 3,710-3,820 MB/s copied through 512 KiB.
SEND_COPY = os.environ.get("CARGOBAY_SEND_COPY", "1") != "0"
#: Bytes per pread(2) when a file is copied to a socket.  (The same 1 GiB:
#: 1,870-2,150 MB/s through 128 KiB, 2,610-2,940 through 256 KiB,
#: 2,740-3,140 through 1 MiB, 3,170-3,200 through 2 MiB.)
COPY_CHUNK = 512 * 1024
#: Whether the bulk of a plain-HTTP upstream body of known length that goes
#: to a direct-writing cache file is received straight into the buffers the
#: file is written from (L{_DirectReceive}; CARGOBAY_DIRECT_RECEIVE=0 turns it
#: off, to compare).
DIRECT_RECEIVE = os.environ.get("CARGOBAY_DIRECT_RECEIVE", "1") != "0"
#: ...for a body with at least this much still to come.
DIRECT_RECEIVE_FROM = 4 * 1024 * 1024
#: Bytes a blob connection buffers (and reads at once) before pausing.
TRANSPORT_BUFFER = 1024 * 1024
#: Upstream body pieces are gathered up to this size (or to the end of the
#: reactor turn that read them) before going on to the client, the hashing
#: thread and the writing thread.  A chunked body comes a chunk at a time,
#: many per read (as a TLS body does a 16 KiB record at a time, unless the
#: TLS layer joins them: upstream.GatheringTLSProtocol); passing each on
#: alone costs a system call, two queue hand-overs and a GIL hand-over.
GATHER = 1024 * 1024
#: Bytes received from upstream but not yet hashed and written by the worker
#: thread before the upstream connection is paused.
STORE_BACKLOG = 8 * 1024 * 1024
#: Seconds a download keeps its cache file in step, however slow the disk:
#: clients that come together (a herd) share it.  Only after that may a
#: lone client leave a lagging disk behind (cache.leave_disk_after_seconds).
LEAVE_DISK_AFTER = 0.25
#: How far a download may run ahead of its fastest reading client before it
#: pauses (without readers it runs at full speed into the cache).
READ_WINDOW = 16 * 1024 * 1024
#: How often a download paused for its disk asks whether to leave it behind.
DISK_CHECK_EVERY = 0.25
#: Bytes of a download's most recent body kept in memory while clients
#: follow it: they are sent from there rather than read back from the file,
#: which is written past the page cache all the same (O_DIRECT); what a
#: follower joined too late for, or fell too far behind for, it reads from
#: the file (the disk, then the page cache).  On a VM whose memory balloon
#: takes free pages back, every new page-cache page can cost a fault on the
#: host: a herd of 16 on a cold 256 MiB blob took 1.15-1.21 s so, 1.38-1.73 s
#: with followers reading the file through the page cache, and 2.0-3.3 s
#: once the host was slow to hand out pages if the download went through
#: the page cache when a follower fell behind.  (Keeping the first quarter
#: second's bytes too, for the clients about to join, was slower: 1.19-1.40
#: s, and it cost a lone cold client 0.03-0.05 CPU-s in fresh memory.)
RECENT_BYTES = 32 * 1024 * 1024
#: The most bytes all downloads together keep so (a download that would
#: pass it keeps none, and its readers read the file).
RECENT_TOTAL = 64 * 1024 * 1024

#: Positions of up to 19 digits (int() refuses over 4,300; a blob is never
#: over 2**63 bytes); a Range beyond that is ignored like any we do not take.
#: RFC 9110 14.1: range units are case-insensitive.
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.IGNORECASE)


def abort_request(request: Any) -> None:
    """
    Cut the client's connection, so that a body that cannot be completed
    correctly never looks complete.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None and hasattr(transport, "abortConnection"):
        transport.abortConnection()
    elif transport is not None:
        transport.loseConnection()


def end_unsent_or_cut(request: Any, error: RegistryError) -> bool:
    """
    End a blob response that cannot be completed: with C{error} while
    nothing of it has gone (the client can read that, and the access log
    does not take it for a client that left), else by cutting it.  Returns
    whether it was answered: the response is then whole.
    """
    if not getattr(request, "startedWriting", True) and not getattr(request, "_disconnected", False):
        answer_error_now(request, error)
        return True
    abort_request(request)
    return False


def answer_error_now(request: Any, error: RegistryError) -> None:
    """
    End a response whose blob headers were set but not sent with C{error}
    instead (an OCI error body).
    """
    request.setResponseCode(error.status)
    for header in (
        b"content-length", b"content-range", b"etag", b"accept-ranges", b"docker-content-digest", b"content-type",
    ):
        request.responseHeaders.removeHeader(header)
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode("ascii", "replace"))
    body = error.body()
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


class Fetch:
    """
    One upstream download of one blob into a temporary cache file, followed by
    any number of clients.
    """

    #: The fetches that keep recent pieces (L{RECENT_TOTAL}); one dropped
    #: without letting go of them leaves by itself.
    _keeping: weakref.WeakSet[Fetch] = weakref.WeakSet()

    def __init__(self, key: BlobKey, name: str = "") -> None:
        self.key = key
        #: The upstream name the download asks for.
        self.name = name
        self.writer: BlobWriter | None = None
        self.total: int | None = None
        self.state = "starting"  # starting, running, done, failed
        self.entry: Entry | None = None
        self.error: RegistryError | None = None
        #: Bytes written to the temporary file so far.
        self.written = 0
        #: The blob's size once its content is verified.
        self.verified_size: int | None = None
        self._readers: set[FileSender] = set()
        self._started: list[Deferred[Fetch]] = []
        #: Called when a reader moved on or left, so that a download paused
        #: for readers far behind can resume.
        self.on_reader_moved: Callable[[], None] | None = None
        #: Called when a follower joins, so that a paused primary client
        #: stops holding the download back.
        self.on_follower_joined: Callable[[], None] | None = None
        #: Called when the fetch fails (its file is gone, say, after a write
        #: error) while its primary client may stream on uncached: requests
        #: that come next must not join it.
        self.on_failed: Callable[[], None] | None = None
        #: Set when the blob could not be cached (too big for the cache, or
        #: the disk refused): its followers were turned away.
        self.uncacheable = False
        #: Set when the file was given up on the way (a write failed) while
        #: the upstream body goes on: followers are then handed to C{rescue}
        #: (request, open file, position, end, on_done), which asks the
        #: upstream for the rest; it returns whether it took the request.
        self.file_given_up = False
        self.rescue: Callable[..., bool] | None = None
        #: Why the download failed, as the error a reader that has sent
        #: nothing yet answers with (rather than cutting its connection).
        self.failed_with: RegistryError | None = None
        #: The body's most recent pieces, (offset, bytes), oldest first: see
        #: L{RECENT_BYTES}.
        self._recent: deque[tuple[int, bytes]] = deque()
        self._recent_size = 0

    def when_started(self) -> Deferred[Fetch]:
        """
        Fires with this fetch once the upstream answered, or fails with the
        L{RegistryError} to send.
        """
        d: Deferred[Fetch] = Deferred()
        if self.state == "starting":
            self._started.append(d)
        elif self.error is not None:
            d.errback(self.error)
        else:
            d.callback(self)
        return d

    def started(self, writer: BlobWriter, total: int | None) -> None:
        self.writer = writer
        self.total = total
        self.state = "running"
        waiting, self._started = self._started, []
        for d in waiting:
            d.callback(self)

    def refused(self, error: RegistryError) -> None:
        self.state = "failed"
        self.error = error
        waiting, self._started = self._started, []
        for d in waiting:
            d.errback(error)

    def add_reader(self, reader: FileSender, follower: bool = True) -> None:
        self._readers.add(reader)
        if follower and self.on_follower_joined is not None:
            self.on_follower_joined()
        self.reader_moved()  # it may change how far the download may run ahead

    def remove_reader(self, reader: FileSender) -> None:
        self._readers.discard(reader)
        if not self._readers and self.state in ("done", "failed"):
            self.forget_recent()
        self.reader_moved()

    def remember(self, offset: int, data: bytes) -> None:
        """
        The download passed on C{data}, at C{offset} of the blob: keep it
        among the recent pieces (the oldest go beyond L{RECENT_BYTES}).
        """
        recent = self._recent
        if recent and recent[-1][0] + len(recent[-1][1]) != offset:
            self.forget_recent()  # not what follows: start again from here
        recent.append((offset, data))
        self._recent_size += len(data)
        while self._recent_size - len(recent[0][1]) >= RECENT_BYTES:
            self._recent_size -= len(recent.popleft()[1])
        Fetch._keeping.add(self)
        if sum(fetch._recent_size for fetch in Fetch._keeping) > RECENT_TOTAL:
            self.forget_recent()

    def forget_recent(self) -> None:
        self._recent.clear()
        self._recent_size = 0
        Fetch._keeping.discard(self)

    def recent_views(self, start: int, end: int) -> list[memoryview] | None:
        """
        Bytes C{[start, end)} of the blob from the recent pieces, as views of
        them (no copy); L{None} unless the pieces hold all of them.
        """
        recent = self._recent
        if not recent or start < recent[0][0] or end > recent[-1][0] + len(recent[-1][1]) or start >= end:
            return None
        views = []
        for offset, data in recent:
            if offset + len(data) <= start:
                continue
            if offset >= end:
                break
            views.append(memoryview(data)[max(0, start - offset) : min(len(data), end - offset)])
        return views

    def has_readers(self) -> bool:
        return bool(self._readers)

    def reader_moved(self) -> None:
        if self.on_reader_moved is not None:
            self.on_reader_moved()

    def lead(self) -> int | None:
        """
        How far the download is ahead of its fastest reader; None without
        readers, or when one waits for the end.
        """
        if not self._readers:
            return None
        if any(r.end is not None and r.end <= self.written for r in self._readers):
            # A reader whose part is all written waits for the verification
            # of the whole blob: the download must go on to the end.
            return None
        return self.written - max(r.position for r in self._readers)

    def progressed(self, written: int) -> None:
        if written != self.written:
            self.written = written
            self._notify()

    def verified(self, size: int) -> None:
        """The whole body is written and matches the digest."""
        self.verified_size = size
        self._notify()

    def finished(self, entry: Entry | None, ok: bool) -> None:
        """
        The fetch is over: C{entry} is the cache entry it made, L{None} if it
        failed, or if a verified body could not be made an entry (readers
        then still finish from the file they hold open).
        """
        self.state = "done" if ok and entry is not None else "failed"
        self.entry = entry
        if not self._readers:
            self.forget_recent()
        if self.state == "failed" and self.on_failed is not None:
            self.on_failed()
        self._notify()

    def _notify(self) -> None:
        # One reader's failure is its own: the download and the others go on.
        for reader in list(self._readers):
            try:
                reader.wake()
            except Exception:
                log.failure("a reader of {key} failed", key=self.key)
                self.remove_reader(reader)
                abandon = getattr(reader, "abandon", None)
                if abandon is not None:
                    abandon()  # its client is cut, not left waiting


RunInThread = Callable[..., Deferred[Any]]


def hash_prefix(hasher: Any, path: str, length: int) -> None:
    """
    Feed C{hasher} the first C{length} bytes of the file at C{path}: what a
    download resumed with a Range request already has.  A file that cannot
    be read (or is short) spoils the hash, so that nothing wrong is cached;
    it never raises, so the hashing thread always goes on to report its end.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            hash_fd_prefix(hasher, f.fileno(), length)
    except Exception:
        hasher.update(b"\0unreadable prefix")


def hash_fd_prefix(hasher: Any, fd: int, length: int) -> None:
    """Feed C{hasher} the first C{length} bytes of the open file C{fd}; a short file raises."""
    hashed = hash_fd_upto(hasher, fd, length)
    if hashed < length:
        raise OSError(f"file ended at {hashed} of {length} bytes")


#: Bytes read from a file at a time to hash it.
HASH_READ = 1024 * 1024


def hash_fd_upto(hasher: Any, fd: int, length: int) -> int:
    """Feed C{hasher} the first C{length} bytes of C{fd}, or all it holds if fewer; returns how many."""
    position = 0
    while position < length:
        data = os.pread(fd, min(HASH_READ, length - position), position)
        if not data:
            break
        hasher.update(data)
        position += len(data)
    return position


def run_here(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Run "in a thread" synchronously: for tests with an in-memory reactor.
    """
    return maybeDeferred(function, *args)


class InlineHashAndStore:
    """
    Hashes a blob body and appends it to its cache file as it arrives, on
    the calling thread: for in-memory tests and platforms without threads.
    L{ThreadedHashAndStore} does the same on worker threads.
    """

    def __init__(
        self,
        digest: Digest,
        writer: BlobWriter | None,
        on_stored: Callable[[int], None],
        on_write_error: Callable[[OSError], None],
        prefix: int = 0,
    ) -> None:
        self.hasher = digest.hasher()
        self.writer = writer
        if prefix:
            assert writer is not None
            hash_prefix(self.hasher, writer.path, prefix)
        self.stored = prefix
        self.pending_bytes = 0
        self._on_stored = on_stored
        self._on_write_error = on_write_error

    def feed(self, data: bytes | _Chunk) -> None:
        data = _as_bytes(data)  # (only a threaded store is fed chunks)
        self.hasher.update(data)
        self._write(lambda writer: writer.write_raw(data))
        self._on_stored(self.stored)

    def _write(self, write: Callable[[BlobWriter], int]) -> None:
        writer = self.writer
        if writer is not None:
            try:
                count = write(writer)
            except OSError as e:
                self.writer = None
                self._on_write_error(e)
            else:
                writer.wrote(count)
                self.stored += count

    def write_backlog(self) -> int:
        return 0

    def write_rate(self) -> float | None:
        return None

    def stop_writing(self) -> Deferred[None]:
        self.writer = None
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def drained(self) -> Deferred[None]:
        self._write(lambda writer: writer.flush_raw())
        self._on_stored(self.stored)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def hashed(self) -> Deferred[None]:
        return succeed(None)

    def watch(self, watched: bool) -> None:
        pass  # it reports as it goes


_DRAIN = object()
#: Asks a worker thread to report its progress at once (see
#: L{ThreadedHashAndStore.watch}).
_REPORT = object()
#: Each worker thread reports its progress to the reactor at least this
#: often, and, while the reactor watches, whenever it has caught up.
#: (Reporting each megabyte's progress of both threads woke the reactor
#: 512 times per 256 MiB download; a cold 256 MiB GET, 16 interleaved
#: rounds: 1,129 MB/s reporting so against 1,088 at each megabyte.)
REPORT_EVERY = 4 * 1024 * 1024
#: While the reactor watches, a worker thread reports at least this often
#: (readers of the file see it grow by so much at a time).
WATCHED_REPORT_EVERY = 1024 * 1024


class ThreadedHashAndStore:
    """
    L{InlineHashAndStore} on worker threads of its own for each download:
    the reactor only puts chunks on queues; one thread hashes them, another
    writes them (sha256 and write(2) both release the GIL, so they overlap).
    Each keeps a count of what it is done with that the reactor reads (an
    int read under the GIL), and reports back (L{REPORT_EVERY}) only so
    often, or when the reactor L{watch}es.
    """

    def __init__(
        self,
        digest: Digest,
        writer: BlobWriter | None,
        call_from_thread: Callable[..., None],
        on_stored: Callable[[int], None],
        on_write_error: Callable[[OSError], None],
        prefix: int = 0,
    ) -> None:
        self.hasher = digest.hasher()
        self.writer = writer
        #: How fast the disk takes bytes, measured on the writing thread: the
        #: bytes written and the seconds spent inside the writes for them, and
        #: when the write under way began.
        self._disk_bytes = 0
        self._disk_seconds = 0.0
        self._write_began: float | None = None
        #: Bytes the file held before this body (hashed first, by the hashing thread).
        self._prefix = (writer.path, prefix) if prefix and writer is not None else None
        #: Bytes written to the file (what followers may read).
        self.stored = prefix
        self._fed = 0
        #: Bytes hashed, counted by the hashing thread as it goes.
        self._hashed = 0
        #: Bytes the writing thread is done with: written, or passed over
        #: once it stopped writing; counted by that thread as it goes.
        self._handled = 0
        #: Bytes fed while not writing, and taken off the writing queue when
        #: writing stopped: done with, without the writing thread.
        self._passed_over = 0
        #: Whether the reactor waits on the threads' progress (L{watch}).
        self._watched = True
        self._call_from_thread = call_from_thread
        self._on_stored = on_stored
        self._on_write_error = on_write_error
        self._hash_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._write_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        #: Read by the writing thread: once False, it leaves the file alone.
        self._writing = writer is not None
        self._started = False
        self._hash_running = False
        self._write_running = False
        self._draining = False
        self._drained: list[Deferred[None]] = []
        self._hashed_waiters: list[Deferred[None]] = []
        self._write_stopped: list[Deferred[None]] = []

    @property
    def pending_bytes(self) -> int:
        """Bytes fed but not yet both hashed and written."""
        return self._fed - min(self._hashed, self._handled + self._passed_over)

    def read_past(self) -> int:
        """
        How far into what was fed both threads are done with it.  (What
        the writing thread was given counts as in use until it lets go of
        it: after L{stop_writing}, it may still be in the middle of a
        write, while what was waiting behind it is passed over.)

        The buffers a body is received into are reused on this count
        (L{_DirectReceive.release}): each thread must count a piece only
        once it no longer reads it, or the writing thread's C{fresh} copy
        of its held bytes would go into another download's buffer.
        """
        return min(self._hashed, self._handled if self._write_running else self._fed)

    def write_backlog(self) -> int:
        """Bytes fed but not yet written (0 when not writing)."""
        return self._fed - self._handled - self._passed_over if self._writing else 0

    def watch(self, watched: bool) -> None:
        """
        Whether something waits on the threads' progress (the upstream paused
        for them, readers of the file): each then reports as soon as it has
        done what it was given, rather than only every L{REPORT_EVERY}.
        """
        if watched and not self._watched and self._started:
            # What each did since its last report, whatever it does next.
            self._hash_queue.put(_REPORT)
            if self._write_running:
                self._write_queue.put(_REPORT)
        self._watched = watched

    def write_rate(self) -> float | None:
        """
        Bytes per second the disk took while the writing thread was writing
        (the write under way included); None until it has begun.  With
        direct writes, that is time waiting for the disk: a backlog behind a
        fast disk means that the thread waited for a core or the GIL.
        """
        began = self._write_began
        seconds = self._disk_seconds + (time.monotonic() - began if began is not None else 0.0)
        if seconds <= 0:
            return None
        return self._disk_bytes / seconds

    def feed(self, data: bytes | _Chunk) -> None:
        self._fed += len(data)
        self._hash_queue.put(data)
        if self._writing:
            self._write_queue.put(data)
        else:
            self._passed_over += len(data)
        if not self._started:
            self._started = True
            self._hash_running = True
            threading.Thread(target=self._hash_work, name="cargobay-blob-hash", daemon=True).start()
            if self._writing and self.writer is not None:
                self._write_running = True
                threading.Thread(
                    target=self._write_work, args=(self.writer,), name="cargobay-blob-write", daemon=True
                ).start()

    def stop_writing(self) -> Deferred[None]:
        """
        Write nothing more, let go of what was waiting to be written, and
        stop waiting for the disk.  Fires once the writing thread is gone:
        until then it may be in the middle of a write, so the file must stay
        open.
        """
        self._writing = False
        self.writer = None
        d: Deferred[None] = Deferred()
        if not self._write_running:
            d.callback(None)
            return d
        self._write_stopped.append(d)
        dropped = 0
        while True:
            try:
                item = self._write_queue.get_nowait()
            except queue.Empty:
                break
            if item is not _DRAIN and item is not _REPORT:
                dropped += len(cast("bytes | _Chunk", item))
        self._passed_over += dropped
        self._write_queue.put(_DRAIN)
        self._check_drained()
        return d

    def drained(self) -> Deferred[None]:
        """
        Fires once everything fed is hashed, and written unless writing
        stopped.
        """
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        self._drain()
        self._check_drained()
        return d

    def hashed(self) -> Deferred[None]:
        """
        Ends the feed, as L{drained} does, and fires once everything fed is
        hashed (the disk may still be writing): the body's digest can be
        checked then.
        """
        self._drain()
        if not self._hash_running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._hashed_waiters.append(d)
        return d

    def _drain(self) -> None:
        """Nothing more is fed: let each thread end once it has done the rest."""
        if not self._draining:
            self._draining = True
            self._hash_queue.put(_DRAIN)
            if self._writing:
                self._write_queue.put(_DRAIN)

    def _check_drained(self) -> None:
        if self._draining and not self._hash_running and not (self._writing and self._write_running):
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    # The threads touch nothing but the hasher, the file and their queue.
    # However they end, they say so: the download waits for them.

    def _hash_work(self) -> None:
        if self._prefix is not None:
            hash_prefix(self.hasher, *self._prefix)

        def hash_(data: bytes | _Chunk) -> int:
            self.hasher.update(data.view if isinstance(data, _Chunk) else data)
            return len(data)

        def count(done: int) -> None:
            self._hashed += done

        self._work(self._hash_queue, hash_, lambda: 0, count, self._hashed_more, self._hash_ended)

    def _write_work(self, writer: BlobWriter) -> None:
        # A failed write is this thread's to know at once (it writes no more)
        # and the reactor's to hear in order: before this thread's last
        # report, so that the download never takes the file as complete.
        failed = False

        def fail(error: OSError) -> None:
            nonlocal failed
            failed = True
            self._call_from_thread(self._failed, writer, error)

        def write(data: bytes | _Chunk) -> int:
            if self._writing and not failed:
                began = self._write_began = time.monotonic()
                try:
                    if isinstance(data, _Chunk):
                        return writer.write_block(data.block, data.start, data.end, data.fresh)
                    return writer.write_raw(data)
                except OSError as e:
                    fail(e)
                finally:
                    self._disk_seconds += time.monotonic() - began
                    self._disk_bytes += len(data)
                    self._write_began = None
            return len(data)

        def last() -> int:
            # What direct writes kept back: into the file at the body's end,
            # else passed over like the rest.
            if self._writing and not failed:
                try:
                    return writer.flush_raw()
                except OSError as e:
                    fail(e)
            return writer.drop_held()

        def count(done: int) -> None:
            self._handled += done

        self._work(self._write_queue, write, last, count, self._handled_more, self._write_ended)

    def _work(
        self,
        work: queue.SimpleQueue[object],
        handle: Callable[[bytes | _Chunk], int],
        last: Callable[[], int],
        count: Callable[[int], None],
        progressed: Callable[[int], None],
        ended: Callable[[int], None],
    ) -> None:
        """
        A worker thread's loop: handle each chunk, C{last} at the end, and
        C{count} what each is done with (what C{handle} returns) at once;
        report it when asked, every L{REPORT_EVERY}, and while the reactor
        watches, every L{WATCHED_REPORT_EVERY} and whenever the queue is
        empty.
        """
        unreported = 0
        try:
            while True:
                item = work.get()
                if item is _DRAIN:
                    done = last()
                    count(done)
                    unreported += done
                    return
                if item is not _REPORT:
                    done = handle(cast("bytes | _Chunk", item))
                    count(done)
                    unreported += done
                    if self._watched:
                        if unreported < WATCHED_REPORT_EVERY and not work.empty():
                            continue
                    elif unreported < REPORT_EVERY:
                        continue
                self._call_from_thread(progressed, unreported)
                unreported = 0
        finally:
            self._call_from_thread(ended, unreported)

    def _hashed_more(self, count: int) -> None:
        self._on_stored(self.stored)

    def _handled_more(self, count: int) -> None:
        if self.writer is not None and self._writing:
            self.writer.wrote(count)
            self.stored += count
        self._on_stored(self.stored)

    def _hash_ended(self, count: int) -> None:
        self._hash_running = False
        self._hashed_more(count)
        waiting, self._hashed_waiters = self._hashed_waiters, []
        for d in waiting:
            d.callback(None)
        self._check_drained()

    def _write_ended(self, count: int) -> None:
        self._write_running = False
        self._handled_more(count)
        waiting, self._write_stopped = self._write_stopped, []
        for d in waiting:
            d.callback(None)
        self._check_drained()

    def _failed(self, writer: BlobWriter, error: OSError) -> None:
        if self.writer is writer:
            self.writer = None
            self._on_write_error(error)


class _Chunk:
    """
    Body bytes received straight into a buffer of L{_DirectReceive}:
    C{block[start:end]}.  C{fresh}: the first bytes of that buffer (what
    comes before C{start} in it belongs to nobody yet).
    """

    __slots__ = ("block", "start", "end", "fresh")

    def __init__(self, block: memoryview, start: int, end: int, fresh: bool) -> None:
        self.block = block
        self.start = start
        self.end = end
        self.fresh = fresh

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def view(self) -> memoryview:
        return self.block[self.start : self.end]

    def tobytes(self) -> bytes:
        return self.block[self.start : self.end].tobytes()


def _as_bytes(data: bytes | _Chunk) -> bytes:
    return data.tobytes() if isinstance(data, _Chunk) else data


class _DirectReceive:
    """
    Receives the bulk of an upstream body into the buffers its cache file is
    written from with C{O_DIRECT} (huge pages, see L{cache._DirectBuffers}),
    placed so that each byte sits where it falls in a disk block: the
    writing thread writes them from there, the hashing thread hashes them
    and the client is sent them, and none copies them first.  It stands in
    for the TCP transport's reads (C{doRead}) while the body's known length
    has more than its last byte to come, and tells Twisted's HTTP parser
    what it took; the last byte goes through the parser, which then ends the
    response (and may keep the connection for the next request) as ever.

    A buffer goes back for reuse once the hashing and writing threads and
    the client are past its bytes (L{release}); one that something may still
    read when the download ends is left to be freed once nothing refers to
    it.  It stops (and the rest comes as bytes again) once followers join,
    whose recent bytes are kept as bytes, or the file is given up.
    """

    def __init__(self, pipe: BlobPipe, transport: tcp.Connection, decoder: _IdentityTransferDecoder) -> None:
        self._pipe = pipe
        self._transport = transport
        self._socket = transport.socket
        self._decoder = decoder
        self._block: Any = None
        self._view: memoryview | None = None
        #: Where the next byte goes in the buffer, and whether what is
        #: received next is the buffer's first.
        self._position = 0
        self._fresh = True
        #: Buffers received past: (buffer, where in the body its bytes end).
        self._past: deque[tuple[Any, int]] = deque()
        # What came as bytes goes on first: pieces gathered together are
        # all bytes, or all of one buffer (and then one piece of it).
        pipe._pass_on()
        transport.doRead = self._read  # type: ignore[method-assign, assignment]

    @classmethod
    def attach(cls, pipe: BlobPipe) -> _DirectReceive | None:
        """One for C{pipe}'s body if it can have one now, else None."""
        writer = pipe._writer
        if (
            not DIRECT_RECEIVE
            or not isinstance(pipe._store, ThreadedHashAndStore)
            or writer is None
            or not getattr(writer, "direct", False)
            or pipe._expected is None
            or pipe._expected - pipe._received < DIRECT_RECEIVE_FROM
            or (pipe._request is not None and pipe._client_fd is None)
            or (pipe._fetch is not None and pipe._fetch.has_readers())
        ):
            return None
        transport = getattr(pipe.transport, "_producer", None)
        protocol = getattr(transport, "protocol", None)
        protocol = getattr(protocol, "_wrappedProtocol", protocol)
        if not isinstance(transport, tcp.Connection) or not isinstance(protocol, HTTP11ClientProtocol):
            return None  # (under TLS the TCP transport's protocol is the TLS layer)
        parser = getattr(protocol, "_parser", None)  # (Twisted's own: what it calls it may change)
        decoder = getattr(parser, "bodyDecoder", None)
        if (
            type(decoder) is not _IdentityTransferDecoder
            or getattr(parser, "_buffer", None) != b""
            # Everything the parser took is here: the rest is all to come.
            or decoder.contentLength != pipe._expected - pipe._received
        ):
            return None
        log.debug("receiving {what} into its cache file's buffers", what=pipe._describe)
        return cls(pipe, transport, decoder)

    def _wanted(self) -> bool:
        pipe = self._pipe
        return (
            not pipe._finished
            and pipe._writer is not None
            and not (pipe._fetch is not None and pipe._fetch.has_readers())
        )

    def _read(self) -> object:
        if self._decoder.contentLength > 1 and self._wanted():
            if self._view is None or self._position == len(self._view):
                self._next_block()
                if self._pipe._upstream_paused:
                    return None  # (what it passed on paused the upstream: read on when resumed)
        left = self._decoder.contentLength - 1
        if left <= 0 or not self._wanted():
            self.stop()
            return self._transport.doRead()
        view = self._view
        assert view is not None
        start = self._position
        try:
            count = self._socket.recv_into(view[start : start + min(len(view) - start, left)])
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        self._decoder.contentLength -= count
        self._position += count
        fresh, self._fresh = self._fresh, False
        self._pipe.dataReceived(_Chunk(view, start, start + count, fresh))
        return None

    def _next_block(self) -> None:
        pipe = self._pipe
        pipe._pass_on()  # (a chunk never spans two buffers)
        if self._block is not None:
            self._past.append((self._block, pipe._received))
        self._block = _direct_buffers.take()
        self._view = memoryview(self._block)
        self._position = (pipe._offset + pipe._received) % DIRECT_BLOCK
        self._fresh = True

    def stop(self) -> None:
        """The rest of the body comes through the parser, as bytes."""
        self._transport.__dict__.pop("doRead", None)
        self._pipe._pass_on()

    def release(self, done: int) -> None:
        """Everything reading the body is past byte C{done}: free the buffers before it."""
        while self._past and self._past[0][1] <= done:
            _direct_buffers.give_back(self._past.popleft()[0])

    def close(self, done: int) -> None:
        """The download is over: free what is done with, drop the rest."""
        self.stop()
        if self._block is not None:
            self._past.append((self._block, self._pipe._received))
            self._block = self._view = None
        self.release(done)
        self._past.clear()


@implementer(IPushProducer)
class BlobPipe(Protocol):
    """
    Receives an upstream blob body: has it hashed and written to the cache
    writer (if any) by a hash-and-store worker, sends it to the primary client (if
    still there), and decides at the end whether the result is correct.

    The upstream connection is paused while the primary client is full,
    while every reader of the download is far behind, or while the worker
    thread has too much still to hash and write.
    """

    def __init__(
        self,
        digest: Digest,
        expected_length: int | None,
        writer: BlobWriter | None,
        request: Request | None,
        fetch: Fetch | None,
        clock: Any,
        idle_timeout: float,
        describe: str,
        on_bytes: Callable[[int], None] | None = None,
        run_in_thread: RunInThread = run_here,
        call_from_thread: Callable[..., None] | None = None,
        on_disk_left_behind: Callable[[Deferred[BlobWriter]], None] | None = None,
        leave_disk_after: float = LEAVE_DISK_AFTER,
        send_in_thread: RunInThread | None = None,
        offset: int = 0,
        max_cached: int | None = None,
        on_bad_content: Callable[[], None] | None = None,
        send_timeout: float = SEND_STALL_TIMEOUT,
        error_for: Callable[[int, str], RegistryError] | None = None,
    ) -> None:
        self._digest = digest
        #: The primary client is cut once it takes nothing for this long.
        self._send_timeout = send_timeout
        #: The error (status, what went wrong) the primary client gets for a
        #: body that failed before any of it was sent; without, it is cut.
        self._error_for = error_for
        #: Called when the body does not match the digest.
        self._on_bad_content = on_bad_content
        #: A body of unknown length that grows past this is not cached.
        self._max_cached = max_cached
        self._send_in_thread = send_in_thread
        #: Bytes of the blob the writer's file already holds: this body (a
        #: Range response) starts there.
        self._offset = offset
        self._expected = expected_length
        #: Given, a disk that falls behind a lone client may be left behind
        #: (and this is called when it is); else the client waits for it.
        self._on_disk_left_behind = on_disk_left_behind
        self._leave_disk_after = leave_disk_after

        self._writer = writer
        self._request = request
        self._fetch = fetch
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._describe = describe
        self._on_bytes = on_bytes
        self._run_in_thread = run_in_thread
        self._store: InlineHashAndStore | ThreadedHashAndStore
        if call_from_thread is not None:
            self._store = ThreadedHashAndStore(
                digest, writer, call_from_thread, self._stored, self._write_failed, offset
            )
        else:
            self._store = InlineHashAndStore(digest, writer, self._stored, self._write_failed, offset)
        self._received = 0
        #: Bytes of the body passed on so far.
        self._passed = 0
        #: Body pieces not yet passed on (see L{GATHER}).
        self._gathered: list[bytes | _Chunk] = []
        self._gathered_size = 0
        self._pass_on_call: IDelayedCall | None = None
        #: The last piece passed on, which the primary client gets with the
        #: next (the last, once the body is hashed).
        self._held: bytes | _Chunk = b""
        #: Receiving into the file's buffers, once it can (L{_DirectReceive}).
        self._receive: _DirectReceive | None = None
        self._receive_tries = 0
        #: Bytes actually written to the primary client.
        self._sent = 0
        #: The primary client's socket when the body goes to it directly
        #: (plain TCP, known length), and what it has not yet taken.
        self._client_fd: int | None = None
        self._unsent: deque[memoryview] = deque()
        self._client_paused = False
        self._client_stall: IDelayedCall | None = None
        #: Paused because every reader of the fetch is far behind.
        self._window_paused = False
        #: Paused because the worker thread is behind.
        self._store_paused = False
        #: While paused for the disk: when to ask again whether to leave it.
        self._disk_check: IDelayedCall | None = None
        self._upstream_paused = False
        self._finished = False
        if fetch is not None:
            fetch.on_reader_moved = self._reader_moved
            fetch.on_follower_joined = self._follower_joined
        self._timer: IDelayedCall | None = None
        self._failure_reason: str | None = None
        #: The status a primary client that got nothing yet is answered for it.
        self._failure_status = 502
        self._began = clock.seconds()
        self.done: Deferred[bool] = Deferred()

    # -- flow control ------------------------------------------------------

    def _upstream(self) -> IPushProducer:
        # Response.deliverBody connects us to a producer-capable transport.
        return cast(IPushProducer, self.transport)

    def _update_flow(self) -> None:
        """Pause or resume the upstream connection to match the reasons."""
        if self._finished:
            return
        self._watch_store()
        paused = self._client_paused or self._window_paused or self._store_paused
        if paused and not self._upstream_paused:
            self._upstream_paused = True
            self._disarm()
            self._upstream().pauseProducing()
        elif not paused and self._upstream_paused:
            self._upstream_paused = False
            self._upstream().resumeProducing()
            self._arm()

    def _watch_store(self) -> None:
        """
        The worker threads' progress is awaited while the upstream waits for
        them, and while readers of the file wait for it.
        """
        self._store.watch(self._store_paused or (self._fetch is not None and self._fetch.has_readers()))

    def _check_window(self) -> None:
        if self._fetch is None or self._request is not None:
            self._window_paused = False
            return
        lead = self._fetch.lead()
        if self._window_paused:
            self._window_paused = lead is not None and lead > READ_WINDOW // 2
        else:
            self._window_paused = lead is not None and lead > READ_WINDOW

    # -- Protocol (upstream side) ------------------------------------------

    def connectionMade(self) -> None:
        request = self._request
        if request is not None:
            _widen_buffer(request.channel.transport if request.channel else None)  # type: ignore[attr-defined]
            request.registerProducer(self, True)
            if self._expected is not None:
                # (The headers go with the first bytes of the body: until
                # then a failure is an error the client can read.)
                self._client_fd = _raw_socket(request)
        # Read the upstream in bigger gulps than Twisted's 64 KiB.
        _widen_buffer(getattr(self.transport, "_producer", None))
        self._watch_store()
        self._arm()
        self._try_direct_receive()

    def _try_direct_receive(self) -> None:
        # Once the parser has passed on what it read with the headers (a
        # few tries at most), the rest may come straight into the file's
        # buffers.
        if self._receive is None and self._receive_tries < 8 and not self._finished:
            self._receive_tries += 1
            self._receive = _DirectReceive.attach(self)

    def dataReceived(self, data: bytes | _Chunk) -> None:  # type: ignore[override]
        self._received += len(data)
        if self._expected is not None and self._received > self._expected:
            self._give_up("sent more bytes than its Content-Length")
            return
        if (
            self._max_cached is not None
            and self._writer is not None
            and self._offset + self._received > self._max_cached
            and not (self._fetch is not None and self._fetch.has_readers())
        ):
            # (With readers of the file, it is written to the end, for them,
            # and then not made an entry.)
            self._stop_caching()
            if self._finished:
                return
        self._gathered.append(data)
        self._gathered_size += len(data)
        if self._gathered_size >= GATHER:
            self._pass_on()
        elif self._pass_on_call is None:
            # The rest of what this reactor turn read comes in the same turn.
            self._pass_on_call = self._clock.callLater(0, self._pass_on)
        if not isinstance(data, _Chunk):
            self._try_direct_receive()

    def _pass_on(self) -> None:
        """Hand what was gathered to the hash-and-store worker and the client."""
        if self._pass_on_call is not None:
            if self._pass_on_call.active():
                self._pass_on_call.cancel()
            self._pass_on_call = None
        if not self._gathered:
            return
        pieces, self._gathered = self._gathered, []
        self._gathered_size = 0
        data: bytes | _Chunk
        first = pieces[0]
        if len(pieces) == 1:
            data = first
        elif isinstance(first, _Chunk):
            # Received one after the other into one buffer: one piece.
            data = _Chunk(first.block, first.start, cast(_Chunk, pieces[-1]).end, first.fresh)
        else:
            data = b"".join(cast("list[bytes]", pieces))
        self._arm()
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        self._store.feed(data)
        fetch = self._fetch
        if fetch is not None:
            if fetch.has_readers():
                # (Kept as bytes: followers may read them for a while.)
                fetch.remember(self._offset + self._passed, _as_bytes(data))
            else:
                fetch.forget_recent()
        self._passed += len(data)
        if self._request is not None:
            held, self._held = self._held, data
            if held:
                self._send(held)
        self._release_buffers()
        if self._store.pending_bytes > STORE_BACKLOG:
            self._maybe_leave_disk_behind()
            if self._store.pending_bytes > STORE_BACKLOG:
                self._store_paused = True
                self._update_flow()
                self._check_disk_later()

    def _done_with(self) -> int:
        """Where in the body the threads and the primary client all are past."""
        store = self._store
        if not isinstance(store, ThreadedHashAndStore):
            return 0
        done = store.read_past()
        if self._unsent or self._held:
            done = min(done, self._sent)
        return done

    def _release_buffers(self) -> None:
        if self._receive is not None:
            self._receive.release(self._done_with())

    def _maybe_leave_disk_behind(self) -> None:
        if (
            self._store.write_backlog() > STORE_BACKLOG
            and self._may_leave_disk_behind()
            and self._disk_slower_than_upstream()
        ):
            self._leave_disk_behind()

    def _check_disk_later(self) -> None:
        """
        While the upstream waits for the disk, no byte comes to ask again
        whether to leave it behind: a disk stuck from the first quarter
        second would hold the client for as long as it stays stuck.
        """
        if self._disk_check is not None or self._on_disk_left_behind is None:
            return
        grace_left = self._began + self._leave_disk_after - self._clock.seconds()
        self._disk_check = self._clock.callLater(max(grace_left, DISK_CHECK_EVERY), self._check_disk)

    def _check_disk(self) -> None:
        self._disk_check = None
        if self._finished or not self._store_paused or self._writer is None:
            return
        self._maybe_leave_disk_behind()
        if self._writer is None:  # left behind: only the hash may hold the upstream now
            self._stored(self._store.stored)
        else:
            self._check_disk_later()

    def _may_leave_disk_behind(self) -> bool:
        """
        Only a client of its own waits for this download, none has joined
        it since it began, and the operator lets us stream past a disk that
        cannot keep up.
        """
        return (
            self._on_disk_left_behind is not None
            and self._clock.seconds() - self._began >= self._leave_disk_after
            and self._request is not None
            and self._writer is not None
            and self._fetch is not None
            and not self._fetch.has_readers()
        )

    def _disk_slower_than_upstream(self) -> bool:
        """
        Whether the disk, while it was writing, took bytes slower than the
        upstream sends them (or is stuck in its first write).  Else the
        writing thread is only short of CPU, and the upstream waits for it:
        leaving the disk behind would fetch the rest of the blob twice.
        """
        rate = self._store.write_rate()
        elapsed = self._clock.seconds() - self._began
        return rate is None or elapsed <= 0 or rate < self._received / elapsed

    def _leave_disk_behind(self) -> None:
        """
        Stop writing the cache file, so that the client gets the blob at the
        upstream's pace rather than the disk's; once the client is served,
        the service fetches the rest of the blob into the file.
        """
        writer, self._writer = self._writer, None
        fetch, self._fetch = self._fetch, None
        assert writer is not None and fetch is not None and self._on_disk_left_behind is not None
        # The file keeps what was written: the refill asks the upstream only
        # for the rest (once the writing thread has let go of it).
        kept = self._store.stop_writing().addCallback(lambda _: writer)
        fetch.on_reader_moved = fetch.on_follower_joined = None
        fetch.finished(None, ok=False)
        log.info(
            "the cache's disk fell behind upstream {what}; streaming it past the disk, the rest "
            "to be fetched into the cache afterwards",
            what=self._describe,
        )
        self._on_disk_left_behind(kept)

    def _stored(self, stored: int) -> None:
        self._release_buffers()
        if self._fetch is not None:
            # (Also once the body has all come: the disk may have megabytes
            # left to write, which followers may read as they are.)
            self._fetch.progressed(stored)
        if self._finished:
            return
        self._store_paused = self._store.pending_bytes > STORE_BACKLOG // 2 and self._store_paused
        self._check_window()
        self._update_flow()

    # -- the primary client ------------------------------------------------

    def _send(self, data: bytes | _Chunk) -> None:
        request = self._request
        assert request is not None
        if self._client_fd is None:
            self._sent += len(data)
            request.write(_as_bytes(data))
            return
        if not getattr(request, "startedWriting", True):
            request.write(b"")  # the headers, through the transport
        self._unsent.append(data.view if isinstance(data, _Chunk) else memoryview(data))
        self._flush()

    def _flush(self) -> None:
        """
        Hand what the client has not taken yet straight to its socket, in
        as few system calls as the socket allows.  Twisted's transport
        would copy it into its buffer and send 128 KiB per reactor turn.
        """
        request, fd = self._request, self._client_fd
        if request is None or fd is None:
            return
        transport = cast(Any, request.channel).transport
        while self._unsent:
            if transport.dataBuffer or transport._tempDataBuffer:
                self._wait_for_client(transport)  # the headers go first
                return
            view = self._unsent[0]
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                self._wait_for_client(transport)
                return
            except OSError:
                # Bytes lost mid-body: the response cannot end well.  Cutting
                # the connection makes the channel stop us.
                self._unsent.clear()
                abort_request(request)
                return
            self._sent += sent
            request.sentLength += sent  # type: ignore[attr-defined]
            if sent == len(view):
                self._unsent.popleft()
            else:
                self._unsent[0] = view[sent:]
        if self._client_paused:
            self._set_client_paused(False)
            self._update_flow()

    def _set_client_paused(self, paused: bool) -> None:
        # A client that takes nothing for this long is gone in all but name:
        # it would hold the upstream connection and the download for good.
        self._client_paused = paused
        if paused and self._client_stall is None:
            self._client_stall = self._clock.callLater(self._send_timeout, self._client_stalled)
        elif not paused and self._client_stall is not None:
            if self._client_stall.active():
                self._client_stall.cancel()
            self._client_stall = None

    def _client_stalled(self) -> None:
        self._client_stall = None
        if self._request is not None:
            log.info("client read nothing for {seconds:g} s; closing", seconds=self._send_timeout)
            abort_request(self._request)

    def _wait_for_client(self, transport: Any) -> None:
        # Until the socket can take more: the transport resumes its producer
        # (the HTTP channel, hence us or whoever replaced us) on its next
        # write event.
        transport.producerPaused = True
        transport.startWriting()
        if self._fetch is not None and self._fetch.has_readers() and self._demote():
            return
        if not self._client_paused:
            self._set_client_paused(True)
            self._update_flow()

    def _write_failed(self, error: OSError) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.failed(error)
        self._go_on_uncached()

    def _go_on_uncached(self) -> None:
        """The file is given up: the primary client goes on without it."""
        if self._fetch is not None:
            # Followers read the file, which is (or will be) gone: each asks
            # the upstream for the rest of the blob (Fetch.rescue).
            self._fetch.file_given_up = True
            self._fetch.finished(None, ok=False)
            self._fetch = None
        self._window_paused = False
        if self._finished:
            # The body has all come (and its client may have had it, once
            # hashed): only the file is lost, not the download.
            return
        if self._request is None:
            self._give_up("cannot be cached and has no client left")
            return
        self._update_flow()

    def _stop_caching(self) -> None:
        """
        A body sent without a length outgrew the cache: write no more of it,
        and drop the file once the writing thread lets go of it.
        """
        writer, self._writer = self._writer, None
        assert writer is not None
        log.info("upstream {what} outgrew the cache; streaming it uncached", what=self._describe)
        self._store.stop_writing().addCallback(lambda _: writer.abort())
        self._go_on_uncached()

    def _reader_moved(self) -> None:
        self._watch_store()
        if self._window_paused:
            self._check_window()
            self._update_flow()

    def _follower_joined(self) -> None:
        self._watch_store()
        if self._client_paused:
            self._demote()

    def _demote(self) -> bool:
        """
        The primary client cannot keep up, and others are waiting: stop
        feeding it directly and let it read the file at its own pace, like a
        follower, so that it no longer holds the download back for everyone.
        Returns whether it could.
        """
        request, fetch, writer = self._request, self._fetch, self._writer
        if request is None or fetch is None or writer is None:
            return False
        try:
            fileobj = open(writer.path, "rb")
        except OSError:
            return False
        self._request = None
        self._held = b""
        self._unsent.clear()
        request.unregisterProducer()
        # The client's transport is full: start paused, the channel resumes
        # the sender when it drains.
        sender = FileSender(
            request,
            fileobj,
            self._sent,
            fetch.total,
            fetch,
            self._clock,
            paused=True,
            follower=False,
            send_in_thread=self._send_in_thread,
            send_timeout=self._send_timeout,
        )
        sender.start()
        self._set_client_paused(False)
        self._check_window()
        self._update_flow()
        return True

    def connectionLost(self, reason: Failure = webclient.ResponseDone) -> None:  # type: ignore[assignment]
        self._pass_on()
        self._disarm()
        self._finished = True
        if self._disk_check is not None and self._disk_check.active():
            self._disk_check.cancel()
        self._disk_check = None
        if self._failure_reason is None:
            # A body of no announced length may end with the connection
            # (HTTP/1.0's way): whether it is whole, the digest says.
            # So may a 206 whose length only its Content-Range gave: whole
            # if every byte came.
            ended = reason.check(webclient.ResponseDone) or (
                reason.check(webclient.PotentialDataLoss)
                and (self._expected is None or self._received == self._expected)
            )
            if not ended:
                self._failure_reason = f"failed mid-body ({reason.type.__name__})"
            elif self._expected is not None and self._received != self._expected:
                self._failure_reason = f"sent {self._received} of {self._expected} announced bytes"
        self._store.drained().addCallback(lambda _: self._verify())
        if self._request is not None and self._failure_reason is None:
            # Its client need not wait for the disk as well.
            self._store.hashed().addCallback(lambda _: self._release_primary())

    def _release_primary(self) -> None:
        """
        The body is all hashed: if it is the blob, the primary client may
        have its last bytes (it is sent from memory) while the writing thread
        finishes the file.  Followers wait for that: they read the file.  (On
        this 2-core host the disk ended 2-6 ms after the hash; a cold 256 MiB
        GET, 10 interleaved rounds: 1,073 MB/s against 1,019 waiting for it.)
        """
        if (
            self._request is not None
            and self._failure_reason is None
            and self._store.hasher.hexdigest() == self._digest.encoded
        ):
            self._end_primary(ok=True)

    def _verify(self) -> None:
        if self._failure_reason is None and self._store.hasher.hexdigest() != self._digest.encoded:
            self._failure_reason = "sent content that does not match the digest"
            if self._on_bad_content is not None:
                self._on_bad_content()
        if self._failure_reason is not None:
            log.warn(
                "upstream {what} {reason}; nothing cached",
                what=self._describe,
                reason=self._failure_reason,
            )
            if self._writer is not None:
                self._writer.abort()
                self._writer = None
            self._conclude(None, ok=False)
            return
        # The body is right: every client may have its last bytes now.  Making
        # it a cache entry (fsync, rename) is the cache's business, not theirs.
        if self._fetch is not None:
            self._fetch.verified(self._offset + self._received)
        self._end_primary(ok=True)
        writer = self._writer
        if writer is None:
            self._conclude(None, ok=True)
            return
        self._run_in_thread(writer.sync_raw).addBoth(self._synced, writer)

    def _synced(self, result: object, writer: BlobWriter) -> None:
        entry = None
        if self._writer is writer:  # else: it failed meanwhile
            if isinstance(result, Failure):
                writer.failed(result.value if isinstance(result.value, OSError) else OSError(str(result.value)))
            elif self._max_cached is not None and writer.size > self._max_cached:
                # Bigger than the whole cache: as an entry it would evict
                # everything, itself included.  Its readers hold the file open.
                writer.abort()
            elif writer.size != self._offset + self._received:
                # Only the exact verified body becomes an entry.
                log.error(
                    "cache file of {what} holds {size} of its {total} bytes; not cached",
                    what=self._describe,
                    size=writer.size,
                    total=self._offset + self._received,
                )
                writer.abort()
            else:
                entry = writer.commit(synced=True)
        self._writer = None
        self._conclude(entry, ok=True)

    def _conclude(self, entry: Entry | None, ok: bool) -> None:
        if self._fetch is not None:
            if not ok and self._error_for is not None and self._failure_reason is not None:
                self._fetch.failed_with = self._error_for(self._failure_status, self._failure_reason)
            self._fetch.finished(entry, ok)
        self._end_primary(ok)
        if self._receive is not None:
            # (Once the client has let go of its views: what the threads
            # are done with goes back for reuse, anything else is freed
            # when nothing refers to it any more.)
            self._receive.close(self._done_with())
        self.done.callback(ok)

    def _end_primary(self, ok: bool) -> None:
        self._set_client_paused(False)
        request, self._request = self._request, None
        held, self._held = self._held, b""
        if request is None:
            return
        unsent, self._unsent = self._unsent, deque()
        request.unregisterProducer()
        if ok:
            # Whatever the socket has not taken yet goes through the
            # transport's buffer, in order, and the response ends after it.
            for view in unsent:
                request.write(bytes(view))
            if held:
                request.write(_as_bytes(held))
            request.finish()
        elif self._error_for is not None and self._failure_reason is not None:
            end_unsent_or_cut(request, self._error_for(self._failure_status, self._failure_reason))
        else:
            abort_request(request)

    # -- idle timeout ------------------------------------------------------

    def _arm(self) -> None:
        if self._upstream_paused or self._finished:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        else:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle(self) -> None:
        self._timer = None
        self._give_up(f"sent nothing for {self._idle_timeout:g} s", status=504)

    def _give_up(self, reason: str, status: int = 502) -> None:
        if self._failure_reason is None:
            self._failure_reason = reason
            self._failure_status = status
        self._upstream().stopProducing()

    # -- IPushProducer (primary client side) -------------------------------

    def pauseProducing(self) -> None:
        # Not demoted (the file cannot be opened: out of descriptors, say):
        # the client holds the download back like a lone one, rather than
        # its transport buffering the rest of the body.
        if self._fetch is not None and self._fetch.has_readers() and self._demote():
            return
        self._set_client_paused(True)
        self._update_flow()

    def resumeProducing(self) -> None:
        if self._unsent:
            self._flush()
            return
        self._set_client_paused(False)
        self._update_flow()

    def stopProducing(self) -> None:
        # The primary client went away.  With a cache file to finish, the
        # download goes on (bounded by the idle timeout) so that the next pull
        # is a hit; without one there is no reason to keep reading.
        self._request = None
        self._held = b""
        self._unsent.clear()
        self._set_client_paused(False)
        if self._writer is None:
            if not self._finished:
                self._give_up("lost its only client")
            return
        self._check_window()
        self._update_flow()


@implementer(IPushProducer)
class FileSender:
    """
    Sends bytes C{[start, end)} of a file to a client: a complete cache entry,
    or the temporary file of a L{Fetch} in progress, waiting for it to grow.
    """

    def __init__(
        self,
        request: Request,
        fileobj: IO[bytes],
        start: int,
        end: int | None,
        fetch: Fetch | None = None,
        clock: Any = None,
        on_done: Callable[[bool], None] | None = None,
        paused: bool = False,
        follower: bool = True,
        send_in_thread: RunInThread | None = None,
        send_timeout: float = SEND_STALL_TIMEOUT,
    ) -> None:
        self._request = request
        self._clock = clock
        #: A client that takes nothing for this long is cut.
        self._send_timeout = send_timeout
        #: Given, sendfile(2) runs on a sending thread (batches of
        #: SEND_BATCH), so that many clients use more than the reactor's core.
        self._send_in_thread = send_in_thread
        #: A batch is on a sending thread: the file must stay open.
        self._sending = False
        self._closing: IO[bytes] | None = None
        self._stall: IDelayedCall | None = None
        self._file: IO[bytes] | None = fileobj
        self._fd = fileobj.fileno()
        self.position = start
        self._end = end
        self._fetch = fetch
        self._on_done = on_done
        self._paused = paused
        self._pumping = False
        self._follower = follower
        small = fetch is None and end is not None and end - start <= SMALL_BODY
        self._socket = None if small else _raw_socket(request)
        self._waiting_for_socket = False

    @property
    def end(self) -> int | None:
        """Where this response ends in the file, if known yet."""
        return self._end

    def start(self) -> None:
        self._request.registerProducer(self, True)
        if self._fetch is not None:
            self._fetch.add_reader(self, follower=self._follower)
        if self._socket is not None and self._fetch is None and not self._request.startedWriting:
            # The headers go out through the transport's buffer; the body
            # then goes from the file to the socket by sendfile(2).  (A
            # reader of a download sends them with its first bytes: until
            # then, the download's failure is an error it can answer.)
            self._request.write(b"")
        if self._paused:
            self._arm_stall()
        self._pump()

    def wake(self) -> None:
        """More of the file is there (or the fetch ended)."""
        self._pump()

    def _limit(self) -> int | None:
        """
        How far we may send now; L{None} if the fetch failed.
        """
        fetch = self._fetch
        if fetch is None:
            assert self._end is not None
            return self._end
        if fetch.verified_size is not None:
            # Verified: the open file is good to its end, whatever becomes
            # of the cache entry.
            if self._end is None:
                self._end = fetch.verified_size
            return self._end
        if fetch.state == "failed":
            return None
        # Until the blob is verified, the response's last byte waits (and
        # any byte that might be the last, when its length is unknown).
        if self._end is None:
            return max(0, fetch.written - 1)
        return min(fetch.written, self._end - 1)

    def _pump(self) -> None:
        if self._pumping or self._sending or self._file is None:
            return
        self._pumping = True
        try:
            while not self._paused and self._file is not None:
                limit = self._limit()
                if limit is None:
                    if not self._hand_over():
                        self._close(ok=False)
                    return
                if self._end is not None and self.position >= self._end and limit >= self._end:
                    self._close(ok=True)
                    return
                if self.position >= limit:
                    return  # wait for the fetch to write more
                if self._socket is not None:
                    if not self._send_file(limit):
                        return
                    continue
                try:
                    data = os.pread(self._fd, min(CHUNK_SIZE, limit - self.position), self.position)
                except OSError as e:
                    log.warn("reading {path} failed: {error}", path=getattr(self._file, "name", "?"), error=e)
                    data = b""
                if not data:
                    self._close(ok=False)
                    return
                self.position += len(data)
                self._request.write(data)
                if self._fetch is not None:
                    self._fetch.reader_moved()
        finally:
            self._pumping = False

    def _hand_over(self) -> bool:
        """
        The download's file was given up (a write failed) while its body
        goes on: hand this response, and the file it read so far, to the
        fetch's rescue, which gets the rest from the upstream (to the blob's
        end, also for a Range that ends before it: the digest of the whole
        is what tells the part is right).
        """
        fetch = self._fetch
        if (
            fetch is None or not fetch.file_given_up or fetch.rescue is None or self._sending
            or self._file is None or self._end is None or fetch.total is None
        ):
            return False
        self._disarm_stall()
        fetch.remove_reader(self)
        self._request.unregisterProducer()
        fileobj, self._file = self._file, None
        on_done, self._on_done = self._on_done, None
        self._fetch = None
        if fetch.rescue(self._request, fileobj, self.position, self._end, fetch.total, on_done):
            return True
        fileobj.close()
        answered = end_unsent_or_cut(self._request, _retry_error())
        if on_done is not None:
            on_done(answered)
        return True

    def _send_file(self, limit: int) -> bool:
        """
        Copy from the file to the client's socket in the kernel.  Returns
        False when we must wait (the socket is full, or the transport still
        holds bytes that have to go first).
        """
        transport = cast(Any, self._request.channel.transport)
        assert self._socket is not None
        if not self._request.startedWriting:
            self._request.write(b"")  # the headers, through the transport, first
        if transport.dataBuffer or transport._tempDataBuffer:
            self._wait_for_socket(transport)
            return False
        last = None if self._end is None else self._end - 1
        if self._send_in_thread is not None and (last is None or last - self.position > INLINE_SEND):
            # The thread gets a duplicate of the socket: whatever becomes of
            # the connection meanwhile, its descriptor number cannot be
            # reused for another client's while the batch runs.  It sends all
            # but the response's last byte, which goes from here: the
            # response then ends (and is logged and counted) before the
            # client can have all of it and hang up.
            try:
                lent = os.dup(self._socket)
            except OSError:
                lent = None  # out of descriptors: send from here instead
            if lent is not None:
                self._sending = True
                _batches.add(1)
                upto = limit if last is None else min(limit, last)
                views = self._recent(upto)
                batch = self._send_in_thread(_queued_batch, lent, self._fd, self.position, upto, views)
                batch.addErrback(_batch_crashed).addCallback(self._batch_sent, transport)
                # A runner that finished at once leaves the loop to go on.
                return not self._sending and self._file is not None and not self._paused
        views = self._recent(limit)
        try:
            if views is not None:
                sent = os.write(self._socket, views[0])
            else:
                sent = _send_from_file(self._socket, self._fd, self.position, limit - self.position)
        except BlockingIOError:
            self._wait_for_socket(transport)
            return False
        except OSError:
            # The client went away; the transport will notice and stop us.
            self._close(ok=False)
            return False
        if sent == 0:
            self._close(ok=False)
            return False
        self._sent(sent)
        return True

    def _recent(self, upto: int) -> list[memoryview] | None:
        """
        The bytes from here to C{upto} as the download's recent pieces hold
        them, if they do (else they come from the file).
        """
        if self._fetch is None:
            return None
        return self._fetch.recent_views(self.position, upto)

    def _sent(self, count: int) -> None:
        """C{count} more bytes went straight to the socket."""
        self.position += count
        self._request.sentLength += count  # type: ignore[attr-defined]
        if self._fetch is not None and self._file is not None:
            self._fetch.reader_moved()

    def _batch_sent(self, result: tuple[int, str], transport: Any) -> None:
        sent, how = result
        self._sending = False
        self._sent(sent)
        if self._file is None:
            # Stopped meanwhile.
            if self._closing is not None:
                self._closing.close()
                self._closing = None
            counted = getattr(self._request, "still_sending", None)
            if counted is not None:
                del self._request.still_sending  # type: ignore[attr-defined]
                counted.callback(None)
            return
        if how == "blocked":
            self._wait_for_socket(transport)
        elif how == "failed":
            self._close(ok=False)
        else:
            self._pump()

    def _wait_for_socket(self, transport: Any) -> None:
        # Have the transport tell us when the socket can take more: with its
        # buffer empty, its next write event resumes its producer (the HTTP
        # channel), which resumes us.
        if self._waiting_for_socket:
            return
        self._waiting_for_socket = True
        self._paused = True
        self._arm_stall()
        transport.producerPaused = True
        transport.startWriting()

    def _let_go_of_file(self) -> None:
        fileobj, self._file = self._file, None
        if fileobj is None:
            return
        if self._sending:
            # A sending thread still reads it: close it once the batch ends.
            # Until then the response's byte count is short of what went out.
            self._closing = fileobj
            self._request.still_sending = Deferred()  # type: ignore[attr-defined]
        else:
            fileobj.close()

    def abandon(self) -> None:
        """Cut the response short and let go of everything (after an error)."""
        if self._on_done is not None or self._file is not None:
            self._close(ok=False)

    def _close(self, ok: bool) -> None:
        self._disarm_stall()
        fetch = self._fetch
        if fetch is not None:
            fetch.remove_reader(self)
        self._let_go_of_file()
        request = self._request
        try:
            request.unregisterProducer()
            if ok:
                request.finish()
            elif fetch is not None and fetch.failed_with is not None:
                # The download's error, if nothing of the body went (the
                # response is then whole: its handler is done).
                ok = end_unsent_or_cut(request, fetch.failed_with)
            else:
                abort_request(request)
        finally:
            # Whatever the request makes of it (a client gone while a HEAD
            # upstream confirmed the blob leaves it without a channel), the
            # cache entry is let go: else it stays pinned, never evicted.
            if self._on_done is not None:
                on_done, self._on_done = self._on_done, None
                on_done(ok)

    def pauseProducing(self) -> None:
        self._paused = True
        self._arm_stall()

    def resumeProducing(self) -> None:
        self._paused = False
        self._waiting_for_socket = False
        self._disarm_stall()
        self._pump()

    # A client that takes nothing for this long is gone in all but name: it
    # would hold a descriptor and keep its cache entry from being evicted.
    def _arm_stall(self) -> None:
        if self._clock is not None and self._stall is None:
            self._stall = self._clock.callLater(self._send_timeout, self._stalled)

    def _disarm_stall(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        log.info("client read nothing for {seconds:g} s; closing", seconds=self._send_timeout)
        self._close(ok=False)

    def stopProducing(self) -> None:
        # The client's connection is gone.  Unregister, so that nothing later
        # tries to finish a response with a producer still attached.
        self._disarm_stall()
        if self._fetch is not None:
            self._fetch.remove_reader(self)
        self._let_go_of_file()
        self._request.unregisterProducer()
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done(False)


class _Queue:
    """How many batches wait for a sending thread (a hint, not a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = 0

    def add(self, count: int) -> None:
        with self._lock:
            self.waiting += count


_batches = _Queue()


def _queued_batch(
    sock: int, fd: int, position: int, limit: int, views: list[memoryview] | None = None
) -> tuple[int, str]:
    """L{_send_batch}, handed to the pool: it no longer waits for a thread."""
    _batches.add(-1)
    return _send_batch(sock, fd, position, limit, views)


class _Pieces:
    """Views of bytes in memory to write to a socket in order, as it takes them."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = deque(view for view in views if len(view))

    def send(self, sock: int) -> int:
        """One write(2) of what is left of the next view; raises as it does."""
        view = self._views[0]
        count = os.write(sock, view)
        if count == len(view):
            self._views.popleft()
        else:
            self._views[0] = view[count:]
        return count


_copy_buffers = threading.local()


def _send_from_file(sock: int, fd: int, position: int, most: int) -> int:
    """
    Up to C{most} bytes of C{fd} from C{position} to the socket C{sock}
    (one sendfile(2), or one pread(2) into this thread's buffer and what a
    write(2) of it takes: the rest is read again next time).  Raises as
    sendfile(2) does: BlockingIOError when the socket is full; returns 0 at
    the file's end.
    """
    if not SEND_COPY:
        return os.sendfile(sock, fd, position, min(SENDFILE_CHUNK, most))
    buffer = getattr(_copy_buffers, "view", None)
    if buffer is None or len(buffer) < COPY_CHUNK:
        buffer = _copy_buffers.view = memoryview(bytearray(COPY_CHUNK))
    wanted = buffer[: min(COPY_CHUNK, most)]
    count = os.preadv(fd, [wanted], position)
    if count == 0:
        return 0
    done = 0
    try:
        while done < count:
            done += os.write(sock, wanted[done:count])
    except BlockingIOError:
        if done == 0:
            raise
    return done


def _send_batch(
    sock: int, fd: int, position: int, limit: int, views: list[memoryview] | None = None
) -> tuple[int, str]:
    """
    On a sending thread: from C{fd} at C{position} towards C{limit} to
    C{sock} (a duplicate this closes), or from C{views} when given (those
    bytes, in memory already), until C{limit} or
    C{SEND_BATCH} bytes, the batch has run for C{SEND_WAIT_MS}, the socket
    stays full (for C{SOCKET_WAIT_MS} when other batches wait for a thread),
    or the client is gone.  A slow client (or a slow disk) thus never holds
    a thread for long.  Returns the bytes sent and C{"blocked"},
    C{"failed"} or C{"more"}.
    """
    sent = 0
    pieces = None if views is None else _Pieces(views)
    try:
        deadline = time.monotonic() + SEND_WAIT_MS / 1000
        writable = select.poll()
        writable.register(sock, select.POLLOUT)
        while sent < SEND_BATCH and position + sent < limit:
            try:
                if pieces is not None:
                    count = pieces.send(sock)
                else:
                    count = _send_from_file(sock, fd, position + sent, limit - position - sent)
            except BlockingIOError:
                # A client that drains its socket soon is waited for here,
                # without a round trip through the reactor; only briefly
                # when other clients' batches wait for a thread.
                left = deadline - time.monotonic()
                if left > 0:
                    patience = SOCKET_WAIT_MS if _batches.waiting > 0 else max(1, int(left * 1000))
                    if writable.poll(patience):
                        continue
                return sent, "blocked"
            except OSError:
                return sent, "failed"
            if count == 0:
                return sent, "failed"
            sent += count
            if time.monotonic() >= deadline:
                break
        return sent, "more"
    finally:
        os.close(sock)


class _RescuePipe(Protocol):
    """
    The rest of a blob from the upstream, to a follower whose download lost
    its file: hashed after what it already had, passed on up to the end of
    the follower's response (C{end}), its last piece held back until the
    digest of the whole (to C{total}) is right.  Nothing is cached.
    """

    def __init__(
        self, request: Request, hasher: Any, position: int, end: int, total: int, digest: Digest,
        on_done: Callable[[bool], None] | None, clock: Any, timeout: float,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._on_bytes = on_bytes
        self._request = request
        self._hasher = hasher
        #: Where the hash has got to (what comes next starts there), and
        #: where the follower's response goes on: past it, for a Range
        #: follower that joined beyond what the file held.
        self._position = position
        self._send_from = position
        self._end = end
        self._total = total
        self._digest = digest
        self._on_done = on_done
        self._clock = clock
        self._timeout = timeout
        self._held = b""
        self._timer: IDelayedCall | None = None
        self._gone = False
        #: Bytes of the body to pass over (a 200 for the whole blob).
        self.skip = 0
        request.notifyFinish().addErrback(self._client_left)

    def hashed_to(self, count: int) -> None:
        """The file held C{count} bytes (fewer, for a Range follower past them): the rest is hashed as it comes."""
        self._position = count

    def connectionMade(self) -> None:
        if self._gone:
            cast(Any, self.transport).stopProducing()
            return
        self._request.registerProducer(self.transport, True)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(self._timeout, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        cast(Any, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        if self.skip:
            passed, self.skip = min(self.skip, len(data)), max(0, self.skip - len(data))
            data = data[passed:]
        if not data or self._gone:
            return
        if self._position + len(data) > self._total:
            cast(Any, self.transport).stopProducing()
            return
        start = self._position
        self._position += len(data)
        self._hasher.update(data)
        low, high = max(start, self._send_from), min(self._position, self._end)
        wanted = data[low - start : high - start] if high > low else b""
        if wanted:
            held, self._held = self._held, wanted
            if held:
                self._request.write(held)

    def connectionLost(self, reason: Failure = webclient.ResponseDone) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._gone:
            return
        ok = (
            reason.check(webclient.ResponseDone, webclient.PotentialDataLoss) is not None
            and self._position == self._total
            and self._hasher.hexdigest() == self._digest.encoded
        )
        self._request.unregisterProducer()
        if ok:
            self._request.write(self._held)
            self._request.finish()
        else:
            log.warn("the rest of {digest} for a follower did not come whole and right", digest=str(self._digest))
            ok = end_unsent_or_cut(self._request, _retry_error())
        self._done(ok)

    def failed(self, failure: Failure) -> None:
        answered = False
        if not self._gone:
            log.warn("the rest of {digest} for a follower could not be had: {error}",
                     digest=str(self._digest), error=failure.getErrorMessage())
            answered = end_unsent_or_cut(self._request, _retry_error())
        self._done(answered)

    def _client_left(self, _: object) -> None:
        self._gone = True
        if self.transport is not None:
            cast(Any, self.transport).stopProducing()
        self._done(False)

    def _done(self, ok: bool) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(ok)


def when_counted(request: Request, then: Callable[[], object]) -> None:
    """
    Call C{then} once C{request.sentLength} counts every byte sent: at once,
    or when a sending thread that was mid-batch as the client left is done.
    """
    pending: Deferred[None] | None = getattr(request, "still_sending", None)
    if pending is None:
        then()
    else:
        pending.addCallback(lambda _: then())


def _batch_crashed(failure: Failure) -> tuple[int, str]:
    log.failure("sending a blob failed", failure)
    return 0, "failed"


def _widen_buffer(transport: object) -> None:
    """
    Let a TCP transport buffer (and read) more than Twisted's default 64 KiB
    before it pauses its producer: with blob-sized bodies, pausing and
    resuming the upstream connection every 64 KiB costs more time than
    moving the bytes.  Under TLS the TCP transport is the one the TLS layer
    wraps.
    """
    for _ in range(4):
        if isinstance(transport, tcp.Connection):
            transport.bufferSize = TRANSPORT_BUFFER
            return
        transport = getattr(transport, "transport", None)


def _raw_socket(request: Request) -> int | None:
    """
    The client's socket, when the body can go to it directly (sendfile(2)
    from a file, write(2) from memory) rather than through the transport:
    plain TCP, not TLS, which must encrypt in user space.
    """
    if not SENDFILE or not hasattr(os, "sendfile"):
        return None
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if not isinstance(transport, tcp.Server) or getattr(transport, "TLS", False):
        return None
    if not hasattr(transport, "dataBuffer") or not hasattr(transport, "_tempDataBuffer"):
        return None
    if request.method == b"HEAD":
        return None
    if not request.responseHeaders.hasHeader(b"content-length"):
        return None  # the body is chunked: Twisted must frame it
    return transport.fileno()


_LENGTH = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def parse_content_range(header: str | bytes | None) -> tuple[int, int, int | None] | None:
    """C{Content-Range: bytes FIRST-LAST/TOTAL} as (first, last, total or None)."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        return None
    first, last, total = match.groups()
    if int(last) < int(first):
        return None
    return int(first), int(last), None if total == "*" else int(total)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """
    Interpret a single C{Range: bytes=...} header against a blob of C{size}
    bytes.  Returns C{(start, end)} (end exclusive), L{None} to serve the whole
    blob (no header, or one we do not handle such as several ranges) or
    C{"unsatisfiable"}.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if size == 0:
        return "unsatisfiable"
    if not first:
        length = int(last)
        if length == 0:
            return "unsatisfiable"
        return (max(0, size - length), size)
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or (last and int(last) < start):
        return "unsatisfiable"
    return (start, end)


class BlobService:
    """
    Answers blob GET and HEAD requests for mapped repositories.
    """

    def __init__(
        self,
        cache: BlobStore,
        clock: Any,
        metrics: Metrics | None = None,
        run_in_thread: RunInThread = run_here,
        call_from_thread: Callable[..., None] | None = None,
        client_waits_for_disk: bool = False,
        leave_disk_after: float = LEAVE_DISK_AFTER,
        send_in_thread: RunInThread | None = None,
        links: RepositoryLinks | None = None,
        send_timeout: float = SEND_STALL_TIMEOUT,
    ) -> None:
        self.cache = cache
        #: A client that takes nothing of a blob body for this long is cut.
        self.send_timeout = send_timeout
        self._clock = clock
        #: Which names the upstream has shown each cached blob under.
        self.links = links if links is not None else RepositoryLinks(None)
        self._metrics = metrics
        self._run_in_thread = run_in_thread
        #: Else a lone client of a cold blob is not held back by a disk slower
        #: than the upstream (the rest of the blob is fetched into the cache after).
        self.client_waits_for_disk = client_waits_for_disk
        self.leave_disk_after = leave_disk_after
        #: With it, each download hashes and writes on a thread of its own.
        self._call_from_thread = call_from_thread
        #: With it, blob bodies go from files to sockets on sending threads.
        self._send_in_thread = send_in_thread
        self._fetches: dict[BlobKey, Fetch] = {}
        #: Upstream blob downloads under way, those not joinable (too big to
        #: cache, or the disk left behind) too.
        self._downloads = 0

    def _upstream_bytes_counter(self, registry_id: str) -> Callable[[int], None] | None:
        metrics = self._metrics
        if metrics is None:
            return None
        return lambda count: metrics.upstream_bytes.inc(count, registry_id)

    def _bad_content_counter(self, registry_id: str) -> Callable[[], None] | None:
        metrics = self._metrics
        if metrics is None:
            return None
        return lambda: metrics.upstream_errors.inc(1, registry_id, "content")

    def downloading(self, key: BlobKey) -> bool:
        """Whether a download of the blob into the cache is under way."""
        return key in self._fetches

    def in_flight(self) -> int:
        """Blob downloads from upstream under way (cacheable or not)."""
        return self._downloads

    def serve(
        self,
        request: Request,
        upstream: Upstream,
        upstream_name: str,
        digest: Digest,
        head: bool,
    ) -> Deferred[None]:
        key = BlobKey(upstream.registry.id, digest)
        # Another name brought it here (or is bringing it): the upstream is
        # asked first.  A download under this very name answers for itself
        # (a herd's followers must not each send a HEAD), and a miss asks the
        # upstream anyway.
        fetch = self._fetches.get(key)
        if (
            self.cache.lookup(key) is not None or (fetch is not None and fetch.name != upstream_name)
        ) and not self.links.known(upstream.registry.id, upstream_name, digest):
            return self._confirm(request, upstream, upstream_name, digest, head)
        return self._serve(request, upstream, upstream_name, digest, head)

    def _serve(
        self,
        request: Request,
        upstream: Upstream,
        upstream_name: str,
        digest: Digest,
        head: bool,
    ) -> Deferred[None]:
        key = BlobKey(upstream.registry.id, digest)
        opened = self.cache.open_entry(key)
        if opened is not None:
            self._mark(request, "hit")
            entry, fileobj = opened
            return self._serve_hit(request, entry, fileobj, digest, head)
        if head or none_match(request, f'"{digest}"'):
            # A client that holds the blob (If-None-Match) needs to hear only
            # that the upstream still has it here: a HEAD, then a 304.
            self._mark(request, "miss")
            return self._head_upstream(request, upstream, upstream_name, digest)
        fetch = self._fetches.get(key)
        if fetch is not None:
            self._mark(request, "join")
            return self._follow(
                request,
                fetch,
                digest,
                upstream_name,
                lambda: self.serve(request, upstream, upstream_name, digest, head),
                lambda: self._start_fetch(request, key, upstream, upstream_name, digest),
            )
        self._mark(request, "miss")
        if _range(request, digest) is not None:
            return self._serve_range_of_miss(request, key, upstream, upstream_name, digest)
        return self._start_fetch(request, key, upstream, upstream_name, digest)

    def _serve_range_of_miss(
        self, request: Request, key: BlobKey, upstream: Upstream, upstream_name: str, digest: Digest
    ) -> Deferred[None]:
        """
        A client resuming a blob not cached yet (C{Range}): the whole blob
        comes into the cache, and the client gets its part as it arrives,
        like a client that joined the download.  A blob that cannot be
        cached is sent whole (200), as a server may answer any Range.
        """
        fetch = Fetch(key, upstream_name)
        self._start_fetch(None, key, upstream, upstream_name, digest, fetch=fetch).addErrback(lambda _: None)

        def whole() -> Deferred[None]:
            return self._start_fetch(request, key, upstream, upstream_name, digest)

        return self._follow(request, fetch, digest, upstream_name, whole, whole)

    def _confirm(
        self, request: Request, upstream: Upstream, upstream_name: str, digest: Digest, head: bool
    ) -> Deferred[None]:
        """
        Another name brought this blob into the cache: serve it under this
        one only once the upstream confirms (with a HEAD) that it has it here.
        """
        d = upstream.request("HEAD", f"/v2/{upstream_name}/blobs/{digest}", pull_scope(upstream_name), any_origin=True)

        def answered(response: IResponse) -> Deferred[None]:
            discard_body(response)
            if response.code != 200:
                raise map_status(upstream, response, blob_unknown(str(digest)))
            self.links.add(upstream.registry.id, upstream_name, [digest])
            return self.serve(request, upstream, upstream_name, digest, head)

        def unconfirmed(failure: Failure) -> Deferred[None]:
            # Cached before links were kept, and the upstream cannot say:
            # served as it was before, rather than not at all.
            if upstream_unavailable(failure.value) and self.links.legacy(upstream.registry.id, digest):
                return self._serve(request, upstream, upstream_name, digest, head)
            return fail(failure)

        return d.addCallback(answered).addErrback(unconfirmed)

    def _mark(self, request: Request, how: str) -> None:
        request.setHeader(b"X-Cache", b"HIT" if how == "hit" else b"MISS")
        request.cache_status = how  # type: ignore[attr-defined]
        if self._metrics is not None:
            self._metrics.cache_lookups.inc(1, "blob", how)

    # -- hits --------------------------------------------------------------

    def _serve_hit(
        self, request: Request, entry: Entry, fileobj: IO[bytes], digest: Digest, head: bool
    ) -> Deferred[None]:
        done: Deferred[None] = Deferred()

        def release(ok: bool = True) -> None:
            self.cache.release(entry)
            # A response cut short ends with the connection: Klein cancels
            # the handler's Deferred then; only a finished one fires it.
            if ok:
                _fire(done)

        try:
            span = _answer_conditions(request, digest, entry.size, head)
        except BaseException:
            # The entry must not stay pinned (nor its file open) for good.
            fileobj.close()
            release(ok=False)
            raise
        if span is None:
            fileobj.close()
            release()
            return done
        start, end = span
        if request.channel is None or getattr(request, "_disconnected", False):
            # Gone meanwhile (while the upstream confirmed the blob, say).
            fileobj.close()
            release(ok=False)
            return done
        sender = FileSender(
            request, fileobj, start, end, clock=self._clock, on_done=release, send_in_thread=self._send_in_thread,
            send_timeout=self.send_timeout,
        )
        try:
            sender.start()
        except BaseException:
            sender.abandon()
            raise
        return done

    # -- misses ------------------------------------------------------------

    def _head_upstream(
        self, request: Request, upstream: Upstream, upstream_name: str, digest: Digest
    ) -> Deferred[None]:
        d = upstream.request("HEAD", f"/v2/{upstream_name}/blobs/{digest}", pull_scope(upstream_name), any_origin=True)

        def answered(response: IResponse) -> None:
            discard_body(response)
            if response.code != 200:
                raise map_status(upstream, response, blob_unknown(str(digest)))
            self.links.add(upstream.registry.id, upstream_name, [digest])
            _blob_headers(request, digest)
            etag = f'"{digest}"'
            request.setHeader(b"ETag", etag.encode())
            request.setHeader(b"Accept-Ranges", b"bytes")
            if none_match(request, etag):
                request.setResponseCode(304)
                request.finish()
                return
            # Not _content_length: Twisted's client gives every HEAD response
            # a length of 0, whatever its Content-Length says.
            length = _header_length(response)
            if length is not None:
                request.setHeader(b"Content-Length", str(length).encode())
            request.finish()

        return d.addCallback(answered)

    def _start_fetch(
        self,
        request: Request | None,
        key: BlobKey,
        upstream: Upstream,
        upstream_name: str,
        digest: Digest,
        resume: BlobWriter | None = None,
        fetch: Fetch | None = None,
    ) -> Deferred[None]:
        """
        Download a blob for C{request} (None: into the cache only).  With
        C{resume}, a cache file that already holds the start of the blob,
        only the rest is asked for (C{Range}).  C{fetch}: the download's
        L{Fetch}, if the caller made it.
        """
        if fetch is None:
            fetch = Fetch(key, upstream_name)
        self._fetches[key] = fetch
        self._downloads += 1
        counted = [True]

        def settled(result: object) -> object:
            if counted[0]:
                counted[0] = False
                self._downloads -= 1
            return result

        describe = f"{upstream.registry.id} {upstream_name}@{digest}"
        primary: list[Request | None] = [request]
        if request is not None:
            request.notifyFinish().addErrback(lambda _: primary.__setitem__(0, None))
        served: Deferred[None] = Deferred()
        disk_left_behind: Deferred[BlobWriter] | None = None
        have = resume.length() if resume is not None else None
        if resume is not None and not have:
            resume.abort()  # nothing (or nothing readable) to go on from
            resume = None

        def forget(result: object) -> object:
            if self._fetches.get(key) is fetch:
                del self._fetches[key]
            return result

        also_when_failed = fetch.on_failed  # (the caller's)

        def failed_on_the_way() -> None:
            forget(None)  # whoever comes next starts a download of their own
            if also_when_failed is not None:
                also_when_failed()

        fetch.on_failed = failed_on_the_way
        fetch.rescue = lambda request, fileobj, position, end, total, on_done: self._rescue(
            request, fileobj, position, end, total, on_done, upstream, upstream_name, digest
        )

        def leave_disk_behind(kept: Deferred[BlobWriter]) -> None:
            nonlocal disk_left_behind
            disk_left_behind = kept
            forget(None)  # whoever comes next starts a download of their own
            if self._metrics is not None:
                self._metrics.disk_left_behind.inc()

        def refill(ok: bool) -> bool:
            if disk_left_behind is not None:
                if ok:
                    self._refill(key, upstream, upstream_name, digest, disk_left_behind)
                else:
                    disk_left_behind.addCallback(lambda writer: writer.abort())
            return ok

        def answered(response: IResponse) -> Deferred[bool] | None:
            offset = 0
            length = _content_length(response)
            if resume is not None:
                resumed = self._resumed(response, resume, have or 0, self.cache.max_size_bytes)
                if resumed is None:
                    resume.abort()
                    discard_body(response)
                    if response.code in (200, 206):
                        # (Said as it is: "the download this request joined
                        # failed" told the operator nothing of a refill.)
                        raise _RangeRefused(upstream.error(
                            503, "UNAVAILABLE",
                            "answered the request for the rest of the blob with another range, or the rest no "
                            "longer fits the cache; retry",
                            headers={"Retry-After": "1"},
                        ))
                    raise map_status(upstream, response, blob_unknown(str(digest)))
                offset, length = resumed
            elif response.code != 200:
                discard_body(response)
                raise map_status(upstream, response, blob_unknown(str(digest)))
            self.links.add(upstream.registry.id, upstream_name, [digest])
            writer = resume
            if writer is None and (length is None or length <= self.cache.max_size_bytes):
                writer = self.cache.begin(key, None if length is None else offset + length)
            client = primary[0]
            if writer is None:
                # Not cacheable now: this request streams alone.  Requests that
                # joined meanwhile are told to retry.
                forget(None)
                fetch.uncacheable = True
                fetch.refused(_retry_error())
                if client is None:
                    discard_body(response)
                    _fire(served)
                    settled(None)
                    return None
            else:
                writer.expected = None if length is None else offset + length
                fetch.started(writer, writer.expected)
                fetch.progressed(offset)
            if client is not None:
                _blob_headers(client, digest)
                if length is not None:
                    client.setHeader(b"Content-Length", str(length).encode())
                    client.setHeader(b"ETag", f'"{digest}"'.encode())
                    client.setHeader(b"Accept-Ranges", b"bytes")
            pipe = BlobPipe(
                digest,
                length,
                writer,
                client,
                fetch if writer is not None else None,
                self._clock,
                upstream.registry.read_timeout,
                describe,
                self._upstream_bytes_counter(upstream.registry.id),
                self._run_in_thread,
                self._call_from_thread,
                None if self.client_waits_for_disk else leave_disk_behind,
                self.leave_disk_after,
                self._send_in_thread,
                offset,
                # What the cache may hold now, as begin() asks of a known
                # length: max_size_bytes, or less on a disk short of room.
                self.cache.size_limit() if length is None else None,
                self._bad_content_counter(upstream.registry.id),
                self.send_timeout,
                lambda status, reason: upstream.error(status, "UNAVAILABLE", reason),
            )
            response.deliverBody(pipe)
            if client is None or client.finished or getattr(client, "_disconnected", False):
                # (A body that came whole in one go may have ended the
                # response already: notifyFinish would then never fire.)
                _fire(served)
            else:
                # Klein's handler is done when the response is, whoever ends
                # it (this pipe, or a FileSender after a demotion).
                client.notifyFinish().addBoth(lambda _: _fire(served))
            pipe.done.addBoth(settled)
            return pipe.done.addCallback(refill)

        def failed(failure: Failure) -> None:
            settled(None)
            if resume is not None:
                resume.abort()  # the upstream never answered: nothing to go on with
            error = _as_registry_error(failure, upstream)
            forget(None)  # before its followers hear: one may start another
            fetch.refused(error)
            if not served.called:
                served.errback(failure)

        headers = {"range": [f"bytes={have}-"]} if resume is not None else None
        d = upstream.request(
            "GET", f"/v2/{upstream_name}/blobs/{digest}", pull_scope(upstream_name), headers, any_origin=True
        )
        d.addCallback(answered)
        d.addErrback(failed)
        d.addBoth(forget)
        return served

    @staticmethod
    def _resumed(
        response: IResponse, writer: BlobWriter, have: int, max_size: int
    ) -> tuple[int, int | None] | None:
        """
        Where the body of an answer to a C{Range: bytes=HAVE-} request goes
        in C{writer}'s file, and its length: at HAVE for the matching 206 (to
        the blob's end, or of an unknown total), at
        0 for a 200 (the whole blob: what the file held is dropped); None for
        anything else, a blob over C{max_size}, or a file that cannot be
        cut to size, which the caller refuses.
        """
        length = _content_length(response)
        if response.code == 200:
            offset = 0
            if length is not None and length > max_size:
                return None
        elif response.code == 206:
            span = parse_content_range(response.headers.getRawHeaders("content-range", [None])[0])
            if span is None:
                return None
            first, last, total = span
            if first != have:
                return None
            # A total of "*" (unknown) is taken at its word: the digest check
            # refuses a range that stops short of the blob's end.
            if total is not None and last != total - 1:
                return None
            if length is not None and length != last + 1 - have:
                return None
            if last + 1 > max_size:
                return None
            offset, length = have, last + 1 - have
        else:
            return None
        try:
            writer.resume_at(offset)
        except OSError:
            return None
        return offset, length

    def _rescue(
        self,
        request: Request,
        fileobj: IO[bytes],
        position: int,
        end: int,
        total: int,
        on_done: Callable[[bool], None] | None,
        upstream: Upstream,
        upstream_name: str,
        digest: Digest,
    ) -> bool:
        """
        Go on with a follower whose download's file was given up: the bytes
        it has had are hashed from the file it still holds open, the rest of
        the blob comes from the upstream (a Range), and its last byte (at
        C{end}) waits for the digest of the whole, as every blob response's
        does.
        """
        log.info("download of {what} lost its file; a follower at {position} asks for the rest",
                 what=f"{upstream.registry.id} {upstream_name}@{digest}", position=position)
        hasher = digest.hasher()
        pipe = _RescuePipe(
            request, hasher, position, end, total, digest, on_done, self._clock, upstream.registry.read_timeout,
            self._upstream_bytes_counter(upstream.registry.id),
        )

        # (A Range follower may wait past what the file holds: what lies
        # between is hashed as it comes, not sent.)
        have = position

        def hashed(count: int) -> Deferred[Any]:
            nonlocal have
            fileobj.close()
            have = count
            pipe.hashed_to(count)
            return upstream.request(
                "GET", f"/v2/{upstream_name}/blobs/{digest}", pull_scope(upstream_name),
                {"range": [f"bytes={have}-"]}, any_origin=True,
            )

        def answered(response: IResponse) -> None:
            if response.code == 206:
                span = parse_content_range(response.headers.getRawHeaders("content-range", [None])[0])
                if span is None or span[0] != have:
                    discard_body(response)
                    raise _retry_error()
            elif response.code == 200:
                pipe.skip = have  # the whole blob: what was hashed is passed over
            else:
                discard_body(response)
                raise _retry_error()
            response.deliverBody(pipe)

        d = self._run_in_thread(hash_fd_upto, hasher, fileobj.fileno(), position)
        d.addCallback(hashed).addCallback(answered).addErrback(pipe.failed)
        return True

    def _refill(
        self,
        key: BlobKey,
        upstream: Upstream,
        upstream_name: str,
        digest: Digest,
        partial: Deferred[BlobWriter] | None = None,
    ) -> None:
        """
        Download a blob into the cache with no client waiting for it, unless
        it is already there or on its way; C{partial}, the file a download
        left behind, is completed rather than started over.
        """
        if partial is not None:
            # Under way from now (a graceful stop waits for it), though it
            # starts only once the writing thread has let go of the file.
            self._downloads += 1

            def go(writer: BlobWriter) -> None:
                self._downloads -= 1
                self._refill_from(key, upstream, upstream_name, digest, writer)

            def not_kept(failure: Failure) -> None:
                self._downloads -= 1
                log.failure("keeping the file a download left behind failed", failure)

            partial.addCallbacks(go, not_kept)
            return
        self._refill_from(key, upstream, upstream_name, digest, None)

    def _refill_from(
        self, key: BlobKey, upstream: Upstream, upstream_name: str, digest: Digest, writer: BlobWriter | None
    ) -> None:
        if key in self._fetches or self.cache.lookup(key) is not None:
            if writer is not None:
                writer.abort()
            return

        # Once, the whole blob anew when the rest will not do (the upstream
        # answered another range, or the file and the rest are not the
        # blob): else every pull of it downloaded it and refilled in vain.
        whole_once = [writer is not None]

        def whole() -> None:
            if whole_once[0]:
                whole_once[0] = False
                self._clock.callLater(0, self._refill_from, key, upstream, upstream_name, digest, None)

        def failed(failure: Failure) -> None:
            log.warn(
                "fetching {registry} {name}@{digest} into the cache failed: {why}",
                registry=upstream.registry.id,
                name=upstream_name,
                digest=str(digest),
                why=_as_registry_error(failure, upstream).message,
            )
            if failure.check(_RangeRefused):
                whole()

        fetch = Fetch(key, upstream_name)
        fetch.on_failed = whole
        self._start_fetch(None, key, upstream, upstream_name, digest, writer, fetch=fetch).addErrback(failed)

    def _follow(
        self,
        request: Request,
        fetch: Fetch,
        digest: Digest,
        upstream_name: str,
        again: Callable[[], Deferred[None]],
        alone: Callable[[], Deferred[None]],
    ) -> Deferred[None]:
        """
        Serve C{request} from C{fetch}'s file as it grows.  A download that
        the upstream refused (404, 403) for the name that started it is asked
        C{again} for this request's own name (which may have the blob).  One
        that cannot be cached (too big, or the disk refused) has no file to
        follow: the request gets a download of its own, C{alone} (joining
        another would have a herd's clients start one after the other).
        """

        def refused(failure: Failure) -> Deferred[None]:
            error = failure.value
            if fetch.uncacheable:
                return alone()
            if isinstance(error, RegistryError) and error.status in (401, 403, 404) and fetch.name != upstream_name:
                return again()
            return fail(failure)

        def go(fetch: Fetch) -> Deferred[None]:
            done: Deferred[None] = Deferred()
            if fetch.state == "done" and fetch.entry is not None:
                opened = self.cache.open_entry(fetch.key)
                if opened is None:
                    raise _retry_error()
                entry, fileobj = opened
                return self._serve_hit(request, entry, fileobj, digest, head=False)
            if fetch.state != "running" or fetch.writer is None:
                raise fetch.error or _retry_error()
            try:
                fileobj = open(fetch.writer.path, "rb")
            except OSError:
                raise _retry_error() from None
            start, end = 0, fetch.total
            if fetch.total is None:
                _blob_headers(request, digest)
            else:
                try:
                    span = _answer_conditions(request, digest, fetch.total, head=False)
                except BaseException:
                    fileobj.close()
                    raise
                if span is None:
                    fileobj.close()
                    _fire(done)
                    return done
                start, end = span

            def finished(ok: bool) -> None:
                if ok:
                    _fire(done)

            FileSender(
                request, fileobj, start, end, fetch, self._clock, on_done=finished, send_in_thread=self._send_in_thread,
                send_timeout=self.send_timeout,
            ).start()
            return done

        return fetch.when_started().addCallback(go).addErrback(refused)


def none_match(request: Request, etag: str, unquoted: bool = False) -> bool:
    """
    Whether the request's If-None-Match names C{etag}: its answer is then a
    304.  RFC 9110 13.1.2: "*" matches any current representation, and the
    comparison is weak (W/"x" matches "x").  With C{unquoted}, the digest
    without its quotes matches too, as distribution takes it for manifests.
    """
    if_none_match = request.getHeader(b"if-none-match")
    if if_none_match is None:
        return False
    offered = [t.strip().removeprefix("W/") for t in if_none_match.decode("latin-1").split(",")]
    return "*" in offered or etag in offered or (unquoted and etag.strip('"') in offered)


def _answer_conditions(request: Request, digest: Digest, size: int, head: bool) -> tuple[int, int] | None:
    """
    Set the headers of a blob response whose size is known, and answer it
    at once when there is no body to send (304, 416, HEAD).  Returns the
    span C{(start, end)} of the blob to send, or L{None} when finished.
    """
    etag = f'"{digest}"'
    _blob_headers(request, digest)
    request.setHeader(b"ETag", etag.encode())
    request.setHeader(b"Accept-Ranges", b"bytes")
    if none_match(request, etag):
        request.setResponseCode(304)
        request.finish()
        return None
    # RFC 9110 14.2: Range is for GET only.
    wanted = None if head else parse_range(_range(request, digest), size)
    if wanted == "unsatisfiable":
        request.setResponseCode(416)
        request.setHeader(b"Content-Range", f"bytes */{size}".encode())
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        return None
    start, end = 0, size
    if isinstance(wanted, tuple):
        start, end = wanted
        request.setResponseCode(206)
        request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{size}".encode())
    request.setHeader(b"Content-Length", str(end - start).encode())
    if head:
        request.finish()
        return None
    return start, end


def _fire(d: Deferred[None]) -> None:
    # Klein cancels a handler's Deferred when the client goes away.
    if not d.called:
        d.callback(None)


class _RangeRefused(RegistryError):
    """The rest of a blob, asked for with C{Range}, did not come as asked (or no longer fits)."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.status, error.code, error.message, error.detail, error.headers)


def _retry_error() -> RegistryError:
    return RegistryError(
        503, "UNAVAILABLE", "the blob download this request joined failed; retry",
        headers={"Retry-After": "1"},
    )


def _as_registry_error(failure: Failure, upstream: Upstream) -> RegistryError:
    if failure.check(RegistryError):  # UpstreamError included
        return failure.value  # type: ignore[return-value]
    return upstream.error(502, "UNAVAILABLE", f"failed: {failure.type.__name__}")



def _range(request: Request, digest: Digest) -> str | None:
    """
    The request's C{Range}, unless an C{If-Range} names another
    representation: the whole blob is then sent (RFC 9110 13.1.5; the
    comparison is strong, and a date never matches, as no Last-Modified is
    given).
    """
    wanted = _header(request, b"range")
    if_range = _header(request, b"if-range")
    if wanted is not None and if_range is not None and if_range.strip() != f'"{digest}"':
        return None
    return wanted


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


def _content_length(response: IResponse) -> int | None:
    if response.length is not webclient.UNKNOWN_LENGTH and isinstance(response.length, int):
        return response.length
    return _header_length(response)


def _header_length(response: IResponse) -> int | None:
    values = response.headers.getRawHeaders("content-length")
    if values and _LENGTH.fullmatch(values[0]):
        return int(values[0])
    return None


def _blob_headers(request: Request, digest: Digest) -> None:
    request.setHeader(b"Content-Type", b"application/octet-stream")
    request.setHeader(b"Docker-Content-Digest", str(digest).encode())
