import time

import jwt
import pytest

from cargobay.tokens import Grant, InvalidToken, TokenVerifier, mint_token

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def verify(token, secrets=(SECRET,)):
    return TokenVerifier(secrets).verify(token)


def test_seed_format_all_access():
    # Claims exactly as the earlier implementation minted them.
    token = jwt.encode({"sub": "ci", "exp": int(time.time()) + 60, "access": {"type": "all"}}, SECRET, "HS256")
    grant = verify(token)
    assert grant.subject == "ci"
    assert grant.allows("anything/at/all")


def test_seed_format_repositories_without_exp():
    token = jwt.encode({"sub": "dev", "access": {"type": "repositories", "repos": ["alpine", "team/app"]}}, SECRET, "HS256")
    grant = verify(token)
    assert grant.allows("alpine") and grant.allows("team/app") and grant.allows("team/app/x")
    assert not grant.allows("alpine2")
    assert not grant.allows("team/apple")
    assert not grant.allows("team/app-b")
    assert not grant.allows("team")


def test_minted_tokens_round_trip():
    grant = verify(mint_token(SECRET, "bob", ["alpine"], 60))
    assert grant == Grant("bob", ("alpine",), grant.expires_at)
    assert verify(mint_token(SECRET, "bob")).repositories is None


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: jwt.encode({"sub": "x", "access": {"type": "all"}, "exp": int(time.time()) - 3600}, SECRET, "HS256"), "expired"),
        (lambda: jwt.encode({"sub": "x", "access": {"type": "all"}}, "another-secret-another-secret-xx", "HS256"), "signature"),
        (lambda: jwt.encode({"sub": "x", "access": {"type": "all"}}, None, "none"), "algorithm"),
        (lambda: jwt.encode({"sub": "x", "access": {"type": "all"}}, SECRET, "HS512"), "algorithm"),
        (lambda: jwt.encode({"sub": "x"}, SECRET, "HS256"), "access"),
        (lambda: jwt.encode({"sub": "x", "access": {"type": "some"}}, SECRET, "HS256"), "access.type"),
        (lambda: jwt.encode({"sub": "x", "access": {"type": "repositories", "repos": "alpine"}}, SECRET, "HS256"), "access.repos"),
        (lambda: jwt.encode({"sub": "x", "access": ["all"]}, SECRET, "HS256"), "must be an object"),
        (lambda: "not-a-jwt", "malformed"),
        (lambda: "a.b.c", "malformed"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(make, reason):
    with pytest.raises(InvalidToken, match=reason):
        verify(make())


def test_key_rotation_accepts_any_configured_secret():
    old = mint_token("old-secret-old-secret-old-secret-old", "x")
    assert verify(old, [SECRET, "old-secret-old-secret-old-secret-old"]).subject == "x"
