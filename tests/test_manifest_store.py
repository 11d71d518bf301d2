"""
Which bytes a manifest digest covers: the body, or a signed schema 1
manifest's payload as libtrust lays it out, and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json

from cargobay.manifest_store import manifest_digest, manifest_matches
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
