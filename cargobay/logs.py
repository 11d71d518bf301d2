"""
Log output: human-readable text by default, or one JSON object per line.

The level comes from C{CARGOBAY_LOG_LEVEL} (or, for operators migrating from
the earlier implementation, C{RUST_LOG} such as C{docker_registry_proxy=debug}),
else from the config's C{[logging] level}.  Use as
C{twistd --logger cargobay.logs.json_observer cargobay ...}, or set
C{[logging] format = "json"}.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer


def printable(text: str, limit: int = 300) -> str:
    """
    C{text} as a log line may carry it: at most C{limit} characters, and
    what does not print (a line break that would forge another line, a
    terminal escape, a lone surrogate that no log file can encode, which
    lost the whole line) as its Python escape.
    """
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)

class _Field(str):
    """
    A field's value: itself (in a JSON line's field), and quoted where a
    message is formatted from it (see L{field_value}).
    """

    def __format__(self, spec: str) -> str:
        text = str(self)
        if text and not any(c in text for c in ' "=\\'):
            return format(text, spec)
        return format(json.dumps(text, ensure_ascii=False), spec)


def field_value(text: str, limit: int = 300) -> str:
    """
    C{text} as the value of a C{name=value} field of a log line: as
    L{printable}, and quoted (a JSON string) in the line's text when it
    holds a space, a quote, an C{=} or a backslash, so that it cannot pass
    for more fields (a token's subject C{"x repository=secret"}).  A JSON
    line's field of the same name holds it unquoted.
    """
    return _Field(printable(text, limit))


class Throttle:
    """
    Whether a warning said again and again is due: at most once every
    C{every} seconds for each key, and how many were held back since.
    """

    def __init__(self, every: float) -> None:
        self._every = every
        self._said: dict[Any, tuple[float, int]] = {}

    def due(self, key: Any, now: float) -> int | None:
        """None if not due (then counted); else how many were held back since it was last said."""
        said = self._said.get(key)
        if said is not None and 0 <= now - said[0] < self._every:
            self._said[key] = (said[0], said[1] + 1)
            return None
        self._said[key] = (now, 0)
        return said[1] if said is not None else 0


_LEVELS = {"debug", "info", "warn", "error", "critical"}
#: Other names of levels (Rust's tracing, Python's), in the environment and in [logging].
LEVEL_ALIASES = {"warning": "warn", "trace": "debug", "fatal": "critical"}
#: RUST_LOG targets that meant this program in the earlier implementation.
_OWN_TARGETS = {"docker_registry_proxy", "cargo_bay", "cargobay"}


def level_from_environment(environ: Mapping[str, str], default: str) -> str:
    for variable in ("CARGOBAY_LOG_LEVEL", "RUST_LOG"):
        value = environ.get(variable, "").strip().lower()
        if not value:
            continue
        # RUST_LOG may be "level" or "target=level,other=level" (the earlier
        # implementation's default: docker_registry_proxy=info): its own
        # target's level wins, then a bare level; other crates' are not ours.
        # "off" silences; a target alone (env_logger's syntax) means all of it.
        own = bare = None
        for item in value.replace(",", " ").split():
            target, _, level = item.rpartition("=")
            level = LEVEL_ALIASES.get(level, level)
            if not target and level.split("::")[0] in _OWN_TARGETS:
                own = "debug"
                continue
            if level not in _LEVELS and level != "off":
                continue
            if not target:
                bare = level
            elif target.split("::")[0] in _OWN_TARGETS:
                own = level
        chosen = own or bare
        if chosen is not None:
            return chosen
    return default


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    One JSON object per event and line: time, level, namespace, the
    formatted message, and the event's simple fields (never objects).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(),
            "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in ("message", "format", "system", "time", "isError"):
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record.setdefault(key, value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


def make_observer(format: str, level: str, stream: IO[str] | None = None) -> ILogObserver:
    stream = stream if stream is not None else sys.stdout
    base: ILogObserver = JSONLinesObserver(stream) if format == "json" else textFileLogObserver(stream)
    chosen = level_from_environment(os.environ, level)
    if chosen == "off":  # RUST_LOG=off, as the earlier implementation took it
        return FilteringLogObserver(base, [cast(ILogFilterPredicate, lambda event: PredicateResult.no)])
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(chosen))
    return FilteringLogObserver(base, [predicate])


def json_observer() -> ILogObserver:
    """For C{twistd --logger cargobay.logs.json_observer}."""
    return make_observer("json", "info")


def text_observer() -> ILogObserver:
    """For C{twistd --logger cargobay.logs.text_observer}."""
    return make_observer("text", "info")
