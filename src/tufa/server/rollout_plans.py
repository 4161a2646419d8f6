"""A staged rollout's plan: its stages and health rules as the operator gives them, and
its row in the database (`wave_plans`).

A stage is how many of the wave's tag's production devices have been served the wave
once it is reached: a count ("20"), a share ("25%"), or, as the first stage only, a
device group (its members of the tag). Stages are cumulative: "5%,25%,100%" serves a
twentieth, then a fifth more, then the rest. A plan ends with "100%": once its last
stage has soaked with the health gate holding, the server completes the wave.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)

from tufa.server.db import schema
from tufa.server.exceptions import Conflict, InvalidInput
from tufa.server.sql_types import UTCDateTime

# A wave's staged rollout (rollouts.py): the plan, where it stands, and why it halted.
# `gate_since` is when the health gate's count of failures began: the plan's start, or
# the operator's last resume.
wave_plans = Table(
    "wave_plans",
    schema,
    Column("factory_id", Integer, ForeignKey("factories.id"), primary_key=True),
    Column("wave", String(64), primary_key=True),
    Column("stages", Text, nullable=False),
    Column("soak_seconds", Integer, nullable=False),
    Column("max_failure_rate", Float, nullable=False),
    Column("min_reports", Integer, nullable=False),
    Column("silence_seconds", Integer, nullable=False),
    Column("stage", Integer, nullable=False),
    Column("stage_started_at", UTCDateTime, nullable=False),
    Column("gate_since", UTCDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("halt_reason", Text),
    Column("halted_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
)

# Which devices a wave was served to, when, and by which stage of its plan (NULL: by a
# rollout the operator chose): the health gate's population, and its silence clock.
wave_devices = Table(
    "wave_devices",
    schema,
    Column("factory_id", Integer, ForeignKey("factories.id"), primary_key=True),
    Column("wave", String(64), primary_key=True),
    Column("device_id", String(36), ForeignKey("devices.id"), primary_key=True),
    Column("stage", Integer),
    Column("served_at", UTCDateTime, nullable=False),
)

SOAKING: Final = "soaking"
ADVANCING: Final = "advancing"
HALTED: Final = "halted"
COMPLETED: Final = "completed"
CANCELLED: Final = "cancelled"
PlanState = Literal["soaking", "advancing", "halted", "completed", "cancelled"]
# The states in which the server's background task still has work to do.
RUNNING: Final = (SOAKING, ADVANCING)

MAX_STAGES = 20
# The defaults of `tufa waves rollout --plan`.
DEFAULT_SOAK_SECONDS = 30 * 60
DEFAULT_MAX_FAILURE_RATE = "5%"
DEFAULT_MIN_REPORTS = 20
DEFAULT_SILENCE_SECONDS = 2 * 3600
MIN_SILENCE_SECONDS = 2 * 3600  # two of an idle agent's hourly reports
MAX_SECONDS = 90 * 86400
# How many devices a rollout or a stage takes: a count (up to 999,999,999 devices), or a
# share in percent; or a device group, named as waves are.
_COUNT = re.compile(r"[0-9]{1,9}")
_SHARE = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,6})?)%")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Stage:
    """One stage: `count` devices in all, `share` percent of the tag's, or `group`."""

    count: int | None = None
    share: float | None = None
    group: str | None = None

    @property
    def label(self) -> str:
        if self.group is not None:
            return self.group
        if self.share is not None:
            return f"{self.share:.6f}".rstrip("0").rstrip(".") + "%"
        return str(self.count)

    def devices_in_all(self, devices_of_tag: int, group_size: int) -> int:
        """How many devices of the tag have been served once this stage is reached."""
        if self.group is not None:
            return group_size
        if self.share is not None:
            return share_of(devices_of_tag, self.share)
        assert self.count is not None
        return min(self.count, devices_of_tag)


def share_of(devices: int, percent: float) -> int:
    """`percent` of `devices`, rounded up, in decimal: 64.4% of 250 is 161, where binary
    floating point makes it 161.00000000000003 and so 162."""
    return math.ceil(Decimal(devices) * Decimal(str(percent)) / 100)


