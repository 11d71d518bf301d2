"""
BlobPipe's flow control with the real worker threads and a cache writer the
test holds back: what happens to a client when the cache's disk cannot keep
up with the upstream.  (Against real peers, see test_integration_cache.py.)
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from cargobay import blobs
from cargobay.blobs import (
    GATHER,
    LEAVE_DISK_AFTER,
    REPORT_EVERY,
    STORE_BACKLOG,
    TRANSPORT_BUFFER,
    BlobPipe,
    Fetch,
    ThreadedHashAndStore,
    _widen_buffer,
    parse_range,
)
from cargobay.cache import DIRECT_BLOCK, BlobKey, Entry
from cargobay.reference import Digest

MiB = 1024 * 1024
BODY = os.urandom(STORE_BACKLOG + 4 * MiB + 1234)  # not a whole number of blocks
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BODY).hexdigest())


class HeldBackWriter:
    """
    A cache writer whose writes wait until the test opens the gate, and that
    keeps a last partial block back like a real one writing with O_DIRECT.
    """

    def __init__(self) -> None:
        self.path = "/nonexistent/held-back"
        self.gate = threading.Event()
        self.written = bytearray()
        self.held = b""
        self.size = 0
        self.aborted = False
        self.committed = False

    def write_raw(self, data: bytes) -> int:
        assert self.gate.wait(30), "the test never opened the gate"
        pending = self.held + data
        whole = len(pending) - len(pending) % DIRECT_BLOCK
        self.written += pending[:whole]
        self.held = pending[whole:]
        return whole

    def flush_raw(self) -> int:
        held, self.held = self.held, b""
        self.written += held
        return len(held)

    def drop_held(self) -> int:
        held, self.held = self.held, b""
        return len(held)

    def wrote(self, count: int) -> None:
        self.size += count

    def sync_raw(self) -> None:
        pass

    def commit(self, synced: bool = False) -> Entry:
        self.committed = True
        return Entry(BlobKey("up", DIGEST), "/nonexistent/entry", self.size, 0.0)

    def abort(self) -> None:
        self.aborted = True

    def failed(self, error: OSError) -> None:
        self.abort()


class Reactor:
    """call_from_thread into a queue that the test runs, as a reactor would."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()

    def call_from_thread(self, function: Callable[..., Any], *args: Any) -> None:
        self.calls.put((function, args))

    def run_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            function, args = self.calls.get(timeout=30)
            function(*args)


class Client:
    """The primary client's request, through request.write (no raw socket)."""

    channel = None
    method = b"GET"

    def __init__(self) -> None:
        self.body = bytearray()
        self.finished = False
        self.producer: object = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        self.finished = True


class UpstreamConnection:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class Follower:
    """A reader of the cache file, as FileSender looks to a Fetch."""

    position = 0
    end = None

    def wake(self) -> None:
        pass


def left_behind(kept: Any, events: list[str]) -> None:
    """What the service hears: the file left behind, once its thread lets go."""
    events.append("left behind")
    kept.addCallback(lambda writer: events.append("file handed over"))


def make_pipe(
    may_leave: bool,
    running_for: float = LEAVE_DISK_AFTER,
    leave_disk_after: float = LEAVE_DISK_AFTER,
    clock: Clock | None = None,
) -> tuple[BlobPipe, HeldBackWriter, Fetch, Reactor, Client, UpstreamConnection, list[str]]:
    """A download that has been running for C{running_for} seconds."""
    writer = HeldBackWriter()
    clock = clock or Clock()
    fetch = Fetch(BlobKey("up", DIGEST))
    fetch.started(writer, len(BODY))  # type: ignore[arg-type]
    reactor, client, upstream = Reactor(), Client(), UpstreamConnection()
    events: list[str] = []
    pipe = BlobPipe(
        DIGEST, len(BODY), writer, client, fetch, clock, 60.0, "up test@digest",  # type: ignore[arg-type]
        call_from_thread=reactor.call_from_thread,
        on_disk_left_behind=(lambda kept: left_behind(kept, events)) if may_leave else None,
        leave_disk_after=leave_disk_after,
    )
    pipe.makeConnection(upstream)  # type: ignore[arg-type]
    clock.advance(running_for)
    return pipe, writer, fetch, reactor, client, upstream, events


def feed(pipe: BlobPipe) -> None:
    for start in range(0, len(BODY), MiB):
        pipe.dataReceived(BODY[start:start + MiB])


