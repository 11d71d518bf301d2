"""
TLS for integration tests: a throw-away certificate authority made with
``cryptography``, server certificates it signs, and the CNCF registry serving
HTTPS with one of them (``http.tls`` through ``Registry.extra_config``).
"""

from __future__ import annotations

import ipaddress
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peers import Registry


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class ServerCert:
    cert_path: Path
    key_path: Path


class TestCA:
    """A certificate authority of its own; ``cert_path`` is its PEM certificate."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path, name: str = "cargobay tests CA", issuer: TestCA | None = None) -> None:
        """With C{issuer}, an intermediate CA that C{issuer} signed."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(issuer._name if issuer else self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0 if issuer else 1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(issuer._key if issuer else self._key, hashes.SHA256())
        )
        self.cert_path = self.workdir / "ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        valid_days: tuple[int, int] = (-1, 30),
        passphrase: bytes | None = None,
    ) -> ServerCert:
        """
        A server certificate (and key) for these subject alternative names,
        valid from and until these days from now; the key encrypted with
        C{passphrase}, if given.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + timedelta(days=valid_days[0]))
            .not_valid_after(now + timedelta(days=valid_days[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_path = self.workdir / f"{name}.pem"
        key_path = self.workdir / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if passphrase is None:
            key_path.write_bytes(_key_pem(key))
        else:
            key_path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            ))
        key_path.chmod(0o600)
        return ServerCert(cert_path, key_path)

    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """An SSL context that trusts this CA only."""
        context = ssl.create_default_context(cafile=str(self.cert_path))
        context.check_hostname = check_hostname
        return context


class TLSRegistry(Registry):
    """
    The CNCF registry serving HTTPS with ``server_cert`` (no auth, filesystem
    storage). ``url`` is ``https://127.0.0.1:PORT``.

    ``Registry`` polls plain ``http://`` for readiness, which a TLS
    listener answers with 400; this one polls over TLS, trusting ``ca``
    but not checking the host name (the certificate may be for another host
    on purpose).
    """

    def __init__(self, workdir: Path, ca: TestCA, server_cert: ServerCert, **kwargs: Any) -> None:
        extra = {"http": {"tls": {"certificate": str(server_cert.cert_path),
                                  "key": str(server_cert.key_path)}}}
        super().__init__(workdir, extra_config=extra, **kwargs)
        self.ca = ca
        self.url = f"https://{self.host}"

    def _wait_ready(self, timeout: float) -> None:
        context = self.ca.client_context(check_hostname=False)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"registry exited with {self.process.returncode}\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=2.0, context=context):
                    return
            except urllib.error.HTTPError as e:
                if e.code in (200, 401):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.url}/v2/ not ready after {timeout}s\n{self.log_text()[-3000:]}")
            time.sleep(0.05)


__all__ = ["ServerCert", "TLSRegistry", "TestCA"]
