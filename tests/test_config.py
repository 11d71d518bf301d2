import re
from pathlib import Path

import pytest

from cargobay.config import (
    EMBEDDED_DEFAULT_CONFIG,
    ConfigError,
    load_config,
    parse_config,
    resolve_config_path,
)

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"

# The earlier implementation's example config, as its users have it.
SEED = """
[server]
bind_address = "0.0.0.0"
port = 5000

[auth]
jwt_secret = "your-secret-key-change-this-in-production"

[cache]
directory = "/var/cache/docker-registry-proxy"
max_size_bytes = 10737418240                   # 10 GB
max_age_seconds = 604800                       # 7 days

[[registries]]
id = "dockerhub"
url = "https://registry-1.docker.io"

[[registries]]
id = "private-registry"
url = "https://private-registry.example.com"

[registries.auth]
username = "registry-user"
password = "registry-password"

[[registries]]
id = "gcr"
url = "https://gcr.io"

[[repositories]]
name = "alpine"
registry_id = "dockerhub"
upstream_name = "library/alpine"

[[repositories]]
name = "mycompany/app"
registry_id = "private-registry"
upstream_name = "team/application"
"""


def test_seed_config_loads_and_means_the_same():
    config = parse_config(SEED)
    assert config.server.endpoint == "tcp:5000:interface=0.0.0.0"
    assert config.auth.jwt_secret == "your-secret-key-change-this-in-production"
    assert config.cache.directory == "/var/cache/docker-registry-proxy"
    assert config.cache.max_size_bytes == 10737418240
    assert config.cache.max_age_seconds == 604800
    assert [r.id for r in config.registries] == ["dockerhub", "private-registry", "gcr"]
    # [registries.auth] belongs to the registry above it, and only to it.
    assert config.registry("dockerhub").auth is None
    assert config.registry("private-registry").auth.username == "registry-user"
    assert config.registry("private-registry").auth.password == "registry-password"
    assert config.registry("gcr").auth is None
    app = config.mapping_for("mycompany/app")
    assert app.registry_id == "private-registry" and app.upstream_name == "team/application"


def test_shipped_example_and_embedded_default_load():
    assert parse_config(EXAMPLE.read_text()).mapping_for("alpine") is not None
    assert parse_config(EMBEDDED_DEFAULT_CONFIG).mapping_for("alpine").upstream_name == "library/alpine"


def test_password_never_in_repr():
    config = parse_config(SEED)
    assert "registry-password" not in repr(config)
    assert "your-secret-key" not in repr(config)


def test_listen_overrides_bind_address_and_port():
    config = parse_config(SEED.replace('port = 5000', 'port = 5000\nlisten = "tcp:6000:interface=127.0.0.1"'))
    assert config.server.endpoint == "tcp:6000:interface=127.0.0.1"
    assert config.server.shutdown_grace == 10.0
    assert parse_config(SEED.replace('port = 5000', 'port = 5000\nshutdown_grace_seconds = 0')).server.shutdown_grace == 0


def test_new_optional_keys():
    text = SEED.replace(
        'url = "https://gcr.io"',
        'url = "https://gcr.io"\nconnect_timeout_seconds = 3\nread_timeout_seconds = 7.5',
    )
    registry = parse_config(text).registry("gcr")
    assert registry.connect_timeout == 3.0 and registry.read_timeout == 7.5
    assert parse_config(SEED).cache.client_waits_for_disk is False
    waits = SEED.replace("max_age_seconds = 604800", "max_age_seconds = 604800\nclient_waits_for_disk = true")
    assert parse_config(waits).cache.client_waits_for_disk is True
    assert parse_config(SEED).cache.leave_disk_after_seconds == 0.25
    sooner = SEED.replace("max_age_seconds = 604800", "max_age_seconds = 604800\nleave_disk_after_seconds = 0")
    assert parse_config(sooner).cache.leave_disk_after_seconds == 0.0
    assert parse_config(SEED).cache.direct_writes is True
    paged = SEED.replace("max_age_seconds = 604800", "max_age_seconds = 604800\ndirect_writes = false")
    assert parse_config(paged).cache.direct_writes is False


