"""
Reloading the config in a running process (L{cargobay.server_tap.Runtime.reload}):
what changes at once, and what runs as it was until a restart.
"""

import json

import pytest
from tls import TestCA
from twisted.internet import reactor as global_reactor

from cargobay.config import load_config
from cargobay.reference import Digest
from cargobay.server_tap import Runtime
from proxy import write_config

DIGEST = Digest.parse("sha256:" + "a" * 64)
MAPPED = [("alpine", "hub", "library/alpine")]


def test_a_registry_moved_by_a_reload_that_also_changes_the_cache_directory_leaves_nothing_under_names(tmp_path):
    # The directory waits for a restart, so the running cache is still the
    # old one: what the old registry showed there was kept under the new
    # one's names, and registries.json kept the old URL.
    cache = tmp_path / "cache"
    path = write_config(tmp_path / "config.toml", 5000, cache, [{"id": "hub", "url": "https://old.example"}], MAPPED)
    runtime = Runtime(load_config(str(path)), str(path), global_reactor)
    runtime.store.set_tag("hub", "library/alpine", "latest", DIGEST, "application/vnd.oci.image.manifest.v1+json")
    runtime.links.add("hub", "library/alpine", [DIGEST])
    write_config(path, 5001, tmp_path / "other-cache", [{"id": "hub", "url": "https://new.example"}], MAPPED)
    assert runtime.reload()
    assert runtime.app.upstreams["hub"].registry.url == "https://new.example"
    assert runtime.store.tag("hub", "library/alpine", "latest") is None
    assert not runtime.links.known("hub", "library/alpine", DIGEST)
    assert json.loads((cache / "registries.json").read_text()) == {"hub": "https://new.example"}
    # What waits for a restart is what runs, for the app and the next reload.
    assert runtime.config.cache.directory == str(cache)
    assert runtime.config.server.port == 5000
    assert runtime.app.config.server.port == 5000


@pytest.mark.parametrize("scrub, recheck", [("", True), ("scrub_bytes_per_interval = 0", False)])
def test_served_files_are_put_first_in_the_scrub_unless_it_is_off(tmp_path, scrub, recheck):
    path = write_config(tmp_path / "config.toml", 5000, tmp_path / "cache", [{"id": "hub", "url": "https://a.example"}],
                        MAPPED, scrub)
    assert Runtime(load_config(str(path)), str(path), global_reactor).cache.recheck_served is recheck


def test_a_reload_names_each_change_that_waits_for_a_restart_and_only_those(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    path = write_config(tmp_path / "config.toml", 5000, tmp_path / "cache", [{"id": "hub", "url": "https://a.example"}],
                        MAPPED, "tag_ttl_seconds = 60")
    runtime = Runtime(load_config(str(path)), str(path), global_reactor)
    write_config(path, 5001, tmp_path / "cache", [{"id": "hub", "url": "https://a.example"}], MAPPED,
                 "tag_ttl_seconds = 7\neviction_interval_seconds = 5\nrevalidate_wait_seconds = 3")
    path.write_text(path.read_text().replace("port = 5001\n", "port = 5001\nsend_timeout_seconds = 9\n", 1))
    said: list[str] = []
    globalLogPublisher.addObserver(said.append)
    try:
        assert runtime.reload()
    finally:
        globalLogPublisher.removeObserver(said.append)
    waiting = sorted(formatEvent(e) for e in said if "next restart" in formatEvent(e))
    assert waiting == [
        "reload: cache.eviction_interval_seconds changed; it takes effect at the next restart",
        "reload: server listen endpoint changed; it takes effect at the next restart",
    ]
    # Applied at once:
    assert (runtime.manifests.tag_ttl, runtime.manifests.revalidate_wait, runtime.blobs.send_timeout) == (7, 3, 9)
    assert runtime.config.cache.eviction_interval_seconds != 5 and runtime.config.server.port == 5000


def test_a_registry_ca_file_renewed_in_place_is_read_again(tmp_path):
    ca = TestCA(tmp_path / "ca")
    registries = [{"id": "hub", "url": "https://registry.test", "ca_file": ca.cert_path}]
    path = write_config(tmp_path / "config.toml", 5000, tmp_path / "cache", registries, MAPPED)
    runtime = Runtime(load_config(str(path)), str(path), global_reactor)
    first = runtime.app.upstreams["hub"]
    assert runtime.reload()
    assert runtime.app.upstreams["hub"] is first  # nothing changed: its tokens and connections are kept
    ca.cert_path.write_bytes(TestCA(tmp_path / "renewed").cert_path.read_bytes())
    assert runtime.reload()
    assert runtime.app.upstreams["hub"] is not first


def test_a_reload_refused_for_a_url_whose_account_cannot_be_read_does_not_log_the_password(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    mapped = [("alpine", "hub", "library/alpine")]
    path = write_config(tmp_path / "config.toml", 5000, tmp_path / "cache",
                        [{"id": "hub", "url": "https://robot:old-pass@registry.test"}], mapped)
    runtime = Runtime(load_config(str(path)), str(path), global_reactor)
    write_config(path, 5000, tmp_path / "cache", [{"id": "hub", "url": "https://robot:new/pass@registry.test"}], mapped)
    said: list = []
    globalLogPublisher.addObserver(said.append)
    try:
        assert not runtime.reload()
    finally:
        globalLogPublisher.removeObserver(said.append)
    logged = "\n".join(formatEvent(e) for e in said)
    assert "reload refused" in logged and "registries[0].url: must not hold credentials" in logged
    assert "new/pass" not in logged and "old-pass" not in logged, logged
