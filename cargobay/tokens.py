"""
Client tokens: the earlier implementation's JWTs.

A token is an HS256 JWT signed with C{[auth] jwt_secret} whose claims are
C{{"sub": str, "exp": int (optional), "access": {"type": "all"} |
{"type": "repositories", "repos": [...]}}}.  A repository entry grants that
name and everything below it at C{/} boundaries: C{team/app} grants
C{team/app} and C{team/app/x}, never C{team/apple}.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jwt
from jwt.utils import base64url_decode

# cargobay says it once, in its own words (Config.weak_secret, and
# cargobay-token): PyJWT would print its own source line for every token.
_SHORT_KEY = getattr(getattr(jwt, "warnings", None), "InsecureKeyLengthWarning", None)
if _SHORT_KEY is not None:
    warnings.filterwarnings("ignore", category=_SHORT_KEY)

#: How long a verified token is remembered (never past its own expiry).
VERIFIED_TOKEN_CACHE_SECONDS = 60.0
VERIFIED_TOKEN_CACHE_SIZE = 10_000
#: Longer tokens (rare: several hundred repositories) are checked anew each
#: time, so that the remembered ones stay within a few tens of megabytes.
VERIFIED_TOKEN_CACHE_LENGTH = 8192
#: The longest token taken: 64 KiB of request headers, as Basic credentials.
MAX_TOKEN_LENGTH = 48 * 1024

#: The claim of a token cargobay signs (at /token) naming the key that
#: verified the token it was traded for: refused once that key is gone.
ORIGIN_CLAIM = "cargobay_key"

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
    #: The fingerprint of the key the grant rests on: the one that verified
    #: the token, or for a token cargobay traded, the one that verified
    #: what it was traded for.
    key: str | None = field(default=None, compare=False)

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
        # Verbatim, as the earlier implementation compared them: "team/" or
        # "/team" names no repository, and grants none.
        return tuple(repos)
    raise InvalidToken("claim 'access.type' must be 'all' or 'repositories'")


@dataclass(frozen=True)
class _Key:
    """
    One verification key and the only algorithms it may be used with: a
    shared secret with HS256, an RSA public key with RS256, an EC public key
    with ES256.  Never a mix, so a public key can never be used as an HMAC
    secret (the HS/RS confusion attack).
    """

    key: Any
    algorithms: tuple[str, ...]

    @cached_property
    def fingerprint(self) -> str:
        """Names the key in a token's claims without giving it away (worked out once)."""
        if isinstance(self.key, str):
            material = b"cargobay-hs256:" + self.key.encode()
        else:
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            material = self.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(material).hexdigest()[:32]


