"""python-tuf's ngclient, as an independent verifier, refreshes a fresh factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Factory


@pytest.mark.parametrize("channel", ["ci", "prod"])
def test_ngclient_refreshes_fresh_factory(factory: Factory, tmp_path: Path, channel: str) -> None:
    updater = factory.updater(channel, tmp_path / channel)
    updater.refresh()
    trusted = updater._trusted_set
    assert trusted.root.version == 1
    assert trusted.timestamp.version == 1
    assert trusted.snapshot.version == 1
    assert trusted.targets.version == 1
    assert trusted.targets.targets == {}
    expected_threshold = 1 if channel == "ci" else 2
    assert trusted.root.roles["targets"].threshold == expected_threshold


def test_device_credential_refreshes_own_channel_only(factory: Factory, tmp_path: Path) -> None:
    device = factory.register_device("prod")
    updater = factory.updater("prod", tmp_path / "prod", token=device["credential"])
    updater.refresh()
    response = factory.request(
        "GET", "/repo/ci/metadata/timestamp.json", token=device["credential"]
    )
    assert response.status_code == 403
