"""
Real clients against the real `twistd -n cargobay` process: Docker Engine
(`docker login` + `docker pull`), containerd (`ctr images pull`), podman and
skopeo, each authenticating with a cargobay JWT the way it does in the field;
refusals of bad, expired, forged and out-of-scope tokens over plain HTTP;
tokens minted by `cargobay-token` against the earlier implementation's claim
format; and the audit log (who pulled what, and never a secret).

The upstream is the token-protected CNCF registry of conftest.py, so every
pull also exercises cargobay's own upstream token negotiation with the
credentials of `[registries.auth]`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import jwt
import pytest

from cargobay.tokens import mint_token
from clients import Containerd, Dockerd, podman
from peers import (
    OCI_MANIFEST,
    REPO_ROOT,
    Registry,
    Twistd,
    build_oci_layout,
    free_port,
    need,
    skopeo,
    skopeo_push,
    wait_until,
)
from proxy import SECRET, Proxy, start_proxy

pytestmark = pytest.mark.integration

#: Every JWT and password handed to the proxy in this module: none may ever
#: appear in a proxy log.
SECRETS_USED: set[str] = set()


def token_for(subject: str, repos: list[str] | None, expires_in: int | None = 3600) -> str:
    token = mint_token(SECRET, subject, repos, expires_in)
    SECRETS_USED.add(token)
    return token


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(upstream_token: Registry, tmp_path_factory) -> dict:
    """
    Two tiny images on the token-protected upstream: `library/alpine` (what
    local `alpine` maps to) and `team/clients-app` (local `mycompany/app`).
    """
    need("skopeo")
    work = tmp_path_factory.mktemp("client-images")
    built = {
        "alpine": build_oci_layout(work / "alpine", "latest", layers=[b"alpine for clients\n" * 50]),
        "app": build_oci_layout(work / "app", "latest", layers=[b"the company's app\n" * 50]),
    }
    skopeo_push(work / "alpine", "latest", f"{upstream_token.host}/library/alpine:latest",
                creds=upstream_token.creds)
    skopeo_push(work / "app", "latest", f"{upstream_token.host}/team/clients-app:latest",
                creds=upstream_token.creds)
    return built


def upstream_entry(upstream: Registry) -> dict:
    return {"id": "hub", "url": upstream.url, "username": upstream.username, "password": upstream.password}


MAPPINGS = [("alpine", "hub", "library/alpine"), ("mycompany/app", "hub", "team/clients-app")]


@pytest.fixture(scope="module")
def proxy(images, upstream_token: Registry, tmp_path_factory):
    assert upstream_token.password is not None
    SECRETS_USED.add(upstream_token.password)
    proxy = start_proxy(tmp_path_factory.mktemp("clients-proxy"), [upstream_entry(upstream_token)], MAPPINGS)
    yield proxy
    proxy.process.stop()


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    daemon = Dockerd(tmp_path_factory.mktemp("dockerd"))
    daemon.start()
    yield daemon
    daemon.stop()


def wait_for_log(proxy: Proxy, pattern: str, timeout: float = 10.0) -> list[str]:
    """The proxy log lines matching ``pattern`` once there is at least one."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proxy.process.log_text().splitlines() if regex.search(line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def errors_of(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


# ---------------------------------------------------------------------------
# Docker Engine
# ---------------------------------------------------------------------------


