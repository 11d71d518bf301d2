import hashlib
import json

from cargobay import links as links_module
from cargobay.links import RepositoryLinks, referenced_digests
from cargobay.reference import Digest


def digest_of(text: str) -> Digest:
    return Digest("sha256", hashlib.sha256(text.encode()).hexdigest())


def test_links_are_kept_on_disk_per_name_and_go_with_their_digest(tmp_path):
    a, b = digest_of("a"), digest_of("b")
    links = RepositoryLinks(str(tmp_path / "links"))
    links.add("up", "team/app", [a, b])
    assert links.known("up", "team/app", a) and not links.known("up", "team/other", a)
    assert not links.known("elsewhere", "team/app", a)
    again = RepositoryLinks(str(tmp_path / "links"))  # after a restart
    assert again.known("up", "team/app", a) and again.known("up", "team/app", b)
    again.forget("up", a)
    assert not again.known("up", "team/app", a) and again.known("up", "team/app", b)
    assert not RepositoryLinks(str(tmp_path / "links")).known("up", "team/app", a)


def test_memory_holds_a_bounded_number_of_digests(tmp_path, monkeypatch):
    monkeypatch.setattr(links_module, "MEMORY_DIGESTS", 10)
    links = RepositoryLinks(str(tmp_path / "links"))
    digests = [digest_of(str(i)) for i in range(50)]
    links.add("up", "x", digests)
    assert len(links._names) == 10
    assert all(links.known("up", "x", d) for d in digests)  # from disk


def test_the_digests_a_manifest_names():
    config, layer, child = digest_of("config"), digest_of("layer"), digest_of("child")
    foreign = digest_of("foreign")
    manifest = {"config": {"digest": str(config)}, "layers": [
        {"digest": str(layer)}, {"digest": "junk"},
        # A foreign layer: the registry takes the manifest without having it.
        {"digest": str(foreign), "urls": ["https://example.com/layer"]},
    ]}
    index = {"manifests": [{"digest": str(child)}, "junk"]}
    assert referenced_digests(json.dumps(manifest).encode()) == [config, layer]
    assert referenced_digests(json.dumps(index).encode()) == [child]
    assert referenced_digests(b"not json") == [] and referenced_digests(b"[1]") == []


def test_legacy_marks_go_with_their_digest_and_count_only_while_the_upstream_cannot_say(tmp_path):
    from cargobay.errors import RegistryError
    from cargobay.links import upstream_unavailable

    old = digest_of("old")
    links = RepositoryLinks(str(tmp_path / "links"))
    links.mark_legacy("up", old)
    assert links.legacy("up", old) and not links.legacy("other", old)
    assert not links.known("up", "anyone", old)  # a mark is not a link
    links.forget("up", old)
    assert not links.legacy("up", old)
    assert upstream_unavailable(RegistryError(502, "UNAVAILABLE", "down"))
    assert upstream_unavailable(RegistryError(429, "TOOMANYREQUESTS", "slow down"))
    assert not upstream_unavailable(RegistryError(404, "BLOB_UNKNOWN", "not there"))
    assert not upstream_unavailable(RegistryError(403, "DENIED", "no"))