def finish(pipe: BlobPipe, reactor: Reactor, how: Exception | None = None) -> bool:
    results: list[bool] = []
    pipe.done.addCallback(results.append)
    pipe.connectionLost(Failure(how or ResponseDone()))
    reactor.run_until(lambda: bool(results))
    return results[0]


def assert_the_disk_paces_the_download(pipe, writer, reactor, upstream, events) -> None:
    """The upstream waits for the disk, which is kept, and the blob is cached whole."""
    assert upstream.paused and events == []
    writer.gate.set()
    assert finish(pipe, reactor) is True
    assert writer.committed and bytes(writer.written) == BODY


def test_a_lone_client_is_not_held_back_by_a_slow_disk():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True)
    feed(pipe)
    # The disk took nothing: the cache file was left behind, the fetch let
    # go (later requests start afresh), and the upstream keeps flowing.
    assert events == ["left behind"]
    assert fetch.state == "failed"
    reactor.run_until(lambda: not upstream.paused)
    # All but the last MiB, held back until the digest is checked, and the
    # odd bytes after it, gathered until the reactor's next turn.
    assert bytes(client.body) == BODY[:len(client.body)] and len(client.body) >= len(BODY) - MiB - len(BODY) % MiB
    # The disk is still stuck in its first write: the client does not wait
    # for it, but the file stays open until the writing thread lets go.
    assert finish(pipe, reactor) is True
    assert client.finished and bytes(client.body) == BODY
    assert events == ["left behind"]
    writer.gate.set()
    # The file, with what the disk did take, goes to the service to be
    # completed (BlobService asks the upstream for the rest).
    reactor.run_until(lambda: "file handed over" in events)
    assert not writer.aborted and not writer.committed
    assert 0 < len(writer.written) < len(BODY) and bytes(writer.written) == BODY[:len(writer.written)]


def test_a_disk_stuck_from_the_first_quarter_second_is_left_behind_all_the_same():
    # The upstream, paused for the disk, sends nothing more: nothing asked
    # again whether to leave the disk, and the client waited for as long as
    # the disk stayed stuck.
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True, running_for=0.1)
    start = 0
    while not upstream.paused:  # a paused connection delivers nothing more
        pipe.dataReceived(BODY[start:start + MiB])
        start += MiB
        pipe._clock.advance(0)
    assert events == []
    pipe._clock.advance(LEAVE_DISK_AFTER)
    assert events == ["left behind"]
    reactor.run_until(lambda: not upstream.paused)  # the hash catches up
    pipe.dataReceived(BODY[start:])
    writer.gate.set()
    assert finish(pipe, reactor) is True
    assert bytes(client.body) == BODY and not writer.committed


def test_with_client_waits_for_disk_the_upstream_is_paused_instead():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    feed(pipe)
    assert upstream.paused and events == []
    writer.gate.set()
    reactor.run_until(lambda: not upstream.paused)
    assert finish(pipe, reactor) is True
    assert client.finished and bytes(client.body) == BODY
    assert writer.committed and bytes(writer.written) == BODY
    assert fetch.state == "done"


def test_a_young_download_keeps_its_disk_so_that_a_herd_can_share_it():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True, running_for=0.1)
    feed(pipe)
    assert_the_disk_paces_the_download(pipe, writer, reactor, upstream, events)


def test_with_no_grace_a_lone_client_leaves_the_disk_at_once():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True, running_for=0, leave_disk_after=0)
    feed(pipe)
    assert events == ["left behind"]
    writer.gate.set()
    assert finish(pipe, reactor) is True
    assert bytes(client.body) == BODY


def test_a_fast_disk_behind_for_want_of_a_core_keeps_the_client_in_step():
    """
    The writing thread is behind, but while it wrote, the disk took bytes
    faster than the upstream sends them: the thread waited for a core, not
    for the disk, so the download waits for it rather than fetching the
    rest of the blob a second time.
    """
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True)
    store = pipe._store
    assert isinstance(store, ThreadedHashAndStore)
    store._disk_bytes, store._disk_seconds = 1 << 30, 0.001  # a terabyte a second
    feed(pipe)
    assert_the_disk_paces_the_download(pipe, writer, reactor, upstream, events)


