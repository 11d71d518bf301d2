"""
The OCI distribution grammar for repository names, tags and digests.

Everything a client sends is checked here before it is used to build an
upstream URL or a cache path, so nothing else has to worry about C{../},
percent-encoding or NUL bytes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# distribution-spec: <name> is path components joined by "/", each
# [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

#: Docker and distribution refuse longer names; so does cargobay.
MAX_NAME_LENGTH = 255

#: The digest algorithms cargobay can verify, with their encoded lengths.
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


class InvalidDigest(ValueError):
    pass


@dataclass(frozen=True)
class Digest:
    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """
        @raise InvalidDigest: when C{text} is not a digest cargobay can verify.
        """
        if _DIGEST.fullmatch(text) is None:
            raise InvalidDigest(f"{text[:100]!r} is not a digest")
        algorithm, encoded = text.split(":", 1)
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != length or _HEX.fullmatch(encoded) is None:
            raise InvalidDigest(f"{algorithm} digest must be {length} lowercase hex characters")
        return cls(algorithm, encoded)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.encoded


def looks_like_digest(reference: str) -> bool:
    return ":" in reference


def sha256_digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


#: What a registry id may hold as it is in the name of a directory of the cache.
_DIRECTORY_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def registry_directory(registry_id: str) -> str:
    """
    The name of a registry's directories in the cache: its id, with every
    byte that a directory name may not hold, or should not ("/", a space, a
    leading "." that would make "." or ".."), as %XX.  The earlier
    implementation took any id; ids of letters, digits, ".", "_" and "-"
    are their own names, as they always were here.
    """
    out = []
    for index, byte in enumerate(registry_id.encode("utf-8")):
        char = chr(byte)
        if char in _DIRECTORY_SAFE and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def registry_id_of(directory: str) -> str | None:
    """The registry id whose directories are named C{directory}; L{None} for a name it never makes."""
    try:
        registry_id = _unescape(directory)
    except (ValueError, UnicodeDecodeError):
        return None
    return registry_id if registry_id and registry_directory(registry_id) == directory else None


def _unescape(name: str) -> str:
    raw = bytearray()
    index = 0
    while index < len(name):
        if name[index] == "%":
            escaped = name[index + 1 : index + 3]
            if len(escaped) != 2:
                raise ValueError(name)
            raw.append(int(escaped, 16))
            index += 3
        else:
            raw.extend(name[index].encode("utf-8"))
            index += 1
    return raw.decode("utf-8")
