import pytest

from cargobay.config import ConfigError, parse_config
from cargobay.mapping import Mapper, Resolved

CONFIG = """
[auth]
jwt_secret = "s"
[[registries]]
id = "hub"
url = "https://registry-1.docker.io"
[[registries]]
id = "ghcr"
url = "https://ghcr.io"
[[registries]]
id = "private"
url = "https://registry.example.com:5443"
hosts = ["registry.example.com:5443", "registry.example.com"]

[[repositories]]
name = "alpine"
registry_id = "private"
upstream_name = "mirrored/alpine"
[[repositories]]
name = "hub/*"
registry_id = "hub"
upstream_name = "*"
[[repositories]]
name = "gh/*"
registry_id = "ghcr"
upstream_name = "*"
[[repositories]]
name = "gh/special/*"
registry_id = "private"
upstream_name = "special/*"
[[repositories]]
name = "*"
registry_id = "hub"
upstream_name = "*"
"""


@pytest.fixture
def mapper():
    return Mapper(parse_config(CONFIG))


def test_exact_mappings_win(mapper):
    assert mapper.resolve("alpine") == Resolved("alpine", "private", "mirrored/alpine")


def test_a_mirror_request_names_the_upstream_repository_not_a_renaming_mapping():
    # containerd mirroring registry.example.com asks for its "myapp": the
    # "team/application" that the local name "myapp" is mapped onto is
    # another image.  A mapping that keeps the name still answers.
    base = '[auth]\njwt_secret="s"\n[[registries]]\nid="p"\nurl="https://registry.example.com"\n'
    renames = '[[repositories]]\nname="myapp"\nregistry_id="p"\nupstream_name="team/application"\n'
    keeps = '[[repositories]]\nname="team/tool"\nregistry_id="p"\nupstream_name="team/tool"\n'
    mapper = Mapper(parse_config(base + renames + keeps))
    assert mapper.resolve("myapp") == Resolved("myapp", "p", "team/application")
    assert mapper.resolve("myapp", ns="registry.example.com") is None
    assert mapper.resolve("team/tool", ns="registry.example.com") == Resolved("team/tool", "p", "team/tool")
    whole = '[[repositories]]\nname="*"\nregistry_id="p"\nupstream_name="*"\n'
    assert Mapper(parse_config(base + renames + whole)).resolve("myapp", ns="registry.example.com") == Resolved(
        "myapp", "p", "myapp"
    )
    hub = '[auth]\njwt_secret="s"\n[[registries]]\nid="hub"\nurl="https://registry-1.docker.io"\n'
    alpine = '[[repositories]]\nname="alpine"\nregistry_id="hub"\nupstream_name="library/alpine"\n'
    assert Mapper(parse_config(hub + alpine)).resolve("alpine", ns="docker.io") == Resolved(
        "alpine", "hub", "library/alpine"
    )
    # Patterns too: "corp/*" -> "team/*" does not answer a mirror request
    # for the registry's own corp/app; "team/*" -> "team/*" does.
    patterns = (
        '[[repositories]]\nname="corp/*"\nregistry_id="p"\nupstream_name="team/*"\n'
        '[[repositories]]\nname="team/*"\nregistry_id="p"\nupstream_name="team/*"\n'
    )
    mapper = Mapper(parse_config(base + patterns))
    assert mapper.resolve("corp/app") == Resolved("corp/app", "p", "team/app")
    assert mapper.resolve("corp/app", ns="registry.example.com") is None
    assert mapper.resolve("team/app", ns="registry.example.com") == Resolved("team/app", "p", "team/app")


def test_a_mirror_request_for_another_registry_is_not_an_exact_mapping_s_name(mapper):
    # containerd mirroring ghcr.io asks for ghcr.io's "alpine": the private
    # registry's mirrored/alpine (the exact mapping) is another image.
    # (And ghcr.io is served under "gh/" only: not by its own names.)
    assert mapper.resolve("alpine", ns="ghcr.io") is None
    assert mapper.resolve("alpine", ns="docker.io") == Resolved("alpine", "hub", "library/alpine")


def test_prefix_patterns_longest_first(mapper):
    assert mapper.resolve("hub/library/nginx") == Resolved("hub/library/nginx", "hub", "library/nginx")
    assert mapper.resolve("gh/owner/tool") == Resolved("gh/owner/tool", "ghcr", "owner/tool")
    assert mapper.resolve("gh/special/x") == Resolved("gh/special/x", "private", "special/x")


