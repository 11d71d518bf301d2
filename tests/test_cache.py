"""
The blob cache's file handling, eviction and scrubbing, with a Clock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import time

import pytest
from twisted.internet.task import Clock

from cargobay.cache import DIRECT_BLOCK, DIRECT_BUFFER, BlobCache, BlobKey
from cargobay.reference import Digest
from fakes import cache_by_hand


def key_for(data: bytes, registry: str = "up") -> BlobKey:
    return BlobKey(registry, Digest("sha256", hashlib.sha256(data).hexdigest()))


def store(cache: BlobCache, data: bytes) -> BlobKey:
    return cache_by_hand(cache, data)


def run(clock: Clock, seconds: float = 1.0, steps: int = 100) -> None:
    for _ in range(steps):
        clock.advance(seconds / steps)


def make(tmp_path, max_size=10**9, max_age=3600, clock=None):
    clock = clock or Clock()
    cache = BlobCache(str(tmp_path / "cache"), max_size, max_age, clock)
    cache.open()
    return cache, clock


def test_entries_survive_a_restart_with_right_accounting(tmp_path):
    cache, clock = make(tmp_path)
    keys = [store(cache, os.urandom(1000 + i)) for i in range(3)]
    # A leftover of an interrupted download.
    (tmp_path / "cache" / "tmp" / "partial").write_bytes(b"half")
    again, _ = make(tmp_path)
    assert len(again) == 3 and again.total_size == 3000 + 0 + 1 + 2
    assert os.listdir(tmp_path / "cache" / "tmp") == []
    for key in keys:
        assert again.lookup(key) is not None


def test_a_damaged_file_is_not_indexed_after_restart(tmp_path):
    cache, _ = make(tmp_path)
    key = store(cache, os.urandom(5000))
    path = cache.lookup(key).path
    with open(path, "r+b") as f:
        f.truncate(10)
    again, _ = make(tmp_path)
    assert again.lookup(key) is None
    assert not os.path.exists(path)


def test_a_stray_file_where_a_directory_belongs_does_not_stop_the_start(tmp_path):
    cache, _ = make(tmp_path)
    key = store(cache, os.urandom(3000))
    (tmp_path / "cache" / "blobs" / "up" / "sha256" / ".DS_Store").write_bytes(b"x")
    again, _ = make(tmp_path)
    assert again.lookup(key) is not None and again.total_size == 3000


def test_a_hit_that_cannot_be_opened_for_want_of_descriptors_keeps_its_entry(tmp_path, monkeypatch):
    import cargobay.cache

    cache, _ = make(tmp_path)
    key = store(cache, os.urandom(3000))

    def emfile(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(cargobay.cache, "open", emfile, raising=False)
    assert cache.open_entry(key) is None
    monkeypatch.undo()
    # Still indexed and counted (forgotten, its file stayed on disk unevictable).
    assert cache.total_size == 3000
    entry, fileobj = cache.open_entry(key)
    fileobj.close()
    cache.release(entry)


def test_size_limit_evicts_least_recently_used_first(tmp_path):
    cache, clock = make(tmp_path, max_size=3500)
    first = store(cache, b"a" * 1000)
    clock.advance(1)
    second = store(cache, b"b" * 1000)
    clock.advance(1)
    third = store(cache, b"c" * 1000)
    clock.advance(1)
    # Using the oldest makes it the most recent.
    entry, f = cache.open_entry(first)
    f.close()
    cache.release(entry)
    clock.advance(1)
    store(cache, b"d" * 1000)  # over the limit: evicts at once
    run(clock)
    assert cache.total_size <= 3500
    assert cache.lookup(second) is None
    assert cache.lookup(first) is not None and cache.lookup(third) is not None


def test_entries_added_while_an_eviction_runs_are_evicted_too(tmp_path):
    # Several downloads that end in one reactor turn: the eviction the first
    # one started chose before the others were in.
    cache, clock = make(tmp_path, max_size=100)
    for letter in b"abc":
        store(cache, bytes([letter]) * 80)
    run(clock)
    assert cache.total_size <= 100


def test_age_limit_expires_unused_entries_on_the_timer(tmp_path):
    cache, clock = make(tmp_path, max_age=100)
    old = store(cache, b"old" * 100)
    clock.advance(80)
    recent = store(cache, b"new" * 100)
    clock.advance(30)
    cache.evict()
    run(clock)
    assert cache.lookup(old) is None and cache.lookup(recent) is not None
    assert cache.stats.evictions == 1


def test_an_entry_being_read_is_never_removed(tmp_path):
    cache, clock = make(tmp_path, max_size=0)
    data = b"x" * 5000
    key = key_for(data)
    writer = cache.begin(key)
    writer.write_raw(data)
    writer.wrote(len(data))
    assert writer.commit() is None
    run(clock)
    assert cache.lookup(key) is None  # limit 0: nothing stays...
    cache.max_size_bytes = 10**9
    key = store(cache, data)
    # ...unless someone reads it while eviction runs.
    entry, f = cache.open_entry(key)
    cache.max_size_bytes = 0
    cache.evict()
    run(clock)
    assert cache.lookup(key) is entry
    assert f.read() == data
    f.close()
    cache.release(entry)
    cache.evict()
    run(clock)
    assert cache.lookup(key) is None


def test_eviction_of_many_entries_yields_to_the_reactor(tmp_path):
    from twisted.internet import task

    cache, clock = make(tmp_path)
    for i in range(1000):
        store(cache, str(i).encode())
    # Run the cache's background work by hand, one scheduled turn at a time.
    turns = []
    cache._cooperator = task.Cooperator(
        terminationPredicateFactory=lambda: lambda: True, scheduler=turns.append
    )
    cache.max_size_bytes = 0
    d = cache.evict()
    assert cache.evict() is d  # one eviction at a time
    sizes = []
    while turns:
        turns.pop(0)()
        sizes.append(len(cache))
    # Several turns, each removing a bounded batch, until none is left.
    assert len(sizes) >= 4
    assert max(a - b for a, b in zip([1000] + sizes, sizes, strict=False)) <= 256
    assert sizes[-1] == 0 and d.called


def test_scrub_finds_and_removes_bit_rot(tmp_path):
    cache, clock = make(tmp_path)
    good = store(cache, os.urandom(300_000))
    bad = store(cache, os.urandom(300_000))
    path = cache.lookup(bad).path
    with open(path, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0xFF]))
    again, clock = make(tmp_path)
    found = []
    again.scrub(10**9).addCallback(found.append)
    run(clock, steps=200)
    assert found == [1]
    assert again.lookup(bad) is None and again.lookup(good) is not None
    assert not os.path.exists(path)


def test_a_blob_bigger_than_a_limit_lowered_while_it_downloaded_is_not_cached_and_evicts_nothing(tmp_path):
    # A reload lowered max_size_bytes: the blob became an entry over the
    # limit, and the eviction that followed emptied the cache, itself last.
    cache, clock = make(tmp_path, max_size=10**6)
    kept = [store(cache, os.urandom(100_000)) for _ in range(3)]
    data = os.urandom(800_000)
    key = BlobKey("up", Digest("sha256", hashlib.sha256(data).hexdigest()))
    writer = cache.begin(key, len(data))
    writer.write_raw(data)
    writer.wrote(len(data))
    cache.max_size_bytes = 700_000
    assert writer.commit() is None
    run(clock)
    assert cache.lookup(key) is None and all(cache.lookup(k) is not None for k in kept)
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def _damage(path):
    with open(path, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0xFF]))


def _served_first_world(tmp_path, served_at, recheck=True):
    """
    A cache of four files, all due a scrub, of which one, damaged in place,
    is served at C{served_at} seconds and is the one the scrub would read
    last: the scrub's next run, reading one file, reads which?
    """
    cache, clock = make(tmp_path)
    cache.recheck_served = recheck
    clock.advance(10_000)
    others = [store(cache, os.urandom(300_000)) for _ in range(3)]
    served = store(cache, os.urandom(300_000))
    _damage(cache.lookup(served).path)
    for age, key in enumerate(others):
        cache.lookup(key).verified_at = 100.0 + age
    cache.lookup(served).verified_at = clock.seconds() - served_at
    entry, fileobj = cache.open_entry(served)
    fileobj.close()
    cache.release(entry)
    found = []
    cache.scrub(1).addCallback(found.append)  # (one file: a file is read to its end)
    run(clock, steps=100)
    return cache, served, others, found


def test_a_served_file_not_checked_for_an_hour_is_first_in_the_scrub_s_next_run(tmp_path):
    # A file damaged in place was served (200, whole, wrong) until the scrub
    # came round to it: in a 10 GiB cache at 64 MiB a minute, hours.
    cache, served, others, found = _served_first_world(tmp_path, served_at=3601)
    assert found == [1] and cache.lookup(served) is None
    assert all(cache.lookup(key).verified_at < 1000 for key in others)


@pytest.mark.parametrize("served_at, recheck", [
    (60, True),  # checked within the hour: its turn, as before
    (3601, False),  # the scrub is off (scrub_bytes_per_interval = 0)
])
def test_a_served_file_is_not_put_first_when_checked_lately_or_with_the_scrub_off(tmp_path, served_at, recheck):
    cache, served, others, found = _served_first_world(tmp_path, served_at, recheck)
    assert found == [0] and cache.lookup(served) is not None
    assert cache.lookup(others[0]).verified_at > 1000  # the least recently checked went first


def test_a_served_file_checked_while_the_clock_ran_ahead_is_first_too(tmp_path):
    cache, served, others, found = _served_first_world(tmp_path, served_at=-7200)
    assert found == [1] and cache.lookup(served) is None


def test_a_file_the_scrub_cannot_open_is_not_damage(tmp_path, monkeypatch):
    # Out of descriptors, every file "failed" its check: the whole cache was
    # removed in one run.
    import builtins

    cache, clock = make(tmp_path)
    keys = [store(cache, os.urandom(100_000)) for _ in range(4)]
    real_open = builtins.open

    def no_descriptors(path, *args, **kwargs):
        if str(path).startswith(cache.directory):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_descriptors)
    found = []
    cache.scrub(10**9).addCallback(found.append)
    run(clock, steps=50)
    assert found == [0]
    assert all(cache.lookup(key) is not None and os.path.exists(cache.lookup(key).path) for key in keys)
    monkeypatch.setattr(builtins, "open", real_open)
    # A file gone from under the cache is forgotten, and the rest checked.
    os.unlink(cache.lookup(keys[0]).path)
    found.clear()
    cache.scrub(10**9).addCallback(found.append)
    run(clock, steps=200)
    assert found == [0] and cache.lookup(keys[0]) is None
    assert all(cache.lookup(key).verified_at > 0 for key in keys[1:])


def test_a_scrub_asked_for_while_one_runs_is_not_started(tmp_path, monkeypatch):
    # On a disk slower than the budget, each timer run started another scrub
    # over the same least recently verified files: each file read again.
    import builtins

    cache, clock = make(tmp_path)
    for _ in range(3):
        store(cache, os.urandom(3 * 1024 * 1024))
    opened: list[str] = []
    real_open = builtins.open

    def counting(path, *args, **kwargs):
        if str(path).startswith(cache.directory):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    first, second = [], []
    cache.scrub(10**9).addCallback(first.append)
    cache.scrub(10**9).addCallback(second.append)  # the next timer run, the first still under way
    run(clock, steps=200)
    assert first == [0] and second == [0]
    assert len(opened) == 3 == len(set(opened))
    cache.scrub(10**9)  # once it has ended, the next runs
    run(clock, steps=200)
    assert len(opened) == 6


def test_unwritable_directory_means_no_writer_and_one_log(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    cache = BlobCache(str(blocker / "cache"), 10**9, 3600, Clock())
    cache.open()
    assert cache.begin(key_for(b"x")) is None
    assert cache.begin(key_for(b"y")) is None
    assert cache.stats.write_errors >= 2


# -- direct writes -------------------------------------------------------------


def direct_writer(tmp_path, data: bytes = b""):
    """A writer of a cache with direct writes, on the test's own filesystem."""
    cache = BlobCache(str(tmp_path / "cache"), 10**9, 3600, Clock(), direct_writes=True)
    cache.open()
    writer = cache.begin(key_for(data))
    assert writer is not None
    if writer._direct_fd is None:
        # Some filesystems refuse O_DIRECT (tmpfs before Linux 6.6): the
        # writer then uses the page cache, which the rest of the suite covers.
        assert os.environ.get("CI") != "true", "the CI machine's /tmp is ext4, which has O_DIRECT"
        pytest.skip(f"{tmp_path} is on a filesystem without O_DIRECT")
    assert fcntl.fcntl(writer._direct_fd, fcntl.F_GETFL) & os.O_DIRECT
    return cache, writer