def test_a_cache_file_short_of_the_verified_body_never_becomes_an_entry():
    """
    However the count of bytes in the file came to differ from the body
    the hash verified (here the file loses its last partial block), the
    client still gets its verified body, and the file is dropped.
    """
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    writer.gate.set()
    writer.flush_raw = lambda: 0  # type: ignore[method-assign]
    feed(pipe)
    reactor.run_until(lambda: not upstream.paused)
    assert finish(pipe, reactor) is True
    assert client.finished and bytes(client.body) == BODY
    assert writer.aborted and not writer.committed
    assert fetch.state == "failed"


@pytest.mark.parametrize("whole", [True, False])
def test_a_body_of_known_length_that_ends_with_its_connection_is_whole_if_every_byte_came(whole):
    # A 206 whose length only its Content-Range gave, ended by closing its
    # connection (no Content-Length): refused as "PotentialDataLoss" at
    # every pull, so that the blob was never cached.
    from twisted.web.http import PotentialDataLoss

    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    writer.gate.set()
    body = BODY if whole else BODY[:-1]
    for start in range(0, len(body), MiB):
        pipe.dataReceived(body[start:start + MiB])
    reactor.run_until(lambda: not upstream.paused)
    assert finish(pipe, reactor, PotentialDataLoss()) is whole
    assert writer.committed is whole


class FailingFollower(Follower):
    """A follower whose reads of the file fail (EIO from a failing disk)."""

    def wake(self) -> None:
        raise OSError(5, "Input/output error")


def test_a_follower_that_fails_does_not_wedge_the_download():
    # Its error used to escape into the pipe's progress calls: the download
    # never concluded, nor was it forgotten; every later request joined it.
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    fetch.add_reader(FailingFollower(), follower=True)  # type: ignore[arg-type]
    writer.gate.set()
    feed(pipe)
    assert finish(pipe, reactor) is True
    assert bytes(client.body) == BODY and writer.committed
    assert not fetch.has_readers() and fetch.state == "done"


def test_a_full_primary_client_that_cannot_be_demoted_pauses_the_upstream():
    # With followers, a full primary client reads the file instead; when the
    # file cannot be opened (here it is not there; out of descriptors, say),
    # it must still hold the upstream back, not let its transport buffer the
    # rest of the body.
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    fetch.add_reader(Follower(), follower=True)  # type: ignore[arg-type]
    writer.gate.set()
    pipe.dataReceived(BODY[:MiB])
    pipe.pauseProducing()
    assert upstream.paused and client.producer is pipe
    pipe.resumeProducing()
    assert not upstream.paused


def test_readers_of_the_file_keep_the_disk_in_the_loop():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True)
    fetch.add_reader(Follower(), follower=False)  # type: ignore[arg-type]
    feed(pipe)
    assert_the_disk_paces_the_download(pipe, writer, reactor, upstream, events)


def unwatched_store(writer: HeldBackWriter) -> tuple[ThreadedHashAndStore, Reactor, list[int]]:
    reactor, reports = Reactor(), []
    store = ThreadedHashAndStore(DIGEST, writer, reactor.call_from_thread, reports.append, lambda e: None)  # type: ignore[arg-type]
    store.watch(False)
    return store, reactor, reports


