"""
Which upstream repository a local name means.

Three kinds of mapping, tried in this order:

1. exact names from ``[[repositories]]`` (the earlier implementation's kind):
   ``mycompany/app`` -> private registry ``team/application`` (with ``?ns=``,
   only a mapping onto that registry that keeps the name: a mirror request
   names the upstream repository);
2. a mirror request's ``?ns=<registry host>`` (containerd's ``hosts.toml``
   mirrors add it) picks the configured registry with that host, and the
   name is the upstream name: any name where the registry lists its hosts
   or a ``*`` mapping serves it whole, else only names mapped onto it;
3. prefix patterns: ``hub/*`` -> Docker Hub ``*`` serves ``hub/library/alpine``
   as ``library/alpine``; ``*`` -> Docker Hub ``*`` makes cargobay a mirror
   of that registry for its own names (Docker's ``registry-mirrors``).

On Docker Hub a one-component name means ``library/<name>``.  Names only ever
map onto configured registries: cargobay is not an open proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

from cargobay.config import Config, RegistryConfig


@dataclass(frozen=True)
class Resolved:
    local_name: str
    registry_id: str
    upstream_name: str


@dataclass(frozen=True)
class _Prefix:
    local_prefix: str  # "" for "*", else "hub/"
    upstream_prefix: str  # "" for "*", else "library/"
    registry_id: str


class Mapper:
    def __init__(self, config: Config) -> None:
        self._registries = {r.id: r for r in config.registries}
        self._exact: dict[str, Resolved] = {}
        prefixes = []
        for mapping in config.repositories:
            if mapping.name.endswith("*"):
                prefixes.append(
                    _Prefix(mapping.name[:-1], mapping.upstream_name[:-1], mapping.registry_id)
                )
            else:
                self._exact[mapping.name] = Resolved(mapping.name, mapping.registry_id, mapping.upstream_name)
        # Longest prefix first: "hub/special/*" wins over "hub/*" and "*".
        self._prefixes = sorted(prefixes, key=lambda p: len(p.local_prefix), reverse=True)
        self._by_host: dict[str, RegistryConfig] = {}
        for registry in config.registries:
            for host in registry.hosts:
                self._by_host.setdefault(host, registry)

    def names(self) -> list[str]:
        """The local names mapped one by one, in lexical order."""
        return sorted(self._exact)

    def resolve(self, name: str, ns: str | None = None) -> Resolved | None:
        exact = self._exact.get(name)
        if ns:
            registry = self._by_host.get(ns.lower())
            if registry is None:
                return None

            def mirrors(mapped: Resolved | None) -> bool:
                # A mirror request names the upstream repository itself: a
                # mapping onto another registry is not what it means
                # (ghcr.io's "alpine" is not the "alpine" mapped onto Docker
                # Hub), nor is one that renames (registry.example.com's
                # "myapp" or "corp/app" is not the "team/application" or
                # "team/app" that a mapping or a pattern makes of it).
                return (
                    mapped is not None
                    and mapped.registry_id == registry.id
                    and mapped.upstream_name == self._upstream(registry, name)
                )

            if mirrors(exact):
                return exact
            if registry.hosts_open:
                return Resolved(name, registry.id, self._upstream(registry, name))
            # Only what is mapped onto that registry (a "library/*" pattern, say).
            mapped = self._by_prefix(name)
            return mapped if mirrors(mapped) else None
        if exact is not None:
            return exact
        return self._by_prefix(name)

    def _by_prefix(self, name: str) -> Resolved | None:
        for prefix in self._prefixes:
            if prefix.local_prefix == "" or name.startswith(prefix.local_prefix):
                rest = name[len(prefix.local_prefix) :]
                if not rest:
                    continue
                registry = self._registries[prefix.registry_id]
                return Resolved(name, registry.id, self._upstream(registry, prefix.upstream_prefix + rest))
        return None

    @staticmethod
    def _upstream(registry: RegistryConfig, name: str) -> str:
        if registry.implicit_library and "/" not in name:
            return "library/" + name
        return name