def test_bind_address_takes_an_address_or_a_host_name_but_no_port():
    for value in ("127.0.0.1", "::1", "localhost", "cache.internal"):
        assert parse_config(SEED.replace('bind_address = "0.0.0.0"', f'bind_address = "{value}"')).server.bind_address == value
    for value in ("127.0.0.1:5000", "not an address"):
        with pytest.raises(ConfigError, match=r"^server\.bind_address: "):
            parse_config(SEED.replace('bind_address = "0.0.0.0"', f'bind_address = "{value}"'))


def test_a_ca_file_that_is_not_a_pem_certificate_is_one_line(tmp_path):
    # It used to pass as "a file", then crash the start (or half-apply a reload).
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    text = SEED.replace('url = "https://gcr.io"', f'url = "https://gcr.io"\nca_file = "{junk}"', 1)
    with pytest.raises(ConfigError, match=r"^registries\[2\]\.ca_file: .* is not a PEM certificate"):
        parse_config(text)


def test_a_registry_url_with_credentials_is_the_registry_s_account_and_never_echoed():
    # The earlier implementation's HTTP client sent them as Basic
    # credentials: its one way to a registry behind a password.
    text = SEED.replace('url = "https://gcr.io"', 'url = "https://robot%2Bci:hunt%40er2@gcr.io:443/v2-prefix"', 1)
    config = parse_config(text)
    registry = config.registry("gcr")
    assert registry.url == "https://gcr.io:443/v2-prefix"
    assert registry.auth is not None and (registry.auth.username, registry.auth.password) == ("robot+ci", "hunt@er2")
    assert not any("hunt" in w for w in config.warnings), config.warnings
    # [registries.auth], when there, is the account.
    text = SEED.replace('url = "https://private-registry.example.com"', 'url = "https://a:b@private-registry.example.com"', 1)
    registry = parse_config(text).registry("private-registry")
    assert registry.url == "https://private-registry.example.com"
    assert registry.auth is not None and registry.auth.username == "registry-user"
    # An empty one is no account.
    registry = parse_config(SEED.replace('url = "https://gcr.io"', 'url = "https://:@gcr.io"', 1)).registry("gcr")
    assert (registry.url, registry.auth) == ("https://gcr.io", None)
    # A mistake in such a URL names the key, not the password.
    with pytest.raises(ConfigError) as caught:
        parse_config(SEED.replace('url = "https://gcr.io"', 'url = "ftp://robot:hunter2@gcr.io"', 1))
    assert str(caught.value).startswith("registries[2].url: ") and "hunter2" not in str(caught.value)


def test_a_public_url_with_credentials_is_refused_without_echoing_them():
    text = SEED.replace('port = 5000', 'port = 5000\npublic_url = "https://u:hunter2@cache.example.com"', 1)
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert str(caught.value).startswith("server.public_url: must not hold credentials")
    assert "hunter2" not in str(caught.value)


def test_logging_level_takes_the_names_rust_log_takes():
    # The earlier implementation ignored [logging]; RUST_LOG=trace is debug here.
    for name, level in (("trace", "debug"), ("TRACE", "debug"), ("fatal", "critical"), ("warning", "warn")):
        assert parse_config(SEED + f'\n[logging]\nlevel = "{name}"\n').logging.level == level


def test_a_single_registries_table_names_the_key_without_a_leading_dot():
    with pytest.raises(ConfigError, match=r"^registries: must be an array of tables"):
        parse_config(SEED.replace("[[registries]]", "[registries]", 1).split("[[registries]]")[0])


