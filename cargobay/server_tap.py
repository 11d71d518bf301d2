"""
The C{twistd cargobay} plugin: options, and the service tree that runs the proxy.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import internet, service, strports
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import server

from cargobay.auth import Authenticator
from cargobay.blobs import BlobService
from cargobay.cache import BlobCache
from cargobay.config import Config, ConfigError, load_config, resolve_config_path
from cargobay.manifest_store import ManifestStore
from cargobay.manifests import ManifestService
from cargobay.routes import RegistryApp
from cargobay.tokens import mint_token
from cargobay.upstream import Upstream

log = Logger()


def fail(message: str) -> None:
    """
    Stop before anything listens, with one line on stderr and a non-zero exit.
    """
    sys.stderr.write(f"cargobay: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


class Options(usage.Options):
    synopsis = "[--config FILE | --dev]"
    longdesc = (
        "Run the cargobay pull-through registry cache. The config file is --config, "
        "else $CONFIG_PATH, else config.toml."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML config file."],
    ]
    optFlags = [
        ["dev", None, "Start on the embedded development config when no config file exists."],
    ]

    def postOptions(self) -> None:
        path = resolve_config_path(self["config"])
        try:
            self.config = load_config(path, allow_embedded_default=bool(self["dev"]))
        except ConfigError as e:
            fail(str(e))
        from twisted.internet import reactor

        try:
            # Parses the description (and loads TLS files) without listening.
            endpoints.serverFromString(reactor, self.config.server.endpoint)
        except Exception as e:
            fail(f"server.listen: {self.config.server.endpoint!r} is not a usable endpoint ({e})")


class ProxySite(server.Site):
    # Tracebacks never reach clients.
    displayTracebacks = False


def build_app(config: Config, reactor: Any) -> tuple[RegistryApp, BlobCache]:
    cache = BlobCache(
        config.cache.directory,
        config.cache.max_size_bytes,
        config.cache.max_age_seconds,
        reactor,
    )
    cache.open()
    upstreams = {registry.id: Upstream(registry, reactor) for registry in config.registries}
    authenticator = Authenticator.from_config(config.auth, config.server)
    store = ManifestStore(config.cache.directory, reactor)
    manifests = ManifestService(store, reactor, config.cache.tag_ttl_seconds)
    app = RegistryApp(config, authenticator, upstreams, BlobService(cache, reactor), manifests)
    return app, cache


def _announce_development(config: Config) -> None:
    token = mint_token(config.auth.jwt_secret, "developer", None, 24 * 3600)
    log.warn(
        "\n" + "!" * 78 + "\n"
        "  cargobay is running on its EMBEDDED DEVELOPMENT CONFIG with a PUBLIC secret.\n"
        "  Anyone can mint tokens for it. Never expose it; write a config.toml instead\n"
        "  (see config.example.toml).\n"
        "  A token valid for 24 hours, for every repository:\n\n"
        "    {token}\n\n"
        "  Try: curl -H 'Authorization: Bearer {token}' http://{where}/v2/alpine/tags/list\n"
        + "!" * 78,
        token=token,
        where=f"{config.server.bind_address}:{config.server.port}",
    )


def _maintain(cache: BlobCache, scrub_bytes: int) -> None:
    # Periodic work logs its own failures: one exception would stop the timer for good.
    try:
        cache.evict().addErrback(lambda f: log.failure("eviction failed", f))
        if scrub_bytes > 0:
            cache.scrub(scrub_bytes).addErrback(lambda f: log.failure("scrubbing failed", f))
    except Exception:
        log.failure("cache maintenance failed")


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config: Config = options.config
    app, cache = build_app(config, reactor)
    top = service.MultiService()
    site = ProxySite(app.resource())
    strports.service(config.server.endpoint, site).setServiceParent(top)
    internet.TimerService(
        config.cache.eviction_interval_seconds, _maintain, cache, config.cache.scrub_bytes_per_interval
    ).setServiceParent(top)
    log.info(
        "cargobay listening on {endpoint} with {count} repositories from {source}",
        endpoint=config.server.endpoint,
        count=len(config.repositories),
        source=config.source,
    )
    if config.uses_development_secret:
        _announce_development(config)
    return top

