"""
Upstream trust boundaries against real peers and the real `twistd -n
cargobay` process:

- TLS: a CNCF registry serving HTTPS with a certificate from a test CA; pulls
  work with ``ca_file``; an untrusted certificate or one for another host
  gives a prompt 502 naming the registry and caches nothing;
- redirects: a CNCF registry on S3 storage (SeaweedFS) redirects blob GETs to
  presigned URLs, through a capturing forwarder that shows cargobay never
  carries the registry's credentials or tokens to that other host;
- secrets: no client JWT, upstream password, upstream bearer token or
  jwt_secret in the proxy's log or in any response a client sees;
- no open proxy: names and ``?ns=`` values that map to no configured
  registry reach no other registry.

Refused connections, upstreams dying mid-blob and stalls are covered in
test_integration_cache.py and test_integration_core.py.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from s3 import CapturingForwarder, S3Registry, SeaweedS3
from tls import TestCA, TLSRegistry

from cargobay.tokens import mint_token
from peers import (
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2S2,
    OCI_INDEX,
    OCI_MANIFEST,
    BlackHole,
    OutboundProxyServer,
    Registry,
    TLSFront,
    TokenServer,
    Twistd,
    build_oci_layout,
    cargobay_command,
    free_port,
    need,
    sha256_digest,
    skopeo_pull,
    skopeo_push,
    wait_until,
)
from proxy import ALL, SECRET, Proxy

pytestmark = pytest.mark.integration

ACCEPT_ALL = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_V2S2, DOCKER_MANIFEST_LIST])
UPSTREAM_USER = "faults-puller"
#: Distinctive, so that finding it anywhere means it leaked.
UPSTREAM_PASSWORD = "upstream-pw-" + os.urandom(8).hex()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def write_proxy_config(
    path: Path, port: int, cache: Path, registries: list[dict], repositories: list[tuple[str, str, str]]
) -> Path:
    """
    Like proxy.write_config, and with every registry key these tests need
    (``ca_file``); strings are quoted as JSON, which TOML reads alike.
    """
    q = json.dumps
    lines = [
        "[server]", 'bind_address = "127.0.0.1"', f"port = {port}",
        "[auth]", f"jwt_secret = {q(SECRET)}",
        "[cache]", f"directory = {q(str(cache))}", "max_size_bytes = 2000000000",
        "max_age_seconds = 86400",
    ]
    for registry in registries:
        lines.append("[[registries]]")
        for key in ("id", "url", "ca_file"):
            if key in registry:
                lines.append(f"{key} = {q(str(registry[key]))}")
        for key in ("read_timeout_seconds", "connect_timeout_seconds"):
            if key in registry:
                lines.append(f"{key} = {registry[key]}")
        if registry.get("username"):
            lines += ["[registries.auth]", f"username = {q(registry['username'])}",
                      f"password = {q(registry['password'])}"]
    for name, registry_id, upstream_name in repositories:
        lines += ["[[repositories]]", f"name = {q(name)}", f"registry_id = {q(registry_id)}",
                  f"upstream_name = {q(upstream_name)}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def start_proxy(
    tmp: Path, registries: list[dict], repositories: list[tuple[str, str, str]],
    env: dict[str, str] | None = None,
) -> Proxy:
    port = free_port()
    cache = tmp / "cache"
    config = write_proxy_config(tmp / "config.toml", port, cache, registries, repositories)
    process = Twistd(config_path=config, log_path=tmp / "cargobay.log", env=env).start()
    process.wait_listening(port)
    return Proxy(process, port, cache)


def cache_files(proxy: Proxy) -> list[Path]:
    """Every file the proxy keeps: blobs, manifests, tag resolutions, downloads in progress."""
    found: list[Path] = []
    for part in ("blobs", "manifests", "tags", "tmp"):
        root = proxy.cache / part
        if root.exists():
            found += [p for p in root.rglob("*") if p.is_file()]
    return found


def oci_error(body: bytes) -> dict:
    errors = json.loads(body)["errors"]
    assert len(errors) == 1, errors
    return errors[0]


def pull_http(proxy: Proxy, name: str, reference: str, token: str = ALL) -> dict[str, bytes]:
    """
    GET a manifest and every blob it names through the proxy, checking each
    digest; ``{digest: bytes}``, the manifest included.
    """
    status, headers, body = proxy.request(f"/v2/{name}/manifests/{reference}", token,
                                          headers={"Accept": ACCEPT_ALL})
    assert status == 200, (status, body[:500])
    digest = sha256_digest(body)
    assert headers["docker-content-digest"] == digest
    got = {digest: body}
    manifest = json.loads(body)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        status, headers, blob = proxy.request(f"/v2/{name}/blobs/{descriptor['digest']}", token)
        assert status == 200, (status, blob[:500])
        assert sha256_digest(blob) == descriptor["digest"]
        assert len(blob) == descriptor["size"]
        got[descriptor["digest"]] = blob
    return got


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def token_flow_pull(port: int, name: str, reference: str, user: str, password: str) -> None:
    """
    Pull the way Docker clients do: 401 with a Bearer challenge, a token from
    its realm for Basic credentials, then the manifest and blobs with that
    token; every digest checked.
    """
    status, headers, _ = _get(port, f"/v2/{name}/manifests/{reference}", {"Accept": ACCEPT_ALL})
    assert status == 401, status
    challenge = headers["www-authenticate"]
    assert challenge.lower().startswith("bearer "), challenge
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = urllib.parse.urlsplit(params["realm"])
    query = urllib.parse.urlencode({"service": params.get("service", ""),
                                    "scope": f"repository:{name}:pull"})
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    status, _, body = _get(port, f"{realm.path}?{query}", {"Authorization": basic})
    assert status == 200, body
    bearer = {"Authorization": "Bearer " + json.loads(body)["token"]}
    status, headers, manifest = _get(port, f"/v2/{name}/manifests/{reference}",
                                     {**bearer, "Accept": ACCEPT_ALL})
    assert status == 200 and headers["docker-content-digest"] == sha256_digest(manifest)
    document = json.loads(manifest)
    for descriptor in [document["config"], *document["layers"]]:
        status, _, blob = _get(port, f"/v2/{name}/blobs/{descriptor['digest']}", bearer)
        assert status == 200 and sha256_digest(blob) == descriptor["digest"]


class RecordingTokenServer(TokenServer):
    """A TokenServer that remembers every token it issued."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.issued: list[str] = []
        self._issued_lock = threading.Lock()

    def issue(self, subject, grants, expires_in=None) -> str:
        token = super().issue(subject, grants, expires_in)
        with self._issued_lock:
            self.issued.append(token)
        return token