@pytest.mark.parametrize(
    "change, key, problem",
    [
        (('registry_id = "dockerhub"', 'registry_id = "dockrhub"'), "repositories[0].registry_id", "unknown registry"),
        (('url = "https://gcr.io"', 'url = "gcr.io"'), "registries[2].url", "not an http"),
        (('url = "https://gcr.io"', 'url = "ftp://gcr.io"'), "registries[2].url", "not an http"),
        (('url = "https://gcr.io"', 'url = "https://[fe80::1%25eth0]:5000"'), "registries[2].url", "with a zone"),
        (('url = "https://gcr.io"', 'url = "https://[::zz]:5000"'), "registries[2].url", "not a usable URL"),
        (('url = "https://gcr.io"', 'url = "https://[::1:5000"'), "registries[2].url", "not a usable URL"),
        (('jwt_secret = "your-secret-key-change-this-in-production"', ''), "auth.jwt_secret", "missing"),
        (('jwt_secret = "your-secret-key-change-this-in-production"', 'jwt_secret = ""'), "auth.jwt_secret", "empty"),
        (('max_size_bytes = 10737418240', 'max_size_bytes = -1'), "cache.max_size_bytes", "at least 0"),
        (('port = 5000', 'port = 70000'), "server.port", "at most 65535"),
        (('port = 5000', 'port = "5000"'), "server.port", "must be an integer"),
        (('username = "registry-user"', 'usrname = "registry-user"'), "registries[1].auth.usrname", "unknown key"),
        # [auth], [metrics] and [logging] written for cargobay (they set a key
        # of cargobay's) are strict; and anywhere, a misspelled issuer,
        # audience or require_auth would let in more than meant.
        (('jwt_secret = "your-secret-key-change-this-in-production"',
          'jwt_secret = "your-secret-key-change-this-in-production"\nissuer = "idp"\nalgorithm = "HS256"'),
         "auth.algorithm", "unknown key"),
        (('jwt_secret = "your-secret-key-change-this-in-production"',
          'jwt_secret = "your-secret-key-change-this-in-production"\naudiance = "cargobay"'),
         "auth.audiance", "unknown key (did you mean 'audience'?)"),
        (('[server]', '[metrics]\nrequire_aut = true\n[server]'), "metrics.require_aut", "unknown key"),
        (('[server]', '[logging]\nlevel = "info"\nformatt = "json"\n[server]'), "logging.formatt", "unknown key"),
        (('[server]', '[metric]\nrequire_auth = true\n[server]'), "metric", "unknown section (did you mean 'metrics'?)"),
        (('id = "gcr"', 'id = "' + "x" * 193 + '"'), "registries[2].id", "at most 192 characters"),
        (('id = "gcr"', 'id = "tab\\there"'), "registries[2].id", "printable"),
        (('name = "alpine"', 'name = "../alpine/*"'), "repositories[0].name", "not a valid"),
        (('port = 5000', 'port = 5000\nlisten = "bogus:1"'), "server.listen", "not a supported endpoint"),
        (('port = 5000', 'port = 5000\npublic_url = "example.com"'), "server.public_url", "not an http"),
        (('port = 5000', 'port = 5000\nshutdown_grace_seconds = -1'), "server.shutdown_grace_seconds", "at least 0"),
        (('max_age_seconds = 604800', 'max_age_seconds = 604800\nclient_waits_for_disk = "yes"'),
         "cache.client_waits_for_disk", "must be true or false"),
        (('max_age_seconds = 604800', 'max_age_seconds = 604800\nleave_disk_after_seconds = -1'),
         "cache.leave_disk_after_seconds", "must not be negative"),
        (('max_age_seconds = 604800', 'max_age_seconds = 604800\ndirect_writes = 1'),
         "cache.direct_writes", "must be true or false"),
        # nan passes "not above the maximum": a leeway of nan let expired tokens in.
        (('jwt_secret = "your-secret-key-change-this-in-production"',
          'jwt_secret = "your-secret-key-change-this-in-production"\nleeway_seconds = nan'),
         "auth.leeway_seconds", "finite"),
        (('max_age_seconds = 604800', 'max_age_seconds = 604800\ntag_ttl_seconds = inf'),
         "cache.tag_ttl_seconds", "finite"),
        (('max_age_seconds = 604800', 'max_age_seconds = 604800\neviction_interval_seconds = inf'),
         "cache.eviction_interval_seconds", "finite"),
        # A NUL in a path was a traceback at start (embedded null byte).
        (('directory = "/var/cache/docker-registry-proxy"', 'directory = "/var/cache/x\\u0000y"'),
         "cache.directory", "NUL character"),
        (('jwt_secret = "your-secret-key-change-this-in-production"',
          'jwt_secret = "your-secret-key-change-this-in-production"\npublic_key_files = ["/etc/k\\u0000.pem"]'),
         "auth.public_key_files", "NUL character"),
    ],
)
def test_every_mistake_is_one_line_naming_the_key(change, key, problem):
    old, new = change
    assert old in SEED
    with pytest.raises(ConfigError) as caught:
        parse_config(SEED.replace(old, new, 1))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(key + ":"), message
    assert problem in message


