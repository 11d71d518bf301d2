"""
A misbehaving upstream registry for fault tests, run as its own process:

    python tests/evil_upstream.py PORT

Blob requests are answered according to the repository name, always for the
same 1 MiB blob (``BLOB``, digest ``DIGEST``):

- ``good``: the right bytes;
- ``wrong``: the right length, the last byte changed;
- ``truncate``: Content-Length of the whole blob, half of it, then the
  connection closes;
- ``stall``: Content-Length, half of the blob, then silence (connection open);
- ``chunkedcut``: no Content-Length, half of the blob, then the connection closes;
- ``chunkedslow``: no Content-Length, half of the blob, the rest a second
  later (so that other requests join the download);
- ``longer``: Content-Length of the whole blob, then more bytes than that;
- ``closedelimited``: no Content-Length, not chunked, the blob, then the
  connection closes (HTTP/1.0's framing); ``closedelimitedcut``: half of it;
- ``status<code>``: that HTTP status, with ``Retry-After: 7``;
- ``tometadata``: a redirect to a cloud's metadata service (169.254.169.254);
- ``tolocal``: a redirect to ``good`` of this upstream at 127.0.0.1;
- ``tobadhost``: a redirect to a URL whose bracketed host is no address.

Manifests of ``wrong`` are ``MANIFEST`` announced and asked for as another
digest (``WRONG_MANIFEST_DIGEST``); of ``good``, ``MANIFEST`` as itself.

Under ``badrealm``, everything asks for a token at such a URL; the tag list
of ``badlink`` links its next page to one.

It listens on every address (``python tests/evil_upstream.py PORT``), so
that it can be reached at one that is not loopback, and on ::1 (the same
port) where loopback has IPv6.

Tag lists page as some registries do: ``cursor`` with a parameter of its
own in the ``Link`` (Quay's ``next_page``) and an opaque ``last`` (ECR's),
its pages in case-insensitive order (``B`` after ``a``).  Referrers are
the same one-manifest index for every subject.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys

BLOB = bytes(range(256)) * 4096
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
#: What modes named ``big<mode>`` (``biggood``, ``bigwrong``...) serve
#: instead: big enough for cargobay to receive it into its cache file's
#: buffers (``wrong`` changes its middle byte, which goes there).
BIG_BLOB = random.Random(12).randbytes(12 * 1024 * 1024)
BIG_DIGEST = "sha256:" + hashlib.sha256(BIG_BLOB).hexdigest()
MANIFEST = (
    b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"mediaType":'
    b' "application/vnd.oci.image.config.v1+json", "digest": "' + DIGEST.encode() + b'", "size": 1048576},'
    b' "layers": []}'
)
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
WRONG_MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST + b" ").hexdigest()
#: A large index (3.5 MB: an upstream's manifests may be up to 4 MiB).
BIG_INDEX = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json",
     "digest": "sha256:" + hashlib.sha256(b"%d" % i).hexdigest(), "size": 1000 + i,
     "platform": {"os": "linux", "architecture": f"arch{i}"}} for i in range(17000)]}).encode()
BIG_INDEX_DIGEST = "sha256:" + hashlib.sha256(BIG_INDEX).hexdigest()
#: Every subject's referrers.
REFERRERS = (
    b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{"mediaType":'
    b' "application/vnd.oci.image.manifest.v1+json", "digest": "' + DIGEST.encode() + b'", "size": 1048576}]}'
)


def main(port: int) -> None:
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Evil(resource.Resource):
        isLeaf = True

        def render(self, request):  # type: ignore[no-untyped-def]
            path = request.path.decode()
            if path in ("/v2/", "/v2"):
                return b"{}"
            parts = path.split("/")
            if path.endswith("/tags/list") and "cursor" in parts:
                return self.tag_page(request)
            if "badrealm" in parts:
                request.setResponseCode(401)
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="http://[::zz]/token",service="evil"')
                return b'{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}'
            if path.endswith("/tags/list") and "badlink" in parts:
                request.setHeader(b"Link", b'<http://[::zz]/v2/evil/badlink/tags/list?n=1&last=a>; rel="next"')
                return json.dumps({"name": "evil/badlink", "tags": ["a"]}).encode()
            if "referrers" in parts:
                request.setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
                return REFERRERS
            if "manifests" in parts and parts[parts.index("manifests") - 1] == "bigindex":
                request.setHeader(b"Content-Type", b"application/vnd.oci.image.index.v1+json")
                request.setHeader(b"Docker-Content-Digest", BIG_INDEX_DIGEST.encode())
                return BIG_INDEX
            if "manifests" in parts and parts[parts.index("manifests") - 1] in ("good", "wrong"):
                request.setHeader(b"Content-Type", b"application/vnd.oci.image.manifest.v1+json")
                wrong = parts[parts.index("manifests") - 1] == "wrong"
                request.setHeader(b"Docker-Content-Digest", (WRONG_MANIFEST_DIGEST if wrong else MANIFEST_DIGEST).encode())
                return MANIFEST
            if "blobs" not in parts:
                request.setResponseCode(404)
                return b'{"errors":[{"code":"NAME_UNKNOWN","message":"no"}]}'
            mode = parts[parts.index("blobs") - 1]
            if mode.startswith("status"):
                request.setResponseCode(int(mode[len("status"):]))
                request.setHeader(b"Retry-After", b"7")
                return b'{"errors":[{"code":"X","message":"evil"}]}'
            if mode in ("tometadata", "tolocal", "tobadhost"):
                request.setResponseCode(302)
                request.setHeader(b"Location", {
                    "tometadata": b"http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                    "tolocal": f"http://127.0.0.1:{port}/v2/evil/good/blobs/{DIGEST}".encode(),
                    "tobadhost": f"http://[::zz]:{port}/v2/evil/good/blobs/{DIGEST}".encode(),
                }[mode])
                return b""
            blob = BLOB
            if mode.startswith("big"):
                blob, mode = BIG_BLOB, mode[len("big"):]
            half = blob[: len(blob) // 2]
            if mode == "good":
                return blob
            if mode in ("closedelimited", "closedelimitedcut") and request.method == b"GET":
                # HTTP/1.0's framing: no length, the body ends with the connection.
                body = BLOB if mode == "closedelimited" else half
                transport = request.channel.transport
                transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
                transport.unregisterProducer()  # (the channel's: it would hold the connection open)
                transport.loseConnection()
                return server.NOT_DONE_YET
            if mode == "wrong":
                at = len(blob) - 1 if blob is BLOB else len(blob) // 2
                return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1:]
            if mode == "empty":
                return b""
            if mode == "silentbody" and request.method == b"GET":
                # The headers, and then nothing.
                request.setHeader(b"Content-Length", str(len(BLOB)).encode())
                request.write(b"")
                return server.NOT_DONE_YET
            if mode == "longer":
                request.setHeader(b"Content-Length", str(len(blob)).encode())
                request.channel.transport.write(b"")
                request.write(blob + b"extra bytes")
                request.finish()
                return server.NOT_DONE_YET
            if request.method == b"HEAD":
                return blob
            if mode in ("truncate", "stall"):
                request.setHeader(b"Content-Length", str(len(blob)).encode())
                request.write(half)
                if mode == "truncate":
                    reactor.callLater(0.2, request.channel.transport.abortConnection)
                return server.NOT_DONE_YET
            if mode == "chunkedslow":
                request.write(half)

                def rest() -> None:
                    request.write(BLOB[len(half):])
                    request.finish()

                reactor.callLater(1.0, rest)
                return server.NOT_DONE_YET
            if mode == "chunkedcut":
                request.write(half)
                reactor.callLater(0.2, request.channel.transport.abortConnection)
                return server.NOT_DONE_YET
            request.setResponseCode(404)
            return b""

        def tag_page(self, request):  # type: ignore[no-untyped-def]
            name = request.path.decode()[len("/v2/"):-len("/tags/list")]
            cursor = (request.args.get(b"next_page") or request.args.get(b"last") or [b""])[0]
            tags, link = {
                b"": (["B", "a"], "next_page=gAAA%3D%3D"),
                b"gAAA==": (["c", "D"], "last=opaque%3D%3D"),
                b"opaque==": (["e"], None),
            }[cursor]
            if link:
                request.setHeader(b"Link", f'</v2/{name}/tags/list?n=2&{link}>; rel="next"'.encode())
            return json.dumps({"name": name, "tags": tags}).encode()

    site = server.Site(Evil())
    reactor.listenTCP(port, site, interface="0.0.0.0")
    try:
        reactor.listenTCP(port, site, interface="::1")  # for IPv6 address literals, where loopback has one
    except Exception:
        pass
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
