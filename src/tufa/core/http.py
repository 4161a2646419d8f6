"""The client side of tufa's HTTP API: how the CLI and the agent authenticate.

Each side keeps one `httpx.Client` for its run, so connections are reused; the
credential goes in through `BearerAuth` and only to the tufa server, never to a
target's external host (those are fetched with a client that has no auth).
"""

from __future__ import annotations

from collections.abc import Generator
from urllib.parse import urlsplit

import httpx


class BearerAuth(httpx.Auth):
    """`Authorization: Bearer TOKEN` on every request, or nothing when `token` is None.

    `token` may be replaced while the client lives: a device whose credential was
    rotated sends the new one from the next request on.
    """

    def __init__(self, token: str | None) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def api_client(
    token: str | None, user_agent: str, timeout: httpx.Timeout | float
) -> tuple[httpx.Client, BearerAuth]:
    """A client for the tufa server, and its auth (to change the token later)."""
    auth = BearerAuth(token)
    client = httpx.Client(auth=auth, headers={"User-Agent": user_agent}, timeout=timeout)
    return client, auth


def server_url_problem(url: str) -> str | None:
    """What keeps `url` from being a tufa server's base URL, said so that the fix is
    plain; None if it is one."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return None
    if "://" not in url:
        return f"{url!r} has no scheme: give the whole URL, e.g. http://{url}"
    return f"{url!r} is not an http:// or https:// URL of a server"