def secret_forms(secret: str) -> list[str]:
    """A secret and, for a JWT, its signature alone (a cut-off token still leaks it)."""
    forms = [secret]
    if secret.count(".") == 2:
        forms.append(secret.rsplit(".", 1)[1])
    return forms


def basic_credentials(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# ---------------------------------------------------------------------------
# 1. TLS upstreams
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("tls-ca"))


@pytest.fixture(scope="module")
def tls_upstreams(ca, tmp_path_factory):
    """
    Two HTTPS registries holding the same image: ``good`` with a certificate
    for IP:127.0.0.1 and DNS:localhost, ``mismatch`` with one for
    otherhost.example only (both from ``ca``).
    """
    need("skopeo")
    work = tmp_path_factory.mktemp("tls-upstreams")
    good = TLSRegistry(work / "good", ca, ca.issue("good", ["localhost"], ["127.0.0.1"]))
    mismatch = TLSRegistry(work / "mismatch", ca, ca.issue("mismatch", ["otherhost.example"]))
    try:
        good.start()
        mismatch.start()
        built = build_oci_layout(work / "img", "latest", layer_sizes=[3_000_000, 200_000])
        for registry in (good, mismatch):
            skopeo_push(work / "img", "latest", f"{registry.host}/library/secure:latest")
        yield {"good": good, "mismatch": mismatch, "image": built, "layout": work / "img"}
    finally:
        good.stop()
        mismatch.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_upstream_with_ca_file_pulls(ca, tls_upstreams, tmp_path, host):
    good: TLSRegistry = tls_upstreams["good"]
    url = f"https://{host}:{good.port}"
    proxy = start_proxy(
        tmp_path, [{"id": "tls-good", "url": url, "ca_file": ca.cert_path}],
        [("secure", "tls-good", "library/secure")],
    )
    try:
        image = tls_upstreams["image"]
        blob_gets = good.count_requests("GET", "/library/secure/blobs/")
        got = pull_http(proxy, "secure", "latest")
        assert set(got) == {image["manifest"], *image["configs"], *image["layers"]}
        for digest, data in got.items():
            assert data == layout_blob(tls_upstreams["layout"], digest)
        # Over TLS from the registry itself (config and two layers).
        assert good.wait_requests("GET", "/library/secure/blobs/", blob_gets + 3) == blob_gets + 3
        # The second time from the cache.
        assert pull_http(proxy, "secure", image["manifest"]) == got
    finally:
        proxy.process.stop()


