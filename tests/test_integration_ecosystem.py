"""
Fitting the ecosystem, against the real twistd process: HTTPS served directly
and verified by a real client, Prometheus metrics after a pull, SIGHUP
reloads, and the container image's build steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tls import TestCA

from peers import REPO_ROOT, Twistd, build_oci_layout, free_port, push_blob, skopeo, skopeo_push, wait_until
from proxy import ALL, Proxy, start_proxy, write_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image(upstream_anon, tmp_path_factory):
    work = tmp_path_factory.mktemp("eco-image")
    built = build_oci_layout(work / "img", "latest", layer_sizes=[400_000, 100_000])
    skopeo_push(work / "img", "latest", f"{upstream_anon.host}/library/ecosystem:latest")
    return built


def test_https_listener_verified_by_skopeo(upstream_anon, image, tmp_path):
    # Signed by an intermediate, as public CAs do: the README's recipe sends
    # it along (extraCertChain), and clients trust only the root.
    ca = TestCA(tmp_path / "ca")
    intermediate = TestCA(tmp_path / "intermediate", "cargobay tests intermediate", issuer=ca)
    server = intermediate.issue("proxy", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    port = free_port()
    listen = (f"ssl:{port}:interface=127.0.0.1:privateKey={server.key_path}:certKey={server.cert_path}"
              f":extraCertChain={intermediate.cert_path}")
    config = write_config(tmp_path / "tls.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}], [("eco", "up", "library/ecosystem")])
    text = config.read_text().replace(f"port = {port}\n", f'port = {port}\nlisten = "{listen}"\n', 1)
    config.write_text(text)
    process = Twistd(config_path=config, log_path=tmp_path / "tls.log").start()
    try:
        process.wait_listening(port)
        cert_dir = tmp_path / "certs.d"
        cert_dir.mkdir()
        (cert_dir / "ca.crt").write_bytes(ca.cert_path.read_bytes())
        # skopeo verifies the certificate against the CA directory.
        raw = skopeo("inspect", "--raw", f"--cert-dir={cert_dir}", f"--creds=t:{ALL}", f"docker://127.0.0.1:{port}/eco:latest").stdout.encode()
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == image["manifest"]
        out = tmp_path / "out"
        skopeo("copy", f"--src-cert-dir={cert_dir}", f"--src-creds=t:{ALL}", f"docker://127.0.0.1:{port}/eco:latest", f"dir:{out}")
        assert (out / "manifest.json").read_bytes() == raw
        assert healthcheck(config).returncode == 0  # the image's HEALTHCHECK, over TLS
        # Without the CA, verification fails: the certificate really is checked.
        with pytest.raises(RuntimeError, match="certificate"):
            skopeo("inspect", "--raw", f"--creds=t:{ALL}", f"docker://127.0.0.1:{port}/eco:latest")
        # The token realm a client is sent to is https too.
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=context)
        except urllib.error.HTTPError as e:
            assert e.code == 401
            assert e.headers["WWW-Authenticate"].startswith(f'Bearer realm="https://127.0.0.1:{port}/token"')
    finally:
        process.stop()


def _with_server_keys(config: Path, port: int, keys: str) -> None:
    config.write_text(config.read_text().replace(f"port = {port}\n", f"port = {port}\n{keys}\n", 1))


def test_sigterm_lets_pulls_under_way_end_and_closes_idle_connections(upstream_anon, tmp_path):
    # A rolling restart cut every pull in progress in the middle of its layer.
    digest = push_blob(upstream_anon, "library/draining", 64 * 1024 * 1024)
    port = free_port()
    config = write_config(tmp_path / "config.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}],
                          [("draining", "up", "library/draining")])
    _with_server_keys(config, port, "shutdown_grace_seconds = 60")
    process = Twistd(config_path=config, log_path=tmp_path / "cargobay.log").start()
    proxy = Proxy(process, port, tmp_path / "cache")
    try:
        process.wait_listening(port)
        assert proxy.request(f"/v2/draining/blobs/{digest}")[0] == 200  # cached now
        proxy.cached_blob(digest)
        import http.client

        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        idle.request("GET", "/v2/", headers={"Authorization": f"Bearer {ALL}"})
        idle.getresponse().read()
        pulling = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        pulling.request("GET", f"/v2/draining/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
        response = pulling.getresponse()
        first = response.read(1024 * 1024)
        os.kill(process.pid, signal.SIGTERM)

        def refused() -> bool:
            try:
                __import__("socket").create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True

        assert wait_until(refused, timeout=30)  # no new connections...
        assert idle.sock.recv(1) == b""  # ...an idle one closed...
        # (A reload asked for now, by a config reloader say, is not one: it
        # ended the process at once, cutting the pull.)
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "reload ignored: shutting down" in process.log_text(), timeout=30)
        assert process.returncode is None  # ...while the pull goes on, to its end
        hasher = hashlib.sha256(first)
        while chunk := response.read(1024 * 1024):
            hasher.update(chunk)
            time.sleep(0.002)
        assert "sha256:" + hasher.hexdigest() == digest
        assert wait_until(lambda: process.returncode is not None, timeout=30)
        assert process.returncode == -signal.SIGTERM  # twistd's way to exit on a signal
        assert "still under way" not in process.log_text() and "Traceback" not in process.log_text()
    finally:
        process.stop()


@pytest.mark.parametrize("end", ["grace", "second signal"])
def test_sigterm_cuts_a_pull_that_outlasts_the_grace(upstream_anon, tmp_path, end):
    digest = push_blob(upstream_anon, "library/outlasting", 64 * 1024 * 1024)
    port = free_port()
    config = write_config(tmp_path / "config.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}],
                          [("outlasting", "up", "library/outlasting")])
    _with_server_keys(config, port, f"shutdown_grace_seconds = {0.5 if end == 'grace' else 3600}")
    process = Twistd(config_path=config, log_path=tmp_path / "cargobay.log").start()
    proxy = Proxy(process, port, tmp_path / "cache")
    try:
        process.wait_listening(port)
        assert proxy.request(f"/v2/outlasting/blobs/{digest}")[0] == 200
        proxy.cached_blob(digest)
        import http.client

        stuck = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stuck.request("GET", f"/v2/outlasting/blobs/{digest}", headers={"Authorization": f"Bearer {ALL}"})
        response = stuck.getresponse()
        response.read(1024 * 1024)  # and no more: a client that stopped reading
        os.kill(process.pid, signal.SIGTERM)
        if end == "second signal":
            assert wait_until(lambda: f"(TCP Port {port} Closed)" in process.log_text(), timeout=30)
            os.kill(process.pid, signal.SIGTERM)
        assert wait_until(lambda: process.returncode is not None, timeout=30)
        assert process.returncode == -signal.SIGTERM  # twistd's way to exit on a signal
        assert "1 requests still under way " + ("after" if end == "grace" else "at a second signal") in process.log_text()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
    finally:
        process.stop()


def _served_certificate(port: int, ca: TestCA, check_dates: bool = True) -> bytes:
    """What the listener on C{port} serves (verified against C{ca}, or not at all without C{check_dates})."""
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    if not check_dates:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True)


def _der(cert_path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert_path.read_text())


def test_sighup_serves_a_renewed_certificate_to_new_connections(tmp_path):
    # Renewed in place (certbot, cert-manager), then `kill -HUP`: the old
    # certificate stayed until a restart, and expired there.
    ca = TestCA(tmp_path / "ca")
    first, renewed = (ca.issue(name, ip_addresses=["127.0.0.1"]) for name in ("first", "renewed"))
    live = tmp_path / "live"
    live.mkdir()
    key, cert = live / "privkey.pem", live / "cert.pem"
    key.write_bytes(first.key_path.read_bytes())
    cert.write_bytes(first.cert_path.read_bytes())
    port = free_port()
    config = write_config(tmp_path / "tls.toml", port, tmp_path / "cache",
                          [{"id": "up", "url": "http://127.0.0.1:9"}], [("eco", "up", "library/ecosystem")])
    config.write_text(config.read_text().replace(
        f"port = {port}\n", f'port = {port}\nlisten = "ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"\n', 1))
    process = Twistd(config_path=config, log_path=tmp_path / "tls.log").start()
    try:
        process.wait_listening(port)
        assert _served_certificate(port, ca) == _der(first.cert_path)
        # Plain HTTP sent to it is answered, naming the mistake: it was cut
        # without a word (ctr said only "EOF", hiding a missing CA).
        for pieces in ([b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"], [b"DE", b"LETE /v2/x HTTP/1.1\r\n\r\n"]):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
                for piece in pieces:
                    plain.sendall(piece)
                    time.sleep(0.2)
                answer = b""
                while chunk := plain.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 ") and b"plain HTTP sent to an HTTPS port: use https://" in answer, answer
        assert wait_until(lambda: "GET /v2/ 400 0 subject=- agent=- (plain HTTP on an HTTPS port)" in process.log_text(),
                          timeout=10)
        # A connection open across the reload keeps working.
        import http.client

        kept = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=ssl.create_default_context(cafile=str(ca.cert_path)))
        kept.request("GET", "/v2/")
        kept.getresponse().read()
        key.write_bytes(renewed.key_path.read_bytes())
        cert.write_bytes(renewed.cert_path.read_bytes())
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: "TLS key and certificate files re-read" in process.log_text(), timeout=10)
        assert _served_certificate(port, ca) == _der(renewed.cert_path)
        kept.request("GET", "/v2/")
        response = kept.getresponse()
        assert response.status == 401
        response.read()
        kept.close()
        # Half a renewal (the new certificate, the old key): refused, the
        # renewed pair goes on being served.  So is a pair whose certificate
        # has expired (every new pull would have failed), and a key with a
        # passphrase (OpenSSL asked for it on the terminal, if the process
        # had one, and every request waited).
        expired = ca.issue("expired", ip_addresses=["127.0.0.1"], valid_days=(-30, -1))
        locked = ca.issue("locked", ip_addresses=["127.0.0.1"], passphrase=b"secret")
        for pair, said in (
            ((first.key_path, renewed.cert_path), "keeping the TLS certificate in use, the files do not make a usable one"),
            ((expired.key_path, expired.cert_path), f"keeping the TLS certificate in use: the certificate in '{cert}' expired on"),
            ((locked.key_path, locked.cert_path), f"keeping the TLS certificate in use: privateKey '{key}' is encrypted"),
        ):
            key.write_bytes(pair[0].read_bytes())
            cert.write_bytes(pair[1].read_bytes())
            os.kill(process.pid, signal.SIGHUP)
            assert wait_until(lambda said=said: said in process.log_text(), timeout=10), process.log_text()[-2000:]
            assert _served_certificate(port, ca) == _der(renewed.cert_path)
        # One not valid yet is taken (a clock a little behind the issuer's), said as an error.
        early = ca.issue("early", ip_addresses=["127.0.0.1"], valid_days=(1, 30))
        key.write_bytes(early.key_path.read_bytes())
        cert.write_bytes(early.cert_path.read_bytes())
        os.kill(process.pid, signal.SIGHUP)
        assert wait_until(lambda: f"the certificate in '{cert}' is not valid before" in process.log_text(), timeout=10)
        assert wait_until(lambda: _served_certificate(port, ca, check_dates=False) == _der(early.cert_path), timeout=10)
        assert process.returncode is None
        assert "Traceback" not in process.log_text()
    finally:
        process.stop()


def test_a_certificate_out_of_its_dates_at_start_is_logged_as_an_error(tmp_path):
    # It started without a word, and every client refused it.
    ca = TestCA(tmp_path / "ca")
    expired = ca.issue("expired", ip_addresses=["127.0.0.1"], valid_days=(-30, -1))
    port = free_port()
    config = write_config(tmp_path / "tls.toml", port, tmp_path / "cache",
                          [{"id": "up", "url": "http://127.0.0.1:9"}], [("eco", "up", "library/ecosystem")])
    config.write_text(config.read_text().replace(f"port = {port}\n", f'port = {port}\nlisten = "ssl:{port}:interface=127.0.0.1:'
                                                 f'privateKey={expired.key_path}:certKey={expired.cert_path}"\n', 1))
    process = Twistd(config_path=config, log_path=tmp_path / "tls.log").start()
    try:
        process.wait_listening(port)
        assert f"server.listen: the certificate in '{expired.cert_path}' expired on" in process.log_text()
    finally:
        process.stop()


def metric_values(proxy: Proxy) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"{proxy.url}/metrics").read().decode()
    values = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values, name, **labels):
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_by_the_right_amounts_after_a_pull(upstream_anon, image, tmp_path):
    proxy = start_proxy(tmp_path, [{"id": "up", "url": upstream_anon.url}], [("eco", "up", "library/ecosystem")])
    try:
        before = metric_values(proxy)
        layer = image["layers"][0]
        status, _, body = proxy.request(f"/v2/eco/blobs/{layer}")
        assert status == 200
        size = len(body)
        proxy.cached_blob(layer)  # an entry just after the response; until then a GET joins the fetch
        status, _, _ = proxy.request(f"/v2/eco/blobs/{layer}")
        assert status == 200
        after = metric_values(proxy)
        assert value(after, "cargobay_cache_requests_total", kind="blob", result="miss") - value(before, "cargobay_cache_requests_total", kind="blob", result="miss") == 1
        assert value(after, "cargobay_cache_requests_total", kind="blob", result="hit") - value(before, "cargobay_cache_requests_total", kind="blob", result="hit") == 1
        assert value(after, "cargobay_served_bytes_total", source="upstream") - value(before, "cargobay_served_bytes_total", source="upstream") == size
        assert value(after, "cargobay_served_bytes_total", source="cache") - value(before, "cargobay_served_bytes_total", source="cache") == size
        assert value(after, "cargobay_upstream_received_bytes_total", registry="up") == size
        assert value(after, "cargobay_cache_entries") == 1 and value(after, "cargobay_cache_size_bytes") == size
        assert value(after, "cargobay_http_requests_total", route="blob", method="GET", status="200") == 2
        assert value(after, "cargobay_upstream_request_duration_seconds_count", registry="up") >= 1
        # Health endpoints need no token.
        assert urllib.request.urlopen(f"{proxy.url}/healthz").read() == b"ok\n"
        assert urllib.request.urlopen(f"{proxy.url}/readyz").read() == b"ok\n"
    finally:
        proxy.process.stop()


def test_metrics_on_a_listener_of_their_own_still_need_a_token_when_required(upstream_anon, tmp_path):
    port = free_port()
    extra = f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\nrequire_auth = true'
    proxy = start_proxy(tmp_path, [{"id": "up", "url": upstream_anon.url}], [("eco", "up", "library/ecosystem")], extra)
    try:
        proxy.process.wait_listening(port)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics")
        assert refused.value.code == 401
        asked = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {ALL}"})
        assert b"cargobay_http_requests_total" in urllib.request.urlopen(asked).read()
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read() == b"ok\n"
    finally:
        proxy.process.stop()


def test_sighup_reloads_mappings_and_keeps_the_old_config_when_broken(upstream_anon, image, tmp_path):
    proxy = start_proxy(tmp_path, [{"id": "up", "url": upstream_anon.url}], [("eco", "up", "library/ecosystem")])
    config = tmp_path / "config.toml"
    try:
        status, _, _ = proxy.request("/v2/renamed/tags/list")
        assert status == 404
        # A long download in progress survives the reload.
        conn = __import__("http.client").client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        conn.request("GET", f"/v2/eco/blobs/{image['layers'][0]}", headers={"Authorization": f"Bearer {ALL}"})
        response = conn.getresponse()
        first = response.read(1000)
        config.write_text(config.read_text() + '\n[[repositories]]\nname = "renamed"\nregistry_id = "up"\nupstream_name = "library/ecosystem"\n')
        os.kill(proxy.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while proxy.request("/v2/renamed/tags/list")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, _, body = proxy.request("/v2/renamed/tags/list")
        assert status == 200 and json.loads(body)["name"] == "renamed"
        rest = response.read()
        assert "sha256:" + hashlib.sha256(first + rest).hexdigest() == image["layers"][0]
        conn.close()
        # A broken file is refused; the running mapping stays.
        config.write_text(config.read_text() + "\n[[repositories]]\nname = 'x'\n")
        os.kill(proxy.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in proxy.process.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload refused" in proxy.process.log_text()
        assert proxy.request("/v2/renamed/tags/list")[0] == 200
        assert proxy.process.returncode is None
        # A lower size limit evicts at once, not at the next timer run (60 s).
        proxy.cached_blob(image["layers"][0])
        config.write_text(config.read_text().replace("\n[[repositories]]\nname = 'x'\n", "")
                          .replace("max_size_bytes = 20000000000", "max_size_bytes = 1"))
        os.kill(proxy.process.pid, signal.SIGHUP)
        assert wait_until(lambda: not proxy.cached_blob_files(), timeout=10)
    finally:
        proxy.process.stop()


@pytest.mark.parametrize("how", ["sighup", "restart"])
def test_a_registry_id_pointed_at_another_registry_serves_nothing_of_the_old_one_under_names(
    upstream_anon, image, tmp_path, how
):
    # Re-pointing a registry id (SIGHUP or restart): the tag kept serving the
    # old registry's manifest until its TTL, and its blobs and manifests
    # stayed served under the name for good, which the new one never showed.
    from peers import Registry

    other = Registry(tmp_path / "other").start()
    try:
        proxy = start_proxy(tmp_path, [{"id": "up", "url": upstream_anon.url}], [("eco", "up", "library/ecosystem")])
        layer = image["layers"][0]
        try:
            for path in ("/v2/eco/manifests/latest", f"/v2/eco/manifests/{image['manifest']}", f"/v2/eco/blobs/{layer}"):
                assert proxy.request(path)[0] == 200, path
            config = tmp_path / "config.toml"
            config.write_text(config.read_text().replace(upstream_anon.url, other.url))
            if how == "sighup":
                os.kill(proxy.process.pid, signal.SIGHUP)
                assert wait_until(lambda: "now points at" in proxy.process.log_text(), timeout=10)
            else:
                proxy.process.stop()
                proxy.process = Twistd(config_path=config, log_path=tmp_path / "again.log").start()
                proxy.process.wait_listening(proxy.port)
            for path in ("/v2/eco/manifests/latest", f"/v2/eco/manifests/{image['manifest']}", f"/v2/eco/blobs/{layer}"):
                status, _, _ = proxy.request(path)
                assert status == 404, (path, status)
            assert "now points at" in proxy.process.log_text()
        finally:
            proxy.process.stop()
    finally:
        other.stop()


def _manifest_registry(salt: str, delay: float):
    """A registry of one tag on one manifest of its own, answering after C{delay} seconds."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": "sha256:" + salt * 64, "size": 2}, "layers": []}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if "/manifests/" in self.path:
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(manifest).hexdigest())
                self.send_header("Content-Length", str(len(manifest)))
                self.end_headers()
                self.wfile.write(manifest)
            else:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, "sha256:" + hashlib.sha256(manifest).hexdigest()


