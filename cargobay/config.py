"""
Loading and validating cargobay's TOML configuration.

The file format is the earlier (Rust) implementation's, unchanged: ``[server]``,
``[auth]``, ``[cache]``, ``[[registries]]`` (with an optional ``[registries.auth]``)
and ``[[repositories]]``.  Keys added by cargobay are all optional.

Every mistake raises L{ConfigError} whose message is one line naming the key and
the problem, so that start-up can stop before anything listens.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography import x509

from cargobay.logs import LEVEL_ALIASES
from cargobay.reference import is_valid_name, registry_directory
from cargobay.tokens import load_public_key

DEFAULT_CONFIG_PATH = "config.toml"
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
#: Host names that mean Docker Hub, in URLs and in mirror requests' ?ns=.
DOCKER_HUB_HOSTS = ("docker.io", "registry-1.docker.io", "index.docker.io", "registry.hub.docker.com")
#: Registry ids are any text, as in the earlier implementation; they name the
#: cache's directories escaped (reference.registry_directory), in at most:
MAX_REGISTRY_ID = 192

#: Used by ``make run`` when there is no config file at all.  The secret is a
#: development secret: the service announces it loudly when it starts on it.
DEVELOPMENT_SECRET = "cargobay-development-secret-do-not-use-in-production"
#: Secrets printed in example configs (this one's and the earlier
#: implementation's): anyone can mint tokens with them.
PUBLISHED_SECRETS = frozenset(
    ("change-me-to-a-long-random-string", "your-secret-key-change-this-in-production", "a long random string",
     "the-old-secret")
)
#: Shorter HS256 secrets can be guessed (RFC 7518 3.2 asks for 32 bytes).
MIN_SECRET_BYTES = 32

EMBEDDED_DEFAULT_CONFIG = f"""
[server]
bind_address = "127.0.0.1"
port = 5000

[auth]
jwt_secret = "{DEVELOPMENT_SECRET}"

[cache]
directory = "cache"
max_size_bytes = 10737418240
max_age_seconds = 604800

[[registries]]
id = "dockerhub"
url = "https://registry-1.docker.io"

[[repositories]]
name = "alpine"
registry_id = "dockerhub"
upstream_name = "library/alpine"

[[repositories]]
name = "busybox"
registry_id = "dockerhub"
upstream_name = "library/busybox"

[[repositories]]
name = "debian"
registry_id = "dockerhub"
upstream_name = "library/debian"

[[repositories]]
name = "ubuntu"
registry_id = "dockerhub"
upstream_name = "library/ubuntu"

[[repositories]]
name = "nginx"
registry_id = "dockerhub"
upstream_name = "library/nginx"