def in_file(writer) -> bytes:
    with open(writer.path, "rb") as f:
        return f.read()


def test_direct_writes_hold_back_a_partial_block_and_count_what_is_in_the_file(tmp_path):
    data = os.urandom(3 * DIRECT_BLOCK * 100 + 1234)
    cache, writer = direct_writer(tmp_path, data)
    counted = 0
    for start, end in [(0, 100), (100, 5000), (5000, 5000 + (1 << 20)), (5000 + (1 << 20), len(data))]:
        counted += writer.write_raw(data[start:end])
        # Whole blocks only, and exactly what was counted.
        assert counted % DIRECT_BLOCK == 0 and end - counted < DIRECT_BLOCK
        assert in_file(writer) == data[:counted]
    counted += writer.flush_raw()
    assert counted == len(data) and in_file(writer) == data
    writer.wrote(counted)
    writer.sync_raw()  # and reads the file back into the page cache
    entry = writer.commit(synced=True)
    assert entry is not None and entry.size == len(data)
    with open(entry.path, "rb") as f:
        assert f.read() == data


def test_what_a_stopped_direct_writer_held_is_dropped_and_the_file_ends_on_a_block(tmp_path):
    data = os.urandom(4 * DIRECT_BLOCK + 500)
    cache, writer = direct_writer(tmp_path, data)
    assert writer.write_raw(data) == 4 * DIRECT_BLOCK
    assert writer.drop_held() == 500
    # A refill goes on from the file's length, which is what it holds.
    assert writer.length() == 4 * DIRECT_BLOCK and in_file(writer) == data[:4 * DIRECT_BLOCK]
    writer.resume_at(4 * DIRECT_BLOCK)
    assert writer._direct_fd is not None  # a block boundary: still direct
    assert writer.write_raw(data[4 * DIRECT_BLOCK:]) == 0
    assert writer.flush_raw() == 500 and in_file(writer) == data
    writer.abort()
    assert not os.path.exists(writer.path)