def parse_stage(text: str, first: bool) -> Stage:
    if text.isdigit():  # digits are a count, never a group's name
        if _COUNT.fullmatch(text) and int(text) >= 1:
            return Stage(count=int(text))
        raise InvalidInput(
            f"field 'plan': stage {text!r} is not a count from 1 to 999999999 (or a share "
            "such as 25%)"
        )
    share = _SHARE.fullmatch(text)
    if share and 0 < float(share.group(1)) <= 100:
        return Stage(share=float(share.group(1)))
    if first and NAME.fullmatch(text):
        return Stage(group=text)
    where = "" if first else " (a device group may only be the first stage)"
    raise InvalidInput(
        f"field 'plan': stage {text!r} is not a count such as 20 or a share such as 25%{where}"
    )


def parse_stages(texts: list[str]) -> list[Stage]:
    """The stages of `--plan`, checked: each larger than the one before where both are
    of one kind, and the last one `100%`."""
    if not 1 <= len(texts) <= MAX_STAGES:
        raise InvalidInput(f"field 'plan' must have 1 to {MAX_STAGES} stages, e.g. 5%,25%,100%")
    stages = [parse_stage(text, first=i == 0) for i, text in enumerate(texts)]
    for before, after in itertools.pairwise(stages):
        shrinks = (
            before.share is not None and after.share is not None and after.share <= before.share
        ) or (before.count is not None and after.count is not None and after.count <= before.count)
        if shrinks:
            raise InvalidInput(
                f"field 'plan': stage {after.label} must be larger than stage {before.label}: "
                "stages count the devices served in all"
            )
    if stages[-1].share != 100:
        raise InvalidInput(
            "field 'plan' must end with 100%: the server completes the wave after the last "
            "stage (add 100% as the last stage)"
        )
    return stages


def parse_share(text: str) -> float:
    """`max_failure_rate`: a share such as "5%" or "2.5%", in percent. JSON numbers with
    fractions are refused everywhere (canonical JSON has none), hence a string."""
    match = _SHARE.fullmatch(text)
    if match is None or not 0 <= float(match.group(1)) <= 100:
        raise InvalidInput("field 'max_failure_rate' must be a share from 0% to 100%, e.g. '5%'")
    return float(match.group(1))


@dataclass(frozen=True)
class HealthRules:
    """What the health gate asks of the devices served the wave so far."""

    soak_seconds: int
    max_failure_rate: float  # in percent
    min_reports: int
    silence_seconds: int

    @property
    def soak(self) -> timedelta:
        return timedelta(seconds=self.soak_seconds)

    @property
    def silence(self) -> timedelta:
        return timedelta(seconds=self.silence_seconds)

    def check(self) -> None:
        if not 1 <= self.soak_seconds <= MAX_SECONDS:
            raise InvalidInput(f"field 'soak_seconds' must be 1 to {MAX_SECONDS} seconds")
        if not MIN_SILENCE_SECONDS <= self.silence_seconds <= MAX_SECONDS:
            raise InvalidInput(
                f"field 'silence_seconds' must be {MIN_SILENCE_SECONDS} to {MAX_SECONDS} "
                "seconds: an idle agent reports once an hour, so a shorter silence would "
                "count devices that are well as failed"
            )
        if not 1 <= self.min_reports <= 1_000_000:
            raise InvalidInput("field 'min_reports' must be 1 to 1000000")


@dataclass(frozen=True)
class Plan:
    """A plan as stored, and where it stands."""

    wave: str
    stages: list[Stage]
    rules: HealthRules
    stage: int  # the index of the stage served last
    stage_started_at: datetime
    gate_since: datetime
    state: PlanState
    halt_reason: str | None
    halted_at: datetime | None

    @property
    def at_last_stage(self) -> bool:
        return self.stage == len(self.stages) - 1

    @property
    def soaked_at(self) -> datetime:
        return self.stage_started_at + self.rules.soak


def _stored(stage: Stage) -> dict[str, Any]:
    return {k: v for k, v in vars(stage).items() if v is not None}


