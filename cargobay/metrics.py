"""
Prometheus metrics in the text exposition format.

A few small counter, gauge and histogram types are enough here and keep the
hot path cheap (a dict update, no locks: everything runs on the reactor).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Iterable[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def lines(self) -> list[str]:
        if not self.label_names and not self._values:
            # One series from the start: rate() and absent() need a first 0.
            return [f"{self.name} 0"]
        return [
            f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"
            for labels, value in sorted(self._values.items())
        ]


class Gauge(_Metric):
    """
    A value read when scraped, from a function of the collaborators.
    """

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self._read = read

    def lines(self) -> list[str]:
        return [f"{self.name} {_number(self._read())}"]


class ReadCounter(Gauge):
    """A counter kept by a collaborator, read when scraped."""

    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Iterable[str] = (), buckets: tuple[float, ...] = _DEFAULT_BUCKETS
    ) -> None:
        super().__init__(name, help_text, labels)
        self._buckets = buckets
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts = self._counts.get(labels)
        if counts is None:
            counts = self._counts[labels] = [0] * (len(self._buckets) + 1)
            self._sums[labels] = 0.0
        counts[bisect.bisect_left(self._buckets, value)] += 1
        self._sums[labels] += value

    def lines(self) -> list[str]:
        out = []
        for labels, counts in sorted(self._counts.items()):
            cumulative = 0
            for bound, count in zip(self._buckets, counts, strict=False):
                cumulative += count
                le = _labels(self.label_names, labels, f'le="{bound:g}"')
                out.append(f"{self.name}_bucket{le} {cumulative}")
            cumulative += counts[-1]
            everything = _labels(self.label_names, labels, 'le="+Inf"')
            out.append(f"{self.name}_bucket{everything} {cumulative}")
            out.append(f"{self.name}_sum{_labels(self.label_names, labels)} {_number(self._sums[labels])}")
            out.append(f"{self.name}_count{_labels(self.label_names, labels)} {cumulative}")
        return out


class Metrics:
    """
    Every metric cargobay exports.  Collaborators call the record methods;
    gauges read their values when scraped.
    """

    def __init__(self) -> None:
        self.requests = Counter(
            "cargobay_http_requests_total", "Requests answered, by route, method and status.",
            ("route", "method", "status"),
        )
        self.bytes_served = Counter(
            "cargobay_served_bytes_total",
            "Body bytes sent to clients for manifests and blobs, by where they came from.",
            ("source",),
        )
        self.cache_lookups = Counter(
            "cargobay_cache_requests_total", "Cache lookups by kind (blob, manifest) and result (hit, miss).",
            ("kind", "result"),
        )
        self.evictions = Counter("cargobay_cache_evictions_total", "Blobs removed from the cache.")
        self.disk_left_behind = Counter(
            "cargobay_cache_disk_left_behind_total",
            "Cold blobs streamed to their client past a cache disk slower than the upstream, "
            "the rest then fetched into the cache.",
        )
        self.upstream_bytes = Counter(
            "cargobay_upstream_received_bytes_total", "Blob bytes received from upstream registries.",
            ("registry",),
        )
        self.upstream_latency = Histogram(
            "cargobay_upstream_request_duration_seconds",
            "Time until an upstream registry answered (headers), by registry.",
            ("registry",),
        )
        self.upstream_errors = Counter(
            "cargobay_upstream_errors_total",
            "Upstream requests that got no answer (network, timeout), a 5xx or 429 (status), a body "
            "that is not what was asked for (content: a digest mismatch, a manifest or list that is "
            "not one), or no token or a refusal of the configured credentials (auth), by registry.",
            ("registry", "kind"),
        )
        self.token_fetches = Counter(
            "cargobay_upstream_token_fetches_total", "Bearer tokens fetched from upstream token services.",
            ("registry",),
        )
        self._gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges.append(Gauge(name, help_text, read))

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter whose value a collaborator keeps (read when scraped)."""
        self._gauges.append(ReadCounter(name, help_text, read))

    def render(self) -> bytes:
        lines: list[str] = []
        metrics: list[_Metric] = [
            self.requests,
            self.bytes_served,
            self.cache_lookups,
            self.evictions,
            self.disk_left_behind,
            self.upstream_bytes,
            self.upstream_latency,
            self.upstream_errors,
            self.token_fetches,
            *self._gauges,
        ]
        for metric in metrics:
            lines += metric.header()
            lines += metric.lines()
        return ("\n".join(lines) + "\n").encode("utf-8")


def _number(value: float) -> str:
    """
    A sample value in full: whole numbers as integers, others as Python's
    shortest exact repr (``:g`` kept six digits: 10 GiB read 1.07374e+10, and
    a counter past a million stopped moving in rate()).
    """
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return repr(float(value))