def test_a_write_bigger_than_the_direct_buffer_goes_out_in_turns(tmp_path):
    data = os.urandom(2 * DIRECT_BUFFER + 3 * DIRECT_BLOCK + 77)
    cache, writer = direct_writer(tmp_path, data)
    counted = writer.write_raw(data[:10])
    counted += writer.write_raw(data[10:])
    assert counted == len(data) - 77 and in_file(writer) == data[:counted]
    assert writer.flush_raw() == 77 and in_file(writer) == data
    writer.abort()


def test_a_reused_direct_buffer_carries_nothing_of_the_last_download(tmp_path):
    first = os.urandom(DIRECT_BUFFER)
    cache, writer = direct_writer(tmp_path, first)
    writer.write_raw(first)
    buffer = writer._buffer
    writer.abort()
    # The next writer goes out from the same buffer, which still holds the
    # first one's bytes: its file holds its own and nothing more.
    second = os.urandom(DIRECT_BLOCK + 5)
    other = cache.begin(key_for(second))
    assert other is not None
    assert other.write_raw(second) == DIRECT_BLOCK and other._buffer is buffer
    assert other.flush_raw() == 5 and in_file(other) == second
    other.abort()


def _mapping_flags(buffer) -> str:
    """The permissions /proc/self/maps shows for the mapping holding C{buffer}."""
    import ctypes

    pointer = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(pointer)
    del pointer
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, flags = line.split()[:2]
            start, end = (int(a, 16) for a in span.split("-"))
            if start <= address < end:
                return flags
    raise AssertionError("no mapping holds the buffer")


