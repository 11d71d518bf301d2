import pytest

from cargobay.reference import Digest, InvalidDigest, is_valid_name, is_valid_tag

HEX = "a" * 64


@pytest.mark.parametrize(
    "name", ["alpine", "library/alpine", "my-company/app_1/x", "a.b/c__d", "a" * 255, "a--b"]
)
def test_valid_names(name):
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "Alpine", "../x", "a/../b", "/a", "a/", "a//b", "a%2fb", "a\x00b", "a_", "-a", "a" * 256, "a b", "a:b"],
)
def test_invalid_names(name):
    assert not is_valid_name(name)


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b.c_d", "a" * 128])
def test_valid_tags(tag):
    assert is_valid_tag(tag)


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "..", "a\nb"])
def test_invalid_tags(tag):
    assert not is_valid_tag(tag)


def test_digest_parse():
    digest = Digest.parse(f"sha256:{HEX}")
    assert str(digest) == f"sha256:{HEX}"
    assert Digest.parse("sha512:" + "0" * 128).algorithm == "sha512"


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "g" * 64,
        "md5:" + "a" * 32,
        "sha256",
        "sha256:../../etc/passwd",
        "",
        "sha256:" + HEX + "\x00",
    ],
)
def test_invalid_digests(text):
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_digest_matches():
    import hashlib

    data = b"hello"
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    assert digest.matches(data)
    assert not digest.matches(b"hellO")


def test_a_registry_id_names_its_cache_directories_escaped_and_back():
    from cargobay.reference import registry_directory, registry_id_of

    # Ids of letters, digits, ".", "_" and "-" are their own names, as always.
    for plain in ("dockerhub", "private-registry", "gcr.io", "a_b"):
        assert registry_directory(plain) == plain and registry_id_of(plain) == plain
    for odd, name in (("ghcr.io/acme", "ghcr.io%2Facme"), ("private registry", "private%20registry"),
                      ("..", "%2E."), (".x", "%2Ex"), ("a%b", "a%25b"), ("ü", "%C3%BC")):
        assert registry_directory(odd) == name and registry_id_of(name) == odd
    # Names it never makes are no registry's (an earlier cache's, a stray).
    for stray in ("%zz", "%4", "%61bc", "", "%C3"):
        assert registry_id_of(stray) is None