def test_a_token_service_of_its_own_host_is_trusted_with_the_registry_s_ca_file(ca, tmp_path):
    """
    A private registry whose token service has a host name of its own
    (GitLab's, Keycloak's), signed by the same CA: the ca_file was trusted
    for the registry's host only, and every pull was a 502 ("failed TLS
    verification (token service at localhost:...)").  A token service that
    CA did not sign is still refused.
    """
    need("skopeo")
    other_ca = TestCA(tmp_path / "other-ca")
    for signer, works in ((ca, True), (other_ca, False)):
        served = signer.issue(f"tokens-{works}", ["localhost"])
        tokens = TokenServer(tmp_path / f"tokens-{works}", {"puller": "pulling-secret"},
                             tls=(served.cert_path, served.key_path), host="localhost")
        registry = Registry(tmp_path / f"registry-{works}", "token", token_server=tokens,
                            username="puller", password="pulling-secret")
        tokens.start()
        proxy = None
        try:
            registry.start()
            layout = build_oci_layout(tmp_path / f"img-{works}", "v1", layer_sizes=[100_000])
            # (skopeo's --dest-tls-verify=false covers its token requests too.)
            skopeo_push(tmp_path / f"img-{works}", "v1", f"{registry.host}/team/app:v1", creds=registry.creds)
            asked = len(tokens.requests)
            proxy = start_proxy(
                tmp_path / f"proxy-{works}",
                [{"id": "corp", "url": registry.url, "ca_file": ca.cert_path,
                  "username": "puller", "password": "pulling-secret"}],
                [("app", "corp", "team/app")],
            )
            status, _, body = proxy.request("/v2/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
            if works:
                assert status == 200, body
                assert pull_http(proxy, "app", "v1").keys() == {layout["manifest"], *layout["configs"], *layout["layers"]}
            else:
                assert status == 502 and "failed TLS verification (token service at localhost" in body.decode(), body
            assert len(tokens.requests) - asked == (1 if works else 0)
        finally:
            if proxy is not None:
                proxy.process.stop()
            registry.stop()
            tokens.stop()


def test_credentials_the_upstream_refuses_are_warned_of_and_counted(upstream_token, tmp_path):
    # The client's 403 was all there was: the access line read as a client's
    # own problem, with nothing in the log or the metrics for the operator.
    proxy = start_proxy(
        tmp_path,
        [{"id": "corp", "url": upstream_token.url, "username": upstream_token.username, "password": "not-the-password"}],
        [("app", "corp", "library/alpine")],
    )
    try:
        for _ in range(2):
            status, _, body = proxy.request("/v2/app/manifests/latest", headers={"Accept": OCI_MANIFEST})
            assert status == 403 and b"refused cargobay's credentials (token service answered 401)" in body, body
        said = "upstream corp refused cargobay's credentials (token service answered 401)"
        assert wait_until(lambda: said in proxy.process.log_text(), timeout=10)
        assert proxy.process.log_text().count(said) == 1  # (once a minute)
        assert "not-the-password" not in proxy.process.log_text()
        _, _, metrics = proxy.request("/metrics")
        assert 'cargobay_upstream_errors_total{registry="corp",kind="auth"} 2' in metrics.decode()
    finally:
        proxy.process.stop()


@pytest.mark.parametrize("case", ["untrusted", "mismatch"])
def test_tls_failures_are_prompt_502s_and_cache_nothing(ca, tls_upstreams, tmp_path, case):
    """
    ``untrusted``: no ca_file, and the system's trust store knows nothing of
    the test CA. ``mismatch``: ca_file trusts the CA, but the certificate
    names otherhost.example while the URL says 127.0.0.1.
    """
    registry: TLSRegistry = tls_upstreams["good" if case == "untrusted" else "mismatch"]
    registry_id = f"tls-{case}"
    entry = {"id": registry_id, "url": registry.url}
    if case == "mismatch":
        entry["ca_file"] = ca.cert_path
    proxy = start_proxy(tmp_path, [entry], [("secure", registry_id, "library/secure")])
    image = tls_upstreams["image"]
    try:
        requests_before = len(registry.access_log())
        messages = []
        for path in (
            "/v2/secure/manifests/latest",
            f"/v2/secure/manifests/{image['manifest']}",
            f"/v2/secure/blobs/{image['layers'][0]}",
            "/v2/secure/tags/list",
        ):
            started = time.monotonic()
            status, headers, body = proxy.request(path, headers={"Accept": ACCEPT_ALL})
            elapsed = time.monotonic() - started
            assert status == 502, (path, status, body[:500])
            assert elapsed < 5.0, (path, elapsed)
            assert headers["content-type"].startswith("application/json")
            error = oci_error(body)
            assert error["code"] == "UNAVAILABLE", error
            assert registry_id in error["message"], error
            messages.append(error["message"])
        # HEAD: the same status, no body.
        status, _, body = proxy.request(f"/v2/secure/blobs/{image['layers'][0]}", method="HEAD")
        assert status == 502 and body == b""
        assert cache_files(proxy) == []
        # The handshake failed: no HTTP request ever reached the registry.
        time.sleep(0.3)
        assert registry.access_log()[requests_before:] == []
        assert "Traceback" not in proxy.process.log_text()
        # Last, so that everything above is known to hold: the message says why.
        for message in messages:
            assert "failed TLS verification" in message, messages
    finally:
        proxy.process.stop()


# ---------------------------------------------------------------------------
# 2. redirects to another host: credentials stay at home
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    s3 = SeaweedS3(tmp_path_factory.mktemp("weed"))
    try:
        s3.start()
        s3.create_bucket("registries")
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def s3_forwarder(weed):
    """Between everyone and SeaweedFS: presigned URLs name this forwarder."""
    forwarder = CapturingForwarder(weed.port).start()
    yield forwarder
    forwarder.stop()


@pytest.fixture(scope="module")
def s3_upstreams(weed, s3_forwarder, tmp_path_factory):
    """
    Two registries on S3 storage behind the forwarder, redirecting blob GETs
    (distribution's default): one with Basic auth, one with token auth.
    Each holds the image ``library/s3img:latest``.
    """
    need("skopeo")
    work = tmp_path_factory.mktemp("s3-upstreams")
    token_server = RecordingTokenServer(work / "token-server", {UPSTREAM_USER: UPSTREAM_PASSWORD})
    basic = S3Registry(
        work / "basic", weed, "registries", s3_forwarder.url, rootdirectory="/basic",
        auth="basic", username=UPSTREAM_USER, password=UPSTREAM_PASSWORD,
    )
    token = S3Registry(
        work / "token", weed, "registries", s3_forwarder.url, rootdirectory="/token",
        auth="token", token_server=token_server, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD,
    )
    try:
        token_server.start()
        basic.start()
        token.start()
        built = build_oci_layout(work / "img", "latest", layer_sizes=[1_200_000, 300_000])
        for registry in (basic, token):
            skopeo_push(work / "img", "latest", f"{registry.host}/library/s3img:latest",
                        creds=registry.creds)
        yield {"basic": basic, "token": token, "token_server": token_server,
               "image": built, "layout": work / "img"}
    finally:
        token.stop()
        basic.stop()
        token_server.stop()


@pytest.fixture(scope="module")
def s3_proxy(s3_upstreams, tmp_path_factory):
    proxy = start_proxy(
        tmp_path_factory.mktemp("s3-proxy"),
        [{"id": f"s3-{kind}", "url": s3_upstreams[kind].url, "username": UPSTREAM_USER,
          "password": UPSTREAM_PASSWORD} for kind in ("basic", "token")],
        [(f"{kind}/s3img", f"s3-{kind}", "library/s3img") for kind in ("basic", "token")],
    )
    yield proxy
    proxy.process.stop()


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_redirected_blob_downloads_carry_no_upstream_credentials(s3_upstreams, s3_forwarder, s3_proxy, tmp_path, kind):
    upstream: Registry = s3_upstreams[kind]
    token_server: RecordingTokenServer = s3_upstreams["token_server"]
    image = s3_upstreams["image"]
    layout = s3_upstreams["layout"]
    blobs = [*image["configs"], *image["layers"]]
    tokens_before = len(token_server.issued)

    got = pull_http(s3_proxy, f"{kind}/s3img", "latest")
    # Byte-identical to what was pushed.
    assert set(got) == {image["manifest"], *blobs}
    for digest, data in got.items():
        assert data == layout_blob(layout, digest)

    # The registry really redirected cargobay's blob GETs (307 to S3).
    for digest in blobs:
        assert upstream.wait_requests("GET", f"/blobs/{digest}", 1, status=307) >= 1, (
            digest, upstream.access_log()[-20:])
    if kind == "token":
        assert len(token_server.issued) > tokens_before, "cargobay fetched no upstream token"

    # What cargobay sent to the S3 host: the presigned GET of every blob ...
    from_cargobay = [r for r in s3_forwarder.requests() if r.header("User-Agent") == "cargobay"]
    for digest in blobs:
        hex_ = digest.split(":", 1)[1]
        matching = [r for r in from_cargobay if f"/{kind}/docker/registry/v2/blobs/sha256/{hex_[:2]}/{hex_}/data" in r.target]
        assert matching, (digest, [r.target for r in from_cargobay])
        for request in matching:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.target).query)
            assert "X-Amz-Signature" in query, request.target
    # ... and never an Authorization header, the password, or an upstream token.
    forbidden = [UPSTREAM_PASSWORD, basic_credentials(UPSTREAM_USER, UPSTREAM_PASSWORD)]
    for token in list(token_server.issued):
        forbidden += secret_forms(token)
    for request in from_cargobay:
        assert request.header("Authorization") is None, (request.target, request.headers)
        for name, value in request.headers:
            for secret in forbidden:
                assert secret not in value, (request.target, name)
    # The raw bytes of every connection cargobay opened to the S3 host, too.
    for stream in s3_forwarder.client_streams():
        if b"User-Agent: cargobay" in stream:
            for secret in forbidden:
                assert secret.encode() not in stream


