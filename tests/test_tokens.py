import json
import time

import jwt
import pytest

from cargobay.tokens import Grant, InvalidToken, TokenVerifier, mint_token
from proxy import seed_token

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def verify(token, secrets=(SECRET,)):
    return TokenVerifier(secrets).verify(token)


def test_seed_format_all_access():
    # Claims exactly as the earlier implementation minted them.
    token = jwt.encode({"sub": "ci", "exp": int(time.time()) + 60, "access": {"type": "all"}}, SECRET, "HS256")
    grant = verify(token)
    assert grant.subject == "ci"
    assert grant.allows("anything/at/all")


def test_the_earlier_implementation_s_tokens_with_a_null_exp_work():
    # Its token tool serialized "exp": None as null into every token it made.
    everything = verify(seed_token('{"sub":"user123","exp":null,"access":{"type":"all"}}', SECRET))
    assert everything == Grant("user123", None, None)
    some = verify(seed_token(
        '{"sub":"user123","exp":null,"access":{"type":"repositories","repos":["alpine","nginx"]}}', SECRET))
    assert some == Grant("user123", ("alpine", "nginx"), None)
    # Other time claims written as null by another library mean no time either.
    assert verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "nbf": None, "iat": None}, SECRET, "HS256"))


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


def _signed(payload, header='{"alg":"HS256","typ":"JWT"}'):
    """A token of these very bytes (PyJWT would write its own JSON), signed with SECRET."""
    import hashlib
    import hmac

    from jwt.utils import base64url_encode

    signing_input = base64url_encode(header.encode()) + b"." + base64url_encode(payload.encode())
    signature = base64url_encode(hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


def test_a_token_of_exact_bytes_is_taken_when_it_names_nothing_read_twice():
    assert verify(_signed('{"sub":"x","access":{"type":"repositories","repos":["a"]}}')).repositories == ("a",)
    # (A claim no one reads may come twice, as the earlier implementation took it.)
    assert verify(_signed('{"sub":"x","team":"a","team":"b","access":{"type":"all"}}')).repositories is None


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
        # Said in words, not as PyJWT's exception names.
        (lambda: jwt.api_jws.encode(b"not json", SECRET, "HS256"), r"malformed token \(its parts do not decode"),
        (lambda: jwt.encode({"sub": 7, "access": {"type": "all"}}, SECRET, "HS256"), "claim 'sub' must be a string"),
        # (A 500 and a traceback: the claim was looked up in a set.)
        (lambda: jwt.encode({"sub": "x", "access": {"type": "all"}, "cargobay_key": ["a"]}, SECRET, "HS256"),
         "claim 'cargobay_key' must be a string"),
        (lambda: jwt.encode({"sub": "x", "access": {"type": "all"}, "cargobay_key": {}}, SECRET, "HS256"),
         "claim 'cargobay_key' must be a string"),
        # A name twice, at any depth, in the claims or the header: the earlier
        # implementation refused it, PyJWT takes the last.
        (lambda: _signed('{"sub":"x","access":{"type":"repositories","repos":["a"],"type":"all"}}'), "names 'type' twice"),
        (lambda: _signed('{"sub":"x","access":{"type":"all"},"sub":"y"}'), "names 'sub' twice"),
        (lambda: _signed('{"sub":"x","access":{"type":"all"}}', header='{"alg":"HS256","alg":"none"}'), "names 'alg' twice"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(make, reason):
    with pytest.raises(InvalidToken, match=reason):
        verify(make())


def test_key_rotation_accepts_any_configured_secret():
    old = mint_token("old-secret-old-secret-old-secret-old", "x")
    assert verify(old, [SECRET, "old-secret-old-secret-old-secret-old"]).subject == "x"


def _rsa_pair():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public_pem


def _ec_pair():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public_pem


def test_rs256_and_es256_public_keys():
    from cargobay.tokens import load_public_key

    rsa_private, rsa_public = _rsa_pair()
    ec_private, ec_public = _ec_pair()
    verifier = TokenVerifier([SECRET], public_keys=[load_public_key(rsa_public), load_public_key(ec_public)])
    claims = {"sub": "issuer-user", "access": {"type": "all"}}
    assert verifier.verify(jwt.encode(claims, rsa_private, "RS256")).subject == "issuer-user"
    assert verifier.verify(jwt.encode(claims, ec_private, "ES256")).subject == "issuer-user"
    assert verifier.verify(jwt.encode(claims, SECRET, "HS256")).subject == "issuer-user"


def test_hs256_token_signed_with_the_public_key_is_refused():
    # The HS/RS confusion attack: an attacker signs HS256 with the (public)
    # RSA key as the HMAC secret.
    import base64
    import hashlib
    import hmac
    import json as _json

    from cargobay.tokens import load_public_key

    _, public_pem = _rsa_pair()
    verifier = TokenVerifier([SECRET], public_keys=[load_public_key(public_pem)])

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(_json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(_json.dumps({"sub": "evil", "access": {"type": "all"}}).encode())
    signature = b64(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    forged = (header + b"." + payload + b"." + signature).decode()
    with pytest.raises(InvalidToken):
        verifier.verify(forged)


def test_a_future_nbf_is_refused_beyond_the_leeway_and_iat_is_not_looked_at():
    # As the earlier implementation (jsonwebtoken's defaults) never looked at
    # iat, a token "issued" by a clock ahead of ours is fine.
    now = int(time.time())
    verifier = TokenVerifier([SECRET], leeway=5)
    with pytest.raises(InvalidToken, match="not yet valid"):
        verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "nbf": now + 3600}, SECRET, "HS256"))
    assert verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "iat": now + 3600}, SECRET, "HS256"))
    assert verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "iat": "whenever"}, SECRET, "HS256"))
    # Within the leeway: a little clock skew is fine.
    assert verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "nbf": now + 2}, SECRET, "HS256"))
    assert verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "exp": now - 2}, SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "exp": now - 10}, SECRET, "HS256"))


