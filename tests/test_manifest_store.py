"""
Which bytes a manifest digest covers: the body, or a signed schema 1
manifest's payload as libtrust lays it out, and nothing else; where tag
resolutions are kept on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json

from twisted.internet.task import Clock

from cargobay.manifest_store import ManifestStore, manifest_digest, manifest_matches
from cargobay.reference import Digest


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def signed(payload: bytes, length: int | None = None, tail: bytes | None = None) -> bytes:
    """A pretty JWS as libtrust writes one: the signatures before the closing brace."""
    cut = payload.rindex(b"\n}") if length is None else length
    header = {"formatLength": cut, "formatTail": b64url(payload[cut:] if tail is None else tail), "time": "x"}
    signatures = json.dumps([{"header": {}, "signature": "c2ln", "protected": b64url(json.dumps(header).encode())}])
    return payload[:cut] + b',\n   "signatures": ' + signatures.encode() + payload[cut:]


PAYLOAD = b'{\n   "schemaVersion": 1,\n   "name": "library/old",\n   "tag": "1",\n   "fsLayers": []\n}'


def test_a_signed_schema_1_manifest_matches_the_digest_of_its_payload():
    body = signed(PAYLOAD)
    assert manifest_matches(digest_of(PAYLOAD), body)
    assert manifest_digest(body) == digest_of(PAYLOAD)
    assert not manifest_matches(digest_of(PAYLOAD.replace(b"old", b"new")), body)


def test_a_signature_header_cannot_make_a_body_claim_another_manifest_s_digest():
    # formatLength 1 and a formatTail of another manifest's bytes after its
    # first: the "payload" was that manifest, whatever the body said, and
    # the body was cached and served under its digest.
    other = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {}, "layers": []}).encode()
    body = json.dumps({"schemaVersion": 1, "config": {"digest": "sha256:" + "0" * 64}, "layers": [],
                       "signatures": [{"protected": b64url(json.dumps(
                           {"formatLength": 1, "formatTail": b64url(other[1:])}).encode())}]}).encode()
    assert not manifest_matches(digest_of(other), body)
    # A tail that holds more than the closing brace, or one the body does
    # not end with, or signatures not where formatLength says.
    for forged in (signed(PAYLOAD, tail=b',"extra": 1\n}'), signed(PAYLOAD, tail=b"\n }"),
                   signed(PAYLOAD, length=PAYLOAD.rindex(b"\n}") - 3)):
        assert manifest_digest(forged) == digest_of(forged)
        assert not manifest_matches(digest_of(PAYLOAD), forged)


ONE = Digest("sha256", "1" * 64)
TWO = Digest("sha256", "2" * 64)
OCI = "application/vnd.oci.image.manifest.v1+json"


def test_the_tag_of_one_repository_and_a_repository_named_after_it_both_keep_their_tags(tmp_path):
    # Tag "b.json"'s repository "a" and repository "a/b.json" are both valid:
    # a tag file "a/b.json" was the other's directory.
    store = ManifestStore(str(tmp_path), Clock())
    store.set_tag("up", "a", "b", ONE, OCI)
    store.set_tag("up", "a/b.json", "latest", TWO, OCI)
    store.set_tag("up", "c/d.json", "latest", TWO, OCI)
    store.set_tag("up", "c", "d", ONE, OCI)
    after_restart = ManifestStore(str(tmp_path), Clock())
    assert after_restart.tag("up", "a", "b").digest == ONE
    assert after_restart.tag("up", "a/b.json", "latest").digest == TWO
    assert after_restart.tag("up", "c", "d").digest == ONE
    assert after_restart.tag("up", "c/d.json", "latest").digest == TWO
    assert sorted(after_restart.tags_on_disk()) == [
        ("up", "a", "b"), ("up", "a/b.json", "latest"), ("up", "c", "d"), ("up", "c/d.json", "latest")]


def test_a_tag_kept_by_an_earlier_version_is_still_read_and_moved_to_its_new_name(tmp_path):
    legacy = tmp_path / "tags" / "up" / "library" / "alpine" / "3.20.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"digest": str(ONE), "media_type": OCI, "confirmed_at": 5.0}))
    store = ManifestStore(str(tmp_path), Clock())
    assert list(store.tags_on_disk()) == [("up", "library/alpine", "3.20")]
    resolution = store.tag("up", "library/alpine", "3.20")
    assert resolution is not None and (resolution.digest, resolution.confirmed_at) == (ONE, 5.0)
    assert not legacy.exists() and (legacy.parent / "@3.20.json").exists()
    assert list(ManifestStore(str(tmp_path), Clock()).tags_on_disk()) == [("up", "library/alpine", "3.20")]


def test_dropping_a_tag_removes_its_file_under_either_name(tmp_path):
    directory = tmp_path / "tags" / "up" / "library" / "alpine"
    directory.mkdir(parents=True)
    (directory / "old.json").write_text(json.dumps({"digest": str(ONE), "media_type": OCI, "confirmed_at": 5.0}))
    store = ManifestStore(str(tmp_path), Clock())
    store.set_tag("up", "library/alpine", "new", TWO, OCI)
    store.drop_tag("up", "library/alpine", "old")
    store.drop_tag("up", "library/alpine", "new")
    assert list(directory.iterdir()) == []
    assert store.tag("up", "library/alpine", "old") is None
