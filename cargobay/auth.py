"""
Authenticating clients and answering them with challenges they can follow.

Three ways in, all carrying the user's JWT (see L{cargobay.tokens}):
C{Authorization: Bearer <JWT>} (the earlier implementation's way, and what
scripts use), C{Authorization: Basic} with the JWT as the password (any user
name), and the Docker token flow: a C{Bearer realm=…} challenge pointing at
this proxy's C{/token} endpoint, which trades Basic credentials for a
short-lived token scoped to the repositories asked for.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Iterable

from twisted.web.iweb import IRequest

from cargobay.errors import RegistryError, denied, unauthorized
from cargobay.reference import is_valid_name
from cargobay.tokens import Grant, InvalidToken, TokenVerifier, mint_token

#: Lifetime of the tokens the /token endpoint hands out.
ISSUED_TOKEN_LIFETIME = 300


@dataclass(frozen=True)
class Scope:
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        # repository:NAME:ACTIONS; NAME may contain ":" only as a port in
        # other registries' names, never in ours.
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not is_valid_name(name):
            return None
        return cls(name, tuple(a for a in actions.split(",") if a))


class Authenticator:
    def __init__(self, verifier: TokenVerifier, secret: str, service: str, public_url: str | None) -> None:
        self._verifier = verifier
        self._secret = secret
        self.service = service
        self._public_url = public_url

    def realm(self, request: IRequest) -> str:
        if self._public_url:
            return f"{self._public_url}/token"
        host = request.getHeader(b"host")
        scheme = "https" if request.isSecure() else "http"
        if host is None:
            address = request.getHost()
            host_text = f"{address.host}:{address.port}"
        else:
            host_text = host.decode("latin-1")
        return f"{scheme}://{host_text}/token"

    def challenge(self, request: IRequest, scope: str | None = None, error: str | None = None) -> str:
        parts = [f'realm="{self.realm(request)}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    def credentials(self, request: IRequest) -> str | None:
        """
        The JWT a request carries, from Bearer or Basic credentials.
        """
        header = request.getHeader(b"authorization")
        if header is None:
            return None
        scheme, _, value = header.decode("latin-1").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return value
        if scheme.lower() == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return ""
            _, _, password = decoded.partition(":")
            return password
        return ""

    def authenticate(self, request: IRequest, scope: str | None = None) -> Grant:
        """
        @raise RegistryError: 401 with a challenge when there is no usable token.
        """
        token = self.credentials(request)
        if token is None:
            raise unauthorized("authentication required", self.challenge(request, scope))
        try:
            return self._verifier.verify(token)
        except InvalidToken as e:
            raise unauthorized(
                f"invalid token: {e}", self.challenge(request, scope, "invalid_token")
            ) from None

    def authorize(self, request: IRequest, grant: Grant, name: str) -> None:
        """
        @raise RegistryError: 403 DENIED when the token does not cover C{name}.
        """
        if not grant.allows(name):
            error = denied("requested access to the resource is denied", {"name": name})
            error.headers["WWW-Authenticate"] = self.challenge(
                request, f"repository:{name}:pull", "insufficient_scope"
            )
            raise error

    def issue(self, grant: Grant, scopes: Iterable[str]) -> dict[str, object]:
        """
        A short-lived token for the repositories in C{scopes} that C{grant}
        allows.  Push (or anything but pull) is never granted.
        """
        names = []
        for text in scopes:
            for item in text.split(" "):
                scope = Scope.parse(item)
                if scope is not None and "pull" in scope.actions and grant.allows(scope.name):
                    names.append(scope.name)
        now = int(time.time())
        lifetime = ISSUED_TOKEN_LIFETIME
        if grant.expires_at is not None:
            lifetime = max(1, min(lifetime, grant.expires_at - now))
        token = mint_token(self._secret, grant.subject, sorted(set(names)), lifetime, now=now)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued}


def bad_token_request(message: str) -> RegistryError:
    return RegistryError(400, "UNSUPPORTED", message)
