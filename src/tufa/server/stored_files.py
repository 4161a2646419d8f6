"""Metadata files as the server stores them: rendered once, when signed, and never
changed; versioned ones are cached in each process (ADR 0003)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from tuf.api.metadata import Metadata

from tufa.core.metadata import AnySigned, to_bytes


@dataclass(frozen=True)
class NewFile:
    """A signed file to store, in the bytes it is served as."""

    view: str
    role: str
    version: int
    expires: datetime
    body: bytes

    @classmethod
    def of(cls, view: str, md: Metadata[AnySigned], body: bytes | None = None) -> NewFile:
        signed = md.signed
        return cls(view, signed.type, signed.version, signed.expires, body or to_bytes(md))


@dataclass(frozen=True)
class StoredFile:
    role: str
    version: int
    body: bytes
    etag: str
    expires: datetime


class ImmutableFileCache:
    """An LRU of versioned metadata files, which never change once published."""

    def __init__(self, size: int = 4096) -> None:
        self._items: OrderedDict[tuple[int, str, str, int], StoredFile] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str, str, int]) -> StoredFile | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[int, str, str, int], item: StoredFile) -> None:
        with self._lock:
            self._items[key] = item
            if len(self._items) > self._size:
                self._items.popitem(last=False)
