"""
Real peer programs for integration tests: the CNCF registry, a Docker-style
token server, OCI image layouts built from scratch, skopeo, and the proxy's
own twistd process.

This is a plain module, not a pytest plugin: fixtures live in conftest.py.
Every server binds to 127.0.0.1 on a free port and is stopped by its
``stop()`` method; nothing here starts on import.
"""

from __future__ import annotations

import base64
import collections
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Literal, Self

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

OCI_LAYOUT_VERSION = "1.0.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST_V2S2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(binary: str) -> str:
    """
    The path of ``binary``; skip the test when it is missing, except in CI,
    where a missing peer is a failure and never a silent skip.
    """
    path = shutil.which(binary)
    if path is None:
        reason = (
            f"{binary!r} is not installed (apt-get install -y --no-install-recommends "
            "docker-registry skopeo umoci apache2-utils)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read_log(log_path: Path | None) -> str:
    if log_path is None:
        return ""
    try:
        return log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_http(
    url: str,
    timeout: float = 30.0,
    expect: Iterable[int] = (200, 401),
    *,
    process: subprocess.Popen[Any] | None = None,
    log_path: Path | None = None,
) -> int:
    """
    Poll ``url`` until it answers one of the ``expect`` statuses; return that
    status. Raise RuntimeError with the tail of ``log_path`` when ``process``
    exits first or the timeout passes.
    """
    wanted = set(expect)
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before {url} answered\n"
                + _tail(_read_log(log_path))
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                status = int(resp.status)
        except urllib.error.HTTPError as e:
            status = int(e.code)
        except (OSError, urllib.error.URLError) as e:
            status = -1
            last = repr(e)
        if status in wanted:
            return status
        if status != -1:
            last = f"status {status}"
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{url} did not answer {sorted(wanted)} within {timeout}s ({last})\n"
                + _tail(_read_log(log_path))
            )
        time.sleep(0.05)


class LoggedProcess:
    """
    What every helper that runs a server process with a log file shares:
    reading its log, and use as a context manager.  Subclasses set
    ``log_path``, ``process`` and define ``start()`` and ``stop()``.
    """

    log_path: Path
    process: Any

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll for a condition that a background activity brings about."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


# ---------------------------------------------------------------------------
# the CNCF registry (docker-registry, distribution 2.8)
# ---------------------------------------------------------------------------

# distribution writes one Apache "combined" access-log line per request to
# its stdout, after the response is complete, e.g.
#   127.0.0.1 - - [27/Nov/2026:02:59:23 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
# (its logrus "response completed" lines carry the same information again; we
# count only the access-log lines so nothing is counted twice).
ACCESS_LOG_RE = re.compile(
    r'^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "[^"]*" "(?P<agent>[^"]*)")?'
)


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    uri: str
    status: int
    size: int
    user: str
    #: The client's User-Agent ("cargobay" for cargobay's own requests).
    agent: str = ""


AuthMode = Literal["basic", "token"] | None


