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

CHUNK_SIZE = 256 * 1024


class BearerFetcher(FetcherInterface):
    def __init__(
        self, token: str | None, timeout: float = 30.0, user_agent: str | None = None
    ) -> None:
        default = f"tufa/{tufa.__version__} python-tuf/{tuf.__version__}"
        headers = {"User-Agent": user_agent or default}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(headers=headers, timeout=timeout)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.TimeoutException as e:
            raise exceptions.SlowRetrievalError from e
        except httpx.HTTPError as e:
            raise exceptions.DownloadError(f"cannot reach {url}: {e}") from e
        if response.status_code >= 400:
            response.close()
            raise exceptions.DownloadHTTPError(
                f"HTTP error occurred with status {response.status_code}", response.status_code
            )
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
        self._client.close()