def _plan(row: Any) -> Plan:
    return Plan(
        wave=row.wave,
        stages=[Stage(**s) for s in json.loads(row.stages)],
        rules=HealthRules(
            soak_seconds=row.soak_seconds,
            max_failure_rate=row.max_failure_rate,
            min_reports=row.min_reports,
            silence_seconds=row.silence_seconds,
        ),
        stage=row.stage,
        stage_started_at=row.stage_started_at,
        gate_since=row.gate_since,
        state=row.state,
        halt_reason=row.halt_reason,
        halted_at=row.halted_at,
    )


def find_plan(conn: Connection, factory_id: int, wave: str) -> Plan | None:
    row = conn.execute(
        select(wave_plans).where(wave_plans.c.factory_id == factory_id, wave_plans.c.wave == wave)
    ).first()
    return None if row is None else _plan(row)


def running_plans(conn: Connection) -> list[tuple[int, str]]:
    """(factory id, wave) of every plan the background task has to look at."""
    rows = conn.execute(
        select(wave_plans.c.factory_id, wave_plans.c.wave).where(wave_plans.c.state.in_(RUNNING))
    ).all()
    return [(r.factory_id, r.wave) for r in rows]


def add_plan(
    conn: Connection,
    factory_id: int,
    wave: str,
    stages: list[Stage],
    rules: HealthRules,
    now: datetime,
) -> None:
    conn.execute(
        insert(wave_plans).values(
            factory_id=factory_id,
            wave=wave,
            stages=json.dumps([_stored(s) for s in stages]),
            soak_seconds=rules.soak_seconds,
            max_failure_rate=rules.max_failure_rate,
            min_reports=rules.min_reports,
            silence_seconds=rules.silence_seconds,
            stage=0,
            stage_started_at=now,
            gate_since=now,
            state=SOAKING,
            created_at=now,
        )
    )


def change_plan(conn: Connection, factory_id: int, wave: str, **values: Any) -> None:
    conn.execute(
        update(wave_plans)
        .where(wave_plans.c.factory_id == factory_id, wave_plans.c.wave == wave)
        .values(**values)
    )


def refuse_if_planned(conn: Connection, factory_id: int, wave: str) -> None:
    """A wave that follows a plan is served only by its plan: the gate counts the devices
    the plan chose, and a halted plan must serve no one new."""
    plan = find_plan(conn, factory_id, wave)
    if plan is not None and plan.state in (*RUNNING, HALTED):
        raise Conflict(
            f"wave {wave!r} follows a staged plan ({plan.state}); see `tufa waves status "
            f"{wave}`, and `tufa waves resume`, `cancel` or `complete` it"
        )


def end_plan(conn: Connection, factory_id: int, wave: str, state: PlanState) -> None:
    """The wave was completed or cancelled: its plan, if any, ends with it."""
    change_plan(conn, factory_id, wave, state=state)


def wave_device_ids(conn: Connection, factory_id: int, wave: str) -> set[str]:
    """Ids of the devices recorded as served the wave."""
    query = select(wave_devices.c.device_id).where(
        wave_devices.c.factory_id == factory_id, wave_devices.c.wave == wave
    )
    return set(conn.execute(query).scalars())


def rollout_limit(limit: str | None, available: int) -> int:
    """How many of `available` devices a rollout's limit takes: a count ("10") or a
    share ("25%", "2.5%"), in ASCII digits only (int() and float() would also take
    a full-width "9", "1_000" and " 5")."""
    if limit is None:
        return available
    share = _SHARE.fullmatch(limit)
    if share is not None and 0 < float(share.group(1)) <= 100:
        return share_of(available, float(share.group(1)))
    if _COUNT.fullmatch(limit) and int(limit) >= 1:
        return int(limit)
    raise InvalidInput("'limit' must be a count such as 10 or a share such as 25%")


def record_served(
    conn: Connection,
    factory_id: int,
    wave: str,
    device_ids: list[str],
    stage: int | None,
    now: datetime,
) -> None:
    """Record that the wave was served to these devices now, by stage `stage` of its
    plan or (None) by the operator's choice: the health gate's population and its
    silence clock."""
    if device_ids:
        conn.execute(
            insert(wave_devices),
            [
                {"factory_id": factory_id, "wave": wave, "device_id": d}
                | {"stage": stage, "served_at": now}
                for d in device_ids
            ],
        )