class Registry:
    """
    ``docker-registry serve CONFIG`` on 127.0.0.1:<free port>, filesystem
    storage under ``workdir``, deletes enabled. Construct, then ``start()``
    (which returns self); ``stop()`` when done. Also a context manager.

    ``auth="basic"`` needs ``username``/``password`` (bcrypt htpasswd file);
    ``auth="token"`` needs either ``token_server`` or all of ``token_realm``,
    ``token_service``, ``token_issuer`` and ``rootcertbundle``.
    ``proxy_remoteurl`` turns it into distribution's own pull-through cache.
    (2.8 sends ``proxy_username``/``proxy_password`` only to Bearer token
    realms: against a Basic-auth upstream every upstream request gets 401.)
    ``extra_config`` is deep-merged into the generated config (S3, redis...).
    """

    def __init__(
        self,
        workdir: Path,
        auth: AuthMode = None,
        *,
        username: str | None = None,
        password: str | None = None,
        token_server: TokenServer | None = None,
        token_realm: str | None = None,
        token_service: str | None = None,
        token_issuer: str | None = None,
        rootcertbundle: Path | None = None,
        proxy_remoteurl: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        #: Environment variables set for the registry process (SSL_CERT_FILE...).
        self.env = dict(env or {})
        self.auth = auth
        self.username = username
        self.password = password
        self.token_server = token_server
        if token_server is not None:
            token_realm = token_realm or token_server.realm
            token_service = token_service or token_server.service
            token_issuer = token_issuer or token_server.issuer
            rootcertbundle = rootcertbundle or token_server.cert_path
        self.token_realm = token_realm
        self.token_service = token_service
        self.token_issuer = token_issuer
        self.rootcertbundle = rootcertbundle
        self.proxy_remoteurl = proxy_remoteurl
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.extra_config = dict(extra_config or {})
        self.port = port if port is not None else free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def creds(self) -> str | None:
        """``user:password`` for skopeo's --creds, or None without auth."""
        if self.username is None or self.password is None:
            return None
        return f"{self.username}:{self.password}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "cargobay-tests-secret"},
        }
        if self.auth == "basic":
            if self.username is None or self.password is None:
                raise ValueError("basic auth needs username and password")
            cfg["auth"] = {
                "htpasswd": {"realm": "cargobay-tests", "path": str(self.workdir / "htpasswd")}
            }
        elif self.auth == "token":
            if not (
                self.token_realm and self.token_service and self.token_issuer
                and self.rootcertbundle
            ):
                raise ValueError(
                    "token auth needs token_server or token_realm, token_service, "
                    "token_issuer and rootcertbundle"
                )
            cfg["auth"] = {
                "token": {
                    "realm": self.token_realm,
                    "service": self.token_service,
                    "issuer": self.token_issuer,
                    "rootcertbundle": str(self.rootcertbundle),
                }
            }
        elif self.auth is not None:
            raise ValueError(f"unknown auth mode {self.auth!r}")
        if self.proxy_remoteurl is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remoteurl}
            if self.proxy_username is not None:
                proxy["username"] = self.proxy_username
            if self.proxy_password is not None:
                proxy["password"] = self.proxy_password
            cfg["proxy"] = proxy
        return _deep_merge(cfg, self.extra_config)

    def start(self, timeout: float = 30.0) -> Self:
        binary = need("docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self.auth == "basic":
            htpasswd = need("htpasswd")
            assert self.username is not None and self.password is not None
            line = subprocess.run(
                [htpasswd, "-Bbn", self.username, self.password],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
            (self.workdir / "htpasswd").write_text(line + "\n")
        # JSON is YAML, and spares us a YAML dependency.
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"} | self.env
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=env, cwd=self.workdir,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        wait_http(
            self.url + "/v2/", timeout=timeout, expect=(200, 401),
            process=self.process, log_path=self.log_path,
        )

    def stop(self, grace: float = 10.0) -> None:
        if self.process is not None:
            _terminate(self.process, grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return _read_log(self.log_path)

    def access_log(self) -> list[AccessLogEntry]:
        """Every request the registry has logged so far, in order."""
        entries = []
        for line in self.log_text().splitlines():
            m = ACCESS_LOG_RE.match(line)
            if m:
                size = m["size"]
                entries.append(AccessLogEntry(
                    method=m["method"], uri=m["uri"], status=int(m["status"]),
                    size=0 if size == "-" else int(size), user=m["user"], agent=m["agent"] or "",
                ))
        return entries

    def count_requests(
        self, method: str, path_contains: str = "", status: int | None = None
    ) -> int:
        """
        How many ``method`` requests whose URI contains ``path_contains`` the
        registry has logged (optionally only those answered ``status``).
        The line is written just after the response, so a count taken right
        after a client finishes can lag by one; see ``wait_requests``.
        """
        return sum(
            1 for e in self.access_log()
            if e.method == method.upper() and path_contains in e.uri
            and (status is None or e.status == status)
        )

    def wait_requests(
        self, method: str, path_contains: str, at_least: int,
        status: int | None = None, timeout: float = 5.0,
    ) -> int:
        """Poll ``count_requests`` until it reaches ``at_least``; return the count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.count_requests(method, path_contains, status)
            if n >= at_least or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


# ---------------------------------------------------------------------------
# a Docker-style token server
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    has_credentials: bool
    username: str | None
    status: int
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Grant:
    type: str
    name: str
    actions: tuple[str, ...]


def parse_scope(scope: str) -> Grant | None:
    """``repository:team/app:pull,push`` → Grant; None when malformed."""
    try:
        type_, rest = scope.split(":", 1)
        name, actions = rest.rsplit(":", 1)
    except ValueError:
        return None
    return Grant(type_, name, tuple(a for a in actions.split(",") if a))


def libtrust_key_id(public_key_der: bytes) -> str:
    """The ``kid`` distribution 2.8 (docker/libtrust) derives from a key."""
    digest = hashlib.sha256(public_key_der).digest()[:30]
    b32 = base64.b32encode(digest).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


class TokenServer:
    """
    The token endpoint of Docker's token authentication, for a registry run
    with ``auth: token``. Construct (creates the key and certificate), then
    ``start()`` (returns self), ``stop()`` when done.

    GET ``/token?service=&scope=&account=`` with Basic credentials, or POST an
    OAuth2 password grant (``grant_type=password&username=&password=&scope=
    &service=``). Known users get every action they ask for; wrong
    credentials get 401; anonymous callers get 401 unless
    ``allow_anonymous_pull``, and then only ``pull``. Every request lands in
    ``requests``.

    The JWT header carries ``x5c`` (the certificate, which distribution 2.8
    verifies against its rootcertbundle) and ``kid`` (the libtrust key id,
    which 2.8 only consults when x5c is absent).
    """

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, str],
        *,
        service: str = "cargobay-upstream",
        issuer: str = "cargobay-test-issuer",
        allow_anonymous_pull: bool = False,
        expires_in: int = 300,
        key_headers: Sequence[Literal["x5c", "kid"]] = ("x5c", "kid"),
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """
        With C{tls} (a certificate and its key), it serves HTTPS; C{host} is
        the name its URL and realm give for 127.0.0.1.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.allow_anonymous_pull = allow_anonymous_pull
        self.expires_in = expires_in
        self.key_headers = tuple(key_headers)
        self.port = port if port is not None else free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self.realm = self.url + "/token"
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()

        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "token-cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._kid = libtrust_key_id(self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo,
        ))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- tokens -------------------------------------------------------------

    def issue(self, subject: str, grants: Sequence[Grant], expires_in: int | None = None) -> str:
        """A signed token for ``subject`` with ``grants``, as the endpoint would issue."""
        import jwt

        now = int(time.time())
        ttl = self.expires_in if expires_in is None else expires_in
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [
                {"type": g.type, "name": g.name, "actions": list(g.actions)} for g in grants
            ],
        }
        headers: dict[str, Any] = {}
        if "x5c" in self.key_headers:
            headers["x5c"] = [self._x5c]
        if "kid" in self.key_headers:
            headers["kid"] = self._kid
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    def token_fetches(self, method: str | None = None, *, status: int | None = 200) -> int:
        """How many token requests (of ``method``, answered ``status``) were made."""
        with self._lock:
            return sum(
                1 for r in self.requests
                if (method is None or r.method == method)
                and (status is None or r.status == status)
            )

    def _grant(
        self, username: str | None, password: str | None, scopes: Sequence[str]
    ) -> tuple[int, str | None, list[Grant]]:
        if username is not None:
            if self.users.get(username) != password or password is None:
                return 401, None, []
            grants = [g for g in map(parse_scope, scopes) if g is not None]
            return 200, username, grants
        if not self.allow_anonymous_pull:
            return 401, None, []
        grants = []
        for g in map(parse_scope, scopes):
            if g is not None and "pull" in g.actions:
                grants.append(Grant(g.type, g.name, ("pull",)))
        return 200, "", grants

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        form: dict[str, list[str]] = {}
        username: str | None = None
        password: str | None = None
        has_credentials = False
        scopes: list[str] = []
        status = 404
        body: dict[str, Any] = {"errors": [{"code": "NOT_FOUND"}]}

        if method == "POST":
            length = int(handler.headers.get("Content-Length") or 0)
            raw = handler.rfile.read(length).decode("utf-8", "replace")
            form = urllib.parse.parse_qs(raw, keep_blank_values=True)

        authz = handler.headers.get("Authorization") or ""
        if authz.lower().startswith("basic "):
            has_credentials = True
            try:
                decoded = base64.b64decode(authz[6:].strip()).decode()
                username, _, password = decoded.partition(":")
            except (ValueError, UnicodeDecodeError):
                username, password = "", None

        if parsed.path == "/token":
            if method == "GET":
                for s in query.get("scope", []):
                    scopes.extend(s.split())
                status, subject, grants = self._grant(username, password, scopes)
            else:
                for s in form.get("scope", []):
                    scopes.extend(s.split())
                grant_type = (form.get("grant_type") or [""])[0]
                if grant_type != "password":
                    status, subject, grants = 400, None, []
                    body = {"error": "unsupported_grant_type"}
                else:
                    username = next(iter(form.get("username", [])), None)
                    password = next(iter(form.get("password", [])), None)
                    has_credentials = has_credentials or username is not None
                    status, subject, grants = self._grant(username, password, scopes)
            if status == 200:
                assert subject is not None
                token = self.issue(subject, grants)
                body = {
                    "token": token,
                    "access_token": token,
                    "expires_in": self.expires_in,
                    "issued_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            elif status == 401:
                body = {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}

        with self._lock:
            self.requests.append(TokenRequest(
                method=method, path=parsed.path, query=query, form=form,
                has_credentials=has_credentials, username=username, status=status,
                scopes=tuple(scopes),
            ))
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if status == 401:
            handler.send_header("WWW-Authenticate", 'Basic realm="cargobay-tests"')
        handler.end_headers()
        handler.wfile.write(data)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner._handle(self, "GET")

            def do_POST(self) -> None:
                owner._handle(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"token-server-{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# OCI image layouts, built from scratch
# ---------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through, optionally forwarding it."""

    def __init__(self, sink: IO[bytes] | None = None) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        n = memoryview(b).nbytes
        self.size += n
        if self.sink is not None:
            self.sink.write(b)
        return n


class _RandomReader:
    """``size`` random bytes, read in whatever chunks tarfile asks for."""

    def __init__(self, size: int) -> None:
        self.remaining = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.remaining:
            n = self.remaining
        n = min(n, 4 << 20)
        self.remaining -= n
        return os.urandom(n)


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int


def _write_blob(blobs: Path, data: bytes) -> _Blob:
    hexdigest = hashlib.sha256(data).hexdigest()
    path = blobs / hexdigest
    if not path.exists():
        path.write_bytes(data)
    return _Blob("sha256:" + hexdigest, len(data))


class _StoredGzipWriter:
    """
    A gzip stream of deflate "stored" blocks, written by hand: what
    compresslevel 0 means, at memcpy speed (zlib's level 0 manages about
    150 MB/s, too slow for the 300 MiB layers of streaming tests).
    """

    _BLOCK = 0xFFFF

    def __init__(self, sink: IO[bytes] | _HashingWriter) -> None:
        self.sink = sink
        self.crc = 0
        self.size = 0
        # magic, deflate, no flags, mtime 0, no extra flags, OS unknown
        sink.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        for i in range(0, len(view), self._BLOCK):
            chunk = view[i:i + self._BLOCK]
            n = len(chunk)
            self.sink.write(b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF))
            self.sink.write(chunk)
        return len(view)

    def close(self) -> None:
        self.sink.write(b"\x01\x00\x00\xff\xff")  # final, empty stored block
        self.sink.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_layer(
    blobs: Path, files: Sequence[tuple[str, bytes | int]], compresslevel: int
) -> tuple[_Blob, str]:
    """A gzip'd tar of ``files`` (content, or a size of random bytes); (blob, diff_id)."""
    tmp = blobs / f".layer-{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as out:
        compressed = _HashingWriter(out)
        gz: Any
        if compresslevel == 0:
            gz = _StoredGzipWriter(compressed)
        else:
            # mtime=0 and fixed tar headers: the same content gives the same digest.
            gz = gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=compresslevel,
                               mtime=0)
        with gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|",
                              format=tarfile.PAX_FORMAT) as tar:
                # its 16 KiB default is slow for big layers (not in typeshed)
                tar.copybufsize = 1 << 20  # type: ignore[attr-defined]
                for name, content in files:
                    info = tarfile.TarInfo(name)
                    info.mode = 0o644
                    info.mtime = 0
                    info.uname = info.gname = "root"
                    if isinstance(content, int):
                        info.size = content
                        tar.addfile(info, _RandomReader(content))
                    else:
                        info.size = len(content)
                        tar.addfile(info, io.BytesIO(content))
    digest_hex = compressed.sha.hexdigest()
    final = blobs / digest_hex
    if final.exists():
        tmp.unlink()
    else:
        tmp.rename(final)
    return _Blob("sha256:" + digest_hex, compressed.size), "sha256:" + uncompressed.sha.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def build_oci_layout(
    dir: Path,
    tag: str,
    layers: list[bytes] | None = None,
    platforms: list[tuple[str, str]] | None = None,
    layer_sizes: list[int] | None = None,
    *,
    compresslevel: int | None = None,
) -> dict[str, Any]:
    """
    Build (or add to) an OCI image layout in ``dir`` and tag the image ``tag``.

    Layers: one per entry of ``layers`` (a tar holding ``/layer-N.txt`` with
    those bytes; deterministic, so the same call gives the same digests) or
    of ``layer_sizes`` (a tar holding ``/random-N.bin`` with that many random
    bytes). With neither, one
    small layer whose content names the tag. Both together: the byte layers
    first.

    ``platforms`` (e.g. ``[("linux", "amd64"), ("linux", "arm64")]``) gives an
    image index over one manifest per platform; every platform shares the
    same layers and has its own config (so its own manifest digest). Without
    it, a single manifest for linux/amd64.

    gzip ``compresslevel``: by default 1 for byte layers and 0 (stored
    blocks, about 150 MiB/s, bound by os.urandom) for random layers.

    Calling it again on the same ``dir`` with another tag adds that image and
    keeps the others (index.json entries are merged by ref name; the same tag
    is replaced). Blobs are content-addressed, so sharing a dir shares blobs.

    Returns ``{"manifest": digest of the top-level manifest or index,
    "manifests": [per-platform manifest digests], "layers": [...],
    "configs": [...], "media_type": top-level media type, "size": its size,
    "diff_ids": [...], "layer_blob_sizes": [compressed sizes]}``.
    """
    dir = Path(dir)
    blobs = dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}))

    specs: list[list[tuple[str, bytes | int]]] = []
    for i, content in enumerate(layers or []):
        specs.append([(f"layer-{i}.txt", content)])
    for i, size in enumerate(layer_sizes or []):
        specs.append([(f"random-{i}.bin", size)])
    if not specs:
        specs.append([("hello.txt", f"hello from {tag}\n".encode())])

    layer_blobs: list[_Blob] = []
    diff_ids: list[str] = []
    for files in specs:
        level = compresslevel
        if level is None:
            level = 0 if isinstance(files[0][1], int) else 1
        blob, diff_id = _write_layer(blobs, files, level)
        layer_blobs.append(blob)
        diff_ids.append(diff_id)

    targets = platforms or [("linux", "amd64")]
    manifests: list[tuple[_Blob, tuple[str, str]]] = []
    configs: list[_Blob] = []
    for os_name, arch in targets:
        config = {
            "architecture": arch,
            "os": os_name,
            "config": {"Cmd": ["/bin/sh"], "Labels": {"cargobay.test.tag": tag}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"cargobay tests layer {i}"} for i in range(len(diff_ids))],
        }
        config_blob = _write_blob(blobs, _canonical(config))
        configs.append(config_blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_blob.digest,
                       "size": config_blob.size},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": b.digest, "size": b.size}
                for b in layer_blobs
            ],
        }
        manifests.append((_write_blob(blobs, _canonical(manifest)), (os_name, arch)))

    if platforms:
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": m.digest, "size": m.size,
                 "platform": {"architecture": arch, "os": os_name}}
                for m, (os_name, arch) in manifests
            ],
        }
        top, media_type = _write_blob(blobs, _canonical(index)), OCI_INDEX
    else:
        top, media_type = manifests[0][0], OCI_MANIFEST

    index_path = dir / "index.json"
    existing: list[dict[str, Any]] = []
    if index_path.exists():
        existing = [
            d for d in json.loads(index_path.read_text()).get("manifests", [])
            if (d.get("annotations") or {}).get(REF_NAME_ANNOTATION) != tag
        ]
    existing.append({
        "mediaType": media_type, "digest": top.digest, "size": top.size,
        "annotations": {REF_NAME_ANNOTATION: tag},
    })
    index_path.write_text(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                      "manifests": existing}, indent=2))
    return {
        "manifest": top.digest,
        "size": top.size,
        "media_type": media_type,
        "manifests": [m.digest for m, _ in manifests],
        "configs": [c.digest for c in configs],
        "layers": [b.digest for b in layer_blobs],
        "layer_blob_sizes": [b.size for b in layer_blobs],
        "diff_ids": diff_ids,
    }