def test_direct_buffers_are_private_memory_kept_a_few_at_a_time():
    from cargobay.cache import DIRECT_BUFFERS_KEPT, _DirectBuffers

    buffers = _DirectBuffers()
    taken = [buffers.take() for _ in range(DIRECT_BUFFERS_KEPT + 2)]
    assert all(len(b) == DIRECT_BUFFER for b in taken)
    # Private: shared anonymous memory (Python's default) gets no huge pages.
    assert _mapping_flags(taken[0]) == "rw-p"
    for b in taken:
        buffers.give_back(b)
    assert sum(not b.closed for b in taken) == DIRECT_BUFFERS_KEPT
    assert buffers.take() is taken[DIRECT_BUFFERS_KEPT - 1]


def test_a_direct_write_refused_after_a_first_buffer_went_out_ends_through_the_page_cache(tmp_path, monkeypatch):
    data = os.urandom(DIRECT_BUFFER + 3 * DIRECT_BLOCK + 9)
    cache, writer = direct_writer(tmp_path, data)
    direct_fd, pwrite = writer._direct_fd, os.pwrite
    calls = [0]

    def refusing_after_one(fd, buffer, offset):
        if fd == direct_fd:
            calls[0] += 1
            if calls[0] > 1:
                raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", refusing_after_one)
    assert writer.write_raw(data) == len(data)
    assert writer._direct_fd is None and in_file(writer) == data
    writer.abort()