def test_a_request_under_way_on_the_old_url_at_a_reload_leaves_nothing_under_names(tmp_path):
    # Its tag resolution, written as it ended, outlived the forgetting: the
    # old registry's manifest was a fresh hit until the tag's TTL.
    import threading

    old, old_digest = _manifest_registry("a", 3.0)
    new, new_digest = _manifest_registry("b", 0.0)
    try:
        proxy = start_proxy(tmp_path, [{"id": "r", "url": f"http://127.0.0.1:{old.server_port}"}], [("a", "r", "lib/a")])
        try:
            first = {}
            under_way = threading.Thread(target=lambda: first.update(answer=proxy.request("/v2/a/manifests/t1")))
            under_way.start()
            time.sleep(1)
            config = tmp_path / "config.toml"
            config.write_text(config.read_text().replace(f":{old.server_port}", f":{new.server_port}"))
            os.kill(proxy.process.pid, signal.SIGHUP)
            under_way.join(30)
            assert first["answer"][1].get("docker-content-digest") == old_digest  # (it was asked before)
            time.sleep(0.3)
            status, headers, _ = proxy.request("/v2/a/manifests/t1")
            assert (status, headers.get("docker-content-digest")) == (200, new_digest)
        finally:
            proxy.process.stop()
    finally:
        old.shutdown()
        new.shutdown()