# ---------------------------------------------------------------------------
# skopeo
# ---------------------------------------------------------------------------


def _run_skopeo(args: Sequence[str], timeout: float, text: bool) -> subprocess.CompletedProcess[Any]:
    binary = need("skopeo")
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    proc = subprocess.run(
        [binary, *args], capture_output=True, text=text, timeout=timeout, env=env,
        stdin=subprocess.DEVNULL, check=False,
    )
    if proc.returncode != 0:
        stderr = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise RuntimeError(f"skopeo {' '.join(args)} failed with {proc.returncode}:\n{stderr}")
    return proc


def skopeo(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run skopeo; raise RuntimeError with its stderr when it fails."""
    return _run_skopeo(args, timeout, text=True)


def skopeo_push(
    layout_dir: Path,
    tag: str,
    dest: str,
    creds: str | None = None,
    docker_v2s2: bool = False,
    all_platforms: bool = False,
) -> None:
    """
    ``skopeo copy oci:DIR:TAG docker://DEST`` over plain HTTP.

    ``docker_v2s2`` converts to Docker schema 2 media types (the manifest
    digest changes; config and layer digests do not). With ``all_platforms``
    too, skopeo 1.9.3 turns an OCI index into a Docker manifest list over v2s2
    manifests, all with new digests.
    """
    args = ["copy", "--dest-tls-verify=false"]
    if creds is not None:
        args.append(f"--dest-creds={creds}")
    if docker_v2s2:
        args += ["--format", "v2s2"]
    if all_platforms:
        args.append("--all")
    skopeo(*args, f"oci:{layout_dir}:{tag}", f"docker://{dest}")


def skopeo_inspect_raw(ref: str, creds: str | None = None) -> bytes:
    """The raw manifest of ``docker://ref`` as the registry serves it."""
    args = ["inspect", "--raw", "--tls-verify=false"]
    if creds is not None:
        args.append(f"--creds={creds}")
    out: bytes = _run_skopeo([*args, f"docker://{ref}"], 300.0, text=False).stdout
    return out


def skopeo_pull(
    ref: str, dest_dir: Path, creds: str | None = None, all_platforms: bool = False
) -> None:
    """``skopeo copy docker://REF dir:DEST_DIR`` over plain HTTP."""
    args = ["copy", "--src-tls-verify=false"]
    if creds is not None:
        args.append(f"--src-creds={creds}")
    if all_platforms:
        args.append("--all")
    skopeo(*args, f"docker://{ref}", f"dir:{dest_dir}")


def push_blob(registry: Registry, name: str, size: int) -> str:
    """
    Upload a blob of `size` pseudo-random bytes straight through the
    registry's upload API, streaming (never the whole blob in memory).
    """
    block = os.urandom(1024 * 1024)

    def chunks():
        sent = 0
        counter = 0
        while sent < size:
            piece = (counter.to_bytes(8, "big") + block)[: min(len(block), size - sent)]
            counter += 1
            sent += len(piece)
            yield piece

    hasher = hashlib.sha256()
    for piece in chunks():
        hasher.update(piece)
    digest = "sha256:" + hasher.hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=300)
    conn.request("POST", f"/v2/{name}/blobs/uploads/")
    response = conn.getresponse()
    response.read()
    if response.status != 202:
        raise RuntimeError(f"upload start answered {response.status}")
    location = response.getheader("Location")
    separator = "&" if "?" in location else "?"
    target = urllib.parse.urlsplit(location)
    path = (target.path + "?" + target.query if target.query else target.path) + f"{separator}digest={digest}"
    conn.request("PUT", path, body=chunks(), headers={"Content-Type": "application/octet-stream"}, encode_chunked=True)
    response = conn.getresponse()
    response.read()
    if response.status != 201:
        raise RuntimeError(f"upload answered {response.status}")
    conn.close()
    return digest