@pytest.mark.parametrize(
    "change, warning",
    [
        # The earlier implementation ignored unknown keys and sections: its
        # config files load, and the operator is told.
        (('max_age_seconds = 604800', 'max_age_secnds = 604800'),
         "cache.max_age_secnds: unknown key, ignored (did you mean 'max_age_seconds'?)"),
        (('bind_address = "0.0.0.0"', 'bind_address = "0.0.0.0"\nworkers = 4'), "server.workers: unknown key, ignored"),
        (('[server]', '[extra]\nx = 1\n[server]'), "extra: unknown section, ignored"),
        # Keys and tables it ignored in sections cargobay is strict about, in
        # a file that sets none of cargobay's own keys there.
        (('jwt_secret = "your-secret-key-change-this-in-production"',
          'jwt_secret = "your-secret-key-change-this-in-production"\ntoken_expiry_seconds = 3600\nalgorithm = "HS256"'),
         "auth.algorithm: unknown key, ignored"),
        (('[server]', '[auth.extra]\nfoo = 1\n[server]'), "auth.extra: unknown key, ignored"),
        (('[server]', '[metrics]\nport = 9090\n[server]'), "metrics.port: unknown key, ignored"),
        (('[server]', '[logging]\nformatt = "json"\n[server]'), "logging.formatt: unknown key, ignored"),
        (('[server]', '[oauth]\nclient_id = "x"\n[server]'), "oauth: unknown section, ignored (did you mean 'auth'?)"),
        # A registry's account in its URL, as its HTTP client took it (never echoed).
        (('url = "https://gcr.io"', 'url = "https://robot:hunter2@gcr.io"'),
         "registries[2].url: the user:password@ in it is taken as the registry's account"),
        (('url = "https://private-registry.example.com"', 'url = "https://robot:hunter2@private-registry.example.com"'),
         "registries[1].url: the user:password@ in it ignored, [registries.auth] is the account used"),
        (('upstream_name = "library/alpine"', 'upstream_name = "library/alpine"\ndescription = "Alpine"'),
         "repositories[0].description: unknown key, ignored"),
        # Of two with one name, the first is used, as it was there.
        (('name = "mycompany/app"', 'name = "alpine"'),
         "repositories[1].name: duplicate repository name 'alpine', ignored (the first one is used)"),
        (('id = "gcr"', 'id = "dockerhub"'),
         "registries[2].id: duplicate registry id 'dockerhub', ignored (the first one is used)"),
        # The same setting meant something else there.
        (('max_age_seconds = 604800', 'max_age_seconds = 0'), "cache.max_age_seconds: 0 keeps blobs with no age limit"),
        # No client can pull a name with capitals: the mapping can never be used.
        (('upstream_name = "library/alpine"', 'upstream_name = "Library/Alpine"'),
         "repositories[0].upstream_name: 'Library/Alpine' has capital letters"),
        (('name = "alpine"', 'name = "nginx-"'),
         "repositories[0].name: 'nginx-' is not a valid repository name: this mapping is ignored"),
        (('upstream_name = "library/alpine"', 'upstream_name = "library//alpine"'),
         "repositories[0].upstream_name: 'library//alpine' is not a valid repository name: this mapping is ignored"),
    ],
)
def test_what_the_earlier_implementation_took_loads_with_a_warning(change, warning):
    old, new = change
    assert old in SEED
    config = parse_config(SEED.replace(old, new, 1))
    assert any(w.startswith(warning) for w in config.warnings), config.warnings
    assert all("\n" not in w for w in config.warnings)
    assert parse_config(SEED).warnings == ()