def test_the_default_leeway_is_the_earlier_implementation_s_minute():
    now = int(time.time())
    verifier = TokenVerifier([SECRET])
    assert verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "exp": now - 45}, SECRET, "HS256"))
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(jwt.encode({"sub": "x", "access": {"type": "all"}, "exp": now - 75}, SECRET, "HS256"))


@pytest.mark.parametrize("claim", ["exp", "nbf"])
def test_a_time_claim_that_is_not_a_number_is_refused(claim):
    for value in (True, "soon", [1], {"at": 1}):
        with pytest.raises(InvalidToken, match=f"claim '{claim}' must be a number"):
            verify(jwt.encode({"sub": "x", "access": {"type": "all"}, claim: value}, SECRET, "HS256"))


def test_issuer_and_audience_checks():
    verifier = TokenVerifier([SECRET], issuer="corp-idp", audience="cargobay")
    good = mint_token(SECRET, "x", issuer="corp-idp", audience="cargobay")
    assert verifier.verify(good).subject == "x"
    with pytest.raises(InvalidToken, match="issuer"):
        verifier.verify(mint_token(SECRET, "x", issuer="other", audience="cargobay"))
    with pytest.raises(InvalidToken, match="audience"):
        verifier.verify(mint_token(SECRET, "x", issuer="corp-idp", audience="other"))
    with pytest.raises(InvalidToken, match="lacks"):
        verifier.verify(mint_token(SECRET, "x"))


def test_remembered_tokens_still_expire():
    verifier = TokenVerifier([SECRET], leeway=0)
    token = jwt.encode({"sub": "x", "access": {"type": "all"}, "exp": int(time.time()) + 1}, SECRET, "HS256")
    assert verifier.verify(token).subject == "x"
    assert verifier.verify(token).subject == "x"  # from memory now
    time.sleep(2.1)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)


@pytest.mark.parametrize("exp", [lambda now: now + 20.7, lambda now: str(int(now) + 20)])
def test_an_exp_that_is_not_an_int_is_kept(exp):
    # PyJWT accepts these; their expiry must still cap what the token is traded for.
    now = time.time()
    value = exp(now)
    token = jwt.encode({"sub": "ci", "exp": value, "access": {"type": "all"}}, SECRET, "HS256")
    assert verify(token).expires_at == int(float(value))


