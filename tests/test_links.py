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
