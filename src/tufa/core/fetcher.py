"""An ngclient fetcher that authenticates to a tufa server.

python-tuf's own fetcher sends no credentials; tufa serves metadata only to callers
with a token or device credential (unless a factory allows anonymous reads).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import httpx
import tuf
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

import tufa
from tufa.core.http import BearerAuth, api_client
from tufa.core.responses import streamed_refusal

CHUNK_SIZE = 256 * 1024
REVOKED = "credential_revoked"  # the server's error code for a credential that died


class CredentialRefused(exceptions.DownloadHTTPError):
    """HTTP 401: the server does not accept the credential (`revoked`: it did once)."""

    def __init__(self, code: str | None, message: str) -> None:
        super().__init__(f"HTTP 401: {message}", 401)
        self.revoked = code == REVOKED
        self.reason = message


class BearerFetcher(FetcherInterface):
    """Fetches with its own client sending `token`, or, given `client` and its `auth`,
    with that client (the agent's, so metadata, targets and reports share connections).

    A token holder may read a view of a tufa server's channel: `view` is sent as the
    query of every `timestamp.json` (`{"hardware_id": ..., "tag": ...}` in CI,
    `{"tag": ...}` in production). Devices are served their own view regardless."""

    def __init__(
        self,
        token: str | None = None,
        timeout: float = 30.0,
        user_agent: str | None = None,
        *,
        client: tuple[httpx.Client, BearerAuth] | None = None,
        view: Mapping[str, str] | None = None,
    ) -> None:
        self._owns_client = client is None
        self._view_query = f"?{httpx.QueryParams(view)}" if view else ""
        if client is None:
            default = f"tufa/{tufa.__version__} python-tuf/{tuf.__version__}"
            client = api_client(token, user_agent or default, timeout)
        self._client, self._auth = client

    def set_token(self, token: str | None) -> None:
        """Send `token` from the next request on (a device whose credential was rotated)."""
        self._auth.token = token

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.endswith("/timestamp.json"):
            url += self._view_query
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.TimeoutException as e:
            raise exceptions.SlowRetrievalError from e
        except httpx.HTTPError as e:
            raise exceptions.DownloadError(f"cannot reach {url}: {e}") from e
        if response.status_code >= 400:
            refusal = streamed_refusal(response)
            if response.status_code == 401:
                raise CredentialRefused(refusal.code, refusal.message)
            raise exceptions.DownloadHTTPError(str(refusal), response.status_code)
        return self._chunks(response)

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
        if self._owns_client:
            self._client.close()