# ---------------------------------------------------------------------------
# 3. secrets never logged or returned
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_upstreams(tmp_path_factory):
    need("skopeo")
    work = tmp_path_factory.mktemp("secret-upstreams")
    token_server = RecordingTokenServer(work / "token-server", {UPSTREAM_USER: UPSTREAM_PASSWORD})
    basic = Registry(work / "basic", "basic", username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    token = Registry(work / "token", "token", token_server=token_server,
                     username=UPSTREAM_USER, password=UPSTREAM_PASSWORD)
    try:
        token_server.start()
        basic.start()
        token.start()
        build_oci_layout(work / "img", "latest", layer_sizes=[300_000])
        for registry in (basic, token):
            skopeo_push(work / "img", "latest", f"{registry.host}/team/app:latest", creds=registry.creds)
        yield {"basic": basic, "token": token, "token_server": token_server}
    finally:
        token.stop()
        basic.stop()
        token_server.stop()


def test_no_secret_in_logs_or_responses(secret_upstreams, tmp_path):
    token_server: RecordingTokenServer = secret_upstreams["token_server"]
    proxy = start_proxy(
        tmp_path,
        [{"id": kind, "url": secret_upstreams[kind].url, "username": UPSTREAM_USER,
          "password": UPSTREAM_PASSWORD} for kind in ("basic", "token")],
        [("app", "basic", "team/app"), ("tok/app", "token", "team/app")],
        # As much logging as there is.
        env={"CARGOBAY_LOG_LEVEL": "debug"},
    )
    client_jwt = mint_token(SECRET, "secret-client", ["app", "tok"], 3600)
    tokens_before = len(token_server.issued)
    # The client talks to the proxy through a forwarder that keeps every byte
    # the proxy answered.
    forwarder = CapturingForwarder(proxy.port).start()
    try:
        # A real client (its Docker token flow against cargobay's /token) for
        # the token-auth upstream; the same flow by hand for the Basic one.
        # (skopeo first tries HTTPS and waits out a 10 s handshake timeout
        # against a plain-HTTP cargobay: one such pull is enough.)
        skopeo_pull(f"{forwarder.host}/tok/app:latest", tmp_path / "tok",
                    creds=f"secret-client:{client_jwt}")
        token_flow_pull(forwarder.port, "app", "latest", "secret-client", client_jwt)
        basic_auth = {"Authorization": "Basic " + basic_credentials("secret-client", client_jwt)}
        bearer = {"Authorization": f"Bearer {client_jwt}"}
        tampered = {"Authorization": f"Bearer {client_jwt}x"}
        wrong_password = {"Authorization": "Basic " + basic_credentials("secret-client", client_jwt + "x")}
        requests = [
            ("GET", "/v2/", {}, 401),
            ("GET", "/v2/", basic_auth, 200),
            ("GET", "/v2/", tampered, 401),
            ("GET", "/v2/", wrong_password, 401),
            ("GET", "/token?service=cargobay&scope=repository:app:pull", basic_auth, 200),
            ("GET", "/token?service=cargobay&scope=repository:app:pull", wrong_password, 401),
            ("GET", "/v2/app/manifests/latest", {**bearer, "Accept": ACCEPT_ALL}, 200),
            ("GET", "/v2/tok/app/manifests/latest", {**bearer, "Accept": ACCEPT_ALL}, 200),
            ("GET", "/v2/tok/app/tags/list", bearer, 200),
            ("GET", "/v2/app/manifests/missing", bearer, 404),
            ("GET", "/v2/tok/app/manifests/missing", bearer, 404),
            ("GET", "/v2/tok/app/blobs/sha256:" + "0" * 64, bearer, 404),
            ("GET", "/v2/other/manifests/latest", bearer, 403),
            ("PUT", "/v2/app/manifests/latest", bearer, 403),
            ("DELETE", "/v2/tok/app/manifests/latest", basic_auth, 403),
        ]
        for method, path, headers, expected in requests:
            conn = http.client.HTTPConnection("127.0.0.1", forwarder.port, timeout=30)
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == expected, (method, path, response.status)

        # The OAuth2 password grant (containerd's flow), straight to the proxy.
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        form = urllib.parse.urlencode({"grant_type": "password", "username": "secret-client",
                                       "password": client_jwt, "service": "cargobay",
                                       "scope": "repository:app:pull", "client_id": "tests"})
        conn.request("POST", "/token", body=form,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        grant_body = response.read()
        grant_headers = response.getheaders()
        conn.close()
        assert response.status == 200, grant_body
        grant = json.loads(grant_body)
        # The refresh token is cargobay's own, never the client's JWT echoed.
        assert grant["refresh_token"] and grant["refresh_token"] != client_jwt
    finally:
        forwarder.stop()
        proxy.process.stop()

    assert len(token_server.issued) > tokens_before, "cargobay fetched no upstream token"
    secrets = {
        "client JWT": secret_forms(client_jwt),
        "upstream password": [UPSTREAM_PASSWORD,
                              basic_credentials(UPSTREAM_USER, UPSTREAM_PASSWORD)],
        "jwt_secret": [SECRET],
    }
    for i, token in enumerate(token_server.issued):
        secrets[f"upstream token {i}"] = secret_forms(token)

    log = proxy.process.log_text()
    assert "GET /v2/tok/app/manifests/latest" in log or "/v2/tok/app/manifests/latest" in log, log[-2000:]
    answered = forwarder.server_bytes()
    assert b"HTTP/1.1 200" in answered and b"HTTP/1.1 401" in answered
    grant_text = json.dumps(grant) + "".join(f"{k}: {v}\n" for k, v in grant_headers)
    for label, forms in secrets.items():
        for form in forms:
            assert form not in log, f"{label} in the proxy's log"
            assert form.encode() not in answered, f"{label} in a response to the client"
            assert form not in grant_text, f"{label} in the /token response"


# ---------------------------------------------------------------------------
# 4. not an open proxy
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bystander(tmp_path_factory):
    """A registry in no config, holding the image every request below asks for."""
    need("skopeo")
    work = tmp_path_factory.mktemp("bystander")
    registry = Registry(work / "registry").start()
    try:
        built = build_oci_layout(work / "img", "latest", layer_sizes=[100_000])
        skopeo_push(work / "img", "latest", f"{registry.host}/library/alpine:latest")
        yield registry, built
    finally:
        registry.stop()


@pytest.mark.parametrize("mirror", [False, True], ids=["exact-names", "catch-all-mirror"])
def test_unmapped_names_reach_no_other_registry(upstream_anon, bystander, tmp_path, mirror):
    registry, built = bystander
    repositories = [("alpine", "home", "library/alpine")]
    if mirror:
        repositories.append(("*", "home", "*"))
    proxy = start_proxy(tmp_path, [{"id": "home", "url": upstream_anon.url}], repositories)
    try:
        hostport = registry.host
        layer = built["layers"][0]
        before = len(registry.access_log())
        home_before = len(upstream_anon.access_log())
        ns_values = [hostport, f"localhost:{registry.port}", f"http://{hostport}",
                     f"https://{hostport}/v2/", f"{hostport}/library"]
        for ns in ns_values:
            query = "?ns=" + urllib.parse.quote(ns, safe="")
            for tail in ("manifests/latest", f"blobs/{layer}", "tags/list"):
                status, _, body = proxy.request(f"/v2/library/alpine/{tail}{query}",
                                                headers={"Accept": ACCEPT_ALL})
                assert status == 404, (ns, tail, status, body[:300])
                assert oci_error(body)["code"] == "NAME_UNKNOWN", (ns, tail, body)
        # Names that look like a URL or a registry host.
        for name in (f"{hostport}/library/alpine", f"http://{hostport}/library/alpine",
                     f"http:/{hostport}/v2/library/alpine", f"//{hostport}/library/alpine",
                     f"{urllib.parse.quote(hostport, safe='')}/library/alpine",
                     f"localhost:{registry.port}/library/alpine"):
            for tail in ("manifests/latest", f"blobs/{layer}"):
                status, _, body = proxy.request(f"/v2/{name}/{tail}", headers={"Accept": ACCEPT_ALL})
                assert status in (400, 404), (name, tail, status, body[:300])
        # 127.0.0.1 is a valid first name component: in mirror mode such a
        # name goes to the configured registry (which has no such repository);
        # otherwise it maps to nothing.
        for tail in ("manifests/latest", f"blobs/{layer}"):
            status, _, body = proxy.request(f"/v2/127.0.0.1/library/alpine/{tail}",
                                            headers={"Accept": ACCEPT_ALL})
            assert status == 404, (tail, status, body[:300])
            expected = {"MANIFEST_UNKNOWN", "BLOB_UNKNOWN"} if mirror else {"NAME_UNKNOWN"}
            assert oci_error(body)["code"] in expected, body
        # Absolute-form request targets and a Host header naming the other registry.
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", f"{registry.url}/v2/library/alpine/manifests/latest",
                     headers={"Authorization": f"Bearer {ALL}", "Accept": ACCEPT_ALL})
        response = conn.getresponse()
        response.read()
        assert 400 <= response.status < 500, response.status
        conn.close()
        status, _, body = proxy.request("/v2/nothing/here/manifests/latest",
                                        headers={"Host": hostport, "Accept": ACCEPT_ALL})
        assert status == 404 and oci_error(body)["code"] in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN")

        # ?ns= naming the configured registry's own host: with exact names
        # only, it opens no other repository of that registry (the proxy's
        # credentials there may read far more than what was mapped).
        for home, tail in itertools.product((upstream_anon.host, "127.0.0.1"), ("manifests/latest", "tags/list")):
            query = "?ns=" + urllib.parse.quote(home, safe="")
            status, _, body = proxy.request(f"/v2/other/thing/{tail}{query}", headers={"Accept": ACCEPT_ALL})
            assert status == 404, (tail, status, body[:300])
            expected = {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"} if mirror else {"NAME_UNKNOWN"}
            assert oci_error(body)["code"] in expected, body

        time.sleep(0.5)  # let a (wrong) request reach the bystander's log, if any
        assert len(registry.access_log()) == before, registry.access_log()[before:]
        if not mirror:
            # Without a catch-all, none of this concerned the configured registry either.
            assert len(upstream_anon.access_log()) == home_before, upstream_anon.access_log()[home_before:]
        assert "Traceback" not in proxy.process.log_text()
    finally:
        proxy.process.stop()


# ---------------------------------------------------------------------------
# Registries reached through an outbound proxy (tinyproxy)
# ---------------------------------------------------------------------------


def assert_pulls_the_image(proxy: Proxy, names: tuple[str, ...], image: dict, layout: Path) -> None:
    """Each name pulls the image's manifest and blobs, byte for byte."""
    for name in names:
        got = pull_http(proxy, name, "latest")
        assert set(got) == {image["manifest"], *image["configs"], *image["layers"]}, name
        for digest, data in got.items():
            assert data == layout_blob(layout, digest)


def test_registries_behind_an_outbound_proxy(ca, tls_upstreams, upstream_anon, tmp_path):
    """
    HTTPS_PROXY / HTTP_PROXY, as the earlier implementation's HTTP client
    honoured them: an HTTPS registry through a CONNECT tunnel (TLS verified
    end to end, so a wrong certificate still fails), a plain-HTTP one with
    absolute request targets, proxy credentials from the URL; loopback is
    not proxied unless NO_PROXY says otherwise.
    """
    image, layout = tls_upstreams["image"], tls_upstreams["layout"]
    skopeo_push(layout, "latest", f"{upstream_anon.host}/library/behindproxy:latest")
    outbound = OutboundProxyServer(tmp_path / "tinyproxy", user="puller", password="s3cret").start()
    registries = [
        {"id": "tls", "url": tls_upstreams["good"].url, "ca_file": ca.cert_path},
        {"id": "wrongname", "url": tls_upstreams["mismatch"].url, "ca_file": ca.cert_path},
        {"id": "plain", "url": upstream_anon.url},
    ]
    mappings = [("secure", "tls", "library/secure"), ("mismatch", "wrongname", "library/secure"),
                ("plain", "plain", "library/behindproxy")]

    def proxied(tmp: Path, password: str, no_proxy: str | None = "example.invalid") -> Proxy:
        via = f"http://puller:{password}@127.0.0.1:{outbound.port}"
        env = {"HTTPS_PROXY": via, "http_proxy": via}
        if no_proxy is not None:
            env["NO_PROXY"] = no_proxy
        return start_proxy(tmp, registries, mappings, env=env)

    try:
        proxy = proxied(tmp_path / "p", "s3cret")
        try:
            assert_pulls_the_image(proxy, ("secure", "plain"), image, layout)
            asked = outbound.requests()
            assert any(r.startswith(f"CONNECT 127.0.0.1:{tls_upstreams['good'].port} ") for r in asked), asked
            assert any(r.startswith(f"GET {upstream_anon.url}/v2/library/behindproxy/blobs/") for r in asked), asked
            # The tunnel carries TLS end to end: a certificate for another
            # name fails as it would without the proxy.
            status, _, body = proxy.request("/v2/mismatch/manifests/latest", headers={"Accept": ACCEPT_ALL})
            assert status == 502 and "TLS" in oci_error(body)["message"]
        finally:
            proxy.process.stop()
        # Wrong proxy credentials: a 502 that names the proxy's answer
        # (tinyproxy's is a 401; others send 407).
        proxy = proxied(tmp_path / "q", "wrong")
        try:
            status, _, body = proxy.request("/v2/secure/manifests/latest", headers={"Accept": ACCEPT_ALL})
            message = oci_error(body)["message"]
            assert status == 502 and "outbound proxy answered CONNECT with 'HTTP/1.0 401" in message, body
        finally:
            proxy.process.stop()
        # A proxy that is gone, or that never answers CONNECT: the 502 or
        # 504 is the proxy's, and nothing is left half-done in the log.
        gone, hole = free_port(), BlackHole(free_port())
        try:
            for where, status, says in ((gone, 502, f"outbound proxy 127.0.0.1:{gone} refused the connection"),
                                        (hole.port, 504, "timed out")):
                registries[0]["read_timeout_seconds"] = 2
                env = {"HTTPS_PROXY": f"http://127.0.0.1:{where}", "NO_PROXY": "example.invalid"}
                proxy = start_proxy(tmp_path / f"gone{where}", registries, mappings, env=env)
                try:
                    got, _, body = proxy.request("/v2/secure/manifests/latest", headers={"Accept": ACCEPT_ALL})
                    assert got == status and says in oci_error(body)["message"], body
                    time.sleep(0.5)  # the tunnel's connection is closed after the answer
                    log = proxy.process.log_text()
                    assert "AlreadyCalledError" not in log and "critical" not in log and "Traceback" not in log
                finally:
                    proxy.process.stop()
            assert any(r.startswith("CONNECT 127.0.0.1:") for r in hole.requests), hole.requests
        finally:
            hole.close()
            del registries[0]["read_timeout_seconds"]
        # Without NO_PROXY, loopback registries are reached directly.
        before = len(outbound.requests())
        proxy = proxied(tmp_path / "r", "s3cret", no_proxy=None)
        try:
            assert set(pull_http(proxy, "plain", "latest")) == {image["manifest"], *image["configs"], *image["layers"]}
            assert len(outbound.requests()) == before
        finally:
            proxy.process.stop()
    finally:
        outbound.stop()


def test_registries_behind_an_https_outbound_proxy(ca, tls_upstreams, upstream_anon, tmp_path):
    """
    An https:// proxy URL, as the earlier implementation's HTTP client took
    it: TLS to the proxy (verified with the system's trust, here
    SSL_CERT_FILE), an HTTPS registry's own TLS inside the tunnel, a plain
    one's requests in absolute form; a proxy whose certificate does not
    verify is a 502 that says so, and nothing is sent to it in the clear.
    """
    image, layout = tls_upstreams["image"], tls_upstreams["layout"]
    skopeo_push(layout, "latest", f"{upstream_anon.host}/library/behindtls:latest")
    outbound = OutboundProxyServer(tmp_path / "tinyproxy", user="puller", password="s3cret").start()
    served = ca.issue("proxy", ["localhost"], ["127.0.0.1"])
    front = TLSFront(outbound.port, served.cert_path, served.key_path)
    registries = [{"id": "tls", "url": tls_upstreams["good"].url, "ca_file": ca.cert_path},
                  {"id": "plain", "url": upstream_anon.url}]
    mappings = [("secure", "tls", "library/secure"), ("plain", "plain", "library/behindtls")]
    via = f"https://puller:s3cret@localhost:{front.port}"
    env = {"HTTPS_PROXY": via, "HTTP_PROXY": via, "NO_PROXY": "example.invalid"}
    try:
        proxy = start_proxy(tmp_path / "p", registries, mappings, env={**env, "SSL_CERT_FILE": str(ca.cert_path)})
        try:
            assert_pulls_the_image(proxy, ("secure", "plain"), image, layout)
        finally:
            proxy.process.stop()
        asked = outbound.requests()
        assert any(r.startswith(f"CONNECT 127.0.0.1:{tls_upstreams['good'].port} ") for r in asked), asked
        assert any(r.startswith(f"GET {upstream_anon.url}/v2/library/behindtls/blobs/") for r in asked), asked
        assert front.handshakes >= 2
        # Without the CA that signed the proxy's certificate: refused, and
        # the proxy never heard a request.
        before = len(outbound.requests())
        proxy = start_proxy(tmp_path / "q", registries, mappings, env=env)
        try:
            for path in ("/v2/secure/manifests/latest", "/v2/plain/manifests/latest"):
                status, _, body = proxy.request(path, headers={"Accept": ACCEPT_ALL})
                message = oci_error(body)["message"]
                assert status == 502 and f"outbound proxy localhost:{front.port}" in message, body
                assert "TLS" in message, body
            assert len(outbound.requests()) == before
            assert "Traceback" not in proxy.process.log_text()
        finally:
            proxy.process.stop()
    finally:
        front.close()
        outbound.stop()


def test_a_bad_proxy_variable_stops_start_up_with_one_line(tmp_path):
    config = write_proxy_config(tmp_path / "c.toml", free_port(), tmp_path / "cache", [{"id": "a", "url": "https://registry.example.com"}], [("x", "a", "x")])
    result = subprocess.run(
        cargobay_command(config), env={**os.environ, "HTTPS_PROXY": "socks5://127.0.0.1:1080"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["cargobay: outbound proxy: HTTPS_PROXY: only http:// and https:// proxies are supported, not socks5://"]