def test_writes_from_a_received_buffer_go_out_unmoved_and_fall_back_as_copies_do(tmp_path, monkeypatch):
    import mmap

    data = os.urandom(3 * DIRECT_BLOCK + 700)
    cache, writer = direct_writer(tmp_path, data)
    block = memoryview(mmap.mmap(-1, DIRECT_BUFFER))
    # Bytes as a receive places them: where they fall in a disk block.
    block[: len(data)] = data
    assert writer.write_block(block, 0, 100, fresh=True) == 0
    assert writer.write_block(block, 100, 2 * DIRECT_BLOCK + 5, fresh=False) == 2 * DIRECT_BLOCK
    # A new buffer holds only what follows: the held bytes go in front of it.
    other = memoryview(mmap.mmap(-1, DIRECT_BUFFER))
    other[5 : len(data) - 2 * DIRECT_BLOCK] = data[2 * DIRECT_BLOCK + 5 :]
    direct_fd, pwrite = writer._direct_fd, os.pwrite

    def refusing(fd, buffer, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    assert writer.write_block(other, 5, len(data) - 2 * DIRECT_BLOCK, fresh=True) == len(data) - 2 * DIRECT_BLOCK
    assert writer._direct_fd is None and in_file(writer) == data
    writer.abort()


def test_a_resume_mid_block_goes_on_through_the_page_cache(tmp_path):
    data = os.urandom(3 * DIRECT_BLOCK)
    cache, writer = direct_writer(tmp_path, data)
    assert writer.write_raw(data) == len(data)
    writer.resume_at(DIRECT_BLOCK + 10)
    assert writer._direct_fd is None
    assert writer.write_raw(data[DIRECT_BLOCK + 10:]) == len(data) - DIRECT_BLOCK - 10
    assert in_file(writer) == data
    writer.abort()


def test_a_filesystem_that_refuses_a_direct_write_gets_the_bytes_through_the_page_cache(tmp_path, monkeypatch):
    data = os.urandom(2 * DIRECT_BLOCK + 9)
    cache, writer = direct_writer(tmp_path, data)
    direct_fd, pwrite = writer._direct_fd, os.pwrite

    def refusing(fd, buffer, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    assert writer.write_raw(data[:100]) == 0  # held: nothing written yet
    assert writer.write_raw(data[100:]) == len(data)
    assert writer._direct_fd is None and in_file(writer) == data
    writer.abort()


def test_direct_writes_through_the_threaded_store_end_with_the_whole_blob(tmp_path):
    from cargobay.blobs import ThreadedHashAndStore

    data = os.urandom(5 * (1 << 20) + 3)
    cache, writer = direct_writer(tmp_path, data)
    digest = key_for(data).digest
    calls: queue.SimpleQueue = queue.SimpleQueue()
    stored: list[int] = []
    store = ThreadedHashAndStore(
        digest, writer, lambda f, *a: calls.put((f, a)), stored.append, lambda e: stored.append(-1)
    )
    for start in range(0, len(data), 300_001):
        store.feed(data[start:start + 300_001])
    done: list[object] = []
    store.drained().addCallback(done.append)
    while not done:
        f, a = calls.get(timeout=30)
        f(*a)
    assert store.hasher.hexdigest() == digest.encoded
    assert stored[-1] == len(data) == writer.size and in_file(writer) == data
    assert writer.commit(synced=False) is not None


def test_what_the_writing_thread_writes_from_stays_in_use_after_writing_stops(tmp_path):
    # Buffers a body is received into are reused once both threads are
    # past them: a chunk the writing thread is in the middle of writing
    # when writing stops is still read, though what queued behind it is
    # passed over.
    import threading

    from cargobay.blobs import ThreadedHashAndStore

    entered, go_on = threading.Event(), threading.Event()

    class SlowWriter:
        path = str(tmp_path / "slow")

        def write_raw(self, data):
            entered.set()
            assert go_on.wait(30)
            return len(data)

        def flush_raw(self):
            return 0

        def drop_held(self):
            return 0

    data = b"x" * 600
    calls: queue.SimpleQueue = queue.SimpleQueue()
    store = ThreadedHashAndStore(
        key_for(data).digest, SlowWriter(), lambda f, *a: calls.put((f, a)), lambda stored: None, lambda e: None
    )
    for start, end in [(0, 100), (100, 300), (300, 600)]:
        store.feed(data[start:end])
    assert entered.wait(30)
    for _ in range(3000):
        if store._hashed == 600:
            break
        time.sleep(0.01)
    stopped: list[object] = []
    store.stop_writing().addCallback(stopped.append)
    assert store.read_past() == 0  # the first chunk is still being written
    go_on.set()
    while not stopped:
        f, a = calls.get(timeout=30)
        f(*a)
    assert store.read_past() == 600


def test_a_full_disk_under_direct_writes_is_a_write_error_and_the_hash_goes_on(tmp_path, monkeypatch):
    from cargobay.blobs import ThreadedHashAndStore

    data = os.urandom(3 * (1 << 20) + 5)
    cache, writer = direct_writer(tmp_path, data)
    direct_fd, pwrite = writer._direct_fd, os.pwrite
    room = [1 << 20]

    def filling(fd, buffer, offset):
        if fd == direct_fd:
            if room[0] < len(buffer):
                raise OSError(errno.ENOSPC, "No space left on device")
            room[0] -= len(buffer)
        return pwrite(fd, buffer, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    calls: queue.SimpleQueue = queue.SimpleQueue()
    errors: list[OSError] = []
    store = ThreadedHashAndStore(
        key_for(data).digest, writer, lambda f, *a: calls.put((f, a)), lambda stored: None, errors.append
    )
    for start in range(0, len(data), 1 << 20):
        store.feed(data[start:start + (1 << 20)])
    done: list[object] = []
    store.drained().addCallback(done.append)
    while not done:
        f, a = calls.get(timeout=30)
        f(*a)
    # The disk's refusal reaches the download (which then streams uncached,
    # and the writer is aborted), the hash is whole, and nothing is counted
    # as stored past what the disk took.
    assert [e.errno for e in errors] == [errno.ENOSPC]
    assert store.hasher.hexdigest() == key_for(data).digest.encoded
    assert store.stored <= 1 << 20 and store.writer is None



def test_direct_writes_through_the_inline_store_end_with_the_whole_blob(tmp_path):
    from cargobay.blobs import InlineHashAndStore

    data = os.urandom(2 * (1 << 20) + 7)
    cache, writer = direct_writer(tmp_path, data)
    stored: list[int] = []
    store = InlineHashAndStore(key_for(data).digest, writer, stored.append, lambda e: stored.append(-1))
    for start in range(0, len(data), 100_003):
        store.feed(data[start:start + 100_003])
        # Followers may read what is counted: the file holds all of it.
        assert len(in_file(writer)) >= stored[-1] and stored[-1] % DIRECT_BLOCK == 0
    store.drained()
    assert stored[-1] == len(data) == writer.size and in_file(writer) == data
    writer.abort()


def test_a_removed_cache_directory_is_made_again_and_its_entries_forgotten(tmp_path):
    import shutil

    cache, clock = make(tmp_path)
    gone = store(cache, b"gone with the directory")
    shutil.rmtree(tmp_path / "cache")
    assert cache.writable()  # (readiness: caching works again)
    assert cache.lookup(gone) is None and cache.total_size == 0
    shutil.rmtree(tmp_path / "cache")
    kept = store(cache, b"cached after it came back")  # begin() makes it again too
    assert cache.lookup(kept) is not None and cache.total_size == len(b"cached after it came back")


def test_a_filesystem_short_of_room_lowers_the_limit(tmp_path, monkeypatch):
    # A disk smaller than max_size_bytes (or filled by others): nothing was
    # ever over the limit, so nothing made room, and no new blob was cached.
    from types import SimpleNamespace

    cache, clock = make(tmp_path, max_size=10**9)
    old = store(cache, b"o" * 3000)
    clock.advance(1)
    recent = store(cache, b"r" * 3000)
    free = {"bytes": 2000}
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_blocks=10_000, f_frsize=1, f_bavail=free["bytes"]))
    assert cache.size_limit() == 6000 + 2000 - 1000
    free["bytes"] = 0  # full: a tenth of the filesystem is to be kept free
    cache.note_write_error(OSError(errno.ENOSPC, "No space left on device"))
    run(clock)
    assert cache.lookup(old) is None and cache.lookup(recent) is not None


def test_a_download_that_met_a_full_disk_gets_room_for_it(tmp_path, monkeypatch):
    # Its file is gone by the time the cache hears: what is free then is
    # not what that download needed.
    from types import SimpleNamespace

    cache, clock = make(tmp_path, max_size=10**9)
    keys = []
    for letter in b"abc":
        keys.append(store(cache, bytes([letter]) * 3000))
        clock.advance(1)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_blocks=10_000, f_frsize=1, f_bavail=1000))
    assert cache.size_limit() == cache.total_size
    writer = cache.begin(key_for(b"big"))
    writer.expected = 5000
    writer.failed(OSError(errno.ENOSPC, "No space left on device"))
    run(clock)
    assert [cache.lookup(key) is not None for key in keys] == [False, False, True]


