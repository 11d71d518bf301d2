"""
Client tokens: the earlier implementation's JWTs.

A token is an HS256 JWT signed with C{[auth] jwt_secret} whose claims are
C{{"sub": str, "exp": int (optional), "access": {"type": "all"} |
{"type": "repositories", "repos": [...]}}}.  A repository entry grants that
name and everything below it at C{/} boundaries: C{team/app} grants
C{team/app} and C{team/app/x}, never C{team/apple}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import jwt

#: Pinned: a token is never accepted with another algorithm (no "none", no
#: HS/RS confusion).
ALGORITHMS = ["HS256"]


class InvalidToken(Exception):
    """
    The token cannot be used; the message says why without repeating the token.
    """


@dataclass(frozen=True)
class Grant:
    """
    What a verified token allows: a subject and either every repository or a
    list of repository prefixes.
    """

    subject: str
    repositories: tuple[str, ...] | None  # None: all repositories
    expires_at: int | None = None

    def allows(self, name: str) -> bool:
        if self.repositories is None:
            return True
        return any(name == repo or name.startswith(repo + "/") for repo in self.repositories)


def _parse_access(access: Any) -> tuple[str, ...] | None:
    if not isinstance(access, dict):
        raise InvalidToken("claim 'access' must be an object")
    kind = access.get("type")
    if kind == "all":
        return None
    if kind == "repositories":
        repos = access.get("repos")
        if not isinstance(repos, list) or not all(isinstance(r, str) for r in repos):
            raise InvalidToken("claim 'access.repos' must be a list of strings")
        return tuple(r.strip("/") for r in repos if r.strip("/"))
    raise InvalidToken("claim 'access.type' must be 'all' or 'repositories'")


class TokenVerifier:
    def __init__(self, secrets: Iterable[str], leeway: float = 30.0) -> None:
        self._secrets = [s for s in secrets if s]
        self._leeway = leeway

    def verify(self, token: str) -> Grant:
        """
        @raise InvalidToken: when the token is malformed, not signed with one of
            the secrets, expired, or its claims are not of the expected shape.
        """
        if len(token) > 16384:
            raise InvalidToken("token too long")
        last_error: str = "no secret configured"
        for secret in self._secrets:
            try:
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=ALGORITHMS,
                    leeway=self._leeway,
                    options={"require": ["sub", "access"], "verify_aud": False},
                )
            except jwt.InvalidSignatureError:
                last_error = "signature verification failed"
                continue
            except jwt.ExpiredSignatureError:
                raise InvalidToken("token has expired") from None
            except jwt.ImmatureSignatureError:
                raise InvalidToken("token is not yet valid") from None
            except jwt.MissingRequiredClaimError as e:
                raise InvalidToken(f"token lacks the claim {e.claim!r}") from None
            except jwt.InvalidAlgorithmError:
                raise InvalidToken("token algorithm not allowed (HS256 only)") from None
            except jwt.InvalidTokenError as e:
                raise InvalidToken(f"malformed token ({type(e).__name__})") from None
            subject = claims.get("sub")
            if not isinstance(subject, str):
                raise InvalidToken("claim 'sub' must be a string")
            exp = claims.get("exp")
            return Grant(subject, _parse_access(claims["access"]), exp if isinstance(exp, int) else None)
        raise InvalidToken(last_error)


def mint_token(
    secret: str,
    subject: str,
    repositories: Iterable[str] | None = None,
    expires_in: int | None = None,
    now: float | None = None,
) -> str:
    """
    Make a token in the earlier implementation's claim format.

    @param repositories: the names granted; L{None} grants every repository.
    """
    issued = int(time.time() if now is None else now)
    access: dict[str, Any]
    if repositories is None:
        access = {"type": "all"}
    else:
        access = {"type": "repositories", "repos": list(repositories)}
    claims: dict[str, Any] = {"sub": subject, "access": access, "iat": issued}
    if expires_in is not None:
        claims["exp"] = issued + expires_in
    return jwt.encode(claims, secret, algorithm="HS256")