[[repositories]]
name = "python"
registry_id = "dockerhub"
upstream_name = "library/python"
"""


class ConfigError(Exception):
    """
    The configuration cannot be used.  C{str()} of it is a single line that
    names the offending key and what is wrong with it.
    """


@dataclass(frozen=True)
class UpstreamAuth:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RegistryConfig:
    id: str
    url: str
    auth: UpstreamAuth | None = None
    ca_file: str | None = None
    connect_timeout: float = 10.0
    #: Longest silence allowed while waiting for response headers or body bytes.
    read_timeout: float = 60.0
    #: Registry host names a mirror request's ``?ns=`` may name to select it.
    hosts: tuple[str, ...] = ()
    #: Whether ``?ns=`` with one of C{hosts} reaches any upstream name (the
    #: hosts were listed, or a '*' mapping serves the registry whole), or
    #: only names mapped to this registry.
    hosts_open: bool = True
    #: Docker Hub's rule: a one-component name means ``library/<name>``.
    implicit_library: bool = False

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def hostname(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def base_path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")


@dataclass(frozen=True)
class RepositoryMapping:
    name: str
    registry_id: str
    upstream_name: str


@dataclass(frozen=True)
class ServerConfig:
    bind_address: str = "0.0.0.0"
    port: int = 5000
    #: A Twisted strports description; overrides bind_address and port.
    listen: str | None = None
    #: Absolute URL clients reach the proxy at, for token realms.
    public_url: str | None = None
    #: Peers (load balancers) whose X-Forwarded-Proto/Host are believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Client connections held open at once; more are answered 503.
    max_connections: int = 10_000
    #: Seconds an idle client connection stays open.
    idle_timeout: float = 30.0
    #: Seconds a client has to send a request's whole header block.
    header_timeout: float = 30.0
    #: Seconds requests under way have to end once shutdown begins.
    shutdown_grace: float = 10.0
    #: Seconds a client may take nothing of a blob body before it is cut.
    send_timeout: float = 120.0

    @property
    def endpoint(self) -> str:
        if self.listen:
            return self.listen
        interface = self.bind_address.replace(":", r"\:")
        return f"tcp:{self.port}:interface={interface}"


@dataclass(frozen=True)
class AuthConfig:
    jwt_secret: str = field(repr=False)
    realm_service: str = "cargobay"
    #: Older secrets still accepted (key rotation); never used to sign.
    previous_jwt_secrets: tuple[str, ...] = field(default=(), repr=False)
    #: PEM public keys (RS256/ES256) of token issuers that keep their key.
    public_keys: tuple[bytes, ...] = ()
    leeway_seconds: float = 60.0
    issuer: str | None = None
    audience: str | None = None
    token_lifetime_seconds: int = 300


@dataclass(frozen=True)
class CacheConfig:
    directory: str = "cache"
    max_size_bytes: int = 10 * 1024**3
    max_age_seconds: int = 7 * 24 * 3600
    eviction_interval_seconds: float = 60.0
    tag_ttl_seconds: float = 60.0
    #: How long a pull of a cached tag past its TTL waits for the upstream's
    #: check before the cache answers (the check goes on).
    revalidate_wait_seconds: float = 5.0
    #: Bytes of cached blobs re-verified against their digests per eviction
    #: interval (0: never).
    scrub_bytes_per_interval: int = 64 * 1024 * 1024
    #: Whether a lone client of a cold blob is paced by the cache's disk
    #: (the upstream then sends every blob once); else a disk slower than
    #: the upstream is left behind, and what it lacks fetched into it after.
    client_waits_for_disk: bool = False
    #: How long such a client is kept in step with the disk first, so that
    #: clients arriving together share one download.
    leave_disk_after_seconds: float = 0.25
    #: Whether downloads are written to the cache with O_DIRECT, past the
    #: page cache (where the filesystem has it).
    direct_writes: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    #: Path on the main listener, when there is no listen endpoint of its own.
    path: str = "/metrics"
    #: A Twisted endpoint of its own for /metrics (and health), e.g. "tcp:9090".
    listen: str | None = None
    #: Whether /metrics needs a client token like the registry routes.
    require_auth: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    #: "text" (human-readable) or "json" (one object per line).
    format: str = "text"
    #: debug, info, warn, error; the CARGOBAY_LOG_LEVEL variable overrides it.
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    auth: AuthConfig
    cache: CacheConfig
    registries: tuple[RegistryConfig, ...]
    repositories: tuple[RepositoryMapping, ...]
    source: str = "<embedded>"
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    #: What was taken but is worth the operator's eye (unknown keys, which the
    #: earlier implementation ignored too; duplicates, of which the first wins).
    warnings: tuple[str, ...] = ()

    def registry(self, registry_id: str) -> RegistryConfig:
        for registry in self.registries:
            if registry.id == registry_id:
                return registry
        raise KeyError(registry_id)

    def mapping_for(self, name: str) -> RepositoryMapping | None:
        for mapping in self.repositories:
            if mapping.name == name:
                return mapping
        return None

    @property
    def uses_development_secret(self) -> bool:
        return self.auth.jwt_secret == DEVELOPMENT_SECRET

    def weak_secret(self) -> str | None:
        """
        Why C{jwt_secret} (or one of C{previous_jwt_secrets}, which verify
        tokens as well) lets others mint tokens, if one does: it is still taken.
        """
        named = [("jwt_secret", self.auth.jwt_secret)]
        named += [(f"previous_jwt_secrets[{i}]", s) for i, s in enumerate(self.auth.previous_jwt_secrets)]
        for name, secret in named:
            if secret in PUBLISHED_SECRETS:
                return f"{name} is an example's, published with this program or the earlier one"
            size = len(secret.encode("utf-8"))
            if size < MIN_SECRET_BYTES:
                return f"{name} is {size} bytes: HS256 wants at least {MIN_SECRET_BYTES} random ones"
        return None


# ---------------------------------------------------------------------------
# parsing


class _Section:
    """
    A view of one TOML table that remembers which keys were read, so that
    unknown keys (typos) can be reported, in C{warnings}: the earlier
    implementation ignored them, and its config files must keep loading.

    A C{strict} table refuses them instead once it was written for cargobay
    (it sets a key other than the C{legacy} ones the earlier implementation
    read), and always refuses one that may mean a C{guarded} key: in [auth],
    an issuer or audience under another name would silently let in tokens
    meant for others.  Any other table refuses the keys that belong in
    those (L{_MISPLACED}).
    """

    def __init__(
        self, where: str, table: Any, warnings: list[str], strict: bool = False,
        legacy: frozenset[str] = frozenset(), guarded: _Guard | None = None,
    ) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        self.where = where
        self.table: Mapping[str, Any] = table
        self.known: set[str] = set()
        self.warnings = warnings
        self.strict = strict
        self.legacy = legacy
        self.guarded = guarded

    def _get(self, key: str) -> Any:
        self.known.add(key)
        return self.table.get(key)

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def string(
        self, key: str, default: str | None = None, required: bool = False, empty: bool = False,
        secret: bool = False,
    ) -> str | None:
        value = self._get(key)
        if value is None:
            if required:
                self._typo_of(key)
                raise ConfigError(f"{self._name(key)}: missing (a string is required)")
            return default
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)}: must be a string, not {_kind(value)}")
        if "\0" in value and not secret:
            # (No path, URL, name or endpoint holds one; a secret may.)
            raise ConfigError(f"{self._name(key)}: must not contain a NUL character")
        if required and not empty and not value.strip():
            raise ConfigError(f"{self._name(key)}: must not be empty")
        return value

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._name(key)}: must be an integer, not {_kind(value)}")
        if value < minimum:
            raise ConfigError(f"{self._name(key)}: must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._name(key)}: must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, default: float, positive: bool = True) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self._name(key)}: must be a number, not {_kind(value)}")
        if not math.isfinite(value):
            # nan passes every comparison's "not too big" side: a leeway of nan
            # would let expired tokens in.
            raise ConfigError(f"{self._name(key)}: must be a finite number, got {value}")
        if positive and not value > 0:
            raise ConfigError(f"{self._name(key)}: must be greater than 0, got {value}")
        return float(value)

    def strings(self, key: str, secret: bool = False) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self._name(key)}: must be an array of non-empty strings")
        if not secret and any("\0" in v for v in value):
            raise ConfigError(f"{self._name(key)}: must not contain a NUL character")
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: must be true or false, not {_kind(value)}")
        return value

    def table_list(self, key: str) -> list[Any]:
        value = self._get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{self._name(key)}: must be an array of tables ([[{key}]])")
        return value

    def sub(self, key: str) -> _Section | None:
        value = self._get(key)
        if value is None:
            return None
        return _Section(self._name(key), value, self.warnings, self.strict)

    def _typo_of(self, key: str) -> None:
        """
        A required key is missing: if an unknown key looks like it, the typo is
        the real problem, so name that instead.
        """
        for candidate in self.table:
            if candidate not in self.known and difflib.get_close_matches(key, [candidate], cutoff=0.7):
                raise ConfigError(f"{self._name(candidate)}: unknown key (did you mean {key!r}?)")

    def finish(self) -> None:
        own = any(key in self.table for key in self.known - self.legacy)
        for key in sorted(set(self.table) - self.known):
            close = difflib.get_close_matches(key, sorted(self.known), n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys here: {', '.join(sorted(self.known))}"
            if self.strict and (own or (self.guarded is not None and self.guarded.may_mean(key))):
                raise ConfigError(f"{self._name(key)}: unknown key ({hint})")
            if not self.strict:
                _refuse_misplaced(self._name(key), key)
            self.warnings.append(f"{self._name(key)}: unknown key, ignored ({hint})")


@dataclass(frozen=True)
class _Guard:
    """Keys whose absence lets in more than meant, and what may be one of them written otherwise."""

    names: tuple[str, ...]
    parts: tuple[str, ...]

    def may_mean(self, key: str) -> bool:
        lowered = key.lower()
        return any(part in lowered for part in self.parts) or bool(
            difflib.get_close_matches(lowered, self.names, n=1, cutoff=0.7)
        )


_AUTH_GUARD = _Guard(("issuer", "audience"), ("aud", "iss"))
_METRICS_GUARD = _Guard(("require_auth",), ("auth",))
#: Keys of a strict table that, anywhere else, would go unread: an audience
#: appended at the end of a file lands in its last [[repositories]] table.
_MISPLACED = {"issuer": "auth", "audience": "auth", "require_auth": "metrics"}


def _refuse_misplaced(name: str, key: str) -> None:
    lowered = key.lower()
    if lowered in _MISPLACED:
        raise ConfigError(f"{name}: unknown key here (it belongs in [{_MISPLACED[lowered]}])")


def _kind(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@([^/?#@]*)(.*)", re.DOTALL)


def _url_credentials(where: str, url: str) -> tuple[str, UpstreamAuth | None]:
    """A URL without its user:password@, and those (percent-decoded)."""
    match = _USERINFO.fullmatch(url)
    if match is None:
        return url, None
    scheme, userinfo, host, rest = match.groups()
    if "\\" in userinfo:
        # A URL parser as browsers' (the earlier implementation's) ends the
        # host at the backslash: the account would go to another host.
        raise ConfigError(f"{where}: a backslash before the '@' (percent-encode it as %5C in a password)")
    username, _, password = userinfo.partition(":")
    if not username and not password:
        return scheme + host + rest, None  # "https://@host" (or ":@"): no account, as reqwest took it
    try:
        account = UpstreamAuth(unquote(username, errors="strict"), unquote(password, errors="strict"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the user:password@ in it is not percent-encoded UTF-8") from None
    return scheme + host + rest, account


def _shown(url: str) -> str:
    """A URL as an error may show it: never what comes before an '@' (a password, maybe with '/' or '#')."""
    return repr(re.sub(r"://.*@", "://***@", url, flags=re.DOTALL))


def _check_url(where: str, url: str) -> None:
    shown = _shown(url)
    try:
        parts = urlsplit(url)
    except ValueError as e:  # a bracketed host that is no address
        raise ConfigError(f"{where}: {shown} is not a usable URL ({e})") from None
    if "@" in url:
        # Never echo it: the part before "@" is a password.  (A registry's
        # account was taken out before, unless it could not be read.)
        hint = (
            "; percent-encode any '/', '?' or '#' in the password, or put it in [registries.auth]"
            if where.startswith("registries") else ""
        )
        raise ConfigError(f"{where}: must not hold credentials (user:password@){hint}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {shown} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: {shown} must not have a query or fragment")
    if ":" in parts.hostname:
        try:
            ipaddress.IPv6Address(parts.hostname)
        except ValueError:
            raise ConfigError(f"{where}: {shown}: {parts.hostname!r} is not an IPv6 address") from None
        if "%" in parts.hostname:
            raise ConfigError(f"{where}: {shown}: an IPv6 address with a zone (%) is not supported; use a host name")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{where}: {shown} has an invalid port") from None


#: A host name to bind to (an address is checked as one).
_BIND_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def _check_ca_file(where: str, path: str) -> None:
    """The file must hold a PEM certificate, as the TLS client will load it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: {path!r} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {path!r} is not a PEM certificate ({type(e).__name__})") from None