def test_docker_login_and_pull_then_refused_outside_the_token(dockerd: Dockerd, proxy: Proxy, images):
    everything = token_for("docker-user", ["alpine", "mycompany/app"])
    login = dockerd.login(proxy.host, "anyone", everything)
    assert login.returncode == 0, login.stderr
    assert "Login Succeeded" in login.stdout
    stored = json.loads((dockerd.cli_config / "config.json").read_text())
    assert proxy.host in stored["auths"]

    pulled = dockerd.docker("pull", f"{proxy.host}/alpine:latest")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr + proxy.process.log_text()[-3000:]
    assert f"{proxy.host}/alpine:latest" in dockerd.image_refs()
    image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", f"{proxy.host}/alpine:latest",
                              check=True).stdout.strip()
    assert image_id == images["alpine"]["configs"][0]
    # The daemon traded the login JWT at /token; the subject survives.
    assert wait_for_log(proxy, r"cargobay\.audit.*subject=docker-user .*repository=alpine ")

    # A token for alpine only: login still works (it asks for no repository),
    # mycompany/app is refused and nothing of it lands in the daemon.
    only_alpine = token_for("docker-limited", ["alpine"])
    login = dockerd.login(proxy.host, "someone-else", only_alpine)
    assert login.returncode == 0, login.stderr
    refused = dockerd.docker("pull", f"{proxy.host}/mycompany/app:latest")
    assert refused.returncode != 0
    output = (refused.stdout + refused.stderr).lower()
    assert "denied" in output, output
    assert not any("mycompany/app" in ref for ref in dockerd.image_refs())
    images_out = dockerd.docker("images", "--all", "--format", "{{.ID}} {{.Repository}}", check=True).stdout
    assert images["app"]["configs"][0].split(":")[1][:12] not in images_out


# ---------------------------------------------------------------------------
# containerd, podman, skopeo
# ---------------------------------------------------------------------------


def test_containerd_ctr_pull(containerd: Containerd, proxy: Proxy, images):
    token = token_for("ctr-user", ["alpine"])
    ref = f"{proxy.host}/alpine:latest"
    # (ctr's -u makes containerd POST the OAuth2 password grant to the realm.)
    pulled = containerd.ctr("images", "pull", "--plain-http", "-u", f"user:{token}", ref)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    listed = containerd.ctr("images", "ls", check=True).stdout
    line = next(line for line in listed.splitlines() if line.startswith(ref + " "))
    assert images["alpine"]["manifest"] in line
    assert wait_for_log(proxy, r"cargobay\.audit.*subject=ctr-user .*repository=alpine ")
    refused = containerd.ctr("images", "pull", "--plain-http", "-u", f"user:{token}",
                             f"{proxy.host}/mycompany/app:latest")
    assert refused.returncode != 0
    assert "denied" in (refused.stdout + refused.stderr).lower() or "403" in refused.stderr, refused.stderr
    assert f"{proxy.host}/mycompany/app:latest" not in containerd.ctr("images", "ls", "-q").stdout


def test_podman_pull(proxy: Proxy, images, tmp_path):
    token = token_for("podman-user", ["alpine"])
    store = {"root": tmp_path / "root", "runroot": tmp_path / "runroot"}
    pulled = podman("pull", "--tls-verify=false", "--creds", f"user:{token}",
                    f"{proxy.host}/alpine:latest", **store)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    image_id = pulled.stdout.strip().splitlines()[-1]
    assert "sha256:" + image_id == images["alpine"]["configs"][0]
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", **store, check=True).stdout
    assert f"{proxy.host}/alpine:latest" in listed.split()
    refused = podman("pull", "--tls-verify=false", "--creds", f"user:{token}",
                     f"{proxy.host}/mycompany/app:latest", **store)
    assert refused.returncode != 0
    assert "denied" in refused.stderr.lower() or "unauthorized" in refused.stderr.lower(), refused.stderr


def test_podman_search_lists_the_catalog_a_token_may_pull(proxy: Proxy, tmp_path):
    # GET /v2/_catalog was a 404: podman search (and crane catalog, reg ls)
    # listed nothing.
    token = token_for("podman-search", ["alpine"])
    store = {"root": tmp_path / "root", "runroot": tmp_path / "runroot"}
    login = podman("login", "--tls-verify=false", "-u", "user", "-p", token, proxy.host, **store)
    assert login.returncode == 0, login.stdout + login.stderr
    found = podman("search", "--tls-verify=false", "--format", "{{.Name}}", f"{proxy.host}/", **store)
    assert found.returncode == 0, found.stdout + found.stderr
    assert found.stdout.split() == [f"{proxy.host}/alpine"]
    assert wait_for_log(proxy, r"cargobay\.access.* GET /v2/_catalog.* 200 .*subject=podman-search")


