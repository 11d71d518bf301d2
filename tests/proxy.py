"""
The proxy under test as a real process: config files written for it, the
real `twistd -n cargobay`, and a small HTTP client for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
from pathlib import Path

from cargobay.tokens import mint_token
from peers import Twistd, free_port, wait_until

SECRET = "integration-secret-integration-secret"
ALL = mint_token(SECRET, "tester")


def seed_token(payload: str, secret: str = SECRET) -> str:
    """
    A token byte for byte as the earlier implementation's generate_jwt made
    one (serde and jsonwebtoken): e.g. '{"sub":"u","exp":null,"access":{"type":"all"}}'.
    """
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"typ":"JWT","alg":"HS256"}') + "." + b64(payload.encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def write_config(path: Path, port: int, cache: Path, registries: list[dict], repositories: list[tuple[str, str, str]], extra: str = "") -> Path:
    lines = [
        "[server]",
        'bind_address = "127.0.0.1"',
        f"port = {port}",
        "[auth]",
        f'jwt_secret = "{SECRET}"',
        "[cache]",
        f'directory = "{cache}"',
        "max_size_bytes = 20000000000",
        "max_age_seconds = 86400",
        extra,
    ]
    for registry in registries:
        lines += ["[[registries]]", f'id = "{registry["id"]}"', f'url = "{registry["url"]}"']
        for key in ("read_timeout_seconds", "connect_timeout_seconds"):
            if key in registry:
                lines.append(f"{key} = {registry[key]}")
        if "ca_file" in registry:
            lines.append(f'ca_file = "{registry["ca_file"]}"')
        if registry.get("username"):
            lines += ["[registries.auth]", f'username = "{registry["username"]}"', f'password = "{registry["password"]}"']
    for name, registry_id, upstream_name in repositories:
        lines += ["[[repositories]]", f'name = "{name}"', f'registry_id = "{registry_id}"', f'upstream_name = "{upstream_name}"']
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class Proxy:
    def __init__(self, process: Twistd, port: int, cache: Path) -> None:
        self.process = process
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.cache = cache

    def request(self, path: str, token: str | None = ALL, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, headers=all_headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body

    def rss_peak_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def cached_blob_files(self) -> list[Path]:
        return [p for p in (self.cache / "blobs").rglob("*") if p.is_file()]

    def cached_blob(self, digest: str, timeout: float = 30.0) -> Path:
        """
        The cache file of a blob just pulled.  It appears just after the
        response: the client has its bytes once they are verified, and
        fsync and rename come after.
        """
        encoded = digest.split(":")[1]
        found = wait_until(lambda: [p for p in self.cached_blob_files() if p.name.startswith(encoded + "-")], timeout=timeout)
        assert found, f"{digest} was never cached"
        return found[0]

    def temp_files(self) -> list[Path]:
        return [p for p in (self.cache / "tmp").iterdir() if p.is_file()]


def start_proxy(
    tmp: Path, registries: list[dict], repositories: list[tuple[str, str, str]], extra: str = "",
    env: dict[str, str] | None = None,
) -> Proxy:
    port = free_port()
    cache = tmp / "cache"
    config = write_config(tmp / "config.toml", port, cache, registries, repositories, extra)
    process = Twistd(config_path=config, log_path=tmp / "cargobay.log", env=env).start()
    process.wait_listening(port)
    return Proxy(process, port, cache)