def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(3000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("waited 30 s")


def test_unwatched_worker_threads_report_every_few_megabytes_and_at_once_when_watched():
    writer = HeldBackWriter()
    writer.gate.set()
    store, reactor, reports = unwatched_store(writer)
    for start in range(0, 3 * MiB, MiB):
        store.feed(BODY[start:start + MiB])
    # Both threads are done with it, and the reactor knows (it reads their
    # counts) without being woken for it.
    wait_for(lambda: store.pending_bytes == 0)
    assert reactor.calls.empty() and store.stored == 0
    store.watch(True)  # now something waits on their progress
    reactor.run_until(lambda: store.stored == 3 * MiB)
    store.feed(BODY[3 * MiB:4 * MiB])
    reactor.run_until(lambda: store.stored == 4 * MiB)  # as each chunk is done
    store.watch(False)
    for start in range(4 * MiB, 4 * MiB + REPORT_EVERY, MiB):
        store.feed(BODY[start:start + MiB])
    reactor.run_until(lambda: store.stored == 4 * MiB + REPORT_EVERY)  # every REPORT_EVERY
    done: list[object] = []
    store.drained().addCallback(done.append)
    reactor.run_until(lambda: bool(done))


def test_a_download_paused_for_its_threads_watches_them_and_resumes():
    # Unwatched, the threads would not say that they caught up: the
    # upstream, paused for them, would wait for good.
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    store = pipe._store
    assert isinstance(store, ThreadedHashAndStore)
    assert not store._watched  # no readers, not paused
    feed(pipe)
    assert upstream.paused and store._watched
    writer.gate.set()
    reactor.run_until(lambda: not upstream.paused)
    assert not store._watched
    fetch.add_reader(Follower())  # type: ignore[arg-type]
    assert store._watched


def test_a_fetch_keeps_its_most_recent_bytes_for_its_readers(monkeypatch):
    monkeypatch.setattr(blobs, "RECENT_BYTES", 3 * MiB)
    fetch = Fetch(BlobKey("up", DIGEST))
    assert fetch.recent_views(0, 10) is None
    for start in range(0, 5 * MiB, MiB):
        fetch.remember(start, BODY[start:start + MiB])
    # The last 3 MiB, as views of the very pieces passed on.
    assert fetch.recent_views(MiB, MiB + 1) is None
    views = fetch.recent_views(2 * MiB + 10, 4 * MiB + 20)
    assert views is not None and b"".join(views) == BODY[2 * MiB + 10:4 * MiB + 20]
    assert [len(v) for v in views] == [MiB - 10, MiB, 20]
    assert fetch.recent_views(4 * MiB, 5 * MiB + 1) is None  # not passed on yet
    assert fetch.recent_views(3 * MiB, 3 * MiB) is None
    # A piece that does not follow the last starts them again.
    fetch.remember(7 * MiB, BODY[:10])
    assert fetch.recent_views(4 * MiB, 4 * MiB + 1) is None
    assert fetch.recent_views(7 * MiB, 7 * MiB + 10) is not None
    # A finished fetch with no reader left lets go of them.
    reader = Follower()
    fetch.add_reader(reader)  # type: ignore[arg-type]
    fetch.finished(None, ok=False)
    assert fetch.recent_views(7 * MiB, 7 * MiB + 10) is not None
    fetch.remove_reader(reader)  # type: ignore[arg-type]
    assert fetch.recent_views(7 * MiB, 7 * MiB + 10) is None


def test_downloads_together_keep_no_more_recent_bytes_than_the_total(monkeypatch):
    monkeypatch.setattr(blobs, "RECENT_BYTES", 3 * MiB)
    monkeypatch.setattr(blobs, "RECENT_TOTAL", 5 * MiB)
    monkeypatch.setattr(Fetch, "_keeping", weakref.WeakSet())  # other tests' fetches may live on
    first, second = Fetch(BlobKey("up", DIGEST)), Fetch(BlobKey("up", DIGEST))
    for start in range(0, 3 * MiB, MiB):
        first.remember(start, BODY[start:start + MiB])
    second.remember(0, BODY[:MiB])
    second.remember(MiB, BODY[MiB:2 * MiB])
    assert second.recent_views(0, 2 * MiB) is not None
    # One more would make 6 MiB: the one that asked keeps none (its readers
    # read the file), the other keeps its own.
    second.remember(2 * MiB, BODY[2 * MiB:3 * MiB])
    assert second.recent_views(2 * MiB, 2 * MiB + 1) is None
    assert first.recent_views(0, 3 * MiB) is not None
    first.forget_recent()
    second.remember(3 * MiB, BODY[3 * MiB:4 * MiB])
    assert second.recent_views(3 * MiB, 4 * MiB) is not None


def test_a_download_keeps_its_recent_bytes_only_while_followed():
    # A lone client's download keeps nothing (fresh memory costs a lone cold
    # client CPU); from a follower's coming on, what it passes on is kept.
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False, running_for=0)
    writer.gate.set()
    pipe.dataReceived(BODY[:MiB])
    assert fetch.recent_views(0, 1) is None
    reader = Follower()
    fetch.add_reader(reader)  # type: ignore[arg-type]
    pipe.dataReceived(BODY[MiB:2 * MiB])
    views = fetch.recent_views(MiB, 2 * MiB)
    assert views is not None and b"".join(views) == BODY[MiB:2 * MiB]
    fetch.remove_reader(reader)  # type: ignore[arg-type]
    pipe.dataReceived(BODY[2 * MiB:3 * MiB])
    assert fetch.recent_views(MiB, MiB + 1) is None and fetch.recent_views(2 * MiB, 2 * MiB + 1) is None


