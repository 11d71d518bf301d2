"""
OCI distribution error responses.

Every error cargobay answers is a L{RegistryError}: an HTTP status plus the
spec's JSON body C{{"errors": [{"code", "message", "detail"}]}}.
"""

from __future__ import annotations

import json
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.python.failure import Failure


class RegistryError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode("utf-8")


def unauthorized(message: str, challenge: str) -> RegistryError:
    return RegistryError(401, "UNAUTHORIZED", message, headers={"WWW-Authenticate": challenge})


def denied(message: str, detail: Any = None) -> RegistryError:
    return RegistryError(403, "DENIED", message, detail)


def name_invalid(name: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", "invalid repository name", {"name": name[:300]})


def name_unknown(name: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})


def digest_invalid(reason: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", "provided digest did not match uploaded content or is invalid", reason)


def manifest_invalid(reason: str) -> RegistryError:
    return RegistryError(400, "MANIFEST_INVALID", "manifest invalid", reason)


def manifest_unknown(reference: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", "manifest unknown", {"reference": reference})


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def unsupported(message: str) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", message)


def pagination_invalid(reason: str) -> RegistryError:
    return RegistryError(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested", reason)


def failure_within(failure: Failure, *kinds: type[BaseException]) -> Failure | None:
    """
    C{failure} if it is one of C{kinds}, else the first of its reasons that
    is (treq and Twisted's HTTP client wrap what went wrong in
    C{ResponseNeverReceived} and the like); L{None} if none is.
    """
    if failure.check(*kinds):
        return failure
    for reason in getattr(failure.value, "reasons", None) or []:
        if isinstance(reason, Failure) and reason.check(*kinds):
            return reason
    return None


def is_tls_failure(failure: Failure) -> bool:
    """
    Whether TLS failed: OpenSSL's error for an untrusted certificate,
    service_identity's for one of another name, often wrapped in the reasons
    of a C{ResponseNeverReceived}.
    """
    return failure_within(failure, SSL.Error, VerificationError) is not None