@pytest.mark.parametrize("registry_id", ["private registry", "ghcr.io/acme", "eu:private", "../gcr", ".", "ünï"])
def test_a_registry_id_may_be_any_text_as_it_was_there(registry_id):
    config = parse_config(SEED.replace('id = "gcr"', f'id = "{registry_id}"', 1).replace(
        'registry_id = "gcr"', f'registry_id = "{registry_id}"'))
    assert registry_id in [r.id for r in config.registries]


def test_the_first_of_two_mappings_of_one_name_is_the_one_used():
    config = parse_config(SEED.replace('name = "mycompany/app"', 'name = "alpine"', 1))
    assert config.mapping_for("alpine").upstream_name == "library/alpine"
    assert config.mapping_for("Library/Alpine") is None


def test_an_upstream_account_with_an_empty_password_is_taken():
    config = parse_config(SEED.replace('password = "registry-password"', 'password = ""', 1))
    assert [r.auth.password for r in config.registries if r.auth is not None] == [""]
    # Taken as the earlier implementation took it, with a warning.
    assert config.warnings == (
        "registries[1].auth: empty password, sent as such in the Basic credentials "
        "(leave [auth] out for an anonymous registry)",
    )


def test_a_secret_may_hold_any_character_and_warning_is_a_level():
    # A NUL has no place in a path, URL or name (refused, above), but a
    # secret the earlier implementation took is taken as it is.
    text = SEED.replace('jwt_secret = "your-secret-key-change-this-in-production"',
                        'jwt_secret = "x\\u0000' + "y" * 40 + '"\n[logging]\nlevel = "warning"', 1)
    config = parse_config(text)
    assert config.auth.jwt_secret == "x\0" + "y" * 40
    assert config.logging.level == "warn"  # as CARGOBAY_LOG_LEVEL=warning is


def test_a_config_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf" + SEED.encode())
    assert load_config(str(path)).server.port == 5000


def test_not_toml_names_the_file():
    with pytest.raises(ConfigError, match=r"^my\.toml: not valid TOML"):
        parse_config("[server\nport=1", "my.toml")


