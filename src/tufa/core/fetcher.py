"""An ngclient fetcher that authenticates to a tufa server.

python-tuf's own fetcher sends no credentials; tufa serves metadata only to callers
with a token or device credential (unless a factory allows anonymous reads).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import tuf
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

import tufa
from tufa.core.responses import refusal

CHUNK_SIZE = 256 * 1024
MAX_ERROR_BODY = 4096  # what is read of an error answer for its message
REVOKED = "credential_revoked"  # the server's error code for a credential that died


class CredentialRefused(exceptions.DownloadHTTPError):
    """HTTP 401: the server does not accept the credential (`revoked`: it did once)."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(f"HTTP 401: {message}", 401)
        self.revoked = code == REVOKED
        self.reason = message


class BearerFetcher(FetcherInterface):
    def __init__(
        self, token: str | None, timeout: float = 30.0, user_agent: str | None = None
    ) -> None:
        default = f"tufa/{tufa.__version__} python-tuf/{tuf.__version__}"
        self._client = httpx.Client(headers={"User-Agent": user_agent or default}, timeout=timeout)
        self.set_token(token)

    def set_token(self, token: str | None) -> None:
        """Send `token` from the next request on (a device whose credential was rotated)."""
        if token:
            self._client.headers["Authorization"] = f"Bearer {token}"
        else:
            self._client.headers.pop("Authorization", None)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.TimeoutException as e:
            raise exceptions.SlowRetrievalError from e
        except httpx.HTTPError as e:
            raise exceptions.DownloadError(f"cannot reach {url}: {e}") from e
        if response.status_code >= 400:
            code, message = refusal(self._error_body(response))
            if response.status_code == 401:
                raise CredentialRefused(code, message)
            raise exceptions.DownloadHTTPError(
                f"HTTP {response.status_code}: {message}", response.status_code
            )
        return self._chunks(response)

    @staticmethod
    def _error_body(response: httpx.Response) -> bytes:
        """The start of an error answer, for its message; never more than a few KiB."""
        body = b""
        try:
            for chunk in response.iter_bytes(MAX_ERROR_BODY):
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            pass  # the status says enough
        finally:
            response.close()
        return body[:MAX_ERROR_BODY]

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(CHUNK_SIZE)
        except httpx.TimeoutException as e:
            raise exceptions.SlowRetrievalError from e
        except httpx.HTTPError as e:
            raise exceptions.DownloadError(f"download interrupted: {e}") from e
        finally:
            response.close()

    def close(self) -> None:
        self._client.close()