OLD_SECRET = "the-retired-secret-that-was-long-enough-too"


def _traded(verifier, token):
    """The short-lived token and the refresh token /token gives for C{token}."""
    from cargobay.auth import Authenticator

    authenticator = Authenticator(verifier, SECRET, "cargobay", None)
    grant = verifier.verify(token)
    return authenticator.issue(grant, [])["token"], authenticator.refresh_token(grant)


@pytest.mark.parametrize("retired", ["previous secret", "public key"])
def test_what_a_token_was_traded_for_ends_with_the_key_that_verified_it(retired):
    # A refresh token was the presented token's rights re-signed with the
    # current secret: one for a token of a retired secret (or of a public key
    # taken out of the config) went on working, for ever when it had no exp.
    from cargobay.tokens import load_public_key

    if retired == "previous secret":
        before = TokenVerifier([SECRET, OLD_SECRET])
        token = mint_token(OLD_SECRET, "m")
    else:
        private, public = _rsa_pair()
        before = TokenVerifier([SECRET], public_keys=[load_public_key(public)])
        token = jwt.encode({"sub": "m", "access": {"type": "all"}}, private, "RS256")
    after = TokenVerifier([SECRET])
    issued, refresh = _traded(before, token)
    # Traded again, and again: still resting on the retired key.
    _, refresh_again = _traded(before, refresh)
    for each in (issued, refresh, refresh_again):
        assert before.verify(each).subject == "m"
        with pytest.raises(InvalidToken, match="no longer configured"):
            after.verify(each)
    # What the current secret verified lives on as before.
    issued, refresh = _traded(before, mint_token(SECRET, "m"))
    assert after.verify(issued).subject == after.verify(refresh).subject == "m"


def test_only_the_current_secret_s_tokens_may_say_which_key_they_rest_on():
    # A retired secret's holder claiming the current secret as the origin
    # would have bought a token outliving the retirement.
    from cargobay.tokens import ORIGIN_CLAIM

    before = TokenVerifier([SECRET, OLD_SECRET])
    current = before._own.fingerprint
    forged = jwt.encode({"sub": "m", "access": {"type": "all"}, ORIGIN_CLAIM: current}, OLD_SECRET, "HS256")
    _, refresh = _traded(before, forged)
    with pytest.raises(InvalidToken, match="no longer configured"):
        TokenVerifier([SECRET]).verify(refresh)
    # An origin no configured key has: refused at once.
    unknown = mint_token(SECRET, "m", origin="0" * 32)
    with pytest.raises(InvalidToken, match="no longer configured"):
        before.verify(unknown)


def test_a_jti_of_any_kind_is_not_looked_at():
    # The earlier implementation never read it; PyJWT would refuse a number.
    grant = verify(seed_token('{"sub":"ci","exp":null,"jti":12345,"access":{"type":"all"}}', SECRET))
    assert grant.subject == "ci"


@pytest.mark.parametrize("entry", ["team/", "/team", "/team/app/", ""])
def test_a_repository_entry_is_compared_verbatim_as_it_was_there(entry):
    # "team/" granted neither "team" nor "team/app" there (it would take
    # "team//app"), and its tokens never expire: it must not widen here.
    claims = {"sub": "ci", "exp": None, "access": {"type": "repositories", "repos": [entry, "alpine"]}}
    grant = verify(seed_token(json.dumps(claims), SECRET))
    assert not grant.allows("team/app") and not grant.allows("team")
    assert grant.allows("alpine")


def test_cargobay_token_says_a_short_secret_is_short_in_one_line_of_its_own():
    # PyJWT's warning would print its file and source line on stderr.
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cargobay.token_tap", "--secret", "secret", "ci", "alpine"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0
    assert verify(result.stdout.strip(), ("secret",)).repositories == ("alpine",)
    assert result.stderr.splitlines() == [
        "cargobay-token: warning: the secret is 6 bytes; HS256 wants at least 32 random ones"
    ]
