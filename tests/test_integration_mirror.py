"""
cargobay as a registry mirror, with the real clients' own mirror settings and
a real CNCF registry standing in for Docker Hub:

- Docker Engine with ``--registry-mirror`` pulling ``alpine`` (a Docker Hub
  name, sent to the mirror as ``library/alpine``);
- containerd with a ``hosts.toml`` mirror for docker.io (requests carry
  ``?ns=docker.io``);
- podman with a ``registries.conf`` mirror.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

from cargobay.tokens import mint_token
from clients import Containerd, Dockerd, podman
from peers import Registry, build_oci_layout, need, skopeo_push
from proxy import SECRET, Proxy, start_proxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in for Docker Hub, with two official images."""
    need("skopeo")
    registry = Registry(tmp_path_factory.mktemp("fake-hub")).start()
    work = tmp_path_factory.mktemp("hub-images")
    images = {
        "alpine": build_oci_layout(work / "alpine", "latest", layers=[b"mirrored alpine\n" * 40]),
        "busybox": build_oci_layout(work / "busybox", "latest", layers=[b"mirrored busybox\n" * 40]),
    }
    for name in images:
        skopeo_push(work / name, "latest", f"{registry.host}/library/{name}:latest")
    registry.images = images  # type: ignore[attr-defined]
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def mirror(hub, tmp_path_factory) -> Proxy:
    """
    cargobay as the mirror of the stand-in hub: every name is the hub's own
    (`*` -> `*`), the hub answers to ?ns=docker.io, and Docker Hub's implicit
    library/ applies.
    """
    tmp = tmp_path_factory.mktemp("mirror")
    proxy = start_proxy(tmp, [{"id": "hub", "url": hub.url}], [("*", "hub", "*")])
    config = tmp / "config.toml"
    text = config.read_text().replace(
        f'url = "{hub.url}"', f'url = "{hub.url}"\nhosts = ["docker.io"]\nimplicit_library = true'
    )
    config.write_text(text)
    proxy.process.stop()
    from peers import Twistd

    process = Twistd(config_path=config, log_path=tmp / "mirror.log").start()
    process.wait_listening(proxy.port)
    mirror = Proxy(process, proxy.port, proxy.cache)
    yield mirror
    process.stop()


def test_docker_registry_mirror(hub, mirror, tmp_path):
    token = mint_token(SECRET, "docker-mirror", ["library/alpine"])
    daemon = Dockerd(tmp_path / "dockerd", extra_args=["--registry-mirror", mirror.url])
    daemon.start()
    try:
        # No internet: `docker login` to Docker Hub is impossible, so put the
        # credentials where docker login would: the daemon uses Docker Hub's
        # credentials for its mirror too.
        auth = base64.b64encode(f"mirror-user:{token}".encode()).decode()
        daemon.cli_config.mkdir(parents=True, exist_ok=True)
        (daemon.cli_config / "config.json").write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
        )
        pulled = daemon.docker("pull", "alpine:latest")
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        inspected = daemon.docker("image", "inspect", "--format", "{{.Id}}", "alpine:latest", check=True)
        assert inspected.stdout.strip() == hub.images["alpine"]["configs"][0]
        assert hub.count_requests("GET", "/v2/library/alpine/") >= 1
        log = mirror.process.log_text()
        assert "subject=docker-mirror" in log and "repository=library/alpine" in log
        # The token names local names: busybox is not in it.
        refused = daemon.docker("pull", "busybox:latest")
        assert refused.returncode != 0
    finally:
        daemon.stop()


def test_containerd_hosts_toml_mirror_with_ns(hub, mirror, tmp_path):
    token = mint_token(SECRET, "containerd-mirror", ["library/busybox"])
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    (hosts_dir / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n\n'
        f'[host."{mirror.url}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    daemon = Containerd(tmp_path / "containerd")
    daemon.start()
    try:
        pulled = daemon.ctr(
            "images", "pull", "--hosts-dir", str(hosts_dir), "-u", f"user:{token}", "docker.io/library/busybox:latest"
        )
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        listed = daemon.ctr("images", "ls", check=True).stdout
        assert hub.images["busybox"]["manifest"] in listed
        # containerd named the registry with ?ns=, and cargobay mapped it by host.
        log = mirror.process.log_text()
        assert "ns=docker.io" in log
        assert "subject=containerd-mirror" in log and "upstream=hub/library/busybox" in log
    finally:
        daemon.stop()


def test_a_mirror_request_is_not_answered_by_a_mapping_that_renames(hub, tmp_path):
    """
    ?ns= names the upstream repository itself: with the local name
    "busybox" mapped onto the hub's library/alpine, a mirror request for
    the hub's "busybox" is not that alpine image; a plain pull of the local
    name still is.
    """
    proxy = start_proxy(
        tmp_path, [{"id": "hub", "url": hub.url}], [("busybox", "hub", "library/alpine"), ("corp/*", "hub", "library/*")]
    )
    try:
        token = mint_token(SECRET, "renamed", ["busybox", "corp/alpine"])
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        for name in ("busybox", "corp/alpine"):
            status, _, body = proxy.request(f"/v2/{name}/manifests/latest", token, headers=accept)
            assert status == 200 and json.loads(body)["config"]["digest"] == hub.images["alpine"]["configs"][0]
            status, _, body = proxy.request(f"/v2/{name}/manifests/latest?ns={hub.host}", token, headers=accept)
            assert status == 404, (name, body)
            assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    finally:
        proxy.process.stop()


def test_podman_registries_conf_mirror(hub, mirror, tmp_path):
    token = mint_token(SECRET, "podman-mirror", ["library"])
    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = ["docker.io"]\n'
        "[[registry]]\n"
        'prefix = "docker.io"\n'
        'location = "docker.io"\n'
        "[[registry.mirror]]\n"
        f'location = "{mirror.host}"\n'
        "insecure = true\n"
    )
    store = {"root": tmp_path / "root", "runroot": tmp_path / "runroot"}
    os.environ["CONTAINERS_REGISTRIES_CONF"] = str(conf)
    try:
        login = podman("login", "--tls-verify=false", "-u", "podman-user", "-p", token, mirror.host, **store)
        assert login.returncode == 0, login.stdout + login.stderr
        pulled = podman("pull", "docker.io/library/alpine:latest", **store)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert "sha256:" + pulled.stdout.strip().splitlines()[-1] == hub.images["alpine"]["configs"][0]
        assert "subject=podman-mirror" in mirror.process.log_text()
    finally:
        del os.environ["CONTAINERS_REGISTRIES_CONF"]