def test_docker_hub_implicit_library(mapper):
    assert mapper.resolve("hub/nginx").upstream_name == "library/nginx"
    assert mapper.resolve("busybox").upstream_name == "library/busybox"
    assert mapper.resolve("library/busybox").upstream_name == "library/busybox"
    assert mapper.resolve("gh/tool").upstream_name == "tool"  # only on Docker Hub


def test_ns_selects_the_registry_by_host(mapper):
    # ghcr.io is served under "gh/" only: its "owner/tool" is not the local
    # "owner/tool" (Docker Hub's) that a token may name.
    assert mapper.resolve("owner/tool", ns="ghcr.io") is None
    assert mapper.resolve("team/app", ns="registry.example.com") == Resolved("team/app", "private", "team/app")
    assert mapper.resolve("nginx", ns="docker.io").upstream_name == "library/nginx"
    # Not an open proxy: an unconfigured host maps to nothing.
    assert mapper.resolve("x/y", ns="evil.example.net") is None


def test_ns_reaches_only_registries_opened_whole_or_listing_their_hosts():
    # The earlier implementation's configs map exact names: ?ns= must not
    # open every other repository the proxy's credentials can read.
    base = '[auth]\njwt_secret="s"\n[[registries]]\nid="p"\nurl="https://registry.example.com"\n'
    exact = '[[repositories]]\nname="myapp"\nregistry_id="p"\nupstream_name="team/application"\n'
    part = '[[repositories]]\nname="team/*"\nregistry_id="p"\nupstream_name="team/*"\n'
    whole = '[[repositories]]\nname="*"\nregistry_id="p"\nupstream_name="*"\n'
    # Under a prefix, the registry is not opened whole: "library/x" of this
    # registry is not the local "library/x" that a token names.
    prefixed = '[[repositories]]\nname="p/*"\nregistry_id="p"\nupstream_name="*"\n'
    for mappings, reached in [
        (exact, set()), (exact + part, {"team/secret"}), (exact + whole, {"team/secret", "other/thing"}),
        (exact + prefixed, set()),
    ]:
        mapper = Mapper(parse_config(base + mappings))
        for name in ("team/secret", "other/thing"):
            # A pattern ("team/*") opens its names with or without ?ns=.
            assert (mapper.resolve(name, ns="registry.example.com") is not None) == (name in reached), (mappings, name)
        assert mapper.resolve("myapp", ns="registry.example.com") == (
            Resolved("myapp", "p", "myapp") if "other/thing" in reached else None
        )
    # containerd's mirror of a part of Docker Hub: "library/*" with ?ns=docker.io.
    hub = '[auth]\njwt_secret="s"\n[[registries]]\nid="hub"\nurl="https://registry-1.docker.io"\n'
    library = '[[repositories]]\nname="library/*"\nregistry_id="hub"\nupstream_name="library/*"\n'
    mapper = Mapper(parse_config(hub + library))
    assert mapper.resolve("library/alpine", ns="docker.io") == Resolved("library/alpine", "hub", "library/alpine")
    assert mapper.resolve("someone/else", ns="docker.io") is None
    on_a_port = Mapper(parse_config(base.replace('example.com"', 'example.com:5443"', 1) + whole))
    for ns in ("registry.example.com:5443", "registry.example.com"):
        assert on_a_port.resolve("team/secret", ns=ns) == Resolved("team/secret", "p", "team/secret")
    listed = base.replace('example.com"\n', 'example.com"\nhosts = ["registry.example.com"]\n', 1)
    assert Mapper(parse_config(listed + exact)).resolve("team/secret", ns="registry.example.com") == Resolved(
        "team/secret", "p", "team/secret"
    )


def test_without_catch_all_unknown_names_are_unknown():
    config = parse_config(CONFIG.replace('name = "*"\nregistry_id = "hub"\nupstream_name = "*"', 'name = "z"\nregistry_id = "hub"\nupstream_name = "z"'))
    assert Mapper(config).resolve("nothere") is None
    assert Mapper(config).resolve("hub") is None


@pytest.mark.parametrize(
    "name, upstream, problem",
    [("hub/*", "library/alpine", "pattern"), ("hub", "*", "pattern"), ("hub/**", "*", "not a valid"), ("*/x", "*", "not a valid")],
)
def test_bad_patterns(name, upstream, problem):
    text = f'[auth]\njwt_secret="s"\n[[registries]]\nid="h"\nurl="https://h"\n[[repositories]]\nname="{name}"\nregistry_id="h"\nupstream_name="{upstream}"\n'
    with pytest.raises(ConfigError, match=problem):
        parse_config(text)