def test_a_client_that_left_before_any_answer_is_logged_499(tmp_path):
    import socket

    slow, _ = _manifest_registry("c", 2.0)
    try:
        proxy = start_proxy(tmp_path, [{"id": "r", "url": f"http://127.0.0.1:{slow.server_port}"}], [("a", "r", "lib/a")])
        try:
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(f"GET /v2/a/manifests/gone HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALL}\r\n\r\n".encode())
                time.sleep(0.5)
            assert wait_until(lambda: "GET /v2/a/manifests/gone 499 0 " in proxy.process.log_text(), timeout=10)
        finally:
            proxy.process.stop()
    finally:
        slow.shutdown()


def _catches_sighup(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


def test_a_sighup_while_starting_up_is_a_reload_once_started(tmp_path):
    # A config tool's reload just after a start (the cache's scan takes
    # seconds with many entries) ended the process without a log line.
    cache = tmp_path / "cache"
    for i in range(20000):
        data = b"%d" % i
        digest = hashlib.sha256(data).hexdigest()
        directory = cache / "blobs" / "up" / "sha256" / digest[:2]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{digest}-{len(data)}").write_bytes(data)
    port = free_port()
    config = write_config(tmp_path / "config.toml", port, cache, [{"id": "up", "url": "http://127.0.0.1:9"}],
                          [("x", "up", "x")])
    process = Twistd(config_path=config, log_path=tmp_path / "cargobay.log").start()
    try:
        # As the cache's scan begins (its first step makes tmp/).
        assert wait_until(lambda: (cache / "tmp").exists() or process.returncode is not None, timeout=60)
        assert _catches_sighup(process.pid)
        os.kill(process.pid, signal.SIGHUP)
        process.wait_listening(port)
        assert wait_until(lambda: "reloaded" in process.log_text(), timeout=30), process.log_text()[-2000:]
        assert process.returncode is None
    finally:
        process.stop()


def test_dockerfile_steps_build_a_working_install(tmp_path):
    """
    No Docker engine can build images here; run the Dockerfile's own RUN
    steps in a fresh virtualenv instead and start the result.
    """
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "USER cargobay" in dockerfile and "HEALTHCHECK" in dockerfile and "VOLUME" in dockerfile
    # The earlier implementation's image read /app/config.toml (no CONFIG_PATH to override it).
    assert "WORKDIR /app" in dockerfile and "CONFIG_PATH=" not in dockerfile
    assert "ln -s /etc/cargobay/config.toml /app/config.toml" in dockerfile
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", str(REPO_ROOT)], check=True, timeout=600)
    python = venv / "bin" / "python"
    # The plugin cache step of the Dockerfile.
    subprocess.run([str(python), "-c", "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"], check=True, cwd=tmp_path)
    result = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert "cargobay" in result.stdout and "cargobay-token" in result.stdout
    token = subprocess.run([str(venv / "bin" / "cargobay-token"), "--secret", "s" * 32, "x"], capture_output=True, text=True, cwd=tmp_path)
    assert token.returncode == 0 and token.stdout.count(".") == 2


def healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    """The container image's HEALTHCHECK command, run here."""
    return subprocess.run([sys.executable, "-m", "cargobay.healthcheck", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_the_image_healthcheck_asks_the_running_proxy_whatever_its_config_file_says_meanwhile(upstream_anon, tmp_path):
    # A listener change waits for a restart, and an edit may leave the file
    # broken for a while: the proxy still answers where it listens.
    from cargobay.healthcheck import state_path

    proxy = start_proxy(tmp_path, [{"id": "up", "url": upstream_anon.url}], [])
    config = tmp_path / "config.toml"
    state = Path(state_path(str(config)))
    try:
        assert healthcheck(config).returncode == 0
        config.write_text(config.read_text().replace(f"port = {proxy.port}\n", f"port = {free_port()}\n", 1))
        result = healthcheck(config)
        assert result.returncode == 0, result.stderr
        good = config.read_text()
        config.write_text(good[: len(good) // 2])  # half-way through an edit
        result = healthcheck(config)
        assert result.returncode == 0, result.stderr
        assert state.exists()
    finally:
        proxy.process.stop()
    # Once it has stopped, the file it wrote is gone, and the config file says.
    assert not state.exists()
    result = healthcheck(config)
    assert result.returncode == 1 and result.stderr.startswith("cargobay healthcheck: "), result.stderr


def test_a_healthcheck_file_left_by_a_killed_proxy_vouches_for_no_other_process(upstream_anon, tmp_path):
    # kill -9 (the OOM killer) leaves the file; another process now answers
    # /healthz on the old port.
    from cargobay.healthcheck import state_path

    proxy = start_proxy(tmp_path / "a", [{"id": "up", "url": upstream_anon.url}], [])
    config = tmp_path / "a" / "config.toml"
    state = Path(state_path(str(config)))
    other = None
    try:
        assert state.exists()
        proxy.process.kill9()
        assert state.exists()  # left behind
        config.write_text(config.read_text().replace(f"port = {proxy.port}\n", f"port = {free_port()}\n", 1))
        other_config = write_config(tmp_path / "b" / "config.toml", proxy.port, tmp_path / "b" / "cache",
                                    [{"id": "up", "url": upstream_anon.url}], [])
        other = Twistd(config_path=other_config, log_path=tmp_path / "b" / "log").start()
        other.wait_listening(proxy.port)
        result = healthcheck(config)
        assert result.returncode == 1, result.stderr
    finally:
        if other is not None:
            other.stop()
        proxy.process.stop()
        state.unlink(missing_ok=True)


def test_the_healthcheck_finds_the_running_proxy_after_a_configmap_update(upstream_anon, tmp_path):
    # Kubernetes mounts a ConfigMap as config.toml -> ..data/config.toml,
    # ..data -> ..<version>/; an update swaps ..data (here to a new port,
    # which waits for a restart).
    mount = tmp_path / "mount"
    (mount / "..v1").mkdir(parents=True)
    port = free_port()
    write_config(mount / "..v1" / "config.toml", port, tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}], [])
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/config.toml", mount / "config.toml")
    config = mount / "config.toml"
    process = Twistd(config_path=config, log_path=tmp_path / "log").start()
    try:
        process.wait_listening(port)
        assert healthcheck(config).returncode == 0
        (mount / "..v2").mkdir()
        write_config(mount / "..v2" / "config.toml", free_port(), tmp_path / "cache", [{"id": "up", "url": upstream_anon.url}], [])
        os.symlink("..v2", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")
        result = healthcheck(config)
        assert result.returncode == 0, result.stderr
    finally:
        process.stop()


def test_a_fifo_where_the_healthcheck_file_goes_does_not_hang_it(tmp_path):
    from cargobay.healthcheck import state_path

    config = write_config(tmp_path / "config.toml", free_port(), tmp_path / "cache", [{"id": "up", "url": "http://127.0.0.1:9"}], [])
    fifo = state_path(str(config))
    os.makedirs(os.path.dirname(fifo), mode=0o700, exist_ok=True)
    os.mkfifo(fifo)
    try:
        result = healthcheck(config)  # (it would wait for a writer)
        assert result.returncode == 1 and "Connection refused" in result.stderr, result.stderr
    finally:
        os.unlink(fifo)


def test_the_image_healthcheck_asks_where_the_config_says_the_proxy_listens(upstream_anon, tmp_path):
    # It was hard-wired to port 5000: unhealthy on any other port or listener.
    metrics_port = free_port()
    for name, extra in (("plain", ""), ("metrics", f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"')):
        proxy = start_proxy(tmp_path / name, [{"id": "up", "url": upstream_anon.url}], [], extra)
        config = tmp_path / name / "config.toml"
        try:
            if extra:
                proxy.process.wait_listening(metrics_port)
            result = healthcheck(config)
            assert result.returncode == 0, (name, result.stderr)
        finally:
            proxy.process.stop()
        result = healthcheck(config)
        assert result.returncode == 1 and result.stderr.startswith("cargobay healthcheck: "), result.stderr
