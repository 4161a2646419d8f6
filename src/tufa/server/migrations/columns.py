"""The column shapes the revisions share: factory and device references, names, hashes,
moments.

A released revision must build the same schema for ever, so each helper returns exactly
what the revisions spelled out before they shared it, and none may change: a revision
that needs another shape writes it out, or adds a helper of its own.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa


def factory_id(*, nullable: bool = False) -> sa.Column[int]:
    return sa.Column("factory_id", sa.Integer(), nullable=nullable)


def factory_ref() -> sa.ForeignKeyConstraint:
    """`factory_id` names a row of `factories`."""
    return sa.ForeignKeyConstraint(["factory_id"], ["factories.id"])


def device_id() -> sa.Column[str]:
    return sa.Column("device_id", sa.String(length=36), nullable=False)


def device_ref() -> sa.ForeignKeyConstraint:
    """`device_id` names a row of `devices`."""
    return sa.ForeignKeyConstraint(["device_id"], ["devices.id"])


def string(name: str, length: int, *, nullable: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.String(length=length), nullable=nullable)


def sha256(name: str = "sha256", *, nullable: bool = False) -> sa.Column[str]:
    """A hex SHA-256: of a file, or of a secret that is stored only hashed."""
    return string(name, 64, nullable=nullable)


def moment(name: str, *, nullable: bool) -> sa.Column[datetime]:
    """A point in time: UTC, stored without a zone (db.UTCDateTime reads it back aware)."""
    return sa.Column(name, sa.DateTime(), nullable=nullable)


def created_at() -> sa.Column[datetime]:
    return moment("created_at", nullable=False)


def length() -> sa.Column[int]:
    """A file's length in bytes: 64 bits, as a file may be larger than 2 GiB."""
    return sa.Column("length", sa.BigInteger(), nullable=False)
