"""Names of the views a channel serves: in CI one per hardware id and tag (ADR 0016), in
production one per tag and one per wave (ADR 0007).

A view is a set of targets, snapshot and timestamp files of one channel; every device is
served one view. "" is the channel's default view: what a view that has published
nothing yet serves, and what readers that name no view get.
"""

from __future__ import annotations


def tag_view(tag: str) -> str:
    return f"tag:{tag}"


def wave_view(name: str) -> str:
    return f"wave:{name}"


def ci_view(hardware_id: str, tag: str) -> str:
    # Labels hold no "/" (publishing.LABEL), so the name is unambiguous.
    return f"ci:{hardware_id}/{tag}"
