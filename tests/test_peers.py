"""
The peers of peers.py and conftest.py do what the integration tests rely on:
images pushed with skopeo come back with the digests build_oci_layout
promised, the registry's access log counts fetches, and the token server
drives distribution's token auth.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest

from peers import (
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2S2,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    TokenServer,
    Twistd,
    build_oci_layout,
    free_port,
    need,
    run_to_completion,
    sha256_digest,
    skopeo_inspect_raw,
    skopeo_pull,
    skopeo_push,
)

UPSTREAMS = ["upstream_anon", "upstream_basic", "upstream_token"]
PLATFORMS = [("linux", "amd64"), ("linux", "arm64")]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One layout holding a single-platform image and a two-platform index."""
    root = tmp_path_factory.mktemp("layout")
    return {
        "dir": root,
        "single": build_oci_layout(root, "single", layers=[b"one", b"two"]),
        "multi": build_oci_layout(root, "multi", platforms=PLATFORMS),
    }


def _get(url: str, headers: dict[str, str] | None = None,
         data: bytes | None = None) -> tuple[int, Any, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_layout_layers_are_valid_gzip_tars(tmp_path: Path) -> None:
    image = build_oci_layout(tmp_path, "random", layer_sizes=[1 << 20, 70_000])
    blobs = tmp_path / "blobs" / "sha256"
    for digest, diff_id, size in zip(image["layers"], image["diff_ids"], [1 << 20, 70_000], strict=True):
        data = (blobs / digest.split(":")[1]).read_bytes()
        assert sha256_digest(data) == digest
        tar = gzip.decompress(data)
        assert sha256_digest(tar) == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            assert [m.size for m in t.getmembers()] == [size]
    manifest = json.loads((blobs / image["manifest"].split(":")[1]).read_bytes())
    assert manifest["mediaType"] == OCI_MANIFEST
    assert [layer["digest"] for layer in manifest["layers"]] == image["layers"]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "random"


def test_need_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        need("cargobay-no-such-binary")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        need("cargobay-no-such-binary")
    assert need("sh").endswith("/sh")


@pytest.mark.integration
@pytest.mark.parametrize("upstream_name", UPSTREAMS)
def test_push_and_inspect_back(
    request: pytest.FixtureRequest, upstream_name: str, layout: dict[str, Any]
) -> None:
    upstream: Registry = request.getfixturevalue(upstream_name)
    repo = f"{upstream.host}/test-peers/app"

    skopeo_push(layout["dir"], "single", f"{repo}:single", creds=upstream.creds)
    raw = skopeo_inspect_raw(f"{repo}:single", creds=upstream.creds)
    assert sha256_digest(raw) == layout["single"]["manifest"]
    assert json.loads(raw)["mediaType"] == OCI_MANIFEST

    skopeo_push(layout["dir"], "multi", f"{repo}:multi", creds=upstream.creds,
                all_platforms=True)
    raw = skopeo_inspect_raw(f"{repo}:multi", creds=upstream.creds)
    assert sha256_digest(raw) == layout["multi"]["manifest"]
    index = json.loads(raw)
    assert index["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in index["manifests"]] == layout["multi"]["manifests"]
    assert [(m["platform"]["os"], m["platform"]["architecture"])
            for m in index["manifests"]] == PLATFORMS

    skopeo_push(layout["dir"], "single", f"{repo}:v2s2", creds=upstream.creds,
                docker_v2s2=True)
    raw = skopeo_inspect_raw(f"{repo}:v2s2", creds=upstream.creds)
    v2s2 = json.loads(raw)
    assert v2s2["mediaType"] == DOCKER_MANIFEST_V2S2
    assert sha256_digest(raw) != layout["single"]["manifest"]
    assert [layer["digest"] for layer in v2s2["layers"]] == layout["single"]["layers"]


@pytest.mark.integration
def test_v2s2_with_all_makes_a_manifest_list(
    upstream_anon: Registry, layout: dict[str, Any]
) -> None:
    ref = f"{upstream_anon.host}/test-peers/list:v2s2"
    skopeo_push(layout["dir"], "multi", ref, docker_v2s2=True, all_platforms=True)
    manifest_list = json.loads(skopeo_inspect_raw(ref))
    assert manifest_list["mediaType"] == DOCKER_MANIFEST_LIST
    assert {m["mediaType"] for m in manifest_list["manifests"]} == {DOCKER_MANIFEST_V2S2}


@pytest.mark.integration
@pytest.mark.parametrize("upstream_name", UPSTREAMS)
def test_access_log_counts_blob_fetches(
    request: pytest.FixtureRequest, upstream_name: str, layout: dict[str, Any],
    tmp_path: Path,
) -> None:
    upstream: Registry = request.getfixturevalue(upstream_name)
    ref = f"{upstream.host}/test-peers/counted:single"
    skopeo_push(layout["dir"], "single", ref, creds=upstream.creds)
    layer = layout["single"]["layers"][0]
    before = upstream.count_requests("GET", f"/test-peers/counted/blobs/{layer}", status=200)

    skopeo_pull(ref, tmp_path / "out", creds=upstream.creds)

    assert upstream.wait_requests(
        "GET", f"/test-peers/counted/blobs/{layer}", before + 1, status=200
    ) == before + 1
    assert upstream.count_requests("GET", "/test-peers/counted/blobs/sha256:") >= 3
    assert upstream.count_requests("GET", "/test-peers/counted/manifests/single") >= 1
    assert (tmp_path / "out" / layer.split(":")[1]).exists()


@pytest.mark.integration
def test_token_challenge_and_flow(upstream_token: Registry, layout: dict[str, Any]) -> None:
    token_server = upstream_token.token_server
    assert token_server is not None
    ref = f"{upstream_token.host}/test-peers/tokened:single"
    skopeo_push(layout["dir"], "single", ref, creds=upstream_token.creds)

    status, headers, _ = _get(upstream_token.url + "/v2/")
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{token_server.realm}"')
    assert f'service="{token_server.service}"' in challenge

    # GET with Basic credentials, as docker and skopeo do.
    fetches = token_server.token_fetches("GET")
    query = urllib.parse.urlencode({"service": token_server.service, "account": "puller"})
    status, _, body = _get(f"{token_server.realm}?{query}",
                           _basic(upstream_token.username or "", upstream_token.password or ""))
    assert status == 200
    assert token_server.token_fetches("GET") == fetches + 1
    assert token_server.requests[-1].has_credentials
    token = json.loads(body)["token"]
    status, _, _ = _get(upstream_token.url + "/v2/", {"Authorization": f"Bearer {token}"})
    assert status == 200

    # That token has no scope: the manifest is refused, with a scoped challenge.
    manifest_url = upstream_token.url + "/v2/test-peers/tokened/manifests/single"
    accept = {"Accept": OCI_MANIFEST}
    status, headers, _ = _get(manifest_url, {**accept, "Authorization": f"Bearer {token}"})
    assert status == 401
    assert 'scope="repository:test-peers/tokened:pull"' in headers["WWW-Authenticate"]

    # OAuth2 password grant, as containerd does first.
    form = urllib.parse.urlencode({
        "grant_type": "password", "username": "puller", "password": "pullpass",
        "service": token_server.service, "scope": "repository:test-peers/tokened:pull",
        "client_id": "cargobay-tests",
    }).encode()
    status, _, body = _get(token_server.realm, data=form)
    assert status == 200
    answer = json.loads(body)
    assert answer["access_token"] == answer["token"]
    assert answer["expires_in"] > 0 and answer["issued_at"]
    status, _, manifest = _get(
        manifest_url, {**accept, "Authorization": f"Bearer {answer['access_token']}"})
    assert status == 200
    assert sha256_digest(manifest) == layout["single"]["manifest"]

    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["aud"] == token_server.service and claims["iss"] == token_server.issuer
    assert claims["access"] == [
        {"type": "repository", "name": "test-peers/tokened", "actions": ["pull"]}
    ]
    header = jwt.get_unverified_header(answer["token"])
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1

    # Wrong or missing credentials get nothing.
    assert _get(token_server.realm + "?" + query, _basic("puller", "nope"))[0] == 401
    assert _get(token_server.realm + "?" + query)[0] == 401
    assert not token_server.requests[-1].has_credentials
    with pytest.raises(RuntimeError, match="skopeo"):
        skopeo_inspect_raw(ref, creds="puller:wrong")


def test_token_server_anonymous_pull(tmp_path: Path) -> None:
    with TokenServer(tmp_path, {"puller": "pullpass"}, allow_anonymous_pull=True) as server:
        scope = "repository:library/alpine:pull,push"
        status, _, body = _get(f"{server.realm}?service={server.service}&scope={scope}")
        assert status == 200
        claims = jwt.decode(json.loads(body)["token"], options={"verify_signature": False})
        assert claims["access"] == [
            {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
        ]
        status, _, body = _get(f"{server.realm}?service={server.service}&scope={scope}",
                               _basic("puller", "pullpass"))
        claims = jwt.decode(json.loads(body)["token"], options={"verify_signature": False})
        assert claims["access"][0]["actions"] == ["pull", "push"]
        assert [r.has_credentials for r in server.requests] == [False, True]


@pytest.mark.integration
def test_basic_registry_challenges(upstream_basic: Registry) -> None:
    status, headers, _ = _get(upstream_basic.url + "/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic ")
    status, _, _ = _get(upstream_basic.url + "/v2/",
                        _basic(upstream_basic.username or "", upstream_basic.password or ""))
    assert status == 200


@pytest.mark.integration
def test_registry_pull_through_mode(
    upstream_token: Registry, layout: dict[str, Any], tmp_path: Path
) -> None:
    # distribution 2.8's own pull-through cache, the reference peer. (Against
    # a Basic-auth upstream it sends no credentials: it only registers them
    # for Bearer realms. Token auth is what it supports.)
    ref = "test-peers/mirrored:single"
    skopeo_push(layout["dir"], "single", f"{upstream_token.host}/{ref}",
                creds=upstream_token.creds)
    with Registry(tmp_path / "mirror", proxy_remoteurl=upstream_token.url,
                  proxy_username=upstream_token.username,
                  proxy_password=upstream_token.password) as mirror:
        raw = skopeo_inspect_raw(f"{mirror.host}/{ref}")
        assert sha256_digest(raw) == layout["single"]["manifest"]
        layer = layout["single"]["layers"][0]
        before = upstream_token.count_requests("GET", f"/blobs/{layer}", status=200)
        skopeo_pull(f"{mirror.host}/{ref}", tmp_path / "out1")
        # 2.8 fetches an uncached blob twice: once streamed to the client, once
        # in the background to store it.
        first = upstream_token.wait_requests("GET", f"/blobs/{layer}", before + 2, status=200)
        assert first == before + 2
        skopeo_pull(f"{mirror.host}/{ref}", tmp_path / "out2")
        # The second pull is served from the mirror's storage.
        assert mirror.wait_requests("GET", f"/blobs/{layer}", 2) == 2
        assert upstream_token.count_requests("GET", f"/blobs/{layer}", status=200) == first


def test_twistd_process_helpers(tmp_path: Path) -> None:
    port = free_port()
    server = Twistd([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                    log_path=tmp_path / "server.log", cwd=tmp_path).start()
    try:
        server.wait_listening(port)
        assert server.wait_http(f"http://127.0.0.1:{port}/", expect=(200,)) == 200
        assert server.returncode is None
    finally:
        assert server.stop() is not None
    assert "GET / HTTP/1.1" in server.log_text()

    sleeper = Twistd([sys.executable, "-c", "import time; time.sleep(60)"],
                     log_path=tmp_path / "sleeper.log").start()
    assert sleeper.kill9() == -9

    crasher = Twistd([sys.executable, "-c", "raise SystemExit('bad config')"],
                     log_path=tmp_path / "crasher.log").start()
    with pytest.raises(RuntimeError, match="bad config"):
        crasher.wait_listening(free_port())

    done = run_to_completion([sys.executable, "-c", "import os; print(os.environ['X'])"],
                             env={"X": "hello"})
    assert done.returncode == 0 and done.stdout.strip() == "hello"


def test_twistd_default_command(tmp_path: Path) -> None:
    server = Twistd(config_path=tmp_path / "config.toml", log_path=tmp_path / "log")
    assert server.args[-3:] == ["cargobay", "--config", str(tmp_path / "config.toml")]
