"""Registering a device: the one request `tufa-agent register` makes, before the device
has a credential of its own."""

from __future__ import annotations

from typing import TypedDict

import httpx

from tufa.agent.agent import USER_AGENT
from tufa.agent.state import AgentError
from tufa.core import api_paths
from tufa.core.http import api_client
from tufa.core.metadata import Channel
from tufa.core.responses import refusal_of


class RegisteredDevice(TypedDict):
    id: str
    credential: str


def register_with_server(
    server: str, factory: str, token: str, name: str, hardware_id: str, tag: str, channel: Channel
) -> RegisteredDevice:
    """Create the device on the server; its id and its credential, or why not."""
    body = {"name": name, "hardware_id": hardware_id, "tag": tag, "channel": channel}
    client, _ = api_client(token, USER_AGENT, timeout=30.0)
    try:
        with client:
            response = client.post(
                f"{server}{api_paths.path(api_paths.DEVICES, factory)}", json=body
            )
    except httpx.HTTPError as e:
        raise AgentError(f"cannot reach {server}: {e}") from e
    if response.status_code != 201:
        refusal = refusal_of(response)
        hint = ""
        if refusal.status in (401, 403):
            hint = (
                f"; pass a token of scope register (or admin) of factory {factory!r} with "
                "--token or TUFA_REGISTRATION_TOKEN (a factory admin creates one with "
                "`tufa tokens create --scope register`)"
            )
        raise AgentError(f"the server refused the registration: {refusal}{hint}")
    try:
        device = response.json()
        return {"id": str(device["id"]), "credential": str(device["credential"])}
    except (ValueError, KeyError, TypeError) as e:
        raise AgentError(f"{server} answered the registration with no credential") from e
