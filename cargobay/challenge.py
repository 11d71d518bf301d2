"""
Parsing C{WWW-Authenticate} challenges (RFC 7235) as registries send them::

    Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*')
_SCHEME = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def parse_challenges(header: str) -> list[Challenge]:
    """
    Parse one C{WWW-Authenticate} header value into its challenges.  Anything
    that does not parse ends the list; a malformed header yields C{[]}.
    """
    challenges: list[Challenge] = []
    position = 0
    length = len(header)
    while position < length:
        scheme_match = _SCHEME.match(header, position)
        if scheme_match is None:
            break
        scheme = scheme_match.group(1).lower()
        position = scheme_match.end()
        params: dict[str, str] = {}
        while position < length:
            param = _PARAM.match(header, position)
            if param is None:
                break
            key = param.group(1).lower()
            quoted, bare = param.group(2), param.group(3)
            value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            params[key] = value
            position = param.end()
            if position < length and header[position] == ",":
                position += 1
                # A comma followed by "token " (no "=") starts the next challenge.
                if _PARAM.match(header, position) is None:
                    break
            else:
                break
        challenges.append(Challenge(scheme, params))
        while position < length and header[position] in ", ":
            position += 1
    return challenges


def find_challenge(headers: list[str], scheme: str) -> Challenge | None:
    for header in headers:
        for challenge in parse_challenges(header):
            if challenge.scheme == scheme:
                return challenge
    return None
