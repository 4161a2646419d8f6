"""The health gate of a staged rollout, and the rollout's status as the API shows it.

The gate looks at every device served the wave so far (revoked ones are out of the
fleet), each in one of four conditions, from its reports:

- silent: nothing heard from it for `--silence` since it was served (or since the plan
  was resumed), whatever it said before: a build that installs, then cuts the device
  off, is a failure too (an idle agent reports every hour, hence MIN_SILENCE);
- installed: it reports the wave's version installed;
- failed: it reported `install-failed` or `rolled-back` for the version, or
  `download-failed` `DOWNLOAD_ATTEMPTS` times (an agent retries at each check), and
  does not run the version;
- pending: none of these yet.

Reports are the installed, failed and silent devices; the failure rate is failed plus
silent over reports, and it may halt or advance the plan only once there are at least
`--min-reports` reports, so one failure of one device halts nothing. A stage makes way
for the next only once its own devices have reported too (`stage_heard`): earlier
stages' reports say nothing of the devices served last. Failures reported before a
resume are the ones the operator looked at: the gate counts from `gate_since`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypedDict

from sqlalchemy import Connection, func, select

from tufa.core.clock import iso
from tufa.core.device_events import DOWNLOAD_ATTEMPTS
from tufa.server.db import device_events, devices
from tufa.server.rollout_plans import HALTED, RUNNING, Plan, PlanState, wave_devices
from tufa.server.staleness import stale_device_ids

Condition = Literal["installed", "failed", "silent", "pending"]
_FAILURES = ("install-failed", "rolled-back")


@dataclass
class Counts:
    served: int = 0
    installed: int = 0
    failed: int = 0
    silent: int = 0
    stale: int = 0  # fed old metadata (staleness.py); not a report, whatever it runs

    @property
    def reports(self) -> int:
        return self.installed + self.failed + self.silent

    @property
    def failures(self) -> int:
        return self.failed + self.silent


def conditions(
    conn: Connection, factory_id: int, wave: str, version: str, plan: Plan, now: datetime
) -> list[tuple[str, int | None, Condition]]:
    """(device id, stage, condition) of every device the wave was served to and is in
    the fleet."""
    served = conn.execute(
        select(
            wave_devices.c.device_id,
            wave_devices.c.stage,
            wave_devices.c.served_at,
            devices.c.installed_version,
            devices.c.last_report_at,
        )
        .join(devices, devices.c.id == wave_devices.c.device_id)
        .where(
            wave_devices.c.factory_id == factory_id,
            wave_devices.c.wave == wave,
            devices.c.revoked_at.is_(None),
        )
    ).all()
    reported = conn.execute(
        select(device_events.c.device_id, device_events.c.kind, func.count())
        .join(
            wave_devices,
            (wave_devices.c.device_id == device_events.c.device_id)
            & (wave_devices.c.factory_id == factory_id)
            & (wave_devices.c.wave == wave),
        )
        .where(
            device_events.c.factory_id == factory_id,
            device_events.c.version == version,
            device_events.c.kind.in_([*_FAILURES, "download-failed"]),
            device_events.c.received_at >= plan.gate_since,
        )
        .group_by(device_events.c.device_id, device_events.c.kind)
    ).all()
    events: dict[str, Counter[str]] = {}
    for device_id, kind, count in reported:
        events.setdefault(device_id, Counter())[kind] = count
    found: list[tuple[str, int | None, Condition]] = []
    for d in served:
        kinds = events.get(d.device_id, Counter())
        heard = max(d.served_at, plan.gate_since, d.last_report_at or d.served_at)
        condition: Condition
        if now - heard >= plan.rules.silence:
            condition = "silent"
        elif d.installed_version == version:
            condition = "installed"
        elif any(kinds[k] for k in _FAILURES) or kinds["download-failed"] >= DOWNLOAD_ATTEMPTS:
            condition = "failed"
        else:
            condition = "pending"
        found.append((d.device_id, d.stage, condition))
    return found


def tally(
    found: list[tuple[str, int | None, Condition]], stale: set[str] | None = None
) -> tuple[Counts, dict[int | None, Counts]]:
    """The counts over all devices, and per stage (None: served by the operator's
    rollouts); `stale` the ids of the devices fed old metadata, if counted."""
    total, per_stage = Counts(), dict[int | None, Counts]()
    for device_id, stage, condition in found:
        for counts in (total, per_stage.setdefault(stage, Counts())):
            counts.served += 1
            if condition != "pending":
                setattr(counts, condition, getattr(counts, condition) + 1)
            if stale is not None and device_id in stale:
                counts.stale += 1
    return total, per_stage


def stage_heard(per_stage: dict[int | None, Counts], plan: Plan) -> bool:
    """Whether the stage served last has sent enough reports to make way for the next:
    `--min-reports` of them, or one from each device of a smaller stage."""
    counts = per_stage.get(plan.stage, Counts())
    return counts.reports >= min(plan.rules.min_reports, counts.served)


def failure_rate(counts: Counts) -> float:
    return 100 * counts.failures / counts.reports if counts.reports else 0.0


def breach(counts: Counts, plan: Plan) -> str | None:
    """Why the gate halts the plan, or None while it holds (or cannot decide yet)."""
    if counts.reports < plan.rules.min_reports:
        return None
    rate = failure_rate(counts)
    if rate <= plan.rules.max_failure_rate:
        return None
    return (
        f"failure rate {rate:.1f}% ({counts.failures} of {counts.reports} reports: "
        f"{counts.failed} failed, {counts.silent} silent) is above the plan's "
        f"--max-failure-rate {plan.rules.max_failure_rate:g}%"
    )


class StageJson(TypedDict):
    stage: int
    target: str
    served_at: str | None
    devices_served: int
    devices_installed: int
    devices_failed: int
    devices_silent: int
    devices_stale: int


class GateJson(TypedDict):
    reports: int
    failures: int
    failure_rate: float
    min_reports: int
    max_failure_rate: float
    decides: bool


class RolloutJson(TypedDict):
    """A staged rollout, as `tufa waves status` shows it."""

    state: PlanState
    stage: int  # 1-based: the stage served last
    stages: list[StageJson]
    soak_seconds: int
    silence_seconds: int
    next_stage_at: str | None
    halt_reason: str | None
    halted_at: str | None
    devices_before_plan: int
    gate: GateJson


def rollout_json(
    conn: Connection, factory_id: int, wave: str, version: str, plan: Plan, now: datetime
) -> RolloutJson:
    found = conditions(conn, factory_id, wave, version, plan, now)
    stale = stale_device_ids(conn, factory_id, [device_id for device_id, _, _ in found])
    total, per_stage = tally(found, stale)
    first_served = dict(
        conn.execute(
            select(wave_devices.c.stage, func.min(wave_devices.c.served_at))
            .where(wave_devices.c.factory_id == factory_id, wave_devices.c.wave == wave)
            .group_by(wave_devices.c.stage)
        ).all()
    )
    stages: list[StageJson] = []
    for index, stage in enumerate(plan.stages):
        counts = per_stage.get(index, Counts())
        stages.append(
            {
                "stage": index + 1,
                "target": stage.label,
                "served_at": iso(first_served.get(index)),
                "devices_served": counts.served,
                "devices_installed": counts.installed,
                "devices_failed": counts.failed,
                "devices_silent": counts.silent,
                "devices_stale": counts.stale,
            }
        )
    return {
        "state": plan.state,
        "stage": plan.stage + 1,
        "stages": stages,
        "soak_seconds": plan.rules.soak_seconds,
        "silence_seconds": plan.rules.silence_seconds,
        "next_stage_at": iso(plan.soaked_at) if plan.state in RUNNING else None,
        "halt_reason": plan.halt_reason if plan.state == HALTED else None,
        "halted_at": iso(plan.halted_at) if plan.state == HALTED else None,
        "devices_before_plan": per_stage.get(None, Counts()).served,
        "gate": {
            "reports": total.reports,
            "failures": total.failures,
            "failure_rate": round(failure_rate(total), 2),
            "min_reports": plan.rules.min_reports,
            "max_failure_rate": plan.rules.max_failure_rate,
            "decides": total.reports >= plan.rules.min_reports,
        },
    }
