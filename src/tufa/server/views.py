"""Names of the views a channel serves: one per production tag, one per wave.

A view is a set of targets, snapshot and timestamp files of one channel; devices of
the production channel are each served one view. "" is the channel's default view.
"""

from __future__ import annotations


def tag_view(tag: str) -> str:
    return f"tag:{tag}"


def wave_view(name: str) -> str:
    return f"wave:{name}"