@pytest.mark.parametrize("how", ["creds", "registry-token"])
def test_skopeo_with_basic_and_bearer(proxy: Proxy, images, tmp_path, how):
    token = token_for(f"skopeo-{how}", ["alpine"])
    # --creds: Basic credentials traded at /token; --registry-token: the
    # JWT itself as the Bearer token. (One skopeo run each: every run against
    # plain HTTP costs a 10 s TLS handshake timeout first, see
    # test_tls_probe_on_the_plain_http_port_fails_fast.)
    auth = f"--src-creds=user:{token}" if how == "creds" else f"--src-registry-token={token}"
    skopeo("copy", "--src-tls-verify=false", auth,
           f"docker://{proxy.host}/alpine:latest", f"dir:{tmp_path / 'out'}")
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == images["alpine"]["manifest"]
    for blob in [*images["alpine"]["layers"], *images["alpine"]["configs"]]:
        assert (tmp_path / "out" / blob.split(":")[1]).exists()
    assert wait_for_log(proxy, rf"cargobay\.audit.*subject=skopeo-{how} .*repository=alpine ")


# ---------------------------------------------------------------------------
# refusals, over plain HTTP
# ---------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(claims: dict, key: bytes | None, alg: str = "HS256") -> str:
    """A JWT made by hand (pyjwt refuses to make the bad ones)."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = b"" if key is None else hmac.new(key, signing_input, hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(signature)}"
    SECRETS_USED.add(token)
    return token


ALPINE_CLAIMS = {"sub": "mallory", "access": {"type": "repositories", "repos": ["alpine"]}}


def assert_unauthorized(proxy: Proxy, status: int, headers: dict, body: bytes, error: str | None) -> None:
    assert status == 401, body
    assert errors_of(body) == ["UNAUTHORIZED"]
    challenge = headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="http://{proxy.host}/token"' in challenge
    assert 'service="cargobay"' in challenge
    if error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge


def assert_token_endpoint_refuses(status: int, headers: dict, body: bytes) -> None:
    """/token asks for what it takes: Basic credentials (a user's JWT as the password)."""
    assert status == 401, body
    assert errors_of(body) == ["UNAUTHORIZED"]
    assert headers["www-authenticate"] == 'Basic realm="cargobay"'


def test_no_credentials_is_challenged(proxy: Proxy):
    for path in ("/v2/", "/v2/alpine/manifests/latest"):
        status, headers, body = proxy.request(path, token=None)
        assert_unauthorized(proxy, status, headers, body, None)
    status, headers, _ = proxy.request("/v2/alpine/manifests/latest", token=None)
    assert 'scope="repository:alpine:pull"' in headers["www-authenticate"]
    status, headers, body = proxy.request("/token?scope=repository:alpine:pull", token=None)
    assert_token_endpoint_refuses(status, headers, body)


def bad_tokens() -> dict[str, str]:
    now = int(time.time())
    return {
        "wrong-secret": forge({**ALPINE_CLAIMS, "exp": now + 3600}, b"not-the-secret-not-the-secret!!"),
        "expired": forge({**ALPINE_CLAIMS, "exp": now - 3600}, SECRET.encode()),
        "alg-none": forge({**ALPINE_CLAIMS, "exp": now + 3600}, None, alg="none"),
        "not-yet-valid": forge({**ALPINE_CLAIMS, "nbf": now + 3600, "exp": now + 7200}, SECRET.encode()),
        "garbage": "not.a.jwt",
        "no-access-claim": forge({"sub": "mallory", "exp": now + 3600}, SECRET.encode()),
    }


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
@pytest.mark.parametrize("kind", list(bad_tokens()))
def test_bad_tokens_are_refused(proxy: Proxy, kind, scheme):
    token = bad_tokens()[kind]
    header = f"Bearer {token}" if scheme == "bearer" else basic("mallory", token)
    for path in ("/v2/", "/v2/alpine/tags/list", "/v2/alpine/manifests/latest"):
        status, headers, body = proxy.request(path, token=None, headers={"Authorization": header})
        assert_unauthorized(proxy, status, headers, body, "invalid_token")
    # Nor does /token trade it for anything.
    status, headers, body = proxy.request("/token?scope=repository:alpine:pull", token=None,
                                          headers={"Authorization": basic("mallory", token)})
    assert_token_endpoint_refuses(status, headers, body)
    status, headers, body = post_token(proxy, {"grant_type": "password", "username": "mallory",
                                               "password": token, "scope": "repository:alpine:pull",
                                               "service": "cargobay", "client_id": "test"})
    assert_token_endpoint_refuses(status, headers, body)


def write_keyed_config(path: Path, port: int, cache: Path, upstream: Registry, public_key_files: list[Path]) -> Path:
    """
    tests/proxy.py's write_config, with [auth] public_key_files (its
    ``extra`` lands in the [cache] table, where auth keys cannot go).
    """
    lines = [
        "[server]",
        'bind_address = "127.0.0.1"',
        f"port = {port}",
        "[auth]",
        f'jwt_secret = "{SECRET}"',
        "public_key_files = [" + ", ".join(json.dumps(str(p)) for p in public_key_files) + "]",
        "[cache]",
        f'directory = "{cache}"',
        "max_size_bytes = 20000000000",
        "max_age_seconds = 86400",
    ]
    registry = upstream_entry(upstream)
    lines += ["[[registries]]", f'id = "{registry["id"]}"', f'url = "{registry["url"]}"',
              "[registries.auth]", f'username = "{registry["username"]}"',
              f'password = "{registry["password"]}"']
    for name, registry_id, upstream_name in MAPPINGS:
        lines += ["[[repositories]]", f'name = "{name}"', f'registry_id = "{registry_id}"',
                  f'upstream_name = "{upstream_name}"']
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path_factory.mktemp("idp") / "idp-public.pem"
    path.write_bytes(public_pem)
    return {"public_pem": public_pem, "private_pem": private_pem, "path": path}


@pytest.fixture(scope="module")
def keyed_proxy(images, upstream_token: Registry, rsa_key, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed-proxy")
    port = free_port()
    config = write_keyed_config(tmp / "config.toml", port, tmp / "cache", upstream_token, [rsa_key["path"]])
    process = Twistd(config_path=config, log_path=tmp / "cargobay.log").start()
    try:
        process.wait_listening(port)
    except BaseException:
        process.stop()
        raise
    yield Proxy(process, port, tmp / "cache")
    process.stop()


def test_hs256_signed_with_the_public_key_is_refused(keyed_proxy: Proxy, rsa_key):
    now = int(time.time())
    claims = {**ALPINE_CLAIMS, "exp": now + 3600}
    # The identity provider's real RS256 token is accepted: the key is loaded...
    genuine = jwt.encode(claims, rsa_key["private_pem"], algorithm="RS256")
    SECRETS_USED.add(genuine)
    status, _, body = keyed_proxy.request("/v2/alpine/tags/list", token=genuine)
    assert status == 200, body
    # ...and the same claims as HS256 with the public key PEM as the HMAC secret are not.
    for key in (rsa_key["public_pem"], rsa_key["public_pem"].strip()):
        confused = forge(claims, key)
        for path in ("/v2/", "/v2/alpine/tags/list"):
            status, headers, body = keyed_proxy.request(path, token=confused)
            assert_unauthorized(keyed_proxy, status, headers, body, "invalid_token")
            status, headers, body = keyed_proxy.request(
                path, token=None, headers={"Authorization": basic("mallory", confused)}
            )
            assert_unauthorized(keyed_proxy, status, headers, body, "invalid_token")
    # The shared secret still works beside the public key.
    status, _, body = keyed_proxy.request("/v2/alpine/tags/list", token=token_for("keyed", ["alpine"]))
    assert status == 200, body
    assert_no_secret_in_log(keyed_proxy)


def get_token(proxy: Proxy, jwt_: str, scopes: list[str]) -> dict:
    query = urllib.parse.urlencode([("service", "cargobay"), *[("scope", s) for s in scopes]])
    status, headers, body = proxy.request(f"/token?{query}", token=None,
                                          headers={"Authorization": basic("anyone", jwt_)})
    assert status == 200, body
    assert headers["cache-control"] == "no-store"
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"]
    assert answer["expires_in"] > 0 and answer["issued_at"]
    SECRETS_USED.add(answer["token"])
    return answer


def post_token(proxy: Proxy, form: dict) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("POST", "/token", body=urllib.parse.urlencode(form),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def assert_denied(status: int, headers: dict, body: bytes) -> None:
    assert status == 403, body
    assert errors_of(body) == ["DENIED"]


def test_scope_outside_the_claim_is_not_granted(proxy: Proxy):
    only_alpine = token_for("scoped", ["alpine"])
    answer = get_token(proxy, only_alpine, ["repository:mycompany/app:pull"])
    issued = answer["token"]
    claims = jwt.decode(issued, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "scoped"
    assert claims["access"] == {"type": "repositories", "repos": []}
    status, headers, body = proxy.request("/v2/mycompany/app/tags/list", token=issued)
    assert_denied(status, headers, body)
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert 'scope="repository:mycompany/app:pull"' in headers["www-authenticate"]
    status, headers, body = proxy.request("/v2/mycompany/app/manifests/latest", token=issued)
    assert_denied(status, headers, body)

    # Both asked for: only the one the JWT allows is granted.
    both = get_token(proxy, only_alpine, ["repository:alpine:pull", "repository:mycompany/app:pull"])["token"]
    assert jwt.decode(both, SECRET, algorithms=["HS256"])["access"]["repos"] == ["alpine"]
    status, _, body = proxy.request("/v2/alpine/tags/list", token=both)
    assert status == 200, body
    assert_denied(*proxy.request("/v2/mycompany/app/tags/list", token=both))
    # Prefix look-alikes do not sneak in.
    lookalike = get_token(proxy, only_alpine, ["repository:alpine2:pull", "repository:alpine/../mycompany/app:pull"])
    assert jwt.decode(lookalike["token"], SECRET, algorithms=["HS256"])["access"]["repos"] == []

    # The OAuth2 POST form the same way, and its refresh token.
    status, _, body = post_token(proxy, {"grant_type": "password", "username": "anyone", "password": only_alpine,
                                         "scope": "repository:alpine:pull repository:mycompany/app:pull",
                                         "service": "cargobay", "client_id": "tests"})
    assert status == 200, body
    answer = json.loads(body)
    SECRETS_USED.update([answer["token"], answer["refresh_token"]])
    assert jwt.decode(answer["access_token"], SECRET, algorithms=["HS256"])["access"]["repos"] == ["alpine"]
    status, _, body = post_token(proxy, {"grant_type": "refresh_token", "refresh_token": answer["refresh_token"],
                                         "scope": "repository:mycompany/app:pull", "service": "cargobay"})
    assert status == 200, body
    refreshed = json.loads(body)["access_token"]
    SECRETS_USED.add(refreshed)
    assert_denied(*proxy.request("/v2/mycompany/app/tags/list", token=refreshed))


def test_a_token_in_its_leeway_is_not_traded_for_one_that_outlives_it(proxy: Proxy):
    # Past its exp, within the minute of leeway: traded for a token expiring
    # a second later with a leeway of its own, then that one for the next,
    # a one-second token lived for as long as it was traded every minute.
    now = int(time.time())
    # Expired 55 s ago: 5 s of leeway left.
    token = mint_token(SECRET, "brief", ["alpine"], 1, now=now - 56)
    SECRETS_USED.add(token)
    query = urllib.parse.urlencode([("service", "cargobay"), ("scope", "repository:alpine:pull"),
                                    ("offline_token", "true"), ("client_id", "docker")])
    status, _, body = proxy.request(f"/token?{query}", token=None, headers={"Authorization": basic("brief", token)})
    assert status == 200, body
    got = json.loads(body)
    status, _, body = post_token(proxy, {"grant_type": "refresh_token", "refresh_token": got["refresh_token"],
                                         "scope": "repository:alpine:pull", "service": "cargobay"})
    assert status == 200, body
    posted = json.loads(body)
    for answer in (got, posted):
        SECRETS_USED.update([answer["token"], answer["refresh_token"]])
        assert answer["expires_in"] == 0
        for key in ("token", "refresh_token"):
            claims = jwt.decode(answer[key], SECRET, algorithms=["HS256"], options={"verify_exp": False})
            assert claims["exp"] <= now - 55, key
    # What it was traded for runs out with it, at the end of the original's
    # leeway.
    status, headers, body = proxy.request("/v2/alpine/tags/list", token=posted["token"])
    assert status == 200, body
    time.sleep(max(0.0, now + 6 - time.time()))
    for traded in (got["token"], got["refresh_token"], posted["token"], posted["refresh_token"]):
        status, headers, body = proxy.request("/v2/alpine/tags/list", token=traded)
        assert status == 401, body


def test_a_retired_secret_s_refresh_tokens_end_with_it(tmp_path):
    # The refresh token for a JWT of a previous secret was that JWT's rights
    # signed with the current secret: once the operator took the previous
    # secret out and reloaded, the JWT was refused and its refresh token
    # went on working, for ever when the JWT had no expiry.
    old = "a-previous-secret-long-enough-for-hs256-too"
    proxy = start_proxy(tmp_path, [{"id": "up", "url": "http://127.0.0.1:9"}], [("alpine", "up", "library/alpine")])
    config = tmp_path / "config.toml"
    rotating = config.read_text()
    config.write_text(rotating.replace(f'jwt_secret = "{SECRET}"\n',
                                       f'jwt_secret = "{SECRET}"\nprevious_jwt_secrets = ["{old}"]\n', 1))
    try:
        os.kill(proxy.process.pid, signal.SIGHUP)
        assert wait_until(lambda: proxy.process.log_text().count("reloaded") >= 1, timeout=10)
        jwt_old, jwt_current = mint_token(old, "m", None), mint_token(SECRET, "m", None)
        SECRETS_USED.update([jwt_old, jwt_current])
        refresh = {}
        for label, token in (("old", jwt_old), ("current", jwt_current)):
            status, _, body = post_token(proxy, {"grant_type": "password", "username": "m", "password": token,
                                                 "scope": "repository:alpine:pull", "service": "cargobay"})
            assert status == 200, body
            refresh[label] = json.loads(body)["refresh_token"]
            SECRETS_USED.add(refresh[label])
            assert proxy.request("/v2/", token=refresh[label])[0] == 200
        config.write_text(rotating)
        os.kill(proxy.process.pid, signal.SIGHUP)
        assert wait_until(lambda: proxy.process.log_text().count("reloaded") >= 2, timeout=10)
        for token in (jwt_old, refresh["old"]):
            status, headers, body = proxy.request("/v2/", token=token)
            assert status == 401, body
        assert b"no longer configured" in proxy.request("/v2/", token=refresh["old"])[2]
        assert proxy.request("/v2/", token=refresh["current"])[0] == 200
    finally:
        proxy.process.stop()


def test_every_scope_field_of_a_token_post_counts(proxy: Proxy):
    anything = token_for("poster", None)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        form = urllib.parse.urlencode([("grant_type", "password"), ("username", "u"), ("password", anything),
                                       ("scope", "repository:alpine:pull"),
                                       ("scope", "repository:mycompany/app:pull"), ("service", "cargobay")])
        conn.request("POST", "/token", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    SECRETS_USED.update([answer["token"], answer["refresh_token"]])
    repos = jwt.decode(answer["token"], SECRET, algorithms=["HS256"])["access"]["repos"]
    assert repos == ["alpine", "mycompany/app"]


@pytest.mark.parametrize("path", ["/token", "/healthz", "/readyz", "/v2/", "/v2/alpine/tags/list"])
def test_methods_are_case_sensitive(proxy: Proxy, path: str):
    # Werkzeug's routing took "get" for GET on the routes outside /v2/.
    status, headers, body = proxy.request(
        path, token=None, method="get", headers={"Authorization": basic("u", token_for("lower", None))}
    )
    assert status == 405, body
    assert errors_of(body) == ["UNSUPPORTED"]
    assert "GET" in headers["allow"]


def test_push_scope_is_never_granted(proxy: Proxy):
    anything = token_for("pusher", None)
    issued = get_token(proxy, anything, ["repository:alpine:push,pull"])["token"]
    status, _, body = proxy.request("/v2/alpine/tags/list", token=issued)
    assert status == 200, body
    status, _, body = proxy.request("/v2/alpine/manifests/latest", token=issued,
                                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200, body
    for method, path in [("PUT", "/v2/alpine/manifests/latest"), ("POST", "/v2/alpine/blobs/uploads/"),
                         ("DELETE", "/v2/alpine/manifests/latest")]:
        assert_denied(*proxy.request(path, token=issued, method=method))
    # push alone grants nothing at all.
    push_only = get_token(proxy, anything, ["repository:alpine:push"])["token"]
    assert jwt.decode(push_only, SECRET, algorithms=["HS256"])["access"] == {"type": "repositories", "repos": []}
    assert_denied(*proxy.request("/v2/alpine/tags/list", token=push_only))


# ---------------------------------------------------------------------------
# tokens of the earlier implementation's format
# ---------------------------------------------------------------------------


def cargobay_token(*args: str) -> str:
    script = REPO_ROOT / ".venv" / "bin" / "cargobay-token"
    if not script.exists():
        pytest.skip("cargobay-token console script not installed in .venv")
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert "\n" not in token
    SECRETS_USED.add(token)
    return token


def test_cargobay_token_claims_are_the_earlier_format(proxy: Proxy):
    token = cargobay_token("--secret", SECRET, "ci-runner", "alpine,mycompany/app")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert claims["sub"] == "ci-runner"
    assert claims["access"] == {"type": "repositories", "repos": ["alpine", "mycompany/app"]}
    assert set(claims) <= {"sub", "access", "iat"}
    status, _, body = proxy.request("/v2/mycompany/app/tags/list", token=token)
    assert status == 200, body

    everything = cargobay_token("--secret", SECRET, "--expires-in", "120", "admin")
    claims = jwt.decode(everything, SECRET, algorithms=["HS256"])
    assert claims["access"] == {"type": "all"} and claims["sub"] == "admin"
    assert 0 < claims["exp"] - time.time() <= 121
    assert set(claims) <= {"sub", "access", "iat", "exp"}


def test_token_minted_independently_with_pyjwt_is_accepted(proxy: Proxy, images):
    # Exactly what the earlier implementation's tooling produced: no iat, no
    # exp, nothing but sub and access.
    legacy = jwt.encode({"sub": "legacy-ci", "access": {"type": "repositories", "repos": ["mycompany"]}},
                        SECRET, algorithm="HS256")
    SECRETS_USED.add(legacy)
    status, _, body = proxy.request("/v2/mycompany/app/tags/list", token=legacy)
    assert status == 200, body
    assert json.loads(body)["tags"] == ["latest"]
    assert_denied(*proxy.request("/v2/alpine/tags/list", token=legacy))
    # As Basic credentials too, and through the token endpoint.
    status, headers, body = proxy.request(
        "/v2/mycompany/app/manifests/latest", token=None,
        headers={"Authorization": basic("legacy", legacy), "Accept": OCI_MANIFEST},
    )
    assert status == 200, body
    assert headers["docker-content-digest"] == images["app"]["manifest"]
    issued = get_token(proxy, legacy, ["repository:mycompany/app:pull"])["token"]
    layer = images["app"]["layers"][0]
    status, _, body = proxy.request(f"/v2/mycompany/app/blobs/{layer}", token=issued)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
    with_all = jwt.encode({"sub": "legacy-admin", "exp": int(time.time()) + 600, "access": {"type": "all"}},
                          SECRET, algorithm="HS256")
    SECRETS_USED.add(with_all)
    status, _, body = proxy.request("/v2/alpine/tags/list", token=with_all)
    assert status == 200, body


# ---------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------


def assert_no_secret_in_log(proxy: Proxy) -> None:
    log = proxy.process.log_text()
    assert log, "empty proxy log"
    for secret in SECRETS_USED:
        assert secret not in log, "a secret is in the proxy log"
        if secret.count(".") == 2:
            # Not even the signature, nor the claims, alone.
            _, payload, signature = secret.split(".")
            if len(signature) >= 20:
                assert signature not in log, "a JWT signature is in the proxy log"
            if len(payload) >= 20:
                assert payload not in log, "a JWT payload is in the proxy log"
        assert base64.b64encode(f"user:{secret}".encode()).decode() not in log


def test_audit_lines_and_no_secrets_in_the_log(containerd: Containerd, proxy: Proxy, images,
                                               upstream_token: Registry):
    token = token_for("auditor", ["mycompany/app"])
    ref = f"{proxy.host}/mycompany/app:latest"
    pulled = containerd.ctr("images", "pull", "--plain-http", "-u", f"auditor:{token}", ref)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    blobs = {digest: size for digest, size in zip(images["app"]["layers"], images["app"]["layer_blob_sizes"], strict=True)}
    config = images["app"]["configs"][0]
    expected = {*blobs, config, images["app"]["manifest"]}
    deadline = time.monotonic() + 10
    while True:
        lines = wait_for_log(proxy, r"cargobay\.audit.*subject=auditor ")
        fields = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines]
        if expected <= {f.get("reference") for f in fields} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert lines, proxy.process.log_text()[-3000:]
    for f in fields:
        assert {"subject", "repository", "upstream", "reference", "status", "bytes", "cache"} <= set(f), f
        assert f["subject"] == "auditor"
        assert f["repository"] == "mycompany/app"
        assert f["upstream"] == "hub/team/clients-app"
        assert f["status"] == "200"
        assert int(f["bytes"]) >= 0 and f["cache"]
    references = {f["reference"] for f in fields}
    assert expected <= references, references
    assert "latest" in references  # containerd resolves the tag first
    for digest, size in blobs.items():
        blob_lines = [f for f in fields if f["reference"] == digest]
        assert any(int(f["bytes"]) == size for f in blob_lines), blob_lines
        assert all(f["cache"] in ("hit", "miss") for f in blob_lines), blob_lines
    assert upstream_token.password is not None
    assert upstream_token.password not in proxy.process.log_text()
    assert_no_secret_in_log(proxy)


# ---------------------------------------------------------------------------
# what docker, podman and skopeo do first against a plain-HTTP registry
# ---------------------------------------------------------------------------


def tls_probe(port: int, timeout: float) -> tuple[str, float]:
    """Start a TLS handshake with 127.0.0.1:port; (outcome, seconds it took)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            context.wrap_socket(sock, server_hostname="127.0.0.1").close()
            outcome = "handshake completed"
        except TimeoutError:
            outcome = "timed out"
        except (ssl.SSLError, OSError) as e:
            outcome = f"failed: {type(e).__name__}"
    return outcome, time.monotonic() - started


def test_tls_probe_on_the_plain_http_port_fails_fast(proxy: Proxy, upstream_token: Registry):
    """
    docker, podman and skopeo (insecure registries, --tls-verify=false) try
    HTTPS first and fall back to HTTP when the handshake fails. The CNCF
    registry answers a ClientHello on its plain-HTTP port with an HTTP 400 at
    once, so the fallback is immediate; a server that just waits makes every
    login, pull and inspect wait for Go's 10 s TLS handshake timeout first.
    """
    # A generous timeout only guards against a hang: the assertion is that
    # the handshake is refused (an SSL error), not that it timed out.
    outcome, _ = tls_probe(upstream_token.port, timeout=30)
    assert outcome.startswith("failed"), outcome
    outcome, _ = tls_probe(proxy.port, timeout=30)
    assert outcome.startswith("failed"), f"cargobay's plain-HTTP port {outcome} on a TLS ClientHello"