def test_a_blob_bigger_than_the_filesystem_can_hold_evicts_nothing(tmp_path, monkeypatch):
    # Its download met the full disk, asked for room that evicting every
    # entry could not make, emptied the cache, and did so at every pull.
    from types import SimpleNamespace

    cache, clock = make(tmp_path, max_size=10**9)
    keys = [store(cache, bytes([letter]) * 3000) for letter in b"abc"]
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_blocks=20_000, f_frsize=1, f_bavail=5000))
    assert cache.size_limit() == 9000 + 5000 - 2000
    assert cache.begin(key_for(b"huge"), 12_001) is None
    assert cache.begin(key_for(b"fits"), 12_000) is not None
    writer = cache.begin(key_for(b"unknown length"))
    writer.expected = 50_000
    writer.failed(OSError(errno.ENOSPC, "No space left on device"))
    run(clock)
    assert all(cache.lookup(key) is not None for key in keys)


def test_a_blob_in_use_has_its_use_marked_on_disk_well_within_a_short_age_limit(tmp_path):
    # Marked at most once a minute whatever the limit: with max_age 30 s, a
    # blob read every 10 s was evicted at once after a restart (its file's
    # time is its last use then).
    import time

    clock = Clock()
    clock.advance(time.time())
    cache, _ = make(tmp_path, max_age=30, clock=clock)
    key = store(cache, b"a layer in steady use")
    began = clock.seconds()
    for _ in range(3):
        clock.advance(10)
        entry, fileobj = cache.open_entry(key)
        fileobj.close()
        cache.release(entry)
    assert os.stat(entry.path).st_mtime >= began + 20