def test_missing_file_and_embedded_default(tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(missing)
    assert load_config(missing, allow_embedded_default=True).source == "<embedded default>"


def test_config_path_resolution():
    assert resolve_config_path("a.toml", {"CONFIG_PATH": "b.toml"}) == "a.toml"
    assert resolve_config_path(None, {"CONFIG_PATH": "b.toml"}) == "b.toml"
    assert resolve_config_path(None, {}) == "config.toml"


def test_every_config_key_is_documented_in_the_example(tmp_path):
    """Each key the parser reads appears in config.example.toml, and the
    example with every optional line switched on still loads."""
    import re

    source = (Path(__file__).parent.parent / "cargobay" / "config.py").read_text()
    keys = set(re.findall(r'\.(?:string|integer|number|boolean|strings|sub|table_list)\(\s*"([a-z_]+)"', source))
    keys |= set(re.findall(r'section\("([a-z_]+)"\)', source))
    example = EXAMPLE.read_text()
    assert len(keys) > 35, sorted(keys)
    missing = sorted(k for k in keys if not re.search(rf"(^|[\s\[#.]){k}(\s*=|\]|\.)", example, re.M))
    assert missing == []
    switched_on = re.sub(r"^# ?((\[\[?[a-z.]+\]\]?)|([a-z_]+ = .*))$", r"\1", example, flags=re.M)
    from tls import TestCA

    switched_on = switched_on.replace("/etc/cargobay/private-ca.pem", str(TestCA(tmp_path).cert_path))
    switched_on = re.sub(r"^public_key_files = .*$", "", switched_on, flags=re.M)
    switched_on = re.sub(r'^listen = "ssl:.*$', "", switched_on, flags=re.M)
    config = parse_config(switched_on)
    assert config.metrics.listen is not None and config.logging.format == "text"


def test_a_published_or_short_secret_is_taken_but_said_to_be_weak():
    # The example configs' secrets (this one's, the earlier implementation's)
    # and a one-byte one started without a word: anyone can mint tokens.
    def config(secret):
        return parse_config(f'[auth]\njwt_secret = "{secret}"\n')

    assert "example" in config("change-me-to-a-long-random-string").weak_secret()
    assert "example" in config("your-secret-key-change-this-in-production").weak_secret()
    assert "1 bytes" in config("x").weak_secret()
    strong = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert config(strong).weak_secret() is None
    # The old secrets still verify tokens: the same goes for them.
    rotating = parse_config(f'[auth]\njwt_secret = "{strong}"\nprevious_jwt_secrets = ["the-old-secret"]\n')
    assert rotating.weak_secret().startswith("previous_jwt_secrets[0] is an example's")


@pytest.mark.parametrize("url", ["https://robot:hun/ter2@gcr.io", "https://robot:hun#ter2@gcr.io", "https://robot:hun?ter2@gcr.io"])
def test_an_account_that_cannot_be_read_out_of_a_url_is_never_echoed(url):
    # A raw "/", "#" or "?" ends the host: the URL is refused, password unshown.
    with pytest.raises(ConfigError) as caught:
        parse_config(SEED.replace('url = "https://gcr.io"', f'url = "{url}"', 1))
    assert str(caught.value).startswith("registries[2].url: ") and "ter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url, problem",
    [
        # A browser's URL parser (the earlier implementation's) ends the host
        # at the backslash: the account would go to another host.
        ("https://evil.example\\\\@good.example/", "a backslash before the '@'"),
        ("https://robot:%FF%FE@gcr.io", "the user:password@ in it is not percent-encoded UTF-8"),
    ],
)
def test_an_account_in_a_url_that_means_something_else_elsewhere_is_refused(url, problem):
    with pytest.raises(ConfigError, match=rf"^registries\[2\]\.url: {problem}"):
        parse_config(SEED.replace('url = "https://gcr.io"', f'url = "{url}"', 1))


SECRET_LINE = 'jwt_secret = "your-secret-key-change-this-in-production"'


@pytest.mark.parametrize(
    "line",
    ['aud = "r.example.com"', 'iss = "https://idp"', 'AUDIENCE = "r.example.com"', 'expected_audience = "r"',
     'allowed_issuers = ["https://idp"]', 'isuer = "https://idp"'],
)
def test_an_audience_or_issuer_under_another_name_stops_start_up_in_a_legacy_auth(line):
    # In an [auth] that sets only jwt_secret, unknown keys only warn; not
    # these: the operator meant a check that would not be made.
    with pytest.raises(ConfigError, match=r"^auth\."):
        parse_config(SEED.replace(SECRET_LINE, f"{SECRET_LINE}\n{line}", 1))


@pytest.mark.parametrize("line", ["auth_required = true", "REQUIRE_AUTH = true", "authenticate = true"])
def test_a_metrics_require_auth_under_another_name_stops_start_up(line):
    with pytest.raises(ConfigError, match=r"^metrics\."):
        parse_config(SEED.replace("[server]", f"[metrics]\n{line}\n[server]", 1))


@pytest.mark.parametrize(
    "text, name, belongs",
    [
        (SEED + '\naudience = "r.example.com"\n', "repositories[1].audience", "auth"),  # appended: the last table's
        (SEED.replace("port = 5000", 'port = 5000\nissuer = "https://idp"', 1), "server.issuer", "auth"),
        (SEED.replace("port = 5000", "port = 5000\nrequire_auth = true", 1), "server.require_auth", "metrics"),
        ('audience = "r.example.com"\n' + SEED, "audience", "auth"),  # before any table
    ],
)
def test_a_security_key_in_the_wrong_table_stops_start_up(text, name, belongs):
    with pytest.raises(ConfigError, match=rf"^{re.escape(name)}: unknown key here \(it belongs in \[{belongs}\]\)"):
        parse_config(text)