def fd_kinds(pid: int, port: int) -> collections.Counter[str]:
    """cargobay's descriptors by kind: client connections, upstream connections, files..."""
    inodes: dict[str, tuple[int, int]] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            inodes[fields[9]] = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            local, remote = inodes.get(target[8:-1], (0, 0))
            kinds["listening" if local == port and not remote else "client" if local == port else
                  "upstream" if remote else "other socket"] += 1
        else:
            if "/cache/tmp/" in target:
                kinds["cache tmp file"] += 1
            elif "/cache/" in target:
                kinds["cache file"] += 1
            else:
                kinds["file" if target.startswith("/") else target.split(":")[0]] += 1
    return kinds


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# the proxy as a real twistd process
# ---------------------------------------------------------------------------


def cargobay_command(config_path: Path) -> list[str]:
    """How the proxy's twistd plugin is started."""
    return [*twistd_command(), "-n", "--pidfile=", "cargobay", "--config", str(config_path)]


def twistd_command() -> list[str]:
    """twistd of the running interpreter (``python -m twisted`` is `twist`, not twistd)."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _process_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged["PYTHONUNBUFFERED"] = "1"
    # twistd finds twisted/plugins/cargobay_plugin.py through sys.path.
    merged["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), merged.get("PYTHONPATH", "")) if p
    )
    merged.update(env or {})
    return merged


class Twistd:
    """
    A long-running process (by default, the proxy under twistd) with its
    stdout and stderr in ``log_path``. Construct, ``start()`` (returns self),
    ``wait_listening(port)``, ``stop()``.
    """

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        config_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        if args is None:
            if config_path is None:
                raise ValueError("give args or config_path")
            args = cargobay_command(config_path)
        self.args = list(args)
        self.env = _process_env(env)
        self.log_path = Path(log_path)
        self.cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
        )
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait_listening(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        """Wait until ``host:port`` accepts TCP connections."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(
                    f"{self.args!r} exited with {code} before listening on {host}:{port}\n"
                    + _tail(self.log_text())
                )
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.args!r} not listening on {host}:{port} after {timeout}s\n"
                    + _tail(self.log_text())
                )
            time.sleep(0.05)

    def wait_http(self, url: str, timeout: float = 30.0,
                  expect: Iterable[int] = (200, 401)) -> int:
        return wait_http(url, timeout, expect, process=self.process, log_path=self.log_path)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
        if self.process is not None:
            _terminate(self.process, grace)
        self._close_log()
        return self.returncode

    def kill9(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._close_log()
        return self.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        return _read_log(self.log_path)

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_to_completion(
    args: list[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run ``args`` to the end (for start-up failures: bad config and the
    like); stdout and stderr captured as text. Raises TimeoutExpired when it
    keeps running.
    """
    return subprocess.run(
        args, env=_process_env(env), cwd=cwd if cwd is not None else REPO_ROOT,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        check=False,
    )


__all__ = [
    "ACCESS_LOG_RE",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_MANIFEST_V2S2",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "AccessLogEntry",
    "Grant",
    "Registry",
    "TokenRequest",
    "TokenServer",
    "Twistd",
    "build_oci_layout",
    "cargobay_command",
    "free_port",
    "need",
    "parse_scope",
    "run_to_completion",
    "sha256_digest",
    "skopeo",
    "skopeo_inspect_raw",
    "skopeo_pull",
    "skopeo_push",
    "wait_http",
]


class OutboundProxyServer:
    """
    tinyproxy, the real forward proxy of a network whose registries are
    reached through one: CONNECT (to any port) and absolute-form GETs, with
    Basic proxy credentials when ``user`` is given.  ``requests()`` is what
    it was asked, one request line each.
    """

    def __init__(self, workdir: Path, user: str | None = None, password: str | None = None) -> None:
        need("tinyproxy")
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = self.workdir / "tinyproxy.log"
        lines = [
            f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", f'LogFile "{self._log}"', "LogLevel Connect",
            f'PidFile "{self.workdir / "tinyproxy.pid"}"', "MaxClients 50", "Allow 127.0.0.1", "DisableViaHeader Yes",
        ]
        if user is not None:
            lines.append(f"BasicAuth {user} {password}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
        self._process = Twistd(
            ["tinyproxy", "-d", "-c", str(self.workdir / "tinyproxy.conf")], log_path=self.workdir / "stdout.log"
        )

    def start(self) -> Self:
        self._process.start().wait_listening(self.port)
        return self

    def stop(self) -> None:
        self._process.stop()

    def requests(self) -> list[str]:
        text = self._log.read_text(errors="replace") if self._log.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (file descriptor" in line]


class TLSFront:
    """
    TLS in front of a local TCP port (an ``https://`` outbound proxy made
    of tinyproxy): each connection's TLS is ended here with ``cert_path``
    and ``key_path``, and its bytes relayed to ``target_port``.
    ``handshakes`` counts the TLS handshakes that completed.
    """

    def __init__(self, target_port: int, cert_path: Path, key_path: Path) -> None:
        self.port = free_port()
        self.handshakes = 0
        self._target = target_port
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(str(cert_path), str(key_path))
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                continue
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            secure = self._context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        self.handshakes += 1
        try:
            inner = socket.create_connection(("127.0.0.1", self._target), timeout=30)
        except OSError:
            secure.close()
            return
        self._open += [secure, inner]

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(262144):
                    sink.sendall(data)
            except OSError:
                pass
            for side in (source, sink):
                try:
                    side.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(inner, secure), daemon=True).start()
        pump(secure, inner)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._server.close()
        for side in self._open:
            try:
                side.close()
            except OSError:
                pass


class BlackHole:
    """
    A port that takes connections and requests and never answers: a
    black-holed registry, or proxy.  ``requests`` holds the request lines
    it was sent.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[str] = []
        self._server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._server.settimeout(0.2)
        self._held: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._server, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                if key.fileobj is self._server:
                    conn, _ = self._server.accept()
                    self._held.append(conn)
                    selector.register(conn, selectors.EVENT_READ)
                else:
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        selector.unregister(key.fileobj)
                    self.requests += [
                        line.decode("latin-1") for line in data.split(b"\r\n") if line.endswith(b" HTTP/1.1")
                    ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for conn in self._held:
            conn.close()
        self._server.close()