def test_a_cache_whose_blobs_directory_is_a_file_is_not_writable(tmp_path):
    # /readyz said ready while nothing could ever be cached.
    cache, _ = make(tmp_path)
    assert cache.writable()
    blobs = tmp_path / "cache" / "blobs"
    blobs.rename(tmp_path / "cache" / "elsewhere")
    blobs.write_bytes(b"not a directory")
    assert not cache.writable()


def test_the_earlier_implementation_s_cache_in_the_directory_is_named_with_its_size(tmp_path):
    from twisted.logger import globalLogPublisher

    root = tmp_path / "cache"
    (root / "blobs" / "sh").mkdir(parents=True)
    (root / "blobs" / "sh" / ("sha256_" + "a" * 64)).write_bytes(b"x" * 1000)
    (root / "metadata").mkdir()
    (root / "metadata" / "db").write_bytes(b"y" * 24)
    (root / "metadata" / "conf").write_bytes(b"z" * 76)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        cache, _ = make(tmp_path)
        make(tmp_path / "fresh")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    warnings = [e for e in seen if "earlier implementation" in e.get("log_format", "")]
    assert [(e["directory"], e["count"], e["size"]) for e in warnings] == [(str(root), 3, 1100)]
    # Left alone, and not counted as cargobay's.
    assert cache.total_size == 0 and (root / "metadata" / "db").exists()
    assert store(cache, b"new blob") is not None


