"""
``python -m cargobay.healthcheck``: GET /healthz where the proxy of the
config file listens (the container image's HEALTHCHECK).  Exit 0 when it
answers 200, 1 otherwise, with one line saying why.

The running proxy says where that is in a small file of its own
(L{state_path}): a change to the listener that waits for a restart, or the
file broken half-way through an edit, does not make a running proxy look
unhealthy.  Without that file (no proxy running, or one that could not
write it), the config file says.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
import stat
import sys
import tempfile

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


def health_endpoint(config: Config) -> str:
    """Where /healthz is asked: the metrics listener when it has one, else the proxy's."""
    return config.metrics.listen if config.metrics.enabled and config.metrics.listen else config.server.endpoint


def state_path(config_path: str | None) -> str:
    """
    The file where the proxy running on C{config_path} (None: the
    development config) says where it listens: in a directory of this
    user's own under the temporary directory.  Named after the path as
    given, not where its links lead (a Kubernetes ConfigMap update moves
    those).
    """
    named = os.path.abspath(config_path) if config_path is not None else "<embedded default>"
    key = hashlib.sha256(named.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(_own_directory(), f"{key}.health")


def _own_directory() -> str:
    return os.path.join(tempfile.gettempdir(), f"cargobay-{os.getuid()}")


def _private(directory: str) -> bool:
    """Whether C{directory} is a directory (no link) of this user's that no one else may write in."""
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _started(pid: int) -> str | None:
    """When process C{pid} started (clock ticks since boot), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def write_state(path: str, endpoint: str) -> None:
    """
    Say (atomically) where this process listens; L{OSError} if it cannot,
    or if the directory is not this user's alone (another user could make
    the healthcheck believe a dead proxy alive).
    """
    directory = os.path.dirname(path)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    if not _private(directory):
        raise OSError(f"{directory} is not a directory of this user's alone")
    state = {"pid": os.getpid(), "started": _started(os.getpid()), "endpoint": endpoint}
    fd, temporary = tempfile.mkstemp(prefix=".cargobay-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def running_endpoint(path: str) -> str | None:
    """
    Where the proxy that wrote C{path} listens, if that process still runs
    (a file left by a proxy killed outright vouches for nothing), and the
    file is this user's own.
    """
    if not _private(os.path.dirname(path)):
        return None
    try:
        # (Not a FIFO's open that waits for a writer, nor a link.)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        try:
            state = json.loads(f.read(4096))
            pid, started, endpoint = int(state["pid"]), state["started"], str(state["endpoint"])
        except (ValueError, KeyError, TypeError):
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's: its start time says whether it is the one
    if started is not None and _started(pid) != started:
        return None  # the pid is another process's now
    return endpoint or None


def connection(config: Config, timeout: float = 5.0) -> http.client.HTTPConnection:
    """A connection to where the config says the proxy (or its metrics listener) listens."""
    return connection_to(health_endpoint(config), timeout)


def connection_to(description: str, timeout: float = 5.0) -> http.client.HTTPConnection:
    """A connection to a listener's strports description."""
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
        path = resolve_config_path(args[0] if args else None)
        running = running_endpoint(state_path(path))
        conn = connection_to(running) if running is not None else connection(load_config(path))
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