def load_public_key(pem: bytes) -> _Key:
    """
    @raise ValueError: when C{pem} is not an RSA or EC public key.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        return _Key(key, ("RS256",))
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _Key(key, ("ES256",))
    raise ValueError("only RSA (RS256) and EC P-256 (ES256) public keys are supported")


class TokenVerifier:
    def __init__(
        self,
        secrets: Iterable[str],
        leeway: float = 60.0,
        public_keys: Iterable[_Key] = (),
        issuer: str | None = None,
        audience: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._keys = [_Key(s, tuple(ALGORITHMS)) for s in secrets if s]
        #: The first secret is the one cargobay signs with: only its tokens
        #: may say which key they rest on (L{ORIGIN_CLAIM}).
        self._own = self._keys[0] if self._keys else None
        self._keys += list(public_keys)
        self._fingerprints = {k.fingerprint for k in self._keys}
        self._leeway = leeway
        self._issuer = issuer
        self._audience = audience
        # Verified tokens, so that a client's many requests with one token
        # pay for the signature check once: token -> (grant, good until).
        self._verified: OrderedDict[str, tuple[Grant, float]] = OrderedDict()
        self._clock = clock or time.time

    def verify(self, token: str) -> Grant:
        """
        @raise InvalidToken: when the token is malformed, not signed with one of
            the keys (each with its own algorithm), expired or not yet valid,
            for another issuer or audience, or its claims are not of the
            expected shape.
        """
        now = self._clock()
        cached = self._verified.get(token)
        if cached is not None:
            grant, good_until = cached
            if now < good_until:
                self._verified.move_to_end(token)
                return grant
            del self._verified[token]
        grant = self._verify(token)
        if len(token) > VERIFIED_TOKEN_CACHE_LENGTH:
            return grant
        good_until = now + VERIFIED_TOKEN_CACHE_SECONDS
        if grant.expires_at is not None:
            good_until = min(good_until, grant.expires_at + self._leeway)
        self._verified[token] = (grant, good_until)
        if len(self._verified) > VERIFIED_TOKEN_CACHE_SIZE:
            self._verified.popitem(last=False)
        return grant

    def _verify(self, token: str) -> Grant:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token") from None
        _refuse_duplicate_names(token)
        algorithm = header.get("alg")
        candidates = [k for k in self._keys if algorithm in k.algorithms]
        if not candidates:
            raise InvalidToken(f"token algorithm {str(algorithm)[:20]!r} not allowed")
        required = ["sub", "access"]
        if self._issuer is not None:
            required.append("iss")
        if self._audience is not None:
            required.append("aud")
        last_error = "signature verification failed"
        for candidate in candidates:
            try:
                claims = jwt.decode(
                    token,
                    candidate.key,
                    algorithms=list(candidate.algorithms),
                    leeway=self._leeway,
                    issuer=self._issuer,
                    audience=self._audience,
                    # Times are checked below, as the earlier implementation
                    # did: a null "exp" (what its token tool wrote) is no
                    # expiry, and "iat" is not looked at.
                    options={
                        "require": required, "verify_aud": self._audience is not None,
                        "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                        # Nor is "jti" (a number there is no reason to refuse a token).
                        "verify_jti": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.MissingRequiredClaimError as e:
                raise InvalidToken(f"token lacks the claim {e.claim!r}") from None
            except jwt.InvalidIssuerError:
                raise InvalidToken("token is for another issuer") from None
            except jwt.InvalidAudienceError:
                raise InvalidToken("token is for another audience") from None
            except jwt.InvalidAlgorithmError:
                raise InvalidToken("token algorithm not allowed") from None
            except (jwt.InvalidTokenError, ValueError, TypeError) as e:
                raise InvalidToken(f"malformed token ({_MALFORMED.get(type(e).__name__, type(e).__name__)})") from None
            subject = claims.get("sub")
            if not isinstance(subject, str):
                raise InvalidToken("claim 'sub' must be a string")
            expires_at = _expiry(claims)
            now = self._clock()
            if expires_at is not None and now > expires_at + self._leeway:
                raise InvalidToken("token has expired")
            not_before = _time_claim(claims, "nbf")
            if not_before is not None and now < not_before - self._leeway:
                raise InvalidToken("token is not yet valid")
            key = candidate.fingerprint
            origin = claims.get(ORIGIN_CLAIM)
            if origin is not None and candidate is self._own:
                # Traded at /token for a token another key verified: good
                # only while that key is configured (a retired secret or a
                # removed public key must not live on in what it bought).
                if not isinstance(origin, str):
                    raise InvalidToken(f"claim {ORIGIN_CLAIM!r} must be a string")
                if origin not in self._fingerprints:
                    raise InvalidToken("token was traded for one whose key is no longer configured")
                key = origin
            return Grant(subject, _parse_access(claims["access"]), expires_at, key)
        raise InvalidToken(last_error)


class _DuplicateName(ValueError):
    pass


#: The names of a token's header and claims that are read (here, or by the
#: earlier implementation, whose decoding refused one of them twice).
_READ_NAMES = frozenset({
    "alg", "typ", "cty", "kid", "jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "crit",
    "sub", "access", "type", "repos", "exp", "nbf", "iat", "iss", "aud", "jti", ORIGIN_CLAIM,
})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        for name in names:
            if name in _READ_NAMES and names.count(name) > 1:
                raise _DuplicateName(name)
    return dict(pairs)


def _refuse_duplicate_names(token: str) -> None:
    """
    Refuse a token whose header or claims name a member that is read twice
    (two C{access}, two C{type}): the earlier implementation did, and a
    checker that reads the first of them would read another token than the
    lexically last that PyJWT takes.  Other names may come twice, as there.
    """
    for segment in token.split(".")[:2]:
        try:
            json.loads(base64url_decode(segment.encode("ascii")), object_pairs_hook=_no_duplicates)
        except _DuplicateName as e:
            raise InvalidToken(f"token names {str(e)[:40]!r} twice") from None
        except (ValueError, UnicodeError, RecursionError):
            pass  # (malformed: PyJWT says so, in its words)


#: What PyJWT's complaints mean, for the client.
_MALFORMED = {
    "DecodeError": "its parts do not decode as base64url JSON",
    "InvalidSubjectError": "claim 'sub' must be a string",
    "InvalidJTIError": "claim 'jti' must be a string",
    "InvalidIssuedAtError": "claim 'iat' must be a number",
}


def _expiry(claims: dict[str, Any]) -> int | None:
    """
    The token's C{exp} as whole seconds (L{_time_claim}): what it is traded
    for at C{/token} may not outlive it.
    """
    return _time_claim(claims, "exp")


def _time_claim(claims: dict[str, Any], name: str) -> int | None:
    """
    A time claim as whole seconds; L{None} when absent or null (the earlier
    implementation's token tool wrote C{"exp": null} into every token).  A
    float or a numeric string is taken as an int is, as PyJWT takes them.
    """
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidToken(f"claim {name!r} must be a number")
    try:
        seconds = float(value)
        return math.floor(seconds)
    except (TypeError, ValueError, OverflowError):
        raise InvalidToken(f"claim {name!r} must be a number") from None


def mint_token(
    secret: str,
    subject: str,
    repositories: Iterable[str] | None = None,
    expires_in: int | None = None,
    now: float | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    token_id: str | None = None,
    expires_at: int | None = None,
    origin: str | None = None,
) -> str:
    """
    Make a token in the earlier implementation's claim format.

    @param repositories: the names granted; L{None} grants every repository.
    @param expires_at: an C{exp} no later than this (a token traded for
        another never outlives it).
    @param origin: the fingerprint of the key the token rests on
        (L{ORIGIN_CLAIM}), for a token traded for another.
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
    if expires_at is not None:
        claims["exp"] = min(claims.get("exp", expires_at), expires_at)
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    if token_id is not None:
        claims["jti"] = token_id
    if origin is not None:
        claims[ORIGIN_CLAIM] = origin
    return jwt.encode(claims, secret, algorithm="HS256")