def test_a_cache_whose_tmp_cannot_be_made_still_serves_and_counts_what_it_holds(tmp_path):
    cache, _ = make(tmp_path)
    key = store(cache, b"kept" * 1000)
    os.rmdir(tmp_path / "cache" / "tmp")
    (tmp_path / "cache" / "tmp").write_bytes(b"a file where tmp/ belongs")
    again, _ = make(tmp_path)
    assert again.lookup(key) is not None and again.total_size == 4000
    assert again.begin(key_for(b"new")) is None


@pytest.mark.parametrize("where", ["odd size text", "another fan-out directory"])
def test_a_second_file_of_one_blob_is_neither_counted_nor_kept(tmp_path, where):
    # int() took "-1_0" as 10, and a blob in a second fan-out directory was
    # read as the same key: counted twice, the other file never evicted.
    cache = BlobCache(str(tmp_path), 10**9, 0, Clock())
    cache.open()
    data = b"x" * 10
    key = BlobKey("up", Digest("sha256", hashlib.sha256(data).hexdigest()))
    writer = cache.begin(key)
    writer.write_raw(data)
    writer.wrote(10)
    entry = writer.commit()
    assert entry is not None
    if where == "odd size text":
        # (The file's name only: the test's directory may hold "-10" too.)
        second = os.path.join(os.path.dirname(entry.path), os.path.basename(entry.path).replace("-10", "-1_0"))
    else:
        other = os.path.join(os.path.dirname(os.path.dirname(entry.path)), "zz")
        os.makedirs(other)
        second = os.path.join(other, os.path.basename(entry.path))
    os.link(entry.path, second)
    reopened = BlobCache(str(tmp_path), 10**9, 0, Clock())
    reopened.open()
    assert reopened.total_size == 10
    assert not os.path.exists(second) and os.path.exists(entry.path)
