"""
``python -m cargobay.healthcheck``: GET /healthz where the config says the
proxy listens (the container image's HEALTHCHECK).  Exit 0 when it answers
200, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys

from cargobay.config import Config, ConfigError, load_config, resolve_config_path


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _fields(description: str) -> tuple[str, dict[str, str], list[str]]:
    """A strports description's kind, its key=value options and its plain arguments."""
    kind, _, rest = description.partition(":")
    options: dict[str, str] = {}
    plain: list[str] = []
    for part in rest.replace("\\:", "\0").split(":"):
        part = part.replace("\0", ":")
        key, equals, value = part.partition("=")
        if equals:
            options[key] = value
        elif part:
            plain.append(part)
    return kind, options, plain


def connection(config: Config, timeout: float = 5.0) -> http.client.HTTPConnection:
    """A connection to where the proxy (or its metrics listener) listens."""
    description = config.metrics.listen if config.metrics.enabled and config.metrics.listen else config.server.endpoint
    kind, options, plain = _fields(description)
    if kind == "unix":
        return _UnixConnection(options.get("address") or plain[0], timeout)
    port = int(options.get("port") or plain[0])
    host = options.get("interface") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if kind == "ssl":
        # Only whether it answers: the certificate is the clients' to check.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        config = load_config(resolve_config_path(args[0] if args else None))
        conn = connection(config)
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except (ConfigError, OSError, ValueError, IndexError, http.client.HTTPException) as e:
        sys.stderr.write(f"cargobay healthcheck: {e}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"cargobay healthcheck: /healthz answered {status}\n")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
