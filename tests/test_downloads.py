"""
The blob service in the middle of a download, with upstream bodies delivered
piece by piece (L{handfed}): a disk that fills up, a body of unknown length
that outgrows the cache.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest
from handfed import Body, World
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from fakes import cache_by_hand

MiB = 1024 * 1024


def fill_up(body: Body) -> None:
    """The disk under the download of C{body} fills up: every write fails."""

    def full(chunk: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    body.protocol._writer.write_raw = full


def test_after_a_write_error_the_next_client_starts_a_download_of_its_own(tmp_path):
    data = os.urandom(4 * MiB + 5)
    world = World(tmp_path, data)
    first, _ = world.get()
    body = Body(length=len(data))
    world.requests[0].d.callback(body)
    fill_up(body)
    body.send(data[:MiB])
    world.clock.advance(0)
    # The first client streams on, uncached.  The next one does not join that
    # download (it was told to retry, with a 503, for as long as it lasted).
    second, outcome = world.get()
    assert len(world.requests) == 2 and outcome == []
    body.send(data[MiB:])
    body.end()
    world.clock.advance(0)
    assert first.body == data
    again = Body(length=len(data))
    world.requests[1].d.callback(again)
    again.send(data)
    again.end()
    world.clock.advance(0)
    assert second.body == data


def _followed_download(tmp_path, range_=None, reads_the_file=True):
    """A download with its first MiB in the file, and a follower."""
    data = os.urandom(4 * MiB + 5)
    world = World(tmp_path, data)
    first, _ = world.get()
    body = Body(length=len(data))
    world.requests[0].d.callback(body)
    body.send(data[:MiB])
    world.clock.advance(0)
    follower, _ = world.get(range_)  # joins the download (reads the file, or waits for it)
    world.clock.advance(0)
    assert len(world.requests) == 1 and (len(follower.body) > 0) == reads_the_file
    return world, data, body, first, follower


def _followed_download_whose_disk_fills_up(tmp_path, range_=None, reads_the_file=True):
    world, data, body, first, follower = _followed_download(tmp_path, range_, reads_the_file)
    fill_up(body)
    body.send(data[MiB:2 * MiB])
    world.clock.advance(0)
    return world, data, body, first, follower


def test_a_follower_of_a_download_whose_disk_fills_up_gets_the_rest_from_the_upstream(tmp_path):
    # It was cut, and its retry streamed the whole blob again.
    world, data, body, first, follower = _followed_download_whose_disk_fills_up(tmp_path)
    had = len(follower.body)
    assert len(world.requests) == 2
    rest = world.requests[1]
    assert rest.headers == {"range": [f"bytes={had}-"]}
    answer = Body(code=206, length=len(data) - had)
    answer.headers.setRawHeaders("content-range", [f"bytes {had}-{len(data) - 1}/{len(data)}"])
    rest.d.callback(answer)
    answer.send(data[had:])
    answer.end()
    body.send(data[2 * MiB:])
    body.end()
    world.clock.advance(0)
    assert follower.body == data and follower.finished
    assert first.body == data
    assert world.cache.lookup(world.key) is None


@pytest.mark.parametrize("wrong", [False, True])
def test_a_rescued_follower_of_a_range_gets_its_part_once_the_whole_blob_is_verified(tmp_path, wrong):
    # Its Range ended before the blob's end: it was cut.  The rest comes to
    # the blob's end, for the digest; the client gets its part only.
    world, data, body, first, follower = _followed_download_whose_disk_fills_up(tmp_path, f"bytes=0-{3 * MiB - 1}")
    had = len(follower.body)
    assert follower.code == 206 and had < 3 * MiB
    rest = world.requests[1]
    assert rest.headers == {"range": [f"bytes={had}-"]}
    answer = Body(code=206, length=len(data) - had)
    answer.headers.setRawHeaders("content-range", [f"bytes {had}-{len(data) - 1}/{len(data)}"])
    rest.d.callback(answer)
    answer.send(data[had:4 * MiB])
    assert len(follower.body) < 3 * MiB  # its last piece waits for the digest
    answer.send(data[4 * MiB:] if not wrong else bytes(len(data) - 4 * MiB))
    answer.end()
    world.clock.advance(0)
    if wrong:
        assert len(follower.body) < 3 * MiB and not follower.finished
    else:
        assert follower.body == data[:3 * MiB] and follower.finished


@pytest.mark.parametrize("whole", [False, True])
def test_a_range_follower_waiting_past_what_the_file_holds_is_rescued_too(tmp_path, whole):
    # Joined at 3 MiB while the file held 1 MiB: its rescue hashed 3 MiB of
    # a 1 MiB file, failed, and cut it, with no upstream asked.
    world, data, body, first, follower = _followed_download_whose_disk_fills_up(
        tmp_path, f"bytes={3 * MiB}-", reads_the_file=False
    )
    assert len(world.requests) == 2
    rest = world.requests[1]
    have = int(rest.headers["range"][0].removeprefix("bytes=").rstrip("-"))
    assert have <= 2 * MiB  # what the file held, not the follower's 3 MiB
    if whole:
        answer = Body(code=200, length=len(data))
        world.requests[1].d.callback(answer)
        answer.send(data)
    else:
        answer = Body(code=206, length=len(data) - have)
        answer.headers.setRawHeaders("content-range", [f"bytes {have}-{len(data) - 1}/{len(data)}"])
        rest.d.callback(answer)
        answer.send(data[have:])
    answer.end()
    world.clock.advance(0)
    assert follower.code == 206 and follower.finished
    assert follower.body == data[3 * MiB :]


def test_a_rescued_follower_is_cut_if_the_rest_does_not_match_the_digest(tmp_path):
    world, data, body, first, follower = _followed_download_whose_disk_fills_up(tmp_path)
    had = len(follower.body)
    answer = Body(code=200, length=len(data))  # the whole blob: what was sent is passed over
    world.requests[1].d.callback(answer)
    answer.send(data[:-1] + bytes([data[-1] ^ 1]))
    answer.end()
    world.clock.advance(0)
    assert len(follower.body) < len(data) and not follower.finished
    assert follower.body == data[: len(follower.body)] and len(follower.body) >= had


@pytest.mark.parametrize("limit", ["max_size_bytes", "room on the disk"])
def test_a_body_of_unknown_length_that_outgrows_the_cache_is_not_cached(tmp_path, limit):
    # Sent chunked, with no Content-Length: it was written whole (past
    # max_size_bytes, or past what a disk short of room leaves: size_limit())
    # and its commit then evicted every entry, itself included.
    if limit == "max_size_bytes":
        world = World(tmp_path, os.urandom(6 * MiB), max_size=4 * MiB)
    else:
        world = World(tmp_path, os.urandom(3 * MiB), max_size=8 * MiB)
        world.cache.size_limit = lambda: 2 * MiB  # type: ignore[method-assign]
    small = [cache_by_hand(world.cache, os.urandom(MiB // 2 + i)) for i in range(3)]
    client, _ = world.get()
    body = Body(length=None)
    world.requests[0].d.callback(body)
    for start in range(0, len(world.data), MiB):
        body.send(world.data[start:start + MiB])
        world.clock.advance(0)
    body.end()
    for _ in range(5):
        world.clock.advance(0)
    assert client.body == world.data
    assert all(world.cache.lookup(key) is not None for key in small)
    assert world.cache.lookup(world.key) is None and world.cache.stats.evictions == 0
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_readers_of_a_body_that_outgrows_the_cache_still_get_all_of_it(tmp_path):
    # A follower (or a slow primary moved to reading the file) reads the
    # cache file: it is written to the end for them, then not made an entry.
    world = World(tmp_path, os.urandom(6 * MiB), max_size=4 * MiB)
    first, _ = world.get()
    body = Body(length=None)
    world.requests[0].d.callback(body)
    body.send(world.data[:MiB])
    world.clock.advance(0)
    second, _ = world.get()  # joins the download
    assert len(world.requests) == 1
    for start in range(MiB, len(world.data), MiB):
        body.send(world.data[start:start + MiB])
        world.clock.advance(0)
    body.end()
    for _ in range(5):
        world.clock.advance(0)
    assert first.body == world.data and second.body == world.data
    assert world.cache.lookup(world.key) is None and world.cache.stats.evictions == 0
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_clients_that_joined_a_download_too_big_to_cache_each_get_the_blob(tmp_path):
    # They were told to retry (a 503) although nothing failed: with no file
    # to follow, each starts a download of its own, at once (not one after
    # the other, each joining the next and bounced in turn).
    data = os.urandom(2 * MiB)
    world = World(tmp_path, data, max_size=MiB)
    first, _ = world.get()
    others = [world.get() for _ in range(2)]
    assert len(world.requests) == 1
    bodies = [Body(length=len(data)) for _ in range(3)]
    world.requests[0].d.callback(bodies[0])
    assert [outcome for _, outcome in others] == [[], []]
    assert len(world.requests) == 3
    world.requests[1].d.callback(bodies[1])
    world.requests[2].d.callback(bodies[2])
    assert world.service.in_flight() == 3
    for body, (request, _) in zip(bodies, [(first, []), *others], strict=True):
        body.send(data)
        body.end()
        world.clock.advance(0)
        assert request.body == data and request.code == 200
    assert len(world.cache) == 0
    assert world.service.in_flight() == 0


def test_a_hit_whose_client_left_while_the_upstream_confirmed_it_lets_go_of_its_entry(tmp_path):
    # The client left during the HEAD that confirms the blob under another
    # name: serving the hit then failed on the channel-less request before
    # the entry was released, and the entry stayed pinned, never evicted.
    from types import SimpleNamespace

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web import server
    from twisted.web.http_headers import Headers
    from twisted.web.test.requesthelper import DummyChannel

    data = os.urandom(100_000)
    world = World(tmp_path, data, max_size=150_000)
    assert cache_by_hand(world.cache, data) == world.key
    world.service.links.add("up", "library/x", [world.digest])
    request = server.Request(DummyChannel(), False)
    request.method, request.uri, request.path, request.clientproto = b"GET", b"/v2/o/blobs/x", b"/v2/o/blobs/x", b"HTTP/1.1"
    world.service.serve(request, world.upstream, "other/name", world.digest, head=False)
    assert world.requests[0].method == "HEAD"
    request.connectionLost(Failure(ConnectionDone()))
    world.requests[0].d.callback(SimpleNamespace(code=200, headers=Headers({}), length=0, deliverBody=lambda p: None))
    world.clock.advance(1)
    assert world.cache.lookup(world.key).readers == 0
    world.cache.max_size_bytes = 0
    world.cache.evict()
    world.clock.advance(0)
    assert world.cache.lookup(world.key) is None


def test_a_range_follower_answered_with_the_downloads_error_has_no_content_range(tmp_path):
    # (It waits past what the file holds.)
    world, data, body, first, follower = _followed_download(tmp_path, f"bytes={3 * MiB}-", reads_the_file=False)
    assert not follower.startedWriting
    body.protocol.connectionLost(Failure(ConnectionLost()))  # the upstream cuts mid-body
    world.clock.advance(0)
    assert follower.code == 502 and follower.finished
    assert json.loads(follower.body)["errors"][0]["code"] == "UNAVAILABLE"
    # (An error body does not carry the 206's Content-Range.)
    assert follower.responseHeaders.getRawHeaders(b"content-range") is None, follower.responseHeaders


def test_a_follower_that_sent_nothing_and_whose_rescue_fails_gets_an_error_not_a_cut(tmp_path):
    world, data, body, first, follower = _followed_download_whose_disk_fills_up(
        tmp_path, f"bytes={3 * MiB}-", reads_the_file=False
    )
    assert len(world.requests) == 2  # the rescue asks the upstream for the rest
    refused = Body(code=500, length=0)
    world.requests[1].d.callback(refused)
    world.clock.advance(0)
    # Nothing of it went: answered (503, retry), not cut (which the access
    # log took for a client that left).
    assert follower.finished and follower.code == 503, (follower.code, follower.finished)
    assert json.loads(follower.body)["errors"][0]["code"] == "UNAVAILABLE"


def test_the_rest_of_a_file_left_behind_counts_as_under_way_before_its_download_starts(tmp_path):
    # (A graceful stop waits for the downloads under way.)  It starts only
    # once the writing thread has let go of the file: until then it was not
    # counted, and a stop did not wait for it.
    world = World(tmp_path, os.urandom(MiB))
    kept: Deferred[Any] = Deferred()
    world.service._refill(world.key, world.upstream, "library/x", world.digest, kept)
    assert world.service.in_flight() == 1 and world.requests == []
    writer = world.cache.begin(world.key, MiB)
    kept.callback(writer)
    assert world.service.in_flight() == 1 and len(world.requests) == 1  # its own download now
    failed: Deferred[Any] = Deferred()
    world.service._refill(world.key, world.upstream, "library/x", world.digest, failed)
    failed.errback(OSError("the file could not be kept"))
    assert world.service.in_flight() == 1