def test_the_primary_client_has_its_last_bytes_once_the_body_is_hashed_before_the_disk_is_done():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    feed(pipe)  # the writing thread is stuck in its first write
    pipe.connectionLost(Failure(ResponseDone()))
    reactor.run_until(lambda: client.finished)
    assert bytes(client.body) == BODY
    # Followers read the file: they wait for the disk, and nothing is an entry yet.
    assert fetch.verified_size is None and fetch.state == "running" and not writer.committed
    results: list[bool] = []
    pipe.done.addCallback(results.append)
    writer.gate.set()
    reactor.run_until(lambda: bool(results))
    assert results == [True] and writer.committed and bytes(writer.written) == BODY
    assert fetch.verified_size == len(BODY)


class DiskFullOnceOpen(HeldBackWriter):
    """Writes wait for the gate; once it opens, the disk is full."""

    def write_raw(self, data: bytes) -> int:
        assert self.gate.wait(30), "the test never opened the gate"
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_that_fails_after_the_primary_client_had_its_bytes_is_not_the_upstreams_fault():
    # The pipe took the lost file for a lost client: "upstream ... cannot be
    # cached and has no client left", and the download concluded as failed.
    writer = DiskFullOnceOpen()
    fetch = Fetch(BlobKey("up", DIGEST))
    fetch.started(writer, len(BODY))  # type: ignore[arg-type]
    reactor, client, upstream = Reactor(), Client(), UpstreamConnection()
    pipe = BlobPipe(
        DIGEST, len(BODY), writer, client, fetch, Clock(), 60.0, "up test@digest",  # type: ignore[arg-type]
        call_from_thread=reactor.call_from_thread,
    )
    pipe.makeConnection(upstream)  # type: ignore[arg-type]
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        feed(pipe)  # the writing thread waits in its first write
        results: list[bool] = []
        pipe.done.addCallback(results.append)
        pipe.connectionLost(Failure(ResponseDone()))
        reactor.run_until(lambda: client.finished)
        assert bytes(client.body) == BODY
        writer.gate.set()  # the disk refuses the rest
        reactor.run_until(lambda: bool(results))
    finally:
        globalLogPublisher.removeObserver(observe)
    assert results == [True] and not upstream.stopped
    assert not [line for line in logged if "no client left" in line or "nothing cached" in line], logged
    assert fetch.state == "failed" and fetch.file_given_up  # (its followers are rescued)


