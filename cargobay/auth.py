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
import ipaddress
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.web.server import Request

from cargobay.config import AuthConfig, ServerConfig
from cargobay.errors import denied, unauthorized
from cargobay.reference import is_valid_name
from cargobay.tokens import Grant, InvalidToken, TokenVerifier, load_public_key, mint_token

#: Lifetime of the tokens the /token endpoint hands out.
ISSUED_TOKEN_LIFETIME = 300
#: Longest lifetime of a refresh token (OAuth2 password grant).


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
    def __init__(
        self,
        verifier: TokenVerifier,
        secret: str,
        service: str,
        public_url: str | None,
        trusted_proxies: tuple[str, ...] = (),
        token_lifetime: int = ISSUED_TOKEN_LIFETIME,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.verifier = verifier
        self._secret = secret
        self.service = service
        self._public_url = public_url
        self._trusted = [ipaddress.ip_network(a, strict=False) for a in trusted_proxies]
        self._lifetime = token_lifetime
        self._issuer = issuer
        self._audience = audience

    @classmethod
    def from_config(cls, auth: AuthConfig, server: ServerConfig) -> Authenticator:
        verifier = TokenVerifier(
            [auth.jwt_secret, *auth.previous_jwt_secrets],
            leeway=auth.leeway_seconds,
            public_keys=[load_public_key(pem) for pem in auth.public_keys],
            issuer=auth.issuer,
            audience=auth.audience,
        )
        return cls(
            verifier,
            auth.jwt_secret,
            auth.realm_service,
            server.public_url,
            server.trusted_proxies,
            auth.token_lifetime_seconds,
            auth.issuer,
            auth.audience,
        )

    def _from_trusted_proxy(self, request: Request) -> bool:
        if not self._trusted:
            return False
        peer = getattr(request.getClientAddress(), "host", None)
        try:
            address = ipaddress.ip_address(peer or "")
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def realm(self, request: Request) -> str:
        """
        The absolute URL of the token endpoint, as the client reaches us: the
        configured public URL, else what a trusted load balancer forwarded,
        else this request's own scheme and Host.
        """
        if self._public_url:
            return f"{self._public_url}/token"
        scheme = "https" if request.isSecure() else "http"
        host = _header(request, b"host")
        if self._from_trusted_proxy(request):
            forwarded_proto = (_header(request, b"x-forwarded-proto") or "").split(",")[0].strip().lower()
            if forwarded_proto in ("http", "https"):
                scheme = forwarded_proto
            forwarded_host = (_header(request, b"x-forwarded-host") or "").split(",")[0].strip()
            if forwarded_host:
                host = forwarded_host
        if not host or not _HOST.fullmatch(host):
            address = request.getHost()
            # A UNIX socket listener's address has neither.
            host = f"{address.host}:{address.port}" if hasattr(address, "port") else "localhost"
        return f"{scheme}://{host}/token"

    def challenge(self, request: Request, scope: str | None = None, error: str | None = None) -> str:
        parts = [f'realm="{self.realm(request)}"', f'service="{self.service}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return "Bearer " + ",".join(parts)

    def credentials(self, request: Request) -> str | None:
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
                # b64decode raises ValueError, not binascii.Error, on a
                # non-ASCII str; its bytes are not base64 either way.
                decoded = base64.b64decode(value.encode("latin-1"), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return ""
            _, _, password = decoded.partition(":")
            return password
        return ""

    def authenticate(self, request: Request, scope: str | None = None) -> Grant:
        """
        @raise RegistryError: 401 with a challenge when there is no usable token.
        """
        token = self.credentials(request)
        if token is None:
            raise unauthorized("authentication required", self.challenge(request, scope))
        return self.verify(request, token, scope)

    def verify(self, request: Request, token: str, scope: str | None = None) -> Grant:
        """
        @raise RegistryError: 401 with an C{invalid_token} challenge.
        """
        try:
            return self.verifier.verify(token)
        except InvalidToken as e:
            raise unauthorized(
                f"invalid token: {e}", self.challenge(request, scope, "invalid_token")
            ) from None

    def authorize(self, request: Request, grant: Grant, name: str) -> None:
        """
        @raise RegistryError: 403 DENIED when the token does not cover C{name}.
        """
        if not grant.allows(name):
            error = denied("requested access to the resource is denied", {"name": name})
            error.headers["WWW-Authenticate"] = self.challenge(
                request, f"repository:{name}:pull", "insufficient_scope"
            )
            raise error

    def refresh_token(self, grant: Grant) -> str:
        """
        A token for the OAuth2 refresh grant: the same rights as the user's
        own JWT and the same expiry; never the JWT itself.  docker login
        keeps it in place of the password, so it must work for as long as
        the JWT does: a shorter one broke every pull after it ran out, the
        JWT still good, until the user logged in again.  Never a later
        one: the verifier's leeway past C{exp} must not buy a token that
        starts its own (traded on every minute, it would never run out).
        """
        return mint_token(
            self._secret, grant.subject, grant.repositories,
            issuer=self._issuer, audience=self._audience, token_id=secrets.token_hex(8),
            expires_at=grant.expires_at, origin=grant.key,
        )

    def issue(self, grant: Grant, scopes: Iterable[str]) -> dict[str, object]:
        """
        A short-lived token for the repositories in C{scopes} that C{grant}
        allows.  Push (or anything but pull) is never granted.
        """
        names = []
        # The catalog lists what the credential may pull: a token for it
        # carries all of that (no more than the credential itself), and so
        # does one asked for without a scope (podman search asks so, then
        # reads the catalog with it).
        whole = not any(text.strip() for text in scopes)
        for text in scopes:
            for item in text.split(" "):
                scope = Scope.parse(item)
                if scope is not None and "pull" in scope.actions and grant.allows(scope.name):
                    names.append(scope.name)
                whole = whole or item == "registry:catalog:*"
        repositories = grant.repositories if whole else sorted(set(names))
        now = int(time.time())
        lifetime = self._lifetime
        if grant.expires_at is not None:
            # No later than the credential's own expiry, even within the
            # leeway past it (see L{refresh_token}).
            lifetime = max(0, min(lifetime, grant.expires_at - now))
        token = mint_token(
            self._secret, grant.subject, repositories, lifetime, now=now,
            issuer=self._issuer, audience=self._audience, expires_at=grant.expires_at, origin=grant.key,
        )
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": token, "access_token": token, "expires_in": lifetime, "issued_at": issued}


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


# A Host header we are willing to echo into a challenge: a host name or
# address and an optional port, nothing that could break out of the quotes.
_HOST = re.compile(r"[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