def parse_config(text: str, source: str = "<string>") -> Config:
    """
    Parse and validate the text of a configuration file.

    @raise ConfigError: naming the first problem found.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    warnings: list[str] = []
    top = _Section("", document, warnings)

    def section(
        key: str, strict: bool = False, legacy: frozenset[str] = frozenset(), guarded: _Guard | None = None,
    ) -> _Section:
        top.known.add(key)
        value = document.get(key, {})
        return _Section(key, value, warnings, strict, legacy, guarded)

    server_section = section("server")
    bind_address = server_section.string("bind_address", "0.0.0.0") or "0.0.0.0"
    if not _BIND_HOST.fullmatch(bind_address):
        try:
            ipaddress.ip_address(bind_address)
        except ValueError:
            raise ConfigError(
                f"server.bind_address: {bind_address!r} is not an IP address or host name"
                " (the port goes in server.port)"
            ) from None
    port = server_section.integer("port", 5000, minimum=0, maximum=65535)
    listen = server_section.string("listen")
    public_url = server_section.string("public_url")
    if public_url is not None:
        _check_url("server.public_url", public_url)
        public_url = public_url.rstrip("/")
    if listen is not None:
        _check_listen("server.listen", listen)
    trusted = server_section.strings("trusted_proxies")
    for address in trusted:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: {address!r} is not an IP address or network") from None
    max_connections = server_section.integer("max_connections", 10_000, minimum=1)
    idle_timeout = server_section.number("idle_timeout_seconds", 30.0)
    header_timeout = server_section.number("header_timeout_seconds", 30.0)
    shutdown_grace = server_section.number("shutdown_grace_seconds", 10.0, positive=False)
    if shutdown_grace < 0:
        raise ConfigError(f"server.shutdown_grace_seconds: must be at least 0, got {shutdown_grace:g}")
    send_timeout = server_section.number("send_timeout_seconds", 120.0)
    server_section.finish()
    server = ServerConfig(
        bind_address, port, listen, public_url, trusted, max_connections, idle_timeout, header_timeout,
        shutdown_grace, send_timeout,
    )

    auth_section = section("auth", strict=True, legacy=frozenset({"jwt_secret"}), guarded=_AUTH_GUARD)
    if "auth" not in document:
        raise ConfigError("auth.jwt_secret: missing ([auth] jwt_secret is required)")
    secret = auth_section.string("jwt_secret", required=True, secret=True)
    assert secret is not None
    service = auth_section.string("service", "cargobay") or "cargobay"
    previous = auth_section.strings("previous_jwt_secrets", secret=True)
    public_keys = []
    for key_file in auth_section.strings("public_key_files"):
        try:
            pem = Path(key_file).read_bytes()
            load_public_key(pem)
        except OSError as e:
            raise ConfigError(f"auth.public_key_files: cannot read {key_file!r} ({e.strerror})") from None
        except ValueError as e:
            raise ConfigError(f"auth.public_key_files: {key_file!r} is not a usable public key ({e})") from None
        public_keys.append(pem)
    auth = AuthConfig(
        secret,
        service,
        previous,
        tuple(public_keys),
        leeway_seconds=auth_section.number("leeway_seconds", 60.0, positive=False),
        issuer=auth_section.string("issuer"),
        audience=auth_section.string("audience"),
        token_lifetime_seconds=auth_section.integer("token_lifetime_seconds", 300, minimum=1),
    )
    if auth.leeway_seconds < 0 or auth.leeway_seconds > 3600:
        raise ConfigError(f"auth.leeway_seconds: must be between 0 and 3600, got {auth.leeway_seconds}")
    auth_section.finish()

    cache_section = section("cache")
    cache = CacheConfig(
        directory=cache_section.string("directory", "cache", required="cache" in document)
        or "cache",
        max_size_bytes=cache_section.integer("max_size_bytes", CacheConfig.max_size_bytes),
        max_age_seconds=cache_section.integer("max_age_seconds", CacheConfig.max_age_seconds),
        eviction_interval_seconds=cache_section.number(
            "eviction_interval_seconds", CacheConfig.eviction_interval_seconds
        ),
        tag_ttl_seconds=cache_section.number(
            "tag_ttl_seconds", CacheConfig.tag_ttl_seconds, positive=False
        ),
        revalidate_wait_seconds=cache_section.number(
            "revalidate_wait_seconds", CacheConfig.revalidate_wait_seconds
        ),
        scrub_bytes_per_interval=cache_section.integer(
            "scrub_bytes_per_interval", CacheConfig.scrub_bytes_per_interval
        ),
        client_waits_for_disk=cache_section.boolean(
            "client_waits_for_disk", CacheConfig.client_waits_for_disk
        ),
        leave_disk_after_seconds=cache_section.number(
            "leave_disk_after_seconds", CacheConfig.leave_disk_after_seconds, positive=False
        ),
        direct_writes=cache_section.boolean("direct_writes", CacheConfig.direct_writes),
    )
    if cache.leave_disk_after_seconds < 0:
        raise ConfigError(
            f"cache.leave_disk_after_seconds: must not be negative, got {cache.leave_disk_after_seconds}"
        )
    if cache.tag_ttl_seconds < 0:
        raise ConfigError(f"cache.tag_ttl_seconds: must not be negative, got {cache.tag_ttl_seconds}")
    if cache.max_age_seconds == 0 and "max_age_seconds" in cache_section.table:
        warnings.append(
            "cache.max_age_seconds: 0 keeps blobs with no age limit (the earlier implementation removed "
            "every blob at its next cleanup, once a minute)"
        )
    cache_section.finish()

    registries = []
    default_hosts: dict[str, tuple[str, ...]] = {}
    seen_ids: set[str] = set()
    for index, table in enumerate(top.table_list("registries")):
        where = f"registries[{index}]"
        entry = _Section(where, table, warnings)
        registry_id = entry.string("id", required=True)
        assert registry_id is not None
        if len(registry_directory(registry_id)) > MAX_REGISTRY_ID or not registry_id.isprintable():
            raise ConfigError(
                f"{where}.id: {registry_id[:MAX_REGISTRY_ID]!r} must be printable text of at most "
                f"{MAX_REGISTRY_ID} characters (a character other than a letter, digit, '.', '_' or '-' "
                "counts three times)"
            )
        if registry_id in seen_ids:
            warnings.append(f"{where}.id: duplicate registry id {registry_id!r}, ignored (the first one is used)")
            continue
        seen_ids.add(registry_id)
        url = entry.string("url", required=True)
        assert url is not None
        url, in_url = _url_credentials(f"{where}.url", url)
        _check_url(f"{where}.url", url)
        upstream_auth = None
        auth_table = entry.sub("auth")
        if in_url is not None:
            # The earlier implementation's HTTP client sent them as Basic
            # credentials: its one way to a registry behind a password.
            # (Never echoed: the part before "@" holds a password.)
            upstream_auth = in_url
            warnings.append(
                f"{where}.url: the user:password@ in it ignored, [registries.auth] is the account used"
                if auth_table is not None
                else f"{where}.url: the user:password@ in it is taken as the registry's account; "
                "[registries.auth] is the place for it"
            )
        if auth_table is not None:
            username = auth_table.string("username", required=True, empty=True, secret=True)
            password = auth_table.string("password", required=True, empty=True, secret=True)
            auth_table.finish()
            assert username is not None and password is not None
            empty = [key for key, value in (("username", username), ("password", password)) if not value]
            if empty:
                warnings.append(
                    f"{where}.auth: empty {' and '.join(empty)}, sent as such in the Basic credentials "
                    "(leave [auth] out for an anonymous registry)"
                )
            upstream_auth = UpstreamAuth(username, password)
        hosts = tuple(h.lower() for h in entry.strings("hosts"))
        hostname = (urlsplit(url).hostname or "").lower()
        is_docker_hub = hostname in DOCKER_HUB_HOSTS
        if not hosts:
            # Taken only if a '*' mapping serves the whole registry (below).
            # containerd names a registry on another port with it: host:port.
            netloc = urlsplit(url).netloc.rpartition("@")[2].lower()
            default_hosts[registry_id] = DOCKER_HUB_HOSTS if is_docker_hub else tuple(dict.fromkeys((hostname, netloc)))
        implicit_library = entry.boolean("implicit_library", is_docker_hub)
        ca_file = entry.string("ca_file")
        if ca_file is not None:
            _check_ca_file(f"{where}.ca_file", ca_file)
        registries.append(
            RegistryConfig(
                id=registry_id,
                url=url.rstrip("/"),
                auth=upstream_auth,
                ca_file=ca_file,
                connect_timeout=entry.number("connect_timeout_seconds", 10.0),
                read_timeout=entry.number("read_timeout_seconds", 60.0),
                hosts=hosts,
                implicit_library=implicit_library,
            )
        )
        entry.finish()

    repositories = []
    seen_names: set[str] = set()
    for index, table in enumerate(top.table_list("repositories")):
        where = f"repositories[{index}]"
        entry = _Section(where, table, warnings)
        name = entry.string("name", required=True)
        registry_id = entry.string("registry_id", required=True)
        upstream_name = entry.string("upstream_name", required=True)
        entry.finish()
        assert name is not None and registry_id is not None and upstream_name is not None
        # The earlier implementation took any name; no client can pull one
        # that is not a repository name.  (A "*" is cargobay's own pattern:
        # a mistake in one stops start-up, below.)
        unusable = [(key, value) for key, value in (("name", name), ("upstream_name", upstream_name))
                    if not is_valid_pattern(value) and "*" not in value]
        if unusable:
            key, value = unusable[0]
            why = (
                "has capital letters, which no repository name may have" if is_valid_pattern(value.lower())
                else "is not a valid repository name"
            )
            warnings.append(f"{where}.{key}: {value!r} {why}: this mapping is ignored")
            continue
        if not is_valid_pattern(name):
            raise ConfigError(
                f"{where}.name: {name!r} is not a valid repository name"
                " (or a prefix pattern like 'hub/*', or '*')"
            )
        if not is_valid_pattern(upstream_name):
            raise ConfigError(
                f"{where}.upstream_name: {upstream_name!r} is not a valid repository name"
                " (or a pattern like 'library/*', or '*')"
            )
        if name.endswith("*") != upstream_name.endswith("*"):
            raise ConfigError(
                f"{where}.upstream_name: a prefix pattern name needs a pattern upstream_name"
                f" and the other way round ({name!r} -> {upstream_name!r})"
            )
        if registry_id not in seen_ids:
            raise ConfigError(
                f"{where}.registry_id: unknown registry {registry_id!r}"
                f" (defined: {', '.join(sorted(seen_ids)) or 'none'})"
            )
        if name in seen_names:
            warnings.append(f"{where}.name: duplicate repository name {name!r}, ignored (the first one is used)")
            continue
        seen_names.add(name)
        repositories.append(RepositoryMapping(name, registry_id, upstream_name))

    # ?ns= reaches a registry by any upstream name only where the operator
    # opened it whole ('*' onto '*', every name as itself) or listed its
    # hosts; by its default hosts, it reaches only the names mapped to it,
    # as they are named there (see Mapper).  A renaming pattern ("priv/*"
    # onto '*') does not open it: a token for "library" would then reach
    # that registry's "library/..." as well as the mirror's.
    served_whole = {m.registry_id for m in repositories if m.name == "*" and m.upstream_name == "*"}
    registries = [
        replace(r, hosts=default_hosts[r.id], hosts_open=r.id in served_whole) if r.id in default_hosts else r
        for r in registries
    ]

    metrics_section = section("metrics", strict=True, guarded=_METRICS_GUARD)
    metrics_path = metrics_section.string("path", "/metrics") or "/metrics"
    if not metrics_path.startswith("/") or metrics_path.startswith("/v2") or metrics_path in ("/token", "/healthz", "/readyz"):
        raise ConfigError(f"metrics.path: {metrics_path!r} must be an absolute path outside the registry API")
    metrics_listen = metrics_section.string("listen")
    if metrics_listen is not None:
        _check_listen("metrics.listen", metrics_listen)
    metrics = MetricsConfig(
        enabled=metrics_section.boolean("enabled", True),
        path=metrics_path,
        listen=metrics_listen,
        require_auth=metrics_section.boolean("require_auth", False),
    )
    metrics_section.finish()

    logging_section = section("logging", strict=True)
    log_format = logging_section.string("format", "text") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"logging.format: must be 'text' or 'json', got {log_format!r}")
    log_level = (logging_section.string("level", "info") or "info").lower()
    log_level = LEVEL_ALIASES.get(log_level, log_level)  # as CARGOBAY_LOG_LEVEL and RUST_LOG take it
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"logging.level: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    logging_section.finish()

    strict_sections = {"auth": auth_section, "metrics": metrics_section, "logging": logging_section}
    for unknown in sorted(set(document) - top.known):
        close = difflib.get_close_matches(unknown, list(strict_sections), n=1, cutoff=0.7)
        value = document[unknown]
        if not isinstance(value, dict):
            _refuse_misplaced(unknown, unknown)
        if close and isinstance(value, dict) and set(value) & strict_sections[close[0]].known:
            # A misspelled [auth] that sets an audience: the audience must not go unchecked.
            raise ConfigError(f"{unknown}: unknown section (did you mean {close[0]!r}?)")
        hint = (
            f"did you mean {close[0]!r}?" if close
            else "known: auth, cache, logging, metrics, registries, repositories, server"
        )
        warnings.append(f"{unknown}: unknown section, ignored ({hint})")

    return Config(
        server=server,
        auth=auth,
        cache=cache,
        registries=tuple(registries),
        repositories=tuple(repositories),
        source=source,
        metrics=metrics,
        logging=LoggingConfig(log_format, log_level),
        warnings=tuple(warnings),
    )


def is_valid_pattern(name: str) -> bool:
    """
    A repository name, or a prefix pattern: C{*} (every name) or
    C{<name>/*} (every name below it).
    """
    if name == "*":
        return True
    if name.endswith("/*"):
        return is_valid_name(name[:-2])
    return is_valid_name(name)


def _check_listen(where: str, description: str) -> None:
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl", "unix", "systemd"):
        raise ConfigError(
            f"{where}: {description!r} is not a supported endpoint (tcp:, tcp6:, ssl:, unix:)"
        )


def resolve_config_path(option: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """
    Where to read the configuration from: the command-line option, else
    C{CONFIG_PATH}, else C{config.toml}.
    """
    if option:
        return option
    return environ.get("CONFIG_PATH") or DEFAULT_CONFIG_PATH


def load_config(path: str, allow_embedded_default: bool = False) -> Config:
    """
    Read and validate the file at C{path}.

    @param allow_embedded_default: when the file does not exist, use the
        embedded development configuration instead of failing.
    """
    try:
        # utf-8-sig: a byte order mark (as some Windows editors write) is not TOML.
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        if allow_embedded_default:
            return parse_config(EMBEDDED_DEFAULT_CONFIG, "<embedded default>")
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    return parse_config(text, path)