class CountedWriter(HeldBackWriter):
    """Takes as many writes as the test lets through, one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = threading.Semaphore(0)

    def write_raw(self, data: bytes) -> int:
        assert self.allowed.acquire(timeout=30), "the test let no more writes through"
        self.gate.set()
        return super().write_raw(data)


def test_followers_read_what_the_disk_writes_after_the_body_has_all_come():
    # They got nothing more until the whole file was written and verified.
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    pipe._writer = pipe._store.writer = fetch.writer = writer = CountedWriter()  # type: ignore[assignment,union-attr]
    fetch.add_reader(Follower())  # type: ignore[arg-type]
    feed(pipe)
    pipe.connectionLost(Failure(ResponseDone()))
    writer.allowed.release(3)
    reactor.run_until(lambda: fetch.written == 3 * MiB)
    assert fetch.verified_size is None
    for _ in range(len(BODY) // MiB):
        writer.allowed.release()
    reactor.run_until(lambda: fetch.verified_size == len(BODY))


def test_a_wrong_body_hashed_before_the_disk_is_done_is_not_released():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False)
    wrong = bytes([BODY[0] ^ 1]) + BODY[1:]
    for start in range(0, len(wrong), MiB):
        pipe.dataReceived(wrong[start:start + MiB])
    store = pipe._store
    assert isinstance(store, ThreadedHashAndStore)
    hashed: list[object] = []
    store.hashed().addCallback(hashed.append)
    pipe.connectionLost(Failure(ResponseDone()))
    reactor.run_until(lambda: bool(hashed))
    assert not client.finished and len(client.body) < len(BODY)
    results: list[bool] = []
    pipe.done.addCallback(results.append)
    writer.gate.set()
    reactor.run_until(lambda: bool(results))
    assert results == [False]
    assert not client.finished and not writer.committed and writer.aborted


def test_a_wrong_body_left_behind_is_still_refused():
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=True)
    for start in range(0, len(BODY), MiB):
        chunk = BODY[start:start + MiB]
        pipe.dataReceived(chunk if start else bytes([chunk[0] ^ 1]) + chunk[1:])
    assert events == ["left behind"]
    writer.gate.set()
    # Refused: the service is told so, and throws the file away.
    assert finish(pipe, reactor) is False
    assert not client.finished and not writer.committed


def test_the_small_pieces_of_a_body_go_on_gathered():
    """
    A chunked body (or TLS records, one at a time) comes in many small
    pieces per read of the socket: they reach the disk (and the hash, and
    the client) a read's worth or L{GATHER} bytes at a time, and the last
    ones when the body ends.
    """
    clock = Clock()
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False, clock=clock)
    writer.gate.set()
    sizes: list[int] = []
    write_raw = writer.write_raw
    writer.write_raw = lambda data: (sizes.append(len(data)), write_raw(data))[1]  # type: ignore[method-assign]
    piece = 16 * 1024
    # One read of the socket: half of GATHER, then the reactor turn ends.
    for start in range(0, GATHER // 2, piece):
        pipe.dataReceived(BODY[start:start + piece])
    assert pipe._store.pending_bytes == 0 and not client.body
    clock.advance(0)
    # The rest in one long read: GATHER at a time, and what is left at the end.
    for start in range(GATHER // 2, len(BODY) - 100, piece):
        pipe.dataReceived(BODY[start:min(start + piece, len(BODY) - 100)])
    pipe.dataReceived(BODY[-100:])
    assert finish(pipe, reactor) is True
    assert client.finished and bytes(client.body) == BODY
    assert writer.committed and bytes(writer.written) == BODY
    middle = (len(BODY) - GATHER // 2) // GATHER
    assert sizes == [GATHER // 2] + [GATHER] * middle + [len(BODY) - GATHER // 2 - middle * GATHER]


def test_a_trickle_of_small_pieces_is_not_idle_but_a_stall_is():
    """The idle timeout counts from the last pieces passed on, gathered or not."""
    clock = Clock()
    pipe, writer, fetch, reactor, client, upstream, events = make_pipe(may_leave=False, clock=clock)
    writer.gate.set()
    piece = 16 * 1024
    for start in range(0, 2 * MiB, piece):  # one piece a second, for twice the 60 s timeout
        pipe.dataReceived(BODY[start:start + piece])
        clock.advance(1)
    assert not upstream.stopped
    clock.advance(60)
    assert upstream.stopped
    assert finish(pipe, reactor) is False


def test_a_tls_connection_reads_as_much_at_once_as_a_plain_one():
    connection = tcp.Connection.__new__(tcp.Connection)
    tls_layer = SimpleNamespace(transport=connection)
    _widen_buffer(SimpleNamespace(transport=tls_layer))
    assert connection.bufferSize == TRANSPORT_BUFFER


def test_nothing_in_an_empty_blob_can_be_asked_for():
    assert parse_range("bytes=-5", 0) == "unsatisfiable"
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=0-0", 1) == (0, 1)


def test_a_primary_client_that_takes_nothing_is_cut_after_the_send_timeout():
    # (server.send_timeout_seconds: it holds the upstream connection, the
    # download and its file while it takes nothing.)
    clock = Clock()
    writer = HeldBackWriter()
    writer.gate.set()
    fetch = Fetch(BlobKey("up", DIGEST))
    fetch.started(writer, len(BODY))  # type: ignore[arg-type]
    reactor, client, upstream = Reactor(), Client(), UpstreamConnection()
    pipe = BlobPipe(
        DIGEST, len(BODY), writer, client, fetch, clock, 60.0, "up test@digest",  # type: ignore[arg-type]
        call_from_thread=reactor.call_from_thread, send_timeout=7.0,
    )
    pipe.makeConnection(upstream)  # type: ignore[arg-type]
    cut: list[float] = []
    client.channel = SimpleNamespace(transport=SimpleNamespace(abortConnection=lambda: cut.append(clock.seconds())))
    pipe.dataReceived(BODY[:MiB])
    pipe.pauseProducing()  # its transport is full
    assert upstream.paused
    clock.advance(6.9)
    assert cut == []
    clock.advance(0.2)
    assert cut == [clock.seconds()]
