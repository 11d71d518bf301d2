"""
The core proxy against real peers: three real CNCF registries as upstreams
(anonymous, Basic auth, token auth with the tests' own token server), images
pushed with skopeo, the real `twistd -n cargobay` process, and pulls with
skopeo and plain HTTP.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cargobay.tokens import mint_token
from peers import (
    Registry,
    build_oci_layout,
    cargobay_command,
    free_port,
    need,
    push_blob,
    run_to_completion,
    skopeo,
    skopeo_inspect_raw,
    skopeo_pull,
    skopeo_push,
    twistd_command,
    wait_until,
)
from proxy import ALL, SECRET, Proxy, start_proxy, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(upstream_anon: Registry, upstream_basic: Registry, upstream_token: Registry, tmp_path_factory) -> dict:
    need("skopeo")
    work = tmp_path_factory.mktemp("images")
    built = {}
    built["single"] = build_oci_layout(work / "single", "latest", layer_sizes=[2_000_000, 300_000])
    skopeo_push(work / "single", "latest", f"{upstream_anon.host}/library/alpine:latest")
    skopeo_push(work / "single", "latest", f"{upstream_anon.host}/library/alpine:v2s2", docker_v2s2=True)
    built["index"] = build_oci_layout(work / "index", "latest", platforms=[("linux", "amd64"), ("linux", "arm64")])
    skopeo_push(work / "index", "latest", f"{upstream_anon.host}/library/multi:latest", all_platforms=True)
    for tag in ("1.0", "1.1", "2.0"):
        skopeo_push(work / "single", "latest", f"{upstream_anon.host}/library/alpine:{tag}")
    skopeo_push(work / "single", "latest", f"{upstream_basic.host}/team/application:latest", creds=upstream_basic.creds)
    skopeo_push(work / "index", "latest", f"{upstream_token.host}/library/tokened:latest", creds=upstream_token.creds, all_platforms=True)
    return built


@pytest.fixture(scope="module")
def proxy(images, upstream_anon: Registry, upstream_basic: Registry, upstream_token: Registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    proxy = start_proxy(
        tmp,
        [
            {"id": "anon", "url": upstream_anon.url},
            {"id": "basic", "url": upstream_basic.url, "username": upstream_basic.username, "password": upstream_basic.password},
            {"id": "token", "url": upstream_token.url, "username": upstream_token.username, "password": upstream_token.password},
        ],
        [
            ("alpine", "anon", "library/alpine"),
            ("multi", "anon", "library/multi"),
            ("mycompany/app", "basic", "team/application"),
            ("secure/deep/img", "token", "library/tokened"),
        ],
    )
    yield proxy
    proxy.process.stop()


def same_tree(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize(
    "local, upstream_attr, upstream_name, tag, all_platforms",
    [
        ("alpine", "upstream_anon", "library/alpine", "latest", False),
        ("alpine", "upstream_anon", "library/alpine", "v2s2", False),
        ("multi", "upstream_anon", "library/multi", "latest", True),
        ("mycompany/app", "upstream_basic", "team/application", "latest", False),
        ("secure/deep/img", "upstream_token", "library/tokened", "latest", True),
    ],
)
def test_skopeo_pull_is_byte_identical_to_upstream(proxy, request, tmp_path, local, upstream_attr, upstream_name, tag, all_platforms):
    upstream: Registry = request.getfixturevalue(upstream_attr)
    through = tmp_path / "through"
    direct = tmp_path / "direct"
    skopeo_pull(f"{proxy.host}/{local}:{tag}", through, creds=f"tester:{ALL}", all_platforms=all_platforms)
    skopeo_pull(f"{upstream.host}/{upstream_name}:{tag}", direct, creds=upstream.creds, all_platforms=all_platforms)
    same_tree(through, direct)
    raw_through = skopeo_inspect_raw(f"{proxy.host}/{local}:{tag}", creds=f"tester:{ALL}")
    raw_direct = skopeo_inspect_raw(f"{upstream.host}/{upstream_name}:{tag}", creds=upstream.creds)
    assert raw_through == raw_direct


def test_a_registry_whose_url_holds_its_account_is_pulled_from_with_it(images, upstream_basic, tmp_path):
    # The earlier implementation's config reached a registry behind a
    # password this way (its HTTP client sent user:password@ as Basic).
    from urllib.parse import quote

    url = upstream_basic.url.replace("://", f"://{quote(upstream_basic.username)}:{quote(upstream_basic.password, safe='')}@", 1)
    proxy = start_proxy(tmp_path, [{"id": "basic", "url": url}], [("mycompany/app", "basic", "team/application")])
    try:
        through, direct = tmp_path / "through", tmp_path / "direct"
        skopeo_pull(f"{proxy.host}/mycompany/app:latest", through, creds=f"tester:{ALL}")
        skopeo_pull(f"{upstream_basic.host}/team/application:latest", direct, creds=upstream_basic.creds)
        same_tree(through, direct)
        assert upstream_basic.password not in proxy.process.log_text()
        assert "the user:password@ in it is taken as the registry's account" in proxy.process.log_text()
    finally:
        proxy.process.stop()


def test_manifest_headers_and_digests_equal_upstream(proxy, upstream_anon, images):
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    status, headers, body = proxy.request("/v2/alpine/manifests/latest", headers=accept)
    assert status == 200
    assert headers["docker-content-digest"] == images["single"]["manifest"]
    assert "sha256:" + hashlib.sha256(body).hexdigest() == images["single"]["manifest"]
    assert headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert int(headers["content-length"]) == len(body)
    # The CNCF registry answers 404 to an OCI manifest requested without a
    # matching Accept; a client that sends none still gets it through cargobay.
    status, headers, body = proxy.request("/v2/alpine/manifests/latest")
    assert status == 200 and headers["docker-content-digest"] == images["single"]["manifest"]
    # A v2s2 manifest asked for without Accept is never down-converted to schema 1.
    status, headers, body = proxy.request("/v2/alpine/manifests/v2s2")
    assert status == 200
    assert headers["content-type"] == "application/vnd.docker.distribution.manifest.v2+json"
    # HEAD is a HEAD upstream.
    before = upstream_anon.count_requests("GET", "/manifests/1.0")
    status, headers, body = proxy.request("/v2/alpine/manifests/1.0", method="HEAD", headers=accept)
    assert status == 200 and body == b""
    assert headers["docker-content-digest"] == images["single"]["manifest"]
    upstream_anon.wait_requests("HEAD", "/manifests/1.0", 1)
    assert upstream_anon.count_requests("GET", "/manifests/1.0") == before


def test_tag_lists_equal_upstream_with_pagination(proxy, upstream_anon):
    status, _, body = proxy.request("/v2/alpine/tags/list")
    assert status == 200
    listed = json.loads(body)
    assert listed["name"] == "alpine"
    direct = json.loads(urllib.request.urlopen(f"{upstream_anon.url}/v2/library/alpine/tags/list").read())
    # In lexical order, as the distribution spec asks (distribution 2.8 does not sort).
    assert listed["tags"] == sorted(direct["tags"])
    status, headers, body = proxy.request("/v2/alpine/tags/list?n=2")
    # distribution 2.8 ignores n; cargobay paginates in lexical order itself.
    assert json.loads(body)["tags"] == sorted(direct["tags"])[:2]
    link = headers["link"]
    assert link.startswith("</v2/alpine/tags/list?") and 'rel="next"' in link
    next_path = link[1 : link.index(">")]
    status, _, body = proxy.request(next_path)
    assert json.loads(body)["tags"] == sorted(direct["tags"])[2:4]
    result = skopeo("list-tags", "--tls-verify=false", f"--creds=tester:{ALL}", f"docker://{proxy.host}/alpine")
    assert json.loads(result.stdout)["Tags"] == sorted(direct["tags"])


def test_blob_head_and_get_through_proxy(proxy, images, upstream_anon):
    layer = images["single"]["layers"][1]
    status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}", method="HEAD")
    assert status == 200 and body == b""
    assert headers["docker-content-digest"] == layer
    cold_length = headers["content-length"]
    status, headers, body = proxy.request(f"/v2/alpine/blobs/{layer}")
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer
    # The HEAD of a blob not cached yet tells its size as the upstream does
    # (tools read a layer's size from it), and the same once it is cached.
    assert cold_length == str(len(body))
    proxy.cached_blob(layer)
    status, headers, _ = proxy.request(f"/v2/alpine/blobs/{layer}", method="HEAD")
    assert (status, headers["content-length"]) == (200, str(len(body)))


def test_writes_are_refused(proxy, tmp_path):
    for method, path in [
        ("PUT", "/v2/alpine/manifests/latest"),
        ("POST", "/v2/alpine/blobs/uploads/"),
        ("PATCH", "/v2/alpine/blobs/uploads/x"),
        ("DELETE", "/v2/alpine/manifests/latest"),
    ]:
        status, _, body = proxy.request(path, method=method)
        assert status == 403, (method, path)
        assert json.loads(body)["errors"][0]["code"] == "DENIED"
    layout = tmp_path / "layout"
    build_oci_layout(layout, "pushme")
    with pytest.raises(RuntimeError):
        skopeo_push(layout, "pushme", f"{proxy.host}/alpine:pushme", creds=f"tester:{ALL}")


def test_unmapped_and_forbidden_names(proxy, tmp_path):
    status, _, body = proxy.request("/v2/nothere/manifests/latest")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    only_alpine = mint_token(SECRET, "limited", ["alpine"])
    status, _, body = proxy.request("/v2/mycompany/app/manifests/latest", token=only_alpine)
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    with pytest.raises(RuntimeError):
        skopeo_pull(f"{proxy.host}/mycompany/app:latest", tmp_path / "x", creds=f"limited:{only_alpine}")
    assert not (tmp_path / "x" / "manifest.json").exists()
    status, _, _ = proxy.request("/v2/alpine/manifests/latest", token=None)
    assert status == 401


def test_upstream_down_at_startup_and_errors_name_it(tmp_path):
    dead = free_port()
    proxy = start_proxy(tmp_path, [{"id": "gone", "url": f"http://127.0.0.1:{dead}"}], [("lost", "gone", "library/lost")])
    try:
        status, _, body = proxy.request("/v2/lost/manifests/latest")
        assert status == 502
        error = json.loads(body)["errors"][0]
        assert "'gone'" in error["message"]
        status, _, body = proxy.request("/v2/lost/blobs/sha256:" + "a" * 64)
        assert status == 502
        assert "Traceback" not in proxy.process.log_text()
    finally:
        proxy.process.stop()


def test_bad_config_stops_startup_with_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nport = 5000\n[auth]\njwt_secret = "x"\n[[repositories]]\nname = "a"\nregistry_id = "nope"\nupstream_name = "b"\n')
    result = run_to_completion(cargobay_command(config))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["cargobay: repositories[0].registry_id: unknown registry 'nope' (defined: none)"]


def test_make_run_on_a_config_path_that_names_no_file_stops_with_one_line(tmp_path):
    # A typo in CONFIG_PATH must not start the development config, whose
    # secret is public: `make run` falls back to it only with neither.
    import sys

    root = Path(__file__).resolve().parent.parent
    venv = Path(sys.prefix)
    if not (venv / ".installed-stamp").exists():
        pytest.skip("`make run` needs the Makefile's own venv (.installed-stamp)")
    missing = tmp_path / "missing.toml"
    result = subprocess.run(
        ["make", "-s", "-C", str(root), "run", f"VENV={venv}"],
        env={**os.environ, "CONFIG_PATH": str(missing)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"cargobay: {missing}: config file not found" in result.stderr.splitlines(), result.stderr
    assert "development" not in result.stdout + result.stderr


def test_a_published_secret_starts_with_a_warning(tmp_path):
    from peers import Twistd

    port = free_port()
    config = write_config(tmp_path / "c.toml", port, tmp_path / "cache", [{"id": "up", "url": "http://127.0.0.1:9"}],
                          [("a", "up", "a")])
    config.write_text(config.read_text().replace(SECRET, "your-secret-key-change-this-in-production"))
    process = Twistd(config_path=config, log_path=tmp_path / "log").start()
    try:
        process.wait_listening(port)
        assert "[auth] jwt_secret is an example's" in process.log_text()
    finally:
        process.stop()


def test_a_config_the_earlier_implementation_took_starts_with_warnings(tmp_path):
    # It ignored unknown keys and sections; such a file must still start.
    from peers import Twistd

    port = free_port()
    config = write_config(tmp_path / "c.toml", port, tmp_path / "cache", [{"id": "up", "url": "http://127.0.0.1:9"}],
                          [("a", "up", "a")])
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes().replace(b"[server]", b"[server]\nworkers = 4", 1)
                       + b"\n[extra]\nnote = 1\n")
    process = Twistd(config_path=config, log_path=tmp_path / "log").start()
    try:
        process.wait_listening(port)
        log = process.log_text()
        assert "server.workers: unknown key, ignored" in log and "extra: unknown section, ignored" in log, log
    finally:
        process.stop()


def test_a_second_process_on_one_cache_directory_stops_with_one_line(tmp_path):
    # It emptied the first one's downloads from tmp/ at its start, and the
    # two counted only their own blobs against one limit.
    from peers import Twistd

    first_port, second_port = free_port(), free_port()
    registries = [{"id": "up", "url": "http://127.0.0.1:9"}]
    first = write_config(tmp_path / "a.toml", first_port, tmp_path / "cache", registries, [("a", "up", "a")])
    second = write_config(tmp_path / "b.toml", second_port, tmp_path / "cache", registries, [("a", "up", "a")])
    process = Twistd(config_path=first, log_path=tmp_path / "log").start()
    try:
        process.wait_listening(first_port)
        (tmp_path / "cache" / "tmp" / "a-download-under-way").write_bytes(b"x")
        result = run_to_completion(cargobay_command(second))
        assert result.returncode == 2, result
        [line] = result.stderr.strip().splitlines()
        assert line == f"cargobay: cache.directory {tmp_path / 'cache'} is in use by another cargobay process " \
                       f"(pid {process.pid})", line
        assert (tmp_path / "cache" / "tmp" / "a-download-under-way").exists()
    finally:
        process.stop()
    # Once it has stopped, the directory is free.
    process = Twistd(config_path=second, log_path=tmp_path / "log2").start()
    try:
        process.wait_listening(second_port)
    finally:
        process.stop()


def test_what_cannot_listen_stops_startup_with_one_line(tmp_path):
    # A taken port, an address that is not an address, a bad metrics
    # endpoint: each was a forty-line traceback (exit 1) after "listening".
    from tls import TestCA

    locked = TestCA(tmp_path / "ca").issue("locked", ip_addresses=["127.0.0.1"], passphrase=b"secret")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = f'[auth]\njwt_secret = "x"\n[cache]\ndirectory = "{tmp_path / "cache"}"\n'
        for server, expected in [
            (f'bind_address = "127.0.0.1"\nport = {port}', "cargobay: server.listen: cannot listen on"),
            ('bind_address = "127.0.0.1:5000"', "cargobay: server.bind_address: '127.0.0.1:5000' is not an IP address"),
            (f'port = {free_port()}\n[metrics]\nlisten = "tcp:notaport"', "cargobay: metrics.listen: 'tcp:notaport'"),
            # TLS files said in words, naming the file; a key with a passphrase
            # had OpenSSL ask for it on the terminal, if any.
            (f'listen = "ssl:{free_port()}:privateKey={locked.key_path}:certKey={locked.cert_path}"',
             f"cargobay: server.listen: privateKey '{locked.key_path}' is encrypted with a passphrase; "
             "cargobay takes an unencrypted key"),
            (f'listen = "ssl:{free_port()}:privateKey={locked.cert_path}:certKey={locked.cert_path}"',
             f"cargobay: server.listen: privateKey '{locked.cert_path}' holds no PEM private key cargobay can use"),
            (f'listen = "ssl:{free_port()}:privateKey={tmp_path / "none.pem"}"',
             f"cargobay: server.listen: cannot read TLS file '{tmp_path / 'none.pem'}' (No such file or directory)"),
            # (Twisted takes them in order after the port too.)
            (f'listen = "ssl:{free_port()}:{locked.key_path}:{locked.cert_path}"',
             f"cargobay: server.listen: privateKey '{locked.key_path}' is encrypted with a passphrase; "
             "cargobay takes an unencrypted key"),
        ]:
            config = tmp_path / "bad.toml"
            config.write_text(f"[server]\n{server}\n{base}")
            result = run_to_completion(cargobay_command(config))
            assert result.returncode == 2, (server, result.stdout[-2000:], result.stderr)
            output = result.stdout + result.stderr
            assert expected in output and "Traceback" not in output, (server, output[-2000:])


def test_logs_go_where_twistd_is_told(upstream_anon, tmp_path):
    # --logfile (and, daemonised, twistd.log) got nothing: every line went to
    # stdout, which a daemon has closed.
    port = free_port()
    config = write_config(tmp_path / "config.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}], [])
    logfile = tmp_path / "cargobay.log"
    process = subprocess.Popen(
        [*twistd_command(), "-n", "--pidfile=", f"--logfile={logfile}", "cargobay", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: logfile.exists() and "cargobay listening" in logfile.read_text(), timeout=30)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read() == b"ok\n"
        wait_until(lambda: "GET /healthz 200" in logfile.read_text(), timeout=30)
    finally:
        process.terminate()
        stdout, _ = process.communicate(timeout=30)
    assert "GET /healthz" not in stdout


def test_the_brief_s_editable_install_gives_twistd_the_plugin(tmp_path):
    # `pip install -e '.[test]'`, without the Makefile's compat mode: the
    # default editable install reaches packages through an import hook,
    # which left twisted/plugins off sys.path ("Unknown command: cargobay").
    import site
    import sys

    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site_packages] = (venv / "lib").glob("python3*/site-packages")
    # This environment's packages (not its .pth files: not its own install of the checkout).
    (site_packages / "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "-e", str(root)],
        capture_output=True, text=True, timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    twistd = "import sys; sys.argv = ['twistd', '-n', 'cargobay', '--help']; from twisted.scripts.twistd import run; run()"
    result = subprocess.run([str(venv / "bin" / "python"), "-c", twistd], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Usage: twistd [options] cargobay " in result.stdout, (result.stdout[-1000:], result.stderr[-1000:])


def test_cargobay_token_plugin_prints_only_the_token(tmp_path):

    result = run_to_completion([*twistd_command(), "-n", "--pidfile=", "cargobay-token", "--secret", SECRET, "--expires-in", "60", "bob", "alpine,team/app"])
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert "\n" not in token
    from cargobay.tokens import TokenVerifier

    grant = TokenVerifier([SECRET]).verify(token)
    assert grant.subject == "bob" and grant.repositories == ("alpine", "team/app")
    # A mistake is one line on stderr and exit 2, nothing on stdout (where a
    # script takes the token from): twistd printed its usage there.
    for plugin, args, says in [
        ("cargobay-token", ["--secret", SECRET], "Wrong number of arguments"),
        ("cargobay-token", ["--secret", SECRET, "--expires-in", "abc", "bob"], "invalid literal"),
        ("cargobay-token", ["--secret", SECRET, "bob", "BAD NAME"], "'BAD NAME' is not a valid repository name"),
        # The earlier implementation's tool took "<secret> <subject>".
        ("cargobay-token", ["--secret", SECRET, SECRET, "user123"], "SUBJECT is a signing secret"),
        # More repositories than a token cargobay takes can carry (it printed one).
        ("cargobay-token", ["--secret", SECRET, "bob", ",".join(f"team{i}/repository-{i}" for i in range(2000))],
         "more than the 49152 cargobay takes"),
        ("cargobay", ["--bogus"], "option --bogus not recognized"),
    ]:
        bad = run_to_completion([*twistd_command(), "-n", "--pidfile=", plugin, *args])
        assert (bad.returncode, bad.stdout) == (2, ""), (args, bad)
        [line] = bad.stderr.strip().splitlines()
        assert line.startswith(f"{plugin}: ") and says in line, line
    # With --config, the token carries the issuer and audience the proxy's
    # config requires (they were left out: the same proxy refused it).
    config = tmp_path / "config.toml"
    config.write_text(f'[auth]\njwt_secret = "{SECRET}"\nissuer = "https://idp.test"\naudience = "cargobay"\n')
    result = run_to_completion([*twistd_command(), "-n", "--pidfile=", "cargobay-token", "--config", str(config), "ci"])
    assert result.returncode == 0, result.stderr
    verifier = TokenVerifier([SECRET], issuer="https://idp.test", audience="cargobay")
    assert verifier.verify(result.stdout.strip()).subject == "ci"
    secret_first = run_to_completion(
        [*twistd_command(), "-n", "--pidfile=", "cargobay-token", "--config", str(config), SECRET, "user123"])
    assert (secret_first.returncode, secret_first.stdout) == (2, "") and SECRET not in secret_first.stderr


# -- streaming --------------------------------------------------------------


@pytest.fixture(scope="module")
def big_blobs(upstream_anon):
    return {
        "gib": push_blob(upstream_anon, "library/big", 1024**3),
        "stall": push_blob(upstream_anon, "library/big", 256 * 1024**2),
    }


@pytest.fixture(scope="module")
def streaming_proxy(upstream_anon, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    proxy = start_proxy(tmp, [{"id": "anon", "url": upstream_anon.url}], [("big", "anon", "library/big")])
    yield proxy
    proxy.process.stop()


def test_one_gib_blob_streams_with_flat_memory(streaming_proxy, big_blobs):
    digest = big_blobs["gib"]
    baseline = streaming_proxy.rss_peak_kib()
    conn = http.client.HTTPConnection("127.0.0.1", streaming_proxy.port, timeout=120)
    conn.request("GET", f"/v2/big/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("Content-Length")) == 1024**3
    hasher = hashlib.sha256()
    received = 0
    while True:
        piece = response.read(1024 * 1024)
        if not piece:
            break
        hasher.update(piece)
        received += len(piece)
    conn.close()
    assert received == 1024**3
    assert "sha256:" + hasher.hexdigest() == digest
    peak = streaming_proxy.rss_peak_kib()
    assert peak < 100 * 1024, f"peak RSS {peak} KiB (baseline {baseline} KiB)"


def test_cold_blobs_received_into_the_cache_file_s_buffers_are_whole_for_clients_and_on_disk(upstream_anon, tmp_path):
    # Several cold blobs at once and then one more: the buffers each download
    # receives into and writes from are reused across downloads, and the
    # upstream connection each used is kept for the next request.
    sizes = [24 * 1024**2 + 123, 17 * 1024**2, 9 * 1024**2 + 4095, 33 * 1024**2 + 1]
    digests = [push_blob(upstream_anon, "library/direct", size) for size in sizes]
    proxy = start_proxy(
        tmp_path, [{"id": "anon", "url": upstream_anon.url}], [("direct", "anon", "library/direct")],
        env={"CARGOBAY_LOG_LEVEL": "debug"},
    )
    try:
        def pull(digest: str) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
            conn.request("GET", f"/v2/direct/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("X-Cache") == "MISS"
            hasher = hashlib.sha256()
            while piece := response.read(256 * 1024):
                hasher.update(piece)
            conn.close()
            return "sha256:" + hasher.hexdigest()

        with ThreadPoolExecutor(len(digests) - 1) as pool:
            assert list(pool.map(pull, digests[:-1])) == digests[:-1]
        assert pull(digests[-1]) == digests[-1]
        for digest in digests:
            with open(proxy.cached_blob(digest, timeout=60), "rb") as f:
                assert "sha256:" + hashlib.file_digest(f, "sha256").hexdigest() == digest
        # (Else this tested the copying path.)
        assert proxy.process.log_text().count("into its cache file's buffers") == len(digests)
    finally:
        proxy.process.stop()


def test_a_client_that_leaves_mid_body_has_its_access_line(streaming_proxy, big_blobs):
    # Twisted logs a request as it finishes: one whose client left had none.
    digest = big_blobs["gib"]
    conn = http.client.HTTPConnection("127.0.0.1", streaming_proxy.port, timeout=120)
    conn.request("GET", f"/v2/big/blobs/{digest}?left=1", headers={"Authorization": f"Bearer {ALL}"})
    response = conn.getresponse()
    assert response.status == 200 and len(response.read(5 * 1024 * 1024)) == 5 * 1024 * 1024
    conn.close()
    line = re.compile(rf"GET /v2/big/blobs/{digest}\?left=1 200 (\d+) subject=tester .*\(cut: ")
    assert wait_until(lambda: line.search(streaming_proxy.process.log_text()), timeout=60)
    sent = int(line.search(streaming_proxy.process.log_text()).group(1))
    assert 5 * 1024 * 1024 <= sent < 1024**3


def test_a_client_that_stops_reading_stops_the_upstream_read(streaming_proxy, big_blobs, upstream_anon):
    digest = big_blobs["stall"]
    size = 256 * 1024**2
    # A download that ended just before may still be on its way into the
    # cache (read back into the page cache before it becomes an entry).
    earlier = set(streaming_proxy.temp_files())
    sock = socket.create_connection(("127.0.0.1", streaming_proxy.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(
        f"GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\n\r\n".encode()
    )
    sock.recv(65536)
    # Wait until the download in progress stops growing: the proxy paused its
    # upstream read because this client does not read.
    sizes = []
    for _ in range(200):
        temps = set(streaming_proxy.temp_files()) - earlier
        sizes.append(sum(os.path.getsize(p) for p in temps))
        if len(sizes) >= 5 and len(set(sizes[-5:])) == 1 and sizes[-1] > 0:
            break
        time.sleep(0.2)
    assert len(set(sizes[-5:])) == 1, f"download kept growing: {sizes[-5:]}"
    assert 0 < sizes[-1] < size // 4, sizes[-1]
    # The client leaves: the download still finishes into the cache, once.
    sock.close()
    for _ in range(600):
        if any(p.name.startswith(digest.split(":")[1]) for p in streaming_proxy.cached_blob_files()):
            break
        time.sleep(0.1)
    status, headers, _ = streaming_proxy.request(f"/v2/big/blobs/{digest}", method="HEAD")
    assert status == 200 and headers.get("x-cache") == "HIT"
    assert upstream_anon.count_requests("GET", f"/blobs/{digest}") == 1
    # Nothing is left behind, once the earlier download (if any) is in too.
    assert wait_until(lambda: streaming_proxy.temp_files() == [], timeout=120), streaming_proxy.temp_files()


def test_a_client_that_takes_nothing_is_cut_after_send_timeout_seconds(upstream_anon, tmp_path):
    # Cold (the download's first client) and warm (from the cache file): a
    # stopped client would hold its connection and the file for 120 s.
    from peers import Twistd

    size = 64 * 1024**2
    digest = push_blob(upstream_anon, "library/stalled", size)
    port = free_port()
    config = write_config(tmp_path / "c.toml", port, tmp_path / "cache", [{"id": "anon", "url": upstream_anon.url}],
                          [("stalled", "anon", "library/stalled")])
    config.write_text(config.read_text().replace(f"port = {port}\n", f"port = {port}\nsend_timeout_seconds = 2\n", 1))
    process = Twistd(config_path=config, log_path=tmp_path / "log").start()
    proxy = Proxy(process, port, tmp_path / "cache")
    try:
        process.wait_listening(port)
        for round_, how in enumerate(("cold", "warm")):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(f"GET /v2/stalled/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\n\r\n".encode())
            received = len(sock.recv(65536))
            assert wait_until(lambda n=round_: process.log_text().count("client read nothing for 2 s; closing") > n), how
            sock.settimeout(60)
            try:
                while piece := sock.recv(1024 * 1024):
                    received += len(piece)
            except ConnectionResetError:
                pass
            sock.close()
            assert received < size, how
            if how == "cold":
                # The download went on without it, into the cache.
                assert wait_until(lambda: proxy.request(f"/v2/stalled/blobs/{digest}", method="HEAD")[1].get("x-cache") == "HIT")
    finally:
        process.stop()


def test_a_token_naming_hundreds_of_repositories_logs_in_and_pulls(proxy, images, tmp_path):
    # A CI runner's token: 800 repositories make a 25 KB JWT, a 33 KB Basic
    # header, over Twisted's 16 KiB default (the connection was dropped).
    token = mint_token(SECRET, "ci-runner", ["alpine"] + [f"team-{i:03d}/service-{i:03d}" for i in range(800)])
    assert 20_000 < len(token) < 48 * 1024
    raw = skopeo_inspect_raw(f"{proxy.host}/alpine:latest", creds=f"ci:{token}")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == images["single"]["manifest"]
    skopeo_pull(f"{proxy.host}/alpine:latest", tmp_path / "pulled", creds=f"ci:{token}")
    # Beyond the limit: an answer that says why, not a dropped connection.
    for headers, status in (({"X-Padding": "x" * 70_000}, 431), ({"X-A": "a" * 40_000, "X-B": "b" * 40_000}, 431)):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", "/v2/", headers=headers)
        response = conn.getresponse()
        assert response.status == status and response.reason == "Request Header Fields Too Large"
        assert json.loads(response.read())["errors"][0]["code"] == "UNSUPPORTED"
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.request("GET", "/v2/alpine/tags/list?last=" + "x" * 70_000)
    response = conn.getresponse()
    assert response.status == 414 and json.loads(response.read())["errors"][0]["code"] == "UNSUPPORTED"
    conn.close()
    # Each has its access line, though no request was ever whole.
    wait_until(lambda: "414 0 subject=- agent=- (request line too long)" in proxy.process.log_text(), timeout=30)
    assert proxy.process.log_text().count("431 0 subject=- agent=- (request headers too long)") >= 2


def _raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as written, on its own connection: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock, method=request.split(b" ", 1)[0].decode())
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_a_subject_that_does_not_print_is_logged_escaped(proxy):
    # A lone surrogate in a token's sub lost the request's access line (the
    # log file cannot encode it); a line break would have forged a line, and
    # a space another field.
    token = mint_token(SECRET, "\ud800\nforged subject=admin")
    status, _, _ = proxy.request("/v2/", token)
    assert status == 200
    logged = '"\\\\ud800\\\\nforged subject=admin"'
    assert wait_until(lambda: f"subject={logged} agent=" in proxy.process.log_text(), timeout=10)
    assert "\nforged" not in proxy.process.log_text()
    status, _, _ = proxy.request("/v2/alpine/manifests/latest", mint_token(SECRET, "x repository=secret"))
    assert status == 200
    assert wait_until(lambda: 'pull subject="x repository=secret" repository=alpine ' in proxy.process.log_text(), timeout=10)


def test_a_token_request_whose_body_is_a_broken_multipart_form_gets_an_oci_error(proxy):
    # Twisted parsed it (into args nobody reads), failed, and answered a bare
    # 400 with no body, logged as a client that left (499).
    body = b'{"grant_type":"password"}'
    status, answer, text = _raw_exchange(
        proxy.port, b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    assert status == 400 and answer["content-type"] == "application/json"
    assert json.loads(text)["errors"][0]["code"] == "UNSUPPORTED"
    assert wait_until(lambda: "POST /token 400" in proxy.process.log_text(), timeout=10)


def test_a_host_that_is_not_ascii_and_two_credentials_are_refused(proxy):
    # A Host of b"\xe9" got Klein's HTML 400 and a logged traceback, on every
    # route, unauthenticated; with two Authorization headers the last one
    # counted, where a front proxy may have checked the first.
    garbage = b"Authorization: Bearer garbage\r\n"
    good = f"Authorization: Bearer {ALL}\r\n".encode()
    for path, headers in (("/v2/", b"Host: \xe9\r\n"), ("/healthz", b"Host: x:\xff\r\n"),
                          ("/v2/", b"Host: x\r\n" + garbage + good), ("/v2/", b"Host: x\r\n" + good + garbage)):
        status, answer, body = _raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\n".encode() + headers
                                             + b"Connection: close\r\n\r\n")
        assert status == 400, (path, headers, body)
        assert answer["content-type"] == "application/json"
        assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert "Invalid encoding" not in proxy.process.log_text()


def test_http_request_forms(proxy, images):
    digest = images["single"]["manifest"]
    auth = f"Authorization: Bearer {ALL}\r\n".encode()
    accept = b"Accept: application/vnd.oci.image.manifest.v1+json\r\n"
    # The absolute form is a forward proxy's: refused, saying why (served as
    # a path, it would give another registry's name this proxy's image).
    # (A bracketed host that is no address, or not closed, was a 500 and a traceback.)
    for target in ("http://other-registry/v2/alpine/manifests/latest", f"http://other:{proxy.port}/v2/",
                   "http://[::zz]/v2/", f"http://[::1:{proxy.port}/v2/"):
        status, _, body = _raw_exchange(
            proxy.port, f"GET {target} HTTP/1.1\r\nHost: other\r\n".encode()
            + auth + accept + b"Connection: close\r\n\r\n"
        )
        assert status == 400 and "forward proxy" in json.loads(body)["errors"][0]["message"]
    # Naming this server, it is the same request in origin form (RFC 9112
    # 3.2.2: a server must take it, and the target's authority is the host).
    for authority in (f"127.0.0.1:{proxy.port}", f"localhost:{proxy.port}"):
        status, headers, _ = _raw_exchange(
            proxy.port, f"GET http://{authority}/v2/alpine/manifests/{digest}?x=1 HTTP/1.1\r\nHost: elsewhere\r\n".encode()
            + auth + accept + b"Connection: close\r\n\r\n"
        )
        assert status == 200 and headers["docker-content-digest"] == digest
    # A percent-encoded ":" in a digest, as distribution takes it.
    status, headers, _ = _raw_exchange(
        proxy.port, f"GET /v2/alpine/manifests/{digest.replace(':', '%3A')} HTTP/1.1\r\nHost: x\r\n".encode()
        + auth + accept + b"Connection: close\r\n\r\n"
    )
    assert status == 200 and headers["docker-content-digest"] == digest
    # HTTP/1.1 without Host is a 400.
    status, _, body = _raw_exchange(proxy.port, b"GET /v2/ HTTP/1.1\r\n" + auth + b"Connection: close\r\n\r\n")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    # Two Host headers are a 400 too (the token realm is built from it).
    status, _, body = _raw_exchange(proxy.port, b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + auth + b"\r\n")
    assert status == 400
    # A 405 names what is allowed.
    for method, path, allowed in (
        ("OPTIONS", "/v2/alpine/manifests/latest", "GET, HEAD"), ("OPTIONS", "/token", "GET, POST"),
        ("OPTIONS", "/healthz", "GET, HEAD"), ("HEAD", "/v2/alpine/tags/list", "GET"),
        ("OPTIONS", f"/v2/alpine/referrers/{digest}", "GET"),
    ):
        status, headers, body = _raw_exchange(
            proxy.port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth + b"Connection: close\r\n\r\n"
        )
        assert (status, headers.get("allow")) == (405, allowed), (path, body)
        if method != "HEAD":
            assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
