"""
The sending threads' batch (blobs._send_batch) on real sockets and files:
where a batch stops, and that it never keeps the socket it was lent.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from cargobay import blobs
from cargobay.blobs import Fetch, FileSender, _send_batch
from cargobay.cache import BlobKey
from cargobay.reference import Digest

MiB = 1024 * 1024


@pytest.fixture(autouse=True, params=["copy", "sendfile"])
def send_mode(request: Any, monkeypatch: Any) -> str:
    """Every test twice: files copied to sockets, and sent by sendfile(2)."""
    monkeypatch.setattr(blobs, "SEND_COPY", request.param == "copy")
    return str(request.param)


def set_chunk(monkeypatch: Any, size: int) -> None:
    """Bytes per sendfile(2) or per pread(2), whichever is in use."""
    monkeypatch.setattr(blobs, "SENDFILE_CHUNK", size)
    monkeypatch.setattr(blobs, "COPY_CHUNK", size)


def chunk() -> int:
    return blobs.COPY_CHUNK if blobs.SEND_COPY else blobs.SENDFILE_CHUNK


@pytest.fixture
def blob_file() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(MiB) * 20)
        f.flush()
        yield f.fileno()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender, receiver = socket.socketpair()
    sender.setblocking(False)
    yield sender, receiver
    sender.close()
    receiver.close()


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def drain(receiver: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = receiver.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_a_batch_sends_up_to_its_limit_and_gives_back_the_socket(blob_file, pair, monkeypatch):
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    lent = os.dup(sender.fileno())
    sent, how = _send_batch(lent, blob_file, 1000, 1000 + 300_000)
    assert (sent, how) == (300_000, "more")
    assert drain(receiver, sent) == os.pread(blob_file, sent, 1000)
    assert closed(lent)
    assert not closed(sender.fileno())


def test_a_batch_stops_at_its_size_however_much_is_left(blob_file, pair, monkeypatch):
    monkeypatch.setattr(blobs, "SEND_BATCH", 256 * 1024)
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    sent, how = _send_batch(os.dup(sender.fileno()), blob_file, 0, 20 * MiB)
    assert how == "more"
    assert 0 < sent <= 256 * 1024 + chunk()
    assert sent < 20 * MiB


def test_a_client_that_reads_nothing_hands_the_wait_back(blob_file, pair):
    sender, receiver = pair
    lent = os.dup(sender.fileno())
    sent, how = _send_batch(lent, blob_file, 0, 20 * MiB)
    assert how == "blocked"
    assert 0 < sent < 20 * MiB
    assert closed(lent)
    # What it did send is the file's bytes, in order.
    assert drain(receiver, sent) == os.pread(blob_file, sent, 0)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection over loopback with small buffers: writes are cut short."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    receiver = socket.socket()
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    receiver.connect(listener.getsockname())
    sender, _ = listener.accept()
    listener.close()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sender.setblocking(False)
    receiver.settimeout(10)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_a_socket_that_takes_part_of_a_chunk_still_gets_every_byte_in_order(blob_file, tcp_pair, monkeypatch):
    # Copied, a chunk read but only partly taken by the socket is read again
    # from where the socket stopped.
    set_chunk(monkeypatch, 96 * 1024)
    monkeypatch.setattr(blobs, "SEND_WAIT_MS", 1)
    sender, receiver = tcp_pair
    position, received, blocked = 5, bytearray(), 0
    while position < 3 * MiB:
        sent, how = _send_batch(os.dup(sender.fileno()), blob_file, position, 3 * MiB)
        assert how in ("more", "blocked")
        blocked += how == "blocked"
        position += sent
        received += drain(receiver, sent)
    assert blocked > 0
    assert bytes(received) == os.pread(blob_file, 3 * MiB - 5, 5)


def test_a_client_gone_ends_the_batch_as_failed(blob_file, pair):
    sender, receiver = pair
    receiver.close()
    lent = os.dup(sender.fileno())
    sent, how = _send_batch(lent, blob_file, 0, MiB)
    assert (sent, how) == (0, "failed")
    assert closed(lent)


def test_a_file_shorter_than_the_limit_fails_rather_than_spins(blob_file, pair):
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    sent, how = _send_batch(os.dup(sender.fileno()), blob_file, 20 * MiB - 100, 20 * MiB + 100)
    assert (sent, how) == (100, "failed")


class Transport:
    dataBuffer = b""
    _tempDataBuffer: list[bytes] = []


class Request:
    """Just what FileSender touches of a request whose body goes raw."""

    method = b"GET"
    startedWriting = True

    def __init__(self) -> None:
        self.channel = type("Channel", (), {"transport": Transport()})()
        self.sentLength = 0
        self.producer: object = None
        self.finished = False
        self.aborted = False
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data
        self.sentLength += len(data)  # as twisted.web's Request counts

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True


class HeldBatches:
    """send_in_thread that holds each batch until the test lets it run."""

    def __init__(self) -> None:
        self.batches: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        self.limits: list[int] = []

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.batches.append((d, function, args))
        return d

    def run_next(self) -> None:
        d, function, args = self.batches.pop(0)
        self.limits.append(args[3])
        d.callback(function(*args))


def sender_on(
    pair: tuple[socket.socket, socket.socket], monkeypatch: Any, size: int, inline: int = 0, small: int = 0
) -> tuple[FileSender, Request, HeldBatches, Any]:
    """
    A FileSender of a C{size}-byte file that sends at most C{inline} bytes
    by sendfile(2) from the reactor, and a file of at most C{small} bytes
    through the transport.
    """
    monkeypatch.setattr(blobs, "INLINE_SEND", inline)
    monkeypatch.setattr(blobs, "SMALL_BODY", small)
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    monkeypatch.setattr(blobs, "_raw_socket", lambda request: sender.fileno())
    fileobj = tempfile.TemporaryFile()
    fileobj.data = os.urandom(size)  # type: ignore[attr-defined]
    fileobj.write(fileobj.data)  # type: ignore[attr-defined]
    fileobj.flush()
    request, held = Request(), HeldBatches()
    return FileSender(request, fileobj, 0, size, send_in_thread=held), request, held, fileobj  # type: ignore[arg-type]


@pytest.mark.parametrize("recent_from", [0, 100_000])
def test_a_follower_is_sent_the_download_s_recent_bytes_from_memory(pair, monkeypatch, recent_from):
    # What the download still holds in memory goes from there: the file is
    # not read, and needs no page cache.  What it no longer holds is read
    # from the file, which from then on goes through the page cache.
    monkeypatch.setattr(blobs, "SEND_BATCH", 64 * 1024)
    sender, request, held, fileobj = sender_on(pair, monkeypatch, 300_000)
    data = fileobj.data
    fetch = Fetch(BlobKey("up", Digest.parse("sha256:" + "0" * 64)))
    writer = object()
    fetch.started(writer, len(data))  # type: ignore[arg-type]
    if not recent_from:
        # Only memory has it right: the file's copy is zeros.
        fileobj.seek(0)
        fileobj.write(b"\0" * len(data))
        fileobj.flush()
    for start in range(recent_from, len(data), 64 * 1024):
        fetch.remember(start, data[start:start + 64 * 1024])
    fetch.progressed(len(data))
    fetch.verified(len(data))
    follower = FileSender(request, fileobj, 0, len(data), fetch, send_in_thread=held)  # type: ignore[arg-type]
    follower.start()
    while held.batches:
        held.run_next()
    assert request.finished and request.sentLength == len(data)
    assert drain(pair[1], len(data)) == data


def test_a_follower_that_falls_behind_the_recent_bytes_reads_the_file(pair, monkeypatch):
    monkeypatch.setattr(blobs, "SEND_BATCH", 64 * 1024)
    set_chunk(monkeypatch, 16 * 1024)
    sender, request, held, fileobj = sender_on(pair, monkeypatch, 300_000)
    data = fileobj.data
    fetch = Fetch(BlobKey("up", Digest.parse("sha256:" + "0" * 64)))
    fetch.started(object(), len(data))  # type: ignore[arg-type]
    fetch.remember(0, data[:100_000])
    fetch.progressed(100_000)
    follower = FileSender(request, fileobj, 0, len(data), fetch, send_in_thread=held)  # type: ignore[arg-type]
    follower.start()
    while held.batches:
        held.run_next()
    assert follower.position == 100_000
    # The download moved on while the follower was away: what it needs now
    # is no longer in memory, but in the file.
    fetch.forget_recent()
    fetch.remember(250_000, data[250_000:])
    fetch.progressed(len(data))
    fetch.verified(len(data))
    sources = []
    while held.batches:
        sources.append(held.batches[0][2][4] is not None)
        held.run_next()
    assert sources[0] is False and sources[-1] is True
    assert request.finished and drain(pair[1], len(data)) == data

def test_a_body_goes_out_in_batches_on_the_sending_threads(pair, monkeypatch):
    monkeypatch.setattr(blobs, "SEND_BATCH", 64 * 1024)
    set_chunk(monkeypatch, 16 * 1024)
    sender, request, held, fileobj = sender_on(pair, monkeypatch, 200_000)
    sender.start()
    batches = 0
    while held.batches:
        held.run_next()
        batches += 1
    assert batches == 4  # 64 KiB at a time, one at a time
    # The last byte is the reactor's, sent just before the response ends.
    assert max(held.limits) == 200_000 - 1
    assert request.finished and request.sentLength == 200_000
    assert fileobj.closed
    assert drain(pair[1], 200_000) == fileobj.data


def test_a_client_gone_mid_batch_leaves_the_file_open_until_the_batch_ends(pair, monkeypatch):
    sender, request, held, fileobj = sender_on(pair, monkeypatch, 100_000)
    sender.start()
    assert len(held.batches) == 1
    sender.stopProducing()  # the connection is gone, the batch still runs
    assert not fileobj.closed
    held.run_next()
    assert fileobj.closed
    assert not held.batches and not request.finished


def test_a_runner_that_finishes_at_once_still_sends_the_whole_body(pair, monkeypatch):
    # blobs.run_here, the stand-in for threads, calls back before the hand-off returns.
    monkeypatch.setattr(blobs, "SEND_BATCH", 64 * 1024)
    set_chunk(monkeypatch, 16 * 1024)
    sender, request, _, fileobj = sender_on(pair, monkeypatch, 200_000)
    sender._send_in_thread = blobs.run_here
    sender.start()
    assert request.finished and request.sentLength == 200_000
    assert drain(pair[1], 200_000) == fileobj.data


def test_bytes_sent_by_a_batch_the_client_left_during_are_counted_when_it_ends(pair, monkeypatch):
    sender, request, held, _ = sender_on(pair, monkeypatch, 100_000)
    sender.start()
    sender.stopProducing()
    counted: list[int] = []
    blobs.when_counted(request, lambda: counted.append(request.sentLength))
    assert counted == []  # the batch still runs: the count would be short
    held.run_next()
    assert counted == [100_000 - 1]  # all the thread sent (the last byte was the reactor's)
    # Later readers need not wait.
    blobs.when_counted(request, lambda: counted.append(-1))
    assert counted[-1] == -1


def test_a_batch_ends_on_its_deadline_even_while_the_socket_takes_everything(blob_file, pair, monkeypatch):
    # A slow disk (or a fast client) must not keep a thread for a whole batch.
    monkeypatch.setattr(blobs, "SEND_WAIT_MS", 0)
    set_chunk(monkeypatch, 64 * 1024)
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    sent, how = _send_batch(os.dup(sender.fileno()), blob_file, 0, 20 * MiB)
    assert (sent, how) == (64 * 1024, "more")


class RecordingPoll:
    """select.poll that records how long it was asked to wait, and times out."""

    waits: list[int] = []

    def register(self, fd: int, events: int) -> None:
        pass

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        RecordingPoll.waits.append(timeout)
        return []


@pytest.mark.parametrize("others_waiting, patience", [(0, "the batch's"), (3, "brief")])
def test_a_full_socket_is_waited_for_only_briefly_when_others_wait_for_a_thread(
    blob_file, pair, monkeypatch, others_waiting, patience
):
    monkeypatch.setattr(blobs.select, "poll", RecordingPoll)
    monkeypatch.setattr(blobs._batches, "waiting", others_waiting)
    RecordingPoll.waits = []
    sender, receiver = pair  # nobody reads: the socket fills up
    sent, how = _send_batch(os.dup(sender.fileno()), blob_file, 0, 20 * MiB)
    assert how == "blocked" and sent > 0
    [wait] = RecordingPoll.waits
    if patience == "brief":
        assert wait == blobs.SOCKET_WAIT_MS
    else:
        assert blobs.SOCKET_WAIT_MS < wait <= blobs.SEND_WAIT_MS


def test_a_body_no_bigger_than_the_inline_size_goes_from_the_reactor(pair, monkeypatch):
    # Handing a small body to a thread and back costs more than sending it.
    sender, request, held, fileobj = sender_on(pair, monkeypatch, 200_000, inline=200_000)
    sender.start()
    assert held.batches == []
    assert request.finished and request.sentLength == 200_000
    assert drain(pair[1], 200_000) == fileobj.data


def test_the_end_of_a_bigger_body_goes_from_the_reactor(pair, monkeypatch):
    monkeypatch.setattr(blobs, "SEND_BATCH", 64 * 1024)
    set_chunk(monkeypatch, 16 * 1024)
    sender, request, held, fileobj = sender_on(pair, monkeypatch, 300_000, inline=100_000)
    sender.start()
    starts = []
    while held.batches:
        starts.append(held.batches[0][2][2])
        held.run_next()
    # Batches while more than 100,000 bytes were left; the rest was the reactor's.
    assert starts == [0, 65536, 131072, 196608]
    assert request.finished and request.sentLength == 300_000
    assert drain(pair[1], 300_000) == fileobj.data


@pytest.mark.parametrize("size", [1, blobs.SMALL_BODY])
def test_a_small_cached_blob_goes_through_the_transport_with_its_headers(pair, monkeypatch, size):
    sender, request, held, fileobj = sender_on(pair, monkeypatch, size, small=size)
    sender.start()
    assert request.written == fileobj.data
    assert request.finished and held.batches == []
    assert request.sentLength == size
    pair[1].setblocking(False)
    with pytest.raises(BlockingIOError):
        pair[1].recv(1)  # nothing went to the socket directly


def test_a_client_that_takes_nothing_is_cut_after_the_send_timeout(pair, monkeypatch):
    # (server.send_timeout_seconds: it holds a descriptor, and its cache
    # entry from eviction, while it takes nothing.)
    from twisted.internet.task import Clock

    clock = Clock()
    monkeypatch.setattr(blobs, "_raw_socket", lambda request: pair[0].fileno())
    with tempfile.TemporaryFile() as fileobj:
        fileobj.write(os.urandom(MiB))
        fileobj.flush()
        request = Request()
        cut: list[float] = []
        request.channel.transport.abortConnection = lambda: cut.append(clock.seconds())  # type: ignore[attr-defined]
        done: list[bool] = []
        sender = FileSender(request, fileobj, 0, MiB, clock=clock, on_done=done.append, paused=True,  # type: ignore[arg-type]
                            send_timeout=7.0)
        sender.start()
        clock.advance(6.9)
        assert cut == [] and done == []
        clock.advance(0.2)
        assert cut == [clock.seconds()] and done == [False]
